"""The report's tables, each built from rows or headline cells alone: the headline (per-example worst case), the
common-subset table, the attacks behind each cell, robust accuracy per attack, clean accuracy, and the small
formatting helpers they share (a percentage, an interval, the order models are listed in)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from attacks.common import format_eps, wilson
from attacks.plots import NORM_TITLES, collect_curves, model_order
from attacks.rows import BlackboxRow, Row, WhiteboxRow, of_kind


def pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f} %"


def ci_text(acc: float, lo: float, hi: float) -> str:
    return f"{pct(acc)} [{100 * lo:.0f}, {100 * hi:.0f}]"


def display_names(head: list[dict[str, Any]]) -> dict[str, str]:
    """subject -> the name shown: its label, plus its defense id where two defenses share a label."""
    by_label: dict[str, set] = defaultdict(set)
    for h in head:
        by_label[h["model"]].add(h["subject"])
    return {h["subject"]: h["model"] if len(by_label[h["model"]]) == 1 else f"{h['model']} [{h['subject']}]"
            for h in head}


def headline_table(head: list[dict[str, Any]], norm: str) -> tuple[str, dict[tuple[str, float], dict]]:
    """Rows = defenses, columns = ε: per-example worst case over every attack, with 95 % CIs."""
    names = display_names(head)
    cells = {(names[h["subject"]], h["eps"]): h for h in head if h["norm"] == norm}
    eps = sorted({e for _, e in cells})
    models = sorted({m for m, _ in cells}, key=model_order)
    lines = ["| model | " + " | ".join(f"ε = {format_eps(e)}" for e in eps) + " |",
             "|---|" + "---|" * len(eps)]
    for m in models:
        vals = []
        for e in eps:
            h = cells.get((m, e))
            vals.append("" if h is None else f"{ci_text(h['robust_acc'], h['ci_low'], h['ci_high'])} (n={h['n']}, "
                                             f"{h['attacks']} attacks)")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines), cells


def common_table(head: list[dict[str, Any]], norm: str) -> tuple[str, int]:
    """One fixed example subset for the whole table: the examples every cell of this norm covers. Two
    numbers per cell: correct in all fresh-noise draws (the headline rule) and the accuracy of one fresh
    draw. Returns the table and the subset's size."""
    names = display_names(head)
    cells = [h for h in head if h["norm"] == norm and h["n"]]
    if not cells:
        return "", 0
    common = set.intersection(*(set(h["example_indices"]) for h in cells))
    eps = sorted({h["eps"] for h in cells})
    models = sorted({names[h["subject"]] for h in cells}, key=model_order)
    by = {(names[h["subject"]], h["eps"]): h for h in cells}
    lines = ["| model | " + " | ".join(f"ε = {format_eps(e)}" for e in eps) + " |", "|---|" + "---|" * len(eps)]
    n = len(common)
    for m in models:
        vals = []
        for e in eps:
            h = by.get((m, e))
            if h is None or not n:
                vals.append("")
                continue
            keep = [i for i, idx in enumerate(h["example_indices"]) if idx in common]
            k = sum(h["correct"][i] for i in keep)
            one = sum(h["frac"][i] for i in keep) / n
            lo, hi = wilson(k, n)
            vals.append(f"{ci_text(k / n, lo, hi)} · one draw {pct(one)}")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines), n


def protocol_table(head: list[dict[str, Any]], rows: list[Row]) -> str:
    """What each defense's headline rests on: per model and norm, the attacks whose rows covered its cells
    (family, steps x restarts, EOT, gradient mode), so budgets can be compared at a glance."""
    by_key = {r.key: r for r in rows}
    names = display_names(head)
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    for h in head:
        for k in h["rows"]:
            r = by_key.get(k)
            if isinstance(r, WhiteboxRow) and r.eps > 0:  # ε = 0 rows run no attack
                mode = f", {r.grad_mode}" if r.sgld_steps and r.attack_family != "transfer" else ""
                cost = f", {r.passes_per_example:,} passes" if r.passes_per_example else ""
                budget = (f"{r.steps}×{r.restarts}" if r.steps else
                          f"{r.attack_params.get('n_queries')} queries×{r.restarts}")
                seen[(names[h["subject"]], h["norm"])].add(f"{r.attack} {budget} EOT {r.eot_used}{mode}{cost}")
            elif isinstance(r, BlackboxRow):
                seen[(names[h["subject"]], h["norm"])].add(f"{r.attack} {r.attack_params.get('steps')} steps")
    lines = ["| model | norm | attacks in the headline (steps × restarts, EOT draws, gradient, network passes per "
             "example) |", "|---|---|---|"]
    for (m, norm), attacks in sorted(seen.items(), key=lambda kv: (model_order(kv[0][0]), kv[0][1])):
        lines.append(f"| {m} | {NORM_TITLES.get(norm, norm)} | {'; '.join(sorted(attacks))} |")
    return "\n".join(lines)


def per_attack_table(rows: list[dict[str, Any]], norm: str) -> str:
    """Rows = (model, grad mode, attack) curves, columns = ε."""
    curves = collect_curves([r for r in rows if r.get("kind") == "whitebox"]).get(norm, {})
    eps = sorted({p["eps"] for c in curves.values() for p in c["points"]})
    lines = ["| curve | n | " + " | ".join(f"ε = {format_eps(e)}" for e in eps) + " |",
             "|---|---|" + "---|" * len(eps)]
    for c in sorted(curves.values(), key=lambda c: (model_order(c["rows"][0]["model"]), c["label"])):
        pts = {p["eps"]: p for p in c["points"]}
        ns = sorted({r["n"] for r in c["rows"]})
        vals = [(ci_text(pts[e]["acc"], pts[e]["ci_low"], pts[e]["ci_high"]) if e in pts else "") for e in eps]
        lines.append(f"| {c['label']} | {','.join(map(str, ns))} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def clean_table(rows: list[Row], checkpoints: dict[str, dict[str, Any]]) -> str:
    """Clean accuracy: whole test set from the checkpoint, and on the attacked examples: from the ε = 0 PGD rows, or
    where there are none from every white-box row (each scores its clean inputs). Empty when nothing to show."""
    lines = ["| model | grad mode | clean acc on attacked examples [95 % CI] | n |", "|---|---|---|---|"]
    seen = set()
    white = of_kind(rows, WhiteboxRow)
    white = [r for r in white if r.eps == 0 and r.attack_family == "pgd"] or white
    for r in sorted(white, key=lambda r: (model_order(r.model), r.grad_mode, r.eps > 0, r.norm)):
        k = (r.model, r.grad_mode if r.sgld_steps else "", r.n)
        if k in seen:
            continue
        seen.add(k)
        lines.append(f"| {r.model} | {k[1] or '–'} | {ci_text(r.clean_acc, r.clean_ci_low, r.clean_ci_high)} | {r.n} |")
    out = "\n".join(lines) if len(lines) > 2 else ""
    if checkpoints:
        out += ("\n\n" if out else "") + "| checkpoint | objective | test accuracy (whole test set) | sha256 |\n|---|---|---|---|\n"
        def acc(c: dict[str, Any]) -> str:
            return pct(c.get("test_acc")) + (f" ({c['note']})" if c.get("note") else "")

        out += "\n".join(f"| `{c['path']}` | {obj} | {acc(c)} | `{c.get('sha256', '')[:16]}` |"
                         for obj, c in checkpoints.items())
    return out


def kv_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for _, k in cols:
            v = r.get(k)
            if isinstance(v, float):
                v = f"{v:.4g}"
            elif isinstance(v, dict):
                v = ", ".join(f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
            vals.append("" if v is None else str(v))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)
