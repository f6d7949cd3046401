"""The white-box sweep: (target, norm, ε) -> one result row each, appended to ``RUN/rows.jsonl``.

A *target* (:class:`attacks.target.Target`) is a labelled module mapping [0,1] images to logits and
the defense it stands for. The attack comes from a factory ``(model, norm, ε) ->
WhiteBoxAttack`` configured once (see :mod:`attacks.white`). Rows are appended atomically as they
finish; a re-run skips rows whose key is already in the file. Examples follow a recorded rule (the
first N test images, or N drawn with a seed) and are cut into batches (a pure function of the selection and the batch size). Each batch's per-example results
are stored as a *part* (``RUN/parts/KEY-bsB/``) the moment it finishes, and the row is merged from its parts:

* a killed sweep loses at most the batch in progress (a re-run skips finished rows and finished parts);
* under ``torchrun`` (any ``torch.distributed`` group) rank r attacks batches b with b % world == r and
  rank 0 merges the parts into the one ``rows.jsonl``. Every batch is seeded by its own first example
  index, so the merged row is the row a single process computes, whatever the world size, and parts
  written under one world size are reused under another.
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
from torch import nn
from tqdm.auto import tqdm

from infra.records import ROWS, append_row, done_keys, export_csv, provenance_fields, read_rows, row_key

from infra.interrupt import Interrupted
from infra.io import atomic_write

from . import code_hash
from .black import BlackboxConfig, BlackboxResult, attack_chunk
from .common import AttackInputError, barrier, check_images, wilson, world_position
from .curves import DEFAULT_L0_GRID, DEFAULT_L2_GRID, accuracy_curve, distance_summary, json_distances
from .rows import BlackboxRow, WhiteboxRow
from .verdict import Verdict
from .runner import PartsRunner
from .target import Target
from .white import WHITE_NORMS, AttackFactory, WhiteBoxAttack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Examples:
    """Which test examples are attacked: a recorded, seeded rule.

    Args:
        n: how many (None: the whole split).
        rule: ``first`` (indices 0..n-1) or ``random`` (n drawn without replacement with ``seed``).
        seed: for ``random``.
    """

    n: int | None = None
    rule: str = "first"
    seed: int = 0

    def validate(self, total: int) -> None:
        if self.rule not in ("first", "random"):
            raise AttackInputError(f"unknown example rule {self.rule!r}; choose first or random")
        if self.n is not None and not 1 <= self.n <= total:
            raise AttackInputError(f"number of examples must be in 1..{total} (the test split), got {self.n}")

    def indices(self, total: int) -> list[int]:
        """The selected data set indices, in order."""
        self.validate(total)
        n = total if self.n is None else self.n
        if self.rule == "first":
            idx = list(range(n))
        else:
            idx = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))[:n].tolist()
        return idx

    def describe(self, total: int) -> dict[str, Any]:
        return {"rule": self.rule, "n": total if self.n is None else self.n, "seed": self.seed, "split_size": total}


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
    """How the step size was chosen: ``2.5*eps/steps`` (the default) or ``fixed`` (given by the user)."""
    p = attack.params()
    if "step_size" not in p:
        return None
    return "fixed" if getattr(attack, "step_size_given", False) else "2.5*eps/steps"


def gradient_evaluations(attack: WhiteBoxAttack) -> int:
    """Attacker gradient evaluations per image of one row (steps x restarts x EOT draws, summed over the
    parts of an ensemble); 0 at ε = 0."""
    if attack.eps == 0:
        return 0
    p = attack.params()
    parts = p.get("attacks") or [p]
    return sum(int(q.get("steps") or 0) * int(q.get("restarts", 1)) * int(q.get("eot_used", 1)) for q in parts) \
        or int(p.get("n_queries", 0))


def network_passes(fields: dict[str, Any]) -> int:
    """Network passes behind one gradient of a refined classifier: chains x (1 + 2 per SGLD step)."""
    return int(fields.get("n_chains", 1) or 1) * (1 + 2 * int(fields.get("sgld_steps", 0) or 0))


def attack_rows_key(target: Target, attack: WhiteBoxAttack, dataset: str, examples: dict[str, Any],
                    data_sha256: dict[str, str] | None = None) -> str:
    """Key of one row: everything that defines the experiment (the defense with its weights, the attack, the data
    and which examples), and the code computing it (not the batch size or the device)."""
    return row_key({"kind": "whitebox", "target": target.fields(), "attack": repr(attack), "dataset": dataset,
                    "examples": examples, "data": dict(sorted((data_sha256 or {}).items())), "code": code_hash()})


def run_sweep(targets: Sequence[Target], attack: AttackFactory, norms: Sequence[str], eps: Sequence[float],
              images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path, *, dataset: str,
              examples: Examples = Examples(), seed: int = 0, batch_size: int | None = None,
              progress: bool = True, data_sha256: dict[str, str] | None = None) -> list[WhiteboxRow]:
    """Attack every target at every (norm, ε); one row each in ``out_dir/rows.jsonl`` (+ ``rows.csv``).

    Under ``torch.distributed`` (every rank calls this with the same arguments and its own targets on
    its own device) the batches of each row are shared out over the ranks (:class:`PartsRunner`) and
    rank 0 writes the rows.

    Args:
        targets: defenses under attack (their device is the device used).
        attack: factory ``(model, norm, eps) -> WhiteBoxAttack`` (its seed should be ``seed``).
        norms, eps: the grid (ε as numbers, in [0,1] pixel units).
        images: the whole split, uint8 or float in [0,1], (N, C, H, W); labels: (N,).
        dataset: its name (recorded).
        examples: the selection rule.
        seed: recorded (the attack factory carries the seeds it uses).
        batch_size: images per attack call (None: :func:`auto_batch_size` per row). It fixes which
            examples share a batch, hence the seeds each sees: rows are identical across world sizes
            for the same batch size.
        data_sha256: the data files' hashes (recorded in every row).

    Returns:
        The rows of this sweep, including ones that were already done (read back from the file).
    """
    if not targets:
        raise AttackInputError("nothing to attack: no targets")
    bad = [n for n in norms if n not in WHITE_NORMS]
    if bad or not norms:
        raise AttackInputError(f"unknown norm {bad[0] if bad else None!r}; choose from {', '.join(WHITE_NORMS)}")
    if not eps:
        raise AttackInputError("no ε given")
    if batch_size is not None and batch_size < 1:
        raise AttackInputError(f"batch size must be positive, got {batch_size}")
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise AttackInputError("images must be (N, C, H, W) with one label each")
    total = int(labels.shape[0])
    index = torch.as_tensor(examples.indices(total), dtype=torch.long)
    ex_desc = examples.describe(total)
    # Build every attack first: bad settings fail here, before anything is written.
    plan = []
    for t in targets:
        for norm in norms:
            for e in eps:
                atk = attack(t.model, norm, e)
                atk.scorer = t.scorer
                plan.append((t, atk))
    out_dir = Path(out_dir)
    rows_path = out_dir / ROWS
    rank, world = world_position()
    main = rank == 0
    done = done_keys(rows_path)
    keys = [attack_rows_key(t, a, dataset, ex_desc, data_sha256) for t, a in plan]
    todo = sum(k not in done for k in keys)
    if main:
        log.info("%d rows in the sweep, %d already done in %s%s", len(plan), len(plan) - todo, rows_path,
                 f"; batches shared over {world} ranks" if world > 1 else "")
        grads = sum(len(index) * gradient_evaluations(a) for (t, a), k in zip(plan, keys) if k not in done)
        passes = sum(len(index) * gradient_evaluations(a) * network_passes(t.fields())
                     for (t, a), k in zip(plan, keys) if k not in done)
        if grads:
            log.info("planned: %d attacker gradient evaluations (~%.3g image forward-backward passes; measured on 2 "
                     "CPU cores: the small CNN ~2000 passes/s, a WRN-28-10 ~9 passes/s)", grads, passes)

    bar = tqdm(total=len(plan), desc="white-box sweep", unit="row", disable=not (progress and main))
    for (target, atk), key in zip(plan, keys):
        bar.set_postfix_str(f"{target.label} {atk.name} {atk.norm} ε={atk.eps:.4g}")
        bs = batch_size or auto_batch_size(target.fields(), atk, _device(target.model).type)
        batches = torch.split(index, bs)
        runner = PartsRunner(out_dir, f"{key}-bs{bs}", len(batches))
        if key in done:
            runner.finish()
            bar.update(1)
            continue
        try:
            pieces = runner.run(lambda b: attack_batch(target, atk, images, labels, batches[b]),
                                desc=f"{target.label} {atk.name} {atk.norm} ε={atk.eps:.4g}", progress=progress)
        except Interrupted as stop:
            bar.close()
            finished = sum(k in done for k in keys)
            raise Interrupted(f"{finished} of {len(plan)} rows of this sweep in {rows_path}; {stop.kept}; the same "
                              f"command resumes from there") from None
        if pieces is not None:
            row = merge_row(target, atk, pieces, dataset=dataset, examples=ex_desc, seed=seed, batch_size=bs)
            row.key, row.data_sha256 = key, dict(data_sha256 or {})
            append_row(rows_path, row.to_dict())
            runner.finish()
            export_csv(read_rows(rows_path), out_dir / "rows.csv")
            log.info("%s %s %s ε=%.4g: clean %.3f robust %.3f [%.3f, %.3f] (n=%d, %.1fs)", target.label, atk.name,
                     atk.norm, atk.eps, row.clean_acc, row.robust_acc, row.robust_ci_low, row.robust_ci_high,
                     row.n, row.wall_s)
        done.add(key)
        bar.update(1)
    bar.close()
    barrier()  # every row is in the file before anyone reads it back
    wanted = set(keys)
    return [WhiteboxRow.from_dict(r) for r in read_rows(rows_path) if r.get("key") in wanted]


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def attack_batch(target: Target, atk: WhiteBoxAttack, images: torch.Tensor, labels: torch.Tensor,
                 idx: torch.Tensor) -> dict[str, Any]:
    """Attack the examples ``idx`` (one batch, seeded by its first index) and return their part: the
    per-example outcomes as JSON-able lists, plus the batch's wall time and where it ran."""
    device = _device(target.model)
    x = images[idx]
    x = (x.float() / 255.0) if x.dtype == torch.uint8 else x.float()
    t0 = time.perf_counter()
    res = atk(x.to(device), labels[idx].to(device), stream=int(idx[0]))
    return {"indices": idx.tolist(), "correct": res.robust.int().tolist(),
            "robust_frac": res.robust_frac.tolist(), "clean_correct": res.clean_correct.int().tolist(),
            "clean_frac": res.clean_frac.tolist(), "delta_norm": res.delta_norm.tolist(),
            "in_bounds": bool(res.in_bounds), "traces": res.traces, "wall_s": time.perf_counter() - t0,
            "device": str(device)}


