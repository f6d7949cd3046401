"""One library call per command: each takes a typed job, evaluates its defenses, writes rows and files into
one run folder, and returns the rows. The CLI and the study call these and nothing else.

Every job is a frozen dataclass, so a study stage *is* its job (recorded as JSON in ``stages.jsonl``), and
a stage is done when the rows its job produces exist under their current keys (every call skips those).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attacks.benchmark import Examples, run_blackbox, run_sweep
from attacks.black import BlackboxConfig
from attacks import pipeline
from attacks.distal import DistalConfig, DistalEvaluation
from attacks.rows import BlackboxRow, DistalRow, WhiteboxRow
from attacks.autoattack import autoattack_factory
from attacks.verdict import EVAL_DRAWS
from attacks.white import pgd_factory, transfer_factory
from infra.precision import resolve_bf16
from robust_jem.errors import UserError
from robust_jem.images import save_grid
from robust_jem.refined import Refinement

# the evaluations beside the attacks (re-exported: the CLI and the study import every job from here)
from .activity import ActivityJob, activity  # noqa: F401
from .extras import (CalibrationJob, CertifyJob, HealthJob, OODJob, SampleJob, calibrate, certify,  # noqa: F401
                     ebm_health, ood, sample)
from .jobs import (check_budgets, data_hashes, job_json, prepare_out, refuse_foreign_rows,  # noqa: F401
                   warn_if_wrong_data)
from .targets import Chain, build_targets, load_checkpoints, split, target_for

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# white-box: PGD and AutoAttack
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PGDSettings:
    """torchattacks PGD / PGDL2 / EOTPGD (+ our EOTPGDL2): steps, α (None: 2.5·ε/steps), EOT (``auto``: 20 on a
    randomized model, 1 on a deterministic one), restarts."""

    steps: int = 10
    step_size: float | None = None
    eot: int | str = "auto"
    restarts: int = 1
    eval_draws: int = EVAL_DRAWS

    def factory(self, n_classes: int, seed: int) -> Any:
        return pgd_factory(steps=self.steps, step_size=self.step_size, restarts=self.restarts, eot=self.eot,
                           eval_draws=self.eval_draws, seed=seed)


@dataclass(frozen=True)
class AutoAttackSettings:
    """AutoAttack components (torchattacks): ``rand`` (APGD-CE + APGD-DLR with EOT), ``standard``, ``auto``."""

    attacks: tuple[str, ...] | None = None
    version: str = "auto"
    steps: int = 100
    eot: int | None = None
    n_queries: int = 5000
    restarts: int = 1
    eval_draws: int = EVAL_DRAWS

    def factory(self, n_classes: int, seed: int) -> Any:
        return autoattack_factory(attacks=self.attacks, version=self.version, steps=self.steps, eot=self.eot,
                                  restarts=self.restarts, eval_draws=self.eval_draws, seed=seed,
                                  n_queries=self.n_queries, n_classes=n_classes)


@dataclass(frozen=True)
class TransferSettings:
    """Transfer: PGD (EOT auto) on the bare network of ``source`` (a checkpoint), replayed on every target."""

    source: str
    steps: int = 50
    restarts: int = 2
    eval_draws: int = EVAL_DRAWS

    def factory(self, n_classes: int, seed: int) -> Any:
        raise TypeError("a transfer attack needs its surrogate loaded: use whitebox()")


@dataclass(frozen=True)
class WhiteboxJob:
    """White-box attacks on every (defense, norm, ε)."""

    checkpoints: tuple[str, ...]
    norms: tuple[str, ...]
    eps: tuple[float, ...]
    attack: PGDSettings | AutoAttackSettings | TransferSettings = PGDSettings()
    chain: Chain = Chain()
    grad_modes: tuple[str, ...] = ("full",)
    n_examples: int | None = None
    example_rule: str = "first"
    batch_size: int | None = None
    seed: int = 0
    bf16: bool = False
    compile: bool = False
    recheck: AutoAttackSettings | None = None  # a stronger attack every row's survivors then meet


def stronger(settings: PGDSettings | AutoAttackSettings) -> AutoAttackSettings:
    """The larger budget a command's survivors meet by default: APGD with the margin-type DLR loss (and CE for an
    AutoAttack run), 4x the steps (at least 20), one more restart, EOT 20 on a randomized model (or the run's own
    EOT when given), the same verdict."""
    eot = settings.eot if isinstance(settings.eot, int) else None
    names = ("apgd-dlr",) if isinstance(settings, PGDSettings) else ("apgd-ce", "apgd-dlr")
    return AutoAttackSettings(attacks=names, steps=max(20, 4 * settings.steps), eot=eot,
                              restarts=settings.restarts + 1, eval_draws=settings.eval_draws)


def whitebox(job: WhiteboxJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
             progress: bool = True) -> list[WhiteboxRow]:
    """Run ``job`` (PGD or AutoAttack) and return its rows (one per defense, norm and ε).

    Under ``torchrun`` each rank loads the models on its own device and attacks its share of each row's
    batches; rank 0 writes ``rows.jsonl``.
    """
    if not isinstance(job.attack, TransferSettings):
        job.attack.factory(10, job.seed)  # bad budgets fail before anything is loaded
    if job.compile and "full" in job.grad_modes and any(k > 0 for k in job.chain.sgld_steps):
        raise UserError("--compile needs --grad-mode bpda when --sgld-steps > 0 (the full-gradient chain is a "
                        "double backward, which torch.compile does not support)")
    ds, loaded = load_checkpoints(job.checkpoints, device, data_dir)
    Examples(job.n_examples, job.example_rule, job.seed).validate(len(ds))
    check_budgets(job.norms, job.eps, ds.shape)
    out = prepare_out(out)  # before any work: a bad --out is one line, not a traceback after the first batch
    bf16 = resolve_bf16(job.bf16, device, "the attack")
    targets = build_targets(loaded, job.chain, job.grad_modes, seed=job.seed, bf16=bf16, compile=job.compile)
    if isinstance(job.attack, TransferSettings):
        _, [src] = load_checkpoints([job.attack.source], device, data_dir, dataset=ds.name)
        surrogate = target_for(src, Refinement.bare())
        factory = transfer_factory(surrogate.scorer, surrogate.label, surrogate.defense_id, steps=job.attack.steps,
                                   restarts=job.attack.restarts, eval_draws=job.attack.eval_draws, seed=job.seed)
    else:
        factory = job.attack.factory(len(ds.classes), job.seed)
    rows = run_sweep(targets, factory, list(job.norms), list(job.eps), ds.images, ds.labels, Path(out),
                     dataset=ds.name, examples=Examples(job.n_examples, job.example_rule, job.seed), seed=job.seed,
                     batch_size=job.batch_size, progress=progress, data_sha256=data_hashes(ds))
    warn_if_wrong_data(rows, loaded)
    if job.recheck is not None:
        rows += recheck_survivors(rows, targets, job.recheck.factory(len(ds.classes), job.seed), ds, Path(out),
                                  seed=job.seed, batch_size=job.batch_size, progress=progress)
    return rows


def recheck_survivors(rows: list[WhiteboxRow], targets: list[Any], factory: Any, ds: Any, out: Path, *, seed: int,
                      batch_size: int | None, progress: bool) -> list[WhiteboxRow]:
    """Attack each row's survivors (examples still robust, ε > 0) with ``factory``: one row each, on exactly those
    examples (:meth:`Examples.of`); the headline's worst case then counts what it broke (escalation on survivors)."""
    by_id = {(t.defense_id, t.fields()["grad_mode"]): t for t in targets}
    out_rows: list[WhiteboxRow] = []
    for r in rows:
        standing = [i for i, c in zip(r.example_indices, r.correct) if c]
        if r.eps > 0 and standing:
            out_rows += run_sweep([by_id[(r.defense_id, r.grad_mode)]], factory, [r.norm], [r.eps], ds.images,
                                  ds.labels, out, dataset=ds.name, examples=Examples.of(standing), seed=seed,
                                  batch_size=batch_size, progress=progress, data_sha256=data_hashes(ds))
    return out_rows


