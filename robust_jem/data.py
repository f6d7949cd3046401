"""Data sets as in-memory tensors: float images in [0,1] (NCHW), int64 labels, class names.

Every set is read straight from its official files, without torchvision:

- Fashion-MNIST: the four IDX files (optionally gzipped), searched in ``--data-dir``, else
  ``$ROBUST_JEM_DATA`` and the Debian package ``dataset-fashion-mnist``.
- CIFAR-10: the binary version, ``cifar-10-batches-bin/`` (``data_batch_1.bin`` .. ``data_batch_5.bin``,
  ``test_batch.bin``; records of 1 label byte + 3072 pixel bytes, R then G then B planes).
- CIFAR-100: the binary version, ``cifar-100-binary/`` (``train.bin``, ``test.bin``; records of a coarse
  and a fine label byte + 3072 pixel bytes; the fine label is used).
- SVHN: ``train_32x32.mat`` / ``test_32x32.mat`` (MATLAB v5; read by the small bounds-checked reader of :mod:`robust_jem.matfile`,
  since scipy's loadmat can segfault on a corrupt file), in the folder or its ``svhn/`` subfolder.

CIFAR and SVHN are searched in ``--data-dir`` (authoritative when given), else ``$ROBUST_JEM_DATA`` and
``~/.cache/robust-jem``; a CIFAR folder may also be the data dir itself. Only when the files are missing,
``download`` is allowed and torchvision imports (lazily, so the CPU path never needs it) does torchvision
fetch them. Every bad file is a one-line :class:`UserError` naming it; no partial data is returned.
"""

from __future__ import annotations

import gzip
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import UserError
from .matfile import read_bytes, read_svhn_mat

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "svhn")
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class ImageDataset:
    """Images stored as uint8 NCHW (compact); ``x`` gives float [0,1] on demand."""

    name: str
    split: str
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    classes: tuple[str, ...]
    files: tuple[str, ...] = ()  # the files it was read from (hashed into result rows)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def batch(self, index: torch.Tensor | slice | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float32 in [0,1]) and labels at ``index``."""
        return self.images[index].float().div_(255.0), self.labels[index]

    @property
    def x(self) -> torch.Tensor:
        """All images as float32 in [0,1]."""
        return self.images.float().div_(255.0)


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped): magic, dims, big-endian uint8 payload."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise UserError(f"{path} is truncated ({len(data) - offset} of {expected} bytes)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem, directory / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Directories searched for Fashion-MNIST, in order: ``data_dir`` alone when given, else
    ``$ROBUST_JEM_DATA`` and the Debian package's folder."""
    return _search_dirs(data_dir, DEBIAN_FASHION_DIR)


def _search_dirs(data_dir: str | os.PathLike | None, fallback: Path) -> list[Path]:
    """``data_dir`` alone when given (an explicit directory is authoritative), else ``$ROBUST_JEM_DATA`` and
    ``fallback``."""
    if data_dir is not None:
        return [Path(data_dir)]
    env = os.environ.get("ROBUST_JEM_DATA")
    return ([Path(env)] if env else []) + [fallback]


def _load_fashion_mnist(split: str, data_dir: str | os.PathLike | None, download: bool) -> ImageDataset:
    img_stem, lbl_stem = _FASHION_FILES[split]
    for directory in fashion_mnist_dirs(data_dir):
        img, lbl = _find_idx(directory, img_stem), _find_idx(directory, lbl_stem)
        if img and lbl:
            images = _read_idx(img)
            labels = _read_idx(lbl)
            if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
                raise UserError(f"Fashion-MNIST files in {directory} have inconsistent shapes")
            log.debug("Fashion-MNIST %s from %s", split, directory)
            return ImageDataset(
                "fashion-mnist", split, torch.from_numpy(images.copy()).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64)), FASHION_CLASSES, files=(str(img), str(lbl)),
            )
    if download:
        try:
            tv = _torchvision()
        except UserError:
            tv = None
        if tv is not None:
            root = str(data_dir or Path.home() / ".cache" / "robust-jem")
            try:
                ds = tv.datasets.FashionMNIST(root, train=split == "train", download=True)
            except (RuntimeError, OSError) as exc:
                raise UserError(f"Fashion-MNIST download into {root} failed ({exc})") from None
            return ImageDataset("fashion-mnist", split, ds.data.unsqueeze(1).clone(), ds.targets.long().clone(),
                                FASHION_CLASSES)
    searched = ", ".join(str(d) for d in fashion_mnist_dirs(data_dir))
    raise UserError(
        f"Fashion-MNIST not found (searched {searched}); install it with "
        "'sudo apt-get install dataset-fashion-mnist' or pass --data-dir DIR holding the four IDX .gz files"
    )



