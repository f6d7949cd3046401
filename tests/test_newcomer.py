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
    assert table[0].startswith("robust accuracy % [95 % CI]") and len(table) == 4, attack.out
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
