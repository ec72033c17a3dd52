"""Contract suite over every forward process (docs/architecture.md, The process contract).

A new process joins by adding one ``Entry`` to ``PROCESSES``: a factory, its data shape, its residual
signal bound at t = 1 (relative to the prior's std; None for a process without a prior, which starts
from ``start_from``) and, optionally, analytic moments. Everything else is read off the process: A_t
and Σ_t are materialised from ``marginal`` (``freqdiff.processes.linear``), ``x0_at`` gives the step's
input and the conversions' reference, and the exact denoiser of Gaussian data checks the samplers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from freqdiff.processes.base import NoiseSource, Process
from freqdiff.processes.blur import BlurProcess
from freqdiff.processes.edm import EDMProcess
from freqdiff.processes.gaussian import GaussianProcess, cosine_alpha_bar, linear_alpha_bar
from freqdiff.processes.linear import ExactDenoiser, materialise
from freqdiff.processes.ops import append_dims
from freqdiff.processes.relay import RelayProcess
from freqdiff.processes.scale_space import ScaleSpaceProcess
from freqdiff.samplers import sample_ancestral, sample_heun

N = 20_000  # Monte Carlo samples


@dataclass
class Entry:
    make: Callable[[], Process]
    shape: tuple[int, int, int]  # data shape of one sample (C, H, W)
    residual: float | None  # bound on max |A_1 x0| / prior_std over x0 in [-1, 1]^D; None: no prior
    moments: Callable | None = None  # analytic (mean, per-pixel var) of q(x_t | x0), if known
    heun: bool = True  # check sample_heun (white noise, and a σ̃ = sigma/a range its grid can step through)
    roundtrip_t: float = 1.0  # largest t of the eps <-> x0 round trip (blur: x0 is below fp32 beyond)


def _white_moments(p, x0, t):
    a, sigma = (append_dims(v, x0.ndim) for v in p.scalings(t))
    return a * x0, (sigma**2).expand_as(x0)


def _blur_moments(p, x0, t):
    """docs/methods/blur.md: mean U Ā^{1/2} Uᵀ x0, per-pixel variance Σ_kl U_hk² U_wl² (1 − Ā_kl)."""
    sa, s1 = p.factors(t)
    U2 = p.U**2
    var = (U2 @ (s1[0, 0] ** 2) @ U2.T).float()
    return p.from_coef(sa.float() * p.to_coef(x0)), var.expand_as(x0[0])


PROCESSES = {
    "vp-linear": Entry(
        lambda: GaussianProcess(schedule="linear", resolution=4), (1, 4, 4), 0.01, _white_moments
    ),
    # Heun on a uniform-t grid of these: the first step spans σ̃ 20291 -> 6 (cosine) or 314 -> 2 (shift 2), and
    # the trapezoid correction multiplies the denoiser's change by σ̂/σ_next: sample_ancestral only
    "vp-cosine": Entry(
        lambda: GaussianProcess(schedule="cosine", resolution=4), (1, 4, 4), 0.01, _white_moments, heun=False
    ),
    "vp-linear-shift2": Entry(
        lambda: GaussianProcess(schedule="linear", shift=2.0, resolution=2),
        (3, 2, 2),
        0.01,
        _white_moments,
        False,
    ),
    "edm-ve": Entry(lambda: EDMProcess(resolution=4), (1, 4, 4), 0.02, _white_moments),
    # blur diffusion, strong enough to matter at 4² and 2²: the highest frequency keeps ~8 % of its signal
    # (relative to the lowest) at t = 0.5
    "blur-gaussian": Entry(
        lambda: BlurProcess(resolution=4, sigma_max=0.1, blur_schedule="linear"),
        (1, 4, 4),
        0.01,
        _blur_moments,
        heun=False,
        roundtrip_t=0.8,
    ),
    "blur-dct-rgb": Entry(
        lambda: BlurProcess(resolution=2, basis="dct", sigma_max=0.16, blur_schedule="quadratic"),
        (3, 2, 2),
        0.01,
        _blur_moments,
        heun=False,
        roundtrip_t=0.6,
    ),
    # Relay's stage 2: 2×2 patches and sliding 2×2 block noise, strong blur; no prior (starts from start_from)
    "relay": Entry(
        lambda: RelayProcess(resolution=4, patch=2, sigma_B_max=2.0, pl=0.89, block_scale=0.15),
        (1, 4, 4),
        None,
        heun=False,
    ),
    # Scale Space: 4² data, 2 levels (4² until step 749, 2² from step 750 on)
    "scale-space": Entry(lambda: ScaleSpaceProcess(resolution=4, levels=2), (1, 4, 4), 0.01, heun=False),
}
TIMES = [0.02, 0.3, 0.7, 1.0]


@pytest.fixture(params=sorted(PROCESSES))
def entry(request):
    e = PROCESSES[request.param]
    return e, e.make()


def _x0(shape, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    img = torch.rand(1, *shape, generator=g) * 2 - 1  # one fixed image in [-1, 1]
    return img.expand(batch, *shape).contiguous()


def _noise(seed: int) -> NoiseSource:
    return NoiseSource(torch.Generator().manual_seed(seed))


def _stats(x: torch.Tensor):
    flat = x.flatten(1).double()
    return flat.mean(0), torch.cov(flat.T)


def _assert_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, tol: float = 0.05):
    """Sample mean and covariance of x [N, ...] match (mean [D], cov [D, D]) within Monte Carlo error."""
    m, c = _stats(x)
    n, scale = x.shape[0], max(float(cov.diagonal().mean()), 1e-8)
    sd = cov.diagonal().clamp(min=1e-12).sqrt()
    assert ((m - mean).abs() / (sd + 1e-6)).max() < 5 / math.sqrt(n) + 1e-3, (m - mean).abs().max()
    assert (c - cov).abs().max() < tol * scale, ((c - cov).abs().max(), scale)


@pytest.mark.parametrize("t", TIMES)
def test_marginal_moments(entry, t):
    e, p = entry
    x0 = _x0(e.shape, N)
    tt = torch.full((N,), t)
    x_t, eps = p.marginal(x0, tt, _noise(1))
    assert x_t.shape == p.state_shape(x0.shape, t) and eps.shape[0] == N
    A, S = materialise(p, e.shape, t)
    _assert_moments(x_t, A @ x0[0].double().reshape(-1), S)
    if e.moments is not None:  # the materialised matrices agree with the paper's formula
        mean, var = e.moments(p, x0[:1], tt[:1])
        torch.testing.assert_close(
            (A @ x0[0].double().reshape(-1)).float(), mean.reshape(-1), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(S.diagonal().float(), var.reshape(-1), atol=1e-5, rtol=1e-4)


def test_prior_is_the_marginal_at_one_up_to_the_residual_signal(entry):
    e, p = entry
    A, S = materialise(p, e.shape, 1.0)
    if e.residual is None:
        assert p.prior_std is None
        return
    residual = float(A.abs().sum(1).max()) / p.prior_std  # max over x0 in [-1, 1]^D of |A_1 x0|_inf
    assert residual < e.residual, residual
    prior = p.prior((N, *e.shape), _noise(3))
    assert prior.shape == p.state_shape((N, *e.shape), 1.0)
    _assert_moments(prior, torch.zeros(S.shape[0], dtype=torch.float64), S)
    assert float(S.diagonal().mean()) == pytest.approx(p.prior_std**2, rel=0.02)


@pytest.mark.parametrize("eta", [1.0, 0.0])
@pytest.mark.parametrize("t,s", [(0.9, 0.6), (0.5, 0.45), (0.2, 0.0), (1.0, 0.5)])
def test_step_with_true_x0_maps_marginal_to_marginal(entry, t, s, eta):
    e, p = entry
    if eta == 0.0 and p.resolution(t) != p.resolution(s):
        pytest.skip("a resolution-changing step cannot be deterministic")
    x0 = _x0(e.shape, N)
    x_t, _ = p.marginal(x0, torch.full((N,), t), _noise(4))
    x0_hat = p.x0_at(x0, torch.full((N,), s))
    x_s = p.step(x_t, x0_hat, torch.full((N,), t), torch.full((N,), s), eta, _noise(5))
    assert x_s.shape == p.state_shape(x0.shape, s)
    A, S = materialise(p, e.shape, s)
    _assert_moments(x_s, A @ x0[0].double().reshape(-1), S)


def test_eps_x0_conversions_round_trip(entry):
    e, p = entry
    x0_all = torch.rand(8, *e.shape) * 2 - 1
    t_all = torch.linspace(0.05, e.roundtrip_t, 8)
    by_res: dict[int, list[int]] = {}  # a batch has one resolution (Scale Space): one call per resolution
    for i, tv in enumerate(t_all.tolist()):
        by_res.setdefault(p.resolution(tv), []).append(i)
    for rows in by_res.values():
        x0, t = x0_all[rows], t_all[rows]
        x_t, eps = p.marginal(x0, t, _noise(7))
        ref = p.x0_at(x0, t)
        scale = float(p.scalings(t)[1].max())
        torch.testing.assert_close(
            p.x0_from_eps(x_t, eps, t).float(), ref, atol=2e-3, rtol=1e-3
        )  # any float dtype
        torch.testing.assert_close(p.eps_from_x0(x_t, ref, t), eps, atol=1e-4 * max(scale, 1), rtol=1e-3)


def test_process_math_ignores_bf16_autocast(entry):
    """The precision policy: marginal and step under CPU bf16 autocast agree with the plain run."""
    e, p = entry
    x0 = torch.rand(16, *e.shape) * 2 - 1
    t, s = torch.full((16,), 0.6), torch.full((16,), 0.3)
    plain_t, _ = p.marginal(x0, t, _noise(8))
    with torch.autocast("cpu", torch.bfloat16):
        auto_t, _ = p.marginal(x0.bfloat16(), t, _noise(8))
        auto_s = p.step(auto_t, p.x0_at(x0, s).bfloat16(), t, s, 1.0, _noise(9))
    assert auto_t.dtype == torch.float32 and auto_s.dtype == torch.float32
    # x0 was rounded to bf16 on the way in (3 significant digits), nothing else may lose precision
    x0_b = x0.bfloat16().float()
    ref_t, _ = p.marginal(x0_b, t, _noise(8))
    ref_s = p.step(ref_t, p.x0_at(x0_b, s), t, s, 1.0, _noise(9))
    torch.testing.assert_close(auto_t, ref_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(auto_s, ref_s, atol=1e-5, rtol=1e-5)
    assert (plain_t - auto_t).abs().max() < 0.01


# ---- samplers with the exact denoiser of Gaussian data (docs/architecture.md, Tests) ------------------
def _gaussian_data(shape):
    d = int(torch.Size(shape).numel())
    g = torch.Generator().manual_seed(0)
    mean = (torch.rand(d, generator=g) - 0.5).reshape(shape)
    B = torch.randn(d, d, generator=g) * 0.15
    cov = B @ B.T + 0.02 * torch.eye(d)  # correlated pixels
    return mean, cov


def _check_sampler_moments(x, mean, cov, tol=0.075):
    """Mean within 0.04 and covariance within ``tol`` (relative Frobenius; the Monte Carlo floor at
    6000 samples is ~0.04, and coarse grids miss it: 0.11-0.34 for 50 ancestral steps)."""
    m, c = _stats(x)
    assert (m - mean.reshape(-1).double()).abs().max() < 0.04, (m - mean.reshape(-1)).abs().max()
    rel = float((c - cov.double()).norm() / cov.double().norm())
    assert rel < tol, rel


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_ancestral_sampler_with_exact_denoiser_reproduces_gaussian_data(entry, eta):
    e, p = entry
    mean, cov = _gaussian_data(e.shape)
    D = ExactDenoiser(p, mean, cov)
    noise = NoiseSource(torch.Generator().manual_seed(11), batch_size=6000)
    steps = 1000 if eta else 250  # the stochastic sampler converges more slowly in the step count
    start = None
    if p.prior_std is None:  # no prior (Relay): start from the true marginal at t = 1 of data draws
        L = torch.linalg.cholesky(cov.double()).float()
        x0 = (
            mean.reshape(1, -1)
            + torch.randn(6000, L.shape[0], generator=torch.Generator().manual_seed(13)) @ L.T
        )
        start, _ = p.marginal(x0.reshape(6000, *e.shape), torch.ones(6000), _noise(14))
    x = sample_ancestral(p, D, noise, e.shape, steps=steps, eta=eta, x=start)
    assert x.shape == (6000, *e.shape)
    _check_sampler_moments(x, mean, cov)


def test_heun_sampler_with_exact_denoiser_reproduces_gaussian_data(entry):
    e, p = entry
    if not e.heun:
        pytest.skip("sample_heun needs a white-noise process")
    mean, cov = _gaussian_data(e.shape)
    D = ExactDenoiser(p, mean, cov)
    noise = NoiseSource(torch.Generator().manual_seed(12), batch_size=6000)
    x = sample_heun(p, D, noise, e.shape, steps=40)
    _check_sampler_moments(x, mean, cov)


# ---- Gaussian-specific properties (docs/methods/ddpm.md, docs/frequencies.md) ------------------------
def test_discrete_table_is_interpolated_exactly():
    p = GaussianProcess(schedule="linear", T=1000)
    ab = linear_alpha_bar(1000)
    i = torch.tensor([1, 10, 500, 1000])
    torch.testing.assert_close(p.alpha_bar(i / 1000.0), ab[i - 1].float(), rtol=1e-5, atol=1e-7)
    assert float(linear_alpha_bar(1000)[-1]) == pytest.approx(4.04e-5, rel=0.05)  # residual ᾱ_T
    assert float(cosine_alpha_bar(1000)[0]) > 0.9999


def test_t_from_sigma_inverts_the_schedule():
    p = GaussianProcess(schedule="cosine", shift=2.0)
    t = torch.linspace(0.002, 1.0, 97)
    a, sigma = p.scalings(t)
    torch.testing.assert_close(p.t_from_sigma(sigma / a), t, atol=2e-5, rtol=0)
    assert float(p.t_from_sigma(torch.tensor([1e-9]))) == pytest.approx(1e-3)  # clamped to [1/T, 1]
    assert float(p.t_from_sigma(torch.tensor([1e9]))) == 1.0


def test_schedule_shift_moves_logsnr_by_two_ln_k():
    t = torch.linspace(0.01, 1, 50)
    base, shifted = GaussianProcess(shift=1.0), GaussianProcess(shift=4.0)
    torch.testing.assert_close(shifted.logsnr(t), base.logsnr(t) - 2 * math.log(4.0))


def test_pooling_adds_two_ln_n_to_logsnr():
    """Average-pooling x_t by n×n keeps the signal and divides white-noise variance by n²."""
    n, t = 4, torch.full((20_000,), 0.5)
    p = GaussianProcess(resolution=16)
    x0 = torch.zeros(20_000, 1, 16, 16)
    x_t, _ = p.marginal(x0, t, _noise(0))
    pooled_var = torch.nn.functional.avg_pool2d(x_t, n).var()
    sigma2 = p.scalings(t[:1])[1] ** 2
    lam_pooled = p.logsnr(t[:1]) + math.log(sigma2 / pooled_var)
    assert float(lam_pooled - p.logsnr(t[:1])) == pytest.approx(2 * math.log(n), abs=0.03)


def test_clip_x0_follows_the_data_range():
    x = torch.tensor([-3.0, 0.5, 3.0])
    assert GaussianProcess().clip_x0(x).tolist() == [-1.0, 0.5, 1.0]
    assert GaussianProcess(data_range=None).clip_x0(x).tolist() == x.tolist()


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="sigmoid|unknown"):
        GaussianProcess(schedule="sigmoid")
    with pytest.raises(ValueError, match="-1"):
        GaussianProcess(shift=-1)
