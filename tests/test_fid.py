"""FID (Heusel et al. 2017): Fréchet distance against scipy, streaming statistics, the offline Inception
loading path (weights the test writes itself), FID behaviour with a small deterministic extractor."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from helpers import gaussian_blur
from torch import nn

from freqdiff.metrics.evaluator import SetStats, compare
from freqdiff.metrics.fid import (
    INCEPTION_FILE,
    WEIGHTS_ENV,
    FeatureStats,
    InceptionFeatures,
    InceptionWeightsNotFound,
    fid_from_stats,
    frechet_distance,
    resolve_inception_weights,
    write_random_inception_weights,
)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid / TTUR reference: sqrtm of S1 S2 in float64 (Heusel et al.'s code)."""
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_gaussian_stats(rng: np.random.Generator, d: int, n: int):
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal(d)
    return a.mean(0), np.cov(a, rowvar=False)


@pytest.mark.parametrize("d", [8, 64, 128])
def test_frechet_matches_scipy_float64(d):
    rng = np.random.default_rng(d)
    mu1, s1 = random_gaussian_stats(rng, d, 4 * d)
    mu2, s2 = random_gaussian_stats(rng, d, 4 * d)
    ours = frechet_distance(
        torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2), torch.from_numpy(s2)
    )
    ref = scipy_frechet(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)
    # symmetric, and zero against itself
    assert frechet_distance(*map(torch.from_numpy, (mu2, s2, mu1, s1))) == pytest.approx(ours, rel=1e-9)
    assert abs(frechet_distance(*map(torch.from_numpy, (mu1, s1, mu1, s1)))) < 1e-8 * np.trace(s1)


def test_frechet_rank_deficient_is_finite_and_zero_on_itself():
    rng = np.random.default_rng(0)
    f = torch.from_numpy(rng.standard_normal((10, 64)))  # n < D: covariance of rank 9
    s = FeatureStats(64).update(f)
    assert abs(fid_from_stats(s, s)) < 1e-9
    g = FeatureStats(64).update(f + 1.0)  # a shift of the mean only: FID = |delta mu|² = 64
    assert fid_from_stats(s, g) == pytest.approx(64.0, rel=1e-8)
    # known rank (n - 1 < D/2): the randomized range finder equals the full eigendecomposition
    f2 = torch.from_numpy(rng.standard_normal((12, 64)) * 2)
    g2 = FeatureStats(64).update(f2)
    full_eigh = frechet_distance(s.mean(), s.cov(), g2.mean(), g2.cov())  # no rank hints
    assert fid_from_stats(s, g2) == pytest.approx(full_eigh, rel=1e-10)
    # ... and both equal the exact low-rank value: Tr (S1 S2)^1/2 = ||X1 X2^T||_* / sqrt((n1-1)(n2-1))
    x1, x2 = f - f.mean(0), f2 - f2.mean(0)  # centred features [n, D]
    tr = torch.linalg.svdvals(x1 @ x2.T).sum() / ((len(f) - 1) * (len(f2) - 1)) ** 0.5
    exact = (f.mean(0) - f2.mean(0)).square().sum() + s.cov().trace() + g2.cov().trace() - 2 * tr
    assert fid_from_stats(s, g2) == pytest.approx(float(exact), rel=1e-10)
    # a positive-definite S2 takes the Cholesky path, a rank-deficient one the eigh path: they agree
    full = FeatureStats(64).update(torch.from_numpy(rng.standard_normal((500, 64)) * 0.7 + 0.2))
    assert fid_from_stats(s, full) == pytest.approx(fid_from_stats(full, s), rel=1e-9)
    mu1, s1, mu2, s2 = (t.numpy() for t in (s.mean(), s.cov(), full.mean(), full.cov()))
    assert fid_from_stats(s, full) == pytest.approx(scipy_frechet(mu2, s2, mu1, s1), rel=1e-7)


def test_streaming_stats_equal_batch_moments_and_merge():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((300, 16)) * 3 + 5
    a = FeatureStats(16)
    for chunk in np.array_split(f, 7):
        a.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(a.mean().numpy(), f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.cov().numpy(), np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)
    b, c = (
        FeatureStats(16).update(torch.from_numpy(f[:100])),
        FeatureStats(16).update(torch.from_numpy(f[100:])),
    )
    merged = FeatureStats.from_state_dict(b.state_dict()).merge(c)
    torch.testing.assert_close(merged.cov(), a.cov())
    m = FeatureStats.from_moments(a.mean(), a.cov(), a.n)
    torch.testing.assert_close(m.cov(), a.cov())
    with pytest.raises(ValueError, match=r"features \[B, 16\]"):
        a.update(torch.zeros(3, 15))


