"""Command line: parse -> a typed job -> one library call (:mod:`suite.evaluate`, :mod:`suite.study`,
:func:`robust_jem.train.train`). Bad input is one line on stderr and exit code 2. The only module that imports
click."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

# Only torch-free modules at import time: --help, --version and argument errors answer before torch loads.
from attacks.common import EVAL_DRAWS, parse_eps
from infra.errors import InputError
from infra.interrupt import Interrupted
from robust_jem.config import OBJECTIVES, PRESETS
from robust_jem.errors import TrainingDiverged, UserError

log = logging.getLogger("robust_jem")


# ------------------------------------------------------------------------------------------------
# shared option types
# ------------------------------------------------------------------------------------------------
class EpsList(click.ParamType):
    """ε values: fractions, decimals, comma lists (``8/255``, ``0.03``, ``0,4/255,8/255``)."""

    name = "eps"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[float]:
        if isinstance(value, list):
            return value
        try:
            return parse_eps(value)
        except InputError as exc:
            self.fail(str(exc), param, ctx)


class Fraction1(EpsList):
    """One non-negative number, fractions allowed (``2/255``)."""

    name = "number"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:  # type: ignore[override]
        if isinstance(value, (int, float)):
            return float(value)
        vals = super().convert(value, param, ctx)
        if len(vals) != 1:
            self.fail(f"expected one number, got {value!r}", param, ctx)
        return vals[0]


class IntList(click.ParamType):
    """Comma list of non-negative integers (``0,1,10``)."""

    name = "ints"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            out = [int(v) for v in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a comma list of integers", param, ctx)
        if any(v < 0 for v in out):
            self.fail(f"{value!r} has a negative value", param, ctx)
        return out


class ChoiceList(click.ParamType):
    """Comma list drawn from fixed choices (``full,bpda``)."""

    name = "list"

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def convert(self, value: Any, param: Any, ctx: Any) -> list[str]:
        if isinstance(value, list):
            return value
        out = [v.strip() for v in str(value).split(",")]
        bad = [v for v in out if v not in self.choices]
        if bad:
            self.fail(f"unknown {', '.join(map(repr, bad))}; choose from {', '.join(self.choices)}", param, ctx)
        return out


class EotCount(click.ParamType):
    """``auto`` or a positive integer."""

    name = "auto|N"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if value == "auto" or isinstance(value, int):
            return value
        try:
            n = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither auto nor a positive integer", param, ctx)
        if n < 1:
            self.fail(f"{value!r} must be at least 1", param, ctx)
        return n


EPS = EpsList()
NUMBER = Fraction1()
INTS = IntList()


def resolve_device(name: str):
    """``auto`` -> cuda when available else cpu; validates explicit names."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but CUDA is not available")
    return device


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
# Commands that spread their work over torchrun ranks; every other command refuses to run under torchrun
# (N copies of it would write the same files).
DISTRIBUTED_COMMANDS = ("train", "pgd", "autoattack", "blackbox")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="robust-jem", prog_name="robust-jem")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """robust-jem: train JEM and its baselines, then attack them honestly."""
    setup_logging(verbose)
    command = ctx.invoked_subcommand
    if command in DISTRIBUTED_COMMANDS or os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        return  # not under torchrun (checked without importing torch, which --help must not wait for)
    from robust_jem.distributed import env_rank

    if command and env_rank().enabled:
        raise UserError(f"'{command}' runs in one process; under torchrun use one of "
                        f"{', '.join(DISTRIBUTED_COMMANDS)}")


