"""Scale Space Diffusion: operators, schedule, exact posterior, batches (docs/methods/scale_space.md).

The contract suite (tests/test_processes.py, entry "scale-space") covers marginals, steps across a
resolution change, conversions, the precision policy and both samplers with the exact denoiser.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from freqdiff.nets.flexi_unet import flexi
from freqdiff.processes.base import NoiseSource
from freqdiff.processes.linear import ZeroNoise
from freqdiff.processes.scale_space import ScaleSpaceProcess, down2_matrix
from lightning_modules.scale_space import ScaleSpaceModule


def test_down2_is_torchs_antialiased_bilinear_and_its_adjoint_is_the_transpose():
    p = ScaleSpaceProcess(resolution=32, levels=3)
    x = torch.randn(3, 2, 32, 32, dtype=torch.float64)
    ref = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert (p.down(x, 16) - ref).abs().max() < 1e-14
    m = down2_matrix(8)
    assert m[1].tolist() == pytest.approx([0, 1 / 8, 3 / 8, 3 / 8, 1 / 8, 0, 0, 0])
    assert m[0].tolist() == pytest.approx([3 / 7, 3 / 7, 1 / 7, 0, 0, 0, 0, 0])  # renormalised border
    y = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    lhs = (p.down(x, 8) * y).sum()
    rhs = (x * p.up_adjoint(y, 32)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)


def test_operator_norms_and_chained_steps_differ_from_one_4x_resize():
    m = torch.kron(down2_matrix(16), down2_matrix(16))  # the 2-D 2× step on 16²
    assert float(torch.linalg.eigvalsh(m @ m.T).max()) == pytest.approx(0.25, abs=0.01)
    chain = down2_matrix(32) @ down2_matrix(64)
    eye = torch.eye(64, dtype=torch.float64)[:, None, None, :]
    direct = F.interpolate(eye, size=(1, 16), mode="bilinear", antialias=True)[:, 0, 0, :].T
    A2, A4 = torch.kron(chain, chain), torch.kron(direct, direct)
    assert float((A2 - A4).norm() / A4.norm()) > 0.15  # 0.197: chaining is not a 4× resize


def test_schedule_boundaries_and_pixel_cost():
    p = ScaleSpaceProcess(resolution=64, levels=4)
    assert p.levels == [8, 16, 32, 64]
    assert p.change_steps() == [438, 750, 937]  # the first steps at 32², 16², 8² (official indices)
    for j, r in ((437, 64), (438, 32), (749, 32), (750, 16), (936, 16), (937, 8), (999, 8)):
        assert p.resolution((j + 1) / 1000) == r, j
    assert p.resolution(0.0) == 64 and p.resolution(0.439) == 32 and p.resolution(0.4385) == 32
    assert p.resolution(0.438) == 64
    assert p.mean_pixel_cost() == pytest.approx(0.53, abs=0.005)
    assert ScaleSpaceProcess(resolution=256, levels=6).mean_pixel_cost() == pytest.approx(0.38, abs=0.005)
    assert ScaleSpaceProcess(resolution=64, levels=4, schedule="equal").change_steps() == [250, 500, 750]


def test_sample_grid_keeps_every_change_step_exactly():
    p = ScaleSpaceProcess(resolution=64, levels=4)
    grid = p.sample_grid(50)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and all(b < a for a, b in zip(grid, grid[1:]))
    steps = {round(t * 1000) - 1 for t in grid[:-1]}
    for j in p.change_steps():
        assert {j, j - 1} <= steps
    for t, s in zip(grid[:-1], grid[1:]):  # no grid step spans more than one resolution change
        assert p.resolution(t) in (p.resolution(s), p.resolution(s) // 2)


def _dense_down(side: int) -> torch.Tensor:
    m = down2_matrix(side)
    return torch.kron(m, m)


def test_change_step_posterior_equals_gaussian_conditioning():
    """t = the first 2² step, s its predecessor at 4²: mean and covariance of ``step`` against
    brute-force conditioning of the joint N(x_s, x_t | x0) built from dense matrices."""
    p = ScaleSpaceProcess(resolution=4, levels=2)
    j = p.change_steps()[0]
    t, s = (j + 1) / 1000, j / 1000
    (a_t, s_t), (a_s, s_s) = (tuple(float(v) for v in p.scalings(torch.tensor([u]))) for u in (t, s))
    c = a_t / a_s
    M = _dense_down(4)  # [4, 16]
    x0s = torch.rand(16, dtype=torch.float64) * 2 - 1  # x0 at r(s) = 4²
    mu = a_s * x0s
    # joint: x_s ~ N(mu, σ_s² I); x_t = c M x_s + n, n ~ N(0, σ_t² I − c² σ_s² M Mᵀ)
    S_ss = s_s**2 * torch.eye(16, dtype=torch.float64)
    S_ts = c * M @ S_ss
    S_tt = c**2 * M @ S_ss @ M.T + (s_t**2 * torch.eye(4, dtype=torch.float64) - c**2 * s_s**2 * M @ M.T)
    x_t = c * M @ mu + torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    K = torch.linalg.solve(S_tt, S_ts).T
    mean = mu + K @ (x_t - c * M @ mu)
    cov = S_ss - K @ S_ts
    n = 40_000
    xt_b = x_t.reshape(1, 1, 2, 2).expand(n, 1, 2, 2).float()
    x0_b = x0s.reshape(1, 1, 4, 4).expand(n, 1, 4, 4).float()
    tt, ss = torch.full((n,), t), torch.full((n,), s)
    got_mean = p.step(xt_b[:1], x0_b[:1], tt[:1], ss[:1], 1.0, ZeroNoise(1)).double().reshape(-1)
    torch.testing.assert_close(got_mean, mean, rtol=1e-5, atol=1e-5)
    draws = p.step(xt_b, x0_b, tt, ss, 1.0, NoiseSource(torch.Generator().manual_seed(1))).double()
    emp = torch.cov(draws.reshape(n, -1).T)
    assert float((emp - cov).abs().max()) < 0.03 * float(cov.diagonal().mean())
    assert float(torch.linalg.eigvalsh(cov).min()) > 0  # σ_s² (I − ρ c² Mᵀ M) is positive definite


def _module(**kw) -> ScaleSpaceModule:
    p = ScaleSpaceProcess(resolution=16, levels=2)
    return ScaleSpaceModule(flexi("tiny", resolution=16, attn_resolutions=[]), p, **kw)


def test_training_batches_have_one_resolution_shared_by_every_rank():
    m = _module()
    change = set(m.process.change_steps())
    n_change = 0
    for seed in range(400):
        draws = []
        for rank in (0, 1):
            with mock.patch.object(type(m), "global_rank", new_callable=mock.PropertyMock, return_value=rank):
                m.seed, m._generators = seed, {}
                draws.append(m.draw_steps(16, "cpu"))
        res = [{m.process.step_res[int(j)] for j in d} for d in draws]
        assert len(res[0]) == 1 and res[0] == res[1]  # one resolution, the same on both ranks
        if int(draws[0][0]) in change:
            n_change += 1
            assert len(set(draws[0].tolist())) == 1 and torch.equal(draws[0], draws[1])
        else:
            assert not set(draws[0].tolist()) & change and not torch.equal(draws[0], draws[1])
    assert n_change <= 5  # one change step of 1000: a share 1e-3 of the batches


def test_loss_targets_x0_at_the_next_resolution_and_samples_at_full_resolution():
    m = _module()
    seen = []
    orig = m.denoiser.loss

    def spy(x0, eps, x_t, t, w, labels, **kw):
        seen.append((x0.shape, x_t.shape, kw))
        return orig(x0, eps, x_t, t, w, labels, **kw)

    m.denoiser.loss = spy
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    for seed in range(30):
        m.seed, m._generators = seed, {}
        per, t = m.loss(x0)
        assert per.shape == (4,) and torch.isfinite(per).all()
    for x0s, xts, kw in seen:
        assert kw["out_resolution"] == x0s[-1] and x0s[-1] in (xts[-1], 2 * xts[-1])
    assert {xts[-1] for _, xts, _ in seen} == {8, 16}
    x = m.sample([0, 1], steps=10)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    assert m.reported_steps(10) == len(m.process.sample_grid(10)) - 1
    net = flexi("tiny", resolution=16, channel_mult=(1,), attn_resolutions=[])
    with pytest.raises(ValueError, match="levels"):
        ScaleSpaceModule(net, ScaleSpaceProcess(resolution=16, levels=2))


@pytest.mark.parametrize(
    "exp,millions,levels",
    [("ssd_celeba64_4L", 92.26, [8, 16, 32, 64]), ("ssd_celeba256_6L", 124.25, [8, 16, 32, 64, 128, 256])],
)
def test_paper_configs_instantiate_with_their_sizes(exp, millions, levels):
    from freqdiff.config import instantiate, load
    from freqdiff.nets.presets import count_parameters

    cfg = load(exp, ["data.path=/nowhere"])
    with torch.device("meta"):
        m = instantiate(cfg.module, "module")
    assert count_parameters(m.denoiser) / 1e6 == pytest.approx(millions, abs=0.01)
    assert m.process.levels == levels and m.process.schedule == "convex" and m.process.gamma == 0.5
    base = load("ddpm_x0_celeba64", ["data.path=/nowhere"])  # the baseline: same backbone, one level
    if exp == "ssd_celeba64_4L":
        with torch.device("meta"):
            b = instantiate(base.module, "module")
        assert count_parameters(b.denoiser) == count_parameters(m.denoiser) and b.process.levels == [64]
