"""EDM (Karras et al. 2022): the VE process, Heun sampler against EDM's ``edm_sampler``, loss, module."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from freqdiff.nets.precond import Denoiser
from freqdiff.processes.base import NoiseSource
from freqdiff.processes.edm import EDMProcess
from freqdiff.processes.gaussian import GaussianProcess, posterior_step
from freqdiff.processes.ops import append_dims
from freqdiff.samplers import sample_heun
from freqdiff.timesteps import LogNormalSigmaTime

RES = 4
MU = torch.linspace(-0.6, 0.6, RES * RES).reshape(1, 1, RES, RES)
VAR = torch.linspace(0.05, 0.5, RES * RES).flip(0).reshape(1, 1, RES, RES)
SIGMA_DATA = 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is far faster on a shared, oversubscribed CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def karras_sigmas(n: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> torch.Tensor:
    """EDM eq. 5, float64: σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N."""
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i / (n - 1) * (lo - hi)) ** rho


# ---- process ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [18, 50])
def test_uniform_t_grid_is_the_karras_grid(n):
    p = EDMProcess()
    t = torch.tensor([1 - i / (n - 1) for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(p.sigma(t), karras_sigmas(n), rtol=1e-12, atol=0)
    torch.testing.assert_close(p.sigma(t.float()), karras_sigmas(n).float(), rtol=1e-6, atol=0)
    a, sigma = p.scalings(t)
    assert (
        torch.all(a == 1)
        and float(sigma[0]) == pytest.approx(80.0)
        and float(sigma[-1]) == pytest.approx(0.002, rel=1e-12)
    )


def test_t_from_sigma_inverts_sigma():
    p = EDMProcess()
    t = torch.rand(1000, dtype=torch.float64)
    torch.testing.assert_close(p.t_from_sigma(p.sigma(t)), t, rtol=0, atol=1e-12)
    sig = torch.exp(torch.empty(1000, dtype=torch.float64).uniform_(math.log(0.002), math.log(80.0)))
    torch.testing.assert_close(p.sigma(p.t_from_sigma(sig)), sig, rtol=1e-12, atol=0)
    ends = p.t_from_sigma(torch.tensor([1e-4, 0.0, 500.0]))
    assert ends.tolist() == [0.0, 0.0, 1.0] and ends.dtype == torch.float32


def test_marginal_mean_x0_variance_sigma2_and_conversions():
    p = EDMProcess(resolution=2)
    n = 40000
    x0 = torch.tensor([[-0.7, 0.2], [0.5, 0.9]]).expand(n, 1, 2, 2)
    for sig in (0.3, 5.0):
        t = p.t_from_sigma(torch.full((n,), sig))
        x_t, eps = p.marginal(x0, t, NoiseSource(torch.Generator().manual_seed(1), batch_size=n))
        se = sig / math.sqrt(n)
        assert (x_t.mean(0) - x0[0]).abs().max() < 5 * se
        assert ((x_t.var(0) / sig**2) - 1).abs().max() < 5 * math.sqrt(2 / n)
        torch.testing.assert_close(p.x0_from_eps(x_t, eps, t), x0, atol=1e-5 * sig, rtol=0)
        torch.testing.assert_close(p.eps_from_x0(x_t, x0, t), eps, atol=1e-5, rtol=1e-5)
    prior = p.prior((n, 1, 2, 2), NoiseSource(torch.Generator().manual_seed(2), batch_size=n))
    assert p.prior_std == 80.0 and abs(float(prior.std()) / 80.0 - 1) < 0.01
    assert p.predictions == ("eps", "x0", "edm") and p.white_noise
    with pytest.raises(ValueError, match="not supported"):
        Denoiser(nn.Identity(), p, "v")


def test_step_is_the_ve_posterior_and_reaches_the_data_at_sigma_zero():
    """η = 1: mean x0 + σ_s²/σ_t² (x_t − x0), variance σ_s²(σ_t² − σ_s²)/σ_t² (q(x_s | x_t, x0) for VE)."""
    p = EDMProcess(resolution=1)
    n, st, ss = 200000, 3.0, 1.2
    x0, x_t = torch.full((n, 1, 1, 1), 0.4), torch.full((n, 1, 1, 1), 2.0)
    t, s = p.t_from_sigma(torch.tensor(st)), p.t_from_sigma(torch.tensor(ss))
    x_s = p.step(x_t, x0, t, s, 1.0, NoiseSource(torch.Generator().manual_seed(3), batch_size=n))
    assert float(x_s.mean()) == pytest.approx(0.4 + ss**2 / st**2 * 1.6, abs=0.01)
    assert float(x_s.var()) == pytest.approx(ss**2 * (st**2 - ss**2) / st**2, rel=0.03)
    ddim = p.step(x_t[:2], x0[:2], t, s, 0.0, NoiseSource(None, batch_size=2))
    torch.testing.assert_close(ddim, 0.4 + ss / st * (x_t[:2] - 0.4))  # x0 + σ_s ε̂
    one, zero = torch.ones(2), torch.zeros(2)
    to_data = posterior_step(
        x_t[:2], x0[:2], (one, one * st), (one, zero), 1.0, NoiseSource(None, batch_size=2)
    )
    torch.testing.assert_close(to_data, x0[:2])


def test_log_normal_sigma_time_through_edm_process():
    p = EDMProcess()
    t = LogNormalSigmaTime(P_mean=-1.2, P_std=1.2)(200000, torch.Generator().manual_seed(0), process=p)
    assert 0 <= float(t.min()) and float(t.max()) <= 1
    ln_sigma = torch.log(p.sigma(t))
    assert float(ln_sigma.mean()) == pytest.approx(-1.2, abs=0.01)
    assert float(ln_sigma.std()) == pytest.approx(1.2, abs=0.01)


# ---- the natural loss is EDM's -------------------------------------------------------------------------
class ToyNet(nn.Module):
    """A small random conv net F(x, c_noise) (deterministic; stands in for the UNet)."""

    def __init__(self, channels: int = 2):
        super().__init__()
        self.inp, self.out = nn.Conv2d(channels, 8, 3, padding=1), nn.Conv2d(8, channels, 3, padding=1)
        self.emb = nn.Linear(1, 8)

    def forward(self, x, c_noise, labels=None):
        h = self.inp(x) + self.emb(c_noise.float()[:, None])[:, :, None, None]
        return self.out(torch.tanh(h))


def test_edm_natural_loss_is_lambda_weighted_x0_loss():
    p = EDMProcess(resolution=8)
    D = Denoiser(ToyNet(), p, "edm", sigma_data=SIGMA_DATA)
    x0 = torch.rand(64, 2, 8, 8) * 2 - 1
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(64))  # EDMLoss's σ draw
    t = p.t_from_sigma(sigma)
    x_t, eps = p.marginal(x0, t, NoiseSource(torch.Generator().manual_seed(0), batch_size=64))
    with torch.no_grad():
        natural = ((D.raw(x_t, t) - D.target(x0, eps, x_t, t)) ** 2).flatten(1).mean(1)
        sig = p.sigma(t)
        lam = (sig**2 + SIGMA_DATA**2) / (sig * SIGMA_DATA) ** 2  # EDM λ(σ)
        edm = lam * ((D(x_t, t) - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(natural, edm, rtol=1e-4, atol=1e-6)


# ---- Heun against EDM's sampler ---------------------------------------------------------------------
class QueuedNoise(NoiseSource):
    """A NoiseSource stand-in handing out pre-drawn tensors in order (the same ones the reference uses)."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__(None, batch_size=tensors[0].shape[0])
        self.queue = list(tensors)

    def __call__(self, shape, dtype=torch.float32):
        z = self.queue.pop(0)
        assert tuple(z.shape) == tuple(shape)
        return z.to(dtype)


