"""A newcomer's path: the errors a first user runs into are one line and exit 2, before any work is done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_usage_error
from infra.records import append_row, read_rows


def test_version(run_cli):
    res = run_cli("--version")
    assert res.code == 0 and res.out.startswith("robust-jem, version ")


@pytest.mark.parametrize("args,needle", [
    (["--norm", "linf,l2", "--eps", "0.1"], "is not one of"),
    (["--norm", "linf", "--eps", "8"], "did you mean 8/255"),
    (["--norm", "l2", "--eps", "40"], "largest L2 distance"),
])
def test_unit_mistakes_are_caught(run_cli, tiny_run, tmp_path, args, needle):
    res = run_cli("pgd", "--checkpoint", tiny_run / "final.pt", *args, "--out", tmp_path / "r", "--no-progress")
    assert_usage_error(res)
    assert needle in res.err and not (tmp_path / "r" / "rows.jsonl").exists()


_OUT_ARGS = {  # every command with an --out, with the least else it needs
    "pgd": ["--eps", "0.1", "--n-examples", "2", "--no-progress"],
    "autoattack": ["--eps", "0.1", "--n-examples", "2", "--no-progress"],
    "blackbox": ["--attack", "boundary", "--n-examples", "2", "--no-progress"],
    "distal": ["--no-progress"],
    "calibrate": ["--n-examples", "20"],
    "certify": ["--sigma", "0.25", "--n", "10", "--n-examples", "2"],
    "ood": ["--n-examples", "20"],
    "sample": [],
    "health": ["--judge", "{ckpt}"],
}


@pytest.mark.parametrize("command", [*_OUT_ARGS, "plot", "train", "import-jem"])
def test_a_bad_out_is_one_line_before_any_work(run_cli, tiny_run, tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    ckpt = tiny_run / "final.pt"
    if command == "plot":
        run = tmp_path / "run"
        assert run_cli("pgd", "--checkpoint", ckpt, "--eps", "0.1", "--steps", "1",
                       "--n-examples", "2", "--eot", "1", "--out", run, "--no-progress").code == 0
        res = run_cli("plot", run, "--out", out / "p.png")
    elif command == "train":
        res = run_cli("train", "--preset", "tiny", "--objective", "ce", "--out", out, "--no-progress")
    elif command == "import-jem":
        from test_import_jem import official_model, save_official

        src = save_official(tmp_path / "official.pt", official_model(0), None)
        res = run_cli("import-jem", src, "--out", out / "native.pt")
    else:
        extra = [str(a).format(ckpt=ckpt) for a in _OUT_ARGS[command]]
        res = run_cli(command, "--checkpoint", ckpt, *extra, "--out", out)
    assert_usage_error(res)
    assert "--out" in res.err or str(out) in res.err, res.err
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
    attack = run_cli("pgd", "--checkpoint", tiny_run / "final.pt", "--eps", "0,0.1", "--steps", "1", "--n-examples",
                     "3", "--eot", "1", "--sgld-steps", "0,1", "--out", out, "--no-progress")
    assert attack.code == 0
    table = attack.out.splitlines()  # one compact table: a line per model and attack, a cell per ε
    assert table[0].startswith("robust accuracy % [95 % CI]") and len(table) == 6, attack.out
    assert table[3].startswith("convergence check: ")  # what a larger budget found among the survivors
    assert table[4].startswith("checkpoints: JEM-0 ") and table[5].endswith("rows.jsonl")
    assert table[1].strip().startswith("JEM-0 ") and table[2].strip().startswith("JEM-1 full ")
    assert all("(n=3, clean" in line and "ε=0:" in line and "ε=0.1:" in line for line in table[1:3])
    res = run_cli("report", out)
    assert res.code == 0 and (out / "report.md").is_file() and (out / "headline.png").is_file()
    checks = json.loads((out / "flags.json").read_text())
    assert {c["status"] for c in checks} <= {"not run", "passed", "flagged"}
    assert_usage_error(run_cli("report", tmp_path / "nothing"))


def test_wrong_data_is_a_loud_warning(run_cli, tmp_path, fashion_available, caplog):
    """Test labels that are not the ones the model was trained on (shifted by one class): the attack command warns
    that clean accuracy is far below the checkpoint's recorded test accuracy; the real files give no warning."""
    import gzip
    import shutil

    from conftest import tiny_cfg
    from robust_jem.data import DEBIAN_FASHION_DIR, load_dataset
    from robust_jem.train import train

    ckpt = train(tiny_cfg("ce", iters=300), tmp_path / "ce", progress=False)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(DEBIAN_FASHION_DIR / name, wrong / name)
    raw = gzip.decompress((DEBIAN_FASHION_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    shifted = raw[:8] + bytes((b + 1) % 10 for b in raw[8:])
    (wrong / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(shifted))
    real, bad = (load_dataset("fashion-mnist", "test", data_dir=d).labels for d in (DEBIAN_FASHION_DIR, wrong))
    assert bool(((real + 1) % 10 == bad).all())

    def attack(data_dir, out):
        caplog.clear()
        res = run_cli("pgd", "--checkpoint", ckpt, "--eps", "0", "--n-examples", "100", "--eot", "1",
                      *(["--data-dir", data_dir] if data_dir else []), "--out", out, "--no-progress")
        assert res.code == 0, res.err
        return res.out + res.err + caplog.text

    assert "are these the data it was trained on" not in attack(None, tmp_path / "right")
    said = attack(wrong, tmp_path / "wrong-run")
    assert "WARNING" in said and "are these the data it was trained on" in said, said


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["pgd", "--help"], ["pgd", "--bogus"],
                                  ["train", "--objective", "gan"], ["pgd", "--eps", "x/0"]])
