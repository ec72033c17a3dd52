"""Shard streams: tar members -> checked samples -> ``[-1, 1]`` batches, split over ranks and workers.

Used by ``ShardDataModule`` (docs/architecture.md, "Data"). Every sample has a global index (its position in
the manifest's shard order); a *consumer* is one DataLoader worker of one rank, ``j = rank * W +
worker`` of ``C = world_size * W``. Work is handed out as *units*, ranges of positions inside one
shard, read with random access (``tarfile`` mode ``r:`` seeks over members it does not need).

- Training (:class:`TrainStream`, infinite): every shard is cut into ``ceil(C / n_shards)`` units so
  there are at least ``C``; each epoch one permutation seeded by ``(seed, epoch)`` (the same on every
  rank, so no communication) deals them out, consumer ``j`` taking ``units[j::C]``: node and worker
  splitting are explicit and within an epoch consumers read disjoint data. A consumer then draws its
  own units again and again in a fresh random order (resampling; ``with_epoch`` on the loader ends the
  epoch after a fixed number of batches on every rank), through a shuffle buffer, with flips. All its
  randomness comes from ``SeedSequence([seed, rank, worker, epoch])``.
- Evaluation (:class:`EvalStream`, one exact pass): consumer ``j`` reads the contiguous global range
  ``[j N // C, (j + 1) N // C)`` in order, so every sample is seen exactly once over all ranks and
  workers, without duplicates. Ranks then get unequal batch counts; ``pad=True`` instead gives every
  consumer the same number of full batches (computable from the manifest alone) with ``mask`` marking
  the real samples, for loops in which every rank must join the same collectives.

Batches: ``{"x0": [B, C, r, r], "x0_<r2>": ..., "label": [B]}`` (plus ``index`` / ``mask`` in evaluation),
images as float32 ``x / 127.5 - 1``, or as uint8 for training under a Trainer (the datamodule turns them
into floats on the device: 4x fewer bytes between processes and over PCIe). Workers write batches
into shared memory directly, so handing them to the main process copies nothing.

Bad data: corrupt samples are skipped and counted, and too many stop the run (``health.py``).
"""

from __future__ import annotations

import itertools
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.encodings import decode_png, decode_raw, member
from datamodules.health import BadDataError, CorruptDataWarning, Health  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Shard:
    url: str  # local path of the tar file
    count: int  # samples the manifest says it holds
    start: int  # global index of its first sample


@dataclass(frozen=True)
class Unit:
    shard: Shard
    lo: int  # first position inside the shard
    hi: int  # one past the last position


