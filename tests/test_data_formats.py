"""Native CIFAR-10/100 and SVHN readers: exact round trips, bad files as one-line errors, a small fuzz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from conftest import assert_usage_error
from robust_jem import data as data_mod
from robust_jem.matfile import read_mat_arrays
from robust_jem.data import load_dataset
from robust_jem.errors import UserError

CIFAR10_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]


def cifar_images(n: int, seed: int) -> np.ndarray:
    """Random uint8 images (n, 3, 32, 32)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def write_cifar(path: Path, images: np.ndarray, *label_columns: np.ndarray) -> None:
    """A CIFAR binary batch: per record the label bytes, then the R, G, B planes (row-major)."""
    labels = np.stack(label_columns, axis=1).astype(np.uint8)
    path.write_bytes(np.concatenate([labels, images.reshape(len(images), -1)], axis=1).tobytes())


def write_cifar10(root: Path, per_file: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Five train batches and a test batch in ``root``; returns train/test images and labels."""
    root.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i, name in enumerate(CIFAR10_TRAIN):
        x, y = cifar_images(per_file, i), (np.arange(per_file) + i) % 10
        write_cifar(root / name, x, y)
        xs.append(x)
        ys.append(y)
    xt, yt = cifar_images(2, 99), np.array([9, 0])
    write_cifar(root / "test_batch.bin", xt, yt)
    return np.concatenate(xs), np.concatenate(ys), xt, yt


def write_svhn(path: Path, images_nchw: np.ndarray, labels_1_10: np.ndarray, **kwargs) -> None:
    """An SVHN .mat: X (32, 32, 3, N) uint8, y (N, 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"X": images_nchw.transpose(2, 3, 1, 0), "y": labels_1_10.reshape(-1, 1)}, **kwargs)


