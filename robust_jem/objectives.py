"""The training objectives: each contributes one loss ``loss(ctx, x, y) -> (loss, terms)`` to the one loop of
:mod:`robust_jem.train`. JEM (cross-entropy plus log p(x) by SGLD from the replay buffer, Grathwohl et al. 2020),
plain CE, Madry PGD adversarial training, an adversarially trained JEM (PGD-AT's cross-entropy on adversarial
inputs plus JEM's log p(x); JEAT-style), Gaussian augmentation, and an EBM without labels (log p(x) alone: the
purifier of long-run EBM purification).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from infra.energy import energy_of_logits
from infra.norms import ascent_step, project

from .config import TrainConfig
from .model import EnergyModel, to_internal
from .sgld import ReplayBuffer, sgld


Net = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Context:
    """What a loss function may use besides the batch.

    ``net`` is the backbone used for the training forward pass (internal [-1,1] space -> logits): the
    model's own ``net``, or its ``torch.compile``d and/or DDP-wrapped form. ``sample_net`` is the one for
    inner loops that only need input gradients (SGLD, PGD): compiled when enabled, never DDP-wrapped.
    Train/eval mode is switched on ``model``, which owns the parameters of both.
    """

    cfg: TrainConfig
    model: EnergyModel
    generator: torch.Generator
    buffer: ReplayBuffer | None
    autocast: Callable[[], Any]
    phase: str = "main"
    net: Net | None = None
    sample_net: Net | None = None

    def __post_init__(self) -> None:
        if self.net is None:
            self.net = self.model.net
        if self.sample_net is None:
            self.sample_net = self.model.net

    def logits_z(self, z: torch.Tensor) -> torch.Tensor:
        """Training forward: logits of internal-space inputs."""
        return self.net(z)  # type: ignore[misc]

    def sample_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Inner-loop forward: logits of [0,1] images."""
        return self.sample_net(to_internal(x))  # type: ignore[misc]

    def sample_energy_z(self, z: torch.Tensor) -> torch.Tensor:
        """Inner-loop energy ``-logsumexp(logits)``, as :meth:`EnergyModel.energy_z` computes it."""
        return energy_of_logits(self.sample_net(z))  # type: ignore[misc]


