"""The energy-based defenses of 2021–2026 under one protocol, in one leaderboard (issue 28).

Trains or reuses (same config and training code, in the study's ``runs/PRESET-DATASET/OBJECTIVE`` folders, so the
study's CE and PGD-AT are shared) a natural classifier (CE), PGD-AT, an adversarially trained JEM (JEM-AT: PGD-AT's
cross-entropy plus log p(x)) and an energy model without labels (EBM). Then every defense — CE, PGD-AT, JEM-AT-k for
each k of ``jem_at_steps``, and CE behind the EBM's chain of ``purify_steps`` Langevin steps (long-run purification,
Hill et al. 2021) — is attacked at one ε per norm on one shared random selection of ``n`` test examples: PGD with
exact gradients through every chain (checkpointed beyond 20 steps) and with BPDA, then escalation on the survivors.
The report is the leaderboard (clean and robust accuracy with intervals on the shared examples, the attack that
decided each cell, its cost in passes), the BPDA-vs-exact gap of every chained defense, the escalation record, the
checks and the chains' activity. Resumable like the study.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from attacks.checks import load_side_files, paired_outcomes, run_checks, worst_case
from attacks.common import format_eps, same_eps
from attacks.plots import NORM_TITLES
from attacks.rows import ActivityRow, WhiteboxRow, of_kind, parse_row
from infra.io import atomic_write
from infra.provenance import device_name, git_sha, now
from infra.records import ROWS, read_rows
from robust_jem.errors import UserError

from .evaluate import ActivityJob, EscalationJob, PGDSettings, Round, WhiteboxJob, refuse_foreign_rows
from .layout import study_model_dir
from .report import checkpoint_info, compare, escalation_section, leaderboard_section
from .tables import pct
from .study import Stage, escalation_rounds, logging_into, run_stages, train_models
from .targets import Chain

log = logging.getLogger(__name__)

DEFENSE_OBJECTIVES = ("ce", "pgd-at", "jem-at", "ebm")
CONTEXT = "defenses_context.json"


@dataclass(frozen=True)
class DefensesPlan:
    """Sizes of the defenses study (see the module docstring)."""

    jem_at_steps: tuple[int, ...]
    purify_steps: int
    n: int
    eps: tuple[tuple[str, float], ...]
    attack: PGDSettings
    rounds: tuple[Round, ...]
    repeats: int = 1
    n_activity: int = 500
    selection_seed: int = 0
    # the purifier costs ~10x JEM-10 per example: it may run on the first ``n_purify`` of the shared selection (a
    # prefix of the same random permutation, so its comparisons stay paired) and meet its own escalation rounds
    n_purify: int | None = None
    purify_rounds: tuple[Round, ...] | None = None


DEFENSES_PLANS: dict[str, DefensesPlan] = {
    "tiny": DefensesPlan(jem_at_steps=(0, 1), purify_steps=3, n=6, eps=(("linf", 0.1), ("l2", 2.0)),
                         attack=PGDSettings(steps=3, restarts=1, eot=1, eval_draws=2),
                         rounds=escalation_rounds(steps=2, eot=1, square_queries=5, square_eot=1, n_targets=1),
                         n_activity=20, n_purify=4,
                         purify_rounds=escalation_rounds(steps=1, eot=1, square_queries=3, square_eot=1, n_targets=1)),
    # fits a 2-core CPU in ~2 h with training: the quick study's attack budgets on 40 shared examples; the purifier
    # (an exact gradient through its 100-step chain costs ~0.9 s per example here) on the first 20 of them, its
    # survivors meeting the same six rounds at a fifth to a half of the budgets
    "quick": DefensesPlan(jem_at_steps=(0, 1, 10), purify_steps=100, n=40, eps=(("linf", 0.1), ("l2", 2.0)),
                          attack=PGDSettings(steps=20, restarts=1, eot=1, eval_draws=20),
                          rounds=escalation_rounds(steps=10, eot=3, square_queries=100, square_eot=2, n_targets=1,
                                                   pgd_steps=50, pgd_eot=1),
                          n_purify=20, purify_rounds=escalation_rounds(steps=5, eot=1, square_queries=50, square_eot=1,
                                                                       n_targets=1, pgd_steps=10, pgd_eot=1)),
    "standard": DefensesPlan(jem_at_steps=(0, 1, 10), purify_steps=200, n=100, eps=(("linf", 0.1), ("l2", 2.0)),
                             attack=PGDSettings(steps=50, restarts=2, eot=1, eval_draws=20),
                             rounds=escalation_rounds(steps=100, eot=20, square_queries=1000, square_eot=10)),
}


def defense_cells(plan: DefensesPlan, ckpt: dict[str, Path]) -> list[tuple[str, str, Chain]]:
    """(name, checkpoint, chain) of every defense, cheapest first."""
    cells = [("ce", str(ckpt["ce"]), Chain((0,))), ("pgd-at", str(ckpt["pgd-at"]), Chain((0,)))]
    cells += [(f"jem-at-{k}", str(ckpt["jem-at"]), Chain((k,))) for k in sorted(plan.jem_at_steps)]
    # the purifier runs its own sampler as trained, clamp included (suite.targets.Chain.refinements)
    cells.append((f"ce-ebm-{plan.purify_steps}", str(ckpt["ce"]), Chain((plan.purify_steps,), purifier=str(ckpt["ebm"]))))
    return cells


def defense_stages(plan: DefensesPlan, ckpt: dict[str, Path]) -> list[Stage]:
    """Per defense and norm: the white-box attack (full gradients and BPDA where there is a chain), then the
    escalation on its survivors; then the chain's activity."""
    st: list[Stage] = []
    for name, checkpoint, chain in defense_cells(plan, ckpt):
        chained = chain.sgld_steps != (0,) or chain.purifier is not None
        modes = ("full", "bpda") if chained else ("full",)
        purified = chain.purifier is not None
        n = (plan.n_purify or plan.n) if purified else plan.n
        rounds = (plan.purify_rounds or plan.rounds) if purified else plan.rounds
        for norm, eps in plan.eps:  # each norm's escalation right after its white-box: a stopped run has both
            st.append(Stage(f"pgd-{norm}-{name}", "whitebox", WhiteboxJob(
                (checkpoint,), (norm,), (eps,), plan.attack, chain, modes, n_examples=n, example_rule="random",
                seed=plan.selection_seed)))
            st.append(Stage(f"escalate-{norm}-{name}", "escalation",
                            EscalationJob((checkpoint,), (norm,), (eps,), rounds, chain, repeats=plan.repeats)))
        if chained:
            st.append(Stage(f"activity-{name}", "activity", ActivityJob((checkpoint,), chain,
                                                                        n_examples=plan.n_activity)))
    return st


