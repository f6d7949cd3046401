"""Gradient-masking checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness", Sec. 5) and the
per-example worst case over every attack.

Everything here reads typed rows (:mod:`attacks.rows`) only. A *subject* is one defense (its
``defense_id``: checkpoint + refinement); how it was attacked (grad mode, EOT, steps, black-box ...) is part
of the attack, so the headline of a subject is the per-example worst case over everything run against it.

Each check reports what it compared (:class:`CheckResult`): a check that found nothing to compare is
"not run", never "passed" — a safeguard that cannot fire must not look like one that held. Pairs are rows
of one attack family (PGD, PGDL2, EOTPGD and EOTPGDL2 are all ``pgd``) and one step-size rule on the same
examples, differing in exactly the parameter under test; two rows are compared on their per-example
outcomes with an exact McNemar test (two-sided, p < 0.05).

Checks:
 1. ``large_eps_not_broken``: robust accuracy at a *large* ε (L∞ ≥ 0.3, L2 ≥ 0.15·sqrt(input dimension)) is
    above 1 %. Its premise needs such an ε: a sweep whose largest ε is small is "not run" and says so.
 2. ``blackbox_beats_whitebox``: on the examples both attacked, a black-box attack leaves fewer correct than
    the white-box attack at the same defense, norm and ε (paired test).
 3. ``more_steps_help_model``: more PGD steps leave more examples robust (paired test).
 4. ``more_restarts_help_model``: more restarts leave more examples robust (paired test).
 5. ``bpda_full_disagree``: BPDA and full gradients disagree (paired test; the headline takes the minimum).
 6. ``eot_not_converged``: more EOT draws change robust accuracy (paired test).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .common import eps_key, same_eps, wilson
from .rows import BlackboxRow, Row, WhiteboxRow, of_kind

log = logging.getLogger(__name__)

LARGE_EPS_MAX_ACC = 0.01
LARGE_LINF = 0.3  # any classifier should fall here (Carlini et al. 2019: accuracy -> 0 as ε grows)
LARGE_L2_PER_SQRT_DIM = 0.15  # L2 radius per sqrt(C·H·W): 4.2 on Fashion-MNIST, 8.3 on CIFAR-10
INPUT_DIMS = {"fashion-mnist": 784, "mnist": 784, "cifar10": 3072, "cifar100": 3072, "svhn": 3072}
ALPHA = 0.05


@dataclass
class Flag:
    """One raised check."""

    check: str
    subject: str
    message: str
    rows: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckResult:
    """What one check looked at and what it found."""

    check: str
    description: str
    compared: int
    unit: str = "pairs"
    flags: list[Flag] = field(default_factory=list)
    note: str = ""  # what could not be compared, and why (all of it when nothing was)

    @property
    def status(self) -> str:
        """``not run`` (nothing to compare), ``flagged`` or ``passed``."""
        return "not run" if self.compared == 0 else ("flagged" if self.flags else "passed")

    def summary(self) -> str:
        """e.g. ``4 pairs compared, 0 flags`` or ``not run (0 pairs to compare)``."""
        if self.compared == 0:
            return f"not run ({self.note or f'0 {self.unit} to compare'})"
        done = f"{self.compared} {self.unit} compared, {len(self.flags)} flag{'s' if len(self.flags) != 1 else ''}"
        return f"{done}; not checked: {self.note}" if self.note else done

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "description": self.description, "compared": self.compared, "unit": self.unit,
                "status": self.status, "flags": [f.to_dict() for f in self.flags],
                **({"note": self.note} if self.note else {})}


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts ``b`` and ``c`` (1.0 when both are 0)."""
    n = b + c
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(min(b, c), n, 0.5).pvalue)


