"""Import checkpoints written by the official JEM code (github.com/wgrathwohl/JEM) or by JEM++ as native checkpoints.

The official ``train_wrn_ebm.py`` saves ``torch.save({"model_state_dict": f.state_dict(), "replay_buffer": buf})``
where ``f`` is ``CCF`` (class-conditional: logits = ``class_output(f(x))``) or ``F`` (unconditional: one output
``energy_output(f(x))`` read as log p(x) up to a constant). Both classes own *both* heads, so the state dict
does not say which one was trained: the caller does (``unconditional``). The backbone ``f`` is a
pre-activation WRN-depth-width without normalisation (``norm=None``), LeakyReLU(0.2), inputs in [-1, 1],
ending in LeakyReLU + ``avg_pool2d(out, 8)``; its own ``f.linear`` layer is never used. The replay buffer is
(N, C, 32, 32) in [-1, 1] -- the same internal space our :class:`~robust_jem.model.EnergyModel` works in.

Key mapping onto our :class:`~robust_jem.nets.WideResNet` (``EnergyModel.net``), n = (depth - 4) / 6:

====================================  =======================================
official                              ours
====================================  =======================================
``f.conv1.*``                         ``net.conv1.*``
``f.layer{g}.{i}.conv1.*``            ``net.blocks.{(g-1)*n+i}.conv1.*``
``f.layer{g}.{i}.conv2.*``            ``net.blocks.{(g-1)*n+i}.conv2.*``
``f.layer{g}.{i}.shortcut.0.*``       ``net.blocks.{(g-1)*n+i}.shortcut.*``
``class_output.*`` (or, unconditional, ``energy_output.*``)  ``net.fc.*``
``f.linear.*``, the other head        dropped (unused by the official forward)
``f.layer{g}.{i}.bn{1,2}.*``          ``net.blocks.{(g-1)*n+i}.bn{1,2}.*`` (BatchNorm models)
``f.bn1.*``                           ``net.bn.*`` (BatchNorm models: before the last activation)
``f.layer_one.*``, ``f.other_layers.*``  dropped after checking they equal ``f.conv1``, ``f.layer{1,2,3}``, ``f.bn1``
====================================  =======================================

JEM++ (github.com/sndnyang/JEMPP) saves the same ``{"model_state_dict", "replay_buffer"}`` dict from the same
``CCF`` layout around its YOPO WRN (``models/wideresnet_yopo.py``), usually with ``--norm batch``: its extra keys
are the aliases in the last row. BatchNorm models are imported with ``ModelConfig(norm="batch")`` and, like every
model here, run in eval mode (running statistics, never updated); their labels say ``[BN eval]``, and they cannot
be trained further here.

The two forwards are the same function for inputs whose last feature map is 8x8 (29-32 pixels): ours pools
adaptively, the official code with a fixed 8x8 kernel, so other sizes are refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from infra.io import check_out_dir
from .checkpoint import FORMAT, save_checkpoint
from .config import DATASET_SHAPES, ModelConfig, preset_config
from .errors import UserError
from .model import EnergyModel

__all__ = ["import_official", "read_official"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
UNCONDITIONAL_CLASSES = ("unconditional",)
LEAK = 0.2  # wide_basic's default; Wide_ResNet and F never pass another value
_ZIP_MAGIC = b"PK\x03\x04"

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BACKBONE = re.compile(r"f\.conv1\.(weight|bias)|f\.bn1\." + _BN)
_BLOCK = re.compile(r"f\.layer([123])\.(0|[1-9][0-9]{0,3})\.((conv1|conv2|shortcut\.0)\.(weight|bias)|(bn1|bn2)\."
                    + _BN + ")")
_HEAD = re.compile(r"(class_output|energy_output|f\.linear)\.(weight|bias)")
_NORM = re.compile(r"(^|\.)(bn\d*|norm\d*|running_mean|running_var|num_batches_tracked)(\.|$)")
# JEM++'s YOPO WRN registers its layers twice: conv1 as layer_one, layer1..3 and the final bn1 in other_layers
_ALIAS = re.compile(r"f\.layer_one\.(weight|bias)|f\.other_layers\.([0-3])\.(.+)")


def _one_line(text: object, limit: int = 160) -> str:
    lines = str(text).strip().splitlines()
    return (lines[0].strip() if lines else "")[:limit]


def _keys(keys: list[str], limit: int = 3) -> str:
    """A few state-dict keys for a message, control characters escaped (keys come from untrusted files)."""
    shown = [k.encode("unicode_escape").decode("ascii")[:60] for k in keys[:limit]]
    return ", ".join(shown) + (", …" if len(keys) > limit else "")


def read_official(src: str | os.PathLike) -> tuple[Any, str, str]:
    """Read ``src`` with ``torch.load(weights_only=True)``; return ``(payload, format, sha256)``.

    ``format`` is ``"zip"`` (torch >= 1.6) or ``"legacy"`` (the older, non-zip serialisation). The sha256 is of
    the bytes that were loaded.

    Raises:
        UserError: missing, unreadable, corrupt or code-carrying files (one-line message).
    """
    src = Path(src)
    if not src.is_file():
        raise UserError(f"official checkpoint {src} not found")
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {src}: {_one_line(exc.strerror or exc)}") from exc
    if not data:
        raise UserError(f"{src} is empty, not a checkpoint")
    fmt = "zip" if data[:4] == _ZIP_MAGIC else "legacy"
    sha = hashlib.sha256(data).hexdigest()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            why = next((ln.split(":", 1)[-1].strip() for ln in str(exc).splitlines()
                        if "WeightsUnpickler error" in ln), "it holds objects other than tensors and containers")
            raise UserError(f"{src} refused: it is not a weights-only checkpoint ({_one_line(why, 120)})") from exc
        raise UserError(f"{src} is not a readable checkpoint (corrupt or truncated: {_one_line(exc, 120)})") from exc
    except Exception as exc:  # noqa: BLE001 -- the unpickler/zip reader raise almost any type on corrupt bytes
        detail = _one_line(exc, 120)
        what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise UserError(f"{src} is not a readable {fmt}-format checkpoint ({what})") from exc
    return payload, fmt, sha


def _split_payload(payload: Any, src: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, list[str]]:
    """(state dict with any ``module.`` prefix removed, replay buffer or None, ignored top-level keys)."""
    if not isinstance(payload, dict):
        raise UserError(f"{src} holds a {type(payload).__name__}, not a state dict or a "
                        "{'model_state_dict', 'replay_buffer'} dict")
    if isinstance(payload.get("format"), str) and payload["format"] == FORMAT:
        raise UserError(f"{src} is already a robust-jem checkpoint; load it directly")
    ignored: list[str] = []
    buffer: Any = None
    if "model_state_dict" in payload:
        state = payload["model_state_dict"]
        buffer = payload.get("replay_buffer")
        ignored = sorted(str(k) for k in payload if k not in ("model_state_dict", "replay_buffer"))
        if not isinstance(state, dict):
            raise UserError(f"{src}: model_state_dict is a {type(state).__name__}, not a dict of tensors")
    else:
        state = payload
    if not state:
        raise UserError(f"{src}: the state dict is empty")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{src}: the state dict is not a dict of named tensors (entry {_keys([repr(bad[0])])})")
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel / DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    if isinstance(buffer, (list, tuple)) and len(buffer) == 0:  # the official eval scripts use [] for "none"
        buffer = None
    if buffer is not None and not isinstance(buffer, torch.Tensor):
        raise UserError(f"{src}: replay_buffer is a {type(buffer).__name__}, not a tensor")
    return state, buffer, ignored


def _alias_of(key: str) -> str | None:
    """The original key a JEM++ alias duplicates (None: not an alias)."""
    m = _ALIAS.fullmatch(key)
    if not m:
        return None
    if m.group(1):
        return f"f.conv1.{m.group(1)}"
    group, rest = int(m.group(2)), m.group(3)
    return f"f.bn1.{rest}" if group == 3 else f"f.layer{group + 1}.{rest}"


def _drop_aliases(state: dict[str, torch.Tensor], src: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict without JEM++'s duplicate registrations, each checked equal to its original; and whether
    there were any (the file was written by JEM++'s YOPO WRN)."""
    aliases = {k: _alias_of(k) for k in state if _alias_of(k) is not None}
    for alias, original in aliases.items():
        if original not in state:
            raise UserError(f"{src}: {_keys([alias])} duplicates {_keys([str(original)])}, which is missing")
        if state[alias].shape != state[original].shape or not torch.equal(state[alias], state[original]):
            raise UserError(f"{src}: {_keys([alias])} differs from {_keys([str(original)])}, the layer it registers "
                            "twice")
    return {k: v for k, v in state.items() if k not in aliases}, bool(aliases)


