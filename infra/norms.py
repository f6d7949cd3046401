"""The threat models' geometry, once: per-example ‖δ‖, the steepest-ascent step and the projection onto the ε-ball
and the [0,1] image domain, for L∞ and L2.

Every gradient loop of the suite steps and projects through these two functions: the attack side's own PGD variant
(:class:`attacks.white.EOTPGDL2`), PGD adversarial training's inner maximisation (:func:`robust_jem.objectives.pgd_linf`)
and distal adversarials. (torchattacks' attacks keep their own code; the independent attack in ``bench/`` is
written apart on purpose.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NORMS = ("linf", "l2")


def _check(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")


def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) broadcastable against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def delta_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example ‖δ‖ (``linf`` or ``l2``), shape (N,)."""
    _check(norm)
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(p=2, dim=1)


def ascent_step(x: torch.Tensor, grad: torch.Tensor, norm: str, alpha: float,
                eps_for_division: float = 1e-10) -> torch.Tensor:
    """One steepest-ascent step of size ``alpha`` in ``norm``: ``alpha·sign(g)`` (L∞) or ``alpha·g/‖g‖₂`` (L2)."""
    _check(norm)
    if norm == "linf":
        return x + alpha * grad.sign()
    return x + alpha * grad / _per_example(delta_norm(grad, "l2") + eps_for_division, grad)


def random_start(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A random point of the ε-ball around ``x`` (uniform per coordinate for L∞; a uniform direction at a uniform
    radius for L2), projected into [0,1]; drawn from torch's global generator."""
    _check(norm)
    import torch
    if norm == "linf":
        return project(x, x + torch.empty_like(x).uniform_(-eps, eps), norm, eps)
    d = torch.randn_like(x)
    radius = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype)
    return project(x, x + d / _per_example(delta_norm(d, "l2").clamp_min(1e-12), d) * _per_example(radius, d),
                   norm, eps)


def project(x: torch.Tensor, x_adv: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto the ε-ball of ``norm`` around ``x`` and into [0,1]."""
    _check(norm)
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta_norm(delta, "l2").clamp_min(1e-12)
        delta = delta * _per_example((eps / n).clamp(max=1.0), delta)
    return (x + delta).clamp(0.0, 1.0)
