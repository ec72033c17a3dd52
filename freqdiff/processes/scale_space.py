"""Scale Space Diffusion (Mukhopadhyay, Udhayanan, Shrivastava; docs/methods/scale_space.md).

Downsampling is the degradation: the state's resolution r(t) shrinks with t along a schedule of
levels (64² with 4 levels: 64, 32, 16, 8), and

    x_t = √ᾱ_t M_{0:t} x0 + √(1 − ᾱ_t) ε,     ε white at r(t),

with ᾱ the ordinary (linear-β) schedule and M_{0:t} the chain of antialiased-bilinear 2× downsamples
from the data's side to r(t) (never one 4× resize: it differs by 17 %). Time: the official code counts
steps j = 0..T−1 with the data before step 0; here step j is t = (j + 1)/T and t = 0 is the data.
Resolution schedule (official ``get_resolution_scale_space``): τ = j/(T − 1), "convex decay"
x = 1 − (1 − τ)^γ (γ = 0.5), idx = L − 1 − min(⌊x L⌋, L − 1) into the ascending levels; also "equal"
(x = τ). Continuous t maps to the step j = ⌈t T⌉ − 1 whose interval (j/T, (j + 1)/T] holds it.

- ``M`` per axis is an explicit 1-D matrix (``down2_matrix``: interior taps [1, 3, 3, 1]/8,
  renormalised at the borders, exactly what ``F.interpolate(..., antialias=True)`` computes), applied
  separably (``ops.apply_per_axis``) in full precision; ``Mᵀ`` is its transpose.
- Reverse step t -> s (x0_hat = the prediction of x0_at(x0, s) = M_{0:s} x0, at r(s)): with
  c = √(ᾱ_t/ᾱ_s), σ² = 1 − ᾱ, ρ = σ_s²/σ_t², μ_s = √ᾱ_s x0_hat and M = M_{s:t} (identity when the
  resolution does not change), the exact posterior q(x_s | x_t, x0) is
  ``N(μ_s + ρ c Mᵀ (x_t − c M μ_s), σ_s² (I − ρ c² Mᵀ M))``. Its noise is sampled exactly: Mᵀ M is
  separable, (A ⊗ A) with A = M₁ᵀ M₁ per axis, so with A = U diag(λ) Uᵀ the square root is
  "transform by U, scale by √(1 − ρ c² λ_a λ_b), transform back" (the official code runs 40 Lanczos
  iterations per sample instead). Where the resolution does not change this is DDPM's posterior and
  eta < 1 gives DDIM-η (``gaussian.posterior_step``); a resolution-increasing step cannot be
  deterministic, so it is the exact posterior whatever eta (eta = 0 is DDIM between the changes).
- Training (the module): predict x0 at r(s), s = t − 1/T, weight min(SNR_t, 5) (``loss_weight``).
- ``sample_grid(steps)``: a grid of steps that keeps every resolution-change step (exact indices).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from freqdiff.processes.base import NoiseSource, Process
from freqdiff.processes.gaussian import GaussianProcess, posterior_step
from freqdiff.processes.ops import append_dims, apply_per_axis, as_batch_time

SCHEDULES = ("convex", "equal")


def down2_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """[n/2, n]: antialiased bilinear 2× downsampling (taps [1, 3, 3, 1]/8, renormalised at the edges)."""
    return _down2(int(n)).to(dtype, copy=True)


@functools.lru_cache(maxsize=64)
def _down2(n: int) -> Tensor:  # built once per side (a Python loop: ~30 % of a step when rebuilt each call)
    if n % 2 or n < 2:
        raise ValueError(f"down2_matrix: side {n} is not even")
    m = torch.zeros(n // 2, n, dtype=torch.float64)
    for i in range(n // 2):
        for j, w in zip(range(2 * i - 1, 2 * i + 3), (1.0, 3.0, 3.0, 1.0)):
            if 0 <= j < n:
                m[i, j] = w
        m[i] /= m[i].sum()
    return m


class ScaleSpaceProcess(Process):
    predictions = ("x0",)
    white_noise = True

    def __init__(
        self,
        resolution: int = 64,  # data side (the finest level)
        levels: int = 4,  # L: the data side halved L − 1 times
        schedule: str = "convex",  # convex (official "ConvexDecay_γ") | equal
        gamma: float = 0.5,  # γ of the convex decay
        beta_schedule: str = "linear",  # ᾱ (the Gaussian process's)
        T: int = 1000,  # discrete steps
        min_snr: float = 5.0,  # loss weight min(SNR_t, min_snr) in x0 space
        data_range: tuple[float, float] | None = (-1.0, 1.0),
    ):
        super().__init__()
        if not isinstance(levels, int) or levels < 1 or resolution % (2 ** (levels - 1)):
            raise ValueError(f"levels={levels!r}: resolution={resolution} must be divisible by 2**(levels-1)")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: expected one of {', '.join(map(repr, SCHEDULES))}")
        if not gamma > 0:
            raise ValueError(f"gamma={gamma!r}: expected a positive number")
        self.image_resolution, self.num_levels, self.T = int(resolution), int(levels), int(T)
        self.schedule, self.gamma, self.min_snr = schedule, float(gamma), float(min_snr)
        self.data_range = None if data_range is None else (float(data_range[0]), float(data_range[1]))
        self.levels = [resolution // 2**k for k in range(levels)][::-1]  # ascending, as the official code
        self.gauss = GaussianProcess(schedule=beta_schedule, T=T, resolution=resolution, data_range=None)
        self.step_res = [self._res_of_step(j) for j in range(self.T)]  # r of step j = 0..T−1
        self._eig: dict[int, tuple[Tensor, Tensor]] = {}

    # ---- schedule -------------------------------------------------------------------------------------
    def _res_of_step(self, j: int) -> int:
        n, tau = self.num_levels, j / (self.T - 1)
        x = 1 - (1 - tau) ** self.gamma if self.schedule == "convex" else tau
        return self.levels[n - 1 - min(int(x * n), n - 1)]

    def step_of(self, t: float | Tensor) -> int:
        """The step j whose interval (j/T, (j + 1)/T] holds t (−1 for the data, t = 0)."""
        t = float(torch.as_tensor(t).reshape(-1)[0])
        return min(self.T - 1, math.ceil(t * self.T - 1e-6) - 1)

    def resolution(self, t: float | Tensor) -> int:
        j = self.step_of(t)
        return self.image_resolution if j < 0 else self.step_res[j]

    def change_steps(self) -> list[int]:
        """Steps j whose resolution differs from step j − 1's (the first at each coarser level)."""
        return [j for j in range(1, self.T) if self.step_res[j] != self.step_res[j - 1]]

    def mean_pixel_cost(self) -> float:
        """Mean over the T steps of (r(t) / r(0))²: the state's pixel count relative to full resolution."""
        return sum((r / self.image_resolution) ** 2 for r in self.step_res) / self.T

    def sample_grid(self, steps: int) -> list[float]:
        """Decreasing times [1, ..., 0] of about ``steps`` steps, uniform in steps, that contain every
        change step j and its predecessor j − 1, so each resolution change is one exact step."""
        keep = {self.T - 1}
        keep |= {round(k * (self.T - 1) / max(steps - 1, 1)) for k in range(steps)}
        for j in self.change_steps():
            keep |= {j, j - 1}
        return [(j + 1) / self.T for j in sorted(keep, reverse=True)] + [0.0]

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.gauss.scalings(t)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return self.gauss.t_from_sigma(sigma)

    def loss_weight(self, t: Tensor) -> Tensor:
        a, s = self.scalings(t)
        return ((a / s) ** 2).clamp(max=self.min_snr)

    # ---- resize operators -----------------------------------------------------------------------------
    def down(self, x: Tensor, side: int) -> Tensor:
        """M applied until the side is ``side`` (chained 2× steps), in full precision."""
        while x.shape[-1] > side:
            m = down2_matrix(x.shape[-1])
            x = apply_per_axis(x, m)
        if x.shape[-1] != side:
            raise ValueError(f"cannot downsample a {x.shape[-1]}² image to {side}² by 2× steps")
        return x

    def up_adjoint(self, y: Tensor, side: int) -> Tensor:
        """Mᵀ of ``down`` from y's side back to ``side``."""
        while y.shape[-1] < side:
            m = down2_matrix(2 * y.shape[-1])
            y = apply_per_axis(y, m.T)
        return y

    def _eigh(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """(λ, U) of A = M₁ᵀ M₁ for the per-axis chain hi -> lo (float64)."""
        key = (lo, hi)
        if key not in self._eig:
            m = torch.eye(hi, dtype=torch.float64)
            while m.shape[0] > lo:
                m = down2_matrix(m.shape[0]) @ m
            lam, U = torch.linalg.eigh(m.T @ m)
            self._eig[key] = (lam.clamp(min=0), U)
        return self._eig[key]

    # ---- process --------------------------------------------------------------------------------------
    def _one_res(self, t: Tensor) -> int:
        res = {self.resolution(float(v)) for v in t.reshape(-1).tolist()}
        if len(res) != 1:
            raise ValueError(f"a batch must have one resolution; its times map to {sorted(res)}")
        return res.pop()

    def x0_at(self, x0: Tensor, t: Tensor | float) -> Tensor:
        t = as_batch_time(t, x0.shape[0], x0.device)
        return self.down(x0, self._one_res(t)).to(torch.promote_types(x0.dtype, torch.float32))

    def marginal(self, x0: Tensor, t: Tensor, noise: NoiseSource) -> tuple[Tensor, Tensor]:
        t = as_batch_time(t, x0.shape[0], x0.device)
        x = self.x0_at(x0, t)
        eps = noise(x.shape).to(x)
        a, s = (append_dims(v.to(x), x.ndim) for v in self.scalings(t))
        return a * x + s * eps, eps

    def prior(self, shape: Sequence[int], noise: NoiseSource) -> Tensor:
        return noise(self.state_shape(shape, 1.0))

    def step(
        self, x_t: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor, eta: float, noise: NoiseSource
    ) -> Tensor:
        t, s = (as_batch_time(v, x_t.shape[0], x_t.device) for v in (t, s))
        rt, rs = x_t.shape[-1], x0_hat.shape[-1]
        if rs == rt:
            return posterior_step(x_t, x0_hat, self.scalings(t), self.scalings(s), eta, noise)
        # a resolution-increasing step cannot be deterministic: it is the exact posterior whatever eta
        dt = torch.promote_types(x_t.dtype, torch.float32)
        x_t, x0_hat = x_t.to(dt), x0_hat.to(dt)
        (a_t, s_t), (a_s, s_s) = (tuple(v.double() for v in self.scalings(u)) for u in (t, s))
        c, rho = a_t / a_s, (s_s / s_t) ** 2
        mu = append_dims(a_s.to(dt), x_t.ndim) * x0_hat
        cd, rhod = (append_dims(v.to(dt), x_t.ndim) for v in (c, rho))
        mean = mu + rhod * cd * self.up_adjoint(x_t - cd * self.down(mu, rt), rs)
        lam, U = self._eigh(rt, rs)
        z = apply_per_axis(noise(mean.shape).to(dt), U.T.to(dt))  # in the eigenbasis of Mᵀ M
        scale = (1 - (rho * c**2).reshape(-1, 1, 1) * (lam[:, None] * lam[None, :])).clamp(min=0).sqrt()
        z = z * (append_dims(s_s, 4) * scale[:, None]).to(z)  # σ_s √(1 − ρ c² λ_a λ_b), [B, 1, H, W]
        return mean + apply_per_axis(z, U.to(dt))

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        t = as_batch_time(t, x_t.shape[0], x_t.device)
        a, s = (append_dims(v.to(x_t), x_t.ndim) for v in self.scalings(t))
        return (x_t - s * eps) / a

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        t = as_batch_time(t, x_t.shape[0], x_t.device)
        a, s = (append_dims(v.to(x_t), x_t.ndim) for v in self.scalings(t))
        return (x_t - a * x0) / s

    def extra_repr(self) -> str:
        return f"levels={self.levels}, schedule={self.schedule!r}, gamma={self.gamma}, T={self.T}"
