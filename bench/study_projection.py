"""What a study plan would cost on this machine, projected from a measured run of another plan on the same machine.

The standard plan's attacks use the same small network as the quick plan's, so the quick reference's rows say what
one network pass costs here, per kind of defense (bare / JEM-k, full gradients / BPDA), verdict draws and batching
overheads included: seconds per pass = Σ wall / Σ (examples × network passes per example) over its white-box rows.
The projected plan's white-box stages are then counted exactly in passes (its own attack objects, built on the
measured run's checkpoints: ``attacks.benchmark.passes_per_image``), its escalation rounds on an estimate of the
survivors (the robust fraction of the nearest ε in a run of the projected plan's models, ``--survivors``; those rows
may be from an older protocol, so the survivors are an estimate, and they ignore that an earlier round breaks some
before the later ones), and its other stages (black-box, transfer, extras) by scaling the measured stage of the same
name by the ratio of examples. Training is read from the survivors run's ``stages.jsonl``.

    python bench/study_projection.py results/reference-quick-fashion-mnist --plan standard \
        --survivors results/reference-standard-fashion-mnist --runs /tmp/fq/runs
    python bench/study_projection.py results/refinement-paper-small-quick --refinement standard

``--refinement PLAN`` projects a refinement-study plan (``suite.refinement``) from a measured refinement run instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attacks.benchmark import passes_per_image  # noqa: E402
from attacks.common import same_eps  # noqa: E402
from infra.provenance import device_name, device_slug, git_sha, now  # noqa: E402
from infra.records import read_rows  # noqa: E402
from robust_jem.refined import CHECKPOINT_FROM  # noqa: E402
from suite.activity import ActivityJob  # noqa: E402
from suite.escalate import EscalationJob  # noqa: E402
from suite.evaluate import WhiteboxJob  # noqa: E402
from suite.settings import TransferSettings  # noqa: E402
from suite.study import PLANS, STUDY_OBJECTIVES, study_model_dir, study_stages  # noqa: E402
from suite.targets import build_targets, load_checkpoints  # noqa: E402


def kind(fields: dict[str, Any]) -> tuple[int, str]:
    """What a network pass costs depends on the chain's length and the gradient mode."""
    return int(fields.get("sgld_steps") or 0), str(fields.get("grad_mode") or "full")