def _infer_architecture(state: dict[str, torch.Tensor], src: Path) -> tuple[int, int, int, str]:
    """(depth, width, in_channels, norm) of the JEM-family WRN whose weights ``state`` holds (aliases dropped):
    ``norm`` is ``"batch"`` when it has BatchNorm layers (JEM++, or the official code with ``--norm batch``)."""
    unknown = sorted(k for k in state if not (_BACKBONE.fullmatch(k) or _BLOCK.fullmatch(k) or _HEAD.fullmatch(k)))
    if unknown:
        norm_like = [k for k in unknown if _NORM.search(k)]
        if norm_like:
            raise UserError(f"{src} contains normalisation layers the suite does not know ({_keys(norm_like)}): only "
                            "BatchNorm (with running statistics) before each activation, as in JEM++, is supported")
        raise UserError(f"{src}: keys not in a JEM-family WRN state dict ({_keys(unknown)})")
    bn = sorted(k for k in state if _NORM.search(k))
    if bn and not any(k.endswith("running_mean") for k in bn):
        raise UserError(f"{src}: normalisation layers without running statistics ({_keys(bn)}): instance, layer or "
                        "act norm are not supported, only BatchNorm")
    blocks: dict[int, set[int]] = {1: set(), 2: set(), 3: set()}
    for k in state:
        m = _BLOCK.fullmatch(k)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
    n = len(blocks[1])
    for g in (1, 2, 3):
        if blocks[g] != set(range(n)) or n == 0:
            raise UserError(f"{src}: layer{g} has blocks {sorted(blocks[g])[:8]}, expected 0..n-1 with the same n "
                            f"in every group (n = {n} in layer1)")
    for key in ("f.conv1.weight", "f.layer1.0.conv1.weight"):
        if key not in state:
            raise UserError(f"{src}: missing {key}")
        if state[key].dim() != 4:
            raise UserError(f"{src}: {key} has shape {list(state[key].shape)}, expected a 4-d conv weight")
    out = int(state["f.layer1.0.conv1.weight"].shape[0])
    if out < 16 or out % 16:
        raise UserError(f"{src}: f.layer1.0.conv1 has {out} output channels, not 16 x width")
    return 6 * n + 4, out // 16, int(state["f.conv1.weight"].shape[1]), "batch" if bn else "none"


