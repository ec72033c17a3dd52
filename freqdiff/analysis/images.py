"""Image grids and PNGs (no torchvision): what sample callbacks and commands write for people to look at."""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
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


# where PIL's default font has no glyph (it draws a box): ASCII stand-ins
ASCII_FALLBACK = {"σ": "s", "²": "px", "→": "->", "×": "x"}


@functools.cache
def caption_font(size: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, bool]:
    """(a font of ``size`` px, whether it has Greek and superscripts): DejaVu Sans, which matplotlib
    (a dependency) ships, else PIL's default font (ASCII only)."""
    spec = importlib.util.find_spec("matplotlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            try:
                return ImageFont.truetype(str(path), size), True
            except OSError:  # no FreeType in this Pillow
                break
    return ImageFont.load_default(size=size), False


def caption_columns(
    grid: np.ndarray, labels: Sequence[str], cell_w: int, pad: int = 1, pad_value: int = 255
) -> np.ndarray:
    """``grid`` (``make_grid``'s: columns ``cell_w`` wide, ``pad`` apart) with a caption band above it:
    ``labels[c]`` (lines split at ``"\n"``) centred over column c, at a size that follows the cell
    (10 px for a 64-px cell, 9..20 px), smaller where a line is wider than the cell, and clipped to
    the column (never running into its neighbour). Without a Unicode font, ``ASCII_FALLBACK``."""
    size = max(9, min(20, cell_w // 6))
    font, unicode_ok = caption_font(size)
    text_of = str if unicode_ok else lambda t: "".join(ASCII_FALLBACK.get(ch, ch) for ch in t)
    lines = [[text_of(line) for line in str(label).split("\n")] for label in labels]
    line_h = size + 3
    n_lines = max((len(ls) for ls in lines), default=0)
    band = Image.new("RGB", (grid.shape[1], pad + line_h * n_lines), (pad_value,) * 3)
    for c, ls in enumerate(lines):
        cell = Image.new("RGB", (cell_w, band.height), (pad_value,) * 3)
        draw = ImageDraw.Draw(cell)
        for k, text in enumerate(ls):
            f = font
            for smaller in range(size - 1, 6, -1):  # shrink a line that does not fit
                if draw.textlength(text, font=f) <= cell_w - 2:
                    break
                f = caption_font(smaller)[0]
            w = draw.textlength(text, font=f)
            draw.text((max(1, (cell_w - w) / 2), pad + k * line_h), text, fill=(0, 0, 0), font=f)
        band.paste(cell, (pad + c * (cell_w + pad), 0))
    return np.concatenate([np.asarray(band), grid], axis=0)


def save_png(img: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(img).save(tmp)
    tmp.replace(path)
    return path
