"""The one verdict of the suite: when does an example count as robust?

A randomized defense (JEM-k's chains) answers differently on every call, so one lucky forward pass must
not make an example robust, nor one unlucky pass make it broken. Every attack — white-box and black-box —
is scored by the same :class:`Verdict`: ``draws`` forward passes with **fresh** noise, whose seeds depend
only on (verdict seed, draw, stream) and never on the attack, so the clean input and every candidate of
an example see the same noise. The rule (per-sample worst case): an example is robust when its clean
input and every candidate are classified correctly in all draws. The mean over draws (the accuracy of
one fresh draw) is reported beside it. A deterministic model needs one draw.

Draws are taken in rounds: the first :data:`SCREEN` for every input, the rest only for the inputs still
correct in all of them (an input wrong once can never count as robust again). The rule is exactly "correct
in all ``draws`` draws" at a fraction of its cost, so a candidate that fools the model in, say, 60 % of draws
cannot pass by luck (0.4⁵ = 1 % with five draws, 0.4²⁰ ≈ 10⁻⁸ with twenty). The later rounds see the
subset of inputs still standing, so their noise is not shared with the clean input of the same example.
An input stopped at the screen gets its screen draws repeated in the remaining rows (``draws`` is then a
multiple of the screen). The accuracy of one fresh draw is the mean over the screen draws, which every input
got (:meth:`Verdict.draw_accuracy`): a mean over all rows would be biased by the stopping.

Scoring happens in the scorer's own arithmetic: callers pass the fp32 view of the defense (a bf16 or
compiled module only ever computes the attacker's gradients).
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from infra.randomness import derive_seed, seeded

from .common import EVAL_DRAWS, AttackInputError


SCREEN = 5  # draws every input gets; the rest go only to the inputs correct in all of them


_MEMO: dict[tuple[Any, ...], tuple[weakref.ref, torch.Tensor]] = {}
_MEMO_SIZE = 64


def _memo_key(model: Any, x: torch.Tensor, y: torch.Tensor, extra: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What makes a verdict reproducible: the module (and the in-place version of every parameter and buffer, so a
    training step or a loaded state dict makes a new model), the input and label bytes, and the draws, seed and
    stream. None for a callable that is not a module."""
    if not isinstance(model, nn.Module):
        return None
    digest = hashlib.blake2b(x.detach().contiguous().cpu().numpy().tobytes(), digest_size=16)
    digest.update(y.detach().contiguous().cpu().numpy().tobytes())
    weights = tuple(t._version for t in itertools.chain(model.parameters(), model.buffers()))
    return (id(model), weights, tuple(x.shape), x.dtype, digest.hexdigest(), extra)


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

    draws: int = EVAL_DRAWS
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.draws) != self.draws or self.draws < 1:
            raise AttackInputError(f"eval draws must be a positive integer, got {self.draws}")
        if self.draws > SCREEN and self.draws % SCREEN:
            raise AttackInputError(f"eval draws above {SCREEN} must be a multiple of {SCREEN}, got {self.draws}")

    def draws_for(self, model: Any) -> int:
        """Draws actually used on ``model`` (1 for a deterministic one)."""
        return 1 if is_deterministic(model) else self.draws

    def rule(self, model: Any) -> str:
        """The rule in words, for rows and tables."""
        m = self.draws_for(model)
        rule = (f"robust = the clean input and every candidate classified correctly in all {m} fresh-noise "
                f"draw{'s' if m > 1 else ''}")
        return rule + (f" (draws {SCREEN + 1}-{m} only for inputs correct in the first {SCREEN})" if m > SCREEN else "")

    @torch.no_grad()
    def score(self, model: nn.Module | Any, x: torch.Tensor, y: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """(M, N) bool: correct in draw m. Draw m's seed depends only on (seed, m, stream); draws past the
        screen run on the inputs correct in every earlier draw (module docstring). The same question asked
        again (same module and weights, inputs, labels, draws, seed and stream: the clean verdict of every row
        of a sweep) is answered from a small memo instead of new forward passes."""
        key = _memo_key(model, x, y, (self.draws, self.seed, stream))
        hit = _MEMO.get(key) if key is not None else None
        if hit is not None and hit[0]() is model:  # the very module, not a new one at a reused address
            return hit[1].clone()
        out = self._score(model, x, y, stream)
        if key is not None:
            _MEMO[key] = (weakref.ref(model), out.clone())
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.pop(next(iter(_MEMO)))
        return out

    def _score(self, model: nn.Module | Any, x: torch.Tensor, y: torch.Tensor, stream: int) -> torch.Tensor:
        was_training = getattr(model, "training", False)
        if isinstance(model, nn.Module):
            model.eval()
        total = self.draws_for(model)
        try:
            out = torch.zeros((total, x.shape[0]), dtype=torch.bool, device=y.device)
            for m in range(min(total, SCREEN)):
                out[m] = self._draw(model, x, y, m, stream)
            if total > SCREEN:
                idx = out[:SCREEN].all(0).nonzero().squeeze(1)
                out[SCREEN:] = out[:SCREEN].repeat(total // SCREEN - 1, 1)  # the inputs stopped at the screen
                for m in range(SCREEN, total if idx.numel() else SCREEN):
                    out[m, idx] = self._draw(model, x[idx], y[idx], m, stream)
        finally:
            if isinstance(model, nn.Module):
                model.train(was_training)
        return out

    def _draw(self, model: Any, x: torch.Tensor, y: torch.Tensor, m: int, stream: int) -> torch.Tensor:
        with seeded(derive_seed(self.seed, "verdict", m, stream), model):
            return model(x).argmax(1) == y

    @staticmethod
    def robust(clean: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(N,) bool from clean (M, N) and candidates (C, M, N): correct everywhere."""
        return clean.all(0) & candidates.all(1).all(0)

    @staticmethod
    def draw_accuracy(ok: torch.Tensor) -> torch.Tensor:
        """(..., N) accuracy of one fresh draw from (..., M, N) verdicts: the mean over the screen draws."""
        return ok[..., :SCREEN, :].double().mean(-2)

    @staticmethod
    def robust_frac(clean: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(N,) fraction of draws correct for the worst candidate (the clean input included): the accuracy
        of one fresh draw against the strongest candidate."""
        clean_frac = Verdict.draw_accuracy(clean)
        if not candidates.shape[0]:
            return clean_frac
        return torch.minimum(clean_frac, Verdict.draw_accuracy(candidates).amin(0))

    def params(self, model: Any) -> dict[str, Any]:
        """Row fields of this verdict on ``model``."""
        return {"eval_draws": self.draws, "eval_draws_used": self.draws_for(model), "verdict_seed": self.seed,
                "verdict_rule": self.rule(model)}