def one_line_error(exc: pytest.ExceptionInfo, name: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and name in msg, msg


# --- round trips -------------------------------------------------------------------------------------------


def test_cifar10_record_layout(tmp_path):
    rec = np.zeros(1 + 3072, dtype=np.uint8)
    rec[0] = 7
    rec[1 + 0 * 1024 + 0 * 32 + 1] = 11  # R, row 0, column 1
    rec[1 + 1 * 1024 + 2 * 32 + 0] = 22  # G, row 2, column 0
    rec[1 + 2 * 1024 + 31 * 32 + 31] = 33  # B, row 31, column 31
    (tmp_path / "test_batch.bin").write_bytes(rec.tobytes())
    ds = load_dataset("cifar10", "test", data_dir=tmp_path, download=False)  # the dir is the folder itself
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (1, 3, 32, 32)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [7]
    assert ds.images[0, 0, 0, 1] == 11 and ds.images[0, 1, 2, 0] == 22 and ds.images[0, 2, 31, 31] == 33
    assert int(ds.images.sum()) == 66
    assert ds.classes[7] == "horse" and len(ds.classes) == 10 and ds.name == "cifar10" and ds.split == "test"


def test_cifar10_concatenates_batches_in_order(tmp_path):
    x, y, xt, yt = write_cifar10(tmp_path / "cifar-10-batches-bin")
    train = load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    assert len(train) == 15 and train.shape == (3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(x)) and train.labels.tolist() == y.tolist()
    test = load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert torch.equal(test.images, torch.from_numpy(xt)) and test.labels.tolist() == yt.tolist()
    assert torch.allclose(test.x, torch.from_numpy(xt).float() / 255)


def test_cifar10_class_names_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10(folder)
    names = [f"c{i}" for i in range(10)]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n\n")
    assert load_dataset("cifar10", "test", data_dir=folder, download=False).classes == tuple(names)
    (folder / "batches.meta.txt").write_text("a\nb\n")
    with pytest.raises(UserError) as exc:
        load_dataset("cifar10", "test", data_dir=folder, download=False)
    one_line_error(exc, "batches.meta.txt")


def test_cifar100_uses_fine_label(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    x, coarse, fine = cifar_images(4, 1), np.array([0, 19, 5, 3]), np.array([99, 0, 42, 7])
    write_cifar(folder / "train.bin", x, coarse, fine)
    write_cifar(folder / "test.bin", x[:1], coarse[:1], fine[:1])
    ds = load_dataset("cifar100", "train", data_dir=tmp_path, download=False)
    assert torch.equal(ds.images, torch.from_numpy(x)) and ds.labels.tolist() == [99, 0, 42, 7]
    assert ds.classes == tuple(str(i) for i in range(100))
    (folder / "fine_label_names.txt").write_text("\n".join(f"n{i}" for i in range(100)))
    assert load_dataset("cifar100", "test", data_dir=folder, download=False).classes[99] == "n99"


@pytest.mark.parametrize("sub", ["", "svhn"])
def test_svhn_round_trip(tmp_path, sub):
    x = cifar_images(5, 3)
    x[0, 0, 1, 2], x[0, 1, 3, 4], x[0, 2, 5, 6] = 1, 2, 3
    write_svhn(tmp_path / sub / "train_32x32.mat", x, np.array([10, 1, 2, 9, 10], dtype=np.uint8))
    ds = load_dataset("svhn", "train", data_dir=tmp_path, download=False)
    assert ds.images.dtype == torch.uint8 and torch.equal(ds.images, torch.from_numpy(x))
    assert ds.images[0, 0, 1, 2] == 1 and ds.images[0, 1, 3, 4] == 2 and ds.images[0, 2, 5, 6] == 3
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 1, 2, 9, 0]
    assert ds.classes == tuple("0123456789")


def test_svhn_file_layout_is_hwcn(tmp_path):
    raw = np.zeros((32, 32, 3, 2), dtype=np.uint8)
    raw[4, 7, 2, 1] = 200  # row 4, column 7, blue, image 1
    scipy.io.savemat(str(tmp_path / "test_32x32.mat"), {"X": raw, "y": np.array([[3], [10]], dtype=np.uint8)})
    ds = load_dataset("svhn", "test", data_dir=tmp_path, download=False)
    assert ds.images.shape == (2, 3, 32, 32) and ds.images[1, 2, 4, 7] == 200 and int(ds.images.sum()) == 200
    assert ds.labels.tolist() == [3, 0]


def test_mat_reader_matches_scipy(tmp_path):
    rng = np.random.default_rng(5)
    arrays = {"other": rng.normal(size=(3, 4)), "X": rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8),
              "label_text": "ignored", "y": np.array([[10.0], [1.0], [5.0], [10.0]])}  # a double y, as MATLAB saves
    for compressed in (False, True):
        path = tmp_path / f"c{int(compressed)}" / "train_32x32.mat"
        path.parent.mkdir()
        scipy.io.savemat(str(path), arrays, do_compression=compressed)
        ref = scipy.io.loadmat(str(path))
        got = read_mat_arrays(path, ("X", "y", "other"))
        for key in ("X", "y", "other"):
            assert got[key].dtype == ref[key].dtype and np.array_equal(got[key], ref[key]), key
        ds = load_dataset("svhn", "train", data_dir=path.parent, download=False)
        assert ds.labels.tolist() == [0, 1, 5, 0]
        assert torch.equal(ds.images, torch.from_numpy(ref["X"].transpose(3, 2, 0, 1)))


def _mat_big_endian(variables: dict[str, tuple[int, int, np.ndarray]]) -> bytes:
    """A hand-made big-endian MAT v5 file: name -> (array class, storage type, array)."""
    import struct

    def element(mtype: int, payload: bytes) -> bytes:
        return struct.pack(">II", mtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)

    out = b"MATLAB 5.0 MAT-file, hand-made".ljust(116) + b"\0" * 8 + struct.pack(">H", 0x0100) + b"MI"
    for name, (mx_class, mi_type, arr) in variables.items():
        body = (element(6, struct.pack(">II", mx_class, 0)) + element(5, struct.pack(f">{arr.ndim}i", *arr.shape))
                + element(1, name.encode()) + element(mi_type, arr.astype(arr.dtype.newbyteorder(">")).tobytes("F")))
        out += element(14, body)
    return out


def test_mat_reader_big_endian(tmp_path):
    x = cifar_images(2, 4)
    raw = x.transpose(2, 3, 1, 0)
    (tmp_path / "test_32x32.mat").write_bytes(_mat_big_endian(
        {"X": (9, 2, raw), "y": (6, 3, np.array([[10], [7]], dtype=np.int16))}))  # double class, int16 storage
    ds = load_dataset("svhn", "test", data_dir=tmp_path, download=False)
    assert torch.equal(ds.images, torch.from_numpy(x)) and ds.labels.tolist() == [0, 7]


