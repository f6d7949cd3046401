"""Frozen configuration dataclasses and presets.

A run is fully described by one :class:`TrainConfig` (which nests a :class:`ModelConfig` and an
:class:`SGLDConfig`). Configs round-trip through plain dicts (``to_dict`` / ``from_dict``) so they
can live inside checkpoints and ``config.json`` without pickling code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import UserError

OBJECTIVES = ("jem", "ce", "pgd-at", "gaussian-aug", "jem-at", "ebm")
ENERGY_OBJECTIVES = ("jem", "jem-at")  # classifiers trained as energy models: refined as JEM-k
SAMPLING_OBJECTIVES = (*ENERGY_OBJECTIVES, "ebm")  # trained with a replay buffer and SGLD
PURIFIER_OBJECTIVES = ("ebm",)  # energy models only: they purify another model's inputs, they classify nothing
ARCHS = ("small", "wrn")
SGLD_INITS = ("uniform", "gaussian", "class-gaussian")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone description. ``arch="wrn"`` is WRN-depth-width without batch-norm (as in JEM)."""

    arch: str = "small"
    in_channels: int = 1
    image_size: int = 28
    n_classes: int = 10
    depth: int = 28
    width: int = 10
    channels: tuple[int, ...] = (16, 32, 32, 64)
    hidden: int = 128
    leak: float = 0.2
    dropout: float = 0.0
    norm: str = "none"  # wrn only: "none" (JEM) or "batch" (JEM++; imported and evaluated in eval mode, not trained)


@dataclass(frozen=True)
class SGLDConfig:
    """SGLD sampler settings (JEM, Grathwohl et al. 2020, Sec. 4).

    All quantities live in the model's internal input space [-1, 1], exactly as in the JEM
    reference code, so the paper's numbers (step size 1, noise 0.01) keep their meaning.
    """

    steps: int = 20
    step_size: float = 1.0
    noise: float = 0.01
    buffer_size: int = 10000
    reinit_freq: float = 0.05
    clamp: bool = False  # keep training chains in [-1, 1] (the reference does not)
    init: str = "uniform"  # buffer init/re-init: uniform (the paper), gaussian, class-gaussian (JEM++)
    grad_clip: float = 0.0  # clip each chain's energy gradient to this L2 norm (0: off)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; presets only fill defaults."""

    objective: str = "jem"
    dataset: str = "fashion-mnist"
    preset: str = "quick"
    model: ModelConfig = field(default_factory=ModelConfig)
    sgld: SGLDConfig = field(default_factory=SGLDConfig)
    iters: int = 3000
    batch_size: int = 64
    lr: float = 1e-4
    warmup_iters: int = 1000
    weight_decay: float = 0.0
    decay_at: tuple[int, ...] = ()
    decay_rate: float = 0.3
    data_noise: float = 0.03
    px_weight: float = 1.0
    energy_l2: float = 0.0
    ce_warmup_iters: int = 0  # CE-only steps before the objective's own loss (any objective)
    ce_warmup_lr: float = 1e-3
    pgd_eps: float = 0.1
    pgd_steps: int = 10
    pgd_step_size: float = 0.02
    sigma: float = 0.25
    seed: int = 0
    save_every_s: float = 60.0
    log_every: int = 50
    eval_every: int = 0
    max_retries: int = 3
    divergence_gap: float = 1e4
    bf16: bool = False
    channels_last: bool = True  # NHWC activations: 1.56x the NCHW step on this CPU (bench/results/train_step-cpu.md)
    compile: bool = False
    fused_adam: bool = True  # torch's fused Adam kernel (CUDA and CPU); False: the foreach implementation
    prefetch: bool = True  # gather the next batch on a background thread (pinned memory + side stream on CUDA)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        d = dict(d)
        model = _build(ModelConfig, d.pop("model", {}))
        sgld = _build(SGLDConfig, d.pop("sgld", {}))
        return replace(_build(cls, d), model=model, sgld=sgld)

    def validate(self) -> "TrainConfig":
        """Raise :class:`UserError` on values no run can use; returns self."""
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if self.model.arch not in ARCHS:
            raise UserError(f"unknown architecture {self.model.arch!r}; choose from {', '.join(ARCHS)}")
        if self.model.norm not in ("none", "batch") or (self.model.norm == "batch" and self.model.arch != "wrn"):
            raise UserError(f"model norm {self.model.norm!r}: 'none', or 'batch' for a wrn")
        positive = {"batch size": self.batch_size, "lr": self.lr, "iters": self.iters}
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"{name} must be positive, got {value}")
        if self.sgld.steps < 0 or self.sgld.step_size < 0 or self.sgld.noise < 0:
            raise UserError("SGLD steps, step size and noise must be non-negative")
        if not 0.0 <= self.sgld.reinit_freq <= 1.0:
            raise UserError(f"reinit frequency must be in [0, 1], got {self.sgld.reinit_freq}")
        if self.sgld.init not in SGLD_INITS:
            raise UserError(f"unknown SGLD init {self.sgld.init!r}; choose from {', '.join(SGLD_INITS)}")
        if self.sgld.grad_clip < 0:
            raise UserError(f"SGLD gradient clip must be >= 0, got {self.sgld.grad_clip}")
        if self.sgld.buffer_size <= 0:
            raise UserError(f"buffer size must be positive, got {self.sgld.buffer_size}")
        if self.objective in ("pgd-at", "jem-at") and not (self.pgd_eps > 0 and self.pgd_steps > 0
                                                           and self.pgd_step_size > 0):
            raise UserError(f"{self.objective} needs a positive PGD ε, number of steps and step size")
        if self.objective == "gaussian-aug" and not self.sigma > 0:
            raise UserError(f"the Gaussian augmentation sigma must be positive, got {self.sigma}")
        if self.save_every_s <= 0:
            raise UserError(f"the seconds between saves must be positive, got {self.save_every_s}")
        return self


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _build(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise UserError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    kwargs = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Presets: (preset, dataset) -> per-objective overrides. They only fill defaults; every field
# can be overridden from the command line.
# ---------------------------------------------------------------------------------------------

DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    # name: (channels, size, classes)
    "fashion-mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "svhn": (3, 32, 10),
}

