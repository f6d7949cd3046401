"""Gradient-masking checks (issue 6): a deliberately masked toy model raises them, an honest one does not.

The toy task: 8x8 grey images whose class is which half is brighter (left 0.8 / right 0.2 -> class 0).
The honest model scores the brightness difference with a unit scale; the masked model multiplies it by
1e4, which saturates the softmax in float32 so the cross-entropy gradient is exactly zero (the classic
"saturated logits" masking): PGD cannot move, while a decision-based attack is unaffected.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attacks.benchmark import Examples, Target, run_sweep
from attacks.black import BlackboxConfig, run_blackbox
from attacks.checks import (check_bpda_full, check_eot, check_eps0, check_more_steps, run_checks, worst_case)
from attacks.records import read_rows
from attacks.report import load_side_files, write_report
from attacks.white import pgd_factory


class HalfBrightness(nn.Module):
    """logits = scale * [d, -d], d = mean(left half) - mean(right half)."""

    deterministic = True

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        d = x[..., :w].mean((1, 2, 3)) - x[..., w:].mean((1, 2, 3))
        return self.scale * torch.stack([d, -d], 1)


def toy_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.empty(n, 1, 8, 8)
    bright, dark = 0.8, 0.2
    x[..., :4] = torch.where(y == 0, bright, dark).view(n, 1, 1, 1)
    x[..., 4:] = torch.where(y == 0, dark, bright).view(n, 1, 1, 1)
    x = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


def study_rows(model: nn.Module, out, label: str) -> list[dict]:
    x, y = toy_data()
    target = Target(label, model, None, {"objective": "toy", "sgld_steps": 0, "grad_mode": "full"})
    for steps in (10, 40):
        eps = [0.0, 0.1, 0.5] if steps == 10 else [0.5]
        run_sweep([target], pgd_factory(steps=steps, eval_draws=1, seed=0), ["linf"], eps, x, y, out,
                  dataset="toy", examples=Examples(), progress=False)
    run_sweep([target], pgd_factory(steps=10, eval_draws=1, seed=0), ["l2"], [0.0, 8.0], x, y, out, dataset="toy",
              examples=Examples(), progress=False)
    cfg = BlackboxConfig(attack="boundary", steps=50, init_steps=20, batch_size=40, eval_draws=1, seed=0)
    run_blackbox(model, x, y, cfg, out_dir=out, identity={"model": label, "checkpoint_sha256": None}, progress=False,
                 eps_grids={"l2": [0.0, 8.0]})
    return read_rows(out)


@pytest.fixture(scope="module")
def masked_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("masked")
    return out, study_rows(HalfBrightness(1e4), out, "masked")


@pytest.fixture(scope="module")
def honest_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("honest")
    return out, study_rows(HalfBrightness(1.0), out, "honest")


def test_masked_model_raises_large_eps_and_blackbox_flags(masked_rows):
    out, rows = masked_rows
    flags = {f.check for f in run_checks(rows, load_side_files(out, rows))}
    assert "large_eps_not_broken" in flags
    assert "blackbox_beats_whitebox" in flags


def test_honest_model_raises_no_flag(honest_rows):
    out, rows = honest_rows
    flags = run_checks(rows, load_side_files(out, rows))
    assert flags == [], [f.message for f in flags]


def test_worst_case_takes_blackbox_into_account(masked_rows):
    out, rows = masked_rows
    head = {(h["norm"], h["eps"]): h for h in worst_case(rows, load_side_files(out, rows))}
    white_l2 = next(r for r in rows if r.get("kind") == "whitebox" and r["norm"] == "l2" and r["eps"] == 8.0)
    assert white_l2["robust_acc"] > 0.9  # PGD is stuck on the masked model ...
    assert head[("l2", 8.0)]["robust_acc"] < white_l2["robust_acc"]  # ... the headline is not
    assert head[("l2", 8.0)]["attacks"] == 2


def test_report_numbers_equal_rows(honest_rows):
    out, rows = honest_rows
    path = write_report(out, preset="toy", dataset="toy")
    text = path.read_text()
    for r in rows:
        if r.get("kind") == "whitebox" and r["eps"] == 0.5 and r["attack_params"]["steps"] == 10:
            assert f"{100 * r['robust_acc']:.1f} %" in text
    assert (out / "flags.json").read_text().strip() == "[]"


# The remaining checks need pairs of rows that differ in one setting; they are tested on rows built from
# an honest row by changing only the fields the check reads.
def _variant(row: dict, **changes) -> dict:
    r = copy.deepcopy(row)
    params = changes.pop("params", {})
    r["attack_params"].update(params)
    r.update(changes)
    r["key"] = r["key"] + "-" + "-".join(f"{k}{v}" for k, v in {**params, **changes}.items())
    return r


def test_more_steps_eot_bpda_eps0_checks(honest_rows):
    _, rows = honest_rows
    base = next(r for r in rows if r.get("kind") == "whitebox" and r["eps"] == 0.1 and r["norm"] == "linf")
    weak = dict(base, robust_acc=0.10, robust_ci_low=0.04, robust_ci_high=0.23)
    strong = _variant(weak, params={"steps": 40}, steps=40, robust_acc=0.6, robust_ci_low=0.45, robust_ci_high=0.74)
    assert [f.check for f in check_more_steps([weak, strong])] == ["more_steps_help_model"]
    assert check_more_steps([weak, dict(strong, robust_acc=0.05)]) == []
    eot2 = _variant(weak, params={"eot": 2}, robust_acc=0.6, robust_ci_low=0.45, robust_ci_high=0.74)
    assert [f.check for f in check_eot([weak, eot2])] == ["eot_not_converged"]
    full = dict(weak, sgld_steps=10, grad_mode="full")
    bpda = _variant(full, grad_mode="bpda", robust_acc=0.6, robust_ci_low=0.45, robust_ci_high=0.74)
    flags = check_bpda_full([full, bpda])
    assert len(flags) == 1 and "full is stronger" in flags[0].message
    eps0 = dict(base, eps=0.0, clean_acc=0.9, robust_acc=0.5)
    assert [f.check for f in check_eps0([eps0])] == ["eps0_not_clean"]
    assert check_eps0([dict(eps0, robust_acc=0.9)]) == []
