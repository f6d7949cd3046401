"""Image grids as PNG (matplotlib; no torchvision): replay-buffer samples, SGLD chains, distal adversarials."""

from __future__ import annotations

import math
import os

import torch

from infra.io import atomic_write


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 10,
              row_labels: list[str] | None = None, scale: int = 1) -> None:
    """Save [0,1] images (N, C, H, W) as one PNG grid (matplotlib; no torchvision). ``scale`` enlarges each
    pixel (nearest); ``row_labels`` names the rows (a figure with the labels on the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = images.detach().float().clamp(0, 1).cpu()
    if scale > 1:
        images = images.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + 2) + 2, nrow * (w + 2) + 2)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = images[i]
    arr = grid.permute(1, 2, 0).numpy()
    image = arr[..., 0] if c == 1 else arr
    cmap = "gray" if c == 1 else None
    if not row_labels:
        atomic_write(path, lambda f: plt.imsave(f, image, cmap=cmap, vmin=0, vmax=1, format="png"))
        return
    dpi = 100
    fig = plt.figure(figsize=(image.shape[1] / dpi + 1.6, image.shape[0] / dpi + 0.2), dpi=dpi)
    ax = fig.add_axes((1.6 / (image.shape[1] / dpi + 1.6), 0, 1 - 1.6 / (image.shape[1] / dpi + 1.6), 1))
    ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([2 + r * (h + 2) + h / 2 for r in range(min(rows, len(row_labels)))],
                  row_labels[:rows], fontsize=9)
    for side in ax.spines.values():
        side.set_visible(False)
    atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))
    plt.close(fig)
