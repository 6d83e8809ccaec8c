"""Images people would rather look at than read: sample grids and 2-D scatter plots (no Lightning)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def grid_image(images: Tensor, nrow: int, scale: int = 4, pad: int = 1,
               row_labels: list[str] | None = None) -> Image.Image:
    """(N, C, H, W) images in [-1, 1] -> one PIL image, `nrow` images per row, upscaled by `scale` (nearest).
    `row_labels` (one per row, e.g. the prompt of each row) are written to the right of their rows."""
    images = images.detach().float().cpu().clamp(-1, 1)
    N, C, H, W = images.shape
    rows = (N + nrow - 1) // nrow
    canvas = torch.ones(C, rows * (H + pad) + pad, nrow * (W + pad) + pad)
    for i in range(N):
        r, c = divmod(i, nrow)
        canvas[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = images[i]
    arr = ((canvas + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if C == 1 else arr, mode="L" if C == 1 else "RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if row_labels:
        img = _label_rows(img, row_labels, row_height=(H + pad) * scale, top=pad * scale)
    return img


def _label_rows(img: Image.Image, labels: list[str], row_height: int, top: int) -> Image.Image:
    """The grid with a white margin on the right holding one text line per row (PIL's built-in font)."""
    from PIL import ImageDraw, ImageFont

    size = max(9, min(14, row_height // 3))
    try:
        font = ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    width = max(int(draw.textlength(text, font=font)) for text in labels) + 12
    out = Image.new(img.mode, (img.width + width, img.height), 255 if img.mode == "L" else (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    ink = 0 if img.mode == "L" else (0, 0, 0)
    for r, text in enumerate(labels):
        y = top + r * row_height + max(0, (row_height - size) // 2)
        draw.text((img.width + 6, y), text, fill=ink, font=font)
    return out


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
    return _to_image(fig)


def _to_image(fig) -> Image.Image:
    """Render a matplotlib figure to a PIL image and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
    plt.close(fig)
    return Image.fromarray(arr)


def proposal_image(p: Tensor, q: Tensor, m2: Tensor | None = None, seen: Tensor | None = None, lo: int = 0,
                   hi: int | None = None, title: str = "") -> Image.Image:
    """The timestep proposal q(t) over the base p(t), with the per-bin second moment E||g||^2 that drives it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = p.numel()
    hi = T - 1 if hi is None else hi
    t = np.arange(T)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(t, p.double().cpu().numpy(), color="tab:gray", lw=1.5, label="p(t) (base)")
    ax.plot(t, q.double().cpu().numpy(), color="tab:blue", lw=1.5, label="q(t) (proposal)")
    ax.set_xlabel("time index t")
    ax.set_ylabel("probability")
    if m2 is not None and seen is not None and bool(seen.any()):
        ax2 = ax.twinx()
        bins = m2.numel()
        edges = np.linspace(lo, hi + 1, bins + 1)
        centers = 0.5 * (edges[:-1] + edges[1:])
        vals = m2.double().cpu().numpy().copy()
        vals[~seen.cpu().numpy()] = np.nan
        ax2.plot(centers, vals, "o", ms=3, color="tab:orange", label="E||g||^2 per bin")
        ax2.set_yscale("log")
        ax2.set_ylabel("second moment", color="tab:orange")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=9)
    return _to_image(fig)
