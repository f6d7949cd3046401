"""The whole study behind ``./run_all.sh``: train (or reuse) the models, attack them, write the report.

Every stage is resumable: trained models are reused when their config and the training code match,
interrupted trainings resume from ``last.pt``, and attack sweeps skip rows already in ``rows.jsonl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from attacks.black import BlackboxConfig
from infra.interrupt import Interrupted
from infra.io import atomic_write
from infra.records import ROWS, append_row, read_rows
from robust_jem.checkpoint import read_checkpoint
from robust_jem.config import TrainConfig, preset_config
from robust_jem.errors import UserError
from robust_jem.train import train

from attacks.common import same_eps

from .evaluate import (ActivityJob, AdaptiveSettings, AutoAttackSettings, BlackboxJob, CalibrationJob, CertifyJob,
                       DistalJob, EscalationJob, HealthJob, OODJob, PGDSettings, Round, SampleJob, TransferSettings,
                       WhiteboxJob, job_record, refuse_foreign_rows, run_job)
from .layout import study_model_dir
from .report import write_report
from .targets import Chain

log = logging.getLogger(__name__)

STUDY_OBJECTIVES = ("ce", "pgd-at", "jem", "gaussian-aug")
_CODE_FILES = ("config.py", "data.py", "model.py", "nets.py", "sgld.py", "objectives.py", "train.py", "runs.py",
               "checkpoint.py")


def code_hash() -> str:
    """Hash of the source files that determine a trained model."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent.parent / "robust_jem"
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _stamp(cfg: TrainConfig) -> dict:
    return {"config": cfg.to_dict(), "code": code_hash()}


def train_or_reuse(cfg: TrainConfig, out: Path, device: torch.device, data_dir: str | None = None,
                   progress: bool = True) -> Path:
    """Return ``out/final.pt``, training it unless a finished run with the same config and code exists.

    An interrupted run with the same stamp resumes from ``last.pt``; any other content of ``out`` is
    replaced by a fresh run.
    """
    stamp_path = out / "stamp.json"
    want = _stamp(cfg)
    same = stamp_path.exists() and json.loads(stamp_path.read_text()) == want
    final, last = out / "final.pt", out / "last.pt"
    if same and final.exists():
        read_checkpoint(final)  # a corrupt file is an error, not a silent reuse
        log.info("reusing %s (same config and code)", final)
        return final
    out.mkdir(parents=True, exist_ok=True)
    if same and last.exists():
        log.info("resuming %s from step %d", out, read_checkpoint(last)["step"])
        return train(None, out, device=device, resume=True, data_dir=data_dir, progress=progress)
    for stale in (final, last):
        stale.unlink(missing_ok=True)
    atomic_write(stamp_path, lambda f: f.write(json.dumps(want, indent=1).encode()))
    return train(cfg, out, device=device, data_dir=data_dir, progress=progress)


@dataclass(frozen=True)
class Stage:
    """One step of the study: a name, a group (for ``only``), the folder it writes into (relative to the run
    folder) and its job (a typed :mod:`suite.evaluate` job, run by :func:`suite.evaluate.run_job`)."""

    name: str
    group: str
    job: Any
    subdir: str = ""