def test_quick_answers_do_not_import_torch(argv):
    """--help, --version and argument errors answer before torch (seconds of CPU) is imported."""
    import subprocess
    import sys

    code = ("import sys\nfrom suite.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    said = res.stdout if argv[-1] in ("--help", "--version") else res.stderr
    assert ("Usage" in said or "version" in said) if argv[-1] in ("--help", "--version") else "error" in said


def test_bf16_without_native_support_runs_fp32_and_says_so(monkeypatch, tmp_path, caplog, fashion_available):
    """On a CPU that emulates bf16 (~36x slower than fp32 there) --bf16 is said once and the run is fp32; the
    config written says what ran."""
    import subprocess
    import sys

    import infra.precision as precision
    from conftest import tiny_cfg
    from robust_jem.checkpoint import read_checkpoint
    from robust_jem.train import train

    forced = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    import os

    probe = subprocess.run([sys.executable, "-c", "from infra.precision import native_bf16; print(native_bf16('cpu'))"],
                           capture_output=True, text=True, env={**os.environ, **forced}, check=True)
    assert probe.stdout.strip() == "False"  # AVX2 kernels: no native bf16, whatever the CPU
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    path = train(tiny_cfg("ce", iters=5, bf16=True), tmp_path / "run", progress=False)
    assert read_checkpoint(path)["config"].bf16 is False
    assert caplog.text.count("bf16 asked for training but not used") == 1
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve_bf16(True, "cpu", "x") is True  # where it pays, it is kept


def test_failed_commands_leave_no_empty_folder(run_cli, tiny_run, tmp_path):
    """A command refused on its input creates nothing, not even its --out folder."""
    text = tmp_path / "official.pt"
    text.write_text("not a checkpoint")
    assert_usage_error(run_cli("import-jem", text, "--out", tmp_path / "imported" / "native.pt"))
    assert not (tmp_path / "imported").exists()
    ce = tmp_path / "ce"
    from conftest import tiny_cfg
    from robust_jem.train import train

    train(tiny_cfg("ce", iters=2), ce, progress=False)
    assert_usage_error(run_cli("health", "--checkpoint", ce / "final.pt", "--judge", ce / "final.pt", "--out",
                               tmp_path / "health"))
    assert not (tmp_path / "health").exists()


def test_report_flags_speak_only_when_their_premise_holds(run_cli, tiny_run, tmp_path):
    """A run whose only ε is small: the large-ε check is 'not run' and says why (it cannot know whether accuracy
    would reach 0), and the clean-accuracy table is filled from the attack rows' clean verdicts, never empty.
    With a large ε the same check compares rows."""
    def report(eps: str, out):
        assert run_cli("pgd", "--checkpoint", tiny_run / "final.pt", "--eps", eps, "--steps", "1", "--n-examples",
                       "4", "--eot", "1", "--out", out, "--no-progress").code == 0
        assert run_cli("report", out).code == 0
        checks = {c["check"]: c for c in json.loads((out / "flags.json").read_text())}
        return checks["large_eps_not_broken"], (out / "report.md").read_text()

    large, md = report("0.05", tmp_path / "small")
    assert large["status"] == "not run" and "below the large ε 0.3" in large["note"]
    clean = md.split("## Clean accuracy", 1)[1].split("##", 1)[0]
    assert "| JEM-0 |" in clean
    large, _ = report("0.5", tmp_path / "large")
    assert large["status"] != "not run" and large["compared"] >= 1
    # a second defense in the same run whose grid stops at a small ε: checked at its own top, so here named as not
    # checked, while the first is still compared at its own large ε (the pipeline's own rows)
    assert run_cli("pgd", "--checkpoint", tiny_run / "final.pt", "--eps", "0.05", "--steps", "1", "--n-examples", "4",
                   "--eot", "1", "--sgld-steps", "1", "--out", tmp_path / "large", "--no-progress").code == 0
    mixed, _ = report("0.5", tmp_path / "large")
    assert mixed["compared"] == large["compared"] and "JEM-1: largest linf ε 0.05 is below" in mixed["note"]


def test_report_never_shows_another_models_checkpoint_facts(run_cli, tiny_run, tmp_path):
    """Regenerating a report after the checkpoint file was replaced by another model: the rows' sha256 stays, the
    new file's test accuracy is not borrowed."""
    import shutil

    from conftest import tiny_cfg
    from robust_jem.train import train

    ckpt_dir = tmp_path / "jem"
    shutil.copytree(tiny_run, ckpt_dir)
    out = tmp_path / "run"
    assert run_cli("pgd", "--checkpoint", ckpt_dir / "final.pt", "--eps", "0.1", "--steps", "1", "--n-examples", "3",
                   "--eot", "1", "--out", out, "--no-progress").code == 0
    sha = read_rows(out)[0]["checkpoint_sha256"]
    shutil.rmtree(ckpt_dir)
    train(tiny_cfg("jem", iters=3, seed=7), ckpt_dir, progress=False)  # another model at the same path
    assert run_cli("report", out).code == 0
    md = (out / "report.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| `{ckpt_dir / 'final.pt'}` |"))
    assert "another model" in line and sha[:16] in line


