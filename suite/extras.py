"""The evaluations beside the attacks, one library call each: calibration, OOD detection, randomized-smoothing
certificates, SGLD samples and the JEM's EBM health. Like :mod:`suite.evaluate`, each takes a typed job and a run
folder and returns its rows."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from attacks import calibration as cal
from attacks import ood as ood_lib
from attacks import pipeline
from attacks.pipeline import Evaluation, Unit
from attacks.rows import CalibrationRow, CertificateRow, HealthRow, OODRow, SampleRow
from attacks.smoothing import SmoothedClassifier, certify_summary, empirical_l2
from attacks.target import Target
from infra.io import atomic_write
from infra.provenance import file_sha256
from infra.randomness import derive_seed, generator
from robust_jem.data import DATASETS, ImageDataset, load_dataset
from robust_jem.errors import UserError
from robust_jem.refined import Refinement

from .jobs import data_hashes, prepare_out, subset
from .targets import Chain, build_targets, load_checkpoints, target_for

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationJob:
    """ECE / NLL / Brier of every defense on the first ``n_examples`` test images."""

    checkpoints: tuple[str, ...]
    chain: Chain = Chain()
    bins: int = cal.DEFAULT_BINS
    n_examples: int | None = 2000
    batch_size: int = 250
    seed: int = 0


class CalibrationEvaluation(Evaluation[CalibrationRow]):
    """ECE / NLL / Brier of each defense on ``x``: one row and one reliability diagram per defense (one piece)."""

    row_type = CalibrationRow
    code = ("attacks/calibration.py",)

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, bins: int, batch_size: int, seed: int, dataset: str,
                 out: Path) -> None:
        if bins < 1:
            raise UserError(f"the number of bins must be at least 1, got {bins}")
        self.x, self.y, self.bins, self.batch_size, self.seed, self.dataset, self.out = x, y, bins, batch_size, seed, \
            dataset, out

    def units(self, target: Target) -> list[Unit]:
        def compute() -> dict[str, dict[str, Any]]:
            t0 = time.monotonic()
            logits = cal.predict_logits(target.scorer, self.x, self.batch_size)
            stats = cal.calibration_from_logits(logits, self.y, self.bins)
            cal.reliability_diagram(stats, self.out / f"reliability-{_slug(target.label)}.png",
                                    title=f"{target.label} on {self.dataset} test")
            log.info("calibration %s: acc %.4f ECE %.4f NLL %.4f Brier %.4f", target.label, stats.accuracy, stats.ece,
                     stats.nll, stats.brier)
            return {"row": {**cal.calibration_fields(stats), "dataset": self.dataset, "n_examples": len(self.y),
                            "seed": self.seed, "wall_s": time.monotonic() - t0}}

        return [Unit.whole(f"{target.label} calibration",
                           {"row": {"n_bins": self.bins, "n_examples": len(self.y), "seed": self.seed}}, compute)]

    def finish(self, rows: list[CalibrationRow], out: Path) -> None:
        if len(rows) > 1:
            panels = [(r.model, cal.CalibrationStats(**{f: getattr(r, f) for f in cal.STATS_FIELDS})) for r in rows]
            cal.reliability_diagram(panels, out / "reliability.png", title=f"reliability, {self.bins} bins")


def calibrate(job: CalibrationJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
              progress: bool = True) -> list[CalibrationRow]:
    """Run ``job``: rows of kind ``calibration``, ``reliability-<label>.png`` per defense, ``reliability.png``."""
    ds, loaded = load_checkpoints(job.checkpoints, device, data_dir)
    targets = build_targets(loaded, job.chain, ("full",), seed=job.seed)
    out = prepare_out(out)
    data = subset(ds, job.n_examples)
    evaluation = CalibrationEvaluation(data.x.to(device), data.labels, bins=job.bins, batch_size=job.batch_size,
                                       seed=job.seed, dataset=ds.name, out=out)
    return pipeline.run(evaluation, targets, out, data_sha256=data_hashes(ds), progress=progress)


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


# ------------------------------------------------------------------------------------------------
# OOD detection
# ------------------------------------------------------------------------------------------------
EXTERNAL_OOD = ("svhn", "cifar10", "cifar100", "fashion-mnist")
OOD_SETS = ood_lib.SYNTHETIC + ("heldout",) + EXTERNAL_OOD
DEFAULT_OOD_SETS = ood_lib.SYNTHETIC + ("svhn", "cifar10", "cifar100")


@dataclass(frozen=True)
class OODJob:
    """OOD detection by log p(x), max softmax and gradient norm of each bare network."""

    checkpoints: tuple[str, ...]
    in_set: str | None = None
    out_sets: tuple[str, ...] = DEFAULT_OOD_SETS
    n_examples: int | None = 1000
    tpr: float = 0.95
    batch_size: int = 250
    seed: int = 0


def build_ood_sets(names: Sequence[str], data: ImageDataset, seed: int,
                   data_dir: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """OOD image sets (same count and shape as ``data``), what was converted, and what was skipped (why)."""
    n = len(data)
    sets: dict[str, torch.Tensor] = {}
    conversions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name in names:
        g = generator(derive_seed(seed, "ood", name))
        if name in ood_lib.SYNTHETIC:
            sets[name] = ood_lib.synthetic_ood(name, data.x, g)
            conversions[name] = "none"
        elif name == "heldout":
            skipped[name] = f"not meaningful: the model was trained on all {len(data.classes)} classes of {data.name}"
        elif name in EXTERNAL_OOD:
            if name == data.name:
                skipped[name] = "same as the in-distribution set"
                continue
            try:
                other = load_dataset(name, "test", data_dir)
            except UserError as exc:
                skipped[name] = str(exc)
                continue
            take = torch.randperm(len(other), generator=g)[:n]
            x, how = ood_lib.match_shape(other.x[take] if len(other) > n else other.x, data.shape)
            sets[name], conversions[name] = x, how
        else:
            raise UserError(f"unknown OOD set {name!r}; choose from {', '.join(OOD_SETS)}")
    for name, why in skipped.items():
        log.warning("OOD set %s skipped: %s", name, why)
    return sets, conversions, skipped


class OODEvaluation(Evaluation[OODRow]):
    """OOD detection by each bare network: one row per (OOD set, score), histograms per network (one piece)."""

    row_type = OODRow
    code = ("attacks/ood.py", "infra/energy.py")

    def __init__(self, x_in: torch.Tensor, sets: dict[str, torch.Tensor], conversions: dict[str, str], *,
                 in_set: str, tpr: float, batch_size: int, seed: int, out: Path) -> None:
        self.x_in, self.sets, self.conversions, self.in_set = x_in, sets, conversions, in_set
        self.tpr, self.batch_size, self.seed, self.out = tpr, batch_size, seed, out

    def units(self, target: Target) -> list[Unit]:
        device = self.x_in.device

        def compute() -> dict[str, dict[str, Any]]:
            t0 = time.monotonic()
            raw_in = ood_lib.ood_scores(target.scorer, self.x_in, self.batch_size)
            raw_out = {name: ood_lib.ood_scores(target.scorer, x.to(device), self.batch_size)
                       for name, x in self.sets.items()}
            wall = time.monotonic() - t0
            rows = {}
            for name, raw in raw_out.items():
                metrics = ood_lib.ood_metrics(raw_in, raw, self.tpr)
                log.info("OOD %s vs %s: %s", target.label, name,
                         ", ".join(f"{s} AUROC {m['auroc']:.3f}" for s, m in metrics.items()))
                for score, m in metrics.items():
                    rows[f"{name}/{score}"] = {**m, "out_set": name, "score": score, "in_set": self.in_set,
                                               "n_in": len(self.x_in), "n_out": int(len(next(iter(raw.values())))),
                                               "conversion": self.conversions[name], "seed": self.seed,
                                               "wall_s": wall}
            ood_lib.ood_histograms(raw_in, raw_out, self.out / f"ood-{_slug(target.label)}.png",
                                   title=f"{target.label}: {self.in_set} test vs OOD sets",
                                   in_label=f"{self.in_set} (in)")
            return rows

        names = {f"{name}/{score}": {"out_set": name, "score": score, "n_in": len(self.x_in), "seed": self.seed,
                                     "tpr": self.tpr}
                 for name in self.sets for score in ood_lib.SCORES}
        return [Unit.whole(f"{target.label} OOD", names, compute)]


def ood(job: OODJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Run ``job``: rows of kind ``ood``, ``ood-<label>.png`` histograms and ``ood.json``; returns the summary.

    The scores are properties of the density, so each checkpoint is evaluated as its bare network
    (``JEM-bare``, ``CE`` ...), never through a chain.
    """
    bad = [s for s in job.out_sets if s not in OOD_SETS]
    if bad or not job.out_sets:
        raise UserError(f"unknown OOD set(s) {', '.join(bad) or '(none)'}; choose from {', '.join(OOD_SETS)}")
    if job.in_set is not None and job.in_set not in DATASETS:
        raise UserError(f"unknown in-distribution set {job.in_set!r}; choose from {', '.join(DATASETS)}")
    if not 0 < job.tpr <= 1:
        raise UserError(f"the true-positive rate must be in (0, 1], got {job.tpr}")
    ds, loaded = load_checkpoints(job.checkpoints, device, data_dir, dataset=job.in_set)
    out = prepare_out(out)
    data = subset(ds, job.n_examples)
    sets, conversions, skipped = build_ood_sets(list(job.out_sets), data, job.seed, data_dir)
    targets = [target_for(c, Refinement.bare()) for c in loaded]
    evaluation = OODEvaluation(data.x.to(device), sets, conversions, in_set=ds.name, tpr=job.tpr,
                               batch_size=job.batch_size, seed=job.seed, out=out)
    rows = pipeline.run(evaluation, targets, out, data_sha256=data_hashes(ds), progress=progress)
    summary: dict[str, Any] = {"scores": ood_lib.SCORE_DOC, "tpr": job.tpr, "models": {}}
    for c, t in zip(loaded, targets):
        mine = [r for r in rows if r.defense_id == t.defense_id]
        table: dict[str, Any] = {}
        for r in mine:
            table.setdefault(r.out_set, {})[r.score] = {"auroc": r.auroc, "fpr_at_tpr": r.fpr_at_tpr, "tpr": r.tpr,
                                                        "in_mean": r.in_mean, "out_mean": r.out_mean,
                                                        "direction": r.direction}
        summary["models"][t.label] = {"checkpoint": c.path, "defense_id": t.defense_id, "objective": c.objective,
                                      "in_set": ds.name, "n_in": len(data),
                                      "wall_s": max((r.wall_s or 0.0 for r in mine), default=0.0), "table": table,
                                      "conversions": conversions, "skipped": skipped}
    atomic_write(out / "ood.json", json.dumps(summary, indent=2, default=str))
    return summary