def run_defenses_study(plan_name: str = "quick", preset: str | None = None, dataset: str = "fashion-mnist",
                       out: str | Path | None = None, runs_dir: Path = Path("runs"),
                       device: torch.device | str = "cpu", data_dir: str | None = None,
                       progress: bool = True) -> Path:
    """Train or reuse the four models of ``preset`` (default: the plan's name), run plan ``plan_name`` into ``out``
    (default ``results/defenses-PLAN-DATASET``), write its report; return ``out``."""
    if plan_name not in DEFENSES_PLANS:
        raise UserError(f"unknown plan {plan_name!r}; choose from {', '.join(DEFENSES_PLANS)}")
    plan, preset = DEFENSES_PLANS[plan_name], preset or plan_name
    out = Path(out or f"results/defenses-{plan_name}-{dataset}")
    device = torch.device(device)
    planned = [study_model_dir(runs_dir, preset, dataset, o) / "final.pt" for o in DEFENSE_OBJECTIVES]
    refuse_foreign_rows(out, [str(p) for p in planned if p.is_file()],
                        hint="pass --out NEW for another run, or remove it")
    t0 = time.perf_counter()
    with logging_into(out):
        models = train_models(DEFENSE_OBJECTIVES, preset, dataset, runs_dir, out, device, data_dir, progress)
        ckpt = {o: m.checkpoint for o, m in models.items()}
        trained = [{"objective": o, "checkpoint": str(m.checkpoint), "config": m.config, "code": m.code,
                    "wall_s": m.wall_s} for o, m in models.items()]
        atomic_write(out / CONTEXT, json.dumps({"plan": plan_name, "preset": preset, "dataset": dataset,
                                                "plan_settings": asdict(plan), "device_name": device_name(device),
                                                "purify_round_names": [r.name for r in plan.purify_rounds or ()],
                                                "models": trained}, indent=1, default=str))
        run_stages(defense_stages(plan, ckpt), out, device=device, data_dir=data_dir, progress=progress,
                   kept="the trained models and ")
        write_defenses_report(out)
        log.info("defenses study finished in %.0f s: %s", time.perf_counter() - t0, out / "report.md")
    return out


