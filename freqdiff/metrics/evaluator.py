"""Streaming statistics of image sets and the metrics between two sets (docs/evaluation.md).

One :class:`SetStats` per image set (generated or real) gathers, in one pass and in constant memory
with respect to the number of images ``n``:

- FID (Heusel et al. 2017): :class:`~freqdiff.metrics.fid.FeatureStats` of the extractor's features
  (float64 sums; O(D²) memory);
- spectral distance: the running sum of per-image RAPS (docs/evaluation.md), so the set's mean
  spectrum and :func:`spectral_distance_from_raps` equal ``spectral_distance`` on the whole set
  (with ``keep_raps`` also every image's RAPS, for the bootstrap spread);
- SWD (Karras et al. 2018): the images of index ``< swd_n`` (uint8), a capped subset;
- KID / precision-recall (optional, ``keep_features``): the features themselves (these grow with n).

Images are quantised to uint8 first (``round((x + 1) * 127.5)``), exactly as a PNG stores them, so a
generated set is measured as it would be after saving, and a real set read from PNG shards is
unchanged. Every image carries its global index (its position in the list of seeds, or in the data
set), so subsets are defined independently of how the work was split. Statistics of disjoint shards
add (:meth:`SetStats.merge`; :func:`all_reduce_stats` over ``torch.distributed``), so a set computed
on W ranks equals the one computed on one, up to float64 summation order.

:func:`bootstrap_spread` gives each weight-free metric a spread: its standard deviation over
resamplings (with replacement) of the generated set's images, the reference held fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from freqdiff.metrics.fid import FeatureStats, fid_from_stats
from freqdiff.metrics.spectra import raps
from freqdiff.metrics.swd import descriptors, swd_from_descriptors

_LOG_FLOOR = 1e-30  # as spectra.spectral_distance


def quantize(x: Tensor) -> Tensor:
    """[-1, 1] float images [B, C, H, W] -> uint8 [B, C, H, W] (``round((x + 1) * 127.5)``); uint8 passes."""
    if x.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def spectral_distance_from_raps(pa: Tensor, pb: Tensor) -> float:
    """``mean_{k=1..K} |log10 P_a(k) - log10 P_b(k)|`` of two mean RAPS [K + 1], as spectral_distance."""
    la = pa[1:].clamp_min(_LOG_FLOOR).log10()
    lb = pb[1:].clamp_min(_LOG_FLOOR).log10()
    return float((la - lb).abs().mean())


class SetStats:
    """Streaming statistics of one image set (see the module docstring)."""

    def __init__(
        self,
        extractor: nn.Module | None = None,  # features for FID (uint8 [B,3,H,W] -> [B,D], attr .dim)
        spectra: bool = True,  # accumulate the RAPS sum (eval/spectral)
        swd_n: int = 0,  # keep images of index < swd_n for SWD (0: no SWD)
        keep_features: bool = False,  # keep every feature vector (KID, precision/recall)
        keep_raps: bool = False,  # keep every image's RAPS (bootstrap_spread of the spectral distance)
    ):
        self.extractor = extractor
        self.fid = FeatureStats(extractor.dim) if extractor is not None else None
        self.spectra, self.swd_n, self.keep_features = spectra, int(swd_n), keep_features
        self.keep_raps = bool(keep_raps and spectra)
        self.n = 0
        self.raps_sum: Tensor | None = None  # float64 [K + 1]: sum over images of channel-mean power
        self._raps: list[tuple[Tensor, Tensor]] = []  # (index [b], float64 [b, K + 1]) with keep_raps
        self._swd: list[tuple[Tensor, Tensor]] = []  # (index [b], uint8 [b, C, H, W])
        self._feat: list[tuple[Tensor, Tensor]] = []  # (index [b], float32 [b, D])
        self._desc: dict | None = None  # memoised SWD descriptors (reference sets are reused)

    @torch.no_grad()
    def update(self, images: Tensor, index: Tensor | Sequence[int]) -> None:
        """Add a batch: images [B, C, H, W] (float in [-1, 1] or uint8) with their global indices [B]."""
        u8 = quantize(images)
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
        if index.numel() != u8.shape[0]:
            raise ValueError(f"{u8.shape[0]} images but {index.numel()} indices")
        if u8.shape[0] == 0:
            return
        self.n += u8.shape[0]
        self._desc = None
        if self.extractor is not None:
            f = self.extractor(u8)  # [B, D]
            self.fid.update(f)
            if self.keep_features:
                self._feat.append((index, f.float().cpu()))
        if self.spectra:
            x = u8.float() / 127.5 - 1
            if self.keep_raps:  # per image [B, K + 1] (channel mean), summed: binning is linear
                rows = raps(x, reduce=False)[1].to(torch.float64).mean(1).cpu()
                self._raps.append((index, rows))
                total = rows.sum(0)
            else:  # [K + 1], mean over batch and channels
                total = raps(x, reduce=True)[1].cpu() * u8.shape[0]
            self.raps_sum = total if self.raps_sum is None else self.raps_sum + total
        self.keep_images(u8, index)

    def keep_images(self, images: Tensor, index: Tensor | Sequence[int]) -> None:
        """Keep the images of index < swd_n for SWD only (the other statistics are left alone)."""
        u8 = quantize(images)
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
        keep = index < self.swd_n
        if keep.any():
            self._swd.append((index[keep], u8[keep.to(u8.device)].cpu()))
            self._desc = None

    # ---------------------------------------------------------------- views
    def mean_raps(self) -> Tensor | None:
        return None if self.raps_sum is None else self.raps_sum / self.n

    def raps_rows(self) -> Tensor | None:
        """Every image's RAPS in index order, float64 [n, K + 1] (needs keep_raps)."""
        if not self._raps:
            return None
        idx = torch.cat([i for i, _ in self._raps])
        return torch.cat([r for _, r in self._raps])[idx.argsort()]

    def swd_images(self) -> Tensor | None:
        """The kept images in index order, uint8 [m, C, H, W] (None if none)."""
        if not self._swd:
            return None
        idx = torch.cat([i for i, _ in self._swd])
        return torch.cat([x for _, x in self._swd])[idx.argsort()]

    def features(self) -> Tensor | None:
        """Every feature vector in index order, float32 [n, D] (needs keep_features)."""
        if not self._feat:
            return None
        idx = torch.cat([i for i, _ in self._feat])
        return torch.cat([f for _, f in self._feat])[idx.argsort()]

    def indices(self) -> Tensor:
        """Global indices of the kept SWD images (for checks)."""
        return (
            torch.cat([i for i, _ in self._swd]).sort().values
            if self._swd
            else torch.zeros(0, dtype=torch.long)
        )

    def swd_descriptors(self, **kw: Any) -> dict[int, Tensor] | None:
        imgs = self.swd_images()
        if imgs is None or imgs.shape[0] < 2:
            return None
        key = tuple(sorted(kw.items()))
        if self._desc is None or self._desc[0] != key:
            self._desc = (key, descriptors(imgs, **kw))
        return self._desc[1]

    # ---------------------------------------------------------------- merging and persistence
    def merge(self, other: SetStats) -> SetStats:
        """Add the statistics of a disjoint set (another rank, worker or chunk)."""
        self.n += other.n
        if self.fid is not None and other.fid is not None:
            self.fid.merge(other.fid)
        if other.raps_sum is not None:
            self.raps_sum = (
                other.raps_sum.clone() if self.raps_sum is None else self.raps_sum + other.raps_sum
            )
        self._swd += other._swd
        self._feat += other._feat
        self._raps += other._raps
        self._desc = None
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "fid": None if self.fid is None else self.fid.state_dict(),
            "raps_sum": self.raps_sum,
            "swd": [(i, x) for i, x in self._swd],
            "feat": [(i, f) for i, f in self._feat],
            "raps": [(i, r) for i, r in self._raps],
        }

    def load_state_dict(self, d: dict[str, Any]) -> SetStats:
        self.n = int(d["n"])
        if d.get("fid") is not None:
            self.fid = FeatureStats.from_state_dict(d["fid"])
        self.raps_sum = d.get("raps_sum")
        self._swd = list(d.get("swd") or [])
        self._feat = list(d.get("feat") or [])
        self._raps = list(d.get("raps") or [])
        self._desc = None
        return self