@cli.command("data-check")
@click.option("--dataset", default="fashion-mnist", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
def data_check(dataset: str, data_dir: str | None) -> None:
    """Check that a data set can be loaded; print its size."""
    from robust_jem.data import load_dataset

    for split in ("train", "test"):
        ds = load_dataset(dataset, split, data_dir)
        click.echo(f"{dataset} {split}: {len(ds)} images {'x'.join(map(str, ds.shape))}, {len(ds.classes)} classes")


@cli.command()
@click.option("--objective", type=click.Choice(list(OBJECTIVES)), default="jem",
              show_default=True)
@click.option("--dataset", type=click.Choice(["fashion-mnist", "cifar10", "cifar100", "svhn"]),
              default="fashion-mnist", show_default=True)
@click.option("--preset", type=click.Choice(list(PRESETS)), default="quick", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory [runs/PRESET-OBJECTIVE].")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its last.pt (its config wins).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=None)
@click.option("--iters", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--warmup-iters", type=int, default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option("--decay-at", type=INTS, default=None, help="Iterations at which the lr is multiplied by --decay-rate.")
@click.option("--decay-rate", type=float, default=None)
@click.option("--data-noise", type=float, default=None, help="Gaussian std added to data ([-1,1] space).")
@click.option("--px-weight", type=float, default=None, help="Weight of the log p(x) term (JEM).")
@click.option("--energy-l2", type=float, default=None, help="L2 penalty on data and sample energies (JEM).")
@click.option("--ce-warmup-iters", type=int, default=None, help="JEM: CE-only warm start steps.")
@click.option("--ce-warmup-lr", type=float, default=None)
@click.option("--sgld-steps", type=int, default=None)
@click.option("--sgld-step-size", type=float, default=None)
@click.option("--sgld-noise", type=float, default=None)
@click.option("--buffer-size", "sgld_buffer_size", type=int, default=None)
@click.option("--reinit-freq", "sgld_reinit_freq", type=float, default=None)
@click.option("--sgld-init", type=click.Choice(["uniform", "gaussian", "class-gaussian"]), default=None,
              help="Replay-buffer init and re-init: U(-1,1) (the paper) or Gaussians fitted to the training set "
                   "(one, or one per class: JEM++'s informative init).")
@click.option("--sgld-grad-clip", type=float, default=None, help="Clip each chain's energy gradient norm (0: off).")
@click.option("--sgld-clamp/--no-sgld-clamp", "sgld_clamp", default=None,
              help="Keep training chains in the data domain [-1,1] (quick preset: on; reference: off).")
@click.option("--pgd-eps", type=NUMBER, default=None, help="PGD-AT L∞ ε (fractions allowed).")
@click.option("--pgd-steps", type=int, default=None)
@click.option("--pgd-step-size", type=NUMBER, default=None)
@click.option("--sigma", type=float, default=None, help="Gaussian augmentation std (gaussian-aug).")
@click.option("--arch", "model_arch", type=click.Choice(["small", "wrn"]), default=None)
@click.option("--depth", "model_depth", type=int, default=None)
@click.option("--width", "model_width", type=int, default=None)
@click.option("--save-every", "save_every_s", type=float, default=None, help="Seconds between last.pt refreshes.")
@click.option("--log-every", type=int, default=None)
@click.option("--max-retries", type=int, default=None, help="Divergence roll-backs before giving up.")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast.")
@click.option("--channels-last/--no-channels-last", default=None)
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model.")
@click.option("--fused-adam/--no-fused-adam", default=None, help="torch's fused Adam kernel [on].")
@click.option("--prefetch/--no-prefetch", default=None,
              help="Gather the next batch on a background thread; pinned memory + side-stream copy on CUDA [on].")
@click.option("--no-progress", is_flag=True)
def train(objective: str, dataset: str, preset: str, out: str | None, resume_dir: str | None, data_dir: str | None,
          device: str, no_progress: bool, compile_: bool | None, **overrides: Any) -> None:
    """Train a JEM, plain CE, PGD-AT or Gaussian-augmented classifier.

    Under torchrun (`torchrun --nproc-per-node N -m robust_jem train ...`) this is DDP training: --batch-size
    is the global batch (each rank trains on batch/N), the replay buffer is sharded over ranks, rank 0 writes.
    """
    from robust_jem.config import preset_config
    from robust_jem.distributed import launch
    from robust_jem.errors import AnotherRun
    from robust_jem.train import train as run_train

    dev = resolve_device(device)
    cfg = None if resume_dir else preset_config(preset, objective, dataset, compile=compile_, **overrides)
    out_dir = Path(resume_dir or out or f"runs/{preset}-{objective}")
    try:
        with launch(dev) as (dist, dev):
            path = run_train(cfg, out_dir, device=dev, resume=cfg is None, data_dir=data_dir,
                             progress=not no_progress, dist=dist)
    except Interrupted as stop:  # the library says what it kept; the command line says how to go on
        raise Interrupted(f"{stop.kept}; continue with: robust-jem train --resume {out_dir}") from None
    except AnotherRun as exc:
        raise UserError(f"{exc}: resume it with robust-jem train --resume {out_dir}, or pass another --out") from None
    if dist.is_main:
        click.echo(str(path))


@cli.command("import-jem")
@click.argument("src", type=click.Path(dir_okay=False))
@click.option("--out", "dst", type=click.Path(dir_okay=False), required=True, help="Native checkpoint to write.")
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "svhn"]), default="cifar10", show_default=True,
              help="What the official model was trained on.")
@click.option("--unconditional", is_flag=True,
              help="The file holds the official unconditional F (--uncond): its energy head becomes one logit.")
def import_jem(src: str, dst: str, dataset: str, unconditional: bool) -> None:
    """Import a checkpoint written by the official JEM code (wgrathwohl/JEM) or by JEM++ (sndnyang/JEMPP: its YOPO
    WRN, BatchNorm models run in eval mode and labelled [BN eval]) as a native checkpoint: model_state_dict +
    replay_buffer; depth, width, normalisation and classes inferred from the tensors, the replay buffer kept."""
    from robust_jem.official import import_official

    click.echo(str(import_official(src, dst, dataset=dataset, unconditional=unconditional)))


@cli.command()
@click.option("--preset", type=click.Choice(list(PRESETS)), default="quick", show_default=True)
@click.option("--dataset", type=click.Choice(["fashion-mnist", "cifar10", "cifar100", "svhn"]), default=None,
              help="Default: cifar10 for cifar10-paper, else fashion-mnist.")
@click.option("--name", default=None, help="Results folder name [PRESET-DATASET].")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
def study(preset: str, dataset: str | None, name: str | None, data_dir: str | None, device: str,
          no_progress: bool) -> None:
    """The whole study (what ./run_all.sh runs): train or reuse, attack, report."""
    from .study import run_study

    run_dir = run_study(preset, dataset, name, device=resolve_device(device), data_dir=data_dir,
                        progress=not no_progress)
    click.echo(str(run_dir))


# ------------------------------------------------------------------------------------------------
# calibration, OOD detection, samples, randomized smoothing (robust_jem.extras / robust_jem.sampling)
# ------------------------------------------------------------------------------------------------
_CKPTS = click.option("--checkpoint", "checkpoints", multiple=True, required=True,
                      type=click.Path(dir_okay=False), help="Checkpoint (repeat for several models).")
_POS = click.IntRange(min=1)


@cli.command()
@_CKPTS
@click.option("--sgld-steps", type=INTS, default="0", show_default=True,
              help="JEM-k refinement steps (comma list); non-JEM checkpoints are evaluated bare.")