PRESETS = ("quick", "standard", "paper-small", "cifar10-paper", "tiny")

# Quick preset: sized for a 2-core CPU (about 12 minutes for the three models together).
# JEM and PGD-AT start from a short CE warm start (``ce_warmup_iters``); JEM then trains CE + 0.1·log p(x)
# with 5 SGLD steps from a class-conditional Gaussian buffer (JEM++'s informative init) and an L2 penalty on the
# energies. bench/results/quick_jem_sweep.md (bench/jem_sweep.py) measured the choice: against U(-1,1) chains
# its buffer is 17x closer to the data for an independent judge (Fréchet 11 vs 189) at 3 points less test
# accuracy (84.7 vs 87.8 %).
_QUICK: dict[str, dict[str, Any]] = {
    "ce": dict(iters=2000, lr=1e-3, warmup_iters=0, decay_at=(1500,)),
    "jem": dict(
        iters=1600, lr=1e-4, warmup_iters=0, ce_warmup_iters=800, ce_warmup_lr=1e-3,
        energy_l2=0.1, px_weight=0.1, sgld=SGLDConfig(steps=5, buffer_size=10000, clamp=True, init="class-gaussian"),
    ),
    "pgd-at": dict(iters=1000, lr=1e-3, warmup_iters=0, ce_warmup_iters=500, ce_warmup_lr=1e-3, decay_at=(800,),
                   pgd_eps=0.1, pgd_steps=10, pgd_step_size=0.02),
    "gaussian-aug": dict(iters=1000, lr=1e-3, warmup_iters=0, sigma=0.25, decay_at=(750,)),
}
# adversarially trained JEM (issue 28): PGD-AT's schedule and inner attack, plus the quick JEM's log p(x) term
_QUICK["jem-at"] = {**_QUICK["pgd-at"], **{k: _QUICK["jem"][k] for k in ("energy_l2", "px_weight", "sgld")}}

