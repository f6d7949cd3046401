"""How hard a white-box job attacks: the attack settings a job carries (frozen, so a study stage records them as
JSON), each making its attack factory once the data set's class count and the job's seed are known."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attacks.adaptive import adaptive_factory
from attacks.autoattack import AA_VERSIONS, autoattack_factory
from attacks.verdict import EVAL_DRAWS
from attacks.white import pgd_factory


@dataclass(frozen=True)
class PGDSettings:
    """torchattacks PGD / PGDL2 / EOTPGD (+ our EOTPGDL2): steps, α (None: 2.5·ε/steps), EOT (``auto``: 20 on a
    randomized model, 1 on a deterministic one), restarts."""

    steps: int = 10
    step_size: float | None = None
    eot: int | str = "auto"
    restarts: int = 1
    eval_draws: int = EVAL_DRAWS

    def factory(self, n_classes: int, seed: int) -> Any:
        return pgd_factory(steps=self.steps, step_size=self.step_size, restarts=self.restarts, eot=self.eot,
                           eval_draws=self.eval_draws, seed=seed)


@dataclass(frozen=True)
class AutoAttackSettings:
    """AutoAttack components (torchattacks): ``rand`` (APGD-CE + APGD-DLR with EOT), ``standard``, ``auto``."""

    attacks: tuple[str, ...] | None = None
    version: str = "auto"
    steps: int = 100
    eot: int | None = None
    n_queries: int = 5000
    restarts: int = 1
    eval_draws: int = EVAL_DRAWS
    n_targets: int | None = None  # APGD-T's target classes (None: all others)

    def factory(self, n_classes: int, seed: int) -> Any:
        return autoattack_factory(attacks=self.attacks, version=self.version, steps=self.steps, eot=self.eot,
                                  restarts=self.restarts, eval_draws=self.eval_draws, seed=seed,
                                  n_queries=self.n_queries, n_classes=n_classes, n_targets=self.n_targets)


@dataclass(frozen=True)
class TransferSettings:
    """Transfer: PGD (EOT auto) on the bare network of ``source`` (a checkpoint), replayed on every target."""

    source: str
    steps: int = 50
    restarts: int = 2
    eval_draws: int = EVAL_DRAWS

    def factory(self, n_classes: int, seed: int) -> Any:
        raise TypeError("a transfer attack needs its surrogate loaded: use whitebox()")


@dataclass(frozen=True)
class AdaptiveSettings:
    """An attack aimed at a refined, randomized defense (:mod:`attacks.adaptive`): ``margin-pgd``, ``energy-pgd``
    (margin loss plus ``energy_weight`` x the negative energy), ``fixed-noise-pgd`` (the fixed-seed deployment) or
    ``square-eot`` (gradient-free, ``n_queries`` queries of ``eot`` averaged draws)."""

    name: str = "energy-pgd"
    steps: int = 100
    eot: int | str = "auto"
    energy_weight: float = 1.0
    n_queries: int = 1000
    restarts: int = 1
    eval_draws: int = EVAL_DRAWS

    def factory(self, n_classes: int, seed: int) -> Any:
        return adaptive_factory(self.name, steps=self.steps, eot=self.eot, energy_weight=self.energy_weight,
                                n_queries=self.n_queries, restarts=self.restarts, eval_draws=self.eval_draws,
                                seed=seed)


def stronger(settings: PGDSettings | AutoAttackSettings) -> AutoAttackSettings:
    """The larger budget a command's survivors meet by default: APGD with the margin-type DLR loss (and CE for an
    AutoAttack run), 4x the steps (at least 20), one more restart, EOT 20 on a randomized model (or the run's own
    EOT when given), the same verdict."""
    eot = settings.eot if isinstance(settings.eot, int) else None
    names = ("apgd-dlr",) if isinstance(settings, PGDSettings) else ("apgd-ce", "apgd-dlr")
    return AutoAttackSettings(attacks=names, steps=max(20, 4 * settings.steps), eot=eot,
                              restarts=settings.restarts + 1, eval_draws=settings.eval_draws)


def budget_name(settings: Any) -> str:
    """An attack named by its real budget, for stage names and tables: "AutoAttack-rand" only at AutoAttack's own
    (APGD-CE + APGD-DLR, 100 iterations, EOT 20); everything else says its iterations and EOT draws."""
    eot = 20 if getattr(settings, "eot", None) in (None, "auto") else settings.eot
    if isinstance(settings, PGDSettings):
        return f"PGD {settings.steps} it x {settings.restarts}, EOT {eot}"
    if isinstance(settings, AutoAttackSettings):
        names = tuple(settings.attacks or AA_VERSIONS["rand" if settings.version == "auto" else settings.version])
        if sorted(names) == ["apgd-ce", "apgd-dlr"] and settings.steps >= 100 and eot >= 20:
            return f"AutoAttack-rand (APGD-CE+APGD-DLR {settings.steps} it, EOT {eot})"
        targets = f", {settings.n_targets} targets" if "apgd-t" in names and settings.n_targets else ""
        return f"{'+'.join(n.upper() for n in names)} {settings.steps} it, EOT {eot}{targets}"
    if isinstance(settings, AdaptiveSettings):
        if settings.name == "square-eot":
            return f"Square {settings.n_queries} queries x EOT {eot}"
        what = {"margin-pgd": "margin PGD", "energy-pgd": f"energy-aimed PGD (λ={settings.energy_weight:g})",
                "fixed-noise-pgd": "fixed-noise PGD"}[settings.name]
        return f"{what} {settings.steps} it" + ("" if settings.name == "fixed-noise-pgd" else f", EOT {eot}")
    return type(settings).__name__
