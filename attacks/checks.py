"""Gradient-masking checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness", Sec. 5) and the
per-example worst case over every attack.

All functions read result rows only (see :mod:`attacks.records`). A *subject* is one model under test:
its label (``CE``, ``PGD-AT``, ``JEM-10``) and checkpoint hash; how it was attacked (grad mode, EOT,
steps, black-box ...) is part of the attack, so the headline of a subject is the per-example worst case
over everything run against it. Each flag names the rows (by ``key``) that raised it.

Flags:
 1. ``large_eps_not_broken``: robust accuracy at the sweep's largest ε is above 1 %.
 2. ``blackbox_beats_whitebox``: on the examples both attacked, a black-box attack leaves fewer correct than
    the white-box attack at the same norm and ε, beyond the white-box CI.
 3. ``more_steps_help_model``: more PGD steps or restarts raise robust accuracy beyond the weaker row's CI.
 4. ``bpda_full_disagree``: BPDA and full gradients disagree beyond their CIs (the stronger one is named;
    the headline takes the per-example minimum anyway).
 5. ``eot_not_converged``: doubling EOT draws changes robust accuracy beyond the CI.
 6. ``eps0_not_clean``: at ε = 0 robust accuracy differs from clean accuracy beyond the CI.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from .common import wilson

LARGE_EPS_MAX_ACC = 0.01


@dataclass
class Flag:
    """One raised check."""

    check: str
    subject: str
    message: str
    rows: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def subject(row: dict[str, Any]) -> str:
    """Model under test: label plus a short checkpoint hash (``JEM-10@1a2b3c4d``)."""
    sha = row.get("checkpoint_sha256") or ""
    return f"{row['model']}@{sha[:8]}" if sha else str(row["model"])


def _white(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == "whitebox"]


def _same_eps(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _disjoint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["robust_ci_high"] < b["robust_ci_low"] or b["robust_ci_high"] < a["robust_ci_low"]


def _params_without(row: dict[str, Any], *names: str) -> tuple:
    p = dict(row.get("attack_params") or {})
    for n in names:
        p.pop(n, None)
    p.pop("eot_used", None)
    return (subject(row), row.get("attack"), row.get("norm"), round(float(row["eps"]), 12),
            tuple(sorted((k, str(v)) for k, v in p.items())), row.get("n"))


def check_large_eps(rows: list[dict[str, Any]]) -> list[Flag]:
    """Flag 1: every white-box row at the sweep's largest ε of its norm must leave ≤ 1 % robust accuracy.

    Rows run at smaller budgets only (spot checks, AutoAttack at one ε) are not judged by this check.
    """
    white = _white(rows)
    top: dict[str, float] = {}
    for r in white:
        top[r["norm"]] = max(top.get(r["norm"], 0.0), float(r["eps"]))
    flags = []
    for r in white:
        eps = top[r["norm"]]
        if eps > 0 and _same_eps(r["eps"], eps) and r["robust_acc"] > LARGE_EPS_MAX_ACC:
            flags.append(Flag("large_eps_not_broken", subject(r),
                              f"{r.get('attack')} ({r.get('grad_mode')}) {r['norm']} ε={eps:.4g} leaves "
                              f"{r['robust_acc']:.1%} robust (> {LARGE_EPS_MAX_ACC:.0%}): attack too weak or "
                              f"gradients masked", [r.get("key", "")]))
    return flags


def _black_robust(d: dict[str, Any], eps: float) -> dict[int, bool]:
    """Per-example black-box verdict at ε from a side file (fresh-noise distances)."""
    clean_ok = d.get("clean_correct_fresh_frac") or [1.0] * len(d["indices"])
    return {i: ok >= 1.0 and (dist is None or dist > eps)
            for i, dist, ok in zip(d["indices"], d["distance_fresh_noise"], clean_ok)}


def check_blackbox(rows: list[dict[str, Any]], side: dict[str, dict[str, Any]] | None = None) -> list[Flag]:
    """Flag 2: on the examples both attacked, a black-box attack leaves fewer correct than the white-box
    attack at the same subject, norm and ε > 0, beyond the white-box 95 % CI on those examples."""
    side = side or {}
    white = _white(rows)
    flags = []
    for b in (r for r in rows if r.get("kind") == "blackbox" and r.get("key") in side):
        for w in white:
            if subject(w) != subject(b) or w["norm"] != b["norm"] or w["eps"] <= 0 or "correct" not in w:
                continue
            black = _black_robust(side[b["key"]], w["eps"])
            common = [(c, black[i]) for i, c in zip(w["example_indices"], w["correct"]) if i in black]
            if not common:
                continue
            n = len(common)
            k_white = sum(bool(c) for c, _ in common)
            k_black = sum(v for _, v in common)
            lo, hi = wilson(k_white, n)
            if k_black / n < lo:
                flags.append(Flag("blackbox_beats_whitebox", subject(b),
                                  f"{b.get('attack')} leaves {k_black / n:.1%} at {b['norm']} ε={w['eps']:.4g}, below "
                                  f"white-box {w.get('attack')} ({w.get('grad_mode')}) {k_white / n:.1%} "
                                  f"[{lo:.1%}, {hi:.1%}] on the same {n} examples",
                                  [b.get("key", ""), w.get("key", "")]))
    return flags


def _pairs_differing_in(rows: list[dict[str, Any]], param: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in _white(rows):
        groups[(r.get("grad_mode"),) + _params_without(r, param)].append(r)
    pairs = []
    for rs in groups.values():
        rs = sorted(rs, key=lambda r: (r.get("attack_params") or {}).get(param) or 0)
        pairs.extend(zip(rs, rs[1:]))
    return pairs


def check_more_steps(rows: list[dict[str, Any]]) -> list[Flag]:
    """Flag 3: a row with more steps (or restarts) than an otherwise identical row is more robust beyond CI."""
    flags = []
    for param in ("steps", "restarts"):
        for weak, strong in _pairs_differing_in(rows, param):
            pw, ps = weak["attack_params"].get(param), strong["attack_params"].get(param)
            if pw == ps:
                continue
            if strong["robust_acc"] > weak["robust_ci_high"]:
                flags.append(Flag("more_steps_help_model", subject(strong),
                                  f"{strong.get('attack')} {strong['norm']} ε={strong['eps']:.4g}: {param} {pw}→{ps} "
                                  f"raises robust accuracy {weak['robust_acc']:.1%}→{strong['robust_acc']:.1%}",
                                  [weak.get("key", ""), strong.get("key", "")]))
    return flags


def check_bpda_full(rows: list[dict[str, Any]]) -> list[Flag]:
    """Flag 4: full and BPDA gradients disagree beyond their CIs."""
    groups: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in _white(rows):
        if r.get("sgld_steps"):
            groups[_params_without(r)][r.get("grad_mode")] = r
    flags = []
    for g in groups.values():
        if "full" in g and "bpda" in g and _disjoint(g["full"], g["bpda"]):
            full, bpda = g["full"], g["bpda"]
            stronger = "full" if full["robust_acc"] < bpda["robust_acc"] else "bpda"
            flags.append(Flag("bpda_full_disagree", subject(full),
                              f"{full.get('attack')} {full['norm']} ε={full['eps']:.4g}: full {full['robust_acc']:.1%} "
                              f"vs BPDA {bpda['robust_acc']:.1%}; {stronger} is stronger (headline takes the "
                              f"per-example minimum)", [full.get("key", ""), bpda.get("key", "")]))
    return flags


def check_eot(rows: list[dict[str, Any]]) -> list[Flag]:
    """Flag 5: EOT E vs 2E (or more) changes robust accuracy beyond the CI."""
    flags = []
    for weak, strong in _pairs_differing_in(rows, "eot"):
        ew, es = weak["attack_params"].get("eot"), strong["attack_params"].get("eot")
        if ew and es and es >= 2 * ew and _disjoint(weak, strong):
            flags.append(Flag("eot_not_converged", subject(strong),
                              f"{strong.get('attack')} ({strong.get('grad_mode')}) {strong['norm']} "
                              f"ε={strong['eps']:.4g}: EOT {ew}→{es} moves robust accuracy "
                              f"{weak['robust_acc']:.1%}→{strong['robust_acc']:.1%}",
                              [weak.get("key", ""), strong.get("key", "")]))
    return flags


def check_eps0(rows: list[dict[str, Any]]) -> list[Flag]:
    """Flag 6: ε = 0 must reproduce clean accuracy (within the CI of the clean estimate)."""
    flags = []
    for r in _white(rows):
        if r["eps"] != 0:
            continue
        lo, hi = wilson(round(r["clean_acc"] * r["n"]), r["n"])
        if not lo <= r["robust_acc"] <= hi:
            flags.append(Flag("eps0_not_clean", subject(r),
                              f"{r.get('attack')} {r['norm']} ε=0: robust {r['robust_acc']:.1%} vs clean "
                              f"{r['clean_acc']:.1%} [{lo:.1%}, {hi:.1%}]", [r.get("key", "")]))
    return flags


CHECKS = (check_large_eps, check_blackbox, check_more_steps, check_bpda_full, check_eot, check_eps0)


def run_checks(rows: list[dict[str, Any]], side: dict[str, dict[str, Any]] | None = None) -> list[Flag]:
    """Every check over ``rows`` (``side``: black-box side files by row key); the raised flags."""
    flags: list[Flag] = []
    for check in CHECKS:
        flags.extend(check(rows, side) if check is check_blackbox else check(rows))
    return flags


def worst_case(rows: list[dict[str, Any]], side: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Headline robust accuracy: per (subject, norm, ε) the per-example worst case over every attack.

    White-box rows contribute their per-example ``correct`` vectors. Black-box rows contribute through
    their side files (``side``: row key -> the ``distances-KEY.json`` content): an example is robust at ε
    when it is classified correctly under fresh noise and no adversarial was found within ε. Only
    examples attacked by every contributing row are counted.
    """
    side = side or {}
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in _white(rows):
        if "correct" in r and "example_indices" in r:
            groups[(subject(r), r["model"], r["norm"], round(float(r["eps"]), 12))].append(r)
    black = [r for r in rows if r.get("kind") == "blackbox" and r.get("key") in side]
    out = []
    for (subj, label, norm, eps), rs in sorted(groups.items()):
        verdict: dict[int, bool] = {}
        counts: dict[int, int] = defaultdict(int)
        contributors = []
        for r in rs:
            contributors.append(r.get("key", ""))
            for i, c in zip(r["example_indices"], r["correct"]):
                verdict[i] = verdict.get(i, True) and bool(c)
                counts[i] += 1
        for b in black:
            if subject(b) != subj or b["norm"] != norm:
                continue
            contributors.append(b["key"])
            for i, robust in _black_robust(side[b["key"]], eps).items():
                verdict[i] = verdict.get(i, True) and robust
                counts[i] += 1
        sources = len(contributors)
        common = [i for i in verdict if counts[i] == sources]
        k = sum(verdict[i] for i in common)
        n = len(common)
        lo, hi = wilson(k, n)
        out.append({"subject": subj, "model": label, "norm": norm, "eps": eps, "n": n,
                    "robust_acc": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi,
                    "attacks": sources, "rows": contributors})
    return out
