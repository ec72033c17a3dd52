"""Multi-scale sliced Wasserstein distance on a Laplacian pyramid (Karras et al. 2018, "Progressive
growing of GANs", §5 and appendix D; their ``metrics/sliced_wasserstein.py``).

Per image set, and per pyramid level (one value per level, so damage can be located in frequency):

1. Laplacian pyramid (Burt & Adelson 1983) of the images in 0..255 units: ``G_0 = x``,
   ``G_{k+1} = down(G_k)`` with the 5×5 binomial filter ``[1 4 6 4 1]²/256`` (cv2.pyrDown; reflect
   borders, as scipy's ``mirror``), band ``L_k = G_k - up(G_{k+1})`` (cv2.pyrUp: zero-insert, filter
   ×4). Levels run from the full resolution down to ``min_res`` (16 in the paper); the coarsest level
   is the low-pass residual ``G_K``. Level ``res`` holds frequencies around ``res / 4 .. res / 2``
   cycles per image (the residual: everything below).
2. Descriptors: ``patches_per_image`` (128) random ``patch × patch`` (7 × 7) neighbourhoods per image
   and level, flattened over channels (147-d for RGB).
3. Normalisation per set, per channel: subtract the mean, divide by the standard deviation over all
   descriptors of that level (``finalize_descriptors``), as in the paper.
4. Sliced Wasserstein distance: ``dir_repeats`` (4) times, ``dirs_per_repeat`` (128) random unit
   directions; project both descriptor sets, sort each projection, average ``|a_(i) - b_(i)|`` over
   the order statistics and directions (the 1-D W1 between empirical distributions of equal size);
   average over repeats. Reported ×10³, as in the paper's tables.

Deterministic given ``seed``: patch positions depend only on (seed, level, image index), the same for
both sets (identical sets give exactly 0), and directions on the seed alone. Both sets are cut to the
smaller one.
Memory: ``n × patches_per_image × C × patch²`` floats per level and set, all held (sorting needs
them): callers cap ``n`` (the paper used 8,192-16,384 images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0  # 1-D factor of the 5x5 kernel / 256


def _blur(x: Tensor) -> Tensor:
    """Separable 5×5 binomial filter with reflect ('mirror') borders, per channel. [B, C, H, W]."""
    k = _BINOMIAL.to(x)
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def pyr_down(x: Tensor) -> Tensor:
    """cv2.pyrDown: blur, keep even pixels. [B, C, H, W] -> [B, C, H/2, W/2]."""
    return _blur(x)[:, :, ::2, ::2]


def pyr_up(x: Tensor) -> Tensor:
    """cv2.pyrUp: zero-insert, blur, ×4. [B, C, H, W] -> [B, C, 2H, 2W]."""
    b, c, h, w = x.shape
    up = x.new_zeros(b, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _blur(up) * 4.0


def pyramid_resolutions(resolution: int, min_res: int = 16) -> list[int]:
    """Level resolutions ``[res, res/2, ..., >= min_res]`` (at least one level)."""
    if resolution < 8 or min_res < 8:
        raise ValueError(
            f"SWD needs images and levels of at least 8 pixels, got {resolution} / min_res {min_res}"
        )
    out = [resolution]
    while out[-1] // 2 >= min_res and out[-1] % 2 == 0:
        out.append(out[-1] // 2)
    return out


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """Bands ``[L_0, ..., L_{levels-2}, G_{levels-1}]`` of ``x`` [B, C, H, W] (float)."""
    pyr = [x]
    for _ in range(1, levels):
        pyr.append(pyr_down(pyr[-1]))
        pyr[-2] = pyr[-2] - pyr_up(pyr[-1])
    return pyr


def patch_positions(n: int, size: int, per_image: int, patch: int, generator: torch.Generator) -> Tensor:
    """Top-left corners ``(y, x)`` of ``per_image`` patches in ``n`` images of side ``size``: [n, P, 2]."""
    if size < patch:
        raise ValueError(f"pyramid level {size}x{size} is smaller than the {patch}x{patch} patch")
    return torch.randint(0, size - patch + 1, (n, per_image, 2), generator=generator)


def patch_descriptors(level: Tensor, corners: Tensor, patch: int) -> Tensor:
    """Neighbourhoods at ``corners`` [B, P, 2] of ``level`` [B, C, H, W]: [B P, C, p, p]."""
    b, c = level.shape[:2]
    off = torch.arange(patch, device=level.device)
    corners = corners.to(level.device)
    rows = corners[..., 0, None] + off  # [B, P, p]
    cols = corners[..., 1, None] + off  # [B, P, p]
    img = torch.arange(b, device=level.device)[:, None, None, None, None]  # [B, 1, 1, 1, 1]
    ch = torch.arange(c, device=level.device)[None, None, :, None, None]  # [1, 1, C, 1, 1]
    d = level[img, ch, rows[:, :, None, :, None], cols[:, :, None, None, :]]  # [B, P, C, p, p]
    return d.reshape(-1, c, patch, patch)


def normalize_descriptors(d: Tensor) -> Tensor:
    """Per-channel standardisation over one set's descriptors (``finalize_descriptors``) -> [N, C p²]."""
    d = d.to(torch.float64)
    d = d - d.mean(dim=(0, 2, 3), keepdim=True)
    d = d / d.std(dim=(0, 2, 3), keepdim=True, correction=0).clamp_min(1e-12)
    return d.reshape(d.shape[0], -1).float()


