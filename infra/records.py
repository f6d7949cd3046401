"""Result rows: one JSON object per line in ``RUN/rows.jsonl``, plus a CSV export.

Every row carries its full configuration and provenance (see :func:`provenance_fields`). Appends are
a single ``write`` of one line followed by fsync, so a kill leaves at most one torn last line, which
:func:`read_rows` skips (and :func:`append_row` repairs). A row is identified by its ``key`` (a stable
string built from the fields that define the experiment) so a re-run can skip finished rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .io import atomic_write
from .provenance import environment, file_sha256, now

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ROWS = "rows.jsonl"


def row_key(fields: dict[str, Any]) -> str:
    """Stable short hash of the fields that define an experiment (order-independent)."""
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def provenance_fields(checkpoint: str | os.PathLike | None, device: torch.device | str) -> dict[str, Any]:
    """Checkpoint path + sha256, git sha, torch version, device, timestamp."""
    out: dict[str, Any] = dict(environment(device))
    out["timestamp"] = now()
    if checkpoint is not None:
        out["checkpoint"] = str(checkpoint)
        out["checkpoint_sha256"] = file_sha256(checkpoint)
    return out


def _repair_tail(path: Path) -> None:
    """Drop a torn (unterminated) last line left by a kill during an append."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)
    log.warning("%s: dropped a torn last line", path)


def append_row(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one row (one ``write`` + fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    line = (json.dumps(row, sort_keys=False, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete rows of a JSONL file (a torn last line is skipped); [] if the file is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / ROWS
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            log.warning("%s:%d: skipping an unreadable line", path, i + 1)
    return rows


def done_keys(path: str | os.PathLike) -> set[str]:
    """Keys of the rows already in ``path`` (for resuming a sweep)."""
    return {r["key"] for r in read_rows(path) if "key" in r}


def _flat(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, name + "."))
        elif isinstance(v, list) and len(v) > 16:
            out[name] = f"<{len(v)} values>"
        elif isinstance(v, list):
            out[name] = json.dumps(v)
        else:
            out[name] = v
    return out


def export_csv(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write rows as CSV (nested dicts flattened with dots; long lists summarised), atomically."""
    flat = [_flat(r) for r in rows]
    columns: list[str] = []
    for r in flat:
        columns.extend(c for c in r if c not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    atomic_write(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------
# per-batch parts of a row (resume inside a row; sharding over torchrun ranks)
# ------------------------------------------------------------------------------------------------
PARTS = "parts"


class Parts:
    """The pieces of one row on disk, one JSON file per batch: ``RUN/parts/NAME/BBBBB.json``.

    Each file is written atomically (:func:`infra.io.atomic_write`), so a piece is either whole or
    absent; a kill loses only the batch in progress. Whoever finds every piece present merges them into
    the row and calls :meth:`remove`. An unreadable piece counts as absent (it is recomputed).

    Args:
        run_dir: the run directory (``RUN``).
        name: identifies the row and everything that shapes its batches (e.g. ``KEY-bs64``).
        n_batches: how many pieces make the row.
    """

    def __init__(self, run_dir: str | os.PathLike, name: str, n_batches: int) -> None:
        self.dir = Path(run_dir) / PARTS / name
        self.n_batches = int(n_batches)

    def path(self, b: int) -> Path:
        return self.dir / f"{b:05d}.json"

    def read(self, b: int) -> dict[str, Any] | None:
        """Piece ``b``, or None if it is missing or unreadable."""
        try:
            return json.loads(self.path(b).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("%s is unreadable; it will be recomputed", self.path(b))
            return None

    def has(self, b: int) -> bool:
        return self.read(b) is not None

    def write(self, b: int, piece: dict[str, Any]) -> None:
        """Store piece ``b`` atomically."""
        atomic_write(self.path(b), json.dumps(piece, allow_nan=False))

    def read_all(self) -> list[dict[str, Any]] | None:
        """Every piece in batch order, or None while any is missing."""
        pieces = [self.read(b) for b in range(self.n_batches)]
        return None if any(p is None for p in pieces) else pieces  # type: ignore[return-value]

    def remove(self) -> None:
        """Delete the pieces (after their row was appended)."""
        if self.dir.exists():
            for p in self.dir.iterdir():
                p.unlink()
            self.dir.rmdir()
        parent = self.dir.parent
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
