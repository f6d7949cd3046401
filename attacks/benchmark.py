"""The white-box sweep and the black-box runs as evaluations of :mod:`attacks.pipeline`.

A *target* (:class:`attacks.target.Target`) is a labelled module mapping [0,1] images to logits and the defense
it stands for. A white-box attack comes from a factory ``(model, norm, ε) -> WhiteBoxAttack`` configured once
(see :mod:`attacks.white`); each (target, norm, ε) is one row whose pieces are batches of the selected examples
(the first N test images, or N drawn with a seed), cut by a pure function of the selection and the batch size.
Every batch is seeded by its own first example index, so a row is the row of one process whatever the world
size under ``torchrun``, and pieces written under one world size are reused under another. A black-box run
(:mod:`attacks.black`) gives one row per norm with the whole ε curve, its pieces chunks of examples.
The pipeline keys, resumes, shares and appends both.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from infra.io import atomic_write
from infra.randomness import generator

from . import ATTACK_CODE, code_hash
from .black import BlackboxConfig, BlackboxResult, attack_chunk
from .common import AttackInputError, check_images, wilson
from .curves import DEFAULT_L0_GRID, DEFAULT_L2_GRID, accuracy_curve, distance_summary, json_distances
from .rows import BlackboxRow, WhiteboxRow
from .pipeline import Evaluation, Unit, run
from .target import Target
from .verdict import Verdict
from .white import WHITE_NORMS, AttackFactory, WhiteBoxAttack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Examples:
    """Which test examples are attacked: a recorded, seeded rule.

    Args:
        n: how many (None: the whole split).
        rule: ``first`` (indices 0..n-1), ``random`` (n drawn without replacement with ``seed``) or ``given``
            (exactly ``given``, e.g. the survivors of an earlier attack, escalated on).
        seed: for ``random``.
        given: the indices, for ``given``.
    """

    n: int | None = None
    rule: str = "first"
    seed: int = 0
    given: tuple[int, ...] = ()

    @classmethod
    def of(cls, indices: Sequence[int]) -> "Examples":
        """Exactly these examples, in this order."""
        return cls(len(indices), "given", 0, tuple(int(i) for i in indices))

    def validate(self, total: int) -> None:
        if self.rule not in ("first", "random", "given"):
            raise AttackInputError(f"unknown example rule {self.rule!r}; choose first or random")
        if self.n is not None and not 1 <= self.n <= total:
            raise AttackInputError(f"number of examples must be in 1..{total} (the test split), got {self.n}")
        if self.rule == "given" and (len(self.given) != self.n or not all(0 <= i < total for i in self.given)):
            raise AttackInputError(f"given examples must be {self.n} indices in 0..{total - 1}")

    def indices(self, total: int) -> list[int]:
        """The selected data set indices, in order."""
        self.validate(total)
        n = total if self.n is None else self.n
        if self.rule == "first":
            return list(range(n))
        if self.rule == "given":
            return list(self.given)
        return torch.randperm(total, generator=generator(self.seed))[:n].tolist()

    def describe(self, total: int) -> dict[str, Any]:
        d = {"rule": self.rule, "n": total if self.n is None else self.n, "seed": self.seed, "split_size": total}
        return {**d, "given": list(self.given)} if self.rule == "given" else d


#: Image forward-backward passes one piece of a row may cost, per device type. A piece is what a kill or Ctrl-C
#: can lose, so it is kept to about half a minute: the small CNN runs ~2000 passes/s on 2 CPU cores; a GPU runs
#: a WRN-28-10 at several thousand. A pure function of the configuration and the device type (it fixes the
#: batches, hence the seeds), never of measured speed.
PIECE_PASSES = {"cpu": 60_000, "cuda": 6_000_000}


def auto_batch_size(info: dict[str, Any], attack: WhiteBoxAttack | None = None, device: str = "cpu") -> int:
    """Images per piece: at most 256, fewer as chains x steps grow (the full-gradient graph grows with both), and
    few enough that one piece costs at most :data:`PIECE_PASSES` passes on ``device`` (at least one image)."""
    work = int(info.get("n_chains", 1) or 1) * (int(info.get("sgld_steps", 0) or 0) + 1)
    size = max(8, min(256, 2048 // work))
    if attack is not None:
        per_image = max(1, gradient_evaluations(attack)) * network_passes(info)
        size = min(size, max(1, PIECE_PASSES.get(device, PIECE_PASSES["cuda"]) // per_image))
    return size


def _ci(successes: float, n: int) -> tuple[float, float]:
    return wilson(int(round(successes)), n)


def attack_family(attack: WhiteBoxAttack) -> str:
    """The attack's family for the masking checks: PGD / PGDL2 / EOTPGD / EOTPGDL2 are all ``pgd`` (they
    differ in norm and EOT, which rows record separately); APGD-CE, APGD-DLR, ... stay themselves."""
    if attack.name.startswith("Transfer("):
        return "transfer"
    return "pgd" if attack.name.replace("EOT", "").startswith("PGD") else attack.name.lower()


def step_rule(attack: WhiteBoxAttack) -> str | None:
    """How the step size was chosen: ``2.5*eps/steps`` (the default), ``fixed`` (given by the user) or the attack's own
    schedule (its ``step_rule`` parameter)."""
    p = attack.params()
    if "step_size" not in p:
        return None
    return "fixed" if getattr(attack, "step_size_given", False) else p.get("step_rule", "2.5*eps/steps")


def gradient_evaluations(attack: WhiteBoxAttack) -> int:
    """Attacker gradient evaluations per image of one row (steps x restarts x EOT draws x APGD-T's targets, summed
    over the parts of an ensemble; a score-based attack's queries x draws count as forward passes); 0 at ε = 0."""
    if attack.eps == 0:
        return 0
    p = attack.params()
    parts = p.get("attacks") or [p]
    return sum(int(q.get("steps") or q.get("n_queries") or 0) * int(q.get("restarts", 1)) * int(q.get("eot_used", 1))
               * int(q.get("n_targets", 1)) for q in parts)


def passes_per_image(atk: WhiteBoxAttack, fields: dict[str, Any]) -> int:
    """Network forward-backward passes behind one image's attacker gradients: on the target's chain, or on the
    surrogate (one pass per gradient) for a transfer attack."""
    return gradient_evaluations(atk) * (1 if attack_family(atk) == "transfer" else network_passes(fields))


def network_passes(fields: dict[str, Any]) -> int:
    """Network passes behind one gradient of a refined classifier: chains x (1 + 2 per SGLD step)."""
    return int(fields.get("n_chains", 1) or 1) * (1 + 2 * int(fields.get("sgld_steps", 0) or 0))


class WhiteboxEvaluation(Evaluation[WhiteboxRow]):
    """White-box attacks at every (norm, ε): one row each, its pieces batches of the selected examples.

    Args:
        attack: factory ``(model, norm, eps) -> WhiteBoxAttack`` (its seed should be ``seed``).
        norms, eps: the grid (ε as numbers, in [0,1] pixel units).
        images: the whole split, uint8 or float in [0,1], (N, C, H, W); labels: (N,).
        dataset: its name (recorded).
        examples: the selection rule.
        seed: recorded (the attack factory carries the seeds it uses).
        batch_size: images per piece (None: :func:`auto_batch_size` per row). It fixes which examples share a
            batch, hence the seeds each sees: rows are identical across world sizes for the same batch size.
    """

    row_type = WhiteboxRow
    code = tuple(f"attacks/{f}" for f in ATTACK_CODE)

    def __init__(self, attack: AttackFactory, norms: Sequence[str], eps: Sequence[float], images: torch.Tensor,
                 labels: torch.Tensor, *, dataset: str, examples: Examples = Examples(), seed: int = 0,
                 batch_size: int | None = None, tag: dict[str, Any] | None = None) -> None:
        bad = [n for n in norms if n not in WHITE_NORMS]
        if bad or not norms:
            raise AttackInputError(f"unknown norm {bad[0] if bad else None!r}; choose from {', '.join(WHITE_NORMS)}")
        if not eps:
            raise AttackInputError("no ε given")
        if batch_size is not None and batch_size < 1:
            raise AttackInputError(f"batch size must be positive, got {batch_size}")
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise AttackInputError("images must be (N, C, H, W) with one label each")
        self.attack, self.norms, self.eps = attack, list(norms), list(eps)
        self.images, self.labels, self.dataset, self.seed, self.batch_size = images, labels, dataset, seed, batch_size
        total = int(labels.shape[0])
        self.index = torch.as_tensor(examples.indices(total), dtype=torch.long)
        self.examples = examples.describe(total)
        self.tag = dict(tag or {})

    def units(self, target: Target) -> list[Unit]:
        out = []
        for norm in self.norms:
            for e in self.eps:
                atk = self.attack(target.model, norm, e)
                atk.scorer = target.scorer
                out.append(self._unit(target, atk))
        return out

    def _unit(self, target: Target, atk: WhiteBoxAttack) -> Unit:
        bs = self.batch_size or auto_batch_size(target.fields(), atk, target.device.type)
        batches = torch.split(self.index, bs)
        return Unit(name=f"{target.label} {atk.name} {atk.norm} ε={atk.eps:.4g}",
                    rows={"row": {"attack": repr(atk), "dataset": self.dataset, "examples": self.examples,
                                  # keyed by the round's index only: its display name may change freely
                                  **({"escalation_round": self.tag["round"]} if self.tag else {})}},
                    n_pieces=len(batches),
                    piece=lambda b: attack_batch(target, atk, self.images, self.labels, batches[b]),
                    merge=lambda pieces, keys: {"row": {**merge_fields(target, atk, pieces, dataset=self.dataset,
                                                                 examples=self.examples, seed=self.seed,
                                                                 batch_size=bs), "escalation": self.tag}},
                    shape=f"bs{bs}", passes=len(self.index) * passes_per_image(atk, target.fields()))

    def finish(self, rows: list[WhiteboxRow], out: Path) -> None:
        for r in rows:
            log.info("%s %s %s ε=%.4g: clean %.3f robust %.3f [%.3f, %.3f] (n=%d, %.1fs)", r.model, r.attack, r.norm,
                     r.eps, r.clean_acc, r.robust_acc, r.robust_ci_low, r.robust_ci_high, r.n, r.wall_s or 0.0)


def run_sweep(targets: Sequence[Target], attack: AttackFactory, norms: Sequence[str], eps: Sequence[float],
              images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path, *, dataset: str,
              examples: Examples = Examples(), seed: int = 0, batch_size: int | None = None,
              progress: bool = True, data_sha256: dict[str, str] | None = None,
              tag: dict[str, Any] | None = None) -> list[WhiteboxRow]:
    """Attack every target at every (norm, ε) through :func:`attacks.pipeline.run` (see
    :class:`WhiteboxEvaluation` for the arguments; ``tag`` names an escalation round: recorded, and keyed by its index);
    returns the rows, including ones that were already done."""
    if not targets:
        raise AttackInputError("nothing to attack: no targets")
    evaluation = WhiteboxEvaluation(attack, norms, eps, images, labels, dataset=dataset, examples=examples,
                                    seed=seed, batch_size=batch_size, tag=tag)
    return run(evaluation, targets, out_dir, data_sha256=data_sha256, progress=progress)


def attack_batch(target: Target, atk: WhiteBoxAttack, images: torch.Tensor, labels: torch.Tensor,
                 idx: torch.Tensor) -> dict[str, Any]:
    """Attack the examples ``idx`` (one batch, seeded by its first index) and return their part: the
    per-example outcomes as JSON-able lists, plus the batch's wall time and where it ran."""
    device = target.device
    x = images[idx]
    x = (x.float() / 255.0) if x.dtype == torch.uint8 else x.float()
    t0 = time.perf_counter()
    res = atk(x.to(device), labels[idx].to(device), stream=int(idx[0]))
    return {"indices": idx.tolist(), "correct": res.robust.int().tolist(),
            "robust_frac": res.robust_frac.tolist(), "clean_correct": res.clean_correct.int().tolist(),
            "clean_frac": res.clean_frac.tolist(), "delta_norm": res.delta_norm.tolist(),
            "in_bounds": bool(res.in_bounds), "traces": res.traces, "wall_s": time.perf_counter() - t0,
            "device": str(device)}


def merge_fields(target: Target, atk: WhiteBoxAttack, pieces: Sequence[dict[str, Any]], *, dataset: str,
                 examples: dict[str, Any], seed: int, batch_size: int) -> dict[str, Any]:
    """The fields of one row (beside its key, defense and provenance) from the parts of its batches, in order."""
    def cat(name: str) -> list[Any]:
        return [v for p in pieces for v in p[name]]

    idx, robust, clean = cat("indices"), cat("correct"), cat("clean_correct")
    robust_frac, clean_frac, dnorm = cat("robust_frac"), cat("clean_frac"), cat("delta_norm")
    n = len(idx)
    wall = sum(p["wall_s"] for p in pieces)
    k_clean, k_rob = sum(clean), sum(robust)
    m_clean, m_rob = math.fsum(clean_frac), math.fsum(robust_frac)
    p = atk.params()
    traces: dict[str, list[float]] = {}
    for name in dict.fromkeys(k for piece in pieces for k in piece.get("traces", {})):
        parts = [(len(piece["indices"]), piece["traces"][name]) for piece in pieces if name in piece.get("traces", {})]
        length = min(len(t) for _, t in parts)
        total = sum(w for w, _ in parts)
        traces[name] = [round(sum(w * t[i] for w, t in parts) / total, 5) for i in range(length)]
    return dict(
        dataset=dataset, seed=seed,
        attack=atk.name, attack_family=attack_family(atk), attack_repr=repr(atk), attack_code=code_hash(),
        attack_params=p, norm=atk.norm, eps=atk.eps, steps=p.get("steps"), step_size=p.get("step_size"),
        step_rule=step_rule(atk), restarts=p.get("restarts", 1), eot=p.get("eot", 1), eot_used=p.get("eot_used", 1),
        **atk.verdict.params(atk.scorer),
        n=n, clean_acc=k_clean / n if n else 0.0, clean_ci_low=wilson(k_clean, n)[0],
        clean_ci_high=wilson(k_clean, n)[1], clean_acc_mean=m_clean / n if n else 0.0,
        robust_acc=k_rob / n if n else 0.0, robust_ci_low=wilson(k_rob, n)[0], robust_ci_high=wilson(k_rob, n)[1],
        robust_acc_mean=m_rob / n if n else 0.0, robust_mean_ci_low=_ci(m_rob, n)[0],
        robust_mean_ci_high=_ci(m_rob, n)[1], max_delta_norm=max(dnorm, default=0.0),
        in_bounds=all(p["in_bounds"] for p in pieces), split="test", examples=examples, batch_size=batch_size,
        wall_s=round(wall, 3), images_per_s=round(n / wall, 4) if wall > 0 else None,
        shards=sorted({p["shard"] for p in pieces}), example_indices=idx, correct=robust, clean_correct=clean,
        robust_frac=robust_frac, margin_trace=traces, gradients_per_example=gradient_evaluations(atk),
        passes_per_example=passes_per_image(atk, target.fields()),
    )


# ------------------------------------------------------------------------------------------------
# the black-box sweep (foolbox minimisation attacks; one run gives every ε)
# ------------------------------------------------------------------------------------------------
class BlackboxEvaluation(Evaluation[BlackboxRow]):
    """A decision-based minimisation attack on each defense: one row per norm (the whole ε curve) and a distances
    side file, its pieces chunks of ``cfg.batch_size`` examples.

    Args:
        x, y: clean images in [0,1] (N, C, H, W) on the models' device, and labels (N,).
        cfg: the attack and its budgets.
        out_dir: the run folder (for the side files).
        examples: which examples ``x`` are (e.g. ``test[0:50]``), recorded and part of the row key.
        dataset: recorded.
        eps_grids: norm -> ε grid of the accuracy curves (defaults: :data:`DEFAULT_L2_GRID`, L0 grid).
        indices: data-set indices of ``x`` (for the side file).
    """

    row_type = BlackboxRow
    code = tuple(f"attacks/{f}" for f in ATTACK_CODE)

    def __init__(self, x: torch.Tensor, y: torch.Tensor, cfg: BlackboxConfig, *, out_dir: str | Path, examples: str,
                 dataset: str | None = None, eps_grids: dict[str, Sequence[float]] | None = None,
                 indices: Sequence[int] | None = None) -> None:
        cfg.validate()
        check_images(x)
        if x.shape[0] < 1 or y.shape != (x.shape[0],):
            raise AttackInputError(f"need one label per image and at least one image, got {tuple(y.shape)}")
        self.x, self.y, self.cfg, self.out = x, y.to(x.device), cfg, Path(out_dir)
        self.examples, self.dataset, self.indices = examples, dataset, indices
        self.grids = {"l2": DEFAULT_L2_GRID, "l0": DEFAULT_L0_GRID, **(eps_grids or {})}

    def identity(self, target: Target) -> dict[str, Any]:
        """How the defense is attacked with gradients does not apply to a decision-based attack."""
        return target.fields(attacker=False)

    def units(self, target: Target) -> list[Unit]:
        cfg, bs = self.cfg, self.cfg.batch_size

        def chunk(c: int) -> dict[str, Any]:
            slots = list(self.indices[c * bs:(c + 1) * bs]) if self.indices is not None else None
            res = attack_chunk(target.model, self.x[c * bs:(c + 1) * bs], self.y[c * bs:(c + 1) * bs], cfg, c,
                               scorer=target.scorer, slots=slots)
            return {**res.to_part(), "device": str(self.x.device)}

        return [Unit(name=f"{target.label} {cfg.attack}",
                     rows={norm: {"attack": cfg.attack, "norm": norm, "examples": self.examples, "params": cfg.params()}
                           for norm in cfg.norms},
                     n_pieces=math.ceil(int(self.x.shape[0]) / bs), piece=chunk,
                     merge=lambda pieces, keys: self._merge(target, pieces, keys), shape=f"bs{bs}")]

    def _merge(self, target: Target, pieces: list[dict[str, Any]], keys: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Each norm's row fields, each after its distances side file."""
        cfg, y, n = self.cfg, self.y, int(self.y.shape[0])
        res = BlackboxResult.merge([BlackboxResult.from_part(p) for p in pieces])
        verdict = Verdict(cfg.eval_draws, cfg.seed)
        out: dict[str, dict[str, Any]] = {}
        for norm in cfg.norms:
            d, d_fresh = res.distances[norm], res.distances_fresh(norm)
            side = self.out / f"distances-{keys[norm]}.json"
            atomic_write(side, json.dumps({
                "key": keys[norm], "model": target.label, "defense_id": target.defense_id, "attack": cfg.attack, "norm": norm,
                "indices": list(map(int, self.indices)) if self.indices is not None else list(range(n)),
                "labels": y.cpu().tolist(),
                "distance_fixed_noise": json_distances(d),
                "distance_fresh_noise": json_distances(d_fresh),
                "verdicts": "fixed_noise: what foolbox saw (noise a fixed function of the input); fresh_noise: "
                            + verdict.rule(target.scorer),
                "fresh_misclassified_frac": [None if math.isnan(v) else v for v in res.fresh_misclassified.tolist()],
                "clean_correct_fixed_noise": res.clean_correct_fixed.tolist(),
                "clean_correct_fresh_frac": res.clean_correct_fresh.tolist(),
                "queries": res.queries.tolist(),
                "status": res.status,
                "view_seeds": res.view_seeds,
                "note": "null distance = no adversarial found; status other than 'attacked' = no view could attack "
                        "the example (no information: the headline ignores it unless its clean image fails a fresh "
                        "draw)",
            }, allow_nan=False))
            grid = [float(e) for e in self.grids[norm]]
            out[norm] = dict(
                dataset=self.dataset, seed=cfg.seed, attack=cfg.attack, attack_code=code_hash(), norm=norm, n=n,
                n_examples=n, examples=self.examples, attack_params=cfg.params(),
                attack_repr=[repr(a) for a in cfg.foolbox_attacks()], eps_grid=grid,
                verdict="fresh_noise", verdict_rule=verdict.rule(target.scorer), acc_curve=accuracy_curve(d_fresh, grid),
                distance_summary=distance_summary(d_fresh),
                clean_acc=float((res.clean_correct_fresh == 1).double().mean()),
                clean_acc_fresh_noise_mean=float(res.clean_correct_fresh.mean()),
                n_adversarial_fresh_noise=int(res.fresh_verdict.sum()),
                fresh_misclassified_frac_mean=(float(np.nanmean(res.fresh_misclassified.numpy()))
                                               if bool(res.found.any()) else None),
                acc_curve_fixed_noise=accuracy_curve(d, grid), distance_summary_fixed_noise=distance_summary(d),
                clean_acc_fixed_noise=float(res.clean_correct_fixed.double().mean()),
                n_adversarial_fixed_noise=int(res.found.sum()),
                eval_draws=cfg.eval_draws, eval_draws_used=verdict.draws_for(target.scorer),
                init_failed=res.init_failed, n_not_attacked=sum(v != "attacked" for v in res.status),
                queries_per_example=float(res.queries.double().mean()),
                queries_per_example_max=int(res.queries.max()), model_evals_per_example=res.model_evals / n,
                wall_s=res.wall_s, wall_s_per_example=res.wall_s / n, distances_file=side.name,
                shards=sorted({p["shard"] for p in pieces}), notes=res.notes)
        return out


def run_blackbox(target: Target, x: torch.Tensor, y: torch.Tensor, cfg: BlackboxConfig, *,
                 out_dir: str | Path, examples: str, dataset: str | None = None,
                 eps_grids: dict[str, Sequence[float]] | None = None, indices: Sequence[int] | None = None,
                 progress: bool = True, data_sha256: dict[str, str] | None = None) -> list[BlackboxRow]:
    """Attack one defense with ``cfg`` through :func:`attacks.pipeline.run` (see :class:`BlackboxEvaluation`);
    one row per norm, read back on every rank, also when they already existed."""
    evaluation = BlackboxEvaluation(x, y, cfg, out_dir=out_dir, examples=examples, dataset=dataset,
                                    eps_grids=eps_grids, indices=indices)
    return run(evaluation, [target], out_dir, data_sha256=data_sha256, progress=progress)
