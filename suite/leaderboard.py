"""One leaderboard: every defense of one or more run folders at one ε per norm, from their rows alone.

Per defense and norm: clean accuracy and robust accuracy (the per-example worst case over every attack that covered
its selection, :func:`attacks.checks.worst_case`) with Wilson intervals on its own selection, the same on the
selection every listed defense of that norm shares (paired, so two lines compare on the same examples), the single
attack that alone broke the most (and how many more the worst case over all of them broke), and what the cell
cost in network passes per example. Built by the study's report and by ``robust-jem leaderboard RUN...``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from attacks.checks import load_side_files, worst_case
from attacks.common import format_eps, same_eps, wilson
from attacks.plots import NORM_TITLES, model_order
from attacks.rows import WhiteboxRow, of_kind, parse_row
from infra.records import ROWS, read_rows

from robust_jem.errors import UserError

from .tables import ci_text, pct

log = logging.getLogger(__name__)


def attack_name(r: WhiteboxRow) -> str:
    """A row's attack as the leaderboard names it: the escalation round's budget name, else attack and budget."""
    if r.escalation:
        return f"{r.escalation.get('name', r.attack)} (escalation)"
    mode = f", {r.grad_mode}" if r.sgld_steps else ""
    return f"{r.attack} {r.steps or ''} steps, EOT {r.eot_used}{mode}".replace("  ", " ")


def leaderboard(runs: Sequence[str | Path], eps: dict[str, float]) -> list[dict[str, Any]]:
    """One entry per (defense, norm) at ``eps[norm]`` over every run folder in ``runs`` (see the module docstring).

    Raises:
        UserError: a folder without rows, or no defense attacked at any asked ε.
    """
    entries: list[dict[str, Any]] = []
    for run in map(Path, runs):
        raw = read_rows(run / ROWS)
        if not raw:
            raise UserError(f"{run} holds no rows ({run / ROWS} is missing or empty)")
        rows = [r for r in map(parse_row, raw) if r is not None]
        by_key = {r.key: r for r in of_kind(rows, WhiteboxRow)}
        for cell in worst_case(rows, load_side_files(run, raw)):
            if cell["norm"] not in eps or not same_eps(cell["eps"], eps[cell["norm"]]):
                continue
            white = [by_key[k] for k in cell["rows"] if k in by_key]
            entries.append(_entry(cell, white, run))
    if not entries:
        raise UserError(f"no defense in {', '.join(map(str, runs))} was attacked at "
                        + ", ".join(f"{NORM_TITLES.get(n, n)} ε = {format_eps(e)}" for n, e in eps.items()))
    for norm in {e["norm"] for e in entries}:
        mine = [e for e in entries if e["norm"] == norm]
        _name(mine)
        shared = set.intersection(*(set(e["example_indices"]) for e in mine))
        for e in mine:
            k = sum(c for i, c in zip(e["example_indices"], e["correct"]) if i in shared)
            lo, hi = wilson(k, len(shared))
            e.update(n_shared=len(shared), robust_shared=k / len(shared) if shared else float("nan"),
                     shared_ci_low=lo, shared_ci_high=hi)
    return sorted(entries, key=lambda e: (e["norm"], model_order(e["model"]), e["subject"]))


def _name(entries: list[dict[str, Any]]) -> None:
    """Each entry's ``name`` in tables and figures: its label, followed by its run's folder where two runs hold a
    defense of that label (the study's CE and another run's CE), and by its defense id where one run holds two."""
    tags: list[list[str]] = [[] for _ in entries]

    def shown(i: int) -> str:
        return entries[i]["model"] + (f" ({', '.join(tags[i])})" if tags[i] else "")

    for key in ("run", "subject"):
        count = Counter(shown(i) for i in range(len(entries)))
        for i, e in enumerate(entries):
            if count[shown(i)] > 1:
                tags[i].append(Path(e["run"]).name if key == "run" else e["subject"][:8])
    for i, e in enumerate(entries):
        e["name"] = shown(i)


def _entry(cell: dict[str, Any], white: list[WhiteboxRow], run: Path) -> dict[str, Any]:
    selection = set(cell["example_indices"])
    full = [r for r in white if selection <= set(r.example_indices)]
    clean_row = max(full, key=lambda r: r.n) if full else None
    clean = [c for i, c in zip(clean_row.example_indices, clean_row.clean_correct or []) if i in selection] \
        if clean_row else []
    best, best_k = None, None
    for r in full:  # the single attack that alone leaves the fewest standing
        k = sum(c for i, c in zip(r.example_indices, r.correct) if i in selection)
        if best_k is None or k < best_k:
            best, best_k = r, k
    n = cell["n"]
    passes = sum((r.passes_per_example or 0) * r.n for r in white) / n if n else 0.0
    lo, hi = wilson(sum(clean), len(clean)) if clean else (float("nan"), float("nan"))
    return {"run": str(run), "subject": cell["subject"], "model": cell["model"], "objective": cell["objective"],
            "norm": cell["norm"], "eps": cell["eps"], "n": n,
            "clean_acc": sum(clean) / len(clean) if clean else float("nan"), "clean_ci_low": lo, "clean_ci_high": hi,
            "robust_acc": cell["robust_acc"], "ci_low": cell["ci_low"], "ci_high": cell["ci_high"],
            "strongest": attack_name(best) if best else "–",
            "strongest_acc": best_k / n if best is not None and n else float("nan"),
            "attacks": cell["attacks"], "passes_per_example": round(passes),
            "example_indices": cell["example_indices"], "correct": cell["correct"]}


def leaderboard_markdown(entries: list[dict[str, Any]]) -> list[str]:
    """The leaderboard as Markdown lines, one table per norm."""
    md: list[str] = []
    for norm in sorted({e["norm"] for e in entries}):
        mine = [e for e in entries if e["norm"] == norm]
        md += [f"### {NORM_TITLES.get(norm, norm)} ε = {format_eps(mine[0]['eps'])}", "",
               f"Robust accuracy on each defense's own selection (n) and on the {mine[0]['n_shared']} examples every "
               "defense below shares (compare those); [95 % Wilson CI].", "",
               "| defense | clean | robust (n) | robust on the shared examples | strongest single attack (alone) "
               "| attacks | passes per example |", "|---|---|---|---|---|---|---|"]
        for e in mine:
            md.append(f"| {e['name']} | {ci_text(e['clean_acc'], e['clean_ci_low'], e['clean_ci_high'])} | "
                      f"{ci_text(e['robust_acc'], e['ci_low'], e['ci_high'])} (n={e['n']}) | "
                      f"{ci_text(e['robust_shared'], e['shared_ci_low'], e['shared_ci_high'])} | "
                      f"{e['strongest']} ({pct(e['strongest_acc'])}) | {e['attacks']} | "
                      f"{e['passes_per_example']:,} |")
        md.append("")
    return md


def plot_leaderboard(entries: list[dict[str, Any]], path: Path) -> Path | None:
    """Clean (open) and robust (filled) accuracy with intervals, one line per defense, one panel per norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = sorted({e["norm"] for e in entries})
    if not norms:
        return None
    height = max(2.5, 0.45 * max(sum(e["norm"] == n for e in entries) for n in norms) + 1.2)
    label_in = 0.075 * max(len(f"{e['name']} (n={e['n']})") for e in entries)  # room for the longest tick label
    fig, axes = plt.subplots(1, len(norms), figsize=((3.5 + label_in) * len(norms), height), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        mine = [e for e in entries if e["norm"] == norm][::-1]
        ys = range(len(mine))
        for y, e in zip(ys, mine):
            ax.errorbar([100 * e["robust_acc"]], [y], xerr=[[100 * (e["robust_acc"] - e["ci_low"])],
                                                            [100 * (e["ci_high"] - e["robust_acc"])]],
                        fmt="o", color="C0", capsize=3, label="robust" if y == 0 else None)
            if e["clean_acc"] == e["clean_acc"]:
                ax.errorbar([100 * e["clean_acc"]], [y], xerr=[[100 * (e["clean_acc"] - e["clean_ci_low"])],
                                                               [100 * (e["clean_ci_high"] - e["clean_acc"])]],
                            fmt="o", mfc="none", color="C1", capsize=3, label="clean" if y == 0 else None)
        ax.set_yticks(list(ys), [f"{e['name']} (n={e['n']})" for e in mine])
        ax.set_xlim(-2, 102)
        ax.set_xlabel("accuracy % [95 % CI]")
        ax.set_title(f"{NORM_TITLES.get(norm, norm)} ε = {format_eps(mine[0]['eps'])}")
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_eps(run: str | Path) -> dict[str, float]:
    """The middle ε per norm a study run records in its ``report_context.json``."""
    ctx = Path(run) / "report_context.json"
    if not ctx.is_file():
        raise UserError(f"{run} has no report_context.json to take the ε from; give --linf-eps and --l2-eps")
    mids = json.loads(ctx.read_text()).get("mids") or {}
    if not mids:
        raise UserError(f"{ctx} names no middle ε; give --linf-eps and --l2-eps")
    return {str(k): float(v) for k, v in mids.items()}
