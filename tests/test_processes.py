"""Contract suite over every forward process (DESIGN.md §7, METHODS.md property 5).

A new process joins by adding one entry to ``PROCESSES``: a factory and its analytic per-pixel
marginal moments ``(mean, var)`` of q(x_t | x0). Every test below then runs on it unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch

from freqdiff.processes.base import NoiseSource
from freqdiff.processes.gaussian import GaussianProcess, cosine_alpha_bar, linear_alpha_bar
from freqdiff.processes.ops import append_dims

RES = 4  # 1 x 4 x 4 states: 16 dimensions, small enough for full covariance checks
N = 40_000  # Monte Carlo samples


def _gaussian_moments(p):
    def moments(x0, t):
        a, sigma = (append_dims(v, x0.ndim) for v in p.scalings(t))
        return a * x0, (sigma**2).expand_as(x0)

    return moments


def _gaussian(**kw):
    p = GaussianProcess(resolution=RES, **kw)
    return p, _gaussian_moments(p)


PROCESSES = {
    "gaussian-linear": lambda: _gaussian(schedule="linear"),
    "gaussian-cosine": lambda: _gaussian(schedule="cosine"),
    "gaussian-linear-shift2": lambda: _gaussian(schedule="linear", shift=2.0),
}


def _x0(batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    img = torch.rand(1, 1, RES, RES, generator=g) * 2 - 1  # one fixed image
    return img.expand(batch, -1, -1, -1).contiguous()


def _stats(x: torch.Tensor):
    flat = x.flatten(1).double()
    return flat.mean(0), torch.cov(flat.T)


def _assert_same_distribution(a: torch.Tensor, b: torch.Tensor, tol: float = 0.03):
    """Mean and full covariance of two sample sets agree (tolerance relative to the variance scale)."""
    assert a.shape == b.shape
    ma, ca = _stats(a)
    mb, cb = _stats(b)
    scale = max(float(ca.diagonal().mean()), 1e-4)
    assert (ma - mb).abs().max() < 4 * math.sqrt(scale / a.shape[0]) * 3 + 1e-4, (ma - mb).abs().max()
    assert (ca - cb).abs().max() < tol * scale + 1e-6, ((ca - cb).abs().max(), scale)


@pytest.fixture(params=sorted(PROCESSES))
def process(request):
    return PROCESSES[request.param]()


TIMES = [0.02, 0.3, 0.7, 1.0]


@pytest.mark.parametrize("t", TIMES)
def test_marginal_moments(process, t):
    p, moments = process
    x0 = _x0(N)
    tt = torch.full((N,), t)
    x_t, eps = p.marginal(x0, tt, NoiseSource(torch.Generator().manual_seed(1)))
    assert x_t.shape == p.state_shape(x0.shape, t)
    mean, var = moments(x0[:1], tt[:1])
    emp_mean, emp_var = x_t.double().mean(0), x_t.double().var(0)
    assert (emp_mean - mean[0]).abs().max() < 5 * math.sqrt(var.max() / N) + 1e-6
    assert ((emp_var - var[0]).abs() / var[0].clamp(min=1e-8)).max() < 0.05


def test_prior_is_marginal_at_one_without_signal(process):
    p, _ = process
    zeros = torch.zeros(N, 1, RES, RES)
    x1, _ = p.marginal(zeros, torch.ones(N), NoiseSource(torch.Generator().manual_seed(2)))
    prior = p.prior((N, 1, RES, RES), NoiseSource(torch.Generator().manual_seed(3)))
    assert prior.shape == p.state_shape((N, 1, RES, RES), 1.0)
    _assert_same_distribution(prior, x1)


def test_residual_signal_at_one_is_small(process):
    p, moments = process
    mean, _ = moments(torch.ones(1, 1, RES, RES), torch.ones(1))
    assert mean.abs().max() < 0.05


@pytest.mark.parametrize("eta", [1.0, 0.0])
@pytest.mark.parametrize("t,s", [(0.9, 0.6), (0.5, 0.45), (0.2, 0.0), (1.0, 0.5)])
def test_step_with_true_x0_maps_marginal_to_marginal(process, t, s, eta):
    p, _ = process
    if eta == 0.0 and p.resolution(t) != p.resolution(s):
        pytest.skip("a resolution-changing step cannot be deterministic")
    x0 = _x0(N)
    x_t, _ = p.marginal(x0, torch.full((N,), t), NoiseSource(torch.Generator().manual_seed(4)))
    x_s = p.step(
        x_t, x0, torch.full((N,), t), torch.full((N,), s), eta, NoiseSource(torch.Generator().manual_seed(5))
    )
    direct, _ = p.marginal(x0, torch.full((N,), s), NoiseSource(torch.Generator().manual_seed(6)))
    assert x_s.shape == p.state_shape(x0.shape, s)
    _assert_same_distribution(x_s, direct)


def test_eps_x0_conversions_round_trip(process):
    p, _ = process
    x0 = torch.randn(8, 1, RES, RES)
    t = torch.linspace(0.05, 1.0, 8)
    x_t, eps = p.marginal(x0, t, NoiseSource(torch.Generator().manual_seed(7)))
    torch.testing.assert_close(p.x0_from_eps(x_t, eps, t), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(p.eps_from_x0(x_t, x0, t), eps, atol=1e-4, rtol=1e-4)


# ---- Gaussian-specific properties (METHODS.md §1, property 8) -------------------------------------------
def test_discrete_table_is_interpolated_exactly():
    p = GaussianProcess(schedule="linear", T=1000)
    ab = linear_alpha_bar(1000)
    i = torch.tensor([1, 10, 500, 1000])
    torch.testing.assert_close(p.alpha_bar(i / 1000.0), ab[i - 1].float(), rtol=1e-5, atol=1e-7)
    assert float(linear_alpha_bar(1000)[-1]) == pytest.approx(4.04e-5, rel=0.05)  # residual ᾱ_T
    assert float(cosine_alpha_bar(1000)[0]) > 0.9999


def test_schedule_shift_moves_logsnr_by_two_ln_k():
    t = torch.linspace(0.01, 1, 50)
    base, shifted = GaussianProcess(shift=1.0), GaussianProcess(shift=4.0)
    torch.testing.assert_close(shifted.logsnr(t), base.logsnr(t) - 2 * math.log(4.0))


def test_pooling_adds_two_ln_n_to_logsnr():
    """Average-pooling x_t by n×n keeps the signal and divides white-noise variance by n²."""
    n, t = 4, torch.full((20_000,), 0.5)
    p = GaussianProcess(resolution=16)
    x0 = torch.zeros(20_000, 1, 16, 16)
    x_t, _ = p.marginal(x0, t, NoiseSource(torch.Generator().manual_seed(0)))
    pooled_var = torch.nn.functional.avg_pool2d(x_t, n).var()
    sigma2 = p.scalings(t[:1])[1] ** 2
    lam_pooled = p.logsnr(t[:1]) + math.log(sigma2 / pooled_var)
    assert float(lam_pooled - p.logsnr(t[:1])) == pytest.approx(2 * math.log(n), abs=0.03)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="sigmoid|unknown"):
        GaussianProcess(schedule="sigmoid")
    with pytest.raises(ValueError, match="-1"):
        GaussianProcess(shift=-1)
