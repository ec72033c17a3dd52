"""ShardDataModule: WebDataset tar shards -> ``[-1, 1]`` image batches (DESIGN.md §4 Data).

Where the data is (``path``, checked in this order):
- ``path/train/manifest.json`` exists: train from ``path/train``, evaluate on ``path/val`` (when it
  has a manifest). This is the layout :class:`~datamodules.synthetic.DeadLeaves` writes.
- ``path/manifest.json`` exists: train from ``path``; no val split unless ``val_path`` is given.
- ``val_path`` (a shard folder) overrides the val split in both cases.
With ``synthetic`` given, the shards are generated into ``path`` first when missing or written with
other parameters (``prepare_data``, rank 0 in Lightning; ``setup`` does it too when called alone).

Training stream, per rank and DataLoader worker (``IterableDataset``, one per worker):
shards drawn with replacement (resampled) -> tar samples -> shuffle buffer -> PNG decode at the
requested resolution -> batches -> random horizontal flips. Every random choice comes from
``SeedSequence([seed, epoch, rank, worker])``, so the same seed gives the same batches, ranks and
workers see different streams (resampling makes node/worker splitting of the shard list
unnecessary), and each epoch draws anew. The epoch is Lightning's ``trainer.current_epoch`` (so a
resumed run continues the epoch sequence), or the number of passes made outside a Trainer.
The loader is a ``wds.WebLoader`` (``batch_size=None``: batching happens in the workers) with
``with_epoch(batches_per_epoch)`` and a matching ``__len__``: an epoch is a fixed number of batches on
every rank, so ranks never disagree about when it ends.

Why not ``wds.WebDataset(urls, resampled=True, ...)``: in webdataset 1.0.2 its resampled shard list
mixes ``time_ns()``, the pid and ``os.urandom`` into its seed (and ignores ``shardshuffle``), so
its batches cannot be reproduced; its shuffle stage also restarts from one fixed seed every epoch.

Batches are dicts: ``{"x0": float32 [B, C, H, W] in [-1, 1]}``, plus ``"label": int64 [B]`` when the
manifest has labels. ``real_images(n, split)`` reads the first ``n`` images of a split in order
(no shuffle, no flip), for sample-vs-real callbacks and metrics.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

import freqdiff  # noqa: F401  (the torchvision hook; datamodules/__init__.py imports it first too)
from datamodules.manifest import MANIFEST, check_shards, decode_png, read_manifest, shard_urls
from datamodules.synthetic import DeadLeaves


class ShardDataModule(L.LightningDataModule):
    """Training batches from a WebDataset shard set (see the module docstring for the layout)."""

    def __init__(
        self,
        path: str,  # shard folder (with manifest.json, or with train/ and val/ shard folders)
        val_path: str | None = None,  # shard folder of the val split (overrides path/val)
        resolution: int | None = None,  # image side; None: the manifest's largest resolution
        batch_size: int = 64,  # images per batch, per rank
        num_workers: int = 2,  # DataLoader worker processes per rank (0: decode in the main process)
        flip: bool = True,  # random horizontal flips in training
        seed: int = 0,  # seed of shard sampling, shuffle buffer and flips
        batches_per_epoch: int | None = None,  # None: count // (batch_size * world_size)
        shuffle_buffer: int = 1000,  # samples in each worker's shuffle buffer (0: no shuffling)
        synthetic: DeadLeaves | None = None,  # generate the shards into `path` when missing
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or None, got {batches_per_epoch}")
        self.path = str(path)
        self.val_path = None if val_path is None else str(val_path)
        self.requested_resolution = resolution
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer = int(shuffle_buffer)
        self.synthetic = synthetic
        self._folders: dict[str, Path] | None = None  # split -> shard folder
        self._manifests: dict[str, dict[str, Any]] = {}
        self._resolution: int | None = None
        self._passes = 0  # loader passes made outside a Trainer (the epoch then)

    # ---------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        if self.synthetic is not None:
            self.synthetic.write(self.path)  # no-op when up to date

    def setup(self, stage: str | None = None) -> None:
        if self._folders is not None:
            return
        if self.synthetic is not None and self._find() is None:  # called without prepare_data
            self.synthetic.write(self.path)
        folders = self._find()
        if folders is None:
            raise FileNotFoundError(
                f"no shard set at {self.path}: expected {Path(self.path) / MANIFEST} or "
                f"{Path(self.path) / 'train' / MANIFEST} (pass synthetic=DeadLeaves(...) to generate one)"
            )
        manifests = {split: read_manifest(folder) for split, folder in folders.items()}
        for split, folder in folders.items():
            check_shards(folder, manifests[split])
        train = manifests["train"]
        if train["count"] < 1:
            raise ValueError(f"the train shard set {folders['train']} is empty")
        res = self.requested_resolution
        if res is None:
            res = max(train["resolutions"])
        for split, m in manifests.items():
            if res not in m["resolutions"]:
                raise ValueError(
                    f"resolution {res} not in the {split} shard set {folders[split]} "
                    f"(it has resolutions {m['resolutions']})"
                )
            if m["channels"] != train["channels"] or m["labels"] != train["labels"]:
                raise ValueError(
                    f"{split} shard set {folders[split]} differs from train in channels or labels"
                )
        self._folders, self._manifests, self._resolution = folders, manifests, int(res)

    def train_dataloader(self) -> wds.WebLoader:
        self.setup()
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        n = self.batches_per_epoch or max(1, self.manifest["count"] // (self.batch_size * world_size))
        stream = TrainStream(
            urls=shard_urls(self._folders["train"], self.manifest),
            resolution=self.resolution,
            channels=self.channels,
            labels=self.labels is not None,
            batch_size=self.batch_size,
            flip=self.flip,
            shuffle_buffer=min(self.shuffle_buffer, self.manifest["count"]),
            seed=self.seed,
            rank=rank,
        )
        return _EpochLoader(stream, n, self._epoch, num_workers=self.num_workers)

    # ---------------------------------------------------------------- data access
    def real_images(self, n: int, split: str = "val") -> torch.Tensor:
        """The first ``n`` images of a split in shard order (unshuffled, unflipped): [n, C, H, W] in [-1, 1].

        Without a val split, ``split="val"`` falls back to train with a warning.
        """
        self.setup()
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if split not in self._folders:
            warnings.warn(
                f"no val shard set for {self.path} (pass val_path): using train images", stacklevel=2
            )
            split = "train"
        m = self._manifests[split]
        if not 0 <= n <= m["count"]:
            raise ValueError(f"asked for {n} {split} images but {self._folders[split]} holds {m['count']}")
        urls = shard_urls(self._folders[split], m)
        imgs = [img for img, _ in itertools.islice(read_samples(urls, self.resolution, self.channels), n)]
        if not imgs:
            return torch.empty(0, self.channels, self.resolution, self.resolution)
        return to_float(np.stack(imgs))

    @property
    def resolution(self) -> int:
        self.setup()
        return self._resolution

    @property
    def channels(self) -> int:
        return self.manifest["channels"]

    @property
    def labels(self) -> list[str] | None:
        return self.manifest["labels"]

    @property
    def manifest(self) -> dict[str, Any]:
        """The train split's manifest."""
        self.setup()
        return self._manifests["train"]

    @property
    def val_manifest(self) -> dict[str, Any] | None:
        self.setup()
        return self._manifests.get("val")

    def _find(self) -> dict[str, Path] | None:
        root = Path(self.path)
        if (root / "train" / MANIFEST).is_file():
            folders = {"train": root / "train"}
            if (root / "val" / MANIFEST).is_file():
                folders["val"] = root / "val"
        elif (root / MANIFEST).is_file():
            folders = {"train": root}
        else:
            return None
        if self.val_path is not None:
            if not (Path(self.val_path) / MANIFEST).is_file():
                raise FileNotFoundError(f"no shard set at val_path {self.val_path} (no {MANIFEST})")
            folders["val"] = Path(self.val_path)
        return folders

    def _epoch(self) -> int:
        if self.trainer is not None:
            return int(self.trainer.current_epoch)
        self._passes += 1
        return self._passes - 1


