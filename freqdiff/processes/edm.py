"""EDM's variance-exploding process (Karras et al. 2022, "Elucidating the Design Space...", EDM).

Forward (EDM eq. 1 / Table 1 "VE" form with s(t) = 1): ``x_t = x0 + σ(t) eps``, so
``scalings(t) = (1, σ(t))`` and the noise is white (``white_noise``; no v: v assumes a² + σ² = 1).

Time is the position on EDM's Karras grid (EDM eq. 5 with ramp u = 1 − t):
``σ(t) = (σ_max^{1/ρ} + (1 − t)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``, t ∈ [0, 1], so σ(1) = σ_max,
σ(0) = σ_min, and N points uniform in t from 1 to 0 are exactly EDM's N-point grid σ_0 > ... > σ_{N−1}.
``t_from_sigma`` is the exact inverse (clamped to [0, 1]): EDM's log-normal training σ
(``timesteps.LogNormalSigmaTime``) maps to t through it.

t = 0 is σ_min (0.002), *not* the data. EDM's sampler appends σ_N = 0 to its grid; ``samplers.sample_heun``
does the same (its last step, Euler, lands on the data). ``sample_ancestral`` walks t from 1 to 0 and so
ends at σ_min = 0.002 rather than exactly at the data: its last state is ``x0_hat + 0.002 ε̂`` (η = 0)
or a draw of q(x_{σ_min} | ...) (η = 1), a per-pixel error of ≤ 0.002 = 1/4 of a uint8 level in [−1, 1].

Reverse ``step`` (t -> s): the DDIM-η / exact-posterior step of the Gaussian process (``gaussian``
module docstring) written with the scalings, here with a = 1: ``σ²_{t|s} = σ_t² − σ_s²``,
``c² = η² σ²_{t|s} σ_s² / σ_t²``, ``x_s = x0_hat + √(σ_s² − c²) eps_hat + c z`` (σ_s = 0 gives x0_hat).
The prior is N(0, σ_max² I) (EDM: ``latents * t_steps[0]``); ``prior_std`` = σ_max.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from freqdiff.processes.base import NoiseSource, Process
from freqdiff.processes.gaussian import posterior_step
from freqdiff.processes.ops import append_dims, as_batch_time


class EDMProcess(Process):
    predictions = ("eps", "x0", "edm")
    white_noise = True

    def __init__(
        self,
        sigma_min: float = 0.002,  # σ(0): the lowest noise level of the grid (EDM Table 1)
        sigma_max: float = 80.0,  # σ(1): the prior's std (EDM Table 1)
        rho: float = 7.0,  # grid exponent ρ (EDM eq. 5)
        resolution: int = 32,  # image side (the state never changes resolution)
        data_range: tuple[float, float] | None = (-1.0, 1.0),  # x0's range, for clip_x0 (None: no clip)
    ):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDMProcess needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.image_resolution = int(resolution)
        self.data_range = None if data_range is None else (float(data_range[0]), float(data_range[1]))
        self.prior_std = self.sigma_max  # the prior is N(0, σ_max² I)

    # ---- schedule -----------------------------------------------------------------------------------
    def sigma(self, t: Tensor) -> Tensor:
        """σ(t) on the Karras grid (EDM eq. 5, ramp 1 − t), computed in float64, in t's float dtype."""
        t = torch.as_tensor(t)
        dtype = torch.promote_types(t.dtype, torch.float32)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return ((hi + (1 - t.double()) * (lo - hi)) ** self.rho).to(dtype)  # (σ_max^{1/ρ} + (1−t)(…))^ρ

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """The exact inverse of ``sigma``, clamped to [0, 1] (σ outside [σ_min, σ_max] maps to an end)."""
        sigma = torch.as_tensor(sigma)
        dtype = torch.promote_types(sigma.dtype, torch.float32)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        u = (sigma.double().clamp(min=0) ** (1 / self.rho) - hi) / (lo - hi)  # 1 − t (EDM eq. 5 solved)
        return (1 - u).clamp(0.0, 1.0).to(dtype)

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigma(t)
        return torch.ones_like(sigma), sigma  # (a, sigma) = (1, σ(t))

    def resolution(self, t: float | Tensor) -> int:
        return self.image_resolution

    # ---- process ------------------------------------------------------------------------------------
    def marginal(self, x0: Tensor, t: Tensor, noise: NoiseSource) -> tuple[Tensor, Tensor]:
        eps = noise(x0.shape).to(x0)
        sigma = append_dims(self.sigma(as_batch_time(t, x0.shape[0], x0.device)).to(x0), x0.ndim)
        return x0 + sigma * eps, eps  # x_t = x0 + σ(t) ε (EDM eq. 1)

    def prior(self, shape: Sequence[int], noise: NoiseSource) -> Tensor:
        return self.sigma_max * noise(self.state_shape(shape, 1.0))  # N(0, σ_max² I)

    def step(
        self, x_t: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor, eta: float, noise: NoiseSource
    ) -> Tensor:
        t, s = (as_batch_time(v, x_t.shape[0], x_t.device) for v in (t, s))
        return posterior_step(x_t, x0_hat, self.scalings(t), self.scalings(s), eta, noise)

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        sigma = append_dims(self.sigma(as_batch_time(t, x_t.shape[0], x_t.device)).to(x_t), x_t.ndim)
        return x_t - sigma * eps  # x0 = x_t − σ ε

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        sigma = append_dims(self.sigma(as_batch_time(t, x_t.shape[0], x_t.device)).to(x_t), x_t.ndim)
        return (x_t - x0) / sigma  # ε = (x_t − x0) / σ

    def extra_repr(self) -> str:
        return (
            f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho}, "
            f"resolution={self.image_resolution}"
        )
