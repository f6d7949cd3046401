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
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from infra.io import atomic_write
from infra.provenance import git_sha, now
from .config import TrainConfig
from .errors import UserError
from .model import EnergyModel

FORMAT = "robust-jem-checkpoint"
VERSION = 1
_REQUIRED = ("format", "version", "config", "model", "step")


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


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most ~150 characters), for one-line errors."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip()[:120] if lines else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint dict without executing pickled code.

    Raises:
        UserError: missing, truncated, foreign, malformed or code-carrying files, each with a one-line
            message (the original exception, if any, is kept as ``__cause__``).
    """
    path = Path(path)
    describe = _describe
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():  # a corrupt pickle stream, not a refused one
            raise UserError(f"{path} is not a readable checkpoint (corrupt or truncated: {describe(exc)})") from exc
        lines = [ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln]
        why = lines[0].split(":", 1)[1].strip().split(".")[0] if lines else type(exc).__name__
        raise UserError(f"{path} refused: it is not a weights-only checkpoint ({why[:120]})") from exc
    except Exception as exc:  # noqa: BLE001
        # The one boundary with torch's zip reader and unpickler: on corrupt or foreign bytes they raise
        # almost any type (IndexError, KeyError, RuntimeError, EOFError, ValueError, OverflowError,
        # MemoryError, ...). Each becomes a one-line UserError that names it; nothing is swallowed.
        raise UserError(f"{path} is not a readable checkpoint (corrupt or truncated: {describe(exc)})") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("format"), str) or ckpt["format"] != FORMAT \
            or any(k not in ckpt for k in _REQUIRED):
        raise UserError(f"{path} is not a robust-jem checkpoint")
    if isinstance(ckpt["version"], bool) or not isinstance(ckpt["version"], int) or ckpt["version"] != VERSION:
        raise UserError(f"{path} has checkpoint format version {str(ckpt['version'])[:40]!r}, this robust-jem "
                        f"reads {VERSION}")
    for key, ok in (("objective", lambda v: isinstance(v, str)), ("dataset", lambda v: isinstance(v, str)),
                    ("classes", lambda v: isinstance(v, (list, tuple)) and all(isinstance(c, str) for c in v)),
                    ("input_shape", lambda v: isinstance(v, (list, tuple)) and len(v) == 3
                     and all(isinstance(d, int) and not isinstance(d, bool) for d in v))):
        if key in ckpt and not ok(ckpt[key]):
            raise UserError(f"{path} is malformed: its {key} entry has the wrong type")
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise UserError(f"{path} is malformed: its weights are not a dict of named tensors")
    if isinstance(ckpt["step"], bool) or not isinstance(ckpt["step"], int):
        raise UserError(f"{path} is malformed: step is a {type(ckpt['step']).__name__}, not an int")
    if ckpt.get("buffer") is not None and not isinstance(ckpt["buffer"], torch.Tensor):
        raise UserError(f"{path} is malformed: its replay buffer is not a tensor")
    try:
        cfg = TrainConfig.from_dict(json.loads(ckpt["config"]))
        metrics = json.loads(ckpt.get("metrics") or "{}")
        state = json.loads(ckpt.get("state") or "{}")
    except Exception as exc:  # noqa: BLE001 -- decoding arbitrary stored text: any failure means "malformed"
        raise UserError(f"{path} has an unreadable config ({describe(exc)})") from exc
    def fits(value: Any, default: Any) -> bool:
        if default is None:
            return True
        if isinstance(default, bool):
            return isinstance(value, bool)
        if isinstance(default, (int, float)):  # any JSON number (ints stand for floats); a bool is neither
            return not isinstance(value, bool) and isinstance(value, (int, float))
        if isinstance(default, tuple):
            return isinstance(value, tuple) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in value)
        return isinstance(value, type(default))

    for part in (cfg, cfg.model, cfg.sgld):  # JSON can carry any type: each field must keep its default's type
        defaults = type(part)()
        bad = [f.name for f in fields(part) if not fits(getattr(part, f.name), getattr(defaults, f.name))]
        if bad:
            raise UserError(f"{path} has an unreadable config ({type(part).__name__}.{bad[0]} has the wrong type)")
    if not isinstance(metrics, dict) or not isinstance(state, dict):
        raise UserError(f"{path} is malformed: its metrics/state are not JSON objects")
    ckpt["config"], ckpt["metrics"], ckpt["state"] = cfg, metrics, state
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

    The module carries ``.checkpoint_info`` (objective, data set, classes, step, config, metrics,
    whether it holds a replay buffer).
    """
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    model.checkpoint_info = {  # type: ignore[attr-defined]
        k: ckpt.get(k) for k in ("objective", "dataset", "input_shape", "classes", "step", "metrics", "git_sha")
    }
    model.checkpoint_info["config"] = ckpt["config"]  # type: ignore[attr-defined]
    model.checkpoint_info["has_buffer"] = ckpt.get("buffer") is not None  # type: ignore[attr-defined]
    return model