def merge_row(target: Target, atk: WhiteBoxAttack, pieces: Sequence[dict[str, Any]], *, dataset: str,
              examples: dict[str, Any], seed: int, batch_size: int) -> WhiteboxRow:
    """One result row (without ``key``) from the parts of its batches, in batch order."""
    def cat(name: str) -> list[Any]:
        return [v for p in pieces for v in p[name]]

    idx, robust, clean = cat("indices"), cat("correct"), cat("clean_correct")
    robust_frac, clean_frac, dnorm = cat("robust_frac"), cat("clean_frac"), cat("delta_norm")
    n = len(idx)
    wall = sum(p["wall_s"] for p in pieces)
    k_clean, k_rob = sum(clean), sum(robust)
    m_clean, m_rob = math.fsum(clean_frac), math.fsum(robust_frac)
    p = atk.params()
    fields = target.fields()
    traces: dict[str, list[float]] = {}
    for name in dict.fromkeys(k for piece in pieces for k in piece.get("traces", {})):
        parts = [(len(piece["indices"]), piece["traces"][name]) for piece in pieces if name in piece.get("traces", {})]
        length = min(len(t) for _, t in parts)
        total = sum(w for w, _ in parts)
        traces[name] = [round(sum(w * t[i] for w, t in parts) / total, 5) for i in range(length)]
    prov = provenance_fields(None, pieces[0]["device"] if pieces else _device(target.model))
    return WhiteboxRow.build(
        **fields, checkpoint=target.checkpoint, dataset=dataset, seed=seed, code=code_hash(),
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
        **{k: v for k, v in prov.items() if k not in ("checkpoint", "checkpoint_sha256")},
        wall_s=round(wall, 3), images_per_s=round(n / wall, 4) if wall > 0 else None,
        shards=sorted({p["shard"] for p in pieces}), example_indices=idx, correct=robust, clean_correct=clean,
        robust_frac=robust_frac, margin_trace=traces,
    )


