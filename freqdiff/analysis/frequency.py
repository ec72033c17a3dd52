"""Frequency instruments for any process and any trained model (docs/frequencies.md).

- ``process_spectra``: the *analytic* per-frequency signal power, noise power and SNR of a process at
  time t, read off its linear map (``processes.linear.materialise``: A_t and Σ_t) in the orthonormal
  2-D DFT basis: with ``M = F_out A_t F_inᴴ`` and a stationary data model of power P(f),
  ``signal(k) = Σ_j |M_kj|² P(f_j)``, ``noise(k) = (F_out Σ_t F_outᴴ)_kk``, averaged over RAPS's
  annuli (``metrics.spectra.radial_mean``). It serves white, block and coloured noise, blur bases and
  a state at another resolution (Scale Space: the output bins stop at its Nyquist frequency) alike.
  Small states only (it builds dense D×D matrices; 32² is fine).
- ``empirical_spectra``: the same from draws: the RAPS of A_t x0 (the marginal with zero noise) over
  the RAPS of the noise alone (the marginal of zero images).
- ``chromatography``: the share of signal at resolution level n, ``sigmoid(λ + 2 ln n)``, and its rate
  ``d share / dλ = share (1 − share)``, a logistic bump centred at ``λ = −2 ln n`` (so each halving of
  the resolution peaks ``2 ln 2`` earlier in λ); ``resolution_chromatography`` over a process's time.
- Time adjustment between resolutions: average-pooling by n adds ``2 ln n`` to the log-SNR
  (``pooled_logsnr``); SD3's shift ``t' = S t / (1 + (S − 1) t)`` subtracts ``2 ln S`` from the
  rectified-flow log-SNR ``2 ln((1 − t)/t)`` (``sd3_shift``, ``rf_logsnr``); a downsampled VP state
  ``D_n x_t`` has scale ``p = ᾱ + (1 − ᾱ)/n²`` and ``D_n x_t / √p`` is a VP state at ``ᾱ_τ = ᾱ/p``
  (``downsampled_state``); ``cascade_time`` is the high-resolution time whose log-SNR is a
  low-resolution one minus ``2 ln n`` (the cascade's hand-off).
- Empirical chromatography of a sampler run (``change_spectra``): the RAPS of the change of x0_hat
  between consecutive steps, per frequency bin, over the steps; ``band_curves`` sums it into bands
  and normalises each band's curve over time. ``exact_change_spectra`` is the theory for Gaussian
  data of power P(f) under the exact denoiser and a deterministic sampler: frequency f's x0_hat is
  ``√(P s_f) z`` with ``s_f = sigmoid(λ + ln P(f))``, so its change between steps has power
  ``P (Δ√s_f)²``.

Conventions: frequencies in cycles per image (RAPS's bins), float64, log-SNR λ = ln(a²/σ²).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from freqdiff.metrics.spectra import KAISER_BETA, radial_mean, radius_grid, raps
from freqdiff.processes.base import NoiseSource, Process
from freqdiff.processes.linear import ZeroNoise, materialise


def dft_matrix(h: int, w: int) -> Tensor:
    """The orthonormal 2-D DFT as a complex128 matrix [HW, HW] on row-major flattened images."""
    fy = torch.fft.fft(torch.eye(h, dtype=torch.complex128), norm="ortho")  # [h, h]
    fx = torch.fft.fft(torch.eye(w, dtype=torch.complex128), norm="ortho")  # [w, w]
    return torch.kron(fy, fx)


def _power_at_radii(power: Tensor | None, h: int, w: int) -> Tensor:
    """A RAPS-like power [R] interpolated at every 2-D frequency of an h×w grid (None: ones) -> [HW]."""
    r = radius_grid(h, w, torch.device("cpu")).reshape(-1)
    if power is None:
        return torch.ones_like(r)
    p = torch.as_tensor(power, dtype=torch.float64)
    i0 = r.floor().long().clamp(max=len(p) - 1)
    i1 = (i0 + 1).clamp(max=len(p) - 1)
    frac = r - r.floor()
    return p[i0] * (1 - frac) + p[i1] * frac


@torch.no_grad()
def process_spectra(
    process: Process,
    side: int,  # image side of the data (one channel is analysed)
    t: float,
    data_power: Tensor | None = None,  # RAPS of the data [R] (None: 1 in every bin, the transfer alone)
) -> dict[str, Tensor]:
    """Analytic ``freqs``, ``signal``, ``noise``, ``snr`` [R_out] and ``gain2`` (white-data transfer)."""
    A, S = materialise(process, (1, side, side), t)  # [D_out, D_in], [D_out, D_out]
    out_side = math.isqrt(A.shape[0])
    f_in, f_out = dft_matrix(side, side), dft_matrix(out_side, out_side)
    M = f_out @ A.to(torch.complex128) @ f_in.conj().T  # [D_out, D_in]
    m2 = M.real.square() + M.imag.square()
    p_in = _power_at_radii(data_power, side, side)  # [D_in]
    signal = (m2 @ p_in).reshape(out_side, out_side)
    gain2 = m2.sum(1).reshape(out_side, out_side)
    noise = (f_out @ S.to(torch.complex128) @ f_out.conj().T).diagonal().real.reshape(out_side, out_side)
    freqs, sig = radial_mean(signal)
    _, noi = radial_mean(noise)
    _, g2 = radial_mean(gain2)
    return {"freqs": freqs, "signal": sig, "noise": noi, "gain2": g2, "snr": sig / noi.clamp_min(1e-300)}


@torch.no_grad()
def empirical_spectra(
    process: Process, x0: Tensor, t: float, seed: int = 0, beta: float = KAISER_BETA
) -> dict[str, Tensor]:
    """``freqs``, ``signal`` (RAPS of A_t x0), ``noise`` (RAPS of the noise alone), ``snr`` from draws.

    ``x0`` [B, C, H, W]; the noise uses seeds ``seed .. seed + B − 1``; ``beta`` is RAPS's window.
    """
    tb = torch.full((x0.shape[0],), float(t))
    signal, _ = process.marginal(x0, tb, ZeroNoise(x0.shape[0]))
    noise, _ = process.marginal(torch.zeros_like(x0), tb, NoiseSource.from_seeds(range(seed, seed + len(x0))))
    freqs, sig = raps(signal, beta=beta)
    _, noi = raps(noise, beta=beta)
    return {"freqs": freqs, "signal": sig, "noise": noi, "snr": sig / noi.clamp_min(1e-300)}


def power_law_field(batch: int, side: int, scale: float = 1.0, gamma: float = 2.0, seed: int = 0) -> Tensor:
    """A circular-stationary Gaussian field of power ``scale f^−γ`` (DC as f = 1), [B, 1, side, side]."""
    r = radius_grid(side, side, torch.device("cpu")).clamp(min=1.0)
    g = torch.Generator().manual_seed(seed)
    w = torch.fft.fft2(torch.randn(batch, 1, side, side, generator=g, dtype=torch.float64), norm="ortho")
    return torch.fft.ifft2(w * (scale * r**-gamma).sqrt(), norm="ortho").real


def nearest_upsampled_noise(batch: int, side: int, b: int, seed: int = 0) -> Tensor:
    """White noise at side/b, nearest-upsampled by b: the reference spectrum of b×b block noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, 1, side // b, side // b, generator=g, dtype=torch.float64)
    return low.repeat_interleave(b, dim=-2).repeat_interleave(b, dim=-1)


