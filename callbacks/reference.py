"""Reference statistics of real images (cached, exact, DDP-aware) and an NFE counter.

Shared by the in-training ``callbacks.fid.Evaluate`` and the standalone ``experiments.evaluate``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from freqdiff.metrics.evaluator import SetStats, add_batches, all_reduce_stats
from freqdiff.metrics.fid import StatsCache, manifest_checksum

REF_FORMAT = "freqdiff-ref/1"  # bump when what a cached reference holds changes


def real_batches(dm: Any, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of one exact pass over a split: ``(images [B, C, H, W], global index [B])``."""
    for batch in dm.eval_dataloader(split=split, batch_size=batch_size):
        yield batch["x0"], batch["index"]


def split_manifest(dm: Any, split: str) -> dict[str, Any]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return (dm.val_manifest or dm.manifest) if split == "val" else dm.manifest


def reference_key(
    dm: Any, split: str, n: int, extractor: Any, spectra: bool, features: bool
) -> dict[str, Any]:
    """Cache key of reference statistics: what the numbers depend on, nothing else."""
    return {
        "format": REF_FORMAT,
        "manifest": manifest_checksum(split_manifest(dm, split)),
        "resolution": int(dm.resolution),
        "n": int(n),
        "extractor": None if extractor is None else extractor.name,
        "resize": None if extractor is None else extractor.resize,
        "spectra": bool(spectra),
        "features": bool(features),
    }


def reference_stats(
    dm: Any,  # a ShardDataModule (eval_dataloader, real_images, manifest, resolution)
    split: str,  # "train" or "val"
    n: int,  # the first n images of the split
    extractor: Any,  # feature extractor or None
    spectra: bool,  # RAPS sums
    swd_n: int,  # real images kept for SWD (read with real_images, never cached)
    keep_features: bool,  # KID / precision-recall
    cache: StatsCache | None,  # None: always recompute
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[SetStats | None, bool]:
    """Reference statistics (on rank 0; None elsewhere) and whether they came from the cache.

    On a miss every rank reads its share of one exact pass and the sums are all-reduced (collective:
    call it on every rank); rank 0 writes the cache. Rank 0 decides hit or miss for everyone.
    """
    key = reference_key(dm, split, n, extractor, spectra, keep_features)
    value = cache.load(key) if (cache is not None and rank == 0) else None
    hit = torch.tensor([int(value is not None)])
    if world_size > 1:
        hit = _broadcast_flag(hit)
    if not int(hit.item()):
        stats = SetStats(extractor, spectra=spectra, swd_n=0, keep_features=keep_features)
        add_batches(stats, real_batches(dm, split, batch_size), limit=n)
        stats = all_reduce_stats(stats)
        if stats.n != n:
            raise ValueError(f"reference pass over the {split} split read {stats.n} images, expected {n}")
        value = stats.state_dict()
        if cache is not None and rank == 0:
            cache.save(key, value)
    if rank != 0:
        return None, bool(hit.item())
    ref = SetStats(extractor, spectra=spectra, swd_n=swd_n, keep_features=keep_features).load_state_dict(
        value
    )
    if swd_n:
        x = dm.real_images(min(swd_n, n), split=split)  # the first ones, in order
        ref.keep_images(x, torch.arange(x.shape[0]))
    return ref, bool(hit.item())


def _broadcast_flag(flag: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    flag = flag.to(dev)
    dist.broadcast(flag, src=0)
    return flag.cpu()


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