# Standard preset: the same small net trained longer (under 30 min of JEM training on a 2-core CPU). A short CE
# warm start (800 iterations); the JEM phase then trains CE + 0.1·log p(x) from class-conditional Gaussian chains
# (JEM++) with a step decay and SGLD step 0.1 (with the paper's step 1 the chains climb the energy of the trained
# model: its buffer drifted away from the data). bench/results/standard_jem_sweep.md (bench/jem_sweep.py, variant
# std-w800-s01) and bench/results/independent_health-quick-and-standard.md measure it: 91.1 % test accuracy,
# buffer Fréchet 13.5 for an independent judge (63.7 with step 1), 65.9 % of the buffer confidently classified
# (the bar is 80 %; the same judge is that confident on 74.7 % of real test images).
_STANDARD: dict[str, dict[str, Any]] = {
    "ce": dict(iters=6000, lr=1e-3, warmup_iters=0, decay_at=(4000, 5500)),
    "jem": dict(
        iters=8000, lr=1e-4, warmup_iters=0, ce_warmup_iters=800, ce_warmup_lr=1e-3, decay_at=(7000,),
        energy_l2=0.1, px_weight=0.1,
        sgld=SGLDConfig(steps=5, step_size=0.1, buffer_size=10000, clamp=True, init="class-gaussian"),
    ),
    "pgd-at": dict(iters=4000, lr=1e-3, warmup_iters=0, ce_warmup_iters=1000, ce_warmup_lr=1e-3, decay_at=(3200,),
                   pgd_eps=0.1, pgd_steps=10, pgd_step_size=0.02),
    "gaussian-aug": dict(iters=4000, lr=1e-3, warmup_iters=0, sigma=0.25, decay_at=(3000,)),
}
_STANDARD["jem-at"] = {**_STANDARD["pgd-at"], **{k: _STANDARD["jem"][k] for k in ("energy_l2", "px_weight", "sgld")}}

# The JEM paper's objective and sampler on the small net (issue 27): log p(x) weight 1, a replay buffer of 10,000
# chains from U(-1, 1) with 5 % re-initialised, 20 SGLD steps of size 1 and noise 0.01, data noise 0.03, Adam 1e-4
# with 1000 warm-up iterations, batch 64, no CE warm start (TrainConfig's defaults are these). 8000 iterations fill
# the 90 min of JEM training a 2-core CPU allows (1.68 it/s measured here: 80 min). The baselines are the standard
# preset's.
_PAPER_SMALL: dict[str, dict[str, Any]] = {
    **{k: v for k, v in _STANDARD.items() if k != "jem"},
    "jem": dict(iters=8000),
}

# The JEM paper's CIFAR-10 settings (Grathwohl et al. 2020, App. / train_wrn_ebm.py).
_PAPER: dict[str, dict[str, Any]] = {
    "jem": dict(
        iters=150 * 782, lr=1e-4, warmup_iters=1000, batch_size=64, decay_at=(160 * 782, 180 * 782),
        decay_rate=0.3, data_noise=0.03, sgld=SGLDConfig(steps=20, step_size=1.0, noise=0.01, buffer_size=10000,
                                                         reinit_freq=0.05),
    ),
    "ce": dict(iters=150 * 782, lr=1e-4, warmup_iters=1000, batch_size=64, data_noise=0.03),
    "pgd-at": dict(iters=100 * 782, lr=1e-4, warmup_iters=1000, batch_size=64, pgd_eps=8 / 255, pgd_steps=7,
                   pgd_step_size=2 / 255),
    "gaussian-aug": dict(iters=150 * 782, lr=1e-4, warmup_iters=1000, batch_size=64, sigma=0.25),
}
_PAPER["jem-at"] = {**_PAPER["pgd-at"], "sgld": _PAPER["jem"]["sgld"]}

# The purifier of long-run EBM purification (issue 28; Hill et al. 2021): log p(x) alone, no labels, with the sampler
# that trained the paper's JEM stably here (bench/results/paper-small_jem_sweep.md: U(-1, 1) chains, 20 steps of size
# 1, noise 0.01, clamped to [-1, 1]) and the L2 penalty on energies the quick and standard JEMs use (0.1; without it,
# with no cross-entropy to anchor the logits, both energies fell from -42 to -66 within 200 steps and the data energy
# ran away at step 300 through three rollbacks: bench/results/ebm-quick-without-energy-l2-metrics.jsonl); the quick
# one for 2000 iterations (~20 min here), the others for the JEM's.
_EBM_SAMPLER = SGLDConfig(steps=20, step_size=1.0, noise=0.01, buffer_size=10000, reinit_freq=0.05, clamp=True,
                          init="uniform")
_QUICK["ebm"] = dict(iters=2000, lr=1e-4, warmup_iters=200, px_weight=1.0, energy_l2=0.1, sgld=_EBM_SAMPLER)
_STANDARD["ebm"] = dict(iters=8000, lr=1e-4, warmup_iters=1000, px_weight=1.0, energy_l2=0.1, sgld=_EBM_SAMPLER)
_PAPER_SMALL["ebm"] = _STANDARD["ebm"]
_PAPER["ebm"] = {**_PAPER["jem"], "sgld": replace(_PAPER["jem"]["sgld"], clamp=True)}

