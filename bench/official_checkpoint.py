"""A checkpoint written by the official JEM code itself, imported and attacked by robust-jem.

Runs the official model code (``wideresnet.py``, ``norms.py`` and the ``F`` / ``CCF`` classes and the ``checkpoint``
function of ``train_wrn_ebm.py`` from a checkout of github.com/wgrathwohl/JEM; that script imports torchvision at
module level, so only those definitions are taken from it, by name, with ``ast``). It builds a small CCF, lets the
official ``checkpoint()`` write it (current and legacy torch file formats), then

1. ``robust-jem import-jem`` converts it; the imported model's logits and energies are compared with the official
   ``classify`` / ``forward`` on random inputs (bar: within 1e-4);
2. ``robust-jem pgd --data-dir DATA --eps 8/255 --n-examples 10`` attacks it on CIFAR-10 files in the official
   binary format (synthetic images, written here).

    python bench/official_checkpoint.py --official /path/to/JEM [--out bench/results/official_checkpoint.md]
    python bench/official_checkpoint.py --jempp /path/to/JEMPP --out bench/results/jempp_checkpoint.md
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import types
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def official_definitions(repo: Path) -> types.SimpleNamespace:
    """``F``, ``CCF`` and ``checkpoint`` from the official train_wrn_ebm.py, with its wideresnet module."""
    sys.path.insert(0, str(repo))
    import wideresnet  # noqa: F401  (the official module, found on the path above)

    tree = ast.parse((repo / "train_wrn_ebm.py").read_text())
    keep = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in ("F", "CCF",
                                                                                                  "checkpoint")]
    module = ast.Module(body=keep, type_ignores=[])
    scope = {"nn": torch.nn, "t": torch, "os": __import__("os"), "wideresnet": wideresnet}
    exec(compile(module, str(repo / "train_wrn_ebm.py"), "exec"), scope)  # noqa: S102  (the official code itself)
    return types.SimpleNamespace(**{k: scope[k] for k in ("F", "CCF", "checkpoint")})


def jempp_definitions(repo: Path) -> types.SimpleNamespace:
    """JEM++'s own ``CCF`` (``models/jem_models.py`` around its YOPO WRN) and the ``checkpoint`` function of its
    ``utils.py`` (taken by name with ``ast``: the module imports more than torch)."""
    sys.path.insert(0, str(repo))
    from models import jem_models  # noqa: F401  (JEM++'s own package, found on the path above)

    tree = ast.parse((repo / "utils.py").read_text())
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "checkpoint"]
    scope = {"t": torch, "os": __import__("os")}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(repo / "utils.py"), "exec"), scope)  # noqa: S102
    return types.SimpleNamespace(CCF=jem_models.CCF, checkpoint=scope["checkpoint"])


def write_cifar10(folder: Path, n: int, seed: int, label_with: Any = None) -> None:
    """The six files of cifar-10-batches-bin: records of 1 label byte + 3072 pixel bytes (R, G, B planes).
    ``label_with`` (images in [-1,1] -> logits) labels the test images with a model's own predictions, so that
    every image is classified correctly and an attack on it runs its whole budget (a timing, not a robustness
    measurement)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, size=(n, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        if label_with is not None and name == "test_batch.bin":
            with torch.no_grad():
                z = torch.from_numpy(pixels).float().view(n, 3, 32, 32) / 255 * 2 - 1
                labels = label_with(z).argmax(1).numpy().astype(np.uint8).reshape(n, 1)
        (folder / name).write_bytes(np.concatenate([labels, pixels], 1).tobytes())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    code = ap.add_mutually_exclusive_group(required=True)
    code.add_argument("--official", type=Path, help="checkout of github.com/wgrathwohl/JEM")
    code.add_argument("--jempp", type=Path, help="checkout of github.com/sndnyang/JEMPP (its YOPO WRN, --norm batch)")
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--formats", default="zip,legacy", help="torch file formats to write: zip, legacy or both")
    ap.add_argument("--time-attack", action="store_true",
                    help="label the synthetic test images with the model's own predictions, so pgd runs in full")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "official_checkpoint.md")
    args = ap.parse_args(argv)
    off = official_definitions(args.official) if args.official else jempp_definitions(args.jempp)
    from robust_jem import load

    def make_model() -> torch.nn.Module:
        if args.official:
            return off.CCF(args.depth, args.width, None, 0.0, 10).eval()
        f = off.CCF(args.depth, args.width, "batch", dropout_rate=0.0, n_classes=10, model="yopo")
        f.train()  # BatchNorm running statistics that are not the initial ones, as after training
        with torch.no_grad():
            for _ in range(3):
                f.classify(torch.rand(16, 3, 32, 32) * 3 - 1.5)
        return f.eval()

    cli = [sys.executable, "-m", "robust_jem"]
    lines = []
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fmt in args.formats.split(","):
            torch.manual_seed(0)
            f = make_model()
            write_cifar10(tmp / "data" / "cifar-10-batches-bin", n=20, seed=0,
                          label_with=f.classify if args.time_attack else None)
            buffer = torch.rand(16, 3, 32, 32) * 2 - 1
            save_dir = tmp / fmt
            save_dir.mkdir()
            if fmt == "legacy":  # the pre-1.6 torch format the paper's checkpoints were written in
                real_save = torch.save
                torch.save = lambda obj, path: real_save(obj, path, _use_new_zipfile_serialization=False)
            try:
                off.checkpoint(f, buffer, "ckpt.pt", types.SimpleNamespace(save_dir=str(save_dir)), "cpu")
            finally:
                if fmt == "legacy":
                    torch.save = real_save
            src, dst = save_dir / "ckpt.pt", save_dir / "native.pt"
            imp = subprocess.run(cli + ["import-jem", str(src), "--out", str(dst)], capture_output=True, text=True)
            row: dict = {"format": fmt, "source_sha256": sha256(src), "import_rc": imp.returncode}
            if imp.returncode == 0:
                model = load(dst)
                x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
                with torch.no_grad():
                    want_logits = f.classify(x * 2 - 1)
                    row["max_logit_diff"] = float((model(x) - want_logits).abs().max())
                    row["max_energy_diff"] = float((model.energy(x) + f(x * 2 - 1)).abs().max())
                    row["buffer_kept"] = bool(torch.equal(torch.load(dst, weights_only=True)["buffer"].float(),
                                                          buffer))
                out = tmp / f"pgd-{fmt}"
                t0 = time.perf_counter()
                pgd = subprocess.run(cli + ["pgd", "--checkpoint", str(dst), "--data-dir", str(tmp / "data"),
                                            "--eps", "8/255", "--n-examples", "10", "--out",
                                            str(out), "--no-progress"], capture_output=True, text=True)
                row["pgd_rc"] = pgd.returncode
                row["pgd_wall_s"] = round(time.perf_counter() - t0, 1)
                row["pgd_rows"] = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()] \
                    if (out / "rows.jsonl").exists() else []
                row["pgd_stdout"] = (pgd.stdout + pgd.stderr).strip()
            else:
                row["import_error"] = imp.stderr.strip()
            results.append(row)
    repo = args.official or args.jempp
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    what = ("wgrathwohl/JEM", "`wideresnet.py`, `norms.py`, and `F`, `CCF`, `checkpoint` of `train_wrn_ebm.py`",
            "norm None") if args.official else \
        ("sndnyang/JEMPP", "`models/jem_models.py` (`CCF`, model `yopo`), `models/wideresnet_yopo.py`, "
         "`models/norms.py`, and `checkpoint` of `utils.py`", "norm batch, running statistics from 3 train-mode "
         "batches, compared in eval mode")
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines += [f"# A {'JEM' if args.official else 'JEM++'} checkpoint written by its own code, imported and attacked",
              "",
              f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}, robust-jem git {git}; code "
              f"{what[0]} at {commit} ({what[1]}). CCF(depth {args.depth}, width {args.width}, {what[2]}), seed 0, "
              "a 16-image buffer, written by its own `checkpoint()`; 64 random inputs compared; `pgd` on synthetic "
              "CIFAR-10 binary files (20 records a file" + ("; test labels = the model's own predictions, so the attack runs "
              "in full: a timing" if args.time_attack else "") + ").", "",
              "| torch format | source sha256 | import | max logit diff | max energy diff | buffer kept | pgd | rows | "
              "pgd wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['format']} | `{r['source_sha256'][:16]}` | rc {r['import_rc']} | "
                     f"{r.get('max_logit_diff', float('nan')):.2e} | {r.get('max_energy_diff', float('nan')):.2e} | "
                     f"{r.get('buffer_kept', '–')} | rc {r.get('pgd_rc', '–')} | {len(r.get('pgd_rows', []))} | "
                     f"{r.get('pgd_wall_s', '–')} |")
    lines += ["", "`pgd` output (first format):", "", "```", results[0].get("pgd_stdout", ""), "```", ""]
    ok = all(r["import_rc"] == 0 and r["max_logit_diff"] < 1e-4 and r["pgd_rc"] == 0 and r["pgd_rows"]
             for r in results)
    lines += [f"Bar (logits within 1e-4, pgd writes rows): {'met' if ok else 'NOT met'}.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "pgd_rows"} for r in results], indent=1))
    print(args.out)


if __name__ == "__main__":
    main()
