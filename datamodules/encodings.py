"""How a shard sample stores its images (docs/architecture.md, Data): the manifest's ``"encoding"``.

- ``"png"``: ``<key>.<res>.png``, a lossless PNG (zlib level ``png_level``, 6 by default). A manifest
  without the key (every set written before raw existed) is PNG.
- ``"raw"``: ``<key>.<res>.u8``, the bytes of the uint8 ``[res, res, C]`` array in C order, no
  header and no compression (side and channels come from the member name and the manifest); decoding
  is ``np.frombuffer`` (read-only, no copy), and a member of the wrong byte size is a bad sample.

Both are lossless, so a set converted from one encoding to the other yields identical batches.
Measured on photo crops (``write_shards``'s docstring): raw costs ~1 µs to decode (PNG 6: ~1.45 ms
at 256²) and makes the shard loader 2.6-3.0x faster at 256² than PNG 6, for 2.45x the bytes (1.3-1.8x
faster for 1.7x the bytes at 64²); ``make shards`` writes raw by default.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

ENCODINGS = ("png", "raw")
ABSENT = "png"  # what a manifest without "encoding" means (sets written before raw existed)
SUFFIX = {"png": "png", "raw": "u8"}  # member name: <key>.<res>.<suffix>


def encoding_of(manifest: dict[str, Any]) -> str:
    """A manifest's image encoding (``"png"`` when it has no ``"encoding"``, as in older sets)."""
    return manifest.get("encoding", ABSENT)


def member(res: int, encoding: str) -> str:
    """The member suffix holding a sample's image at side ``res``: ``"256.png"`` or ``"256.u8"``."""
    return f"{res}.{SUFFIX[check(encoding)]}"


def check(encoding: Any) -> str:
    """``encoding`` if it is one of ENCODINGS, else ValueError naming it and the choices."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r}: expected one of {', '.join(map(repr, ENCODINGS))}")
    return encoding


def encode(img: np.ndarray, encoding: str, png_level: int = 6) -> bytes:
    """Member bytes of a uint8 image ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` in ``encoding``."""
    return encode_png(img, png_level) if check(encoding) == "png" else encode_raw(img)


def encode_png(img: np.ndarray, compress_level: int = 6) -> bytes:
    """Lossless PNG bytes of a uint8 image ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``.

    ``compress_level`` 0 (stored) decodes about 2x faster than 6 and is about 1.7x larger for photos.
    """
    img = _checked(img, "encode_png")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """PNG bytes -> uint8 ``[H, W, channels]`` (converted to grey or RGB as asked)."""
    with Image.open(io.BytesIO(data)) as im:
        mode = "RGB" if channels == 3 else "L"
        if im.mode != mode:
            im = im.convert(mode)
        x = np.asarray(im)
    return x if x.ndim == 3 else x[:, :, None]


def encode_raw(img: np.ndarray) -> bytes:
    """The bytes of a uint8 image ``[H, W]`` (stored as one channel), ``[H, W, 1]`` or ``[H, W, 3]``."""
    return np.ascontiguousarray(_checked(img, "encode_raw")).tobytes()


def decode_raw(data: bytes, res: int, channels: int, name: str = "raw member") -> np.ndarray:
    """Raw bytes -> read-only uint8 ``[res, res, channels]``; ValueError (naming ``name``, the byte
    size found and the one expected) unless ``data`` holds exactly ``res * res * channels`` bytes."""
    want = res * res * channels
    if len(data) != want:
        raise ValueError(
            f"{name} is {len(data)} bytes, expected {want} ({res}x{res}x{channels} uint8; "
            "truncated, or written at another size or channel count)"
        )
    return np.frombuffer(data, np.uint8).reshape(res, res, channels)


def _checked(img: np.ndarray, who: str) -> np.ndarray:
    if img.dtype != np.uint8:
        raise ValueError(f"{who} expects uint8, got {img.dtype}")
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3))):
        raise ValueError(f"{who} expects [H, W], [H, W, 1] or [H, W, 3], got {img.shape}")
    return img
