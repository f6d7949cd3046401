"""Out-of-distribution detection with a classifier's own scores (JEM paper, Grathwohl et al. 2020, Sec. 5.2).

Scores, each oriented so that **larger means more in-distribution**:

* ``logp``: log p(x) up to the normaliser, ``logsumexp_y f(x)[y]`` (= -E(x), the model's negative energy);
* ``max_softmax``: max_y p(y|x) (Hendrycks & Gimpel 2017);
* ``grad_norm``: the "approximate mass" score ``-||d log p(x) / dx||_2``. The paper (Sec. 5.2) argues that
  in-distribution points sit in regions of high mass where log p(x) is flat, so a *large* gradient norm
  means *more OOD*; its reference code scores ``-log ||grad||`` (same ranking as ``-||grad||``). We use
  that direction; an AUROC below 0.5 therefore means the model ranks the other way. The gradient is
  taken with respect to the [0,1] input; the paper's [-1,1] space scales every norm by 1/2, which leaves
  AUROC and FPR unchanged.

Metrics treat in-distribution as the positive class: AUROC = P(s_in > s_out) + P(s_in = s_out) / 2
(rank statistic, ties averaged), and FPR at 95 % TPR = the fraction of OOD inputs scored at or above the
threshold that keeps 95 % of the in-distribution inputs.

OOD sets built from the in-distribution images alone (offline): uniform noise, Gaussian noise, constant
images, pixel-permuted images and vertically flipped images (Fashion-MNIST items are mostly left-right
symmetric, so a horizontal flip would stay in-distribution; upside-down shoes and bags do not).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from infra.energy import log_density_of_logits

from .common import AttackInputError, check_images
from .plots import save_figure

log = logging.getLogger(__name__)

SCORES = ("logp", "max_softmax", "grad_norm")
# sign that turns the raw quantity into "larger = more in-distribution"
SCORE_SIGN = {"logp": 1.0, "max_softmax": 1.0, "grad_norm": -1.0}
SCORE_DOC = {
    "logp": "logsumexp(logits) = -energy; higher = in-distribution",
    "max_softmax": "max softmax probability; higher = in-distribution",
    "grad_norm": "-||d logsumexp(logits)/dx||_2 (JEM approximate mass); larger norm = more OOD",
}
SYNTHETIC = ("uniform", "gaussian", "constant", "permuted", "flipped")


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_v = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_v)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def _check_scores(a: Any, name: str) -> np.ndarray:
    v = np.asarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float64).ravel()
    if v.size == 0:
        raise AttackInputError(f"{name} scores are empty")
    if not np.all(np.isfinite(v)):
        raise AttackInputError(f"{name} scores contain NaN or inf")
    return v


def auroc(in_scores: Any, out_scores: Any) -> float:
    """Area under the ROC curve with in-distribution positive (Mann-Whitney U / (n_in n_out), ties = 1/2)."""
    a, b = _check_scores(in_scores, "in-distribution"), _check_scores(out_scores, "OOD")
    ranks = _ranks(np.concatenate([a, b]))
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0
    return float(u / (a.size * b.size))


def fpr_at_tpr(in_scores: Any, out_scores: Any, tpr: float = 0.95) -> float:
    """Fraction of OOD scores >= the largest threshold that accepts at least ``tpr`` of the in-distribution."""
    if not 0 < tpr <= 1:
        raise AttackInputError(f"tpr must be in (0, 1], got {tpr}")
    a, b = _check_scores(in_scores, "in-distribution"), _check_scores(out_scores, "OOD")
    a_desc = np.sort(a)[::-1]
    k = max(int(math.ceil(tpr * a.size)) - 1, 0)
    thr = a_desc[k]
    return float((b >= thr).mean())


# ------------------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------------------
def ood_scores(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 250,
               scores: tuple[str, ...] = SCORES) -> dict[str, np.ndarray]:
    """Raw per-image quantities of ``model`` on [0,1] images ``x`` (on the model's device).

    Returns ``{"logp": logsumexp(logits), "max_softmax": ..., "grad_norm": ||d logp/dx||_2}`` restricted to
    ``scores``; turn them into "larger = in-distribution" scores with :data:`SCORE_SIGN` (see :func:`oriented`).
    """
    check_images(x)
    bad = [s for s in scores if s not in SCORES]
    if bad:
        raise AttackInputError(f"unknown OOD score(s) {bad}; choose from {', '.join(SCORES)}")
    out: dict[str, list[np.ndarray]] = {s: [] for s in scores}
    need_grad = "grad_norm" in scores
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].detach()
        if need_grad:
            xb = xb.clone().requires_grad_(True)
            with torch.enable_grad():
                logits = model(xb).float()
                logp = log_density_of_logits(logits)
                (grad,) = torch.autograd.grad(logp.sum(), xb)
            out["grad_norm"].append(grad.flatten(1).norm(dim=1).cpu().double().numpy())
        else:
            with torch.no_grad():
                logits = model(xb).float()
                logp = log_density_of_logits(logits)
        logits, logp = logits.detach(), logp.detach()
        if "logp" in scores:
            out["logp"].append(logp.cpu().double().numpy())
        if "max_softmax" in scores:
            out["max_softmax"].append(torch.softmax(logits.double(), 1).max(1).values.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def oriented(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw quantities -> scores where larger means more in-distribution."""
    return {k: SCORE_SIGN[k] * v for k, v in raw.items()}


# ------------------------------------------------------------------------------------------------
# OOD sets
# ------------------------------------------------------------------------------------------------
def synthetic_ood(name: str, x_in: torch.Tensor, generator: torch.Generator,
                  gaussian_std: float = 0.25) -> torch.Tensor:
    """An OOD set with the shape of ``x_in`` (N, C, H, W), built offline.

    * ``uniform``: i.i.d. U[0, 1] pixels;
    * ``gaussian``: i.i.d. N(0.5, gaussian_std^2) clipped to [0, 1] (Hendrycks et al. 2019's recipe in [0,1] units);
    * ``constant``: one U[0, 1] grey value per image and channel;
    * ``permuted``: each image's pixel positions shuffled by its own random permutation (same across channels);
    * ``flipped``: images upside down (vertical flip).

    Randomness comes from ``generator`` (on the CPU); the result is on the CPU.
    """
    check_images(x_in)
    x_in = x_in.detach().cpu()
    n, c, h, w = x_in.shape
    if name == "uniform":
        return torch.rand((n, c, h, w), generator=generator)
    if name == "gaussian":
        return (0.5 + gaussian_std * torch.randn((n, c, h, w), generator=generator)).clamp_(0, 1)
    if name == "constant":
        return torch.rand((n, c, 1, 1), generator=generator).expand(n, c, h, w).contiguous()
    if name == "permuted":
        keys = torch.rand((n, h * w), generator=generator)
        perm = keys.argsort(dim=1)
        flat = x_in.reshape(n, c, h * w)
        return torch.gather(flat, 2, perm.unsqueeze(1).expand(n, c, h * w)).reshape(n, c, h, w)
    if name == "flipped":
        return x_in.flip(2).contiguous()
    raise AttackInputError(f"unknown synthetic OOD set {name!r}; choose from {', '.join(SYNTHETIC)}")


def match_shape(x: torch.Tensor, shape: tuple[int, int, int]) -> tuple[torch.Tensor, str]:
    """Convert [0,1] images to (C, H, W) = ``shape``; returns the images and what was done.

    RGB -> grayscale uses ITU-R BT.601 luminance (0.299 R + 0.587 G + 0.114 B); grayscale -> RGB repeats the
    channel; the size is changed by area averaging when shrinking and bilinear interpolation when growing.
    """
    check_images(x)
    c, h, w = shape
    done = []
    if x.shape[1] != c:
        if x.shape[1] == 3 and c == 1:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * weights).sum(1, keepdim=True)
            done.append("RGB->luminance (BT.601)")
        elif x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
            done.append(f"grayscale->{c} channels (repeated)")
        else:
            raise AttackInputError(f"cannot convert {x.shape[1]}-channel images to {c} channels")
    if tuple(x.shape[2:]) != (h, w):
        shrink = x.shape[2] >= h and x.shape[3] >= w
        src = f"{x.shape[2]}x{x.shape[3]}"
        if shrink:
            x = F.interpolate(x, size=(h, w), mode="area")
        else:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        done.append(f"resized {src}->{h}x{w} ({'area' if shrink else 'bilinear'})")
    return x.clamp(0, 1).contiguous(), ", ".join(done) or "none"