# ---------------------------------------------------------------- chromatography and time adjustment
def chromatography(logsnr: Tensor, n: float) -> tuple[Tensor, Tensor]:
    """(share, rate) of resolution level n at log-SNR λ: ``sigmoid(λ + 2 ln n)`` and ``share (1 − share)``."""
    share = torch.sigmoid(torch.as_tensor(logsnr, dtype=torch.float64) + 2 * math.log(n))
    return share, share * (1 - share)


def resolution_chromatography(
    process, ts: Sequence[float], levels: Sequence[int] = (1, 2, 4, 8)
) -> dict[int, tuple[Tensor, Tensor]]:
    """Level n -> (share [T], rate [T]) over the times ``ts`` of a process with ``logsnr(t)``."""
    lam = process.logsnr(torch.as_tensor(list(ts), dtype=torch.float32)).double()
    return {int(n): chromatography(lam, n) for n in levels}


def pooled_logsnr(logsnr: Tensor | float, n: float) -> Tensor:
    """The log-SNR of an n×n average-pooled white-noise state: ``λ + 2 ln n``."""
    return torch.as_tensor(logsnr, dtype=torch.float64) + 2 * math.log(n)


def rf_logsnr(t: Tensor | float) -> Tensor:
    """Rectified flow ``x_t = (1 − t) x0 + t ε``: ``λ = 2 ln((1 − t)/t)``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return 2 * (torch.log1p(-t) - torch.log(t))


def sd3_shift(t: Tensor | float, S: float) -> Tensor:
    """SD3's resolution shift ``S t / (1 + (S − 1) t)``: ``rf_logsnr`` drops by exactly ``2 ln S``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return S * t / (1 + (S - 1) * t)


