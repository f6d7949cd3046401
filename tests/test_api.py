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
