"""Data sets as in-memory tensors: float images in [0,1] (NCHW), int64 labels, class names.

Fashion-MNIST is read straight from its IDX files (offline: ``--data-dir``, then the Debian package
``dataset-fashion-mnist``, then a torchvision download when torchvision is installed). CIFAR-10/100
and SVHN come through torchvision, imported lazily so that the CPU path never needs it.
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
    if data_dir is not None:  # an explicit directory is authoritative
        return [Path(data_dir)]
    dirs = []
    env = os.environ.get("ROBUST_JEM_DATA")
    if env:
        dirs.append(Path(env))
    dirs.append(DEBIAN_FASHION_DIR)
    return dirs


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
                torch.from_numpy(labels.astype(np.int64)), FASHION_CLASSES,
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
    except RuntimeError as exc:
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
        data_dir: where the files are (or go, with ``download``).
        download: allow a torchvision download when the files are missing (needs torchvision + network).
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; choose train or test")
    if name == "fashion-mnist":
        return _load_fashion_mnist(split, data_dir, download)
    return _load_torchvision(name, split, data_dir, download)


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
