"""Distal adversarials: images optimised from noise until a model calls them a chosen class.

Nguyen et al. (2015) showed that undefended classifiers become confident on noise-like "fooling images";
Grathwohl et al. (2020, Sec. 5.3) used such distal adversarials to argue that JEM's density model makes its
refined classifier produce class-like images or stay unsure. Here every class is targeted from several
starting points (uniform noise, and the data set's mean image plus uniform noise), each optimised with a
fixed budget of signed-gradient (or Adam) steps on the target's log-softmax, staying in [0,1]. For a
refined classifier the gradient flows through its chain exactly as the model's ``grad_mode`` says.

Reported per model and start kind: confidence (max softmax) on the starts and on the results, the
fraction of results above a threshold, how often the target was reached, and the mean log-density
(``logsumexp`` of the logits, i.e. minus the JEM energy, up to the unknown constant) of results versus
real test images. Model-agnostic: the model maps [0,1] images to logits; the density model (by default
the same) maps [0,1] images to the logits whose ``logsumexp`` is read as log-density.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from infra.energy import log_density_of_logits
from infra.norms import ascent_step
from infra.randomness import generator
from infra.records import row_key

from .common import AttackInputError, check_images
from .pipeline import Evaluation, Unit
from .rows import DistalRow
from .target import Target

log = logging.getLogger(__name__)

STARTS = ("uniform", "mean")
METHODS = ("sign", "adam")
Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DistalConfig:
    """Settings of a distal-adversarial run (all of them go into the rows).

    Args:
        steps: gradient steps per image.
        step_size: signed-gradient step in [0,1] pixel units (Adam: its learning rate).
        seeds: starting images per (class, start kind).
        starts: start kinds: ``"uniform"`` (U(0,1) noise), ``"mean"`` (data mean + U(-mean_noise, mean_noise)).
        mean_noise: half-width of the uniform noise around the data mean.
        threshold: confidence threshold for the "fraction above" statistics.
        method: ``"sign"`` (signed gradient ascent) or ``"adam"``.
        seed: seed of the starting noise.
        batch_size: images optimised together.
    """

    steps: int = 30
    step_size: float = 0.03
    seeds: int = 2
    starts: tuple[str, ...] = STARTS
    mean_noise: float = 0.1
    threshold: float = 0.9
    method: str = "sign"
    seed: int = 0
    batch_size: int = 200

    def validate(self) -> "DistalConfig":
        """Raise :class:`AttackInputError` for values no run can use; returns self."""
        if self.steps < 1 or self.seeds < 1 or self.batch_size < 1:
            raise AttackInputError(f"steps, seeds and batch size must be at least 1, got {self.steps}, "
                                   f"{self.seeds}, {self.batch_size}")
        if not self.step_size > 0:
            raise AttackInputError(f"step size must be positive, got {self.step_size}")
        bad = [s for s in self.starts if s not in STARTS]
        if bad or not self.starts:
            raise AttackInputError(f"unknown start kind(s) {bad}; choose from {', '.join(STARTS)}")
        if not 0 < self.threshold < 1:
            raise AttackInputError(f"threshold must lie in (0, 1), got {self.threshold}")
        if self.mean_noise < 0:
            raise AttackInputError(f"mean noise must be >= 0, got {self.mean_noise}")
        if self.method not in METHODS:
            raise AttackInputError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        return self

    def params(self) -> dict[str, Any]:
        d = asdict(self)
        d["starts"] = list(self.starts)
        return d


def make_starts(n_classes: int, mean_image: torch.Tensor, cfg: DistalConfig,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Starting images, their targets and start kinds, class-major (row t of a grid = class t).

    Args:
        n_classes: K; every class is a target.
        mean_image: (C, H, W) mean of the data set in [0,1] (also fixes shape and device).
        cfg: seeds per (class, start kind), start kinds, mean noise.
        generator: source of the starting noise (on ``mean_image``'s device).

    Returns:
        ``x0`` (K * len(starts) * seeds, C, H, W), ``targets`` (same length), ``kinds`` (list of str).
    """
    shape = (cfg.seeds, *mean_image.shape)
    xs, ts, kinds = [], [], []
    for t in range(n_classes):
        for kind in cfg.starts:
            u = torch.rand(shape, generator=generator, device=mean_image.device)
            x = u if kind == "uniform" else (mean_image + cfg.mean_noise * (2 * u - 1)).clamp(0, 1)
            xs.append(x)
            ts += [t] * cfg.seeds
            kinds += [kind] * cfg.seeds
    return torch.cat(xs), torch.tensor(ts, device=mean_image.device), kinds


