"""Accuracy-vs-ε curves from per-example adversarial distances (minimisation attacks: one run, every ε)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .common import wilson

#: default ε grids (L2 in [0,1] pixel units; L0 in changed pixel values)
DEFAULT_L2_GRID: tuple[float, ...] = tuple(round(0.1 * i, 2) for i in range(61))
DEFAULT_L0_GRID: tuple[float, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200,
                                      300, 400, 600, 800)


def accuracy_curve(dist: torch.Tensor | Sequence[float], eps_grid: Sequence[float]) -> list[dict[str, float]]:
    """Robust accuracy at each ε: the fraction of examples whose smallest adversarial distance exceeds ε.

    An example with distance ``d`` is broken at every ε >= d (``inf``: never), so the curve is
    non-increasing in ε. Each point carries a 95 % Wilson interval.
    """
    d = torch.as_tensor(dist, dtype=torch.float64).flatten()
    n = int(d.numel())
    out = []
    for eps in eps_grid:
        robust = int((d > float(eps)).sum())
        lo, hi = wilson(robust, n)
        out.append({"eps": float(eps), "acc": robust / n if n else 0.0, "ci_low": lo, "ci_high": hi})
    return out


def distance_summary(dist: torch.Tensor | Sequence[float]) -> dict[str, Any]:
    """Median and quantiles over all examples (``inf`` = none found; an infinite quantile is None)."""
    d = torch.as_tensor(dist, dtype=torch.float64).flatten().numpy()
    finite = d[np.isfinite(d)]
    n = int(d.size)
    big = 1e300  # stands for inf, so that interpolating towards a missing adversarial gives "infinite"

    def q(p: float) -> float | None:
        if n == 0:
            return None
        v = float(np.quantile(np.where(np.isfinite(d), d, big), p))
        return v if v < big / 10 else None

    return {"n": n, "n_found": int(finite.size), "n_not_found": n - int(finite.size),
            "median": q(0.5), "q10": q(0.1), "q25": q(0.25), "q75": q(0.75), "q90": q(0.9),
            "mean_found": float(finite.mean()) if finite.size else None,
            "min": float(finite.min()) if finite.size else None}


def json_distances(d: torch.Tensor) -> list[float | None]:
    """Distances as JSON (``inf`` = none found -> null)."""
    return [float(v) if math.isfinite(float(v)) else None for v in d.tolist()]
