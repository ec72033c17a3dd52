"""Gaussian (VP) diffusion: DDPM / DDIM in continuous time (docs/methods/ddpm.md).

Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (cosine schedule), Song et al. 2021 (DDIM).
Forward: ``x_t = a_t x0 + sigma_t eps`` with ``a_t = √ᾱ_t``, ``sigma_t = √(1 − ᾱ_t)``.

Continuity: the discrete schedule (T steps, step i at t = i/T) is made continuous by linearly
interpolating its log-SNR table ``λ_i = ln(ᾱ_i / (1 − ᾱ_i))`` over t ∈ [1/T, 1]; below 1/T the
first entry holds, and t = 0 is the data itself (a = 1, sigma = 0).

Resolution shift (docs/frequencies.md, schedule shift): ``shift = k`` moves the log-SNR by ``−2 ln k``,
which gives a k× larger image the SNR trajectory of the reference resolution (SD3's
``t' = S t / (1 + (S − 1) t)`` for rectified flow is the same relation).

Reverse step (DDIM with η, DDPM for η = 1): with ``eps_hat = (x_t − a_t x0_hat) / sigma_t``,
``c² = η² σ²_{t|s} σ_s² / σ_t²`` where ``σ²_{t|s} = σ_t² − (a_t/a_s)² σ_s²`` (the posterior variance
of q(x_s | x_t, x0) at η = 1), ``x_s = a_s x0_hat + √(σ_s² − c²) eps_hat + c z``. It uses only the
scalings, so ``posterior_step`` serves every white-noise process (``edm.EDMProcess`` too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from freqdiff.processes.base import NoiseSource, Process
from freqdiff.processes.ops import append_dims


def linear_alpha_bar(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """ᾱ_i, i = 1..T, for Ho et al.'s linear β (scaled by 1000/T for other T), float64 [T]."""
    scale = 1000.0 / T
    betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


