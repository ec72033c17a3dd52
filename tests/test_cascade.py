"""Chromatography-guided cascaded upscaling (lightning_modules/cascade.py): the hand-off's statistics,
its time, and the two-stage sampler."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from freqdiff.analysis import frequency as fq
from freqdiff.config import instantiate, load
from freqdiff.processes.gaussian import GaussianProcess
from freqdiff.processes.noise import NoiseSource
from lightning_modules.cascade import handoff_time, renoise


def _field(B: int, side: int, seed: int = 0) -> torch.Tensor:
    """A stationary Gaussian field with power 4 f^-2 (zero-mean, one channel), [B, 1, side, side]."""
    return fq.power_law_field(B, side, scale=4.0, seed=seed)


def test_handoff_time_is_the_pooled_snr_match():
    p = GaussianProcess(resolution=16)
    for n, lam_lo in ((2, 0.0), (2, 2.0), (4, 0.0)):
        t = handoff_time(p, n, lam_lo)
        assert float(p.logsnr(torch.tensor([t]))) + 2 * math.log(n) == pytest.approx(lam_lo, abs=1e-3)
    assert handoff_time(p, 2) == pytest.approx(0.397, abs=1e-3)  # the quickstart's default
    assert handoff_time(p, 4) > handoff_time(p, 2)  # a larger factor hands over at more noise


def test_pooled_handoff_state_is_the_low_resolution_marginal():
    """n×n-pooling the re-noised upsampled state gives, divided by √p, the low-resolution VP marginal
    at the matched time: a_τ x_low + σ_τ ε with λ_τ = λ_hi(t*) + 2 ln n."""
    n, side, B = 2, 16, 4000
    p_hi = GaussianProcess(resolution=side)
    x_low = F.avg_pool2d(_field(B, side), n).float()  # the low-resolution data
    t = handoff_time(p_hi, n, 0.0)
    x = renoise(
        p_hi, F.interpolate(x_low, scale_factor=n, mode="nearest"), t, NoiseSource.from_seeds(range(B))
    )
    a, s = (float(v) for v in p_hi.scalings(torch.tensor([t])))
    scale, ab_tau = fq.downsampled_state(a * a, n)
    z = F.avg_pool2d(x, n) / math.sqrt(float(scale))
    a_tau, s_tau = math.sqrt(float(ab_tau)), math.sqrt(1 - float(ab_tau))
    resid = z - a_tau * x_low
    assert math.log(a_tau**2 / s_tau**2) == pytest.approx(0.0, abs=1e-3)  # λ_τ = the hand-off's 0
    assert float(resid.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(resid.var()) == pytest.approx(s_tau**2, rel=0.02)
    assert float(F.avg_pool2d(_field(B, side), n).var()) == pytest.approx(float(x_low.var()), rel=0.05)


def test_handoff_covariance_misses_the_within_block_signal():
    """Cov(high-resolution marginal at t*) − Cov(re-noised upsampled state) = a² (C − P C P), with P the
    n×n block-averaging projector: what the high-resolution model must add back."""
    n, side, B = 2, 8, 100_000
    proc = GaussianProcess(resolution=side)
    t = handoff_time(proc, n)
    a, s = (float(v) for v in proc.scalings(torch.tensor([t])))
    x0 = _field(B, side, seed=1)
    flat = lambda v: v.reshape(B, -1)  # noqa: E731
    up = F.interpolate(F.avg_pool2d(x0, n), scale_factor=n, mode="nearest")
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    marg, hand = a * x0 + s * eps, a * up + s * eps  # one noise draw for both: less Monte Carlo error
    diff = torch.cov(flat(marg).T) - torch.cov(flat(hand).T)
    C = torch.cov(flat(x0).T)
    D = side * side
    Pm = F.interpolate(
        F.avg_pool2d(torch.eye(D, dtype=torch.float64).reshape(D, 1, side, side), n), scale_factor=n
    )
    Pm = Pm.reshape(D, D)  # row j: the block average of basis image j (symmetric projector)
    predicted = a * a * (C - Pm @ C @ Pm)
    assert float((diff - predicted).norm() / predicted.norm()) < 0.1
    assert float(predicted.norm()) > 0.1 * float((a * a * C).norm())  # a real share of the signal


@pytest.fixture()
def stage1_run(tmp_path):
    """A run folder with an untrained 8² quickstart DDPM (what the cascade's stage 2 composes)."""
    o = [
        f"run.root={tmp_path}",
        "data.resolution=8",
        "module.sample_steps=3",
        "+module.net.channel_mult=[1,2]",
    ]
    cfg = load("quickstart", o)
    module = instantiate(cfg.module, "module")
    d = tmp_path / "stage1"
    (d / "checkpoints").mkdir(parents=True)
    state = {"state_dict": module.state_dict(), "freqdiff_config": OmegaConf.to_container(cfg, resolve=True)}
    torch.save({**state, "global_step": 4}, d / "checkpoints" / "last.ckpt")
    return d


def test_cascade_module_samples_per_seed_from_the_stage1_run(stage1_run):
    o = ["data.resolution=16", "stages.stage2.module.stage1=" + str(stage1_run)]
    from experiments.pipeline import load_pipeline

    small = ["stages.stage2.module.sample_steps=3", "+stages.stage2.module.net.channel_mult=[1,2]"]
    _, stages = load_pipeline("quickstart_cascade", [*o, *small])
    cfg = stages["stage2"]
    module = instantiate(cfg.module, "module").eval()
    assert module.sampling_unavailable() is None and module.sampling_depends_on() == {"stage1-step": 4}
    ts = []
    x = module.sample([0, 1, 2], callback=lambda d: ts.append(d["t"]))
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    assert ts[0] == pytest.approx(handoff_time(module.process, 2)) and len(ts) == 3  # from t* in 3 steps
    torch.testing.assert_close(module.sample([1]), x[1:2])  # a sample depends on its seed only
    stages_ = module.sample_stages([0, 1])
    assert [v.shape[-1] for v in stages_.values()] == [8, 16]
    module.t_start = 0.6
    ts.clear()
    module.sample([0], x_low=torch.zeros(1, 3, 8, 8), callback=lambda d: ts.append(d["t"]))
    assert ts[0] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="do not upsample"):
        module.sample([0], x_low=torch.zeros(1, 3, 6, 6))


