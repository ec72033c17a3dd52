"""Frequency instruments (freqdiff/analysis/frequency.py, docs/frequencies.md): spectra of processes,
block noise, chromatography, time adjustment between resolutions, empirical chromatography."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from freqdiff.analysis import frequency as fq
from freqdiff.metrics.spectra import fit_power_law, power_spectrum_2d, radial_mean, raps
from freqdiff.processes.gaussian import GaussianProcess
from freqdiff.processes.linear import ExactDenoiser
from freqdiff.processes.noise import NoiseSource
from freqdiff.processes.relay import RelayProcess
from freqdiff.processes.scale_space import ScaleSpaceProcess
from freqdiff.samplers import sample_ancestral, time_grid


def test_parseval_with_the_orthonormal_fft():
    x = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    p = power_spectrum_2d(x, beta=0.0)  # Kaiser β = 0: a rectangular window
    torch.testing.assert_close(p.sum(dim=(-2, -1)), x.square().sum(dim=(-2, -1)))
    assert torch.allclose(
        fq.dft_matrix(4, 4).conj().T @ fq.dft_matrix(4, 4), torch.eye(16, dtype=torch.complex128)
    )


def test_dead_leaves_exponent():
    """The quickstart's dead leaves at 32²: γ ≈ 2.9 over 1-16 cycles per image (measured 2.92)."""
    from datamodules.synthetic import DeadLeaves

    x = torch.from_numpy(np.asarray(DeadLeaves(resolution=32).images(256))).permute(0, 3, 1, 2).double()
    _, gamma = fit_power_law(*raps(x / 127.5 - 1), 1, 16)
    assert 2.7 < gamma < 3.1, gamma


def test_radial_mean_is_raps_binning():
    x = torch.randn(5, 16, 16, dtype=torch.float64)
    f, p = raps(x)
    f2, p2 = radial_mean(power_spectrum_2d(x).mean(0))
    torch.testing.assert_close(f, f2)
    torch.testing.assert_close(p, p2)


def test_gaussian_process_spectra_are_a2_p_over_sigma2():
    proc = GaussianProcess(resolution=8)
    P = torch.linspace(4.0, 0.1, 5, dtype=torch.float64)  # a falling data spectrum, bins 0..4
    for t in (0.2, 0.6):
        r = fq.process_spectra(proc, 8, t, P)
        a, s = (float(v) for v in proc.scalings(torch.tensor([t])))
        torch.testing.assert_close(r["gain2"], torch.full((5,), a * a, dtype=torch.float64))
        torch.testing.assert_close(r["noise"], torch.full((5,), s * s, dtype=torch.float64))
        _, P_bins = radial_mean(fq._power_at_radii(P, 8, 8).reshape(8, 8))  # the data model, binned
        torch.testing.assert_close(r["snr"], a * a * P_bins / (s * s), rtol=1e-6, atol=0)
        assert torch.allclose(P_bins[1:4], P[1:4], rtol=0.1)  # (binning smooths P by its neighbours)


def test_block_noise_spectrum_is_nearest_upsampled_low_resolution_noise():
    """Relay's sliding b×b block noise (the official form) and nearest-upsampled white noise at 1/b:
    the same spectrum, DC power b² (both |D_b(ω_x) D_b(ω_y)|² / b²)."""
    n, side, b = 3000, 16, 4
    proc = RelayProcess(resolution=side, patch=b)
    block = proc.block((n, 1, side, side), NoiseSource.from_seeds(range(n))).double()
    ref = fq.nearest_upsampled_noise(n, side, b, seed=1)
    f, p_block = raps(block)
    _, p_ref = raps(ref)
    assert torch.allclose(p_block[1:], p_ref[1:], rtol=0.06), (p_block, p_ref)
    assert p_block[1] > 5 * p_block[-1]  # coarse frequencies carry the block noise's power
    assert float(block.var()) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("which", ["relay", "scale_space"])
def test_analytic_spectra_match_draws(which):
    """The materialised spectra of a coloured-noise and a resolution-changing process against RAPS
    of draws (rectangular window, where a stationary field's periodogram is unbiased)."""
    side = 16
    if which == "relay":
        proc, t = RelayProcess(resolution=side, patch=4), 0.5
    else:
        proc, t = ScaleSpaceProcess(resolution=side, levels=3), 0.6
    x0 = torch.randn(1500, 1, side, side)
    a = fq.process_spectra(proc, side, t)
    e = fq.empirical_spectra(proc, x0, t, beta=0.0)
    assert len(a["freqs"]) == proc.resolution(t) // 2 + 1 == len(e["freqs"])
    for key in ("signal", "noise"):
        assert torch.allclose(e[key][1:], a[key][1:], rtol=0.08), (key, e[key], a[key])