# ------------------------------------------------------------------------------------------------
# randomized smoothing
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CertifyJob:
    """Certified L2 accuracy of one Gaussian-smoothed bare classifier (Cohen et al. 2019), beside the empirical
    robust accuracy of the same smoothed classifier under an EOT L2 PGD attack at each of ``attack_radii``."""

    checkpoint: str
    sigma: float | None = None
    n: int = 1000
    n0: int = 100
    alpha: float = 0.001
    n_examples: int = 50
    radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    attack_radii: tuple[float, ...] = (0.5,)
    attack_steps: int = 10
    forward_draws: int = 8
    batch_size: int = 500
    seed: int = 0


class CertifyEvaluation(Evaluation[CertificateRow]):
    """Certified L2 accuracy of a Gaussian-smoothed classifier at each radius (Cohen et al. 2019), beside the
    empirical robust accuracy under an EOT L2 PGD attack at ``attack_radii``; ``certify.json`` holds the
    per-example radii. One piece: the certificate and the attack together."""

    row_type = CertificateRow
    code = ("attacks/smoothing.py", "infra/norms.py")

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, radii: Sequence[float], attack_radii: Sequence[float],
                 attack_steps: int, seed: int, dataset: str, out: Path) -> None:
        self.x, self.y, self.radii, self.attack_radii = x, y, list(radii), list(attack_radii)
        self.attack_steps, self.seed, self.dataset, self.out = attack_steps, seed, dataset, out

    def units(self, target: Target) -> list[Unit]:
        smoothed = target.model
        if not isinstance(smoothed, SmoothedClassifier):
            raise UserError(f"{target.label} is not a smoothed classifier")
        rows = {str(r): {"radius": float(r), "n_examples": len(self.y), "attack_steps": self.attack_steps,
                         "attack_radii": self.attack_radii} for r in self.radii}
        return [Unit.whole(f"certify {target.label}", rows, lambda: self._compute(target, smoothed))]

    def _compute(self, target: Target, smoothed: SmoothedClassifier) -> dict[str, dict[str, Any]]:
        x, y = self.x, self.y
        log.info("certify %s: %d images x (%d + %d) noise draws, then EOT-PGD at radii %s and %d draws per image each",
                 target.label, len(y), smoothed.n0, smoothed.n, self.attack_radii or "none", smoothed.n)
        t0 = time.monotonic()
        with torch.no_grad():
            base_acc = float((smoothed.base(x).argmax(1).cpu() == y).double().mean())
        cert = smoothed.certify(x)
        t_cert = time.monotonic() - t0
        summ = certify_summary(cert, y, self.radii)
        t1 = time.monotonic()
        empirical = {r["eps"]: r for r in (empirical_l2(smoothed, x, y.to(x.device), self.attack_radii,
                                                         steps=self.attack_steps, seed=self.seed,
                                                         progress=lambda m: log.info("certify: empirical %s", m))
                                           if self.attack_radii else [])}
        t_att = time.monotonic() - t1
        rows = {}
        for acc in summ["certified_accuracy"]:
            r = acc["radius"]
            row = dict(dataset=self.dataset, radius=r, certified_accuracy=acc["certified_accuracy"],
                       certified_ci_low=acc["ci_low"], certified_ci_high=acc["ci_high"],
                       abstain_rate=summ["abstain_rate"], mean_radius=summ["mean_radius"], acr=summ["acr"],
                       max_certifiable_radius=summ["max_certifiable_radius"], base_clean_accuracy=base_acc,
                       n_examples=summ["n_examples"], seed=self.seed, wall_s_certify=t_cert, wall_s_attack=t_att)
            e = empirical.get(r)
            if e is not None:
                row.update(empirical_robust_accuracy=e["robust_accuracy"], empirical_ci_low=e["ci_low"],
                           empirical_ci_high=e["ci_high"], attack=e["attack"], attack_steps=e["steps"],
                           attack_step_size=e["step_size"], eot_draws_per_step=e["eot_draws_per_step"])
                if e["robust_accuracy"] < acc["certified_accuracy"]:
                    row["sanity"] = "empirical robust accuracy below certified accuracy"
                    log.warning("certify: at radius %g the attack beats the certificate (%.3f < %.3f): a bug, or an "
                                "alpha-level failure of the Monte-Carlo bounds", r, e["robust_accuracy"],
                                acc["certified_accuracy"])
            rows[str(float(r))] = row
        atomic_write(self.out / "certify.json", json.dumps({
            "checkpoint": target.checkpoint, "model": target.label, "summary": summ,
            "empirical": list(empirical.values()), "sigma": smoothed.sigma, "n": smoothed.n, "n0": smoothed.n0,
            "alpha": smoothed.alpha, "base_clean_accuracy": base_acc, "prediction": cert.prediction.tolist(),
            "radius": cert.radius.tolist(), "label": y.tolist(), "pa_lower": np.asarray(cert.pa_lower).tolist(),
            "wall_s_certify": t_cert, "wall_s_attack": t_att}, indent=2, default=str))
        log.info("certify %s: certified acc %s; abstain %.3f; mean radius %.3f (%.1fs + attack %.1fs)", target.label,
                 ", ".join(f"r={a['radius']:g}: {a['certified_accuracy']:.3f}" for a in summ["certified_accuracy"]),
                 summ["abstain_rate"], summ["mean_radius"], t_cert, t_att)
        return rows


