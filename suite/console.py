"""What a white-box command prints: one compact table of its rows, what the survivors' re-attack found, and each
JEM against the adversarial-training baseline on shared examples."""

from __future__ import annotations

from typing import Any, Sequence

from attacks.checks import worst_case
from attacks.common import eps_key, format_eps
from attacks.rows import escalates

from .report import compare


def recheck_summary(rows: Sequence[Any]) -> str:
    """What the larger budget found among each row's survivors, and the per-example worst case that results."""
    checks = [r for r in rows if escalates(r)]
    if not checks:
        return "convergence check: no example was left standing at ε > 0, nothing to re-attack"
    first = checks[0]
    budget = f"{first.attack} ({first.steps} steps, {first.restarts} restarts)" if first.steps else first.attack
    lines = [f"convergence check: the survivors re-attacked by {budget}, with each row's EOT draws:"]
    cells = {(h["subject"], h["norm"], h["eps"]): h for h in worst_case(list(rows))}
    for c in checks:
        fell = c.n - sum(c.correct)
        h = cells.get((c.subject, c.norm, eps_key(c.eps)))
        worst = (f"; worst case {100 * h['robust_acc']:.0f} % [{100 * h['ci_low']:.0f}, {100 * h['ci_high']:.0f}] "
                 f"of {h['n']}" if h else "")
        mode = f" {c.grad_mode}" if c.sgld_steps else ""
        lines.append(f"  {c.model}{mode} {c.norm} ε={format_eps(c.eps)}, EOT {c.eot_used}: {fell} of {c.n} survivors "
                     f"fell{worst}"
                     + ("  <- the first attack had not converged" if fell else ""))
    return "\n".join(lines)


def robust_table(rows: Sequence[Any]) -> str:
    """The rows of a white-box command as one compact table: a line per (model, gradient mode, attack, norm),
    a column per ε, each cell robust accuracy in % with its 95 % interval (rule: correct in every draw). Rows that
    re-attacked survivors are summarised by :func:`recheck_summary` instead."""
    lines: dict[tuple[str, str, str], dict[float, Any]] = {}
    for r in rows:
        if escalates(r):
            continue
        mode = f" {r.grad_mode}" if r.sgld_steps else ""
        lines.setdefault((f"{r.model}{mode}", r.attack, r.norm), {})[r.eps] = r
    out = []
    for (name, attack, norm), cells in lines.items():
        grid = sorted(cells)
        first = cells[grid[0]]
        head = f"{name} {attack} {norm} (n={first.n}, clean {100 * first.clean_acc:.0f} %)"
        body = "  ".join(f"ε={format_eps(e)}: {100 * cells[e].robust_acc:.0f} "
                         f"[{100 * cells[e].robust_ci_low:.0f}, {100 * cells[e].robust_ci_high:.0f}]" for e in grid)
        out.append(f"{head}  {body}")
    return "robust accuracy % [95 % CI], correct in every draw:\n" + "\n".join("  " + line for line in out)


def versus_baseline(rows: Sequence[Any]) -> str:
    """Each JEM against the adversarial-training baseline (PGD-AT) at each ε, on the examples both attacked: the
    per-example worst case over everything run against each (:func:`attacks.checks.worst_case`; here the gradient
    modes) and an exact McNemar test. Models are found by objective, not label. Empty without both."""
    cells = [h for h in worst_case(list(rows)) if h["eps"] > 0]
    base = {(h["norm"], h["eps"]): h for h in cells if h["objective"] == "pgd-at"}
    lines = []
    for h in sorted(cells, key=lambda h: (h["eps"], h["model"])):
        b = base.get((h["norm"], h["eps"]))
        if h["objective"] == "jem" and b is not None:
            relation, evidence = compare(h, b)
            lines.append(f"  ε={format_eps(h['eps'])}: {h['model']} is {relation} {b['model']} ({evidence})")
    return ("JEM against adversarial training (worst case over gradient modes):\n" + "\n".join(lines)) if lines else ""
