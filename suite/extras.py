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
from attacks.rows import CalibrationRow, CertificateRow
from attacks.smoothing import SmoothedClassifier, certify_summary, empirical_l2
from infra.io import atomic_write
from infra.randomness import derive_seed, generator
from infra.records import ROWS, append_row, done_keys, provenance_fields, read_rows, row_key
from robust_jem.data import DATASETS, ImageDataset, load_dataset
from robust_jem.errors import UserError
from robust_jem.refined import Refinement

from .jobs import prepare_out, subset
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


def calibrate(job: CalibrationJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
              progress: bool = True) -> list[CalibrationRow]:
    """Run ``job``: rows of kind ``calibration``, ``reliability-<label>.png`` per defense, ``reliability.png``."""
    if job.bins < 1:
        raise UserError(f"--bins must be at least 1, got {job.bins}")
    ds, loaded = load_checkpoints(job.checkpoints, device, data_dir)
    targets = build_targets(loaded, job.chain, ("full",), seed=job.seed)
    out = prepare_out(out)
    rows_path = out / ROWS
    done = done_keys(rows_path)
    data = subset(ds, job.n_examples)
    rows, panels = [], []
    for t in targets:
        key = row_key({"kind": "calibration", "target": t.fields(), "n_bins": job.bins, "n_examples": len(data),
                       "seed": job.seed})
        if key in done:
            rows += [CalibrationRow.from_dict(r) for r in read_rows(rows_path) if r.get("key") == key]
            continue
        t0 = time.monotonic()
        logits = cal.predict_logits(t.scorer, data.x.to(device), job.batch_size)
        stats = cal.calibration_from_logits(logits, data.labels, job.bins)
        wall = time.monotonic() - t0
        row = cal.calibration_row(stats, key=key, **t.fields(), checkpoint=t.checkpoint,
                                  **provenance_fields(None, device),
                                  dataset=ds.name, n_examples=len(data), seed=job.seed, wall_s=wall)
        append_row(rows_path, row)
        rows.append(CalibrationRow.from_dict(row))
        cal.reliability_diagram(stats, out / f"reliability-{_slug(t.label)}.png", title=f"{t.label} on {ds.name} test")
        panels.append((t.label, stats))
        log.info("calibration %s: acc %.4f ECE %.4f NLL %.4f Brier %.4f (%.1fs)", t.label, stats.accuracy,
                 stats.ece, stats.nll, stats.brier, wall)
    if len(panels) > 1:
        cal.reliability_diagram(panels, out / "reliability.png", title=f"reliability, {job.bins} bins")
    return rows


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
        raise UserError(f"unknown --in {job.in_set!r}; choose from {', '.join(DATASETS)}")
    if not 0 < job.tpr <= 1:
        raise UserError(f"--tpr must be in (0, 1], got {job.tpr}")
    ds, loaded = load_checkpoints(job.checkpoints, device, data_dir, dataset=job.in_set)
    out = prepare_out(out)
    rows_path = out / ROWS
    done = done_keys(rows_path)
    data = subset(ds, job.n_examples)
    sets, conversions, skipped = build_ood_sets(list(job.out_sets), data, job.seed, data_dir)
    summary: dict[str, Any] = {"scores": ood_lib.SCORE_DOC, "tpr": job.tpr, "models": {}}
    for c in loaded:
        t = target_for(c, Refinement.bare())
        prov = {"checkpoint": c.path, **provenance_fields(None, device)}
        t0 = time.monotonic()
        raw_in = ood_lib.ood_scores(t.scorer, data.x.to(device), job.batch_size)
        raw_out = {name: ood_lib.ood_scores(t.scorer, x.to(device), job.batch_size) for name, x in sets.items()}
        wall = time.monotonic() - t0
        table: dict[str, Any] = {}
        for name, raw in raw_out.items():
            metrics = ood_lib.ood_metrics(raw_in, raw, job.tpr)
            table[name] = metrics
            for row in ood_lib.ood_rows(metrics, name, **t.fields(), in_set=ds.name, **prov, n_in=len(data),
                                        n_out=int(len(next(iter(raw.values())))), conversion=conversions[name],
                                        seed=job.seed, tpr=job.tpr, wall_s=wall):
                row["key"] = row_key({"kind": "ood", "target": t.fields(), "out_set": name, "score": row["score"],
                                      "n_in": len(data), "seed": job.seed, "tpr": job.tpr})
                if row["key"] not in done:
                    append_row(rows_path, row)
        ood_lib.ood_histograms(raw_in, raw_out, out / f"ood-{_slug(t.label)}.png",
                               title=f"{t.label}: {ds.name} test vs OOD sets", in_label=f"{ds.name} (in)")
        summary["models"][t.label] = {"checkpoint": c.path, "defense_id": t.defense_id, "objective": c.objective,
                                      "in_set": ds.name, "n_in": len(data), "wall_s": wall, "table": table,
                                      "conversions": conversions, "skipped": skipped}
        for name, metrics in table.items():
            log.info("OOD %s vs %s: %s", t.label, name,
                     ", ".join(f"{s} AUROC {m['auroc']:.3f}" for s, m in metrics.items()))
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


