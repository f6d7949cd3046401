"""THE one SGLD loop of robust-jem, and the persistent replay buffer (PCD) used to train JEM.

Training, sample generation and the SGLD-refined classifier all call :func:`sgld`. Randomness comes
from an explicit ``torch.Generator`` living on the tensors' device, so nothing here reseeds the global
RNG and nothing forces a host-device sync.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

EnergyFn = Callable[[torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]  # standard normal noise shaped like its argument


def sgld(energy: EnergyFn, z: torch.Tensor, steps: int, step_size: float, noise: float, *,
         generator: torch.Generator | None = None, differentiable: bool = False,
         noise_fn: NoiseFn | None = None, bounds: tuple[float, float] | None = None,
         grad_clip: float | None = None) -> torch.Tensor:
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
        grad_clip: scale each chain's energy gradient down to at most this L2 norm (JEM++-style short-run
            stabilisation; None or 0 = off).

    Returns:
        The final state of the chains, same shape as ``z``.
    """
    keep_graph = differentiable and z.requires_grad
    for _ in range(steps):
        if not keep_graph:
            z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(energy(z).sum(), z, create_graph=keep_graph)
        if grad_clip:
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            grad = grad * (grad_clip / norm).clamp(max=1.0).view(-1, *([1] * (grad.dim() - 1)))
        z = z - step_size * grad
        if noise > 0:
            eps = (noise_fn(z) if noise_fn is not None
                   else torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype))
            z = z + noise * eps
        if bounds is not None:
            z = z.clamp(*bounds)
    return z if keep_graph else z.detach()


class _Segment(torch.autograd.Function):
    """``steps`` SGLD steps whose graph is not kept: the forward keeps only the segment's start and the noise
    generator's state, the backward recomputes the segment with its graph (the same noise) and backpropagates
    through it. Gradients flow to the chain's start only (the energy's parameters must not require them)."""

    @staticmethod
    def forward(ctx, z, energy, steps, step_size, noise, generator, bounds):  # type: ignore[override]
        ctx.energy, ctx.steps, ctx.step_size, ctx.noise, ctx.bounds = energy, steps, step_size, noise, bounds
        ctx.state = generator.get_state()  # before the segment's draws: the backward replays them
        ctx.save_for_backward(z)
        return sgld(energy, z.detach(), steps, step_size, noise, generator=generator, bounds=bounds)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        with torch.enable_grad():
            start = z.detach().requires_grad_(True)
            end = sgld(ctx.energy, start, ctx.steps, ctx.step_size, ctx.noise,
                       generator=_generator_at(ctx.state, z.device), differentiable=True, bounds=ctx.bounds)
            (grad,) = torch.autograd.grad(end, start, grad_out)
        return grad, None, None, None, None, None, None


def _generator_at(state: torch.Tensor, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.set_state(state)
    return g


def sgld_checkpointed(energy: EnergyFn, z: torch.Tensor, steps: int, step_size: float, noise: float, *,
                      generator: torch.Generator, segment: int | None = None,
                      bounds: tuple[float, float] | None = None) -> torch.Tensor:
    """The differentiable chain of :func:`sgld` (the same states, the same gradient to ``z``) at bounded memory:
    gradient checkpointing over segments of ``segment`` steps (default ⌈√steps⌉), so the graph held at once is
    one segment's and the states kept are one per segment — peak memory grows like √steps instead of steps, for
    one more forward pass of the chain in the backward. Each segment starts from a saved state of ``generator``,
    so its recomputation draws the same noise (``generator`` advances as in :func:`sgld`). For attackers: the
    energy's parameters get no gradient."""
    if segment is None:
        segment = max(1, math.isqrt(steps - 1) + 1) if steps > 0 else 1
    if segment < 1:
        raise ValueError(f"segment must be >= 1, got {segment}")
    done = 0
    while done < steps:
        n = min(segment, steps - done)
        z = _Segment.apply(z, energy, n, step_size, noise, generator, bounds)
        done += n
    return z


class GaussianInit:
    """Informative initialisation (Yang & Ji 2021, JEM++): chains start from Gaussians fitted to the training
    data in the model's [-1,1] space, one per class (``class-gaussian``) or one for all (``gaussian``), with
    the full covariance. Samples are clamped to [-1, 1].

    Args:
        mean: (K, D) means; chol: (K, D, D) Cholesky factors of the covariances; probs: (K,) class weights.
        shape: the shape of one sample (D elements).
    """

    def __init__(self, mean: torch.Tensor, chol: torch.Tensor, probs: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.mean, self.chol, self.probs, self.shape = mean, chol, probs, tuple(shape)

    @classmethod
    def fit(cls, z: torch.Tensor, labels: torch.Tensor | None, jitter: float = 1e-3) -> "GaussianInit":
        """Fit to data ``z`` (N, ...) in [-1,1]; per class when ``labels`` are given. ``jitter`` is added to the
        covariance's diagonal (rank-deficient pixels, e.g. always-black borders)."""
        flat = z.flatten(1).double()
        groups = [flat] if labels is None else [flat[labels == c] for c in range(int(labels.max()) + 1)]
        means, chols, counts = [], [], []
        for g in groups:
            mu = g.mean(0)
            cov = torch.cov(g.T) if g.shape[0] > 1 else torch.zeros(flat.shape[1], flat.shape[1], dtype=g.dtype)
            cov = cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype)
            means.append(mu)
            chols.append(torch.linalg.cholesky(cov))
            counts.append(g.shape[0])
        probs = torch.tensor(counts, dtype=torch.float64)
        return cls(torch.stack(means).float(), torch.stack(chols).float(), (probs / probs.sum()).float(),
                   tuple(z.shape[1:]))

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | None = None) -> torch.Tensor:
        """``n`` starts (n, *shape) in [-1, 1]."""
        device = device or self.mean.device
        k = torch.multinomial(self.probs.to(device), n, replacement=True, generator=generator)
        eps = torch.randn((n, self.mean.shape[1]), generator=generator, device=device)
        x = torch.empty_like(eps)
        for c in range(self.mean.shape[0]):  # one matrix product per class (never a (n, D, D) gather)
            rows = k == c
            x[rows] = self.mean[c].to(device) + eps[rows] @ self.chol[c].to(device).T
        return x.clamp(-1, 1).view(n, *self.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.cpu(), "chol": self.chol.cpu(), "probs": self.probs.cpu()}


class ReplayBuffer:
    """Persistent SGLD chains (JEM's replay buffer) on the model's device.

    ``sample`` draws ``n`` chains, re-initialising each with probability ``reinit_freq`` from U(-1, 1) (or from
    an informative :class:`GaussianInit`);
    ``update`` writes the advanced chains back. Indices are drawn without replacement, on the device
    (no host round trip).
    """

    def __init__(self, size: int, shape: tuple[int, ...], reinit_freq: float = 0.05, *,
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                 init: GaussianInit | None = None) -> None:
        self.size = size
        self.shape = tuple(shape)
        self.reinit_freq = reinit_freq
        self.generator = generator
        self.init = init
        self.buffer = self.uniform(size, device=torch.device(device))

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def uniform(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """``n`` fresh chains: from U(-1, 1), or from the informative init when the buffer has one."""
        device = device or self.device
        if self.init is not None:
            return self.init.sample(n, self.generator, device)
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
