"""Flexi-UNet (Scale Space Diffusion, Mukhopadhyay et al.): one ADM UNet for every resolution.

In Scale Space Diffusion the degradation is downsampling: the state x_t has a side r(t) that
shrinks with t (e.g. 64 -> 32 -> 16 -> 8 over 4 levels), and a step t -> s predicts at r(s) >= r(t).
The Flexi-UNet serves every pair (r(t), r(s)) with one UNet (``freqdiff.nets.unet.UNet``), whose
level l has side ``resolution / 2**l``:

- entry: x_t of side r_e = levels[e] enters the encoder at level e. As in the official code
  (prateksha/ScaleSpaceDiffusion, ``guided_diffusion/unet.py::FlexiUNet``) the UNet's own 3x3
  ``conv_in`` embeds x_t at every resolution (a conv does not care about the side), then a 1x1
  *input adapter* maps its ``channels[0]`` features to ``skip_channels[e][0]``, the width the level's
  first block expects (the down-sampler's output in the full net). The encoder levels above e and
  their down-samplers are skipped; ``encode(h, emb, start_level=e)`` runs from there.
- exit: the decoder runs from the bottom up to level x with side r_x = out_resolution; levels the
  encoder never visited (between x and e) get zeros in place of their skips (``UNet.decode``).
  Decoder levels above x are not run. A 1x1 *output adapter* maps the level's ``channels[x]`` to
  ``channels[0]``, and the UNet's own ``head`` (GroupNorm, SiLU, zero-initialised 3x3 conv, fp32)
  produces ``[B, out_channels, r_x, r_x]``.
- at e = x = 0 no adapter runs: the forward is ``UNet.forward`` op for op (exactly equal).

Adapters are identity where the widths already match (e.g. entering level 1, whose first block
takes ``channels[0]``), and with ``share_adapters`` (the default, as the official code) levels whose
width pairs coincide share one adapter: channel_mult (1, 2, 2, 2) has one input adapter (c0 -> 2c0,
levels 2 and 3) and one output adapter (2c0 -> c0, levels 1-3). Their default init is kept: the
head's last conv is zero, so a fresh Flexi-UNet outputs exactly 0 at every (entry, exit), as the UNet.

Not reproduced from the official code (deliberately): (1) it runs the decoder only up to *before*
the last block of the exit level (that block carries the up-sampler at inner levels), so even at
full resolution the UNet's final decoder block never runs; here the exit level runs all its blocks.
(2) On a resolution-increasing step it also replaces the entry level's own entry skip by zeros;
here only the levels the encoder never visited get zeros. (3) Its ``unet_res_layer_map`` maps
resolutions that are not a level's side (ds_factor != 2) to a level and resizes the output; here x
must have a level's side. (4) A step into the full resolution is handled there by the process
(x_t upsampled to r(s) and run at full resolution); that choice belongs to the process, not here.

DDP: a step at one resolution pair leaves the other adapters, the encoder levels above the entry
and the decoder levels above the exit without gradients. Batches here use one resolution per global
step, shared across ranks, so the graph is the same on every rank but not from step to step:
DistributedDataParallel needs ``find_unused_parameters=True`` (Lightning:
``strategy: ddp_find_unused_parameters_true``), as the official trainer sets for every SSD run.
``FlexiUNet.needs_unused_parameters`` says so for a runner to read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from freqdiff.nets.presets import unet as preset_unet
from freqdiff.nets.unet import UNet


class FlexiUNet(nn.Module):
    """``forward(x [B,C,r,r], c_noise [B], labels, out_resolution) -> [B, out_channels, r_out, r_out]``."""

    # Steps at one resolution pair leave other parts unused: DDP needs find_unused_parameters=True.
    needs_unused_parameters = True

    def __init__(
        self,
        unet: UNet,  # the shared UNet (its conv_in, encoder, middle, decoder and head serve every level)
        share_adapters: bool = True,  # one adapter per width pair (official); False: one per level
    ):
        super().__init__()
        if not isinstance(unet, UNet):
            raise TypeError(f"FlexiUNet wraps a freqdiff.nets.unet.UNet, got {type(unet).__name__}")
        self.unet = unet
        self.share_adapters = share_adapters
        self.num_classes = unet.num_classes
        self.in_channels, self.out_channels = unet.in_channels, unet.out_channels
        self.resolution = unet.resolution  # full resolution (level 0)
        self.levels: list[int] = list(unet.level_resolutions)  # side per level, level 0 = full
        c0 = unet.channels[0]
        # Per level: the key of its adapter in the ModuleDict, or None (identity: level 0, equal widths).
        self.adapters_in, self.adapters_out = nn.ModuleDict(), nn.ModuleDict()
        self._in_keys: list[str | None] = [None]
        self._out_keys: list[str | None] = [None]
        for level in range(1, unet.num_levels):
            self._in_keys.append(self._add(self.adapters_in, level, c0, unet.skip_channels[level][0]))
            self._out_keys.append(self._add(self.adapters_out, level, unet.channels[level], c0))
        if unet.channels_last:  # the adapters in the UNet's memory format
            self.to(memory_format=torch.channels_last)

    def _add(self, adapters: nn.ModuleDict, level: int, c_in: int, c_out: int) -> str | None:
        if c_in == c_out:
            return None
        key = f"{c_in}_to_{c_out}" if self.share_adapters else f"level{level}"
        if key not in adapters:
            adapters[key] = nn.Conv2d(c_in, c_out, 1)
        return key

    def input_adapter(self, level: int) -> nn.Module:
        """The 1x1 conv taking conv_in's features into ``level`` (nn.Identity where none is needed)."""
        key = self._in_keys[level]
        return nn.Identity() if key is None else self.adapters_in[key]

    def output_adapter(self, level: int) -> nn.Module:
        """The 1x1 conv taking ``level``'s decoder output to the head (nn.Identity where none is needed)."""
        key = self._out_keys[level]
        return nn.Identity() if key is None else self.adapters_out[key]

    def level_of(self, side: int, what: str = "resolution") -> int:
        """The level whose side is ``side``; ValueError naming it and the levels otherwise."""
        if side not in self.levels:
            raise ValueError(
                f"{what} {side}: expected one of the Flexi-UNet's level resolutions {self.levels} "
                f"(full resolution {self.resolution})"
            )
        return self.levels.index(side)

    def forward(
        self,
        x: Tensor,  # [B, in_channels, r, r], r one of self.levels (the state's resolution r(t))
        c_noise: Tensor,  # [B] (or a scalar) noise conditioning, as UNet.forward
        labels: Tensor | None = None,  # [B] class labels (NULL_LABEL: unconditional) or None
        out_resolution: int | None = None,  # side of the output, r(s) >= r; None: r
    ) -> Tensor:
        if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"x of shape {tuple(x.shape)}: expected a square batch [B, C, r, r]")
        B, side = x.shape[0], x.shape[-1]
        entry = self.level_of(side, "input resolution")
        out_side = side if out_resolution is None else int(out_resolution)
        exit_ = self.level_of(out_side, "out_resolution")
        if exit_ > entry:
            raise ValueError(
                f"out_resolution {out_side} is below the input resolution {side}: expected "
                f"one of {self.levels[: entry + 1]} (a step t -> s only gains resolution)"
            )
        u = self.unet
        c_noise = torch.as_tensor(c_noise, device=x.device).reshape(-1).expand(B)
        emb = u.embed(c_noise, labels)
        h = self.input_adapter(entry)(u.stem(x))  # [B, skip_channels[entry][0], r, r]
        h, skips = u.encode(h, emb, start_level=entry)  # skips None above the entry level
        h = u.middle(h, emb)
        h = u.decode(h, emb, skips, stop_level=exit_)  # [B, channels[exit], r_out, r_out]
        return u.head(self.output_adapter(exit_)(h))


def flexi(preset: str = "tiny", share_adapters: bool = True, **overrides: Any) -> FlexiUNet:
    """A Flexi-UNet around ``presets.unet(preset, **overrides)`` (e.g. resolution=64, channel_mult)."""
    return FlexiUNet(preset_unet(preset, **overrides), share_adapters=share_adapters)
