"""AutoAttack from torchattacks components (Croce & Hein 2020): APGD-CE / APGD-DLR / APGD-T, FAB-T and Square,
each a :class:`~attacks.white.WhiteBoxAttack` (restarts under explicit seeds, EOT, the fresh-noise verdict), and
their per-example worst case (:class:`WorstOf`). ``rand`` is the version for randomized defenses (APGD-CE +
APGD-DLR with EOT), ``standard`` the one for deterministic ones.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
import torchattacks
from torch import nn

from .common import AttackInputError
from .verdict import EVAL_DRAWS, is_deterministic
from .white import TORCHATTACKS_NORM, AttackFactory, TorchAttack, WhiteBoxAttack, positive_ints, resolve_eot

ATTACK_NAMES = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
AA_VERSIONS = {"rand": ("apgd-ce", "apgd-dlr"), "standard": ("apgd-ce", "apgd-t", "fab-t", "square")}


class APGD(TorchAttack):
    """Auto-PGD (Croce & Hein 2020) via torchattacks: ``loss`` ``ce`` / ``dlr``, or ``targeted=True``
    for APGD-T (DLR, all ``n_classes - 1`` runner-up targets). EOT through ``eot_iter``."""

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float, steps: int = 100, loss: str = "ce",
                 targeted: bool = False, eot: int = 1, rho: float = 0.75, n_classes: int = 10,
                 n_targets: int | None = None, restarts: int = 1, eval_draws: int = EVAL_DRAWS,
                 seed: int = 0) -> None:
        super().__init__(model, norm=norm, eps=eps, restarts=restarts, eval_draws=eval_draws, seed=seed)
        positive_ints(steps=steps, eot=eot, n_classes=n_classes)
        if loss not in ("ce", "dlr"):
            raise AttackInputError(f"APGD loss must be ce or dlr, got {loss!r}")
        self.steps, self.loss, self.targeted, self.rho = int(steps), loss, bool(targeted), float(rho)
        self.eot, self.n_classes = int(eot), int(n_classes)
        self.n_targets = min(int(n_targets or n_classes - 1), self.n_classes - 1)
        self.eot_used = 1 if self.deterministic else self.eot
        self.name = "APGD-T" if self.targeted else f"APGD-{loss.upper()}"

    def params(self) -> dict[str, Any]:
        p = {**super().params(), "steps": self.steps, "loss": "dlr-targeted" if self.targeted else self.loss,
             "eot": self.eot, "eot_used": self.eot_used, "rho": self.rho}
        if self.targeted:
            p["n_classes"], p["n_targets"] = self.n_classes, self.n_targets
        return p

    def _build(self) -> torchattacks.Attack:
        common = dict(norm=TORCHATTACKS_NORM[self.norm], eps=self.eps, steps=self.steps, n_restarts=1, seed=self.seed,
                      eot_iter=self.eot_used, rho=self.rho)
        if self.targeted:
            atk = torchattacks.APGDT(self.model, n_classes=self.n_classes, **common)
            atk.n_target_classes = self.n_targets
            return atk
        return torchattacks.APGD(self.model, loss=self.loss, **common)

    def _run(self, atk: torchattacks.Attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One APGD run on every example. torchattacks' ``perturb`` hands back the *clean* image for each
        example its own single noisy check did not flip; on a randomized model that throws away the attack's
        work exactly where the model looks robust. Here the candidate is the adversarial APGD found where it
        flipped the prediction at least once, and its maximum-loss iterate everywhere else, so the fresh-noise
        verdict judges a real attack point for every example (APGD-T likewise, over its target classes)."""
        if not self.targeted:
            return self._single(atk, x, y)[0]
        # APGD-T: one run per target (the runner-up classes in turn); an example keeps the first target's point
        # that flipped it, or the runner-up target's maximum-loss iterate when none did
        out, done = None, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for target_class in range(2, atk.n_target_classes + 2):
            atk.target_class = target_class
            cand, flipped = self._single(atk, x, y)
            take = flipped & ~done if out is not None else torch.ones_like(done)
            out = cand if out is None else torch.where(take.view(-1, *([1] * (x.dim() - 1))), cand, out)
            done |= flipped
        return out

    @staticmethod
    def _single(atk: torchattacks.Attack, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            best, acc, _, best_adv = atk.attack_single_run(x.clone().detach(), y.clone().detach())
        flipped = acc == 0
        return torch.where(flipped.view(-1, *([1] * (x.dim() - 1))), best_adv, best).detach(), flipped


class FAB(TorchAttack):
    """FAB-T (Croce & Hein 2020), multi-targeted, via torchattacks (for deterministic models)."""

    name = "FAB-T"

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float, steps: int = 100, n_classes: int = 10,
                 restarts: int = 1, eval_draws: int = EVAL_DRAWS, seed: int = 0) -> None:
        super().__init__(model, norm=norm, eps=eps, restarts=restarts, eval_draws=eval_draws, seed=seed)
        positive_ints(steps=steps, n_classes=n_classes)
        self.steps, self.n_classes = int(steps), int(n_classes)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "steps": self.steps, "n_classes": self.n_classes, "multi_targeted": True}

    def _build(self) -> torchattacks.Attack:
        return torchattacks.FAB(self.model, norm=TORCHATTACKS_NORM[self.norm], eps=self.eps, steps=self.steps, n_restarts=1,
                                seed=self.seed, multi_targeted=True, n_classes=self.n_classes)


