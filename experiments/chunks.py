"""Sample chunk files of ``make sample`` / ``make eval``: ``chunk_NNNNNN.npz`` or ``chunk_NNNNNN/<seed>.png``.

A chunk holds the uint8 images of consecutive seeds; it is written under a temporary name and renamed
when complete, so a reader sees a whole chunk or none, and an interrupted command skips what exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from freqdiff.metrics.evaluator import quantize


def chunk_path(folder: Path, c: int, fmt: str) -> Path:
    return folder / (f"chunk_{c:06d}.npz" if fmt == "npz" else f"chunk_{c:06d}")


def write_chunk(folder: Path, c: int, fmt: str, images: torch.Tensor, seeds: list[int]) -> Path:
    """Atomically write uint8 images [k, C, H, W] of ``seeds`` as chunk ``c``."""
    u8 = quantize(images).permute(0, 2, 3, 1).cpu().numpy()  # [k, H, W, C]
    final = chunk_path(folder, c, fmt)
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    if fmt == "npz":
        with open(tmp, "wb") as f:
            np.savez(f, images=u8, seeds=np.asarray(seeds, dtype=np.int64))
    else:
        from PIL import Image

        tmp.mkdir(parents=True, exist_ok=True)
        for img, s in zip(u8, seeds):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp / f"{s:08d}.png")
    os.replace(tmp, final)
    return final


def read_chunk(folder: Path, c: int, seeds: list[int]) -> torch.Tensor | None:
    """uint8 [k, C, H, W] of chunk ``c`` if it exists (npz or png) and holds exactly ``seeds``."""
    npz, png = chunk_path(folder, c, "npz"), chunk_path(folder, c, "png")
    if npz.is_file():
        with np.load(npz) as z:
            if z["seeds"].tolist() != list(seeds):
                return None
            return torch.from_numpy(z["images"]).permute(0, 3, 1, 2).contiguous()
    if png.is_dir():
        from PIL import Image

        files = [png / f"{s:08d}.png" for s in seeds]
        if len(list(png.iterdir())) != len(seeds) or not all(f.is_file() for f in files):
            return None
        imgs = [np.asarray(Image.open(f)) for f in files]
        imgs = [i[..., None] if i.ndim == 2 else i for i in imgs]
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return None
