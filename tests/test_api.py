"""The README's "benchmark your own model" example, run exactly as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_api_example_runs_as_written(tmp_path, fashion_available, capsys):
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert block, "the README lost its API example"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block.group(1), "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert captured.err.startswith("benchmark: 4 rows") and "attacker gradient evaluations" in captured.err
    assert len(out) == 4 and out[0].startswith("PGD linf 0.05")  # PGD and AutoAttack at two ε
    assert any(line.startswith("APGD-CE+APGD-T+FAB-T+Square") for line in out)  # the standard version
    report = (tmp_path / "results" / "my-model" / "report.md").read_text()
    assert "## Robust accuracy" in report


def test_two_models_in_one_folder_keep_their_own_rows(tmp_path, fashion_available):
    """Two modules of the same class and label benchmarked into one folder: each gets its own numbers (the
    weights are part of every row's key). Rows on other data are refused in that folder (their example indices
    would name other images), as the command line refuses another run's folder."""
    import pytest
    import torch

    from infra.errors import InputError

    from robust_jem import load_dataset
    from suite import benchmark

    x, y = load_dataset("fashion-mnist", "test").batch(slice(0, 32))

    def net(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))

    def clean(model: torch.nn.Module, xs, ys) -> float:
        with torch.no_grad():
            return float((model(xs).argmax(1) == ys).float().mean())

    common = dict(eps={"linf": [0.0]}, deterministic=True, steps=2, autoattack=False, out=tmp_path, progress=False)
    a = net(0)
    b = next(m for m in map(net, range(1, 20)) if clean(m, x, y) != clean(a, x, y))
    for model in (a, b):
        rows = benchmark(model, x, y, **common)
        assert rows[0].clean_acc == clean(model, x, y)
    before = (tmp_path / "rows.jsonl").read_text()
    with pytest.raises(InputError, match="other data"):  # the same folder with other data: refused, nothing written
        benchmark(a, x[:16], y[:16], **common)
    assert (tmp_path / "rows.jsonl").read_text() == before
    rows = benchmark(a, x[:16], y[:16], **{**common, "out": tmp_path / "other"})
    assert rows[0].n == 16 and rows[0].clean_acc == clean(a, x[:16], y[:16])


def test_the_api_checks_budgets_like_the_command_line(tmp_path, fashion_available):
    """Unit mistakes are refused before any work, as the CLI refuses them: one InputError, nothing written."""
    import pytest
    import torch

    from infra.errors import InputError
    from robust_jem import load_dataset
    from suite import benchmark

    x, y = load_dataset("fashion-mnist", "test").batch(slice(0, 4))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    for eps, needle in (({"linf": [8]}, "exceeds 1"), ({"l2": [40.0]}, "largest L2 distance"),
                        ({"l7": [0.1]}, "unknown norm")):
        with pytest.raises(InputError, match=needle):
            benchmark(net, x, y, eps=eps, deterministic=True, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
