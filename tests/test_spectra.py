"""RAPS, spectral distance and RAPS plots (Resolution Chromatography; docs/frequencies.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from freqdiff.analysis.plots import figure_to_array, plot_raps
from freqdiff.metrics.spectra import fit_power_law, per_frequency_snr, raps, spectral_distance


def dead_leaves(n: int, size: int = 32, seed: int = 0, discs: int = 20, rmax: float = 10.0) -> torch.Tensor:
    """Colour dead-leaves images [n, 3, size, size] in [-0.5, 0.5]: occluding discs, log-uniform radii."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    x = (torch.rand(n, 3, 1, 1, generator=g) - 0.5).expand(n, 3, size, size).clone()
    for _ in range(discs):
        cy, cx = torch.rand(2, n, 1, 1, generator=g) * size
        r = 1.5 * (rmax / 1.5) ** torch.rand(n, 1, 1, generator=g)
        col = torch.rand(n, 3, 1, 1, generator=g) - 0.5
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2)[:, None]  # [n, 1, H, W]
        x = torch.where(inside, col, x)
    return x


def test_white_noise_flat_at_pixel_variance():
    x = 0.5 * torch.randn(32, 1, 64, 64)
    f, p = raps(x)
    assert f.shape == p.shape == (33,) and p.dtype == torch.float64
    _, gamma = fit_power_law(f, p, 2, 32)
    assert abs(gamma) < 0.15
    level = p[2:].mean().item()  # orthonormal FFT + unit-mean-square window: level = variance
    assert level == pytest.approx(x.double().var().item(), rel=0.03)
    assert p[0].item() < 1e-20  # DC removed by the window-weighted mean


def test_photograph_power_law():
    skdata = pytest.importorskip("skimage.data")
    cam = torch.from_numpy(skdata.camera().astype(np.float64) / 255.0)  # [512, 512]
    f, p = raps(cam)
    beta, gamma = fit_power_law(f, p, 2, 256)
    assert 1.5 < gamma < 3.0 and beta > 0
    astro = torch.from_numpy(skdata.astronaut().astype(np.float64).mean(-1) / 255.0)  # gray [512, 512]
    assert 1.5 < fit_power_law(*raps(astro), 2, 256)[1] < 3.0


def test_power_law_field_recovered():
    """A Gaussian field with P ∝ f^-2, cropped (non-periodic), fits gamma ≈ 2 through the window."""
    n = 128
    k = torch.fft.fftfreq(2 * n, 1 / (2 * n)).double()
    r = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2).clamp_min(1)
    z = torch.randn(4, 2 * n, 2 * n, dtype=torch.complex128) / r  # amplitude f^-1
    x = torch.fft.ifft2(z).real[:, :n, :n]  # [4, n, n]
    assert fit_power_law(*raps(x), 2, n // 2)[1] == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("k", [3, 7, 12])
def test_sinusoid_peaks_at_its_bin(k):
    i = torch.arange(64, dtype=torch.float64)
    x = torch.cos(2 * math.pi * k * i / 64)[None, :].expand(64, 64)  # k cycles/image along x
    _, p = raps(x)
    assert int(p.argmax()) == k
    y = torch.sin(2 * math.pi * k * i / 64)[:, None].expand(64, 96)  # non-square: along the short side
    assert int(raps(y)[1].argmax()) == k


def test_constant_image_has_no_power():
    _, p = raps(torch.full((2, 3, 32, 32), 0.7))
    assert p.abs().max().item() < 1e-20


def test_shapes_and_reduce():
    x = torch.randn(4, 3, 32, 24)
    f, p = raps(x[0, 0])
    assert f.shape == p.shape == (13,)  # bins 0 .. min(H, W) // 2
    assert raps(x[0])[1].shape == (13,)
    assert raps(x)[1].shape == (13,)
    f2, p2 = raps(x, reduce=False)
    assert p2.shape == (4, 3, 13) and raps(x[0], reduce=False)[1].shape == (3, 13)
    torch.testing.assert_close(p2.mean(dim=(0, 1)), raps(x)[1])  # reduce = mean of the spectra
    torch.testing.assert_close(p2[1, 2], raps(x[1, 2])[1])
    assert raps(x, bins=20)[1].shape == (20,)
    torch.testing.assert_close(f2, torch.arange(13, dtype=torch.float64))


def test_spectral_distance_properties():
    a, b = dead_leaves(64, seed=1), dead_leaves(64, seed=2)
    assert spectral_distance(a, a) == 0.0
    assert spectral_distance(a, b) == pytest.approx(spectral_distance(b, a), abs=1e-12)
    assert spectral_distance(a, b) < 0.06  # two real sets (0.006-0.03: spectral_distance's docstring)
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(a.shape, generator=g)
    d = [spectral_distance(a + s * eps, a) for s in (0.03, 0.1, 0.3)]
    assert 0 < d[0] < d[1] < d[2]
    noise = 0.3 * torch.randn(a.shape, generator=g)
    assert spectral_distance(noise, b) > 0.37  # noise vs data (0.77 at 32²: spectral_distance's docstring)
    with pytest.raises(ValueError):
        spectral_distance(a, a[..., :16, :16])


def test_per_frequency_snr():
    sp = torch.tensor([4.0, 1.0, 0.25])
    snr = per_frequency_snr(sp, 0.5, 0.25)
    torch.testing.assert_close(snr, torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    assert per_frequency_snr(sp, torch.tensor([1.0, 0.0, 1.0]), 1.0)[1] == 0


def test_plot_raps_writes_png(tmp_path):
    curves = {"noise": raps(torch.randn(2, 1, 32, 32)), "leaves": raps(dead_leaves(8))}
    path = tmp_path / "sub" / "raps.png"
    fig = plot_raps(curves, path=path, title="test")
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arr = figure_to_array(fig)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.std() > 0
