"""The SGLD-refined classifier of JEM (Grathwohl et al. 2020, Sec. 5.3): JEM-0/1/10.

Each input is copied ``n_chains`` times, Gaussian noise of std ``init_noise`` is added (in the model's
[-1,1] space, as in the reference), ``sgld_steps`` SGLD steps run on the energy, and the logits of the
final states are averaged over chains. The gradient an attacker sees is explicit:

* ``grad_mode="full"``: the true derivative of this stochastic forward pass, backpropagated through
  every SGLD step (``create_graph=True``);
* ``grad_mode="bpda"``: the chain is the identity in the backward pass (Athalye et al. 2018), i.e. the
  gradient of the logits at the chain's end with respect to its start.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from infra.energy import energy_of_logits
from infra.randomness import generator_on

from .model import EnergyModel, to_internal
from .config import ENERGY_OBJECTIVES
from .errors import UserError
from .sgld import NoiseFn, sgld, sgld_checkpointed

GRAD_MODES = ("full", "bpda")
CHECKPOINT_MODES = ("auto", "always", "never")
CHECKPOINT_FROM = 20  # "auto" checkpoints full-gradient chains longer than this (JEM-10 rows stay bit-identical)


# ------------------------------------------------------------------------------------------------
# the defense identity: which refinement, and its one label
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refinement:
    """The SGLD refinement in front of a classifier (JEM-k): everything that defines the defense's forward
    pass besides the weights. The attacker's gradient path (``grad_mode``) and arithmetic (bf16) are not
    part of it: they change the attack, not the defense.

    Args:
        sgld_steps: k in JEM-k.
        n_chains: noisy copies per input whose logits are averaged.
        init_noise: std of the Gaussian added before the chain ([-1,1] model space).
        step_size, noise: SGLD settings ([-1,1] model space).
        clamp: keep the chains in [-1, 1] after every step (the projected sampler some JEMs were trained with; the
            paper's refinement does not clamp).
        purifier: "" when the chain descends the classifier's own energy (JEM-k); else the sha256 (16 hex digits)
            of the separate energy model whose energy it descends before the classifier labels the result
            (long-run EBM purification, Hill et al. 2021).
    """

    sgld_steps: int = 0
    n_chains: int = 5
    init_noise: float = 0.03
    step_size: float = 1.0
    noise: float = 0.01
    purifier: str = ""
    clamp: bool = False

    def __post_init__(self) -> None:
        if self.sgld_steps < 0 or self.n_chains < 1 or self.init_noise < 0 or self.step_size < 0 or self.noise < 0:
            raise UserError("SGLD steps, init noise, step size and noise must be >= 0 and chains >= 1")
        for name in ("init_noise", "step_size", "noise"):  # 0 and 0.0 are one defense
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def bare(cls) -> "Refinement":
        """No chain, one copy, no noise: the classifier itself."""
        return cls(sgld_steps=0, n_chains=1, init_noise=0.0)

    @property
    def is_bare(self) -> bool:
        return self == Refinement.bare()

    @property
    def deterministic(self) -> bool:
        """True when the forward pass draws no noise."""
        return self.init_noise == 0 and (self.sgld_steps == 0 or self.noise == 0)

    def fields(self) -> dict[str, Any]:
        """The refinement as row fields (the names rows have always used; ``purifier`` only when there is one)."""
        return {"sgld_steps": self.sgld_steps, "n_chains": self.n_chains, "init_noise": self.init_noise,
                "sgld_step_size": self.step_size, "sgld_noise": self.noise,
                **({"purifier": self.purifier} if self.purifier else {}), **({"sgld_clamp": True} if self.clamp else {})}

    def label(self, objective: str) -> str:
        """The one name of (objective, refinement) in rows, tables and plots.

        Baselines: ``CE``, ``PGD-AT``, ``Gauss-aug``. JEM: ``JEM-k`` for the reference chain (5 copies, init
        noise 0.03, step 1, noise 0.01; Grathwohl et al.'s attack code), ``JEM-bare`` for the classifier
        without chain and noise; any other setting lists what differs from the reference, e.g.
        ``JEM-1[chains=1]``. The adversarially trained JEM likewise: ``JEM-AT-k``, ``JEM-AT-bare``. Two different
        refinements never share a label. Purified by a separate energy model: ``CE+EBM-k[ebm=<its sha256, 8
        digits>]`` (the chain's settings against the reference chain's, like JEM-k).
        """
        base = BASELINE_LABELS.get(objective, objective)
        if self.purifier:
            base = f"{ENERGY_LABELS.get(objective, base)}+EBM-{self.sgld_steps}"
            ref = replace(Refinement(), sgld_steps=self.sgld_steps, purifier=self.purifier)
        elif objective in ENERGY_OBJECTIVES:
            name = ENERGY_LABELS[objective]
            if self.is_bare:
                return f"{name}-bare"
            base = f"{name}-{self.sgld_steps}"
            ref = replace(Refinement(), sgld_steps=self.sgld_steps)
        else:
            if self.is_bare:
                return base
            ref = replace(Refinement.bare(), sgld_steps=self.sgld_steps)
            base = f"{base}+SGLD-{self.sgld_steps}" if self.sgld_steps else base
        diffs = [f"{short}={getattr(self, name):g}" for name, short in
                 (("n_chains", "chains"), ("init_noise", "init_noise"), ("step_size", "step"), ("noise", "noise"))
                 if getattr(self, name) != getattr(ref, name)]
        diffs += (["clamp"] if self.clamp else []) + ([f"ebm={self.purifier[:8]}"] if self.purifier else [])
        return base + (f"[{', '.join(diffs)}]" if diffs else "")


BASELINE_LABELS = {"ce": "CE", "pgd-at": "PGD-AT", "gaussian-aug": "Gauss-aug"}
ENERGY_LABELS = {"jem": "JEM", "jem-at": "JEM-AT"}


def default_refinement(sgld_steps: int, sampler: Any | None = None) -> Refinement:
    """JEM-k of a checkpoint, as the suite defines it everywhere (CLI, study, API): ``k`` steps of *the checkpoint's
    own SGLD sampler* (the step size and noise it was trained with), from 5 copies with init noise 0.03.

    Why the checkpoint's sampler and not a fixed step 1: the paper refines with its training sampler (step 1, noise
    0.01 for both), so for the paper's JEM and official checkpoints the two coincide; a JEM trained with another
    step (the standard preset's 0.1) was never shaped for step 1, and there step 1 climbs its energy instead of
    descending it. ``sampler``: an object with ``step_size`` and ``noise`` (a :class:`~robust_jem.config.SGLDConfig`);
    None gives the reference chain.
    """
    if sampler is None:
        return Refinement(sgld_steps)
    return Refinement(sgld_steps, step_size=float(sampler.step_size), noise=float(sampler.noise))


def refinement_for(objective: str, refinement: Refinement) -> Refinement:
    """The refinement a checkpoint is evaluated with: energy models (JEM, JEM-AT) and any classifier behind a
    purifier as asked, every other baseline bare (a classifier not trained as an energy model has no sampler worth
    running)."""
    return refinement if objective in ENERGY_OBJECTIVES or refinement.purifier else Refinement.bare()


class RefinedClassifier(nn.Module):
    """[0,1] images -> logits averaged over ``n_chains`` SGLD-refined copies.

    Args:
        model: the energy model (its ``logits_z`` / ``energy_z`` are used).
        sgld_steps: k in JEM-k.
        n_chains: copies per input (5 in the reference).
        init_noise: std of the Gaussian added before the chain (0.03 in the reference; 0 and
            ``n_chains=1`` with ``sgld_steps=0`` gives the bare classifier).
        step_size, noise: SGLD settings in the [-1,1] space (reference: 1.0 and 0.01).
        grad_mode: ``"full"`` or ``"bpda"``.
        seed: seed of this module's own noise generator (created lazily on the input's device).
        generator: or an explicit generator to draw from.
        bf16: run the chain and the classifier under bf16 autocast (inputs, chain states and returned
            logits stay fp32); recorded as ``precision`` in :meth:`config`.
        compile: run the backbone through ``torch.compile``. Only for chains the attacker differentiates
            once (``sgld_steps=0`` or ``grad_mode="bpda"``): the full-gradient chain needs double backward,
            which compiled graphs do not support.
        checkpoint: how the full-gradient chain holds its graph: ``"auto"`` (checkpointed beyond
            ``CHECKPOINT_FROM`` steps), ``"always"`` or ``"never"``. Checkpointed (:func:`~robust_jem.sgld.sgld_checkpointed`)
            the chain keeps ~√k states and recomputes segments in the backward: the same gradient to the input at
            memory growing like √k instead of k. Never with ``noise_fn`` (a fixed-noise view redraws its noise per
            call) or when the weights require gradients (they would get none).
        purifier: a separate energy model whose energy the chain descends (long-run EBM purification); the
            classifier ``model`` then only labels the chain's end. ``purifier_id`` names it (its sha256) in
            :attr:`refinement`.

    Shape: (N, C, H, W) -> (N, K).
    """

    def __init__(self, model: EnergyModel, sgld_steps: int = 0, n_chains: int = Refinement.n_chains,
                 init_noise: float = Refinement.init_noise, step_size: float = Refinement.step_size,
                 noise: float = Refinement.noise, grad_mode: str = "full", seed: int = 0,
                 generator: torch.Generator | None = None, bf16: bool = False, compile: bool = False,
                 checkpoint: str = "auto", purifier: EnergyModel | None = None, purifier_id: str = "",
                 clamp: bool = False) -> None:
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
        self.checkpoint = checkpoint
        Refinement(sgld_steps, n_chains, init_noise, step_size, noise, purifier_id, clamp)  # validates
        self.clamp = bool(clamp)
        if (purifier is None) != (not purifier_id):
            raise ValueError("a purifier needs its id (sha256) and an id its purifier")
        if compile and sgld_steps > 0 and grad_mode == "full":
            raise ValueError("compile needs grad_mode='bpda' or sgld_steps=0: backpropagating through the chain "
                             "is a double backward, which torch.compile'd graphs do not support")
        self.model = model
        self.sgld_steps, self.n_chains, self.init_noise = sgld_steps, n_chains, init_noise
        self.step_size, self.noise, self.grad_mode = step_size, noise, grad_mode
        self.seed = seed
        self._generator = generator
        self.bf16, self.compiled = bool(bf16), bool(compile)
        self.purifier, self.purifier_id = purifier, purifier_id
        # plain attributes, not submodules: the weights are registered through ``self.model`` (and ``self.purifier``)
        self.__dict__["_net"] = torch.compile(model.net) if compile else model.net
        chain_net = model.net if purifier is None else purifier.net
        self.__dict__["_energy_net"] = (torch.compile(chain_net) if compile and purifier is not None
                                        else self._net if purifier is None else chain_net)

    @classmethod
    def from_refinement(cls, model: EnergyModel, refinement: Refinement, purifier: EnergyModel | None = None,
                        **kwargs: Any) -> "RefinedClassifier":
        """The classifier of ``refinement`` (``purifier``: the energy model its ``purifier`` names; ``kwargs``:
        grad_mode, seed, bf16, compile)."""
        r = refinement
        return cls(model, r.sgld_steps, n_chains=r.n_chains, init_noise=r.init_noise, step_size=r.step_size,
                   noise=r.noise, purifier=purifier, purifier_id=r.purifier, clamp=r.clamp, **kwargs)

    @property
    def refinement(self) -> Refinement:
        """The defense this module computes (without the attacker's gradient mode and precision)."""
        return Refinement(self.sgld_steps, self.n_chains, self.init_noise, self.step_size, self.noise,
                          self.purifier_id, self.clamp)

    @property
    def deterministic(self) -> bool:
        """True when the forward pass draws no noise (the bare classifier)."""
        return self.refinement.deterministic

    def generator(self, device: torch.device) -> torch.Generator:
        """The module's noise source on ``device`` (created from ``seed`` on first use)."""
        self._generator = generator_on(self._generator, self.seed, device)
        return self._generator

    def reseed(self, seed: int) -> None:
        """Restart the noise stream from ``seed``."""
        self.seed = seed
        self._generator = None

    def extra_repr(self) -> str:
        return (f"sgld_steps={self.sgld_steps}, n_chains={self.n_chains}, init_noise={self.init_noise}, "
                f"step_size={self.step_size}, noise={self.noise}, grad_mode={self.grad_mode!r}, seed={self.seed}"
                + (", bf16=True" if self.bf16 else "") + (", compile=True" if self.compiled else "")
                + (f", purifier={self.purifier_id[:8]}" if self.purifier_id else "") + (", clamp=True" if self.clamp else ""))

    def config(self) -> dict:
        """The refinement's row fields plus the attacker's gradient mode, precision and compilation."""
        return {**self.refinement.fields(), "grad_mode": self.grad_mode, "precision": "bf16" if self.bf16 else "fp32",
                "compiled": self.compiled}

    def scorer(self) -> "RefinedClassifier":
        """The same defense in fp32 and eager mode (its own noise stream): what verdicts are scored with, so
        bf16 or compilation only ever changes the attacker's arithmetic."""
        if not (self.bf16 or self.compiled):
            return self
        return RefinedClassifier.from_refinement(self.model, self.refinement, purifier=self.purifier,
                                                 grad_mode=self.grad_mode, seed=self.seed)

    @property
    def checkpointed(self) -> bool:
        """Whether the full-gradient chain is checkpointed (see ``checkpoint``)."""
        if self.checkpoint == "never" or any(p.requires_grad for p in self.parameters()):
            return False
        return self.checkpoint == "always" or self.sgld_steps > CHECKPOINT_FROM

    def logits_z(self, z: torch.Tensor) -> torch.Tensor:
        """The backbone's logits on internal-space inputs (compiled when asked)."""
        return self._net(z)

    def energy_z(self, z: torch.Tensor) -> torch.Tensor:
        """The energy the chain descends: the classifier's own (JEM-k) or the purifier's (compiled when asked)."""
        return energy_of_logits(self._energy_net(z))

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Per-example energy of [0,1] images where the chain starts (before noise): what an energy-aimed attack
        lowers so the chain has no reason to move its candidate."""
        return self.energy_z(to_internal(x))

    def refine(self, z: torch.Tensor, generator: torch.Generator | None = None,
               noise_fn: NoiseFn | None = None) -> torch.Tensor:
        """Noise + SGLD chain on internal-space inputs already repeated over chains."""
        g = None if noise_fn is not None else (generator or self.generator(z.device))
        if self.init_noise > 0:
            eps = noise_fn(z) if noise_fn is not None else torch.randn(z.shape, generator=g, device=z.device,
                                                                       dtype=z.dtype)
            z = z + self.init_noise * eps
        if self.sgld_steps == 0:
            return z
        bounds = (-1.0, 1.0) if self.clamp else None
        if self.grad_mode == "full":
            if noise_fn is None and self.checkpointed:
                return sgld_checkpointed(self.energy_z, z, self.sgld_steps, self.step_size, self.noise, generator=g,
                                         bounds=bounds)
            return sgld(self.energy_z, z, self.sgld_steps, self.step_size, self.noise, generator=g,
                        differentiable=True, noise_fn=noise_fn, bounds=bounds)
        z_end = sgld(self.energy_z, z.detach(), self.sgld_steps, self.step_size, self.noise, generator=g,
                     noise_fn=noise_fn, bounds=bounds)
        return z + (z_end - z).detach()  # BPDA: forward = chain, backward = identity

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                noise_fn: NoiseFn | None = None) -> torch.Tensor:
        """Logits averaged over chains.

        ``noise_fn`` (optional) replaces the generator as the source of every Gaussian draw: it is called
        with the chain states, shape (n_chains * N, ...) with copy-major rows (row r is a copy of example
        r % N), and returns standard normal noise of that shape. Fixed-noise views for decision-based
        attacks use it to make the noise a function of each input.
        """
        n = x.shape[0]
        z = to_internal(x)
        if self.n_chains > 1:
            z = z.repeat(self.n_chains, *([1] * (z.dim() - 1)))
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            z = self.refine(z, generator, noise_fn)
            logits = self.logits_z(z)
        if self.bf16:
            logits = logits.float()
        return logits.view(self.n_chains, n, -1).mean(0)


