"""The one function that turns checkpoints and chain options into labelled defenses (:class:`Target`).

White-box, black-box, distal, calibration, OOD, smoothing and the report all get their targets here, so
the same checkpoint and refinement carry the same label and the same ``defense_id`` everywhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from attacks.target import Target
from infra.provenance import code_hash, file_sha256
from robust_jem.checkpoint import load
from robust_jem.data import ImageDataset, load_dataset
from robust_jem.config import PURIFIER_OBJECTIVES
from robust_jem.errors import UserError
from robust_jem.model import EnergyModel
from robust_jem.refined import GRAD_MODES, RefinedClassifier, Refinement, default_refinement, refinement_for

_ROOT = Path(__file__).resolve().parent.parent


def defense_code() -> str:
    """Hash of the code that computes a defense's forward pass (refinement, SGLD, model, nets, energy)."""
    return code_hash(*(_ROOT / "robust_jem" / f for f in ("refined.py", "sgld.py", "model.py", "nets.py")),
                     _ROOT / "infra" / "energy.py")


@dataclass(frozen=True)
class Chain:
    """The JEM-k refinements asked for: one per ``sgld_steps`` value, the other settings shared.

    A setting left at None is the defense's definition (:func:`robust_jem.refined.default_refinement`): the
    checkpoint's own SGLD step size and noise, 5 chains, init noise 0.03, unclamped (a purifier: its own sampler,
    clamp included). A value given here overrides it for every checkpoint, and the label says so
    (``JEM-1[step=0.5]``).
    """

    sgld_steps: tuple[int, ...] = (0,)
    n_chains: int | None = None
    init_noise: float | None = None
    step_size: float | None = None
    noise: float | None = None
    purifier: str | None = None  # an energy model's checkpoint: its chain purifies every model's inputs
    clamp: bool | None = None  # chains kept in [-1, 1] or not (None: JEM-k unclamped, a purifier as trained)

    def refinements(self, sampler: Any | None = None) -> list[Refinement]:
        """The refinements for a checkpoint trained with ``sampler`` (its ``SGLDConfig``; None: the reference).
        With a purifier, ``sampler`` is the purifier's and every refinement names it."""
        given = {name: v for name, v in (("n_chains", self.n_chains), ("init_noise", self.init_noise),
                                         ("step_size", self.step_size), ("noise", self.noise),
                                         ("clamp", self.clamp)) if v is not None}
        if self.purifier is not None and sampler is not None and "clamp" not in given:
            # a purifier runs its sampler exactly as trained, its clamp to [-1, 1] included: Hill et al. purify with
            # the EBM's own Langevin sampler, and outside the box its chains were kept in an EBM's energy is
            # unconstrained (unclamped, the quick EBM's 100-step chain left it: L∞ 25 in [0, 1] pixels, clean
            # accuracy 17 %). JEM-k keeps the paper's refinement, which never clamps (default_refinement).
            given["clamp"] = bool(getattr(sampler, "clamp", False))
        return [replace(default_refinement(k, sampler), **given) for k in dict.fromkeys(self.sgld_steps)]


@dataclass
class Loaded:
    """A checkpoint, loaded once: path, sha256, the eval-mode model (parameters frozen), its info."""

    path: str
    sha256: str
    model: EnergyModel
    info: dict[str, Any]

    @property
    def objective(self) -> str:
        return str(self.info["objective"])


@functools.lru_cache(maxsize=8)
def split(name: str, part: str, data_dir: str | None) -> ImageDataset:
    """A data set split, read once per process (a study's stages share it)."""
    return load_dataset(name, part, data_dir)


def load_checkpoints(checkpoints: Sequence[str], device: torch.device, data_dir: str | None = None,
                     dataset: str | None = None) -> tuple[ImageDataset, list[Loaded]]:
    """Load every checkpoint before anything runs (all must share one data set) and its test split. An energy model
    without classes (objective ``ebm``) is refused: it is a purifier (:func:`load_purifier`)."""
    if not checkpoints:
        raise UserError("give at least one --checkpoint")
    loaded = [load_one(path, device) for path in dict.fromkeys(map(str, checkpoints))]
    for c in loaded:
        if c.objective in PURIFIER_OBJECTIVES:
            raise UserError(f"{c.path} is an energy model without classes (objective {c.objective}): it classifies "
                            "nothing; give it as --purifier")
    names = {c.info["dataset"] for c in loaded}
    if dataset is not None and names != {dataset}:
        raise UserError(f"the checkpoints were trained on {', '.join(sorted(names))}, not {dataset}")
    if len(names) != 1:
        raise UserError(f"the checkpoints were trained on different data sets ({', '.join(sorted(names))})")
    ds = split(names.pop(), "test", None if data_dir is None else str(data_dir))
    for c in loaded:
        if tuple(c.info["input_shape"]) != tuple(ds.shape):
            raise UserError(f"{c.path}: input shape {c.info['input_shape']} does not match {ds.name} {list(ds.shape)}")
    return ds, loaded


