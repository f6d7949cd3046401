"""The white-box sweep: (target, norm, ε) -> one result row each, appended to ``RUN/rows.jsonl``.

A *target* is a labelled module mapping [0,1] images to logits (for JEM, a ``RefinedClassifier`` with
its SGLD settings and gradient mode in ``info``). The attack comes from a factory ``(model, norm, ε) ->
WhiteBoxAttack`` configured once (see :mod:`attacks.white`). Rows are appended atomically as they
finish; a re-run skips rows whose key is already in the file, so a killed sweep loses at most the row
in progress. Examples follow a recorded rule (the first N test images, or N drawn with a seed) and can
be sharded over ranks (``shard=(rank, world)`` keeps positions i with i % world == rank) so that a later
``torch.distributed`` launcher only has to merge the rows' per-example vectors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .common import AttackInputError, wilson
from .provenance import file_sha256
from .records import ROWS, append_row, done_keys, export_csv, provenance_fields, read_rows, row_key
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
        shard: (rank, world): keep the positions i of the selection with i % world == rank.
    """

    n: int | None = None
    rule: str = "first"
    seed: int = 0
    shard: tuple[int, int] = (0, 1)

    def validate(self, total: int) -> None:
        if self.rule not in ("first", "random"):
            raise AttackInputError(f"unknown example rule {self.rule!r}; choose first or random")
        if self.n is not None and not 1 <= self.n <= total:
            raise AttackInputError(f"number of examples must be in 1..{total} (the test split), got {self.n}")
        rank, world = self.shard
        if not (world >= 1 and 0 <= rank < world):
            raise AttackInputError(f"shard must be rank/world with 0 <= rank < world, got {rank}/{world}")

    def indices(self, total: int) -> list[int]:
        """The selected data set indices, in order."""
        self.validate(total)
        n = total if self.n is None else self.n
        if self.rule == "first":
            idx = list(range(n))
        else:
            idx = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))[:n].tolist()
        rank, world = self.shard
        return idx[rank::world]

    def describe(self, total: int) -> dict[str, Any]:
        return {"rule": self.rule, "n": total if self.n is None else self.n, "seed": self.seed,
                "shard": list(self.shard), "split_size": total}


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

    Args:
        targets: models under attack (their device is the device used).
        attack: factory ``(model, norm, eps) -> WhiteBoxAttack`` (its seed should be ``seed``).
        norms, eps: the grid (ε as numbers, in [0,1] pixel units).
        images: the whole split, uint8 or float in [0,1], (N, C, H, W); labels: (N,).
        dataset: its name (recorded).
        examples: the selection rule.
        seed: recorded (the attack factory carries the seeds it uses).
        batch_size: images per attack call (None: :func:`auto_batch_size` per target).

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
    index = examples.indices(total)
    ex_desc = examples.describe(total)
    # Build every attack first: bad settings fail here, before anything is written.
    plan = [(t, norm, e, attack(t.model, norm, e)) for t in targets for norm in norms for e in eps]
    out_dir = Path(out_dir)
    rows_path = out_dir / ROWS
    done = done_keys(rows_path)
    keys = [attack_rows_key(t, a, dataset, ex_desc) for t, _, _, a in plan]
    todo = sum(k not in done for k in keys)
    log.info("%d rows in the sweep, %d already done in %s", len(plan), len(plan) - todo, rows_path)

    bar = tqdm(total=len(plan), desc="white-box sweep", unit="row", disable=not progress)
    for (target, norm, e, atk), key in zip(plan, keys):
        bar.set_postfix_str(f"{target.label} {atk.name} {norm} ε={e:.4g}")
        if key in done:
            bar.update(1)
            continue
        row = attack_one(target, atk, images, labels, index, dataset=dataset, examples=ex_desc, seed=seed,
                         batch_size=batch_size or auto_batch_size(target.fields()), progress=progress)
        row["key"] = key
        append_row(rows_path, row)
        done.add(key)
        export_csv(read_rows(rows_path), out_dir / "rows.csv")
        log.info("%s %s %s ε=%.4g: clean %.3f robust %.3f [%.3f, %.3f] (n=%d, %.1fs)", target.label, atk.name,
                 norm, e, row["clean_acc"], row["robust_acc"], row["robust_ci_low"], row["robust_ci_high"],
                 row["n"], row["wall_s"])
        bar.update(1)
    bar.close()
    wanted = set(keys)
    return [r for r in read_rows(rows_path) if r.get("key") in wanted]


def attack_one(target: Target, atk: WhiteBoxAttack, images: torch.Tensor, labels: torch.Tensor,
               index: Sequence[int], *, dataset: str, examples: dict[str, Any], seed: int, batch_size: int,
               progress: bool = False) -> dict[str, Any]:
    """Run one attack over the selected examples in batches; return its row (without ``key``)."""
    try:
        device = next(target.model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    idx_all = torch.as_tensor(list(index), dtype=torch.long)
    robust, robust_frac, clean, clean_frac, dnorm = [], [], [], [], []
    in_bounds = True
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(idx_all), batch_size), desc=f"{target.label} {atk.name}", unit="batch",
                      leave=False, disable=not progress):
        idx = idx_all[start:start + batch_size]
        x = images[idx]
        x = (x.float() / 255.0) if x.dtype == torch.uint8 else x.float()
        x, y = x.to(device), labels[idx].to(device)
        res = atk(x, y, stream=int(idx[0]))
        robust.append(res.robust.cpu())
        robust_frac.append(res.robust_frac.cpu())
        clean.append(res.clean_correct.cpu())
        clean_frac.append(res.clean_frac.cpu())
        dnorm.append(res.delta_norm.cpu())
        in_bounds = in_bounds and res.in_bounds
    wall = time.perf_counter() - t0
    n = len(idx_all)
    cat = (lambda parts: torch.cat(parts) if parts else torch.zeros(0))  # noqa: E731
    robust_t, robust_f, clean_t, clean_f, dn = map(cat, (robust, robust_frac, clean, clean_frac, dnorm))
    k_clean, k_rob = int(clean_t.sum()), int(robust_t.sum())
    m_clean, m_rob = float(clean_f.sum()), float(robust_f.sum())
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
        "max_delta_norm": float(dn.max()) if n else 0.0,
        "in_bounds": in_bounds,
        "dataset": dataset,
        "split": "test",
        "examples": examples,
        "seed": seed,
        "batch_size": batch_size,
        **provenance_fields(target.checkpoint, device),
        "wall_s": round(wall, 3),
        "images_per_s": round(n / wall, 4) if wall > 0 else None,
        "example_indices": idx_all.tolist(),
        "correct": robust_t.int().tolist(),
        "clean_correct": clean_t.int().tolist(),
    }
    if target.checkpoint is None:
        row["checkpoint"], row["checkpoint_sha256"] = None, None
    return row
