"""Samples from a JEM: fresh unconditional and class-conditional SGLD chains, and the replay buffer.

Unconditional chains sample p(x) with energy E(x) = -logsumexp_y f(x)[y]; class-conditional chains sample
p(x|y=c) with energy -f(x)[c] (Grathwohl et al. 2020, Sec. 3). Both run THE one SGLD loop
(:func:`robust_jem.sgld.sgld`) in the model's [-1,1] space with the checkpoint's step size and noise unless
told otherwise. Every chain's marginal energy E(x) is recorded beside that of real test images, so the
gap between the sampler and the data is visible in numbers, not only in the grids.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from infra.energy import energy_of_logits
from infra.io import atomic_write, check_out_dir
from infra.randomness import generator
from .checkpoint import model_from_checkpoint, read_checkpoint
from .data import load_dataset
from .errors import UserError
from .model import EnergyModel, to_internal, to_pixels
from .sgld import sgld
from .images import save_grid

log = logging.getLogger(__name__)

INITS = ("uniform", "buffer")


def class_energy(model: EnergyModel, targets: torch.Tensor):
    """Energy ``-f(z)[targets]`` of p(x | y) for internal-space inputs (one target per chain)."""

    def energy(z: torch.Tensor) -> torch.Tensor:
        return -model.logits_z(z).float().gather(1, targets.view(-1, 1)).squeeze(1)

    return energy


def sample_chains(model: EnergyModel, z0: torch.Tensor, steps: int, step_size: float, noise: float, *,
                  targets: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  batch_size: int = 500, clamp: bool = False) -> torch.Tensor:
    """Run SGLD from ``z0`` (internal space): unconditional, or conditional on ``targets`` (N,) when given.

    ``clamp`` keeps the chains in [-1, 1] after every step (the projected sampler some runs train with).

    Returns the final chain states (internal space), detached, same shape as ``z0``.
    """
    outs = []
    for i in range(0, z0.shape[0], batch_size):
        zb = z0[i:i + batch_size]
        energy = model.energy_z if targets is None else class_energy(model, targets[i:i + batch_size])
        outs.append(sgld(energy, zb, steps, step_size, noise, generator=generator,
                         bounds=(-1.0, 1.0) if clamp else None))
    return torch.cat(outs) if outs else z0


@torch.no_grad()
def energy_stats(model: EnergyModel, z: torch.Tensor) -> dict[str, Any]:
    """Mean / std / min / max of the marginal energy E = -logsumexp f, and the predicted-class histogram."""
    logits = model.logits_z(z).float()
    e = energy_of_logits(logits)
    pred = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
    return {"n": int(z.shape[0]), "energy_mean": float(e.mean()), "energy_std": float(e.std()) if z.shape[0] > 1
            else 0.0, "energy_min": float(e.min()), "energy_max": float(e.max()),
            "predicted_classes": pred.cpu().tolist()}


def draw_samples(checkpoint: str | os.PathLike, out: str | os.PathLike, *, classes: list[int] | None = None,
                 n: int = 5, steps: int = 100, step_size: float | None = None, noise: float | None = None,
                 init: str = "uniform", seed: int = 0, n_data: int = 500, device: torch.device | str = "cpu",
                 data_dir: str | None = None, clamp: bool | None = None) -> dict[str, Any]:
    """Write sample grids and energies (``samples.json``) into ``out`` (the suite turns the summary into rows).

    Args:
        checkpoint: a robust-jem checkpoint (any objective; the replay buffer exists for JEM only).
        out: output directory.
        classes: classes for the conditional chains (default: every class).
        n: chains per class, and unconditional chains = ``n * len(classes)`` (at least ``n``).
        steps: SGLD steps of the fresh chains.
        step_size, noise: SGLD settings in the [-1,1] space (default: the checkpoint's).
        init: ``uniform`` (fresh U(-1,1) starts, as the JEM buffer's re-initialisation) or ``buffer`` (start from
            replay-buffer entries; JEM checkpoints only).
        seed: seed of the chains' generator.
        n_data: test images whose energy is the reference.
        clamp: keep chains in [-1, 1] (default: as the checkpoint's training sampler did).

    Returns: the summary written to ``samples.json``.
    """
    if init not in INITS:
        raise UserError(f"unknown chain start {init!r}; choose from {', '.join(INITS)}")
    if n < 1 or steps < 0 or n_data < 1:
        raise UserError("the numbers of chains and of data images must be positive and the SGLD steps non-negative")
    check_out_dir(Path(out))  # a bad --out is one line, before any chain runs
    device = torch.device(device)
    ckpt = read_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = ckpt["config"]
    k = cfg.model.n_classes
    classes = list(range(k)) if classes is None else list(classes)
    bad = [c for c in classes if not 0 <= c < k]
    if bad or not classes:
        raise UserError(f"classes must be in 0..{k - 1}, got {','.join(map(str, bad)) or 'nothing'}")
    step_size = cfg.sgld.step_size if step_size is None else step_size
    noise = cfg.sgld.noise if noise is None else noise
    clamp = bool(getattr(cfg.sgld, "clamp", False)) if clamp is None else clamp
    if step_size < 0 or noise < 0:
        raise UserError("the SGLD step size and noise must be non-negative")
    buffer = ckpt.get("buffer")
    if init == "buffer" and buffer is None:
        raise UserError(f"{checkpoint} has no replay buffer (objective {cfg.objective}); start the chains from uniform "
                        f"noise instead")
    data = load_dataset(cfg.dataset, "test", data_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise UserError(f"output folder {out} is not writable")

    g = generator(seed, device)
    g_idx = generator(seed)  # picks buffer entries (CPU, where the buffer lives)
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    n_uncond = max(n, n * len(classes))

    def starts(m: int) -> torch.Tensor:
        if init == "uniform":
            return torch.rand((m, *shape), generator=g, device=device) * 2 - 1
        idx = torch.randint(0, buffer.shape[0], (m,), generator=g_idx)
        return buffer[idx].to(device).float()

    t0 = time.monotonic()
    z_u0 = starts(n_uncond)
    z_u = sample_chains(model, z_u0, steps, step_size, noise, generator=g, clamp=clamp)
    targets = torch.tensor(classes, device=device).repeat_interleave(n)
    z_c = sample_chains(model, starts(targets.numel()), steps, step_size, noise, targets=targets, generator=g,
                        clamp=clamp)
    wall = time.monotonic() - t0

    x_data, y_data = data.batch(slice(0, min(n_data, len(data))))
    z_data = to_internal(x_data.to(device))
    summary: dict[str, Any] = {
        "checkpoint": str(checkpoint), "objective": cfg.objective, "dataset": cfg.dataset,
        "steps": steps, "step_size": step_size, "noise": noise, "clamp": clamp, "init": init, "seed": seed,
        "energy": "E(x) = -logsumexp_y f(x)[y], internal [-1,1] space", "sampling_wall_s": wall,
        "data": energy_stats(model, z_data),
        "start": energy_stats(model, z_u0),
        "unconditional": energy_stats(model, z_u),
        "conditional": {},
    }
    with torch.no_grad():
        for c in classes:
            zc = z_c[targets == c]
            st = energy_stats(model, zc)
            st["class_energy_mean"] = float(-model.logits_z(zc).float()[:, c].mean())
            st["target_hit_rate"] = float((model.logits_z(zc).argmax(1) == c).float().mean())
            xd = z_data[y_data.to(device) == c]
            st["data_class_energy_mean"] = float(-model.logits_z(xd).float()[:, c].mean()) if len(xd) else None
            summary["conditional"][str(c)] = st
    grids = {"unconditional": out / "unconditional.png", "conditional": out / "conditional.png"}
    save_grid(to_pixels(z_u[:100]).clamp(0, 1), grids["unconditional"], nrow=10, scale=3)
    # conditional grid: one row per class, n columns
    save_grid(to_pixels(z_c).clamp(0, 1), grids["conditional"], nrow=n, scale=3,
              row_labels=[str(data.classes[c]) for c in classes])
    if buffer is not None:
        zb = buffer.to(device).float()
        summary["buffer"] = energy_stats(model, zb)
        save_grid(to_pixels(zb[:100]).clamp(0, 1), out / "buffer.png", nrow=10, scale=3)
        grids["buffer"] = out / "buffer.png"
    else:
        log.info("%s has no replay buffer (objective %s): no buffer grid", checkpoint, cfg.objective)
    summary["grids"] = {k2: str(v) for k2, v in grids.items()}
    text = json.dumps(summary, indent=2)
    atomic_write(out / "samples.json", text)

    log.info("samples: data E %.3f, unconditional E %.3f, start E %.3f (%.1fs) -> %s",
             summary["data"]["energy_mean"], summary["unconditional"]["energy_mean"],
             summary["start"]["energy_mean"], wall, out)
    return summary