def _official_name(ours: str, n: int, head: str) -> str:
    """Our ``EnergyModel`` key -> the official key it is loaded from (the table in the module docstring)."""
    parts = ours.split(".")  # net.conv1.p | net.blocks.{k}.{conv1|conv2|shortcut|bn1|bn2}.p | net.bn.p | net.fc.p
    if parts[1] == "bn":
        return f"f.bn1.{parts[2]}"
    if parts[1] == "blocks":
        k = int(parts[2])
        layer = "shortcut.0" if parts[3] == "shortcut" else parts[3]
        return f"f.layer{k // n + 1}.{k % n}.{layer}.{parts[4]}"
    return f"{head}.{parts[2]}" if parts[1] == "fc" else "f." + ".".join(parts[1:])


def _map_weights(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size], n: int, head: str,
                 src: Path) -> dict[str, torch.Tensor]:
    """Our state dict from the official one: same keys and shapes, finite floats; the unused heads dropped."""
    names = {ours: _official_name(ours, n, head) for ours in shapes}
    unused = {"f.linear.weight", "f.linear.bias", "class_output.weight", "class_output.bias",
              "energy_output.weight", "energy_output.bias"}
    missing = [off for off in names.values() if off not in state]
    extra = sorted(set(state) - set(names.values()) - unused)
    if missing or extra:
        raise UserError(f"{src}: {'missing' if missing else 'unexpected'} weights for a WRN-{6 * n + 4} "
                        f"({_keys(missing or extra)})")
    out: dict[str, torch.Tensor] = {}
    for ours, shape in shapes.items():
        off, v = names[ours], state[names[ours]]
        if tuple(v.shape) != tuple(shape):
            raise UserError(f"{src}: {off} has shape {list(v.shape)}, the WRN it describes needs {list(shape)}")
        if off.endswith("num_batches_tracked"):
            if v.is_floating_point() or v.is_complex():
                raise UserError(f"{src}: {off} is {v.dtype}, not an integer count")
            out[ours] = v
            continue
        if not v.is_floating_point():
            raise UserError(f"{src}: {off} is {v.dtype}, not a floating-point tensor")
        if not bool(torch.isfinite(v).all()):
            raise UserError(f"{src}: {off} contains NaN or infinite values")
        out[ours] = v
    return out


