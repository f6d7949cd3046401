"""Escalation on survivors (AutoAttack's rule, taken further): after the cheap attacks, the examples still standing
in a cell meet stronger rounds until one breaks nothing new.

A cell is (defense, norm, ε) with the per-example worst case over every row already in the run folder but the
escalation rounds (:func:`attacks.checks.worst_case`, black-box rows included), read once. Each round attacks exactly
the survivors the rounds before it left (:meth:`Examples.of`; a round's rows cover exactly them, so the worst case
after it is its survivors minus what it broke) and writes one row per gradient mode, tagged
``escalation = {round, name}``; the headline counts it because every example it left out is already broken. The
rounds run in order; then the first round is repeated under new seeds while the previous round still broke
something, at most ``repeats`` times. A round that breaks nothing is the cell's convergence evidence, and the report
shows what each round broke.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from attacks.benchmark import Examples, run_sweep
from attacks.checks import load_side_files, worst_case
from attacks.common import eps_key
from attacks.rows import WhiteboxRow, of_kind, parse_row
from attacks.target import Target
from infra.randomness import derive_seed
from infra.records import ROWS, read_rows

from robust_jem.data import ImageDataset

from .jobs import check_budgets, data_hashes, prepare_out
from .settings import AdaptiveSettings, AutoAttackSettings, PGDSettings, budget_name
from .targets import Chain, build_targets, load_checkpoints

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Round:
    """One escalation round: the attack and the gradient modes it runs in (each on its own attack seed)."""

    attack: PGDSettings | AutoAttackSettings | AdaptiveSettings
    grad_modes: tuple[str, ...] = ("full",)

    @property
    def name(self) -> str:
        """Its real budget, e.g. ``AutoAttack-rand (APGD-CE+APGD-DLR 100 it, EOT 20)``."""
        return budget_name(self.attack)


@dataclass(frozen=True)
class EscalationJob:
    """Escalate on the survivors of every (defense, norm, ε) cell already in the run folder."""

    checkpoints: tuple[str, ...]
    norms: tuple[str, ...]
    eps: tuple[float, ...]
    rounds: tuple[Round, ...]
    chain: Chain = Chain()
    repeats: int = 1
    seed: int = 0
    batch_size: int | None = None


def survivors(rows: list[Any], side: dict[str, dict[str, Any]]) -> dict[tuple[str, str, float], list[int]]:
    """Per cell (defense, norm, ε key), the examples still robust under every attack in ``rows`` except escalation
    rounds (so a rerun finds the same survivors, hence the same row keys, and skips what is done)."""
    return {(c["subject"], c["norm"], eps_key(c["eps"])): [i for i, ok in zip(c["example_indices"], c["correct"]) if ok]
            for c in worst_case([r for r in rows if not getattr(r, "escalation", None)], side)}


def escalate(job: EscalationJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
             progress: bool = True) -> list[WhiteboxRow]:
    """Run ``job``: rounds on each cell's survivors; returns the rounds' rows."""
    if not job.rounds:
        return []
    ds, loaded = load_checkpoints(job.checkpoints, device, data_dir)
    check_budgets(job.norms, job.eps, ds.shape)
    out = prepare_out(out)
    modes = tuple(dict.fromkeys(m for r in job.rounds for m in r.grad_modes))
    targets = build_targets(loaded, job.chain, modes, seed=job.seed)
    return escalate_targets(targets, job.rounds, job.norms, job.eps, ds, out, repeats=job.repeats, seed=job.seed,
                            batch_size=job.batch_size, progress=progress)


def escalate_targets(targets: Sequence[Target], rounds: Sequence[Round], norms: Sequence[str],
                     eps: Sequence[float], ds: ImageDataset, out: Path, *, repeats: int = 1, seed: int = 0,
                     batch_size: int | None = None, progress: bool = True) -> list[WhiteboxRow]:
    """Escalate on the survivors of every (target's defense, norm, ε) cell in ``out`` (see the module docstring);
    ``targets`` holds each defense once per gradient mode the rounds use."""
    by_defense: dict[str, dict[str, Target]] = {}
    for t in targets:
        by_defense.setdefault(t.defense_id, {})[t.fields()["grad_mode"]] = t
    plan = list(enumerate(rounds)) + [(len(rounds) + i, rounds[0]) for i in range(repeats)]
    raw = read_rows(out / ROWS)
    before = survivors([t for t in map(parse_row, raw) if t is not None], load_side_files(out, raw))
    made: list[WhiteboxRow] = []
    for defense, per_mode in by_defense.items():
        for norm in norms:
            for e in eps:
                broke_last = None
                standing = before.get((defense, norm, eps_key(e)), [])
                for index, rnd in plan:
                    if index >= len(rounds) and broke_last == 0:
                        break  # converged: the previous round broke nothing new
                    if not standing:
                        log.info("escalation %s %s ε=%g: no survivors left before round %d",
                                 next(iter(per_mode.values())).label, norm, e, index)
                        break
                    round_seed = derive_seed(seed, "escalation", index)
                    tag = {"round": index, "name": rnd.name + (" (repeat)" if index >= len(rounds) else "")}
                    rows: list[WhiteboxRow] = []
                    for mode in [m for m in rnd.grad_modes if m in per_mode]:  # a bare model has one mode
                        target = per_mode[mode]
                        if target.deterministic and getattr(rnd.attack, "name", "") == "fixed-noise-pgd":
                            continue  # no noise to fix: it would be the margin round again
                        rows += run_sweep([target], rnd.attack.factory(len(ds.classes), derive_seed(round_seed, mode)),
                                          [norm], [e], ds.images, ds.labels, out, dataset=ds.name,
                                          examples=Examples.of(standing), seed=seed, batch_size=batch_size,
                                          progress=progress, data_sha256=data_hashes(ds), tag=tag)
                    if not rows:
                        continue
                    broken = {i for r in rows for i, c in zip(r.example_indices, r.correct) if not c}
                    broke_last = len(broken)
                    log.info("escalation %s %s ε=%g round %d (%s): %d of %d survivors broken", rows[0].model, norm,
                             e, index, rnd.name, broke_last, len(standing))
                    standing = [i for i in standing if i not in broken]  # the worst case after this round
                    made += rows
    return made


def rounds_of(rows: list[Any]) -> list[dict[str, Any]]:
    """The escalation record of a run: per (defense, norm, ε) and round, how many survivors it attacked and broke
    (over its gradient modes), in round order."""
    cells: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in of_kind(rows, WhiteboxRow):
        if not r.escalation:
            continue
        key = (r.subject, r.model, r.norm, round(r.eps, 6))
        rnd = cells.setdefault(key, {}).setdefault(int(r.escalation["round"]), {
            "name": r.escalation.get("name", ""), "attacked": set(), "broken": set(), "passes": 0, "wall_s": 0.0})
        rnd["attacked"] |= set(r.example_indices)
        rnd["broken"] |= {i for i, c in zip(r.example_indices, r.correct) if not c}
        rnd["passes"] += (r.passes_per_example or 0) * r.n
        rnd["wall_s"] += r.wall_s or 0.0
    out = []
    for (subject, model, norm, eps), rounds in sorted(cells.items()):
        for index, rnd in sorted(rounds.items()):
            out.append({"subject": subject, "model": model, "norm": norm, "eps": eps, "round": index,
                        "name": rnd["name"], "attacked": len(rnd["attacked"]), "broken": len(rnd["broken"]),
                        "passes": rnd["passes"], "wall_s": round(rnd["wall_s"], 1)})
    return out
