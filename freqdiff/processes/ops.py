"""Tensor operators shared by the processes, and the precision policy of all process math.

Precision policy (DESIGN-level rule; every process obeys it through ``Process``):
  Process math (basis transforms, DCT, resize matrices, posteriors, schedules) runs in float32 or
  float64 with autocast *disabled* and full-precision matmuls, whatever the trainer's precision;
  only the backbone runs under autocast. Why: a bf16 matmul through an orthonormal 64x64 basis
  perturbs a marginal at σ = 0.01 by ~30 % of σ (TF32: ~3.5 %), and an ε-predicting network's
  error is multiplied by σ/a (≈ 157 at t = 1 for linear β) on its way to x0_hat.

- ``full_precision()``: context manager: autocast off on CPU and CUDA, matmul precision "highest"
  (no TF32), restored on exit.
- ``full_precision_fn``: decorator doing the same around a function and casting bf16 / fp16 tensor
  arguments to float32. ``Process`` applies it to every contract method of every subclass
  automatically (``Process.__init_subclass__``), so a new process cannot forget it.
- ``dct_matrix(n)``: the orthonormal DCT-II matrix (norm-preserving, round trip exact to 1e-12), float64.
- ``apply_per_axis(x, A, B)``: ``A X Bᵀ`` on the last two axes (separable 2-D transforms: a basis
  change, a blur, a resize), computed in full precision.
- ``append_dims``, ``as_batch_time``: broadcasting helpers.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

_LOW = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Autocast disabled (CPU and CUDA) and fp32 matmuls at "highest" precision inside the block."""
    prev = torch.get_float32_matmul_precision()
    if prev != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            yield
    finally:
        if prev != "highest":
            torch.set_float32_matmul_precision(prev)


def _to_f32(v: Any) -> Any:
    return v.float() if isinstance(v, Tensor) and v.dtype in _LOW else v


def full_precision_fn(fn: Callable) -> Callable:
    """Run ``fn`` under ``full_precision()`` with half-precision tensor arguments cast to float32."""
    if getattr(fn, "_full_precision", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with full_precision():
            return fn(*(_to_f32(a) for a in args), **{k: _to_f32(v) for k, v in kwargs.items()})

    wrapper._full_precision = True  # type: ignore[attr-defined]
    return wrapper


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal DCT-II matrix C [n, n]: ``C[k, j] = s_k cos(π (j + ½) k / n)``, ``C Cᵀ = I``."""
    j = torch.arange(n, dtype=torch.float64)
    k = j[:, None]
    c = torch.cos(math.pi * (j[None, :] + 0.5) * k / n) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


def apply_per_axis(x: Tensor, rows: Tensor, cols: Tensor | None = None) -> Tensor:
    """``rows @ X @ colsᵀ`` over the last two axes of x [..., H, W] (cols defaults to rows).

    rows [H', H], cols [W', W]; the result is [..., H', W'] in x's dtype (at least float32). The
    matrices are cast to that dtype; pass float64 matrices and a float64 x for float64 math.
    """
    cols = rows if cols is None else cols
    with full_precision():
        dt = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dt)
        r, c = rows.to(device=x.device, dtype=dt), cols.to(device=x.device, dtype=dt)
        return torch.matmul(torch.matmul(r, x), c.transpose(0, 1))


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
