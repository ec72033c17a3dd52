"""ShardDataModule: WebDataset tar shards -> ``[-1, 1]`` image batches for every method.

The data layer is described in docs/architecture.md, "Data".

Where the data is (``path``; see ``sources.py``): a folder written by ``make shards`` (its
``manifest.json``), a folder with ``train/`` and ``val/`` shard sets (the dead-leaves layout), a
manifest file, or a brace / glob pattern of tar files. ``val_path`` names the val split explicitly.
A wrong path fails in ``setup`` naming it; a shard whose size differs from its manifest is refused
there. With ``synthetic`` given, the dead-leaves shards are generated into ``path`` only when it is
missing or empty, holds an earlier dead-leaves set (regenerated when written with other parameters)
or the remnants of an interrupted one (``synthetic.placement``); another shard set found there is used
as it is and the generator is ignored; a folder of anything else (images, other files) is refused.

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
callback the module adds to its Trainer in ``setup``. When more than ``max_bad_fraction`` of the data
is bad (``health.py``: a 99 % bound while streaming, the plain fraction after a full pass) a
``BadDataError`` stops the run.
"""

from __future__ import annotations

import itertools
import numbers
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

import freqdiff  # noqa: F401  (the torchvision hook; datamodules/__init__.py imports it first too)
from datamodules.encodings import encoding_of, member
from datamodules.loaders import EpochLoader, EvalLoader
from datamodules.manifest import MANIFEST
from datamodules.sources import Split, find_splits
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
from datamodules.synthetic import DeadLeaves, placement

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
        max_bad_fraction: float = 0.01,  # stop when more of the data read is unreadable (health.py)
        synthetic: DeadLeaves | None = None,  # dead leaves for an empty `path` (synthetic.placement)
    ):
        super().__init__()
        for name, value in (("path", path), ("val_path", val_path)):
            if (value is not None or name == "path") and not str(value or "").strip():
                raise ValueError(f"{name}={value!r}: expected a shard folder, a manifest file or a pattern")
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("resolution", resolution, 1, optional=True)
        _check_int("batches_per_epoch", batches_per_epoch, 1, optional=True)
        _check_int("shuffle_buffer", shuffle_buffer, 0)
        extra = list(resolutions or [])
        if any(isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1 for r in extra):
            raise ValueError(f"resolutions={extra!r}: expected a list of positive integers (or null)")
        number = isinstance(max_bad_fraction, numbers.Real) and not isinstance(max_bad_fraction, bool)
        if not (number and 0.0 <= max_bad_fraction <= 1.0):
            raise ValueError(f"max_bad_fraction={max_bad_fraction!r}: expected a number in [0, 1]")
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

    def train_dataloader(self) -> EpochLoader:
        self.setup()
        rank, world_size = self.rank_and_world()
        split = self._splits["train"]
        count = sum(s.count for s in split.present)
        n = self.batches_per_epoch or max(1, count // (self.batch_size * world_size))
        health = Health("train", self.max_bad_fraction)
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
            encoding=encoding_of(split.manifest),
        )
        return EpochLoader(stream, n, self._epoch, self.num_workers, full_pass=count // world_size)

    def eval_dataloader(
        self,
        split: str = "train",  # "train" (reference statistics) or "val" (falls back to train)
        batch_size: int | None = None,  # None: the training batch size
        pad: bool = False,  # equal full batches on every rank, with batch["mask"]
        num_workers: int | None = None,  # None: the training num_workers
        select: Any = None,  # global indices to read (a subset of the split; None: all of it)
    ) -> EvalLoader:
        """One exact pass over a split: each sample once across all ranks and workers (module docstring).

        With ``select`` only those samples are read and decoded (the others are skipped over).
        """
        name = self._split_name(split)
        rank, world_size = self.rank_and_world()
        workers = self.num_workers if num_workers is None else int(num_workers)
        health = Health("eval", self.max_bad_fraction)
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
            select=None if select is None else np.asarray(select, dtype=np.int64),
            encoding=encoding_of(self._splits[name].manifest),
        )
        return EvalLoader(stream, num_workers=workers)

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
        imgs = [img for _, img in itertools.islice(self._decoded(s), n)]
        if len(imgs) < n:
            raise ValueError(f"only {len(imgs)} readable {name} images in {s.where}, asked for {n}")
        if not imgs:
            return torch.empty(0, self.channels, self.resolution, self.resolution)
        return to_float(np.stack(imgs))

    def images_at(self, indices: Any, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """The readable images of global ``indices`` of a split, in the order given: ``(images, indices)``.

        ``images [k, C, H, W]`` in [-1, 1] at the primary resolution; unreadable ones are skipped
        (counted as bad) and missing from both outputs. Only the wanted samples are read.
        """
        name = self._split_name(split)
        s = self._splits[name]
        want = np.asarray(indices, dtype=np.int64).reshape(-1)
        if want.size and (want.min() < 0 or want.max() >= s.manifest["count"]):
            raise ValueError(f"indices must lie in [0, {s.manifest['count']}) for {s.where}")
        found = dict(self._decoded(s, np.unique(want)))
        order = [int(i) for i in want if int(i) in found]
        if not order:
            return torch.empty(0, self.channels, self.resolution, self.resolution), torch.zeros(
                0, dtype=torch.long
            )
        return to_float(np.stack([found[i] for i in order])), torch.tensor(order, dtype=torch.long)

    def split_info(self, split: str) -> dict[str, Any]:
        """What a split request reads: ``{"split": the split used, "path": where, "manifest": ...}``.

        ``split="val"`` without a val split resolves to train (with a warning), and says so here.
        """
        name = self._split_name(split)
        s = self._splits[name]
        return {"split": name, "path": s.where, "manifest": s.manifest}

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
    def _decoded(self, s: Split, select: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(global index, uint8 [r, r, C])`` of the readable samples of ``s`` (only ``select``), in
        shard order at the primary resolution, unflipped; bad ones are counted and skipped."""
        health, enc = Health("real", self.max_bad_fraction), encoding_of(s.manifest)
        units = eval_units(s.shards, s.manifest["count"], 1, 0)
        wanted = (member(self.resolution, enc),)
        for i, sample in itertools.chain.from_iterable(read_unit(u, wanted, health, select) for u in units):
            try:
                img = decode(sample, [self.resolution], self.channels, False, enc)[0][0]
            except ValueError as e:
                health.add_bad(1, f"sample {i} (key {sample['__key__']}): {e}")
                continue
            health.add_good(1)
            yield i, img

    def _find(self) -> dict[str, Split] | None:
        return find_splits(self.path, self.val_path, self.max_bad_fraction)

    def planned_resolution(self) -> tuple[int | None, str]:
        """(primary resolution, where from) as ``setup`` will pick it, without writing data (None: unknown).

        Applies the rule of where dead leaves may be written: raises ShardSetError where setup would.
        """
        synthetic = self._synthetic_applies(announce=False)
        if self.requested_resolution is not None:
            return int(self.requested_resolution), "set in the config"
        if synthetic:  # an up-to-date dead-leaves set is used as it is; anything else is (re)generated
            same = self.synthetic.written_in(self.path)
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
        """Whether dead leaves are to be written at ``path`` (``synthetic.placement``; may raise)."""
        if self.synthetic is None:
            return False
        use = placement(self.path) == "use"
        if use and announce:
            print(f"data: {self.path} holds a shard set; using it (data.synthetic is ignored)")
        return not use

    def _epoch(self) -> int:
        if self.trainer is not None:
            return int(self.trainer.current_epoch)
        self._passes += 1
        return self._passes - 1


def _check_int(name: str, value: Any, low: int, optional: bool = False) -> None:
    """ValueError ``"<name>=<value>: expected ..."`` unless ``value`` is an int >= ``low`` (or None)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
        raise ValueError(f"{name}={value!r}: expected {what}" + (" or null" if optional else ""))


class LogSkipped(L.Callback):
    """Logs ``data/skipped``: bad training samples so far, summed over ranks (every rank joins)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        if isinstance(dm, ShardDataModule) and "train" in dm._health:
            skipped = float(dm._health["train"].bad)
            pl_module.log(
                "data/skipped", skipped, on_step=True, sync_dist=True, reduce_fx="sum", batch_size=1
            )