# -------------------------------------------------------------------- filling a set
def add_generated(
    stats: SetStats,
    sample: Callable[[list[int]], Tensor],  # seeds -> images [B, C, H, W] in [-1, 1]
    seeds: Sequence[int],  # the global list of per-sample seeds
    rank: int = 0,  # this process's share: positions rank::world_size
    world_size: int = 1,
    batch_size: int = 64,  # seeds per sample() call
    progress: Callable[[int], None] | None = None,  # called with the images done after each batch
) -> list[int]:
    """Sample this rank's share of ``seeds`` into ``stats`` (index: position in ``seeds``); returns those."""
    mine = list(range(rank, len(seeds), world_size))
    for a in range(0, len(mine), batch_size):
        pos = mine[a : a + batch_size]
        x = sample([int(seeds[p]) for p in pos])
        stats.update(x, pos)
        if progress is not None:
            progress(len(pos))
    return mine


def add_batches(stats: SetStats, batches: Iterable[tuple[Tensor, Tensor]], limit: int | None = None) -> None:
    """Add ``(images, index)`` batches, keeping indices ``< limit`` (the first ``limit`` of the set)."""
    for x, index in batches:
        index = torch.as_tensor(index).reshape(-1)
        if limit is not None:
            keep = index < limit
            x, index = x[keep.to(x.device)], index[keep]
        stats.update(x, index)