def seconds_per_pass(rows: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """Measured seconds per network pass by kind of defense, over the white-box rows that attacked (ε > 0)."""
    wall: dict[tuple[int, str], float] = defaultdict(float)
    passes: dict[tuple[int, str], float] = defaultdict(float)
    for r in rows:
        if r.get("kind") != "whitebox" or not r.get("eps") or r.get("attack_family") == "transfer":
            continue
        if r.get("passes_per_example") and r.get("wall_s"):
            wall[kind(r)] += r["wall_s"]
            passes[kind(r)] += r["n"] * r["passes_per_example"]
    return {k: wall[k] / passes[k] for k in wall if passes[k]}


def robust_fraction(head: list[dict[str, Any]], sgld_steps: int, objective: str, norm: str, eps: float) -> float:
    """The headline's robust fraction for this kind of model at the nearest ε of its grid (an estimate of the
    fraction left standing for the escalation)."""
    cells = [c for c in head if c["norm"] == norm and c.get("sgld_steps", 0) == sgld_steps and
             c.get("objective") == objective and c["eps"] > 0]
    if not cells:
        return 0.0
    return min(cells, key=lambda c: abs(c["eps"] - eps))["robust_acc"]


def project_refinement(measured: Path, plan_name: str) -> tuple[dict[str, float], dict[tuple[int, str], float]]:
    """Seconds per part of refinement plan ``plan_name`` on the measured refinement run's checkpoints: white-box
    stages counted in passes, escalation on the survivors the measured run left in its nearest cell (same norm and
    step, nearest k), activity from the measured stages' seconds per refined chain step."""
    from suite.refinement import CONTEXT, REFINEMENT_PLANS, refinement_cells, refinement_stages

    ctx = json.loads((measured / CONTEXT).read_text())
    rate = seconds_per_pass(read_rows(measured / "rows.jsonl"))
    cells = refinement_cells(measured)
    stages_measured = {s["stage"]: s for s in read_rows(measured / "stages.jsonl")}
    plan = REFINEMENT_PLANS[plan_name]
    ds, loaded = load_checkpoints(list(ctx["checkpoints"]), torch.device("cpu"))
    by_path = {c.path: c for c in loaded}
    n_classes = len(ds.classes)

    def seconds(fields: dict[str, Any], passes: int) -> float:
        k, mode = kind(fields)
        measured_k = min((m for m, md in rate if md == mode), key=lambda m: abs(m - k))  # per pass: ~flat in k
        recompute = (1 + 3 * k) / (1 + 2 * k) if mode == "full" and k > CHECKPOINT_FROM else 1.0
        return passes * rate[(measured_k, mode)] * recompute

    def robust(ckpt: str, norm: str, k: int, step: float) -> float:
        mine = [c for c in cells if c["checkpoint"] == ckpt and c["norm"] == norm] or [{"robust_acc": 1.0, "k": k,
                                                                                       "step": step}]
        return min(mine, key=lambda c: (abs(c["step"] - step) > 1e-9 and c["k"] > 0, abs(c["k"] - k)))["robust_acc"]

    acts = [(s["wall_s"], sum(s["job"]["chain"]["sgld_steps"])) for s in stages_measured.values()
            if s["job"].get("job") == "ActivityJob"]
    activity_rate = sum(w for w, _ in acts) / max(1, sum(k for _, k in acts))
    projected: dict[str, float] = defaultdict(float)
    for stage in refinement_stages(plan, list(ctx["checkpoints"])):
        job = stage.job
        [ckpt] = job.checkpoints
        if isinstance(job, ActivityJob):  # seconds per refined chain step, measured over the run's activity stages
            projected["activity"] += activity_rate * sum(job.chain.sgld_steps) * plan.n_activity_candidates / \
                max(1, ctx["plan_settings"]["n_activity_candidates"])
            continue
        modes = job.grad_modes if isinstance(job, WhiteboxJob) else \
            tuple(dict.fromkeys(m for r in job.rounds for m in r.grad_modes))
        for norm in job.norms:
            for e in job.eps:
                for t in build_targets([by_path[ckpt]], job.chain, modes):
                    f = t.fields()
                    if isinstance(job, WhiteboxJob):
                        atk = job.attack.factory(n_classes, 0)(t.model, norm, e)
                        projected["white-box"] += job.n_examples * seconds(f, passes_per_image(atk, f))
                        continue
                    left = plan.n * robust(ckpt, norm, f["sgld_steps"], f["sgld_step_size"])
                    for rnd in job.rounds:
                        if f["grad_mode"] not in rnd.grad_modes or (
                                f.get("deterministic") and getattr(rnd.attack, "name", "") == "fixed-noise-pgd"):
                            continue
                        atk = rnd.attack.factory(n_classes, 0)(t.model, norm, e)
                        projected["escalation"] += left * seconds(f, passes_per_image(atk, f))
    return dict(projected), rate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("measured", type=Path, help="the measured run folder (rows.jsonl, stages.jsonl)")
    ap.add_argument("--plan", default="standard", choices=sorted(PLANS))
    ap.add_argument("--refinement", default=None, metavar="PLAN",
                    help="project refinement plan PLAN instead, from MEASURED, a refinement-study run")
    ap.add_argument("--survivors", type=Path, default=None,
                    help="a run of the projected plan's models (headline.json, stages.jsonl with training)")
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="the runs folder of the measured run's models")
    ap.add_argument("--measured-plan", default="quick", choices=sorted(PLANS))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    if args.refinement:
        return refinement_main(args)
    if args.survivors is None:
        ap.error("--survivors is required to project a study plan")
    rows = read_rows(args.measured / "rows.jsonl")
    stages_measured = {s["stage"]: s for s in read_rows(args.measured / "stages.jsonl")}
    rate = seconds_per_pass(rows)
    head = json.loads((args.survivors / "headline.json").read_text())
    ckpt = {o: study_model_dir(args.runs, args.measured_plan, "fashion-mnist", o) / "final.pt" for o in STUDY_OBJECTIVES}
    plan, measured_plan = PLANS[args.plan], PLANS[args.measured_plan]
    ds, loaded = load_checkpoints([str(p) for p in ckpt.values()], torch.device("cpu"))
    by_path = {c.path: c for c in loaded}
    n_classes = len(ds.classes)

    def passes_of(job_checkpoints: tuple[str, ...], chain: Any, modes: tuple[str, ...], settings: Any, norm: str,
                  eps: float) -> list[tuple[dict[str, Any], int]]:
        out = []
        for t in build_targets([by_path[c] for c in job_checkpoints], chain, modes):
            atk = settings.factory(n_classes, 0)(t.model, norm, eps)
            out.append((t.fields(), passes_per_image(atk, t.fields())))
        return out

    group_of = {(0, "ce"): "bare", (0, "pgd-at"): "bare", (0, "jem"): "jem0", (1, "jem"): "jem1", (10, "jem"): "jem10"}
    projected: dict[str, float] = defaultdict(float)
    for stage in study_stages(plan, {k: Path(v) for k, v in ckpt.items()}):
        job = stage.job
        if isinstance(job, WhiteboxJob) and not isinstance(job.attack, TransferSettings):
            for norm in job.norms:
                for e in job.eps:
                    if e == 0:
                        continue
                    for fields, p in passes_of(job.checkpoints, job.chain, job.grad_modes, job.attack, norm, e):
                        projected[stage.group] += job.n_examples * p * rate[kind(fields)]
        elif isinstance(job, EscalationJob):
            modes = tuple(dict.fromkeys(m for r in job.rounds for m in r.grad_modes))
            for norm in job.norms:
                for e in job.eps:
                    mid = same_eps(e, plan.linf_mid if norm == "linf" else plan.l2_mid)
                    for rnd in job.rounds:
                        for fields, p in passes_of(job.checkpoints, job.chain, modes, rnd.attack, norm, e):
                            if fields["grad_mode"] not in rnd.grad_modes:
                                continue
                            if fields.get("deterministic") and getattr(rnd.attack, "name", "") == "fixed-noise-pgd":
                                continue
                            group = group_of[(fields.get("sgld_steps") or 0, fields["objective"])]
                            n = (plan.n_mid if mid else plan.n)[group]
                            left = n * robust_fraction(head, fields.get("sgld_steps") or 0, fields["objective"],
                                                       norm, e)
                            projected["escalation"] += left * p * rate[kind(fields)]
        else:  # measured stage of the same name (or the same kind), scaled by the ratio of examples
            name = stage.name.replace("-pgd-at-", "-bare-jem-")
            if name not in stages_measured:
                continue
            group = next((g for g in ("jem10", "jem1", "jem0", "bare") if g in stage.name), None)
            ratio = (plan.n_mid[group] / measured_plan.n_mid[group]) if group else \
                plan.extras_examples / measured_plan.extras_examples
            projected[stage.group] += stages_measured[name]["wall_s"] * ratio
    training = sum(s["wall_s"] for s in read_rows(args.survivors / "stages.jsonl") if s["stage"].startswith("train-"))
    total = training + sum(projected.values())
    dev = device_name("cpu")
    lines = [f"# Projected wall time of the `{args.plan}` study on {dev}", "",
             f"{now()}, git {git_sha()}. Seconds per network pass measured on `{args.measured}` (rows of the "
             f"`{args.measured_plan}` plan, same network); survivors estimated from `{args.survivors}`; training "
             "read from its stages.jsonl (measured on this kind of machine).", "",
             "| seconds per pass | " + " | ".join(f"JEM-{k} {m}" if k else "bare / JEM-0" for k, m in sorted(rate)) + " |",
             "|---|" + "---|" * len(rate),
             "| measured | " + " | ".join(f"{rate[k] * 1e3:.2f} ms" for k in sorted(rate)) + " |", "",
             "| part | projected minutes |", "|---|---|", f"| training (measured) | {training / 60:.0f} |"]
    lines += [f"| {g} | {s / 60:.0f} |" for g, s in sorted(projected.items(), key=lambda t: -t[1])]
    lines += [f"| **total** | **{total / 60:.0f}** ({total / 3600:.1f} h) |", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    slug = device_slug(dev)
    stem = args.out / f"study_projection-{args.plan}-{slug}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"plan": args.plan, "measured": str(args.measured),
                                                     "survivors": str(args.survivors), "device": dev,
                                                     "git_sha": git_sha(), "timestamp": now(),
                                                     "seconds_per_pass": {f"{k}-{m}": v for (k, m), v in rate.items()},
                                                     "training_s": training, "projected_s": dict(projected),
                                                     "total_s": total}, indent=1))
    print("\n".join(lines))


