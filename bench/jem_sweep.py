"""Sweeps of JEM variants per preset: test accuracy and EBM health judged by an independent classifier.

Each variant is ``robust-jem train --objective jem --preset PRESET`` with a few overrides, then
``robust-jem health`` with ``--judge`` (a CE model trained without the JEM). ``--run`` trains the variants that
are missing, ``--parallel`` at a time with one torch thread each (2 is what 2 CPU cores take); the table is always
rebuilt from what ``--root`` holds, variants not run included.

    python bench/jem_sweep.py --preset quick --judge runs/quick-fashion-mnist/ce/final.pt --run
    python bench/jem_sweep.py --preset standard --judge runs/quick-fashion-mnist/ce/final.pt --run --parallel 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.provenance import file_sha256, git_sha, now  # noqa: E402

# Each variant spells out every setting it changes from the preset, so a table stays reproducible when the
# preset moves (quick adopted "cgpx1" after its sweep; "uniform" is the quick preset before).
_PAPER_PX = ["--sgld-init", "uniform", "--px-weight", "1"]
_STEP1 = ["--sgld-step-size", "1"]  # the standard preset before std-s01
VARIANTS: dict[str, dict[str, list[str]]] = {
    "quick": {
        "uniform": _PAPER_PX,  # U(-1,1) init and re-init, the paper's log p(x) weight 1
        "cg": ["--sgld-init", "class-gaussian", "--px-weight", "1"],
        "cg10": ["--sgld-init", "class-gaussian", "--px-weight", "1", "--sgld-steps", "10"],
        "cgl2": ["--sgld-init", "class-gaussian", "--px-weight", "1", "--energy-l2", "1.0"],
        "cgpx": ["--sgld-init", "class-gaussian", "--px-weight", "0.3"],
        "cgpx1": ["--sgld-init", "class-gaussian", "--px-weight", "0.1"],  # the quick preset since
        "cgpx3w": ["--sgld-init", "class-gaussian", "--px-weight", "0.3", "--ce-warmup-iters", "1000"],
    },
    "tiny": {"uniform": _PAPER_PX},  # seconds: the bench's own test runs it
    "standard": {
        # the preset until SGLD step 0.1 (std-s01) won: class-Gaussian chains, log p(x) weight 0.1, 4000 CE + 8000
        # JEM iterations, SGLD step 1
        "std": _STEP1,
        "std-px03": _STEP1 + ["--px-weight", "0.03"],
        "std-uniform": _STEP1 + _PAPER_PX,
        "std-px03-long": _STEP1 + ["--px-weight", "0.03", "--iters", "16000"],
        # shorter chains: a slot lives ~1/0.2 = 5 visits (25 SGLD steps) instead of ~20 visits
        "std-reinit20": _STEP1 + ["--reinit-freq", "0.2"],
        # the quick JEM's healthy regime at standard scale: 4000 CE + 3000 JEM iterations (the decay is not reached)
        "std-short": _STEP1 + ["--iters", "7000"],
        # ... with 10 SGLD steps (the quick sweep's closest buffer, cg10)
        "std-short-k10": _STEP1 + ["--iters", "7000", "--sgld-steps", "10"],
        # the quick JEM's short CE warm start (800), then a long JEM phase with a step decay
        "std-w800": _STEP1 + ["--ce-warmup-iters", "800", "--iters", "8000", "--decay-at", "7000"],
        # a stable sampler: on std's final model, SGLD with step 1 from the init *raises* the energy (0.02 -> 1.16
        # in 5 steps) while step 0.1 lowers it below the data's; the same chains, 10x smaller steps
        "std-s01": ["--sgld-step-size", "0.1"],
        "std-w800-s01": ["--ce-warmup-iters", "800", "--iters", "8000", "--decay-at", "7000",
                         "--sgld-step-size", "0.1"],
        # ... with the paper's log p(x) weight, or twice the SGLD steps (w800-s01's buffer: FD 13.7 but 65.5 %
        # confident for the independent judge, the class-Gaussian init's own level)
        "std-w800-s01-px1": ["--ce-warmup-iters", "800", "--iters", "8000", "--decay-at", "7000", "--sgld-step-size",
                             "0.1", "--px-weight", "1"],
        "std-w800-s01-k10": ["--ce-warmup-iters", "800", "--iters", "8000", "--decay-at", "7000", "--sgld-step-size",
                             "0.1", "--sgld-steps", "10"],
        # ... with a 3x larger step (between the stable 0.1 and step 1, whose chains climbed the energy)
        "std-w800-s03": ["--ce-warmup-iters", "800", "--iters", "8000", "--decay-at", "7000", "--sgld-step-size",
                         "0.3"],
    },
    "paper-small": {
        # the paper's objective and sampler (issue 27): diverged at the end of the lr warm-up (step ~1000), and again
        # within 100 steps after each of the trainer's 3 rollbacks (lr x0.5 each)
        "paper": [],
        # one change each, on pilots of 2500 iterations (1500 past the divergence point): a 10x smaller SGLD step
        # (on this net step 1 climbs the energy: the standard sweep), or chains kept in [-1, 1]
        "paper-s01-pilot": ["--iters", "2500", "--sgld-step-size", "0.1"],
        "paper-clamp-pilot": ["--iters", "2500", "--sgld-clamp"],
        # the pilot that survived (step 0.1 diverged at 2250), at the preset's full length: it diverged too, later
        # (both energies drifted down from -23 at step 2500 to -55 at 6150, then the data energy ran away at 6200 and
        # after each rollback); the 2500-iteration pilot is the stable paper-faithful model
        "paper-clamp": ["--sgld-clamp"],
    },
}


def run(preset: str, name: str, args: list[str], root: Path, judge: str, threads: int) -> None:
    out = root / name
    cli = [sys.executable, "-m", "robust_jem"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if diverged_at(out):
        return  # a measured failure: kept, not retried
    if not (out / "final.pt").exists():
        cmd = ["train", "--objective", "jem", "--preset", preset, "--out", str(out), *args, "--no-progress",
               "--device", "cpu"]
        if (out / "last.pt").exists():
            cmd = ["train", "--resume", str(out), "--no-progress", "--device", "cpu"]
        if subprocess.run(cli + cmd, env=env).returncode != 0:
            if diverged_at(out):
                return
            raise RuntimeError(f"training {name} failed (not a divergence): see {out}")
    if not (out / "health" / "health.json").exists():
        subprocess.run(cli + ["health", "--checkpoint", str(out / "final.pt"), "--judge", judge, "--out",
                              str(out / "health"), "--device", "cpu"], check=True, env=env)


def diverged_at(out: Path) -> str | None:
    """How a variant's training ended in divergence (from its metrics.jsonl rollbacks), or None."""
    path = out / "metrics.jsonl"
    if (out / "final.pt").exists() or not path.exists():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rollbacks = [r for r in rows if r.get("event") == "rollback"]
    if len(rollbacks) < 3:
        return None
    last = next((r for r in reversed(rows) if "loss" in r), {})
    return (f"diverged: rollbacks at steps {', '.join(str(r['step']) for r in rollbacks)} ({rollbacks[0]['reason']}; "
            f"lr x{rollbacks[-1]['lr_scale']:g} at the last); last log at step {last.get('step')}: acc "
            f"{last.get('acc', float('nan')):.2f}, E data {last.get('e_data', float('nan')):.3g}, E sample "
            f"{last.get('e_sample', float('nan')):.3g}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(VARIANTS), default="quick")
    ap.add_argument("--judge", required=True)
    ap.add_argument("--root", type=Path, default=None, help="[runs/sweep (quick), runs/sweep-PRESET]")
    ap.add_argument("--run", action="store_true", help="train and judge the missing variants")
    ap.add_argument("--only", default=None, help="comma-separated variants to run and tabulate (default: all)")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="[bench/results/PRESET_jem_sweep.md]")
    args = ap.parse_args(argv)
    variants = VARIANTS[args.preset]
    root = args.root or Path("runs/sweep" if args.preset == "quick" else f"runs/sweep-{args.preset}")
    out_md = args.out or Path(f"bench/results/{args.preset}_jem_sweep.md")
    if args.only is not None:
        only = set(args.only.split(","))
        if only - set(variants):
            ap.error(f"unknown variants for --preset {args.preset}: {', '.join(sorted(only - set(variants)))}")
        variants = {n: v for n, v in variants.items() if n in only}
    if args.run:
        threads = max(1, (os.cpu_count() or 1) // max(1, args.parallel))
        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            for f in [pool.submit(run, args.preset, n, v, root, args.judge, threads) for n, v in variants.items()]:
                f.result()
    columns = ["variant", "overrides", "test acc", "buffer ≥ 0.9 confident", "real ≥ 0.9 confident",
               "agrees with JEM", "FD buffer", "FD init", "FD conditional", "FD uniform", "FD real/real", "E data",
               "E buffer", "training s", "sha256"]
    lines = [f"# {args.preset.capitalize()} JEM variants: accuracy and EBM health", "",
             f"`robust-jem train --objective jem --preset {args.preset}` + the overrides below, then `robust-jem health` with "
             f"the judge `{args.judge}` (an independently trained CE model). FD = Fréchet distance to real test "
             "images in the judge's logit space; uniform noise and real-vs-real are the same for every row "
             f"(one judge). Judge sha256 `{file_sha256(Path(args.judge))[:16]}`; table built {now()} at git "
             f"{git_sha()}; each variant's config and seed are in ROOT/VARIANT/config.json. \"real\" is the judge's "
             "confident fraction on held-out real test images: what samples distributed like the data would score.",
             "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, extra in variants.items():
        h_path, m_path = root / name / "health" / "health.json", root / name / "metrics.jsonl"
        failure = diverged_at(root / name)
        if failure:
            lines.append(f"| {name} | `{' '.join(extra) or '(preset)'}` | {failure} |" + " |" * (len(columns) - 3))
            continue
        if not h_path.exists() or not m_path.exists():
            lines.append(f"| {name} | `{' '.join(extra)}` | not run |" + " |" * (len(columns) - 3))
            continue
        h = json.loads(h_path.read_text())
        metrics = [json.loads(x) for x in m_path.read_text().splitlines()]
        final = next((m for m in metrics if m.get("event") == "final"), {})
        logged = [m for m in metrics if m.get("it_per_s")]
        wall = sum((m["step"] - p["step"]) / m["it_per_s"] for p, m in zip([{"step": 0}] + logged, logged))
        real = "–" if h.get("real_confident") is None else f"{100 * h['real_confident']:.1f} %"
        fd_init = "–" if h.get("fd_init_real") is None else f"{h['fd_init_real']:.1f}"
        lines.append(f"| {name} | `{' '.join(extra) or '(preset)'}` | {final.get('test_acc', float('nan')):.3f} | "
                     f"{100 * h['buffer_confident']:.1f} % | {real} | {100 * h['buffer_agrees_with_jem']:.1f} % | "
                     f"{h['fd_buffer_real']:.1f} | {fd_init} | {h['fd_conditional_real']:.1f} | "
                     f"{h['fd_uniform_real']:.1f} | {h['fd_real_real']:.2f} | {h['energy_data']:.2f} | "
                     f"{h['energy_buffer']:.2f} | {wall:.0f} | `{h['checkpoint_sha256'][:16]}` |")
    lines += ["", "Training seconds are summed from the logged it/s (the runs shared the 2 cores with other work, so "
                  "they are upper bounds).", ""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    print(out_md)


if __name__ == "__main__":
    main()
