"""Image grids and PNGs (no torchvision): what sample callbacks and commands write for people to look at."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor


def to_uint8(x: Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (grayscale repeated)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(
    x: Tensor, nrow: int | None = None, pad: int = 1, upscale: int = 1, pad_value: int = 255
) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> one uint8 image [H', W', 3]; ``upscale`` repeats pixels (nearest)."""
    imgs = to_uint8(x)
    if upscale > 1:
        imgs = imgs.repeat(upscale, axis=1).repeat(upscale, axis=2)
    B, H, W, _ = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = math.ceil(B / nrow)
    grid = np.full((ncol * (H + pad) + pad, nrow * (W + pad) + pad, 3), pad_value, np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = (
            imgs[i]
        )
    return grid


def side_by_side(panels: dict[str, np.ndarray], gap: int = 12, title_h: int = 16) -> np.ndarray:
    """Place labelled uint8 images next to each other (e.g. samples beside real images)."""
    h = max(p.shape[0] for p in panels.values())
    w = sum(p.shape[1] for p in panels.values()) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (w, h + title_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, p in panels.items():
        canvas.paste(Image.fromarray(p), (x, title_h))
        draw.text((x + 2, 2), label, fill=(0, 0, 0))
        x += p.shape[1] + gap
    return np.asarray(canvas)


def save_png(img: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(img).save(tmp)
    tmp.replace(path)
    return path
