"""Samplers with the exact denoiser of Gaussian data reproduce its mean and variance
(docs/architecture.md, Tests and benchmarks)."""

from __future__ import annotations

import pytest
import torch

from freqdiff.processes.base import NoiseSource
from freqdiff.processes.gaussian import GaussianProcess
from freqdiff.processes.ops import append_dims
from freqdiff.samplers import sample_ancestral, time_grid

RES = 4
MU = torch.linspace(-0.6, 0.6, RES * RES).reshape(1, 1, RES, RES)
VAR = torch.linspace(0.05, 0.5, RES * RES).flip(0).reshape(1, 1, RES, RES)


def exact_denoiser(process):
    """E[x0 | x_t] for x0 ~ N(MU, diag(VAR)) under x_t = a x0 + sigma eps."""

    def D(x_t, t, labels=None, **kw):
        a, sigma = (append_dims(v, x_t.ndim) for v in process.scalings(t))
        gain = a * VAR / (a**2 * VAR + sigma**2)
        return MU + gain * (x_t - a * MU)

    return D


@pytest.mark.parametrize(
    "schedule,eta", [("linear", 1.0), ("linear", 0.0), ("linear", 0.5), ("cosine", 1.0), ("cosine", 0.0)]
)
def test_exact_denoiser_reproduces_data_moments(schedule, eta):
    """On the full 1000-step grid the moments match; coarser grids converge towards them."""
    p = GaussianProcess(schedule=schedule, resolution=RES)
    errors = []
    for steps in (50, 1000):
        noise = NoiseSource(torch.Generator().manual_seed(steps), batch_size=8000)  # one generator: fast
        x = sample_ancestral(p, exact_denoiser(p), noise, (1, RES, RES), steps=steps, eta=eta)
        mean, var = x.mean(0, keepdim=True), x.var(0, keepdim=True)
        assert (mean - MU).abs().max() < 0.03
        errors.append(float(((var - VAR) / VAR).mean().abs()))
    assert errors[1] < 0.025, errors
    assert ((var - VAR).abs() / VAR).max() < 0.08
    assert errors[1] < errors[0]


def test_sample_depends_only_on_its_seed():
    from freqdiff.nets.presets import unet

    p = GaussianProcess(resolution=8)
    net = unet("tiny", resolution=8, channel_mult=(1, 2), attn_resolutions=(4,))
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(0.02 * torch.randn_like(prm))
    from freqdiff.nets.precond import Denoiser

    D = Denoiser(net, p, "eps").eval()
    both = sample_ancestral(p, D, [3, 7, 11, 13], (3, 8, 8), steps=5, eta=1.0)
    parts = torch.cat([sample_ancestral(p, D, s, (3, 8, 8), steps=5, eta=1.0) for s in ([3, 7], [11], [13])])
    torch.testing.assert_close(both, parts, atol=1e-4, rtol=1e-4)
    other = sample_ancestral(p, D, [4], (3, 8, 8), steps=5, eta=1.0)
    assert (other - both[:1]).abs().max() > 0.1


def test_callback_sees_every_step_and_grid():
    p = GaussianProcess(resolution=RES)
    seen = []
    sample_ancestral(p, exact_denoiser(p), [0, 1], (1, RES, RES), steps=4, callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2, 3]
    assert [d["t"] for d in seen] == [1.0, 0.75, 0.5, 0.25] and seen[-1]["s"] == 0.0
    assert seen[-1]["x0_hat"].shape == (2, 1, RES, RES)
    assert time_grid(10, timesteps=[0.9, 0.5, 0.1]) == [0.9, 0.5, 0.1, 0.0]
    with pytest.raises(ValueError, match="decrease"):
        time_grid(10, timesteps=[0.5, 0.9])
