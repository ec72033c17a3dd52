"""A folder of real JPEG photographs of mixed sizes, made offline from scikit-image's bundled images.

For tests, benchmarks and trying ``make shards`` without a dataset: random crops (random aspect
ratios and sizes) of the photographs that ship inside ``skimage.data`` (astronaut, coffee, chelsea,
rocket, ...), saved as JPEG (quality 90), optionally into class sub-folders. Deterministic by seed.
scikit-image is a dev dependency (``pip install -e .[dev]``).

    python -m datamodules.demo_photos /tmp/photos 300
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
GREY = ("camera", "brick", "grass", "gravel", "moon")


def photographs() -> list[np.ndarray]:
    """The bundled photographs as uint8 ``[H, W, 3]`` (grey ones replicated to RGB)."""
    import skimage.data

    out = [getattr(skimage.data, n)() for n in PHOTOS]
    out += [np.repeat(getattr(skimage.data, n)()[:, :, None], 3, axis=2) for n in GREY]
    return [np.ascontiguousarray(x[:, :, :3]) for x in out]


def write_photo_folder(
    out: str | os.PathLike,  # folder to create (files are overwritten)
    n: int,  # number of JPEGs
    seed: int = 0,  # crops, sizes and photographs chosen from this seed
    min_side: int = 64,  # shorter side of a crop, at least
    max_side: int = 400,  # longer side of a crop, at most
    classes: list[str] | None = None,  # sub-folder names, images dealt round-robin into them
) -> list[Path]:
    """Write ``n`` JPEGs of mixed sizes (random crops of real photographs, resized); returns their paths."""
    rng = np.random.default_rng(seed)
    photos = photographs()
    out = Path(out)
    paths = []
    for i in range(n):
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape[:2]
        ch, cw = int(rng.integers(min(h, 96), h + 1)), int(rng.integers(min(w, 96), w + 1))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        short = int(rng.integers(min_side, max_side + 1))
        long = int(min(max_side, round(short * rng.uniform(1.0, 1.6))))
        size = (long, short) if rng.random() < 0.5 else (short, long)  # (W, H), landscape or portrait
        im = Image.fromarray(img[y : y + ch, x : x + cw]).resize(size, Image.Resampling.BICUBIC)
        folder = out / classes[i % len(classes)] if classes else out
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:05d}.jpg"
        im.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m datamodules.demo_photos OUT N [SEED]")
    write_photo_folder(sys.argv[1], int(sys.argv[2]), seed=int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    print(f"wrote {sys.argv[2]} JPEGs into {sys.argv[1]}")
