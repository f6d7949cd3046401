"""The tiny study end to end, through the library calls the study makes: one label per defense, checks that
compare real rows, a resume that recomputes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attacks.rows import read_typed
from infra.records import read_rows
from suite.study import run_study


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, fashion_available):
    root = tmp_path_factory.mktemp("study")
    run_dir = run_study("tiny", results_dir=root / "results", runs_dir=root / "runs", progress=False)
    return root, run_dir


def _identity(r) -> tuple:
    return (r.checkpoint_sha256, r.objective, r.sgld_steps, r.n_chains, r.init_noise, r.sgld_step_size, r.sgld_noise,
            r.extra.get("smoothing_sigma"))


def test_every_label_names_exactly_one_defense(tiny_study):
    _, run_dir = tiny_study
    rows = read_typed(run_dir)
    kinds = {r.kind for r in rows}
    assert kinds == {"whitebox", "blackbox", "distal", "calibration", "ood", "certify", "activity"}
    by_label: dict[str, set] = {}
    by_id: dict[str, set] = {}
    for r in rows:
        by_label.setdefault(r.model, set()).add(_identity(r))
        by_id.setdefault(r.defense_id, set()).add(r.model)
    assert all(len(v) == 1 for v in by_label.values()), {k: v for k, v in by_label.items() if len(v) > 1}
    assert all(len(v) == 1 for v in by_id.values()), by_id
    labels = set(by_label)
    assert {"CE", "PGD-AT", "JEM-0", "JEM-1", "JEM-10", "JEM-bare"} <= labels
    # JEM-0 means the same 5-chain noisy classifier in the attack suite and in calibration
    jem0 = {r.kind for r in rows if r.model == "JEM-0"}
    assert {"whitebox", "blackbox", "distal", "calibration"} <= jem0


def test_every_check_compares_real_rows(tiny_study):
    _, run_dir = tiny_study
    checks = json.loads((run_dir / "flags.json").read_text())
    assert {c["check"] for c in checks} == {"large_eps_not_broken", "blackbox_beats_whitebox", "more_steps_help_model",
                                            "more_restarts_help_model", "bpda_full_disagree", "eot_not_converged"}
    assert all(c["compared"] >= 1 for c in checks), [(c["check"], c["compared"]) for c in checks]
    section = (run_dir / "report.md").read_text().split("## Gradient-masking checks")[1].split("\n## ")[0]
    results = [line.rsplit("|", 2)[1].strip() for line in section.splitlines() if line.startswith("| ") and "_" in line]
    assert len(results) == 6 and all(" compared, " in r for r in results), results


def test_the_report_names_the_jems_health_judged_by_the_ce_model(tiny_study):
    _, run_dir = tiny_study
    h = json.loads((run_dir / "health" / "health.json").read_text())
    ce = next(r for r in read_typed(run_dir / "rows.jsonl") if r.model == "CE")
    assert h["judge_sha256"] == ce.checkpoint_sha256 != h["checkpoint_sha256"]
    report = (run_dir / "report.md").read_text()
    verdict = report.split("## Verdict")[1].split("\n## ")[0]
    assert f"Fréchet distance to real test images in the judge's logits {h['fd_buffer_real']:.1f}" in verdict
    assert "## EBM health of the JEM" in report


def test_every_jem_k_verdict_says_what_its_refinement_did(tiny_study):
    """Refinement activity (JEM-1 and JEM-10 on clean test images) is measured by the study and read beside each
    "JEM-k vs JEM-0" answer, so an inactive refinement is not mistaken for an ineffective one."""
    _, run_dir = tiny_study
    acts = {r.model: r for r in read_typed(run_dir) if r.kind == "activity" and r.inputs == "clean"}
    assert set(acts) == {"JEM-1", "JEM-10"} and all(a.n == 50 and a.displacement_l2 > 0 for a in acts.values())
    verdict = (run_dir / "report.md").read_text().split("## Verdict")[1].split("\n## ")[0]
    lines = [line for line in verdict.splitlines() if "buy robustness over the same network" in line]
    assert lines and all("its chain moves clean images by" in line for line in lines), lines
    assert "## Refinement activity" in (run_dir / "report.md").read_text()
    # and on the attack's candidates at the middle ε of each norm (PGD against that same JEM-k)
    cands = {(r.model, r.norm, r.eps) for r in read_typed(run_dir) if r.kind == "activity" and r.inputs != "clean"}
    assert cands == {(m, n, e) for m in ("JEM-1", "JEM-10") for n, e in (("linf", 0.1), ("l2", 2.0))}, cands
    assert all("candidates it moves them by" in line for line in lines), lines


def test_rerun_recomputes_nothing_and_rows_know_their_code(tiny_study):
    root, run_dir = tiny_study
    before = (run_dir / "rows.jsonl").read_bytes()
    run_study("tiny", results_dir=root / "results", runs_dir=root / "runs", progress=False)
    assert (run_dir / "rows.jsonl").read_bytes() == before
    rows = read_rows(run_dir)
    attack_rows = [r for r in rows if r["kind"] in ("whitebox", "blackbox")]
    assert all(r["code"] and r["torchattacks_version"] and r["foolbox_version"] for r in attack_rows)
    assert len({r["code"] for r in attack_rows}) == 1
    stages = read_rows(run_dir / "stages.jsonl")
    assert len(stages) == len({(s["stage"], json.dumps(s["job"], sort_keys=True)) for s in stages})  # logged once


def _without_timestamp(report: str) -> str:
    return "\n".join(line for line in report.splitlines() if not line.startswith("Generated "))


@pytest.mark.parametrize("context", ["stored", "recovered"])
def test_report_regenerates_the_studys_report_from_the_run_alone(tiny_study, tmp_path, context):
    """`robust-jem report RUN` writes the study's report again: title, checkpoint accuracies and provenance."""
    import shutil

    from click.testing import CliRunner

    from suite.report import REPORT_CONTEXT
    from suite.cli import cli

    _, run_dir = tiny_study
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    if context == "recovered":  # a run written before the context was stored
        (copy / REPORT_CONTEXT).unlink()
    result = CliRunner().invoke(cli, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    original, again = (run_dir / "report.md").read_text(), (copy / "report.md").read_text()
    assert again.splitlines()[0] == original.splitlines()[0] == "# robust-jem report: tiny on fashion-mnist"
    clean = lambda text: text.split("## Clean accuracy")[1].split("\n## ")[0]  # noqa: E731
    assert "checkpoint" in clean(original) and clean(again) == clean(original)
    if context == "stored":
        assert _without_timestamp(again) == _without_timestamp(original)


def test_jem_k_refines_with_the_jems_own_sampler(tmp_path, fashion_available):
    """A JEM trained with SGLD step 0.1 is refined with step 0.1 (and its noise) in every stage that refines."""
    from robust_jem.train import train
    from suite.study import PLANS, study_stages

    from conftest import tiny_cfg

    jem = train(tiny_cfg("jem", sgld_step_size=0.1, sgld_noise=0.02), tmp_path / "jem", progress=False)
    ckpts = dict.fromkeys(("ce", "pgd-at", "jem", "gaussian-aug"), jem)
    chains = [s.job.chain for s in study_stages(PLANS["tiny"], ckpts) if hasattr(s.job, "chain")]
    assert len(chains) > 20 and any(10 in c.sgld_steps for c in chains)
    assert {(c.step_size, c.noise) for c in chains} == {(None, None)}  # no override: the defense's definition
    import torch

    from suite.targets import build_targets, load_checkpoints

    _, loaded = load_checkpoints([str(jem)], torch.device("cpu"))
    refined = [t for c in chains for t in build_targets(loaded, c) if t.defense["sgld_steps"] > 0]
    assert refined and {(t.defense["sgld_step_size"], t.defense["sgld_noise"]) for t in refined} == {(0.1, 0.02)}


def test_the_cli_and_the_study_attack_the_same_defense(run_cli, tmp_path, fashion_available):
    """One definition of JEM-k: `pgd --checkpoint J --sgld-steps 1` and the study's JEM-1 stage build the same
    defense from a JEM trained with SGLD step 0.5 (its own sampler), not the reference step 1."""
    from conftest import tiny_cfg
    from robust_jem.train import train
    from suite.evaluate import WhiteboxJob
    from suite.study import PLANS, study_stages
    from suite.targets import build_targets, load_checkpoints

    jem = train(tiny_cfg("jem", sgld_step_size=0.5), tmp_path / "jem", progress=False)
    out = tmp_path / "run"
    res = run_cli("pgd", "--checkpoint", jem, "--sgld-steps", "1", "--eps", "0.1", "--steps", "1", "--n-examples",
                  "2", "--eot", "1", "--out", out, "--no-progress")
    assert res.code == 0, res.err
    row = read_rows(out)[0]
    assert row["sgld_step_size"] == 0.5 and row["model"] == "JEM-1[step=0.5]"
    ckpts = {o: jem for o in ("ce", "pgd-at", "jem", "gaussian-aug")}
    [stage] = [s for s in study_stages(PLANS["tiny"], ckpts) if s.name == "pgd-linf-jem1"]
    assert isinstance(stage.job, WhiteboxJob)
    _, loaded = load_checkpoints([str(jem)], __import__("torch").device("cpu"))
    ids = {t.defense_id for t in build_targets(loaded, stage.job.chain, ("full",))}
    assert ids == {row["defense_id"]}


def _outcomes(r) -> tuple[tuple, object]:
    """What a row measured, keyed by what it measured on (the fields the golden file holds)."""
    if r["kind"] == "whitebox":
        return (("whitebox", r["model"], r["attack"], r["norm"], r["eps"], r["grad_mode"], r["steps"], r["eot"]),
                (r["n"], r["clean_acc"], r["robust_acc"], r["correct"]))
    if r["kind"] == "blackbox":
        return ("blackbox", r["model"], r["attack"], r["norm"], r["n"]), (r["clean_acc"], r["acc_curve"])
    if r["kind"] == "certify":
        return ("certify", r["model"], r["radius"]), r["certified_accuracy"]
    if r["kind"] == "calibration":
        return ("calibration", r["model"]), (r["accuracy"], r["ece"])
    if r["kind"] == "ood":
        return ("ood", r["model"], r["out_set"], r["score"]), r["auroc"]
    return ("distal", r["model"], r["start"], r["grad_mode"]), r["conf_result"]


GOLDEN = Path(__file__).parent / "data" / "tiny_study_golden.json"
GOLDEN_FIELDS = {"whitebox": ("attack", "norm", "eps", "grad_mode", "steps", "eot", "n", "clean_acc", "robust_acc",
                              "correct"), "blackbox": ("attack", "norm", "n", "clean_acc", "acc_curve"),
                 "certify": ("radius", "certified_accuracy"), "calibration": ("accuracy", "ece"),
                 "ood": ("out_set", "score", "auroc"), "distal": ("start", "grad_mode", "conf_result")}


def golden_rows(run_dir: Path) -> list[dict]:
    """What the golden file holds of a run: the measured fields of every row kind above."""
    return [{"kind": r.kind, "model": r.model, **{f: getattr(r, f) for f in GOLDEN_FIELDS[r.kind]}}
            for r in read_typed(run_dir) if r.kind in GOLDEN_FIELDS]


def test_no_refactoring_changed_a_number_of_the_tiny_study(tiny_study):
    """What the numbers mean must not move when code is reorganised. The golden file is the tiny study run by the
    code at its git sha (``tests/data/record_tiny_study.py``; it says why it was last re-recorded: only a change that
    is meant to move numbers may do that), with AVX2 kernels on 2 threads; training and attacks are bit-reproducible
    there, so every number must agree exactly."""
    import torch

    golden = json.loads(GOLDEN.read_text())
    here = (torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
    if here != (golden["cpu_capability"], golden["torch_threads"]):  # float sums follow kernels and thread splits
        pytest.skip(f"recorded with {golden['cpu_capability']} kernels on {golden['torch_threads']} threads, here "
                    f"{here[0]} on {here[1]} (CI's second pass forces AVX2)")
    _, run_dir = tiny_study

    def grouped(rows: list[dict]) -> dict[tuple, list[str]]:  # rows that share a key (a ladder's rungs) as a multiset
        out: dict[tuple, list[str]] = {}
        for r in rows:
            key, value = _outcomes(r)
            out.setdefault(key, []).append(json.dumps(value))
        return {k: sorted(v) for k, v in out.items()}

    now = grouped(golden_rows(run_dir))
    before = grouped([{**g, "radius": g.get("radius")} for g in golden["rows"]])
    assert sum(map(len, before.values())) == len(golden["rows"]) >= 150 and set(now) == set(before)
    changed = {k: (before[k], now[k]) for k in before if before[k] != now[k]}
    assert not changed, sorted(changed)


def test_bench_independent_attack_runs_on_the_tiny_study(tiny_study, tmp_path):
    """bench/independent_attack.py in its seconds-long form: its own margin-loss PGD against the study's headline."""
    from test_bench import bench

    _, run_dir = tiny_study
    for norm, eps in (("linf", "0.1"), ("l2", "2")):
        bench("independent_attack").main([str(run_dir), "--norm", norm, "--eps", eps, "--steps", "2", "--eot", "1",
                                          "--draws", "2", "--out", str(tmp_path), f"--tag=-{norm}"])
        [record] = [json.loads(p.read_text()) for p in tmp_path.glob(f"independent_attack-*-{norm}.json")]
        assert record["results"], record  # it found the headline's cells (a comparison of nothing would pass)
        for r in record["results"]:
            assert r["norm"] == norm and 0 <= r["independent_robust"] <= r["n"] and 0 <= r["suite_robust"] <= r["n"]


def test_bench_study_projection_counts_every_part_of_a_plan(tiny_study, tmp_path):
    """bench/study_projection.py projects the tiny plan from the tiny run itself: every kind of stage is costed, the
    escalation from the run's survivors, and training is read from the run."""
    from test_bench import bench

    root, run_dir = tiny_study
    bench("study_projection").main([str(run_dir), "--plan", "tiny", "--measured-plan", "tiny", "--survivors",
                                    str(run_dir), "--runs", str(root / "runs"), "--out", str(tmp_path)])
    [record] = [json.loads(p.read_text()) for p in tmp_path.glob("study_projection-tiny-*.json")]
    measured = sum(r["wall_s"] for r in read_rows(run_dir / "stages.jsonl") if not r["stage"].startswith("train-"))
    assert {"whitebox", "escalation", "blackbox", "extras"} <= set(record["projected_s"]), record["projected_s"]
    assert record["training_s"] > 0 and all(v > 0 for v in record["seconds_per_pass"].values())
    # the same plan projected from its own run: within a factor of 3 of what its attack stages took
    assert measured / 3 < sum(record["projected_s"].values()) < 3 * measured, (record["projected_s"], measured)


def test_the_report_warns_only_when_one_kind_of_row_mixes_code_versions(tiny_study, tmp_path):
    """Each kind of evaluation hashes its own code, so a study's rows carry several code hashes by design; the
    warning is about one kind computed by two versions (a resumed run across a code change)."""
    import shutil

    from infra.records import append_row
    from suite.report import write_report

    _, run_dir = tiny_study
    assert "versions of their code" not in (run_dir / "report.md").read_text()
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    row = next(r for r in read_rows(copy) if r["kind"] == "whitebox")
    append_row(copy / "rows.jsonl", {**row, "key": "other", "code": "0123456789abcdef"})
    text = write_report(copy, preset="tiny", dataset="fashion-mnist").read_text()
    assert "the whitebox rows were computed by 2 versions of their code" in text


def test_leaderboard_lists_every_defense_on_shared_examples(tiny_study, run_cli, tmp_path):
    """The study's report has the leaderboard; the command rebuilds it from the run (and from two copies of the run
    as two runs: each defense twice, the shared examples unchanged); a folder without rows is a usage error."""
    import shutil

    from suite.leaderboard import leaderboard

    _, run_dir = tiny_study
    assert "## Leaderboard" in (run_dir / "report.md").read_text() and (run_dir / "leaderboard.png").is_file()
    res = run_cli("leaderboard", run_dir, "--out", tmp_path / "new" / "folder")  # created
    assert res.code == 0, res.err
    res = run_cli("leaderboard", run_dir, "--out", tmp_path)
    assert res.code == 0, res.err
    entries = json.loads((tmp_path / "leaderboard.json").read_text())
    head = [h for h in json.loads((run_dir / "headline.json").read_text()) if h["eps"] in (0.1, 2.0)]
    assert {(e["subject"], e["norm"]) for e in entries} == {(h["subject"], h["norm"]) for h in head}
    for e in entries:
        h = next(h for h in head if (h["subject"], h["norm"]) == (e["subject"], e["norm"]))
        assert (e["n"], e["robust_acc"]) == (h["n"], h["robust_acc"])  # the headline's worst case, not a re-count
        assert e["n_shared"] <= e["n"] and 0 <= e["strongest_acc"] <= 1 and e["passes_per_example"] > 0
        assert e["robust_acc"] <= e["strongest_acc"] <= e["clean_acc"]
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    both = leaderboard([run_dir, copy], {"linf": 0.1})
    assert len(both) == 2 * sum(e["norm"] == "linf" for e in entries)
    assert {e["n_shared"] for e in both} == {next(e["n_shared"] for e in entries if e["norm"] == "linf")}
    assert len({e["name"] for e in both}) == len(both)  # each defense told apart by its run
    assert {e["name"] for e in both if e["run"] == str(copy)} == {f"{e['model']} (copy)" for e in entries
                                                                   if e["norm"] == "linf"}
    (tmp_path / "empty").mkdir()
    res = run_cli("leaderboard", tmp_path / "empty", "--linf-eps", "0.1", "--l2-eps", "2")
    assert res.code == 2 and "holds no rows" in res.err and "Traceback" not in res.err