def refinement_main(args: argparse.Namespace) -> None:
    """``--refinement PLAN``: the refinement plan's projection, written beside the study projections."""
    projected, rate = project_refinement(args.measured, args.refinement)
    measured_s = sum(s["wall_s"] for s in read_rows(args.measured / "stages.jsonl"))
    total = sum(projected.values())
    dev = device_name("cpu")
    lines = [f"# Projected wall time of the `{args.refinement}` refinement-study plan on {dev}", "",
             f"{now()}, git {git_sha()}. Seconds per network pass and the survivors of each cell (nearest k at the "
             f"same norm and SGLD step) measured on `{args.measured}` ({measured_s / 60:.0f} min of stages); chains "
             f"longer than {CHECKPOINT_FROM} steps are checkpointed (each SGLD step's forward done twice); models "
             "not trained here (the run's checkpoints).", "",
             "| seconds per pass | " + " | ".join(f"JEM-{k} {m}" for k, m in sorted(rate)) + " |",
             "|---|" + "---|" * len(rate),
             "| measured | " + " | ".join(f"{rate[k] * 1e3:.2f} ms" for k in sorted(rate)) + " |", "",
             "| part | projected minutes |", "|---|---|"]
    lines += [f"| {g} | {s / 60:.0f} |" for g, s in sorted(projected.items(), key=lambda t: -t[1])]
    lines += [f"| **total** | **{total / 60:.0f}** ({total / 3600:.1f} h) |", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"study_projection-refinement-{args.refinement}-{device_slug(dev)}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"refinement_plan": args.refinement, "measured": str(args.measured),
                                                     "device": dev, "git_sha": git_sha(), "timestamp": now(),
                                                     "seconds_per_pass": {f"{k}-{m}": v for (k, m), v in rate.items()},
                                                     "projected_s": projected, "total_s": total}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
