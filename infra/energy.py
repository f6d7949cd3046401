"""The one energy formula of JEM (Grathwohl et al. 2020, Eq. 5): E(x) = -logsumexp_y f(x)[y].

Computed in fp32, or in the logits' precision when that is higher (a float64 model stays float64), so
bf16 logits never round the energy.
"""

from __future__ import annotations

import torch


def energy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """E = -logsumexp(logits) per row, shape (N,)."""
    return -torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)


def log_density_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """log p(x) up to the unknown normaliser: -E(x) = logsumexp(logits), shape (N,)."""
    return -energy_of_logits(logits)
