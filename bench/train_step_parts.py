"""Parts of bench/train_step.py: the JEM reference's training step re-created for timing, and FLOP counting with
the peaks MFU is measured against."""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infra.energy import log_density_of_logits  # noqa: E402
from robust_jem.config import TrainConfig  # noqa: E402
from robust_jem.data import ImageDataset  # noqa: E402
from robust_jem.model import EnergyModel  # noqa: E402
from robust_jem.sgld import sgld  # noqa: E402

# Peak FLOP/s used for MFU. CPU: measured in the same run (best torch.mm throughput, see matmul_peak), since
# this machine's speed varies with its load. GPUs: dense tensor-core spec sheets; fp32 convolutions on CUDA
# run as TF32 by default (torch.backends.cudnn.allow_tf32), so fp32 loops are measured against the TF32 peak.
GPU_PEAKS = [  # (name pattern, {precision: FLOP/s})
    (r"H100.*PCIe", {"fp32": 378e12, "bf16": 756e12}),
    (r"H100|H200|GH200", {"fp32": 494.7e12, "bf16": 989.4e12}),
    (r"A100", {"fp32": 156e12, "bf16": 312e12}),
]
H100_MEASURED_BF16 = 800e12  # what a large bf16 matmul reaches on an H100 here (for context only)



# ------------------------------------------------------------------------------------------------
# the reference's way (a re-creation for timing only; it is the counter-example of the house style)
# ------------------------------------------------------------------------------------------------
class _CCF(nn.Module):
    """JEM's ``CCF``: ``classify`` gives logits, ``forward`` gives logsumexp(logits) (= -energy)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.f = net

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_density_of_logits(self.classify(x))


class ReferenceLoop:
    """One JEM iteration as ``train_wrn_ebm.py`` writes it (p(x) and p(y|x) terms, PCD with a host buffer)."""

    def __init__(self, net: nn.Module, cfg: TrainConfig, data: ImageDataset, device: torch.device) -> None:
        self.f = _CCF(net).to(device)
        self.cfg, self.data, self.device = cfg, data, device
        self.optim = torch.optim.Adam(self.f.parameters(), lr=cfg.lr, betas=[.9, .999],
                                      weight_decay=cfg.weight_decay)
        self.replay_buffer = self.init_random(cfg.sgld.buffer_size)
        self.cur_iter = 0
        self.print_every = 100
        self.sink: list[str] = []  # the reference prints; we format (forcing the same syncs) and drop

    def init_random(self, bs: int) -> torch.Tensor:
        return torch.FloatTensor(bs, *self.data.shape).uniform_(-1, 1)

    def loader_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A shuffled batch as its DataLoader gives it: normalised to [-1,1] with the noise added on the host."""
        idx = torch.randint(0, len(self.data), (self.cfg.batch_size,))
        x, y = self.data.batch(idx)
        x = x * 2 - 1
        return x + self.cfg.data_noise * torch.randn_like(x), y

    def sample_p_0(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        inds = torch.randint(0, len(self.replay_buffer), (bs,))
        buffer_samples = self.replay_buffer[inds]
        random_samples = self.init_random(bs)
        choose_random = (torch.rand(bs) < self.cfg.sgld.reinit_freq).float()[:, None, None, None]
        samples = choose_random * random_samples + (1 - choose_random) * buffer_samples
        return samples.to(self.device), inds

    def sample_q(self) -> torch.Tensor:
        f = self.f
        f.eval()
        init_sample, buffer_inds = self.sample_p_0(self.cfg.batch_size)
        x_k = torch.autograd.Variable(init_sample, requires_grad=True)
        for _ in range(self.cfg.sgld.steps):
            f_prime = torch.autograd.grad(f(x_k).sum(), [x_k], retain_graph=True)[0]
            x_k.data += self.cfg.sgld.step_size * f_prime + self.cfg.sgld.noise * torch.randn_like(x_k)
        f.train()
        final_samples = x_k.detach()
        self.replay_buffer[buffer_inds] = final_samples.cpu()
        return final_samples

    def step(self) -> None:
        f, cfg = self.f, self.cfg
        if self.cur_iter <= cfg.warmup_iters:
            lr = cfg.lr * self.cur_iter / float(max(cfg.warmup_iters, 1))
            for param_group in self.optim.param_groups:
                param_group["lr"] = lr
        x_p_d, _ = self.loader_batch()
        x_p_d = x_p_d.to(self.device)
        x_lab, y_lab = self.loader_batch()
        x_lab, y_lab = x_lab.to(self.device), y_lab.to(self.device)
        L = 0.
        x_q = self.sample_q()
        fp_all = f(x_p_d)
        fq_all = f(x_q)
        fp = fp_all.mean()
        fq = fq_all.mean()
        l_p_x = -(fp - fq)
        if self.cur_iter % self.print_every == 0:
            self.sink.append("P(x) f(x_p_d)={:>14.9f} f(x_q)={:>14.9f} d={:>14.9f}".format(fp, fq, fp - fq))
        L += cfg.px_weight * l_p_x
        logits = f.classify(x_lab)
        l_p_y_given_x = nn.CrossEntropyLoss()(logits, y_lab)
        if self.cur_iter % self.print_every == 0:
            acc = (logits.max(1)[1] == y_lab).float().mean()
            self.sink.append("P(y|x) loss={:>14.9f}, acc={:>14.9f}".format(l_p_y_given_x.item(), acc.item()))
        L += l_p_y_given_x
        if L.abs().item() > 1e8:
            raise RuntimeError("reference loop diverged")  # the reference does 1/0
        self.optim.zero_grad()
        L.backward()
        self.optim.step()
        self.cur_iter += 1
        del self.sink[:-4]



# ------------------------------------------------------------------------------------------------
# FLOPs and peaks
# ------------------------------------------------------------------------------------------------
class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose hooks break ``autograd.grad`` on leaf tensors
    (the SGLD step); only the global total is needed here."""

    parents = {"Global"}

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


def count_flops(fn: Callable[[], Any]) -> int:
    """Matmul/conv FLOPs (forward and backward) that ``fn()`` dispatches."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    with counter:
        fn()
    return int(counter.get_total_flops())


def paper_step_flops(cfg: TrainConfig) -> int:
    """FLOPs of one JEM step of ``cfg`` (SGLD chains + the 2B-example train pass), counted on the meta device."""
    with torch.device("meta"):
        model = EnergyModel(cfg.model)
    c, s = cfg.model.in_channels, cfg.model.image_size
    x = torch.zeros(cfg.batch_size, c, s, s, device="meta")
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device="meta")

    def step() -> None:
        zq = sgld(model.energy_z, x, cfg.sgld.steps, cfg.sgld.step_size, 0.0)
        logits = model.logits_z(torch.cat([x, zq]))
        loss = F.cross_entropy(logits[: len(y)], y) + log_density_of_logits(logits).mean()
        loss.backward()

    return count_flops(step)


@functools.lru_cache(maxsize=None)
def matmul_peak(precision: str, n: int = 1024, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n ``torch.mm`` on the CPU in ``precision`` (the practical peak)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best