# ------------------------------------------------------------------ Inception, offline
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialised torch-fidelity InceptionV3 state dict (~96 MB), written here, not committed."""
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


def test_weights_resolution_order_and_fail_fast(tmp_path, monkeypatch, inception_file):
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    hub = torch_home / "hub" / "checkpoints" / INCEPTION_FILE
    with pytest.raises(InceptionWeightsNotFound) as e:
        resolve_inception_weights()
    msg = str(e.value)
    assert str(hub) in msg and WEIGHTS_ENV in msg and "callbacks.<name>.weights" in msg and "fid=false" in msg
    hub.parent.mkdir(parents=True)
    hub.symlink_to(inception_file)
    assert resolve_inception_weights() == hub  # (3) torch hub's cache
    other = tmp_path / "env.pth"
    other.symlink_to(inception_file)
    monkeypatch.setenv(WEIGHTS_ENV, str(other))
    assert resolve_inception_weights() == other  # (2) the environment variable
    assert resolve_inception_weights(inception_file) == inception_file  # (1) an explicit path
    with pytest.raises(
        InceptionWeightsNotFound, match="nope.pth"
    ):  # a given path that is wrong: no fall-through
        resolve_inception_weights(tmp_path / "nope.pth")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(InceptionWeightsNotFound, match="missing.pth"):
        resolve_inception_weights()


def test_inception_offline_fid_of_a_set_with_itself_is_zero(inception_file, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inc

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(tf_inc, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    net = InceptionFeatures(inception_file)
    assert (
        net.name.startswith("torch-fidelity/inception-v3-compat/2048/sha256:")
        and net.resize == "tf1-bilinear-299"
    )
    assert not any(p.requires_grad for p in net.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    f = net(x)
    assert f.shape == (4, 2048) and torch.isfinite(f).all() and f.std(0).mean() > 1e-3  # not degenerate

    # the features are torchmetrics' with antialias=False (paper FID), not its antialiased default
    from torchmetrics.image.fid import NoTrainInceptionV3

    tm = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(inception_file), antialias=False)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(tm(u8), f, rtol=1e-5, atol=1e-5)

    a, b = SetStats(net, spectra=False), SetStats(net, spectra=False)
    a.fid.update(f)
    b.fid.update(net(x.clone()))  # a second pass: deterministic features
    assert abs(compare(b, a)["fid"]) < 1e-9 * float(a.fid.cov().trace())  # 2048-d, rank 3: the n < D path


# ------------------------------------------------------------------ FID with a small deterministic extractor
class TinyFeatures(nn.Module):
    """Fixed random 5x5 filters at two scales, ReLU, mean and std pooling: 64 features (tests only)."""

    name, resize, dim = "test/tiny-conv", "none", 64

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(16, 3, 5, 5, generator=g) / 5)

    def forward(self, u8: torch.Tensor) -> torch.Tensor:
        x = u8.float() / 127.5 - 1
        feats = []
        for s in (x, F.avg_pool2d(x, 2)):
            h = F.relu(F.conv2d(s, self.w, padding=2))  # [B, 16, h, w]
            feats += [h.mean((2, 3)), h.std((2, 3))]
        return torch.cat(feats, 1)  # [B, 64]


_blur = gaussian_blur


def test_fid_grows_with_blur_and_noise():
    from datamodules.synthetic import DeadLeaves

    real = (
        torch.from_numpy(DeadLeaves(resolution=32).images(96, "val")).permute(0, 3, 1, 2).float() / 127.5 - 1
    )
    net = TinyFeatures()

    def fid(x: torch.Tensor) -> float:
        a, b = SetStats(net, spectra=False), SetStats(net, spectra=False)
        a.update(real, torch.arange(len(real)))
        b.update(x, torch.arange(len(x)))
        return compare(b, a)["fid"]

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(real.shape, generator=g)
    assert fid(real) == pytest.approx(0.0, abs=1e-9)
    blur = [fid(_blur(real, s)) for s in (0.5, 1.0, 2.0)]
    noisy = [fid(real + s * noise) for s in (0.05, 0.1, 0.2)]
    assert 0 < blur[0] < blur[1] < blur[2], blur
    assert 0 < noisy[0] < noisy[1] < noisy[2], noisy