def test_mat_unknown_storage_type_is_an_error_not_a_crash(tmp_path):
    # scipy 1.17's loadmat segfaults on exactly this file (X's data tag type 2 -> 0x102)
    path = tmp_path / "test_32x32.mat"
    write_svhn(path, cifar_images(3, 0), np.array([10, 2, 3], dtype=np.uint8))
    buf = bytearray(path.read_bytes())
    assert buf[184:188] == bytes([2, 0, 0, 0])  # after the matrix tag, flags, dims and the small name element
    buf[185] ^= 1
    path.write_bytes(bytes(buf))
    with pytest.raises(UserError) as exc:
        load_dataset("svhn", "test", data_dir=tmp_path, download=False)
    one_line_error(exc, "test_32x32.mat")
    assert "storage type 258" in str(exc.value)


# --- bad input ---------------------------------------------------------------------------------------------


def test_cifar_truncated_empty_and_bad_label(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10(folder)
    path = folder / "test_batch.bin"
    good = path.read_bytes()
    for bad, words in ((good[:-1], "truncated"), (b"", "empty")):
        path.write_bytes(bad)
        with pytest.raises(UserError) as exc:
            load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
        one_line_error(exc, "test_batch.bin")
        assert words in str(exc.value)
    path.write_bytes(bytes([10]) + good[1:])
    with pytest.raises(UserError) as exc:
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    one_line_error(exc, "test_batch.bin")
    assert "label 10" in str(exc.value)


def test_cifar100_bad_coarse_label(tmp_path):
    write_cifar(tmp_path / "test.bin", cifar_images(2, 0), np.array([3, 20]), np.array([1, 2]))
    with pytest.raises(UserError) as exc:
        load_dataset("cifar100", "test", data_dir=tmp_path, download=False)
    one_line_error(exc, "test.bin")


def test_cifar_missing_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10(folder)
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(UserError) as exc:
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    one_line_error(exc, "data_batch_3.bin")
    assert len(load_dataset("cifar10", "test", data_dir=tmp_path, download=False)) == 2


def test_svhn_bad_files(tmp_path):
    path = tmp_path / "test_32x32.mat"
    cases = {
        "garbage": lambda: path.write_bytes(np.random.default_rng(0).bytes(5000)),
        "no X": lambda: scipy.io.savemat(str(path), {"y": np.ones((2, 1), np.uint8)}),
        "no y": lambda: scipy.io.savemat(str(path), {"X": np.zeros((32, 32, 3, 2), np.uint8)}),
        "X float": lambda: scipy.io.savemat(str(path), {"X": np.zeros((32, 32, 3, 2)), "y": np.ones((2, 1))}),
        "X shape": lambda: scipy.io.savemat(str(path), {"X": np.zeros((3, 32, 32, 2), np.uint8),
                                                         "y": np.ones((2, 1), np.uint8)}),
        "y length": lambda: scipy.io.savemat(str(path), {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                          "y": np.ones((3, 1), np.uint8)}),
        "label 0": lambda: scipy.io.savemat(str(path), {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                         "y": np.array([[1], [0]], np.uint8)}),
        "label 11": lambda: scipy.io.savemat(str(path), {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                          "y": np.array([[11], [1]], np.uint8)}),
        "empty": lambda: path.write_bytes(b""),
    }
    for case, write in cases.items():
        write()
        with pytest.raises(UserError) as exc:
            load_dataset("svhn", "test", data_dir=tmp_path, download=False)
        one_line_error(exc, "test_32x32.mat")
    write_svhn(path, cifar_images(2, 0), np.array([1, 2]))
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError) as exc:
        load_dataset("svhn", "test", data_dir=tmp_path, download=False)
    one_line_error(exc, "test_32x32.mat")


@pytest.mark.parametrize("name,expect", [("cifar10", "cifar-10-batches-bin"), ("cifar100", "cifar-100-binary"),
                                         ("svhn", "test_32x32.mat")])
