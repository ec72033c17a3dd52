"""Blur diffusion (Lee et al. 2022; docs/methods/blur.md) as a thin DDPM module over ``BlurProcess``.

Everything method-specific is in ``freqdiff.processes.blur.BlurProcess``; this module only wires it:

- Training: the paper's "ε simple" loss, ``|ε̂ − ε|²`` on the white ε before colouring (the DDPM
  module's natural ε loss), t from the configured time sampler (the paper: uniform steps).
- ``data_range``: the range the process sees. The official code trains on images in [0, 1] (at a
  given β the noise is then relatively twice as strong as on [−1, 1], a 4× lower SNR); with
  ``data_range: [0, 1]`` the batch is mapped from the datamodule's [−1, 1] before the process and
  samples are mapped back, which reproduces the official scale and offset. [−1, 1] is the identity.
- Sampling: ``sampler: ancestral`` is the exact per-coefficient posterior step (η = 1), its
  deterministic form (η = 0) or between, on a ``sample_steps`` grid (``sample_ancestral``, as DDPM;
  the quickstart: η = 0.5 with ``clip_x0``, docs/methods/blur.md). Avoid η = 0 with a trained
  network: the deterministic step carries x_t's high-frequency coefficients forward by
  √(Ā_s / Ā_t), which is large where a frequency re-emerges from the noise, so the network's ε error
  there is amplified and the samples turn into Nyquist checkerboards (the quickstart at 50 and at 200
  steps; the exact denoiser, with no error, samples correctly either way, tests/test_blur.py);
  ``sampler: predictor`` is the paper's reverse-diffusion predictor on a ``sample_steps`` grid from
  (T − 1)/T (the paper: ``sample_steps: 999``, every step of the chain)
  (``sample_predictor``; no noise on the last two). The sampler callback reports
  ``process.visible_x0``: x0_hat with each coefficient weighted by the fraction of it the state
  determines, so the x0_hat strips show the coarse-to-fine generation instead of amplified noise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from freqdiff.processes.blur import BlurProcess
from freqdiff.samplers import sample_ancestral, sample_predictor
from lightning_modules.ddpm import DDPMModule

SAMPLERS = ("ancestral", "predictor")


class BlurModule(DDPMModule):
    def __init__(
        self,
        net: nn.Module,  # backbone, e.g. freqdiff.nets.presets.unet (adm_blur64 for the paper)
        process: BlurProcess,
        time_sampler,  # training t sampler
        prediction: str = "eps",  # eps (the paper) or x0
        sampler: str = "ancestral",  # ancestral (any grid, eta) | predictor (the paper, T − 1 steps)
        data_range: tuple[float, float] = (-1.0, 1.0),  # the range the process sees ([0, 1]: official)
        **kw,  # DDPMModule arguments (sample_steps, sample_eta, lr, ema_decay, ...)
    ):
        if not isinstance(process, BlurProcess):
            raise ValueError(f"process={type(process).__name__}: expected a BlurProcess")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: expected one of {', '.join(map(repr, SAMPLERS))}")
        lo, hi = (float(v) for v in data_range)
        if not hi > lo:
            raise ValueError(f"data_range={list(data_range)!r}: expected [low, high] with high > low")
        if process.data_range is not None and tuple(process.data_range) != (lo, hi):
            raise ValueError(
                f"data_range={[lo, hi]}: the process clips to {list(process.data_range)}; give both the "
                "same range (module.process.data_range: ${module.data_range})"
            )
        super().__init__(net, process, time_sampler, prediction=prediction, **kw)
        self.sampler, self.data_range = sampler, (lo, hi)

    def to_process(self, x: Tensor) -> Tensor:
        """[−1, 1] (the datamodule's range) -> ``data_range``."""
        lo, hi = self.data_range
        return x if (lo, hi) == (-1.0, 1.0) else lo + (x + 1) * (hi - lo) / 2

    def from_process(self, x: Tensor) -> Tensor:
        lo, hi = self.data_range
        return x if (lo, hi) == (-1.0, 1.0) else (x - lo) * 2 / (hi - lo) - 1

    def loss(self, x0: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return super().loss(self.to_process(x0), labels)

    def sample(
        self, seeds, steps: int | None = None, eta: float | None = None, use_ema: bool = True, **kw
    ) -> Tensor:
        user_cb = kw.pop("callback", None)

        def callback(d: dict) -> None:
            t = torch.full((d["x0_hat"].shape[0],), d["t"], device=d["x0_hat"].device)
            visible = self.from_process(self.process.visible_x0(d["x0_hat"], t))
            user_cb({**d, "x": self.from_process(d["x"]), "x0_hat": visible})

        cb = None if user_cb is None else callback
        clip = kw.pop("clip_x0", self.clip_x0)
        if self.sampler == "predictor":
            x = self.run_sampler(sample_predictor, seeds, steps, use_ema, callback=cb, **kw)
        else:
            eta = self.sample_eta if eta is None else eta
            x = self.run_sampler(
                sample_ancestral, seeds, steps, use_ema, eta=eta, clip_x0=clip, callback=cb, **kw
            )
        return self.from_process(x)