def edm_reference(net_sigma, latents, churn_noise, num_steps, S_churn, S_min, S_max, S_noise):
    """NVlabs/edm ``generate.py`` ``edm_sampler`` (Algorithm 2) in float64, with given noise tensors."""
    sigmas = torch.cat([karras_sigmas(num_steps), torch.zeros(1, dtype=torch.float64)])  # σ_N = 0
    x = latents.double() * sigmas[0]
    for i in range(num_steps):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= s_cur <= S_max else 0.0
        s_hat = s_cur + gamma * s_cur
        x_hat = x + (s_hat**2 - s_cur**2).sqrt() * S_noise * churn_noise[i]
        d_cur = (x_hat - net_sigma(x_hat, s_hat).double()) / s_hat
        x = x_hat + (s_next - s_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x - net_sigma(x, s_next).double()) / s_next
            x = x_hat + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x


def edm_precond(net):
    """EDM ``EDMPrecond.forward``: D(x; σ) from F with σ given directly (float32 network)."""

    def D(x, sigma):
        x = x.float()
        sigma = torch.as_tensor(sigma).float().reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
        c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
        c_in = 1 / (SIGMA_DATA**2 + sigma**2).sqrt()
        return c_skip * x + c_out * net(c_in * x, sigma.log().flatten() / 4)

    return D


