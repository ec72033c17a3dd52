"""DDPM baseline (Ho et al. 2020; METHODS.md §1) as a thin DiffusionModule.

Loss: the natural loss of the Denoiser's parameterisation, ``|F − target|²`` per sample (ε-prediction
gives Ho et al.'s L_simple), times an optional weighting: ``min_snr`` = γ multiplies the x0-space loss
by ``min(SNR, γ)`` (Hang et al. 2023), expressed in the output space of the parameterisation.
Sampling: ``sample_ancestral`` (DDPM for eta = 1, DDIM for eta = 0) with per-sample seeds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from freqdiff.nets.precond import Denoiser
from freqdiff.processes.base import NoiseSource
from freqdiff.processes.gaussian import GaussianProcess
from freqdiff.samplers import sample_ancestral
from lightning_modules.base import DiffusionModule


class DDPMModule(DiffusionModule):
    def __init__(
        self,
        net: nn.Module,  # backbone, e.g. freqdiff.nets.presets.unet
        process: GaussianProcess,  # forward process (schedule, T, shift)
        time_sampler,  # training t sampler, (n, generator) -> t
        prediction: str = "eps",  # eps | x0 | v | edm
        min_snr: float | None = None,  # Min-SNR-γ weighting (None: the natural loss)
        sample_steps: int = 50,  # default sampling steps
        sample_eta: float = 0.0,  # default eta (0 DDIM, 1 DDPM)
        clip_x0: bool = False,  # clamp x0_hat during sampling
        channels: int = 3,  # image channels
        **base,  # DiffusionModule arguments (lr, ema_halflife_kimg, ...)
    ):
        super().__init__(Denoiser(net, process, prediction), **base)
        self.process, self.time_sampler, self.min_snr = process, time_sampler, min_snr
        self.sample_steps, self.sample_eta, self.clip_x0, self.channels = (
            sample_steps,
            sample_eta,
            clip_x0,
            channels,
        )

    def _weight(self, t: Tensor) -> Tensor:
        if self.min_snr is None:
            return torch.ones_like(t)
        snr = self.process.snr(t)
        # the natural loss of each parameterisation equals w_nat * |x0_hat - x0|^2:
        sd2 = self.denoiser.sigma_data**2
        w_nat = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1, "edm": snr + 1 / sd2}[
            self.denoiser.prediction
        ]
        return snr.clamp(max=self.min_snr) / w_nat

    def loss(self, x0: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        t = self.time_sampler(x0.shape[0], device=x0.device)
        x_t, eps = self.process.marginal(x0, t, NoiseSource(None, x0.device))
        F = self.denoiser.raw(x_t, t, labels)
        target = self.denoiser.target(x0, eps, x_t, t)
        per_sample = ((F - target) ** 2).flatten(1).mean(1) * self._weight(t)
        return per_sample, t

    @torch.no_grad()
    def sample(
        self, seeds, steps: int | None = None, eta: float | None = None, use_ema: bool = True, **kw
    ) -> Tensor:
        res = self.process.resolution(0.0)
        with self.sampling(use_ema) as net:
            return sample_ancestral(
                self.process,
                net,
                seeds,
                (self.channels, res, res),
                steps=steps or self.sample_steps,
                eta=self.sample_eta if eta is None else eta,
                clip_x0=kw.pop("clip_x0", self.clip_x0),
                device=self.device,
                **kw,
            )
