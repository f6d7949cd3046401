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

from infra.io import atomic_write
from infra.provenance import environment, file_sha256, now
from infra.records import ROWS, export_csv, read_rows

from attacks.checks import (CheckResult, all_flags, load_side_files, paired_outcomes, run_checks,  # noqa: F401
                            worst_case)
from attacks.common import eps_key, format_eps
from attacks.plots import NORM_TITLES, model_order, plot_headline, plot_rows
from attacks.rows import ActivityRow, BlackboxRow, Row, WhiteboxRow, of_kind, parse_row

from robust_jem.errors import UserError

from .convergence import convergence_table, plot_convergence
from .escalate import rounds_of
from .leaderboard import leaderboard as build_leaderboard, leaderboard_markdown, plot_leaderboard
from .tables import (ci_text, clean_table, common_table, display_names, headline_table, kv_table, pct,
                     per_attack_table, protocol_table)

log = logging.getLogger(__name__)


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str]:
    """How headline cell ``a`` compares with ``b`` on the examples both cover: an exact McNemar test on the
    paired per-example outcomes (not overlapping intervals), and whether both faced the same attack families.

    Returns (relation, evidence), e.g. ("less robust than", "on the same 50 examples: 5 vs 15 robust, ...").
    """
    q = paired_outcomes(a["example_indices"], a["correct"], b["example_indices"], b["correct"])
    if not q.n:
        return "not comparable with", "no common examples"
    rel = ("more robust than" if q.robust_a > q.robust_b else "less robust than") if q.p < 0.05 \
        else "not distinguishable from"
    text = (f"on the same {q.n} examples: {q.robust_a} vs {q.robust_b} robust, McNemar p = {q.p:.3g}; at this n only "
            f"a difference of {100 * q.detectable:.0f} points or more is detected with 80 % power")
    fa, fb = set(a.get("families", [])), set(b.get("families", []))
    spared = fb - fa if any(a["correct"]) else set()  # with nothing left standing, no attack was spared
    if spared:  # the first defense was spared attack families the second faced: not an equal comparison
        text += f"; budgets differ: {a['model']} did not face {', '.join(sorted(spared))}"
    elif fa - fb:
        text += f"; {a['model']} also faced {', '.join(sorted(fa - fb))}"
    return rel, text


def escalation_section(rows: list[Row]) -> list[str]:
    """The convergence evidence of every escalated cell: each round, its real budget, how many survivors it attacked
    and how many of them it broke, what it cost; and whether the last round broke nothing (converged) or not."""
    table = sorted(rounds_of(rows), key=lambda t: (model_order(t["model"]), t["norm"], t["eps"], t["round"]))
    if not table:
        return []
    md = ["## Escalation on survivors", "",
          "At every ε > 0 of its curve, every defense's survivors of all the attacks above (black-box included at "
          "the middle ε, where those run) met stronger rounds, each on the examples still standing, in this order; "
          "the headline counts what they broke. A cell "
          "whose last round broke nothing has stopped yielding to this attack mix; one whose last round still broke "
          "examples has not converged, and its robust accuracy is an upper bound that more rounds may lower. A cell "
          "with no survivor left is not listed. EOT applies to randomized defenses only (a deterministic one gets "
          "one draw, as its network passes show).", "",
          "| model | norm | ε | round | attack (its budget) | survivors attacked | broken | network passes | wall s |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {t['model']} | {NORM_TITLES.get(t['norm'], t['norm'])} | {format_eps(t['eps'])} | {t['round']} | "
           f"{t['name']} | {t['attacked']} | {t['broken']} | {t['passes']:,} | {t['wall_s']:.0f} |" for t in table]
    last: dict[tuple, dict[str, Any]] = {}
    for t in table:
        last[(t["model"], t["norm"], t["eps"])] = t
    open_cells = [f"{m} {NORM_TITLES.get(n, n)} {format_eps(e)}" for (m, n, e), t in last.items()
                  if 0 < t["broken"] < t["attacked"]]  # broke some, not all: the next round might break more
    md += ["", ("Every escalated cell's last round broke nothing." if not open_cells else
                f"Not converged (the last round still broke examples): {', '.join(open_cells)}."), ""]
    return md


