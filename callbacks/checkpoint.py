"""Checkpoint plumbing: atomic writes and the resolved config inside every checkpoint (DESIGN.md §3, §6).

- ``AtomicCheckpointIO``: writes ``<path>.tmp`` then ``os.replace``s it, so a run killed while saving
  never leaves a truncated ``last.ckpt``.
- ``EmbedConfig``: puts the resolved experiment config under ``checkpoint["freqdiff_config"]``, which
  ``experiments.load_run`` rebuilds the module from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

CONFIG_KEY = "freqdiff_config"


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
