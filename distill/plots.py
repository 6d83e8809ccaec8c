"""Images people would rather look at than read: sample grids and 2-D scatter plots (no Lightning)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def grid_image(images: Tensor, nrow: int, scale: int = 4, pad: int = 1) -> Image.Image:
    """(N, C, H, W) images in [-1, 1] -> one PIL image, `nrow` images per row, upscaled by `scale` (nearest)."""
    images = images.detach().float().cpu().clamp(-1, 1)
    N, C, H, W = images.shape
    rows = (N + nrow - 1) // nrow
    canvas = torch.ones(C, rows * (H + pad) + pad, nrow * (W + pad) + pad)
    for i in range(N):
        r, c = divmod(i, nrow)
        canvas[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = images[i]
    arr = ((canvas + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if C == 1 else arr, mode="L" if C == 1 else "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_atomic(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def scatter_image(points: Tensor, reference: Tensor | None = None, title: str = "", size: float = 4.0) -> Image.Image:
    """2-D samples (and optionally reference samples) as a scatter plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    if reference is not None:
        ref = reference.detach().cpu().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.3, c="tab:gray", label="teacher")
    pts = points.detach().float().cpu().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.6, c="tab:blue", label="generator")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
    plt.close(fig)
    return Image.fromarray(arr)
