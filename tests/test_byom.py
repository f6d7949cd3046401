"""Bring your own model, end to end on the CPU: an official-format JEM checkpoint (own re-creation of the
official layout) is imported through the CLI and attacked on CIFAR-10 files given with --data-dir."""

from __future__ import annotations

import numpy as np
import torch

from infra.records import read_rows
from test_data_formats import cifar_images, write_cifar, write_cifar10
from test_import_jem import official_model, save_official


def test_import_official_then_attack_on_cifar_files(run_cli, tmp_path):
    data = tmp_path / "data"
    write_cifar10(data / "cifar-10-batches-bin")
    write_cifar(data / "cifar-10-batches-bin" / "test_batch.bin", cifar_images(6, 7), np.arange(6) % 10)
    src = save_official(tmp_path / "official.pt", official_model(0), torch.rand(20, 3, 32, 32) * 2 - 1)
    dst = tmp_path / "imported.pt"
    res = run_cli("import-jem", src, "--out", dst)
    assert res.code == 0 and dst.is_file(), res.err
    out = tmp_path / "run"
    common = ["--checkpoint", dst, "--data-dir", data, "--out", out, "--device", "cpu"]
    for args in (["pgd", "--eps", "8/255", "--steps", "1", "--n-examples", "4", "--eval-draws", "1",
                  "--no-progress"],
                 ["blackbox", "--attack", "boundary", "--n-examples", "2", "--steps", "2", "--init-steps", "3",
                  "--eval-draws", "1", "--no-progress"],
                 ["distal", "--steps", "1", "--seeds", "1", "--starts", "uniform", "--n-real", "6", "--no-progress"],
                 ["calibrate", "--n-examples", "6"]):
        res = run_cli(*args, *common)
        assert res.code == 0, (args[0], res.err)
    rows = read_rows(out)
    assert {r["kind"] for r in rows} == {"whitebox", "blackbox", "distal", "calibration"}
    assert all(r["dataset"] == "cifar10" and r["model"] == "JEM-0" for r in rows if r["kind"] != "blackbox")
    assert {r["checkpoint_sha256"] for r in rows} == {rows[0]["checkpoint_sha256"]}
