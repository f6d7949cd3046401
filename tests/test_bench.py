"""A bench nobody runs rots: every script in bench/ runs here in a seconds-long mode, on tiny checkpoints, and
its output is checked for what it measured (not just that it exited)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from conftest import tiny_cfg

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
#: bench scripts and the test that runs each (the test below checks that none is missing)
COVERED = {"attack_precision", "attack_throughput", "bf16_matmul", "chain_memory", "independent_attack", "independent_chain",
           "independent_health", "interrupt_resume", "jem_sweep", "official_checkpoint", "study_projection",
           "train_step", "train_step_parts"}  # independent_attack and study_projection: in test_study.py


def bench(name: str) -> ModuleType:
    """Import bench/NAME.py as a module (the bench folder is not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_every_bench_script_has_a_quick_run_here():
    scripts = {p.stem for p in BENCH.glob("*.py")}
    assert scripts == COVERED, scripts ^ COVERED


@pytest.fixture(scope="module")
def tiny_ce(tmp_path_factory, fashion_available):
    from robust_jem.train import train

    return train(tiny_cfg("ce", iters=3), tmp_path_factory.mktemp("bench-ce"), progress=False)


def test_attack_precision(tiny_run, tiny_ce, tmp_path):
    from robust_jem.train import train

    at = train(tiny_cfg("pgd-at", iters=3), tmp_path / "at", progress=False)
    md = bench("attack_precision").main(["--quick", "--ce", str(tiny_ce), "--pgd-at", str(at), "--jem",
                                         str(tiny_run / "final.pt"), "--out", str(tmp_path / "out")])
    text = md.read_text()
    assert all(f"| {m} | 4 |" in text for m in ("CE", "PGD-AT", "JEM-0", "JEM-1")), text


def test_attack_throughput(tiny_run, tmp_path):
    bench("attack_throughput").main(["--quick", "--checkpoint", str(tiny_run / "final.pt"), "--device", "cpu",
                                     "--out", str(tmp_path)])
    [record] = [json.loads(p.read_text()) for p in tmp_path.glob("attack_throughput-*.json")]
    assert {"bare", "batched_bpda", "batched_full", "loop_reference"} <= set(record["results"])
    assert all(r["images_per_s"] > 0 for r in record["results"].values())
    assert record["ratios"]["flops_batched_full_over_bare"] > 1  # a chain costs more than the bare network


def test_bf16_matmul(capsys):
    bench("bf16_matmul").main(["--quick"])
    out = capsys.readouterr().out
    assert "| 128² matmul |" in out and "quick CNN train step" in out and "kernels:" in out


def test_train_step(tmp_path, fashion_available):
    assert bench("train_step").main(["--device", "cpu", "--repeats", "1", "--steps", "1", "--warmup", "0",
                                     "--sgld-steps", "1", "--variants", "reference,ours", "--no-bf16-check",
                                     "--data", "synthetic", "--out", str(tmp_path), "--tag", "test"]) == 0
    [record] = [json.loads(p.read_text()) for p in tmp_path.glob("train_step-*.json")]
    text = json.dumps(record)
    assert "reference" in text and "ours" in text


def test_interrupt_resume(capsys, fashion_available):
    bench("interrupt_resume").main(["--preset", "tiny", "--objective", "ce", "--iters", "150", "--after", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| SIG")]
    assert len(rows) == 3, out
    for row in rows:  # | signal | stopped at step | exit code | says | resumed | equal | diff |
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[1]) < 150 and cells[5] == "True", row  # it really stopped early, and resumed exactly
    assert "SIGINT: True, SIGTERM: True, SIGKILL: True" in out


def test_jem_sweep(tiny_ce, tmp_path, fashion_available):
    out = tmp_path / "sweep.md"
    bench("jem_sweep").main(["--preset", "tiny", "--judge", str(tiny_ce), "--root", str(tmp_path / "runs"), "--run",
                             "--out", str(out)])
    [row] = [line for line in out.read_text().splitlines() if line.startswith("| uniform |")]
    assert "not run" not in row and row.count("%") >= 3, row


def test_independent_health(tiny_run, tmp_path, fashion_available):
    from robust_jem.data import fashion_mnist_dirs

    data = next(d for d in fashion_mnist_dirs(None) if d.is_dir())
    bench("independent_health").main([str(tiny_run / "final.pt"), "--data", str(data), "--n", "64", "--epochs", "1",
                                      "--train-n", "512", "--judge-cache", str(tmp_path / "judge.pt"), "--tag", "t",
                                      "--out", str(tmp_path)])
    record = json.loads((tmp_path / "independent_health-t.json").read_text())
    [res] = record["results"]
    assert 0 <= res["buffer_confident"] <= 1 and res["fd_buffer_real"] > 0 and record["fd_real_real"] >= 0


def test_official_checkpoint_without_the_official_code(tmp_path):
    """Its run needs a checkout of github.com/wgrathwohl/JEM (not redistributed here); what it writes for robust-jem
    to read is checked: synthetic CIFAR-10 files in the official binary format load as CIFAR-10."""
    from robust_jem.data import load_dataset

    module = bench("official_checkpoint")
    module.write_cifar10(tmp_path / "cifar-10-batches-bin", n=8, seed=0)
    test = load_dataset("cifar10", "test", tmp_path)
    assert len(test) == 8 and tuple(test.shape) == (3, 32, 32)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0


def test_train_step_parts_is_importable():
    parts = bench("train_step_parts")
    assert callable(parts.count_flops) and parts.GPU_PEAKS


def test_chain_memory(tmp_path):
    """Both ways run in their own processes, give the same gradient, and report a memory and a time."""
    bench("chain_memory").main(["--steps", "2,6", "--batch", "1", "--chains", "2", "--device", "cpu", "--out",
                                str(tmp_path)])
    [record] = [json.loads(p.read_text()) for p in tmp_path.glob("chain_memory-*.json")]
    assert [(r["steps"], r["way"], r["status"]) for r in record["results"]] == [
        (2, "plain", "ok"), (2, "checkpointed", "ok"), (6, "plain", "ok"), (6, "checkpointed", "ok")]
    for r in record["results"]:
        assert r["max_rel_grad_diff"] < 1e-5 and r["wall_s"] > 0 and r["peak_mib"] >= 0


def test_independent_chain_agrees_with_the_project_and_sees_another_step(tiny_run, tmp_path, fashion_available):
    """The same chain measured twice (here and by robust_jem.activity) agrees on its displacement; a chain with half
    the step, measured here, does not: the comparison can tell chains apart."""
    import torch

    from robust_jem import load
    from robust_jem.data import fashion_mnist_dirs

    data = next(d for d in fashion_mnist_dirs(None) if d.is_dir())
    module = bench("independent_chain")
    module.main([str(tiny_run / "final.pt"), "--data", str(data), "--n", "40", "--k", "2", "--tag=-t", "--out",
                 str(tmp_path)])
    record = json.loads((tmp_path / "independent_chain-t.json").read_text())
    for name in ("displacement_l2", "displacement_linf"):
        assert record["compared"][name]["relative_difference"] < 0.1, record["compared"][name]
    x, _ = module.fashion(data, "test")
    half = module.measure(load(tiny_run / "final.pt").requires_grad_(False), x[:40], k=2, chains=5, init_noise=0.03,
                          step=0.5, noise=0.01, seed=1)
    project = record["compared"]["displacement_l2"]["project"]
    assert abs(half["displacement_l2"] - project) / project > 0.2 and torch.isfinite(torch.tensor(project))  # 2x the bar


def test_independent_attack_straight_through_clamp_changes_only_the_clamps_backward():
    """The straight-through surrogate computes the clamped chain's logits; where no state is clamped its gradient is
    the exact one, where states are clamped (pixels on the box's faces, as a Fashion-MNIST background is) it is not."""
    import torch

    from robust_jem.model import EnergyModel
    from robust_jem.refined import RefinedClassifier

    torch.manual_seed(0)
    net = EnergyModel(tiny_cfg("jem").model).requires_grad_(False)
    defense = RefinedClassifier(net, sgld_steps=2, n_chains=1, init_noise=0.0, step_size=1.0, noise=0.0, clamp=True)
    surrogate = bench("independent_attack").StraightThroughClampChain(defense)

    def grads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.requires_grad_(True)
        assert torch.allclose(surrogate(x), defense(x), atol=1e-5)  # the same forward
        return (torch.autograd.grad(defense(x).sum(), x)[0], torch.autograd.grad(surrogate(x).sum(), x)[0])

    with torch.no_grad():  # as the attack's last evaluation calls it
        x = torch.rand(4, 1, 28, 28)
        assert torch.allclose(surrogate(x), defense(x), atol=1e-5)
    exact, straight = grads(0.4 + 0.2 * torch.rand(4, 1, 28, 28))  # inside the box: nothing clamps
    assert torch.allclose(exact, straight, rtol=1e-4, atol=1e-7)
    exact, straight = grads(torch.randint(0, 2, (4, 1, 28, 28)).float())
    assert (exact - straight).abs().max() > 1e-3 * straight.abs().max()