# ------------------------------------------------------------------------------------------------
# the black-box sweep (foolbox minimisation attacks; one run gives every ε)
# ------------------------------------------------------------------------------------------------
def blackbox_keys(cfg: BlackboxConfig, target: Target, examples: str) -> dict[str, str]:
    """norm -> row key of each row a run of ``cfg`` on ``target`` writes (for resuming)."""
    fields = {k: v for k, v in target.fields().items() if k not in ("grad_mode", "precision", "compiled")}
    return {norm: row_key({"kind": "blackbox", "attack": cfg.attack, "norm": norm, "examples": examples,
                           "params": cfg.params(), "target": fields, "code": code_hash()}) for norm in cfg.norms}


def run_blackbox(target: Target, x: torch.Tensor, y: torch.Tensor, cfg: BlackboxConfig, *,
                 out_dir: str | Path, examples: str, dataset: str | None = None,
                 eps_grids: dict[str, Sequence[float]] | None = None, indices: Sequence[int] | None = None,
                 progress: bool = True, data_sha256: dict[str, str] | None = None) -> list[BlackboxRow]:
    """Attack one defense with ``cfg``; one row per norm in ``out_dir/rows.jsonl`` and a distances side file.

    The run's chunks go through the shared :class:`PartsRunner` (resume per chunk; under ``torchrun`` rank
    r attacks the chunks c with c % world == r and rank 0 writes the rows, which are those of one process).

    Args:
        target: the defense (its ``model`` is queried through the fixed-noise view; its ``scorer`` gives
            the fresh-noise verdict).
        x, y: clean images in [0,1] (N, C, H, W) on the model's device, and labels (N,).
        cfg: the attack and its budgets.
        out_dir: the run directory.
        examples: which examples ``x`` are (e.g. ``test[0:50]``), recorded and part of the row key.
        dataset: recorded.
        eps_grids: norm -> ε grid of the accuracy curves (defaults: :data:`DEFAULT_L2_GRID`, L0 grid).
        indices: data-set indices of ``x`` (for the side file).
        progress: tqdm bars (rank 0 only).

    Returns:
        The rows of this run (read back on every rank), also when they already existed.
    """
    cfg.validate()
    check_images(x)
    if x.shape[0] < 1 or y.shape != (x.shape[0],):
        raise AttackInputError(f"need one label per image and at least one image, got {tuple(y.shape)}")
    y = y.to(x.device)
    out = Path(out_dir)
    n = int(x.shape[0])
    keys = blackbox_keys(cfg, target, examples)
    n_chunks = math.ceil(n / cfg.batch_size)
    runner = PartsRunner(out, f"{row_key({'blackbox_rows': sorted(keys.values())})}-bs{cfg.batch_size}", n_chunks)
    wanted = set(keys.values())
    if wanted <= done_keys(out / ROWS):
        log.info("%s %s: rows already present, skipping", target.label, cfg.attack)
        runner.finish()
        return [BlackboxRow.from_dict(r) for r in read_rows(out / ROWS) if r.get("key") in wanted]
    if runner.is_main:
        log.info("%s %s: %d chunks of %d, %d on disk already", target.label, cfg.attack, n_chunks, cfg.batch_size,
                 runner.on_disk())
    bs = cfg.batch_size
    per_chunk = (cfg.init_directions + cfg.init_steps + cfg.steps + cfg.steps // cfg.update_stats_every_k + 3
                 if cfg.attack == "boundary" else cfg.init_steps + cfg.steps + 3)
    bar = tqdm(total=per_chunk * n_chunks, desc=f"{target.label} {cfg.attack} queries", unit="q", leave=False,
               disable=not (progress and runner.is_main))

    def chunk(c: int) -> dict[str, Any]:
        slots = list(indices[c * bs:(c + 1) * bs]) if indices is not None else None
        res = attack_chunk(target.model, x[c * bs:(c + 1) * bs], y[c * bs:(c + 1) * bs], cfg, c,
                           on_call=lambda: bar.update(1), scorer=target.scorer, slots=slots)
        return {**res.to_part(), "device": str(x.device)}

    try:
        pieces = runner.run(chunk, desc=f"{target.label} {cfg.attack}")
    except Interrupted as stop:
        raise Interrupted(f"{stop.kept}; the same command resumes from there") from None
    finally:
        bar.close()
    if pieces is not None:
        res = BlackboxResult.merge([BlackboxResult.from_part(p) for p in pieces])
        _write_blackbox_rows(target, res, y, cfg, out, keys, examples=examples, dataset=dataset, eps_grids=eps_grids,
                             indices=indices, shards=sorted({p["shard"] for p in pieces}),
                             device=pieces[0]["device"], data_sha256=data_sha256)
        runner.finish()
    barrier()  # every row is in the file before anyone reads it back
    return [BlackboxRow.from_dict(r) for r in read_rows(out / ROWS) if r.get("key") in wanted]


