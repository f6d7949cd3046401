"""Where a number came from: git sha, file hashes, library versions, timestamps."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the CLI answers --help without it
    import torch


_REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def git_sha() -> str:
    """HEAD of the source tree, with ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (cached by path, size and mtime)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' shapes, dtypes and bytes (in the order given): the identity of data held in memory."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def module_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's class and its state (parameter and buffer names, shapes and bytes): the identity of
    weights that come from no checkpoint file, so two models never share a result row."""
    state = module.state_dict()
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(tensors_sha256(state[name]).encode())
    return h.hexdigest()


def now() -> str:
    """UTC timestamp, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def device_slug(name: str) -> str:
    """A file-name part from a :func:`device_name`: the text in its last parentheses (or all of it), lower case,
    every other character a dash (``cpu (AMD EPYC, 2 threads)`` -> ``amd-epyc--2-threads``)."""
    return "".join(ch if ch.isalnum() else "-" for ch in name.split("(")[-1].rstrip(")")).strip("-").lower()


def device_name(device: torch.device | str) -> str:
    """Human-readable device description (GPU name, or CPU model and thread count)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


@functools.lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    """Versions of the libraries whose code computes our numbers (``absent`` when not installed)."""
    from importlib import metadata

    import torch

    out = {"torch_version": str(torch.__version__)}
    for name in ("torchattacks", "foolbox", "numpy"):
        try:
            out[f"{name}_version"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"{name}_version"] = "absent"
    return out


@functools.lru_cache(maxsize=None)
def _source(path: Path) -> bytes:
    """A source file's bytes, read once per process (see :func:`code_hash`)."""
    return path.read_bytes()


def code_hash(*files: str | os.PathLike) -> str:
    """Short hash of source files (their bytes, in the order given): which code computed a number.

    Each file is read once per process, and the project's own modules when this module is imported (with them, in
    practice): a row is labelled with the code the process started with, like :func:`git_sha`, even when the files
    are edited while it runs (read at each call, a long run's later rows carried the edited files' hash while the
    code in memory was the old one)."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode())
        h.update(_source(Path(f).resolve()))
    return h.hexdigest()[:16]


for _package in ("attacks", "infra", "robust_jem", "suite"):  # the sources as imported, before anything runs
    for _file in sorted((_REPO / _package).glob("*.py")):
        _source(_file.resolve())
git_sha()  # and the tree they came from


def environment(device: torch.device | str) -> dict[str, str]:
    """Git sha, library versions, device and Python for a result row."""
    return {"git_sha": git_sha(), **library_versions(), "device": device_name(device),
            "python": platform.python_version()}