def leaderboard_section(run_dir: Path, mids: dict[str, float]) -> list[str]:
    """Every defense at the middle ε of each norm in one table and one figure (:mod:`suite.leaderboard`); nothing
    when no defense was attacked there. ``robust-jem leaderboard`` builds the same from any runs."""
    if not mids:
        return []
    try:
        entries = build_leaderboard([run_dir], mids)
    except UserError:
        return []
    png = plot_leaderboard(entries, run_dir / "leaderboard.png")
    return ["## Leaderboard", "",
            "Every defense at the middle ε of each norm: clean and robust accuracy (the worst case over every attack) "
            "on its own selection and on the examples all of them share, the strongest attack alone, and the cost "
            "in network passes per example. `robust-jem leaderboard RUN...` rebuilds it from any runs.", "",
            *leaderboard_markdown(entries), *([f"![leaderboard]({png.name})", ""] if png else [])]


def best_on_shared(cells: dict[str, dict[str, Any]], names: list[str]) -> tuple[str, int]:
    """The most robust of ``names`` counted on the examples all of their cells share (never point estimates on
    different n); ties go to the first. Returns (name, number of shared examples)."""
    shared = set.intersection(*(set(cells[m]["example_indices"]) for m in names))

    def robust(m: str) -> int:
        return sum(c for i, c in zip(cells[m]["example_indices"], cells[m]["correct"]) if i in shared)

    return max(names, key=robust), len(shared)


def verdicts(head_cells: dict[str, dict[tuple[str, float], dict]], mids: dict[str, float],
             checks: list[CheckResult], rows: list[Row], dict_rows: list[dict[str, Any]]) -> list[str]:
    """Plain-language answers, each filled from the numbers."""
    out = []
    acts = {r.defense_id: r for r in of_kind(rows, ActivityRow) if r.inputs == "clean"}
    on_cands = {(r.defense_id, r.norm, eps_key(r.eps)): r for r in of_kind(rows, ActivityRow) if r.inputs != "clean"}
    for norm, mid in mids.items():
        cells = head_cells.get(norm, {})
        at = {m: h for (m, e), h in cells.items() if abs(e - mid) < 1e-12}
        if not at:
            continue
        # models are found by what they are (objective, refinement), never by their labels
        jems = sorted((m for m in at if at[m].get("objective") == "jem" and not at[m].get("bare")),
                      key=lambda m: (at[m].get("sgld_steps", 0), m))
        jem0 = next((m for m in jems if at[m].get("sgld_steps") == 0), None)
        base = next((m for m in at if at[m].get("objective") == "pgd-at"), None)
        parts = [f"{m} keeps {ci_text(at[m]['robust_acc'], at[m]['ci_low'], at[m]['ci_high'])}" for m in
                 sorted(at, key=model_order)]
        out += [""] if out else []  # each norm its own paragraph, not a line of the list before it
        out.append(f"**{NORM_TITLES.get(norm, norm)} ε = {format_eps(mid)}** (per-example worst case over every "
                   "attack run against each model): " + "; ".join(parts) + ".")
        if jems and base is not None:
            best, shared = best_on_shared(at, jems)
            b, a = at[best], at[base]
            rel, why = compare(b, a)
            out.append(f"- Does SGLD refinement rival adversarial training at {NORM_TITLES.get(norm, norm)} "
                       f"{format_eps(mid)}? The best refined model on the {shared} examples every JEM-k shares, "
                       f"{best}, is {rel} {base} ({why}).")
        for k in (m for m in jems if jem0 is not None and m != jem0):
            rel, why = compare(at[k], at[jem0])
            out.append(f"- Does refinement buy robustness over the same network without it? {k} is {rel} {jem0} "
                       f"({why}){activity_clause(acts.get(at[k]['subject']))}"
                       f"{candidate_clause(on_cands.get((at[k]['subject'], norm, eps_key(mid))))}.")
        ce = next((m for m in at if at[m].get("objective") == "ce"), None)
        if ce is not None:
            out.append(f"- The undefended classifier keeps {pct(at[ce]['robust_acc'])}.")
    bb = next((c for c in checks if c.check == "blackbox_beats_whitebox"), None)
    black = of_kind(rows, BlackboxRow)
    if black and bb is not None:
        steps = sorted({str(r.attack_params.get("steps")) for r in black})
        out.append(f"- Black-box vs white-box ({len(black)} black-box rows, {'/'.join(steps)} steps): "
                   f"{bb.summary()}" + (": " + "; ".join(sorted({f.subject for f in bb.flags})) if bb.flags else "")
                   + ". With budgets this small, a clean result says little about masking.")
    distal = [r for r in dict_rows if r.get("kind") == "distal"]
    if distal:
        parts = [f"{r.get('model')}{' ' + r['grad_mode'] if r.get('sgld_steps') else ''}: "
                 f"{pct(r.get('frac_above_threshold'))} of results above {r.get('threshold', 0.9)} confidence"
                 for r in sorted(distal, key=lambda r: model_order(str(r.get("model"))))
                 if r.get("start") in (None, "uniform")]
        if parts:
            out.append("- Distal adversarials from uniform noise: " + "; ".join(parts) + ".")
    return out