def downsampled_state(alpha_bar: Tensor | float, n: float) -> tuple[Tensor, Tensor]:
    """(p, ᾱ_τ): ``D_n x_t`` has scale ``p = ᾱ + (1 − ᾱ)/n²``; ``D_n x_t/√p`` is VP at ``ᾱ_τ = ᾱ/p``."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    p = ab + (1 - ab) / n**2
    return p, ab / p


def cascade_time(process_hi, logsnr_lo: Tensor | float, n: float) -> Tensor:
    """The high-resolution time t* with ``λ_hi(t*) = λ_lo − 2 ln n`` (``process_hi.t_from_logsnr``)."""
    lam = torch.as_tensor(logsnr_lo, dtype=torch.float64) - 2 * math.log(n)
    return process_hi.t_from_logsnr(lam.float().reshape(-1)).double()


# ---------------------------------------------------------------- empirical chromatography of a model
def change_spectra(x0_hats: Sequence[Tensor], beta: float = KAISER_BETA) -> tuple[Tensor, Tensor]:
    """``freqs`` [R] and the RAPS of ``x0_hat_{i+1} − x0_hat_i`` per step, [S − 1, R] (batch-averaged).

    ``x0_hats``: x0_hat of every sampler step (e.g. the sampler callback's ``d["x0_hat"]``), all at
    one resolution.
    """
    if len(x0_hats) < 2:
        raise ValueError(f"change_spectra needs at least 2 steps of x0_hat, got {len(x0_hats)}")
    rows = [raps((b.double() - a.double()), beta=beta) for a, b in zip(x0_hats, x0_hats[1:])]
    return rows[0][0], torch.stack([p for _, p in rows])


def band_curves(power: Tensor, freqs: Tensor, edges: Sequence[float]) -> Tensor:
    """``power`` [S, R] summed over the bins ``edges[i] <= f < edges[i+1]``, each band's curve
    normalised to sum 1 over the steps -> [S, bands]."""
    bands = []
    for lo, hi in zip(edges, edges[1:]):
        keep = (freqs >= lo) & (freqs < hi)
        if not bool(keep.any()):
            raise ValueError(f"band [{lo}, {hi}) holds no frequency bin of {freqs.tolist()}")
        bands.append(power[:, keep].sum(1))
    out = torch.stack(bands, dim=1)
    return out / out.sum(0, keepdim=True).clamp_min(1e-300)


def exact_change_spectra(data_power: Tensor, logsnrs: Tensor) -> Tensor:
    """Theory of ``change_spectra`` for Gaussian data of power P(f) [R] and the exact denoiser under a
    deterministic sampler visiting the log-SNRs ``logsnrs`` [S] (decreasing t): ``P (Δ√s_f)²`` [S − 1, R]."""
    P = torch.as_tensor(data_power, dtype=torch.float64)
    lam = torch.as_tensor(logsnrs, dtype=torch.float64)[:, None]
    s = torch.sigmoid(lam + torch.log(P.clamp_min(1e-300))[None, :])  # [S, R]
    return P[None, :] * (s[1:].sqrt() - s[:-1].sqrt()).square()