# -------------------------------------------------------------------- reading
def read_unit(
    unit: Unit,
    wanted: tuple[str, ...],
    health: Health,
    select: np.ndarray | None = None,  # sorted global indices: read only these (None: all)
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Samples at positions ``lo .. hi - 1`` of a shard: ``(global index, {suffix: bytes})``.

    Members ``<key>.<suffix>`` are grouped by key; only ``wanted`` suffixes are read, and with
    ``select`` only the selected samples (the others are skipped over, never read). Samples the
    shard should hold but does not deliver (unopenable, truncated) are reported to ``health`` as
    missing, all at once when the shard ends; the consumer counts the delivered ones as it decodes them.
    """
    shard, lo, hi = unit.shard, unit.lo, unit.hi
    keep = None
    if select is not None:
        keep = set(_selected(select, shard.start + lo, shard.start + hi).tolist())
        if not keep:
            return
    stop = hi if keep is None else max(keep) - shard.start + 1  # position after the last one read
    end = shard.start + shard.count  # one past the shard's last global index
    expected = min(hi, shard.count) - lo if keep is None else sum(i < end for i in keep)
    got, pos, key, cur, error = 0, -1, None, None, None
    try:
        with tarfile.open(shard.url, "r:") as tf:
            for ti in tf:
                if not ti.isreg():
                    continue
                k, _, suffix = ti.name.rpartition("/")[2].partition(".")
                if k != key:
                    if cur is not None:
                        got += 1
                        yield shard.start + pos, cur
                    key, pos = k, pos + 1
                    if pos >= stop:
                        cur = None
                        break
                    take = pos >= lo and (keep is None or shard.start + pos in keep)
                    cur = {"__key__": k} if take else None
                if cur is not None and suffix in wanted:
                    cur[suffix] = tf.extractfile(ti).read()
                tf.members = []  # positions are counted here; do not keep every header
            if cur is not None:
                got += 1
                yield shard.start + pos, cur
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{type(e).__name__}: {e}"
    missing = expected - got
    if missing > 0:
        why = error or f"it ends after {max(pos + 1, 0)} of {shard.count} samples (truncated?)"
        health.add_missing(missing, f"shard {shard.url} positions {lo}..{hi - 1}: {why}")


def decode(
    sample: dict[str, Any], resolutions: list[int], channels: int, labels: bool, encoding: str = "png"
) -> tuple[list[np.ndarray], int]:
    """Check and decode one sample: (uint8 ``[r, r, C]`` per resolution, label or -1). Raises ValueError.

    ``encoding`` (the manifest's, ``encodings.py``): ``"png"`` members ``<r>.png``, ``"raw"`` ``<r>.u8``."""
    imgs = []
    for r in resolutions:
        name = member(r, encoding)
        data = sample.get(name)
        if data is None:
            raise ValueError(f"no {name} member")
        if encoding == "raw":
            img = decode_raw(data, r, channels, name)  # ValueError naming both byte sizes
        else:
            try:
                img = decode_png(data, channels)
            except Exception as e:  # not a PNG, truncated PNG, ...
                raise ValueError(f"{name} does not decode ({type(e).__name__}: {e})") from None
        if img.shape != (r, r, channels):
            raise ValueError(f"{name} is {img.shape}, expected {(r, r, channels)}")
        imgs.append(img)
    label = -1
    if labels:
        try:
            label = int(sample["cls"])
        except (KeyError, ValueError):
            raise ValueError("missing or malformed cls member") from None
    return imgs, label


def to_uint8(x: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[B, H, W, C]`` (or a list of ``[H, W, C]``, flipped views too) -> uint8 ``[B, C, H, W]``."""
    b, (h, w, c) = len(x), x[0].shape
    out = _empty(torch.uint8, b, c, h, w)
    o = out.numpy()
    for i in range(b):
        o[i] = x[i].transpose(2, 0, 1)  # [C, H, W]
    return out


def to_float(x: np.ndarray | list[np.ndarray] | torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 ``[B, C, H, W]`` as ``x / 127.5 - 1`` (0 -> -1, 255 -> 1).

    ``x``: a uint8 tensor ``[B, C, H, W]`` (any device), or numpy ``[B, H, W, C]`` / a list of ``[H, W, C]``.
    """
    if not isinstance(x, torch.Tensor):
        x = to_uint8(x)
    out = _empty(torch.float32, *x.shape) if x.device.type == "cpu" else torch.empty(x.shape, device=x.device)
    return out.copy_(x).div_(127.5).sub_(1.0)


def batch_to_float(batch: dict[str, Any]) -> dict[str, Any]:
    """Convert a batch's uint8 images (``x0``, ``x0_<r>``) to float in [-1, 1], in place; returns it."""
    for k, v in batch.items():
        if k.startswith("x0") and isinstance(v, torch.Tensor) and v.dtype == torch.uint8:
            batch[k] = to_float(v)
    return batch


def _empty(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """An uninitialised CPU tensor; inside a DataLoader worker allocated in shared memory directly, as
    torch's ``default_collate`` does, so handing it to the main process copies nothing (pickling a
    normal tensor would move it there: a 50 MB copy for a float batch of 64 images at 256²)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(*shape)


def _batch(
    rows: list[tuple[list[np.ndarray], int]], resolutions: list[int], labels: bool, uint8: bool = False
) -> dict[str, torch.Tensor]:
    """Decoded samples -> ``{"x0": [B, C, r0, r0], "x0_<r>": ..., "label": [B]}`` (r0 = resolutions[0]).

    Images are float in [-1, 1], or with ``uint8`` left as uint8 (4x fewer bytes) for the datamodule's
    ``on_after_batch_transfer`` to convert on the training device (:func:`batch_to_float`).
    """
    batch = {}
    for i, r in enumerate(resolutions):
        x = to_uint8([imgs[i] for imgs, _ in rows])
        batch["x0" if i == 0 else f"x0_{r}"] = x if uint8 else to_float(x)
    if labels:
        batch["label"] = torch.tensor([lab for _, lab in rows], dtype=torch.int64)
    return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _wanted(resolutions: list[int], labels: bool, encoding: str = "png") -> tuple[str, ...]:
    return tuple(member(r, encoding) for r in resolutions) + (("cls",) if labels else ())


def _selected(select: np.ndarray, a: int, b: int) -> np.ndarray:
    """The entries of a sorted index array in ``[a, b)``."""
    return select[np.searchsorted(select, a) : np.searchsorted(select, b)]


# -------------------------------------------------------------------- splitting
def train_units(shards: list[Shard], consumers: int) -> list[Unit]:
    """Every shard cut into ``ceil(consumers / n_shards)`` near-equal ranges (>= ``consumers`` units)."""
    k = max(1, math.ceil(consumers / max(1, len(shards))))
    units = []
    for s in shards:
        cuts = [s.count * i // k for i in range(k + 1)]
        units += [Unit(s, a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    return units


def eval_units(shards: list[Shard], total: int, consumers: int, j: int) -> list[Unit]:
    """Consumer ``j``'s contiguous global range ``[j N // C, (j + 1) N // C)`` as per-shard units."""
    a, b = j * total // consumers, (j + 1) * total // consumers
    return [
        Unit(s, max(a, s.start) - s.start, min(b, s.start + s.count) - s.start)
        for s in shards
        if s.start < b and s.start + s.count > a
    ]


# -------------------------------------------------------------------- streams
class TrainStream(IterableDataset):
    """Infinite seeded training batches for one rank; each DataLoader worker builds its own stream."""

    def __init__(
        self,
        shards: list[Shard],  # the readable shards of the train split
        resolutions: list[int],  # decoded per sample; the first is the primary ("x0")
        channels: int,  # 1 or 3
        labels: bool,  # whether samples carry "cls"
        batch_size: int,  # images per batch
        flip: bool,  # random horizontal flips (the same for every resolution of a sample)
        shuffle_buffer: int,  # samples in each worker's shuffle buffer (0: none)
        seed: int,  # base seed
        rank: int,  # global rank
        world_size: int,  # number of ranks
        health: Health,  # bad-sample accounting
        uint8: bool = False,  # yield uint8 images (converted on the device by the datamodule)
        encoding: str = "png",  # the manifest's image encoding (encodings.py)
    ):
        super().__init__()
        self.shards, self.resolutions, self.channels, self.labels = shards, resolutions, channels, labels
        self.batch_size, self.flip, self.shuffle_buffer = batch_size, flip, shuffle_buffer
        self.seed, self.rank, self.world_size, self.health = seed, rank, world_size, health
        self.uint8, self.encoding = uint8, encoding
        self.epoch = 0  # set by the loader in the main process before the workers start

    def units(self, worker: int, num_workers: int) -> list[Unit]:
        """This consumer's share of the epoch: ``units[j::C]`` of one permutation shared by all."""
        consumers = self.world_size * num_workers
        units = train_units(self.shards, consumers)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
        j = self.rank * num_workers + worker
        mine = [units[i] for i in order[j::consumers]]
        return mine or [units[i] for i in order[j % len(units) :: len(units)]]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, num_workers = _worker()
        rng = np.random.default_rng([self.seed, self.rank, worker, self.epoch])
        units = self.units(worker, num_workers)
        bufsize = min(self.shuffle_buffer, sum(u.hi - u.lo for u in units))
        samples = _shuffle(self._resampled(units, rng), bufsize, rng)
        while True:
            rows = []
            while len(rows) < self.batch_size:
                index, sample = next(samples)
                try:
                    rows.append(decode(sample, self.resolutions, self.channels, self.labels, self.encoding))
                except ValueError as e:
                    self.health.add_bad(1, f"sample {index} (key {sample['__key__']}): {e}")
                    continue
                self.health.add_good(1)  # per sample: a batch's bad ones are not counted before it
            if self.flip:
                for imgs, _ in rows:
                    if rng.random() < 0.5:
                        imgs[:] = [img[:, ::-1] for img in imgs]
            yield _batch(rows, self.resolutions, self.labels, self.uint8)

    def _resampled(self, units: list[Unit], rng: np.random.Generator) -> Iterator[tuple[int, dict]]:
        wanted = _wanted(self.resolutions, self.labels, self.encoding)
        while True:
            n = 0
            for i in rng.permutation(len(units)):
                for item in read_unit(units[i], wanted, self.health):
                    n += 1
                    yield item
            if n == 0:
                names = sorted({u.shard.url for u in units})
                raise BadDataError(f"data: no readable training sample in {names}")


class EvalStream(IterableDataset):
    """One exact pass in index order, split over ranks and workers (see the module docstring)."""

    def __init__(
        self,
        shards: list[Shard],  # all shards of the split (missing ones are reported as bad when reached)
        total: int,  # samples in the split
        resolutions: list[int],  # decoded per sample; the first is the primary ("x0")
        channels: int,  # 1 or 3
        labels: bool,  # whether samples carry "cls"
        batch_size: int,  # images per batch (the last one of a worker may be smaller unless pad)
        rank: int,  # global rank
        world_size: int,  # number of ranks
        pad: bool,  # equal numbers of full batches everywhere, with "mask"
        health: Health,  # bad-sample accounting
        select: np.ndarray | None = None,  # global indices to read (a subset; None: all)
        encoding: str = "png",  # the manifest's image encoding (encodings.py)
    ):
        super().__init__()
        if select is not None:
            if pad:
                raise ValueError("EvalStream: select and pad cannot be combined")
            select = np.unique(np.asarray(select, dtype=np.int64))
            if select.size and (select[0] < 0 or select[-1] >= total):
                raise ValueError(f"EvalStream: selected indices must lie in [0, {total})")
        self.shards, self.total, self.resolutions = shards, total, resolutions
        self.channels, self.labels, self.batch_size = channels, labels, batch_size
        self.rank, self.world_size, self.pad, self.health = rank, world_size, pad, health
        self.select, self.encoding = select, encoding

    def batches_per_worker(self, num_workers: int) -> int:
        """With ``pad``: the batches every worker of every rank yields (the largest share, rounded up)."""
        return math.ceil(math.ceil(self.total / (self.world_size * num_workers)) / self.batch_size)

    def consumer_sizes(self, consumers: int) -> list[int]:
        """Samples (selected ones with ``select``) in each consumer's global range."""
        cuts = [j * self.total // consumers for j in range(consumers + 1)]
        if self.select is None:
            return [b - a for a, b in zip(cuts, cuts[1:])]
        return [len(_selected(self.select, a, b)) for a, b in zip(cuts, cuts[1:])]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, num_workers = _worker()
        consumers, j = self.world_size * num_workers, self.rank * num_workers + worker
        wanted = _wanted(self.resolutions, self.labels, self.encoding)
        units = eval_units(self.shards, self.total, consumers, j)
        items = itertools.chain.from_iterable(read_unit(u, wanted, self.health, self.select) for u in units)
        rows, index, n_batches = [], [], 0
        for i, sample in items:
            try:
                rows.append(decode(sample, self.resolutions, self.channels, self.labels, self.encoding))
                index.append(i)
                self.health.add_good(1)
            except ValueError as e:
                self.health.add_bad(1, f"sample {i} (key {sample['__key__']}): {e}")
            if len(rows) == self.batch_size:
                yield self._emit(rows, index)
                rows, index, n_batches = [], [], n_batches + 1
        want = self.batches_per_worker(num_workers) if self.pad else n_batches + bool(rows)
        while n_batches < want:
            yield self._emit(rows, index)
            rows, index, n_batches = [], [], n_batches + 1

    def _emit(self, rows: list, index: list[int]) -> dict[str, torch.Tensor]:
        n_pad = self.batch_size - len(rows) if self.pad else 0
        if n_pad:
            blank = [np.zeros((r, r, self.channels), np.uint8) for r in self.resolutions]
            rows = rows + [(blank, 0)] * n_pad
        batch = _batch(rows, self.resolutions, self.labels)
        batch["index"] = torch.tensor(index + [-1] * n_pad, dtype=torch.int64)  # global sample index
        if self.pad:
            batch["mask"] = batch["index"] >= 0  # real samples
        return batch


def _shuffle(items: Iterator[Any], bufsize: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle buffer: fill to ``bufsize``, then emit a random element for each new one."""
    if bufsize < 2:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = int(rng.integers(bufsize))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)  # only reached for finite sources
    yield from buf
