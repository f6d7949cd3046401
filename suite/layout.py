"""Where the study keeps its models (torch-free, so commands can look before loading anything)."""

from __future__ import annotations

from pathlib import Path

from robust_jem.errors import UserError


def study_model_dir(runs_dir: Path, preset: str, dataset: str, objective: str) -> Path:
    """The run folder of one study model: ``runs_dir/PRESET-DATASET/OBJECTIVE``."""
    return Path(runs_dir) / f"{preset}-{dataset}" / objective


def find_study_models(runs_dir: Path = Path("runs"),
                      objectives: tuple[str, ...] = ("ce", "pgd-at", "jem")) -> tuple[Path, dict[str, Path]]:
    """The models of the most recent study on disk (``runs_dir/PRESET-DATASET/OBJECTIVE/final.pt``, the newest
    folder holding all of ``objectives``), for commands typed without ``--checkpoint``.

    Raises:
        UserError: no study's models there, with how to make them.
    """
    found = []
    for d in sorted(runs_dir.glob("*")) if runs_dir.is_dir() else []:
        paths = {o: d / o / "final.pt" for o in objectives}
        if all(p.is_file() for p in paths.values()):
            found.append((max(p.stat().st_mtime for p in paths.values()), d, paths))
    if not found:
        raise UserError(f"no --checkpoint given and no study's models ({', '.join(objectives)}) in {runs_dir}/: run "
                        f"./run_all.sh first (the quick study trains them), or pass --checkpoint PATH")
    _, d, paths = max(found, key=lambda t: t[0])
    return d, paths
