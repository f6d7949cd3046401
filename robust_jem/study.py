"""The whole study behind ``./run_all.sh``: train (or reuse) the models, attack them, write the report.

Every stage is resumable: trained models are reused when their config and the training code match,
interrupted trainings resume from ``last.pt``, and attack sweeps skip rows already in ``rows.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_write, read_checkpoint
from .config import TrainConfig, preset_config
from .errors import UserError
from .train import train

log = logging.getLogger(__name__)

STUDY_OBJECTIVES = ("ce", "pgd-at", "jem", "gaussian-aug")
_CODE_FILES = ("config.py", "data.py", "model.py", "nets.py", "sgld.py", "train.py", "checkpoint.py")


def code_hash() -> str:
    """Hash of the source files that determine a trained model."""
    h = hashlib.sha256()
    here = Path(__file__).parent
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
    """One command of the study: a name, the CLI arguments (``--out RUN`` is appended), and a group."""

    name: str
    args: tuple[str, ...]
    group: str


def _fmt(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclass(frozen=True)
class StudyPlan:
    """Sizes of the study; ``quick`` fits a 2-core CPU, ``cifar10-paper`` is for a GPU.

    ``n_*`` are numbers of test images (the first N): bare baselines, JEM-0, JEM-1, JEM-10, AutoAttack,
    black-box. The chain makes JEM-k expensive (JEM-10 with full gradients costs ~100x a bare PGD step per
    image), so the quick plan attacks fewer images the longer the chain, and says so in every row.
    """

    linf_eps: tuple[float, ...]
    l2_eps: tuple[float, ...]
    linf_mid: float
    l2_mid: float
    n_bare: int
    n_jem0: int
    n_jem1: int
    n_jem10: int
    n_autoattack: int
    n_blackbox: int
    aa_steps: int
    aa_eot: int
    eval_draws: int
    blackbox_steps: int
    certify_n: int
    certify_examples: int
    extras_examples: int


PLANS = {
    "quick": StudyPlan(linf_eps=(0.0, 0.05, 0.1, 0.2, 0.5), l2_eps=(0.0, 1.0, 2.0, 6.0), linf_mid=0.1, l2_mid=2.0,
                       n_bare=200, n_jem0=100, n_jem1=50, n_jem10=50, n_autoattack=50, n_blackbox=50, aa_steps=20,
                       aa_eot=2, eval_draws=3, blackbox_steps=12, certify_n=500, certify_examples=20,
                       extras_examples=500),
    "tiny": StudyPlan(linf_eps=(0.0, 0.1, 0.5), l2_eps=(0.0, 2.0), linf_mid=0.1, l2_mid=2.0, n_bare=20, n_jem0=10,
                      n_jem1=8, n_jem10=4, n_autoattack=8, n_blackbox=6, aa_steps=5, aa_eot=2, eval_draws=2,
                      blackbox_steps=2, certify_n=20, certify_examples=5, extras_examples=50),
    "cifar10-paper": StudyPlan(linf_eps=(0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.5),
                               l2_eps=(0.0, 0.25, 0.5, 1.0, 2.0, 10.0), linf_mid=8 / 255, l2_mid=0.5, n_bare=10000,
                               n_jem0=1000, n_jem1=1000, n_jem10=1000, n_autoattack=1000, n_blackbox=500,
                               aa_steps=100, aa_eot=20, eval_draws=5, blackbox_steps=1000, certify_n=10000,
                               certify_examples=500, extras_examples=10000),
}


def study_stages(plan: StudyPlan, ckpt: dict[str, Path]) -> list[Stage]:
    """The study's commands, in order (every one resumable by itself)."""
    ce, at, jem, ga = (str(ckpt[k]) for k in ("ce", "pgd-at", "jem", "gaussian-aug"))
    base = ("--checkpoint", ce, "--checkpoint", at)
    common = ("--eval-draws", str(plan.eval_draws), "--no-progress")

    def pgd(name: str, models: tuple[str, ...], norm: str, eps, n: int, *extra: str, group: str = "whitebox"):
        return Stage(name, ("pgd", *models, "--norm", norm, "--eps", _fmt(eps), "--n-examples", str(n), *extra,
                            *common), group)

    def jem_k(k: str, modes: str = "full,bpda") -> tuple[str, ...]:
        return ("--checkpoint", jem, "--sgld-steps", k, "--grad-mode", modes)

    st: list[Stage] = []
    for norm, grid, mid in (("linf", plan.linf_eps, plan.linf_mid), ("l2", plan.l2_eps, plan.l2_mid)):
        st += [pgd(f"pgd-{norm}-baselines", base, norm, grid, plan.n_bare),
               pgd(f"pgd-{norm}-jem0", jem_k("0"), norm, grid, plan.n_jem0),
               pgd(f"pgd-{norm}-jem1", jem_k("1"), norm, grid, plan.n_jem1)]
    # JEM-10: full gradients at the middle and the largest L-inf budget, BPDA and L2 at the middle one.
    st += [pgd("pgd-linf-jem10-full", jem_k("10", "full"), "linf", (plan.linf_mid, plan.linf_eps[-1]), plan.n_jem10),
           pgd("pgd-linf-jem10-bpda", jem_k("10", "bpda"), "linf", (plan.linf_mid,), plan.n_jem10),
           pgd("pgd-l2-jem10-full", jem_k("10", "full"), "l2", (plan.l2_mid,), plan.n_jem10)]
    # Carlini et al. spot checks at the middle L-inf budget: 4x steps, 2x EOT.
    mid = (plan.linf_mid,)
    st += [pgd("pgd-linf-steps-x4", base, "linf", mid, plan.n_bare, "--steps", "40", group="checks"),
           pgd("pgd-linf-steps-x4-jem0", jem_k("0"), "linf", mid, plan.n_jem0, "--steps", "40", group="checks"),
           pgd("pgd-linf-steps-x4-jem1", jem_k("1", "full"), "linf", mid, plan.n_jem1, "--steps", "40",
               group="checks"),
           pgd("pgd-linf-eot-x2-jem1", jem_k("1", "full"), "linf", mid, plan.n_jem1, "--eot", "2", group="checks")]
    for norm, e in (("linf", plan.linf_mid), ("l2", plan.l2_mid)):
        st.append(Stage(f"autoattack-{norm}", ("autoattack", *base, "--checkpoint", jem, "--sgld-steps", "0",
                                               "--version", "rand", "--steps", str(plan.aa_steps), "--eot",
                                               str(plan.aa_eot), "--norm", norm, "--eps", _fmt((e,)),
                                               "--n-examples", str(plan.n_autoattack), *common), "autoattack"))
    for attack in ("boundary", "pointwise"):
        st.append(Stage(f"blackbox-{attack}", ("blackbox", "--attack", attack, *base, "--checkpoint", jem,
                                               "--sgld-steps", "0,1,10", "--n-examples", str(plan.n_blackbox),
                                               "--steps", str(plan.blackbox_steps), "--no-progress"), "blackbox"))
    st += [
        Stage("distal", ("distal", *base, "--checkpoint", jem, "--sgld-steps", "0,1", "--no-progress"), "distal"),
        Stage("calibrate", ("calibrate", *base, "--checkpoint", jem, "--sgld-steps", "0,1", "--n-examples",
                            str(plan.extras_examples)), "extras"),
        Stage("ood", ("ood", *base, "--checkpoint", jem, "--n-examples", str(plan.extras_examples)), "extras"),
        Stage("sample", ("sample", "--checkpoint", jem, "--n", "4"), "extras"),
        Stage("certify", ("certify", "--checkpoint", ga, "--n", str(plan.certify_n), "--n-examples",
                          str(plan.certify_examples), "--attack-radii", "0.25", "--attack-steps", "5",
                          "--eot-draws", "4"), "extras"),
    ]
    return st


