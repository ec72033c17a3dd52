"""DDPM baseline (Ho et al. 2020; docs/methods/ddpm.md) as a thin DiffusionModule.

Loss: the natural loss of the Denoiser's parameterisation, ``|F − target|²`` per sample (ε-prediction
gives Ho et al.'s L_simple), or an x0-space weight: ``min_snr`` = γ weights ``|x0_hat − x0|²`` by
``min(SNR, γ)`` (Hang et al. 2023), else the process's ``loss_weight`` (None: natural); the Denoiser
converts it to the output space. t and ε come from this rank's generator (``DiffusionModule.generator``).
Sampling: ``sample_ancestral`` (DDPM for eta = 1, DDIM for eta = 0) with per-sample seeds;
``clip_x0`` clamps x0_hat through ``process.clip_x0`` (Ho et al. clip to [-1, 1]).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from freqdiff.config import check_args
from freqdiff.nets.precond import PREDICTIONS, Denoiser
from freqdiff.processes.base import NoiseSource, Process
from freqdiff.samplers import sample_ancestral
from lightning_modules.base import DiffusionModule


class DDPMModule(DiffusionModule):
    def __init__(
        self,
        net: nn.Module,  # backbone, e.g. freqdiff.nets.presets.unet
        process: Process,  # forward process (GaussianProcess, EDMProcess, ...)
        time_sampler,  # training t sampler, (n, generator) -> t
        prediction: str = "eps",  # eps | x0 | v | edm
        min_snr: float | None = None,  # Min-SNR-γ weighting (None: the natural loss)
        sample_steps: int = 50,  # default sampling steps
        sample_eta: float = 0.0,  # default eta (0 DDIM, 1 DDPM)
        clip_x0: bool = False,  # clamp x0_hat during sampling
        channels: int = 3,  # image channels
        sigma_data: float = 0.5,  # σ_d of EDM preconditioning (prediction "edm")
        **base,  # DiffusionModule arguments (lr, ema_halflife_kimg, ...)
    ):
        if prediction not in PREDICTIONS:
            choices = ", ".join(map(repr, PREDICTIONS))
            raise ValueError(f"prediction={prediction!r}: expected one of {choices}")
        check_args("a positive integer", sample_steps=sample_steps, channels=channels)
        check_args("a non-negative number", sample_eta=sample_eta)
        check_args("a positive number", sigma_data=sigma_data)
        check_args("a positive number", allow_none=True, min_snr=min_snr)
        super().__init__(Denoiser(net, process, prediction, sigma_data), **base)
        self.process, self.time_sampler, self.min_snr = process, time_sampler, min_snr
        self.sample_steps, self.sample_eta, self.clip_x0, self.channels = (
            sample_steps,
            sample_eta,
            clip_x0,
            channels,
        )

    def _weight(self, t: Tensor) -> Tensor | None:
        """The x0-space loss weight [B] (None: the natural loss of the parameterisation)."""
        if self.min_snr is None:
            return self.process.loss_weight(t)
        a, sigma = self.process.scalings(t)
        return ((a / sigma.clamp(min=1e-20)) ** 2).clamp(max=self.min_snr)

    def loss(self, x0: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        g = self.generator()
        t = self.time_sampler(x0.shape[0], generator=g, device=x0.device, process=self.process)
        x_t, eps = self.process.marginal(x0, t, NoiseSource(g, x0.device))
        return self.denoiser.loss(x0, eps, x_t, t, self._weight(t), labels), t

    @torch.no_grad()
    def run_sampler(self, sampler, seeds, steps: int | None, use_ema: bool, **kw) -> Tensor:
        """``sampler(process, denoiser, seeds, shape, steps, device, **kw)`` with the (EMA) denoiser."""
        res = self.process.resolution(0.0)
        with self.sampling(use_ema) as net:
            shape = (self.channels, res, res)
            return sampler(
                self.process, net, seeds, shape, steps=steps or self.sample_steps, device=self.device, **kw
            )

    def sample(
        self, seeds, steps: int | None = None, eta: float | None = None, use_ema: bool = True, **kw
    ) -> Tensor:
        eta = self.sample_eta if eta is None else eta
        clip_x0 = kw.pop("clip_x0", self.clip_x0)
        return self.run_sampler(sample_ancestral, seeds, steps, use_ema, eta=eta, clip_x0=clip_x0, **kw)
