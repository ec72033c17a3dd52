"""Checkpoint plumbing: atomic writes and the resolved config inside every checkpoint
(docs/architecture.md, Checkpoints).

- ``AtomicCheckpointIO``: writes ``<path>.tmp`` then ``os.replace``s it, so a run killed while saving
  never leaves a truncated ``last.ckpt``.
- ``EmbedConfig``: puts the resolved experiment config under ``checkpoint["freqdiff_config"]``, which
  ``freqdiff.checkpoints.load_run`` rebuilds the module from.
- ``StopOnDivergence``: a non-finite training loss stops the run (``TrainingDiverged``); the checkpoint
  writer refuses non-finite weights too, so a good ``last.ckpt`` is never replaced by a diverged one.
- ``FinishRun``: the end of training always writes ``last.ckpt`` (also when ``max_steps`` is not a
  multiple of the checkpoint interval), before the end-of-training evaluation runs; and it tells the
  runner whether this invocation trained at all (a rerun of a finished run does not, see
  ``experiments.runner.complete_final_outputs``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from freqdiff.checkpoints import CONFIG_KEY


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite; the message names the step."""


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding NaN or Inf."""
    return [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<path>.tmp`` and renames it; refuses a checkpoint whose weights are not finite."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise TrainingDiverged(
                f"not writing {path} at step {checkpoint.get('global_step')}: {len(bad)} weight tensors "
                f"hold NaN or Inf (e.g. {bad[0]}); the previous checkpoint stays as it was"
            )
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
        if any(c._last_global_step_saved == trainer.global_step for c in trainer.checkpoint_callbacks):
            return  # saved at this step already (a periodic checkpoint, or callbacks/requeue.py's)
        if not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            print(f"not checkpointing after {type(exception).__name__}: the weights are not finite")
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: it must resume
        print(f"{type(exception).__name__} at step {trainer.global_step}: saved {self.path}")


class StopOnDivergence(L.Callback):
    """Stop at a non-finite training loss, naming the step (exit code 3 from the command line).

    The loss is read where it costs nothing: every step when it lives on the CPU, and on an
    accelerator only at the steps Lightning logs (``trainer.log_every_n_steps``), where the logger
    copies it to the host anyway. Non-finite weights are also caught by ``AtomicCheckpointIO``.
    """

    def __init__(self) -> None:
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step  # the step this batch's loss belongs to (before the update)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        step = self._step
        every = max(1, int(trainer.log_every_n_steps or 1))
        if loss.device.type != "cpu" and step % every:
            return
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"training diverged: the loss is {value} at step {step}"
                + ("" if loss.device.type == "cpu" else f" (checked every {every} steps)")
                + "; no checkpoint is written after it (last.ckpt, if any, is the last finite state). "
                "Lower module.lr, or check the data."
            )


class FinishRun(L.Callback):
    """Write ``last.ckpt`` at the end of training (before the final evaluation); note whether we trained.

    Goes first in the callback list, so its ``on_train_end`` runs before the evaluation callbacks'.
    """

    def __init__(self, path: str | Path):  # <run>/checkpoints/last.ckpt
        self.path = Path(path)
        self.trained = False  # on_train_start ran: this invocation ran the training loop

    def on_train_start(self, trainer, pl_module) -> None:
        self.trained = True

    def on_train_end(self, trainer, pl_module) -> None:
        if any(c._last_global_step_saved == trainer.global_step for c in trainer.checkpoint_callbacks):
            return  # the periodic checkpoint is at this step already
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: it must resume
        for c in trainer.checkpoint_callbacks:
            c._last_global_step_saved = trainer.global_step
