"""Robust accuracy vs ε from result rows alone (no model import): a PNG plus the same numbers as markdown.

White-box rows (``kind: "whitebox"``, one row per ε) become solid curves with 95 % Wilson bands, one per
(model label, SGLD steps, grad mode, attack, n). Rows that carry a whole curve in ``acc_curve`` (a list of
``{eps, acc, ci_low, ci_high}``, e.g. black-box rows) are drawn dashed. One row of panels per model, one panel
per norm (each axis in its norm's units), the legend beside each row, outside the data.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from infra.io import atomic_write

from .rows import escalates

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


def curve_label(row: dict[str, Any], with_model: bool = True) -> str:
    """Legend text built from the row's own fields (``with_model=False``: the attack part only, for a panel that
    holds one model)."""
    parts = [str(row.get("model", "?"))] if with_model else []
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
            row.get("steps"), row.get("restarts"), row.get("eot_used"), row.get("n"),
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
    """Group rows into curves: norm -> curve key -> {label, dashed, points (sorted by ε), rows}.

    A curve is one (model, attack and its budget, n examples). Where two rows give the same curve a point at the
    same ε (the same experiment run twice, e.g. by two stages), the newest counts; that is logged once per curve.
    """
    rows = [r for r in as_dicts(rows) if r.get("norm") and _points(r) and not escalates(r)]
    # the same label from different checkpoints gets the checkpoint hash in its legend
    shas: dict[str, set] = defaultdict(set)
    for r in rows:
        shas[str(r.get("model"))].add(r.get("checkpoint_sha256"))
    for r in rows:
        r["_dup"] = len(shas[str(r.get("model"))]) > 1
    out: dict[str, dict[tuple, dict[str, Any]]] = defaultdict(dict)
    repeated: dict[str, int] = defaultdict(int)
    for r in rows:
        key = _curve_key(r)
        attack_label = curve_label(r, False).replace("PGDL2", "PGD")  # the panel names the norm
        curve = out[r["norm"]].setdefault(key, {"label": curve_label(r), "attack_label": attack_label,
                                                 "model": str(r.get("model", "?")), "dashed": "acc_curve" in r,
                                                 "points": {}, "rows": []})
        curve["rows"].append(r)
        for p in _points(r):
            old = curve["points"].get(p["eps"])
            if old is not None:
                repeated[curve["label"]] += 1
                if old["ts"] > str(r.get("timestamp", "")):
                    continue
            curve["points"][p["eps"]] = {**p, "ts": str(r.get("timestamp", "")), "row": r}
    for label, count in repeated.items():
        log.debug("%s: %d points computed more than once; the newest row counts", label, count)
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


AXIS_UNITS = {"linf": "ε = max |δ|  ([0,1] pixel units)", "l2": "ε = ‖δ‖₂  ([0,1] pixel units)",
              "l0": "changed pixel values (L0 count)"}


def plot_rows(rows: Iterable[dict[str, Any]], out_png: str | os.PathLike) -> tuple[Path, Path]:
    """Draw robust accuracy vs ε per attack to ``out_png`` and the table to ``out_png`` with suffix ``.md``.

    One row of panels per model, one panel per norm, one curve per attack (solid: white-box, one row per ε;
    dashed: black-box, the whole curve from per-example distances), 95 % Wilson bands, and each model's legend
    beside its row, outside the data. Returns both paths. Raises ValueError when no row has plottable points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = as_dicts(rows)
    curves = collect_curves(rows)
    if not curves:
        raise ValueError("no plottable rows (need norm and eps/robust_acc, or acc_curve)")
    norms = sorted(curves, key=lambda n: list(NORM_TITLES).index(n) if n in NORM_TITLES else 99)
    models = sorted({c["model"] for cs in curves.values() for c in cs.values()}, key=model_order)
    entries = {m: len({(c["attack_label"], tuple(sorted({str(r.get("n")) for r in c["rows"]})))
                       for cs in curves.values() for c in cs.values() if c["model"] == m}) for m in models}
    heights = [max(2.6, 0.155 * entries[m] + 0.6) for m in models]  # room for each row's legend
    fig, axes = plt.subplots(len(models), len(norms), figsize=(4.4 * len(norms) + 4.2, sum(heights) + 0.6),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    for i, model in enumerate(models):
        def legend(c: dict[str, Any]) -> str:
            return f"{c['attack_label']} (n={'/'.join(sorted({str(r.get('n')) for r in c['rows']}))})"

        labels = sorted({legend(c) for cs in curves.values() for c in cs.values() if c["model"] == model})
        palette = plt.cm.tab10.colors if len(labels) <= 10 else plt.cm.tab20.colors
        color = {label: palette[j % len(palette)] for j, label in enumerate(labels)}
        handles: dict[str, Any] = {}
        for ax, norm in zip(axes[i], norms):
            mine = sorted((c for c in curves[norm].values() if c["model"] == model), key=legend)
            for c in mine:
                eps = [p["eps"] for p in c["points"]]
                acc = [p["acc"] for p in c["points"]]
                col = color[legend(c)]
                (line,) = ax.plot(eps, acc, "--" if c["dashed"] else "-", marker="o", ms=3, color=col)
                handles.setdefault(legend(c), line)
                lo, hi = [p["ci_low"] for p in c["points"]], [p["ci_high"] for p in c["points"]]
                if len(eps) > 1:
                    ax.fill_between(eps, lo, hi, color=col, alpha=0.12, lw=0)
                else:  # a single ε: its interval as an error bar
                    ax.errorbar(eps, acc, yerr=[[acc[0] - lo[0]], [hi[0] - acc[0]]], color=col, capsize=3, lw=1)
            ax.set_title(f"{model} · {NORM_TITLES.get(norm, norm)}", fontsize=9)
            ax.set_xlabel(AXIS_UNITS.get(norm, "ε"), fontsize=8)
            ax.set_ylabel("robust accuracy", fontsize=8)
            ax.set_ylim(-0.02, 1.02)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if not mine:
                ax.text(0.5, 0.5, "not attacked in this norm", ha="center", va="center", fontsize=8,
                        transform=ax.transAxes, color="grey")
        axes[i][-1].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left",
                           bbox_to_anchor=(1.03, 1.0), borderaxespad=0, frameon=False)
    fig.suptitle("robust accuracy vs ε per attack (solid: white-box, dashed: black-box; 95 % Wilson bands)",
                 fontsize=10)
    fig.tight_layout()
    out_png = save_figure(fig, out_png, dpi=110)
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
    fig, axes = plt.subplots(1, len(norms), figsize=(8.4 * len(norms), 4.6), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        by: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for h in head:
            if h["norm"] == norm and h["n"]:
                by[names.get(h["subject"], h["model"])].append(h)
        for i, (name, cells) in enumerate(sorted(by.items(), key=lambda kv: model_order(kv[0]))):
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
                       legend_loc="upper left", norm=norm)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=120)


def _accuracy_axis(ax: Any, title: str, *, legend_size: int, legend_loc: str, norm: str = "") -> None:
    """The common frame of an accuracy-vs-ε panel: labels (units of the norm), [0,1] range, grid, legend."""
    ax.set_title(title)
    ax.set_xlabel(AXIS_UNITS.get(norm, "ε ([0,1] pixel units)"))
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc=legend_loc, bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)


def model_order(name: str) -> tuple:
    """The order models are listed in (tables, legends): CE, PGD-AT, Gaussian augmentation, JEM-k by k, then any
    other; ties by name, never by set order. ``name`` is a label, maybe with settings (``JEM-1[step=0.1]``) or a
    defense id after a space (``JEM-0 [3fa2…]``)."""
    head = name.split(" ")[0]
    if head.startswith("JEM-"):
        k = head[4:].split("[")[0]
        return (3, int(k) if k.isdigit() else 99, name)
    return ({"CE": 0, "PGD-AT": 1, "GAUSS-AUG": 2}.get(head.upper(), 4), 0, name)


__all__ = ["plot_rows", "plot_headline", "markdown_table", "collect_curves", "curve_label"]