def sliced_wasserstein(
    a: Tensor,
    b: Tensor,
    dir_repeats: int = 4,
    dirs_per_repeat: int = 128,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced W1 between two descriptor sets [N, D] of one size: random directions, sorted projections."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"descriptor sets must be [N, D] of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    out = []
    for _ in range(dir_repeats):
        dirs = torch.randn(a.shape[1], dirs_per_repeat, generator=generator).to(a)  # [D, R]
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        pa = (a @ dirs).t().contiguous().sort(dim=1).values  # [R, N] (rows sort ~2x faster on CPU)
        pb = (b @ dirs).t().contiguous().sort(dim=1).values
        out.append((pa - pb).abs().mean())
    return float(torch.stack(out).mean())


def descriptors(
    x: Tensor,  # images [N, C, H, W], uint8 or float in [-1, 1]
    min_res: int = 16,  # coarsest level (the low-pass residual)
    patch: int = 7,  # neighbourhood side
    patches_per_image: int = 128,  # descriptors per image and level
    seed: int = 0,  # patch positions depend on (seed, level, image index) only
    batch_size: int = 256,  # images per pyramid batch
) -> dict[int, Tensor]:
    """Normalised descriptors of one image set per level: ``{resolution: [N * patches_per_image, C p²]}``."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"SWD expects square images [N, C, H, W], got shape {tuple(x.shape)}")
    n = x.shape[0]
    res = pyramid_resolutions(x.shape[-1], min_res)
    corners = [
        patch_positions(n, r, patches_per_image, patch, torch.Generator().manual_seed(seed * 1000 + k))
        for k, r in enumerate(res)
    ]
    per_level: list[list[Tensor]] = [[] for _ in res]
    for i in range(0, n, batch_size):
        xb = x[i : i + batch_size]
        xb = xb.float() if xb.dtype == torch.uint8 else (xb.float().clamp(-1, 1) + 1) * 127.5  # 0..255
        for k, level in enumerate(laplacian_pyramid(xb, len(res))):
            per_level[k].append(patch_descriptors(level, corners[k][i : i + batch_size], patch))
    return {r: normalize_descriptors(torch.cat(d)) for r, d in zip(res, per_level)}


def swd_from_descriptors(
    da: dict[int, Tensor],  # descriptors(a)
    db: dict[int, Tensor],  # descriptors(b), same levels and patches_per_image
    dir_repeats: int = 4,  # repeats of the random directions
    dirs_per_repeat: int = 128,  # directions per repeat
    seed: int = 0,  # directions
) -> dict[int, float]:
    """SWD ×10³ per level; the larger set is cut to the smaller (its first images)."""
    if list(da) != list(db):
        raise ValueError(f"descriptor levels differ: {list(da)} vs {list(db)}")
    g = torch.Generator().manual_seed(seed * 1000 + 999)
    out = {}
    for r in da:
        m = min(da[r].shape[0], db[r].shape[0])
        if m < 2:
            raise ValueError(
                f"SWD needs at least 2 descriptors per set, got {da[r].shape[0]} and {db[r].shape[0]}"
            )
        out[r] = 1e3 * sliced_wasserstein(da[r][:m], db[r][:m], dir_repeats, dirs_per_repeat, g)
    return out


def swd(
    a: Tensor,  # images [N, C, H, W], uint8 or float in [-1, 1]
    b: Tensor,  # images [M, C, H, W], same C, H, W
    min_res: int = 16,  # coarsest level (the low-pass residual)
    patch: int = 7,  # neighbourhood side
    patches_per_image: int = 128,  # descriptors per image and level
    dir_repeats: int = 4,  # repeats of the random directions
    dirs_per_repeat: int = 128,  # directions per repeat
    seed: int = 0,  # patch positions and directions
) -> dict[int, float]:
    """SWD ×10³ per pyramid level, ``{resolution: value}`` from fine to coarse (Karras et al. 2018)."""
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"image sets differ in C, H, W: {tuple(a.shape)} vs {tuple(b.shape)}")
    n = min(a.shape[0], b.shape[0])
    kw = dict(min_res=min_res, patch=patch, patches_per_image=patches_per_image, seed=seed)
    return swd_from_descriptors(
        descriptors(a[:n], **kw), descriptors(b[:n], **kw), dir_repeats, dirs_per_repeat, seed
    )


__all__ = [
    "descriptors",
    "laplacian_pyramid",
    "pyramid_resolutions",
    "pyr_down",
    "pyr_up",
    "sliced_wasserstein",
    "swd",
    "swd_from_descriptors",
]
