"""White-box attacks on any module mapping [0,1] images to logits, randomized or not.

An attack is configured once (model, norm, ε, budget) and called on ``(x, y)``. The gradient steps come
from **torchattacks** (PGD, PGDL2, EOTPGD here; APGD, APGD-T, FAB, Square in :mod:`attacks.autoattack`); this
module adds what a stochastic
defense such as JEM's SGLD-refined classifier needs for an honest number (Athalye et al. 2018; Carlini
et al. 2019; Croce & Hein 2020, "rand" version of AutoAttack):

* ``restarts`` runs under explicit seeds (``torch.random.fork_rng`` + ``manual_seed`` around the library's
  use of the global RNG; a model with ``reseed(seed)`` also gets its own noise stream reseeded);
* EOT: ``eot`` gradient draws of the model's noise per step (torchattacks' EOTPGD / APGD ``eot_iter``;
  :class:`EOTPGDL2` is the L2 counterpart torchattacks lacks);
* a final verdict with **fresh** noise: every candidate (the clean input, each restart, each sub-attack)
  is re-scored in ``eval_draws`` draws whose seeds differ from the attack's; an example is robust only if
  it is classified correctly in every draw of every candidate (per-sample worst case). The mean over draws
  (worst candidate per example) is reported beside it.

A model is treated as randomized unless it has ``deterministic == True`` (as
``robust_jem.RefinedClassifier`` with no noise does); a deterministic model needs one eval draw and no EOT,
and the attack records what it actually did (``eot_used``, ``eval_draws_used``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torchattacks
from torch import nn

from infra.norms import ascent_step, delta_norm, project, random_start
from infra.randomness import derive_seed, seeded

from .common import AttackInputError, check_eps, check_images
from .verdict import EVAL_DRAWS, Verdict, is_deterministic

log = logging.getLogger(__name__)

WHITE_NORMS = ("linf", "l2")
TORCHATTACKS_NORM = {"linf": "Linf", "l2": "L2"}
TOL = 1e-6  # slack allowed on ‖δ‖ ≤ ε before a candidate is re-projected (and a warning logged)


# ------------------------------------------------------------------------------------------------
# the attacker's objective
# ------------------------------------------------------------------------------------------------
def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example margin: true-class logit minus the best other logit (negative = misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


class MarginProbe(nn.Module):
    """The attacker's view of a model: the same logits, and at every forward pass on the attacked batch the
    batch's mean margin is recorded (:attr:`trace`), so a row can show how the attack's objective evolved."""

    def __init__(self, model: nn.Module, y: torch.Tensor) -> None:
        super().__init__()
        self.model, self.y = model, y
        self.trace: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if out.dim() == 2 and out.shape[0] == self.y.shape[0]:
            with torch.no_grad():
                self.trace.append(float(margin(out.float(), self.y).mean()))
        return out


def per_step(trace: list[float], draws: int) -> list[float]:
    """A probe's per-call trace averaged over each step's ``draws`` EOT calls."""
    draws = max(1, int(draws))
    return [sum(trace[i:i + draws]) / len(trace[i:i + draws]) for i in range(0, len(trace), draws)]


# ------------------------------------------------------------------------------------------------
# the L2 EOT variant torchattacks lacks
# ------------------------------------------------------------------------------------------------
class EOTPGDL2(torchattacks.PGDL2):
    """PGDL2 with the gradient averaged over ``eot_iter`` forward draws (EOT, Athalye et al. 2018).

    torchattacks 3.5.1 has EOT for L∞ only (:class:`torchattacks.EOTPGD`); this is PGDL2's step with
    EOTPGD's gradient estimate, nothing else changed.
    """

    def __init__(self, model: nn.Module, eps: float = 1.0, alpha: float = 0.2, steps: int = 10,
                 eot_iter: int = 2, random_start: bool = True, eps_for_division: float = 1e-10) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                         eps_for_division=eps_for_division)
        self.attack = "EOTPGDL2"
        self.eot_iter = eot_iter
        self.supported_mode = ["default"]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        loss = nn.CrossEntropyLoss()
        adv = random_start(images, "l2", self.eps).detach() if self.random_start else images.clone().detach()
        for _ in range(self.steps):
            adv.requires_grad = True
            grad = torch.zeros_like(adv)
            for _ in range(self.eot_iter):
                cost = loss(self.get_logits(adv), labels)
                grad += torch.autograd.grad(cost, adv)[0]
            adv = ascent_step(adv.detach(), grad, "l2", self.alpha, self.eps_for_division)
            adv = project(images, adv, "l2", self.eps).detach()
        return adv


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@dataclass
class AttackResult:
    """Per-example outcome of one attack call on a batch.

    Attributes:
        clean: (M, N) bool, correct on the clean input in eval draw m.
        adv: (C, M, N) bool, correct on candidate c (restart / sub-attack) in eval draw m.
        x_adv: (N, ...) the worst candidate per example (the clean input if nothing did worse).
        delta_norm: (N,) largest ‖δ‖ over all candidates, in the attack's norm.
        in_bounds: every candidate lay in [0,1].
        traces: per (sub-attack, restart), the batch's mean margin at each step as the attacker saw it.
    """

    clean: torch.Tensor
    adv: torch.Tensor
    x_adv: torch.Tensor
    delta_norm: torch.Tensor
    in_bounds: bool
    traces: dict[str, list[float]] = field(default_factory=dict)

    @property
    def clean_correct(self) -> torch.Tensor:
        """(N,) bool: correct in every eval draw of the clean input."""
        return self.clean.all(0)

    @property
    def clean_frac(self) -> torch.Tensor:
        """(N,) float: accuracy of one fresh draw on the clean input (:meth:`Verdict.draw_accuracy`)."""
        return Verdict.draw_accuracy(self.clean)

    @property
    def robust(self) -> torch.Tensor:
        """(N,) bool: the verdict (:meth:`Verdict.robust`)."""
        return Verdict.robust(self.clean, self.adv)

    @property
    def robust_frac(self) -> torch.Tensor:
        """(N,) float: fraction of draws correct for the worst candidate (clean input included)."""
        return Verdict.robust_frac(self.clean, self.adv)


# ------------------------------------------------------------------------------------------------
# attacks
# ------------------------------------------------------------------------------------------------
class WhiteBoxAttack:
    """Base class: restarts under explicit seeds, the fresh-noise verdict, the per-sample worst case.

    Subclasses build a torchattacks object (``_build``) once; ``_perturb`` runs it for one restart.

    Args:
        model: [0,1] images -> logits (maybe randomized, see module docstring).
        norm: ``linf`` or ``l2``.
        eps: radius of the threat model (ε = 0 returns the clean inputs without running anything).
        restarts: independent runs; the worst per example counts.
        eval_draws: fresh-noise draws for the verdict (1 is used for a deterministic model).
        seed: root of every seed the attack and the verdict use.
    """

    name = "attack"

    def __init__(self, model: nn.Module, *, norm: str, eps: float, restarts: int = 1, eval_draws: int = EVAL_DRAWS,
                 seed: int = 0) -> None:
        if norm not in WHITE_NORMS:
            raise AttackInputError(f"unknown norm {norm!r}; white-box attacks support {', '.join(WHITE_NORMS)}")
        eps = float(eps)
        check_eps(norm, eps)
        positive_ints(restarts=restarts, eval_draws=eval_draws)
        self.model, self.norm, self.eps = model, norm, eps
        self.restarts, self.eval_draws, self.seed = int(restarts), int(eval_draws), int(seed)
        self.verdict = Verdict(self.eval_draws, self.seed)
        self.scorer: nn.Module = model  # the sweep sets the fp32 view of the defense here
        self.traces: dict[str, list[float]] = {}  # per restart: mean margin per step of the last call
        self.deterministic = is_deterministic(model)
        self.eval_draws_used = self.verdict.draws_for(model)

    # -- configuration --------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Every hyper-parameter (goes into result rows)."""
        return {"norm": self.norm, "eps": self.eps, "restarts": self.restarts, "eval_draws": self.eval_draws,
                "eval_draws_used": self.eval_draws_used, "seed": self.seed}

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    # -- generation -----------------------------------------------------------------------------
    def _perturb(self, x: torch.Tensor, y: torch.Tensor, seed: int, probe: nn.Module) -> torch.Tensor:
        """One restart's adversarial batch, querying the model through ``probe`` (a :class:`MarginProbe`)."""
        raise NotImplementedError

    def candidates(self, x: torch.Tensor, y: torch.Tensor, stream: int = 0,
                   standing: Callable[[], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
        """Adversarial batches, one per restart (nothing when ε = 0). ``stream`` separates batches' seeds.

        ``standing()``, when given, says before each restart which examples are still worth attacking (not yet
        wrong in every verdict draw); the others are left at the clean input, which the caller ignores. A restart
        with nothing standing is skipped (AutoAttack's rule: later attacks only see the points still robust).
        """
        if self.eps == 0:
            return
        for r in range(self.restarts):
            mask = standing() if standing is not None else None
            if mask is not None and not bool(mask.any()):
                return
            part = mask is not None and not bool(mask.all())
            xs, ys = (x[mask], y[mask]) if part else (x, y)
            seed = derive_seed(self.seed, "attack", self.name, r, stream)
            probe = MarginProbe(self.model, ys)
            with seeded(seed, self.model):
                x_adv = self._perturb(xs, ys, seed, probe).detach()
            self.traces[f"{self.name}/r{r}"] = per_step(probe.trace, getattr(self, "eot_used", 1))
            x_adv = self._checked(xs, x_adv)
            if part:
                full = x.clone()
                full[mask] = x_adv
                x_adv = full
            yield x_adv

    def _checked(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        over = float((delta_norm(x_adv - x, self.norm) - self.eps).max())
        if over > TOL or float(x_adv.min()) < 0 or float(x_adv.max()) > 1:
            log.warning("%r returned points outside the threat model (‖δ‖ - ε up to %.2e); projected", self, over)
            x_adv = project(x, x_adv, self.norm, self.eps)
        return x_adv

    # -- verdict --------------------------------------------------------------------------------
    def verdict_of(self, x: torch.Tensor, y: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """(M, N) bool correctness of ``x`` under the verdict's fresh draws, scored by :attr:`scorer`."""
        return self.verdict.score(self.scorer, x, y, stream)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, stream: int = 0) -> AttackResult:
        """Attack a batch: (N, C, H, W) images in [0,1], (N,) labels -> :class:`AttackResult`."""
        check_images(x)
        was_training = self.model.training
        self.model.eval()
        self.reset_traces()
        try:
            clean = self.verdict_of(x, y, stream)
            worst_frac = Verdict.draw_accuracy(clean)
            x_worst = x.clone()
            dnorm = torch.zeros(x.shape[0], device=x.device)
            advs = []
            in_bounds = True
            for x_adv in self.candidates(x, y, stream, standing=lambda: worst_frac > 0):
                ok = self.verdict_of(x_adv, y, stream)
                ok[:, worst_frac == 0] = False  # not attacked again: its earlier candidate stands
                advs.append(ok)
                frac = Verdict.draw_accuracy(ok)
                worse = frac < worst_frac
                x_worst[worse] = x_adv[worse]
                worst_frac = torch.minimum(worst_frac, frac)
                dnorm = torch.maximum(dnorm, delta_norm(x_adv - x, self.norm))
                in_bounds = in_bounds and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
        finally:
            self.model.train(was_training)
        adv = torch.stack(advs) if advs else clean.new_zeros((0, *clean.shape))
        return AttackResult(clean=clean, adv=adv, x_adv=x_worst, delta_norm=dnorm, in_bounds=in_bounds,
                            traces=self.collect_traces())

    def reset_traces(self) -> None:
        self.traces = {}

    def collect_traces(self) -> dict[str, list[float]]:
        """Margin traces of the last call (sub-attacks included)."""
        return dict(self.traces)


class TorchAttack(WhiteBoxAttack):
    """A torchattacks attack built once; seeded per restart (its ``seed`` attribute too, if it has one)."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._attack: torchattacks.Attack | None = None

    def _build(self) -> torchattacks.Attack:
        raise NotImplementedError

    @property
    def torchattack(self) -> torchattacks.Attack:
        """The underlying torchattacks object (built on first use)."""
        if self._attack is None:
            self._attack = self._build()
        return self._attack

    def _perturb(self, x: torch.Tensor, y: torch.Tensor, seed: int, probe: nn.Module) -> torch.Tensor:
        atk = self.torchattack
        if hasattr(atk, "seed"):
            atk.seed = seed  # the APGD family reseeds the global RNG from this (inside our fork)
        atk.model = probe  # torchattacks queries ``self.model`` in get_logits
        try:
            return self._run(atk, x, y)
        finally:
            atk.model = self.model

    def _run(self, atk: torchattacks.Attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return atk(x, y)


class PGD(TorchAttack):
    """Projected gradient descent (Madry et al. 2018) via torchattacks: PGD / PGDL2, EOTPGD / EOTPGDL2.

    Args:
        steps: iterations per restart.
        step_size: α; default ``2.5 * eps / steps`` (Madry et al.), recorded in :meth:`params`.
        eot: gradient draws averaged per step (forced to 1 for a deterministic model).
        random_start: uniform (L∞) / random-radius (L2) start inside the ball.
        (others: see :class:`WhiteBoxAttack`)
    """

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float, steps: int = 10,
                 step_size: float | None = None, eot: int = 1, random_start: bool = True, restarts: int = 1,
                 eval_draws: int = EVAL_DRAWS, seed: int = 0) -> None:
        super().__init__(model, norm=norm, eps=eps, restarts=restarts, eval_draws=eval_draws, seed=seed)
        positive_ints(steps=steps, eot=eot)
        if step_size is not None and not step_size > 0:
            raise AttackInputError(f"step size must be positive, got {step_size}")
        self.steps, self.eot, self.random_start = int(steps), int(eot), bool(random_start)
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps
        self.step_size_given = step_size is not None
        self.eot_used = 1 if self.deterministic else self.eot
        self.name = {("linf", False): "PGD", ("linf", True): "EOTPGD", ("l2", False): "PGDL2",
                     ("l2", True): "EOTPGDL2"}[(self.norm, self.eot_used > 1)]

    def params(self) -> dict[str, Any]:
        return {**super().params(), "steps": self.steps, "step_size": self.step_size,
                "random_start": self.random_start, "eot": self.eot, "eot_used": self.eot_used,
                "loss": "ce"}

    def _build(self) -> torchattacks.Attack:
        common = dict(eps=self.eps, alpha=self.step_size, steps=self.steps, random_start=self.random_start)
        if self.norm == "linf":
            if self.eot_used > 1:
                return torchattacks.EOTPGD(self.model, eot_iter=self.eot_used, **common)
            return torchattacks.PGD(self.model, **common)
        if self.eot_used > 1:
            return EOTPGDL2(self.model, eot_iter=self.eot_used, **common)
        return torchattacks.PGDL2(self.model, **common)


class Transfer(WhiteBoxAttack):
    """A transfer attack: adversarials crafted by ``source`` on a surrogate model (e.g. the bare network of a
    JEM, or an adversarially trained classifier), replayed on ``model`` and judged by the verdict there.

    A refined classifier whose own gradients mislead (masking) is still exposed when points that fool a
    related, easier-to-differentiate model also fool it (Papernot et al. 2017; Athalye et al. 2018).

    Args:
        model: the model under attack (only its verdict is used).
        source: a white-box attack on the surrogate (same norm and ε).
        source_label, source_id: the surrogate's name and defense id (recorded).
    """

    def __init__(self, model: nn.Module, source: WhiteBoxAttack, *, source_label: str, source_id: str | None = None,
                 eval_draws: int = EVAL_DRAWS, seed: int = 0) -> None:
        super().__init__(model, norm=source.norm, eps=source.eps, restarts=1, eval_draws=eval_draws, seed=seed)
        self.source, self.source_label, self.source_id = source, source_label, source_id
        self.name = f"Transfer({source.name}@{source_label})"

    def params(self) -> dict[str, Any]:
        sp = self.source.params()
        return {**super().params(), "source": self.source_label, "source_defense_id": self.source_id,
                "source_attack": self.source.name, "steps": sp.get("steps"), "step_size": sp.get("step_size"),
                "restarts": sp.get("restarts", 1), "eot": sp.get("eot", 1), "eot_used": sp.get("eot_used", 1),
                "source_params": sp}

    def __repr__(self) -> str:
        return f"Transfer(source={self.source_label!r}, source_id={self.source_id!r}, attack={self.source!r})"

    def candidates(self, x: torch.Tensor, y: torch.Tensor, stream: int = 0,
                   standing: Callable[[], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
        yield from self.source.candidates(x, y, stream, standing)

    def reset_traces(self) -> None:
        self.source.reset_traces()

    def collect_traces(self) -> dict[str, list[float]]:
        return {f"{k} (on {self.source_label})": v for k, v in self.source.collect_traces().items()}


# ------------------------------------------------------------------------------------------------
# factories (what the sweep and the CLI use)
# ------------------------------------------------------------------------------------------------
AttackFactory = Callable[[nn.Module, str, float], WhiteBoxAttack]


def positive_ints(**values: int) -> None:
    for name, v in values.items():
        if int(v) != v or v < 1:
            raise AttackInputError(f"{name.replace('_', ' ')} must be a positive integer, got {v}")


EOT_AUTO = 20  # AutoAttack's rand version draws 20 samples per gradient


def resolve_eot(eot: int | str | None, model: nn.Module) -> int:
    """EOT draws for ``model``: an explicit count, or ``auto``/None = 20 for a randomized model, 1 otherwise."""
    if eot in (None, "auto"):
        return 1 if is_deterministic(model) else EOT_AUTO
    return int(eot)


def pgd_factory(*, steps: int = 10, step_size: float | None = None, restarts: int = 1, eot: int | str = "auto",
                eval_draws: int = EVAL_DRAWS, seed: int = 0, random_start: bool = True) -> AttackFactory:
    """``(model, norm, eps) -> PGD(...)`` with the budget fixed once. The step size, when given, is used
    as is for every ε (otherwise ``2.5 * eps / steps``). ``eot="auto"`` draws 20 gradient samples per step on
    a randomized model and 1 on a deterministic one. Validates the budget immediately."""
    if eot != "auto":
        positive_ints(eot=eot)
    positive_ints(steps=steps, restarts=restarts, eval_draws=eval_draws)
    if step_size is not None and not step_size > 0:
        raise AttackInputError(f"step size must be positive, got {step_size}")

    def make(model: nn.Module, norm: str, eps: float) -> WhiteBoxAttack:
        return PGD(model, norm=norm, eps=eps, steps=steps, step_size=step_size, eot=resolve_eot(eot, model),
                   random_start=random_start, restarts=restarts, eval_draws=eval_draws, seed=seed)

    return make


def transfer_factory(source_model: nn.Module, source_label: str, source_id: str | None, *, steps: int = 50,
                     restarts: int = 2, eval_draws: int = EVAL_DRAWS, seed: int = 0) -> AttackFactory:
    """``(model, norm, eps) -> Transfer``: PGD (``steps``, ``restarts``, EOT auto) on ``source_model``, judged
    on ``model``."""
    source = pgd_factory(steps=steps, restarts=restarts, eval_draws=1, seed=seed)

    def make(model: nn.Module, norm: str, eps: float) -> WhiteBoxAttack:
        return Transfer(model, source(source_model, norm, eps), source_label=source_label, source_id=source_id,
                        eval_draws=eval_draws, seed=seed)

    return make
