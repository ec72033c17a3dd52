"""x0_hat strips: the denoiser's clean-image estimate along the sampling trajectory (docs/dashboards.md).

For a few fixed seeds, ``X0Strip`` samples with the EMA weights and records ``x0_hat`` (the
prediction of x0 at the current t, Ho et al. 2020 eq. 15 / the Denoiser's output) at ``frames``
evenly spaced sampler steps, plus the final sample. One row per seed, time running left to right
from t = 1 to 0, so TensorBoard shows coarse-to-fine generation: for Gaussian diffusion the early
estimates are blurry means and detail appears late (Dieleman 2024, "diffusion is spectral
autoregression"); blur and scale-space methods make the order explicit. Estimates at a lower
resolution (Scale Space) are upsampled (nearest) to the final size. Logged as the image
``x0_hat_strip`` and written to ``<run>/strips/step_*.png``. It uses the samplers' ``callback``
keyword of ``pl_module.sample``, so it works for every method whose sampler reports ``x0_hat``.

Each column is captioned with what the frame is, read from the sampler's report and the process,
with no per-method code (``frame_label``): ``t`` (the time x0_hat was predicted at); ``σ`` where
there is one (the sampler reports it, as Relay's does, or the process has ``sigma(t)``, as EDM's);
the state's resolution where it changes along the trajectory (Scale Space); the last column is the
sample. The same frames, unrounded, go to TensorBoard as the text ``x0_hat_strip/frames``.
Which steps are shown follows ``reported_steps`` of the module where it has one (Relay's truncated
grid, Scale Space's grid with its change steps), else its ``sample_steps``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from callbacks.samples import skip_sampling
from freqdiff.analysis.images import caption_columns, make_grid, save_png
from freqdiff.config import check_args


def frame_steps(steps: int, frames: int) -> list[int]:
    """``frames`` step indices evenly spaced over ``0 .. steps - 1``, always including the last."""
    if steps < 1 or frames < 1:
        raise ValueError(f"steps and frames must be >= 1, got steps={steps}, frames={frames}")
    return sorted({round(k * (steps - 1) / max(frames - 1, 1)) for k in range(frames)})


def _sigma_of(pl_module):
    """``t -> σ(t)`` of the module's process (None when it has no ``sigma``)."""
    fn = getattr(getattr(pl_module, "process", None), "sigma", None)
    if not callable(fn):
        return None
    return lambda t: float(fn(torch.full((1,), float(t), dtype=torch.float64, device=pl_module.device)))


@torch.no_grad()
def x0_hat_frames(
    pl_module, seeds: list[int], steps: int | None = None, frames: int = 8
) -> tuple[Tensor, list[dict]]:
    """Sample ``seeds``; returns (strip [S * (F + 1), C, H, W] row-major by seed, one dict per column).

    A column's dict: ``i`` (sampler step, None for the sample), ``t``, ``sigma`` (where known, else
    absent) and ``res`` (the state's resolution after the step: what the frame was predicted at).
    """
    n_steps = steps if steps is not None else int(getattr(pl_module, "sample_steps", 50))
    # how many steps the sampler reports (Relay's truncated grid runs fewer than it is given)
    reported = getattr(pl_module, "reported_steps", None)
    keep = set(frame_steps(reported(n_steps) if callable(reported) else n_steps, frames))
    sigma_of = _sigma_of(pl_module)
    recorded: list[tuple[dict, Tensor]] = []

    def record(d: dict) -> None:
        if d["i"] in keep:
            x0_hat = d["x0_hat"].detach().float().cpu()
            info = {"i": int(d["i"]), "t": float(d["t"])}
            if d.get("sigma") is not None:
                info["sigma"] = float(d["sigma"])
            elif sigma_of is not None:
                info["sigma"] = sigma_of(info["t"])
            info["res"] = int((d["x"] if isinstance(d.get("x"), Tensor) else x0_hat).shape[-1])
            recorded.append((info, x0_hat))

    x = pl_module.sample(seeds, steps=n_steps, use_ema=True, callback=record).float().cpu()
    if not recorded:
        raise RuntimeError(f"{type(pl_module).__name__}.sample did not report x0_hat through its callback")
    size = x.shape[-2:]
    cols = [F.interpolate(e, size=size, mode="nearest") if e.shape[-2:] != size else e for _, e in recorded]
    cols.append(x)
    strip = torch.stack(cols, dim=1)  # [S, F + 1, C, H, W]
    infos = [info for info, _ in recorded] + [{"i": None, "t": 0.0, "res": int(x.shape[-1])}]
    return strip.flatten(0, 1).clamp(-1, 1), infos


