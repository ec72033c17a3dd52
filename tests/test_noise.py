"""NoiseSource: per-sample seeded noise (batch independence, streams, the hash spec, statistical quality)
and the one-generator training path.

Statistical tolerances are set from the Monte Carlo error of N draws: a statistic with standard error
SE must lie within 5 SE (or a test's p-value above 1e-4); maxima over many lags use an extreme-value
bound. The draws are deterministic, so a pass is a pass for good, and a broken hash fails loudly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from freqdiff.processes import noise as N
from freqdiff.processes.noise import NoiseSource

MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------- batch independence and the API


def test_sample_depends_only_on_its_seed():
    """Bit-identical rows whatever the batch, over several calls of different shapes."""
    shapes = [(3, 8, 8), (3, 8, 8), (5,), (2, 3, 4)]

    def draws(seeds):
        src = NoiseSource.from_seeds(seeds)
        return [src((len(seeds), *s)) for s in shapes]

    both = draws([3, 7, 11, 13])
    parts = [draws(s) for s in ([3, 7], [11], [13])]
    for i in range(len(shapes)):
        assert torch.equal(both[i], torch.cat([p[i] for p in parts]))
    shuffled = draws([13, 3, 11, 7])
    for i in range(len(shapes)):
        assert torch.equal(shuffled[i], both[i][[3, 0, 2, 1]])
    assert torch.equal(draws(torch.tensor([3, 7, 11, 13]))[1], both[1])  # seeds as a tensor


def test_seeds_streams_and_calls_differ():
    src = NoiseSource.from_seeds([5, 6, 2**62, 2**63 - 1])
    first, second = src((4, 1000)), src((4, 1000))
    assert torch.isfinite(first).all()
    other_stream = NoiseSource.from_seeds([5, 6, 2**62, 2**63 - 1], stream="other")((4, 1000))
    for a, b in [(first, second), (first, other_stream), (first[:3], first[1:])]:
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert (a != b).float().mean() > 0.999 and abs(r) < 5 / math.sqrt(a.numel())
    # int and str streams are apart; a sub-stream has its own counter from 0, on the same device
    by_int, by_str = (NoiseSource.from_seeds([5], stream=s)((1, 8)) for s in (1, "1"))
    assert not torch.equal(by_int, by_str)
    sub = src.stream("stage2")
    assert sub.seeds == src.seeds and sub.device == src.device and len(sub) == 4
    fresh = NoiseSource.from_seeds([5, 6, 2**62, 2**63 - 1]).stream("stage2")
    assert torch.equal(sub((4, 16)), fresh((4, 16)))
    assert not torch.equal(NoiseSource.from_seeds([5, 6, 2**62, 2**63 - 1])((4, 16)), fresh((4, 16)))


def test_api_shape_and_dtype_checks():
    src = NoiseSource.from_seeds(torch.arange(4))
    assert len(src) == 4 and src.seeds == [0, 1, 2, 3] and src.device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"batch 5 .* 4 seeds"):
        src((5, 3))
    with pytest.raises(ValueError, match="4 seeds"):
        src(())
    with pytest.raises(TypeError, match="floating"):
        src((4, 3), dtype=torch.int64)
    z32 = NoiseSource.from_seeds([1, 2])((2, 3, 4))
    z64 = NoiseSource.from_seeds([1, 2])((2, 3, 4), dtype=torch.float64)
    assert z64.dtype == torch.float64 and torch.equal(z64, z32.double())
    assert NoiseSource.from_seeds([1, 2])((2, 3), dtype=torch.bfloat16).dtype == torch.bfloat16
    assert NoiseSource.from_seeds([])((0, 3)).shape == (0, 3)


def test_one_generator_training_path():
    z = NoiseSource(torch.Generator().manual_seed(5))((4, 3, 2))
    assert torch.equal(z, torch.randn((4, 3, 2), generator=torch.Generator().manual_seed(5)))
    assert torch.equal(z, NoiseSource(torch.Generator().manual_seed(5))((4, 3, 2)))
    torch.manual_seed(1)
    g = NoiseSource(None)((4, 3), dtype=torch.float64)
    torch.manual_seed(1)
    assert torch.equal(g, torch.randn((4, 3), dtype=torch.float64))
    assert len(NoiseSource(None, batch_size=8)) == 8
    with pytest.raises(TypeError, match="batch size"):
        len(NoiseSource(None))
    with pytest.raises(TypeError, match="from_seeds"):
        NoiseSource([torch.Generator(), torch.Generator()])
    with pytest.raises(TypeError, match="seeded"):
        NoiseSource(None).stream("x")


# ---------------------------------------------------------------- the hash, against plain integers


def _xs(x: int) -> int:
    return x ^ (x >> 16)


def _mix(x: int) -> int:
    x = _xs(x & MASK32) * 0x7FEB352D & MASK32
    x = _xs(x) * 0x846CA68B & MASK32
    return _xs(x)


def _reference_bits(seed: int, path: tuple, call: int, n: int) -> list[int]:
    """The module docstring's spec in Python integers: the unsigned 32-bit hashes of one row."""
    key = N.seed_key(seed, N.stream_key(path))
    c_lo = _mix(call + N.S1)
    c_hi = _mix(c_lo + N.S2)
    a = _mix((key & MASK32) + c_lo)
    k1 = _mix(((key >> 32) ^ a) + c_hi)
    k0 = _mix(a ^ k1)
    out = []
    for j in range(n):
        x = _xs((_mix(_mix(j + N.C1) + N.C2) + k0) & MASK32)
        out.append(_xs((x * 0x7FEB352D + k1) & MASK32) * 0x846CA68B & MASK32)
    return out