def certify(job: CertifyJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
            progress: bool = True) -> list[CertificateRow]:
    """Run ``job``: rows of kind ``certify`` (one per radius) and ``certify.json`` (per-example radii)."""
    ds, [c] = load_checkpoints([job.checkpoint], device, data_dir)
    cfg = c.info["config"]
    sigma = job.sigma
    if sigma is None:
        if c.objective != "gaussian-aug":
            raise UserError(f"{c.path} is a {c.objective} model; give the smoothing σ")
        sigma = cfg.sigma
    if c.objective != "gaussian-aug":
        log.warning("%s was trained with objective %s, not gaussian-aug: smoothing it at sigma %g is a weak "
                    "baseline", c.path, c.objective, sigma)
    elif abs(cfg.sigma - sigma) > 1e-9:
        log.warning("%s was trained with sigma %g, certifying at sigma %g", c.path, cfg.sigma, sigma)
    if job.attack_steps < 0 or not job.radii or any(r < 0 for r in list(job.radii) + list(job.attack_radii)):
        raise UserError("the attack steps, radii and attack radii must be non-negative (and radii non-empty)")
    attack_radii = sorted({float(r) for r in job.attack_radii}) if job.attack_steps > 0 else []
    radii = sorted({float(r) for r in job.radii} | set(attack_radii))
    base = target_for(c, Refinement.bare())
    smoothed = SmoothedClassifier(base.scorer, sigma, n=job.n, alpha=job.alpha, seed=job.seed, n0=job.n0,
                                  forward_draws=job.forward_draws, batch_size=job.batch_size)
    target = Target(f"{base.label} smoothed σ={sigma:g}", smoothed, {**base.defense, **smoothed.config()},
                    checkpoint=c.path, checkpoint_sha256=c.sha256, code=base.code)
    data = subset(ds, job.n_examples)
    out = prepare_out(out)
    evaluation = CertifyEvaluation(data.x.to(device), data.labels, radii=radii, attack_radii=attack_radii,
                                   attack_steps=job.attack_steps, seed=job.seed, dataset=ds.name, out=out)
    return pipeline.run(evaluation, [target], out, data_sha256=data_hashes(ds), progress=progress)


