"""The architecture as the folders show it, checked on the source: who may import whom, and no cycles.

infra (shared infrastructure) imports neither side; robust_jem (the model side) never imports attacks or
suite; attacks (the attack side) never imports robust_jem or suite; suite (the face) ties them together;
only suite/cli.py imports click and no module imports the CLI (``python -m robust_jem`` is its entry point).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("infra", "robust_jem", "attacks", "suite")
FORBIDDEN = {"infra": {"robust_jem", "attacks", "suite"}, "robust_jem": {"attacks", "suite"},
             "attacks": {"robust_jem", "suite"}, "suite": set()}
ENTRY_POINTS = {"robust_jem.__main__"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module imported by ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    mods = {_module(p): p for p in files}
    return {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_sides_do_not_import_each_other():
    bad = []
    for mod, deps in _graph().items():
        if mod in ENTRY_POINTS:
            continue
        top = mod.split(".")[0]
        bad += [f"{mod} -> {d}" for d in deps if d.split(".")[0] in FORBIDDEN[top]]
    assert not bad, bad


def test_only_the_cli_imports_click_and_nobody_imports_the_cli():
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    click_users = sorted(_module(p) for p in files if any(i.split(".")[0] == "click" for i in _imports(p)))
    assert click_users == ["suite.cli"]
    cli_users = sorted(m for m, deps in _graph().items() if "suite.cli" in deps)
    assert set(cli_users) <= ENTRY_POINTS, cli_users


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 30  # the walk saw the whole tree


def test_one_atomic_writer_one_energy_formula_one_verdict():
    """Each concept is implemented once: the atomic rename, -logsumexp, and the fresh-noise verdict."""
    sources = {p: p.read_text() for pkg in PACKAGES + ("bench",) for p in (ROOT / pkg).rglob("*.py")}
    renames = sorted(str(p.relative_to(ROOT)) for p, s in sources.items() if "os.replace(" in s)
    assert renames == ["infra/io.py"], renames
    def calls_logsumexp(src: str) -> bool:
        return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "logsumexp"
                   for n in ast.walk(ast.parse(src)))

    # bench/independent_*.py re-derive what they check on purpose (their own chain, energy and attack): not the project
    energies = sorted(str(p.relative_to(ROOT)) for p, s in sources.items()
                      if calls_logsumexp(s) and not p.name.startswith("independent_"))
    # smoothing.py's logsumexp averages softmax over noise draws (log-mean-exp), it is not an energy
    assert energies == ["attacks/smoothing.py", "infra/energy.py"], energies
    verdicts = sorted(str(p.relative_to(ROOT)) for p, s in sources.items() if '"verdict", m' in s)
    assert verdicts == ["attacks/verdict.py"], verdicts


def test_only_the_pipeline_appends_result_rows():
    """Every result row enters a run folder through attacks.pipeline.run (keyed, checked, typed); other JSONL
    appends are logs of their own (training metrics, a study's stage log), never ``rows.jsonl``."""
    appends: dict[str, list[str]] = {}
    for pkg in PACKAGES + ("bench",):
        for p in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "append_row":
                    appends.setdefault(str(p.relative_to(ROOT)), []).append(ast.unparse(node.args[0]))
    assert "attacks/pipeline.py" in appends, appends  # the check saw the one door
    others = {f: targets for f, targets in appends.items() if f != "attacks/pipeline.py"}
    assert all("rows" not in t.lower() for targets in others.values() for t in targets), others
    built = sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                   if "Row.build(" in p.read_text() or "row_type.build(" in p.read_text())
    assert built == ["attacks/pipeline.py"], built