def test_cascade_refuses_bad_settings(stage1_run):
    from freqdiff.config import ConfigError

    for key, bad in (("t_start", 1.5), ("handoff_logsnr", "high")):
        with pytest.raises(ConfigError, match=key):
            from experiments.pipeline import load_pipeline

            _, stages = load_pipeline("quickstart_cascade", [f"stages.stage2.module.{key}={bad}"])
            instantiate(stages["stage2"].module, "module")


def test_paper_scale_cascade_config():
    """cascade_celeba256: the DDPM baseline at 64² (129.38 M), Relay's 552.81 M network at 256² on the
    64² SNR trajectory, handing over at t* = 0.259 (the shifted schedule's λ = −2 ln 4)."""
    from experiments.pipeline import load_pipeline
    from freqdiff.nets.presets import count_parameters

    _, stages = load_pipeline("cascade_celeba256", ["data.path=/nowhere"])
    counts = {}
    for name, cfg in stages.items():
        with torch.device("meta"):
            counts[name] = count_parameters(instantiate(cfg.module, f"stages.{name}.module").denoiser)
    assert counts["stage1"] == pytest.approx(129.38e6, rel=1e-4)
    assert counts["stage2"] == pytest.approx(552.81e6, rel=1e-4)
    proc = instantiate(stages["stage2"].module.process, "stages.stage2.module.process")
    assert proc.shift == 4.0 and handoff_time(proc, 4) == pytest.approx(0.259, abs=1e-3)
    assert stages["stage2"].data.batch_size * 8 * 16 == 1024  # Relay's stage-2 batch