def activity_clause(a: ActivityRow | None) -> str:
    """What the refinement did to clean images, beside a JEM-k verdict (empty when it was not measured)."""
    if a is None:
        return ""
    what = (f"its chain moves clean images by {a.displacement_l2:.3g} in L2 and {a.displacement_linf:.3g} in L∞ "
            f"([0, 1] pixels) and changes {pct(a.changed_vs_bare)} of the bare classifier's predictions "
            f"({pct(a.changed_vs_jem0)} of JEM-0's) on {a.n} test images")
    return f"; refinement inactive: {what}" if a.inactive else f"; {what}"


def candidate_clause(a: ActivityRow | None) -> str:
    """What the refinement did to the attack's candidates at this ε (empty when it was not measured)."""
    if a is None:
        return ""
    return (f"; on {a.n} {a.inputs} candidates it moves them by {a.displacement_l2:.3g} in L2 and "
            f"{a.displacement_linf:.3g} in L∞ and changes {pct(a.changed_vs_bare)} of the bare classifier's predictions")


def read_health(run_dir: Path) -> dict[str, Any] | None:
    """The study's EBM health row (``health/health.json``), if it ran."""
    path = run_dir / "health" / "health.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): the report goes without the EBM health", path, exc)
        return None


def health_sentence(h: dict[str, Any]) -> str:
    """What kind of JEM was tested, in its health numbers (judged by another classifier)."""
    return (f"- The JEM behind JEM-0/1/10 as an energy model (judged by `{h.get('judge')}`, a classifier trained "
            f"without it): {pct(h.get('buffer_confident'))} of {h.get('n_buffer')} replay-buffer samples are "
            f"labelled with ≥ {h.get('threshold', 0.9)} confidence{_real_level(h)}; Fréchet distance to real test images in the "
            f"judge's logits {h['fd_buffer_real']:.1f} (uniform noise {h['fd_uniform_real']:.1f}, real vs real "
            f"{h['fd_real_real']:.2f}); mean energy {h['energy_data']:.2f} on data vs {h['energy_buffer']:.2f} on the "
            f"buffer; chains initialised from {h.get('sgld_init', 'uniform')}.")


def _real_level(h: dict[str, Any]) -> str:
    return "" if h.get("real_confident") is None else f" (real test images: {pct(h['real_confident'])})"


def health_table(h: dict[str, Any]) -> str:
    cols = [("buffer ≥ 0.9 confident", pct(h.get("buffer_confident"))),
            ("real images ≥ 0.9 confident", pct(h.get("real_confident"))),
            ("judge agrees with JEM (buffer)", pct(h.get("buffer_agrees_with_jem"))),
            ("conditional chains: judge hits the class", pct(h.get("conditional_hits_target"))),
            ("FD buffer / real", f"{h['fd_buffer_real']:.1f}"),
            ("FD conditional / real", f"{h['fd_conditional_real']:.1f}"),
            ("FD init / real", "–" if h.get("fd_init_real") is None else f"{h['fd_init_real']:.1f}"),
            ("FD uniform / real", f"{h['fd_uniform_real']:.1f}"), ("FD real / real", f"{h['fd_real_real']:.2f}"),
            ("energy data / buffer", f"{h['energy_data']:.2f} / {h['energy_buffer']:.2f}")]
    return kv_table([dict(cols)], [(c, c) for c, _ in cols])


def _job_text(job: Any) -> str:
    """A stage's job in one short line (its type and the fields that are set)."""
    if not isinstance(job, dict):
        return str(job)
    if "train" in job:
        t = job["train"]
        return f"train {t.get('objective')} ({t.get('preset')}, {t.get('iters')} iters)"
    name = job.get("job", "?")
    fields = {k: v for k, v in job.items() if k not in ("job", "checkpoints", "checkpoint") and v not in (None, ())}
    return f"{name} " + json.dumps(fields, separators=(",", ":"), default=str)[:160]


