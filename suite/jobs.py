"""What every evaluation job shares: checking the output folder, the data's hashes and its sanity, the budgets,
refusing another run's folder, a subset of a split, a job as JSON."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from attacks.common import check_eps
from attacks.white import WHITE_NORMS
from infra.io import check_out_dir
from infra.records import ROWS, read_rows
from robust_jem.data import ImageDataset
from robust_jem.errors import UserError

log = logging.getLogger(__name__)


def job_json(obj: Any) -> Any:
    """A job as JSON-able data (for stages.jsonl)."""
    return json.loads(json.dumps(asdict(obj), default=list))


def prepare_out(out: str | Path) -> Path:
    """Check that ``out`` can be written (one-line error when not; created by its first file) and return it."""
    out = Path(out)
    check_out_dir(out)
    return out


def data_hashes(ds: ImageDataset) -> dict[str, str]:
    """file name -> sha256 of the files a data set was read from (recorded in every attack row)."""
    from infra.provenance import file_sha256

    return {Path(f).name: file_sha256(f) for f in ds.files}


def warn_if_wrong_data(rows: Sequence[Any], loaded: Sequence[Any]) -> list[str]:
    """A loud warning when a defense's clean accuracy on the attacked images is far below the test accuracy
    its checkpoint recorded in training: the data are probably not what it was trained on (e.g. MNIST files
    under Fashion-MNIST names). Returns the warnings."""
    recorded = {c.sha256: (c.info.get("metrics") or {}).get("test_acc") for c in loaded}
    seen: dict[str, list[Any]] = {}
    for r in rows:
        if r.checkpoint_sha256 in recorded and recorded[r.checkpoint_sha256] is not None:
            seen.setdefault(r.checkpoint_sha256, []).append(r)
    out = []
    for sha, rs in seen.items():
        n = sum(r.n for r in rs)
        clean = sum(r.clean_acc * r.n for r in rs) / max(n, 1)
        want = float(recorded[sha])
        if n >= 20 and clean < want - max(0.15, 3 * (want * (1 - want) / max(rs[0].n, 1)) ** 0.5):
            msg = (f"WARNING: {rs[0].model} is {100 * clean:.0f} % correct on the attacked clean images but its "
                   f"checkpoint recorded {100 * want:.0f} % test accuracy: are these the data it was trained on? "
                   f"(data files: {', '.join(f'{k} {v[:12]}' for k, v in (getattr(rs[0], 'data_sha256', {}) or {}).items())})")
            log.warning(msg)
            out.append(msg)
    return out


def check_budgets(norms: Sequence[str], eps: Sequence[float], shape: Sequence[int]) -> None:
    """Unit errors in a budget, before any work: a norm the white-box attacks do not know, and
    :func:`attacks.common.check_eps` for every norm and ε (L∞ above 1, L2 beyond the diagonal of images of ``shape``
    (C, H, W), negative)."""
    for norm in norms:
        if norm not in WHITE_NORMS:
            raise UserError(f"unknown norm {norm!r}; choose from {', '.join(WHITE_NORMS)}")
        for e in eps:
            check_eps(norm, float(e), tuple(int(d) for d in shape))


def refuse_foreign_rows(out: str | Path, checkpoints: Sequence[str | Path], hint: str = "pass another --out", *,
                        data_sha256: dict[str, str] | None = None) -> None:
    """Refuse to add rows to a run folder holding another run's results: rows of other checkpoints, or (when
    ``data_sha256`` is given) rows computed on other data. Its finished rows would be skipped as done, and its
    report would mix two runs, or combine per-example outcomes whose example indices name other images."""
    from infra.provenance import file_sha256

    path = Path(out) / ROWS
    if not path.is_file():
        return
    rows = read_rows(path)
    ours = {file_sha256(c) for c in checkpoints if Path(c).is_file()}
    foreign = {r["checkpoint_sha256"] for r in rows if r.get("checkpoint_sha256")} - ours
    if foreign:
        raise UserError(f"{out} holds rows of {len(foreign)} other checkpoint(s) (another run's results); {hint}")
    if data_sha256 is not None:
        want = dict(sorted(data_sha256.items()))
        other = {json.dumps(r["data_sha256"], sort_keys=True) for r in rows
                 if r.get("data_sha256") and dict(sorted(r["data_sha256"].items())) != want}
        if other:
            raise UserError(f"{out} holds rows computed on other data ({len(other)} other data set(s)); {hint}")


def subset(ds: ImageDataset, n: int | None) -> ImageDataset:
    if n is None or n >= len(ds):
        return ds
    return ImageDataset(ds.name, ds.split, ds.images[:n], ds.labels[:n], ds.classes)
