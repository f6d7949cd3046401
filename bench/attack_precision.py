"""Does bf16 weaken the attack? The same PGD sweep in fp32 and under bf16 autocast, same seeds, same images.

    .venv/bin/python bench/attack_precision.py [--ce runs/quick-ce/final.pt] [--pgd-at ...] [--jem ...]
    .venv/bin/python bench/attack_precision.py --quick --ce C --pgd-at P --jem J --out DIR   # seconds (a test runs it)

For every model (CE and PGD-AT bare, JEM-0, and JEM-1 with full gradients through the chain) the white-box
sweep of the suite (``attacks.benchmark.run_sweep`` with torchattacks PGD, the fresh-noise verdict and the
per-sample worst case) runs twice: ``RefinedClassifier(bf16=False)`` and ``(bf16=True)``, where bf16 covers
the chain, the gradients the attacker sees and the final verdict. The check passes for a model when bf16's
robust accuracy lies inside fp32's 95 % Wilson interval; the number of examples whose verdict differs
(discordant pairs) and the wall-time ratio are reported beside it. Results:
``bench/results/attack_precision-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attacks.benchmark import Examples, run_sweep  # noqa: E402
from attacks.white import pgd_factory  # noqa: E402
from infra.provenance import device_name, git_sha, now  # noqa: E402
from robust_jem.refined import default_refinement  # noqa: E402
from suite.targets import load_checkpoints, target_for  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ce", default="runs/quick-ce/final.pt")
    ap.add_argument("--pgd-at", default="runs/quick-pgd-at/final.pt")
    ap.add_argument("--jem", default="runs/quick-jem/final.pt")
    ap.add_argument("--eps", type=float, default=0.1, help="L∞ ε (the quick study's middle budget)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n-bare", type=int, default=200, help="images for CE / PGD-AT")
    ap.add_argument("--n-jem0", type=int, default=100)
    ap.add_argument("--n-jem1", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--quick", action="store_true", help="seconds: 2 steps on 4 images per model")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.n_bare, args.n_jem0, args.n_jem1 = 2, 4, 4, 4
    device = torch.device(args.device)
    paths = {"CE": args.ce, "PGD-AT": args.pgd_at, "JEM": args.jem}
    ds, loaded = load_checkpoints(list(paths.values()), device)
    by_path = {c.path: c for c in loaded}
    models = {name: by_path[str(p)] for name, p in paths.items()}
    plan = [("CE", 0, args.n_bare), ("PGD-AT", 0, args.n_bare), ("JEM", 0, args.n_jem0), ("JEM", 1, args.n_jem1)]
    factory = pgd_factory(steps=args.steps, eval_draws=5, seed=0)
    out_rows = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        for ckpt, k, n in plan:
            c = models[ckpt]
            rows = {}
            for bf16 in (False, True):  # the suite's own defense (default_refinement); bf16 changes the arithmetic
                sampler = getattr(c.info.get("config"), "sgld", None)
                target = target_for(c, default_refinement(k, sampler), bf16=bf16)
                rows[bf16] = run_sweep([target], factory, ["linf"], [args.eps], ds.images, ds.labels,
                                       Path(tmp) / f"{target.label}-{bf16}", dataset=ds.name, examples=Examples(n=n),
                                       progress=False)[0]
            a, b = rows[False], rows[True]
            label = target.label
            discordant = sum(x != y for x, y in zip(a.correct, b.correct))
            out_rows.append({
                "model": label, "n": a.n, "checkpoint_sha256": c.sha256,
                "clean_fp32": a.clean_acc, "clean_bf16": b.clean_acc,
                "robust_fp32": a.robust_acc, "robust_fp32_ci": [a.robust_ci_low, a.robust_ci_high],
                "robust_bf16": b.robust_acc, "robust_bf16_ci": [b.robust_ci_low, b.robust_ci_high],
                "bf16_within_fp32_ci": a.robust_ci_low <= b.robust_acc <= a.robust_ci_high,
                "discordant_examples": discordant,
                "wall_s_fp32": a.wall_s, "wall_s_bf16": b.wall_s,
                "speedup_bf16": a.wall_s / b.wall_s if b.wall_s else None,
                "attack": a.attack_repr,
            })
            print(f"{label}: robust fp32 {a.robust_acc:.3f} [{a.robust_ci_low:.3f}, {a.robust_ci_high:.3f}] "
                  f"bf16 {b.robust_acc:.3f}; discordant {discordant}/{a.n}; "
                  f"time fp32 {a.wall_s:.1f}s bf16 {b.wall_s:.1f}s", flush=True)
    dev = device_name(device)
    result = {"bench": "attack_precision", "device": dev, "git_sha": git_sha(), "timestamp": now(),
              "torch": torch.__version__, "eps_linf": args.eps, "steps": args.steps,
              "wall_s": round(time.monotonic() - t_start, 1), "rows": out_rows,
              "all_within_ci": all(r["bf16_within_fp32_ci"] for r in out_rows)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "attack_precision-" + re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# bf16 vs fp32 attack strength — {dev}", "",
             f"{result['timestamp']}, git {result['git_sha']}, torch {result['torch']}. PGD L∞ ε={args.eps}, "
             f"{args.steps} steps, 5 fresh-noise eval draws, seed 0, the first N test images; bf16 = autocast "
             f"over the SGLD chain, the attacker's gradients and the verdict. Bench wall time {result['wall_s']} s.",
             "", "| model | n | clean fp32 | clean bf16 | robust fp32 [95 % CI] | robust bf16 [95 % CI] | bf16 in fp32 CI "
             "| discordant | time fp32 | time bf16 | bf16 speed-up |", "|---|---:|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for r in out_rows:
        lo, hi = r["robust_fp32_ci"]
        lo2, hi2 = r["robust_bf16_ci"]
        lines.append(f"| {r['model']} | {r['n']} | {r['clean_fp32']:.3f} | {r['clean_bf16']:.3f} | "
                     f"{r['robust_fp32']:.3f} [{lo:.3f}, {hi:.3f}] | {r['robust_bf16']:.3f} [{lo2:.3f}, {hi2:.3f}] | "
                     f"{'yes' if r['bf16_within_fp32_ci'] else '**no**'} | {r['discordant_examples']} | "
                     f"{r['wall_s_fp32']:.1f} s | {r['wall_s_bf16']:.1f} s | {r['speedup_bf16']:.2f}x |")
    lines += ["", f"Verdict: bf16 robust accuracy within fp32's CI for {'every' if result['all_within_ci'] else 'NOT every'}"
              " model."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(out / f"{stem}.md")
    return out / f"{stem}.md"


if __name__ == "__main__":
    main()
