"""Checkpoint plumbing: atomic writes and the resolved config inside every checkpoint (DESIGN.md §3, §6).

- ``AtomicCheckpointIO``: writes ``<path>.tmp`` then ``os.replace``s it, so a run killed while saving
  never leaves a truncated ``last.ckpt``.
- ``EmbedConfig``: puts the resolved experiment config under ``checkpoint["freqdiff_config"]``, which
  ``freqdiff.checkpoints.load_run`` rebuilds the module from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from freqdiff.checkpoints import CONFIG_KEY


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class EmbedConfig(L.Callback):
    def __init__(self, config: dict):  # the resolved config as a plain dict
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config


class CheckpointOnException(L.Callback):
    """On an exception (Ctrl-C, an error in a step, ...) save ``last.ckpt`` so the run resumes from there.

    Lightning's ``OnExceptionCheckpoint`` deletes its file again at teardown, which would delete
    ``last.ckpt``; this one keeps it. Weights that are no longer finite are not saved (the previous
    ``last.ckpt`` is worth more than a diverged state).
    """

    def __init__(self, path: str | Path):  # where to write, e.g. <run>/checkpoints/last.ckpt
        self.path = Path(path)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.global_step == 0:
            return
        if not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            print(f"not checkpointing after {type(exception).__name__}: the weights are not finite")
            return
        trainer.save_checkpoint(self.path)
        print(f"{type(exception).__name__} at step {trainer.global_step}: saved {self.path}")
