"""Fréchet Inception Distance with streaming statistics (Heusel et al. 2017, "GANs trained by a two
time-scale update rule converge to a local Nash equilibrium", eq. 6).

FID between two image sets is the Fréchet (2-Wasserstein) distance between Gaussians fitted to their
Inception-v3 pool features (2048-d):

    d² = |mu_1 - mu_2|² + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2})            (Heusel eq. 6)

Pieces, all plain torch (no Lightning; torch-fidelity only for the network):

- :class:`FeatureStats`: running ``n``, ``sum f`` and ``sum f f^T`` in float64, so memory is O(D²)
  whatever the number of images, and statistics of shards (DDP ranks, workers, chunks) simply add.
  ``Sigma = (sum f f^T - n mu mu^T) / (n - 1)`` (unbiased, as torch-fidelity and torchmetrics).
- :func:`frechet_distance`: ``Tr (Sigma_1 Sigma_2)^{1/2}`` as the sum of square roots of the
  eigenvalues of a symmetric PSD matrix with the spectrum of ``Sigma_1 Sigma_2`` (``L^T Sigma_1 L``,
  ``Sigma_2 = L L^T``), all in float64: real arithmetic, no ``sqrtm`` iteration, stable when the
  covariances are rank-deficient (n < D, e.g. a quick evaluation of 64 samples).
- :class:`InceptionFeatures`: torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-Inception
  port used for paper FIDs) on uint8 images. Its input resize is the TF1-compatible bilinear resize
  to 299 (``interpolate_bilinear_2d_like_tensorflow1x``), which is exactly what torchmetrics runs with
  ``antialias=False`` (tests check the features are identical); torchmetrics >= 1.8 defaults to an
  antialiased resize that does not match published numbers. Why not torchmetrics'
  ``FrechetInceptionDistance`` itself: a ``Metric`` holding both sets' sums cannot use cached
  reference statistics, and we want one streaming-statistics object shared by the training callback,
  the DDP reduction and the resumable standalone command.
- Weights (no download, ever): :func:`resolve_inception_weights` looks at an explicit path (config
  key), then ``$FREQDIFF_INCEPTION_WEIGHTS``, then torch hub's cache
  ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``, and otherwise fails with
  a message naming all three places and where to download the file.
- :class:`StatsCache`: reference statistics on disk, keyed by (dataset manifest checksum,
  resolution, n, extractor, resize, ...); the key is stored in the file and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
WEIGHTS_ENV = "FREQDIFF_INCEPTION_WEIGHTS"
RESIZE = "tf1-bilinear-299"  # torch-fidelity's resize = torchmetrics' antialias=False
FEATURE = "2048"  # pool3 features, the FID layer


class InceptionWeightsNotFound(FileNotFoundError):
    """No Inception weights file where :func:`resolve_inception_weights` looks."""


def hub_weights_path() -> Path:
    """Where torch hub caches the file: ``$TORCH_HOME/hub/checkpoints/<INCEPTION_FILE>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``path``, else ``$FREQDIFF_INCEPTION_WEIGHTS``, else the hub cache.

    A path that is given (argument or environment variable) but missing is an error naming it; it
    does not fall through to the next place, so a typo is not silently replaced by another file.
    """
    hub = hub_weights_path()
    howto = (
        f"Put torch-fidelity's Inception weights ({INCEPTION_FILE}, 95.6 MB, from {INCEPTION_URL}) at one "
        f"of: (1) the path given in the config (callbacks.<name>.weights / --weights), "
        f"(2) the file named by ${WEIGHTS_ENV}, (3) {hub} (torch hub's cache; $TORCH_HOME moves it). "
        f"Nothing is downloaded. Without weights, use fid=false (SWD and spectral distance need none)."
    )
    if path is not None and str(path) != "":
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsNotFound(f"Inception weights path {str(path)!r} is not a file. {howto}")
        return p
    env = os.environ.get(WEIGHTS_ENV, "")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InceptionWeightsNotFound(f"${WEIGHTS_ENV}={env!r} is not a file. {howto}")
        return p
    if hub.is_file():
        return hub
    raise InceptionWeightsNotFound(f"no Inception weights found. {howto}")


def inception_available(path: str | os.PathLike | None = None) -> bool:
    try:
        resolve_inception_weights(path)
        return True
    except InceptionWeightsNotFound:
        return False


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (memoised by path, size and mtime: the weights enter cache keys)."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] ``[B, C, H, W]`` -> uint8 ``[B, 3, H, W]`` as a PNG would store them.

    ``round((x + 1) * 127.5)``, the exact inverse of the data loader's ``u / 127.5 - 1``; one channel
    is repeated to three (Inception wants RGB). uint8 input passes through (grey repeated).
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 (TF port) as a frozen feature extractor: uint8 [B, 3, H, W] -> [B, 2048].

    ``name`` identifies the network and its weights (sha256 of the file) and ``resize`` the input
    resize; both enter reference-statistics cache keys.
    """

    def __init__(
        self, weights: str | os.PathLike | None = None
    ):  # explicit weights path (or None: see resolve)
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = resolve_inception_weights(weights)
        self.weights_path = str(path)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", [FEATURE], feature_extractor_weights_path=str(path)
        )
        self.net.requires_grad_(False).eval()  # frozen: DDP must not see unused parameters
        self.name = f"torch-fidelity/inception-v3-compat/{FEATURE}/sha256:{file_digest(path)[:16]}"
        self.resize = RESIZE
        self.dim = int(FEATURE)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # never leaves eval mode (BatchNorm statistics are fixed)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        (f,) = self.net(to_uint8(images))  # resize to 299 (TF1 bilinear), normalise, pool3
        return f.float()  # [B, 2048]


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a randomly initialised torch-fidelity InceptionV3 state dict (~96 MB) to ``path``.

    For tests and benchmarks offline: it exercises the loading path and runs at the real network's
    speed, but its FID values mean nothing. Convolutions get He-normal weights and BatchNorm is the
    identity, so features are O(1) rather than the ~1e-8 of PyTorch's default init.
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inc

    cls = tf_inc.FeatureExtractorInceptionV3
    with (
        mock.patch.object(tf_inc, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(cls, "load_state_dict", lambda self, sd, **k: None),
    ):
        net = cls("inception-v3-compat", [FEATURE])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


class FeatureStats:
    """Streaming first and second moments of features, float64: ``n``, ``sum f`` [D], ``sum f f^T`` [D, D]."""

    def __init__(self, dim: int):  # feature dimension D
        self.dim = int(dim)
        self.n = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64)  # [D]
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)  # [D, D]

    def update(self, f: Tensor) -> FeatureStats:
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features [B, {self.dim}], got shape {tuple(f.shape)}")
        if self.n == 0 and f.device != self.sum.device:  # accumulate where the features are (GPU)
            self.sum, self.outer = self.sum.to(f.device), self.outer.to(f.device)
        f = f.detach().to(device=self.sum.device, dtype=torch.float64)  # [B, D]
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer.addmm_(f.T, f)  # += f^T f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge feature statistics of dimension {other.dim} into {self.dim}")
        self.n += other.n
        self.sum = self.sum + other.sum.to(self.sum)
        self.outer = self.outer + other.outer.to(self.outer)
        return self

    @classmethod
    def from_moments(cls, mu: Tensor, sigma: Tensor, n: int) -> FeatureStats:
        """Sums that reproduce a given mean [D] and unbiased covariance [D, D] (e.g. a published .npz)."""
        mu, sigma = (
            torch.as_tensor(mu, dtype=torch.float64).reshape(-1),
            torch.as_tensor(sigma, dtype=torch.float64),
        )
        if sigma.shape != (mu.shape[0], mu.shape[0]) or n < 2:
            raise ValueError(
                f"need mu [D], sigma [D, D] and n >= 2, got {tuple(mu.shape)}, {tuple(sigma.shape)}, {n}"
            )
        s = cls(mu.shape[0])
        s.n, s.sum, s.outer = int(n), n * mu, (n - 1) * sigma + n * torch.outer(mu, mu)
        return s

    def mean(self) -> Tensor:
        return self.sum / self.n  # [D]

    def cov(self) -> Tensor:
        """Unbiased covariance ``(sum f f^T - n mu mu^T) / (n - 1)``, [D, D]."""
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.n}")
        mu = self.mean()
        return (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)

    def state_dict(self) -> dict[str, Tensor]:
        return {"n": torch.tensor(self.n), "sum": self.sum.cpu(), "outer": self.outer.cpu()}  # device-free

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> FeatureStats:
        s = cls(d["sum"].shape[0])
        s.n, s.sum, s.outer = int(d["n"]), d["sum"].to(torch.float64), d["outer"].to(torch.float64)
        return s


