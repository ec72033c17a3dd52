"""The reference set of an evaluation: statistics of real images, what they were computed from, and
the real-vs-real noise floor of every weight-free metric (docs/evaluation.md). Shared by the
in-training ``callbacks.fid.Evaluate`` and the standalone ``experiments.evaluate``.

- **A random subset.** The reference is the first ``n`` entries of a seeded permutation of the
  split's indices (``subset_order``), not its first ``n`` files: a class-sorted folder is represented
  in proportion. One exact pass reads only the selected samples (``eval_dataloader(select=...)``).
- **What it is.** ``Reference.info`` names the split actually read (a request for ``val`` without a
  val split reads ``train`` and says so), its folder, its manifest checksum, the number of images
  and the subset seed; every record of an evaluation carries it.
- **The floor.** Two disjoint real subsets of the same split, positions ``[0, f)`` and ``[f, 2 f)`` of
  the same permutation with ``f = min(n, count // 2)``, compared with the same metric settings: the
  value a perfect model would get at this n (``Reference.floor``, with its bootstrap spread). A
  model's number means something only where it lies clearly above its floor.
- **Cached.** Statistics and floors are cached on disk under keys of everything they depend on
  (manifest checksum, resolution, n, subset seed, extractor, metric settings); the SWD images are
  read again (only those) instead of being cached. On a miss every rank reads its share of the pass
  and the sums are all-reduced (collective: call it on every rank); rank 0 decides hit or miss.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from freqdiff.metrics.evaluator import SetStats, all_reduce_stats, bootstrap_spread, compare
from freqdiff.metrics.fid import StatsCache, manifest_checksum

REF_FORMAT = "freqdiff-ref/2"  # bump when what a cached reference holds changes (2: random subsets)


def subset_order(count: int, seed: int) -> np.ndarray:
    """The seeded permutation of a split's ``count`` indices whose prefixes are the reference subsets."""
    return np.random.default_rng([int(seed), 0x5E7]).permutation(int(count))