LossFn = Callable[[Context, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def _randn_like(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _ce_terms(ctx: Context, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ce = F.cross_entropy(logits.float(), y)
    pred = logits.argmax(1)
    # class counts by scatter_add (torch.bincount syncs with the host on CUDA to size its output)
    counts = torch.zeros(ctx.cfg.model.n_classes, device=pred.device).scatter_add_(
        0, pred, torch.ones_like(pred, dtype=torch.float32))
    return ce, {"ce": ce.detach(), "acc": (pred == y).float().mean(), "pred_top": counts.max() / y.numel()}


def ce_loss(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain cross-entropy on [0,1] images (with ``data_noise`` in the internal space, as JEM does)."""
    z = to_internal(x)
    if ctx.cfg.data_noise > 0:
        z = z + ctx.cfg.data_noise * _randn_like(z, ctx.generator)
    with ctx.autocast():
        logits = ctx.logits_z(z)
    return _ce_terms(ctx, logits, y)


def jem_loss(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """JEM: CE + log p(x) by PCD (Grathwohl et al. 2020, Eq. 8), optional L2 penalty on energies."""
    return _jem_terms(ctx, x, y, None)


def jem_at_loss(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Adversarially trained JEM: the cross-entropy of PGD-AT (on L-inf PGD examples of the batch) plus JEM's
    log p(x) term on the clean batch (with data noise) against the replay buffer's SGLD samples."""
    return _jem_terms(ctx, x, y, _pgd_examples(ctx, x, y))


def ebm_loss(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An energy model for sampling alone (the purifier of long-run EBM purification, Hill et al. 2021): JEM's
    log p(x) term by PCD, ``px_weight`` x (E(data) - E(samples)); the labels are not used."""
    return _jem_terms(ctx, x, y, None, ce=False)


def _jem_terms(ctx: Context, x: torch.Tensor, y: torch.Tensor, x_ce: torch.Tensor | None,
               ce: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE on ``x_ce`` (None: on the noisy clean batch, JEM; ``ce=False``: no CE, an EBM) + ``px_weight`` x
    (E(data) - E(samples))."""
    cfg, model, buf = ctx.cfg, ctx.model, ctx.buffer
    assert buf is not None
    z = to_internal(x)
    if cfg.data_noise > 0:
        z = z + cfg.data_noise * _randn_like(z, ctx.generator)
    z0, idx = buf.sample(x.shape[0])
    if cfg.channels_last and z0.dim() == 4:
        z0 = z0.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    with ctx.autocast():
        zq = sgld(ctx.sample_energy_z, z0, cfg.sgld.steps, cfg.sgld.step_size, cfg.sgld.noise,
                  generator=ctx.generator, bounds=(-1.0, 1.0) if cfg.sgld.clamp else None,
                  grad_clip=cfg.sgld.grad_clip or None)
    model.train(was_training)
    buf.update(idx, zq)
    parts = [z, zq] + ([to_internal(x_ce)] if x_ce is not None else [])
    with ctx.autocast():
        logits = ctx.logits_z(torch.cat(parts))
    logits = logits.float()
    n = x.shape[0]
    e_data = energy_of_logits(logits[:n])
    e_sample = energy_of_logits(logits[n:2 * n])
    l_px = e_data.mean() - e_sample.mean()
    loss = cfg.px_weight * l_px
    terms: dict[str, torch.Tensor] = {}
    if ce:
        l_ce, terms = _ce_terms(ctx, logits[2 * n:] if x_ce is not None else logits[:n], y)
        loss = loss + l_ce
    if cfg.energy_l2 > 0:
        loss = loss + cfg.energy_l2 * (e_data.pow(2).mean() + e_sample.pow(2).mean())
    terms.update(px=l_px.detach(), e_data=e_data.mean().detach(), e_sample=e_sample.mean().detach())
    return loss, terms


def pgd_linf(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float,
             steps: int, step_size: float, generator: torch.Generator, autocast: Callable[[], Any]) -> torch.Tensor:
    """Madry et al. (2018) L-inf PGD with random start, for the inner maximisation of PGD-AT only.

    ``model`` maps [0,1] images to logits.

    (The attack suite uses torchattacks; this copy exists so training draws its random start from the
    run's own generator and stays resumable bit for bit.)
    """
    delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with autocast():
            loss = F.cross_entropy(model(x_adv).float(), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = project(x, ascent_step(x_adv.detach(), grad, "linf", step_size), "linf", eps)
    return x_adv.detach()


def _pgd_examples(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The inner maximisation of adversarial training (the model in eval mode while it runs)."""
    cfg, model = ctx.cfg, ctx.model
    was_training = model.training
    model.eval()
    x_adv = pgd_linf(ctx.sample_logits, x, y, cfg.pgd_eps, cfg.pgd_steps, cfg.pgd_step_size, ctx.generator,
                     ctx.autocast)
    model.train(was_training)
    return x_adv


def pgd_at_loss(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Madry PGD adversarial training: CE on L-inf PGD examples."""
    x_adv = _pgd_examples(ctx, x, y)
    with ctx.autocast():
        logits = ctx.logits_z(to_internal(x_adv))
    return _ce_terms(ctx, logits, y)


def gaussian_aug_loss(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gaussian data augmentation with std ``sigma`` in pixel space (Cohen et al. 2019; Salman et al. 2019)."""
    x_noisy = x + ctx.cfg.sigma * _randn_like(x, ctx.generator)
    with ctx.autocast():
        logits = ctx.logits_z(to_internal(x_noisy))
    return _ce_terms(ctx, logits, y)


LOSSES: dict[str, LossFn] = {"jem": jem_loss, "ce": ce_loss, "pgd-at": pgd_at_loss, "gaussian-aug": gaussian_aug_loss,
                             "jem-at": jem_at_loss, "ebm": ebm_loss}
