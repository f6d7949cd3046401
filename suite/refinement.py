"""The refinement-strength study: does JEM-k's SGLD refinement buy robustness over JEM-0, and at what cost?

For every JEM checkpoint, JEM-k for each k of ``sgld_steps`` with the checkpoint's own SGLD step (the defense's
definition, :func:`robust_jem.refined.default_refinement`), and for each k of ``scaled_steps`` with that step times
each factor of ``step_scales``. Every cell gets:

* robust accuracy at one ε per norm on **one shared random selection** of ``n`` test examples (the same for every
  cell and checkpoint), attacked with the study's protocol: PGD with full gradients through the chain and BPDA, then
  escalation on the survivors (AutoAttack-rand with EOT, margin and energy-aimed PGD, APGD-T, the fixed-noise
  deployment, Square) — the per-example worst case over all of them;
* clean accuracy and refinement activity (displacement, energy change, predictions changed against the bare
  classifier and JEM-0) on the first ``n_activity`` clean test images, and the activity on the attack's candidates.

The report compares each cell with JEM-0 of the same checkpoint on the shared examples (exact McNemar, and the
difference 100 examples could detect), names the most robust cell (for an independent attack to check), and draws
robust and clean accuracy against k. Resumable like the study: every stage skips the rows it already wrote.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from attacks.checks import load_side_files, paired_outcomes, run_checks, worst_case
from attacks.common import format_eps, same_eps, wilson
from attacks.plots import NORM_TITLES
from attacks.rows import ActivityRow, WhiteboxRow, of_kind, parse_row
from infra.io import atomic_write
from infra.provenance import device_name, file_sha256, git_sha, now
from infra.records import ROWS, read_rows
from robust_jem.checkpoint import load
from robust_jem.config import ENERGY_OBJECTIVES, model_name
from robust_jem.errors import UserError
from robust_jem.refined import default_refinement

from .evaluate import ActivityJob, EscalationJob, PGDSettings, Round, WhiteboxJob, refuse_foreign_rows
from .report import escalation_section
from .study import Stage, escalation_rounds, logging_into, run_stages
from .tables import ci_text, pct
from .targets import Chain

log = logging.getLogger(__name__)

CONTEXT = "refinement_context.json"


@dataclass(frozen=True)
class RefinementPlan:
    """Sizes of the refinement-strength study (see the module docstring)."""

    sgld_steps: tuple[int, ...]  # k at the checkpoint's own SGLD step (0 included: the reference every cell meets)
    step_scales: tuple[float, ...]  # factors of that step for the k of scaled_steps (1 is the definition itself)
    scaled_steps: tuple[int, ...]
    n: int  # the shared random selection every cell is attacked on
    eps: tuple[tuple[str, float], ...]  # (norm, ε): one budget per norm, the study's middle ones
    attack: PGDSettings
    rounds: tuple[Round, ...]
    repeats: int = 1
    n_activity: int = 1000
    n_activity_candidates: int = 20
    selection_seed: int = 0
    clamp_steps: tuple[int, ...] = ()  # k also run with the chains kept in [-1, 1] (JEM-k[clamp]), at the own step

    def validate(self) -> "RefinementPlan":
        if 0 not in self.sgld_steps:
            raise UserError("the refinement study needs k = 0 (JEM-0) in sgld_steps: every cell is compared with it")
        if any(k <= 0 for k in self.scaled_steps) or any(s <= 0 for s in self.step_scales):
            raise UserError("scaled_steps and step_scales must be positive")
        return self


REFINEMENT_PLANS: dict[str, RefinementPlan] = {
    # seconds: the tests run it on tiny models
    "tiny": RefinementPlan(sgld_steps=(0, 1, 2), step_scales=(0.5, 1.0), scaled_steps=(1,), n=6,
                           eps=(("linf", 0.1), ("l2", 2.0)),
                           attack=PGDSettings(steps=3, restarts=1, eot=1, eval_draws=2),
                           rounds=escalation_rounds(steps=2, eot=1, square_queries=5, square_eot=1, n_targets=1),
                           n_activity=20, n_activity_candidates=3, clamp_steps=(1,)),
    # one checkpoint in about an hour of a 2-core CPU: k in {0, 1, 10} at the training step, k = 1 at a third and
    # three times it; the quick study's headline PGD (20 steps) and escalation rounds
    "quick": RefinementPlan(sgld_steps=(0, 1, 10), step_scales=(0.3, 1.0, 3.0), scaled_steps=(1,), n=100,
                            eps=(("linf", 0.1), ("l2", 2.0)),
                            attack=PGDSettings(steps=20, restarts=1, eot=1, eval_draws=20),
                            rounds=escalation_rounds(steps=10, eot=3, square_queries=100, square_eot=2, n_targets=1,
                                                     pgd_steps=50, pgd_eot=1),
                            n_activity=1000, n_activity_candidates=20),
    # the quick plan's budgets on the clamped chains (JEM-k[clamp]) against JEM-0: for JEMs trained with clamped
    # chains, whose unclamped refinement leaves the [-1, 1] box
    "quick-clamp": RefinementPlan(sgld_steps=(0,), step_scales=(1.0,), scaled_steps=(), n=100,
                                  eps=(("linf", 0.1), ("l2", 2.0)),
                                  attack=PGDSettings(steps=20, restarts=1, eot=1, eval_draws=20),
                                  rounds=escalation_rounds(steps=10, eot=3, square_queries=100, square_eot=2,
                                                           n_targets=1, pgd_steps=50, pgd_eot=1),
                                  n_activity=1000, n_activity_candidates=20, clamp_steps=(1, 10)),
    # the grid: k up to 30, step factors at k = 1 and 10, the standard study's protocol (hours on a CPU)
    "standard": RefinementPlan(sgld_steps=(0, 1, 10, 30), step_scales=(0.3, 1.0, 3.0), scaled_steps=(1, 10), n=100,
                               eps=(("linf", 0.1), ("l2", 2.0)),
                               attack=PGDSettings(steps=50, restarts=2, eot=1, eval_draws=20),
                               rounds=escalation_rounds(steps=100, eot=20, square_queries=1000, square_eot=10),
                               n_activity=1000, n_activity_candidates=50, clamp_steps=(1, 10, 30)),
}


def training_sampler(checkpoint: str) -> Any:
    """The SGLD settings a checkpoint was trained with (its config's ``sgld``; None for imported checkpoints)."""
    return getattr(load(checkpoint).checkpoint_info.get("config"), "sgld", None)


def cell_chains(plan: RefinementPlan, checkpoint: str) -> list[tuple[str, int, Chain]]:
    """(name, k, chain) of every cell for one checkpoint, cheapest first (by k): a study cut short keeps JEM-0 and
    the short chains, and resumes with the long ones."""
    base = default_refinement(1, training_sampler(checkpoint)).step_size
    cells = [(f"k{k}-x1", k, Chain((k,))) for k in plan.sgld_steps]
    cells += [(f"k{k}-x{s:g}", k, Chain((k,), step_size=s * base)) for k in plan.scaled_steps
              for s in plan.step_scales if s != 1.0]
    cells += [(f"k{k}-x1-clamp", k, Chain((k,), clamp=True)) for k in plan.clamp_steps]
    return sorted(cells, key=lambda c: (c[1], c[2].clamp is not None, c[2].step_size is not None, c[0]))


def refinement_stages(plan: RefinementPlan, checkpoints: Sequence[str]) -> list[Stage]:
    """The study's jobs in order: per checkpoint and cell (cheapest first), the white-box attacks (both norms), then
    the escalation on their survivors and the activity."""
    st: list[Stage] = []
    for i, ckpt in enumerate(checkpoints):
        for cell, _, chain in cell_chains(plan, ckpt):
            name = f"m{i}-{cell}"
            for norm, eps in plan.eps:
                st.append(Stage(f"pgd-{norm}-{name}", "whitebox", WhiteboxJob(
                    (ckpt,), (norm,), (eps,), plan.attack, chain, ("full", "bpda"), n_examples=plan.n,
                    example_rule="random", seed=plan.selection_seed)))
            for norm, eps in plan.eps:
                st.append(Stage(f"escalate-{norm}-{name}", "escalation",
                                EscalationJob((ckpt,), (norm,), (eps,), plan.rounds, chain, repeats=plan.repeats)))
            st.append(Stage(f"activity-{name}", "activity", ActivityJob(
                (ckpt,), chain, n_examples=plan.n_activity, candidates=plan.eps,
                n_candidates=plan.n_activity_candidates)))
    return st


def run_refinement_study(checkpoints: Sequence[str], plan_name: str = "quick", out: str | Path = "results/refinement",
                         device: torch.device | str = "cpu", data_dir: str | None = None,
                         progress: bool = True) -> Path:
    """Run the refinement-strength study of ``plan_name`` on JEM ``checkpoints`` into ``out``; return ``out``."""
    if plan_name not in REFINEMENT_PLANS:
        raise UserError(f"unknown plan {plan_name!r}; choose from {', '.join(REFINEMENT_PLANS)}")
    plan = REFINEMENT_PLANS[plan_name].validate()
    checkpoints = list(dict.fromkeys(map(str, checkpoints)))
    if not checkpoints:
        raise UserError("give at least one --checkpoint")
    names = {}
    for c in checkpoints:
        if not Path(c).is_file():
            raise UserError(f"no checkpoint at {c}")
        info = load(c).checkpoint_info
        if info["objective"] not in ENERGY_OBJECTIVES:
            raise UserError(f"{c} is a {info['objective']} model: the refinement study needs JEM checkpoints "
                            f"({', '.join(ENERGY_OBJECTIVES)})")
        names[c] = model_name(info["config"]) if hasattr(info.get("config"), "preset") else Path(c).stem
    out = Path(out)
    refuse_foreign_rows(out, checkpoints, hint="pass --out NEW for another run, or remove it")
    if (out / CONTEXT).is_file() and json.loads((out / CONTEXT).read_text()).get("plan") != plan_name:
        raise UserError(f"{out} holds a run of another plan; pass --out NEW for another run, or remove it")
    t0 = time.perf_counter()
    with logging_into(out):
        atomic_write(out / CONTEXT, json.dumps({"plan": plan_name, "plan_settings": asdict(plan), "device": str(device),
                                                "device_name": device_name(device),
                                                "checkpoints": {c: {"name": names[c], "sha256": file_sha256(c)}
                                                                for c in checkpoints}}, indent=1, default=str))
        run_stages(refinement_stages(plan, checkpoints), out, device=torch.device(device), data_dir=data_dir,
                   progress=progress)
        write_refinement_report(out)
        log.info("refinement study finished in %.0f s: %s", time.perf_counter() - t0, out / "report.md")
    return out


# ------------------------------------------------------------------------------------------------
# the report: from the rows and the context alone
# ------------------------------------------------------------------------------------------------
def refinement_cells(run_dir: Path) -> list[dict[str, Any]]:
    """One entry per (checkpoint, refinement, norm): the worst-case cell at the plan's ε, its clean accuracy and
    activity (clean images and candidates), and the paired comparison with that checkpoint's JEM-0."""
    ctx = json.loads((run_dir / CONTEXT).read_text())
    eps = dict((str(n), float(e)) for n, e in ctx["plan_settings"]["eps"])
    raw = read_rows(run_dir / ROWS)
    rows = [r for r in map(parse_row, raw) if r is not None]
    head = [c for c in worst_case(rows, load_side_files(run_dir, raw))
            if c["norm"] in eps and same_eps(c["eps"], eps[c["norm"]])]
    white = {r.subject: r for r in of_kind(rows, WhiteboxRow) if not r.escalation}
    acts = of_kind(rows, ActivityRow)
    cells = []
    for c in head:
        r = white.get(c["subject"])
        if r is None or r.checkpoint not in ctx["checkpoints"]:
            continue
        clean = next((a for a in acts if a.defense_id == c["subject"] and a.inputs == "clean"), None)
        cand = next((a for a in acts if a.defense_id == c["subject"] and a.norm == c["norm"]
                     and a.inputs != "clean"), None)
        k_clean = round(clean.accuracy_refined * clean.n) if clean else 0
        lo, hi = wilson(k_clean, clean.n) if clean else (float("nan"), float("nan"))
        cells.append({**c, "checkpoint": r.checkpoint, "name": ctx["checkpoints"][r.checkpoint]["name"],
                      "k": r.sgld_steps, "step": r.sgld_step_size, "noise": r.sgld_noise,
                      "clamp": bool(r.defense_params.get("sgld_clamp")),
                      "clean_acc": clean.accuracy_refined if clean else float("nan"),
                      "clean_n": clean.n if clean else 0,
                      "clean_low": lo, "clean_high": hi, "activity": asdict(clean) if clean else None,
                      "candidates": asdict(cand) if cand else None})
    for c in cells:
        ref = next((b for b in cells if b["checkpoint"] == c["checkpoint"] and b["norm"] == c["norm"]
                    and b["k"] == 0), None)
        if ref is not None and ref is not c:
            q = paired_outcomes(c["example_indices"], c["correct"], ref["example_indices"], ref["correct"])
            c["vs_jem0"] = {"n": q.n, "robust": q.robust_a, "robust_jem0": q.robust_b, "only_this": q.only_a,
                            "only_jem0": q.only_b, "p": q.p, "detectable": q.detectable,
                            "clean_change": c["clean_acc"] - ref["clean_acc"]}
    return sorted(cells, key=lambda c: (c["checkpoint"], c["norm"], c["clamp"], c["step"] if c["k"] else 0, c["k"]))


def verdict_line(cells: list[dict[str, Any]]) -> str:
    """The answer for one checkpoint and norm: the most robust refinement against JEM-0, in plain words."""
    ref = next((c for c in cells if c["k"] == 0), None)
    best = max(cells, key=lambda c: (c["robust_acc"], -c["k"]))
    where = f"{NORM_TITLES.get(best['norm'], best['norm'])} ε = {format_eps(best['eps'])}"
    if ref is None:
        return f"- {where}: JEM-0 was not attacked; no comparison."
    worse = [c for c in cells if c.get("vs_jem0") and c["vs_jem0"]["p"] < 0.05
             and c["vs_jem0"]["only_jem0"] > c["vs_jem0"]["only_this"]]
    costs = (" Refinement **costs** robustness in " + "; ".join(
        f"{c['model']} ({c['vs_jem0']['robust']} vs {c['vs_jem0']['robust_jem0']} robust, only this / only JEM-0 "
        f"{c['vs_jem0']['only_this']} / {c['vs_jem0']['only_jem0']}, p = {c['vs_jem0']['p']:.2g})" for c in worse)
             + ".") if worse else ""
    if best is ref or "vs_jem0" not in best:
        return (f"- {where}: no refinement is more robust than JEM-0 ({pct(ref['robust_acc'])} of {ref['n']}); "
                f"the most robust cell is JEM-0 itself.{costs}")
    v = best["vs_jem0"]
    if v["p"] < 0.05:
        answer = "refinement **buys** robustness here"
    else:
        answer = "refinement buys **no detectable** robustness here"
    inactive = " (its refinement is inactive on clean images)" if (best["activity"] or {}).get("inactive") else ""
    return (f"- {where}: {answer}. The most robust cell, {best['model']}{inactive}, keeps {v['robust']} of "
            f"{v['n']} shared examples against JEM-0's {v['robust_jem0']} (robust only under it {v['only_this']}, only "
            f"under JEM-0 {v['only_jem0']}; exact McNemar p = {v['p']:.3g}; at this n a difference below "
            f"{100 * v['detectable']:.0f} points goes undetected with 20 % probability or more); clean accuracy "
            f"{pct(best['clean_acc'])} vs {pct(ref['clean_acc'])} for JEM-0 (n = {best['clean_n']}), a change of "
            f"{100 * v['clean_change']:+.1f} points.{costs}")


def most_robust(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cell with the highest robust accuracy, JEM-0 included (ties: the larger n, then the shorter chain)."""
    return max(cells, key=lambda c: (c["robust_acc"], c["n"], -c["k"])) if cells else None


def _cell_table(cells: list[dict[str, Any]]) -> list[str]:
    md = ["| refinement | k | SGLD step | clean (n) | robust (n) | vs JEM-0: only this / only JEM-0, p | moves clean "
          "L2 / L∞ | energy change | changes vs bare / JEM-0 | changes candidates vs bare | attacks |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        a, cand, v = c["activity"] or {}, c["candidates"] or {}, c.get("vs_jem0")
        md.append(
            f"| {c['model']} | {c['k']} | {c['step']:g} | {ci_text(c['clean_acc'], c['clean_low'], c['clean_high'])} "
            f"({c['clean_n']}) | {ci_text(c['robust_acc'], c['ci_low'], c['ci_high'])} ({c['n']}) | "
            + (f"{v['only_this']} / {v['only_jem0']}, {v['p']:.2g}" if v else "–") + " | "
            + (f"{a['displacement_l2']:.3g} / {a['displacement_linf']:.3g}" if a else "–") + " | "
            + (f"{a['energy_change']:+.3g}" if a else "–") + " | "
            + (f"{pct(a['changed_vs_bare'])} / {pct(a['changed_vs_jem0'])}"
               f"{' (inactive)' if a['inactive'] and c['k'] else ''}"
               if a else "–") + " | "
            + (pct(cand["changed_vs_bare"]) if cand else "–") + f" | {c['attacks']} |")
    return md


def plot_refinement(cells: list[dict[str, Any]], path: Path) -> Path | None:
    """Robust (filled) and clean (open) accuracy against k, one line per SGLD step, one panel per checkpoint and
    norm, 95 % Wilson intervals; JEM-0 belongs to every step's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {"linf": 0, "l2": 1}
    panels = sorted({(c["checkpoint"], c["norm"]) for c in cells}, key=lambda p: (p[0], order.get(p[1], 2), p[1]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (ckpt, norm) in zip(axes[0], panels):
        mine = [c for c in cells if c["checkpoint"] == ckpt and c["norm"] == norm]
        ref = [c for c in mine if c["k"] == 0]
        for j, (clamp, step) in enumerate(sorted({(c["clamp"], c["step"]) for c in mine if c["k"] > 0})):
            line = sorted(ref + [c for c in mine if c["k"] > 0 and (c["clamp"], c["step"]) == (clamp, step)],
                          key=lambda c: c["k"])
            what_chain = f"SGLD step {step:g}" + (", clamped" if clamp else "")
            ks = [c["k"] * (1 + 0.04 * j) + 0.04 * j for c in line]  # a small offset per line: intervals apart
            for key, lo, hi, fill, what in (("robust_acc", "ci_low", "ci_high", None, "robust"),
                                            ("clean_acc", "clean_low", "clean_high", "none", "clean")):
                y = [100 * c[key] for c in line]
                err = [[100 * (c[key] - c[lo]) for c in line], [100 * (c[hi] - c[key]) for c in line]]
                ax.errorbar(ks, y, yerr=err, fmt="o", color=f"C{j}", mfc=fill, capsize=3, alpha=0.9,
                            ls="-" if what == "robust" else "--", label=f"{what}, {what_chain}")
        ax.set_xscale("symlog", linthresh=1)
        ticks = sorted({c["k"] for c in mine})
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_xlabel("SGLD refinement steps k (JEM-k)")
        ax.set_ylabel("accuracy % [95 % CI]")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{mine[0]['name']}\n{NORM_TITLES.get(norm, norm)} ε = {format_eps(mine[0]['eps'])} "
                     f"(robust: n = {mine[0]['n']})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def write_refinement_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.md``, ``headline.json`` (the cells, for ``bench/independent_attack.py``) and
    ``refinement.png`` in ``run_dir`` from its rows and context."""
    run_dir = Path(run_dir)
    if not (run_dir / CONTEXT).is_file():
        raise UserError(f"{run_dir} is not a refinement study run (no {CONTEXT})")
    ctx = json.loads((run_dir / CONTEXT).read_text())
    cells = refinement_cells(run_dir)
    raw = read_rows(run_dir / ROWS)
    rows = [r for r in map(parse_row, raw) if r is not None]
    atomic_write(run_dir / "headline.json", json.dumps(cells, indent=1, default=str))
    fig = plot_refinement(cells, run_dir / "refinement.png")
    stages = read_rows(run_dir / "stages.jsonl")
    wall = sum(float(s.get("wall_s", 0)) for s in stages)
    plan = ctx["plan_settings"]
    clamp_steps = plan.get("clamp_steps") or []
    clamped = (f", k ∈ {{{', '.join(map(str, clamp_steps))}}} with the chains kept in [-1, 1] ([clamp])"
               if clamp_steps else "")
    md = ["# Refinement strength: JEM-k against its SGLD refinement", "",
          f"Plan `{ctx['plan']}`: k ∈ {{{', '.join(map(str, plan['sgld_steps']))}}} at each checkpoint's own SGLD "
          f"step, k ∈ {{{', '.join(map(str, plan['scaled_steps']))}}} at "
          f"{', '.join(f'{s:g}x' for s in plan['step_scales'] if s != 1)} "
          f"that step{clamped}; robust accuracy on one shared random selection of {plan['n']} test examples (seed "
          f"{plan['selection_seed']}) under PGD ({plan['attack']['steps']} steps, {plan['attack']['restarts']} "
          f"restart(s)) with full gradients through the chain and with BPDA, then {len(plan['rounds'])} escalation "
          f"rounds on the survivors — the per-example worst case; clean accuracy and activity on the first "
          f"{plan['n_activity']} test images. Report written {now()} at git {git_sha()} on "
          f"{ctx.get('device_name', ctx.get('device', '?'))}; the stages took {wall / 60:.1f} min ({len(stages)} "
          "logged in `stages.jsonl`).", "",
          "## Models", "", "| model | checkpoint | sha256 |", "|---|---|---|"]
    md += [f"| {v['name']} | `{c}` | `{v['sha256'][:16]}` |" for c, v in ctx["checkpoints"].items()]
    md += ["", "## The answer", "",
           "Each line: the most robust refinement of that model against its JEM-0, on the same examples (robust = the "
           "per-example worst case over every attack). A refinement that changes fewer than 1 % of clean predictions "
           "is marked inactive: it cannot be what makes a JEM-k more or less robust.", ""]
    for ckpt, v in ctx["checkpoints"].items():
        md.append(f"**{v['name']}**")
        md.append("")
        for norm, _ in plan["eps"]:
            mine = [c for c in cells if c["checkpoint"] == ckpt and c["norm"] == norm]
            md.append(verdict_line(mine) if mine else f"- {NORM_TITLES.get(norm, norm)}: not attacked yet.")
        md.append("")
    top = most_robust(cells)
    if top is not None:
        md += [f"The most robust cell of this run (the one an independent attack should check first): "
               f"**{top['model']}** of {top['name']} at {NORM_TITLES.get(top['norm'], top['norm'])} ε = "
               f"{format_eps(top['eps'])}, {top['robust_acc'] * top['n']:.0f} of {top['n']} robust "
               f"(`python bench/independent_attack.py RUN --norm {top['norm']} --eps {top['eps']:g} --models "
               f"'{top['model']}'`).", ""]
    if fig:
        md += [f"![robust and clean accuracy against k]({fig.name})", ""]
    for ckpt, v in ctx["checkpoints"].items():
        for norm, e in plan["eps"]:
            mine = [c for c in cells if c["checkpoint"] == ckpt and c["norm"] == norm]
            if mine:
                md += [f"## {v['name']} — {NORM_TITLES.get(norm, norm)} ε = {format_eps(e)}", "", *_cell_table(mine),
                       ""]
    md += ["Columns: clean accuracy of the refined classifier on the activity's clean images; robust accuracy on the "
           "shared selection [95 % Wilson CI]; the paired comparison with JEM-0 (examples robust only under this "
           "cell / only under JEM-0, exact McNemar p); the chain's mean displacement on clean images ([0, 1] pixels, "
           "beside the ε attacked), its energy change, the predictions it changes; the predictions it changes on "
           f"the candidates of a 10-step PGD against the same JEM-k ({plan['n_activity_candidates']} examples).", ""]
    md += escalation_section(rows)
    checks = run_checks(rows)
    md += ["## Sanity checks", "", "| check | pairs compared | flags | status |", "|---|---|---|---|"]
    md += [f"| {c.check} | {c.compared} | {len(c.flags)} | "
           f"{_shorten(c.summary(), 160)} |" for c in checks]
    md.append("")
    atomic_write(run_dir / "report.md", "\n".join(md))
    return run_dir / "report.md"
