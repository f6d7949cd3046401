"""The refinement-strength study: its grid, its shared selection, its comparison with JEM-0, its answer."""

from __future__ import annotations

import json

import pytest

from conftest import assert_usage_error, tiny_cfg


@pytest.fixture(scope="module")
def tiny_study(tiny_run, tmp_path_factory):
    from suite.refinement import run_refinement_study

    out = tmp_path_factory.mktemp("refinement")
    run_refinement_study([str(tiny_run / "final.pt")], "tiny", out, progress=False)
    return out


def test_every_cell_is_attacked_on_one_shared_selection_and_compared_with_jem0(tiny_study):
    from suite.refinement import REFINEMENT_PLANS

    plan = REFINEMENT_PLANS["tiny"]
    cells = json.loads((tiny_study / "headline.json").read_text())
    grid = {(c["norm"], c["k"], c["step"], c["clamp"]) for c in cells}
    own = {(n, k, 1.0, False) for n, _ in plan.eps for k in plan.sgld_steps}  # the tiny JEM's sampler has step 1
    scaled = {(n, k, s, False) for n, _ in plan.eps for k in plan.scaled_steps for s in plan.step_scales if s != 1}
    clamped = {(n, k, 1.0, True) for n, _ in plan.eps for k in plan.clamp_steps}
    assert clamped and grid == own | scaled | clamped
    assert len({tuple(c["example_indices"]) for c in cells}) == 1 and cells[0]["n"] == plan.n
    for c in cells:
        assert c["activity"] is not None and c["clean_n"] == plan.n_activity, c["model"]
        assert c["candidates"] is not None and c["candidates"]["norm"] == c["norm"]
        if c["k"] == 0:
            assert "vs_jem0" not in c and c["activity"]["displacement_l2"] == 0
        else:
            assert c["vs_jem0"]["n"] == plan.n and c["activity"]["displacement_l2"] > 0
            assert c["attacks"] >= 2  # full gradients and BPDA at least
    report = (tiny_study / "report.md").read_text()
    assert "## The answer" in report and "(refinement.png)" in report and (tiny_study / "refinement.png").is_file()
    assert "bpda_full_disagree | 0 |" not in report  # the BPDA/full pairs were compared


def test_a_second_run_adds_nothing(tiny_run, tiny_study):
    from suite.refinement import run_refinement_study

    before = (tiny_study / "rows.jsonl").read_text()
    run_refinement_study([str(tiny_run / "final.pt")], "tiny", tiny_study, progress=False)
    assert (tiny_study / "rows.jsonl").read_text() == before


def _cell(k: int, correct: list[int], clean: float = 0.8) -> dict:
    return {"k": k, "norm": "linf", "eps": 0.1, "model": f"JEM-{k}", "robust_acc": sum(correct) / len(correct),
            "n": len(correct), "example_indices": list(range(len(correct))), "correct": correct, "clean_acc": clean,
            "clean_n": 1000, "activity": {"inactive": False}}


def _compare(cells: list[dict]) -> list[dict]:
    from attacks.checks import paired_outcomes

    ref = cells[0]
    for c in cells[1:]:
        q = paired_outcomes(c["example_indices"], c["correct"], ref["example_indices"], ref["correct"])
        c["vs_jem0"] = {"n": q.n, "robust": q.robust_a, "robust_jem0": q.robust_b, "only_this": q.only_a,
                        "only_jem0": q.only_b, "p": q.p, "detectable": q.detectable,
                        "clean_change": c["clean_acc"] - ref["clean_acc"]}
    return cells


def test_the_answer_says_buys_only_on_a_significant_paired_difference():
    from suite.refinement import verdict_line

    jem0 = [1] * 20 + [0] * 80
    helps = [1] * 40 + [0] * 60  # 20 discordant, all for JEM-10: p ~ 2e-6
    assert "**buys**" in verdict_line(_compare([_cell(0, jem0), _cell(10, helps, clean=0.7)]))
    assert "-10.0 points" in verdict_line(_compare([_cell(0, jem0), _cell(10, helps, clean=0.7)]))
    slight = [1] * 22 + [0] * 78  # 2 discordant: no evidence
    assert "**no detectable**" in verdict_line(_compare([_cell(0, jem0), _cell(10, slight)]))
    worse = [1] * 10 + [0] * 90  # 10 discordant, all for JEM-0: p ~ 0.002
    line = verdict_line(_compare([_cell(0, jem0), _cell(1, worse)]))
    assert "no refinement is more robust than JEM-0" in line and "**costs** robustness in JEM-1 (10 vs 20" in line
    assert "costs" not in verdict_line(_compare([_cell(0, jem0), _cell(1, [1] * 18 + [0] * 82)]))  # p = 0.5


def test_bad_input_is_one_line(run_cli, tmp_path, fashion_available):
    from robust_jem.train import train

    ce = train(tiny_cfg("ce", iters=2), tmp_path / "ce", progress=False)
    assert_usage_error(run_cli("refinement-study", "--checkpoint", ce, "--plan", "tiny", "--out", tmp_path / "r",
                               "--no-progress"))
    assert not (tmp_path / "r" / "rows.jsonl").exists()
    assert_usage_error(run_cli("refinement-study", "--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "r"))
    assert_usage_error(run_cli("refinement-study", "--checkpoint", ce, "--plan", "huge"))


def test_another_plan_into_the_same_folder_is_refused(run_cli, tiny_run, tiny_study):
    before = (tiny_study / "rows.jsonl").read_text()
    assert_usage_error(run_cli("refinement-study", "--checkpoint", tiny_run / "final.pt", "--plan", "quick", "--out",
                               tiny_study, "--no-progress"))
    assert (tiny_study / "rows.jsonl").read_text() == before


def test_a_model_is_named_by_its_preset_and_every_change():
    from robust_jem.config import model_name, preset_config

    assert model_name(preset_config("paper-small", "jem", "fashion-mnist")) == "paper-small jem"
    clamped = preset_config("paper-small", "jem", "fashion-mnist", sgld_clamp=True, save_every_s=5.0)
    assert model_name(clamped) == "paper-small jem [sgld.clamp=True]"  # speed and logging settings do not count
    assert model_name(preset_config("quick", "jem", "fashion-mnist", px_weight=1.0,
                                    sgld_step_size=0.5)) == "quick jem [sgld.step_size=0.5, px_weight=1.0]"


def test_the_projection_of_a_plan_from_its_own_run_gives_back_its_white_box_time(tiny_study, tmp_path):
    """bench/study_projection.py --refinement counts the white-box passes exactly: projecting the tiny plan from the
    tiny run returns the wall time its attacking white-box rows took (the rate is measured on those same rows)."""
    from infra.records import read_rows
    from test_bench import bench

    bench("study_projection").main([str(tiny_study), "--refinement", "tiny", "--out", str(tmp_path)])
    [record] = [json.loads(p.read_text()) for p in tmp_path.glob("study_projection-refinement-tiny-*.json")]
    rows = [r for r in read_rows(tiny_study / "rows.jsonl") if r.get("kind") == "whitebox" and r.get("eps")
            and not r.get("escalation")]
    assert record["projected_s"]["white-box"] == pytest.approx(sum(r["wall_s"] for r in rows), rel=1e-6)
    assert record["projected_s"]["activity"] > 0 and record["total_s"] >= record["projected_s"]["white-box"]
