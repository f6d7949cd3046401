"""The whole study behind ``./run_all.sh``: train (or reuse) the models, attack them, write the report.

Every stage is resumable: trained models are reused when their config and the training code match,
interrupted trainings resume from ``last.pt``, and attack sweeps skip rows already in ``rows.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from .checkpoint import atomic_write, read_checkpoint
from .config import TrainConfig, preset_config
from .errors import UserError
from .train import train

log = logging.getLogger(__name__)

STUDY_OBJECTIVES = ("ce", "pgd-at", "jem")
_CODE_FILES = ("config.py", "data.py", "model.py", "nets.py", "sgld.py", "train.py", "checkpoint.py")


def code_hash() -> str:
    """Hash of the source files that determine a trained model."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _stamp(cfg: TrainConfig) -> dict:
    return {"config": cfg.to_dict(), "code": code_hash()}


def train_or_reuse(cfg: TrainConfig, out: Path, device: torch.device, data_dir: str | None = None,
                   progress: bool = True) -> Path:
    """Return ``out/final.pt``, training it unless a finished run with the same config and code exists.

    An interrupted run with the same stamp resumes from ``last.pt``; any other content of ``out`` is
    replaced by a fresh run.
    """
    stamp_path = out / "stamp.json"
    want = _stamp(cfg)
    same = stamp_path.exists() and json.loads(stamp_path.read_text()) == want
    final, last = out / "final.pt", out / "last.pt"
    if same and final.exists():
        read_checkpoint(final)  # a corrupt file is an error, not a silent reuse
        log.info("reusing %s (same config and code)", final)
        return final
    out.mkdir(parents=True, exist_ok=True)
    if same and last.exists():
        log.info("resuming %s from step %d", out, read_checkpoint(last)["step"])
        return train(None, out, device=device, resume=True, data_dir=data_dir, progress=progress)
    for stale in (final, last):
        stale.unlink(missing_ok=True)
    atomic_write(stamp_path, lambda f: f.write(json.dumps(want, indent=1).encode()))
    return train(cfg, out, device=device, data_dir=data_dir, progress=progress)


def train_models(preset: str, dataset: str, runs_dir: Path, device: torch.device, data_dir: str | None = None,
                 progress: bool = True) -> dict[str, Path]:
    """Train or reuse the study's models (CE, PGD-AT, JEM); returns objective -> final.pt."""
    out: dict[str, Path] = {}
    for objective in STUDY_OBJECTIVES:
        cfg = preset_config(preset, objective, dataset)
        out[objective] = train_or_reuse(cfg, runs_dir / f"{preset}-{dataset}" / objective, device, data_dir, progress)
    return out


def run_study(preset: str = "quick", dataset: str | None = None, name: str | None = None,
              device: torch.device | str = "cpu", data_dir: str | None = None, results_dir: Path = Path("results"),
              runs_dir: Path = Path("runs"), progress: bool = True) -> Path:
    """Run the study for ``preset`` and return its results directory."""
    dataset = dataset or ("cifar10" if preset == "cifar10-paper" else "fashion-mnist")
    if preset not in ("quick", "cifar10-paper", "tiny"):
        raise UserError(f"unknown preset {preset!r}")
    device = torch.device(device)
    run_dir = results_dir / (name or f"{preset}-{dataset}")
    run_dir.mkdir(parents=True, exist_ok=True)
    models = train_models(preset, dataset, runs_dir, device, data_dir, progress)
    for objective, path in models.items():
        log.info("%s: %s", objective, path)
    return run_dir
