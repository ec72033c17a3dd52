"""Sample spectra and per-band SWD during training (docs/frequencies.md, "During training").

``SpectraLogger`` samples ``n`` EMA images from fixed seeds every ``every_n_steps`` optimiser steps
(and at the end) and sets them against ``ref_n`` held-out images read once at the start:

- ``spectra/distance``: the RAPS log-distance (``metrics.spectra.spectral_distance``);
- ``spectra/power_ratio/<lo>-<hi>``: mean sample power over mean data power in each octave band of
  frequencies (cycles per image), 1 where the samples have the data's power: a band below 1 is
  missing detail (or colour) at that scale, above 1 is noise there;
- ``spectra/swd/<res>``: SWD ×10³ per Laplacian-pyramid level, the per-band view of the patches
  (``metrics.swd.swd``; n samples against the first n reference images);
- the image ``spectra/raps``: both spectra, log-log.

Add it to an experiment with ``+callbacks.spectra._target_=callbacks.spectra.SpectraLogger`` (and
``+callbacks.spectra.every_n_steps=250``, ...). Rank 0 only; it costs one sampling of ``n`` images
per interval. At n = 64 the numbers are noisy (docs/evaluation.md): they show trends, the final
evaluation ranks runs.
"""

from __future__ import annotations

import lightning as L
import torch

from callbacks.samples import skip_sampling
from freqdiff.analysis.plots import figure_to_array, plot_raps
from freqdiff.config import check_args
from freqdiff.metrics.spectra import raps, spectral_distance
from freqdiff.metrics.swd import swd


def octave_bands(nyquist: int) -> list[tuple[int, int]]:
    """[(1, 2), (2, 4), ...] up to the Nyquist bin (the last band ends there, inclusive)."""
    edges, lo = [], 1
    while lo <= nyquist:
        hi = min(2 * lo, nyquist + 1)
        edges.append((lo, hi))
        lo = hi
    return edges


def band_ratios(freqs: torch.Tensor, samples: torch.Tensor, data: torch.Tensor) -> dict[str, float]:
    """Mean power of ``samples`` over that of ``data`` per octave band of ``freqs`` (RAPS [R] each)."""
    out = {}
    for lo, hi in octave_bands(int(freqs[-1])):
        keep = (freqs >= lo) & (freqs < hi)
        out[f"{lo}-{hi - 1}" if hi - 1 > lo else f"{lo}"] = float(samples[keep].mean() / data[keep].mean())
    return out


class SpectraLogger(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 500,  # interval in optimiser steps (0: only at the end)
        n: int = 64,  # EMA samples per interval, seeds seed .. seed + n - 1
        seed: int = 0,
        steps: int | None = None,  # sampler steps (None: the module's)
        ref_n: int = 256,  # held-out images of the reference spectrum
        split: str = "val",
        swd_min_res: int = 8,  # coarsest SWD level
    ):
        check_args("a non-negative integer", every_n_steps=every_n_steps)
        check_args("a positive integer", n=n, ref_n=ref_n, swd_min_res=swd_min_res)
        check_args("a positive integer", allow_none=True, steps=steps)
        self.every_n_steps, self.n, self.seed, self.steps = every_n_steps, n, seed, steps
        self.ref_n, self.split, self.swd_min_res = ref_n, split, swd_min_res
        self._real: torch.Tensor | None = None
        self._real_power: torch.Tensor | None = None  # RAPS of the reference, computed once
        self._done = -1

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._real = trainer.datamodule.real_images(self.ref_n, split=self.split).float()
            self._real_power = raps(self._real)[1]

    def _measure(self, trainer, pl_module) -> dict[str, float]:
        seeds = list(range(self.seed, self.seed + self.n))
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            x = pl_module.sample(seeds, steps=self.steps)
        x = x.float().clamp(-1, 1).cpu()
        real, p_real = self._real, self._real_power
        f, p_gen = raps(x)
        values = {"spectra/distance": spectral_distance(x, real)}
        values |= {f"spectra/power_ratio/{k}": v for k, v in band_ratios(f, p_gen, p_real).items()}
        m = min(len(x), len(real))
        if m >= 2 and x.shape[-1] >= self.swd_min_res:
            levels = swd(x[:m], real[:m], min_res=self.swd_min_res, seed=self.seed)
            values |= {f"spectra/swd/{r}": v for r, v in levels.items()}
        exp = getattr(trainer.logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image"):
            fig = plot_raps({"data": (f, p_real), "samples": (f, p_gen)}, title=f"step {trainer.global_step}")
            exp.add_image("spectra/raps", figure_to_array(fig), trainer.global_step, dataformats="HWC")
        return values

    def _log(self, trainer, pl_module) -> None:
        step = int(trainer.global_step)
        if not trainer.is_global_zero or self._real is None or step == self._done:
            return
        if skip_sampling(pl_module, "SpectraLogger"):
            return
        self._done = step
        values = self._measure(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module)
