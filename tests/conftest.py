"""Shared fixtures: a tiny seeded model, tiny training runs, a CLI runner that checks exit codes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from suite.cli import main
from robust_jem.config import ModelConfig, preset_config

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_MODEL = ModelConfig(arch="small", channels=(4, 4, 8, 8), hidden=16)


@pytest.fixture(scope="session")
def fashion_available() -> bool:
    from robust_jem.data import load_dataset

    load_dataset("fashion-mnist", "test")  # fails loudly: CI installs the data
    return True


def trained_tiny_classifier(steps: int, lr: float) -> torch.nn.Module:
    """The tiny model trained with cross-entropy for ``steps`` Adam steps of 64 images (seeded; about a second)."""
    from robust_jem import EnergyModel, load_dataset

    torch.manual_seed(0)
    model = EnergyModel(TINY_MODEL)
    train = load_dataset("fashion-mnist", "train")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = train.batch(torch.randint(0, len(train), (64,), generator=g))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_cfg(objective: str = "jem", **overrides):
    """A config that trains in about a second."""
    return preset_config("tiny", objective, "fashion-mnist", **overrides)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, fashion_available) -> Path:
    """A finished tiny JEM run directory (final.pt, last.pt, metrics, samples)."""
    from robust_jem.train import train

    out = tmp_path_factory.mktemp("tiny-jem")
    train(tiny_cfg("jem"), out, progress=False)
    return out


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def run_cli(capsys):
    """Run the console entry point in-process; returns exit code, stdout, stderr."""

    def _run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main(list(map(str, args)))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return _run


def assert_usage_error(res: CliResult) -> None:
    """Exit code 2, exactly one line on stderr, no traceback."""
    assert res.code == 2, (res.code, res.err)
    lines = [line for line in res.err.splitlines() if line.strip() and "INFO" not in line and "WARNING" not in line]
    assert len(lines) == 1, res.err
    assert "Traceback" not in res.err
