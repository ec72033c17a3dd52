"""ShardDataModule: WebDataset tar shards -> ``[-1, 1]`` image batches for every method (DESIGN.md §4).

Where the data is (``path``; see ``sources.py``): a folder written by ``make shards`` (its
``manifest.json``), a folder with ``train/`` and ``val/`` shard sets (the dead-leaves layout), a
manifest file, or a brace / glob pattern of tar files. ``val_path`` names the val split explicitly.
A wrong path fails in ``setup`` naming it. With ``synthetic`` given, the dead-leaves shards are
generated into ``path`` when it holds no shard set (or a dead-leaves set written with other
parameters); a real shard set found there is used as it is and the generator is ignored.

Resolutions: ``resolution`` is the primary one, ``batch["x0"]`` (None: the manifest's largest);
``resolutions`` adds ``batch["x0_<r>"]`` for every other listed resolution, decoded from the same
sample and flipped together with it. Labels come as ``batch["label"]`` (int64) when the manifest has
them.

Training (``train_dataloader``): see ``streams.py``: explicit rank and worker splitting, resampled
units of shards, shuffles and flips seeded from ``(seed, rank, worker, epoch)``, a ``WebLoader`` with
``with_epoch(batches_per_epoch)`` and a matching ``__len__``, so every rank runs the same number of
batches. The epoch is Lightning's ``trainer.current_epoch`` (a resumed run continues the sequence),
or the number of passes made outside a Trainer. Rank and world size come from the Trainer, else an
initialised ``torch.distributed``, else the ``RANK`` / ``WORLD_SIZE`` environment variables. Under a
Trainer the workers hand over uint8 images and ``on_after_batch_transfer`` makes the floats on the
device (EDM's loader does the same); iterated directly, the loaders yield floats.

Evaluation / reference statistics (``eval_dataloader``): one exact pass, every sample once over
all ranks and workers, batches carry ``"index"`` (global sample index). Ranks get unequal batch
counts, so iterate it outside Lightning's loops (e.g. in a callback hook every rank runs, then reduce
the results once); ``pad=True`` gives every rank the same number of full batches with ``"mask"``, for
use inside a loop with per-step collectives (Lightning's validation loop, ``sync_dist`` logging).

Bad data: corrupt samples and shards are skipped with a ``CorruptDataWarning`` and counted
(``skipped``); the ``data/skipped`` metric (summed over ranks) is logged during training by a small
callback the module adds to its Trainer in ``setup``. More than ``max_bad_fraction`` bad samples
stops the run with a ``BadDataError``.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

import freqdiff  # noqa: F401  (the torchvision hook; datamodules/__init__.py imports it first too)
from datamodules.manifest import MANIFEST
from datamodules.sources import Split, find_splits, is_pattern
from datamodules.streams import (
    EvalStream,
    Health,
    TrainStream,
    batch_to_float,
    decode,
    eval_units,
    read_unit,
    to_float,
)
from datamodules.synthetic import DeadLeaves

__all__ = ["ShardDataModule", "LogSkipped", "to_float"]


class ShardDataModule(L.LightningDataModule):
    """Batches from a WebDataset shard set for training and exact evaluation passes (module docstring)."""

    def __init__(
        self,
        path: str,  # shard folder, manifest.json, or a brace / glob pattern of .tar files
        val_path: str | None = None,  # shard folder or pattern of the val split (overrides path/val)
        resolution: int | None = None,  # primary image side, batch["x0"]; None: the manifest's largest
        resolutions: list[int] | None = None,  # extra sides, batch["x0_<r>"] (e.g. Relay's [64, 256])
        batch_size: int = 64,  # images per batch, per rank
        num_workers: int = 2,  # DataLoader worker processes per rank (0: decode in the main process)
        flip: bool = True,  # random horizontal flips in training
        seed: int = 0,  # seed of shard order, shuffle buffer and flips
        batches_per_epoch: int | None = None,  # None: count // (batch_size * world_size)
        shuffle_buffer: int = 1000,  # samples in each worker's shuffle buffer (0: no shuffling)
        max_bad_fraction: float = 0.01,  # fail when more of the samples tried are unreadable
        synthetic: DeadLeaves | None = None,  # generate dead-leaves shards into `path` when it has none
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or None, got {batches_per_epoch}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.path = str(path)
        self.val_path = None if val_path is None else str(val_path)
        self.requested_resolution = resolution
        self.extra_resolutions = [int(r) for r in (resolutions or [])]
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer = int(shuffle_buffer)
        self.max_bad_fraction = float(max_bad_fraction)
        self.synthetic = synthetic
        self._splits: dict[str, Split] | None = None
        self._resolutions: list[int] | None = None  # primary first
        self._health: dict[str, Health] = {}  # "train" / "eval" -> counts of the latest loader
        self._passes = 0  # loader passes made outside a Trainer (the epoch then)

    # ---------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        if self.synthetic is not None and self._synthetic_applies(announce=True):
            self.synthetic.write(self.path)  # no-op when up to date

    def setup(self, stage: str | None = None) -> None:
        callbacks = getattr(self.trainer, "callbacks", None)
        if isinstance(callbacks, list) and not any(isinstance(c, LogSkipped) for c in callbacks):
            callbacks.append(LogSkipped())  # logs data/skipped during training
        if self._splits is not None:
            return
        if self.synthetic is not None and self._synthetic_applies(announce=False) and self._find() is None:
            self.synthetic.write(self.path)  # setup called without prepare_data
        splits = self._find()
        if splits is None:
            raise FileNotFoundError(
                f"no shard set at data.path {self.path}: expected {Path(self.path) / MANIFEST} "
                f"(make shards SRC=... OUT={self.path} RES=...), {Path(self.path) / 'train' / MANIFEST}, "
                "or a pattern like shards/shard-{000000..000009}.tar"
            )
        train = splits["train"].manifest
        if train["count"] < 1:
            raise ValueError(f"the train shard set {splits['train'].where} is empty")
        primary = self.requested_resolution or max(train["resolutions"])
        resolutions = [int(primary)] + [r for r in dict.fromkeys(self.extra_resolutions) if r != primary]
        for name, split in splits.items():
            m = split.manifest
            absent = [r for r in resolutions if r not in m["resolutions"]]
            if absent:
                res = ",".join(map(str, sorted(set(m["resolutions"]) | set(absent))))
                raise ValueError(
                    f"resolution {absent[0]} not in the {name} shard set {split.where} (it has resolutions "
                    f"{m['resolutions']}; set data.resolution / data.resolutions to those, e.g. "
                    f"data.resolution={max(m['resolutions'])}, or rewrite it with make shards RES={res})"
                )
            if m["channels"] != train["channels"] or m["labels"] != train["labels"]:
                raise ValueError(f"{name} shard set {split.where} differs from train in channels or labels")
        self._splits, self._resolutions = splits, resolutions

    def train_dataloader(self) -> wds.WebLoader:
        self.setup()
        rank, world_size = self.rank_and_world()
        split = self._splits["train"]
        count = sum(s.count for s in split.present)
        n = self.batches_per_epoch or max(1, count // (self.batch_size * world_size))
        health = Health("train", self.max_bad_fraction, min_checked=min(1000, count))
        self._health["train"] = health
        stream = TrainStream(
            shards=split.present,
            resolutions=self.resolutions,
            channels=self.channels,
            labels=self.labels is not None,
            batch_size=self.batch_size,
            flip=self.flip,
            shuffle_buffer=min(self.shuffle_buffer, count),
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            health=health,
            # under a Trainer uint8 images go to the device, floats are made there (on_after_batch_transfer)
            uint8=isinstance(self.trainer, L.Trainer),
        )
        return _EpochLoader(stream, n, self._epoch, num_workers=self.num_workers)

    def eval_dataloader(
        self,
        split: str = "train",  # "train" (reference statistics) or "val" (falls back to train)
        batch_size: int | None = None,  # None: the training batch size
        pad: bool = False,  # equal full batches on every rank, with batch["mask"]
        num_workers: int | None = None,  # None: the training num_workers
    ) -> _EvalLoader:
        """One exact pass over a split: each sample once across all ranks and workers (module docstring)."""
        name = self._split_name(split)
        rank, world_size = self.rank_and_world()
        workers = self.num_workers if num_workers is None else int(num_workers)
        health = Health(
            "eval", self.max_bad_fraction, min_checked=min(1000, self._splits[name].manifest["count"])
        )
        self._health["eval"] = health
        stream = EvalStream(
            shards=self._splits[name].shards,
            total=self._splits[name].manifest["count"],
            resolutions=self.resolutions,
            channels=self.channels,
            labels=self.labels is not None,
            batch_size=batch_size or self.batch_size,
            rank=rank,
            world_size=world_size,
            pad=pad,
            health=health,
        )
        return _EvalLoader(stream, num_workers=workers)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 images -> float ``[-1, 1]`` on the training device (4x fewer bytes over PCIe)."""
        return batch_to_float(batch) if isinstance(batch, dict) else batch

    # ---------------------------------------------------------------- data access
    def real_images(self, n: int, split: str = "val") -> torch.Tensor:
        """The first ``n`` readable images of a split in shard order (unshuffled, unflipped).

        ``[n, C, H, W]`` in [-1, 1] at the primary resolution; without a val split, ``split="val"``
        falls back to train with a warning.
        """
        name = self._split_name(split)
        s = self._splits[name]
        if not 0 <= n <= s.manifest["count"]:
            raise ValueError(f"asked for {n} {name} images but {s.where} holds {s.manifest['count']}")
        health = Health("real", self.max_bad_fraction, min_checked=s.manifest["count"])
        wanted = (f"{self.resolution}.png",)
        units = eval_units(s.shards, s.manifest["count"], 1, 0)
        imgs = []
        for i, sample in itertools.chain.from_iterable(read_unit(u, wanted, health) for u in units):
            if len(imgs) == n:
                break
            try:
                imgs.append(decode(sample, [self.resolution], self.channels, False)[0][0])
            except ValueError as e:
                health.add_bad(1, f"sample {i} (key {sample['__key__']}): {e}")
        if len(imgs) < n:
            raise ValueError(f"only {len(imgs)} readable {name} images in {s.where}, asked for {n}")
        if not imgs:
            return torch.empty(0, self.channels, self.resolution, self.resolution)
        return to_float(np.stack(imgs))

    def rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size): the Trainer's, else torch.distributed's, else RANK / WORLD_SIZE."""
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        return rank, world

    @property
    def skipped(self) -> dict[str, int]:
        """Bad samples counted by the latest train / eval loader of this process (all its workers)."""
        return {k: h.bad for k, h in self._health.items()}

    @property
    def resolution(self) -> int:
        """The primary resolution (``batch["x0"]``)."""
        self.setup()
        return self._resolutions[0]

    @property
    def resolutions(self) -> list[int]:
        """Every resolution decoded per sample, primary first."""
        self.setup()
        return list(self._resolutions)

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
        return self._splits["train"].manifest

    @property
    def val_manifest(self) -> dict[str, Any] | None:
        self.setup()
        return self._splits["val"].manifest if "val" in self._splits else None

    # ---------------------------------------------------------------- internals
    def _find(self) -> dict[str, Split] | None:
        return find_splits(self.path, self.val_path, self.max_bad_fraction)

    def planned_resolution(self) -> tuple[int | None, str]:
        """(primary resolution, where from) as ``setup`` will pick it, without writing data (None: unknown)"""
        if self.requested_resolution is not None:
            return int(self.requested_resolution), "set in the config"
        if self.synthetic is not None and self._synthetic_applies(announce=False):
            try:  # an up-to-date dead-leaves set is used as it is; anything else is (re)generated
                same = json_params(Path(self.path) / "train" / MANIFEST) == self.synthetic.params("train")
            except (OSError, ValueError):
                same = False
            where = f"the dead-leaves set in {self.path}" if same else "the synthetic generator's settings"
            return int(self.synthetic.resolution), f"from {where}"
        try:
            splits = self._find()
        except (OSError, ValueError) as e:
            return None, f"the shard set at {self.path} is unreadable: {e}"
        if splits is None:
            return None, f"no shard set at {self.path}"
        train = splits["train"]
        return int(max(train.manifest["resolutions"])), f"the largest in the manifest of {train.where}"

    def _split_name(self, split: str) -> str:
        self.setup()
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if split not in self._splits:
            warnings.warn(
                f"no val shard set for {self.path} (pass val_path): using train images", stacklevel=3
            )
            return "train"
        return split

    def _synthetic_applies(self, announce: bool) -> bool:
        """Generate dead leaves only into an empty place or over an earlier dead-leaves set."""
        root = Path(self.path)
        if is_pattern(self.path) or (root / MANIFEST).is_file() or root.suffix == ".json":
            found = True
        else:
            try:
                params = json_params(root / "train" / MANIFEST)
            except (OSError, ValueError):
                return True  # nothing there, or an unreadable dead-leaves remnant
            found = params.get("generator") != "dead-leaves"
        if found and announce:
            print(f"data: {self.path} holds a shard set; using it (data.synthetic is ignored)")
        return not found

    def _epoch(self) -> int:
        if self.trainer is not None:
            return int(self.trainer.current_epoch)
        self._passes += 1
        return self._passes - 1


def json_params(path: Path) -> dict[str, Any]:
    """The ``params`` of a manifest file (no validation); FileNotFoundError / ValueError when unreadable."""
    if not path.is_file():
        raise FileNotFoundError(path)
    return json.loads(path.read_text()).get("params") or {}


class LogSkipped(L.Callback):
    """Logs ``data/skipped``: bad training samples so far, summed over ranks (every rank joins)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        if isinstance(dm, ShardDataModule) and "train" in dm._health:
            skipped = float(dm._health["train"].bad)
            pl_module.log(
                "data/skipped", skipped, on_step=True, sync_dist=True, reduce_fx="sum", batch_size=1
            )


