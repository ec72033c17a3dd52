"""One input image -> the members of its sample, for ``write_shards.py`` (``make shards``).

The same steps as the papers' dataset tools (EDM's ``dataset_tool.py --transform center-crop``):
decode, apply the EXIF orientation, convert to 8-bit RGB, centre-crop to the largest square
``s = min(W, H)`` at ``((W - s) // 2, (H - s) // 2)``, then resize that square to every requested
resolution with one filter (Lanczos by default), each stored in the set's encoding (``encodings.py``).

Conversions: grey, palette and CMYK -> RGB; an alpha channel is composited over white; 16-bit
images keep their high byte (what Pillow does for 16-bit RGB PNGs). Images whose square side is
smaller than the largest resolution are rejected unless ``allow_upscale``.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from datamodules.encodings import encode, member

FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,  # area averaging
    "hamming": Image.Resampling.HAMMING,
    "nearest": Image.Resampling.NEAREST,
}


class Skip(Exception):
    """An input that is left out; ``args[0]`` is the reason written to the manifest."""


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB (alpha over white, 16-bit -> high byte, grey / palette / CMYK -> RGB)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey (or 32-bit int)
        x = np.asarray(im).astype(np.int64)
        x = np.clip(x >> 8 if im.mode.startswith("I;16") or x.max() > 255 else x, 0, 255).astype(np.uint8)
        return Image.fromarray(x, "L").convert("RGB")
    if im.mode == "F":
        raise Skip(f"unsupported mode {im.mode} (floating point)")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode fully (so truncation shows here), apply EXIF orientation, convert to 8-bit RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb8(im)
    except Skip:
        raise
    except Image.UnidentifiedImageError:
        raise Skip("not an image (Pillow cannot identify it)") from None
    except Exception as e:  # truncated, corrupt, decompression bomb, ...
        kind = "truncated" if "truncated" in str(e).lower() else "unreadable"
        raise Skip(f"{kind} ({type(e).__name__}: {e})") from None


def centre_square(im: Image.Image, resolution: int, resample: int) -> np.ndarray:
    """Centre-crop to the largest square, resize to ``resolution``: uint8 ``[res, res, 3]``."""
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    sq = im.crop((left, top, left + s, top + s))
    if s != resolution:
        sq = sq.resize((resolution, resolution), resample=resample)
    return np.asarray(sq)


class Prepare:
    """Worker function: ``(path, relpath, label) -> (sample members, None)`` or ``(None, reason)``."""

    def __init__(
        self,
        resolutions: list[int],  # output sides, all stored per sample
        filter: str,  # a key of FILTERS
        allow_upscale: bool,  # accept squares smaller than the largest resolution
        png_level: int = 6,  # zlib level of the PNGs (0: stored, decodes ~2x faster, ~1.7x larger)
        encoding: str = "raw",  # "raw" or "png" (encodings.py)
    ):
        self.resolutions = resolutions
        self.encoding = encoding
        self.png_level = png_level
        self.resample = FILTERS[filter]  # Pillow resampling filter
        self.allow_upscale = allow_upscale

    def __call__(self, task: tuple[str, str, int | None]) -> tuple[dict[str, bytes] | None, str | None]:
        path, rel, label = task
        try:
            im = load_rgb(path)
            side = min(im.size)
            if side < max(self.resolutions) and not self.allow_upscale:
                raise Skip(
                    f"too small ({im.size[0]}x{im.size[1]}: square side {side} < {max(self.resolutions)}; "
                    "ALLOW_UPSCALE=1 to keep it)"
                )
            members = {
                member(r, self.encoding): encode(
                    centre_square(im, r, self.resample), self.encoding, self.png_level
                )
                for r in self.resolutions
            }
        except Skip as e:
            return None, str(e.args[0])
        if label is not None:
            members["cls"] = str(label).encode("ascii")
        members["src.txt"] = rel.encode("utf-8")
        return members, None