def cosine_alpha_bar(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """ᾱ_i, i = 1..T, for Nichol & Dhariwal's cosine schedule with β clipped at ``max_beta``."""
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = torch.tensor(
        [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float64
    )
    return torch.cumprod(1.0 - betas, 0)


SCHEDULES = {"linear": linear_alpha_bar, "cosine": cosine_alpha_bar}


def posterior_step(
    x_t: Tensor,  # state at t, [B, ...]
    x0_hat: Tensor,  # prediction of x0, x_t's shape
    at_t: tuple[Tensor, Tensor],  # scalings (a_t, sigma_t) at t, each [B]
    at_s: tuple[Tensor, Tensor],  # scalings (a_s, sigma_s) at s < t, each [B]; sigma_s = 0 is the data
    eta: float,  # 1: the exact posterior q(x_s | x_t, x0_hat); 0: deterministic (DDIM)
    noise: NoiseSource,
) -> Tensor:
    """The DDIM-η reverse step of any white-noise process ``x_t = a_t x0 + sigma_t eps`` (module docstring).

    Needs sigma_t > 0; sigma_s = 0 gives ``a_s x0_hat`` (c = 0). Noise is drawn only for eta > 0.
    """
    a_t, sigma_t = (append_dims(v, x_t.ndim) for v in at_t)
    a_s, sigma_s = (append_dims(v, x_t.ndim) for v in at_s)
    eps_hat = (x_t - a_t * x0_hat) / sigma_t
    var_ts = (sigma_t**2 - (a_t / a_s) ** 2 * sigma_s**2).clamp(min=0)  # σ²_{t|s}
    c2 = (eta**2) * var_ts * sigma_s**2 / sigma_t**2  # c² = η² σ²_{t|s} σ_s² / σ_t²
    x_s = a_s * x0_hat + torch.sqrt((sigma_s**2 - c2).clamp(min=0)) * eps_hat  # a_s x0 + √(σ_s² − c²) ε̂
    if eta > 0:
        x_s = x_s + torch.sqrt(c2) * noise(x_t.shape).to(x_t)  # + c z
    return x_s


class GaussianProcess(Process):
    predictions = ("eps", "x0", "v", "edm")
    white_noise = True

    def __init__(
        self,
        schedule: str = "linear",  # 'linear' (β 1e-4..0.02) or 'cosine'
        T: int = 1000,  # number of discrete steps of the reference schedule
        resolution: int = 32,  # image side (the state never changes resolution)
        shift: float = 1.0,  # resolution shift k: log-SNR -> log-SNR - 2 ln k (1 = none)
        data_range: tuple[float, float] | None = (-1.0, 1.0),  # x0's range, for clip_x0 (None: no clip)
        reference_resolution: int | None = None,  # train at `resolution` with this side's SNR trajectory
    ):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r} unknown; expected one of {sorted(SCHEDULES)}")
        if reference_resolution is not None:  # the SNR-matched shift k = N_hi / N_lo (sides)
            if not (isinstance(reference_resolution, int) and reference_resolution > 0) or shift != 1.0:
                raise ValueError(
                    f"reference_resolution={reference_resolution!r} (with shift={shift}): expected a "
                    "positive side and no shift beside it (it sets shift = resolution / reference_resolution)"
                )
            shift = resolution / reference_resolution
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.schedule, self.T, self.image_resolution, self.shift = (
            schedule,
            int(T),
            int(resolution),
            float(shift),
        )
        self.data_range = None if data_range is None else (float(data_range[0]), float(data_range[1]))
        alpha_bar = SCHEDULES[schedule](self.T)
        logsnr = torch.log(alpha_bar) - torch.log1p(-alpha_bar) - 2 * math.log(shift)  # [T], λ_i at t = i/T
        self.register_buffer("logsnr_table", logsnr.float(), persistent=False)

    # ---- schedule -----------------------------------------------------------------------------------
    def logsnr(self, t: Tensor) -> Tensor:
        """λ(t), linear interpolation of the table over t ∈ [1/T, 1] (clamped outside)."""
        pos = (t.float() * self.T - 1).clamp(0, self.T - 1)  # table index, fractional
        lo = pos.floor().long().clamp(max=self.T - 2)
        w = pos - lo
        table = self.logsnr_table.to(t.device)
        return table[lo] * (1 - w) + table[lo + 1] * w

    def t_from_logsnr(self, lam: Tensor) -> Tensor:
        """The inverse of ``logsnr`` on [1/T, 1] (exact for its piecewise-linear interpolation, clamped)."""
        table = -self.logsnr_table.to(lam.device)  # increasing in t
        x = (-lam.float()).clamp(float(table[0]), float(table[-1]))
        hi = torch.searchsorted(table, x.contiguous()).clamp(1, self.T - 1)
        lo = hi - 1
        w = (x - table[lo]) / (table[hi] - table[lo]).clamp(min=1e-12)
        return (lo.float() + w + 1) / self.T

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """The time where the EDM noise level sigma/a = exp(−λ/2) equals ``sigma`` (clamped to [1/T, 1])."""
        return self.t_from_logsnr(-2 * torch.log(sigma.float()))

    def alpha_bar(self, t: Tensor) -> Tensor:
        return torch.where(t <= 0, torch.ones_like(t, dtype=torch.float32), torch.sigmoid(self.logsnr(t)))

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lam = self.logsnr(t)
        a = torch.sqrt(torch.sigmoid(lam))
        sigma = torch.sqrt(torch.sigmoid(-lam))
        data = t <= 0
        return torch.where(data, torch.ones_like(a), a), torch.where(data, torch.zeros_like(sigma), sigma)

    def snr(self, t: Tensor) -> Tensor:
        return torch.exp(self.logsnr(t))

    def resolution(self, t: float | Tensor) -> int:
        return self.image_resolution

    # ---- process ------------------------------------------------------------------------------------
    def marginal(self, x0: Tensor, t: Tensor, noise: NoiseSource) -> tuple[Tensor, Tensor]:
        eps = noise(x0.shape).to(x0)
        a, sigma = (append_dims(v, x0.ndim) for v in self.scalings(t))
        return a * x0 + sigma * eps, eps

    def prior(self, shape: Sequence[int], noise: NoiseSource) -> Tensor:
        return noise(self.state_shape(shape, 1.0))  # N(0, I); the marginal at t = 1 adds √ᾱ_1 x0

    def step(
        self, x_t: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor, eta: float, noise: NoiseSource
    ) -> Tensor:
        return posterior_step(x_t, x0_hat, self.scalings(t), self.scalings(s), eta, noise)

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, sigma = (append_dims(v, x_t.ndim) for v in self.scalings(t))
        return (x_t - sigma * eps) / a

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        a, sigma = (append_dims(v, x_t.ndim) for v in self.scalings(t))
        return (x_t - a * x0) / sigma

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, T={self.T}, resolution={self.image_resolution}, shift={self.shift}"