def _target_logp(model: Model, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(x).float(), 1).gather(1, targets[:, None]).squeeze(1)


def optimise(model: Model, x0: torch.Tensor, targets: torch.Tensor, steps: int, step_size: float,
             method: str = "sign") -> tuple[torch.Tensor, torch.Tensor]:
    """Push ``x0`` towards ``targets`` by ascending the target log-softmax; stays in [0,1].

    Returns:
        The optimised images (detached) and the target probability of each image at each step, shape
        (steps, N) (from the forward pass that produced that step's gradient).
    """
    x = x0.detach().clone()
    trace: list[torch.Tensor] = []
    opt = None
    if method == "adam":
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=step_size)
    for _ in range(steps):
        with torch.enable_grad():
            xi = x if opt is not None else x.detach().requires_grad_(True)
            logp = _target_logp(model, xi, targets)
            (grad,) = torch.autograd.grad(logp.sum(), xi)
        trace.append(logp.detach().exp())
        with torch.no_grad():
            if opt is not None:
                x.grad = -grad
                opt.step()
                x.clamp_(0, 1)
            else:
                x = ascent_step(x, grad, "linf", step_size).clamp(0, 1)  # unbounded in ε, kept in [0,1]
    return x.detach(), torch.stack(trace) if trace else x.new_zeros(0, x.shape[0])