@pytest.mark.parametrize(
    "steps,churn",
    [(18, (0.0, 0.0, float("inf"), 1.0)), (18, (40.0, 0.05, 50.0, 1.003)), (7, (3.0, 0.0, 50.0, 1.0))],
)
def test_sample_heun_matches_edm_sampler(steps, churn):
    torch.manual_seed(1)
    net = ToyNet().eval()
    shape, B = (2, 8, 8), 3
    latents = torch.randn(B, *shape)
    churn_noise = [torch.randn(B, *shape, dtype=torch.float64) for _ in range(steps)]
    S_churn, S_min, S_max, S_noise = churn
    with torch.no_grad():
        ref = edm_reference(edm_precond(net), latents, churn_noise, steps, S_churn, S_min, S_max, S_noise)
    p = EDMProcess(resolution=8)
    D = Denoiser(net, p, "edm", sigma_data=SIGMA_DATA)
    seen = []
    ours = sample_heun(
        p, D, QueuedNoise([latents, *churn_noise]), shape, steps=steps, S_churn=S_churn, S_min=S_min,
        S_max=S_max, S_noise=S_noise, callback=seen.append,
    )  # fmt: skip
    err = float((ours.double() - ref).abs().max())
    print(f"max |sample_heun − edm_sampler| = {err:.3g} (steps {steps}, churn {churn})")
    assert err < 2e-5 * max(1.0, float(ref.abs().max()))
    assert [d["i"] for d in seen] == list(range(steps)) and seen[0]["t"] == 1.0 and seen[-1]["s"] == 0.0
    torch.testing.assert_close(seen[-1]["x"], ours)


# ---- exact denoiser of Gaussian data ------------------------------------------------------------------
def exact_denoiser(process):
    """E[x0 | x_t] for x0 ~ N(MU, diag(VAR)) under x_t = a x0 + sigma eps."""

    def D(x_t, t, labels=None, **kw):
        a, sigma = (append_dims(v, x_t.ndim) for v in process.scalings(t))
        return MU + a * VAR / (a**2 * VAR + sigma**2) * (x_t - a * MU)

    return D


CHURN = dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)  # EDM's ImageNet-64 churn


@pytest.mark.parametrize(
    "process,steps,churn",
    [
        (EDMProcess(resolution=RES), 128, {}),
        (EDMProcess(resolution=RES), 256, CHURN),
        (GaussianProcess("linear", resolution=RES), 200, {}),
        (GaussianProcess("linear", resolution=RES), 256, CHURN),
    ],
    ids=["edm", "edm-churn", "vp", "vp-churn"],
)
def test_sample_heun_with_exact_denoiser_reproduces_data_moments(process, steps, churn):
    """Within Monte Carlo error once the grid is fine: Heun's own bias on this data is +10-15 % variance
    at 18 steps, 0.2 % at 128; churn with S_noise 1.003 keeps ~1 % at 256 (a scalar recursion of the
    algorithm on N(μ, v) gives these numbers; the MC standard error of the mean relative variance: 0.4 %)."""
    noise = NoiseSource(torch.Generator().manual_seed(steps), batch_size=8000)  # one generator: fast
    x = sample_heun(process, exact_denoiser(process), noise, (1, RES, RES), steps=steps, **churn)
    mean, var = x.mean(0, keepdim=True), x.var(0, keepdim=True)
    assert x.dtype == torch.float32 and x.shape == (8000, 1, RES, RES)
    assert (mean - MU).abs().max() < 4 * math.sqrt(float(VAR.max()) / 8000)
    rel = (var - VAR) / VAR
    assert float(rel.mean().abs()) < 0.02 and float(rel.abs().max()) < 0.08, rel


def test_sample_heun_takes_no_zero_length_step_where_t0_is_data():
    p = GaussianProcess(resolution=RES)
    seen = []
    sample_heun(p, exact_denoiser(p), [0, 1], (1, RES, RES), steps=5, callback=seen.append)
    assert [d["t"] for d in seen] == [1.0, 0.75, 0.5, 0.25] and seen[-1]["s"] == 0.0


# ---- module -----------------------------------------------------------------------------------------------
def test_edm_module_samples_and_trains():
    from freqdiff.nets.presets import unet
    from lightning_modules.edm import EDMModule

    net = unet("tiny", resolution=8, channel_mult=(1, 2), attn_resolutions=(4,))
    m = EDMModule(net, EDMProcess(resolution=8), LogNormalSigmaTime(), sample_steps=3, S_churn=1.0)
    seen = []
    x = m.sample([0, 1], callback=seen.append, eta=None)  # eta (DDPM's keyword) None / 0 is accepted
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all() and len(seen) == 3
    torch.testing.assert_close(m.sample([1], steps=3), x[1:], atol=1e-5, rtol=1e-5)  # per-sample seeds
    with pytest.raises(ValueError, match="S_churn"):
        m.sample([0], eta=1.0)
    loss, t = m.loss(torch.rand(4, 3, 8, 8) * 2 - 1)
    assert loss.shape == (4,) and torch.isfinite(loss).all() and ((0 <= t) & (t <= 1)).all()