def gap_lines(rows: list[Any]) -> list[str]:
    """BPDA against exact gradients, per chained defense and norm: robust under each on the same examples."""
    white = [r for r in of_kind(rows, WhiteboxRow) if r.sgld_steps and not r.escalation and r.eps > 0]
    md = []
    for r in sorted((r for r in white if r.grad_mode == "full"), key=lambda r: (r.model, r.norm)):
        b = next((x for x in white if x.grad_mode == "bpda" and x.defense_id == r.defense_id and x.norm == r.norm
                  and x.eps == r.eps), None)
        if b is None:
            continue
        q = paired_outcomes(r.example_indices, r.correct, b.example_indices, b.correct)
        md.append(f"| {r.model} | {NORM_TITLES.get(r.norm, r.norm)} {format_eps(r.eps)} | {q.n} | {q.robust_b} | "
                  f"{q.robust_a} | {q.only_b} / {q.only_a} | {q.p:.2g} |")
    if not md:
        return []
    return ["## BPDA against exact gradients", "",
            "The same PGD budget on the same examples, once with the chain as the identity in the backward pass (BPDA, "
            "how purification was evaluated by its authors) and once backpropagating through every step (exact, "
            "checkpointed beyond 20 steps). Robust counts of those two rows alone, before escalation.", "",
            "| defense | ε | n | robust under BPDA | robust under exact gradients | robust only under BPDA / only "
            "under exact | McNemar p |", "|---|---|---|---|---|---|---|",
            *md, ""]


def answer_lines(cells: list[dict[str, Any]], rows: list[Any], eps: dict[str, float]) -> list[str]:
    """The questions the study exists for, answered per norm from the worst case over every attack (``cells``, from
    :func:`~attacks.checks.worst_case`), each defense compared with its reference on the examples both cover (exact
    McNemar and the power of that n)."""
    head = [c for c in cells if c["norm"] in eps and same_eps(c["eps"], eps[c["norm"]])]
    white = [r for r in of_kind(rows, WhiteboxRow) if not r.escalation]
    purifier = {r.subject for r in white if (r.defense_params or {}).get("purifier")}
    md = []
    for norm, e in eps.items():
        at = [c for c in head if c["norm"] == norm]
        first = lambda pick: next((c for c in at if pick(c)), None)  # noqa: E731
        pgd_at = first(lambda c: c["objective"] == "pgd-at")
        ce = first(lambda c: c["objective"] == "ce" and c["subject"] not in purifier)
        jem_at = sorted((c for c in at if c["objective"] == "jem-at"), key=lambda c: c["sgld_steps"])
        lines = []
        for c in jem_at if pgd_at else []:
            rel, why = compare(c, pgd_at)
            lines.append(f"- Does the energy term add robustness on top of adversarial training? {c['model']} is "
                         f"{rel} {pgd_at['model']} ({why}).")
        for c in jem_at[1:] if jem_at and jem_at[0]["sgld_steps"] == 0 else []:
            rel, why = compare(c, jem_at[0])
            lines.append(f"- Does refinement add robustness to the adversarially trained JEM? {c['model']} is {rel} "
                         f"{jem_at[0]['model']} ({why}).")
        for c in (c for c in at if c["subject"] in purifier):
            bpda = next((r for r in white if r.subject == c["subject"] and r.norm == norm and r.grad_mode == "bpda"
                         and same_eps(r.eps, e)), None)
            told = (f" The kind of attack its authors used (BPDA, here EOT {bpda.eot}) alone leaves "
                    f"{sum(bpda.correct)} of {bpda.n} "
                    f"standing; the worst case over every attack, exact gradients through the chain included, "
                    f"{round(c['robust_acc'] * c['n'])} of {c['n']}." if bpda else "")
            rel, why = compare(c, ce) if ce else ("not compared with", "no natural classifier in the run")
            lines.append(f"- Does long-run purification make the natural classifier robust? {c['model']} is {rel} "
                         f"{ce['model'] if ce else 'CE'} ({why}).{told}")
        if lines:
            md += [f"**{NORM_TITLES.get(norm, norm)} ε = {format_eps(e)}**", "", *lines, ""]
    return ["## Answers", "", *md] if md else []


def purify_note(ctx: dict[str, Any]) -> str:
    """How the purifier's cell differs from the others' (a prefix of the selection, its own rounds), or ''."""
    plan = ctx["plan_settings"]
    n, rounds = plan.get("n_purify"), plan.get("purify_rounds")
    if not n and not rounds:
        return ""
    parts = [f"on the first {n} of those examples"] if n and n < plan["n"] else []
    if rounds:
        names = ctx.get("purify_round_names")
        parts.append("its survivors meeting its own rounds: " + (" / ".join(names) if names else
                                                                "see the escalation table for their budgets"))
    return f" (the purifier, whose chain dominates the cost: {'; '.join(parts)})"


