"""bf16 against fp32 on this CPU: a 1024x1024 matmul and the quick CNN's training step under autocast, as ratios
measured in the same run, with the CPU's kernel capability named (AVX2 CPUs emulate bf16).

Usage: .venv/bin/python bench/bf16_matmul.py > bench/results/bf16_matmul-<cpu>.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infra.precision import native_bf16  # noqa: E402
from infra.provenance import device_name, git_sha  # noqa: E402
from robust_jem.config import preset_config  # noqa: E402
from robust_jem.model import EnergyModel  # noqa: E402


def best_of(fn, repeats: int = 5) -> float:
    """Fastest of ``repeats`` timed calls, in seconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="side of the square matmul")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="seconds: a 128² matmul, one timed call each")
    args = ap.parse_args(argv)
    size, repeats = (128, 1) if args.quick else (args.size, args.repeats)
    torch.manual_seed(0)
    a, b = torch.randn(size, size), torch.randn(size, size)
    flops = 2 * size ** 3
    fp32 = best_of(lambda: a @ b, repeats)
    ab, bb = a.bfloat16(), b.bfloat16()
    bf16 = best_of(lambda: ab @ bb, repeats)
    model = EnergyModel(preset_config("quick", "ce", "fashion-mnist").model)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step(autocast: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()

    step32, step16 = best_of(lambda: step(False), repeats), best_of(lambda: step(True), repeats)
    print(f"# bf16 vs fp32 on {device_name('cpu')}")
    print(f"kernels: {torch.backends.cpu.get_cpu_capability()}, native bf16 (robust-jem's test): {native_bf16('cpu')}; "
          f"torch {torch.__version__}; git {git_sha()}\n")
    print("| work | fp32 | bf16 | bf16 / fp32 speed |\n|---|---|---|---|")
    print(f"| {size}² matmul | {flops / fp32 / 1e9:.1f} GFLOP/s | {flops / bf16 / 1e9:.2f} GFLOP/s | {fp32 / bf16:.3f}× |")
    print(f"| quick CNN train step (batch 64, fwd+bwd) | {step32 * 1e3:.1f} ms | {step16 * 1e3:.1f} ms | "
          f"{step32 / step16:.3f}× |")


if __name__ == "__main__":
    main()