def test_the_seeds_command_as_typed(run_cli, tiny_run, tmp_path, monkeypatch, fashion_available):
    """`robust-jem pgd --norm linf --eps 8/255 --steps 10` with no --checkpoint: in a folder holding a study's
    models it attacks CE, PGD-AT and JEM and sets JEM against PGD-AT, naming the checkpoints; in an empty folder
    it says how to make a study, one line, exit 2."""
    import shutil

    from conftest import tiny_cfg
    from robust_jem.train import train

    monkeypatch.chdir(tmp_path)
    res = run_cli("pgd", "--norm", "linf", "--eps", "8/255", "--steps", "10")
    assert_usage_error(res)
    assert "./run_all.sh" in res.err and not (tmp_path / "results").exists()
    study = tmp_path / "runs" / "tiny-fashion-mnist"
    shutil.copytree(tiny_run, study / "jem")
    for objective in ("ce", "pgd-at"):
        train(tiny_cfg(objective, iters=3), study / objective, progress=False)
    res = run_cli("pgd", "--norm", "linf", "--eps", "8/255", "--steps", "2", "--n-examples", "4", "--eot", "1",
                  "--no-progress")
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert any(ln.strip().startswith("CE PGD linf") for ln in lines)
    assert any(ln.strip().startswith("PGD-AT PGD linf") for ln in lines)
    assert any("JEM-0 is " in ln and " PGD-AT (on the same 4 examples" in ln for ln in lines), res.out
    named = next(ln for ln in lines if ln.startswith("checkpoints: "))
    assert all(str(Path("runs") / "tiny-fashion-mnist" / o / "final.pt") in named for o in ("ce", "pgd-at", "jem"))


def test_the_report_is_the_same_whatever_the_hash_seed(run_cli, tiny_run, tmp_path):
    """Models are listed in one order (CE, PGD-AT, ..., JEM-k by k), not in set order: two processes with different
    PYTHONHASHSEED write the same report for labels that carry settings (JEM-1[step=0.5])."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    assert run_cli("pgd", "--checkpoint", tiny_run / "final.pt", "--sgld-steps", "0,1,2", "--sgld-step-size", "0.5",
                   "--eps", "0.1", "--steps", "1", "--n-examples", "3", "--eot", "1", "--out", out,
                   "--no-progress").code == 0

    def report(seed: str) -> list[str]:
        subprocess.run([sys.executable, "-m", "robust_jem", "report", str(out)], check=True, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        return [ln for ln in (out / "report.md").read_text().splitlines() if not ln.startswith("Generated")]

    first = report("1")
    assert any("JEM-2[step=0.5]" in ln for ln in first)
    assert all(report(seed) == first for seed in ("2", "3"))


def test_pgd_says_how_many_of_its_survivors_a_larger_budget_broke(run_cli, tmp_path, fashion_available):
    """`pgd` re-attacks what it left standing (APGD-DLR, 4x the steps, one more restart) by default, prints how many
    fell and the resulting worst case; the rows hold the check on exactly the survivors; --no-check skips it."""
    from conftest import tiny_cfg
    from robust_jem.train import train

    ce = train(tiny_cfg("ce", iters=20), tmp_path / "ce", progress=False)
    args = ["--checkpoint", ce, "--eps", "0,0.02", "--steps", "1", "--n-examples", "30", "--no-progress"]
    res = run_cli("pgd", *args, "--out", tmp_path / "a")
    assert res.code == 0, res.err
    rows = read_rows(tmp_path / "a")
    [main] = [r for r in rows if r["eps"] == 0.02 and r["examples"]["rule"] == "first"]
    [check] = [r for r in rows if r["examples"]["rule"] == "given"]  # ε = 0 is not re-attacked
    standing = [i for i, c in zip(main["example_indices"], main["correct"]) if c]
    assert check["attack"] == "APGD-DLR" and check["steps"] == 20 and check["restarts"] == 2
    assert check["example_indices"] == standing and standing  # the tiny CE leaves some standing at 1 step
    fell = len(standing) - sum(check["correct"])
    assert f"ε=0.02, EOT {check['eot_used']}: {fell} of {len(standing)} survivors fell; worst case" in res.out, res.out
    quiet = run_cli("pgd", *args, "--no-check", "--out", tmp_path / "b")
    assert quiet.code == 0 and "survivors" not in quiet.out
    assert {r["examples"]["rule"] for r in read_rows(tmp_path / "b")} == {"first"}
