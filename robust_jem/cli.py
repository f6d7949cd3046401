"""Command line: parse -> config -> one library call. Bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from attacks.common import AttackInputError, parse_eps
from .errors import UserError

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
        except AttackInputError as exc:
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
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """robust-jem: train JEM and its baselines, then attack them honestly."""
    setup_logging(verbose)


@cli.command("data-check")
@click.option("--dataset", default="fashion-mnist", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
def data_check(dataset: str, data_dir: str | None) -> None:
    """Check that a data set can be loaded; print its size."""
    from .data import load_dataset

    for split in ("train", "test"):
        ds = load_dataset(dataset, split, data_dir)
        click.echo(f"{dataset} {split}: {len(ds)} images {'x'.join(map(str, ds.shape))}, {len(ds.classes)} classes")


@cli.command()
@click.option("--objective", type=click.Choice(["jem", "ce", "pgd-at", "gaussian-aug"]), default="jem",
              show_default=True)
@click.option("--dataset", type=click.Choice(["fashion-mnist", "cifar10", "cifar100", "svhn"]),
              default="fashion-mnist", show_default=True)
@click.option("--preset", type=click.Choice(["quick", "cifar10-paper", "tiny"]), default="quick", show_default=True)
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
@click.option("--no-progress", is_flag=True)
def train(objective: str, dataset: str, preset: str, out: str | None, resume_dir: str | None, data_dir: str | None,
          device: str, no_progress: bool, compile_: bool | None, **overrides: Any) -> None:
    """Train a JEM, plain CE, PGD-AT or Gaussian-augmented classifier."""
    from .config import preset_config
    from .train import train as run_train

    dev = resolve_device(device)
    if resume_dir:
        path = run_train(None, resume_dir, device=dev, resume=True, data_dir=data_dir,  # type: ignore[arg-type]
                         progress=not no_progress)
    else:
        cfg = preset_config(preset, objective, dataset, compile=compile_, **overrides)
        out_dir = Path(out or f"runs/{preset}-{objective}")
        path = run_train(cfg, out_dir, device=dev, data_dir=data_dir, progress=not no_progress)
    click.echo(str(path))


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 2 with one line on stderr for bad input, never a traceback."""
    from .train import TrainingDiverged

    try:
        rc = cli.main(args=argv, prog_name="robust-jem", standalone_mode=False)
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:  # bare `robust-jem`
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"robust-jem: error: {_one_line(exc.format_message())}{hint}", err=True)
        sys.exit(2)
    except (UserError, AttackInputError) as exc:
        click.echo(f"robust-jem: error: {_one_line(str(exc))}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"robust-jem: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except TrainingDiverged as exc:
        click.echo(f"robust-jem: {_one_line(str(exc))}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("robust-jem: aborted", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
