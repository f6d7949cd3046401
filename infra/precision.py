"""Whether bf16 arithmetic pays on a device: the one place that decides it.

A CPU without native bf16 (AVX2 only, or AVX-512 without its BF16 extension, or kernels forced down with
``ATEN_CPU_CAPABILITY=avx2``) emulates it: on an AVX2 EPYC a 1024² bf16 matmul ran ~190x and the quick CNN's training
step ~7x *slower* than fp32 (``bench/results/bf16_matmul-amd-epyc-avx2.md``). There a bf16 request is said once, in one line, and the work runs in fp32.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("robust_jem")


def native_bf16(device: torch.device | str) -> bool:
    """True when ``device`` computes bf16 natively: a CUDA card that supports it, or a CPU whose kernels use
    AVX-512 with the BF16 extension (or AMX)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return True  # other accelerators (mps, xpu): their autocast decides
    capability = torch.backends.cpu.get_cpu_capability()
    return capability.startswith("AVX512") and bool(torch.cpu._is_avx512_bf16_supported())


def resolve_bf16(requested: bool, device: torch.device | str, what: str) -> bool:
    """``requested`` unless the device has no native bf16; then a one-line warning, and False (fp32)."""
    if not requested or native_bf16(device):
        return requested
    import torch

    log.warning("bf16 asked for %s but not used: this %s has no native bf16 (kernels: %s), where it runs "
                "7-190x slower than fp32; running in fp32", what, torch.device(device).type.upper(),
                torch.backends.cpu.get_cpu_capability())
    return False
