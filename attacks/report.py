"""``RUN/report.md`` from the rows alone: tables, plots, flags, verdicts written by code from the numbers.

Nothing in the report is typed by hand: every number is read from ``rows.jsonl`` (and the black-box
side files), every sentence of the verdict is a template filled from those numbers.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .checks import run_checks, worst_case
from .plots import NORM_TITLES, collect_curves, plot_rows
from .provenance import environment, file_sha256, now
from .records import ROWS, export_csv, read_rows, write_atomic

log = logging.getLogger(__name__)


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f} %"


def _ci(acc: float, lo: float, hi: float) -> str:
    return f"{_pct(acc)} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _eps(e: float) -> str:
    """ε as typed: short decimals stay decimals, other multiples of 1/255 become k/255."""
    text = f"{e:g}"
    if len(text) > 5 and e and abs(e * 255 - round(e * 255)) < 1e-9:
        return f"{round(e * 255)}/255"
    return text


def _subject_order(label: str) -> tuple:
    order = {"CE": 0, "PGD-AT": 1, "GAUSSIAN-AUG": 2}
    if label.startswith("JEM-"):
        return (3, int(label.split("-")[1]) if label.split("-")[1].isdigit() else 99)
    return (order.get(label.upper(), 2), 0)


def load_side_files(run_dir: Path, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Black-box per-example distance files referenced by rows (missing ones are skipped with a warning)."""
    side = {}
    for r in rows:
        name = r.get("distances_file")
        if r.get("kind") == "blackbox" and name:
            path = run_dir / name
            if path.exists():
                side[r["key"]] = json.loads(path.read_text())
            else:
                log.warning("missing side file %s", path)
    return side


def headline_table(head: list[dict[str, Any]], norm: str) -> tuple[str, dict[tuple[str, float], dict]]:
    """Rows = models, columns = ε: per-example worst case over every attack, with 95 % CIs."""
    cells = {(h["model"], h["eps"]): h for h in head if h["norm"] == norm}
    eps = sorted({e for _, e in cells})
    models = sorted({m for m, _ in cells}, key=_subject_order)
    lines = ["| model | " + " | ".join(f"ε = {_eps(e)}" for e in eps) + " |",
             "|---|" + "---|" * len(eps)]
    for m in models:
        vals = []
        for e in eps:
            h = cells.get((m, e))
            vals.append("" if h is None else f"{_ci(h['robust_acc'], h['ci_low'], h['ci_high'])} (n={h['n']}, "
                                             f"{h['attacks']} attacks)")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines), cells


