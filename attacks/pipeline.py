"""The one door through which result rows enter a run folder (``RUN/rows.jsonl``).

An :class:`Evaluation` says what one kind of evaluation is: its typed row class (hence its kind), the code
files its rows depend on, and, for each target, its :class:`Unit` s — one computation each, cut into pieces,
that writes one or more rows. :func:`run` does everything else, the same way for every kind:

* every unit is planned before any work (bad settings fail before anything is written);
* each row's key holds the kind, the defense (its label, weights or checkpoint sha256 and refinement), the
  data's hashes, the hash of the code that computes it and the unit's own fields, so two different models,
  data sets or code versions never share a row;
* rows already in the folder under their key are skipped; the rest are computed piece by piece through the
  resumable :class:`~attacks.runner.PartsRunner` (a kill loses only the piece in progress; under torchrun the
  pieces are shared over the ranks and rank 0 writes the rows);
* each row is built strictly (:meth:`attacks.rows.Row.build`), appended atomically with its provenance,
  exported to ``rows.csv`` and read back typed.

No other module appends result rows (a layer test checks it).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, Sequence, TypeVar

from infra.interrupt import Interrupted
from infra.io import check_out_dir
from infra.provenance import code_hash, environment, now
from infra.records import ROWS, append_row, done_keys, export_csv, read_rows, row_key

from .common import barrier, world_position
from .rows import Row, parse_row
from .runner import PartsRunner
from .target import Target

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Row)
_ROOT = Path(__file__).resolve().parent.parent
#: code every row depends on, whatever its kind: this door, the row classes, the runner, the seeding
COMMON_CODE = ("attacks/pipeline.py", "attacks/rows.py", "attacks/runner.py", "attacks/target.py",
               "infra/randomness.py")


@dataclass
class Unit:
    """One computation of an evaluation on one target: the rows it writes and how.

    Args:
        name: names it in logs and progress bars.
        rows: row name -> the fields that key that row beside the kind, defense, data and code.
        n_pieces: how many pieces the computation is cut into (a pure function of the settings).
        piece: ``piece(b)`` computes piece b as a JSON-able dict (``device`` names where it ran).
        merge: ``merge(pieces, keys)``: every piece in order and each row's key (for side files named by it) ->
            row name -> the row's fields (without key, identity or provenance).
        shape: what else shapes the pieces (e.g. ``bs64``), part of the parts folder's name.
        passes: planned image forward(-backward) passes, for the announced cost (0: not announced).
    """

    name: str
    rows: dict[str, dict[str, Any]]
    n_pieces: int
    piece: Callable[[int], dict[str, Any]]
    merge: Callable[[list[dict[str, Any]], dict[str, str]], dict[str, dict[str, Any]]]
    shape: str = ""
    passes: int = 0

    @classmethod
    def whole(cls, name: str, rows: dict[str, dict[str, Any]],
              compute: Callable[[], dict[str, dict[str, Any]]]) -> "Unit":
        """A computation done in one piece: ``compute()`` gives every row's fields by row name (it ran on the
        target's device)."""
        return cls(name=name, rows=rows, n_pieces=1, piece=lambda b: {"rows": compute()},
                   merge=lambda pieces, keys: pieces[0]["rows"])


class Evaluation(ABC, Generic[R]):
    """What one kind of evaluation is. Subclasses set :attr:`row_type` and :attr:`code` and define
    :meth:`units`; :meth:`identity` and :meth:`finish` have defaults."""

    row_type: ClassVar[type[Row]]
    #: repository-relative files whose code computes these rows (their hash enters every key)
    code: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def units(self, target: Target) -> list[Unit]:
        """The computations on ``target`` (built before any work: raise here on bad settings)."""

    def identity(self, target: Target) -> dict[str, Any]:
        """The defense's fields in every row and key (default: label, weights, refinement, how it is attacked)."""
        return target.fields()

    def finish(self, rows: list[R], out: Path) -> None:
        """Files summarising every row of this run (plots, summaries); called on rank 0 after the rows exist."""

    def code_hash(self) -> str:
        """Hash of :data:`COMMON_CODE` and :attr:`code`."""
        return code_hash(*(_ROOT / f for f in dict.fromkeys(COMMON_CODE + self.code)))


