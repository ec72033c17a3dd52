"""Relay Diffusion's stage 2 (Teng et al. 2024; docs/methods/relay.md): a thin DDPM module.

Stage 1 is the spine's EDM (``EDMModule``, trained into its own run folder, sampled with Relay's
stochastic Heun through ``sde_scale``). This module trains stage 2 on its own, independent of stage 1
(so a cluster can train both at once), and *composes* the stage-1 run when it samples:
``sample()`` = stage-1 sample -> nearest upsample -> the truncated stage-2 sampler (``sample_relay``),
one noise source per seed across both stages, so every callback, ``make sample`` and ``make eval``
see one two-stage sampler. The stage-1 run is loaded lazily (``freqdiff.checkpoints.load_run``) from
``stage1`` (a run folder or checkpoint) and is not part of this module's weights or checkpoints.

- Training: ``u ~ U(0, 1)`` (``UniformTime``) drives σ and σ_B together; x = Blur(x0; σ_B) + σ n;
  EDM preconditioning (``prediction: edm``), target the unblurred x0, weight ``process.loss_weight``.
- Label dropout: with ``label_dropout`` = q > 0 a share q of each batch trains the unconditional branch
  (label ``NULL_LABEL``), which classifier-free guidance (``cfg_scale``) needs; the official script has
  neither, so q = 0 reproduces it. Class-conditional sampling without given labels uses
  ``seed mod num_classes`` for both stages, as the official scripts do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from freqdiff.checkpoints import LinkedRun
from freqdiff.config import check_args
from freqdiff.nets.unet import NULL_LABEL
from freqdiff.processes.base import NoiseSource
from freqdiff.processes.relay import RelayProcess
from freqdiff.samplers import relay_grid, sample_relay
from lightning_modules.ddpm import DDPMModule


class RelayModule(DDPMModule):
    def __init__(
        self,
        net: nn.Module,  # stage-2 backbone (edm_relay256 for the paper)
        process: RelayProcess,
        time_sampler,  # UniformTime: u ~ U(0, 1) (the official BlurLoss)
        prediction: str = "edm",  # edm (the paper) or x0
        stage1: str | None = None,  # stage-1 run folder or checkpoint (None: sample() needs x_low)
        stage1_steps: int | None = None,  # stage-1 sampler steps (None: that module's sample_steps)
        sample_steps: int = 150,  # N of the stage-2 Karras grid before truncation
        sigma_min: float = 0.008,  # stage-2 grid (official blur_sampler defaults)
        sigma_max: float = 80.0,
        rho: float = 7.0,
        truncation_sigma: float = 0.95,  # drop σ >= this (CelebA-HQ 0.95, ImageNet 0.9)
        sampler_pl: float | None = None,  # the sampler's σ -> u quantile (None: process.pl)
        s_noise: float = 0.2,  # fresh-noise fraction per blurring step
        corrector: bool = True,  # Heun-like correction (2 NFE per step)
        cfg_scale: float = 1.0,  # stage-2 classifier-free guidance (needs label_dropout in training)
        label_dropout: float = 0.0,  # share of each batch trained unconditionally
        **ddpm,  # DDPMModule / DiffusionModule arguments (channels, lr, ema_halflife_kimg, ...)
    ):
        if not isinstance(process, RelayProcess):
            raise ValueError(f"process={type(process).__name__}: expected a RelayProcess")
        check_args("a positive number", sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        check_args("a positive number", truncation_sigma=truncation_sigma)
        check_args("a positive number", allow_none=True, sampler_pl=sampler_pl)
        check_args("a positive integer", allow_none=True, stage1_steps=stage1_steps)
        check_args("a non-negative number", cfg_scale=cfg_scale)
        if not (isinstance(s_noise, (int, float)) and 0 <= s_noise <= 1):
            raise ValueError(f"s_noise={s_noise!r}: expected a number in [0, 1]")
        if not (isinstance(label_dropout, (int, float)) and 0 <= label_dropout < 1):
            raise ValueError(f"label_dropout={label_dropout!r}: expected a share in [0, 1)")
        num_classes = int(getattr(net, "num_classes", 0) or 0)
        if (label_dropout > 0 or cfg_scale != 1) and num_classes == 0:
            raise ValueError(
                f"label_dropout={label_dropout}, cfg_scale={cfg_scale}: guidance needs a class-conditional "
                "net (module.net.num_classes > 0)"
            )
        if abs(float(ddpm.get("sigma_data", 0.5)) - process.sigma_data) > 1e-12:
            raise ValueError(
                f"sigma_data={ddpm['sigma_data']}: the process's loss weight uses sigma_data="
                f"{process.sigma_data}; give both the same value"
            )
        super().__init__(net, process, time_sampler, prediction=prediction, sample_steps=sample_steps, **ddpm)
        self.stage1, self.stage1_steps = stage1, stage1_steps
        self.stage1_run = LinkedRun(stage1, "module.stage1")  # not a submodule: not trained or saved here
        self.sampler_kwargs = dict(
            sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, truncation_sigma=truncation_sigma,
            pl=sampler_pl, s_noise=s_noise, corrector=corrector, cfg_scale=cfg_scale,
        )  # fmt: skip
        self.label_dropout, self.num_classes = float(label_dropout), num_classes

    # ---- training -------------------------------------------------------------------------------------
    def loss(self, x0: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if labels is not None and self.label_dropout > 0:
            drop = torch.rand(labels.shape[0], generator=self.generator(), device=labels.device)
            labels = torch.where(drop < self.label_dropout, torch.full_like(labels, NULL_LABEL), labels)
        return super().loss(x0, labels)

    # ---- the two-stage sampler ------------------------------------------------------------------------
    def stage1_module(self):
        """The stage-1 module (EMA weights) on this module's device; its images must relay to this stage's."""
        m = self.stage1_run.module(self.device)
        res = int(m.process.resolution(0.0))
        if self.process.image_resolution % res or int(getattr(m, "channels", self.channels)) != self.channels:
            raise ValueError(
                f"module.stage1={self.stage1}: its {res}² images do not relay to this stage's "
                f"{self.process.image_resolution}² x {self.channels} channels"
            )
        return m

    def sampling_unavailable(self) -> str | None:
        """Why ``sample()`` cannot run yet (callbacks skip their samples then), or None."""
        return self.stage1_run.unavailable()

    def reported_steps(self, steps: int | None = None) -> int:
        """Steps the sampler reports through its callback: the truncated grid's points."""
        kw = {k: self.sampler_kwargs[k] for k in ("sigma_min", "sigma_max", "rho")}
        return len(
            relay_grid(steps or self.sample_steps, truncation=self.sampler_kwargs["truncation_sigma"], **kw)
        )

    def sampling_depends_on(self) -> dict:
        """What samples depend on beyond this checkpoint (the evaluation's cache key): stage 1's step."""
        return {} if self.stage1 is None else {"stage1-step": self.stage1_run.step()}

    def sample_stages(self, seeds) -> dict[str, Tensor]:
        """Each stage's images for the same seeds: {"stage 1 (h²)": x_low, "stage 2 (H²)": samples}."""
        noise = NoiseSource.from_seeds(seeds, self.device)
        labels = self._labels(seeds, None)
        x_low = self.stage1_module().sample(noise, steps=self.stage1_steps, labels=labels)
        x = self.sample(noise, x_low=x_low, labels=labels)
        h, H = x_low.shape[-1], x.shape[-1]
        return {f"stage 1 ({h}x{h})": x_low, f"stage 2 ({H}x{H})": x}

    def _labels(self, seeds, labels: Tensor | None) -> Tensor | None:
        if labels is None and self.num_classes and not isinstance(seeds, NoiseSource):
            return torch.as_tensor(list(seeds), device=self.device).long() % self.num_classes
        return labels

    def sample(
        self,
        seeds,
        steps: int | None = None,
        eta: float | None = None,
        use_ema: bool = True,
        x_low: Tensor | None = None,  # stage-1 images; None: sampled from the stage-1 run
        labels: Tensor | None = None,
        **kw,  # sample_relay keywords (callback, cfg_scale, s_noise, pl, ...)
    ) -> Tensor:
        """Two-stage samples [B, C, H, W]: stage 1 (unless ``x_low``), nearest upsample, stage 2."""
        if eta not in (None, 0, 0.0):  # DDPMModule's keyword (callbacks pass it through)
            raise ValueError("RelayModule's sampler has no eta: its stochasticity is s_noise")
        noise = seeds if isinstance(seeds, NoiseSource) else NoiseSource.from_seeds(seeds, self.device)
        labels = self._labels(seeds, labels)
        if x_low is None:
            x_low = self.stage1_module().sample(noise, steps=self.stage1_steps, labels=labels)
        return self.run_sampler(
            sample_relay, noise, steps, use_ema, x_low=x_low, labels=labels, **{**self.sampler_kwargs, **kw}
        )