def per_attack_table(rows: list[dict[str, Any]], norm: str) -> str:
    """Rows = (model, grad mode, attack) curves, columns = ε."""
    curves = collect_curves([r for r in rows if r.get("kind") == "whitebox"]).get(norm, {})
    eps = sorted({p["eps"] for c in curves.values() for p in c["points"]})
    lines = ["| curve | n | " + " | ".join(f"ε = {_eps(e)}" for e in eps) + " |", "|---|---|" + "---|" * len(eps)]
    for c in sorted(curves.values(), key=lambda c: (_subject_order(c["rows"][0]["model"]), c["label"])):
        pts = {p["eps"]: p for p in c["points"]}
        ns = sorted({r["n"] for r in c["rows"]})
        vals = [(_ci(pts[e]["acc"], pts[e]["ci_low"], pts[e]["ci_high"]) if e in pts else "") for e in eps]
        lines.append(f"| {c['label']} | {','.join(map(str, ns))} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def clean_table(rows: list[dict[str, Any]], checkpoints: dict[str, dict[str, Any]]) -> str:
    """Clean accuracy: whole test set from the checkpoint, and on the attacked examples from ε = 0 rows."""
    lines = ["| model | grad mode | clean acc on attacked examples [95 % CI] | n |", "|---|---|---|---|"]
    seen = set()
    for r in sorted((r for r in rows if r.get("kind") == "whitebox" and r["eps"] == 0 and r.get("attack") == "PGD"),
                    key=lambda r: (_subject_order(r["model"]), r.get("grad_mode"), r["norm"])):
        k = (r["model"], r.get("grad_mode") if r.get("sgld_steps") else "", r["n"])
        if k in seen:
            continue
        seen.add(k)
        lines.append(f"| {r['model']} | {k[1] or '–'} | {_ci(r['clean_acc'], r['clean_ci_low'], r['clean_ci_high'])} "
                     f"| {r['n']} |")
    out = "\n".join(lines)
    if checkpoints:
        out += "\n\n| checkpoint | objective | test accuracy (whole test set) | sha256 |\n|---|---|---|---|\n"
        out += "\n".join(f"| `{c['path']}` | {obj} | {_pct(c.get('test_acc'))} | `{c.get('sha256', '')[:16]}` |"
                         for obj, c in checkpoints.items())
    return out


def verdicts(head_cells: dict[str, dict[tuple[str, float], dict]], mids: dict[str, float],
             flags: list[Any], rows: list[dict[str, Any]]) -> list[str]:
    """Plain-language answers, each filled from the numbers."""
    out = []
    for norm, mid in mids.items():
        cells = head_cells.get(norm, {})
        at = {m: h for (m, e), h in cells.items() if abs(e - mid) < 1e-12}
        if not at:
            continue
        jems = sorted((m for m in at if m.startswith("JEM-")), key=_subject_order)
        parts = [f"{m} keeps {_ci(at[m]['robust_acc'], at[m]['ci_low'], at[m]['ci_high'])}" for m in
                 sorted(at, key=_subject_order)]
        out.append(f"**{NORM_TITLES.get(norm, norm)} ε = {_eps(mid)}** (per-example worst case over every attack "
                   f"run against each model): " + "; ".join(parts) + ".")
        if jems and "PGD-AT" in at:
            best = max(jems, key=lambda m: at[m]["robust_acc"])
            b, a = at[best], at["PGD-AT"]
            if b["ci_low"] > a["ci_high"]:
                rel = "more robust than"
            elif b["ci_high"] < a["ci_low"]:
                rel = "less robust than"
            else:
                rel = "not distinguishable (overlapping CIs) from"
            out.append(f"- Does SGLD refinement rival adversarial training at {NORM_TITLES.get(norm, norm)} "
                       f"{_eps(mid)}? The best refined model, {best} ({_pct(b['robust_acc'])}), is {rel} PGD-AT "
                       f"({_pct(a['robust_acc'])}).")
        if "JEM-0" in at and len(jems) > 1:
            k = jems[-1]
            d = at[k]["robust_acc"] - at["JEM-0"]["robust_acc"]
            sig = "beyond" if (at[k]["ci_low"] > at["JEM-0"]["ci_high"] or at[k]["ci_high"] < at["JEM-0"]["ci_low"]) \
                else "within"
            out.append(f"- Does refinement buy robustness over the same network without it? {k} − JEM-0 = "
                       f"{100 * d:+.1f} points ({sig} the 95 % intervals).")
        if "CE" in at:
            out.append(f"- The undefended classifier keeps {_pct(at['CE']['robust_acc'])}.")
    by_check = defaultdict(list)
    for f in flags:
        by_check[f.check].append(f)
    bb = by_check.get("blackbox_beats_whitebox", [])
    n_black = sum(1 for r in rows if r.get("kind") == "blackbox")
    if n_black:
        out.append(f"- Black-box vs white-box: {len(bb)} case(s) where a decision-based attack beat the white-box "
                   f"attack at the same norm and ε ({n_black} black-box rows)" + (": " + "; ".join(
                       sorted({f.subject for f in bb})) if bb else ", so no sign of gradient masking from this check")
                   + ".")
    distal = [r for r in rows if r.get("kind") == "distal"]
    if distal:
        parts = [f"{r.get('model')}{' ' + r['grad_mode'] if r.get('sgld_steps') else ''}: "
                 f"{_pct(r.get('frac_above_threshold'))} of results above {r.get('threshold', 0.9)} confidence"
                 for r in sorted(distal, key=lambda r: _subject_order(str(r.get("model"))))
                 if r.get("start") in (None, "uniform")]
        if parts:
            out.append("- Distal adversarials from uniform noise: " + "; ".join(parts) + ".")
    return out


def _kv_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
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


def _images(run_dir: Path, pattern: str) -> list[str]:
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.glob(pattern))


