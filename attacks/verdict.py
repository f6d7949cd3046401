"""The one verdict of the suite: when does an example count as robust?

A randomized defense (JEM-k's chains) answers differently on every call, so one lucky forward pass must
not make an example robust, nor one unlucky pass make it broken. Every attack — white-box and black-box —
is scored by the same :class:`Verdict`: ``draws`` forward passes with **fresh** noise, whose seeds depend
only on (verdict seed, draw, stream) and never on the attack, so the clean input and every candidate of
an example see the same noise. The rule (per-sample worst case): an example is robust when its clean
input and every candidate are classified correctly in all draws. The mean over draws (the accuracy of
one fresh draw) is reported beside it. A deterministic model needs one draw.

Scoring happens in the scorer's own arithmetic: callers pass the fp32 view of the defense (a bf16 or
compiled module only ever computes the attacker's gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from infra.randomness import derive_seed, seeded

from .common import AttackInputError


def is_deterministic(model: Any) -> bool:
    """True only if the model says so (``model.deterministic``); unknown modules count as randomized."""
    return bool(getattr(model, "deterministic", False))


@dataclass(frozen=True)
class Verdict:
    """Fresh-noise scoring of candidates (see the module docstring).

    Args:
        draws: fresh-noise forward passes per input (M).
        seed: root of the draws' seeds.
    """

    draws: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.draws) != self.draws or self.draws < 1:
            raise AttackInputError(f"eval draws must be a positive integer, got {self.draws}")

    def draws_for(self, model: Any) -> int:
        """Draws actually used on ``model`` (1 for a deterministic one)."""
        return 1 if is_deterministic(model) else self.draws

    def rule(self, model: Any) -> str:
        """The rule in words, for rows and tables."""
        m = self.draws_for(model)
        return (f"robust = the clean input and every candidate classified correctly in all {m} fresh-noise "
                f"draw{'s' if m > 1 else ''}")

    @torch.no_grad()
    def score(self, model: nn.Module | Any, x: torch.Tensor, y: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """(M, N) bool: correct in draw m. The draws' seeds depend only on (seed, m, stream)."""
        was_training = getattr(model, "training", False)
        if isinstance(model, nn.Module):
            model.eval()
        try:
            out = []
            for m in range(self.draws_for(model)):
                with seeded(derive_seed(self.seed, "verdict", m, stream), model):
                    out.append(model(x).argmax(1) == y)
        finally:
            if isinstance(model, nn.Module):
                model.train(was_training)
        return torch.stack(out)

    @staticmethod
    def robust(clean: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(N,) bool from clean (M, N) and candidates (C, M, N): correct everywhere."""
        return clean.all(0) & candidates.all(1).all(0)

    @staticmethod
    def robust_frac(clean: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(N,) fraction of draws correct for the worst candidate (the clean input included): the accuracy
        of one fresh draw against the strongest candidate."""
        clean_frac = clean.float().mean(0)
        if not candidates.shape[0]:
            return clean_frac
        return torch.minimum(clean_frac, candidates.float().mean(1).amin(0))

    def params(self, model: Any) -> dict[str, Any]:
        """Row fields of this verdict on ``model``."""
        return {"eval_draws": self.draws, "eval_draws_used": self.draws_for(model), "verdict_seed": self.seed,
                "verdict_rule": self.rule(model)}
