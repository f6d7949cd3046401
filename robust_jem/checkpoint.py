"""Self-describing checkpoints: atomic writes, weights-only loads.

A checkpoint is a ``torch.save`` of plain containers and tensors (config as JSON text, weights,
optimiser, RNG states, replay buffer, provenance). It is written to a temporary file, fsynced and
renamed, so a kill at any moment leaves either the old or the new file, never a torn one. It is read
with ``torch.load(weights_only=True)``, which refuses pickles that carry code.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from attacks.provenance import git_sha, now
from .config import TrainConfig
from .errors import UserError
from .model import EnergyModel

FORMAT = "robust-jem-checkpoint"
VERSION = 1
_REQUIRED = ("format", "version", "config", "model", "step")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | os.PathLike, *, cfg: TrainConfig, model: EnergyModel, step: int,
                    classes: tuple[str, ...], optimizer: dict | None = None, buffer: torch.Tensor | None = None,
                    rng: dict[str, torch.Tensor] | None = None, metrics: dict[str, Any] | None = None,
                    state: dict[str, Any] | None = None) -> None:
    """Write a checkpoint atomically. Everything stored is a tensor or a plain container."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "objective": cfg.objective,
        "dataset": cfg.dataset,
        "input_shape": [cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size],
        "classes": list(classes),
        "step": int(step),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer,
        "buffer": None if buffer is None else buffer.detach().cpu(),
        "rng": rng or {},
        "metrics": json.dumps(metrics or {}),
        "state": json.dumps(state or {}),
        "git_sha": git_sha(),
        "torch_version": str(torch.__version__),
        "created": now(),
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint dict without executing pickled code.

    Raises:
        UserError: missing, truncated, foreign or code-carrying files, each with a one-line message.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln]
        why = lines[0].split(":", 1)[1].strip().split(".")[0] if lines else type(exc).__name__
        raise UserError(f"{path} refused: it is not a weights-only checkpoint ({why[:120]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable checkpoint (corrupt or truncated: {first[:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or any(k not in ckpt for k in _REQUIRED):
        raise UserError(f"{path} is not a robust-jem checkpoint")
    if ckpt["version"] != VERSION:
        raise UserError(f"{path} has checkpoint format version {ckpt['version']}, this robust-jem reads {VERSION}")
    try:
        ckpt["config"] = TrainConfig.from_dict(json.loads(ckpt["config"]))
        ckpt["metrics"] = json.loads(ckpt.get("metrics") or "{}")
        ckpt["state"] = json.loads(ckpt.get("state") or "{}")
    except (TypeError, ValueError, UserError) as exc:
        raise UserError(f"{path} has an unreadable config ({exc})") from None
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> EnergyModel:
    """Build the model the checkpoint's config describes and load its weights strictly."""
    model = EnergyModel(ckpt["config"].model)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not match the architecture in its config ({first[:120]})") from None
    return model


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> EnergyModel:
    """Load a checkpoint as an eval-mode ``nn.Module`` mapping [0,1] images to logits.

    The module carries ``.checkpoint_info`` (objective, data set, classes, step, config, metrics).
    """
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    model.checkpoint_info = {  # type: ignore[attr-defined]
        k: ckpt.get(k) for k in ("objective", "dataset", "input_shape", "classes", "step", "metrics", "git_sha")
    }
    model.checkpoint_info["config"] = ckpt["config"]  # type: ignore[attr-defined]
    return model
