"""Refinement activity as a library call: for every JEM-k defense (JEM-0 included, for its clean accuracy), what
its chain does to clean test images and to an attack's candidates (:func:`robust_jem.activity.refinement_activity`),
one typed row each through the pipeline. The report reads it beside the JEM-k verdicts: an inactive refinement (fewer
than 1 % of predictions changed) cannot be the reason a JEM-k is, or is not, more robust than JEM-0. The candidates
are the worst point per example of a white-box attack on that same JEM-k (``attack`` at each ``(norm, ε)`` of
``candidates``), so the table says whether the chain moves adversarial inputs more than clean ones, next to the ε
attacked."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attacks import pipeline
from attacks.pipeline import Evaluation, Unit
from attacks.rows import ActivityRow
from attacks.target import Target
from robust_jem.activity import refinement_activity
from robust_jem.config import ENERGY_OBJECTIVES
from robust_jem.errors import UserError

from .jobs import check_budgets, data_hashes, prepare_out, subset
from .settings import PGDSettings
from .targets import Chain, build_targets, load_checkpoints

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivityJob:
    """Refinement activity of every JEM-k of ``chain`` on the first ``n_examples`` test images, and on the
    candidates of ``attack`` (full gradients, against that JEM-k) for the first ``n_candidates`` of them at each
    ``(norm, ε)`` of ``candidates``."""

    checkpoints: tuple[str, ...]
    chain: Chain = Chain((1, 10))
    n_examples: int = 1000
    batch_size: int = 250
    seed: int = 0
    candidates: tuple[tuple[str, float], ...] = ()  # (norm, ε) at which the attack's candidates are refined too
    attack: PGDSettings = PGDSettings(steps=10, eot=1)
    n_candidates: int = 50


class ActivityEvaluation(Evaluation[ActivityRow]):
    """One row per refined defense, computed in one piece."""

    row_type = ActivityRow
    code = ("robust_jem/activity.py", "robust_jem/refined.py", "robust_jem/sgld.py", "infra/energy.py")

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, dataset: str, batch_size: int, seed: int,
                 candidates: tuple[tuple[str, float], ...] = (), attack: PGDSettings = PGDSettings(),
                 n_candidates: int = 50) -> None:
        self.x, self.y, self.dataset, self.batch_size, self.seed = x, y, dataset, batch_size, seed
        self.candidates, self.attack, self.n_candidates = candidates, attack, n_candidates

    def identity(self, target: Target) -> dict[str, Any]:
        """The defense only: the activity does not depend on how an attacker would differentiate it."""
        return target.fields(attacker=False)

    def units(self, target: Target) -> list[Unit]:
        def compute() -> dict[str, dict[str, Any]]:
            rc = target.scorer
            a = refinement_activity(rc.model, rc.refinement, self.x, self.y, seed=self.seed,
                                    batch_size=self.batch_size, purifier=rc.purifier)
            log.info("activity %s: moves images %.3g (L2) / %.3g (L∞), energy %.3g -> %.3g, changes %.1f %% of "
                     "predictions vs bare%s", target.label, a.displacement_l2, a.displacement_linf, a.energy_start,
                     a.energy_end, 100 * a.changed_vs_bare, " (inactive)" if a.inactive else "")
            return {"row": {**a.fields(), "dataset": self.dataset, "seed": self.seed}}

        units = [Unit.whole(f"{target.label} activity", {"row": {"n": len(self.y), "seed": self.seed}}, compute)]
        return units + [self._on_candidates(target, norm, eps) for norm, eps in self.candidates]

    def _on_candidates(self, target: Target, norm: str, eps: float) -> Unit:
        """The activity on the worst candidate per example of ``attack`` against this JEM-k at (norm, ε)."""
        atk = self.attack.factory(10, self.seed)(target.model, norm, eps)
        atk.scorer = target.scorer
        inputs = f"{atk.name} {norm} ε={eps:g}"
        x, y = self.x[:self.n_candidates], self.y[:self.n_candidates]

        def compute() -> dict[str, dict[str, Any]]:
            cand = torch.cat([atk(x[i:i + 25], y[i:i + 25].to(x.device), stream=i).x_adv for i in range(0, len(y), 25)])
            rc = target.scorer
            a = refinement_activity(rc.model, rc.refinement, cand, y, seed=self.seed, batch_size=self.batch_size,
                                    purifier=rc.purifier)
            log.info("activity %s on %s candidates: moves them %.3g (L2) / %.3g (L∞), changes %.1f %% of predictions "
                     "vs bare", target.label, inputs, a.displacement_l2, a.displacement_linf, 100 * a.changed_vs_bare)
            return {"row": {**a.fields(), "dataset": self.dataset, "seed": self.seed, "inputs": inputs, "norm": norm,
                            "eps": eps}}

        return Unit.whole(f"{target.label} activity on {inputs} candidates",
                          {"row": {"n": len(y), "seed": self.seed, "inputs": inputs, "attack": repr(atk)}}, compute)


def activity(job: ActivityJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
             progress: bool = True) -> list[ActivityRow]:
    """Run ``job``: rows of kind ``activity``, one per JEM-k of the chain (baselines have none; JEM-0 moves nothing)."""
    ds, loaded = load_checkpoints(job.checkpoints, device, data_dir)
    out = prepare_out(out)
    targets = [t for t in build_targets(loaded, job.chain, ("full",), seed=job.seed)
               if t.defense["objective"] in ENERGY_OBJECTIVES or t.defense.get("purifier")]  # JEM-0 too
    if not targets:
        raise UserError("no refined defense to measure: it needs a JEM checkpoint")
    data = subset(ds, job.n_examples)
    for norm, eps in job.candidates:
        check_budgets([norm], [eps], ds.shape)
    evaluation = ActivityEvaluation(data.x.to(device), data.labels, dataset=ds.name, batch_size=job.batch_size,
                                    seed=job.seed, candidates=job.candidates, attack=job.attack,
                                    n_candidates=job.n_candidates)
    return pipeline.run(evaluation, targets, out, data_sha256=data_hashes(ds), progress=progress)


