"""Benchmark your own model: any ``nn.Module`` mapping [0,1] images to logits, through the suite's protocol.

    from suite import benchmark
    rows = benchmark(model, x, y, eps={"linf": [0.03, 0.1]}, deterministic=True)

A module without a ``deterministic`` attribute is treated as randomized (the safe default: 20 EOT draws per
gradient, 20 fresh-noise verdict draws, AutoAttack's rand version); say ``deterministic=True`` for a plain
classifier, so that AutoAttack runs its standard version (APGD-CE, APGD-T, FAB-T, Square) and one draw is
used. A randomized module should draw its noise from torch's global RNG or offer ``reseed(seed)``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from attacks.autoattack import autoattack_factory
from attacks.benchmark import Examples, gradient_evaluations, run_sweep
from attacks.rows import WhiteboxRow
from attacks.target import Target
from attacks.verdict import EVAL_DRAWS
from attacks.white import AttackFactory, pgd_factory
from infra.provenance import tensors_sha256
from robust_jem.errors import UserError

from .jobs import check_budgets, refuse_foreign_rows
from .report import write_report


class Declared(nn.Module):
    """``model`` with its determinism declared (the user's module is left untouched)."""

    def __init__(self, model: nn.Module, deterministic: bool) -> None:
        super().__init__()
        self.inner = model
        self.deterministic = bool(deterministic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def reseed(self, seed: int) -> None:
        reseed = getattr(self.inner, "reseed", None)
        if callable(reseed):
            reseed(seed)


def planned_cost(model: nn.Module, factories: Sequence[AttackFactory], eps: dict[str, Sequence[float]],
                 n: int) -> str:
    """One line: what will run and what it costs (attacker gradient evaluations over all examples)."""
    attacks = [factory(model, norm, e) for factory in factories for norm, budgets in eps.items() for e in budgets]
    grads = sum(gradient_evaluations(a) for a in attacks) * n
    names = ", ".join(dict.fromkeys(a.name for a in attacks))
    return (f"benchmark: {len(attacks)} rows ({names}) on {n} examples: {grads:,} attacker gradient evaluations "
            f"(each a forward-backward pass of the model on one image); rows are logged as they finish")


def benchmark(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: dict[str, Sequence[float]],
              label: str = "model", deterministic: bool | None = None, out: str | Path | None = None,
              steps: int = 50, restarts: int = 2, eot: int | str = "auto", eval_draws: int = EVAL_DRAWS,
              autoattack: bool = True, seed: int = 0, batch_size: int | None = None,
              progress: bool = True) -> list[WhiteboxRow]:
    """Attack ``model`` on ``(x, y)`` with the suite's white-box protocol and return the typed rows.

    Args:
        model: [0,1] images (N, C, H, W) -> logits (N, K); on the device of ``x``.
        x, y: images in [0,1] and labels.
        eps: norm (``linf``, ``l2``) -> budgets in [0,1] pixel units.
        label: the model's name in rows and the report.
        deterministic: declare the model deterministic (True) or randomized (False); None: its own
            ``deterministic`` attribute, randomized when it has none.
        out: a run folder: rows.jsonl, rows.csv and report.md are written there as a CLI run writes them
            (default: a temporary folder, rows only).
        steps, restarts, eot: the PGD budget (``eot="auto"``: 20 draws per step on a randomized model).
        eval_draws: fresh-noise draws of the verdict (1 on a deterministic model).
        autoattack: also run AutoAttack (rand or standard, by determinism) at every ε.
        seed: root of every seed; batch_size: images per attack call.
        progress: announce the planned cost (attacks, gradient evaluations) before starting, then progress bars.

    Returns:
        One :class:`~attacks.rows.WhiteboxRow` per (attack, norm, ε), with per-example outcomes.
    """
    if x.dim() != 4 or y.shape != x.shape[:1]:
        raise UserError(f"x must be images (N, C, H, W) with one label each in y, got {tuple(x.shape)} and "
                        f"{tuple(y.shape)}")
    for norm, budgets in eps.items():  # the command line's checks, before any work
        check_budgets([norm], list(budgets), tuple(x.shape[1:]))
    wrapped = model if deterministic is None else Declared(model, deterministic)
    target = Target(label, wrapped, {"objective": "external", "module": type(model).__name__})
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="robust-jem-"))
    factories = [pgd_factory(steps=steps, restarts=restarts, eot=eot, eval_draws=eval_draws, seed=seed)]
    if autoattack:
        factories.append(autoattack_factory(version="auto", steps=steps, restarts=1, eval_draws=eval_draws,
                                            seed=seed, n_classes=int(model(x[:1]).shape[1])))
    data = {"images": tensors_sha256(x), "labels": tensors_sha256(y)}  # rows are keyed on the data too
    refuse_foreign_rows(folder, [], "give another out folder", data_sha256=data)  # the command line's refusal
    if progress:
        tqdm.write(planned_cost(wrapped, factories, eps, len(x)), file=sys.stderr)
    rows: list[WhiteboxRow] = []
    for factory in factories:
        for norm, budgets in eps.items():
            rows += run_sweep([target], factory, [norm], list(budgets), x.detach().cpu(), y.detach().cpu(), folder,
                              dataset="user", examples=Examples(), seed=seed, batch_size=batch_size,
                              progress=progress, data_sha256=data)
    if out is not None:
        write_report(folder, preset="benchmark", dataset="user")
    return rows
