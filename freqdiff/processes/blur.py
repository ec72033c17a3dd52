"""Blur diffusion (Lee, Chung, Kim, Ye 2022, "Progressive Deblurring of Diffusion Models";
docs/methods/blur.md).

A linear Gaussian process diagonal in an orthonormal basis ``U`` of the image (per axis, per channel):
each coefficient k is its own variance-preserving chain with per-step factor
``a_{i,k} = (1 − β_i) d_k^{2 f(i)}``, so ``Ā_{i,k} = ᾱ_i d_k^{2 F(i)}`` with ``F(i) = Σ_{j≤i} f(j)``, and

    x_t = U Ā_t^{1/2} Uᵀ x0 + U (I − Ā_t)^{1/2} Uᵀ ε        (ε white: what the network predicts)

High frequencies (small d_k) lose their signal first: the forward process blurs while it adds noise,
and the reverse process generates coarse to fine. Two bases on the same machinery:

- ``gaussian``: the eigenbasis of the zero-padded 1-D Gaussian blur matrix ``H`` (σ_k px, kernel of
  length 2·res − 1 as in the official code), ``H = U diag(d) Uᵀ``; the 2-D blur ``H X Hᵀ`` has the
  eigenvalues ``d_k d_l``, and ``W^p = U diag(d^p) Uᵀ`` blurs by p times the variance. Eigenvalues are
  clamped below at 0.03 (as the official code; at σ_k = 0.4 they lie in [0.838, 1) and it never acts).
  The blur is exactly per channel. The official code pairs coefficient (pixel p, channel c) with
  eigenvalue ``(3p + c) mod res²`` for RGB, 9.7 % (relative, Frobenius, at 64²) away from a per-channel
  blur (tests/test_blur.py); this project does not reproduce that.
- ``dct``: heat dissipation with Neumann boundaries (Rissanen et al. 2023): the orthonormal DCT-II
  coefficient of frequency ω = π k / res gets ``d_k = exp(−ω² σ_k² / 2)``, so ``d^f`` is again "f times
  the base variance".

Blur schedule ``f(i) = f_1 + (f_N − f_1) shape(i)``, ``f_N = (σ_max/σ_k)²``, ``f_1 = (σ_min/σ_k)²``,
shapes linear ``(i−1)/(N−1)``, log ``ln i / ln N``, quadratic ``(i²−1)/(N²−1)``, cubic ``i³/N³``,
quartic ``i⁴/N⁴`` (paper: quartic, σ_max 0.15, σ_min 0: f_N = 0.140625, F(N) = 28.195). β comes from
the Gaussian process (same table, same continuous-time log-SNR interpolation); F(t) interpolates
F(i) linearly in t·T. With σ_min = σ_max = 0 it is the Gaussian process (its methods are called).

Reverse steps: ``step`` is the exact per-coefficient posterior (η = 1) or its deterministic DDIM
form (η = 0) on any sub-grid; ``predictor_step`` is the paper's reverse-diffusion predictor
``x̂_s = (2 − √B) x̂_t + (1 − B) ŝ + √(1 − B) ẑ`` with ``B = Ā_t / Ā_s`` and the score
``ŝ = −(1 − Ā_t)^{−1/2} ε̂`` per coefficient (the official sampler, N − 1 steps). All basis math runs
in full precision (``ops.apply_per_axis``); per-coefficient factors are computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from freqdiff.processes.base import NoiseSource, Process
from freqdiff.processes.gaussian import GaussianProcess, posterior_step
from freqdiff.processes.ops import append_dims, apply_per_axis, dct_matrix, full_precision_fn

BASES = ("gaussian", "dct")
_MIN_EIGENVALUE = 0.03  # the official code's floor for the 1-D eigenvalues
# ln Ā floor: √Ā >= e^-16 ≈ 1.1e-7, the signal a float32 state can still resolve against unit noise.
# Below it a coefficient is pure noise in any case; the floor keeps Ā_t / Ā_s finite where strong blur
# would underflow, and bounds the amplification 1/√Ā of x0_hat to ~9e6 (x0_hat is float64, see below).
# The gaussian basis at the paper's settings never reaches it (ln Ā >= -30 at 64²); the DCT does.
_MIN_LOG_A_BAR = -32.0


def blur_shape(kind: str, i: Tensor, N: int) -> Tensor:
    """The schedule shape at steps ``i`` (float64), 0 at the start and 1 at ``i = N``."""
    shapes = {
        "linear": lambda: (i - 1) / (N - 1),
        "log": lambda: torch.log(i) / math.log(N),
        "quadratic": lambda: (i**2 - 1) / (N**2 - 1),
        "cubic": lambda: i**3 / N**3,
        "quartic": lambda: i**4 / N**4,
    }
    if kind not in shapes:
        raise ValueError(f"blur_schedule={kind!r}: expected one of {', '.join(map(repr, shapes))}")
    return shapes[kind]()


def blur_f(kind: str, N: int, sigma_k: float, sigma_min: float, sigma_max: float) -> Tensor:
    """f(i) for i = 1..N (float64 [N])."""
    i = torch.arange(1, N + 1, dtype=torch.float64)
    f1, fN = (sigma_min / sigma_k) ** 2, (sigma_max / sigma_k) ** 2
    return f1 + (fN - f1) * blur_shape(kind, i, N)


def gaussian_blur_matrix(n: int, sigma_k: float) -> Tensor:
    """``H`` [n, n]: 1-D Gaussian blur (std ``sigma_k`` px, kernel length 2n − 1, sum 1), zero padding."""
    offsets = torch.arange(-(n - 1), n, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma_k) ** 2)
    kernel = kernel / kernel.sum()
    idx = torch.arange(n)
    return kernel[(idx[None, :] - idx[:, None]) + (n - 1)]


def make_basis(kind: str, n: int, sigma_k: float) -> tuple[Tensor, Tensor]:
    """(U [n, n] orthonormal, columns the basis vectors; d [n] the 1-D eigenvalues), float64."""
    if kind == "gaussian":
        d, U = torch.linalg.eigh(gaussian_blur_matrix(n, sigma_k))
        return U, d.clamp(min=_MIN_EIGENVALUE)
    if kind == "dct":
        omega = math.pi * torch.arange(n, dtype=torch.float64) / n
        return dct_matrix(n).T.contiguous(), torch.exp(-(omega**2) * sigma_k**2 / 2)
    raise ValueError(f"basis={kind!r}: expected one of {', '.join(map(repr, BASES))}")


class BlurProcess(Process):
    predictions = ("eps", "x0")  # v would need a scalar (a, σ): not exact for coloured noise
    white_noise = False

    def __init__(
        self,
        resolution: int = 32,  # image side
        basis: str = "gaussian",  # 'gaussian' (blur-matrix eigenbasis) or 'dct' (heat dissipation)
        sigma_k: float = 0.4,  # base blur std in px (the unit of f)
        blur_schedule: str = "quartic",  # linear | log | quadratic | cubic | quartic
        sigma_min: float = 0.0,  # blur std of step 1 (f_1 = (sigma_min / sigma_k)²)
        sigma_max: float = 0.15,  # blur std of step N (f_N = (sigma_max / sigma_k)²)
        schedule: str = "linear",  # β schedule of the Gaussian process
        T: int = 1000,  # steps N of the discrete chain
        data_range: tuple[float, float] | None = (-1.0, 1.0),  # x0's range, for clip_x0
    ):
        super().__init__()
        if sigma_k <= 0 or sigma_min < 0 or sigma_max < 0:
            raise ValueError(
                f"sigma_k={sigma_k}, sigma_min={sigma_min}, sigma_max={sigma_max}: expected sigma_k > 0 "
                "and non-negative sigma_min, sigma_max"
            )
        self.gauss = GaussianProcess(schedule=schedule, T=T, resolution=resolution, data_range=data_range)
        self.T, self.image_resolution, self.basis_kind = int(T), int(resolution), basis
        self.sigma_k, self.sigma_min, self.sigma_max = float(sigma_k), float(sigma_min), float(sigma_max)
        self.blur_kind, self.data_range = blur_schedule, self.gauss.data_range
        U, d = make_basis(basis, self.image_resolution, self.sigma_k)
        f = blur_f(blur_schedule, self.T, self.sigma_k, self.sigma_min, self.sigma_max)
        self.blur_off = bool(sigma_min == 0 and sigma_max == 0)
        log_d2 = torch.log(d[:, None] * d[None, :]).clamp(max=0.0)  # 2-D eigenvalues d_k d_l <= 1
        self.register_buffer("U", U, persistent=False)  # float64 [R, R]
        self.register_buffer("log_d2", log_d2, persistent=False)  # float64 [R, R]
        self.register_buffer("f", f, persistent=False)  # float64 [T], f(i) for i = 1..T
        self.register_buffer("F", torch.cat([f.new_zeros(1), torch.cumsum(f, 0)]), persistent=False)

    # ---- schedule -----------------------------------------------------------------------------------
    def F_at(self, t: Tensor) -> Tensor:
        """F(t): the partial sum Σ_{j ≤ tT} f(j), linear between integer steps (float64 [B])."""
        pos = (t.double() * self.T).clamp(0, self.T)
        lo = pos.floor().long().clamp(max=self.T - 1)
        w = pos - lo
        F = self.F.to(t.device)
        return F[lo] * (1 - w) + F[lo + 1] * w

    def log_A_bar(self, t: Tensor) -> Tensor:
        """ln Ā_t per coefficient, float64 [B, 1, R, R] (0 at t = 0: the data; floored at -32)."""
        a, _ = self.gauss.scalings(t)
        log_abar = 2 * torch.log(a.double())
        out = log_abar[:, None, None] + 2 * self.F_at(t)[:, None, None] * self.log_d2.to(t.device)
        return out[:, None].clamp(min=_MIN_LOG_A_BAR)

    def factors(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(Ā_t^{1/2}, (1 − Ā_t)^{1/2}) per coefficient, float64 [B, 1, R, R] ([B, 1, 1, 1] with the
        blur off: then exactly the Gaussian process's scalings)."""
        if self.blur_off:
            return tuple(append_dims(v.double(), 4) for v in self.gauss.scalings(t))
        log_a = self.log_A_bar(t)
        return torch.exp(0.5 * log_a), torch.sqrt(-torch.expm1(log_a))

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The β part only, (√ᾱ_t, √(1 − ᾱ_t)): a per-sample summary (the blur is per coefficient)."""
        return self.gauss.scalings(t)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return self.gauss.t_from_sigma(sigma)

    def resolution(self, t: float | Tensor) -> int:
        return self.image_resolution

    # ---- basis --------------------------------------------------------------------------------------
    def to_coef(self, x: Tensor) -> Tensor:
        """Uᵀ X U per channel (full precision)."""
        return x if self.blur_off else apply_per_axis(x, self.U.T)

    def from_coef(self, c: Tensor) -> Tensor:
        """U C Uᵀ per channel (full precision)."""
        return c if self.blur_off else apply_per_axis(c, self.U)

    @full_precision_fn
    def blur(self, x: Tensor, p: float | Tensor) -> Tensor:
        """``W^p x = U diag((d_k d_l)^p) Uᵀ x``: blur by p times the base variance (p scalar or [B])."""
        p = torch.as_tensor(p, dtype=torch.float64, device=x.device).reshape(-1, 1, 1, 1)
        return self.from_coef(self.to_coef(x) * torch.exp(p * self.log_d2.to(x.device)).to(x.dtype))

    # ---- process ------------------------------------------------------------------------------------
    def marginal(self, x0: Tensor, t: Tensor, noise: NoiseSource) -> tuple[Tensor, Tensor]:
        if self.blur_off:
            return self.gauss.marginal(x0, t, noise)
        eps = noise(x0.shape).to(x0)
        sa, s1 = (v.to(x0.dtype) for v in self.factors(t))
        x_t = self.from_coef(sa * self.to_coef(x0) + s1 * self.to_coef(eps))
        return torch.where(append_dims(t <= 0, x0.ndim), x0, x_t), eps  # t = 0: the data, exactly

    def prior(self, shape: Sequence[int], noise: NoiseSource) -> Tensor:
        if self.blur_off:
            return self.gauss.prior(shape, noise)
        z = noise(self.state_shape(shape, 1.0))
        _, s1 = self.factors(torch.ones(z.shape[0], device=z.device))
        return self.from_coef(s1.to(z.dtype) * self.to_coef(z))  # the marginal at t = 1 minus its tiny mean

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x0 in float64: its high-frequency coefficients are amplified by up to 1/√Ā (~1e7 at large t)
        and would swamp the low ones in float32 pixels; ``step`` and ``eps_from_x0`` take it as is."""
        if self.blur_off:
            return self.gauss.x0_from_eps(x_t, eps, t)
        sa, s1 = self.factors(t)
        c = (self.to_coef(x_t.double()) - s1 * self.to_coef(eps.double())) / sa
        return self.from_coef(c)

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        if self.blur_off:
            return self.gauss.eps_from_x0(x_t, x0, t)
        sa, s1 = self.factors(t)
        c = (self.to_coef(x_t.double()) - sa * self.to_coef(x0.double())) / s1
        return self.from_coef(c).to(x_t.dtype)

    def step(
        self, x_t: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor, eta: float, noise: NoiseSource
    ) -> Tensor:
        """The exact per-coefficient posterior (η = 1) / DDIM step (η = 0), white noise per coefficient."""
        if self.blur_off:
            return self.gauss.step(x_t, x0_hat, t, s, eta, noise)
        at_t, at_s = self.factors(t), self.factors(s)  # float64, as is the math below
        c = posterior_step(self.to_coef(x_t.double()), self.to_coef(x0_hat.double()), at_t, at_s, eta, noise)
        x_s = self.from_coef(c).to(x_t.dtype)
        return torch.where(append_dims(s <= 0, x_t.ndim), x0_hat.to(x_t.dtype), x_s)  # s = 0: the data

    @full_precision_fn
    def predictor_step(
        self, x_t: Tensor, eps_hat: Tensor, t: Tensor, s: Tensor, noise: NoiseSource | None
    ) -> Tensor:
        """The paper's reverse-diffusion predictor from t to s (module docstring); no noise for None."""
        log_t, log_s = self.log_A_bar(t), self.log_A_bar(s)
        B = torch.exp(log_t - log_s)  # per-step factor a_{i,k} on consecutive steps
        score = -self.to_coef(eps_hat.double()) / torch.sqrt(-torch.expm1(log_t))
        c = (2 - torch.sqrt(B)) * self.to_coef(x_t.double()) + (1 - B) * score
        if noise is not None:
            c = c + torch.sqrt(1 - B) * noise(x_t.shape).to(x_t.device).double()
        return self.from_coef(c.to(x_t.dtype))

    @full_precision_fn
    def visible_x0(self, x0_hat: Tensor, t: Tensor, data_std: float = 0.5) -> Tensor:
        """x0_hat with each coefficient weighted by the fraction of it the state at t determines,
        ``SNR / (1 + SNR)`` with ``SNR = Ā s² / (1 − Ā)`` (s = ``data_std``): what to look at.

        x0_hat itself is the network's ε error amplified by ``Ā^{-1/2}`` in the coefficients the noise
        has swamped (up to ~1e7 at large t); weighted, those show as the mean (grey) and appear as t
        falls, low frequencies first: the x0_hat strips of blur diffusion show this."""
        if self.blur_off:
            a, sigma = (append_dims(v.double(), 4) for v in self.gauss.scalings(t))
            snr = (a / sigma.clamp(min=1e-20)) ** 2 * data_std**2
            return (x0_hat.double() * snr / (1 + snr)).to(torch.float32)
        log_a = self.log_A_bar(t)
        snr = torch.exp(log_a) / (-torch.expm1(log_a)).clamp(min=1e-300) * data_std**2
        return self.from_coef(self.to_coef(x0_hat.double()) * (snr / (1 + snr))).to(torch.float32)

    def extra_repr(self) -> str:
        return (
            f"basis={self.basis_kind}, resolution={self.image_resolution}, sigma_k={self.sigma_k}, "
            f"blur={self.blur_kind} [{self.sigma_min}, {self.sigma_max}], T={self.T}"
        )