# ------------------------------------------------------------------------------------------------
# samples
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleJob:
    """SGLD samples of a JEM checkpoint (see :func:`robust_jem.sampling.draw_samples`)."""

    checkpoint: str
    classes: tuple[int, ...] | None = None
    steps: int = 100
    n: int = 5
    init: str = "uniform"
    step_size: float | None = None
    noise: float | None = None
    clamp: bool | None = None
    n_data: int = 500
    seed: int = 0


class SampleEvaluation(Evaluation[SampleRow]):
    """SGLD samples of a checkpoint (:func:`robust_jem.sampling.draw_samples`: grids and ``samples.json``) and one
    row of energy statistics per set of chains (data, starts, unconditional, each class, the replay buffer)."""

    row_type = SampleRow
    code = ("robust_jem/sampling.py", "robust_jem/sgld.py", "infra/energy.py")

    def __init__(self, job: SampleJob, *, classes: Sequence[int], has_buffer: bool, out: Path,
                 data_dir: str | None) -> None:
        self.job, self.classes, self.has_buffer, self.out, self.data_dir = job, list(classes), has_buffer, out, data_dir

    def units(self, target: Target) -> list[Unit]:
        job = self.job
        chains = [("data", None), ("start", None), ("unconditional", None)] + [("conditional", c) for c in self.classes]
        chains += [("buffer", None)] if self.has_buffer else []
        settings = {"steps": job.steps, "n": job.n, "init": job.init, "step_size": job.step_size, "noise": job.noise,
                    "clamp": job.clamp, "n_data": job.n_data, "seed": job.seed}
        names = {f"{chain}{'' if c is None else c}": {"chain": chain, "class": c, **settings} for chain, c in chains}
        return [Unit.whole(f"samples {target.label}", names, lambda: self._compute(target, chains))]

    def _compute(self, target: Target, chains: list[tuple[str, int | None]]) -> dict[str, dict[str, Any]]:
        from robust_jem.sampling import draw_samples

        job = self.job
        s = draw_samples(str(target.checkpoint), self.out, classes=self.classes, n=job.n, steps=job.steps,
                         step_size=job.step_size, noise=job.noise, init=job.init, seed=job.seed, n_data=job.n_data,
                         device=target.device, data_dir=self.data_dir, clamp=job.clamp)
        rows = {}
        for chain, c in chains:
            st = s[chain] if c is None else s["conditional"][str(c)]
            rows[f"{chain}{'' if c is None else c}"] = dict(
                chain=chain, target_class=c, seed=job.seed, steps=job.steps, sgld_step_size=s["step_size"],
                sgld_noise=s["noise"], sgld_clamp=s["clamp"], init=job.init, wall_s=s["sampling_wall_s"],
                dataset=s["dataset"], **st)
        return rows


