"""Small tensor operators shared by the processes (METHODS.md conventions).

Later processes add the orthonormal DCT (full and per patch), block noise and resize operators here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with ``ndim`` dims in all, for broadcasting per-sample scalars."""
    if v.ndim > ndim:
        raise ValueError(f"append_dims: tensor has {v.ndim} dims, more than the target {ndim}")
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


def as_batch_time(t: Tensor | float, batch: int, device: torch.device | str | None = None) -> Tensor:
    """A scalar or [B] time -> float [B] on ``device``."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"time must be a scalar or shape [{batch}], got {tuple(t.shape)}")
    return t