@dataclass(frozen=True)
class StudyPlan:
    """Sizes of the study; ``quick`` fits a 2-core CPU, ``cifar10-paper`` is for a GPU.

    The chain makes JEM-k expensive (JEM-10 with full gradients costs ~150x a bare PGD step per image), so
    the quick plan attacks fewer images the longer the chain (``n`` per defense group) and JEM-1/JEM-10 at
    fewer ε (``grids``: group -> norm -> ε, default the full grid);
    every row says what it attacked. Every headline attack on every defense uses the same protocol:
    PGD with ``steps`` steps, ``restarts`` restarts and ``eot`` gradient draws (1 for deterministic models),
    full gradients and BPDA through the chain, a cheap APGD-CE + APGD-DLR (``aa_steps``, where ``apgd_at`` says),
    transfer (``transfer_from``: the bare network, PGD-AT) and Boundary + Pointwise, then escalation on survivors;
    the per-example worst case over all of them is the headline. Convergence ladders (steps, EOT) at the middle ε run on the first
    ``n_conv`` images of each group (JEM-10: the norms in ``conv_norms_jem10``) and are reported beside it.

    Examples are one seeded random selection of the test split (``selection_seed``): every defense's examples are
    a prefix of the same permutation, so the smaller selections are shared by every larger one. At the middle ε of
    each norm every defense is attacked on ``n_mid`` examples (the decisive comparisons), elsewhere on ``n``.
    The survivors of every cheap attack at every ε > 0 of each defense's curve then meet the escalation ``rounds``
    (:func:`escalation_rounds`), the first repeated at most ``repeats`` times while a round still breaks something.
    """

    linf_eps: tuple[float, ...]
    l2_eps: tuple[float, ...]
    linf_mid: float
    l2_mid: float
    grids: dict[str, dict[str, tuple[float, ...]]]
    n: dict[str, int]
    n_conv: dict[str, int]
    conv_norms_jem10: tuple[str, ...]
    steps: int
    restarts: int
    eot: int
    eval_draws: int
    aa_steps: int
    conv_steps: tuple[int, ...]
    conv_eot: tuple[int, ...]
    conv_eot_steps: int
    conv_jem10: tuple[tuple[int, ...], tuple[int, ...]]
    blackbox_steps: int
    blackbox_ladder: tuple[int, ...]
    n_blackbox_ladder: dict[str, int]
    certify_n: int
    certify_examples: int
    extras_examples: int
    n_mid: dict[str, int]
    rounds: tuple[Round, ...]
    repeats: int = 1
    selection_seed: int = 0
    n_activity_candidates: int = 50  # examples whose PGD candidates (10 steps, against each JEM-k) are refined
    n_activity: int | None = None  # clean examples the activity is measured on (None: extras_examples)
    apgd_at: str = "every"  # the cheap APGD stage at every ε of a curve, at the middle ε only ("mid") or nowhere
    # ("none": the escalation's first round is APGD on the survivors anyway)
    transfer_from: tuple[str, ...] = ("bare-jem", "pgd-at")  # the transfer attacks' sources


PLANS: dict[str, StudyPlan] = {}  # filled below, once escalation_rounds is defined


def escalation_rounds(steps: int, eot: int, square_queries: int, square_eot: int, n_targets: int = 3,
                      pgd_steps: int | None = None, pgd_eot: int | None = None) -> tuple[Round, ...]:
    """The rounds every cell's survivors meet after the cheap attacks, in order: APGD-CE + APGD-DLR (AutoAttack-rand
    at 100 steps and EOT 20) with full gradients and BPDA, margin PGD, the energy-aimed PGD, APGD-T on the
    ``n_targets`` runner-up classes, PGD on the fixed-noise deployment, and Square on averaged queries. The three
    PGD rounds run ``pgd_steps`` steps at ``pgd_eot`` draws (default: ``steps`` and ``eot``, like APGD)."""
    pgd_steps, pgd_eot = pgd_steps or steps, pgd_eot or eot
    return (Round(AutoAttackSettings(version="rand", steps=steps, eot=eot), ("full", "bpda")),
            Round(AdaptiveSettings("margin-pgd", steps=pgd_steps, eot=pgd_eot)),
            Round(AdaptiveSettings("energy-pgd", steps=pgd_steps, eot=pgd_eot)),
            Round(AutoAttackSettings(attacks=("apgd-t",), steps=steps, eot=eot, n_targets=n_targets)),
            Round(AdaptiveSettings("fixed-noise-pgd", steps=pgd_steps)),
            Round(AdaptiveSettings("square-eot", n_queries=square_queries, eot=square_eot)))