class Square(TorchAttack):
    """Square Attack (Andriushchenko et al. 2020), score-based, via torchattacks."""

    name = "Square"

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float, n_queries: int = 5000,
                 p_init: float = 0.8, restarts: int = 1, eval_draws: int = EVAL_DRAWS, seed: int = 0) -> None:
        super().__init__(model, norm=norm, eps=eps, restarts=restarts, eval_draws=eval_draws, seed=seed)
        positive_ints(n_queries=n_queries)
        self.n_queries, self.p_init = int(n_queries), float(p_init)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "n_queries": self.n_queries, "p_init": self.p_init, "loss": "margin"}

    def _build(self) -> torchattacks.Attack:
        return torchattacks.Square(self.model, norm=TORCHATTACKS_NORM[self.norm], eps=self.eps, n_queries=self.n_queries,
                                   n_restarts=1, p_init=self.p_init, loss="margin", seed=self.seed)


class WorstOf(WhiteBoxAttack):
    """Per-sample worst case over several attacks (AutoAttack's ensemble rule), judged by the shared
    fresh-noise verdict rather than by each attack's own noisy success check."""

    def __init__(self, attacks: Sequence[WhiteBoxAttack]) -> None:
        if not attacks:
            raise AttackInputError("WorstOf needs at least one attack")
        first = attacks[0]
        for a in attacks[1:]:
            if (a.model, a.norm, a.eps, a.eval_draws, a.seed) != (first.model, first.norm, first.eps,
                                                                  first.eval_draws, first.seed):
                raise AttackInputError("WorstOf: attacks must share model, norm, ε, eval draws and seed")
        super().__init__(first.model, norm=first.norm, eps=first.eps, restarts=1, eval_draws=first.eval_draws,
                         seed=first.seed)
        self.attacks = list(attacks)
        self.name = "+".join(a.name for a in attacks)

    def params(self) -> dict[str, Any]:
        p = super().params()
        subs = [a.params() for a in self.attacks]
        for name in ("restarts", "steps", "eot", "eot_used"):  # the largest over the parts, for the row
            p[name] = max((s[name] for s in subs if name in s), default=1)
        p["attacks"] = [{"attack": a.name, **s} for a, s in zip(self.attacks, subs)]
        return p

    def __repr__(self) -> str:
        return f"WorstOf({', '.join(map(repr, self.attacks))})"

    def candidates(self, x: torch.Tensor, y: torch.Tensor, stream: int = 0,
                   standing: Callable[[], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
        for a in self.attacks:
            yield from a.candidates(x, y, stream, standing)

    def reset_traces(self) -> None:
        for a in self.attacks:
            a.reset_traces()

    def collect_traces(self) -> dict[str, list[float]]:
        return {k: v for a in self.attacks for k, v in a.collect_traces().items()}


def autoattack_factory(*, attacks: Sequence[str] | None = None, version: str = "auto", steps: int = 100,
                       eot: int | None = None, restarts: int = 1, eval_draws: int = EVAL_DRAWS, seed: int = 0,
                       n_queries: int = 5000, n_classes: int = 10, n_targets: int | None = None) -> AttackFactory:
    """AutoAttack-style ensembles from torchattacks components, worst case per example.

    ``version``: ``rand`` (APGD-CE + APGD-DLR with EOT, for randomized defenses), ``standard`` (APGD-CE,
    APGD-T, FAB-T, Square) or ``auto`` (``rand`` for randomized models, ``standard`` for deterministic
    ones). ``attacks`` (names from :data:`ATTACK_NAMES` minus ``pgd``) overrides the version's list.
    ``eot`` defaults to 20 (AutoAttack's rand version) and is 1 for deterministic models. ``n_targets``: APGD-T's
    target classes (default all ``n_classes - 1``; AutoAttack's standard version uses 9).
    """
    if version not in ("auto", *AA_VERSIONS):
        raise AttackInputError(f"unknown AutoAttack version {version!r}; choose auto, rand or standard")
    names = list(attacks) if attacks else None
    bad = [a for a in names or [] if a not in ATTACK_NAMES or a == "pgd"]
    if bad:
        raise AttackInputError(f"unknown attack {bad[0]!r}; choose from {', '.join(ATTACK_NAMES[1:])}")
    positive_ints(steps=steps, restarts=restarts, eval_draws=eval_draws, n_queries=n_queries, n_classes=n_classes)
    if eot is not None:
        positive_ints(eot=eot)

    def make(model: nn.Module, norm: str, eps: float) -> WhiteBoxAttack:
        det = is_deterministic(model)
        chosen = names or list(AA_VERSIONS[version if version != "auto" else ("standard" if det else "rand")])
        common = dict(norm=norm, eps=eps, restarts=restarts, eval_draws=eval_draws, seed=seed)
        e = resolve_eot(eot, model)
        built: list[WhiteBoxAttack] = []
        for name in chosen:
            if name == "apgd-ce":
                built.append(APGD(model, steps=steps, loss="ce", eot=e, **common))
            elif name == "apgd-dlr":
                built.append(APGD(model, steps=steps, loss="dlr", eot=e, **common))
            elif name == "apgd-t":
                built.append(APGD(model, steps=steps, targeted=True, eot=e, n_classes=n_classes,
                                  n_targets=n_targets, **common))
            elif name == "fab-t":
                built.append(FAB(model, steps=steps, n_classes=n_classes, **common))
            else:
                built.append(Square(model, n_queries=n_queries, **common))
        return built[0] if len(built) == 1 else WorstOf(built)

    return make