def certify(job: CertifyJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
            progress: bool = True) -> list[CertificateRow]:
    """Run ``job``: rows of kind ``certify`` (one per radius) and ``certify.json`` (per-example radii)."""
    ds, [c] = load_checkpoints([job.checkpoint], device, data_dir)
    cfg = c.info["config"]
    sigma = job.sigma
    if sigma is None:
        if c.objective != "gaussian-aug":
            raise UserError(f"{c.path} is a {c.objective} model; pass --sigma")
        sigma = cfg.sigma
    if c.objective != "gaussian-aug":
        log.warning("%s was trained with objective %s, not gaussian-aug: smoothing it at sigma %g is a weak "
                    "baseline", c.path, c.objective, sigma)
    elif abs(cfg.sigma - sigma) > 1e-9:
        log.warning("%s was trained with sigma %g, certifying at sigma %g", c.path, cfg.sigma, sigma)
    if job.attack_steps < 0 or not job.radii or any(r < 0 for r in list(job.radii) + list(job.attack_radii)):
        raise UserError("--attack-steps, --radii and --attack-radii must be non-negative (and radii non-empty)")
    attack_radii = sorted({float(r) for r in job.attack_radii}) if job.attack_steps > 0 else []
    radii = sorted({float(r) for r in job.radii} | set(attack_radii))
    base = target_for(c, Refinement.bare())
    smoothed = SmoothedClassifier(base.scorer, sigma, n=job.n, alpha=job.alpha, seed=job.seed, n0=job.n0,
                                  forward_draws=job.forward_draws, batch_size=job.batch_size)
    data = subset(ds, job.n_examples)
    out = prepare_out(out)
    rows_path = out / ROWS
    prov = provenance_fields(c.path, device)
    label = f"{base.label} smoothed σ={sigma:g}"
    ident = {**base.fields(), "model": label, **smoothed.config()}
    key_fields = {"kind": "certify", "target": ident, "n_examples": len(data), "attack_steps": job.attack_steps,
                  "attack_radii": attack_radii}
    keys = {float(r): row_key({**key_fields, "radius": float(r)}) for r in radii}
    done = done_keys(rows_path)
    if all(k in done for k in keys.values()):
        log.info("certify: every radius is already in %s, skipped", rows_path)
        return [CertificateRow.from_dict(r) for r in read_rows(rows_path) if r.get("key") in set(keys.values())]
    x, y = data.x.to(device), data.labels
    log.info("certify %s: %d images x (%d + %d) noise draws, then EOT-PGD at radii %s and %d draws per image each",
             c.path, len(data), job.n0, job.n, attack_radii or "none", job.n)
    t0 = time.monotonic()
    with torch.no_grad():
        base_acc = float((base.scorer(x).argmax(1).cpu() == y).double().mean())
    cert = smoothed.certify(x)
    t_cert = time.monotonic() - t0
    summ = certify_summary(cert, y, list(radii))
    empirical: dict[float, dict] = {}
    t1 = time.monotonic()
    for r in (empirical_l2(smoothed, x, y.to(device), attack_radii, steps=job.attack_steps, seed=job.seed,
                           progress=lambda m: log.info("certify: empirical %s", m)) if attack_radii else []):
        empirical[r["eps"]] = r
    t_att = time.monotonic() - t1
    rows = []
    for acc in summ["certified_accuracy"]:
        r = acc["radius"]
        row = {"kind": "certify", **ident, "dataset": ds.name, **prov, "radius": r,
               "certified_accuracy": acc["certified_accuracy"], "certified_ci_low": acc["ci_low"],
               "certified_ci_high": acc["ci_high"], "abstain_rate": summ["abstain_rate"],
               "mean_radius": summ["mean_radius"], "acr": summ["acr"],
               "max_certifiable_radius": summ["max_certifiable_radius"], "base_clean_accuracy": base_acc,
               "n_examples": summ["n_examples"], "seed": job.seed, "wall_s_certify": t_cert, "wall_s_attack": t_att}
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
        row["key"] = keys[float(r)]
        if row["key"] in done:
            continue
        append_row(rows_path, row)
        rows.append(CertificateRow.from_dict(row))
    atomic_write(out / "certify.json", json.dumps({
        "checkpoint": c.path, "model": label, "summary": summ, "empirical": list(empirical.values()),
        "sigma": sigma, "n": job.n, "n0": job.n0, "alpha": job.alpha, "base_clean_accuracy": base_acc,
        "prediction": cert.prediction.tolist(), "radius": cert.radius.tolist(), "label": y.tolist(),
        "pa_lower": np.asarray(cert.pa_lower).tolist(), "wall_s_certify": t_cert, "wall_s_attack": t_att},
        indent=2, default=str))
    log.info("certify %s (sigma %g, n %d): certified acc %s; abstain %.3f; mean radius %.3f (%.1fs + attack %.1fs)",
             label, sigma, job.n, ", ".join(f"r={a['radius']:g}: {a['certified_accuracy']:.3f}"
                                             for a in summ["certified_accuracy"]),
             summ["abstain_rate"], summ["mean_radius"], t_cert, t_att)
    return rows


