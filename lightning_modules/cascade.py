"""Chromatography-guided cascaded upscaling (docs/frequencies.md, "The cascade"): a thin DDPM module.

The high-resolution stage of a two-stage cascade, the plain-noise analogue of Relay Diffusion: it
trains as the DDPM baseline on its own (independent of stage 1), and *composes* a low-resolution
DDPM run when it samples: stage-1 sample ``x_low`` (h²) -> nearest upsample by n = H/h -> re-noise at
the high-resolution time t* -> this model's sampler from t* to 0 (``sample_ancestral`` with
``t_start``), one noise source per seed across both stages.

The hand-off time: average-pooling the re-noised state ``a x_up + σ ε`` by n divides the noise
variance by n², so its log-SNR at the low resolution is ``λ_hi(t*) + 2 ln n``. ``handoff_logsnr``
sets that low-resolution log-SNR; t* follows (``analysis.frequency.cascade_time``). The default 0
(pooled SNR 1) puts t* at the centre of the low-resolution level's chromatography bump, λ_hi = −2 ln n:
the noise hides what the low-resolution sample cannot know (the finer levels' bumps lie later) and
half of the coarse level's signal, which the high-resolution model then refines. ``t_start`` sets t*
directly instead. The re-noised state's pooled statistics are the low-resolution marginal's at the
matched time; its full covariance differs from the high-resolution marginal's by a_{t*}² times the
within-block signal covariance, which the high-resolution model has to make up
(``tests/test_cascade.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freqdiff.checkpoints import LinkedRun
from freqdiff.config import check_args
from freqdiff.processes.base import NoiseSource
from freqdiff.processes.ops import append_dims
from lightning_modules.ddpm import DDPMModule


def handoff_time(process, n: int, handoff_logsnr: float = 0.0) -> float:
    """t* with ``λ(t*) + 2 ln n = handoff_logsnr`` on the high-resolution process."""
    from freqdiff.analysis.frequency import cascade_time

    return float(cascade_time(process, handoff_logsnr, n)[0])


def renoise(process, x_up: Tensor, t: float, noise: NoiseSource) -> Tensor:
    """``a_t x_up + σ_t ε``: the upsampled low-resolution sample put at the high-resolution time t."""
    a, sigma = (append_dims(v, x_up.ndim) for v in process.scalings(torch.full((x_up.shape[0],), t)))
    return a.to(x_up) * x_up + sigma.to(x_up) * noise(x_up.shape).to(x_up)


class CascadeModule(DDPMModule):
    def __init__(
        self,
        net: nn.Module,
        process,  # the high-resolution process (a GaussianProcess)
        time_sampler,
        stage1: str | None = None,  # the low-resolution run folder or checkpoint (None: sample() needs x_low)
        stage1_steps: int | None = None,  # its sampler steps (None: that module's sample_steps)
        handoff_logsnr: float = 0.0,  # the pooled (low-resolution) log-SNR at the hand-off
        t_start: float | None = None,  # t* directly (None: from handoff_logsnr)
        **ddpm,  # DDPMModule arguments (prediction, sample_steps = steps from t* to 0, lr, ...)
    ):
        if not hasattr(process, "t_from_logsnr"):
            raise ValueError(
                f"process={type(process).__name__}: the cascade needs a process with t_from_logsnr"
            )
        if isinstance(handoff_logsnr, bool) or not isinstance(handoff_logsnr, (int, float)):
            raise ValueError(f"handoff_logsnr={handoff_logsnr!r}: expected a number (a log-SNR)")
        if t_start is not None and not (isinstance(t_start, (int, float)) and 0 < t_start <= 1):
            raise ValueError(f"t_start={t_start!r}: expected a time in (0, 1] or null")
        check_args("a positive integer", allow_none=True, stage1_steps=stage1_steps)
        super().__init__(net, process, time_sampler, **ddpm)
        self.stage1, self.stage1_steps = stage1, stage1_steps
        self.stage1_run = LinkedRun(stage1, "module.stage1")  # not a submodule: not trained or saved here
        self.handoff_logsnr, self.t_start = float(handoff_logsnr), t_start

    def factor(self, low_side: int) -> int:
        high = int(self.process.resolution(0.0))
        if high % low_side or high == low_side:
            raise ValueError(
                f"module.stage1={self.stage1}: its {low_side}² images do not upsample to this stage's {high}²"
            )
        return high // low_side

    def handoff(self, low_side: int) -> float:
        """t* for stage-1 images of side ``low_side``."""
        if self.t_start is not None:
            return float(self.t_start)
        return handoff_time(self.process, self.factor(low_side), self.handoff_logsnr)

    def sampling_unavailable(self) -> str | None:
        return self.stage1_run.unavailable()

    def sampling_depends_on(self) -> dict:
        return {} if self.stage1 is None else {"stage1-step": self.stage1_run.step()}

    def sample_stages(self, seeds) -> dict[str, Tensor]:
        """Each stage's images for the same seeds (the pipeline's stages panel)."""
        noise = NoiseSource.from_seeds(seeds, self.device)
        x_low = self.stage1_run.module(self.device).sample(noise, steps=self.stage1_steps)
        x = self.sample(noise, x_low=x_low)
        h, H = x_low.shape[-1], x.shape[-1]
        return {f"stage 1 ({h}x{h})": x_low, f"cascade ({H}x{H})": x}

    def sample(
        self,
        seeds,
        steps: int | None = None,
        eta: float | None = None,
        use_ema: bool = True,
        x_low: Tensor | None = None,  # stage-1 images; None: sampled from the stage-1 run
        **kw,  # DDPMModule.sample keywords (callback, clip_x0, ...)
    ) -> Tensor:
        """[B, C, H, W]: stage 1 (unless ``x_low``), nearest upsample, re-noise at t*, this stage to 0."""
        noise = seeds if isinstance(seeds, NoiseSource) else NoiseSource.from_seeds(seeds, self.device)
        if x_low is None:
            x_low = self.stage1_run.module(self.device).sample(noise, steps=self.stage1_steps)
        n = self.factor(int(x_low.shape[-1]))
        t_star = self.handoff(int(x_low.shape[-1]))
        up = F.interpolate(x_low.float().clamp(-1, 1), scale_factor=n, mode="nearest")
        x_start = renoise(self.process, up, t_star, noise)
        return super().sample(noise, steps, eta, use_ema, x=x_start, t_start=t_star, **kw)  # from t* to 0