# Tiny preset: seconds, for tests and smoke runs.
_TINY: dict[str, dict[str, Any]] = {
    obj: dict(iters=20, lr=1e-3, warmup_iters=0, batch_size=16, log_every=5,
              model=ModelConfig(arch="small", channels=(4, 4, 8, 8), hidden=16),
              sgld=SGLDConfig(steps=2, buffer_size=64), pgd_steps=2, pgd_step_size=0.05)
    for obj in OBJECTIVES
}
_TINY["ebm"] = {**_TINY["ebm"], "sgld": replace(_TINY["ebm"]["sgld"], clamp=True)}  # clamped like every EBM preset


def preset_config(preset: str, objective: str, dataset: str, **overrides: Any) -> TrainConfig:
    """Build a validated config for ``preset`` x ``objective`` x ``dataset``, then apply overrides.

    ``overrides`` uses flat names; ``sgld_*`` keys go to :class:`SGLDConfig` and ``model_*`` keys to
    :class:`ModelConfig` (e.g. ``sgld_steps=10``, ``model_width=2``). ``None`` values are ignored.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    if dataset not in DATASET_SHAPES:
        raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASET_SHAPES)}")
    c, s, k = DATASET_SHAPES[dataset]
    table = {"quick": _QUICK, "standard": _STANDARD, "paper-small": _PAPER_SMALL, "cifar10-paper": _PAPER,
             "tiny": _TINY}[preset]
    base = dict(table[objective])
    model = base.pop("model", None) or (
        ModelConfig(arch="wrn", depth=28, width=10) if preset == "cifar10-paper" else ModelConfig()
    )
    model = replace(model, in_channels=c, image_size=s, n_classes=k)
    sgld = base.pop("sgld", SGLDConfig())
    cfg = TrainConfig(objective=objective, dataset=dataset, preset=preset, model=model, sgld=sgld, **base)
    return apply_overrides(cfg, **overrides)


def apply_overrides(cfg: TrainConfig, **overrides: Any) -> TrainConfig:
    """Return ``cfg`` with flat overrides applied (``sgld_``/``model_`` prefixes select the nested config)."""
    top: dict[str, Any] = {}
    sg: dict[str, Any] = {}
    mo: dict[str, Any] = {}
    sgld_names = {f.name for f in fields(SGLDConfig)}
    model_names = {f.name for f in fields(ModelConfig)}
    top_names = {f.name for f in fields(TrainConfig)}
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("sgld_") and key[5:] in sgld_names:
            sg[key[5:]] = value
        elif key.startswith("model_") and key[6:] in model_names:
            mo[key[6:]] = tuple(value) if isinstance(value, list) else value
        elif key in top_names:
            top[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise UserError(f"unknown setting {key!r}")
    return replace(cfg, sgld=replace(cfg.sgld, **sg), model=replace(cfg.model, **mo), **top).validate()


# settings that change how fast or how often a run works, not the model it trains
_NOT_MODEL_DEFINING = frozenset({"save_every_s", "log_every", "eval_every", "prefetch", "compile", "channels_last",
                                 "fused_adam"})


def preset_changes(cfg: TrainConfig) -> list[str]:
    """What ``cfg`` changes from its own preset, as ``name=value`` (nested settings dotted: ``sgld.clamp=True``);
    speed and logging settings are left out. Empty for a preset run, or when the preset is unknown."""
    try:
        base = preset_config(cfg.preset, cfg.objective, cfg.dataset).to_dict()
    except UserError:
        return []
    mine = cfg.to_dict()
    out = []
    for key, value in mine.items():
        if key in _NOT_MODEL_DEFINING:
            continue
        if isinstance(value, dict):
            out += [f"{key}.{k}={v}" for k, v in value.items() if base.get(key, {}).get(k) != v]
        elif base.get(key) != value:
            out.append(f"{key}={value}")
    return out


def model_name(cfg: TrainConfig) -> str:
    """A trained model's name from its config: the preset, the objective and every change from the preset, e.g.
    ``paper-small jem [sgld.clamp=True]`` (the sweep's one-setting variants carry their change in their name)."""
    changes = preset_changes(cfg)
    return f"{cfg.preset} {cfg.objective}" + (f" [{', '.join(changes)}]" if changes else "")