# -------------------------------------------------------------------- streams
def to_float(x: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, C]`` -> float32 ``[B, C, H, W]`` as ``x / 127.5 - 1`` (0 -> -1, 255 -> 1)."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]
    return t.float().div_(127.5).sub_(1.0)


class _Select:
    """Tar members to read: the one resolution's PNG and the label (other resolutions are skipped)."""

    def __init__(self, resolution: int):
        self.exts = (f".{resolution}.png", ".cls")

    def __call__(self, fname: str) -> bool:
        return fname.endswith(self.exts)


def read_samples(
    urls: Iterator[str] | list[str], resolution: int, channels: int
) -> Iterator[tuple[np.ndarray, int | None]]:
    """Decode the samples of the given shards in order: ``(uint8 [H, W, C], label or None)``."""
    src = ({"url": u} for u in urls)
    for s in wds.tarfile_to_samples(select_files=_Select(resolution))(src):
        key = f"{resolution}.png"
        if key not in s:
            raise ValueError(f"sample {s.get('__key__')} in {s.get('__url__')} has no {key} image")
        img = decode_png(s[key], channels)
        if img.shape != (resolution, resolution, channels):
            raise ValueError(
                f"sample {s['__key__']} in {s['__url__']}: image {img.shape}, "
                f"expected {(resolution, resolution, channels)}"
            )
        yield img, (int(s["cls"]) if "cls" in s else None)


