"""Positive controls (issue 26 item 5): the study's own attack settings, run through the pipeline on toy defenses
whose flaw is known, must raise the check meant for it; an honest stochastic toy must raise nothing.

The toy task is test_checks' (8x8 images, class = brighter half). The settings are taken from the quick plan's stages
(the EOT ladder, the JEM-1 headline in both gradient modes, Boundary), so a check that cannot fire on what the
study actually runs fails here; the ε are the toy's own (its classes are 0.6 apart in mean brightness).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from attacks.benchmark import Examples, run_blackbox, run_sweep
from attacks.checks import load_side_files, run_checks
from attacks.rows import read_typed
from attacks.target import Target
from suite.evaluate import attack_seed
from suite.study import PLANS, STUDY_OBJECTIVES, study_stages
from test_checks import HalfBrightness, toy_data

STAGES = {s.name: s for s in study_stages(PLANS["quick"], {o: Path(o) for o in STUDY_OBJECTIVES})}


class Chain(nn.Module):
    """A toy defense: input noise (std ``noise``), a "purifier" ``purify`` and the brightness classifier. In ``bpda``
    mode the purifier's backward pass is the identity. ``gradient_noise`` adds to every gradient a fresh Gaussian
    (std ``gradient_noise`` per pixel) without changing any prediction: high-variance gradients, which EOT averages."""

    def __init__(self, purify, *, noise: float = 0.02, gradient_noise: float = 0.0, grad_mode: str = "full") -> None:
        super().__init__()
        self.base, self.purify, self.noise = HalfBrightness(1.0), purify, noise
        self.gradient_noise, self.grad_mode = gradient_noise, grad_mode
        self.deterministic = noise == 0 and gradient_noise == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x + self.noise * torch.randn_like(x)).clamp(0, 1)
        p = self.purify(z)
        if self.grad_mode == "bpda":
            p = z + (p - z).detach()
        out = self.base(p)
        if self.gradient_noise:
            r = self.gradient_noise * torch.randn_like(x)
            t = ((x - x.detach()) * r).flatten(1).sum(1)  # zero in value, noise in the gradient
            out = out + torch.stack([t, -t], 1)
        return out


def targets(label: str, **kw) -> dict[str, Target]:
    defense = {"objective": "toy", "sgld_steps": 1, **{k: str(v) for k, v in kw.items()}}
    return {m: Target(label, Chain(grad_mode=m, **kw), defense,
                      attacker={"grad_mode": m, "precision": "fp32", "compiled": False}) for m in ("full", "bpda")}


def run_stage(name: str, ts: dict[str, Target], norm: str, eps: float, out: Path) -> None:
    """The stage's attack settings on the toy, in each of its gradient modes on that mode's own attack seed (as
    :func:`suite.evaluate.whitebox` runs them)."""
    job = STAGES[name].job
    x, y = toy_data()
    for mode in job.grad_modes:
        run_sweep([ts[mode]], job.attack.factory(2, attack_seed(job.seed, mode)), [norm], [eps], x, y, out,
                  dataset="toy", examples=Examples(), progress=False)


def flags_of(out: Path) -> dict[str, list[str]]:
    rows = read_typed(out)
    results = run_checks(rows, load_side_files(out, [r.to_dict() for r in rows]))
    return {c.check: [f.message for f in c.flags] for c in results}, {c.check: c.compared for c in results}


def quantize(z: torch.Tensor) -> torch.Tensor:
    return torch.round(z * 4) / 4  # its gradient is zero almost everywhere: a shattered chain


def smooth(z: torch.Tensor) -> torch.Tensor:
    return 0.9 * z + 0.05


@pytest.mark.parametrize("toy,expect", [("noisy-gradients", {"eot_not_converged"}), ("honest", set())])
def test_the_eot_ladder_flags_high_variance_gradients_and_not_an_honest_noisy_toy(tmp_path, toy, expect):
    ts = targets(toy, purify=smooth, gradient_noise=0.1 if toy == "noisy-gradients" else 0.0)
    ladder = PLANS["quick"].conv_eot
    for eot in ladder:  # the quick plan's EOT ladder on JEM-0 at the toy's ε
        run_stage(f"conv-l2-jem0-eot{eot}", ts, "l2", 3.0, tmp_path)
    flags, compared = flags_of(tmp_path)
    assert len(ladder) >= 2 and compared["eot_not_converged"] == len(ladder) - 1  # neighbouring rungs: real pairs
    assert {c for c, f in flags.items() if f} == expect, flags


@pytest.mark.parametrize("toy,expect", [("shattered", {"bpda_full_disagree", "blackbox_beats_whitebox"}),
                                        ("honest", set())])
def test_bpda_and_black_box_checks_flag_a_shattered_chain_and_not_an_honest_one(tmp_path, toy, expect):
    ts = targets(toy, purify=quantize if toy == "shattered" else smooth, noise=0.0)
    run_stage("pgd-l2-jem1-mid", ts, "l2", 8.0, tmp_path)  # the JEM-1 headline: full gradients and BPDA
    job = STAGES["blackbox-boundary-jem1"].job
    x, y = toy_data()
    run_blackbox(ts["full"], x, y, job.config, out_dir=tmp_path, examples="toy", progress=False,
                 eps_grids={"l2": [0.0, 8.0]}, indices=range(len(y)))
    flags, compared = flags_of(tmp_path)
    assert compared["bpda_full_disagree"] == 1 and compared["blackbox_beats_whitebox"] >= 1
    assert {c for c, f in flags.items() if f} == expect, flags