def run_stage(stage: Stage, run_dir: Path, device: torch.device, data_dir: str | None = None) -> None:
    """Run one CLI command in-process with ``--out`` pointing into the run directory."""
    from .cli import cli

    out = run_dir / "samples" if stage.name == "sample" else run_dir
    argv = [*stage.args, "--device", str(device), "--out", str(out)]
    if data_dir:
        argv += ["--data-dir", data_dir]
    cli.main(args=argv, prog_name="robust-jem", standalone_mode=False)


def run_study(preset: str = "quick", dataset: str | None = None, name: str | None = None,
              device: torch.device | str = "cpu", data_dir: str | None = None, results_dir: Path = Path("results"),
              runs_dir: Path = Path("runs"), progress: bool = True, only: tuple[str, ...] = ()) -> Path:
    """Run the study for ``preset`` and return its results directory.

    Stages already recorded as done in ``RUN/stages.jsonl`` with the same arguments are skipped; a stage
    interrupted midway is re-run, and its command skips the rows it had finished. The log goes to
    ``RUN/log.txt`` as well.
    """
    if preset not in PLANS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PLANS)}")
    dataset = dataset or ("cifar10" if preset == "cifar10-paper" else "fashion-mnist")
    device = torch.device(device)
    run_dir = results_dir / (name or f"{preset}-{dataset}")
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        return _run_study(preset, dataset, run_dir, device, data_dir, runs_dir, progress, only)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _check_same_checkpoints(run_dir: Path, models: dict[str, Path]) -> None:
    """Refuse to resume a run directory whose rows were computed on other checkpoints: its finished stages
    would be skipped and the report would mix two runs."""
    from attacks.provenance import file_sha256
    from attacks.records import read_rows

    ours = {file_sha256(p) for p in models.values()}
    foreign = {r["checkpoint_sha256"] for r in read_rows(run_dir / "rows.jsonl")
               if r.get("checkpoint_sha256") and r["checkpoint_sha256"] not in ours}
    if foreign:
        raise UserError(f"{run_dir} holds rows of {len(foreign)} other checkpoint(s) (another run's results); "
                        f"pass --name NEW to start a new run directory, or remove it")