# ------------------------------------------------------------------------------------------------
# report pieces
# ------------------------------------------------------------------------------------------------
def ood_metrics(in_raw: dict[str, np.ndarray], out_raw: dict[str, np.ndarray], tpr: float = 0.95) -> dict[str, dict]:
    """Per score: AUROC, FPR at ``tpr`` TPR, and the raw means (in / out)."""
    res = {}
    for name in in_raw:
        if name not in out_raw:
            continue
        s_in, s_out = SCORE_SIGN[name] * in_raw[name], SCORE_SIGN[name] * out_raw[name]
        res[name] = {"auroc": auroc(s_in, s_out), "fpr_at_tpr": fpr_at_tpr(s_in, s_out, tpr), "tpr": tpr,
                     "in_mean": float(np.mean(in_raw[name])), "out_mean": float(np.mean(out_raw[name])),
                     "direction": SCORE_DOC[name]}
    return res


def ood_histograms(in_raw: dict[str, np.ndarray], outs: dict[str, dict[str, np.ndarray]],
                   path: str | os.PathLike, title: str = "", in_label: str = "in-distribution") -> Path:
    """One panel per score: the raw quantity's histogram for the in-distribution set and each OOD set (PNG).

    The gradient norm is drawn on a log10 axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s for s in SCORES if s in in_raw]
    if not names:
        raise AttackInputError("nothing to plot")
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        tf = (lambda v: np.log10(np.maximum(v, 1e-12))) if name == "grad_norm" else (lambda v: v)
        series = [(in_label, tf(in_raw[name]))] + [(k, tf(v[name])) for k, v in outs.items() if name in v]
        lo = min(float(np.min(s)) for _, s in series)
        hi = max(float(np.max(s)) for _, s in series)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 50)
        for i, (label, s) in enumerate(series):
            ax.hist(s, bins=bins, density=True, histtype="stepfilled" if i == 0 else "step",
                    alpha=0.35 if i == 0 else 0.9, lw=1.4, label=label)
        ax.set_xlabel({"logp": "log p(x) + const = logsumexp f(x)", "max_softmax": "max softmax p(y|x)",
                       "grad_norm": "log10 ||d log p(x)/dx||"}[name])
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def ood_rows(metrics: dict[str, dict], out_set: str, **fields: Any) -> list[dict[str, Any]]:
    """Records rows (``kind="ood"``), one per score, each with ``fields`` (model, provenance, settings)."""
    rows = []
    for score, m in metrics.items():
        rows.append({"kind": "ood", **fields, "out_set": out_set, "score": score, **m})
    return rows