# ------------------------------------------------------------------------------------------------
# black-box: foolbox Boundary / Pointwise
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlackboxJob:
    """A foolbox minimisation attack on every defense (the first ``n_examples`` test images)."""

    checkpoints: tuple[str, ...]
    config: BlackboxConfig
    chain: Chain = Chain()
    n_examples: int = 100
    eps_grid: tuple[float, ...] | None = None
    l0_grid: tuple[int, ...] | None = None


def blackbox(job: BlackboxJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
             progress: bool = True) -> list[BlackboxRow]:
    """Run ``job`` and return its rows (one per defense and norm, each with its whole ε curve)."""
    cfg = job.config.validate()
    ds, loaded = load_checkpoints(job.checkpoints, device, data_dir)
    out = prepare_out(out)
    targets = build_targets(loaded, job.chain, ("full",), seed=cfg.seed)  # no gradients used
    n = min(job.n_examples, len(ds))
    x, y = ds.batch(slice(0, n))
    grids = {k: v for k, v in (("l2", job.eps_grid), ("l0", job.l0_grid)) if v}
    rows: list[BlackboxRow] = []
    for t in targets:
        rows += run_blackbox(t, x.to(device), y.to(device), cfg, out_dir=Path(out), examples=f"test[0:{n}]",
                             dataset=ds.name, eps_grids=grids, indices=range(n), progress=progress,
                             data_sha256=data_hashes(ds))
    return rows


