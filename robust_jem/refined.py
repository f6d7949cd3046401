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

import torch
from torch import nn

from .model import EnergyModel, energy_of_logits, to_internal
from .sgld import NoiseFn, sgld

GRAD_MODES = ("full", "bpda")


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

    Shape: (N, C, H, W) -> (N, K).
    """

    def __init__(self, model: EnergyModel, sgld_steps: int = 0, n_chains: int = 5, init_noise: float = 0.03,
                 step_size: float = 1.0, noise: float = 0.01, grad_mode: str = "full", seed: int = 0,
                 generator: torch.Generator | None = None, bf16: bool = False, compile: bool = False) -> None:
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        if sgld_steps < 0 or n_chains < 1 or init_noise < 0 or step_size < 0 or noise < 0:
            raise ValueError("sgld_steps, init_noise, step_size, noise must be >= 0 and n_chains >= 1")
        if compile and sgld_steps > 0 and grad_mode == "full":
            raise ValueError("compile needs grad_mode='bpda' or sgld_steps=0: backpropagating through the chain "
                             "is a double backward, which torch.compile'd graphs do not support")
        self.model = model
        self.sgld_steps, self.n_chains, self.init_noise = sgld_steps, n_chains, init_noise
        self.step_size, self.noise, self.grad_mode = step_size, noise, grad_mode
        self.seed = seed
        self._generator = generator
        self.bf16, self.compiled = bool(bf16), bool(compile)
        # a plain attribute, not a submodule: the weights are ``model.net``'s, registered through ``self.model``
        self.__dict__["_net"] = torch.compile(model.net) if compile else model.net

    @property
    def deterministic(self) -> bool:
        """True when the forward pass draws no noise (the bare classifier)."""
        return self.init_noise == 0 and (self.sgld_steps == 0 or self.noise == 0)

    def generator(self, device: torch.device) -> torch.Generator:
        """The module's noise source on ``device`` (created from ``seed`` on first use)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def reseed(self, seed: int) -> None:
        """Restart the noise stream from ``seed``."""
        self.seed = seed
        self._generator = None

    def extra_repr(self) -> str:
        return (f"sgld_steps={self.sgld_steps}, n_chains={self.n_chains}, init_noise={self.init_noise}, "
                f"step_size={self.step_size}, noise={self.noise}, grad_mode={self.grad_mode!r}, seed={self.seed}"
                + (", bf16=True" if self.bf16 else "") + (", compile=True" if self.compiled else ""))

    def config(self) -> dict:
        """Settings for result rows (``precision`` / ``compiled`` only when set, so default rows keep their keys)."""
        out = {"sgld_steps": self.sgld_steps, "n_chains": self.n_chains, "init_noise": self.init_noise,
               "sgld_step_size": self.step_size, "sgld_noise": self.noise, "grad_mode": self.grad_mode}
        if self.bf16:
            out["precision"] = "bf16"
        if self.compiled:
            out["compiled"] = True
        return out

    def logits_z(self, z: torch.Tensor) -> torch.Tensor:
        """The backbone's logits on internal-space inputs (compiled when asked)."""
        return self._net(z)

    def energy_z(self, z: torch.Tensor) -> torch.Tensor:
        """The energy the chain descends (through the compiled backbone when asked)."""
        return energy_of_logits(self._net(z))

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
        if self.grad_mode == "full":
            return sgld(self.energy_z, z, self.sgld_steps, self.step_size, self.noise, generator=g,
                        differentiable=True, noise_fn=noise_fn)
        z_end = sgld(self.energy_z, z.detach(), self.sgld_steps, self.step_size, self.noise, generator=g,
                     noise_fn=noise_fn)
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


# ------------------------------------------------------------------------------------------------
# labelled variants of a checkpoint for the attack suites
# ------------------------------------------------------------------------------------------------
BASELINE_LABELS = {"ce": "CE", "pgd-at": "PGD-AT", "gaussian-aug": "Gauss-aug"}


def model_label(objective: str, sgld_steps: int) -> str:
    """``JEM-k`` for JEM checkpoints, ``CE`` / ``PGD-AT`` / ``Gauss-aug`` for the baselines."""
    return f"JEM-{sgld_steps}" if objective == "jem" else BASELINE_LABELS.get(objective, objective)


def refined_variants(model: EnergyModel, objective: str, sgld_steps: list[int], grad_modes: list[str], *,
                     n_chains: int = 5, init_noise: float = 0.03, step_size: float = 1.0, noise: float = 0.01,
                     seed: int = 0, bf16: bool = False, compile: bool = False) -> list[tuple[str, RefinedClassifier]]:
    """The classifiers to attack for one checkpoint, labelled.

    A JEM checkpoint gives one ``RefinedClassifier`` per (sgld_steps, grad_mode) (k = 0 once: the chain is
    empty, so both modes coincide). Any other objective is a baseline, attacked as the bare classifier
    (``sgld_steps=0, n_chains=1, init_noise=0``) once, whatever ``sgld_steps`` says.
    """
    if objective != "jem":
        return [(model_label(objective, 0), RefinedClassifier(model, 0, n_chains=1, init_noise=0.0, seed=seed,
                                                              bf16=bf16, compile=compile))]
    out = []
    for k in dict.fromkeys(sgld_steps):
        for mode in (["full"] if k == 0 else list(dict.fromkeys(grad_modes))):
            out.append((model_label("jem", k), RefinedClassifier(model, k, n_chains=n_chains, init_noise=init_noise,
                                                                 step_size=step_size, noise=noise, grad_mode=mode,
                                                                 seed=seed, bf16=bf16, compile=compile)))
    return out
