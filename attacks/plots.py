"""Robust accuracy vs ε from result rows alone (no model import): a PNG plus the same numbers as markdown.

White-box rows (``kind: "whitebox"``, one row per ε) become solid curves with 95 % Wilson bands, one per
(model label, SGLD steps, grad mode, attack). Rows that carry a whole curve in ``acc_curve`` (a list of
``{eps, acc, ci_low, ci_high}``, e.g. black-box rows) are drawn dashed in the panel of their norm. One
panel per norm.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from infra.io import atomic_write

log = logging.getLogger(__name__)

NORM_TITLES = {"linf": "L∞", "l2": "L2", "l0": "L0"}


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (:func:`infra.io.atomic_write`) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path


def curve_label(row: dict[str, Any]) -> str:
    """Legend text built from the row's own fields."""
    parts = [str(row.get("model", "?"))]
    if row.get("sgld_steps"):
        parts.append(str(row.get("grad_mode", "")))
    parts.append(str(row.get("attack", row.get("kind", ""))))
    if row.get("kind") == "whitebox" and row.get("steps"):
        parts.append(f"{row['steps']} steps")
    if (row.get("restarts") or 1) > 1:
        parts.append(f"{row['restarts']} restarts")
    if row.get("eot_used", 1) and row.get("eot_used", 1) > 1 and "EOT" not in parts[-1]:
        parts.append(f"EOT{row['eot_used']}")
    if row.get("_dup"):
        parts.append(str(row.get("checkpoint_sha256") or row.get("checkpoint") or "")[:8])
    return " ".join(p for p in parts if p)


def _curve_key(row: dict[str, Any]) -> tuple:
    return (row.get("kind"), row.get("model"), row.get("sgld_steps"), row.get("grad_mode"), row.get("attack"),
            row.get("steps"), row.get("restarts"), row.get("eot_used"),
            row.get("checkpoint_sha256") if row.get("_dup") else None)


def _points(row: dict[str, Any]) -> list[dict[str, float]]:
    """(eps, acc, ci_low, ci_high) points of a row: its ``acc_curve`` or its single ε."""
    if isinstance(row.get("acc_curve"), list):
        return [{"eps": float(p["eps"]), "acc": float(p["acc"]), "ci_low": float(p.get("ci_low", p["acc"])),
                 "ci_high": float(p.get("ci_high", p["acc"]))} for p in row["acc_curve"]]
    if "eps" in row and "robust_acc" in row:
        acc = float(row["robust_acc"])
        return [{"eps": float(row["eps"]), "acc": acc, "ci_low": float(row.get("robust_ci_low", acc)),
                 "ci_high": float(row.get("robust_ci_high", acc))}]
    return []