CACHE_SUBDIR = Path(".cache") / "robust-jem"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _CifarFormat:
    """Where one CIFAR binary version lives and how its records look."""

    title: str
    folder: str
    files: dict[str, tuple[str, ...]]
    label_bytes: int  # the last label byte is the one used
    n_classes: int
    label_limits: tuple[int, ...]  # exclusive upper bound of every label byte
    names_file: str
    default_classes: tuple[str, ...]
    url: str


_CIFAR = {
    "cifar10": _CifarFormat(
        "CIFAR-10", "cifar-10-batches-bin",
        {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
        1, 10, (10,), "batches.meta.txt", CIFAR10_CLASSES, "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    ),
    "cifar100": _CifarFormat(
        "CIFAR-100", "cifar-100-binary", {"train": ("train.bin",), "test": ("test.bin",)},
        2, 100, (20, 100), "fine_label_names.txt", tuple(str(i) for i in range(100)),
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    ),
}
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


def data_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Directories searched for CIFAR-10/100 and SVHN, in order: ``data_dir`` alone when given, else
    ``$ROBUST_JEM_DATA`` and the torchvision cache root ``~/.cache/robust-jem``."""
    return _search_dirs(data_dir, Path.home() / CACHE_SUBDIR)


def read_cifar_records(path: Path, label_bytes: int, label_limits: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR binary batch: uint8 images (N, 3, 32, 32) and the last label byte of each record (int64).

    Every label byte ``i`` must be below ``label_limits[i]``.
    """
    record = label_bytes + _PIXELS
    data = read_bytes(path)
    if not data:
        raise UserError(f"{path} is empty")
    if len(data) % record:
        raise UserError(f"{path} is truncated or not a CIFAR binary batch ({len(data)} bytes is not a multiple of "
                        f"the {record}-byte record)")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    for i, limit in enumerate(label_limits):
        bad = np.flatnonzero(rows[:, i] >= limit)
        if bad.size:
            raise UserError(f"{path}: record {int(bad[0])} has label {int(rows[bad[0], i])}, outside 0..{limit - 1}")
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy()  # R, G, B planes, each row-major 32x32
    return images, rows[:, label_bytes - 1].astype(np.int64)


def _read_class_names(path: Path, default: tuple[str, ...]) -> tuple[str, ...]:
    """Class names, one per line (blank lines ignored), from ``path`` when it exists, else ``default``."""
    if not path.is_file():
        return default
    try:
        text = read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != len(default):
        raise UserError(f"{path} lists {len(names)} class names, expected {len(default)}")
    return names


def _find_cifar(fmt: _CifarFormat, dirs: list[Path]) -> Path | None:
    """The first folder holding any of the files of ``fmt`` (``dir/<folder>`` or the dir itself)."""
    names = [n for files in fmt.files.values() for n in files]
    for directory in dirs:
        for candidate in (directory / fmt.folder, directory):
            if any((candidate / n).is_file() for n in names):
                return candidate
    return None


def _load_cifar(name: str, split: str, data_dir: str | os.PathLike | None, download: bool) -> ImageDataset:
    fmt = _CIFAR[name]
    dirs = data_dirs(data_dir)
    folder = _find_cifar(fmt, dirs)
    if folder is None:
        _fallback_or_fail(name, split, data_dir, download, dirs,
                          f"put {fmt.folder}/ ({', '.join(n for f in fmt.files.values() for n in f)}) from "
                          f"{fmt.url} in --data-dir")
        return _load_torchvision(name, split, data_dir, download)
    missing = [n for n in fmt.files[split] if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{fmt.title} {split} split incomplete in {folder}: missing {', '.join(missing)}")
    parts = [read_cifar_records(folder / n, fmt.label_bytes, fmt.label_limits) for n in fmt.files[split]]
    classes = _read_class_names(folder / fmt.names_file, fmt.default_classes)
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    log.debug("%s %s from %s", fmt.title, split, folder)
    return ImageDataset(name, split, torch.from_numpy(images), torch.from_numpy(labels), classes,
                        files=tuple(str(folder / n) for n in fmt.files[split]))


def _load_svhn(split: str, data_dir: str | os.PathLike | None, download: bool) -> ImageDataset:
    stem = _SVHN_FILES[split]
    dirs = data_dirs(data_dir)
    for directory in dirs:
        for path in (directory / stem, directory / "svhn" / stem):
            if path.is_file():
                images, labels = read_svhn_mat(path)
                log.debug("SVHN %s from %s", split, path)
                return ImageDataset("svhn", split, torch.from_numpy(images), torch.from_numpy(labels),
                                    tuple(str(i) for i in range(10)), files=(str(path),))
    _fallback_or_fail("svhn", split, data_dir, download, dirs,
                      f"put {stem} from {_SVHN_URL}{stem} in --data-dir (or its svhn/ folder)")
    return _load_torchvision("svhn", split, data_dir, download)


def _fallback_or_fail(name: str, split: str, data_dir: str | os.PathLike | None, download: bool,
                      dirs: list[Path], hint: str) -> None:
    """Return when torchvision may download ``name``; else raise the not-found error."""
    why = "download disabled"
    if download:
        try:
            _torchvision()
            return
        except UserError:
            why = "torchvision, which could download it, is not usable here"
    title = _CIFAR[name].title if name in _CIFAR else "SVHN"
    searched = ", ".join(str(d) for d in dirs)
    raise UserError(f"{title} {split} not found (searched {searched}; {why}); {hint}")


def _torchvision():
    try:
        import torchvision  # noqa: F401  (lazy: optional dependency)
    except Exception as exc:  # torchvision can fail with RuntimeError beside a CPU torch
        raise UserError(
            f"this data set needs torchvision, which is not usable here ({type(exc).__name__}); "
            "install it with 'pip install robust-jem[vision]' (a torchvision matching your torch)"
        ) from None
    return torchvision


def _load_torchvision(name: str, split: str, data_dir: str | os.PathLike | None, download: bool) -> ImageDataset:
    tv = _torchvision()
    root = str(data_dir or Path.home() / ".cache" / "robust-jem")
    train = split == "train"
    try:
        if name == "cifar10":
            ds = tv.datasets.CIFAR10(root, train=train, download=download)
            images, labels, classes = ds.data, ds.targets, ds.classes
        elif name == "cifar100":
            ds = tv.datasets.CIFAR100(root, train=train, download=download)
            images, labels, classes = ds.data, ds.targets, ds.classes
        else:
            ds = tv.datasets.SVHN(root, split="train" if train else "test", download=download)
            images, labels, classes = ds.data.transpose(0, 2, 3, 1), ds.labels, [str(i) for i in range(10)]
    except (RuntimeError, OSError) as exc:  # OSError: no network (URLError)
        raise UserError(f"{name} could not be loaded from or downloaded into {root} ({exc}); "
                        "pass --data-dir") from None
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(name, split, x, torch.as_tensor(np.asarray(labels), dtype=torch.int64), tuple(classes))


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 download: bool = True) -> ImageDataset:
    """Load a data set split as an :class:`ImageDataset` (images in [0,1] via ``.x``/``.batch``).

    Args:
        name: one of ``fashion-mnist``, ``cifar10``, ``cifar100``, ``svhn``.
        split: ``train`` or ``test``.
        data_dir: where the files are (or go, with ``download``); when given, the only place searched.
        download: allow a torchvision download when the native files are missing (needs torchvision + network).
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; choose train or test")
    if name == "fashion-mnist":
        return _load_fashion_mnist(split, data_dir, download)
    if name == "svhn":
        return _load_svhn(split, data_dir, download)
    return _load_cifar(name, split, data_dir, download)


class Prefetcher:
    """The batches of a deterministic schedule, loaded one step ahead.

    ``get(step)`` returns exactly ``fetch(step)`` moved to ``device``. With ``enabled``, a background thread
    gathers step+1's batch while step runs (into pinned host memory on CUDA, whose host-to-device copy is
    then issued on a side stream so it overlaps the previous step's kernels). Every call of ``fetch``
    happens on that one thread, so ``fetch`` needs no locking. Disabled, it is the plain synchronous
    gather-and-copy. Asking for a step out of order (a resume, a roll-back) just drops the look-ahead.

    Args:
        fetch: step -> (images, labels) on the host; a pure function of the step.
        device: where the batches go.
        enabled: look ahead (the ``prefetch`` training option).
    """

    def __init__(self, fetch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 enabled: bool = True) -> None:
        self.fetch, self.device = fetch, device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if enabled else None
        self._stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self._ahead: tuple[int, Future] | None = None

    def _host(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.fetch(step)
        return (x.pin_memory(), y.pin_memory()) if self._stream is not None else (x, y)

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``step`` on the device."""
        if self._pool is None:
            x, y = self.fetch(step)
            return x.to(self.device), y.to(self.device)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == step:
            x, y = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # let the stale look-ahead finish: fetch runs on one thread only
            x, y = self._pool.submit(self._host, step).result()
        self._ahead = (step + 1, self._pool.submit(self._host, step + 1))
        if self._stream is None:
            return x.to(self.device), y.to(self.device)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(main)  # the copy may reuse memory the main stream just freed
            xd, yd = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        main.wait_stream(self._stream)
        xd.record_stream(main)
        yd.record_stream(main)
        return xd, yd

    def close(self) -> None:
        """Stop the background thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None
