"""Ctrl-C, SIGTERM and kill -9 in a real training run, then --resume, against an uninterrupted run of the same
command: are the final weights bit-identical? (The issue's bar, measured on the quick preset.)

Usage: .venv/bin/python bench/interrupt_resume.py [--objective ce] [--preset quick] > bench/results/interrupt_resume-quick.md
       .venv/bin/python bench/interrupt_resume.py --preset tiny --iters 300 --after 2   # seconds (a test runs it)
Each signal is sent after the run has logged ``--after`` metric rows (mid log window for SIGINT / SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infra.provenance import device_name, git_sha  # noqa: E402
from robust_jem.checkpoint import read_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objective", default="ce")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--after", type=int, default=8, help="metric rows logged before the signal")
    ap.add_argument("--iters", type=int, default=None, help="training iterations [the preset's]")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="interrupt-"))
    cmd = [sys.executable, "-m", "robust_jem", "train", "--preset", args.preset, "--objective", args.objective,
           "--no-progress", "--device", "cpu"] + (["--iters", str(args.iters)] if args.iters else [])

    t0 = time.perf_counter()
    subprocess.run(cmd + ["--out", str(root / "whole")], check=True, capture_output=True)
    whole_s = time.perf_counter() - t0
    ref = read_checkpoint(root / "whole" / "final.pt")
    lines = [f"# Interrupt, then resume: {args.preset} {args.objective} on {device_name('cpu')}",
             f"git {git_sha()}, torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}; "
             f"uninterrupted run {whole_s:.0f} s, {ref['step']} steps, test accuracy {ref['metrics']}\n",
             "| signal | stopped at step | exit code | says | resumed | weights equal (bit for bit) | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        out = root / sig.name
        extra = ["--save-every", "0.2"] if sig == signal.SIGKILL else []
        proc = subprocess.Popen(cmd + extra + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        metrics = out / "metrics.jsonl"
        def ready() -> bool:  # kill -9 keeps what the last save kept: wait for one
            logged = metrics.exists() and metrics.read_text().count("\n") >= args.after
            return logged and (sig != signal.SIGKILL or (out / "last.pt").exists())

        while proc.poll() is None and not ready():
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate()
        step = read_checkpoint(out / "last.pt")["step"]
        said = next((ln for ln in err.splitlines() if ln.startswith("robust-jem: interrupted")), "")
        done = subprocess.run(cmd[:3] + ["train", "--resume", str(out), "--no-progress", "--device", "cpu"],
                              capture_output=True, text=True)
        a = read_checkpoint(out / "final.pt")["model"]
        equal = all(torch.equal(a[k], ref["model"][k]) for k in a)
        diff = max(float((a[k] - ref["model"][k]).abs().max()) for k in a)
        lines.append(f"| {sig.name} | {step} | {proc.returncode} | {said[:90]} | rc {done.returncode} | {equal} | "
                     f"{diff:.3g} |")
    print("\n".join(lines))
    print("\nmetrics identical (it/s aside): " + ", ".join(
        f"{s}: {_metrics(root / s) == _metrics(root / 'whole')}" for s in ("SIGINT", "SIGTERM", "SIGKILL")))


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "it_per_s"} for r in rows]


if __name__ == "__main__":
    main()