def target_for(c: Loaded, refinement: Refinement, *, grad_mode: str = "full", seed: int = 0, bf16: bool = False,
               compile: bool = False, purifier: Loaded | None = None) -> Target:
    """The :class:`Target` of one checkpoint under one refinement (made bare for a baseline); with ``purifier``
    (the energy model ``refinement.purifier`` names) the chain descends its energy instead."""
    r = refinement_for(c.objective, refinement)
    if r.sgld_steps == 0:
        grad_mode = "full"  # an empty chain: both modes are the same gradient
    rc = RefinedClassifier.from_refinement(c.model, r, purifier=purifier.model if r.purifier and purifier else None,
                                           grad_mode=grad_mode, seed=seed, bf16=bf16, compile=compile)
    config = c.info.get("config")
    batch_norm = getattr(getattr(config, "model", None), "norm", "none") == "batch"  # run with its running stats
    return Target(label=r.label(c.objective) + ("[BN eval]" if batch_norm else ""), model=rc, scorer=rc.scorer(),
                  defense={"objective": c.objective, **r.fields()}, checkpoint=c.path, checkpoint_sha256=c.sha256,
                  attacker={"grad_mode": grad_mode, "precision": "bf16" if bf16 else "fp32", "compiled": compile},
                  code=defense_code())


def build_targets(loaded: Sequence[Loaded], chain: Chain, grad_modes: Sequence[str] = ("full",), *, seed: int = 0,
                  bf16: bool = False, compile: bool = False) -> list[Target]:
    """Every defense to evaluate: each JEM checkpoint once per refinement (and per gradient mode when k > 0),
    each baseline once, bare. Duplicates (a baseline asked for several k) are dropped. With ``chain.purifier``
    every checkpoint is evaluated behind the purifier's chain (its own sampler's step, noise and clamp by default)."""
    bad = [m for m in grad_modes if m not in GRAD_MODES]
    if bad or not grad_modes:
        raise UserError(f"unknown gradient mode {bad[0] if bad else None!r}; choose from {', '.join(GRAD_MODES)}")
    purifier = load_purifier(chain.purifier, loaded) if chain.purifier else None
    out: dict[tuple, Target] = {}
    for c in loaded:
        config = (purifier or c).info.get("config")
        for r in chain.refinements(getattr(config, "sgld", None)):
            r = refinement_for(c.objective, replace(r, purifier=purifier.sha256[:16]) if purifier else r)
            for mode in (["full"] if r.sgld_steps == 0 else list(dict.fromkeys(grad_modes))):
                t = target_for(c, r, grad_mode=mode, seed=seed, bf16=bf16, compile=compile, purifier=purifier)
                out.setdefault((t.defense_id, mode), t)
    return list(out.values())


def load_one(path: str, device: torch.device) -> Loaded:
    """One checkpoint, loaded with its sha256; parameters frozen (attacks need input gradients only)."""
    model = load(path, device).requires_grad_(False)
    return Loaded(str(path), file_sha256(path), model, model.checkpoint_info)  # type: ignore[arg-type]


def load_purifier(path: str, loaded: Sequence[Loaded]) -> Loaded:
    """The purifier's checkpoint (an ``ebm``), on the device of the models it purifies and for their data set."""
    device = next(loaded[0].model.parameters()).device if loaded else torch.device("cpu")
    if not Path(path).is_file():
        raise UserError(f"--purifier {path}: no such file")
    p = load_one(path, device)
    if p.objective not in PURIFIER_OBJECTIVES:
        raise UserError(f"--purifier {path} is a {p.objective} model; a purifier is an energy model trained without "
                        f"labels (robust-jem train --objective ebm)")
    datasets = {c.info["dataset"] for c in loaded}
    if datasets and datasets != {p.info["dataset"]}:
        raise UserError(f"--purifier {path} was trained on {p.info['dataset']}, the models on "
                        f"{', '.join(sorted(datasets))}")
    return p