def test_chromatography_bumps_peak_at_minus_two_ln_n():
    lam = torch.linspace(-15, 10, 5001, dtype=torch.float64)
    peaks = {}
    for n in (1, 2, 4, 8):
        share, rate = fq.chromatography(lam, n)
        peaks[n] = float(lam[rate.argmax()])
        assert peaks[n] == pytest.approx(-2 * math.log(n), abs=0.01)
        assert float(rate.max()) == pytest.approx(0.25, abs=1e-5)
        assert bool((share[1:] >= share[:-1]).all())  # more signal as λ grows
    assert peaks[1] - peaks[2] == pytest.approx(2 * math.log(2), abs=0.02)  # each halving: 2 ln 2 earlier


def test_schedule_mapping_gives_identical_chromatography_at_mapped_times():
    lin, cos = GaussianProcess(schedule="linear"), GaussianProcess(schedule="cosine")
    ts = torch.linspace(0.05, 0.95, 19)
    mapped = cos.t_from_logsnr(lin.logsnr(ts))  # ᾱ'_{t'} = ᾱ_t
    a = fq.resolution_chromatography(lin, ts.tolist())
    b = fq.resolution_chromatography(cos, mapped.tolist())
    for n in a:
        torch.testing.assert_close(a[n][1], b[n][1], rtol=0, atol=2e-3)
    assert not torch.allclose(a[4][1], fq.resolution_chromatography(cos, ts.tolist())[4][1], atol=2e-2)