def frechet_distance(
    mu1: Tensor,
    sigma1: Tensor,
    mu2: Tensor,
    sigma2: Tensor,
    rank1: int | None = None,  # known upper bound of rank(sigma1) (n1 - 1): speeds up n < D
    rank2: int | None = None,  # the same for sigma2
) -> float:
    """``|mu1 - mu2|² + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Heusel et al. 2017, eq. 6), in float64.

    ``Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i)`` with ``lambda`` the eigenvalues of a symmetric PSD matrix
    similar to ``S1 S2`` (FID is symmetric, so the roles may swap): ``L^T S1 L`` with ``S2 = L L^T``
    (Cholesky) when S2 is positive definite (n > D, the usual case); otherwise ``F^T S2 F`` with
    ``S1 = F F^T`` (an eigendecomposition, or with ``rank1`` a randomized range finder: milliseconds).
    Eigenvalues below the numerical rank threshold ``D * eps * max`` (as ``numpy.linalg.matrix_rank``)
    count as 0, so FID(x, x) is 0 up to ~1e-12 relative even when n < D.
    """
    dev = torch.as_tensor(mu1).device  # the first set's device (GPU statistics stay there)
    mu1, mu2 = (torch.as_tensor(m).to(dev, torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s).to(dev, torch.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if not (mu1.shape == mu2.shape and s1.shape == s2.shape == (d, d)):
        raise ValueError(
            f"shape mismatch: mu {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
            f"sigma {tuple(s1.shape)}, {tuple(s2.shape)}"
        )
    m = None
    for a, b in ((s1, s2), (s2, s1)):
        chol, info = torch.linalg.cholesky_ex(b)  # b = L L^T when positive definite
        if int(info) == 0:
            m = chol.T @ a @ chol  # L^T a L, similar to a b = a L L^T [D, D]
            break
    if m is None:  # both rank-deficient (n < D): factor the one of lower rank
        if (rank2 or d) < (rank1 or d):
            s1, s2, rank1 = s2, s1, rank2
        f = _psd_factor((s1 + s1.T) / 2, rank1)  # S1 = F F^T, F [D, r]
        m = f.T @ s2 @ f  # [r, r], nonzero spectrum of S1 S2
    lam = torch.linalg.eigvalsh((m + m.T) / 2)
    floor = lam.abs().max() * d * torch.finfo(torch.float64).eps  # numerical rank threshold
    lam = torch.where(lam > floor, lam, torch.zeros_like(lam))
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * lam.sqrt().sum())


def _psd_factor(s: Tensor, rank: int | None) -> Tensor:
    """``F`` with ``s = F F^T`` for a PSD ``s`` [D, D]: [D, r + 8] when ``rank(s) <= r`` is known and small.

    Known small rank (n - 1 < D): the randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.1)
    with a fixed seed: ``Q = qr(s G)`` spans range(s) exactly for a rank-r matrix, and the eigenpairs of
    the small ``Q^T s Q`` give ``F = Q V sqrt(w)``. Otherwise a full eigendecomposition.
    """
    d = s.shape[0]
    if rank is not None and 0 < rank and rank + 8 <= d // 2:
        g = torch.randn(d, rank + 8, generator=torch.Generator().manual_seed(0), dtype=s.dtype).to(s.device)
        q, _ = torch.linalg.qr(s @ g)  # [D, r + 8] orthonormal basis of range(s)
        w, v = torch.linalg.eigh(q.T @ s @ q)  # small [r + 8, r + 8]
        return (q @ v) * w.clamp_min(0).sqrt()
    w, v = torch.linalg.eigh(s)
    return v * w.clamp_min(0).sqrt()


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov(), rank1=a.n - 1, rank2=b.n - 1)


