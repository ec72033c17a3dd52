"""DiffusionModule: what every method shares (DESIGN.md §2, "LightningModules stay thin").

Owns the Denoiser, an explicit EMA copy of it, AdamW with linear LR warm-up, and the logging every
method gets: ``train/loss``, ``train/loss_t{q}`` (per time quartile q = 0..3), ``perf/img_per_s``,
``perf/kimg``. A method subclass implements two hooks:

- ``loss(x0, labels) -> (loss [B], t [B])``: per-sample training loss and the times drawn;
- ``sample(seeds, ...) -> images [B, C, H, W]`` in [-1, 1], with EMA weights by default.

EMA (Karras et al. 2022, EDM training loop): half-life in images, ``ema_halflife_kimg``, with a
warm-up: the half-life is ``min(halflife, rampup * images_seen)``, and per step
``beta = 0.5 ** (batch / halflife_images)``. The EMA copy takes no gradients (DDP would report unused
parameters otherwise); it lives in ``state_dict`` so checkpoints carry it.
"""

from __future__ import annotations

import contextlib
import copy
import time

import lightning as L
import torch
from torch import Tensor

from freqdiff.nets.precond import Denoiser


class DiffusionModule(L.LightningModule):
    def __init__(
        self,
        denoiser: Denoiser,
        lr: float = 2e-4,  # AdamW learning rate after warm-up
        weight_decay: float = 0.0,  # AdamW weight decay
        betas: tuple[float, float] = (0.9, 0.999),  # AdamW betas
        warmup_steps: int = 0,  # linear LR warm-up, in optimiser steps
        ema_halflife_kimg: float = 500.0,  # EMA half-life in thousands of images
        ema_rampup: float | None = 0.05,  # half-life <= rampup * images seen (None: no warm-up)
    ):
        super().__init__()
        self.denoiser = denoiser
        self.ema = copy.deepcopy(denoiser).requires_grad_(False)  # eval mode only while sampling
        self.lr, self.weight_decay, self.betas, self.warmup_steps = (
            lr,
            weight_decay,
            tuple(betas),
            warmup_steps,
        )
        self.ema_halflife_kimg, self.ema_rampup = ema_halflife_kimg, ema_rampup
        self.register_buffer("nimg", torch.zeros((), dtype=torch.long))  # images seen, all ranks
        self._t_last: float | None = None

    # ---- hooks for methods ---------------------------------------------------------------------------
    def loss(self, x0: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sample(self, seeds, **kwargs) -> Tensor:
        raise NotImplementedError

    def net_for_sampling(self, use_ema: bool = True) -> Denoiser:
        return self.ema if use_ema else self.denoiser

    @contextlib.contextmanager
    def sampling(self, use_ema: bool = True):
        """Yields the denoiser to sample with, in eval mode (dropout off), restoring the mode after."""
        net = self.net_for_sampling(use_ema)
        was_training = net.training
        net.eval()
        try:
            yield net
        finally:
            net.train(was_training)

    # ---- training ------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0 = batch["x0"]
        self._batch_images = x0.shape[0]
        per_sample, t = self.loss(x0, batch.get("label"))
        loss = per_sample.mean()
        B = x0.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        q = (t.detach() * 4).long().clamp(0, 3)
        for k in range(4):
            m = q == k
            if m.any():
                self.log(f"train/loss_t{k}", per_sample.detach()[m].mean(), batch_size=int(m.sum()))
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimiser step, then the EMA and image count: both are in place before any callback
        (ModelCheckpoint included) sees the step, so a checkpoint at step N holds EMA and nimg of step N."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        batch_images = self._batch_images * self.trainer.world_size
        self.nimg += batch_images
        self._update_ema(batch_images)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        batch_images = batch["x0"].shape[0] * self.trainer.world_size
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("perf/img_per_s", batch_images / max(now - self._t_last, 1e-9), batch_size=1)
        self._t_last = now
        self.log("perf/kimg", self.nimg.float() / 1000, batch_size=1)

    @torch.no_grad()
    def _update_ema(self, batch_images: int) -> None:
        halflife = self.ema_halflife_kimg * 1000
        if self.ema_rampup is not None:
            halflife = min(halflife, float(self.nimg) * self.ema_rampup)
        beta = 0.5 ** (batch_images / max(halflife, 1e-8))
        for p_ema, p in zip(self.ema.parameters(), self.denoiser.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b in zip(self.ema.buffers(), self.denoiser.buffers()):
            b_ema.copy_(b)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.denoiser.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        warm = max(int(self.warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        self._t_last = None
