"""A training run's folder: its metric log (appended row by row, truncated on resume or roll-back) and what an
existing folder holds (the same run to finish or resume, or another config's run to leave alone)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infra.io import atomic_write

from .checkpoint import read_checkpoint
from .config import TrainConfig
from .errors import AnotherRun


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only metric rows up to ``step`` (so a resumed run logs each step once)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if row.get("step", 0) <= step:
            keep.append(line)
    text = "".join(line + "\n" for line in keep)
    atomic_write(path, text)


def _config_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """``name: a vs b`` for every (nested) field where two configs differ."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return [f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def existing_run(cfg: TrainConfig, out: Path) -> str | None:
    """What to do with a run folder that already holds a checkpoint: ``"finished"`` (final.pt of this very
    config), ``"resume"`` (last.pt of this config) or None (nothing there). Another config is refused: a run is
    never started over silently."""
    for name, verdict in (("final.pt", "finished"), ("last.pt", "resume")):
        path = out / name
        if path.exists():
            stored = read_checkpoint(path)["config"]
            diff = _config_differences(stored, cfg)
            if diff:
                raise AnotherRun(f"{out} holds a run with another config ({'; '.join(diff[:3])}"
                                 f"{' ...' if len(diff) > 3 else ''})")
            return verdict
    return None
