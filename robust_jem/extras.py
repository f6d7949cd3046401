"""The rest of the JEM paper's study on our checkpoints: calibration, OOD detection, randomized smoothing.

Each ``run_*`` function ties checkpoints and data (the model side) to the model-agnostic metrics in
``attacks.calibration``, ``attacks.ood`` and ``attacks.smoothing``, and writes rows (``rows.jsonl`` in the
records format) and figures into one output directory. Rows carry a ``key``; a re-run skips rows whose key
is already there.

Which classifier is evaluated:

* JEM checkpoints with ``sgld_steps = k > 0``: ``RefinedClassifier(model, sgld_steps=k)`` (JEM-k, 5 chains);
* everything else (``k = 0`` or non-JEM objectives): the bare classifier,
  ``RefinedClassifier(model, sgld_steps=0, n_chains=1, init_noise=0)``.
* OOD scores always use the bare model: log p(x) and its gradient are properties of the density, not of
  the refined classifier.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks import calibration as cal
from attacks import ood
from attacks.common import AttackInputError
from attacks.records import append_row, done_keys, provenance_fields, read_rows, row_key
from attacks.smoothing import SmoothedClassifier, certify_summary, empirical_l2
from .checkpoint import atomic_write, model_from_checkpoint, read_checkpoint
from .data import DATASETS, ImageDataset, load_dataset
from .errors import UserError
from .model import EnergyModel
from .train import check_out_dir
from .refined import RefinedClassifier

log = logging.getLogger(__name__)

EXTERNAL_OOD = ("svhn", "cifar10", "cifar100", "fashion-mnist")
OOD_SETS = ood.SYNTHETIC + ("heldout",) + EXTERNAL_OOD
DEFAULT_OOD_SETS = ood.SYNTHETIC + ("svhn", "cifar10", "cifar100")
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_ATTACK_RADII = (0.5,)


# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------
def load_model(checkpoint: str | os.PathLike, device: torch.device) -> tuple[EnergyModel, dict[str, Any]]:
    """Eval-mode model (parameters frozen) and the checkpoint dict (without weights)."""
    ckpt = read_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng")}
    return model, info


def classifier_for(model: EnergyModel, objective: str, sgld_steps: int, seed: int = 0) -> RefinedClassifier:
    """JEM-k for JEM checkpoints with k > 0, else the bare classifier."""
    if objective == "jem" and sgld_steps > 0:
        return RefinedClassifier(model, sgld_steps=sgld_steps, seed=seed)
    return RefinedClassifier(model, sgld_steps=0, n_chains=1, init_noise=0, seed=seed)


def model_label(checkpoint: str | os.PathLike, objective: str, sgld_steps: int = 0) -> str:
    """``<run dir>`` (+ ``/JEM-k``) for figures and rows."""
    name = Path(checkpoint).resolve().parent.name or objective
    return f"{name}/JEM-{sgld_steps}" if objective == "jem" and sgld_steps > 0 else name


def test_subset(dataset: str, n_examples: int | None, data_dir: str | None) -> ImageDataset:
    """The first ``n_examples`` test images (all when None)."""
    data = load_dataset(dataset, "test", data_dir)
    if n_examples is None or n_examples >= len(data):
        return data
    if n_examples < 1:
        raise UserError(f"--n-examples must be positive, got {n_examples}")
    return ImageDataset(data.name, data.split, data.images[:n_examples], data.labels[:n_examples], data.classes)


def prepare_out(out: str | os.PathLike) -> Path:
    """Create ``out`` (one-line error when impossible) and return it."""
    out = Path(out)
    check_out_dir(out)
    return out


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=str)
    atomic_write(path, lambda f: f.write(text.encode()))


def _check_dataset(info: dict[str, Any], checkpoint: Any, dataset: str | None) -> str:
    ds = info["dataset"]
    if dataset is not None and dataset != ds:
        raise UserError(f"{checkpoint} was trained on {ds}, not {dataset}")
    return ds


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
def run_calibration(checkpoints: list[str], out: str | os.PathLike, *, sgld_steps: list[int] = (0,),
                    bins: int = cal.DEFAULT_BINS, n_examples: int | None = 2000, batch_size: int = 250,
                    seed: int = 0, device: torch.device | str = "cpu", data_dir: str | None = None,
                    dataset: str | None = None) -> list[dict[str, Any]]:
    """ECE / MCE / NLL / Brier and reliability diagrams for each checkpoint (and each JEM-k).

    Writes ``rows.jsonl`` (kind ``calibration``), ``reliability-<label>.png`` per model and
    ``reliability.png`` with all models side by side. Returns the rows written or found.
    """
    if bins < 1:
        raise UserError(f"--bins must be at least 1, got {bins}")
    if not checkpoints:
        raise UserError("give at least one --checkpoint")
    device = torch.device(device)
    loaded = [(c, *load_model(c, device)) for c in checkpoints]  # validate all before writing anything
    out = prepare_out(out)
    rows_path = out / "rows.jsonl"
    done = done_keys(rows_path)
    rows, panels = [], []
    for path, model, info in loaded:
        ds = _check_dataset(info, path, dataset)
        data = test_subset(ds, n_examples, data_dir)
        steps_list = sorted(set(sgld_steps)) if info["objective"] == "jem" else [0]
        for k in steps_list:
            clf = classifier_for(model, info["objective"], k, seed)
            label = model_label(path, info["objective"], k)
            settings = {"kind": "calibration", "checkpoint_sha256": provenance_fields(path, device)[
                "checkpoint_sha256"], "n_bins": bins, "n_examples": len(data), "seed": seed, **clf.config()}
            key = row_key(settings)
            if key in done:
                log.info("calibration %s: already in %s, skipped", label, rows_path)
                continue
            t0 = time.monotonic()
            logits = cal.predict_logits(clf, data.x.to(device), batch_size)
            stats = cal.calibration_from_logits(logits, data.labels, bins)
            wall = time.monotonic() - t0
            row = cal.calibration_row(stats, key=key, model=label, objective=info["objective"],
                                      dataset=ds, **provenance_fields(path, device), n_examples=len(data),
                                      seed=seed, **clf.config(), wall_s=wall)
            append_row(rows_path, row)
            rows.append(row)
            safe = label.replace("/", "_")
            cal.reliability_diagram(stats, out / f"reliability-{safe}.png", title=f"{label} on {ds} test")
            panels.append((label, stats))
            log.info("calibration %s: acc %.4f ECE %.4f NLL %.4f Brier %.4f (%.1fs)", label, stats.accuracy,
                     stats.ece, stats.nll, stats.brier, wall)
    if len(panels) > 1:
        cal.reliability_diagram(panels, out / "reliability.png", title=f"reliability, {bins} bins")
    return rows


# ------------------------------------------------------------------------------------------------
# OOD detection
# ------------------------------------------------------------------------------------------------
def build_ood_sets(names: list[str], data: ImageDataset, n_classes_trained: int, seed: int,
                   data_dir: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """OOD image sets (same count and shape as ``data``), what was converted, and what was skipped (why)."""
    n = len(data)
    x_in = data.x
    sets: dict[str, torch.Tensor] = {}
    conversions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name in names:
        g = torch.Generator().manual_seed(seed * 1009 + OOD_SETS.index(name) if name in OOD_SETS else seed)
        if name in ood.SYNTHETIC:
            sets[name] = ood.synthetic_ood(name, x_in, g)
            conversions[name] = "none"
        elif name == "heldout":
            if n_classes_trained >= len(data.classes):
                skipped[name] = (f"not meaningful: the model was trained on all {len(data.classes)} classes of "
                                 f"{data.name}")
            else:  # pragma: no cover - no checkpoint here holds out classes yet
                skipped[name] = "held-out-class checkpoints are not supported yet"
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
            x, how = ood.match_shape(other.x[take] if len(other) > n else other.x, data.shape)
            sets[name], conversions[name] = x, how
        else:
            raise UserError(f"unknown OOD set {name!r}; choose from {', '.join(OOD_SETS)}")
    for name, why in skipped.items():
        log.warning("OOD set %s skipped: %s", name, why)
    return sets, conversions, skipped


def run_ood(checkpoints: list[str], out: str | os.PathLike, *, in_set: str | None = None,
            out_sets: list[str] = DEFAULT_OOD_SETS, n_examples: int | None = 1000, batch_size: int = 250,
            tpr: float = 0.95, seed: int = 0, device: torch.device | str = "cpu",
            data_dir: str | None = None) -> dict[str, Any]:
    """AUROC and FPR@TPR of the log p(x), max-softmax and gradient-norm scores for each checkpoint and OOD set.

    Writes ``rows.jsonl`` (kind ``ood``, one row per checkpoint x OOD set x score), ``ood-<label>.png``
    histograms and ``ood.json`` (the table, conversions and skipped sets). Returns that summary.
    """
    if not checkpoints:
        raise UserError("give at least one --checkpoint")
    bad = [s for s in out_sets if s not in OOD_SETS]
    if bad or not out_sets:
        raise UserError(f"unknown OOD set(s) {', '.join(bad) or '(none)'}; choose from {', '.join(OOD_SETS)}")
    if in_set is not None and in_set not in DATASETS:
        raise UserError(f"unknown --in {in_set!r}; choose from {', '.join(DATASETS)}")
    if not 0 < tpr <= 1:
        raise UserError(f"--tpr must be in (0, 1], got {tpr}")
    device = torch.device(device)
    loaded = [(c, *load_model(c, device)) for c in checkpoints]
    for path, _, info in loaded:
        _check_dataset(info, path, in_set)
    out = prepare_out(out)
    rows_path = out / "rows.jsonl"
    done = done_keys(rows_path)
    summary: dict[str, Any] = {"scores": ood.SCORE_DOC, "tpr": tpr, "models": {}}
    cache: dict[str, tuple] = {}
    for path, model, info in loaded:
        ds = info["dataset"]
        data = test_subset(ds, n_examples, data_dir)
        if ds not in cache:
            cache[ds] = build_ood_sets(list(out_sets), data, info["config"].model.n_classes, seed, data_dir)
        sets, conversions, skipped = cache[ds]
        label = model_label(path, info["objective"])
        prov = provenance_fields(path, device)
        t0 = time.monotonic()
        raw_in = ood.ood_scores(model, data.x.to(device), batch_size)
        raw_out = {name: ood.ood_scores(model, x.to(device), batch_size) for name, x in sets.items()}
        wall = time.monotonic() - t0
        table: dict[str, Any] = {}
        for name, raw in raw_out.items():
            metrics = ood.ood_metrics(raw_in, raw, tpr)
            table[name] = metrics
            for row in ood.ood_rows(metrics, name, model=label, objective=info["objective"], in_set=ds,
                                    **prov, n_in=len(data), n_out=int(len(next(iter(raw.values())))),
                                    conversion=conversions[name], seed=seed, classifier="bare", wall_s=wall):
                row["key"] = row_key({k: row[k] for k in ("kind", "checkpoint_sha256", "out_set", "score",
                                                         "n_in", "seed", "tpr")})
                if row["key"] in done:
                    continue
                append_row(rows_path, row)
        ood.ood_histograms(raw_in, raw_out, out / f"ood-{label.replace('/', '_')}.png",
                           title=f"{label}: {ds} test vs OOD sets", in_label=f"{ds} (in)")
        summary["models"][label] = {"checkpoint": str(path), "objective": info["objective"], "in_set": ds,
                                    "n_in": len(data), "wall_s": wall, "table": table,
                                    "conversions": conversions, "skipped": skipped}
        for name, metrics in table.items():
            log.info("OOD %s vs %s: %s", label, name,
                     ", ".join(f"{s} AUROC {m['auroc']:.3f}" for s, m in metrics.items()))
    _write_json(out / "ood.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------
# randomized smoothing
# ------------------------------------------------------------------------------------------------
def run_certify(checkpoint: str, out: str | os.PathLike, *, sigma: float | None = None, n: int = 1000,
                n0: int = 100, alpha: float = 0.001, n_examples: int = 50, radii: list[float] = DEFAULT_RADII,
                attack_radii: list[float] = DEFAULT_ATTACK_RADII, attack_steps: int = 10, forward_draws: int = 8,
                batch_size: int = 500, seed: int = 0,
                device: torch.device | str = "cpu", data_dir: str | None = None) -> list[dict[str, Any]]:
    """Certified L2 accuracy of the Gaussian-smoothed bare classifier (Cohen et al. 2019), with the empirical
    robust accuracy of the same smoothed classifier under an EOT L2 PGD attack at each of ``attack_radii``
    (each costs ``n`` base-model passes per image for the abstaining prediction, plus the attack).

    Writes ``rows.jsonl`` (kind ``certify``, one row per radius) and ``certify.json`` (per-example radii).
    """
    device = torch.device(device)
    model, info = load_model(checkpoint, device)
    cfg = info["config"]
    if sigma is None:
        if info["objective"] != "gaussian-aug":
            raise UserError(f"{checkpoint} is a {info['objective']} model; pass --sigma")
        sigma = cfg.sigma
    if info["objective"] != "gaussian-aug":
        log.warning("%s was trained with objective %s, not gaussian-aug: smoothing it at sigma %g is a weak "
                    "baseline", checkpoint, info["objective"], sigma)
    elif abs(cfg.sigma - sigma) > 1e-9:
        log.warning("%s was trained with sigma %g, certifying at sigma %g", checkpoint, cfg.sigma, sigma)
    if attack_steps < 0 or not radii or any(r < 0 for r in list(radii) + list(attack_radii)):
        raise UserError("--attack-steps, --radii and --attack-radii must be non-negative (and radii non-empty)")
    attack_radii = sorted({float(r) for r in attack_radii}) if attack_steps > 0 else []
    radii = sorted({float(r) for r in radii} | set(attack_radii))
    try:
        smoothed = SmoothedClassifier(model, sigma, n=n, alpha=alpha, seed=seed, n0=n0,
                                      forward_draws=forward_draws, batch_size=batch_size)
    except AttackInputError as exc:
        raise UserError(str(exc)) from None
    data = test_subset(info["dataset"], n_examples, data_dir)
    out = prepare_out(out)
    rows_path = out / "rows.jsonl"
    prov = provenance_fields(checkpoint, device)
    key_fields = {"kind": "certify", "checkpoint_sha256": prov["checkpoint_sha256"], **smoothed.config(),
                  "n_examples": len(data), "attack_steps": attack_steps, "attack_radii": attack_radii}
    keys = {float(r): row_key({**key_fields, "radius": float(r)}) for r in radii}
    done = done_keys(rows_path)
    if all(k in done for k in keys.values()):
        log.info("certify: every radius is already in %s, skipped", rows_path)
        return [r for r in read_rows(rows_path) if r.get("key") in set(keys.values())]
    x, y = data.x.to(device), data.labels
    log.info("certify %s: %d images x (%d + %d) noise draws, then EOT-PGD at radii %s and %d draws per image each",
             checkpoint, len(data), n0, n, attack_radii or "none", n)
    t0 = time.monotonic()
    with torch.no_grad():
        base_acc = float((model(x).argmax(1).cpu() == y).double().mean())
    cert = smoothed.certify(x)
    t_cert = time.monotonic() - t0
    summ = certify_summary(cert, y, list(radii))
    empirical: dict[float, dict] = {}
    t1 = time.monotonic()
    if attack_radii:
        for r in empirical_l2(smoothed, x, y.to(device), attack_radii, steps=attack_steps, seed=seed,
                              progress=lambda m: log.info("certify: empirical %s", m)):
            empirical[r["eps"]] = r
    t_att = time.monotonic() - t1
    label = model_label(checkpoint, info["objective"])
    rows = []
    for acc in summ["certified_accuracy"]:
        r = acc["radius"]
        row = {"kind": "certify", "model": label, "objective": info["objective"], "dataset": info["dataset"],
               **prov, **smoothed.config(), "radius": r, "certified_accuracy": acc["certified_accuracy"],
               "certified_ci_low": acc["ci_low"], "certified_ci_high": acc["ci_high"],
               "abstain_rate": summ["abstain_rate"], "mean_radius": summ["mean_radius"], "acr": summ["acr"],
               "max_certifiable_radius": summ["max_certifiable_radius"], "base_clean_accuracy": base_acc,
               "n_examples": summ["n_examples"], "seed": seed, "wall_s_certify": t_cert, "wall_s_attack": t_att}
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
        rows.append(row)
    _write_json(out / "certify.json", {
        "checkpoint": str(checkpoint), "summary": summ, "empirical": list(empirical.values()),
        "sigma": sigma, "n": n, "n0": n0, "alpha": alpha, "base_clean_accuracy": base_acc,
        "prediction": cert.prediction.tolist(), "radius": cert.radius.tolist(), "label": y.tolist(),
        "pa_lower": np.asarray(cert.pa_lower).tolist(), "wall_s_certify": t_cert, "wall_s_attack": t_att})
    log.info("certify %s (sigma %g, n %d): certified acc %s; abstain %.3f; mean radius %.3f (%.1fs + attack %.1fs)",
             label, sigma, n, ", ".join(f"r={a['radius']:g}: {a['certified_accuracy']:.3f}"
                                         for a in summ["certified_accuracy"]),
             summ["abstain_rate"], summ["mean_radius"], t_cert, t_att)
    return rows