# ------------------------------------------------------------------------------------------------
# samples
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleJob:
    """SGLD samples of a JEM checkpoint (see :func:`robust_jem.sampling.run_sampling`)."""

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


def sample(job: SampleJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
           progress: bool = True) -> dict[str, Any]:
    """Run ``job`` into ``out``; returns the summary written to ``samples.json``."""
    from robust_jem.sampling import run_sampling

    return run_sampling(job.checkpoint, out, classes=list(job.classes) if job.classes else None, n=job.n,
                        steps=job.steps, step_size=job.step_size, noise=job.noise, init=job.init, seed=job.seed,
                        n_data=job.n_data, device=device, data_dir=data_dir, clamp=job.clamp)


@dataclass(frozen=True)
class HealthJob:
    """EBM health of a JEM checkpoint judged by another classifier (see :func:`robust_jem.health.health`)."""

    checkpoint: str
    judge: str
    n: int = 2000
    steps: int = 100
    per_class: int = 20
    seed: int = 0


def ebm_health(job: HealthJob, out: str | Path, *, device: torch.device, data_dir: str | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Run ``job`` into ``out``; returns the row written to ``health.json``."""
    from robust_jem.health import run_health

    return run_health(job.checkpoint, job.judge, out, n=job.n, steps=job.steps, per_class=job.per_class,
                      seed=job.seed, device=device, data_dir=data_dir)