def _identity_fields(row_type: type[Row], ident: dict[str, Any]) -> dict[str, Any]:
    """The defense's fields as row fields: those the row class knows by name, the rest of an open-ended defense's
    own fields (a user's module, say) under ``defense_params``."""
    known = row_type.field_names()
    own = {k: v for k, v in ident.items() if k not in known}
    return {**{k: v for k, v in ident.items() if k in known}, **({"defense_params": own} if own else {})}


def run(evaluation: Evaluation[R], targets: Sequence[Target], out: str | Path, *,
        data_sha256: dict[str, str] | None = None, progress: bool = True) -> list[R]:
    """Run ``evaluation`` on every target into the run folder ``out``; return its rows (also those that existed).

    Args:
        evaluation: what to compute.
        targets: the defenses (their model's device is the device used).
        out: the run folder (``rows.jsonl``, ``rows.csv``, ``parts/`` and the evaluation's own files).
        data_sha256: file name (or tensor name) -> sha256 of the data evaluated; in every key and row.
        progress: progress bars (rank 0 only).
    """
    out = Path(out)
    check_out_dir(out)
    rows_path = out / ROWS
    data = dict(sorted((data_sha256 or {}).items()))
    code = evaluation.code_hash()
    kind = evaluation.row_type.kind
    plan = [(t, u) for t in targets for u in evaluation.units(t)]  # every unit built (and checked) first
    keyed = []
    for t, u in plan:
        ident = evaluation.identity(t)
        keys = {name: row_key({"kind": kind, "target": ident, "data": data, "code": code, **fields})
                for name, fields in u.rows.items()}
        keyed.append((t, u, ident, keys))
    rank, world = world_position()
    main = rank == 0
    done = done_keys(rows_path)
    todo = [(t, u, i, k) for t, u, i, k in keyed if not set(k.values()) <= done]
    if main and plan:
        passes = sum(u.passes for _, u, _, _ in todo)
        log.info("%s: %d of %d computations already done in %s%s%s", kind, len(plan) - len(todo), len(plan), rows_path,
                 f"; pieces shared over {world} ranks" if world > 1 else "",
                 f"; planned ~{passes:.3g} image forward-backward passes (the small CNN runs ~2000/s on 2 CPU cores, "
                 f"a WRN-28-10 ~9/s)" if passes else "")
    for t, u, ident, keys in keyed:
        name = next(iter(keys.values())) if len(keys) == 1 else row_key({"rows": sorted(keys.values())})
        runner = PartsRunner(out, f"{name}-{u.shape}" if u.shape else name, u.n_pieces)
        if set(keys.values()) <= done:
            runner.finish()  # parts left by a kill between the append and the clean-up
            continue
        try:
            pieces = runner.run(u.piece, desc=u.name, progress=progress)
        except Interrupted as stop:
            every = [key for _, _, _, k in keyed for key in k.values()]
            raise Interrupted(f"{sum(k in done for k in every)} of {len(every)} {kind} rows in {rows_path}; "
                              f"{stop.kept}; the same command resumes from there") from None
        if pieces is None:
            continue
        made = u.merge(pieces, keys)
        common = {**_identity_fields(evaluation.row_type, ident), "checkpoint": t.checkpoint,
                  **environment(pieces[0].get("device", str(t.device)) if pieces else t.device),
                  "timestamp": now(), "data_sha256": data, "code": code}
        for row_name, key in keys.items():
            if key not in done:
                fields = {**common, **made[row_name], "key": key}  # an evaluation's own fields win
                append_row(rows_path, evaluation.row_type.build(**fields).to_dict())
                done.add(key)
        runner.finish()
        export_csv(read_rows(rows_path), out / "rows.csv")
    barrier()  # every row is in the file before anyone reads it back
    wanted = {k for _, _, _, keys in keyed for k in keys.values()}
    rows = [r for r in map(parse_row, read_rows(rows_path)) if r is not None and r.key in wanted]
    if main:
        evaluation.finish(rows, out)  # type: ignore[arg-type]
    return rows  # type: ignore[return-value]