@torch.no_grad()
def x0_hat_strip(
    pl_module, seeds: list[int], steps: int | None = None, frames: int = 8
) -> tuple[Tensor, list]:
    """Sample ``seeds``; returns (strip [S * (F + 1), C, H, W] row-major by seed, the t of each frame)."""
    strip, infos = x0_hat_frames(pl_module, seeds, steps, frames)
    return strip, [info["t"] for info in infos]


def _num(v: float) -> str:
    """Short text of a number for a caption: 3 significant digits, no exponent in [0.001, 1000)."""
    if v == 0 or 1e-3 <= abs(v) < 1e3:
        return f"{v:.3g}" if abs(v) >= 1 else f"{v:.3f}".rstrip("0").rstrip(".") or "0"
    return f"{v:.2g}"


def frame_label(info: dict, show_res: bool = False) -> str:
    """A column's caption: ``t=0.98`` / ``σ=12.3`` / ``8²`` lines, or ``sample`` for the last column."""
    lines = ["sample"] if info.get("i") is None else [f"t={_num(info['t'])}"]
    if info.get("i") is not None and "sigma" in info:
        lines.append(f"σ={_num(info['sigma'])}")
    if show_res:
        lines.append(f"{info['res']}²")
    return "\n".join(lines)


def frames_text(infos: list[dict]) -> str:
    """The frames as a Markdown table (TensorBoard's text ``x0_hat_strip/frames``)."""
    sig = any("sigma" in f for f in infos)
    head = ["column", "sampler step", "t"] + (["σ"] if sig else []) + ["resolution"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, f in enumerate(infos):
        cells = [str(c), "sample" if f["i"] is None else str(f["i"]), f"{f['t']:.6g}"]
        cells += [f"{f['sigma']:.6g}" if "sigma" in f else ""] if sig else []
        rows.append("| " + " | ".join(cells + [f"{f['res']}²"]) + " |")
    return "\n".join(rows)


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
        return self.labelled_strip(trainer, pl_module)[0]

    def labelled_strip(self, trainer, pl_module) -> tuple[np.ndarray, list[dict]]:
        """(the captioned grid, uint8 [H, W, 3]; the frames' dicts of ``x0_hat_frames``)."""
        with trainer.precision_plugin.forward_context():
            x, infos = x0_hat_frames(pl_module, self.seeds, self.steps, self.frames)
        grid = make_grid(x, nrow=len(infos), upscale=self.upscale)
        show_res = len({f["res"] for f in infos}) > 1
        labels = [frame_label(f, show_res) for f in infos]
        return caption_columns(grid, labels, cell_w=x.shape[-1] * self.upscale), infos

    def _write(self, trainer, pl_module) -> None:
        if skip_sampling(pl_module, "X0Strip"):
            return
        step = trainer.global_step
        self._last = step
        grid, infos = self.labelled_strip(trainer, pl_module)
        exp = getattr(trainer.logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image"):
            exp.add_image("x0_hat_strip", grid, step, dataformats="HWC")
        if exp is not None and hasattr(exp, "add_text"):
            exp.add_text("x0_hat_strip/frames", frames_text(infos), step)
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
