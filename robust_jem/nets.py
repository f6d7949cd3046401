"""Backbones: WRN-depth-width without batch-norm (as in JEM; with it, for imported JEM++-style models evaluated in
eval mode) and a small CPU CNN. One factory."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import UserError


def _norm(channels: int, norm: str) -> nn.Module:
    """``none`` (JEM): no layer; ``batch`` (JEM++): BatchNorm2d, which the suite only ever runs in eval mode."""
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.Identity()


class _WideBasic(nn.Module):
    """Pre-activation wide block: norm -> LeakyReLU -> conv, twice (JEM's ``norm=None``: no norm)."""

    def __init__(self, c_in: int, c_out: int, stride: int, leak: float, dropout: float, norm: str = "none") -> None:
        super().__init__()
        if norm != "none":  # registered only when present: a norm-free WRN keeps its state-dict keys
            self.bn1, self.bn2 = _norm(c_in, norm), _norm(c_out, norm)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.leak = leak
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=True) if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn1, bn2 = getattr(self, "bn1", None), getattr(self, "bn2", None)
        out = self.dropout(self.conv1(F.leaky_relu(bn1(x) if bn1 is not None else x, self.leak)))
        out = self.conv2(F.leaky_relu(bn2(out) if bn2 is not None else out, self.leak))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``width``, LeakyReLU, without batch-norm (``cfg.norm="none"``, JEM) or with it (``"batch"``,
    JEM++: before every activation and before the final pooling); any input size and channel count.

    Shape: (N, C, H, W) in the model's internal space -> (N, n_classes) logits.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if (cfg.depth - 4) % 6 != 0 or cfg.depth < 10:
            raise UserError(f"WRN depth must be 6n+4 (>= 10), got {cfg.depth}")
        n = (cfg.depth - 4) // 6
        widths = [16, 16 * cfg.width, 32 * cfg.width, 64 * cfg.width]
        self.conv1 = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1, bias=True)
        layers: list[nn.Module] = []
        c_in = widths[0]
        for group, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                layers.append(_WideBasic(c_in, group, stride if i == 0 else 1, cfg.leak, cfg.dropout, cfg.norm))
                c_in = group
        self.blocks = nn.Sequential(*layers)
        if cfg.norm != "none":
            self.bn = _norm(c_in, cfg.norm)
        self.leak = cfg.leak
        self.fc = nn.Linear(c_in, cfg.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv1(x))
        bn = getattr(self, "bn", None)
        h = F.leaky_relu(bn(h) if bn is not None else h, self.leak)
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.fc(h)


class SmallCNN(nn.Module):
    """4 conv (3x3) + 2 max-pool + 2 linear, LeakyReLU: trains in minutes on 2 CPU cores."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if len(cfg.channels) != 4:
            raise UserError(f"the small CNN takes 4 channel counts, got {len(cfg.channels)}")
        c1, c2, c3, c4 = cfg.channels
        self.features = nn.Sequential(
            nn.Conv2d(cfg.in_channels, c1, 3, padding=1), nn.LeakyReLU(cfg.leak),
            nn.Conv2d(c1, c2, 3, padding=1), nn.LeakyReLU(cfg.leak), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.LeakyReLU(cfg.leak),
            nn.Conv2d(c3, c4, 3, padding=1), nn.LeakyReLU(cfg.leak), nn.MaxPool2d(2),
        )
        side = cfg.image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c4 * side * side, cfg.hidden), nn.LeakyReLU(cfg.leak),
            nn.Linear(cfg.hidden, cfg.n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_net(cfg: ModelConfig) -> nn.Module:
    """Build the backbone named by ``cfg.arch`` (``small`` or ``wrn``)."""
    if cfg.arch == "small":
        return SmallCNN(cfg)
    if cfg.arch == "wrn":
        return WideResNet(cfg)
    raise UserError(f"unknown architecture {cfg.arch!r}")
