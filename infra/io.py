"""The one atomic writer of the suite: every file robust-jem writes goes through :func:`atomic_write`.

A reader sees the old file or the new one, never a part of it: the bytes go to a temporary file beside
the target, which is flushed and fsynced, renamed over the target, and the folder is fsynced so the
rename itself survives a power cut. On any error the temporary file is removed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union

from .errors import InputError

Payload = Union[bytes, str, Callable[[IO[bytes]], None]]


def check_out_dir(out: str | os.PathLike) -> None:
    """Fail early (one line, nothing written) when the output folder ``out`` could not be created or written.

    Nothing is created here: the folder appears with the first file written into it, so a command that fails
    on its input leaves no empty folder behind.
    """
    out = Path(out)
    probe = out
    while not probe.exists():
        if probe.is_symlink():
            raise InputError(f"output folder {out} cannot be created (dangling link {probe})")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"output folder {out} cannot be created ({probe} is not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"output folder {out} is not writable" if probe == out else
                         f"output folder {out} cannot be created ({probe} is not writable)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder (makes a rename or a new file in it durable); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: Payload) -> Path:
    """Write ``data`` (bytes, text, or a ``write(file)`` callback) to ``path`` atomically; returns ``path``.

    The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path
