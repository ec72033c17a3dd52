"""Sample grids during training and a samples-beside-real PNG at the end (docs/architecture.md, Callbacks).

``SampleGrid`` samples with the EMA weights and fixed seeds (so grids are comparable over time)
every ``every_n_steps`` optimiser steps, and logs them to TensorBoard (``samples``) and as PNGs under
``<run>/samples/``. At the end of training it writes ``<run>/samples_vs_real.png`` (samples beside
held-out real images). Numbers (``eval/spectral``, ``eval/swd/<res>``, ``eval/fid`` and
``<run>/final_metrics.json``) come from ``callbacks.fid.Evaluate``. It only calls
``pl_module.sample``, so it works for every method.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from freqdiff.analysis.images import make_grid, save_png, side_by_side
from freqdiff.config import check_args


class SampleGrid(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 1000,  # grid interval in optimiser steps (0: only at the end)
        n: int = 64,  # samples per grid (fixed seeds seed..seed+n-1)
        seed: int = 0,  # first sample seed
        steps: int | None = None,  # sampler steps (None: the module's default)
        upscale: int = 4,  # nearest upscaling of the PNGs
        final: bool = True,  # samples beside real images at the end
    ):
        check_args("a non-negative integer", every_n_steps=every_n_steps)
        check_args("a positive integer", n=n, upscale=upscale)
        check_args("a positive integer", allow_none=True, steps=steps)
        check_args("an integer", seed=seed)
        self.every_n_steps, self.n, self.seed, self.steps = every_n_steps, n, seed, steps
        self.upscale, self.final = upscale, final

    def _sample(self, trainer, pl_module) -> torch.Tensor:
        seeds = list(range(self.seed, self.seed + self.n))
        with trainer.precision_plugin.forward_context():
            x = pl_module.sample(seeds, steps=self.steps)
        return x.float().clamp(-1, 1)

    def _log_grid(self, trainer, tag: str, grid) -> None:
        exp = getattr(trainer.logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image"):
            exp.add_image(tag, grid, trainer.global_step, dataformats="HWC")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or not trainer.is_global_zero:
            return
        if skip_sampling(pl_module, "SampleGrid"):
            return
        grid = make_grid(self._sample(trainer, pl_module), upscale=self.upscale)
        self._log_grid(trainer, "samples", grid)
        save_png(grid, Path(trainer.default_root_dir) / "samples" / f"step_{step:07d}.png")

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.final or not trainer.is_global_zero or skip_sampling(pl_module, "SampleGrid"):
            return
        t0 = time.perf_counter()
        x = self._sample(trainer, pl_module)
        real = trainer.datamodule.real_images(self.n, split="val").to(x)
        panel = side_by_side(
            {
                f"samples (EMA, step {trainer.global_step})": make_grid(x, upscale=self.upscale),
                "real (held out)": make_grid(real, upscale=self.upscale),
            }
        )
        run_dir = Path(trainer.default_root_dir)
        save_png(panel, run_dir / "samples_vs_real.png")
        self._log_grid(trainer, "samples_vs_real", panel)
        print(f"wrote {run_dir / 'samples_vs_real.png'} in {time.perf_counter() - t0:.1f} s")

    def missing_final_outputs(self, trainer) -> list[str]:
        """End-of-training outputs not written (``experiments.runner``)."""
        done = (Path(trainer.default_root_dir) / "samples_vs_real.png").is_file()
        return ["samples_vs_real.png"] if self.final and not done else []


_told: set = set()


def skip_sampling(pl_module, who: str) -> bool:
    """True (with a one-time note) when the module cannot sample yet: its ``sampling_unavailable()``
    gives the reason (Relay's stage 2 before stage 1 has a checkpoint). Training goes on."""
    check = getattr(pl_module, "sampling_unavailable", None)
    reason = check() if callable(check) else None
    if reason and (who, reason) not in _told:
        _told.add((who, reason))
        print(f"{who}: no samples yet ({reason})", flush=True)
    return bool(reason)
