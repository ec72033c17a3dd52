"""Multi-scale SWD (Karras et al. 2018): the pyramid, zero on identical sets, and that each kind of
damage shows at the pyramid levels of its frequencies."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import gaussian_blur

from freqdiff.metrics.swd import (
    descriptors,
    laplacian_pyramid,
    pyr_up,
    pyramid_resolutions,
    sliced_wasserstein,
    swd,
    swd_from_descriptors,
)

KW = dict(patches_per_image=64, min_res=16)  # 64² images: levels 64, 32, 16


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """32 dead-leaves images at 64², contrast reduced to 0.6 so perturbations rarely clip; [-1, 1]."""
    from datamodules.synthetic import DeadLeaves

    u8 = torch.from_numpy(DeadLeaves(resolution=64).images(32, "val")).permute(0, 3, 1, 2)
    return (u8.float() / 127.5 - 1) * 0.6


def test_pyramid_levels_and_exact_reconstruction():
    assert pyramid_resolutions(64) == [64, 32, 16]
    assert pyramid_resolutions(32, min_res=8) == [32, 16, 8]
    assert pyramid_resolutions(16) == [16]
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    pyr = laplacian_pyramid(x, 3)
    assert [p.shape[-1] for p in pyr] == [32, 16, 8]
    rec = pyr[-1]
    for band in reversed(pyr[:-1]):
        rec = band + pyr_up(rec)  # G_k = L_k + up(G_{k+1})
    torch.testing.assert_close(rec, x)


def test_zero_for_identical_sets_and_deterministic(images):
    d = descriptors(images, **KW)
    assert list(d) == [64, 32, 16] and d[64].shape == (32 * 64, 3 * 49)
    assert swd_from_descriptors(d, d) == {64: 0.0, 32: 0.0, 16: 0.0}
    assert swd(images[:8], images[:8].clone(), **KW) == {64: 0.0, 32: 0.0, 16: 0.0}
    # the same images in another order: other patches, so not exactly 0; deterministic given the seed
    d2 = descriptors(images.flip(0), **KW)
    first = swd_from_descriptors(d, d2)
    assert all(v > 0 for v in first.values()) and swd_from_descriptors(d, d2) == first
    # uint8 input reads as the [-1, 1] float it encodes
    u8 = ((images[:8] + 1) * 127.5).round().to(torch.uint8)
    for r, v in descriptors(u8, **KW).items():
        torch.testing.assert_close(v, descriptors(u8.float() / 127.5 - 1, **KW)[r], rtol=1e-4, atol=1e-4)


def test_sliced_wasserstein_of_a_shift_is_its_projected_length():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 5, generator=g)
    shift = torch.tensor([1.0, 0, 0, 0, 0])
    # W1 of a shift along each unit direction u is |u . shift|; averaged over random directions
    got = sliced_wasserstein(a, a + shift, dir_repeats=8, dirs_per_repeat=256, generator=g)
    want = math.gamma(2.5) / (math.sqrt(math.pi) * math.gamma(3))  # E|u_1| = 0.375 for u uniform on S^4
    assert got == pytest.approx(want, rel=0.05)


_gaussian_blur = gaussian_blur


def test_damage_is_located_in_frequency(images):
    ref = descriptors(images, **KW)

    def levels(x: torch.Tensor) -> dict[int, float]:
        return swd_from_descriptors(ref, descriptors(x, **KW))

    g = torch.Generator().manual_seed(1)
    noise = levels(images + 0.05 * torch.randn(images.shape, generator=g))
    blur = levels(_gaussian_blur(images, 1.0))
    # a smooth large-scale colour field: one random plane wave of one cycle per image, per channel
    n = images.shape[0]
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    angle = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    phase = torch.rand(n, 3, 1, 1, generator=g) * 2 * math.pi
    field = 0.3 * torch.sin(2 * math.pi * (xx * angle.cos() + yy * angle.sin()) + phase)
    smooth = levels(images + field)

    # high-frequency damage: the finest level far above the coarsest
    assert noise[64] > 10 * noise[16], noise
    assert blur[64] > 5 * blur[16], blur
    assert noise[64] > noise[32] > noise[16] and blur[64] > blur[32] > blur[16]
    # low-frequency damage: the opposite
    assert smooth[16] > 4 * smooth[64], smooth
    assert smooth[16] > smooth[32] and smooth[16] > noise[16] and smooth[16] > blur[16]
