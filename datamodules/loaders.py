"""The DataLoaders of ``ShardDataModule`` (docs/architecture.md, Data): a fixed number of training batches per
pass with a new epoch seed each pass, and one exact evaluation pass; both check the bad data at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from datamodules.streams import EvalStream, TrainStream


class EpochLoader(wds.WebLoader):
    """``WebLoader`` over a :class:`TrainStream`: ``n_batches`` per pass, a new epoch seed per pass.

    At the end of a pass the bad data read so far is checked again: by the plain fraction once at
    least ``full_pass`` samples (this rank's share of the split) were read, else by the 99 % bound.
    """

    def __init__(
        self, stream: TrainStream, n_batches: int, epoch: Callable[[], int], num_workers: int, full_pass: int
    ):
        super().__init__(
            stream,
            batch_size=None,  # the stream batches
            num_workers=num_workers,
            persistent_workers=False,  # fresh workers per pass see the new epoch
            pin_memory=torch.cuda.is_available(),
        )
        self.with_epoch(n_batches)  # counts batches on the loader (docs/platform.md)
        self.stream, self.n_batches, self._epoch_fn, self.full_pass = stream, n_batches, epoch, full_pass

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.stream.epoch = self._epoch_fn()  # before the DataLoader forks (or pickles) its workers
        yield from super().__iter__()
        health = self.stream.health
        health.check(final=health.read >= self.full_pass)  # everything read since the stream began


class EvalLoader(DataLoader):
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
        sizes = s.consumer_sizes(s.world_size * w)
        return sum(-(-n // s.batch_size) for n in sizes[s.rank * w : (s.rank + 1) * w])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        yield from super().__iter__()
        self.stream.health.check(final=True)