def detectable_difference(n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest difference in robust accuracy (a fraction) an exact McNemar test on ``n`` paired examples detects
    at level ``alpha`` with probability ``power``, in the most favourable case: every discordant example favours the
    same side (discordance both ways needs a larger difference). Then the test rejects once the discordant count D,
    Binomial(n, δ), reaches the smallest d with 2·0.5^d < alpha; this is the δ with P(D ≥ d) = ``power``
    (1.0 when even n discordant examples could not reject)."""
    from scipy.stats import binom

    d = next((k for k in range(1, n + 1) if mcnemar_p(k, 0) < alpha), None)
    if d is None:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binom.sf(d - 1, n, mid) < power else (lo, mid)
    return hi


@dataclass(frozen=True)
class Paired:
    """Two per-example outcome vectors compared on the examples both hold."""

    n: int  # examples in common
    robust_a: int  # robust under a, of those
    robust_b: int
    only_a: int  # robust under a only (discordant)
    only_b: int

    @property
    def p(self) -> float:
        """Exact McNemar p-value of the discordant pairs."""
        return mcnemar_p(self.only_a, self.only_b)

    @property
    def detectable(self) -> float:
        """The smallest difference this comparison could detect with 80 % power (:func:`detectable_difference`)."""
        return detectable_difference(self.n)


def paired_outcomes(a_indices: Sequence[int], a_correct: Sequence[int], b_indices: Sequence[int],
                    b_correct: Sequence[int]) -> Paired:
    """The one paired comparison of two per-example outcome vectors (rows, or worst-case headline cells)."""
    va = dict(zip(a_indices, a_correct))
    common = [(bool(va[i]), bool(c)) for i, c in zip(b_indices, b_correct) if i in va]
    return Paired(len(common), sum(x for x, _ in common), sum(y for _, y in common),
                  sum(x and not y for x, y in common), sum(y and not x for x, y in common))


def paired(a: WhiteboxRow, b: WhiteboxRow) -> tuple[int, int, int]:
    """On the examples both rows attacked: (n common, robust only under ``a``, robust only under ``b``)."""
    q = paired_outcomes(a.example_indices, a.correct, b.example_indices, b.correct)
    return q.n, q.only_a, q.only_b


def _label(r: Row) -> str:
    return f"{r.model} [{r.defense_id}]" if r.defense_id else r.model


def _pair_key(r: WhiteboxRow, vary: str) -> tuple:
    """Everything that must agree for two rows to form a pair in ``vary``."""
    fields = {"subject": r.subject, "family": r.attack_family or r.attack, "norm": r.norm,
              "eps": eps_key(r.eps), "grad_mode": r.grad_mode, "step_rule": r.step_rule,
              "steps": r.steps, "restarts": r.restarts, "eot": r.eot_used, "precision": r.precision,
              "eval_draws": r.eval_draws_used, "split": r.split, "dataset": r.dataset}
    fields.pop(vary)
    return tuple(sorted(fields.items()))


def pairs_differing_in(rows: Iterable[WhiteboxRow], vary: str) -> list[tuple[WhiteboxRow, WhiteboxRow]]:
    """Pairs (smaller value, larger value) of rows identical but for ``vary`` (steps, restarts, eot, grad_mode)
    that attacked at least one example in common (they are compared on their common examples)."""
    attr = {"eot": "eot_used"}.get(vary, vary)
    groups: dict[tuple, list[WhiteboxRow]] = defaultdict(list)
    for r in rows:
        if r.eps > 0:
            groups[_pair_key(r, vary)].append(r)
    out = []
    for rs in groups.values():
        rs = sorted(rs, key=lambda r: str(getattr(r, attr)))
        if vary != "grad_mode":
            rs = sorted(rs, key=lambda r: getattr(r, attr) or 0)
        out += [(a, b) for a, b in zip(rs, rs[1:]) if getattr(a, attr) != getattr(b, attr) and paired(a, b)[0]]
    return out


def large_eps(norm: str, dataset: str | None) -> float | None:
    """The smallest ε the large-ε check accepts as large for ``norm`` on ``dataset`` (None: unknown)."""
    if norm == "linf":
        return LARGE_LINF
    dim = INPUT_DIMS.get(str(dataset))
    return LARGE_L2_PER_SQRT_DIM * math.sqrt(dim) if norm == "l2" and dim else None


def check_large_eps(rows: list[Row]) -> CheckResult:
    """Every white-box row at *its defense's* largest ε of a norm, when that ε is large (:func:`large_eps`), must
    leave ≤ 1 % robust accuracy. Each defense is judged at its own grid's top (a JEM-10 whose grid stops earlier is
    judged there, not dropped because another model went further); a defense whose largest ε is not large is
    named in the note: the premise does not hold for it, so it is not checked."""
    white = of_kind(rows, WhiteboxRow)
    top: dict[tuple[str, str], float] = {}
    for r in white:
        top[(r.subject, r.norm)] = max(top.get((r.subject, r.norm), 0.0), float(r.eps))
    small: dict[tuple[str, str], tuple[str, float, float | None]] = {}
    for r in white:
        floor = large_eps(r.norm, r.dataset)
        if floor is None or top[(r.subject, r.norm)] < floor - 1e-12:
            small[(r.subject, r.norm)] = (r.model, top[(r.subject, r.norm)], floor)
    at_top = [r for r in white if (r.subject, r.norm) not in small and same_eps(r.eps, top[(r.subject, r.norm)])]
    note = "; ".join(f"{m}: largest {n} ε {e:.4g} is below the large ε {f:.4g} its premise needs" if f is not None
                     else f"{m}: no large {n} ε known for this data set"
                     for (_, n), (m, e, f) in sorted(small.items(), key=lambda kv: (kv[1][0], kv[0][1])))
    res = CheckResult("large_eps_not_broken", "accuracy → 0 as ε grows: rows at each defense's largest ε of a norm, "
                      "when large", len(at_top), unit="rows", note=note)
    for r in at_top:
        if r.robust_acc > LARGE_EPS_MAX_ACC:
            res.flags.append(Flag(res.check, _label(r),
                                  f"{r.attack} ({r.grad_mode}) {r.norm} ε={r.eps:.4g} leaves {r.robust_acc:.1%} robust "
                                  f"(> {LARGE_EPS_MAX_ACC:.0%}): attack too weak or gradients masked", [r.key]))
    return res


def _informative(d: dict[str, Any]) -> list[bool]:
    """Per example of a side file: does the black-box run say anything about it? Not when no view could attack
    it, unless its clean image already fails a fresh draw (then it is not robust whatever the attack)."""
    n = len(d["indices"])
    status = d.get("status") or ["attacked"] * n
    clean = d.get("clean_correct_fresh_frac") or [1.0] * n
    return [st == "attacked" or c < 1.0 for st, c in zip(status, clean)]


def black_robust(d: dict[str, Any], eps: float) -> dict[int, bool]:
    """Per-example black-box verdict at ε from a side file (fresh-noise distances); examples the run says
    nothing about are left out."""
    clean_ok = d.get("clean_correct_fresh_frac") or [1.0] * len(d["indices"])
    return {i: ok >= 1.0 and (dist is None or dist > eps)
            for i, dist, ok, info in zip(d["indices"], d["distance_fresh_noise"], clean_ok, _informative(d)) if info}


def black_frac(d: dict[str, Any], eps: float) -> dict[int, float]:
    """Per-example fraction of fresh draws correct at ε (the clean image, and the adversarial foolbox found if
    it lies within ε), from a side file: the one-fresh-draw accuracy of the black-box attack."""
    n = len(d["indices"])
    clean = d.get("clean_correct_fresh_frac") or [1.0] * n
    wrong = d.get("fresh_misclassified_frac") or [None] * n
    out = {}
    for i, c, dist, w, info in zip(d["indices"], clean, d["distance_fixed_noise"], wrong, _informative(d)):
        if info:
            out[i] = min(c, 1.0 - w) if dist is not None and dist <= eps and w is not None else c
    return out


def check_blackbox(rows: list[Row], side: dict[str, dict[str, Any]]) -> CheckResult:
    """On the examples both attacked, a black-box attack must not leave fewer correct than a white-box attack
    at the same defense, norm and ε > 0 (paired test)."""
    white = of_kind(rows, WhiteboxRow)
    res = CheckResult("blackbox_beats_whitebox", "black-box no stronger than white-box: (black-box row, white-box "
                      "row) pairs on common examples", 0)
    for b in of_kind(rows, BlackboxRow):
        if b.key not in side:
            continue
        for w in white:
            if w.subject != b.subject or w.norm != b.norm or w.eps <= 0:
                continue
            black = black_robust(side[b.key], w.eps)
            common = [(bool(c), black[i]) for i, c in zip(w.example_indices, w.correct) if i in black]
            if not common:
                continue
            res.compared += 1
            only_white = sum(wc and not bc for wc, bc in common)  # robust to white-box, broken by black-box
            only_black = sum(bc and not wc for wc, bc in common)
            n = len(common)
            if only_white > only_black and mcnemar_p(only_white, only_black) < ALPHA:
                k_w, k_b = sum(wc for wc, _ in common), sum(bc for _, bc in common)
                res.flags.append(Flag(res.check, _label(b),
                                      f"{b.attack} leaves {k_b / n:.1%} at {b.norm} ε={w.eps:.4g}, below white-box "
                                      f"{w.attack} ({w.grad_mode}) {k_w / n:.1%} on the same {n} examples "
                                      f"(McNemar p = {mcnemar_p(only_white, only_black):.3g})", [b.key, w.key]))
    return res


def _paired_check(rows: list[Row], vary: str, check: str, description: str,
                  flag_if: Callable[[int, int], bool], what: str) -> CheckResult:
    white = of_kind(rows, WhiteboxRow)
    pairs = pairs_differing_in(white, vary)
    res = CheckResult(check, description, len(pairs))
    attr = {"eot": "eot_used"}.get(vary, vary)
    for a, b in pairs:
        n, only_a, only_b = paired(a, b)
        if n and flag_if(only_a, only_b):
            res.flags.append(Flag(check, _label(b),
                                  f"{b.attack_family} {b.norm} ε={b.eps:.4g} ({b.grad_mode}): {vary} "
                                  f"{getattr(a, attr)}→{getattr(b, attr)} {what} {a.robust_acc:.1%}→{b.robust_acc:.1%} "
                                  f"on {n} common examples (McNemar p = {mcnemar_p(only_a, only_b):.3g})",
                                  [a.key, b.key]))
    return res


def check_more_steps(rows: list[Row]) -> CheckResult:
    """More PGD steps must not leave significantly more examples robust."""
    return _paired_check(rows, "steps", "more_steps_help_model", "more steps never help the model: row pairs "
                         "differing only in steps", lambda a, b: b > a and mcnemar_p(a, b) < ALPHA,
                         "raises robust accuracy")


def check_more_restarts(rows: list[Row]) -> CheckResult:
    """More restarts must not leave significantly more examples robust."""
    return _paired_check(rows, "restarts", "more_restarts_help_model", "more restarts never help the model: row "
                         "pairs differing only in restarts", lambda a, b: b > a and mcnemar_p(a, b) < ALPHA,
                         "raises robust accuracy")


def check_bpda_full(rows: list[Row]) -> CheckResult:
    """Full and BPDA gradients through the chain should agree; a disagreement names the stronger one."""
    return _paired_check(rows, "grad_mode", "bpda_full_disagree", "BPDA vs full gradients through the chain: row "
                         "pairs differing only in gradient mode", lambda a, b: mcnemar_p(a, b) < ALPHA,
                         "moves robust accuracy (the headline takes the per-example minimum)")


def check_eot(rows: list[Row]) -> CheckResult:
    """More EOT draws must not change robust accuracy significantly (else EOT has not converged)."""
    return _paired_check(rows, "eot", "eot_not_converged", "EOT converged: row pairs differing only in EOT draws",
                         lambda a, b: mcnemar_p(a, b) < ALPHA, "moves robust accuracy")


def run_checks(rows: list[Row], side: dict[str, dict[str, Any]] | None = None) -> list[CheckResult]:
    """Every check over typed ``rows`` (``side``: black-box side files by row key)."""
    return [check_large_eps(rows), check_blackbox(rows, side or {}), check_more_steps(rows),
            check_more_restarts(rows), check_bpda_full(rows), check_eot(rows)]


def all_flags(results: Iterable[CheckResult]) -> list[Flag]:
    return [f for r in results for f in r.flags]


def _covers(indices: Iterable[int], target: set[int]) -> bool:
    return target <= set(indices)


def load_side_files(run_dir: str | Path, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Black-box per-example distance files referenced by rows (missing ones are skipped with a warning)."""
    side = {}
    for r in rows:
        name = r.get("distances_file")
        if r.get("kind") == "blackbox" and name:
            path = Path(run_dir) / name
            if path.exists():
                side[r["key"]] = json.loads(path.read_text())
            else:
                log.warning("missing side file %s", path)
    return side