def write_report(run_dir: str | os.PathLike, *, preset: str = "", dataset: str = "", device: str = "cpu",
                 checkpoints: dict[str, str] | None = None, mids: dict[str, float] | None = None) -> Path:
    """Write ``report.md``, ``flags.json``, ``headline.json``, ``rows.csv`` and ``robustness.png`` in ``run_dir``."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir / ROWS)
    side = load_side_files(run_dir, rows)
    flags = run_checks(rows, side)
    head = worst_case(rows, side)
    (run_dir / "flags.json").write_text(json.dumps([f.to_dict() for f in flags], indent=1))
    (run_dir / "headline.json").write_text(json.dumps(head, indent=1))
    if rows:
        export_csv(rows, run_dir / "rows.csv")
    plot = None
    plottable = [r for r in rows if r.get("kind") in ("whitebox", "blackbox")]
    if plottable:
        plot, _ = plot_rows(plottable, run_dir / "robustness.png")
    ck_info: dict[str, dict[str, Any]] = {}
    for obj, path in (checkpoints or {}).items():
        info: dict[str, Any] = {"path": path}
        if Path(path).exists():
            info["sha256"] = file_sha256(path)
        metrics = Path(path).parent / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                r = json.loads(line)
                if r.get("event") == "final":
                    info["test_acc"] = r.get("test_acc")
                    info["energy"] = {k: r[k] for k in ("test_energy", "buffer_energy") if k in r}
        ck_info[obj] = info
    if mids is None:
        mids = {}
        for norm in ("linf", "l2"):
            es = sorted({r["eps"] for r in rows if r.get("kind") == "whitebox" and r["norm"] == norm and r["eps"] > 0})
            if es:
                mids[norm] = es[(len(es) - 1) // 2]
    env = environment(device)
    stages = read_rows(run_dir / "stages.jsonl")
    md: list[str] = [f"# robust-jem report: {preset or run_dir.name} on {dataset}", ""]
    md += [f"Generated {now()} by `attacks/report.py` from `{ROWS}` ({len(rows)} rows); every number below comes "
           f"from those rows. Code {env['git_sha']}, torch {env['torch_version']}, device {env['device']}.", ""]
    head_cells: dict[str, dict] = {}
    tables = []
    for norm in ("linf", "l2"):
        if any(h["norm"] == norm for h in head):
            t, cells = headline_table(head, norm)
            head_cells[norm] = cells
            tables.append((norm, t))
    md += ["## Verdict", ""] + verdicts(head_cells, mids, flags, rows) + [""]
    md += ["## Clean accuracy", "", clean_table(rows, ck_info), ""]
    md += ["## Robust accuracy (headline: per-example worst case over every attack)", "",
           "Each cell: robust accuracy [95 % Wilson CI] on the examples every attack against that model covered. "
           "JEM-k is the SGLD-refined classifier (k steps, 5 chains); white-box attacks went through the chain "
           "with full gradients and with BPDA, and the minimum counts.", ""]
    for norm, t in tables:
        md += [f"### {NORM_TITLES.get(norm, norm)}", "", t, ""]
    if plot:
        md += ["## Robust accuracy vs ε, per attack", "", f"![robust accuracy vs eps]({plot.name})", ""]
        for norm in ("linf", "l2"):
            if any(r.get("kind") == "whitebox" and r["norm"] == norm for r in rows):
                md += [f"### {NORM_TITLES.get(norm, norm)}", "", per_attack_table(rows, norm), ""]
    md += ["## Gradient-masking checks", ""]
    if flags:
        md += [f"- **{f.check}** ({f.subject}): {f.message} — rows {', '.join(k for k in f.rows if k)}" for f in flags]
    else:
        md += ["No check raised a flag (large-ε break, black-box vs white-box, more steps/restarts, BPDA vs full, "
               "EOT doubling, ε = 0 vs clean)."]
    md += [""]
    black = [r for r in rows if r.get("kind") == "blackbox"]
    if black:
        for r in black:
            r["_median"] = (r.get("distance_summary") or {}).get("median")
            r["_found"] = (r.get("distance_summary") or {}).get("n_found")
        md += ["## Black-box (decision-based) attacks", "",
               "Minimisation attacks on a fixed-noise view; distances re-scored with fresh chain noise.", "",
               _kv_table(sorted(black, key=lambda r: (r["attack"], _subject_order(r["model"]))),
                         [("model", "model"), ("attack", "attack"), ("norm", "norm"), ("n", "n"),
                          ("adversarials found", "_found"), ("median distance", "_median"),
                          ("queries / example", "queries_per_example"), ("wall s", "wall_s")]), ""]
    distal = [r for r in rows if r.get("kind") == "distal"]
    if distal:
        md += ["## Distal adversarials", "", _kv_table(distal, [
            ("model", "model"), ("grad mode", "grad_mode"), ("start", "start"), ("n", "n_images"),
            ("confidence at start", "conf_start"), ("confidence at end", "conf_result"),
            ("fraction ≥ threshold", "frac_above_threshold"), ("target hit", "target_hit_result"),
            ("log p(x) results", "log_density_result"), ("log p(x) real", "log_density_real")]), ""]
        md += [f"![{p}]({p})" for p in _images(run_dir, "distal*.png")] + [""]
    calib = [r for r in rows if r.get("kind") == "calibration"]
    if calib:
        md += ["## Calibration", "", _kv_table(calib, [("model", "model"), ("sgld steps", "sgld_steps"), ("n", "n"),
                                                        ("accuracy", "accuracy"), ("ECE", "ece"), ("NLL", "nll"),
                                                        ("Brier", "brier")]), ""]
        md += [f"![{p}]({p})" for p in _images(run_dir, "reliability*.png")] + [""]
    ood = [r for r in rows if r.get("kind") == "ood"]
    if ood:
        md += ["## Out-of-distribution detection (AUROC)", "", _kv_table(ood, [
            ("model", "model"), ("OOD set", "out_set"), ("score", "score"), ("AUROC", "auroc"),
            ("FPR at 95 % TPR", "fpr_at_tpr")]), ""]
        md += [f"![{p}]({p})" for p in _images(run_dir, "ood*.png")] + [""]
    cert = [r for r in rows if r.get("kind") == "certify"]
    if cert:
        md += ["## Randomized smoothing (Cohen et al. 2019)", "", _kv_table(cert, [
            ("model", "model"), ("σ", "smoothing_sigma"), ("L2 radius", "radius"),
            ("certified accuracy", "certified_accuracy"), ("abstain rate", "abstain_rate"),
            ("empirical robust acc (EOT-PGD)", "empirical_robust_accuracy")]), ""]
    grids = _images(run_dir, "samples/**/*.png")
    if grids:
        md += ["## Samples", ""] + [f"![{p}]({p})" for p in grids] + [""]
    md += ["## Provenance", ""]
    if ck_info:
        md += ["| model | checkpoint | sha256 | final energies |", "|---|---|---|---|"]
        md += [f"| {o} | `{c['path']}` | `{c.get('sha256', '')}` | {c.get('energy', '')} |" for o, c in ck_info.items()]
        md += [""]
    if stages:
        md += ["| stage | command | wall s |", "|---|---|---|"]
        md += [f"| {s['stage']} | `robust-jem {' '.join(s['args'])}` | {s.get('wall_s', '')} |" for s in stages]
        md += ["", f"Total wall time of the stages: {sum(float(s.get('wall_s') or 0) for s in stages):.0f} s."]
    shas = sorted({r.get("git_sha") for r in rows if r.get("git_sha")})
    md += ["", f"Rows were produced by code at: {', '.join(shas) or 'unknown'}."]
    path = run_dir / "report.md"
    write_atomic(path, "\n".join(md) + "\n")
    return path
