"""Convergence evidence from rows alone: robust accuracy against attack steps and against EOT draws at one ε,
and the attack's mean margin per step (Carlini et al. 2019: more iterations and more samples must not help
the model; an attack whose margin still falls at its last step has not converged).

The ladders are read off white-box rows: PGD-family rows with one restart, full gradients, fp32, at the
ε asked for. Steps ladder: rows with one EOT draw, by steps. EOT ladder: rows at the smallest step count
that has rows with more than one EOT draw, by draws.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from attacks.common import same_eps
from attacks.plots import NORM_TITLES, save_figure
from attacks.rows import Row, WhiteboxRow, of_kind


def ladders(rows: list[Row], norm: str, eps: float) -> dict[str, dict[str, list[WhiteboxRow]]]:
    """model -> {"steps": rows by steps, "eot": rows by EOT draws}."""
    cand = [r for r in of_kind(rows, WhiteboxRow) if r.norm == norm and same_eps(r.eps, eps)
            and r.attack_family == "pgd" and r.restarts == 1 and r.grad_mode == "full" and r.precision == "fp32"]
    by_model: dict[str, list[WhiteboxRow]] = defaultdict(list)
    for r in cand:
        by_model[r.model].append(r)
    out: dict[str, dict[str, list[WhiteboxRow]]] = {}
    for model, rs in by_model.items():
        steps = _smallest_n(rs, lambda r: r.eot_used == 1, "steps")
        multi = [r.steps for r in rs if r.eot_used > 1]
        eot = _smallest_n(rs, lambda r, s=min(multi): r.steps == s, "eot_used") if multi else []
        if len(steps) > 1 or len(eot) > 1:
            out[model] = {"steps": steps, "eot": eot}
    return out


def _smallest_n(rows: list[WhiteboxRow], keep: Any, attr: str) -> list[WhiteboxRow]:
    """One row per value of ``attr`` among ``rows`` passing ``keep``: the one on the fewest examples (the
    ladder's own selection), sorted by the value."""
    best: dict[Any, WhiteboxRow] = {}
    for r in rows:
        if keep(r):
            v = getattr(r, attr)
            if v not in best or r.n < best[v].n:
                best[v] = r
    return [best[v] for v in sorted(best)]


def convergence_table(rows: list[Row], mids: dict[str, float]) -> str:
    """Markdown: per norm and model, robust accuracy along each ladder (n and the last margin step beside)."""
    lines = ["| norm | model | ladder | robust accuracy (n) |", "|---|---|---|---|"]
    for norm, eps in mids.items():
        for model, lad in sorted(ladders(rows, norm, eps).items()):
            for name, attr in (("steps", "steps"), ("eot", "eot_used")):
                rs = lad[name]
                if len(rs) < 2:
                    continue
                vals = ", ".join(f"{getattr(r, attr)}: {100 * r.robust_acc:.0f} %" for r in rs)
                lines.append(f"| {NORM_TITLES.get(norm, norm)} ε={eps:g} | {model} | "
                             f"{'PGD steps (EOT 1)' if name == 'steps' else f'EOT draws ({rs[0].steps} steps)'} | "
                             f"{vals} (n={rs[0].n}) |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot_convergence(rows: list[Row], mids: dict[str, float], out_png: str | Path) -> Path | None:
    """Three panels per norm: robust accuracy vs steps, vs EOT draws, and the mean margin per step of the
    longest steps-ladder attack. None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_norm = {norm: ladders(rows, norm, eps) for norm, eps in mids.items()}
    per_norm = {k: v for k, v in per_norm.items() if v}
    if not per_norm:
        return None
    fig, axes = plt.subplots(len(per_norm), 3, figsize=(15, 4 * len(per_norm)), squeeze=False)
    for ax_row, (norm, lads) in zip(axes, per_norm.items()):
        title = f"{NORM_TITLES.get(norm, norm)} ε={mids[norm]:g}"
        for model, lad in sorted(lads.items()):
            if len(lad["steps"]) > 1:
                ax_row[0].errorbar([r.steps for r in lad["steps"]], [r.robust_acc for r in lad["steps"]],
                                   yerr=_err(lad["steps"]), marker="o", capsize=3, label=f"{model} (n={lad['steps'][0].n})")
                longest = lad["steps"][-1]
                trace = next(iter(longest.margin_trace.values()), [])
                if trace:
                    ax_row[2].plot(range(1, len(trace) + 1), trace, label=f"{model} ({longest.steps} steps)")
            if len(lad["eot"]) > 1:
                ax_row[1].errorbar([r.eot_used for r in lad["eot"]], [r.robust_acc for r in lad["eot"]],
                                   yerr=_err(lad["eot"]), marker="o", capsize=3, label=f"{model} (n={lad['eot'][0].n})")
        for ax, xl, yl in ((ax_row[0], "PGD steps (log)", "robust accuracy"),
                           (ax_row[1], "EOT draws per step (log)", "robust accuracy"),
                           (ax_row[2], "step", "mean margin (true − best other logit)")):
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
        ax_row[0].set_xscale("log")
        ax_row[1].set_xscale("log")
    fig.suptitle("convergence of the white-box attacks (95 % Wilson intervals)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=110)


def _err(rows: list[WhiteboxRow]) -> list[list[float]]:
    return [[r.robust_acc - r.robust_ci_low for r in rows], [r.robust_ci_high - r.robust_acc for r in rows]]