def test_not_found_names_folders_and_files(tmp_path, monkeypatch, name, expect):
    def no_torchvision():
        raise UserError("no torchvision")

    monkeypatch.setattr(data_mod, "_torchvision", no_torchvision)
    for download in (False, True):
        with pytest.raises(UserError) as exc:
            load_dataset(name, "test", data_dir=tmp_path, download=download)
        one_line_error(exc, str(tmp_path))
        assert expect in str(exc.value) and "not found" in str(exc.value)


def test_search_order(tmp_path, monkeypatch):
    env, home = tmp_path / "env", tmp_path / "home"
    monkeypatch.setenv("ROBUST_JEM_DATA", str(env))
    monkeypatch.setenv("HOME", str(home))
    assert data_mod.data_dirs(None) == [env, home / ".cache" / "robust-jem"]
    assert data_mod.data_dirs(tmp_path) == [tmp_path]
    write_cifar10(home / ".cache" / "robust-jem" / "cifar-10-batches-bin")
    assert len(load_dataset("cifar10", "test", download=False)) == 2
    env.mkdir()
    write_cifar(env / "test_batch.bin", cifar_images(1, 0), np.array([4]))  # the env dir comes first
    assert load_dataset("cifar10", "test", download=False).labels.tolist() == [4]


# --- CLI ---------------------------------------------------------------------------------------------------


def test_cli_data_check(tmp_path, run_cli):
    good = tmp_path / "good"
    write_cifar10(good / "cifar-10-batches-bin")
    res = run_cli("data-check", "--dataset", "cifar10", "--data-dir", str(good))
    assert res.code == 0, res.err
    assert "cifar10 train: 15 images 3x32x32, 10 classes" in res.out
    assert "cifar10 test: 2 images 3x32x32, 10 classes" in res.out
    bad = tmp_path / "bad"
    write_cifar10(bad)
    (bad / "data_batch_2.bin").write_bytes((bad / "data_batch_2.bin").read_bytes()[:-100])
    res = run_cli("data-check", "--dataset", "cifar10", "--data-dir", str(bad))
    assert_usage_error(res)
    assert len(res.err.strip().splitlines()) == 1 and "data_batch_2.bin" in res.err


# --- fuzz --------------------------------------------------------------------------------------------------


def _hostile(good: bytes, rng: np.random.Generator, i: int) -> bytes:
    kind = i % 4
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 2 * len(good) + 1)))
    if kind == 1:
        return good[: int(rng.integers(0, len(good)))]
    buf = bytearray(good)
    for _ in range(int(rng.integers(1, 9 if kind == 2 else 65))):
        pos = int(rng.integers(0, len(buf)))
        buf[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf)


def _check_consistent(ds, n_classes: int) -> None:
    assert ds.images.dtype == torch.uint8 and ds.images.ndim == 4 and ds.images.shape[1:] == (3, 32, 32)
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (ds.images.shape[0],) and len(ds) > 0
    assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) < n_classes and len(ds.classes) == n_classes


@pytest.mark.parametrize("fmt", ["cifar10", "svhn", "svhn-compressed"])
def test_fuzz_hostile_files(tmp_path, fmt):
    rng = np.random.default_rng({"cifar10": 1, "svhn": 2, "svhn-compressed": 3}[fmt])
    if fmt == "cifar10":
        path, name = tmp_path / "test_batch.bin", "cifar10"
        write_cifar(path, cifar_images(3, 0), np.array([1, 2, 3]))
    else:
        path, name = tmp_path / "test_32x32.mat", "svhn"
        write_svhn(path, cifar_images(3, 0), np.array([10, 2, 3], dtype=np.uint8),
                   do_compression=fmt == "svhn-compressed")
    good = path.read_bytes()
    outcomes = {"loaded": 0, "error": 0}
    for i in range(120):
        path.write_bytes(_hostile(good, rng, i))
        try:
            ds = load_dataset(name, "test", data_dir=tmp_path, download=False)
        except UserError as exc:
            assert "\n" not in str(exc) and path.name in str(exc), str(exc)
            outcomes["error"] += 1
        else:
            _check_consistent(ds, 10)
            outcomes["loaded"] += 1
    assert outcomes["error"] > 0, outcomes
    if fmt != "svhn-compressed":  # any flip in a zlib stream fails its checksum; raw pixel flips still load
        assert outcomes["loaded"] > 0, outcomes