def sample(job: SampleJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
           progress: bool = True) -> dict[str, Any]:
    """Run ``job`` into ``out``; returns the summary written to ``samples.json``."""
    ds, [c] = load_checkpoints([job.checkpoint], device, data_dir)
    k = len(ds.classes)
    classes = list(range(k)) if job.classes is None else list(job.classes)
    bad = [x for x in classes if not 0 <= x < k]
    if bad or not classes:
        raise UserError(f"classes must be in 0..{k - 1}, got {','.join(map(str, bad)) or 'nothing'}")
    out = prepare_out(out)
    evaluation = SampleEvaluation(job, classes=classes, has_buffer=bool(c.info.get("has_buffer")), out=out,
                                  data_dir=data_dir)
    pipeline.run(evaluation, [target_for(c, Refinement.bare())], out, data_sha256=data_hashes(ds), progress=progress)
    return json.loads((out / "samples.json").read_text())


@dataclass(frozen=True)
class HealthJob:
    """EBM health of a JEM checkpoint judged by another classifier (see :func:`robust_jem.health.health`)."""

    checkpoint: str
    judge: str
    n: int = 2000
    steps: int = 100
    per_class: int = 20
    threshold: float = 0.9
    seed: int = 0


class HealthEvaluation(Evaluation[HealthRow]):
    """EBM health (:func:`robust_jem.health.health`): one row, also written as ``health.json``."""

    row_type = HealthRow
    code = ("robust_jem/health.py", "robust_jem/sampling.py", "robust_jem/sgld.py", "infra/energy.py")

    def __init__(self, job: HealthJob, *, judge_sha256: str, out: Path, data_dir: str | None) -> None:
        self.job, self.judge_sha256, self.out, self.data_dir = job, judge_sha256, out, data_dir

    def units(self, target: Target) -> list[Unit]:
        job = self.job
        key = {"judge_sha256": self.judge_sha256, "n": job.n, "steps": job.steps, "per_class": job.per_class,
               "threshold": job.threshold, "seed": job.seed}
        return [Unit.whole(f"health {target.label}", {"row": key}, lambda: self._compute(target))]

    def _compute(self, target: Target) -> dict[str, dict[str, Any]]:
        from robust_jem.health import health

        job = self.job
        res = health(str(target.checkpoint), job.judge, n=job.n, steps=job.steps, per_class=job.per_class,
                     threshold=job.threshold, seed=job.seed, device=target.device, data_dir=self.data_dir)
        return {"row": {**res, "judge": str(job.judge), "judge_sha256": self.judge_sha256, "seed": job.seed}}

    def finish(self, rows: list[HealthRow], out: Path) -> None:
        atomic_write(out / "health.json", json.dumps(rows[-1].to_dict(), indent=1))


def ebm_health(job: HealthJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
               progress: bool = True) -> HealthRow:
    """Run ``job`` into ``out``; returns its row (also written to ``health.json``)."""
    ds, [c] = load_checkpoints([job.checkpoint], device, data_dir)
    if not c.info.get("has_buffer"):
        raise UserError(f"{c.path} has no replay buffer (objective {c.objective}): nothing to judge")
    out = prepare_out(out)
    judge_sha256 = file_sha256(job.judge)
    if judge_sha256 == c.sha256:
        raise UserError("the judge must be another model than the one judged")
    evaluation = HealthEvaluation(job, judge_sha256=judge_sha256, out=out, data_dir=data_dir)
    [row] = pipeline.run(evaluation, [target_for(c, Refinement.bare())], out, data_sha256=data_hashes(ds),
                         progress=progress)
    return row