# ------------------------------------------------------------------------------------------------
# distal adversarials
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistalJob:
    """Distal adversarials from noise, through every defense."""

    checkpoints: tuple[str, ...]
    config: DistalConfig = DistalConfig()
    chain: Chain = Chain()
    grad_modes: tuple[str, ...] = ("full",)
    n_real: int = 1000


def distal(job: DistalJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
           progress: bool = True) -> list[DistalRow]:
    """Run ``job``: rows of kind ``distal`` (one per defense and start kind) and a grid PNG per defense."""
    cfg = job.config.validate()
    ds, loaded = load_checkpoints(job.checkpoints, device, data_dir)
    targets = build_targets(loaded, job.chain, job.grad_modes, seed=cfg.seed)
    bare = {c.path: c.model for c in loaded}
    out = prepare_out(out)
    evaluation = DistalEvaluation(
        n_classes=len(ds.classes), cfg=cfg, out_dir=out, dataset=ds.name,
        mean_image=split(ds.name, "train", None if data_dir is None else str(data_dir)).x.mean(0).to(device),
        real_images=ds.batch(slice(0, min(job.n_real, len(ds))))[0].to(device),
        density=lambda t: bare[str(t.checkpoint)], density_name="bare network (-energy of its logits)",
        save_grid=lambda imgs, path, nrow: save_grid(imgs, path, nrow=nrow, scale=4, row_labels=list(ds.classes)))
    return pipeline.run(evaluation, targets, out, data_sha256=data_hashes(ds), progress=progress)


JOB_TYPES = {WhiteboxJob: whitebox, BlackboxJob: blackbox, DistalJob: distal, CalibrationJob: calibrate,
             OODJob: ood, CertifyJob: certify, SampleJob: sample,
             HealthJob: ebm_health, ActivityJob: activity}


def run_job(job: Any, out: str | Path, *, device: torch.device, data_dir: str | None = None,
            progress: bool = True) -> Any:
    """Run any job of this module (dispatch on its type)."""
    try:
        fn = JOB_TYPES[type(job)]
    except KeyError:
        raise TypeError(f"not a job: {type(job).__name__}") from None
    return fn(job, out, device=device, data_dir=data_dir, progress=progress)


def job_record(job: Any) -> dict[str, Any]:
    """A job as JSON (its type and fields), for ``stages.jsonl``."""
    return {"job": type(job).__name__, **job_json(job)}