PLANS.update({
    # fits a 2-core CPU in 20 min with training (measured from fresh clones: 23.3 min with 20-it rounds, 10 JEM-10 and
    # 20 activity examples; 20.7 min with 10-it rounds, 8 JEM-10, 10 activity; 20.6 min with APGD at the middle ε
    # only, APGD-T on the runner-up class only, activity on 250 clean images; then escalation at every ε, the PGD
    # rounds at 50 steps (EOT 1) and APGD's at EOT 3, no cheap APGD stage, transfer from the bare JEM only, activity
    # on 150): cheap headline attacks (PGD 20 steps) on small selections, the strength coming from escalation on
    # survivors; its report states the little power it has
    "quick": StudyPlan(linf_eps=(0.0, 0.05, 0.1, 0.5), l2_eps=(0.0, 1.0, 2.0, 6.0), linf_mid=0.1, l2_mid=2.0,
                       grids={"jem1": {"linf": (0.0, 0.1, 0.5), "l2": (0.0, 2.0, 6.0)},
                              "jem10": {"linf": (0.1, 0.5), "l2": (2.0, 6.0)}},
                       n={"bare": 50, "jem0": 50, "jem1": 20, "jem10": 5},
                       n_mid={"bare": 100, "jem0": 100, "jem1": 40, "jem10": 8},
                       n_conv={"bare": 20, "jem0": 10, "jem1": 5, "jem10": 2}, conv_norms_jem10=("linf",),
                       steps=20, restarts=1, eot=1, eval_draws=20, aa_steps=10, conv_steps=(10, 50),
                       conv_eot=(1, 5), conv_eot_steps=5, conv_jem10=((10,), (1, 5)),
                       blackbox_steps=12, blackbox_ladder=(100,),
                       n_blackbox_ladder={"bare": 10, "jem0": 10, "jem1": 5, "jem10": 3}, certify_n=500,
                       certify_examples=20, extras_examples=500, n_activity_candidates=10, n_activity=150,
                       apgd_at="none", transfer_from=("bare-jem",),
                       rounds=escalation_rounds(steps=10, eot=3, square_queries=100, square_eot=2, n_targets=1,
                                                pgd_steps=50, pgd_eot=1)),
    # the standard models (35 min of training + 35 of attacks on the machine of its first reference run)
    "standard": StudyPlan(linf_eps=(0.0, 0.02, 0.05, 0.1, 0.2, 0.5), l2_eps=(0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
                          linf_mid=0.1, l2_mid=2.0,
                          grids={"jem1": {"linf": (0.0, 0.02, 0.05, 0.1, 0.5), "l2": (0.0, 0.5, 1.0, 2.0, 8.0)},
                                 "jem10": {"linf": (0.02, 0.05, 0.1, 0.2), "l2": (0.5, 1.0, 2.0, 4.0)}},
                          n={"bare": 300, "jem0": 100, "jem1": 50, "jem10": 20},
                          n_mid={"bare": 500, "jem0": 500, "jem1": 200, "jem10": 100},
                          n_conv={"bare": 100, "jem0": 40, "jem1": 20, "jem10": 8}, conv_norms_jem10=("linf",),
                          steps=50, restarts=2, eot=1, eval_draws=20, aa_steps=20, conv_steps=(10, 50, 200),
                          conv_eot=(1, 5, 20), conv_eot_steps=5, conv_jem10=((10, 50, 100), (1, 5, 10)),
                          blackbox_steps=12, blackbox_ladder=(100,),
                          n_blackbox_ladder={"bare": 20, "jem0": 20, "jem1": 20, "jem10": 10}, certify_n=500,
                          certify_examples=50, extras_examples=1000,
                          rounds=escalation_rounds(steps=100, eot=20, square_queries=1000, square_eot=10)),
    "tiny": StudyPlan(linf_eps=(0.0, 0.1, 0.5), l2_eps=(0.0, 2.0), linf_mid=0.1, l2_mid=2.0,
                      grids={"jem10": {"linf": (0.1, 0.5), "l2": (2.0,)}},
                      n={"bare": 12, "jem0": 8, "jem1": 6, "jem10": 4}, n_mid={"bare": 12, "jem0": 8, "jem1": 6, "jem10": 4},
                      n_conv={"bare": 6, "jem0": 4, "jem1": 4, "jem10": 2},
                      conv_norms_jem10=("linf",), steps=5, restarts=2, eot=1, eval_draws=2, aa_steps=3,
                      conv_steps=(2, 5), conv_eot=(1, 2), conv_eot_steps=2, conv_jem10=((2, 5), (1, 2)),
                      blackbox_steps=2, blackbox_ladder=(4,), n_blackbox_ladder={"bare": 3, "jem0": 3, "jem1": 3, "jem10": 2},
                      certify_n=20, certify_examples=5, extras_examples=50, n_activity_candidates=4,
                      rounds=escalation_rounds(steps=3, eot=2, square_queries=10, square_eot=2)),
    "cifar10-paper": StudyPlan(linf_eps=(0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.5),
                               l2_eps=(0.0, 0.25, 0.5, 1.0, 2.0, 10.0), linf_mid=8 / 255, l2_mid=0.5,
                               grids={"jem10": {"linf": (2 / 255, 4 / 255, 8 / 255, 16 / 255),
                                                "l2": (0.25, 0.5, 1.0)}},
                               n={"bare": 10000, "jem0": 1000, "jem1": 1000, "jem10": 1000},
                               n_mid={"bare": 10000, "jem0": 1000, "jem1": 1000, "jem10": 1000},
                               n_conv={"bare": 500, "jem0": 200, "jem1": 200, "jem10": 100},
                               conv_norms_jem10=("linf", "l2"), steps=100, restarts=2, eot=20, eval_draws=20,
                               aa_steps=100, conv_steps=(10, 50, 200), conv_eot=(1, 5, 20), conv_eot_steps=50,
                               conv_jem10=((10, 50, 200), (1, 5, 20)), blackbox_steps=1000,
                               blackbox_ladder=(5000, 25000),
                               n_blackbox_ladder={"bare": 100, "jem0": 100, "jem1": 100, "jem10": 100},
                               certify_n=10000, certify_examples=500, extras_examples=10000,
                               rounds=escalation_rounds(steps=100, eot=20, square_queries=5000, square_eot=20)),
})


def curve(plan: StudyPlan, group: str, norm: str) -> tuple[float, ...]:
    """The ε a defense group is attacked at under ``norm``: its own grid where the plan gives one, else the norm's."""
    grid = plan.linf_eps if norm == "linf" else plan.l2_eps
    return plan.grids.get(group, {}).get(norm, grid)


def study_stages(plan: StudyPlan, ckpt: dict[str, Path]) -> list[Stage]:
    """The study's jobs, in order (every one resumable by itself: it skips rows that exist under their keys)."""
    ce, at, jem, ga = (str(ckpt[k]) for k in ("ce", "pgd-at", "jem", "gaussian-aug"))
    def chain(*steps: int) -> Chain:  # JEM-k as defined everywhere: the checkpoint's own sampler (default_refinement)
        return Chain(steps)

    groups = {"bare": ((ce, at), 0), "jem0": ((jem,), 0), "jem1": ((jem,), 1), "jem10": ((jem,), 10)}
    head = PGDSettings(steps=plan.steps, restarts=plan.restarts, eot=plan.eot, eval_draws=plan.eval_draws)
    aa = AutoAttackSettings(version="rand", steps=plan.aa_steps, eot=plan.eot, eval_draws=plan.eval_draws)
    mids = {"linf": plan.linf_mid, "l2": plan.l2_mid}

    def white(name: str, group: str, norm: str, eps: tuple[float, ...], attack: Any, *, n: int | None = None,
              modes: tuple[str, ...] = ("full", "bpda"), kind: str = "whitebox") -> list[Stage]:
        """The stage at ``eps`` (the middle ε split off on the larger shared selection, ``n_mid``)."""
        models, k = groups[group]
        mid = tuple(e for e in eps if same_eps(e, mids[norm]))
        rest = tuple(e for e in eps if not same_eps(e, mids[norm]))
        def job(e: tuple[float, ...], size: int) -> WhiteboxJob:
            return WhiteboxJob(models, (norm,), e, attack, chain(k), modes, n_examples=size, example_rule="random",
                               seed=plan.selection_seed)
        if n is not None or plan.n[group] == plan.n_mid[group]:
            return [Stage(name, kind, job(eps, n or plan.n[group]))]
        return ([Stage(name, kind, job(rest, plan.n[group]))] if rest else []) + \
               ([Stage(f"{name}-mid", kind, job(mid, plan.n_mid[group]))] if mid else [])

    st: list[Stage] = []
    # headline: the same protocol for every defense (JEM-10 at fewer ε; its BPDA at the middle ones)
    for norm in ("linf", "l2"):
        eps_of = {g: curve(plan, g, norm) for g in groups}
        st += [*white(f"pgd-{norm}-baselines", "bare", norm, eps_of["bare"], head),
               *white(f"pgd-{norm}-jem0", "jem0", norm, eps_of["jem0"], head),
               *white(f"pgd-{norm}-jem1", "jem1", norm, eps_of["jem1"], head),
               *white(f"pgd-{norm}-jem10-full", "jem10", norm, eps_of["jem10"], head, modes=("full",)),
               *white(f"pgd-{norm}-jem10-bpda", "jem10", norm, (mids[norm],), head, modes=("bpda",))]
    apgd = f"apgd-{plan.aa_steps}it"  # named by its budget: AutoAttack-rand's would be 100 it, EOT 20
    for norm, e in mids.items():
        for group in groups:  # the cheap APGD stage where apgd_at says (every ε, the middle one, or none)
            eps = tuple(x for x in curve(plan, group, norm)
                        if x > 0 and (plan.apgd_at == "every" or (plan.apgd_at == "mid" and same_eps(x, e))))
            st += white(f"{apgd}-{norm}-{group}", group, norm, eps, aa, modes=("full",), kind="apgd")
        for group in ("jem0", "jem1", "jem10"):
            for source, name in ((jem, "bare-jem"), (at, "pgd-at")):
                if name not in plan.transfer_from:
                    continue
                st += white(f"transfer-{norm}-{name}-{group}", group, norm, (e,),
                            TransferSettings(source, steps=plan.steps, restarts=plan.restarts,
                                             eval_draws=plan.eval_draws), modes=("full",), kind="transfer")
    # convergence evidence at the middle ε (Carlini et al.): robust accuracy vs steps and vs EOT draws
    for norm, e in mids.items():
        for group in groups:
            if group == "jem10" and norm not in plan.conv_norms_jem10:
                continue  # the full-gradient 10-step chain is too dear for both norms on a CPU budget
            ladder_steps, ladder_eot = (plan.conv_jem10 if group == "jem10" else (plan.conv_steps, plan.conv_eot))
            for steps in ladder_steps:
                st += white(f"conv-{norm}-{group}-steps{steps}", group, norm, (e,),
                            PGDSettings(steps=steps, restarts=1, eot=1, eval_draws=plan.eval_draws),
                            n=plan.n_conv[group], modes=("full",), kind="convergence")
            if group == "bare":
                continue  # a deterministic model: EOT is 1 whatever is asked
            for eot in ladder_eot:
                st += white(f"conv-{norm}-{group}-eot{eot}", group, norm, (e,),
                            PGDSettings(steps=plan.conv_eot_steps, restarts=1, eot=eot, eval_draws=plan.eval_draws),
                            n=plan.n_conv[group], modes=("full",), kind="convergence")
    for name in ("boundary", "pointwise"):
        init = {"boundary": 10, "pointwise": 20}[name]
        for group in groups:  # on the middle ε's selection, so they count in its worst case
            models, k = groups[group]
            cfg = BlackboxConfig(name, steps=plan.blackbox_steps, init_steps=init)
            st.append(Stage(f"blackbox-{name}-{group}", "blackbox",
                            BlackboxJob(models, cfg, chain(k), n_examples=plan.n_mid[group], example_rule="random",
                                        seed=plan.selection_seed)))
    # is Boundary converged? median distance against steps on a few images of every defense
    for group in groups:
        models, k = groups[group]
        for steps in (plan.blackbox_steps, *plan.blackbox_ladder):
            cfg = BlackboxConfig("boundary", steps=steps, init_steps=10)
            st.append(Stage(f"blackbox-ladder-{group}-steps{steps}", "blackbox",
                            BlackboxJob(models, cfg, chain(k), n_examples=plan.n_blackbox_ladder[group],
                                        example_rule="random", seed=plan.selection_seed)))
    # escalation on survivors at every ε > 0 of each curve, after every cheaper attack (black-box included) has had
    # its say
    for norm in mids:
        for group in groups:
            models, k = groups[group]
            eps = tuple(x for x in curve(plan, group, norm) if x > 0)
            st.append(Stage(f"escalate-{norm}-{group}", "escalation",
                            EscalationJob(models, (norm,), eps, plan.rounds, chain(k), repeats=plan.repeats)))
    st += [
        Stage("distal", "distal", DistalJob((ce, at, jem), chain=chain(0, 1))),
        Stage("calibrate", "extras", CalibrationJob((ce, at, jem), chain=chain(0, 1),
                                                    n_examples=plan.extras_examples)),
        Stage("ood", "extras", OODJob((ce, at, jem), n_examples=plan.extras_examples)),
        Stage("sample", "extras", SampleJob(jem, n=4), subdir="samples"),
        Stage("health", "extras", HealthJob(jem, judge=ce), subdir="health"),
        Stage("activity", "extras", ActivityJob((jem,), chain=chain(1, 10),
                                                n_examples=plan.n_activity or plan.extras_examples,
                                                candidates=tuple(mids.items()), n_candidates=plan.n_activity_candidates)),
        Stage("certify", "extras", CertifyJob(ga, n=plan.certify_n, n_examples=plan.certify_examples,
                                              attack_radii=(0.25,), attack_steps=5, forward_draws=4)),
    ]
    return st


def run_study(preset: str = "quick", dataset: str | None = None, name: str | None = None,
              device: torch.device | str = "cpu", data_dir: str | None = None, results_dir: Path = Path("results"),
              runs_dir: Path = Path("runs"), progress: bool = True, only: tuple[str, ...] = ()) -> Path:
    """Run the study for ``preset`` and return its results directory.

    Every stage's job runs each time; it skips the rows that exist under their current keys (which include
    the code that computes them), so a finished stage costs seconds and a stage interrupted midway resumes
    from its last finished row or batch. ``RUN/stages.jsonl`` records each stage's job and wall time. The log
    goes to ``RUN/log.txt`` as well.
    """
    if preset not in PLANS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PLANS)}")
    dataset = dataset or ("cifar10" if preset == "cifar10-paper" else "fashion-mnist")
    device = torch.device(device)
    run_dir = results_dir / (name or f"{preset}-{dataset}")
    planned = {str(study_model_dir(runs_dir, preset, dataset, o) / "final.pt") for o in STUDY_OBJECTIVES}
    others = {r["checkpoint"] for r in read_rows(run_dir / ROWS) if r.get("checkpoint")} - planned
    if others:  # before training and before writing anything
        raise UserError(f"{run_dir} holds rows of other checkpoints ({sorted(others)[0]} ...: another run's "
                        f"results); pass --name NEW to start a new run directory, or remove it")
    with logging_into(run_dir):
        return _run_study(preset, dataset, run_dir, device, data_dir, runs_dir, progress, only)