def test_pooling_adds_two_ln_n_and_the_sd3_shift_undoes_it():
    """A rectified-flow state at SD3's shifted time t' = shift(t, n), pooled n×n, has the log-SNR of t."""
    n, side, B = 4, 16, 4000
    g = torch.Generator().manual_seed(0)
    low = torch.randn(B, 1, side // n, side // n, generator=g, dtype=torch.float64)
    x0 = low.repeat_interleave(n, -2).repeat_interleave(n, -1)  # constant on n×n blocks: pooling keeps it
    for t in (0.3, 0.5, 0.7):
        ts = float(fq.sd3_shift(t, n))
        eps = torch.randn(B, 1, side, side, generator=g, dtype=torch.float64)
        pool = torch.nn.functional.avg_pool2d
        sig, noi = pool((1 - ts) * x0, n), pool(ts * eps, n)
        measured = math.log(float(sig.var() / noi.var()))
        assert measured == pytest.approx(float(fq.pooled_logsnr(fq.rf_logsnr(ts), n)), abs=0.06)
        assert measured == pytest.approx(float(fq.rf_logsnr(t)), abs=0.06)  # the shift undid the pooling


def test_downsampled_state_is_a_vp_state_and_the_cascade_time_matches():
    proc = GaussianProcess(resolution=16)
    ab = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    p, ab_tau = fq.downsampled_state(ab, 4)
    torch.testing.assert_close(p, ab + (1 - ab) / 16)
    # λ_τ = ln(ᾱ_τ / (1 − ᾱ_τ)) = λ_t + 2 ln n: the pooled state's SNR
    torch.testing.assert_close(torch.log(ab_tau / (1 - ab_tau)), torch.log(ab / (1 - ab)) + 2 * math.log(4))
    lam_lo = torch.tensor([1.0, -2.0, -5.0], dtype=torch.float64)
    t_star = fq.cascade_time(proc, lam_lo, 4)
    torch.testing.assert_close(
        proc.logsnr(t_star.float()).double(), lam_lo - 2 * math.log(4), atol=1e-3, rtol=0
    )


def test_empirical_chromatography_of_the_exact_denoiser_matches_theory():
    """Gaussian data with a power-law spectrum, its exact denoiser, DDIM: the change of x0_hat per
    step, per frequency band, follows P (Δ√s_f)² with s_f = sigmoid(λ + ln P(f))."""
    side, steps = 16, 100
    r = fq.radius_grid(side, side, torch.device("cpu")).reshape(-1)
    p2d = r.clamp(min=1.0) ** -2.0 * 4.0  # P(f) = 4 f^-2 (DC as f = 1): coarse first
    F = fq.dft_matrix(side, side)
    cov = (F.conj().T @ torch.diag(p2d.to(torch.complex128)) @ F).real  # circular-stationary field
    proc = GaussianProcess(resolution=side)
    den = ExactDenoiser(proc, torch.zeros(1, side, side), cov)
    x0_hats = []
    sample_ancestral(
        proc, den, list(range(96)), (1, side, side), steps=steps, eta=0.0,
        callback=lambda d: x0_hats.append(d["x0_hat"]),
    )  # fmt: skip
    freqs, emp = fq.change_spectra(x0_hats, beta=0.0)
    grid = torch.tensor(time_grid(steps)[:-1])
    _, P = radial_mean(p2d.reshape(side, side))
    theory = fq.exact_change_spectra(P, proc.logsnr(grid).double())
    edges = [1, 2, 4, 9]
    e, th = fq.band_curves(emp, freqs, edges), fq.band_curves(theory, freqs, edges)
    assert float((e - th).abs().sum(0).max()) < 0.15, (e - th).abs().sum(0)  # L1 over time per band
    peak = th.argmax(0)  # coarse bands change earlier in the sampling (smaller step index)
    assert bool((peak[1:] > peak[:-1]).all()) and bool((e.argmax(0)[1:] > e.argmax(0)[:-1]).all())


def test_reference_resolution_is_the_snr_matched_shift():
    hi, lo = GaussianProcess(resolution=64, reference_resolution=16), GaussianProcess(resolution=16)
    assert hi.shift == 4.0
    t = torch.tensor([0.2, 0.5, 0.8])
    torch.testing.assert_close(hi.logsnr(t), lo.logsnr(t) - 2 * math.log(4))
    # the per-frequency SNR of a 4× larger image at the same t matches the reference's trajectory:
    # pooling the 64² state by 4 gives the 16² process's log-SNR
    torch.testing.assert_close(
        fq.pooled_logsnr(hi.logsnr(t).double(), 4), lo.logsnr(t).double(), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="reference_resolution"):
        GaussianProcess(resolution=64, reference_resolution=16, shift=2.0)


def test_shifted_logit_normal_moves_log_snr_by_ln_pixel_ratio():
    from freqdiff.timesteps import LogitNormalTime, ShiftedLogitNormalTime

    proc = GaussianProcess(resolution=64, schedule="cosine")
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    base = LogitNormalTime()(20000, g1, process=proc)
    shifted = ShiftedLogitNormalTime(resolution=64, reference_resolution=16)(20000, g2, process=proc)
    lam_b, lam_s = proc.logsnr(base), proc.logsnr(shifted)
    inside = (base > 0.01) & (base < 0.99) & (shifted > 0.002) & (shifted < 0.999)  # away from the clamps
    torch.testing.assert_close(lam_s[inside], lam_b[inside] - math.log(64**2 / 16**2), atol=2e-3, rtol=0)
    assert float(shifted.mean()) > float(base.mean())  # more noise for the larger image
    same = ShiftedLogitNormalTime(resolution=32, reference_resolution=32)(
        5, torch.Generator().manual_seed(1), process=proc
    )
    torch.testing.assert_close(
        same, LogitNormalTime()(5, torch.Generator().manual_seed(1), process=proc), atol=2e-6, rtol=0
    )
    with pytest.raises(ValueError, match="needs the process"):
        ShiftedLogitNormalTime()(4)


def _power_law_images(B: int, side: int, seed: int = 0) -> torch.Tensor:
    return fq.power_law_field(B, side, scale=0.25, seed=seed)  # P = 0.25 f^-2


def test_spectrum_weighted_time_is_its_base_for_power_law_data(tmp_path):
    from freqdiff.spectral_time import SpectrumWeightedTime

    proc = GaussianProcess(resolution=32)
    s = SpectrumWeightedTime(resolution=32, reference_resolution=32, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="fit_data"):
        s(4, process=proc)
    sp = s.fit_data(_power_law_images(256, 32), key="abc123")
    assert np.allclose(sp["ratio"], 1.0, atol=0.25)  # ρ ≈ 1 (Kaiser window and binning leave a little)
    t = s(50000, torch.Generator().manual_seed(0), process=proc)
    base = s.__class__.__mro__[1].__call__(s, 50000, torch.Generator().manual_seed(1), process=proc)
    for q in (0.1, 0.5, 0.9):
        assert float(t.quantile(q)) == pytest.approx(float(base.quantile(q)), abs=0.03)
    # the cache: a new sampler with the same key reads the file instead of the images
    again = SpectrumWeightedTime(resolution=32, reference_resolution=32, cache_dir=str(tmp_path))
    np.testing.assert_allclose(again.fit_data(torch.zeros(1, 1, 32, 32), key="abc123")["ratio"], sp["ratio"])
    torch.testing.assert_close(
        again(8, torch.Generator().manual_seed(3), process=proc),
        s(8, torch.Generator().manual_seed(3), process=proc),
    )


def test_spectrum_weighted_time_favours_the_times_of_excess_structure():
    """Data with extra power at 4 cycles per image: more training times where 4 c/img crosses SNR 1."""
    from freqdiff.spectral_time import SpectrumWeightedTime

    side = 32
    proc = GaussianProcess(resolution=side)
    x = _power_law_images(256, side)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    phase = 2 * math.pi * torch.rand(256, 1, 1, 1, generator=torch.Generator().manual_seed(5))
    x = x + 0.3 * torch.cos(2 * math.pi * 4 * xx / side + phase)  # a strong 4 c/img component
    s = SpectrumWeightedTime(resolution=side, reference_resolution=side)
    sp = s.fit_data(x)
    k = int(np.argmax(sp["ratio"]))
    assert sp["freqs"][k] == 4.0
    centres, base, weighted = s.density(proc)
    t4 = float(proc.t_from_logsnr(-torch.log(torch.tensor([float(sp["power"][k])]))))
    near = (centres - t4).abs() < 0.02
    assert float((weighted[near] / base[near]).mean()) > 1.5  # more mass where the excess resolves
    assert float(weighted.sum() / len(weighted)) == pytest.approx(1.0)
