"""Foundation: data, SGLD, replay buffer, checkpoints, resume, CLI errors (issue 3)."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, assert_usage_error, tiny_cfg
from robust_jem import EnergyModel, ReplayBuffer, load, load_dataset
from robust_jem.sgld import sgld
from robust_jem.checkpoint import read_checkpoint
from robust_jem.config import TrainConfig, preset_config
from robust_jem.errors import UserError
from robust_jem.train import BatchOrder, diverged, lr_at, train


# --- data ------------------------------------------------------------------------------------------
def test_fashion_mnist_shapes_and_range(fashion_available):
    for split, n in (("train", 60000), ("test", 10000)):
        ds = load_dataset("fashion-mnist", split)
        assert len(ds) == n and ds.shape == (1, 28, 28) and len(ds.classes) == 10
        x, y = ds.batch(slice(0, 256))
        assert x.dtype == torch.float32 and x.shape == (256, 1, 28, 28)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
        assert y.dtype == torch.int64 and set(y.tolist()) <= set(range(10))
        assert sorted(torch.bincount(ds.labels).tolist()) == [n // 10] * 10


def test_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", tmp_path)


def test_truncated_idx_file_is_rejected(tmp_path):
    import gzip
    src = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    data = gzip.decompress(src.read_bytes())
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(data[:100])
    with pytest.raises(UserError):
        load_dataset("fashion-mnist", "test", tmp_path)


# --- SGLD and the buffer ------------------------------------------------------------------------
def test_sgld_lowers_energy_of_quadratic():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(256, 3, generator=g) * 3
    energy = lambda z: 0.5 * (z ** 2).sum(1)  # noqa: E731
    z = sgld(energy, z0, steps=20, step_size=0.1, noise=0.01, generator=g)
    assert energy(z).mean() < 0.1 * energy(z0).mean()


def test_sgld_lowers_energy_of_model():
    torch.manual_seed(0)
    model = EnergyModel(TINY_MODEL)
    g = torch.Generator().manual_seed(1)
    z0 = torch.rand(64, 1, 28, 28, generator=g) * 2 - 1
    z = sgld(model.energy_z, z0, steps=10, step_size=0.5, noise=0.0, generator=g)
    assert model.energy_z(z).mean() < model.energy_z(z0).mean()
    assert not z.requires_grad


def test_sgld_same_generator_same_chain():
    model = EnergyModel(TINY_MODEL)
    z0 = torch.zeros(4, 1, 28, 28)
    a = sgld(model.energy_z, z0, 3, 1.0, 0.01, generator=torch.Generator().manual_seed(5))
    b = sgld(model.energy_z, z0, 3, 1.0, 0.01, generator=torch.Generator().manual_seed(5))
    c = sgld(model.energy_z, z0, 3, 1.0, 0.01, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_buffer_reinit_fraction():
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(1000, (1, 2, 2), reinit_freq=0.3, generator=g)
    buf.buffer.fill_(5.0)  # outside U(-1,1): anything in [-1,1] was re-initialised
    draws = [buf.sample(1000) for _ in range(20)]
    z = torch.cat([d[0] for d in draws])
    fresh = (z.abs() <= 1).flatten(1).all(1).float().mean().item()
    assert abs(fresh - 0.3) < 0.02
    idx = draws[0][1]
    assert sorted(idx.tolist()) == list(range(1000))  # without replacement
    buf.update(idx[:3], torch.zeros(3, 1, 2, 2))
    assert buf.buffer[idx[:3]].abs().sum() == 0


def test_buffer_initial_uniform():
    buf = ReplayBuffer(500, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert -1 <= buf.buffer.min() < -0.9 and 0.9 < buf.buffer.max() <= 1


# --- config, schedule, divergence guard ----------------------------------------------------------
def test_config_roundtrip_and_presets():
    for preset in ("quick", "standard", "cifar10-paper", "tiny"):
        for obj in ("jem", "ce", "pgd-at"):
            cfg = preset_config(preset, obj, "fashion-mnist" if preset != "cifar10-paper" else "cifar10")
            assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    paper = preset_config("cifar10-paper", "jem", "cifar10")
    assert (paper.lr, paper.warmup_iters, paper.batch_size) == (1e-4, 1000, 64)
    assert (paper.sgld.steps, paper.sgld.step_size, paper.sgld.noise) == (20, 1.0, 0.01)
    assert (paper.sgld.buffer_size, paper.sgld.reinit_freq, paper.data_noise) == (10000, 0.05, 0.03)
    assert paper.model.arch == "wrn" and (paper.model.depth, paper.model.width) == (28, 10)
    fm = preset_config("quick", "pgd-at", "fashion-mnist")
    assert (fm.pgd_eps, fm.pgd_steps, fm.pgd_step_size) == (0.1, 10, 0.02)
    cf = preset_config("cifar10-paper", "pgd-at", "cifar10")
    assert (cf.pgd_eps, cf.pgd_steps, cf.pgd_step_size) == (8 / 255, 7, 2 / 255)


def test_lr_schedule():
    cfg = preset_config("cifar10-paper", "jem", "cifar10")
    assert lr_at(cfg, 0) == pytest.approx(1e-7)
    assert lr_at(cfg, 999) == pytest.approx(1e-4)
    assert lr_at(cfg, cfg.decay_at[0]) == pytest.approx(3e-5)
    quick = preset_config("quick", "jem", "fashion-mnist")
    assert lr_at(quick, 0) == quick.ce_warmup_lr and lr_at(quick, quick.ce_warmup_iters) == quick.lr


def test_divergence_guard_flags():
    cfg = tiny_cfg()
    ok = {"loss": 1.0, "acc": 0.8, "pred_top": 0.12, "e_data": -3.0, "e_sample": 1.0}
    assert diverged(ok, 0.8, cfg) is None
    assert "non-finite" in diverged(dict(ok, loss=float("nan")), 0.8, cfg)
    assert "gap" in diverged(dict(ok, e_sample=1e5), 0.8, cfg)
    assert "collapse" in diverged(dict(ok, acc=0.1, pred_top=1.0), 0.8, cfg)
    assert diverged(dict(ok, acc=0.1, pred_top=1.0), 0.1, cfg) is None  # not learned yet is not collapse


def test_batch_order_deterministic_and_covers_epoch():
    order = BatchOrder(100, 10, seed=3)
    epoch = torch.cat([order.indices(t) for t in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))
    assert torch.equal(BatchOrder(100, 10, 3).indices(13), order.indices(13))


# --- training, checkpoints, resume --------------------------------------------------------------
def test_tiny_run_outputs(tiny_run):
    for name in ("final.pt", "last.pt", "metrics.jsonl", "samples.png", "config.json"):
        assert (tiny_run / name).exists(), name
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "final" and 0 <= rows[-1]["test_acc"] <= 1
    logged = [r for r in rows if "loss" in r]
    assert all({"e_data", "e_sample", "ce", "px", "it_per_s"} <= set(r) for r in logged)
    ckpt = read_checkpoint(tiny_run / "final.pt")
    assert ckpt["objective"] == "jem" and ckpt["input_shape"] == [1, 28, 28] and len(ckpt["classes"]) == 10
    assert ckpt["buffer"].shape == (64, 1, 28, 28) and ckpt["step"] == 20 and ckpt["git_sha"]
    assert ckpt["optimizer"]["state"] and "gen" in ckpt["rng"]


def test_checkpoint_roundtrip(tiny_run):
    model = load(tiny_run / "final.pt")
    assert not model.training
    x = load_dataset("fashion-mnist", "test").batch(slice(0, 8))[0]
    again = load(tiny_run / "final.pt")
    assert torch.equal(model(x), again(x)) and model(x).shape == (8, 10)
    assert model.checkpoint_info["objective"] == "jem"


def _weights(path):
    return read_checkpoint(path)["model"]


def test_resume_is_equivalent(tmp_path, fashion_available):
    cfg = tiny_cfg("jem", iters=20, log_every=5)
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "split", progress=False, stop_at=10)
    assert read_checkpoint(tmp_path / "split" / "last.pt")["step"] == 10
    train(None, tmp_path / "split", resume=True, progress=False)
    a, b = read_checkpoint(tmp_path / "full" / "final.pt"), read_checkpoint(tmp_path / "split" / "final.pt")
    assert a["step"] == b["step"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["buffer"], b["buffer"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock speed (the only field a pause may change)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "it_per_s"} for r in rows]


_TRAIN_ARGS = [sys.executable, "-m", "robust_jem", "train", "--preset", "tiny", "--objective", "ce", "--iters", "400",
               "--log-every", "7", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fashion_available):
    """The reference: the signal tests' command, run to the end without interruption (as a process, like them)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(_TRAIN_ARGS + ["--out", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_signal_then_resume_ends_bit_identical(tmp_path, uninterrupted, sig):
    """Ctrl-C, SIGTERM or kill -9 mid-run, then --resume: the same final weights, bit for bit, and the same metric
    rows (each step logged once) as the uninterrupted run. SIGINT / SIGTERM stop between two steps, mid log window
    (no periodic save is due), and write last.pt there; kill -9 loses the steps since the last periodic save."""
    out = tmp_path / "run"
    periodic = ["--save-every", "0.05"] if sig == signal.SIGKILL else ["--save-every", "100000"]
    proc = subprocess.Popen(_TRAIN_ARGS + periodic + ["--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        time.sleep(0.02)
    if sig != signal.SIGKILL:
        assert not (out / "last.pt").exists()  # whatever is there next comes from the signal
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    step = read_checkpoint(out / "last.pt")["step"]
    assert 0 < step < 400
    if sig != signal.SIGKILL:
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert f"Kept: {out / 'last.pt'} at step {step} of 400" in err and "--resume" in err, err
    done = subprocess.run(_TRAIN_ARGS[:3] + ["train", "--resume", str(out), "--no-progress", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    a, b = _weights(out / "final.pt"), _weights(uninterrupted / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert _metrics(out) == _metrics(uninterrupted)


def test_rerunning_train_never_starts_a_run_over(run_cli, tmp_path, fashion_available):
    """The same command again resumes (or reports the finished run); another config is one line, exit 2."""
    out = tmp_path / "run"
    cmd = ["train", "--preset", "tiny", "--objective", "ce", "--iters", "30", "--log-every", "5", "--out", out,
           "--device", "cpu", "--no-progress"]
    train(tiny_cfg("ce", iters=30, log_every=5), out, progress=False, stop_at=10)
    assert not (out / "final.pt").exists()
    res = run_cli(*cmd)
    assert res.code == 0 and read_checkpoint(out / "final.pt")["step"] == 30, res.err
    steps = [r["step"] for r in _metrics(out) if "loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30]  # resumed at 10, not restarted (metrics kept, each step once)
    before = (out / "final.pt").read_bytes()
    res = run_cli(*cmd)
    assert res.code == 0 and (out / "final.pt").read_bytes() == before  # finished: nothing redone
    res = run_cli(*[a if a != "30" else "40" for a in cmd])
    assert_usage_error(res)
    assert "another config" in res.err and "iters: 30 vs 40" in res.err and "--resume" in res.err
    assert (out / "final.pt").read_bytes() == before


def test_divergence_rolls_back_then_gives_up(tmp_path, fashion_available):
    from robust_jem.train import TrainingDiverged

    cfg = tiny_cfg("jem", iters=20, log_every=5, lr=1e6, max_retries=2, divergence_gap=1e-3)
    with pytest.raises(TrainingDiverged, match="after 2 retries"):
        train(cfg, tmp_path / "div", progress=False)
    events = [json.loads(line) for line in (tmp_path / "div" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e.get("event") == "rollback"]
    assert [r["retry"] for r in rollbacks] == [1, 2] and rollbacks[1]["lr_scale"] == 0.25


@pytest.mark.parametrize("objective", ["ce", "pgd-at", "gaussian-aug"])
def test_other_objectives_train(tmp_path, objective, fashion_available):
    path = train(tiny_cfg(objective), tmp_path / objective, progress=False)
    ckpt = read_checkpoint(path)
    assert ckpt["objective"] == objective and ckpt["buffer"] is None
    assert torch.isfinite(load(path)(torch.rand(2, 1, 28, 28))).all()


# --- bad input: one line, exit 2, nothing written -------------------------------------------------
@pytest.mark.parametrize("args", [
    ["--dataset", "mnist"], ["--objective", "gan"], ["--preset", "huge"], ["--batch-size", "0"], ["--lr", "-1"],
    ["--lr", "0"], ["--pgd-eps", "abc"], ["--device", "tpu"],
])
def test_train_bad_arguments(run_cli, tmp_path, args):
    out = tmp_path / "out"
    res = run_cli("train", "--preset", "tiny", "--out", out, *args)
    assert_usage_error(res)
    assert not out.exists()


def test_train_missing_data(run_cli, tmp_path):
    out = tmp_path / "out"
    res = run_cli("train", "--preset", "tiny", "--out", out, "--data-dir", tmp_path / "nodata")
    assert_usage_error(res)
    assert "dataset-fashion-mnist" in res.err and not out.exists()


def test_train_out_not_writable(run_cli, fashion_available):
    res = run_cli("train", "--preset", "tiny", "--out", "/dev/null/run")
    assert_usage_error(res)


def _bad_checkpoints(tmp_path: Path, good: Path) -> dict[str, Path]:
    files = {}
    data = good.read_bytes()
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["garbage"] = tmp_path / "garbage.pt"
    files["garbage"].write_bytes(b"not a checkpoint at all")
    files["foreign"] = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, files["foreign"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    files["evil"] = tmp_path / "evil.pt"
    with open(files["evil"], "wb") as f:
        pickle.dump({"format": "robust-jem-checkpoint", "x": Evil()}, f)
    ckpt = torch.load(good, weights_only=True)
    ckpt["model"] = EnergyModel(TINY_MODEL.__class__(channels=(2, 2, 2, 2), hidden=4)).state_dict()
    files["other-arch"] = tmp_path / "other-arch.pt"
    torch.save(ckpt, files["other-arch"])
    return files


def test_bad_checkpoints_are_refused(tmp_path, tiny_run, capfd):
    for name, path in _bad_checkpoints(tmp_path, tiny_run / "final.pt").items():
        with pytest.raises(UserError):
            load(path)
        assert "pwned" not in capfd.readouterr().out, name


def test_resume_from_bad_checkpoint_cli(run_cli, tmp_path, tiny_run):
    for name, path in _bad_checkpoints(tmp_path, tiny_run / "final.pt").items():
        run = tmp_path / f"run-{name}"
        run.mkdir()
        (run / "last.pt").write_bytes(path.read_bytes())
        res = run_cli("train", "--resume", run)
        assert_usage_error(res)
        assert "pwned" not in res.out
        assert sorted(p.name for p in run.iterdir()) == ["last.pt"], name


def test_resume_missing(run_cli, tmp_path):
    assert_usage_error(run_cli("train", "--resume", tmp_path / "nothing"))


def test_study_refuses_a_run_directory_of_other_checkpoints(tmp_path):
    """A fresh clone's study must not resume the committed reference run (its stages would be skipped)."""
    from infra.provenance import file_sha256
    from infra.records import append_row
    from robust_jem.errors import UserError
    from suite.evaluate import refuse_foreign_rows

    ours, theirs = tmp_path / "ours.pt", tmp_path / "theirs.pt"
    ours.write_bytes(b"ours")
    theirs.write_bytes(b"theirs")
    run = tmp_path / "run"
    refuse_foreign_rows(run, [ours], hint="pass --name NEW")  # an empty directory is fine
    append_row(run / "rows.jsonl", {"model": "CE", "checkpoint_sha256": file_sha256(ours)})
    refuse_foreign_rows(run, [ours], hint="pass --name NEW")  # our own rows: resume
    append_row(run / "rows.jsonl", {"model": "CE", "checkpoint_sha256": file_sha256(theirs)})
    with pytest.raises(UserError, match="other checkpoint.*pass --name NEW"):
        refuse_foreign_rows(run, [ours], hint="pass --name NEW")


def test_prefetcher_gives_the_schedule_s_batches_in_and_out_of_order():
    from robust_jem.data import Prefetcher

    calls: list[int] = []

    def fetch(step: int):
        calls.append(step)
        return torch.full((2, 1, 2, 2), float(step)), torch.tensor([step, step])

    sync = Prefetcher(fetch, torch.device("cpu"), enabled=False)
    ahead = Prefetcher(fetch, torch.device("cpu"), enabled=True)
    for step in [0, 1, 2, 7, 8, 3, 3]:  # in order, a jump (resume), a step back (roll-back), a repeat
        for loader in (sync, ahead):
            x, y = loader.get(step)
            assert float(x.max()) == float(x.min()) == step and y.tolist() == [step, step]
    ahead.close()
    assert ahead.get(5)[1].tolist() == [5, 5]  # closed: synchronous
    assert 9 in calls  # the look-ahead of step 8 was fetched before anyone asked


def test_training_options_fused_adam_and_prefetch_do_not_change_the_run(tmp_path, fashion_available):
    """Both switches are pure implementation choices: the weights differ by float rounding only. A JEM run
    amplifies rounding (how much depends on the CPU's kernels), so the yardstick is measured in the same run:
    the smallest real change of the recipe (the lr times 1.01) must move the weights far more."""
    from robust_jem.checkpoint import read_checkpoint
    from robust_jem.train import train

    def weights(name: str, **options) -> dict:
        return read_checkpoint(train(tiny_cfg("jem", **options), tmp_path / name, progress=False))

    a = weights("a", fused_adam=True, prefetch=True)
    b = weights("b", fused_adam=False, prefetch=False)
    assert a["config"].fused_adam and not b["config"].fused_adam
    c = weights("c", fused_adam=False, prefetch=False, lr=1.01 * b["config"].lr)

    def gap(u: dict, v: dict) -> float:
        return float(torch.cat([(u["model"][k] - v["model"][k]).flatten() for k in u["model"]]).norm())

    rounding, real = gap(a, b), gap(c, b)
    assert rounding < 0.1 * real, (rounding, real)


@pytest.mark.parametrize("command", ["distal", "calibrate", "study", "plot"])
def test_single_process_commands_refuse_torchrun(run_cli, monkeypatch, command):
    """N copies of a command that does not shard its work would write the same files: refused up front."""
    from conftest import assert_usage_error

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    res = run_cli(command, "--help")
    assert_usage_error(res)
    assert "under torchrun" in res.err


def test_jem_at_trains_an_energy_model_on_adversarial_cross_entropy(tmp_path, fashion_available):
    """The adversarially trained JEM (issue 28): a replay buffer and the log p(x) terms like JEM, its CE on PGD
    examples (larger than the clean CE of the same network), refined as JEM-AT-k."""
    import torch.nn.functional as F

    from robust_jem.model import to_internal
    from robust_jem.objectives import _pgd_examples, Context
    from robust_jem.refined import Refinement, refinement_for
    from suite.targets import Chain, Loaded, build_targets

    cfg = tiny_cfg("jem-at", iters=20, log_every=5)
    final = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"e_data", "e_sample", "ce", "px"} <= set(r) for r in rows if "loss" in r)
    ckpt = read_checkpoint(final)
    assert ckpt["objective"] == "jem-at" and ckpt["buffer"].shape == (64, 1, 28, 28)
    model = load(final)
    x, y = load_dataset("fashion-mnist", "test").batch(slice(0, 32))
    ctx = Context(cfg, model, torch.Generator().manual_seed(0), None, lambda: torch.autocast("cpu", enabled=False))
    x_adv = _pgd_examples(ctx, x, y)
    assert float((x_adv - x).abs().max()) <= cfg.pgd_eps + 1e-6
    with torch.no_grad():
        assert F.cross_entropy(model.net(to_internal(x_adv)), y) > F.cross_entropy(model.net(to_internal(x)), y)
    assert refinement_for("jem-at", Refinement(1)).sgld_steps == 1
    loaded = [Loaded(str(final), "0" * 64, model.requires_grad_(False), model.checkpoint_info)]
    assert {t.label for t in build_targets(loaded, Chain((0, 1)))} == {"JEM-AT-0", "JEM-AT-1"}


def test_code_hashes_name_the_code_the_process_started_with(tmp_path):
    """A file edited while a run goes on does not relabel the run's later rows: each file is read once per process
    (the project's modules at import), so the hash stays that of the code in memory; different code still differs."""
    from infra.provenance import code_hash

    src = tmp_path / "mod.py"
    src.write_text("x = 1\n")
    first = code_hash(src)
    src.write_text("x = 2\n")
    assert code_hash(src) == first
    other = tmp_path / "other.py"
    other.write_text("x = 2\n")
    assert code_hash(other) != first