def _run_study(preset: str, dataset: str, run_dir: Path, device: torch.device, data_dir: str | None,
               runs_dir: Path, progress: bool, only: tuple[str, ...]) -> Path:
    from attacks.records import append_row, read_rows
    from attacks.report import write_report

    t0 = time.perf_counter()
    stage_log = run_dir / "stages.jsonl"
    done = {(r["stage"], tuple(r["args"])) for r in read_rows(stage_log) if r.get("status") == "done"}
    models = {}
    for objective in STUDY_OBJECTIVES:
        t = time.perf_counter()
        cfg = preset_config(preset, objective, dataset)
        models[objective] = train_or_reuse(cfg, runs_dir / f"{preset}-{dataset}" / objective, device, data_dir,
                                           progress)
        args = ["train", "--preset", preset, "--objective", objective, "--dataset", dataset]
        if (f"train-{objective}", tuple(args)) not in done:
            append_row(stage_log, {"stage": f"train-{objective}", "args": args, "status": "done",
                                   "wall_s": round(time.perf_counter() - t, 2), "checkpoint": str(models[objective])})
    _check_same_checkpoints(run_dir, models)
    stages = study_stages(PLANS[preset], models)
    for stage in tqdm(stages, desc="study", unit="stage", disable=not progress):
        if only and stage.group not in only:
            continue
        if (stage.name, stage.args) in done:
            log.info("stage %s already done", stage.name)
            continue
        log.info("stage %s: robust-jem %s", stage.name, " ".join(stage.args))
        t = time.perf_counter()
        run_stage(stage, run_dir, device, data_dir)
        append_row(stage_log, {"stage": stage.name, "args": list(stage.args), "status": "done",
                               "wall_s": round(time.perf_counter() - t, 2)})
    plan = PLANS[preset]
    write_report(run_dir, preset=preset, dataset=dataset, device=str(device),
                 checkpoints={k: str(v) for k, v in models.items()}, mids={"linf": plan.linf_mid, "l2": plan.l2_mid})
    log.info("study finished in %.0f s: %s", time.perf_counter() - t0, run_dir / "report.md")
    return run_dir
