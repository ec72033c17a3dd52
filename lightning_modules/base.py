"""DiffusionModule: what every method shares (docs/architecture.md, "Layers": a method's quirks stay in
its own files).

Owns the Denoiser, an explicit EMA copy of it, AdamW with linear LR warm-up and an optional decay
(``lr_schedule`` cosine or linear to ``lr_final · lr`` at ``lr_decay_steps``, by default the first
run's ``trainer.max_steps``; the end step is saved in the checkpoint, so resuming with a larger
``max_steps`` continues at the final LR instead of re-stretching the curve), and the logging every
method gets (docs/dashboards.md): ``train/loss``, ``train/loss_t{q}`` (per time quartile q = 0..3),
``train/lr`` (per param group, ``train/lr/<group>``, if several), ``train/grad_norm``,
``perf/img_per_s``, ``perf/kimg``, all of them only on the steps the logger writes (every
``trainer.log_every_n_steps``: Lightning's ``self.log`` costs ~1 ms of host time per call, 1 % of a
quickstart step each); the progress line reads ``last_loss`` and ``last_img_per_s``, set every step.
A method subclass implements two hooks:

- ``loss(x0, labels) -> (loss [B], t [B])``: per-sample training loss and the times drawn;
- ``sample(seeds, ...) -> images [B, C, H, W]`` in [-1, 1], with EMA weights by default.

EMA (Karras et al. 2022, EDM training loop): half-life in images, ``ema_halflife_kimg``, with a
warm-up: the half-life is ``min(halflife, rampup * images_seen)``, and per optimiser step
``beta = 0.5 ** (batch / halflife_images)``. Or, as most papers quote it, a fixed per-step decay
``ema_decay`` (e.g. 0.9999; no warm-up): the two are related by ``halflife_images = batch · ln 0.5 /
ln(decay)`` for the global batch (0.9999 at batch 64 is a half-life of 443.6 kimg). ``batch`` is
the global batch of the optimiser step: all micro-batches of a gradient accumulation, all ranks; the
image count ``nimg`` counts the same. The EMA copy takes no gradients (DDP would report unused
parameters otherwise); it lives in ``state_dict`` so checkpoints carry it.

Randomness (per rank, resumable without saved state): ``generator()`` is this rank's generator for
the current optimiser step and micro-batch, seeded by ``derive_seed(seed, "train", rank, global_step,
micro)``: every rank draws its own t and noise, and a resumed run continues the same streams (the
global step is in the checkpoint). ``generator(shared=True)`` is the same on every rank (batch-wide
decisions, e.g. one resolution per global batch). Resuming with another world size keeps every
stream well defined: ranks that existed draw what they would have drawn, new ranks get new streams
(the global batch then differs from the uninterrupted run's, as the data split does). At the start
of training the global torch RNG (dropout) is reseeded per rank as well.

``compile_backbone``: ``torch.compile`` of the backbone (``denoiser.net`` and its EMA copy, in place
through ``nn.Module.compile``, so parameter names and checkpoints are those of the eager net); the
process math, preconditioning and sampler loop stay eager (and in fp32). Off by default: on the CPU
the quickstart's step is 11 % faster compiled, but compiling takes about as long as the whole
quickstart trains (docs/performance.md); the first steps pay the compilation.

``train/grad_norm`` is the total L2 norm of all gradients of the optimiser's parameters, taken in
``on_before_optimizer_step``: after the backward of the last micro-batch (DDP has all-reduced them,
AMP's scaler has unscaled them; under bf16-mixed they are the fp32 parameters' grads) and before
Lightning clips them, so it is the norm ``gradient_clip_val`` acts on (``clip_grad_norm_``'s return
value). It and ``train/lr`` are computed only on the steps Lightning writes to the logger (every
``trainer.log_every_n_steps``): the other steps pay no norm kernels and no device→host sync.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from functools import partial

import lightning as L
import torch
from torch import Tensor

from freqdiff.config import check_args
from freqdiff.nets.precond import Denoiser
from freqdiff.rng import derive_seed

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(schedule: str, warmup: int, end: int | None, final: float, step: int) -> float:
    """The LR of optimiser step ``step`` (0-based) as a fraction of ``lr``: linear warm-up over
    ``warmup`` steps, then ``constant`` 1, or ``cosine`` / ``linear`` from 1 at the end of the warm-up
    to ``final`` at step ``end`` and ``final`` after it. A pure function of the step, so a resumed run
    (Lightning restores the scheduler's step count) continues the same curve."""
    if warmup and step + 1 < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or end is None:
        return 1.0
    span = max(end - warmup, 1)
    u = min(max(step + 1 - warmup, 0) / span, 1.0)  # 0 at the end of the warm-up, 1 at ``end``
    shape = 0.5 * (1.0 + math.cos(math.pi * u)) if schedule == "cosine" else 1.0 - u
    return final + (1.0 - final) * shape


class DiffusionModule(L.LightningModule):
    def __init__(
        self,
        denoiser: Denoiser,
        lr: float = 2e-4,  # AdamW learning rate after warm-up
        weight_decay: float = 0.0,  # AdamW weight decay
        betas: tuple[float, float] = (0.9, 0.999),  # AdamW betas
        warmup_steps: int = 0,  # linear LR warm-up, in optimiser steps
        lr_schedule: str = "constant",  # after warm-up: constant | cosine | linear (decay to lr_final)
        lr_decay_steps: int | None = None,  # step where cosine/linear reach lr_final (None: max_steps)
        lr_final: float = 0.0,  # the decayed LR as a fraction of lr
        ema_halflife_kimg: float = 500.0,  # EMA half-life in thousands of images
        ema_rampup: float | None = 0.05,  # half-life <= rampup * images seen (None: no warm-up)
        ema_decay: float | None = None,  # fixed per-step EMA decay (e.g. 0.9999); replaces the half-life
        seed: int = 0,  # root of the per-rank training generators (the runner passes run.seed)
        compile_backbone: bool | dict = False,  # torch.compile the backbone (a dict: its keyword arguments)
    ):
        super().__init__()
        check_args("a positive number", lr=lr)
        check_args("a non-negative number", weight_decay=weight_decay, ema_halflife_kimg=ema_halflife_kimg)
        check_args("a non-negative number", allow_none=True, ema_rampup=ema_rampup)
        check_args("a non-negative integer", warmup_steps=warmup_steps)
        if lr_schedule not in LR_SCHEDULES:
            choices = ", ".join(map(repr, LR_SCHEDULES))
            raise ValueError(f"lr_schedule={lr_schedule!r}: expected one of {choices}")
        check_args("a positive integer", allow_none=True, lr_decay_steps=lr_decay_steps)
        if not (isinstance(lr_final, (int, float)) and 0.0 <= lr_final <= 1.0):
            raise ValueError(f"lr_final={lr_final!r}: expected a fraction of lr in [0, 1]")
        check_args("an integer", seed=seed)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas={list(betas)!r}: expected two numbers in [0, 1)")
        if ema_decay is not None and not (isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0):
            raise ValueError(f"ema_decay={ema_decay!r}: expected a number in [0, 1) or null")
        self.denoiser = denoiser
        self.ema = copy.deepcopy(denoiser).requires_grad_(False)  # eval mode only while sampling
        self.compile_backbone = compile_backbone
        if compile_backbone:
            if not isinstance(compile_backbone, (bool, dict)):
                raise ValueError(
                    f"compile_backbone={compile_backbone!r}: expected true, false or a mapping of "
                    "torch.compile keyword arguments"
                )
            opts = {} if compile_backbone is True else dict(compile_backbone)
            for d in (self.denoiser, self.ema):  # in place: state_dict keys and checkpoints are unchanged
                d.net.compile(**opts)
        self.lr, self.weight_decay, self.betas, self.warmup_steps = (
            lr,
            weight_decay,
            tuple(betas),
            warmup_steps,
        )
        self.lr_schedule, self.lr_decay_steps, self.lr_final = lr_schedule, lr_decay_steps, float(lr_final)
        self._lr_decay_end: int | None = None  # the step cosine/linear end at, saved in checkpoints
        self.ema_halflife_kimg, self.ema_rampup, self.ema_decay = ema_halflife_kimg, ema_rampup, ema_decay
        self.seed = int(seed)
        self.register_buffer("nimg", torch.zeros((), dtype=torch.long))  # images seen, all ranks
        self._t_last: float | None = None
        self._pending_images = 0  # images of the micro-batches since the last optimiser step (this rank)
        self._micro = 0  # micro-batch index within the current gradient accumulation
        self._generators: dict = {}
        self.last_loss: Tensor | None = None  # this step's loss and img/s, for the progress line
        self.last_img_per_s: float | None = None
        self._ema_lists: tuple[list, list, list, list] | None = None  # (ema params, params, ema bufs, bufs)
        self._fused_optimizer = False  # set by configure_optimizers; the module then clips gradients itself

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

    # ---- randomness ----------------------------------------------------------------------------------
    def generator(self, shared: bool = False) -> torch.Generator:
        """This rank's (or, ``shared``, the all-rank) generator for the current step and micro-batch.

        The same object is returned for the whole micro-batch, so successive draws within it differ.
        """
        step, micro = int(self.global_step), self._micro
        key = (shared, step, micro)
        g = self._generators.get(key)
        if g is None:
            coords = ("shared", step, micro) if shared else ("train", int(self.global_rank), step, micro)
            g = torch.Generator(device=self.device)
            g.manual_seed(derive_seed(self.seed, *coords))
            self._generators = {k: v for k, v in self._generators.items() if k[1:] == (step, micro)}
            self._generators[key] = g
        return g

    def on_train_start(self) -> None:
        self._t_last = None
        self._pending_images, self._micro = 0, 0
        # dropout and anything else on the global RNG: a different stream per rank (L.seed_everything
        # gave every rank the same seed, which is right for the initial weights, wrong afterwards)
        torch.manual_seed(derive_seed(self.seed, "global", int(self.global_rank), int(self.global_step)))
        self._fit_time_sampler()

    def _fit_time_sampler(self) -> None:
        """A time sampler fitted to the data (``fit_data``: the spectrum-weighted one) gets the first
        ``n_images`` training images and the data's checksum as its cache key, on every rank alike."""
        sampler = getattr(self, "time_sampler", None)
        fit, dm = getattr(sampler, "fit_data", None), getattr(self._trainer, "datamodule", None)
        if not callable(fit) or dm is None or getattr(sampler, "spectrum", None) is not None:
            return
        from freqdiff.metrics.fid import manifest_checksum

        manifest = getattr(dm, "manifest", None) or {}
        n = min(int(sampler.n_images), int(manifest.get("count", sampler.n_images)))
        fit(dm.real_images(n, split="train"), key=manifest_checksum(manifest) if manifest else None)

    # ---- training ------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0 = batch["x0"]
        per_sample, t = self.loss(x0, batch.get("label"))
        self._pending_images += x0.shape[0]
        self._micro += 1
        loss = per_sample.mean()
        B = x0.shape[0]
        self.last_loss = loss.detach()  # the progress line reads it every few seconds (callbacks/progress.py)
        if self._logs_this_step():  # the logger writes only these steps: no work (and no sync) on the others
            self.log("train/loss", loss, prog_bar=True, batch_size=B)
            q = (t.detach() * 4).long().clamp(0, 3)
            for k in range(4):
                m = q == k
                if m.any():
                    self.log(f"train/loss_t{k}", per_sample.detach()[m].mean(), batch_size=int(m.sum()))
        return loss

    def _logs_this_step(self) -> bool:
        """Whether the logger writes the values logged at this step (every ``log_every_n_steps``)."""
        trainer = self._trainer
        if trainer is None:
            return True
        connector = getattr(trainer, "_logger_connector", None)
        return bool(trainer.loggers) and bool(getattr(connector, "should_update_logs", True))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimiser step, then the EMA and image count: both are in place before any callback
        (ModelCheckpoint included) sees the step, so a checkpoint at step N holds EMA and nimg of step N."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # the closure ran the last micro-batch's training_step: every micro-batch is counted now
        batch_images = self._pending_images * self.trainer.world_size
        self._pending_images, self._micro = 0, 0
        self.nimg += batch_images
        self._update_ema(batch_images)

    def on_before_optimizer_step(self, optimizer) -> None:
        """``train/lr`` and ``train/grad_norm`` (unclipped) on the steps the logger writes."""
        if not self._logs_this_step():
            return
        groups = optimizer.param_groups
        for i, group in enumerate(groups):
            tag = "train/lr" if len(groups) == 1 else f"train/lr/{group.get('name', i)}"
            self.log(tag, float(group["lr"]), batch_size=1)
        grads = [p.grad for group in groups for p in group["params"] if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads, 2.0), batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        batch_images = batch["x0"].shape[0] * self.trainer.world_size
        now = time.perf_counter()
        if self._t_last is not None:  # every step: the progress line averages it
            self.last_img_per_s = batch_images / max(now - self._t_last, 1e-9)
        self._t_last = now
        if self._logs_this_step():
            if self.last_img_per_s is not None:
                self.log("perf/img_per_s", self.last_img_per_s, batch_size=1)
            self.log("perf/kimg", self.nimg.float() / 1000, batch_size=1)

    def ema_beta(self, batch_images: int) -> float:
        """The EMA decay of one optimiser step of ``batch_images`` images (global batch)."""
        if self.ema_decay is not None:
            return float(self.ema_decay)
        halflife = self.ema_halflife_kimg * 1000
        if self.ema_rampup is not None:
            halflife = min(halflife, float(self.nimg) * self.ema_rampup)
        return 0.5 ** (batch_images / max(halflife, 1e-8))

    def _apply(self, fn, *args, **kwargs):
        self._ema_lists = None  # .to() / .cuda() / .half() may give new tensors: list them again
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def _update_ema(self, batch_images: int) -> None:
        beta = self.ema_beta(batch_images)
        self._last_ema_beta = beta
        if self._ema_lists is None:  # walking the module tree every step cost ~2 % of a quickstart step
            ema, net = self.ema, self.denoiser
            self._ema_lists = (
                list(ema.parameters()),
                list(net.parameters()),
                list(ema.buffers()),
                list(net.buffers()),
            )
        ema_p, p, ema_b, b = self._ema_lists
        torch._foreach_lerp_(ema_p, p, 1 - beta)
        if b:
            torch._foreach_copy_(ema_b, b)

    def configure_optimizers(self):
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        # The fused kernel: one call for all parameters (the per-tensor loop was 5 of a quickstart
        # step's ~90 ms on the CPU; the same numbers to 1e-7). Not with fp16's loss scaler, which a
        # fused step unscales internally, after clipping would have seen scaled gradients: foreach.
        precision = str(getattr(self._trainer, "precision", "32")) if self._trainer is not None else "32"
        fp16 = precision.startswith("16")
        fused = not fp16 and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        self._fused_optimizer = fused
        opt = torch.optim.AdamW(
            params,
            lr=self.lr,
            betas=self.betas,
            weight_decay=self.weight_decay,
            **({"fused": True} if fused else {"foreach": True}),
        )
        end = self.lr_decay_steps or self._lr_decay_end  # explicit, else the first run's max_steps
        if end is None and self.lr_schedule != "constant":
            end = getattr(self._trainer, "max_steps", -1) if self._trainer is not None else -1
            if end is None or end < 0:
                raise ValueError(
                    f"module.lr_schedule={self.lr_schedule!r} without module.lr_decay_steps needs "
                    f"trainer.max_steps, got {end!r}"
                )
        self._lr_decay_end = end
        factor = partial(lr_factor, self.lr_schedule, self.warmup_steps, end, self.lr_final)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._lr_decay_end is not None:  # a resumed run with more max_steps keeps this curve
            checkpoint["lr_decay_end"] = int(self._lr_decay_end)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._lr_decay_end = checkpoint.get("lr_decay_end")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's clipping, done here for the fused AdamW, which Lightning refuses to clip for
        (its check is for fp16's scaler; without one, as here, gradients are plain when clipped)."""
        if not self._fused_optimizer:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not gradient_clip_val:
            return None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))
        else:
            torch.nn.utils.clip_grad_norm_(params, float(gradient_clip_val))
        return None