@torch.no_grad()
def predict(model: Model, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Softmax probabilities (N, K), in batches."""
    return torch.cat([F.softmax(model(x[i:i + batch_size]).float(), 1) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def log_density(density: Model, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``logsumexp`` of the logits (= -energy in JEM's reading), shape (N,)."""
    return torch.cat([log_density_of_logits(density(x[i:i + batch_size]))
                      for i in range(0, x.shape[0], batch_size)])


def confidence_stats(probs: torch.Tensor, targets: torch.Tensor, threshold: float) -> dict[str, Any]:
    """Mean confidence (max softmax), mean target probability, hit rates at ``threshold``."""
    conf, pred = probs.max(1)
    p_t = probs.gather(1, targets[:, None]).squeeze(1)
    return {"confidence": float(conf.mean()), "target_prob": float(p_t.mean()),
            "target_hit": float((pred == targets).double().mean()),
            "frac_above_threshold": float((conf >= threshold).double().mean()),
            "frac_target_above_threshold": float(((pred == targets) & (p_t >= threshold)).double().mean())}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "model"


class DistalEvaluation(Evaluation[DistalRow]):
    """Distal adversarials for each defense: one row per start kind and a grid PNG (rows = classes), computed in
    one piece per defense.

    Args:
        n_classes: K.
        mean_image: (C, H, W) data mean in [0,1], on the models' device.
        real_images: real test images in [0,1] (log-density reference), on the models' device.
        cfg: the run's settings.
        out_dir: the run folder (for the grids).
        dataset: recorded.
        density: target -> the module whose logits give the log-density (default: the target's own model).
        density_name: how that density model is described in the rows.
        save_grid: ``save_grid(images, path, nrow)`` writer for the PNG (skipped when None).
    """

    row_type = DistalRow
    code = ("attacks/distal.py", "infra/norms.py", "infra/energy.py")

    def __init__(self, *, n_classes: int, mean_image: torch.Tensor, real_images: torch.Tensor, cfg: DistalConfig,
                 out_dir: str | os.PathLike, dataset: str | None = None,
                 density: Callable[[Target], Model] | None = None, density_name: str = "the defense itself",
                 save_grid: Callable[[torch.Tensor, Path, int], None] | None = None) -> None:
        cfg.validate()
        check_images(real_images)
        check_images(mean_image[None])
        self.n_classes, self.mean_image, self.real, self.cfg = n_classes, mean_image, real_images, cfg
        self.out, self.dataset, self.density, self.density_name = Path(out_dir), dataset, density, density_name
        self.save_grid = save_grid

    def units(self, target: Target) -> list[Unit]:
        return [Unit.whole(f"{target.label} distal",
                           {kind: {"start": kind, "params": self.cfg.params()} for kind in self.cfg.starts},
                           lambda: self._compute(target))]

    def _compute(self, target: Target) -> dict[str, dict[str, Any]]:
        cfg, model = self.cfg, target.model
        density = self.density(target) if self.density is not None else model
        t0 = time.perf_counter()
        g = generator(cfg.seed, self.mean_image.device)
        x0, targets, kinds = make_starts(self.n_classes, self.mean_image, cfg, g)
        results: list[torch.Tensor] = []
        traces: list[torch.Tensor] = []
        for i in range(0, x0.shape[0], cfg.batch_size):
            log.info("%s distal: images %d-%d of %d, %d steps", target.label, i,
                     min(i + cfg.batch_size, x0.shape[0]), x0.shape[0], cfg.steps)
            xr, tr = optimise(model, x0[i:i + cfg.batch_size], targets[i:i + cfg.batch_size], cfg.steps,
                              cfg.step_size, cfg.method)
            results.append(xr)
            traces.append(tr)
        x, trace = torch.cat(results), torch.cat(traces, 1)
        p0, p1 = predict(model, x0), predict(model, x)
        ld0, ld1, ldr = log_density(density, x0), log_density(density, x), log_density(density, self.real)
        wall = time.perf_counter() - t0
        grid_name = None
        if self.save_grid is not None:
            grid_name = (f"distal-{_slug(target.label)}-{target.fields()['grad_mode']}-{target.defense_id}-"
                         f"{row_key(cfg.params())}.png")
            self.save_grid(x.cpu(), self.out / grid_name, len(cfg.starts) * cfg.seeds)
        rows = {}
        for kind in cfg.starts:
            m = torch.tensor([k == kind for k in kinds], device=x.device)
            t = targets[m]
            start, res = confidence_stats(p0[m], t, cfg.threshold), confidence_stats(p1[m], t, cfg.threshold)
            per_class = [float(p1[m][t == c].gather(1, t[t == c][:, None]).mean()) for c in range(self.n_classes)]
            rows[kind] = dict(
                start=kind, dataset=self.dataset, density_model=self.density_name, distal_params=cfg.params(),
                seed=cfg.seed, n_images=int(m.sum()), threshold=cfg.threshold,
                conf_start=start["confidence"], conf_result=res["confidence"],
                target_prob_start=start["target_prob"], target_prob_result=res["target_prob"],
                target_hit_result=res["target_hit"], frac_above_threshold_start=start["frac_above_threshold"],
                frac_above_threshold=res["frac_above_threshold"],
                frac_target_above_threshold=res["frac_target_above_threshold"], target_prob_by_class=per_class,
                target_prob_trace=[float(v) for v in trace[:, m].mean(1)],
                log_density_start=float(ld0[m].mean()), log_density_result=float(ld1[m].mean()),
                log_density_real=float(ldr.mean()), log_density_real_std=float(ldr.std()),
                n_real=int(self.real.shape[0]),
                log_density_note="mean logsumexp of the density model's logits (-energy, unnormalised)",
                grid_file=grid_name, grid_layout=f"rows = classes 0..{self.n_classes - 1}; columns = "
                                                 f"{', '.join(cfg.starts)} starts x {cfg.seeds} seeds",
                wall_s=wall)
        return rows
