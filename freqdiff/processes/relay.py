"""Relay Diffusion's stage 2 (Teng et al., ICLR 2024; docs/methods/relay.md): patch blur, block noise.

Forward, at the high resolution, for one time ``t ≡ u ∈ [0, 1]`` that drives both the noise level and
the blur (the official ``BlurLoss``: one uniform draw per sample):

    x_t = Blur(x0; σ_B(u)) + σ(u) (ε + α ε_block),      scalings(t) = (1, σ(u))

- ``σ(u) = exp(P_mean + P_std Φ⁻¹(u · pl))``: EDM's log-normal truncated to its lower ``pl`` quantile.
  u is first clamped below at ``u_min = Φ((ln σ_clamp − P_mean) / P_std) · pl`` (σ_clamp = 0.0075, as
  the official loss does it: pl enters twice, so the smallest σ is 0.0069056 for pl 0.89, 0.0071228 for
  pl 0.93, not 0.0075), and the clamped u drives σ_B too. ``σ_B(u) = σ_B,max sin²(π u / 2)``.
- ``Blur``: split the image into non-overlapping p×p patches, orthonormal DCT-II of each patch,
  coefficient (k, l) times ``a_kl(σ_B) = (1 − m) exp(−(ω_k² + ω_l²) σ_B² / 2) + m``, ``ω_k = π k / p``,
  m = 0.001, inverse DCT. The patch mean (k = l = 0) is kept exactly for every σ_B.
- Block noise (``block_noise: sliding``, the official form): ``ε_block = (1/b) Σ_{dx,dy<b} roll(g, (dx, dy))``
  of white g, b = p: per-pixel variance 1, autocorrelation ``(b − |dx|)(b − |dy|) / b²``, the spectrum of
  nearest-upsampled white noise at H/b. ``disjoint``: nearest-upsampled white noise at H/b itself.
  Mixed with α = ``block_scale`` (0.15), not renormalised (per-pixel variance 1 + α²).
- Training target: the unblurred x0 with EDM preconditioning and EDM's weight (σ² + σ_d²)/(σ σ_d)²,
  clamped at 1e5 (``loss_weight``; it equals the "edm" natural weight, so only the clamp shows).

Sampling (``samplers.sample_relay``) does not start from a prior (``prior_std`` is None): it starts
from ``start_from(x_low, σ_start)``, the nearest-upsampled stage-1 sample plus noise of this kind, and
takes ``blur_step``s: with u_c = DCT(x_c), û0 = DCT(x0_hat), blur factors a_c, a_n and
``γ = √(1 − s_noise²) σ_n / σ_c``: ``x_n = IDCT(γ u_c + (a_n − γ a_c) û0) + s_noise σ_n (ε + α ε_block)``.
Fed the true x0 it maps the marginal at σ_c exactly onto the one at σ_n, for every s_noise in [0, 1].
The contract ``step(t, s, eta)`` is that step at σ(t) → σ(s) with DDIM-η's share of fresh noise,
``s_noise = eta √(1 − σ(s)²/σ(t)²)`` (eta = 0 deterministic; for white noise eta = 1 would be the
DDPM posterior: for this coloured, blurred process it is the same recipe, not the exact posterior).
The sampler maps σ → u with this process's P_mean and P_std (``blur_sigma_at``); its ``pl`` defaults
to the training value and may be set apart from it (the published CelebA-HQ sampler uses 1.05 where
training used 0.89).

Precision: the patch DCT is a pair of small matmuls and runs in full precision like all process math
(``ops``); it is exact to < 1e-12 in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from freqdiff.processes.base import NoiseSource, Process
from freqdiff.processes.ops import append_dims, as_batch_time, dct_matrix, full_precision_fn

BLOCK_NOISE = ("sliding", "disjoint")


def _ndtr(x: Tensor) -> Tensor:
    return torch.special.ndtr(x)


class RelayProcess(Process):
    predictions = ("edm", "x0")
    prior_std = None  # no prior: stage 2 starts from start_from(up_nearest(x_low), σ_start)

    def __init__(
        self,
        resolution: int = 256,  # image side of stage 2
        patch: int = 4,  # p: patch side of the blur = the up-scale factor from stage 1
        sigma_B_max: float = 2.0,  # σ_B,max (CelebA-HQ 2, ImageNet 3)
        pl: float = 0.89,  # truncation quantile of the log-normal (CelebA-HQ 0.89, ImageNet 0.93)
        P_mean: float = -1.2,  # EDM's ln σ mean (the official code names it twice; here once)
        P_std: float = 1.2,  # EDM's ln σ std
        sigma_clamp: float = 0.0075,  # the official clamp of σ from below (applied through u, see above)
        min_scale: float = 0.001,  # m: what is left of a coefficient at infinite blur
        block_scale: float = 0.15,  # α: weight of the block noise (0: white noise only)
        block_size: int | None = None,  # b (None: the patch side, as the official code)
        block_noise: str = "sliding",  # sliding (official) | disjoint (nearest-upsampled low-res noise)
        sigma_data: float = 0.5,  # σ_d of the loss weight (the Denoiser's EDM preconditioning)
        weight_max: float = 1e5,  # the loss weight's clamp
        data_range: tuple[float, float] | None = (-1.0, 1.0),
    ):
        super().__init__()
        b = patch if block_size is None else block_size
        for name, v in (("resolution", resolution), ("patch", patch), ("block_size", b)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r}: expected a positive integer")
        if resolution % patch or resolution % b:
            raise ValueError(
                f"resolution={resolution}: expected a multiple of patch={patch} and block_size={b}"
            )
        if not 0 < pl < 1:
            raise ValueError(f"pl={pl!r}: expected a quantile in (0, 1)")
        for name, v in (("sigma_clamp", sigma_clamp), ("P_std", P_std), ("sigma_data", sigma_data)):
            if not v > 0:
                raise ValueError(f"{name}={v!r}: expected a positive number")
        if not 0 <= min_scale < 1 or sigma_B_max < 0 or block_scale < 0:
            raise ValueError(
                f"min_scale={min_scale!r}, sigma_B_max={sigma_B_max!r}, block_scale={block_scale!r}: "
                "expected 0 <= min_scale < 1 and non-negative blur and block scales"
            )
        if block_noise not in BLOCK_NOISE:
            raise ValueError(
                f"block_noise={block_noise!r}: expected one of {', '.join(map(repr, BLOCK_NOISE))}"
            )
        self.image_resolution, self.patch, self.block_size = int(resolution), int(patch), int(b)
        self.sigma_B_max, self.pl, self.P_mean, self.P_std = (
            float(sigma_B_max),
            float(pl),
            float(P_mean),
            float(P_std),
        )
        self.sigma_clamp, self.min_scale, self.block_scale = (
            float(sigma_clamp),
            float(min_scale),
            float(block_scale),
        )
        self.block_noise_kind, self.sigma_data, self.weight_max = (
            block_noise,
            float(sigma_data),
            float(weight_max),
        )
        self.data_range = None if data_range is None else (float(data_range[0]), float(data_range[1]))
        z = (math.log(self.sigma_clamp) - self.P_mean) / self.P_std
        self.u_min = 0.5 * math.erfc(-z / math.sqrt(2)) * self.pl  # Φ(z) pl (plain floats: meta-safe)
        self.register_buffer("C", dct_matrix(self.patch), persistent=False)  # [p, p] float64
        w = math.pi * torch.arange(self.patch, dtype=torch.float64) / self.patch
        self.register_buffer("omega2", w[:, None] ** 2 + w[None, :] ** 2, persistent=False)  # [p, p]

    # ---- schedule (float64 inside, returned in t's float dtype) -------------------------------------
    def _u(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t).double().clamp(min=self.u_min, max=1.0)

    def sigma(self, t: Tensor) -> Tensor:
        """σ(u) = exp(P_mean + P_std Φ⁻¹(u pl)), u = max(t, u_min)."""
        t = torch.as_tensor(t)
        z = torch.special.ndtri(self._u(t) * self.pl)
        return torch.exp(self.P_mean + self.P_std * z).to(torch.promote_types(t.dtype, torch.float32))

    def blur_sigma(self, t: Tensor) -> Tensor:
        """σ_B(u) = σ_B,max sin²(π u / 2), u = max(t, u_min)."""
        t = torch.as_tensor(t)
        sb = self.sigma_B_max * torch.sin(self._u(t) * math.pi / 2) ** 2
        return sb.to(torch.promote_types(t.dtype, torch.float32))

    def blur_sigma_at(self, sigma: Tensor, pl: float | None = None) -> Tensor:
        """σ_B at noise level σ as the sampler sees it: u = Φ((ln σ − P_mean) / P_std) / pl (float64).

        ``pl`` defaults to the training value, where this equals ``blur_sigma(t_from_sigma(σ))``.
        """
        pl = self.pl if pl is None else float(pl)
        u = _ndtr((torch.as_tensor(sigma).double().log() - self.P_mean) / self.P_std) / pl
        return self.sigma_B_max * torch.sin(u * math.pi / 2) ** 2

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """The inverse of ``sigma`` on [σ(0), σ(1)] (σ below σ(0) maps below u_min, where σ(t) = σ(0))."""
        sigma = torch.as_tensor(sigma)
        u = _ndtr((sigma.double().clamp(min=1e-30).log() - self.P_mean) / self.P_std) / self.pl
        return u.clamp(0.0, 1.0).to(torch.promote_types(sigma.dtype, torch.float32))

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigma(t)
        return torch.ones_like(sigma), sigma

    def resolution(self, t: float | Tensor) -> int:
        return self.image_resolution

    def loss_weight(self, t: Tensor) -> Tensor:
        """EDM's (σ² + σ_d²)/(σ σ_d)², clamped at ``weight_max`` (the official BlurLoss)."""
        s2, d2 = self.sigma(t).double() ** 2, self.sigma_data**2
        return ((s2 + d2) / (s2 * d2)).clamp(max=self.weight_max).float()

    # ---- patch DCT and blur ---------------------------------------------------------------------------
    def _patches(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        p = self.patch
        if H % p or W % p:
            raise ValueError(f"image {H}x{W} is not a multiple of the patch side {p}")
        return x.reshape(B, C, H // p, p, W // p, p)

    @full_precision_fn
    def dct(self, x: Tensor, inverse: bool = False) -> Tensor:
        """Orthonormal DCT-II of every p×p patch (its inverse with ``inverse``); coefficient (k, l) of a
        patch sits at its pixel (k, l)."""
        dt = torch.promote_types(x.dtype, torch.float32)
        C = self.C.to(device=x.device, dtype=dt)
        spec = "kj,bcykxm,ml->bcyjxl" if inverse else "kj,bcyjxl,ml->bcykxm"
        return torch.einsum(spec, C, self._patches(x.to(dt)), C).reshape(x.shape)

    def idct(self, u: Tensor) -> Tensor:
        return self.dct(u, inverse=True)

    def factors(self, sigma_B: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """a_kl(σ_B) per sample, shaped [B, 1, 1, p, 1, p] to multiply the patch view of a DCT."""
        sb = torch.as_tensor(sigma_B).double().reshape(-1, 1, 1)
        a = (1 - self.min_scale) * torch.exp(-self.omega2.to(sb.device) * sb**2 / 2) + self.min_scale
        return a.reshape(-1, 1, 1, self.patch, 1, self.patch).to(dtype)

    def _scale(self, u: Tensor, a: Tensor) -> Tensor:
        return (self._patches(u) * a.to(device=u.device, dtype=u.dtype)).reshape(u.shape)

    @full_precision_fn
    def blur(self, x: Tensor, sigma_B: Tensor) -> Tensor:
        """Blur(x; σ_B) for per-sample σ_B [B] (or a scalar)."""
        return self.idct(self._scale(self.dct(x), self.factors(sigma_B)))

    @full_precision_fn
    def unblur(self, x: Tensor, sigma_B: Tensor) -> Tensor:
        """The inverse of ``blur`` (every factor is >= m > 0; ill-conditioned where m dominates)."""
        return self.idct(self._scale(self.dct(x), 1 / self.factors(sigma_B)))

    # ---- noise ----------------------------------------------------------------------------------------
    def block(self, shape: Sequence[int], noise: NoiseSource) -> Tensor:
        """ε_block [B, C, H, W] from one white draw (``block_noise`` says which form)."""
        B, C, H, W = (int(s) for s in shape)
        b = self.block_size
        if self.block_noise_kind == "disjoint":
            g = noise((B, C, H // b, W // b))
            return g.repeat_interleave(b, -2).repeat_interleave(b, -1)
        g = noise((B, C, H, W))
        rows = sum(torch.roll(g, dx, dims=-2) for dx in range(b))  # the b×b box sum, separably
        return sum(torch.roll(rows, dy, dims=-1) for dy in range(b)) / b

    def noise(self, shape: Sequence[int], noise: NoiseSource) -> Tensor:
        """ε + α ε_block (white first, then the block noise's own white draw, as the official code)."""
        eps = noise(tuple(shape))
        if self.block_scale > 0:
            eps = eps + self.block_scale * self.block(shape, noise).to(eps)
        return eps

    # ---- process --------------------------------------------------------------------------------------
    def marginal(self, x0: Tensor, t: Tensor, noise: NoiseSource) -> tuple[Tensor, Tensor]:
        t = as_batch_time(t, x0.shape[0], x0.device)
        n = self.noise(x0.shape, noise).to(
            device=x0.device, dtype=torch.promote_types(x0.dtype, torch.float32)
        )
        sigma = append_dims(self.sigma(t).to(n), x0.ndim)
        return self.blur(x0, self.blur_sigma(t)).to(n) + sigma * n, n

    def prior(self, shape: Sequence[int], noise: NoiseSource) -> Tensor:
        raise ValueError(
            "RelayProcess has no prior: stage 2 starts from start_from(up_nearest(x_low), sigma) "
            "(samplers.sample_relay)"
        )

    def start_from(self, x_low: Tensor, sigma: Tensor | float, noise: NoiseSource) -> Tensor:
        """``up_nearest(x_low) + σ (ε + α ε_block)``: the relay hand-off (x_low at H / n or at H)."""
        with torch.autocast(x_low.device.type, enabled=False):
            side = x_low.shape[-1]
            if self.image_resolution % side:
                raise ValueError(
                    f"start_from: a {side}² image does not upsample to {self.image_resolution}² "
                    "by an integer factor"
                )
            f = self.image_resolution // side
            x = x_low.repeat_interleave(f, -2).repeat_interleave(f, -1) if f > 1 else x_low
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            shape = (x.shape[0], *x.shape[1:])
            sigma = append_dims(as_batch_time(sigma, x.shape[0], x.device).to(x.dtype), x.ndim)
            return x + sigma * self.noise(shape, noise).to(x)

    @full_precision_fn
    def blur_step(
        self,
        x_c: Tensor,
        x0_hat: Tensor,
        sigma_c: Tensor,  # [B] noise level of x_c
        sigma_n: Tensor,  # [B] noise level of the step's end
        blur_c: Tensor,  # [B] σ_B at x_c
        blur_n: Tensor,  # [B] σ_B at the step's end
        s_noise: float
        | Tensor,  # fresh-noise share ([B] or scalar): 0 deterministic, 1 a fresh marginal draw
        noise: NoiseSource,
    ) -> Tensor:
        """``IDCT(γ u_c + (a_n − γ a_c) û0) + s_noise σ_n (ε + α ε_block)``, γ = √(1 − s_noise²) σ_n / σ_c."""
        sn_ = torch.as_tensor(s_noise, dtype=torch.float64, device=x_c.device)
        if bool(((sn_ < 0) | (sn_ > 1)).any()):
            raise ValueError(f"s_noise={s_noise!r}: expected a number in [0, 1]")
        dt = torch.promote_types(x_c.dtype, torch.float32)
        x_c, x0_hat = x_c.to(dt), x0_hat.to(dt)
        sc, sn = (torch.as_tensor(v, device=x_c.device).double() for v in (sigma_c, sigma_n))
        gamma = (1 - sn_**2).sqrt() * sn / sc
        a_c, a_n = self.factors(blur_c).to(x_c.device), self.factors(blur_n).to(x_c.device)
        g6 = gamma.reshape(-1, 1, 1, 1, 1, 1)
        u = self._scale(self.dct(x_c), g6) + self._scale(self.dct(x0_hat), a_n - g6 * a_c)
        x_n = self.idct(u)
        if bool((sn_ > 0).any()):
            x_n = x_n + append_dims((sn_ * sn).to(dt), x_n.ndim) * self.noise(x_n.shape, noise).to(x_n)
        return x_n

    def step(
        self, x_t: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor, eta: float, noise: NoiseSource
    ) -> Tensor:
        t, s = (as_batch_time(v, x_t.shape[0], x_t.device) for v in (t, s))
        sc, sn = self.sigma(t).double(), self.sigma(s).double()
        # DDIM-η's share of fresh noise (Song et al. 2021 in σ form): the DDPM posterior's for eta = 1
        s_noise = eta * (1 - (sn / sc) ** 2).clamp(min=0).sqrt()
        return self.blur_step(x_t, x0_hat, sc, sn, self.blur_sigma(t), self.blur_sigma(s), s_noise, noise)

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        t = as_batch_time(t, x_t.shape[0], x_t.device)
        sigma = append_dims(self.sigma(t).to(x_t), x_t.ndim)
        return self.unblur(x_t - sigma * eps, self.blur_sigma(t)).to(x_t)

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        t = as_batch_time(t, x_t.shape[0], x_t.device)
        sigma = append_dims(self.sigma(t).to(x_t), x_t.ndim)
        return (x_t - self.blur(x0, self.blur_sigma(t)).to(x_t)) / sigma

    def extra_repr(self) -> str:
        return (
            f"resolution={self.image_resolution}, patch={self.patch}, sigma_B_max={self.sigma_B_max}, "
            f"pl={self.pl}, block_scale={self.block_scale}, block_noise={self.block_noise_kind!r}"
        )
