"""Refinement activity on toys whose chains are known: a flat energy moves the chain by its noise alone and changes
no prediction (inactive, though it moves), a tilted energy pulls inputs across the decision boundary."""

from __future__ import annotations

import math

import torch
from torch import nn

from robust_jem.activity import refinement_activity
from robust_jem.config import ModelConfig
from robust_jem.model import EnergyModel
from robust_jem.refined import Refinement


class Tilted(nn.Module):
    """logits = [a * mean(z), 0]: the energy -log(1 + exp(a m)) falls as the mean pixel m rises (a = 0: flat)."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        m = z.flatten(1).mean(1)
        return torch.stack([self.a * m, 0 * m], 1)


def toy(a: float) -> EnergyModel:
    model = EnergyModel(ModelConfig(arch="small", channels=(4, 4, 8, 8), hidden=16, n_classes=2))
    model.net = Tilted(a)
    return model


def test_a_flat_energy_moves_the_chain_by_its_noise_and_changes_nothing():
    x, y = torch.full((64, 1, 28, 28), 0.3), torch.ones(64, dtype=torch.long)
    k, noise = 10, 0.01
    a = refinement_activity(toy(0.0), Refinement(k, n_chains=2, init_noise=0.03, step_size=1.0, noise=noise), x, y)
    expected = noise * math.sqrt(k * 28 * 28) / 2  # k Gaussian steps in 784 pixels, in [0,1] units
    assert abs(a.displacement_l2 - expected) < 0.05 * expected, (a.displacement_l2, expected)
    assert a.displacement_linf > 2 * noise * math.sqrt(k) / 2  # the largest of 784 draws, well above one sigma
    assert a.changed_vs_bare == 0 and a.changed_vs_jem0 == 0 and a.inactive  # it moves, yet decides nothing
    assert a.energy_start == a.energy_end  # a flat energy


def test_a_tilted_energy_pulls_inputs_across_the_boundary():
    x = torch.full((64, 1, 28, 28), 0.49)  # mean pixel m = -0.02 inside the model: class 1
    y = torch.zeros(64, dtype=torch.long)
    bare = Refinement.bare()
    assert refinement_activity(toy(10.0), bare, x, y).accuracy_bare == 0
    a = refinement_activity(toy(10.0), Refinement(10, n_chains=1, init_noise=0.0, step_size=1.0, noise=0.0), x, y)
    assert a.changed_vs_bare == 1 and a.changed_vs_jem0 == 1 and not a.inactive and a.accuracy_refined == 1
    assert a.energy_end < a.energy_start and a.displacement_linf > 0.02


def test_activity_command(run_cli, tiny_run, tmp_path):
    from conftest import assert_usage_error

    res = run_cli("activity", "--checkpoint", tiny_run / "final.pt", "--sgld-steps", "0,2", "--n-examples", "20",
                  "--out", tmp_path / "a", "--no-progress")
    assert res.code == 0, res.err
    jem0, jem2 = res.out.splitlines()[:2]  # JEM-0 too: its chains' noise alone, and its clean accuracy
    assert jem0.startswith("JEM-0: moves clean images 0 (L2) / 0 (L∞)") and "0.0 % of JEM-0's" in jem0
    assert jem2.startswith("JEM-2: moves clean images ") and "of the bare classifier's predictions" in jem2
    from robust_jem.train import train
    from conftest import tiny_cfg

    ce = train(tiny_cfg("ce", iters=2), tmp_path / "ce", progress=False)
    assert_usage_error(run_cli("activity", "--checkpoint", ce, "--sgld-steps", "0,1",
                               "--out", tmp_path / "b", "--no-progress"))  # no JEM, nothing refined: one line, exit 2
