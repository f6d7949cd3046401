"""The energy-based classifier: [0,1] images in, logits out; E(x) = -logsumexp_y f(x)[y].

Normalisation to the backbone's [-1, 1] space lives here, so every attack library sees the one
contract "a module mapping [0,1] images to logits". SGLD works in the internal space (``*_z``
methods), where the JEM paper's step size and noise are defined.
"""

from __future__ import annotations

import torch
from torch import nn

from infra.energy import energy_of_logits

from .config import ModelConfig
from .nets import make_net


def to_internal(x: torch.Tensor) -> torch.Tensor:
    """[0,1] images -> the backbone's [-1,1] space."""
    return x * 2.0 - 1.0


def to_pixels(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_internal` (no clamping)."""
    return (z + 1.0) * 0.5


class EnergyModel(nn.Module):
    """A classifier read as an energy-based model (JEM).

    Shape: ``forward`` (N, C, H, W) in [0,1] -> (N, K) logits.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = make_net(cfg)

    def logits_z(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of inputs already in the internal [-1,1] space."""
        return self.net(z)

    def energy_z(self, z: torch.Tensor) -> torch.Tensor:
        """E(z) = -logsumexp(logits), shape (N,), in fp32 (or the input's precision when higher)."""
        return energy_of_logits(self.net(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_internal(x))

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Energy of [0,1] images, shape (N,)."""
        return self.energy_z(to_internal(x))
