"""Small shared pieces of the attack side: ε parsing, Wilson intervals, input checks."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING

from infra.errors import InputError

if TYPE_CHECKING:  # no torch at import time: the CLI parses ε before torch is loaded
    import torch

NORMS = ("linf", "l2", "l0")
EVAL_DRAWS = 20  # the default verdict: correct in all 20 fresh-noise draws


class AttackInputError(InputError):
    """Bad attack input (ε, budgets, images); the CLI reports it as one line with exit code 2."""


def parse_eps(text: str, norm: str | None = None) -> list[float]:
    """Parse ``"8/255"``, ``"0.03"`` or comma lists like ``"0,2/255,8/255"`` into floats.

    Raises:
        AttackInputError: empty, non-numeric, negative, division by zero, or L-inf ε > 1.
    """
    out: list[float] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise AttackInputError(f"empty value in ε list {text!r}")
        try:
            if "/" in part:
                num, den = part.split("/", 1)
                value = float(Fraction(num.strip()) / Fraction(den.strip()))
            else:
                value = float(part)
        except ZeroDivisionError:
            raise AttackInputError(f"ε {part!r} divides by zero") from None
        except ValueError:
            raise AttackInputError(f"ε {part!r} is not a number or fraction (e.g. 8/255, 0.03)") from None
        check_eps(norm, value, text=part)
        out.append(value)
    return out


def check_eps(norm: str | None, eps: float, shape: tuple[int, ...] | None = None, *, text: str | None = None) -> None:
    """The one range check of a budget in [0,1] pixel units: finite and non-negative; L∞ at most 1 (the whole pixel
    range; a whole number up to 255 is probably meant as k/255); L2 at most the diagonal of [0,1]^(C·H·W) when the
    image ``shape`` (C, H, W) is known. ``text`` is the budget as the user typed it.

    Raises:
        AttackInputError: naming the budget and the bound it breaks.
    """
    shown = text if text is not None else f"{eps:g}"
    if not math.isfinite(eps) or eps < 0:
        raise AttackInputError(f"ε {shown} must be a finite non-negative number")
    if norm == "linf" and eps > 1:
        hint = f"; did you mean {shown}/255?" if eps <= 255 and eps == int(eps) else ""
        raise AttackInputError(f"L∞ ε {shown} exceeds 1, the whole [0,1] pixel range{hint}")
    if norm == "l2" and shape is not None:
        top = math.sqrt(math.prod(shape))
        if eps > top:
            raise AttackInputError(f"L2 ε {shown} exceeds {top:.4g}, the largest L2 distance between two images of "
                                   f"{'x'.join(map(str, shape))} pixels in [0,1]")


def format_eps(e: float) -> str:
    """ε as a person types it: short decimals stay decimals, other multiples of 1/255 become k/255."""
    text = f"{e:g}"
    if len(text) > 5 and e and abs(e * 255 - round(e * 255)) < 1e-9:
        return f"{round(e * 255)}/255"
    return text


def eps_key(e: float) -> float:
    """ε as a grouping key: budgets that differ only by float noise (2/255 parsed twice) fall together."""
    return round(float(e), 12)


def same_eps(a: float, b: float) -> bool:
    """Whether two budgets are the same ε (the one tolerance used wherever budgets are matched)."""
    return eps_key(a) == eps_key(b)


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a binomial proportion (returns (0, 1) when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def check_images(x: torch.Tensor) -> None:
    """Raise unless ``x`` is a float batch (N, C, H, W) with values in [0, 1]."""
    if x.dim() != 4 or not x.is_floating_point():
        raise AttackInputError(f"images must be a float tensor (N, C, H, W), got {tuple(x.shape)} {x.dtype}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise AttackInputError("images must lie in [0, 1]; normalisation belongs inside the model")


def world_position() -> tuple[int, int]:
    """(rank, world size) in an initialised ``torch.distributed`` group (e.g. under ``torchrun``); (0, 1)
    otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
