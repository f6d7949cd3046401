"""How much an SGLD refinement acts on its inputs: an inactive refinement cannot buy robustness, so a JEM-k verdict
is only read beside this measure.

For images ``x`` and a refinement (k steps, c chains, init noise, step size, noise) it runs the chains exactly as
:class:`~robust_jem.refined.RefinedClassifier` does and reports, per example averaged over chains:

* the chain's displacement, from its start (the input plus the init noise) to its end, in L2 and L∞, in [0,1]
  pixel units (the internal [-1,1] distance / 2), so it reads beside the ε attacked;
* the energy the chain descends (E = -logsumexp of the logits: the classifier's, or a purifier's) at the chain's
  start and at its end, and its change;
* how many predictions the refinement changes: against the bare classifier and against JEM-0 (the same init
  noise and chains without SGLD steps, drawn from the same seed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from infra.randomness import generator

from .model import EnergyModel, to_internal
from .refined import RefinedClassifier, Refinement

#: a refinement that changes fewer predictions than this (against the bare classifier) is reported as inactive
INACTIVE_BELOW = 0.01


@dataclass(frozen=True)
class Activity:
    """What a refinement does to a set of images (means over examples; distances in [0,1] pixel units)."""

    n: int
    displacement_l2: float
    displacement_linf: float
    energy_start: float
    energy_end: float
    changed_vs_bare: float  # fraction of predictions that differ from the bare classifier's
    changed_vs_jem0: float  # ... from JEM-0's (same init noise and chains, no SGLD steps)
    accuracy_bare: float
    accuracy_refined: float

    @property
    def inactive(self) -> bool:
        """Fewer than :data:`INACTIVE_BELOW` of the predictions change against the bare classifier."""
        return self.changed_vs_bare < INACTIVE_BELOW

    def fields(self) -> dict[str, Any]:
        return {"n": self.n, "displacement_l2": self.displacement_l2, "displacement_linf": self.displacement_linf,
                "energy_start": self.energy_start, "energy_end": self.energy_end,
                "energy_change": self.energy_end - self.energy_start, "changed_vs_bare": self.changed_vs_bare,
                "changed_vs_jem0": self.changed_vs_jem0, "accuracy_bare": self.accuracy_bare,
                "accuracy_refined": self.accuracy_refined, "inactive": self.inactive}


def refinement_activity(model: EnergyModel, refinement: Refinement, x: torch.Tensor, y: torch.Tensor, *,
                        seed: int = 0, batch_size: int = 250, purifier: EnergyModel | None = None) -> Activity:
    """Measure ``refinement`` on images ``x`` (N, C, H, W) in [0,1] with labels ``y`` (see the module's doc).

    The chains are drawn as :meth:`RefinedClassifier.refine` draws them (init noise, then the SGLD steps, from one
    generator); the displacement is the chain's own, from its start after the init noise to its end, so JEM-0's
    noise is not counted as refinement."""
    r, c = refinement, refinement.n_chains
    steps_only = RefinedClassifier.from_refinement(model, replace(r, init_noise=0.0), purifier=purifier)
    sums = torch.zeros(8, dtype=torch.float64)
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size].to(x.device)
        n = xb.shape[0]
        z0 = to_internal(xb)
        g = generator(seed + i, x.device)
        z_start = z0.repeat(c, *([1] * (z0.dim() - 1)))
        if r.init_noise > 0:  # the same draw RefinedClassifier.refine makes first
            z_start = z_start + r.init_noise * torch.randn(z_start.shape, generator=g, device=x.device,
                                                           dtype=z_start.dtype)
        with torch.enable_grad():
            z_end = steps_only.refine(z_start, g).detach()
        with torch.no_grad():
            step = (z_end - z_start).flatten(1) / 2  # [-1,1] -> [0,1] pixel units
            l2 = step.norm(dim=1).view(c, n).mean(0)
            linf = step.abs().amax(dim=1).view(c, n).mean(0)
            bare_logits = model.logits_z(z0)
            end_logits = model.logits_z(z_end)
            refined = end_logits.view(c, n, -1).mean(0).argmax(1)
            jem0 = model.logits_z(z_start).view(c, n, -1).mean(0).argmax(1)
            e0 = steps_only.energy_z(z_start).view(c, n).mean(0)  # the energy the chain descends
            e1 = steps_only.energy_z(z_end).view(c, n).mean(0)
            bare = bare_logits.argmax(1)
            sums += torch.tensor([l2.sum(), linf.sum(), e0.sum(), e1.sum(), (refined != bare).sum(),
                                  (refined != jem0).sum(), (bare == yb).sum(), (refined == yb).sum()],
                                 dtype=torch.float64)
    m = (sums / max(1, x.shape[0])).tolist()
    return Activity(int(x.shape[0]), *m)