def as_dicts(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """Rows as flat dicts (typed rows of :mod:`attacks.rows` or dicts read from ``rows.jsonl``)."""
    return [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in rows]


def collect_curves(rows: Iterable[Any]) -> dict[str, dict[tuple, dict[str, Any]]]:
    """Group rows into curves: norm -> curve key -> {label, dashed, points (sorted by ε), rows}."""
    rows = [r for r in as_dicts(rows) if r.get("norm") and _points(r)]
    # the same label from different checkpoints gets the checkpoint hash in its legend
    shas: dict[str, set] = defaultdict(set)
    for r in rows:
        shas[str(r.get("model"))].add(r.get("checkpoint_sha256"))
    for r in rows:
        r["_dup"] = len(shas[str(r.get("model"))]) > 1
    out: dict[str, dict[tuple, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        key = _curve_key(r)
        curve = out[r["norm"]].setdefault(key, {"label": curve_label(r), "dashed": "acc_curve" in r,
                                                 "points": {}, "rows": []})
        curve["rows"].append(r)
        for p in _points(r):
            old = curve["points"].get(p["eps"])
            if old is not None and old["ts"] > str(r.get("timestamp", "")):
                continue
            if old is not None:
                log.warning("%s: several rows at ε=%g; keeping the newest", curve["label"], p["eps"])
            curve["points"][p["eps"]] = {**p, "ts": str(r.get("timestamp", "")), "row": r}
    for curves in out.values():
        for c in curves.values():
            c["points"] = [c["points"][e] for e in sorted(c["points"])]
    return dict(out)


def markdown_table(rows: Iterable[dict[str, Any]]) -> str:
    """The plotted numbers as a markdown table (one line per curve point)."""
    curves = collect_curves(rows)
    lines = ["| norm | curve | ε | n | clean acc | robust acc [95 % CI] | mean over draws | eval draws | checkpoint |",
             "|---|---|---|---|---|---|---|---|---|"]
    for norm in sorted(curves):
        for c in sorted(curves[norm].values(), key=lambda c: c["label"]):
            for p in c["points"]:
                r = p["row"]
                clean = r.get("clean_acc")
                mean = r.get("robust_acc_mean")
                sha = str(r.get("checkpoint_sha256") or "")[:12]
                lines.append(
                    f"| {NORM_TITLES.get(norm, norm)} | {c['label']} | {p['eps']:.4g} | {r.get('n', '')} | "
                    f"{'' if clean is None else f'{clean:.3f}'} | "
                    f"{p['acc']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}] | "
                    f"{'' if mean is None else f'{mean:.3f}'} | {r.get('eval_draws_used', '')} | "
                    f"{Path(str(r.get('checkpoint') or '')).as_posix()} {sha} |")
    return "\n".join(lines) + "\n"


def plot_rows(rows: Iterable[dict[str, Any]], out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Draw robust accuracy vs ε (one panel per norm) to ``out_png`` and the table to ``out_png`` with
    suffix ``.md``. Returns both paths. Raises ValueError when no row has plottable points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = as_dicts(rows)
    curves = collect_curves(rows)
    if not curves:
        raise ValueError("no plottable rows (need norm and eps/robust_acc, or acc_curve)")
    norms = sorted(curves, key=lambda n: list(NORM_TITLES).index(n) if n in NORM_TITLES else 99)
    fig, axes = plt.subplots(1, len(norms), figsize=(6.2 * len(norms), 4.6), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        cs = sorted(curves[norm].values(), key=lambda c: c["label"])
        colors = plt.cm.tab10.colors if len(cs) <= 10 else plt.cm.tab20.colors
        for i, c in enumerate(cs):
            eps = [p["eps"] for p in c["points"]]
            acc = [p["acc"] for p in c["points"]]
            color = colors[i % len(colors)]
            ax.plot(eps, acc, "--" if c["dashed"] else "-", marker="o", ms=3, color=color, label=c["label"])
            lo, hi = [p["ci_low"] for p in c["points"]], [p["ci_high"] for p in c["points"]]
            if len(eps) > 1:
                ax.fill_between(eps, lo, hi, color=color, alpha=0.15, lw=0)
            else:  # a single ε: show its interval as an error bar
                ax.errorbar(eps, acc, yerr=[[acc[0] - lo[0]], [hi[0] - acc[0]]], color=color, capsize=3, lw=1)
        _accuracy_axis(ax, f"{NORM_TITLES.get(norm, norm)} threat model", legend_size=7, legend_loc="best")
    n_vals = sorted({r.get("n") for r in rows if r.get("n")})
    fig.suptitle(f"robust accuracy vs ε (95 % Wilson bands; n = {', '.join(map(str, n_vals)) or '?'})", fontsize=10)
    fig.tight_layout()
    out_png = save_figure(fig, out_png, dpi=120)
    md = out_png.with_suffix(".md")
    atomic_write(md, f"# Robust accuracy vs ε\n\n![plot]({out_png.name})\n\n" + markdown_table(rows))
    return out_png, md


def plot_headline(head: list[dict[str, Any]], out_png: str | os.PathLike, names: dict[str, str],
                  certified: list[dict[str, Any]] | None = None) -> Path | None:
    """The paper's figure: one curve per defense (the per-example worst case over every attack), one panel per
    norm, 95 % Wilson bands; randomized smoothing's certified L2 accuracy (``certified``: certify rows) dashed
    in the L2 panel. ``names``: subject -> the name shown. None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = [n for n in NORM_TITLES if any(h["norm"] == n for h in head)]
    if not norms:
        return None
    fig, axes = plt.subplots(1, len(norms), figsize=(6.2 * len(norms), 4.6), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        by: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for h in head:
            if h["norm"] == norm and h["n"]:
                by[names.get(h["subject"], h["model"])].append(h)
        for i, (name, cells) in enumerate(sorted(by.items(), key=lambda kv: _model_order(kv[0]))):
            cells = sorted(cells, key=lambda h: h["eps"])
            eps = [h["eps"] for h in cells]
            color = plt.cm.tab10.colors[i % 10]
            ax.plot(eps, [h["robust_acc"] for h in cells], "-o", ms=3, color=color,
                    label=f"{name} (n={'/'.join(sorted({str(h['n']) for h in cells}))})")
            ax.fill_between(eps, [h["ci_low"] for h in cells], [h["ci_high"] for h in cells], color=color,
                            alpha=0.15, lw=0)
        if norm == "l2" and certified:
            pts = sorted(certified, key=lambda r: r["radius"])
            ax.plot([r["radius"] for r in pts], [r["certified_accuracy"] for r in pts], "--s", ms=3, color="black",
                    label=f"{pts[0]['model']} certified (n={pts[0].get('n_examples')})")
        _accuracy_axis(ax, f"{NORM_TITLES.get(norm, norm)}: worst case over every attack", legend_size=8,
                       legend_loc="upper right")
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=120)


def _accuracy_axis(ax: Any, title: str, *, legend_size: int, legend_loc: str) -> None:
    """The common frame of an accuracy-vs-ε panel: labels, [0,1] range, grid, legend."""
    ax.set_title(title)
    ax.set_xlabel("ε ([0,1] pixels)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc=legend_loc)


def _model_order(name: str) -> tuple:
    order = {"CE": 0, "PGD-AT": 1, "Gauss-aug": 2}
    if name.startswith("JEM-") and name[4:].split("[")[0].isdigit():
        return (3, int(name[4:].split("[")[0]), name)
    return (order.get(name.split(" ")[0], 4), 0, name)


__all__ = ["plot_rows", "plot_headline", "markdown_table", "collect_curves", "curve_label"]