@contextlib.contextmanager
def logging_into(run_dir: Path) -> Iterator[None]:
    """Copy the log into ``RUN/log.txt`` (created with its folder) while the block runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def planned_cost(preset: str, dataset: str, runs_dir: Path, done: int, results_dir: Path = Path("results")) -> str:
    """One line before the study starts: what it will run, and what the committed reference run of this preset
    took (its ``stages.jsonl``), when there is one."""
    planned = {o: study_model_dir(runs_dir, preset, dataset, o) / "final.pt" for o in STUDY_OBJECTIVES}
    n_stages = len(study_stages(PLANS[preset], planned))
    line = (f"study {preset} on {dataset}: {len(STUDY_OBJECTIVES)} models (trained unless a finished run of the same "
            f"config and code is there), then {n_stages} stages ({done} stages and trainings already logged here)")
    ref = results_dir / f"reference-{preset}-{dataset}" / "stages.jsonl"
    if ref.is_file():
        wall = sum(float(r.get("wall_s", 0)) for r in read_rows(ref))
        line += f"; the reference run of this preset took {wall / 60:.0f} min ({ref})"
    return line


def run_stages(stages: list[Stage], run_dir: Path, *, device: torch.device, data_dir: str | None, progress: bool,
               only: tuple[str, ...] = (), kept: str = "") -> None:
    """Run ``stages`` in order into ``run_dir`` (each skips the rows it already wrote) and log each stage's job and
    wall time in ``RUN/stages.jsonl`` once. ``only``: run the stages of these groups alone. An interruption says
    what is kept (``kept`` first, then the finished stages)."""
    stage_log = run_dir / "stages.jsonl"
    logged = {(r["stage"], json.dumps(r.get("job"), sort_keys=True)) for r in read_rows(stage_log)}
    for stage in tqdm(stages, desc="study", unit="stage", disable=not progress):
        if only and stage.group not in only:
            continue
        record = job_record(stage.job)
        log.info("stage %s: %s", stage.name, json.dumps(record))
        t = time.perf_counter()
        try:
            run_job(stage.job, run_dir / stage.subdir if stage.subdir else run_dir, device=device, data_dir=data_dir,
                    progress=progress)
        except Interrupted as stop:
            raise Interrupted(f"{kept}{stages.index(stage)} of {len(stages)} stages of {run_dir}; "
                              f"in stage {stage.name}: {stop.kept}") from None
        wall = round(time.perf_counter() - t, 2)
        if (stage.name, json.dumps(record, sort_keys=True)) not in logged:
            append_row(stage_log, {"stage": stage.name, "job": record, "status": "done", "wall_s": wall})


@dataclass(frozen=True)
class Trained:
    """A model a study trained or reused: its checkpoint and its training as first logged (config, code hash, wall
    time of the training itself, not of a later reuse)."""

    checkpoint: Path
    config: dict[str, Any]
    code: str
    wall_s: float


def train_models(objectives: Sequence[str], preset: str, dataset: str, runs_dir: Path, run_dir: Path,
                 device: torch.device, data_dir: str | None, progress: bool) -> dict[str, Trained]:
    """Train or reuse (:func:`train_or_reuse`) the model of each objective of ``preset`` in the shared
    ``runs/PRESET-DATASET/OBJECTIVE`` folders; log a ``train-OBJECTIVE`` stage (its config, code and wall time) in
    ``run_dir/stages.jsonl`` the first time it is done. Returns each objective's :class:`Trained`."""
    stage_log = run_dir / "stages.jsonl"
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for r in read_rows(stage_log):
        first.setdefault((r["stage"], json.dumps(r.get("job"), sort_keys=True)), r)
    models = {}
    for objective in objectives:
        t = time.perf_counter()
        cfg = preset_config(preset, objective, dataset)
        path = train_or_reuse(cfg, study_model_dir(runs_dir, preset, dataset, objective), device, data_dir, progress)
        record = {"train": cfg.to_dict(), "code": code_hash()}
        key = (f"train-{objective}", json.dumps(record, sort_keys=True))
        if key not in first:
            first[key] = {"stage": key[0], "job": record, "status": "done",
                          "wall_s": round(time.perf_counter() - t, 2), "checkpoint": str(path)}
            append_row(stage_log, first[key])
        models[objective] = Trained(path, record["train"], record["code"], float(first[key]["wall_s"]))
    return models


def _run_study(preset: str, dataset: str, run_dir: Path, device: torch.device, data_dir: str | None,
               runs_dir: Path, progress: bool, only: tuple[str, ...]) -> Path:
    t0 = time.perf_counter()
    log.info(planned_cost(preset, dataset, runs_dir, len(read_rows(run_dir / "stages.jsonl"))))
    trained = train_models(STUDY_OBJECTIVES, preset, dataset, runs_dir, run_dir, device, data_dir, progress)
    models = {o: m.checkpoint for o, m in trained.items()}
    refuse_foreign_rows(run_dir, list(models.values()),
                        hint="pass --name NEW to start a new run directory, or remove it")
    run_stages(study_stages(PLANS[preset], models), run_dir, device=device, data_dir=data_dir, progress=progress,
               only=only, kept="the trained models and ")
    plan = PLANS[preset]
    write_report(run_dir, preset=preset, dataset=dataset, device=str(device),
                 checkpoints={k: str(v) for k, v in models.items()}, mids={"linf": plan.linf_mid, "l2": plan.l2_mid})
    log.info("study finished in %.0f s: %s", time.perf_counter() - t0, run_dir / "report.md")
    return run_dir
