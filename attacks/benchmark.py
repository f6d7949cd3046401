"""The white-box sweep: (target, norm, ε) -> one result row each, appended to ``RUN/rows.jsonl``.

A *target* is a labelled module mapping [0,1] images to logits (for JEM, a ``RefinedClassifier`` with
its SGLD settings and gradient mode in ``info``). The attack comes from a factory ``(model, norm, ε) ->
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

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .common import AttackInputError, barrier, wilson, world_position
from .provenance import file_sha256
from .records import ROWS, Parts, append_row, done_keys, export_csv, provenance_fields, read_rows, row_key
from .white import WHITE_NORMS, AttackFactory, WhiteBoxAttack

log = logging.getLogger(__name__)


@dataclass
class Target:
    """A model under attack.

    Args:
        label: name in rows and plots (e.g. ``JEM-10``, ``CE``, ``PGD-AT``).
        model: [0,1] images -> logits.
        checkpoint: file it was loaded from (hashed into the row), if any.
        info: fields describing it, copied into every row (objective, sgld_steps, n_chains, init_noise,
            sgld_step_size, sgld_noise, grad_mode, ...). Filled from ``model.config()`` when empty.
    """

    label: str
    model: nn.Module
    checkpoint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        info = dict(self.info)
        if not info and callable(getattr(self.model, "config", None)):
            info = dict(self.model.config())
        info.setdefault("sgld_steps", 0)
        info.setdefault("grad_mode", "full")
        info["deterministic"] = bool(getattr(self.model, "deterministic", False))
        return info


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


def auto_batch_size(info: dict[str, Any]) -> int:
    """A batch that keeps the unrolled chain's graph modest: 256 images for a bare classifier, fewer
    as chains x steps grow (the full-gradient graph grows with both)."""
    work = int(info.get("n_chains", 1) or 1) * (int(info.get("sgld_steps", 0) or 0) + 1)
    return max(8, min(256, 2048 // work))


def _ci(successes: float, n: int) -> tuple[float, float]:
    return wilson(int(round(successes)), n)


def attack_rows_key(target: Target, attack: WhiteBoxAttack, dataset: str, examples: dict[str, Any]) -> str:
    """Key of one row: everything that defines the experiment (not the batch size or the device)."""
    ckpt = file_sha256(target.checkpoint) if target.checkpoint and Path(target.checkpoint).is_file() else None
    return row_key({"kind": "whitebox", "model": target.label, "checkpoint_sha256": ckpt,
                    "info": target.fields(), "attack": repr(attack), "dataset": dataset, "examples": examples})


def run_sweep(targets: Sequence[Target], attack: AttackFactory, norms: Sequence[str], eps: Sequence[float],
              images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path, *, dataset: str,
              examples: Examples = Examples(), seed: int = 0, batch_size: int | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Attack every target at every (norm, ε); one row each in ``out_dir/rows.jsonl`` (+ ``rows.csv``).

    Under ``torch.distributed`` (every rank calls this with the same arguments and its own targets on
    its own device) the batches of each row are shared out over the ranks and rank 0 writes the rows.

    Args:
        targets: models under attack (their device is the device used).
        attack: factory ``(model, norm, eps) -> WhiteBoxAttack`` (its seed should be ``seed``).
        norms, eps: the grid (ε as numbers, in [0,1] pixel units).
        images: the whole split, uint8 or float in [0,1], (N, C, H, W); labels: (N,).
        dataset: its name (recorded).
        examples: the selection rule.
        seed: recorded (the attack factory carries the seeds it uses).
        batch_size: images per attack call (None: :func:`auto_batch_size` per target). It fixes which
            examples share a batch, hence the seeds each sees: rows are identical across world sizes
            for the same batch size.

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
    plan = [(t, norm, e, attack(t.model, norm, e)) for t in targets for norm in norms for e in eps]
    out_dir = Path(out_dir)
    rows_path = out_dir / ROWS
    rank, world = world_position()
    main = rank == 0
    done = done_keys(rows_path)
    keys = [attack_rows_key(t, a, dataset, ex_desc) for t, _, _, a in plan]
    todo = sum(k not in done for k in keys)
    if main:
        log.info("%d rows in the sweep, %d already done in %s%s", len(plan), len(plan) - todo, rows_path,
                 f"; batches shared over {world} ranks" if world > 1 else "")

    bar = tqdm(total=len(plan), desc="white-box sweep", unit="row", disable=not (progress and main))
    for (target, norm, e, atk), key in zip(plan, keys):
        bar.set_postfix_str(f"{target.label} {atk.name} {norm} ε={e:.4g}")
        bs = batch_size or auto_batch_size(target.fields())
        batches = torch.split(index, bs)
        parts = Parts(out_dir, f"{key}-bs{bs}", len(batches))
        if key in done:
            if main:
                parts.remove()  # left by a kill between the row's append and the clean-up
            bar.update(1)
            continue
        mine = [b for b in range(rank, len(batches), world) if not parts.has(b)]
        for b in tqdm(mine, desc=f"{target.label} {atk.name}", unit="batch", leave=False,
                      disable=not progress or len(mine) < 2):
            parts.write(b, attack_batch(target, atk, images, labels, batches[b], rank=rank, world=world))
        barrier()
        if main:
            pieces = parts.read_all()
            if pieces is None:  # a rank failed to write its part (it raised, so torchrun stops the job)
                raise RuntimeError(f"parts of row {key} are missing in {parts.dir}")
            row = merge_row(target, atk, pieces, dataset=dataset, examples=ex_desc, seed=seed, batch_size=bs)
            row["key"] = key
            append_row(rows_path, row)
            parts.remove()
            export_csv(read_rows(rows_path), out_dir / "rows.csv")
            log.info("%s %s %s ε=%.4g: clean %.3f robust %.3f [%.3f, %.3f] (n=%d, %.1fs)", target.label, atk.name,
                     norm, e, row["clean_acc"], row["robust_acc"], row["robust_ci_low"], row["robust_ci_high"],
                     row["n"], row["wall_s"])
        done.add(key)
        bar.update(1)
    bar.close()
    barrier()  # every row is in the file before anyone reads it back
    wanted = set(keys)
    return [r for r in read_rows(rows_path) if r.get("key") in wanted]


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def attack_batch(target: Target, atk: WhiteBoxAttack, images: torch.Tensor, labels: torch.Tensor,
                 idx: torch.Tensor, *, rank: int = 0, world: int = 1) -> dict[str, Any]:
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
            "in_bounds": bool(res.in_bounds), "wall_s": time.perf_counter() - t0, "device": str(device),
            "shard": f"{rank}/{world}"}


def merge_row(target: Target, atk: WhiteBoxAttack, pieces: Sequence[dict[str, Any]], *, dataset: str,
              examples: dict[str, Any], seed: int, batch_size: int) -> dict[str, Any]:
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
    row: dict[str, Any] = {
        "kind": "whitebox",
        "model": target.label,
        **target.fields(),
        "attack": atk.name,
        "attack_repr": repr(atk),
        "attack_params": p,
        "norm": atk.norm,
        "eps": atk.eps,
        "steps": p.get("steps"),
        "step_size": p.get("step_size"),
        "restarts": p.get("restarts", 1),
        "eot": p.get("eot", 1),
        "eot_used": p.get("eot_used", 1),
        "eval_draws": atk.eval_draws,
        "eval_draws_used": atk.eval_draws_used,
        "n": n,
        "clean_acc": k_clean / n if n else 0.0,
        "clean_ci_low": wilson(k_clean, n)[0],
        "clean_ci_high": wilson(k_clean, n)[1],
        "clean_acc_mean": m_clean / n if n else 0.0,
        "robust_acc": k_rob / n if n else 0.0,
        "robust_ci_low": wilson(k_rob, n)[0],
        "robust_ci_high": wilson(k_rob, n)[1],
        "robust_acc_mean": m_rob / n if n else 0.0,
        "robust_mean_ci_low": _ci(m_rob, n)[0],
        "robust_mean_ci_high": _ci(m_rob, n)[1],
        "max_delta_norm": max(dnorm, default=0.0),
        "in_bounds": all(p["in_bounds"] for p in pieces),
        "dataset": dataset,
        "split": "test",
        "examples": examples,
        "seed": seed,
        "batch_size": batch_size,
        **provenance_fields(target.checkpoint, pieces[0]["device"] if pieces else _device(target.model)),
        "wall_s": round(wall, 3),
        "images_per_s": round(n / wall, 4) if wall > 0 else None,
        "shards": sorted({p["shard"] for p in pieces}),
        "example_indices": idx,
        "correct": robust,
        "clean_correct": clean,
    }
    if target.checkpoint is None:
        row["checkpoint"], row["checkpoint_sha256"] = None, None
    return row