# ---------------------------------------------------------------------------- reference-statistics cache
def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of a shard manifest in canonical JSON (it lists every shard's sha256: the data's identity)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$FREQDIFF_CACHE_DIR/ref_stats``, else ``~/.cache/freqdiff/ref_stats``."""
    root = os.environ.get("FREQDIFF_CACHE_DIR") or Path.home() / ".cache" / "freqdiff"
    return Path(root) / "ref_stats"


class StatsCache:
    """Reference statistics on disk: one ``<sha256(key)[:24]>.pt`` per key, written atomically.

    ``key`` is a flat JSON-able dict (dataset manifest checksum, resolution, n, extractor, resize, ...);
    it is stored in the file and compared on load, so a stale or colliding file is never used.
    """

    def __init__(self, folder: str | os.PathLike | None = None):  # None: default_cache_dir()
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def canonical(key: dict[str, Any]) -> str:
        return json.dumps(key, sort_keys=True, separators=(",", ":"))

    def path(self, key: dict[str, Any]) -> Path:
        return self.folder / (hashlib.sha256(self.canonical(key).encode()).hexdigest()[:24] + ".pt")

    def load(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The cached value of ``key``, or None (counted in ``hits`` / ``misses``)."""
        value = self._read(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def _read(self, key: dict[str, Any]) -> dict[str, Any] | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: recompute rather than fail
            return None
        if blob.get("key") != self.canonical(key):
            return None
        return blob["value"]

    def save(self, key: dict[str, Any], value: dict[str, Any]) -> Path:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        torch.save({"key": self.canonical(key), "value": value}, tmp)
        os.replace(tmp, p)
        return p

    def get_or_compute(self, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        value = self.load(key)
        if value is None:
            value = compute()
            self.save(key, value)
        return value
