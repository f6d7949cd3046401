"""A model under attack: a labelled module mapping [0,1] images to logits, and the defense it stands for.

The attack side knows nothing about checkpoints or SGLD: whoever builds a :class:`Target` (the suite's
``suite.targets.build_targets``) says what the defense is in ``defense`` (plain JSON fields: objective,
refinement settings, ...). The defense identity is (checkpoint sha256, ``defense``); its ``label`` names it
in every row, table and plot, and the headline groups rows by :attr:`Target.defense_id`, so two defenses are
never merged. How the defense is attacked (gradient mode, precision, compilation) is *not* part of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from infra.provenance import module_sha256
from infra.records import row_key

from .verdict import is_deterministic


def defense_id(checkpoint_sha256: str | None, defense: dict[str, Any]) -> str:
    """Stable short id of a defense: its weights and everything else that defines its forward pass."""
    return row_key({"checkpoint_sha256": checkpoint_sha256, **defense})


@dataclass
class Target:
    """A model under attack.

    Args:
        label: the defense's one name (``CE``, ``PGD-AT``, ``JEM-10`` ...).
        model: what the attacker runs and differentiates ([0,1] images -> logits; maybe bf16 or compiled).
        defense: JSON fields that define the defense (objective, refinement ...), copied into rows.
        checkpoint: file the weights came from, if any; checkpoint_sha256: its hash. Without one, the sha256
            of the module's state goes into ``defense`` as ``weights_sha256``.
        scorer: what verdicts are scored with (the same defense in fp32, eager); default ``model``.
        attacker: how the attacker computes gradients through it (``grad_mode``, ``precision``,
            ``compiled``), copied into rows; not part of the defense identity.
        code: hash of the code that computes the defense (goes into row keys).
    """

    label: str
    model: nn.Module
    defense: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    scorer: nn.Module | None = None
    attacker: dict[str, Any] = field(default_factory=lambda: {"grad_mode": "full", "precision": "fp32",
                                                               "compiled": False})
    code: str = ""

    def __post_init__(self) -> None:
        if self.scorer is None:
            self.scorer = self.model
        if self.checkpoint_sha256 is None and "weights_sha256" not in self.defense:
            # no checkpoint file: the weights themselves are the identity (two models never share a row)
            self.defense = {**self.defense, "weights_sha256": module_sha256(self.model)}

    @property
    def defense_id(self) -> str:
        return defense_id(self.checkpoint_sha256, self.defense)

    @property
    def deterministic(self) -> bool:
        return is_deterministic(self.scorer)

    @property
    def device(self) -> torch.device:
        """Where the model's weights live (the CPU for a module without any)."""
        return next(self.model.parameters(), torch.empty(0)).device

    def fields(self, attacker: bool = True) -> dict[str, Any]:
        """Row fields: the label, the defense identity and (unless ``attacker`` is False, e.g. for an evaluation
        that takes no gradients) how it was attacked."""
        return {"model": self.label, "defense_id": self.defense_id, "checkpoint_sha256": self.checkpoint_sha256,
                **self.defense, **(self.attacker if attacker else {}), "deterministic": self.deterministic,
                "defense_code": self.code}