class TrainStream(IterableDataset):
    """Infinite seeded batches for one rank; each DataLoader worker makes its own stream."""

    def __init__(
        self,
        urls: list[str],  # shard paths
        resolution: int,  # image side to decode
        channels: int,  # 1 or 3
        labels: bool,  # whether samples carry "cls"
        batch_size: int,  # images per batch
        flip: bool,  # random horizontal flips
        shuffle_buffer: int,  # samples in the shuffle buffer (0: none)
        seed: int,  # base seed
        rank: int,  # global rank (streams differ per rank)
    ):
        super().__init__()
        self.urls, self.resolution, self.channels, self.labels = urls, resolution, channels, labels
        self.batch_size, self.flip, self.shuffle_buffer = batch_size, flip, shuffle_buffer
        self.seed, self.rank = seed, rank
        self.epoch = 0  # set by the loader in the main process before the workers start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        shards = (self.urls[i] for i in _forever(lambda: rng.integers(len(self.urls))))
        samples = _shuffle(read_samples(shards, self.resolution, self.channels), self.shuffle_buffer, rng)
        while True:
            chunk = list(itertools.islice(samples, self.batch_size))
            x0 = to_float(np.stack([img for img, _ in chunk]))  # [B, C, H, W]
            if self.flip:
                mask = torch.from_numpy(rng.random(len(chunk)) < 0.5)[:, None, None, None]
                x0 = torch.where(mask, x0.flip(-1), x0)
            batch = {"x0": x0}
            if self.labels:
                batch["label"] = torch.tensor([lab for _, lab in chunk], dtype=torch.int64)
            yield batch


def _forever(draw: Callable[[], int]) -> Iterator[int]:
    while True:
        yield int(draw())


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


class _EpochLoader(wds.WebLoader):
    """``WebLoader`` over a :class:`TrainStream`: ``n_batches`` per pass, a new epoch seed per pass."""

    def __init__(self, stream: TrainStream, n_batches: int, epoch: Callable[[], int], num_workers: int):
        super().__init__(
            stream,
            batch_size=None,  # the stream batches
            num_workers=num_workers,
            persistent_workers=False,  # fresh workers per pass see the new epoch
            pin_memory=torch.cuda.is_available(),
        )
        self.with_epoch(n_batches)  # counts batches on the loader (PLATFORM.md)
        self.stream, self.n_batches, self._epoch_fn = stream, n_batches, epoch

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        self.stream.epoch = self._epoch_fn()  # before the DataLoader forks (or pickles) its workers
        return super().__iter__()
