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
from attacks.white import transfer_factory
from infra.precision import resolve_bf16
from infra.randomness import derive_seed
from robust_jem.errors import UserError
from robust_jem.images import save_grid
from robust_jem.refined import Refinement

# the evaluations beside the attacks (re-exported: the CLI and the study import every job from here)
from .activity import ActivityJob, activity  # noqa: F401
from .extras import (CalibrationJob, CertifyJob, HealthJob, OODJob, SampleJob, calibrate, certify,  # noqa: F401
                     ebm_health, ood, sample)
from .escalate import EscalationJob, Round, escalate  # noqa: F401
from .settings import AdaptiveSettings, AutoAttackSettings, PGDSettings, TransferSettings, stronger  # noqa: F401
from .jobs import (check_budgets, data_hashes, job_json, prepare_out, refuse_foreign_rows,  # noqa: F401
                   warn_if_wrong_data)
from .targets import Chain, build_targets, load_checkpoints, split, target_for

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# white-box: PGD and AutoAttack
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WhiteboxJob:
    """White-box attacks on every (defense, norm, ε)."""

    checkpoints: tuple[str, ...]
    norms: tuple[str, ...]
    eps: tuple[float, ...]
    attack: PGDSettings | AutoAttackSettings | TransferSettings | AdaptiveSettings = PGDSettings()
    chain: Chain = Chain()
    grad_modes: tuple[str, ...] = ("full",)
    n_examples: int | None = None
    example_rule: str = "first"
    batch_size: int | None = None
    seed: int = 0
    bf16: bool = False
    compile: bool = False
    recheck: AutoAttackSettings | None = None  # a stronger attack every row's survivors then meet


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

        def factory_for(seed: int) -> Any:
            return transfer_factory(surrogate.scorer, surrogate.label, surrogate.defense_id, steps=job.attack.steps,
                                    restarts=job.attack.restarts, eval_draws=job.attack.eval_draws, seed=seed)
    else:
        def factory_for(seed: int) -> Any:
            return job.attack.factory(len(ds.classes), seed)
    rows: list[WhiteboxRow] = []
    for mode in dict.fromkeys(t.fields()["grad_mode"] for t in targets):  # BPDA on its own attack seed
        rows += run_sweep([t for t in targets if t.fields()["grad_mode"] == mode], factory_for(attack_seed(job.seed, mode)),
                          list(job.norms), list(job.eps), ds.images, ds.labels, Path(out), dataset=ds.name,
                          examples=Examples(job.n_examples, job.example_rule, job.seed), seed=job.seed,
                          batch_size=job.batch_size, progress=progress, data_sha256=data_hashes(ds))
    warn_if_wrong_data(rows, loaded)
    if job.recheck is not None:
        rows += recheck_survivors(rows, targets, lambda mode: job.recheck.factory(len(ds.classes),
                                                                                attack_seed(job.seed, mode)),
                                  ds, Path(out), seed=job.seed, batch_size=job.batch_size, progress=progress)
    return rows


def attack_seed(seed: int, grad_mode: str) -> int:
    """The attack's seed in one gradient mode: the job's for full gradients, an independent one for BPDA, so the two
    modes' outcomes are not correlated by shared random starts (their comparison is a check)."""
    return seed if grad_mode == "full" else derive_seed(seed, "attack", grad_mode)


def recheck_survivors(rows: list[WhiteboxRow], targets: list[Any], factory_for: Any, ds: Any, out: Path, *, seed: int,
                      batch_size: int | None, progress: bool) -> list[WhiteboxRow]:
    """Attack each row's survivors (examples still robust, ε > 0) with ``factory``: one row each, on exactly those
    examples (:meth:`Examples.of`), with ``factory_for(grad_mode)``'s attack; the headline's worst case then counts
    what it broke (escalation on survivors)."""
    by_id = {(t.defense_id, t.fields()["grad_mode"]): t for t in targets}
    out_rows: list[WhiteboxRow] = []
    for r in rows:
        standing = [i for i, c in zip(r.example_indices, r.correct) if c]
        if r.eps > 0 and standing:
            out_rows += run_sweep([by_id[(r.defense_id, r.grad_mode)]], factory_for(r.grad_mode), [r.norm], [r.eps], ds.images,
                                  ds.labels, out, dataset=ds.name, examples=Examples.of(standing), seed=seed,
                                  batch_size=batch_size, progress=progress, data_sha256=data_hashes(ds))
    return out_rows


# ------------------------------------------------------------------------------------------------
# black-box: foolbox Boundary / Pointwise
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlackboxJob:
    """A foolbox minimisation attack on every defense (``n_examples`` test images: the first, or drawn with
    ``seed`` under the ``random`` rule, the white-box attacks' selection)."""

    checkpoints: tuple[str, ...]
    config: BlackboxConfig
    chain: Chain = Chain()
    n_examples: int = 100
    eps_grid: tuple[float, ...] | None = None
    l0_grid: tuple[int, ...] | None = None
    example_rule: str = "first"
    seed: int = 0  # of the example selection (``random``); the attack's seed is the config's


def blackbox(job: BlackboxJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
             progress: bool = True) -> list[BlackboxRow]:
    """Run ``job`` and return its rows (one per defense and norm, each with its whole ε curve)."""
    cfg = job.config.validate()
    ds, loaded = load_checkpoints(job.checkpoints, device, data_dir)
    out = prepare_out(out)
    targets = build_targets(loaded, job.chain, ("full",), seed=cfg.seed)  # no gradients used
    n = min(job.n_examples, len(ds))
    idx = Examples(n, job.example_rule, job.seed).indices(len(ds))
    x, y = ds.batch(torch.as_tensor(idx))
    described = f"test[0:{n}]" if job.example_rule == "first" else f"test, {n} drawn with seed {job.seed}"
    grids = {k: v for k, v in (("l2", job.eps_grid), ("l0", job.l0_grid)) if v}
    rows: list[BlackboxRow] = []
    for t in targets:
        rows += run_blackbox(t, x.to(device), y.to(device), cfg, out_dir=Path(out), examples=described,
                             dataset=ds.name, eps_grids=grids, indices=idx, progress=progress,
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
             HealthJob: ebm_health, ActivityJob: activity, EscalationJob: escalate}


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
