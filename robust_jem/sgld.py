"""THE one SGLD loop of robust-jem, and the persistent replay buffer (PCD) used to train JEM.

Training, sample generation and the SGLD-refined classifier all call :func:`sgld`. Randomness comes
from an explicit ``torch.Generator`` living on the tensors' device, so nothing here reseeds the global
RNG and nothing forces a host-device sync.
"""

from __future__ import annotations

from typing import Callable

import torch

EnergyFn = Callable[[torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]  # standard normal noise shaped like its argument


def sgld(energy: EnergyFn, z: torch.Tensor, steps: int, step_size: float, noise: float, *,
         generator: torch.Generator | None = None, differentiable: bool = False,
         noise_fn: NoiseFn | None = None, bounds: tuple[float, float] | None = None) -> torch.Tensor:
    """Run ``steps`` SGLD steps ``z <- z - step_size * dE/dz + noise * N(0, I)``.

    This is the JEM sampler (Grathwohl et al. 2020, Eq. 11, with the step size and noise decoupled as
    in the paper's experiments).

    Args:
        energy: maps a batch to per-example energies, shape (N,).
        z: start of the chains, any shape (N, ...).
        steps, step_size, noise: sampler settings.
        generator: source of the Gaussian noise (on ``z``'s device).
        differentiable: if True and ``z`` requires grad, the returned tensor is a differentiable function
            of ``z`` (the chain is unrolled with ``create_graph=True``); otherwise chains are detached.
        noise_fn: optional source of the standard normal noise (called with the current state, returns
            noise of its shape); overrides ``generator`` (used by fixed-noise views for decision attacks).
        bounds: clamp the chains to ``[lo, hi]`` after every step (a projected sampler that keeps training
            samples in the data domain; None = unconstrained, as in the JEM reference).

    Returns:
        The final state of the chains, same shape as ``z``.
    """
    keep_graph = differentiable and z.requires_grad
    for _ in range(steps):
        if not keep_graph:
            z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(energy(z).sum(), z, create_graph=keep_graph)
        z = z - step_size * grad
        if noise > 0:
            eps = (noise_fn(z) if noise_fn is not None
                   else torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype))
            z = z + noise * eps
        if bounds is not None:
            z = z.clamp(*bounds)
    return z if keep_graph else z.detach()


class ReplayBuffer:
    """Persistent SGLD chains (JEM's replay buffer) on the model's device.

    ``sample`` draws ``n`` chains, re-initialising each with probability ``reinit_freq`` from U(-1, 1);
    ``update`` writes the advanced chains back. Indices are drawn without replacement, on the device
    (no host round trip).
    """

    def __init__(self, size: int, shape: tuple[int, ...], reinit_freq: float = 0.05, *,
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> None:
        self.size = size
        self.shape = tuple(shape)
        self.reinit_freq = reinit_freq
        self.generator = generator
        self.buffer = self.uniform(size, device=torch.device(device))

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def uniform(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """``n`` fresh chains from U(-1, 1)."""
        device = device or self.device
        return torch.rand((n, *self.shape), generator=self.generator, device=device) * 2 - 1

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Starting points for ``n`` chains and the buffer indices they came from."""
        if n > self.size:
            raise ValueError(f"cannot draw {n} chains from a buffer of {self.size}")
        # Without replacement: no chain is advanced twice in one step, and the write-back in
        # ``update`` has no duplicate indices (whose winner would be nondeterministic).
        idx = torch.randperm(self.size, generator=self.generator, device=self.device)[:n]
        keep = torch.rand(n, generator=self.generator, device=self.device) >= self.reinit_freq
        mask = keep.view(n, *([1] * len(self.shape)))
        return torch.where(mask, self.buffer[idx], self.uniform(n)), idx

    def update(self, idx: torch.Tensor, z: torch.Tensor) -> None:
        """Write advanced chains back to their slots."""
        self.buffer[idx] = z.detach().to(self.buffer.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"buffer": self.buffer.detach().cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        buf = state["buffer"]
        if tuple(buf.shape[1:]) != self.shape:
            raise ValueError(f"replay buffer shape {tuple(buf.shape)} does not match {self.shape}")
        self.size = int(buf.shape[0])
        self.buffer = buf.to(self.device)
