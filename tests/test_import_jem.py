"""Importing official JEM checkpoints (robust_jem.official) and reading hostile checkpoint files.

The "official" model below is written for these tests from the layout of github.com/wgrathwohl/JEM
(``train_wrn_ebm.py``'s ``F``/``CCF`` around ``wideresnet.py``'s ``Wide_ResNet``): the same module names, so
the same state-dict keys, and the same forward pass -- pre-activation blocks (norm -> LeakyReLU(0.2) -> conv),
a 1x1 conv shortcut where the shape changes, LeakyReLU then a fixed 8x8 average pool, inputs in [-1, 1].
"""

from __future__ import annotations

import hashlib
import io
import random
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from robust_jem import UserError, load
from robust_jem.checkpoint import read_checkpoint, save_checkpoint
from robust_jem.config import preset_config
from robust_jem.model import EnergyModel
from robust_jem.official import import_official


# --- the official layout, reproduced for the tests --------------------------------------------------------

class _Norm(nn.Module):
    """``norm=None`` in the official code: an identity without parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _norm(c: int, norm: str | None) -> nn.Module:
    return nn.BatchNorm2d(c, momentum=0.9) if norm == "batch" else _Norm()


class OfficialBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str | None) -> None:
        super().__init__()
        self.lrelu = nn.LeakyReLU(0.2)
        self.bn1 = _norm(c_in, norm)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=True)
        self.dropout = _Norm()
        self.bn2 = _norm(c_out, norm)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.conv1(self.lrelu(self.bn1(x))))
        h = self.conv2(self.lrelu(self.bn2(h)))
        return h + self.shortcut(x)


class OfficialWRN(nn.Module):
    def __init__(self, depth: int, width: int, in_channels: int = 3, norm: str | None = None) -> None:
        super().__init__()
        n = (depth - 4) // 6
        stages = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=True)
        c = 16
        for g, (planes, stride) in enumerate(zip(stages[1:], (1, 2, 2)), start=1):
            blocks = []
            for i in range(n):
                blocks.append(OfficialBlock(c, planes, stride if i == 0 else 1, norm))
                c = planes
            setattr(self, f"layer{g}", nn.Sequential(*blocks))
        self.bn1 = _norm(c, norm)
        self.lrelu = nn.LeakyReLU(0.2)
        self.last_dim = c
        self.linear = nn.Linear(c, 10)  # present in every official checkpoint, never used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        h = F.avg_pool2d(self.lrelu(self.bn1(h)), 8)
        return h.view(h.size(0), -1)


class OfficialF(nn.Module):
    """``F`` (unconditional; ``CCF`` has the same modules and reads ``class_output``)."""

    def __init__(self, depth: int = 10, width: int = 2, n_classes: int = 10, norm: str | None = None) -> None:
        super().__init__()
        self.f = OfficialWRN(depth, width, norm=norm)
        self.energy_output = nn.Linear(self.f.last_dim, 1)
        self.class_output = nn.Linear(self.f.last_dim, n_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # F: log p(z) up to a constant
        return self.energy_output(self.f(z)).squeeze()

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.class_output(self.f(z)).squeeze()


def official_model(seed: int, depth: int = 10, width: int = 2, norm: str | None = None) -> OfficialF:
    torch.manual_seed(seed)
    return OfficialF(depth, width, norm=norm).eval()


def save_official(path: Path, model: nn.Module, buffer: torch.Tensor | None, fmt: str = "zip",
                  raw: bool = False) -> Path:
    obj = model.state_dict() if raw else {"model_state_dict": model.state_dict(), "replay_buffer": buffer}
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def one_line_error(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# --- import: same function, buffer kept, provenance recorded ----------------------------------------------

@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("depth,width", [(10, 2), (16, 1)])  # (16, 1): two blocks a group, no layer1 shortcut
def test_import_matches_official(tmp_path: Path, fmt: str, depth: int, width: int) -> None:
    off = official_model(1, depth, width)
    buffer = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    src = save_official(tmp_path / f"official-{fmt}.pt", off, buffer, fmt)
    dst = import_official(src, tmp_path / "native.pt")

    model = load(dst)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = off.classify(x * 2 - 1)
        got = model(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.energy(x), -want.logsumexp(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.logits_z(buffer[:3]), off.classify(buffer[:3]), atol=1e-5, rtol=0)

    ckpt = read_checkpoint(dst)
    cfg = ckpt["config"]
    assert (cfg.objective, cfg.dataset, cfg.preset) == ("jem", "cifar10", "imported")
    assert (cfg.model.arch, cfg.model.depth, cfg.model.width, cfg.model.n_classes) == ("wrn", depth, width, 10)
    assert (cfg.model.in_channels, cfg.model.image_size, cfg.sgld.buffer_size) == (3, 32, 12)
    assert torch.equal(ckpt["buffer"], buffer)
    prov = ckpt["state"]["imported_from"]
    assert prov["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert prov["format"] == fmt and prov["path"] == str(src.resolve()) and prov["model"] == "CCF"
    assert model.checkpoint_info["metrics"]["imported_from"] == prov
    assert not any(k.startswith("net.fc") and "linear" in k for k in ckpt["model"])


def test_raw_state_dict_with_ddp_prefix(tmp_path: Path) -> None:
    off = official_model(4)
    sd = {f"module.{k}": v for k, v in off.state_dict().items()}  # as saved from a DataParallel/DDP wrapper
    torch.save(sd, tmp_path / "raw.pt")
    dst = import_official(tmp_path / "raw.pt", tmp_path / "native.pt", dataset="svhn")
    ckpt = read_checkpoint(dst)
    assert ckpt["buffer"] is None and ckpt["dataset"] == "svhn" and ckpt["config"].model.image_size == 32
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load(dst)(x), off.classify(x * 2 - 1), atol=1e-5, rtol=0)


def test_unconditional_energy_is_official(tmp_path: Path) -> None:
    off = official_model(5)
    src = save_official(tmp_path / "f.pt", off, torch.rand(4, 3, 32, 32) * 2 - 1)
    model = load(import_official(src, tmp_path / "native.pt", unconditional=True))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (3, 1)
        torch.testing.assert_close(model.energy(x), -off(x * 2 - 1), atol=1e-5, rtol=0)
    assert model.checkpoint_info["classes"] == ["unconditional"]


# --- refusals: one line, nothing written ------------------------------------------------------------------

class YopoWRN(OfficialWRN):
    """JEM++'s YOPO WRN (``models/wideresnet_yopo.py``): the same layers, registered twice (``layer_one`` is
    ``conv1``; ``other_layers`` holds ``layer1..3`` and ``bn1``), so its state dict has those aliases too."""

    def __init__(self, depth: int, width: int, norm: str | None = "batch") -> None:
        super().__init__(depth, width, norm=norm)
        self.layer_one = self.conv1
        self.other_layers = nn.ModuleList([self.layer1, self.layer2, self.layer3, self.bn1])


def jempp_model(seed: int, depth: int = 10, width: int = 1) -> OfficialF:
    """A JEM++ CCF with BatchNorm whose running statistics are not the initial ones (so eval mode matters)."""
    torch.manual_seed(seed)
    model = OfficialF(depth, width, norm="batch")
    model.f = YopoWRN(depth, width)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.classify(torch.rand(8, 3, 32, 32) * 3 - 1.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["official --norm batch", "JEM++ YOPO"])
def test_batchnorm_checkpoints_import_and_run_in_eval_mode(tmp_path: Path, kind: str) -> None:
    off = official_model(6, norm="batch") if kind.startswith("official") else jempp_model(6)
    if kind.startswith("official"):  # non-trivial running statistics here too
        off.train()
        with torch.no_grad():
            off.classify(torch.rand(8, 3, 32, 32) * 3 - 1.5)
        off.eval()
    assert any("running_mean" in k for k in off.state_dict())
    src = save_official(tmp_path / "bn.pt", off, None)
    model = load(import_official(src, tmp_path / "native.pt"))
    assert not model.training
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), off.classify(x * 2 - 1), atol=1e-5, rtol=0)
    prov = model.checkpoint_info["metrics"]["imported_from"]
    assert prov["norm"] == "batch" and prov["code"] == ("JEM++ (YOPO WRN)" if "YOPO" in kind else "JEM")

    from suite.targets import Chain, Loaded, build_targets
    loaded = [Loaded(str(tmp_path / "native.pt"), "0" * 64, model.requires_grad_(False), model.checkpoint_info)]
    assert {t.label for t in build_targets(loaded, Chain((0, 1)))} == {"JEM-0[BN eval]", "JEM-1[BN eval]"}

    from robust_jem.train import train
    with pytest.raises(UserError, match="batch-norm models are imported"):
        train(read_checkpoint(tmp_path / "native.pt")["config"], tmp_path / "again", progress=False)


def test_batchnorm_aliases_and_other_norms_refused(tmp_path: Path) -> None:
    sd = {k: v.clone() for k, v in jempp_model(7).state_dict().items()}
    sd["f.other_layers.1.0.conv1.weight"] += 1.0  # an alias that is not its original
    torch.save({"model_state_dict": sd}, tmp_path / "alias.pt")
    with pytest.raises(UserError) as exc:
        import_official(tmp_path / "alias.pt", tmp_path / "native.pt")
    assert "differs from" in one_line_error(exc) and "f.layer2.0.conv1.weight" in one_line_error(exc)
    sd = {k: v for k, v in official_model(8, norm="batch").state_dict().items()
          if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}  # affine instance norm
    torch.save({"model_state_dict": sd}, tmp_path / "instance.pt")
    with pytest.raises(UserError) as exc:
        import_official(tmp_path / "instance.pt", tmp_path / "native.pt")
    assert "without running statistics" in one_line_error(exc)
    assert not (tmp_path / "native.pt").exists()


def _mutations() -> dict[str, object]:
    def drop(sd: dict) -> dict:
        del sd["f.layer2.0.conv2.bias"]
        return sd

    def reshape(sd: dict) -> dict:
        sd["class_output.weight"] = sd["class_output.weight"][:, :-1]
        return sd

    def extra(sd: dict) -> dict:
        sd["f.layer1.0.attention.weight"] = torch.zeros(3)
        return sd

    def gap(sd: dict) -> dict:
        sd["f.layer3.5.conv1.weight"] = sd["f.layer3.0.conv1.weight"]
        return sd

    def nan(sd: dict) -> dict:
        sd["f.conv1.weight"][0, 0, 0, 0] = float("nan")
        return sd

    def no_head(sd: dict) -> dict:
        del sd["class_output.weight"], sd["class_output.bias"]
        return sd

    def not_tensor(sd: dict) -> dict:
        sd["f.conv1.bias"] = [0.0] * 16
        return sd

    return {"missing key": drop, "wrong shape": reshape, "unknown key": extra, "block gap": gap, "nan": nan,
            "no class head": no_head, "list for a tensor": not_tensor}


@pytest.mark.parametrize("name", list(_mutations()))
def test_bad_state_dicts_refused(tmp_path: Path, name: str) -> None:
    sd = {k: v.clone() for k, v in official_model(7).state_dict().items()}
    torch.save({"model_state_dict": _mutations()[name](sd), "replay_buffer": None}, tmp_path / "bad.pt")
    with pytest.raises(UserError) as exc:
        import_official(tmp_path / "bad.pt", tmp_path / "native.pt")
    one_line_error(exc)
    assert not (tmp_path / "native.pt").exists()


@pytest.mark.parametrize("case", ["tensor", "list", "state is tensor", "buffer shape", "buffer type", "cifar100",
                                  "fashion-mnist", "native", "empty dict"])
def test_bad_payloads_refused(tmp_path: Path, case: str) -> None:
    off = official_model(8)
    sd = off.state_dict()
    payload: object = {
        "tensor": torch.zeros(3),
        "list": [sd],
        "state is tensor": {"model_state_dict": torch.zeros(2), "replay_buffer": None},
        "buffer shape": {"model_state_dict": sd, "replay_buffer": torch.zeros(4, 3, 28, 28)},
        "buffer type": {"model_state_dict": sd, "replay_buffer": {"x": torch.zeros(1)}},
        "empty dict": {},
    }.get(case, {"model_state_dict": sd, "replay_buffer": None})
    src = tmp_path / "bad.pt"
    if case == "native":
        cfg = preset_config("tiny", "jem", "fashion-mnist")
        save_checkpoint(src, cfg=cfg, model=EnergyModel(cfg.model), step=0, classes=tuple("0123456789"))
    else:
        torch.save(payload, src)
    dataset = case if case in ("cifar100", "fashion-mnist") else None
    with pytest.raises(UserError) as exc:
        import_official(src, tmp_path / "native.pt", dataset=dataset)
    one_line_error(exc)
    assert not (tmp_path / "native.pt").exists()


def test_code_carrying_pickle_refused(tmp_path: Path) -> None:
    torch.save({"model_state_dict": official_model(9).state_dict(), "replay_buffer": None, "extra": nn.ReLU()},
               tmp_path / "code.pt")
    with pytest.raises(UserError) as exc:
        import_official(tmp_path / "code.pt", tmp_path / "native.pt")
    assert "weights-only" in one_line_error(exc)
    with pytest.raises(UserError) as exc:
        read_checkpoint(tmp_path / "code.pt")
    assert "weights-only" in one_line_error(exc)


# --- read_checkpoint on malformed payloads ----------------------------------------------------------------

def _native(tmp_path: Path) -> tuple[Path, dict]:
    cfg = preset_config("tiny", "jem", "fashion-mnist", model_channels=(2, 2, 2, 2), model_hidden=4)
    path = tmp_path / "native.pt"
    save_checkpoint(path, cfg=cfg, model=EnergyModel(cfg.model), step=3, classes=tuple("0123456789"),
                    buffer=torch.rand(4, 1, 28, 28) * 2 - 1)
    return path, torch.load(path, weights_only=True)


def test_read_checkpoint_text_file(tmp_path: Path) -> None:
    (tmp_path / "t.pt").write_text("this is not a checkpoint")
    with pytest.raises(UserError) as exc:
        read_checkpoint(tmp_path / "t.pt")
    assert "not a readable checkpoint" in one_line_error(exc)


@pytest.mark.parametrize("change", [
    {"model": torch.zeros(2)}, {"model": {"a": 1}}, {"step": "3"}, {"version": torch.ones(2)},
    {"format": torch.ones(2)}, {"config": torch.zeros(1)}, {"config": "[1, 2]"}, {"config": '{"model": [[1]]}'},
    {"config": '{"model": {"depth": "x"}}'}, {"config": '{"iters": [1]}'}, {"metrics": "[]"}, {"state": "3"},
    {"buffer": [1.0]}, {"classes": torch.zeros(1)}, {"input_shape": [1, 28]},
])
def test_read_checkpoint_malformed_payloads(tmp_path: Path, change: dict) -> None:
    path, payload = _native(tmp_path)
    torch.save({**payload, **change}, tmp_path / "bad.pt")
    with pytest.raises(UserError) as exc:
        read_checkpoint(tmp_path / "bad.pt")
    one_line_error(exc)


# --- fuzz: hostile files never escape as another exception type -------------------------------------------

def _hostile(valid: dict[str, bytes], rng: random.Random) -> list[tuple[str, bytes]]:
    """Random bytes, truncations and bit flips of each valid file, text, empty, zips with junk members."""
    out: list[tuple[str, bytes]] = [("empty", b""), ("text", b"this is not a checkpoint\n"),
                                    ("magic only", b"PK\x03\x04"), ("pickle junk", b"\x80\x02]q\x00(K\x01e.")]
    for i in range(16):
        out.append((f"random {i}", rng.randbytes(rng.choice([1, 7, 64, 1000, 5000]))))
    for name, data in valid.items():
        for i in range(40):
            cut = rng.choice([rng.randrange(len(data)), rng.randrange(min(len(data), 600)),
                              len(data) - 1 - rng.randrange(min(len(data), 600))])
            out.append((f"{name} truncated at {cut}", data[:cut]))
        for i in range(60):
            buf = bytearray(data)
            for _ in range(rng.choice([1, 1, 2, 4, 16])):
                # half the flips land in the headers (pickle, zip records, central directory) where they bite
                pos = rng.choice([rng.randrange(len(buf)), rng.randrange(min(len(buf), 1500)),
                                  len(buf) - 1 - rng.randrange(min(len(buf), 700))])
                buf[pos] ^= 1 << rng.randrange(8)
            out.append((f"{name} bit flips {i}", bytes(buf)))
        if name.endswith("zip"):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                members = {n: z.read(n) for n in z.namelist()}
            for victim in list(members)[:6]:
                zb = io.BytesIO()
                with zipfile.ZipFile(zb, "w") as z:
                    for n, b in members.items():
                        z.writestr(n, rng.randbytes(len(b) or 8) if n == victim else b)
                out.append((f"{name} junk {victim}", zb.getvalue()))
    for i in range(4):
        zb = io.BytesIO()
        with zipfile.ZipFile(zb, "w") as z:
            for member in rng.sample(["archive/data.pkl", "data.pkl", "junk", "archive/version"], rng.randrange(1, 4)):
                z.writestr(member, rng.randbytes(rng.randrange(1, 300)))
        out.append((f"junk zip {i}", zb.getvalue()))
    return out


def _run_hostile(files: list[tuple[str, bytes]], tmp_path: Path, fn) -> tuple[int, int]:
    refused = loaded = 0
    for i, (name, data) in enumerate(files):
        path = tmp_path / f"hostile{i}.pt"
        path.write_bytes(data)
        try:
            fn(path)
        except UserError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg, (name, msg)
            refused += 1
        else:
            loaded += 1  # a flip that left a valid file
        finally:
            path.unlink()
    return refused, loaded


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about some flipped headers
def test_fuzz_read_checkpoint(tmp_path: Path) -> None:
    path, payload = _native(tmp_path)
    legacy = io.BytesIO()
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    files = _hostile({"native zip": path.read_bytes(), "native legacy": legacy.getvalue()}, random.Random(11))
    assert len(files) >= 200
    refused, loaded = _run_hostile(files, tmp_path, read_checkpoint)
    print(f"read_checkpoint: {len(files)} hostile files, {refused} refused, {loaded} loaded")
    assert refused > len(files) // 2


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about some flipped headers
def test_fuzz_import_official(tmp_path: Path) -> None:
    off = official_model(12, depth=10, width=1)
    buffer = torch.rand(2, 3, 32, 32) * 2 - 1
    valid = {}
    for fmt in ("zip", "legacy"):
        valid[f"official {fmt}"] = save_official(tmp_path / f"o-{fmt}.pt", off, buffer, fmt).read_bytes()
    files = _hostile(valid, random.Random(13))
    assert len(files) >= 200
    dst = tmp_path / "out" / "native.pt"

    def imp(path: Path) -> None:
        try:
            import_official(path, dst)
        except UserError:
            assert not dst.exists()
            raise
        load(dst)  # what was written reads back
        dst.unlink()

    refused, loaded = _run_hostile(files, tmp_path, imp)
    print(f"import_official: {len(files)} hostile files, {refused} refused, {loaded} loaded")
    assert refused > len(files) // 2
