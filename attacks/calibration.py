"""Calibration of a classifier: expected calibration error, NLL, Brier score, reliability diagrams.

Model-agnostic: everything works on predicted probabilities (or logits) and labels. The JEM paper
(Grathwohl et al. 2020, Sec. 5.1, Fig. 5) reports ECE with equal-width confidence bins and a
reliability diagram; Guo et al. (2017) define the ECE used here:

    ECE = sum_b (|B_b| / N) * |acc(B_b) - conf(B_b)|,

with bins ``(b/B, (b+1)/B]`` over the top-1 confidence (the first bin also holds confidence 0).
The Brier score is the multi-class one of Brier (1950): ``mean_i sum_k (p_ik - 1[y_i = k])^2``
(range [0, 2]; some papers divide by K).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .common import AttackInputError, check_images
from .plots import save_figure

log = logging.getLogger(__name__)

DEFAULT_BINS = 15


@dataclass(frozen=True)
class CalibrationStats:
    """Calibration summary of one predictor on one labelled set.

    ``bin_*`` lists have one entry per bin (empty bins have count 0 and NaN-free zeros).
    """

    n: int
    n_bins: int
    accuracy: float
    mean_confidence: float
    ece: float
    mce: float
    nll: float
    brier: float
    bin_lower: list[float]
    bin_upper: list[float]
    bin_count: list[int]
    bin_accuracy: list[float]
    bin_confidence: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy() if a.is_floating_point() else a.detach().cpu().numpy()
    return np.asarray(a)


def softmax(logits: Any) -> np.ndarray:
    """Numerically stable softmax over the last axis (float64)."""
    z = _np(logits).astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: Any) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64)."""
    z = _np(logits).astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def calibration_stats(probs: Any, labels: Any, n_bins: int = DEFAULT_BINS, *,
                      log_probs: Any | None = None) -> CalibrationStats:
    """ECE (equal-width bins), maximum calibration error, NLL and Brier score.

    Args:
        probs: predicted class probabilities, shape (N, K), rows summing to 1.
        labels: true classes, shape (N,).
        n_bins: number of equal-width confidence bins on [0, 1].
        log_probs: optional exact log-probabilities (e.g. ``log_softmax(logits)``) for the NLL; without
            them the NLL uses ``log(max(p, 1e-12))``.

    Raises:
        AttackInputError: shapes disagree, probabilities are not a distribution, labels out of range.
    """
    p = _np(probs).astype(np.float64)
    y = _np(labels).astype(np.int64)
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0] or p.shape[0] == 0:
        raise AttackInputError(f"probabilities (N, K) and labels (N,) expected, got {p.shape} and {y.shape}")
    if n_bins < 1:
        raise AttackInputError(f"the number of bins must be at least 1, got {n_bins}")
    if not np.all(np.isfinite(p)) or p.min() < -1e-6 or np.abs(p.sum(1) - 1).max() > 1e-4:
        raise AttackInputError("probabilities must be finite, non-negative and sum to 1 per row")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise AttackInputError(f"labels must lie in [0, {p.shape[1] - 1}]")
    n, k = p.shape
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    # bin b holds confidences in (b/B, (b+1)/B]; confidence 0 goes to bin 0
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    nz = count > 0
    bin_acc = np.where(nz, acc_sum / np.maximum(count, 1), 0.0)
    bin_conf = np.where(nz, conf_sum / np.maximum(count, 1), 0.0)
    gaps = np.abs(bin_acc - bin_conf)
    ece = float((count / n * gaps).sum())
    mce = float(gaps[nz].max()) if nz.any() else 0.0
    if log_probs is not None:
        lp = _np(log_probs).astype(np.float64)
        if lp.shape != p.shape:
            raise AttackInputError(f"log_probs shape {lp.shape} differs from probs {p.shape}")
        nll = float(-lp[np.arange(n), y].mean())
    else:
        nll = float(-np.log(np.maximum(p[np.arange(n), y], 1e-12)).mean())
    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0
    brier = float(((p - onehot) ** 2).sum(1).mean())
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return CalibrationStats(
        n=int(n), n_bins=int(n_bins), accuracy=float(correct.mean()), mean_confidence=float(conf.mean()),
        ece=ece, mce=mce, nll=nll, brier=brier, bin_lower=edges[:-1].tolist(), bin_upper=edges[1:].tolist(),
        bin_count=count.astype(int).tolist(), bin_accuracy=bin_acc.tolist(), bin_confidence=bin_conf.tolist(),
    )


def calibration_from_logits(logits: Any, labels: Any, n_bins: int = DEFAULT_BINS) -> CalibrationStats:
    """:func:`calibration_stats` of ``softmax(logits)`` with the exact log-softmax NLL."""
    return calibration_stats(softmax(logits), labels, n_bins, log_probs=log_softmax(logits))


@torch.no_grad()
def predict_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 500,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Outputs of ``model`` on [0,1] images ``x`` in batches, on the CPU as float32.

    ``model`` follows the tensors' device: move ``x`` first. ``progress(n_done)`` is called per batch.
    """
    check_images(x)
    outs = []
    for i in range(0, x.shape[0], batch_size):
        outs.append(model(x[i:i + batch_size]).float().cpu())
        if progress is not None:
            progress(min(i + batch_size, x.shape[0]))
    return torch.cat(outs) if outs else torch.empty(0)


def reliability_diagram(stats: CalibrationStats | list[tuple[str, CalibrationStats]], path: str | os.PathLike,
                        title: str = "") -> Path:
    """Reliability diagram (accuracy per confidence bin vs the diagonal) and a confidence histogram, as PNG.

    Args:
        stats: one result, or ``[(label, stats), ...]`` drawn side by side.
        path: output PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("", stats)] if isinstance(stats, CalibrationStats) else list(stats)
    if not panels:
        raise AttackInputError("nothing to plot")
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})
    for j, (label, s) in enumerate(panels):
        ax, hax = axes[0, j], axes[1, j]
        width = 1.0 / s.n_bins
        centres = np.asarray(s.bin_lower) + width / 2
        counts = np.asarray(s.bin_count)
        acc = np.where(counts > 0, s.bin_accuracy, np.nan)
        conf = np.where(counts > 0, s.bin_confidence, np.nan)
        ax.bar(centres, acc, width=width, edgecolor="black", color="tab:blue", label="accuracy")
        ax.bar(centres, conf - acc, bottom=acc, width=width, edgecolor="tab:red", color="none", hatch="//",
               lw=0.8, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{label}\nECE {100 * s.ece:.2f}%  NLL {s.nll:.3f}  Brier {s.brier:.3f}".strip(), fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
        hax.bar(centres, counts / max(s.n, 1), width=width, edgecolor="black", color="grey")
        hax.set_xlim(0, 1)
        hax.set_xlabel("confidence (max softmax)")
        hax.set_ylabel("fraction")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


#: the fields of :class:`CalibrationStats` (a calibration row holds every one)
STATS_FIELDS = tuple(f.name for f in fields(CalibrationStats))


def calibration_fields(stats: CalibrationStats) -> dict[str, Any]:
    """The statistics as row fields, refused when not finite (the model's outputs are then unusable)."""
    row = stats.to_dict()
    for k in ("ece", "mce", "nll", "brier"):
        if not math.isfinite(row[k]):
            raise AttackInputError(f"{k} is not finite ({row[k]}); the model's outputs are unusable")
    return row
