"""Is a JEM a working energy model? Its samples judged by a classifier that is *not* the JEM.

A JEM's own classifier will call its own samples confident whatever they look like; an independently trained
classifier (the "judge", e.g. the study's CE model) will not. For a checkpoint's replay buffer and for fresh
class-conditional SGLD chains this reports:

* the fraction of samples the judge labels with confidence ≥ ``threshold`` (and, for conditional chains,
  the fraction where the judge agrees with the class the chain was conditioned on; for the buffer, with the
  JEM's own label), beside the same fraction for held-out real images: samples distributed like the data
  score what the data scores;
* the Fréchet distance between samples and held-out real images in the judge's logit space (Heusel et al.
  2017's formula on K-dimensional logits), beside the same distance for uniform noise, for the sampler's own
  starting distribution when it is an informative (Gaussian) init, and between two halves of the real test
  set (the floor);
* the energy gap between data and buffer under the JEM.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch

from infra.energy import energy_of_logits
from infra.provenance import file_sha256
from infra.randomness import generator

from .checkpoint import load, read_checkpoint
from .data import load_dataset
from .errors import UserError
from .model import EnergyModel, to_internal, to_pixels
from .sampling import sample_chains
from .sgld import GaussianInit

log = logging.getLogger(__name__)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@torch.no_grad()
def _logits(model: EnergyModel, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).float() for i in range(0, x.shape[0], batch)])


def health(checkpoint: str | os.PathLike, judge: str | os.PathLike, *, n: int = 2000, steps: int = 100,
           per_class: int = 20, threshold: float = 0.9, seed: int = 0, device: torch.device | str = "cpu",
           data_dir: str | None = None) -> dict[str, Any]:
    """Health of a JEM checkpoint as judged by the independently trained classifier ``judge``.

    Args:
        checkpoint: a JEM checkpoint (its replay buffer is judged).
        judge: another checkpoint, trained without the JEM (e.g. the CE baseline) on the same data.
        n: buffer samples judged (and real images on each side of the real-vs-real floor).
        steps, per_class: fresh class-conditional SGLD chains: ``per_class`` per class from uniform noise,
            ``steps`` steps with the checkpoint's own step size, noise and clamping.
        threshold: the confidence that counts as "confident".
        seed: seed of the fresh chains and of the uniform-noise reference.

    Returns: the health summary (also the fields of its result row).
    """
    device = torch.device(device)
    ckpt = read_checkpoint(checkpoint)
    if ckpt.get("buffer") is None:
        raise UserError(f"{checkpoint} has no replay buffer (objective {ckpt['objective']}): nothing to judge")
    model = load(checkpoint, device).requires_grad_(False)
    referee = load(judge, device).requires_grad_(False)
    if file_sha256(checkpoint) == file_sha256(judge):
        raise UserError("the judge must be another model than the one judged")
    if referee.checkpoint_info["dataset"] != ckpt["dataset"]:  # type: ignore[attr-defined]
        raise UserError(f"the judge was trained on {referee.checkpoint_info['dataset']}, "  # type: ignore[attr-defined]
                        f"the model on {ckpt['dataset']}")
    t0 = time.monotonic()
    test = load_dataset(ckpt["dataset"], "test", data_dir)
    real = test.x[: 2 * n] if len(test) >= 2 * n else test.x
    half = real.shape[0] // 2
    g = generator(seed, device)
    buf = ckpt["buffer"][:n].to(device).float()
    buffer_x = to_pixels(buf).clamp(0, 1)
    uniform = torch.rand((buffer_x.shape[0], *buffer_x.shape[1:]), generator=g, device=device)
    sgld_cfg = ckpt["config"].sgld
    k = len(ckpt["classes"])
    targets = torch.arange(k, device=device).repeat_interleave(per_class)
    z0 = torch.rand((targets.numel(), *buffer_x.shape[1:]), generator=g, device=device) * 2 - 1
    cond = to_pixels(sample_chains(model, z0, steps, sgld_cfg.step_size, sgld_cfg.noise, targets=targets,
                                   generator=g, clamp=bool(sgld_cfg.clamp))).clamp(0, 1)
    sets = [("real_a", real[:half]), ("real_b", real[half:]), ("buffer", buffer_x), ("uniform", uniform),
            ("conditional", cond)]
    if sgld_cfg.init != "uniform":  # the chains' own starting distribution, refitted to the training set
        train = load_dataset(ckpt["dataset"], "train", data_dir)
        fitted = GaussianInit.fit(to_internal(train.x), train.labels if sgld_cfg.init == "class-gaussian" else None)
        sets.append(("init", to_pixels(fitted.sample(buffer_x.shape[0], g, device)).clamp(0, 1)))
    feats = {name: _logits(referee, x.to(device)) for name, x in sets}
    np_feats = {k2: v.cpu().double().numpy() for k2, v in feats.items()}

    def confident(name: str) -> float:
        return float((feats[name].softmax(1).amax(1) >= threshold).double().mean())

    own = _logits(model, buffer_x).argmax(1)
    out = {
        "n_buffer": int(buffer_x.shape[0]), "n_real": int(real.shape[0]), "n_conditional": int(cond.shape[0]),
        "threshold": threshold, "steps_conditional": steps,
        "buffer_confident": confident("buffer"),
        "buffer_agrees_with_jem": float((feats["buffer"].argmax(1) == own).double().mean()),
        "conditional_confident": confident("conditional"),
        "conditional_hits_target": float((feats["conditional"].argmax(1) == targets).double().mean()),
        "uniform_confident": confident("uniform"),
        "real_confident": confident("real_b"),  # the judge's own level on real images: what matching data means
        "fd_buffer_real": frechet(np_feats["buffer"], np_feats["real_b"]),
        "fd_conditional_real": frechet(np_feats["conditional"], np_feats["real_b"]),
        "fd_uniform_real": frechet(np_feats["uniform"], np_feats["real_b"]),
        "fd_real_real": frechet(np_feats["real_a"], np_feats["real_b"]),
        "sgld_init": sgld_cfg.init,
        "fd_init_real": frechet(np_feats["init"], np_feats["real_b"]) if "init" in np_feats else None,
        "energy_data": float(energy_of_logits(_logits(model, real[:half].to(device))).mean()),
        "energy_buffer": float(energy_of_logits(_logits(model, buffer_x)).mean()),
        "wall_s": time.monotonic() - t0,
    }
    log.info("health %s (judge %s): buffer %.0f %% confident, FD buffer %.1f vs uniform %.1f and real %.2f",
             checkpoint, judge, 100 * out["buffer_confident"], out["fd_buffer_real"], out["fd_uniform_real"],
             out["fd_real_real"])
    return out
