"""x0_hat strips: the denoiser's clean-image estimate along the sampling trajectory (DESIGN.md §5).

For a few fixed seeds, ``X0Strip`` samples with the EMA weights and records ``x0_hat`` (the
prediction of x0 at the current t, Ho et al. 2020 eq. 15 / the Denoiser's output) at ``frames``
evenly spaced sampler steps, plus the final sample. One row per seed, time running left to right
from t = 1 to 0, so TensorBoard shows coarse-to-fine generation: for Gaussian diffusion the early
estimates are blurry means and detail appears late (Dieleman 2024, "diffusion is spectral
autoregression"); blur and scale-space methods make the order explicit. Estimates at a lower
resolution (Scale Space) are upsampled (nearest) to the final size. Logged as the image
``x0_hat_strip`` and written to ``<run>/strips/step_*.png``. It uses the samplers' ``callback``
keyword of ``pl_module.sample``, so it works for every method whose sampler reports ``x0_hat``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from callbacks.samples import skip_sampling
from freqdiff.analysis.images import make_grid, save_png
from freqdiff.config import check_args


def frame_steps(steps: int, frames: int) -> list[int]:
    """``frames`` step indices evenly spaced over ``0 .. steps - 1``, always including the last."""
    if steps < 1 or frames < 1:
        raise ValueError(f"steps and frames must be >= 1, got steps={steps}, frames={frames}")
    return sorted({round(k * (steps - 1) / max(frames - 1, 1)) for k in range(frames)})


@torch.no_grad()
def x0_hat_strip(
    pl_module, seeds: list[int], steps: int | None = None, frames: int = 8
) -> tuple[Tensor, list]:
    """Sample ``seeds``; returns (strip [S * (F + 1), C, H, W] row-major by seed, the t of each frame)."""
    n_steps = steps if steps is not None else int(getattr(pl_module, "sample_steps", 50))
    # how many steps the sampler reports (Relay's truncated grid runs fewer than it is given)
    reported = getattr(pl_module, "reported_steps", None)
    keep = set(frame_steps(reported(n_steps) if callable(reported) else n_steps, frames))
    recorded: list[tuple[float, Tensor]] = []

    def record(d: dict) -> None:
        if d["i"] in keep:
            recorded.append((float(d["t"]), d["x0_hat"].detach().float().cpu()))

    x = pl_module.sample(seeds, steps=n_steps, use_ema=True, callback=record).float().cpu()
    if not recorded:
        raise RuntimeError(f"{type(pl_module).__name__}.sample did not report x0_hat through its callback")
    size = x.shape[-2:]
    cols = [F.interpolate(e, size=size, mode="nearest") if e.shape[-2:] != size else e for _, e in recorded]
    cols.append(x)
    strip = torch.stack(cols, dim=1)  # [S, F + 1, C, H, W]
    return strip.flatten(0, 1).clamp(-1, 1), [t for t, _ in recorded] + [0.0]


class X0Strip(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 1000,  # interval in optimiser steps (0: only at the end)
        seeds: tuple[int, ...] = (0, 1, 2, 3),  # one row per seed
        frames: int = 8,  # x0_hat frames per row (plus the final sample)
        steps: int | None = None,  # sampler steps (None: the module's default)
        upscale: int = 4,  # nearest upscaling of the PNG
        at_end: bool = True,  # also when training ends
    ):
        check_args("a non-negative integer", every_n_steps=every_n_steps)
        check_args("a positive integer", frames=frames, upscale=upscale)
        check_args("a positive integer", allow_none=True, steps=steps)
        if isinstance(seeds, (str, bytes)) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"seeds={seeds!r}: expected a non-empty list of integers")
        self.every_n_steps, self.seeds, self.frames, self.steps = every_n_steps, list(seeds), frames, steps
        self.upscale, self.at_end = upscale, at_end
        self._last = -1

    def strip(self, trainer, pl_module) -> np.ndarray:
        with trainer.precision_plugin.forward_context():
            x, _ = x0_hat_strip(pl_module, self.seeds, self.steps, self.frames)
        return make_grid(x, nrow=x.shape[0] // len(self.seeds), upscale=self.upscale)

    def _write(self, trainer, pl_module) -> None:
        if skip_sampling(pl_module, "X0Strip"):
            return
        step = trainer.global_step
        self._last = step
        grid = self.strip(trainer, pl_module)
        exp = getattr(trainer.logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image"):
            exp.add_image("x0_hat_strip", grid, step, dataformats="HWC")
        save_png(grid, Path(trainer.default_root_dir) / "strips" / f"step_{step:07d}.png")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.is_global_zero and trainer.global_step != self._last:
            self._write(trainer, pl_module)

    def missing_final_outputs(self, trainer) -> list[str]:
        """End-of-training outputs not written (``experiments.runner``)."""
        name = f"strips/step_{trainer.global_step:07d}.png"
        return [name] if self.at_end and not (Path(trainer.default_root_dir) / name).is_file() else []
