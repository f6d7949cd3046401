"""The defenses study (issue 28): four models trained or reused, every defense on one shared selection, exact
gradients and BPDA through every chain, one leaderboard."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def tiny_defenses(tmp_path_factory, fashion_available):
    from suite.defenses import run_defenses_study

    root = tmp_path_factory.mktemp("defenses")
    out = run_defenses_study("tiny", runs_dir=root / "runs", out=root / "run", progress=False)
    return root, out


def test_every_defense_meets_the_same_attacks_on_the_same_examples(tiny_defenses):
    from infra.provenance import file_sha256
    from infra.records import read_rows

    root, out = tiny_defenses
    rows = [r for r in read_rows(out / "rows.jsonl") if r["kind"] == "whitebox" and not r.get("escalation")]
    models = {r["model"] for r in rows}
    ebm_sha = file_sha256(root / "runs" / "tiny-fashion-mnist" / "ebm" / "final.pt")[:16]
    assert models == {"CE", "PGD-AT", "JEM-AT-0", "JEM-AT-1", f"CE+EBM-3[clamp, ebm={ebm_sha[:8]}]"}
    shared = {tuple(r["example_indices"]) for r in rows if "ebm" not in r["model"]}
    purified = {tuple(r["example_indices"]) for r in rows if "ebm" in r["model"]}
    assert len(shared) == 1 and len(purified) == 1  # one shared selection; the purifier on a prefix of it
    (shared,), (purified,) = shared, purified
    assert len(shared) == 6 and purified == shared[:4]
    from suite.defenses import DEFENSES_PLANS, defense_stages

    plan = DEFENSES_PLANS["tiny"]
    stages = {s.name: s.job for s in defense_stages(plan, {o: o for o in ("ce", "pgd-at", "jem-at", "ebm")})}
    assert stages["escalate-linf-ce-ebm-3"].rounds == plan.purify_rounds != plan.rounds  # its own rounds
    assert stages["escalate-linf-jem-at-1"].rounds == plan.rounds
    chained = {(r["model"], r["norm"], r["grad_mode"]) for r in rows if r["sgld_steps"]}
    assert chained == {(m, n, g) for m in ("JEM-AT-1", f"CE+EBM-3[clamp, ebm={ebm_sha[:8]}]") for n in ("linf", "l2")
                       for g in ("full", "bpda")}
    report = (out / "report.md").read_text()
    assert report.count("| CE+EBM-3[") >= 5  # two leaderboard tables, two gap lines, its activity
    assert "## BPDA against exact gradients" in report and (out / "leaderboard.png").is_file()
    cells = json.loads((out / "headline.json").read_text())  # what bench/independent_attack.py checks
    assert {c["model"] for c in cells} == models and all(len(c["correct"]) == c["n"] for c in cells)
    answers = report.split("## Answers")[1].split("## Leaderboard")[0]
    for question, n in (("energy term add robustness on top of adversarial training", 4),
                        ("refinement add robustness to the adversarially trained JEM", 2),
                        ("long-run purification make the natural classifier robust", 2)):
        assert answers.count(question) == n, (question, answers)  # per norm: JEM-AT-0/1 vs PGD-AT, ...
    assert answers.count("on the same 4 examples") == 2  # the purifier against CE on its prefix of the selection


def test_a_second_run_reuses_the_models_and_adds_nothing(tiny_defenses):
    from suite.defenses import run_defenses_study

    root, out = tiny_defenses
    before = (out / "rows.jsonl").read_text()
    run_defenses_study("tiny", runs_dir=root / "runs", out=out, progress=False)
    assert (out / "rows.jsonl").read_text() == before


def test_the_independent_attack_checks_the_purifier_by_its_label(tiny_defenses, tmp_path):
    """bench/independent_attack.py on a defenses run: the purifier's label has a comma in it, and a selection that
    matches no cell is an error, not a comparison of nothing that passes."""
    from test_bench import bench

    root, out = tiny_defenses
    cells = json.loads((out / "headline.json").read_text())
    label = next(c["model"] for c in cells if "[clamp, ebm=" in c["model"])
    ebm = root / "runs" / "tiny-fashion-mnist" / "ebm" / "final.pt"
    bench("independent_attack").main([str(out), "--norm", "linf", "--eps", "0.1", "--models", f"JEM-AT-0,{label}",
                                      "--purifier", str(ebm), "--steps", "1", "--eot", "1", "--draws", "1",
                                      "--out", str(tmp_path), "--tag=-both"])
    [record] = [json.loads(p.read_text()) for p in tmp_path.glob("independent_attack-*-both.json")]
    assert sorted(r["model"] for r in record["results"]) == sorted(["JEM-AT-0", label])
    with pytest.raises(SystemExit) as stop:
        bench("independent_attack").main([str(out), "--norm", "linf", "--eps", "0.1", "--models", "JEM-99",
                                          "--out", str(tmp_path), "--tag=-none"])
    assert stop.value.code == 2 and not list(tmp_path.glob("independent_attack-*-none.*"))