def worst_case(rows: list[Row], side: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Headline robust accuracy: per (defense, norm, ε) the per-example worst case over every attack.

    A cell's examples are those of its largest white-box row (the headline attack's selection); every row
    against that defense at that norm and ε whose examples cover them contributes: white-box rows through
    their per-example ``correct`` vectors, black-box rows through their side files (``side``: row key -> the
    ``distances-KEY.json`` content; robust at ε when classified correctly under fresh noise and no adversarial
    was found within ε). A white-box row on a subset contributes when every example it left out is already
    broken (a stronger attack escalated on the survivors, AutoAttack's rule); other subset rows (convergence
    ladders, spot checks) are reported beside the headline, not mixed into it, so every cell is one fixed
    selection judged by every attack that covered it.
    Two defenses (different ``defense_id``) are never merged, even when they share a label.
    """
    side = side or {}
    groups: dict[tuple, list[WhiteboxRow]] = defaultdict(list)
    for r in of_kind(rows, WhiteboxRow):
        if r.correct and r.example_indices:
            groups[(r.subject, r.model, r.norm, eps_key(r.eps))].append(r)
    black = [b for b in of_kind(rows, BlackboxRow) if b.key in side]
    out = []
    for (subj, label, norm, eps), rs in sorted(groups.items()):
        largest = max(rs, key=lambda r: (r.n, r.key))
        selection = set(largest.example_indices)
        verdict = {i: True for i in selection}
        frac = {i: 1.0 for i in selection}
        contributors, families, left_out = [], set(), []

        def add(r: WhiteboxRow) -> None:
            contributors.append(r.key)
            families.add(r.attack_family or r.attack)
            fr = r.robust_frac or [float(c) for c in r.correct]
            for i, c, f in zip(r.example_indices, r.correct, fr):
                if i in selection:
                    verdict[i] = verdict[i] and bool(c)
                    frac[i] = min(frac[i], float(f))

        subsets = []
        for r in rs:
            (add if _covers(r.example_indices, selection) else subsets.append)(r)
        for b in black:
            if b.subject != subj or b.norm != norm or not _covers(side[b.key]["indices"], selection):
                continue
            contributors.append(b.key)
            families.add(b.attack)
            fb = black_frac(side[b.key], eps)
            for i, robust in black_robust(side[b.key], eps).items():  # uninformative examples: no say
                if i in selection:
                    verdict[i] = verdict[i] and robust
                    frac[i] = min(frac[i], fb[i])
        # escalation on survivors: a row on a subset counts when every example it left out is already broken
        for r in sorted(subsets, key=lambda r: (-r.n, r.key)):
            if all(not verdict[i] for i in selection - set(r.example_indices)):
                add(r)
            else:
                left_out.append(r.key)
        common = sorted(selection)
        k = sum(verdict[i] for i in common)
        n = len(common)
        lo, hi = wilson(k, n)
        out.append({"subject": subj, "model": label, "objective": largest.objective,
                    "sgld_steps": largest.sgld_steps, "bare": largest.n_chains == 1 and largest.init_noise == 0,
                    "norm": norm, "eps": eps, "n": n,
                    "robust_acc": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi,
                    "robust_acc_one_draw": sum(frac[i] for i in common) / n if n else float("nan"),
                    "attacks": len(contributors), "families": sorted(families), "rows": contributors,
                    "subset_rows": left_out, "example_indices": common, "correct": [int(verdict[i]) for i in common],
                    "frac": [round(frac[i], 6) for i in common]})
    return out
