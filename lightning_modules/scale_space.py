"""Scale Space Diffusion (Mukhopadhyay et al.; docs/methods/scale_space.md) as a thin DDPM module.

Everything method-specific is in ``freqdiff.processes.scale_space.ScaleSpaceProcess`` and the
Flexi-UNet (``freqdiff.nets.flexi_unet``); this module wires them:

- Training: the network predicts x0 at the *next* resolution r(s), s = t − 1/T (target
  ``process.x0_at(x0, s)``), weight min(SNR_t, 5) in x0 space (``process.loss_weight``). Batches have
  one resolution (the official rule): one step j is drawn per batch from the rank-*shared* generator,
  so every DDP rank runs the same resolution; a resolution-change step gives the whole batch that j,
  otherwise each element draws its own step (this rank's generator) from the steps of the same
  segment (same resolution, change steps excluded).
- Sampling: ``sample_ancestral`` on ``process.sample_grid(steps)``, which keeps every change step;
  ``sample_eta`` 1 is the paper's ancestral sampler (1000 steps), 0 DDIM between the changes (a change
  step is always the exact posterior). The final step returns x0_hat (the official loop returns x at
  t = 1/T, 0.01 noise left).
- ``levels: 1`` is the same-backbone DDPM baseline (x0-prediction, Min-SNR-5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from freqdiff.processes.base import NoiseSource
from freqdiff.processes.scale_space import ScaleSpaceProcess
from freqdiff.samplers import sample_ancestral
from lightning_modules.ddpm import DDPMModule


class ScaleSpaceModule(DDPMModule):
    def __init__(
        self,
        net: nn.Module,  # FlexiUNet (freqdiff.nets.flexi_unet.flexi); a UNet only for levels: 1
        process: ScaleSpaceProcess,
        prediction: str = "x0",  # the only prediction the process declares
        sample_steps: int = 1000,  # grid steps (change steps always kept); the paper: 1000
        sample_eta: float = 1.0,  # 1: ancestral (the paper); 0: DDIM between resolution changes
        **ddpm,  # DDPMModule / DiffusionModule arguments (lr, ema_decay, channels, ...)
    ):
        if not isinstance(process, ScaleSpaceProcess):
            raise ValueError(f"process={type(process).__name__}: expected a ScaleSpaceProcess")
        levels = getattr(net, "levels", [process.image_resolution])
        missing = sorted(set(process.levels) - set(levels))
        if missing:
            raise ValueError(
                f"net: its levels {sorted(levels)} lack the process's {missing} "
                "(module.net: freqdiff.nets.flexi_unet.flexi with as many levels as the process)"
            )
        steps = dict(sample_steps=sample_steps, sample_eta=sample_eta)
        super().__init__(net, process, None, prediction=prediction, **steps, **ddpm)  # draws its own t
        change = set(process.change_steps())
        self._change = sorted(change)
        segs: dict[int, list[int]] = {}
        for j, r in enumerate(process.step_res):
            if j not in change:
                segs.setdefault(r, []).append(j)
        self._segments = {r: torch.tensor(v) for r, v in segs.items()}

    def draw_steps(self, n: int, device) -> Tensor:
        """Steps j [n] of one batch: one shared draw; a change step for all, else one segment's steps."""
        T = self.process.T
        j = int(torch.randint(T, (1,), generator=self.generator(shared=True), device=self.device).cpu())
        if j in self._change:
            return torch.full((n,), j, device=device)
        seg = self._segments[self.process.step_res[j]]
        g = self.generator()
        idx = torch.randint(len(seg), (n,), generator=g, device=g.device).cpu()
        return seg[idx].to(device)

    def loss(self, x0: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        T = self.process.T
        j = self.draw_steps(x0.shape[0], x0.device)
        t, s = (j + 1).float() / T, j.float() / T  # s: the previous step (j = 0: the data)
        x_t, eps = self.process.marginal(x0, t, NoiseSource(self.generator(), x0.device))
        target = self.process.x0_at(x0, s)
        per = self.denoiser.loss(
            target, eps, x_t, t, self.process.loss_weight(t), labels, out_resolution=target.shape[-1]
        )
        return per, t

    def reported_steps(self, steps: int | None = None) -> int:
        return len(self.process.sample_grid(steps or self.sample_steps)) - 1

    def sample(
        self, seeds, steps: int | None = None, eta: float | None = None, use_ema: bool = True, **kw
    ) -> Tensor:
        grid = self.process.sample_grid(steps or self.sample_steps)
        eta = self.sample_eta if eta is None else eta
        clip = kw.pop("clip_x0", self.clip_x0)
        return self.run_sampler(
            sample_ancestral, seeds, len(grid) - 1, use_ema, eta=eta, timesteps=grid, clip_x0=clip, **kw
        )
