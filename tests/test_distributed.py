"""DDP training under torchrun (gloo, 2 CPU processes) against single-process training (issue 8)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_cfg
from robust_jem.checkpoint import read_checkpoint
from robust_jem.distributed import shard, shard_size
from robust_jem.train import train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# One torchrun job (2 ranks, gloo) runs the library path: a CE run without data noise (its averaged DDP
# gradient equals the single-process gradient) and a JEM run stopped half-way (resumed below in 1 process).
WORKER = """
import sys, torch
from robust_jem.config import preset_config
from robust_jem.distributed import launch
from robust_jem.train import train
torch.set_num_threads(1)
out = sys.argv[1]
with launch(torch.device("cpu")) as (dist, dev):
    assert dist.world == 2 and dev.type == "cpu"
    train(preset_config("tiny", "ce", "fashion-mnist", data_noise=0.0), out + "/ce", progress=False, dist=dist)
    train(preset_config("tiny", "jem", "fashion-mnist"), out + "/jem", progress=False, stop_at=10, dist=dist)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("WORLD_SIZE", None)
    return env


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, fashion_available) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER)
    res = subprocess.run(TORCHRUN + [str(script), str(out)], env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_shards_invert_gather():
    t = torch.arange(10)
    parts = [shard(t, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [shard_size(10, r, 3) for r in range(3)] == [4, 3, 3]
    assert torch.equal(torch.cat(parts), t)


def test_ddp_ce_matches_single_process(ddp_runs, tmp_path):
    single = train(tiny_cfg("ce", data_noise=0.0), tmp_path / "single", progress=False)
    a, b = read_checkpoint(ddp_runs / "ce" / "final.pt"), read_checkpoint(single)
    assert a["step"] == b["step"] == 20
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-5), (k, (a["model"][k] - b["model"][k])
                                                                                 .abs().max())
    ra = [r for r in _rows(ddp_runs / "ce" / "metrics.jsonl") if "loss" in r]
    rb = [r for r in _rows(tmp_path / "single" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [5, 10, 15, 20]  # rank 0 logs, once
    for x, y in zip(ra, rb):  # metrics are all-reduced means over ranks: the global batch's
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4) and x["acc"] == pytest.approx(y["acc"], abs=1e-6)


def test_ddp_jem_checkpoint_resumes_in_one_process(ddp_runs):
    run = ddp_runs / "jem"
    ckpt = read_checkpoint(run / "last.pt")
    assert ckpt["step"] == 10 and ckpt["state"]["world"] == 2
    assert ckpt["buffer"].shape == (64, 1, 28, 28)  # both 32-chain shards, gathered in rank order
    assert len(ckpt["rng"]["gen_ranks"]) == 2 and not torch.equal(*ckpt["rng"]["gen_ranks"])
    assert not (run / "final.pt").exists()
    final = train(None, run, resume=True, progress=False)  # one process now: the buffer is re-sharded to 1
    done = read_checkpoint(final)
    assert done["step"] == 20 and done["buffer"].shape == (64, 1, 28, 28)
    rows = _rows(run / "metrics.jsonl")
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    assert all(math.isfinite(r[k]) for r in logged for k in ("loss", "e_data", "e_sample", "px"))
    assert rows[-1]["event"] == "final" and 0 <= rows[-1]["test_acc"] <= 1


def test_torchrun_cli_jem(tmp_path, fashion_available):
    """The console entry point under torchrun: DDP detected from the environment, rank 0 writes."""
    out = tmp_path / "cli"
    args = ["-m", "robust_jem", "train", "--preset", "tiny", "--objective", "jem", "--iters", "10",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    res = subprocess.run(TORCHRUN + args, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("final.pt") == 1  # only rank 0 prints the path
    ckpt = read_checkpoint(out / "final.pt")
    assert ckpt["step"] == 10 and ckpt["state"]["world"] == 2 and ckpt["buffer"].shape == (64, 1, 28, 28)
    assert [r["step"] for r in _rows(out / "metrics.jsonl") if "loss" in r] == [5, 10]


def test_batch_not_divisible_is_a_usage_error(tmp_path, fashion_available):
    from robust_jem.distributed import DistContext
    from robust_jem.errors import UserError
    from robust_jem.train import Trainer

    with pytest.raises(UserError, match="not divisible by the 2 ranks"):  # before any collective
        Trainer(tiny_cfg("ce", batch_size=15), tmp_path, torch.device("cpu"), dist=DistContext(rank=1, world=2))
    with pytest.raises(UserError, match="replay buffer"):
        Trainer(tiny_cfg("jem", batch_size=16, sgld_buffer_size=8), tmp_path, torch.device("cpu"),
                dist=DistContext(rank=0, world=2))


@pytest.mark.slow
def test_compiled_training_uses_compiled_net_and_keeps_checkpoint_keys(tmp_path, fashion_available):
    """cfg.compile: the loss functions run the torch.compile'd backbone; checkpoints keep the plain keys."""
    from torch._dynamo.utils import counters

    from robust_jem import load
    from robust_jem.train import Trainer

    counters.clear()
    trainer = Trainer(tiny_cfg("jem", compile=True, iters=2), tmp_path, torch.device("cpu"))
    for _ in range(2):
        x, y = trainer.batch(trainer.step)
        loss, _, _ = trainer.train_step(x, y)
        trainer.step += 1
    assert torch.isfinite(loss) and counters["stats"]["unique_graphs"] >= 2  # SGLD (eval) and training graphs
    trainer.save("last.pt")
    keys = set(read_checkpoint(tmp_path / "last.pt")["model"])
    assert keys == set(trainer.model.state_dict()) and not any("_orig_mod" in k for k in keys)
    assert load(tmp_path / "last.pt").checkpoint_info["step"] == 2


# ------------------------------------------------------------------------------------------------
# attack sweeps under torchrun
# ------------------------------------------------------------------------------------------------
# The CLI itself, with one hook: CRASH_EPS makes rank 1 die hard (os._exit, like kill -9) as soon as it
# starts a batch of a row at that ε.
SWEEP_WORKER = """
import os, sys
import torch
import attacks.benchmark as bm
torch.set_num_threads(1)
crash_eps = float(os.environ.get("CRASH_EPS", "nan"))
real = bm.attack_batch
def attack_batch(target, atk, *args, **kwargs):
    if os.environ.get("RANK") == "1" and atk.eps == crash_eps:
        os._exit(3)
    return real(target, atk, *args, **kwargs)
bm.attack_batch = attack_batch
from suite.cli import main
main(sys.argv[1:])
"""

# what may differ between two runs of the same rows: when, how long, which ranks
VOLATILE = {"timestamp", "wall_s", "images_per_s", "shards"}


def test_two_rank_sweep_equals_one_rank_and_survives_a_dead_rank(tiny_run, tmp_path):
    script = tmp_path / "sweep_worker.py"
    script.write_text(SWEEP_WORKER)
    args = ["pgd", "--checkpoint", str(tiny_run / "final.pt"), "--sgld-steps", "0,1", "--n-chains", "2",
            "--eps", "0.05,0.1", "--steps", "2", "--eval-draws", "2", "--n-examples", "24", "--batch-size", "8",
            "--device", "cpu", "--no-progress"]

    def run(launcher: list[str], out: Path, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(launcher + [str(script), *args, "--out", str(out)], env={**_env(), **env},
                              capture_output=True, text=True, timeout=300)

    one = run([sys.executable], tmp_path / "one")  # a plain process: world size 1
    assert one.returncode == 0, one.stderr[-3000:]
    ref = _rows(tmp_path / "one" / "rows.jsonl")  # 4 rows, and the survivors' re-attack of each (pgd's check)
    main = [r for r in ref if r["examples"]["rule"] == "first"]
    assert len(main) == 4 and {r["model"] for r in main} == {"JEM-0[chains=2]", "JEM-1[chains=2]"}

    # rank 1 dies at the first ε = 0.1 row: torchrun stops the job, the finished row is kept
    crashed = run(TORCHRUN, tmp_path / "two", CRASH_EPS="0.1")
    assert crashed.returncode != 0
    assert len(_rows(tmp_path / "two" / "rows.jsonl")) < len(ref)
    done = run(TORCHRUN, tmp_path / "two")  # re-running finishes the rest
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("rows.jsonl") == 1  # rank 0 prints
    two = _rows(tmp_path / "two" / "rows.jsonl")
    assert len(two) == len(ref) and {r["key"] for r in two} == {r["key"] for r in ref}
    assert not (tmp_path / "two" / "parts").exists()
    assert {s for r in two for s in r["shards"]} >= {"0/2", "1/2"}
    by_key = {r["key"]: r for r in two}
    for r in ref:
        other = by_key[r["key"]]
        assert {k: v for k, v in other.items() if k not in VOLATILE} == {k: v for k, v in r.items()
                                                                          if k not in VOLATILE}, r["key"]


# The black-box run (attacks.black.run_blackbox) on a tiny trained classifier refined by a 1-step, 2-chain SGLD
# chain, so that the fixed-noise view and the fresh-noise re-scoring both draw noise: 12 examples, 3 chunks of 4.
BLACKBOX_WORKER = """
import sys
import torch
from attacks.benchmark import run_blackbox
from attacks.black import BlackboxConfig
from attacks.target import Target
from robust_jem import EnergyModel, ModelConfig, RefinedClassifier, load_dataset
from robust_jem.distributed import launch
torch.set_num_threads(1)
weights, out = sys.argv[1], sys.argv[2]
net = EnergyModel(ModelConfig(arch="small", channels=(4, 4, 8, 8), hidden=16))
net.load_state_dict(torch.load(weights))
model = RefinedClassifier(net.eval(), 1, n_chains=2)
x, y = load_dataset("fashion-mnist", "test").batch(slice(0, 12))
with launch(torch.device("cpu")) as (dist, dev):
    for attack, steps in (("boundary", 5), ("pointwise", 10)):
        cfg = BlackboxConfig(attack, steps=steps, init_steps=5, batch_size=4, eval_draws=2)
        rows = run_blackbox(Target("JEM-1", model), x, y, cfg, out_dir=out, examples="test[0:12]", progress=False)
        assert len(rows) == len(cfg.norms), rows  # every rank reads the rows back
"""


def test_two_rank_blackbox_equals_one_rank(tmp_path, fashion_available):
    from conftest import trained_tiny_classifier

    net = trained_tiny_classifier(60, lr=1e-2)  # trained a little, so that most clean images are attacked
    torch.save(net.state_dict(), tmp_path / "net.pt")
    script = tmp_path / "blackbox_worker.py"
    script.write_text(BLACKBOX_WORKER)
    for launcher, out in (([sys.executable], tmp_path / "one"), (TORCHRUN, tmp_path / "two")):
        res = subprocess.run(launcher + [str(script), str(tmp_path / "net.pt"), str(out)], env=_env(),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert not (out / "parts").exists()
    one, two = _rows(tmp_path / "one" / "rows.jsonl"), _rows(tmp_path / "two" / "rows.jsonl")
    assert [r["norm"] for r in one] == [r["norm"] for r in two] == ["l2", "l0", "l2"]
    assert all(r["shards"] == ["0/1"] for r in one) and all(r["shards"] == ["0/2", "1/2"] for r in two)
    assert min(r["n_adversarial_fixed_noise"] for r in one) >= 6  # the attacks ran on most examples
    volatile = {"timestamp", "wall_s", "wall_s_per_example", "shards"}
    for a, b in zip(one, two):
        assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}
        side = a["distances_file"]
        assert (tmp_path / "one" / side).read_text() == (tmp_path / "two" / side).read_text()