@click.option("--bins", type=_POS, default=15, show_default=True, help="Equal-width confidence bins.")
@click.option("--n-examples", type=_POS, default=2000, show_default=True, help="First N test images.")
@click.option("--batch-size", type=_POS, default=250, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the JEM-k chains' noise.")
@click.option("--out", type=click.Path(file_okay=False), default="results/extras", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
def calibrate(checkpoints: tuple[str, ...], sgld_steps: list[int], bins: int, n_examples: int, batch_size: int,
              seed: int, out: str, data_dir: str | None, device: str) -> None:
    """ECE, NLL, Brier score and reliability diagrams (rows of kind "calibration")."""
    from .evaluate import CalibrationJob, calibrate as run
    from .targets import Chain

    job = CalibrationJob(tuple(checkpoints), Chain(tuple(sgld_steps)), bins=bins, n_examples=n_examples,
                         batch_size=batch_size, seed=seed)
    for r in run(job, out, device=resolve_device(device), data_dir=data_dir):
        click.echo(f"{r.model}: accuracy {r.accuracy:.4f}  ECE {r.ece:.4f}  NLL {r.nll:.4f}  Brier {r.brier:.4f}")
    click.echo(str(Path(out) / "rows.jsonl"))


@cli.command()
@_CKPTS
@click.option("--in", "in_set", type=click.Choice(["fashion-mnist", "cifar10", "cifar100", "svhn"]), default=None,
              help="In-distribution set [the checkpoint's].")
@click.option("--out-sets", type=ChoiceList(("uniform", "gaussian", "constant", "permuted", "flipped", "heldout",
                                             "svhn", "cifar10", "cifar100", "fashion-mnist")),
              default="uniform,gaussian,constant,permuted,flipped,svhn,cifar10,cifar100", show_default=True,
              help="OOD sets; unavailable ones are skipped with a message.")
@click.option("--n-examples", type=_POS, default=1000, show_default=True, help="Images per set.")
@click.option("--tpr", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True)
@click.option("--batch-size", type=_POS, default=250, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="results/extras", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
def ood(checkpoints: tuple[str, ...], in_set: str | None, out_sets: list[str], n_examples: int, tpr: float,
        batch_size: int, seed: int, out: str, data_dir: str | None, device: str) -> None:
    """OOD detection: AUROC / FPR@95%TPR of log p(x), max softmax and gradient norm (rows of kind "ood")."""
    from .evaluate import OODJob, ood as run

    job = OODJob(tuple(checkpoints), in_set=in_set, out_sets=tuple(out_sets), n_examples=n_examples, tpr=tpr,
                 batch_size=batch_size, seed=seed)
    summary = run(job, out, device=resolve_device(device), data_dir=data_dir)
    for label, m in summary["models"].items():
        for name, metrics in m["table"].items():
            click.echo(f"{label} vs {name}: " + "  ".join(f"{s} AUROC {v['auroc']:.3f}" for s, v in metrics.items()))
        for name in m["skipped"]:
            click.echo(f"{label} vs {name}: skipped")
    click.echo(str(Path(out) / "rows.jsonl"))


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--class", "classes", type=INTS, default=None, help="Classes for conditional chains [all].")
@click.option("--steps", type=click.IntRange(min=0), default=100, show_default=True, help="SGLD steps.")
@click.option("--n", type=_POS, default=5, show_default=True,
              help="Chains per class; unconditional chains = n x classes.")
@click.option("--init", type=click.Choice(["uniform", "buffer"]), default="uniform", show_default=True,
              help="Start fresh chains from U(-1,1) or from replay-buffer entries.")
@click.option("--step-size", type=click.FloatRange(min=0), default=None, help="[checkpoint's SGLD step size]")
@click.option("--noise", type=click.FloatRange(min=0), default=None, help="[checkpoint's SGLD noise]")
@click.option("--clamp/--no-clamp", default=None, help="Keep chains in [-1,1] [as the checkpoint was trained].")
@click.option("--n-data", type=_POS, default=500, show_default=True, help="Test images for the data energy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="results/samples", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
def sample(checkpoint: str, classes: list[int] | None, steps: int, n: int, init: str, step_size: float | None,
           noise: float | None, clamp: bool | None, n_data: int, seed: int, out: str, data_dir: str | None,
           device: str) -> None:
    """Unconditional and class-conditional SGLD samples and the replay buffer, as PNG grids, with energies."""
    from .evaluate import SampleJob, sample as run

    job = SampleJob(checkpoint, classes=tuple(classes) if classes else None, steps=steps, n=n, init=init,
                    step_size=step_size, noise=noise, clamp=clamp, n_data=n_data, seed=seed)
    s = run(job, out, device=resolve_device(device), data_dir=data_dir)
    click.echo(f"energy: data {s['data']['energy_mean']:.3f}, unconditional samples "
               f"{s['unconditional']['energy_mean']:.3f}, start {s['start']['energy_mean']:.3f}"
               + (f", buffer {s['buffer']['energy_mean']:.3f}" if "buffer" in s else ""))
    for grid in s["grids"].values():
        click.echo(grid)


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="The JEM checkpoint judged.")
@click.option("--judge", required=True, type=click.Path(dir_okay=False),
              help="An independently trained classifier on the same data (e.g. the CE baseline).")
@click.option("--n", type=_POS, default=2000, show_default=True, help="Buffer samples (and real images) judged.")
@click.option("--steps", type=click.IntRange(min=0), default=100, show_default=True,
              help="SGLD steps of the fresh class-conditional chains.")
@click.option("--per-class", type=_POS, default=20, show_default=True, help="Fresh conditional chains per class.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.9,
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="results/health", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
def health(checkpoint: str, judge: str, n: int, steps: int, per_class: int, threshold: float, seed: int, out: str,
           data_dir: str | None, device: str) -> None:
    """EBM health of a JEM: its buffer and fresh conditional samples judged by an independent classifier
    (confident fraction, agreement, Fréchet distance in the judge's logit space vs uniform noise and real)."""
    from .evaluate import HealthJob, ebm_health

    job = HealthJob(checkpoint, judge, n=n, steps=steps, per_class=per_class, threshold=threshold, seed=seed)
    r = ebm_health(job, out, device=resolve_device(device), data_dir=data_dir)
    click.echo(f"buffer: {100 * r.buffer_confident:.1f} % confident (>= {threshold:g}) by the judge "
               f"(real test images: {100 * r.real_confident:.1f} %), "
               f"{100 * r.buffer_agrees_with_jem:.1f} % agreeing with the JEM; conditional chains: "
               f"{100 * r.conditional_confident:.1f} % confident, {100 * r.conditional_hits_target:.1f} % on target")
    click.echo(f"Frechet distance to real test images in the judge's logits: buffer {r.fd_buffer_real:.1f}, "
               f"conditional {r.fd_conditional_real:.1f}, uniform noise {r.fd_uniform_real:.1f}, real vs real "
               f"{r.fd_real_real:.2f}; energy data {r.energy_data:.2f} vs buffer {r.energy_buffer:.2f}")
    click.echo(str(Path(out) / "rows.jsonl"))


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--sigma", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Noise std in [0,1] pixels [the gaussian-aug checkpoint's].")
@click.option("--n", type=_POS, default=1000, show_default=True, help="Estimation draws per image.")
@click.option("--n0", type=_POS, default=100, show_default=True, help="Selection draws per image.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.001,
              show_default=True)
@click.option("--n-examples", type=_POS, default=50, show_default=True, help="First N test images.")
@click.option("--radii", type=EPS, default="0,0.25,0.5,0.75,1", show_default=True, help="L2 radius grid.")
@click.option("--attack-radii", type=EPS, default="0.5", show_default=True,
              help="Radii (L2 ε) of the empirical EOT-PGD check; each costs N draws per image.")
@click.option("--attack-steps", type=click.IntRange(min=0), default=10, show_default=True,
              help="EOT L2 PGD steps of the empirical check (0: no attack).")
@click.option("--eot-draws", type=_POS, default=8, show_default=True, help="Noise draws per attack gradient.")
@click.option("--batch-size", type=_POS, default=500, show_default=True,
              help="Base-model batch while counting votes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="results/extras", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
def certify(checkpoint: str, sigma: float | None, n: int, n0: int, alpha: float, n_examples: int, radii: list[float],
            attack_radii: list[float], attack_steps: int, eot_draws: int, batch_size: int, seed: int, out: str,
            data_dir: str | None, device: str) -> None:
    """Randomized smoothing (Cohen et al. 2019): certified L2 accuracy beside empirical robust accuracy."""
    from .evaluate import CertifyJob, certify as run

    job = CertifyJob(checkpoint, sigma=sigma, n=n, n0=n0, alpha=alpha, n_examples=n_examples, radii=tuple(radii),
                     attack_radii=tuple(attack_radii), attack_steps=attack_steps, forward_draws=eot_draws,
                     batch_size=batch_size, seed=seed)
    for r in run(job, out, device=resolve_device(device), data_dir=data_dir):
        emp = r.empirical_robust_accuracy
        click.echo(f"radius {r.radius:g}: certified {r.certified_accuracy:.3f}"
                   + (f", empirical {emp:.3f}" if emp is not None else "")
                   + f"  (abstain {r.abstain_rate:.3f}, mean radius {r.extra.get('mean_radius', 0):.3f})")
    click.echo(str(Path(out) / "rows.jsonl"))


# ------------------------------------------------------------------------------------------------
# white-box suite: pgd, autoattack, plot (attacks.white / attacks.benchmark / attacks.plots)
# ------------------------------------------------------------------------------------------------
def _refinement_options() -> list[Any]:
    """The JEM-k chain settings every attack command takes; unset ones are the defense's definition (the
    checkpoint's own SGLD sampler, 5 chains, init noise 0.03: robust_jem.refined.default_refinement)."""
    return [
        click.option("--sgld-steps", type=INTS, default="0", show_default=True,
                     help="JEM-k refinement steps, comma list (JEM checkpoints only)."),
        click.option("--n-chains", type=click.IntRange(min=1), default=None,
                     help="Noisy copies per input, logits averaged (JEM only) [5]."),
        click.option("--init-noise", type=click.FloatRange(min=0), default=None,
                     help="Std of the noise added before the chain, in [-1,1] model space (JEM only) [0.03]."),
        click.option("--sgld-step-size", type=click.FloatRange(min=0), default=None,
                     help="SGLD step of the refinement [the checkpoint's own sampler step: 1 for the paper's JEM]."),
        click.option("--sgld-noise", type=click.FloatRange(min=0), default=None,
                     help="SGLD noise of the refinement [the checkpoint's own sampler noise: 0.01 for the paper's]."),
        click.option("--sgld-clamp/--no-sgld-clamp", default=None,
                     help="Keep the chains in [-1, 1] after every step (labelled [clamp]) [JEM-k: no, the paper's "
                          "refinement does not clamp; behind --purifier: as the purifier was trained]."),
        click.option("--purifier", type=click.Path(dir_okay=False), default=None,
                     help="An energy model trained without labels (train --objective ebm): every checkpoint is "
                          "evaluated behind its chain (--sgld-steps of the purifier's own sampler, clamp included, by default): "
                          "long-run EBM purification, labelled CE+EBM-k."),
    ]


def _study_models_by_default(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """No --checkpoint: the seed's command as typed attacks the latest study's CE, PGD-AT and JEM (found before
    torch is loaded, so an empty folder answers at once)."""
    if value:
        return value
    from .layout import find_study_models

    study_dir, models = find_study_models()
    log.info("no --checkpoint: attacking the models of the study in %s: %s", study_dir,
             ", ".join(f"{o} {p}" for o, p in models.items()))
    return tuple(str(p) for p in models.values())


def _whitebox_options(fn: Any) -> Any:
    """Options shared by ``pgd`` and ``autoattack``: models, chain, threat model, examples, output."""
    options = [
        click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False),
                     callback=_study_models_by_default,
                     help="Checkpoint to attack (repeat for several) [the CE, PGD-AT and JEM models of the latest "
                          "study in runs/]. JEM checkpoints are attacked as JEM-k for each --sgld-steps and "
                          "--grad-mode; CE / PGD-AT (any non-JEM) checkpoints are attacked once each as the bare "
                          "classifier (no chain, one copy, no noise), whatever --sgld-steps says."),
        click.option("--norm", "norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True,
                     help="Threat model (ε in [0,1] pixel units; L2 at most sqrt(C·H·W)); one per command, since "
                          "L∞ and L2 budgets differ by ~30x."),
        click.option("--eps", type=EPS, required=True,
                     help="ε in [0,1] pixel units: fractions, decimals, comma lists (8/255,0.1)."),
        *_refinement_options(),
        click.option("--grad-mode", "grad_modes", type=ChoiceList(("full", "bpda")), default="full",
                     show_default=True,
                     help="Attacker's gradient through the chain: full (backprop every SGLD step) and/or bpda "
                          "(chain = identity), comma list."),
        click.option("--bf16", is_flag=True,
                     help="Run the chain and the classifier under bf16 autocast (fp32 inputs and logits); the "
                          "rows say precision=bf16. Check it against fp32: bench/attack_precision.py."),
        click.option("--compile", "compile_", is_flag=True,
                     help="torch.compile the backbone (rows say compiled=true). Only with --grad-mode bpda or "
                          "--sgld-steps 0: the full-gradient chain needs double backward, which compile lacks."),
        click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Random restarts; an example is robust only if it survives all of them."),
        click.option("--eval-draws", type=click.IntRange(min=1), default=EVAL_DRAWS, show_default=True,
                     help="Fresh-noise draws for the final verdict (1 for deterministic models)."),
        click.option("--n-examples", type=click.IntRange(min=1), default=100, show_default=True,
                     help="Test images to attack (a JEM-10 row with full gradients costs about 0.5 s per image "
                          "and PGD step on 2 CPU cores)."),
        click.option("--examples", "example_rule", type=click.Choice(["first", "random"]), default="first",
                     show_default=True, help="Which N: the first N, or N drawn with --seed."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Images per attack call [256 bare, fewer for long chains]. Under torchrun the batches "
                          "are shared out over the ranks: a smaller batch spreads a short row wider."),
        click.option("--seed", type=int, default=0, show_default=True, help="Root of every attack / noise seed."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="Run directory [results/COMMAND-CHECKPOINTS-NORMS]; re-running skips finished rows."),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None),
        click.option("--check/--no-check", "check", default=True, show_default=True,
                     help="Re-attack the examples left standing with a larger budget (APGD with the DLR margin loss, "
                          "4x the steps, one more restart, EOT 20 on a randomized model) and report how many more "
                          "fell; --no-check for timing runs."),
        click.option("--no-progress", is_flag=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run_name(command: str, checkpoints: tuple[str, ...], norms: list[str]) -> Path:
    names = []
    for c in checkpoints:
        p = Path(c)
        names.append(p.parent.name if p.stem in ("final", "last", "best") and p.parent.name else p.stem)
    return Path("results") / "-".join([command, "+".join(dict.fromkeys(names)), *norms])


def _chain(sgld_steps: list[int], n_chains: int | None, init_noise: float | None, sgld_step_size: float | None,
           sgld_noise: float | None, purifier: str | None = None, clamp: bool | None = None) -> Any:
    from .targets import Chain

    return Chain(tuple(sgld_steps), n_chains, init_noise, sgld_step_size, sgld_noise, purifier, clamp)


def _whitebox(command: str, attack: Any, *, checkpoints: tuple[str, ...], norm: str, eps: list[float],
              sgld_steps: list[int], n_chains: int | None, init_noise: float | None, sgld_step_size: float | None,
              sgld_noise: float | None, purifier: str | None, sgld_clamp: bool | None, grad_modes: list[str],
              bf16: bool, compile_: bool, n_examples: int | None,
              example_rule: str,
              batch_size: int | None, seed: int, device: str, out: str | None, data_dir: str | None,
              check: bool, no_progress: bool) -> None:
    """Build the white-box job, run it (under ``torchrun``: batches shared over ranks), print one line per row."""
    from robust_jem.distributed import launch

    from .evaluate import WhiteboxJob, refuse_foreign_rows, stronger, whitebox
    from .console import recheck_summary, robust_table, versus_baseline

    eps = list(dict.fromkeys(eps))
    norms = [norm]
    job = WhiteboxJob(tuple(checkpoints), tuple(norms), tuple(eps), attack,
                      _chain(sgld_steps, n_chains, init_noise, sgld_step_size, sgld_noise, purifier, sgld_clamp),
                      tuple(grad_modes),
                      n_examples=n_examples, example_rule=example_rule, batch_size=batch_size, seed=seed, bf16=bf16,
                      compile=compile_, recheck=stronger(attack) if check else None)
    out_dir = Path(out) if out else _run_name(command, checkpoints, norms)
    refuse_foreign_rows(out_dir, checkpoints)
    with launch(resolve_device(device)) as (dist, dev):
        rows = whitebox(job, out_dir, device=dev, data_dir=data_dir, progress=not no_progress and dist.is_main)
    if not dist.is_main:
        return
    click.echo(robust_table(rows))
    if check:
        click.echo(recheck_summary(rows))
    versus = versus_baseline(rows)
    if versus:
        click.echo(versus)
    click.echo("checkpoints: " + ", ".join(dict.fromkeys(f"{r.model} {r.checkpoint}" for r in rows)))
    click.echo(str(out_dir / "rows.jsonl"))


@cli.command()
@_whitebox_options
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="PGD iterations.")
@click.option("--step-size", type=NUMBER, default=None, help="PGD step α (fractions allowed) [2.5·ε/steps].")
@click.option("--eot", type=EotCount(), default="auto", show_default=True,
              help="Gradient draws of the chain noise averaged per step (EOTPGD / EOTPGDL2 when > 1); auto: 20 for "
                   "a randomized model, 1 for a deterministic one.")
def pgd(steps: int, step_size: float | None, eot: int | str, restarts: int, eval_draws: int, seed: int,
        **kwargs: Any) -> None:
    """PGD (torchattacks PGD / PGDL2 / EOTPGD) through the SGLD-refined classifier: one row per
    (checkpoint, sgld steps, grad mode, norm, ε) in RUN/rows.jsonl."""
    from .evaluate import PGDSettings

    if step_size is not None and step_size <= 0:
        raise UserError("--step-size must be positive")
    settings = PGDSettings(steps=steps, step_size=step_size, eot=eot, restarts=restarts, eval_draws=eval_draws)
    settings.factory(10, seed)  # validate before loading anything
    _whitebox("pgd", settings, seed=seed, **kwargs)


@cli.command()
@_whitebox_options
@click.option("--attack", "attack_names", type=ChoiceList(("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")),
              default=None, help="Components, comma list [the --version's].")
@click.option("--version", type=click.Choice(["auto", "rand", "standard"]), default="auto", show_default=True,
              help="rand: APGD-CE + APGD-DLR with EOT; standard: APGD-CE, APGD-T, FAB-T, Square; auto: rand for "
                   "randomized models, standard for deterministic ones.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="APGD / FAB iterations.")
@click.option("--eot", type=click.IntRange(min=1), default=None, help="EOT draws per gradient [20; 1 if deterministic].")
@click.option("--n-queries", type=click.IntRange(min=1), default=5000, show_default=True, help="Square queries.")
def autoattack(attack_names: list[str] | None, version: str, steps: int, eot: int | None, n_queries: int,
               restarts: int, eval_draws: int, seed: int, **kwargs: Any) -> None:
    """AutoAttack from torchattacks components (rand version with EOT for refined classifiers), per-sample
    worst case over components and restarts under a fresh-noise verdict; the same rows as pgd."""
    from .evaluate import AutoAttackSettings

    settings = AutoAttackSettings(attacks=tuple(attack_names) if attack_names else None, version=version, steps=steps,
                                  eot=eot, n_queries=n_queries, restarts=restarts, eval_draws=eval_draws)
    settings.factory(10, seed)  # validate before loading anything
    _whitebox("autoattack", settings, seed=seed, **kwargs)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (a .md table goes beside it) [FIRST_RUN/robust_acc_vs_eps.png].")
def plot(runs: tuple[str, ...], out: str | None) -> None:
    """Robust accuracy vs ε from the rows of one or more runs (white-box and black-box curves)."""
    from attacks.plots import plot_rows
    from infra.records import ROWS, read_rows

    rows = []
    for run in runs:
        path = Path(run)
        if not (path / ROWS).is_file() and not path.is_file():
            raise UserError(f"{run}: no {ROWS} found")
        rows.extend(read_rows(path))
    if not rows:
        raise UserError(f"no rows in {', '.join(runs)}")
    target = Path(out) if out else (Path(runs[0]) if Path(runs[0]).is_dir() else Path(runs[0]).parent) \
        / "robust_acc_vs_eps.png"
    from infra.io import check_out_dir

    check_out_dir(target.parent)  # a bad --out is one line, before anything is drawn
    try:
        png, md = plot_rows(rows, target)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    click.echo(str(png))
    click.echo(str(md))


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--linf-eps", type=Fraction1(), default=None, help="L-inf budget [the first run's middle ε].")
@click.option("--l2-eps", type=Fraction1(), default=None, help="L2 budget [the first run's middle ε].")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder for leaderboard.md/.png/.json "
              "[the first run].")
def leaderboard(runs: tuple[str, ...], linf_eps: float | None, l2_eps: float | None, out: str | None) -> None:
    """Every defense of one or more runs in one table and one figure at one ε per norm: clean and robust accuracy
    with intervals, on each defense's selection and on the examples they all share, the strongest single attack,
    the cost in network passes."""
    import json as _json

    from infra.io import atomic_write, check_out_dir
    from infra.provenance import git_sha, now
    from .leaderboard import default_eps, leaderboard as build, leaderboard_markdown, plot_leaderboard

    folder = Path(out or runs[0])
    check_out_dir(folder)
    eps = default_eps(runs[0]) if linf_eps is None or l2_eps is None else {}
    eps.update({k: v for k, v in (("linf", linf_eps), ("l2", l2_eps)) if v is not None})
    entries = build(runs, eps)
    atomic_write(folder / "leaderboard.md", "\n".join(["# Leaderboard", "", f"Runs: {', '.join(runs)}; built {now()} at "
                                                        f"git {git_sha()} by `robust-jem leaderboard`.", "",
                                                        *leaderboard_markdown(entries)]) + "\n")  # creates --out
    atomic_write(folder / "leaderboard.json", _json.dumps(
        [{k: v for k, v in e.items() if k not in ("example_indices", "correct")} for e in entries], indent=1))
    plot_leaderboard(entries, folder / "leaderboard.png")
    for name in ("leaderboard.md", "leaderboard.png", "leaderboard.json"):
        click.echo(str(folder / name))


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
def report(run: str) -> None:
    """Regenerate RUN/report.md (with flags.json, headline.json, rows.csv and the figures; a refinement or defenses
    study's report for theirs) from RUN's rows."""
    from . import defenses, refinement
    from .report import write_report
    from infra.records import ROWS

    if not (Path(run) / ROWS).is_file():
        raise UserError(f"{run}: no {ROWS} found")
    if (Path(run) / refinement.CONTEXT).is_file():
        click.echo(str(refinement.write_refinement_report(run)))
    elif (Path(run) / defenses.CONTEXT).is_file():
        click.echo(str(defenses.write_defenses_report(run)))
    else:
        click.echo(str(write_report(run)))


# ------------------------------------------------------------------------------------------------
# black-box (foolbox Boundary / Pointwise) and distal adversarials (attacks.black / attacks.distal)
# ------------------------------------------------------------------------------------------------
def _chain_options(fn: Any) -> Any:
    """Options shared by ``blackbox`` and ``distal``: models and the JEM-k chain."""
    options = [
        click.option("--checkpoint", "checkpoints", multiple=True, required=True, type=click.Path(dir_okay=False),
                     help="Checkpoint (repeat for several). JEM checkpoints are attacked as JEM-k for each "
                          "--sgld-steps; CE / PGD-AT (any non-JEM) once each as the bare classifier."),
        *_refinement_options(),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None),
        click.option("--no-progress", is_flag=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command()
@click.option("--attack", type=click.Choice(["boundary", "pointwise"]), required=True,
              help="foolbox BoundaryAttack (L2) or PointwiseAttack (L0 and L2).")
@_chain_options
@click.option("--n-examples", type=click.IntRange(min=1), default=100, show_default=True, help="First N test images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True,
              help="Examples attacked together (foolbox batches natively).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="boundary: BoundaryAttack steps [30]; pointwise: most oracle calls after the init [30]. The "
                   "defaults fit a CPU budget (5 models, 100 images, < 10 min); the attacks are far from converged "
                   "there (boundary needs 1000s of steps): use more where time allows.")
@click.option("--init-steps", type=click.IntRange(min=1), default=None,
              help="boundary: blended-noise line-search steps [10]; pointwise: salt-and-pepper steps [20].")
@click.option("--init-directions", type=click.IntRange(min=1), default=10, show_default=True,
              help="boundary: uniform-noise directions tried by the initialisation.")
@click.option("--source-step", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="boundary: initial step towards the clean image, relative to the distance (foolbox: 0.01, "
                   "made for 5k-25k steps; its adaptation starts only after ~1000 steps).")
@click.option("--spherical-step", type=click.FloatRange(min=0, min_open=True), default=0.3, show_default=True,
              help="boundary: initial orthogonal step, relative to the distance (foolbox: 0.01).")
@click.option("--eval-draws", type=click.IntRange(min=1), default=EVAL_DRAWS, show_default=True,
              help="Fresh-noise forward passes re-scoring each adversarial (1 for deterministic models).")
@click.option("--eps-grid", type=EPS, default=None, help="L2 ε grid of the accuracy curve [0, 0.1, ..., 6].")
@click.option("--l0-grid", type=INTS, default=None, help="L0 grid (changed pixel values) [0,1,2,...,800].")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory [results/blackbox-CHECKPOINTS-ATTACK]; re-running skips finished rows.")
def blackbox(attack: str, checkpoints: tuple[str, ...], sgld_steps: list[int], n_chains: int | None,
             init_noise: float | None, sgld_step_size: float | None, sgld_noise: float | None, purifier: str | None,
             sgld_clamp: bool | None, seed: int, device: str, data_dir: str | None,
             no_progress: bool, n_examples: int, batch_size: int, steps: int | None, init_steps: int | None,
             init_directions: int, source_step: float, spherical_step: float, eval_draws: int,
             eps_grid: list[float] | None, l0_grid: list[int] | None, out: str | None) -> None:
    """Decision-based attacks (foolbox Boundary / Pointwise) on a fixed-noise view of each model; every
    adversarial re-scored with fresh noise. One row per (model, norm) with the whole accuracy-vs-ε curve,
    per-example distances in RUN/distances-KEY.json."""
    from attacks.black import BlackboxConfig
    from robust_jem.distributed import launch

    from .evaluate import BlackboxJob, blackbox as run, refuse_foreign_rows

    defaults = {"boundary": (30, 10), "pointwise": (30, 20)}[attack]
    cfg = BlackboxConfig(attack, steps=steps or defaults[0], init_steps=init_steps or defaults[1],
                         init_directions=init_directions, batch_size=batch_size, eval_draws=eval_draws, seed=seed,
                         source_step=source_step, spherical_step=spherical_step).validate()
    job = BlackboxJob(tuple(checkpoints), cfg,
                      _chain(sgld_steps, n_chains, init_noise, sgld_step_size, sgld_noise, purifier, sgld_clamp),
                      n_examples=n_examples, eps_grid=tuple(eps_grid) if eps_grid else None,
                      l0_grid=tuple(l0_grid) if l0_grid else None)
    out_dir = Path(out) if out else _run_name("blackbox", checkpoints, [attack])
    refuse_foreign_rows(out_dir, checkpoints)
    with launch(resolve_device(device)) as (dist, dev):  # under torchrun: chunks shared over ranks
        rows = run(job, out_dir, device=dev, data_dir=data_dir, progress=not no_progress and dist.is_main)
    if not dist.is_main:
        return
    fmt = lambda v: "inf" if v is None else f"{v:.4g}"  # noqa: E731
    for r in rows:
        med, med_fixed = r.distance_summary["median"], r.distance_summary_fixed_noise["median"]
        click.echo(f"{r.model} {attack} {r.norm}: clean {r.clean_acc:.3f}  median distance "
                   f"{fmt(med)} (fixed noise {fmt(med_fixed)})  adversarials {r.n_adversarial_fresh_noise}"
                   f"/{r.n} fresh, {r.n_adversarial_fixed_noise}/{r.n} fixed  "
                   f"{r.queries_per_example:.0f} queries/example  {r.wall_s:.1f}s")
    click.echo(str(out_dir / "rows.jsonl"))


@cli.command()
@_chain_options
@click.option("--grad-mode", "grad_modes", type=ChoiceList(("full", "bpda")), default="full", show_default=True,
              help="Gradient through the chain: full (backprop every SGLD step) and/or bpda, comma list.")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True, help="Gradient steps per image.")
@click.option("--step-size", type=NUMBER, default=0.03, show_default=True,
              help="Signed-gradient step in [0,1] pixels (Adam: learning rate).")
@click.option("--method", type=click.Choice(["sign", "adam"]), default="sign", show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Starting images per (class, start kind).")
@click.option("--starts", type=ChoiceList(("uniform", "mean")), default="uniform,mean", show_default=True,
              help="uniform noise and/or the training-set mean ± uniform noise.")
@click.option("--mean-noise", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Half-width of the uniform noise around the mean image.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.9,
              show_default=True, help="Confidence threshold for the 'fraction above' statistics.")
@click.option("--n-real", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Real test images for the reference log-density.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory [results/distal-CHECKPOINTS]; re-running skips finished rows.")
def distal(checkpoints: tuple[str, ...], sgld_steps: list[int], n_chains: int | None, init_noise: float | None,
           sgld_step_size: float | None, sgld_noise: float | None, purifier: str | None, sgld_clamp: bool | None,
           seed: int, device: str, data_dir: str | None, no_progress: bool,
           grad_modes: list[str], steps: int, step_size: float, method: str, seeds: int, starts: list[str],
           mean_noise: float, threshold: float, n_real: int, out: str | None) -> None:
    """Distal adversarials: optimise noise towards every class through each model; confidence, fraction
    above --threshold and log-density (rows of kind "distal") and a PNG grid per model (rows = classes)."""
    from attacks.distal import DistalConfig

    from .evaluate import DistalJob, distal as run, refuse_foreign_rows

    cfg = DistalConfig(steps=steps, step_size=step_size, seeds=seeds, starts=tuple(dict.fromkeys(starts)),
                       mean_noise=mean_noise, threshold=threshold, method=method, seed=seed).validate()
    job = DistalJob(tuple(checkpoints), cfg, _chain(sgld_steps, n_chains, init_noise, sgld_step_size, sgld_noise,
                                                    purifier, sgld_clamp),
                    tuple(grad_modes), n_real=n_real)
    out_dir = Path(out) if out else _run_name("distal", checkpoints, [])
    refuse_foreign_rows(out_dir, checkpoints)
    for r in run(job, out_dir, device=resolve_device(device), data_dir=data_dir, progress=not no_progress):
        mode = f" {r.grad_mode}" if r.sgld_steps else ""
        click.echo(f"{r.model}{mode} {r.start}: confidence {r.conf_start:.3f} -> {r.conf_result:.3f}"
                   f"  target >= {threshold:g}: {r.frac_target_above_threshold:.3f}  log-density "
                   f"{r.log_density_start:.2f} -> {r.log_density_result:.2f} (real "
                   f"{r.log_density_real:.2f})  {r.wall_s:.1f}s")
    click.echo(str(out_dir / "rows.jsonl"))


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
@cli.command()
@_chain_options
@click.option("--n-examples", type=_POS, default=1000, show_default=True, help="First N test images.")
@click.option("--batch-size", type=_POS, default=250, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="results/extras", show_default=True)
def activity(checkpoints: tuple[str, ...], sgld_steps: list[int], n_chains: int | None, init_noise: float | None,
             sgld_step_size: float | None, sgld_noise: float | None, purifier: str | None, sgld_clamp: bool | None,
             seed: int, device: str, data_dir: str | None, no_progress: bool, n_examples: int, batch_size: int,
             out: str) -> None:
    """What each JEM-k chain does to clean test images: displacement, energy, predictions changed against the bare
    classifier and JEM-0 (rows of kind "activity"; inactive below 1 % changed)."""
    from .evaluate import ActivityJob, activity as run

    job = ActivityJob(tuple(checkpoints), _chain(sgld_steps, n_chains, init_noise, sgld_step_size, sgld_noise,
                                                 purifier, sgld_clamp),
                      n_examples=n_examples, batch_size=batch_size, seed=seed)
    for r in run(job, out, device=resolve_device(device), data_dir=data_dir, progress=not no_progress):
        click.echo(f"{r.model}: moves clean images {r.displacement_l2:.3g} (L2) / {r.displacement_linf:.3g} (L∞) "
                   f"in [0,1] pixels, energy {r.energy_start:.3g} -> {r.energy_end:.3g}, changes "
                   f"{100 * r.changed_vs_bare:.1f} % of the bare classifier's predictions and "
                   f"{100 * r.changed_vs_jem0:.1f} % of JEM-0's" + ("  (inactive)" if r.inactive else ""))
    click.echo(str(Path(out) / "rows.jsonl"))


@cli.command("refinement-study")
@_CKPTS
@click.option("--plan", "plan_name", type=click.Choice(["quick", "quick-clamp", "standard", "tiny"]), default="quick",
              show_default=True, help="Grid and attack budgets (suite.refinement.REFINEMENT_PLANS).")
@click.option("--out", type=click.Path(file_okay=False), default="results/refinement", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
def refinement_study(checkpoints: tuple[str, ...], plan_name: str, out: str, data_dir: str | None, device: str,
                     no_progress: bool) -> None:
    """Robust and clean accuracy of JEM-k against the refinement's steps and step size, on one shared selection,
    with the study's attack protocol; report.md and refinement.png in OUT (resumable)."""
    from .refinement import run_refinement_study

    click.echo(str(run_refinement_study(checkpoints, plan_name, out, device=resolve_device(device),
                                        data_dir=data_dir, progress=not no_progress) / "report.md"))


@cli.command("defenses-study")
@click.option("--plan", "plan_name", type=click.Choice(["quick", "standard", "tiny"]), default="quick",
              show_default=True, help="Attack budgets and selection (suite.defenses.DEFENSES_PLANS).")
@click.option("--preset", default=None, help="Training preset of the four models [the plan's name].")
@click.option("--dataset", default="fashion-mnist", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory [results/defenses-PLAN-DATASET].")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
def defenses_study(plan_name: str, preset: str | None, dataset: str, out: str | None, data_dir: str | None,
                   device: str, no_progress: bool) -> None:
    """CE, PGD-AT, adversarially trained JEM-k and CE behind a long-run EBM purifier (trained or reused), attacked
    with exact gradients through every chain and with BPDA on one shared selection; a leaderboard report."""
    from .defenses import run_defenses_study

    click.echo(str(run_defenses_study(plan_name, preset, dataset, out, device=resolve_device(device),
                                      data_dir=data_dir, progress=not no_progress) / "report.md"))


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 2 with one line on stderr for bad input, never a traceback."""
    try:
        rc = cli.main(args=argv, prog_name="robust-jem", standalone_mode=False)
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:  # bare `robust-jem`
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"robust-jem: error: {_one_line(exc.format_message())}{hint}", err=True)
        sys.exit(2)
    except InputError as exc:
        click.echo(f"robust-jem: error: {_one_line(str(exc))}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"robust-jem: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except TrainingDiverged as exc:
        click.echo(f"robust-jem: {_one_line(str(exc))}", err=True)
        sys.exit(1)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        cause = exc.__cause__ if isinstance(exc, click.exceptions.Abort) else exc  # click wraps Ctrl-C in Abort
        if isinstance(cause, Interrupted):  # stopped at a safe point: it knows what it kept
            click.echo(f"robust-jem: interrupted. Kept: {_one_line(cause.kept)}", err=True)
            sys.exit(130)
        click.echo("robust-jem: interrupted. Kept: only files this command had finished writing (rows already in "
                   "rows.jsonl stay); the same command resumes from them.", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
