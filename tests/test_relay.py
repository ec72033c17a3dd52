"""Relay Diffusion's stage-2 process and sampler (docs/methods/relay.md; THUDM/RelayDiffusion).

The contract suite (tests/test_processes.py, entry "relay") covers marginals, steps, conversions and
the precision policy; here: the patch DCT, the blur, the block noise, the schedule's numbers, the
blurring step at the sampler's s_noise values, and the truncated two-stage sampler.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from freqdiff.processes.base import NoiseSource
from freqdiff.processes.linear import ExactDenoiser, materialise
from freqdiff.processes.relay import RelayProcess
from freqdiff.samplers import relay_grid, sample_relay


def _noise(seed: int) -> NoiseSource:
    return NoiseSource(torch.Generator().manual_seed(seed))


def up(x: torch.Tensor, p: int) -> torch.Tensor:
    return x.repeat_interleave(p, -2).repeat_interleave(p, -1)


def test_patch_dct_is_orthonormal_and_invertible():
    p = RelayProcess(resolution=16, patch=4)
    x = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    u = p.dct(x)
    assert u.dtype == torch.float64
    assert (p.idct(u) - x).abs().max() < 1e-12
    torch.testing.assert_close(u.norm(), x.norm(), rtol=1e-13, atol=0)
    # coefficient (0, 0) of each patch is p times the patch mean (orthonormal DCT-II)
    torch.testing.assert_close(u[..., ::4, ::4], 4 * F.avg_pool2d(x, 4), rtol=1e-12, atol=1e-12)
    # patches are independent: changing one patch changes only its own coefficients
    y = x.clone()
    y[..., :4, :4] += 1.0
    changed = (p.dct(y) - u).abs() > 1e-12
    assert changed[..., :4, :4].any() and not changed[..., 4:, :].any() and not changed[..., :, 4:].any()


def test_blur_keeps_patch_means_and_is_the_identity_at_zero():
    p = RelayProcess(resolution=16, patch=4)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert (p.blur(x, torch.zeros(2)) - x).abs().max() < 1e-12
    for sb in (0.3, 1.0, 2.0, 3.0, 50.0):
        y = p.blur(x, torch.full((2,), sb))
        assert (F.avg_pool2d(y, 4) - F.avg_pool2d(x, 4)).abs().max() < 1e-12
        assert (y - x).abs().max() > 0.1  # and it does blur
    # σ_B -> ∞: the nearest-upsampled patch means plus m times the within-patch residual
    mean = up(F.avg_pool2d(x, 4), 4)
    torch.testing.assert_close(
        p.blur(x, torch.full((2,), 1e3)), mean + 0.001 * (x - mean), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(p.unblur(p.blur(x, torch.full((2,), 2.0)), torch.full((2,), 2.0)), x)


def test_blur_factors_are_the_papers():
    p = RelayProcess(resolution=8, patch=4, min_scale=0.001)
    a = p.factors(torch.tensor([1.5])).reshape(4, 4)
    k = torch.arange(4, dtype=torch.float64)
    w2 = (math.pi * k / 4) ** 2
    want = 0.999 * torch.exp(-(w2[:, None] + w2[None, :]) * 1.5**2 / 2) + 0.001
    torch.testing.assert_close(a, want, rtol=1e-14, atol=0)


def _autocorr(n: torch.Tensor, d: int, dim: int) -> float:
    return float((n * torch.roll(n, d, dims=dim)).mean() / (n * n).mean())


def test_block_noise_variance_autocorrelation_and_spectrum():
    p = RelayProcess(resolution=32, patch=4, block_scale=0.15)
    e = p.block((2000, 1, 32, 32), _noise(0))
    assert float(e.var()) == pytest.approx(1.0, abs=0.01)
    for dim in (-2, -1):
        got = [_autocorr(e, d, dim) for d in range(5)]
        assert got == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=0.01), got
    # the spectrum of nearest-upsampled low-resolution white noise (the disjoint form), and the analytic
    # |S(k)|² |S(l)|² / b² with S(k) = Σ_{d<b} exp(−2πi k d / N): DC power b² = 16
    d = RelayProcess(resolution=32, patch=4, block_noise="disjoint").block((2000, 1, 32, 32), _noise(1))
    assert float(d.var()) == pytest.approx(1.0, abs=0.02)
    power = lambda z: (torch.fft.fft2(z.double()).abs() ** 2).mean((0, 1)) / (32 * 32)  # noqa: E731
    k = torch.arange(32, dtype=torch.float64)
    S2 = (torch.exp(-2j * math.pi * k[:, None] * torch.arange(4) / 32).sum(1).abs() ** 2).double()
    analytic = S2[:, None] * S2[None, :] / 16
    assert float(analytic[0, 0]) == pytest.approx(16.0)
    big = analytic > 0.05  # relative comparison where the spectrum is not ~0
    for P in (power(e), power(d)):
        assert float(((P - analytic).abs()[big] / analytic[big]).max()) < 0.15
        assert float((P - analytic).abs()[~big].max()) < 0.02


def test_noise_mixes_white_and_block_noise_without_renormalising():
    p = RelayProcess(resolution=16, patch=4, block_scale=0.15)
    n = p.noise((4000, 1, 16, 16), _noise(2))
    assert float(n.var()) == pytest.approx(1 + 0.15**2, abs=0.01)


def test_schedule_spot_values():
    """The schedule spot values (ImageNet's pl 0.93, σ_B,max 3) and the official clamp's effective minimum."""
    p = RelayProcess(pl=0.93, sigma_B_max=3.0)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    assert p.sigma(t).tolist() == pytest.approx([0.1491, 0.9789], abs=1e-4)
    assert p.blur_sigma(t).tolist() == pytest.approx([0.618, 2.927], abs=1e-3)
    assert float(p.sigma(torch.tensor(1.0))) == pytest.approx(1.770, abs=1e-3)
    assert float(RelayProcess(pl=0.89).sigma(torch.tensor(1.0))) == pytest.approx(1.312, abs=1e-3)
    assert float(p.sigma(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(0.0071228, rel=1e-4)
    assert float(RelayProcess(pl=0.89).sigma(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(
        0.0069056, rel=1e-4
    )


def test_time_map_and_the_samplers_pl():
    p = RelayProcess(pl=0.89, sigma_B_max=2.0)
    t = torch.linspace(p.u_min, 1.0, 50, dtype=torch.float64)
    torch.testing.assert_close(p.t_from_sigma(p.sigma(t)), t, rtol=0, atol=1e-10)
    sigma = p.sigma(t)
    torch.testing.assert_close(p.blur_sigma_at(sigma), p.blur_sigma(t), rtol=0, atol=1e-10)
    # the published CelebA-HQ sampler's pl 1.05: at σ = 0.9 it assumes σ_B 1.77 where training used 1.97
    s = torch.tensor([0.9], dtype=torch.float64)
    assert float(p.blur_sigma_at(s, pl=1.05)) == pytest.approx(1.77, abs=0.01)
    assert float(p.blur_sigma_at(s)) == pytest.approx(1.97, abs=0.01)


@pytest.mark.parametrize("s_noise", [0.0, 0.2, 1.0])
def test_blurring_step_with_true_x0_maps_marginal_onto_marginal(s_noise):
    """x_c ~ q at (σ_c, σ_B,c); one blurring step fed the true x0 gives q at (σ_n, σ_B,n), exactly."""
    p = RelayProcess(resolution=4, patch=2, sigma_B_max=2.0, pl=0.89, block_scale=0.15)
    n, tc, tn = 20_000, 0.8, 0.45
    x0 = (torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1).expand(n, 1, 4, 4)
    x_c, _ = p.marginal(x0, torch.full((n,), tc), _noise(4))
    T = lambda v: torch.full((n,), v)  # noqa: E731
    x_n = p.blur_step(
        x_c, x0, p.sigma(T(tc)), p.sigma(T(tn)), p.blur_sigma(T(tc)), p.blur_sigma(T(tn)), s_noise, _noise(5)
    )
    A, S = materialise(p, (1, 4, 4), tn)
    flat = x_n.flatten(1).double()
    mean, cov = flat.mean(0), torch.cov(flat.T)
    assert (mean - A @ x0[0].double().reshape(-1)).abs().max() < 5 * float(S.diagonal().max().sqrt()) / n**0.5
    assert (cov - S).abs().max() < 0.05 * float(S.diagonal().mean())


def test_start_from_upsamples_and_adds_the_process_noise():
    p = RelayProcess(resolution=16, patch=4, block_scale=0.15)
    x_low = torch.rand(3000, 1, 4, 4) * 2 - 1
    x = p.start_from(x_low, 0.5, _noise(6))
    assert x.shape == (3000, 1, 16, 16)
    r = x - up(x_low, 4)
    assert float(r.var()) == pytest.approx(0.25 * (1 + 0.15**2), rel=0.02)
    with pytest.raises(ValueError, match="integer factor"):
        p.start_from(torch.zeros(1, 1, 5, 5), 0.5, _noise(6))
    with pytest.raises(ValueError, match="no prior"):
        p.prior((1, 1, 16, 16), _noise(6))


def test_celebahq_truncation_arithmetic_and_nfe():
    grid = relay_grid(150, sigma_min=0.008, sigma_max=80.0, rho=7.0, truncation=0.95)
    assert (
        len(grid) == 54 and grid[0] == pytest.approx(0.92191, abs=1e-5) and grid[-1] == pytest.approx(0.008)
    )
    p = RelayProcess(resolution=8, patch=4, pl=0.89, sigma_B_max=2.0)
    calls = []

    def D(x, t, labels=None):
        calls.append(float(p.sigma(t[:1].double())))
        return torch.zeros_like(x)

    out = sample_relay(p, D, [0, 1], (1, 8, 8), torch.zeros(2, 1, 2, 2), steps=150, pl=1.05)
    assert out.shape == (2, 1, 8, 8)
    assert len(calls) == 2 * 53 + 1  # Heun-like correction on all but the last, which returns D
    assert calls[0] == pytest.approx(grid[0], rel=1e-5)  # the network sees the grid's σ exactly
    assert len(set(round(c, 6) for c in calls)) == 54
    calls.clear()
    sample_relay(p, D, [0], (1, 8, 8), torch.zeros(1, 1, 2, 2), steps=150, corrector=False)
    assert len(calls) == 54


def test_cfg_scale_one_is_the_conditional_model():
    p = RelayProcess(resolution=8, patch=4)
    seen = []

    def D(x, t, labels=None):
        seen.append(labels)
        return torch.tanh(x) * (0.5 if labels is None else 1.0)

    low = torch.rand(2, 1, 2, 2)
    a = sample_relay(p, D, [5, 6], (1, 8, 8), low, steps=20, labels=torch.tensor([1, 2]), cfg_scale=1.0)
    assert all(v is not None for v in seen)  # no unconditional call at w = 1
    b = sample_relay(p, D, [5, 6], (1, 8, 8), low, steps=20, labels=torch.tensor([1, 2]), cfg_scale=3.5)
    assert any(v is None for v in seen) and not torch.equal(a, b)


def test_relay_sampler_with_exact_denoiser_reproduces_gaussian_data():
    """With a blur strong enough that start_from(avg_pool(x0)) is the marginal at the start (a = m in every
    coefficient but the mean), the whole truncated sampler with the posterior-mean denoiser draws the data.

    Here every frequency but the mean emerges below σ ≈ 0.07, so the grid needs many points: at 150 the
    relative covariance error is 0.28 (Euler, s_noise 0: 0.31), at 600 it is 0.08 (Euler: 0.10)."""
    p = RelayProcess(resolution=4, patch=2, sigma_B_max=30.0, pl=0.89, block_scale=0.15)
    d = 16
    g = torch.Generator().manual_seed(0)
    mean = (torch.rand(d, generator=g) - 0.5).reshape(1, 4, 4)
    B = torch.randn(d, d, generator=g) * 0.15
    cov = B @ B.T + 0.02 * torch.eye(d)
    D = ExactDenoiser(p, mean, cov)
    n = 4000
    x0 = mean.reshape(1, -1) + torch.randn(n, d, generator=g) @ torch.linalg.cholesky(cov).T
    x_low = F.avg_pool2d(x0.reshape(n, 1, 4, 4), 2)
    x = sample_relay(
        p, D, NoiseSource(torch.Generator().manual_seed(1), batch_size=n), (1, 4, 4), x_low, steps=600
    )
    flat = x.flatten(1).double()
    assert (flat.mean(0) - mean.reshape(-1)).abs().max() < 0.04
    rel = float((torch.cov(flat.T) - cov.double()).norm() / cov.double().norm())
    assert rel < 0.12, rel


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="resolution=30"):
        RelayProcess(resolution=30, patch=4)
    with pytest.raises(ValueError, match="pl=1.05"):
        RelayProcess(pl=1.05)
    with pytest.raises(ValueError, match="block_noise='boxes'"):
        RelayProcess(block_noise="boxes")
    p = RelayProcess(resolution=8, patch=4)
    with pytest.raises(ValueError, match="truncation_sigma=1.5"):
        sample_relay(p, lambda x, t, y=None: x, [0], (1, 8, 8), torch.zeros(1, 1, 2, 2), truncation_sigma=1.5)


def test_stage1_sde_heun_reproduces_gaussian_data_and_reduces_to_edm():
    """Relay's stage-1 sampler (sde_scale: fresh noise g = 0.05 σ_next per step) with the exact denoiser
    draws the data; sde_scale 0 is EDM's sampler to the bit."""
    from freqdiff.processes.edm import EDMProcess
    from freqdiff.samplers import sample_heun

    p = EDMProcess(resolution=4)
    g = torch.Generator().manual_seed(0)
    mean = (torch.rand(16, generator=g) - 0.5).reshape(1, 4, 4)
    B = torch.randn(16, 16, generator=g) * 0.15
    cov = B @ B.T + 0.02 * torch.eye(16)
    D = ExactDenoiser(p, mean, cov)
    src = lambda: NoiseSource(torch.Generator().manual_seed(2), batch_size=6000)  # noqa: E731
    x = sample_heun(p, D, src(), (1, 4, 4), steps=40, sde_scale=0.05)
    flat = x.flatten(1).double()
    assert (flat.mean(0) - mean.reshape(-1)).abs().max() < 0.04
    assert float((torch.cov(flat.T) - cov.double()).norm() / cov.double().norm()) < 0.075
    a = sample_heun(p, D, src(), (1, 4, 4), steps=12)
    b = sample_heun(p, D, src(), (1, 4, 4), steps=12, sde_scale=0.0)
    assert torch.equal(a, b) and not torch.equal(
        a, sample_heun(p, D, src(), (1, 4, 4), steps=12, sde_scale=0.05)
    )
