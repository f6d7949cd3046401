"""An independent health check of JEM checkpoints: is the replay buffer made of garments?

Nothing of the project's data, health or training code is used: the Fashion-MNIST IDX files are parsed here,
the judge is a small BatchNorm CNN of another architecture trained here (seeded, cached in ``--judge-cache``),
and the Fréchet distance is computed here (eigen-decomposition form). Only the object under test comes from the
project: each checkpoint's classifier (``robust_jem.load``, which takes [0,1] images) and its stored buffer.

For every checkpoint it reports: its test accuracy on the 10,000 test images (this reader), the fraction of
``--n`` buffer samples the judge labels with softmax ≥ 0.9, the judge's agreement with the JEM's own label, and
the Fréchet distance in the judge's logit space between the buffer and real test images, beside the same for
uniform noise and for two disjoint halves of the test set (the floor).

    python bench/independent_health.py runs/quick-fashion-mnist/jem/final.pt [more.pt ...] --tag quick
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.provenance import file_sha256, git_sha, now  # noqa: E402
from robust_jem import load  # noqa: E402  (the model under test, nothing else)

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array: magic 0x0000 08 <ndim>, big-endian dims, then bytes."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[:3] != b"\x00\x00\x08":
        raise SystemExit(f"{path}: not a uint8 IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    def find(stem: str) -> Path:
        for p in (root / f"{stem}.gz", root / stem):
            if p.exists():
                return p
        raise SystemExit(f"{stem} not found under {root}")
    img, lbl = (read_idx(find(s)) for s in FILES[split])
    return torch.from_numpy(img.copy()).float().div(255).unsqueeze(1), torch.from_numpy(lbl.astype(np.int64))


def judge_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def train_judge(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = judge_net()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            b = perm[i:i + 128]
            loss = nn.functional.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def logits_of(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(x[i:i + 500]).float() for i in range(0, len(x), 500)])


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa−μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½), square roots by symmetric eigen-decomposition."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ cb @ root_a
    wm = np.linalg.eigvalsh((m + m.T) / 2)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(wm, 0, None)).sum())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-n", type=int, default=None, help="train the judge on the first N images [all]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge-cache", type=Path, default=Path("runs/independent_judge.pt"))
    ap.add_argument("--tag", default="run")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    x_tr, y_tr = fashion(args.data, "train")
    x_te, y_te = fashion(args.data, "test")
    if args.judge_cache.exists():
        judge = judge_net()
        judge.load_state_dict(torch.load(args.judge_cache, weights_only=True))
        judge.eval()
    else:
        judge = train_judge(x_tr[:args.train_n], y_tr[:args.train_n], args.epochs, args.seed)
        args.judge_cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(judge.state_dict(), args.judge_cache)
    real = logits_of(judge, x_te)
    judge_acc = float((real.argmax(1) == y_te).float().mean())
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(x_te), generator=g)
    half = min(args.n, len(x_te) // 2)
    ref, other = real[perm[:half]].numpy(), real[perm[half:2 * half]].numpy()
    uniform = logits_of(judge, torch.rand((args.n, 1, 28, 28), generator=g)).numpy()
    base = {"judge_test_acc": judge_acc, "fd_real_real": frechet(other, ref), "fd_uniform_real": frechet(uniform, ref),
            "real_confident": float((real.softmax(1).amax(1) >= 0.9).float().mean())}
    print(json.dumps(base), flush=True)
    results = []
    for path in args.checkpoints:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = load(path).requires_grad_(False).eval()
        acc = float((logits_of(model, x_te).argmax(1) == y_te).float().mean())
        res = {"checkpoint": str(path), "sha256": file_sha256(path), "test_acc": acc}
        buf = ckpt.get("buffer")
        if buf is not None:
            idx = torch.randperm(len(buf), generator=g)[:args.n]
            samples = ((buf[idx].float() + 1) / 2).clamp(0, 1)  # the buffer lives in the model's [-1,1] space
            lj, lm = logits_of(judge, samples), logits_of(model, samples)
            res.update(buffer_confident=float((lj.softmax(1).amax(1) >= 0.9).float().mean()),
                       agrees_with_jem=float((lj.argmax(1) == lm.argmax(1)).float().mean()),
                       fd_buffer_real=frechet(lj.numpy(), ref))
        results.append(res)
        print(json.dumps(res), flush=True)
    meta = {"timestamp": now(), "git_sha": git_sha(), "judge": "2-conv BatchNorm CNN, Adam 1e-3, "
            f"{args.epochs} epochs on {args.train_n or len(x_tr)} images, seed {args.seed}", **base, "n": args.n, "wall_s": time.perf_counter() - t0,
            "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"independent_health-{args.tag}.json").write_text(json.dumps(meta, indent=1))
    lines = [f"# Independent health check ({args.tag})", "",
             f"{meta['timestamp']}, git {meta['git_sha']}. Judge: {meta['judge']} (own IDX reader, own code); its "
             f"test accuracy {100 * judge_acc:.1f} %. Fréchet distance in the judge's logit space to {half} real test "
             f"images: uniform noise {base['fd_uniform_real']:.1f}, another {half} real images "
             f"{base['fd_real_real']:.2f}. The judge labels {100 * base['real_confident']:.1f} % of the 10,000 real "
             "test images with ≥ 0.9 confidence (samples distributed like the data would score the same).", "",
             "| checkpoint | sha256 | test acc (10,000, own reader) | buffer ≥ 0.9 confident | judge agrees with JEM | "
             "FD buffer | FD uniform / 10 |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "fd_buffer_real" in r:
            lines.append(f"| `{r['checkpoint']}` | `{r['sha256'][:16]}` | {100 * r['test_acc']:.1f} % | "
                         f"{100 * r['buffer_confident']:.1f} % | {100 * r['agrees_with_jem']:.1f} % | "
                         f"{r['fd_buffer_real']:.1f} | {base['fd_uniform_real'] / 10:.1f} |")
        else:
            lines.append(f"| `{r['checkpoint']}` | `{r['sha256'][:16]}` | {100 * r['test_acc']:.1f} % | – | – | – | – |")
    (args.out / f"independent_health-{args.tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
