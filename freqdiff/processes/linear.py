"""Any process as the linear Gaussian map it is: ``q(x_t | x0) = N(A_t x0, Σ_t)``
(docs/architecture.md, The process contract).

Every process in this project is linear in x0 and in its noise, so both matrices can be read off
``marginal`` itself, with no knowledge of the method:

- ``A_t``: ``marginal`` of the basis images ``e_j`` with a source that returns zero noise;
- ``Σ_t = L Lᵀ``: ``marginal`` of zero images with a source that returns basis vectors of the
  concatenated noise draws (a process may draw several noise tensors per call: Relay draws white
  and block noise), so row k of the batch is column k of ``L``.

``materialise(process, shape, t)`` returns both (float64); ``ExactDenoiser`` is the posterior mean
``E[x0 | x_t] = μ + C Aᵀ (A C Aᵀ + Σ)⁻¹ (x_t − A μ)`` for Gaussian data ``x0 ~ N(μ, C)``: the ideal
denoiser, against which every sampler can be checked on every process (it must reproduce the data's
mean and covariance). Small states only (D = C·H·W up to a few hundred): it builds dense matrices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from freqdiff.processes.base import Process


class ZeroNoise:
    """A noise source that returns zeros (and records the shapes asked for)."""

    def __init__(self, batch_size: int | None = None, device="cpu"):
        self.batch_size, self.device, self.shapes = batch_size, torch.device(device), []

    def __len__(self) -> int:
        return int(self.batch_size or 0)

    def __call__(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        self.shapes.append(tuple(int(s) for s in shape[1:]))
        return torch.zeros(tuple(shape), dtype=dtype, device=self.device)


class BasisNoise:
    """Call c returns, in the rows ``offset_c .. offset_c + D_c``, the basis vectors of its D_c entries."""

    def __init__(self, shapes: list[tuple[int, ...]], device="cpu"):
        self.shapes, self.device, self.calls = shapes, torch.device(device), 0
        self.sizes = [int(torch.Size(s).numel()) for s in shapes]
        self.total = sum(self.sizes)

    def __len__(self) -> int:
        return self.total

    def __call__(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        c = self.calls
        if c >= len(self.shapes) or tuple(shape[1:]) != self.shapes[c]:
            raise RuntimeError("the process drew a different sequence of noise shapes than on its first pass")
        self.calls += 1
        off = sum(self.sizes[:c])
        z = torch.zeros(self.total, self.sizes[c], dtype=dtype, device=self.device)
        z[off : off + self.sizes[c]] = torch.eye(self.sizes[c], dtype=dtype, device=self.device)
        return z.reshape(self.total, *self.shapes[c])


@torch.no_grad()
def materialise(
    process: Process, shape: Sequence[int], t: float, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(A_t [D_out, D_in], Σ_t [D_out, D_out]) of ``process`` at time t for data of ``shape`` (C, H, W)."""
    shape = tuple(int(s) for s in shape)
    d_in = int(torch.Size(shape).numel())
    basis = torch.eye(d_in, device=device).reshape(d_in, *shape)
    zero = ZeroNoise(d_in, device)
    x_t, _ = process.marginal(basis, torch.full((d_in,), float(t), device=device), zero)
    A = x_t.reshape(d_in, -1).double().T  # [D_out, D_in]
    probe = BasisNoise(zero.shapes, device)
    if not probe.total:
        return A, torch.zeros(A.shape[0], A.shape[0], dtype=torch.float64, device=A.device)
    zeros = torch.zeros(probe.total, *shape, device=device)
    x_n, _ = process.marginal(zeros, torch.full((probe.total,), float(t), device=device), probe)
    L = x_n.reshape(probe.total, -1).double().T  # [D_out, K]
    return A, L @ L.T


class ExactDenoiser(nn.Module):
    """E[x0 | x_t] for x0 ~ N(mean, cov) under ``process``; call it like a Denoiser: (x_t, t, labels)."""

    def __init__(
        self,
        process: Process,  # any linear Gaussian process
        mean: Tensor,  # data mean [C, H, W]
        cov: Tensor,  # data covariance [D, D], D = C·H·W
    ):
        super().__init__()
        self.process, self.shape = process, tuple(mean.shape)
        self.mean, self.cov = mean.double().reshape(-1), cov.double()
        self._cache: dict[float, tuple[Tensor, Tensor, Tensor]] = {}

    def _gain(self, t: float, device) -> tuple[Tensor, Tensor]:
        if t not in self._cache:
            A, S = materialise(self.process, self.shape, t)
            mu, C = self.mean.to(A.device), self.cov.to(A.device)
            K = torch.linalg.solve(A @ C @ A.T + S, A @ C).T  # C Aᵀ (A C Aᵀ + Σ)⁻¹, [D_in, D_out]
            self._cache[t] = (K, A @ mu, mu)
        K, Amu, mu = self._cache[t]
        return K.to(device), Amu.to(device), mu.to(device)

    @torch.no_grad()
    def forward(
        self, x_t: Tensor, t: Tensor | float, labels=None, out_resolution: int | None = None
    ) -> Tensor:
        t_b = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x_t.shape[0])
        out = torch.empty(x_t.shape[0], *self.shape, dtype=torch.float64, device=x_t.device)
        for tv in torch.unique(t_b).tolist():
            rows = (t_b == tv).nonzero().squeeze(1).to(x_t.device)
            K, Amu, mu = self._gain(float(tv), x_t.device)
            flat = x_t[rows].reshape(len(rows), -1).double()
            out[rows] = (mu + (flat - Amu) @ K.T).reshape(len(rows), *self.shape)
        out = out.float()
        out_resolution = out_resolution or x_t.shape[-1]  # x0 at the state's side unless told otherwise
        if out_resolution != self.shape[-1]:
            ts = [k / 1000 for k in range(1001) if self.process.resolution(k / 1000) == out_resolution]
            if not ts:
                raise ValueError(f"{type(self.process).__name__} never has resolution {out_resolution}")
            out = self.process.x0_at(out, torch.full((out.shape[0],), ts[0], device=out.device))
        return out