def _write_blackbox_rows(target: Target, res: BlackboxResult, y: torch.Tensor, cfg: BlackboxConfig, out: Path,
                         keys: dict[str, str], *, examples: str, dataset: str | None,
                         eps_grids: dict[str, Sequence[float]] | None, indices: Sequence[int] | None,
                         shards: list[str], device: str, data_sha256: dict[str, str] | None = None) -> None:
    """Append the rows of ``keys`` not yet in ``out/rows.jsonl``, each after its distances side file."""
    n = int(y.shape[0])
    grids = {"l2": DEFAULT_L2_GRID, "l0": DEFAULT_L0_GRID, **(eps_grids or {})}
    done = done_keys(out / ROWS)
    verdict = Verdict(cfg.eval_draws, cfg.seed)
    fields = {k: v for k, v in target.fields().items() if k not in ("grad_mode", "precision", "compiled")}
    prov = provenance_fields(None, device)
    for norm, key in keys.items():
        if key in done:
            continue
        d, d_fresh = res.distances[norm], res.distances_fresh(norm)
        side = out / f"distances-{key}.json"
        atomic_write(side, json.dumps({
            "key": key, "model": target.label, "defense_id": target.defense_id, "attack": cfg.attack, "norm": norm,
            "indices": list(map(int, indices)) if indices is not None else list(range(n)),
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
                    "the example (no information: the headline ignores it unless its clean image fails a fresh draw)",
        }, allow_nan=False))
        grid = [float(e) for e in grids[norm]]
        row = BlackboxRow.build(
            key=key, **fields, checkpoint=target.checkpoint, dataset=dataset, seed=cfg.seed, code=code_hash(),
            attack=cfg.attack, attack_code=code_hash(), norm=norm, n=n, n_examples=n, examples=examples,
            attack_params=cfg.params(), attack_repr=[repr(a) for a in cfg.foolbox_attacks()], eps_grid=grid,
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
            wall_s=res.wall_s, wall_s_per_example=res.wall_s / n, distances_file=side.name, shards=shards,
            notes=res.notes, data_sha256=dict(data_sha256 or {}),
            **{k: v for k, v in prov.items() if k not in ("checkpoint", "checkpoint_sha256")})
        append_row(out / ROWS, row.to_dict())
    export_csv(read_rows(out / ROWS), out / "rows.csv")