def test_hash_matches_integer_reference():
    """torch's int32 wrap-around ops compute exactly the unsigned spec; the floats follow it."""
    seeds, n = [0, 1, 2**63 - 1, 12345], 37
    src = NoiseSource.from_seeds(seeds).stream(7)
    for _ in range(N.KEY_BLOCK - 2):  # the calls below straddle two blocks of call keys
        src._bits((len(seeds), 1))
    for call in range(N.KEY_BLOCK // 2 - 1, N.KEY_BLOCK // 2 + 2):
        bits = src._bits((len(seeds), n))
        z = src((len(seeds), n)).double().numpy()  # call + 1: compare its floats against its own bits
        for b, s in enumerate(seeds):
            assert [v & MASK32 for v in bits[b].tolist()] == _reference_bits(s, ("sample", 7), 2 * call, n)
            ref = _reference_bits(s, ("sample", 7), 2 * call + 1, n)
            y = np.array([(v - (1 << 32) if v >= 1 << 31 else v) >> 10 for v in ref], dtype=np.float64)
            np.testing.assert_allclose(z[b], math.sqrt(2) * special.erfinv((2 * y + 1) / 2**22), atol=2e-5)


# ---------------------------------------------------------------- statistical quality

B, L = 256, 4096  # 2**20 draws per call


@pytest.fixture(scope="module")
def draws():
    src = NoiseSource.from_seeds(range(1000, 1000 + B))
    other = src.stream("other")
    return src((B, L)).double(), src((B, 4, 32, 32)).reshape(B, L).double(), other((B, L)).double()


def _pair_chi2_p(a: torch.Tensor, b: torch.Tensor, bins: int = 16) -> float:
    """p-value of independence of two standard-normal samples on a bins x bins grid of Φ."""
    ia = (special.ndtr(a.flatten().numpy()) * bins).astype(np.int64).clip(0, bins - 1)
    ib = (special.ndtr(b.flatten().numpy()) * bins).astype(np.int64).clip(0, bins - 1)
    counts = np.bincount(ia * bins + ib, minlength=bins * bins)
    expected = a.numel() / bins**2
    return float(stats.chi2.sf(((counts - expected) ** 2 / expected).sum(), bins**2 - 1))


def test_marginal_is_standard_normal(draws):
    z = draws[0].flatten()
    n = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z.numpy())) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z.numpy())) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    counts = np.bincount((special.ndtr(z.numpy()) * 1000).astype(np.int64).clip(0, 999), minlength=1000)
    assert stats.chisquare(counts).pvalue > 1e-4  # fine-grained uniformity of Φ(z)
    tail = int((z.abs() > 4).sum())
    expected = n * 2 * special.ndtr(-4)
    assert abs(tail - expected) < 5 * math.sqrt(expected) and z.abs().max() < 5.17
    # a 22-bit grid: 2**20 draws from 2**22 values leave 1 - 4 (1 - exp(-1/4)) = 88.5 % distinct
    assert abs(torch.unique(z).numel() / n - 4 * (1 - math.exp(-0.25))) < 0.005


def test_no_correlation_within_rows(draws):
    """Autocorrelation of the rows at every lag (an FFT), against the max of L/2 standard errors."""
    for z in draws[:2]:
        f = torch.fft.rfft(z, n=2 * L)
        acf = torch.fft.irfft(f * f.conj(), n=2 * L)[:, 1 : L // 2].sum(0)
        lags = torch.arange(1, L // 2, dtype=torch.float64)
        r = acf / (B * (L - lags))
        assert (r.abs() * torch.sqrt(B * (L - lags))).max() < 5.5
        sq = z.square() - 1  # no dependence of the variance on the neighbour either
        assert abs((sq[:, 1:] * sq[:, :-1]).mean() / 2) < 5 / math.sqrt(B * L)
        assert _pair_chi2_p(z[:, 1:], z[:, :-1]) > 1e-4


def test_no_dependence_between_seeds_calls_and_streams(draws):
    first, second, other = draws
    pairs = {"seeds b, b+1": (first[:-1], first[1:]), "calls": (first, second), "streams": (first, other)}
    for name, (a, b) in pairs.items():
        n = a.numel()
        assert abs((a * b).mean()) < 5 / math.sqrt(n), name
        assert abs(((a.square() - 1) * (b.square() - 1)).mean() / 2) < 5 / math.sqrt(n), name
        assert _pair_chi2_p(a, b) > 1e-4, name


def test_rows_are_not_shifted_copies(draws):
    """Circular cross-correlation of rows of different seeds at every shift stays at noise level."""
    z = draws[0][:16]
    f = torch.fft.rfft(z)
    for i in range(0, 16, 2):
        xc = torch.fft.irfft(f[i] * f[i + 1].conj(), n=L) / math.sqrt(L)  # ~N(0, 1) at every shift
        assert xc.abs().max() < 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    seeds = list(range(64))
    cpu, gpu = NoiseSource.from_seeds(seeds), NoiseSource.from_seeds(seeds, device="cuda")
    assert torch.equal(cpu._bits((64, 3, 16, 16)), gpu._bits((64, 3, 16, 16)).cpu())
    z = gpu((64, 3, 16, 16))
    assert z.device.type == "cuda"
    torch.testing.assert_close(z.cpu(), cpu((64, 3, 16, 16)), atol=1e-5, rtol=1e-5)