def _images(run_dir: Path, pattern: str) -> list[str]:
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.glob(pattern))


REPORT_CONTEXT = "report_context.json"


def _report_context(run_dir: Path, rows: list[dict[str, Any]], given: dict[str, Any]) -> dict[str, Any]:
    """The report's context: as given (then stored), else as stored, else recovered from the rows."""
    path = run_dir / REPORT_CONTEXT
    if given["preset"] or given["dataset"] or given["checkpoints"] or given["mids"]:
        return given  # stored by write_report, with the checkpoints' facts
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            return {**{k: stored.get(k, given[k]) for k in given}, "checkpoint_info": stored.get("checkpoint_info")}
        except (OSError, ValueError) as e:
            log.warning("%s is unreadable (%s); recovering the report's context from the rows", path, e)
    checkpoints: dict[str, str] = {}
    for r in rows:
        if r.get("objective") and r.get("checkpoint"):
            checkpoints.setdefault(str(r["objective"]), str(r["checkpoint"]))
    presets = set()
    for ck in checkpoints.values():
        try:
            presets.add(json.loads((Path(ck).parent / "config.json").read_text())["preset"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    datasets = sorted({str(r["dataset"]) for r in rows if r.get("dataset")})
    return dict(given, preset=presets.pop() if len(presets) == 1 else "", dataset=", ".join(datasets),
                checkpoints=checkpoints or None)


def checkpoint_info(checkpoints: dict[str, str], rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """objective -> path, sha256, test accuracy and final energies of each checkpoint, read from its run folder only
    when the file there is the one the rows were computed with (its sha256 matches theirs); otherwise the rows'
    sha256 and a note, never another model's facts."""
    recorded = {str(r["checkpoint"]): str(r["checkpoint_sha256"]) for r in rows
                if r.get("checkpoint") and r.get("checkpoint_sha256")}
    out: dict[str, dict[str, Any]] = {}
    for obj, path in checkpoints.items():
        info: dict[str, Any] = {"path": path}
        want, have = recorded.get(path), file_sha256(path) if Path(path).is_file() else None
        info["sha256"] = want or have or ""
        if have is None or (want and have != want):
            info["note"] = "file absent" if have is None else "the file now at this path is another model"
            out[obj] = info
            continue
        metrics = Path(path).parent / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                r = json.loads(line)
                if r.get("event") == "final":
                    info["test_acc"] = r.get("test_acc")
                    info["energy"] = {k: r[k] for k in ("test_energy", "buffer_energy") if k in r}
        out[obj] = info
    return out


def write_report(run_dir: str | os.PathLike, *, preset: str = "", dataset: str = "", device: str = "cpu",
                 checkpoints: dict[str, str] | None = None, mids: dict[str, float] | None = None) -> Path:
    """Write ``report.md``, ``flags.json``, ``headline.json``, ``rows.csv`` and ``robustness.png`` in ``run_dir``.

    The context (preset, dataset, device, checkpoints, middle ε, and each checkpoint's sha256 and test accuracy)
    is kept in ``report_context.json``, so a later call with none of it (``robust-jem report RUN``) writes the same
    report even after the checkpoints are gone or replaced; without that file it is recovered from the rows (and
    from checkpoint files only where their sha256 matches the rows').
    """
    run_dir = Path(run_dir)
    rows = read_rows(run_dir / ROWS)
    ctx = _report_context(run_dir, rows, dict(preset=preset, dataset=dataset, device=device,
                                              checkpoints=checkpoints, mids=mids))
    preset, dataset, device, checkpoints, mids = (ctx[k] for k in ("preset", "dataset", "device", "checkpoints",
                                                                  "mids"))
    env = environment(device)  # before this report rewrites any file: a tracked run's own files are not code changes
    typed = [t for t in map(parse_row, rows) if t is not None]
    side = load_side_files(run_dir, rows)
    checks = run_checks(typed, side)
    flags = all_flags(checks)
    head = worst_case(typed, side)
    atomic_write(run_dir / "flags.json", json.dumps([c.to_dict() for c in checks], indent=1))
    atomic_write(run_dir / "headline.json", json.dumps(head, indent=1))
    if rows:
        export_csv(rows, run_dir / "rows.csv")
    plot = None
    plottable = [r for r in rows if r.get("kind") in ("whitebox", "blackbox")]
    if plottable:
        plot, _ = plot_rows(plottable, run_dir / "robustness.png")
    headline_png = plot_headline(head, run_dir / "headline.png", display_names(head),
                                 [r for r in rows if r.get("kind") == "certify"])
    ck_info = ctx.get("checkpoint_info") or checkpoint_info(checkpoints or {}, rows)
    if not ctx.get("checkpoint_info"):
        atomic_write(run_dir / REPORT_CONTEXT, json.dumps({**ctx, "checkpoint_info": ck_info}, indent=1))
    if mids is None:
        mids = {}
        for norm in ("linf", "l2"):
            es = sorted({r["eps"] for r in rows if r.get("kind") == "whitebox" and r["norm"] == norm and r["eps"] > 0})
            if es:
                mids[norm] = es[(len(es) - 1) // 2]
    stages = read_rows(run_dir / "stages.jsonl")
    md: list[str] = [f"# robust-jem report: {preset or run_dir.name} on {dataset}", ""]
    md += [f"Generated {now()} by `suite/report.py` from `{ROWS}` ({len(rows)} rows); every number below comes "
           f"from those rows. Code {env['git_sha']}, torch {env['torch_version']}, device {env['device']}.", ""]
    head_cells: dict[str, dict] = {}
    tables = []
    for norm in ("linf", "l2"):
        if any(h["norm"] == norm for h in head):
            t, cells = headline_table(head, norm)
            head_cells[norm] = cells
            tables.append((norm, t))
    # each kind of evaluation hashes its own code (attacks.pipeline): versions differ within a kind, or not at all
    codes: dict[str, set[str]] = defaultdict(set)
    for r in typed:
        if r.code:
            codes[r.kind].add(r.code)
    mixed = {kind: sorted(c) for kind, c in sorted(codes.items()) if len(c) > 1}
    if mixed:
        md += ["> **Warning:** " + "; ".join(f"the {kind} rows were computed by {len(c)} versions of their code "
                                              f"({', '.join(c)})" for kind, c in mixed.items())
               + "; numbers from different versions may not be comparable.", ""]
    for c in ck_info.values():
        mine = [r for r in of_kind(typed, WhiteboxRow) if r.checkpoint == c["path"] and r.eps == 0 and r.n >= 20]
        if mine and c.get("test_acc") is not None:
            clean = sum(r.clean_acc * r.n for r in mine) / sum(r.n for r in mine)
            if clean < c["test_acc"] - 0.15:
                md += [f"> **Warning:** {mine[0].model} is {pct(clean)} correct on the attacked clean images but its "
                       f"checkpoint recorded {pct(c['test_acc'])} test accuracy: are these the data it was trained "
                       f"on? (data files: {', '.join(mine[0].data_sha256) or 'unknown'})", ""]
    health = read_health(run_dir)
    md += ["## Verdict", ""] + verdicts(head_cells, mids, checks, typed, rows) + (
        [health_sentence(health)] if health else []) + [""]
    clean = clean_table(typed, ck_info)
    md += ["## Clean accuracy", "", clean, ""] if clean else []
    md += leaderboard_section(run_dir, mids)
    md += ["## Robust accuracy (headline: per-example worst case over every attack)", "",
           "Each cell: robust accuracy [95 % Wilson CI] on the examples every attack against that model covered. "
           "JEM-k is the SGLD-refined classifier (k steps, 5 chains); white-box attacks went through the chain "
           "with full gradients and with BPDA, and the minimum counts.", ""]
    rules = sorted({r.verdict_rule for r in of_kind(typed, WhiteboxRow) if r.verdict_rule and not r.deterministic})
    if rules:
        md += ["Verdict on the randomized models: " + "; ".join(rules) + ".", ""]
    if headline_png:
        md += [f"![headline: robust accuracy vs ε, one curve per defense]({headline_png.name})", ""]
    md += ["Attacks behind the cells (every one counts per example, and so does a stronger attack run on the "
           "examples an earlier one left standing; other rows on smaller subsets, such as the convergence ladders, "
           "are reported separately):", "", protocol_table(head, typed), ""]
    for norm, t in tables:
        ct, n_common = common_table(head, norm)
        md += [f"### {NORM_TITLES.get(norm, norm)}", ""]
        if n_common:
            md += [f"On one fixed subset: the **n = {n_common}** examples every model was attacked on at every ε of "
                   f"this table. Rule: robust = correct in all fresh-noise draws of the clean input and of every "
                   f"candidate of every attack [95 % Wilson CI]; \"one draw\" = the accuracy of a single fresh draw "
                   f"against each example's strongest candidate.", "", ct, "",
                   "Each model on all the examples it was attacked on (n per cell):", ""]
        md += [t, ""]
    if plot:
        md += ["## Robust accuracy vs ε, per attack", "", f"![robust accuracy vs eps]({plot.name})", ""]
        for norm in ("linf", "l2"):
            if any(r.get("kind") == "whitebox" and r["norm"] == norm for r in rows):
                md += [f"### {NORM_TITLES.get(norm, norm)}", "", per_attack_table(rows, norm), ""]
    conv = convergence_table(typed, mids)
    if conv:
        conv_png = plot_convergence(typed, mids, run_dir / "convergence.png")
        md += ["## Convergence of the attacks", "",
               "Robust accuracy at the middle ε as the attack grows (on the first n examples of the shared selection), and the "
               "mean margin per step of the longest attack; a flat end means more of the same attack would not "
               "find more. The headline uses the settings in the per-attack tables below; these ladders are "
               "reported beside it, not mixed into its cells.", "", conv, ""]
        if conv_png:
            md += [f"![convergence]({conv_png.name})", ""]
    md += escalation_section(typed)
    md += ["## Gradient-masking checks", "",
           "Each check compares rows the study produced; a check with nothing to compare is *not run*, not passed.",
           "", "| check | what it compares | result |", "|---|---|---|"]
    md += [f"| {c.check} | {c.description} | {c.summary()} |" for c in checks]
    md += [""] + [f"- **{f.check}** ({f.subject}): {f.message} — rows {', '.join(k for k in f.rows if k)}"
                  for f in flags] + [""]
    black = [r for r in rows if r.get("kind") == "blackbox"]
    if black:
        for r in black:
            r["_median"] = (r.get("distance_summary") or {}).get("median")
            r["_found"] = (r.get("distance_summary") or {}).get("n_found")
            r["_steps"] = (r.get("attack_params") or {}).get("steps")
        md += ["## Black-box (decision-based) attacks", "",
               "Minimisation attacks on a fixed-noise view (noise keyed on the example's slot: the view is as "
               "continuous as the model); distances re-scored with fresh chain noise. \"not attacked\": no view "
               "could attack the example (it counts as no information in the headline).", "",
               kv_table(sorted(black, key=lambda r: (r["attack"], model_order(r["model"]), r["_steps"] or 0)),
                         [("model", "model"), ("attack", "attack"), ("norm", "norm"), ("steps", "_steps"),
                          ("n", "n"), ("adversarials found", "_found"), ("not attacked", "n_not_attacked"),
                          ("median distance", "_median"), ("queries / example", "queries_per_example"),
                          ("wall s", "wall_s")]), ""]
        ladder = defaultdict(list)
        for r in black:
            ladder[(r["model"], r["attack"], r["norm"], r["n"])].append(r)
        lines = [f"| {m} | {a} | {NORM_TITLES.get(nm, nm)} | {n} | " + ", ".join(
                     f"{r['_steps']}: {'–' if r['_median'] is None else format(r['_median'], '.3g')}"
                     for r in sorted(rs, key=lambda r: r["_steps"] or 0)) + " |"
                 for (m, a, nm, n), rs in sorted(ladder.items()) if len({r["_steps"] for r in rs}) > 1]
        if lines:
            md += ["Median fresh-noise distance against the attack's steps (a falling median means the attack has "
                   "not converged at the smaller budgets):", "", "| model | attack | norm | n | steps: median |",
                   "|---|---|---|---|---|"] + lines + [""]
    distal = [r for r in rows if r.get("kind") == "distal"]
    if distal:
        md += ["## Distal adversarials", "", kv_table(distal, [
            ("model", "model"), ("grad mode", "grad_mode"), ("start", "start"), ("n", "n_images"),
            ("confidence at start", "conf_start"), ("confidence at end", "conf_result"),
            ("fraction ≥ threshold", "frac_above_threshold"), ("target hit", "target_hit_result"),
            ("log p(x) results", "log_density_result"), ("log p(x) real", "log_density_real")]), ""]
        md += [f"![{p}]({p})" for p in _images(run_dir, "distal*.png")] + [""]
    calib = [r for r in rows if r.get("kind") == "calibration"]
    if calib:
        md += ["## Calibration", "", kv_table(calib, [("model", "model"), ("sgld steps", "sgld_steps"), ("n", "n"),
                                                        ("accuracy", "accuracy"), ("ECE", "ece"), ("NLL", "nll"),
                                                        ("Brier", "brier")]), ""]
        md += [f"![{p}]({p})" for p in _images(run_dir, "reliability*.png")] + [""]
    ood = [r for r in rows if r.get("kind") == "ood"]
    if ood:
        md += ["## Out-of-distribution detection (AUROC)", "", kv_table(ood, [
            ("model", "model"), ("OOD set", "out_set"), ("score", "score"), ("AUROC", "auroc"),
            ("FPR at 95 % TPR", "fpr_at_tpr")]), ""]
        md += [f"![{p}]({p})" for p in _images(run_dir, "ood*.png")] + [""]
    cert = [r for r in rows if r.get("kind") == "certify"]
    if cert:
        md += ["## Randomized smoothing (Cohen et al. 2019)", "", kv_table(cert, [
            ("model", "model"), ("σ", "smoothing_sigma"), ("L2 radius", "radius"),
            ("certified accuracy", "certified_accuracy"), ("abstain rate", "abstain_rate"),
            ("empirical robust acc (EOT-PGD)", "empirical_robust_accuracy")]), ""]
    acts = [r for r in rows if r.get("kind") == "activity"]
    if acts:
        md += ["## Refinement activity", "",
               "What each JEM-k chain does to clean test images, averaged over examples and chains: its displacement "
               "from the input in [0, 1] pixel units (read it beside the ε attacked), the energy at the input and at "
               "the chain's end, and the predictions it changes. Fewer than 1 % changed against the bare classifier "
               "marks the refinement inactive: it cannot be why JEM-k differs from JEM-0. Rows on an attack's "
               "candidates refine the worst point per example that attack found against that same JEM-k.", "",
               kv_table(sorted(acts, key=lambda r: (model_order(str(r.get("model"))), r.get("inputs", "clean") != "clean",
                                                    str(r.get("inputs")))), [
                   ("model", "model"), ("inputs", "inputs"), ("n", "n"), ("L2 moved", "displacement_l2"), ("L∞ moved", "displacement_linf"),
                   ("energy at input", "energy_start"), ("energy at end", "energy_end"),
                   ("changed vs bare", "changed_vs_bare"), ("changed vs JEM-0", "changed_vs_jem0"),
                   ("accuracy bare", "accuracy_bare"), ("accuracy refined", "accuracy_refined"),
                   ("inactive", "inactive")]), ""]
    if health:
        md += ["## EBM health of the JEM", "",
               f"Its replay buffer ({health.get('n_buffer')} samples) and {health.get('n_conditional')} fresh "
               f"class-conditional chains ({health.get('steps_conditional')} SGLD steps from uniform noise), judged by "
               f"`{health.get('judge')}` (sha256 `{str(health.get('judge_sha256', ''))[:16]}`), which was trained "
               "without the JEM. FD: Fréchet distance in the judge's logit space to held-out real images.", "",
               health_table(health), ""]
    grids = _images(run_dir, "samples/**/*.png")
    if grids:
        md += ["## Samples", ""] + [f"![{p}]({p})" for p in grids] + [""]
    md += ["## Provenance", ""]
    if ck_info:
        md += ["| model | checkpoint | sha256 | final energies |", "|---|---|---|---|"]
        md += [f"| {o} | `{c['path']}` | `{c.get('sha256', '')}` | {c.get('energy', '')} |" for o, c in ck_info.items()]
        md += [""]
    if stages:
        md += ["| stage | job | wall s |", "|---|---|---|"]
        md += [f"| {s['stage']} | `{_job_text(s.get('job'))}` | {s.get('wall_s', '')} |" for s in stages]
        md += ["", f"Total wall time of the stages: {sum(float(s.get('wall_s') or 0) for s in stages):.0f} s."]
    shas = sorted({r.get("git_sha") for r in rows if r.get("git_sha")})
    md += ["", f"Rows were produced by code at: {', '.join(shas) or 'unknown'}."]
    path = run_dir / "report.md"
    atomic_write(path, "\n".join(md) + "\n")
    return path
