"""Re-record ``tiny_study_golden.json``: run the tiny study from scratch and keep every measured number.

Only a change that is *meant* to move the tiny study's numbers may re-record it, and it must say why:

    .venv/bin/python tests/data/record_tiny_study.py --reason "what changed the numbers"

It refuses to record outside AVX2 kernels on 2 threads (the golden test compares exactly only there) or from a
working tree with uncommitted changes (the file names the commit whose code produced it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reason", required=True, help="why the numbers are meant to change")
    args = parser.parse_args(argv)
    import torch

    from suite.study import run_study
    from test_study import GOLDEN, golden_rows

    here = (torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
    if here != ("AVX2", 2):
        sys.exit(f"record on AVX2 kernels with 2 threads (here {here[0]} on {here[1]}): the test compares there")
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                      cwd=HERE).stdout.strip():
        sys.exit("commit first: the golden file names the commit whose code produced it")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = run_study("tiny", results_dir=Path(tmp) / "results", runs_dir=Path(tmp) / "runs", progress=False)
        rows = golden_rows(run_dir)
    GOLDEN.write_text(json.dumps({"git_sha": sha, "cpu_capability": here[0], "torch_threads": here[1],
                                  "reason": args.reason, "rows": rows}, indent=0) + "\n")
    print(f"{GOLDEN}: {len(rows)} rows at {sha[:10]}")


if __name__ == "__main__":
    main()