def write_defenses_report(run_dir: str | os.PathLike) -> Path:
    """``report.md`` (and ``leaderboard.png``, ``headline.json``) of a defenses-study run, from its rows and context."""
    run_dir = Path(run_dir)
    if not (run_dir / CONTEXT).is_file():
        raise UserError(f"{run_dir} is not a defenses study run (no {CONTEXT})")
    ctx = json.loads((run_dir / CONTEXT).read_text())
    raw = read_rows(run_dir / ROWS)
    rows = [r for r in map(parse_row, raw) if r is not None]
    stages = read_rows(run_dir / "stages.jsonl")
    wall = sum(float(s.get("wall_s", 0)) for s in stages if not s["stage"].startswith("train-"))
    train = sum(float(m.get("wall_s", 0)) for m in ctx["models"])
    plan = ctx["plan_settings"]
    md = ["# Energy-based defenses under one protocol", "",
          f"Plan `{ctx['plan']}` on {ctx['dataset']} (models of preset `{ctx['preset']}`): every defense attacked at "
          + ", ".join(f"{NORM_TITLES.get(n, n)} ε = {format_eps(e)}" for n, e in plan["eps"])
          + f" on one shared random selection of {plan['n']} test examples (seed {plan['selection_seed']}) by PGD "
          f"({plan['attack']['steps']} steps, {plan['attack']['restarts']} restart(s)) with exact gradients through "
          f"every chain and with BPDA, then {len(plan['rounds'])} escalation rounds on the survivors"
          + purify_note(ctx) + ". Report written "
          f"{now()} at git {git_sha()} on {ctx.get('device_name', '?')}; training or reuse {train / 60:.1f} min, "
          f"the stages {wall / 60:.1f} min.", "", "## Models", "",
          "Test accuracy and energies as each run recorded them (the EBM has no labels: its accuracy means nothing).",
          "", "| objective | checkpoint | sha256 | test accuracy | energy of test images / of its samples | "
          "training (s) |", "|---|---|---|---|---|---|"]
    info = checkpoint_info({m["objective"]: m["checkpoint"] for m in ctx["models"]}, raw)
    for m in ctx["models"]:
        i = info[m["objective"]]
        energy = " / ".join(f"{i.get('energy', {})[k]:.3g}" for k in ("test_energy", "buffer_energy")
                            if k in i.get("energy", {})) or "—"
        acc = pct(i["test_acc"]) if i.get("test_acc") is not None and m["objective"] != "ebm" else "—"
        note = f" ({i['note']})" if i.get("note") else ""
        md.append(f"| {m['objective']} | `{m['checkpoint']}` | `{i['sha256'][:16]}`{note} | {acc} | {energy} | "
                  f"{m['wall_s']:.0f} |")
    eps = {str(n): float(e) for n, e in plan["eps"]}
    cells = worst_case(rows, load_side_files(run_dir, raw))  # the headline: answers and headline.json
    md += ["", *answer_lines(cells, rows, eps), *leaderboard_section(run_dir, eps), *gap_lines(rows)]
    acts = [a for a in of_kind(rows, ActivityRow) if a.inputs == "clean"]
    if acts:
        md += ["## What the chains do to clean images", "", "| defense | n | moves (L2 / L∞, [0,1] pixels) | energy "
               "start → end | changes vs bare | clean accuracy bare → defended |", "|---|---|---|---|---|---|"]
        md += [f"| {a.model} | {a.n} | {a.displacement_l2:.3g} / {a.displacement_linf:.3g} | {a.energy_start:.3g} → "
               f"{a.energy_end:.3g} | {100 * a.changed_vs_bare:.1f} % | {100 * a.accuracy_bare:.1f} % → "
               f"{100 * a.accuracy_refined:.1f} % |" for a in sorted(acts, key=lambda a: a.model)]
        md.append("")
    md += escalation_section(rows)
    md += ["## Sanity checks", "", "| check | pairs compared | flags | status |", "|---|---|---|---|"]
    md += [f"| {c.check} | {c.compared} | {len(c.flags)} | {c.summary()[:160]} |" for c in run_checks(rows)]
    md.append("")
    atomic_write(run_dir / "report.md", "\n".join(md))
    # the cells the leaderboard is built from, for an independent check (bench/independent_attack.py)
    atomic_write(run_dir / "headline.json", json.dumps(cells, indent=1))
    return run_dir / "report.md"