def split_manifest(dm: Any, split: str) -> dict[str, Any]:
    """The manifest of the split a request reads (``val`` without a val split reads ``train``)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return (dm.val_manifest or dm.manifest) if split == "val" else dm.manifest


def reference_key(
    dm: Any, split: str, n: int, extractor: Any, spectra: bool, features: bool, seed: int = 0
) -> dict[str, Any]:
    """Cache key of reference statistics: what the numbers depend on, nothing else."""
    return {
        "format": REF_FORMAT,
        "manifest": manifest_checksum(split_manifest(dm, split)),
        "resolution": int(dm.resolution),
        "n": int(n),
        "subset_seed": int(seed),
        "extractor": None if extractor is None else extractor.name,
        "resize": None if extractor is None else extractor.resize,
        "spectra": bool(spectra),
        "features": bool(features),
    }


@dataclass
class Reference:
    stats: SetStats | None  # on rank 0 (None elsewhere)
    info: dict[str, Any]  # ref_path, ref_split, ref_manifest, ref_n, ref_seed, ref_cache
    floor: dict[str, Any] | None = None  # {"n", "metrics", "spread"} on rank 0 (None: not asked)
    hit: bool = False  # statistics came from the cache
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)


def load_reference(
    dm: Any,  # a ShardDataModule (split_info, eval_dataloader, images_at, resolution)
    split: str,  # "train" or "val"
    n: int,  # images in the reference (capped at the split size)
    extractor: Any,  # feature extractor or None
    spectra: bool,  # RAPS sums
    swd_n: int,  # reference images kept for SWD
    keep_features: bool,  # KID / precision-recall
    cache: StatsCache | None,  # None: always recompute
    seed: int = 0,  # subset seed
    floor: dict[str, Any] | None = None,  # SWD options of the floor (None: no floor; {}: spectral only)
    bootstrap: int = 0,  # resamplings for the floor's spread
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> Reference:
    """The reference of an evaluation (module docstring). Collective under DDP."""
    where = dm.split_info(split)  # warns when val falls back to train
    name, count = where["split"], int(where["manifest"]["count"])
    m, order = min(int(n), count), subset_order(count, seed)
    key = reference_key(dm, name, m, extractor, spectra, keep_features, seed)
    f = min(m, count // 2)
    swd_f = min(swd_n, f)
    fkey = None  # the floor is weight-free: its key leaves out the extractor
    if floor is not None and f >= 2:
        fkey = {k: key[k] for k in ("format", "manifest", "resolution", "n", "subset_seed")}
        fkey["floor"] = {"n": f, "swd": floor, "swd_n": swd_f, "bootstrap": int(bootstrap)}
    value = cache.load(key) if (cache is not None and rank == 0) else None
    fvalue = cache.load(fkey) if (cache is not None and rank == 0 and fkey is not None) else None
    flags = _broadcast(torch.tensor([int(value is not None), int(fvalue is not None)]), world_size)
    need_ref, need_floor = not flags[0], fkey is not None and not flags[1]

    targets: list[tuple[SetStats, int, int]] = []  # (statistics, first position, one past the last)
    if need_ref:
        targets.append((SetStats(extractor, spectra, swd_n, keep_features), 0, m))
    if need_floor:
        for lo in (0, f):
            targets.append((SetStats(None, True, swd_f, keep_raps=bootstrap > 1), lo, lo + f))
    if targets:
        _subset_pass(dm, name, order, targets, batch_size, progress)
        targets = [(all_reduce_stats(s), lo, hi) for s, lo, hi in targets]
    ref = Reference(None, {}, hit=not need_ref, order=order)
    if rank != 0:
        return ref
    if need_ref:
        built = targets[0][0]
        if built.n < m:
            warnings.warn(f"reference: {m - built.n} of {m} selected {name} images unreadable", stacklevel=2)
        value = {**built.state_dict(), "swd": []}  # SWD images are read again, not cached
        if cache is not None:
            cache.save(key, value)
    stats = SetStats(extractor, spectra=spectra, swd_n=swd_n, keep_features=keep_features)
    stats.load_state_dict(value)
    if swd_n:
        if need_ref:
            stats._swd = list(targets[0][0]._swd)
        else:
            x, index = dm.images_at(order[: min(swd_n, m)], split=name)
            stats.keep_images(x, _positions(order, index))
    if need_floor:
        a, b = targets[-2][0], targets[-1][0]
        fvalue = {
            "n": f,
            "metrics": compare(b, a, swd=floor or None),
            "spread": bootstrap_spread(b, a, swd=floor or None, reps=bootstrap),
        }
        if cache is not None:
            cache.save(fkey, fvalue)
    ref.stats, ref.floor = stats, fvalue
    ref.info = {
        "ref_path": str(where["path"]),
        "ref_split": name,
        "ref_manifest": manifest_checksum(where["manifest"])[:16],
        "ref_n": int(stats.n),
        "ref_seed": int(seed),
        "ref_cache": "hit" if not need_ref else "miss",
    }
    if name != split:
        ref.info["ref_requested"] = split
    return ref


def _positions(order: np.ndarray, index: torch.Tensor) -> torch.Tensor:
    """Positions in ``order`` of global indices (``order`` is a permutation)."""
    pos = np.empty_like(order)
    pos[order] = np.arange(order.size)
    return torch.from_numpy(pos[index.numpy()])


def _subset_pass(dm, split, order, targets, batch_size: int, progress: bool) -> None:
    """One pass over the selected samples; each target gets those at its positions (re-based to 0)."""
    hi = max(t[2] for t in targets)
    select = np.sort(order[:hi])
    pos = np.full(order.size, -1, dtype=np.int64)
    pos[order[:hi]] = np.arange(hi)
    loader = dm.eval_dataloader(split=split, batch_size=batch_size, select=select)
    bar = tqdm(total=len(loader), desc=f"reference ({split})", unit="batch", disable=not progress)
    for batch in loader:
        x, p = batch["x0"], torch.from_numpy(pos[batch["index"].numpy()])
        for stats, lo, top in targets:
            keep = (p >= lo) & (p < top)
            if keep.any():
                stats.update(x[keep.to(x.device)], p[keep] - lo)
        bar.update(1)
    bar.close()


def _broadcast(flags: torch.Tensor, world_size: int) -> list[bool]:
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dev = (
                torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend() == "nccl"
                else torch.device("cpu")
            )
            flags = flags.to(dev)
            dist.broadcast(flags, src=0)
    return [bool(v) for v in flags.cpu().tolist()]


def real_batches(dm: Any, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of one exact pass over a split: ``(images [B, C, H, W], global index [B])``."""
    for batch in dm.eval_dataloader(split=split, batch_size=batch_size):
        yield batch["x0"], batch["index"]


def describe_floor(metrics: dict[str, float], spread: dict[str, float], floor: dict | None) -> str:
    """``swd/16 21.3 ± 0.8 (floor 11.5 ± 0.5), ...``: each metric with its spread and floor."""
    parts = []
    for k, v in metrics.items():
        text = f"{k} {v:.4g}" + (f" ± {spread[k]:.2g}" if k in spread else "")
        if floor and k in floor["metrics"]:
            fs = floor.get("spread", {}).get(k)
            text += f" (floor {floor['metrics'][k]:.4g}" + (f" ± {fs:.2g})" if fs is not None else ")")
        parts.append(text)
    return ", ".join(parts)


class NFECounter:
    """Counts forward calls of a module (the denoiser) while active: NFE per sample batch."""

    def __init__(self, module: torch.nn.Module | None):
        self.module, self.calls, self._h = module, 0, None

    def __enter__(self) -> NFECounter:
        if self.module is not None:
            self._h = self.module.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc) -> None:
        if self._h is not None:
            self._h.remove()


def write_eval_arrays(gen: SetStats, ref: SetStats | None, path, k: int = 64):
    """``path`` (.npz): what the comparison report (``experiments.compare``) shows of an evaluation.

    ``samples`` and ``real``: the first ``k`` evaluated samples and reference images (uint8
    ``[k, C, H, W]``, the sets kept for SWD; absent without SWD); ``raps_samples`` and ``raps_real``:
    the mean radially averaged power spectrum of all n samples and of the reference (float64
    ``[K + 1]``, bin i = i cycles per image). Written atomically; returns the path.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for name, stats in (("samples", gen), ("real", ref)):
        if stats is None:
            continue
        imgs, power = stats.swd_images(), stats.mean_raps()
        if imgs is not None:
            arrays[name] = imgs[:k].cpu().numpy()
        if power is not None:
            arrays[f"raps_{name}"] = power.cpu().double().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path
