"""A newcomer's path: the errors a first user runs into are one line and exit 2, before any work is done."""

from __future__ import annotations

import json

import pytest

from conftest import assert_usage_error
from infra.records import append_row, read_rows


def test_version(run_cli):
    res = run_cli("--version")
    assert res.code == 0 and res.out.startswith("robust-jem, version ")


@pytest.mark.parametrize("args,needle", [
    (["--norm", "linf,l2", "--eps", "0.1"], "one --eps list"),
    (["--norm", "linf", "--eps", "8"], "did you mean 8/255"),
    (["--norm", "l2", "--eps", "40"], "largest L2 distance"),
])
def test_unit_mistakes_are_caught(run_cli, tiny_run, tmp_path, args, needle):
    res = run_cli("pgd", "--checkpoint", tiny_run / "final.pt", *args, "--out", tmp_path / "r", "--no-progress")
    assert_usage_error(res)
    assert needle in res.err and not (tmp_path / "r" / "rows.jsonl").exists()


@pytest.mark.parametrize("command", ["pgd", "blackbox", "plot"])
def test_a_bad_out_is_one_line_before_any_work(run_cli, tiny_run, tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    if command == "plot":
        run = tmp_path / "run"
        assert run_cli("pgd", "--checkpoint", tiny_run / "final.pt", "--eps", "0.1", "--steps", "1",
                       "--n-examples", "2", "--eot", "1", "--out", run, "--no-progress").code == 0
        res = run_cli("plot", run, "--out", out / "p.png")
    else:
        extra = ["--attack", "boundary"] if command == "blackbox" else ["--eps", "0.1"]
        res = run_cli(command, *extra, "--checkpoint", tiny_run / "final.pt", "--n-examples", "2", "--out", out,
                      "--no-progress")
    assert_usage_error(res)
    assert blocker.read_text() == "not a folder"


def test_attack_commands_refuse_a_folder_of_another_run(run_cli, tiny_run, tmp_path):
    out = tmp_path / "run"
    append_row(out / "rows.jsonl", {"kind": "whitebox", "checkpoint_sha256": "0" * 64, "key": "x"})
    res = run_cli("pgd", "--checkpoint", tiny_run / "final.pt", "--eps", "0.1", "--out", out, "--no-progress")
    assert_usage_error(res)
    assert "other checkpoint" in res.err and len(read_rows(out)) == 1


def test_study_refuses_another_runs_folder_before_training(tmp_path):
    from robust_jem.errors import UserError
    from suite.study import run_study

    run_dir = tmp_path / "results" / "tiny-fashion-mnist"
    append_row(run_dir / "rows.jsonl", {"kind": "whitebox", "checkpoint": "elsewhere/final.pt", "key": "x"})
    with pytest.raises(UserError, match="other checkpoints"):
        run_study("tiny", results_dir=tmp_path / "results", runs_dir=tmp_path / "runs", progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["rows.jsonl"] and not (tmp_path / "runs").exists()


def test_report_command_regenerates_the_report(run_cli, tiny_run, tmp_path):
    out = tmp_path / "run"
    assert run_cli("pgd", "--checkpoint", tiny_run / "final.pt", "--eps", "0,0.1", "--steps", "1", "--n-examples", "3",
                   "--eot", "1", "--out", out, "--no-progress").code == 0
    res = run_cli("report", out)
    assert res.code == 0 and (out / "report.md").is_file() and (out / "headline.png").is_file()
    checks = json.loads((out / "flags.json").read_text())
    assert {c["status"] for c in checks} <= {"not run", "passed", "flagged"}
    assert_usage_error(run_cli("report", tmp_path / "nothing"))