class _EpochLoader(wds.WebLoader):
    """``WebLoader`` over a :class:`TrainStream`: ``n_batches`` per pass, a new epoch seed per pass.

    At the end of a pass the bad fraction of all samples tried is checked (during the pass, workers
    check it once ``min_checked`` samples were tried).
    """

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

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.stream.epoch = self._epoch_fn()  # before the DataLoader forks (or pickles) its workers
        yield from super().__iter__()
        self.stream.health.check(final=True)  # the bad fraction of everything tried so far


class _EvalLoader(DataLoader):
    """DataLoader over an :class:`EvalStream`; checks the bad fraction of the whole pass at its end."""

    def __init__(self, stream: EvalStream, num_workers: int):
        super().__init__(
            stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available()
        )
        self.stream = stream

    def __len__(self) -> int:
        """Batches this rank yields (without bad samples; exact with ``pad``)."""
        s, w = self.stream, max(1, self.num_workers)
        if s.pad:
            return w * s.batches_per_worker(w)
        consumers = s.world_size * w
        sizes = [(j + 1) * s.total // consumers - j * s.total // consumers for j in range(consumers)]
        return sum(-(-n // s.batch_size) for n in sizes[s.rank * w : (s.rank + 1) * w])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        yield from super().__iter__()
        self.stream.health.check(final=True)
