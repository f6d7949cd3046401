"""A bounds-checked reader of the MATLAB v5 subset SVHN's files use (real numeric arrays, plain or compressed
elements, either byte order), and the SVHN reader on top of it. scipy's ``loadmat`` can crash the process on a
corrupt file; every bad file here is a one-line :class:`UserError` naming it."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import UserError


def read_bytes(path: Path) -> bytes:
    """A whole file, or a one-line error naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


class _MatFormatError(ValueError):
    """A MAT file that breaks its own format (message without the path)."""


# MAT v5 storage types (miINT8 .. miUINT64) and numeric array classes (mxDOUBLE .. mxUINT64).
_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MX_DTYPES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15


def _mat_element(buf: memoryview, pos: int, order: str, padded: bool) -> tuple[int, memoryview, int]:
    """The data element at ``pos``: (type, payload, position after it); small elements included."""
    if pos + 8 > len(buf):
        raise _MatFormatError(f"truncated element tag at byte {pos}")
    word, nbytes = struct.unpack_from(order + "II", buf, pos)
    if word >> 16:  # small data element: type and size in one word, payload in the next four bytes
        mtype, nbytes = word & 0xFFFF, word >> 16
        if nbytes > 4:
            raise _MatFormatError(f"small element of {nbytes} bytes at byte {pos}")
        return mtype, buf[pos + 4: pos + 4 + nbytes], pos + 8
    end = pos + 8 + nbytes
    if end > len(buf):
        raise _MatFormatError(f"element at byte {pos} needs {nbytes} bytes, {len(buf) - pos - 8} left")
    return word, buf[pos + 8: end], (end + 7) // 8 * 8 if padded else end


def _mat_matrix(body: memoryview, order: str, wanted: tuple[str, ...]) -> tuple[str, np.ndarray | None]:
    """Name and value of one miMATRIX payload; the value is None for variables not in ``wanted``."""
    mtype, flags, pos = _mat_element(body, 0, order, True)
    if mtype != 6 or len(flags) != 8:
        raise _MatFormatError("matrix without array flags")
    (word,) = struct.unpack_from(order + "I", flags, 0)
    mtype, dims_raw, pos = _mat_element(body, pos, order, True)
    if mtype != 5 or len(dims_raw) < 8 or len(dims_raw) % 4:
        raise _MatFormatError("matrix without dimensions")
    dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=order + "i4"))
    mtype, name_raw, pos = _mat_element(body, pos, order, True)
    if mtype != 1:
        raise _MatFormatError("matrix without a name")
    name = bytes(name_raw).decode("latin-1")
    if name not in wanted:
        return name, None
    mx_class = word & 0xFF
    if mx_class not in _MX_DTYPES or word & 0x0800 or any(d < 0 for d in dims):
        raise _MatFormatError(f"{name} is not a real numeric array (class {mx_class}, dims {dims})")
    mtype, real, pos = _mat_element(body, pos, order, True)
    if mtype not in _MI_DTYPES:
        raise _MatFormatError(f"{name} has unknown storage type {mtype}")
    stored = np.dtype(order + _MI_DTYPES[mtype])
    count = int(np.prod(dims, dtype=object))
    if len(real) != count * stored.itemsize:
        raise _MatFormatError(f"{name} holds {len(real)} bytes, {dims} needs {count * stored.itemsize}")
    values = np.frombuffer(real, dtype=stored, count=count).astype(_MX_DTYPES[mx_class])
    return name, values.reshape(dims, order="F")


def read_mat_arrays(path: Path, wanted: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The real numeric arrays ``wanted`` of a MATLAB v5 file (plain or compressed elements, either byte order).

    A bounds-checked reader of just this subset: scipy's loadmat can crash the process on a corrupt file.
    """
    data = memoryview(read_bytes(path))
    if len(data) < 128:
        raise UserError(f"{path} is not a MATLAB v5 file ({len(data)} bytes, shorter than the header)")
    if bytes(data[:10]) == b"MATLAB 7.3":
        raise UserError(f"{path} is a MATLAB v7.3 (HDF5) file; save it as v7 (-v7) or use the official SVHN file")
    order = {b"IM": "<", b"MI": ">"}.get(bytes(data[126:128]))
    if order is None or struct.unpack_from(order + "H", data, 124)[0] != 0x0100:
        raise UserError(f"{path} is not a MATLAB v5 file (bad header)")
    found: dict[str, np.ndarray] = {}
    pos = 128
    try:
        while pos + 8 <= len(data) and len(found) < len(wanted):
            mtype, payload, pos = _mat_element(data, pos, order, False)
            if mtype == _MI_COMPRESSED:
                inner = memoryview(zlib.decompressobj().decompress(payload))
                mtype, payload, _ = _mat_element(inner, 0, order, False)
            if mtype != _MI_MATRIX:
                continue  # not a variable
            name, value = _mat_matrix(payload, order, wanted)
            if value is not None and name not in found:
                found[name] = value
    except (_MatFormatError, zlib.error) as exc:
        raise UserError(f"{path} is a corrupt MATLAB file ({exc})") from None
    except (ValueError, struct.error, OverflowError, MemoryError) as exc:
        raise UserError(f"{path} is a corrupt MATLAB file ({type(exc).__name__}: {exc})") from None
    return found


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat file: uint8 images (N, 3, 32, 32) and int64 labels 0..9 (the file's 10 is digit 0)."""
    mat = read_mat_arrays(path, ("X", "y"))
    for key in ("X", "y"):
        if key not in mat:
            raise UserError(f"{path} has no array {key!r}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise UserError(f"{path}: X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
    n = x.shape[3]
    if n == 0:
        raise UserError(f"{path} holds no images")
    if y.shape not in ((n, 1), (1, n)):
        raise UserError(f"{path}: y has shape {y.shape}, expected ({n}, 1)")
    y = y.reshape(-1)
    bad = np.flatnonzero(~np.isin(y, np.arange(1, 11)))  # also rejects NaN and fractions in a double y
    if bad.size:
        raise UserError(f"{path}: image {int(bad[0])} has label {y[bad[0]]}, outside 1..10")
    labels = y.astype(np.int64)
    labels[labels == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels
