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

from attacks.benchmark import Examples, run_blackbox, run_sweep
from attacks.target import Target
from attacks.black import BlackboxConfig
from attacks.checks import (all_flags, check_bpda_full, check_eot, check_large_eps, check_more_steps, run_checks,
                            worst_case)
from suite.report import load_side_files, write_report
from attacks.rows import WhiteboxRow, read_typed
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


class Noisy(nn.Module):
    """A randomized model: Gaussian noise (std 0.02, from the global RNG) on the input of ``base``."""

    deterministic = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base((x + 0.02 * torch.randn_like(x)).clamp(0, 1))


def study_rows(model: nn.Module, out, label: str) -> list:
    """The study's spot checks on a toy: PGD sweeps, 4x steps, 2x restarts, 2x EOT (on a noisy view), Boundary."""
    x, y = toy_data()
    target = Target(label, model, {"objective": "toy", "sgld_steps": 0})
    common = dict(dataset="toy", examples=Examples(), progress=False)
    run_sweep([target], pgd_factory(steps=10, eval_draws=1, seed=0), ["linf"], [0.0, 0.1, 0.5], x, y, out, **common)
    run_sweep([target], pgd_factory(steps=40, eval_draws=1, seed=0), ["linf"], [0.1, 0.5], x, y, out, **common)
    run_sweep([target], pgd_factory(steps=10, restarts=2, eval_draws=1, seed=0), ["linf"], [0.1], x, y, out, **common)
    noisy = Target(f"{label}+noise", Noisy(model), {"objective": "toy", "input_noise": 0.02})
    for eot in (1, 2):
        run_sweep([noisy], pgd_factory(steps=10, eot=eot, eval_draws=3, seed=0), ["linf"], [0.1], x, y, out, **common)
    run_sweep([target], pgd_factory(steps=10, eval_draws=1, seed=0), ["l2"], [0.0, 8.0], x, y, out, **common)
    cfg = BlackboxConfig(attack="boundary", steps=50, init_steps=20, batch_size=40, eval_draws=1, seed=0)
    run_blackbox(target, x, y, cfg, out_dir=out, examples="toy[0:40]", progress=False, eps_grids={"l2": [0.0, 8.0]})
    return read_typed(out)


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
    flags = {f.check for f in all_flags(run_checks(rows, load_side_files(out, [r.to_dict() for r in rows])))}
    assert "large_eps_not_broken" in flags
    assert "blackbox_beats_whitebox" in flags


def test_honest_model_every_check_compares_rows_and_none_fires(honest_rows):
    out, rows = honest_rows
    results = run_checks(rows, load_side_files(out, [r.to_dict() for r in rows]))
    compared = {c.check: c.compared for c in results}
    # steps (10 vs 40 at two ε), restarts, EOT, black-box vs white-box: real rows of the same family and rule
    assert compared["more_steps_help_model"] == 2 and compared["more_restarts_help_model"] == 1
    assert compared["eot_not_converged"] == 1 and compared["blackbox_beats_whitebox"] >= 1
    assert compared["bpda_full_disagree"] == 0 and {c.status for c in results if c.compared == 0} == {"not run"}
    assert all_flags(results) == [], [f.message for f in all_flags(results)]


def test_worst_case_takes_blackbox_into_account(masked_rows):
    out, rows = masked_rows
    head = {(h["norm"], h["eps"]): h for h in worst_case(rows, load_side_files(out, [r.to_dict() for r in rows]))
            if h["model"] == "masked"}
    white_l2 = next(r for r in rows if r.kind == "whitebox" and r.norm == "l2" and r.eps == 8.0)
    assert white_l2.robust_acc > 0.9  # PGD is stuck on the masked model ...
    assert head[("l2", 8.0)]["robust_acc"] < white_l2.robust_acc  # ... the headline is not
    assert head[("l2", 8.0)]["attacks"] == 2


def test_report_numbers_equal_rows_and_checks_say_what_they_compared(honest_rows):
    out, rows = honest_rows
    text = write_report(out, preset="toy", dataset="toy").read_text()
    for r in rows:
        if r.kind == "whitebox" and r.eps == 0.5 and r.steps == 10:
            assert f"{100 * r.robust_acc:.1f} %" in text
    assert "| more_steps_help_model | " in text and "2 pairs compared, 0 flags" in text
    assert "| bpda_full_disagree | " in text and "not run (0 pairs to compare)" in text


# The pair checks' decision rules, on rows the pipeline produced with only their per-example outcomes changed.
def _variant(row: WhiteboxRow, robust: int, **changes) -> WhiteboxRow:
    d = copy.deepcopy(row.to_dict())
    d.update(changes, key=row.key + "-" + "-".join(f"{k}{v}" for k, v in changes.items()) + f"-r{robust}")
    d["correct"] = [1] * robust + [0] * (len(d["correct"]) - robust)
    d["robust_acc"] = robust / len(d["correct"])
    return WhiteboxRow.from_dict(d)


def test_pair_checks_fire_on_significant_differences_only(honest_rows):
    _, rows = honest_rows
    base = next(r for r in rows if r.kind == "whitebox" and r.eps == 0.1 and r.norm == "linf" and r.steps == 10
                and r.restarts == 1)
    weak, strong = _variant(base, 4), _variant(base, 30, steps=40)
    assert [f.check for f in check_more_steps([weak, strong]).flags] == ["more_steps_help_model"]
    assert check_more_steps([weak, _variant(base, 5, steps=40)]).flags == []  # 1 example: noise
    assert check_more_steps([weak, _variant(base, 30, steps=40, step_rule="fixed")]).compared == 0  # other rule
    eot2 = _variant(base, 30, eot_used=2, attack="EOTPGD")  # PGD and EOTPGD are one family
    assert [f.check for f in check_eot([weak, eot2]).flags] == ["eot_not_converged"]
    full = _variant(base, 4, sgld_steps=10, grad_mode="full")
    bpda = _variant(base, 30, sgld_steps=10, grad_mode="bpda")
    res = check_bpda_full([full, bpda])
    assert res.compared == 1 and len(res.flags) == 1


def test_a_stronger_attack_on_the_survivors_counts_only_when_it_left_out_nothing_standing():
    """Escalation on survivors (AutoAttack's rule): a row on the examples an earlier row left standing joins the
    per-example worst case; a row on a subset that skipped a standing example (a ladder) does not."""
    def row(key: str, idx: list[int], correct: list[int], rule: str = "first") -> WhiteboxRow:
        return WhiteboxRow.build(key=key, model="toy", defense_id="d", norm="linf", eps=0.1, attack="PGD",
                                 attack_family="pgd", n=len(idx), example_indices=idx, correct=correct,
                                 examples={"rule": rule})
    head = row("main", [0, 1, 2, 3], [1, 0, 1, 0])
    survivors = row("check", [0, 2], [0, 1], rule="given")  # broke example 0 of the two left standing
    ladder = row("ladder", [0, 1], [0, 0])  # skipped example 2, still standing: cannot join
    [cell] = worst_case([head, survivors, ladder])
    assert cell["correct"] == [0, 0, 1, 0] and cell["rows"] == ["main", "check"] and cell["subset_rows"] == ["ladder"]
    assert cell["robust_acc"] == 0.25 and cell["n"] == 4


def test_the_large_eps_check_judges_each_defense_at_its_own_largest_eps():
    """A defense whose grid stops at a large ε of its own is checked there, not dropped because another model's grid
    went further; a defense whose grid never reaches a large ε is named as not checked."""
    def row(key: str, model: str, eps: float, robust: float) -> WhiteboxRow:
        return WhiteboxRow.build(key=key, model=model, defense_id=model, norm="linf", eps=eps, attack="PGD",
                                 robust_acc=robust, dataset="fashion-mnist")
    rows = [row("a", "A", 0.5, 0.0), row("b1", "B", 0.3, 0.2), row("b0", "B", 0.1, 0.5), row("c", "C", 0.1, 0.4)]
    res = check_large_eps(rows)
    assert res.compared == 2 and [f.subject for f in res.flags] == ["B [B]"]  # B at its own top, 0.3: flagged
    assert "C: largest linf ε 0.1 is below the large ε 0.3" in res.note and "not checked: C" in res.summary()