def _final_map(size: int) -> int:
    """Side of our WRN's last feature map for ``size`` pixels (two stride-2 3x3 convs, padding 1)."""
    for _ in range(2):
        size = (size - 1) // 2 + 1
    return size


def import_official(src: str | os.PathLike, dst: str | os.PathLike, *, dataset: str | None = None,
                    unconditional: bool = False) -> Path:
    """Convert an official JEM checkpoint ``src`` into a native robust-jem checkpoint ``dst``.

    Args:
        src: ``torch.save`` of ``{"model_state_dict", "replay_buffer"}`` (or of a bare state dict), zip or legacy
            format, optionally with a ``module.`` (DataParallel/DDP) prefix on every key.
        dst: the native checkpoint to write (atomically; overwritten when present, never equal to ``src``).
        dataset: the data set it was trained on (default ``"cifar10"``); channels, image size and, for a
            class-conditional model, the class count must match it.
        unconditional: the file holds the official unconditional ``F`` (trained with ``--uncond``): its
            ``energy_output`` becomes a single logit, so ``energy(x) = -f(x)`` is the official energy, but
            the model does not classify (one "class"). Default: ``CCF``, logits from ``class_output``.

    Returns:
        ``dst``. The native config is ``arch="wrn"`` with the inferred depth/width, ``objective="jem"``,
        ``preset="imported"`` and otherwise the ``cifar10-paper`` JEM settings (the official training
        recipe); ``sgld.buffer_size`` is the buffer's length. ``state``/``metrics["imported_from"]`` record
        the source path, sha256, file format, model class and ignored top-level keys.

    Raises:
        UserError: unreadable or foreign files, normalisation layers other than BatchNorm, missing keys, wrong
            shapes, non-finite weights, a data set mismatch; nothing is written then.
    """
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        raise UserError(f"{dst} is a folder; give the path of the checkpoint file to write")
    if dst.exists() and dst.resolve() == src.resolve():
        raise UserError(f"{dst}: the output would overwrite the official checkpoint it is read from")
    check_out_dir(dst.parent)  # a bad --out is one line, before the (large) source is read
    dataset = dataset or "cifar10"
    if dataset not in DATASET_SHAPES:
        raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASET_SHAPES)}")
    channels, size, n_data_classes = DATASET_SHAPES[dataset]

    payload, fmt, sha = read_official(src)
    state, buffer, ignored = _split_payload(payload, src)
    state, yopo = _drop_aliases(state, src)
    depth, width, in_channels, norm = _infer_architecture(state, src)
    head = "energy_output" if unconditional else "class_output"
    if f"{head}.weight" not in state or state[f"{head}.weight"].dim() != 2:
        other = "energy_output (pass unconditional only for an F trained with --uncond)" if unconditional else \
            "class_output, the classifier head (an unconditional F would be imported with unconditional=True)"
        raise UserError(f"{src}: no 2-d {head}.weight; the model needs {other}")
    n_classes = int(state[f"{head}.weight"].shape[0])
    if unconditional and n_classes != 1:
        raise UserError(f"{src}: energy_output has {n_classes} outputs, an unconditional JEM has 1")

    if in_channels != channels:
        raise UserError(f"{src}: the model takes {in_channels} input channels, {dataset} has {channels}")
    if not unconditional and n_classes != n_data_classes:
        raise UserError(f"{src}: class_output has {n_classes} classes, {dataset} has {n_data_classes}; "
                        "pass the data set it was trained on")
    if buffer is not None:
        if buffer.dim() != 4 or tuple(buffer.shape[1:]) != (channels, size, size) or buffer.shape[0] == 0:
            raise UserError(f"{src}: replay buffer of shape {list(buffer.shape)}, expected (N, {channels}, {size}, "
                            f"{size}) for {dataset}")
        if not buffer.is_floating_point() or not bool(torch.isfinite(buffer).all()):
            raise UserError(f"{src}: the replay buffer is not finite floating-point data")
        buffer = buffer.float()
    if _final_map(size) != 8:
        raise UserError(f"{dataset} images are {size}x{size}: the official WRN avg-pools an 8x8 map with a fixed "
                        "kernel and ours pools adaptively, so only 29-32 pixel images import exactly")

    mcfg = ModelConfig(arch="wrn", in_channels=in_channels, image_size=size, n_classes=n_classes, depth=depth,
                       width=width, leak=LEAK, dropout=0.0, norm=norm)
    base = preset_config("cifar10-paper", "jem", dataset)
    sgld = base.sgld if buffer is None else replace(base.sgld, buffer_size=int(buffer.shape[0]))
    cfg = replace(base, preset="imported", model=mcfg, sgld=sgld).validate()

    with torch.device("meta"):  # shapes only: a corrupt width cannot allocate a giant model
        shapes = {k: v.shape for k, v in EnergyModel(mcfg).state_dict().items()}
    mapped = _map_weights(state, shapes, (depth - 4) // 6, head, src)
    model = EnergyModel(mcfg)
    try:
        model.load_state_dict(mapped, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:  # guarded above; kept as a last line
        raise UserError(f"{src}: weights do not load into the WRN ({_one_line(exc, 120)})") from exc

    if unconditional:
        classes: tuple[str, ...] = UNCONDITIONAL_CLASSES
    elif dataset == "cifar10":
        classes = CIFAR10_CLASSES
    elif dataset == "fashion-mnist":
        from .data import FASHION_CLASSES
        classes = tuple(FASHION_CLASSES)
    else:
        classes = tuple(str(i) for i in range(n_classes))
    provenance = {"path": str(src.resolve()), "sha256": sha, "format": fmt,
                  "code": "JEM++ (YOPO WRN)" if yopo else "JEM", "norm": norm,
                  "model": "F (unconditional)" if unconditional else "CCF", "head": head,
                  "ignored_keys": ignored, "buffer": buffer is not None}
    try:
        save_checkpoint(dst, cfg=cfg, model=model, step=0, classes=classes, buffer=buffer,
                        metrics={"imported_from": provenance}, state={"imported_from": provenance})
    except OSError as exc:
        raise UserError(f"cannot write {dst}: {_one_line(exc.strerror or exc)}") from exc
    return dst