# -------------------------------------------------------------------- distributed reduction
def all_reduce_stats(stats: SetStats) -> SetStats:
    """Sum the statistics of every rank into every rank (no-op without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )

    def _sum(t: Tensor) -> Tensor:
        t = t.to(device)
        dist.all_reduce(t)
        return t.cpu()

    n = int(_sum(torch.tensor([stats.n], dtype=torch.int64)).item())
    if stats.fid is not None:
        stats.fid.n = int(_sum(torch.tensor([stats.fid.n], dtype=torch.int64)).item())
        stats.fid.sum = _sum(stats.fid.sum)
        stats.fid.outer = _sum(stats.fid.outer)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, stats.raps_sum)  # [K + 1] per rank, None where no images
    parts = [p for p in parts if p is not None]
    stats.raps_sum = torch.stack(parts).sum(0) if parts else None
    stats.n = n
    for attr in ("_swd", "_feat", "_raps"):
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, getattr(stats, attr))
        setattr(stats, attr, [item for part in gathered for item in part])
    stats._desc = None
    return stats


# -------------------------------------------------------------------- metrics between two sets
def compare(
    gen: SetStats,  # generated set
    ref: SetStats,  # reference (real) set
    swd: dict[str, Any] | None = None,  # SWD options (swd.descriptors / swd_from_descriptors keywords)
    kid: dict[str, Any] | None = None,  # torch-fidelity KID options (kid_subset_size, kid_subsets, ...)
    prc: dict[str, Any] | None = None,  # torch-fidelity precision/recall options (prc_neighborhood, ...)
) -> dict[str, float]:
    """Every metric both sets have statistics for: ``fid``, ``spectral``, ``swd/<res>``, ``swd/avg``,
    ``kid``, ``kid_std``, ``precision``, ``recall``, ``f_score``."""
    out: dict[str, float] = {}
    if gen.fid is not None and ref.fid is not None:
        out["fid"] = fid_from_stats(gen.fid, ref.fid)
    if gen.raps_sum is not None and ref.raps_sum is not None:
        out["spectral"] = spectral_distance_from_raps(gen.mean_raps(), ref.mean_raps())
    if swd is not None:
        dkw = {k: v for k, v in swd.items() if k in ("min_res", "patch", "patches_per_image", "seed")}
        skw = {k: v for k, v in swd.items() if k in ("dir_repeats", "dirs_per_repeat", "seed")}
        da, db = gen.swd_descriptors(**dkw), ref.swd_descriptors(**dkw)
        if da is not None and db is not None:
            per_level = swd_from_descriptors(da, db, **skw)
            out.update({f"swd/{r}": v for r, v in per_level.items()})
            out["swd/avg"] = sum(per_level.values()) / len(per_level)
    if kid is not None or prc is not None:
        fg, fr = gen.features(), ref.features()
        if fg is None or fr is None:
            raise ValueError("KID / precision-recall need keep_features=True on both sets")
        if kid is not None:
            from torch_fidelity.metric_kid import kid_features_to_metric

            size = min(int(kid.get("kid_subset_size", 1000)), fg.shape[0], fr.shape[0])
            r = kid_features_to_metric(fg, fr, **{"verbose": False, **kid, "kid_subset_size": size})
            out["kid"], out["kid_std"] = (
                r["kernel_inception_distance_mean"],
                r["kernel_inception_distance_std"],
            )
        if prc is not None:
            from torch_fidelity.metric_prc import prc_features_to_metric

            r = prc_features_to_metric(fg, fr, **{"verbose": False, "save_cpu_ram": False, **prc})
            out.update({k: float(r[k]) for k in ("precision", "recall", "f_score")})
    return out


# -------------------------------------------------------------------- spread
def bootstrap_spread(
    gen: SetStats,  # the set resampled (its kept RAPS rows and SWD images)
    ref: SetStats,  # held fixed
    swd: dict[str, Any] | None = None,  # SWD options as in compare (None: no SWD spread)
    reps: int = 10,  # resamplings
    seed: int = 0,
) -> dict[str, float]:
    """Standard deviation of each weight-free metric over ``reps`` resamplings of ``gen``'s images.

    Spectral distance: the bootstrap (``gen``'s images drawn with replacement, its RAPS rows from
    ``keep_raps``) against ``ref``'s mean spectrum. SWD per level: random halves of ``gen``'s SWD
    images (the delete-half jackknife, whose variance estimates that of the full set), each half
    normalised on its own as ``descriptors`` normalises a set, projected on one fixed set of 128
    directions and compared with ``ref``'s quantiles. (The bootstrap overstates SWD's spread by ~2×:
    duplicated images give duplicated descriptors, and without renormalisation a resample's mean and
    std differences count too; measured against 8-10 independent sets of dead leaves, the half
    samples come within 1.0-1.6×, tests/test_reference.py.) The spread is the sampling noise of the
    number at this n, what a reader needs to judge a difference; not a confidence interval.
    """
    out: dict[str, float] = {}
    if reps < 2:
        return out
    g = torch.Generator().manual_seed(seed * 1000 + 7)
    rows, pr = gen.raps_rows(), ref.mean_raps()
    if rows is not None and pr is not None:
        n = rows.shape[0]
        vals = [
            spectral_distance_from_raps(rows[torch.randint(n, (n,), generator=g)].mean(0), pr)
            for _ in range(reps)
        ]
        out["spectral"] = float(torch.tensor(vals).std())
    if swd is not None:
        dkw = {k: v for k, v in swd.items() if k in ("min_res", "patch", "patches_per_image", "seed")}
        da, db = gen.swd_descriptors(**dkw), ref.swd_descriptors(**dkw)
        if da is not None and db is not None and gen.swd_images().shape[0] >= 4:
            per, channels = int(dkw.get("patches_per_image", 128)), gen.swd_images().shape[1]
            levels = {r: _swd_half_samples(da[r], db[r], per, channels, reps, g) for r in da}
            out.update({f"swd/{r}": float(v.std()) for r, v in levels.items()})
            out["swd/avg"] = float(torch.stack(list(levels.values())).mean(0).std())
    return out


def _swd_half_samples(
    a: Tensor, b: Tensor, per_image: int, channels: int, reps: int, g: torch.Generator
) -> Tensor:
    """SWD ×10³ of ``reps`` random halves (whole images, renormalised) of descriptors ``a`` vs ``b``.

    ``a`` is normalised per channel over the full set; a half's own normalisation is an affine map
    per channel of those values, so its projections are combined from per-channel projections
    computed once (float64 moments).
    """
    m = min(a.shape[0], b.shape[0])
    k = m // per_image  # images; descriptors come image by image, per_image each
    h = k // 2
    a = a[:m]
    p2 = a.shape[1] // channels
    dirs = torch.randn(a.shape[1], 128, generator=g).to(a)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pb = (b[:m] @ dirs).t().contiguous().sort(dim=1).values  # [R, m]
    ac = a.view(m, channels, p2)
    dc = dirs.view(channels, p2, -1)  # [C, p², R]
    pc = torch.einsum("mcj,cjr->crm", ac, dc)  # [C, R, m] per-channel projections
    s1 = ac.double().sum(2).view(k, per_image, channels).sum(1)  # [k, C] per-image sums
    s2 = ac.double().square().sum(2).view(k, per_image, channels).sum(1)
    count = h * per_image * p2  # values per channel in a half
    q = ((torch.arange(h * per_image) + 0.5) * (m / (h * per_image))).long()  # ref quantiles
    offs = torch.arange(per_image)
    out = []
    for _ in range(reps):
        imgs = torch.randperm(k, generator=g)[:h]
        mu = s1[imgs].sum(0) / count
        sd = (s2[imgs].sum(0) / count - mu.square()).clamp_min(1e-24).sqrt()  # [C]
        pick = (imgs[:, None] * per_image + offs).reshape(-1)
        shift = ((mu / sd).to(a) @ dc.sum(1))[:, None]  # [R, 1]
        proj = (pc[:, :, pick] / sd.to(a)[:, None, None]).sum(0) - shift  # [R, h per_image]
        out.append(1e3 * (proj.sort(dim=1).values - pb[:, q]).abs().mean())
    return torch.stack(out)
