"""ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", App. A; Nichol & Dhariwal 2021).

The same family as NVlabs EDM's ``DhariwalUNet`` (Karras et al. 2022) and the backbone of every
method here (docs/methods/): DDPM baseline, blur diffusion (121 M at 64²), Relay's two EDM
stages, and Scale Space Diffusion's Flexi-UNet, which reuses these parts level by level.

- Residual blocks: GroupNorm, SiLU, 3x3 conv; the embedding modulates the second norm by adaptive
  scale-shift, ``h = GN(h) (1 + scale) + shift`` (ADM "use_scale_shift_norm"); dropout; a zero-initialised
  last conv; a 1x1 skip conv where the width changes; up/down-sampling inside the block
  (ADM "resblock_updown": nearest / 2x2 average on both paths) or by a separate (strided) 3x3 conv.
- Multi-head self-attention (``scaled_dot_product_attention``) at the listed resolutions, ``head_channels``
  per head, zero-initialised output projection; ADM's middle block always has one.
- Conditioning: sinusoidal embedding of the float ``c_noise`` as given (EDM's PositionalEmbedding,
  max_positions 10000: the same code serves ``1000 t`` and ``ln(sigma)/4``), an MLP, plus an optional
  class embedding (``labels=None`` means "no label": the unconditional branch for guidance; a label
  ``NULL_LABEL`` = −1 is the same per sample, which is how label dropout trains that branch).
- The output conv is zero-initialised, so a fresh net outputs exactly 0.
- Options that change speed and memory, never the function: ``checkpoint`` (gradient checkpointing:
  in training, every residual block's activations are recomputed in the backward pass instead of
  stored, ADM's ``use_checkpoint``) and ``channels_last`` (weights and features in NHWC memory
  format, the layout GPU convolution kernels prefer; the output is returned contiguous NCHW).
  ``benchmarks/train_options.py`` measures both (docs/performance.md).

Layout (what ``FlexiUNet`` builds on): ``conv_in`` -> ``encode`` over ``enc[level]`` -> ``middle`` ->
``decode`` over ``dec[level]`` -> ``head``. Each ``enc[level]`` / ``dec[level]`` is a ``Level``: an optional
resampling block (the down-sampler *into* the level, the up-sampler *from* the level below) and its
blocks. Skip connections are grouped per level, so ``encode`` can start at any level and ``decode`` can
stop at any level; missing skips (levels the encoder never visited) are zeros.
"""

from __future__ import annotations

from numbers import Integral

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

NULL_LABEL = -1  # the class label of the unconditional branch (classifier-free guidance)


def group_norm(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups and at least 4 channels per group (EDM), so tiny widths work."""
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-5)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def noise_embedding(c_noise: Tensor, channels: int, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding of a float [B] -> [B, channels] (EDM PositionalEmbedding, endpoint=False).

    Frequencies run geometrically from 1 down to 1/max_positions, so both c_noise = 1000 t (DDPM) and
    c_noise = ln(sigma)/4 (EDM) land on channels that resolve them. Computed in fp32 under autocast.
    """
    half = channels // 2
    freqs = (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
    x = c_noise.float()[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.cos(x), torch.sin(x)], dim=1)  # [B, channels]


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual (ADM AttentionBlock)."""

    def __init__(
        self,
        channels: int,  # C of the features
        head_channels: int = 64,  # channels per head; heads = C // head_channels (at least 1)
        num_heads: int = 0,  # > 0: this many heads whatever the width (overrides head_channels)
    ):
        super().__init__()
        self.heads = num_heads if num_heads > 0 else max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"attention: {channels} channels do not split into {self.heads} heads")
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [B, heads, HW, d]
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, d]
        a = a.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(a)


class UNetBlock(nn.Module):
    """ADM residual block with embedding conditioning, optional up/down-sampling and attention."""

    def __init__(
        self,
        in_channels: int,  # input width
        out_channels: int,  # output width
        emb_channels: int,  # width of the conditioning embedding
        resample: str | None = None,  # None, "up" (nearest 2x) or "down" (2x2 average) on both paths
        attention: bool = False,  # self-attention after the residual part
        head_channels: int = 64,  # channels per attention head
        num_heads: int = 0,  # > 0: fixed number of heads (overrides head_channels)
        dropout: float = 0.0,  # dropout before the last conv
        scale_shift: bool = True,  # adaptive GroupNorm h*(1+scale)+shift (ADM); else h + emb
    ):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample, self.scale_shift = resample, scale_shift
        self.norm0 = group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1))
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.attn = Attention(out_channels, head_channels, num_heads) if attention else None

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm0(x))
        h = self.conv0(self._resample(h))  # [B, out, H', W']
        x = self._resample(x)
        e = self.affine(emb)[:, :, None, None]  # emb is already SiLU'd by UNet.embed
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * (1 + scale) + shift)
        else:
            h = F.silu(self.norm1(h + e))
        h = self.skip(x) + self.conv1(self.dropout(h))
        return h if self.attn is None else self.attn(h)


class ConvResample(nn.Module):
    """Resampling without a residual block (ADM resblock_updown=False): strided 3x3 conv, or nearest + 3x3."""

    def __init__(self, channels: int, mode: str):
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if mode == "down" else 1, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.mode == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class Level(nn.Module):
    """One resolution of the encoder or decoder: an optional resampling block, then ``blocks``."""

    def __init__(self, resample: nn.Module | None, blocks: list[UNetBlock], resolution: int):
        super().__init__()
        self.resample = resample  # encoder: down-sampler from the level above; decoder: up-sampler from below
        self.blocks = nn.ModuleList(blocks)
        self.resolution = resolution  # nominal resolution of this level (at the constructor's resolution)


class UNet(nn.Module):
    """ADM UNet: ``forward(x [B,C,H,W], c_noise [B], labels [B] | None) -> [B, out_channels, H, W]``."""

    def __init__(
        self,
        in_channels: int = 3,  # image channels in
        out_channels: int = 3,  # channels out (e.g. 6 for learned variance)
        resolution: int = 32,  # nominal input resolution; places attention by resolution
        model_channels: int = 64,  # base width
        channel_mult: tuple[int, ...] = (1, 2, 2),  # width multiplier per level; one level per resolution
        num_res_blocks: int = 2,  # residual blocks per encoder level (decoder: one more)
        attn_resolutions: tuple[int, ...] = (16,),  # resolutions whose blocks have self-attention
        dropout: float = 0.0,  # dropout inside residual blocks
        head_channels: int = 64,  # channels per attention head
        num_heads: int = 0,  # > 0: fixed number of heads at every width (overrides head_channels)
        num_classes: int = 0,  # > 0: class-conditional with an embedding table
        emb_mult: int = 4,  # embedding width = emb_mult * model_channels
        resblock_updown: bool = True,  # resample with residual blocks (ADM) rather than 3x3 convs
        scale_shift: bool = True,  # adaptive scale-shift GroupNorm (ADM); False: add the embedding
        mid_attention: bool = True,  # self-attention in the middle block (ADM always has it)
        max_positions: int = 10000,  # lowest frequency of the c_noise embedding is 1/max_positions
        checkpoint: bool = False,  # gradient checkpointing of every residual block while training
        channels_last: bool = False,  # NHWC memory format for weights and features
    ):
        super().__init__()
        num_levels = len(channel_mult)
        factor = 2 ** (num_levels - 1)
        if isinstance(resolution, bool) or not isinstance(resolution, Integral) or resolution < 1:
            raise ValueError(f"resolution={resolution!r}: expected a positive integer")
        if resolution % factor:
            raise ValueError(
                f"resolution {resolution}: expected a multiple of {factor} "
                f"for channel_mult={tuple(channel_mult)}"
            )
        resolutions = [resolution // 2**level for level in range(num_levels)]
        unknown = sorted(set(attn_resolutions) - set(resolutions), reverse=True)
        if unknown:
            raise ValueError(
                f"attn_resolutions {unknown} are not among the level resolutions {resolutions} "
                f"at resolution {resolution}"
            )
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.num_classes, self.model_channels, self.max_positions = num_classes, model_channels, max_positions
        self.num_levels, self.level_resolutions = num_levels, resolutions
        self.channels = [model_channels * m for m in channel_mult]  # block width per level
        emb_ch = emb_mult * model_channels
        kw = dict(
            emb_channels=emb_ch,
            head_channels=head_channels,
            num_heads=num_heads,
            dropout=dropout,
            scale_shift=scale_shift,
        )

        # Conditioning: sinusoid(c_noise) -> Linear -> SiLU -> Linear (+ class embedding) -> SiLU.
        self.map0 = nn.Linear(model_channels, emb_ch)
        self.map1 = nn.Linear(emb_ch, emb_ch)
        self.label_emb = nn.Embedding(num_classes, emb_ch) if num_classes > 0 else None

        # Encoder. skip_channels[level]: widths of the skips the level pushes (entry first).
        self.conv_in = nn.Conv2d(in_channels, self.channels[0], 3, padding=1)
        self.skip_channels: list[list[int]] = []
        self.enc = nn.ModuleList()
        ch = self.channels[0]
        for level, (res, width) in enumerate(zip(resolutions, self.channels)):
            down = None
            if level > 0:
                down = (
                    UNetBlock(ch, ch, resample="down", **kw) if resblock_updown else ConvResample(ch, "down")
                )
            skips, blocks = [ch], []
            for _ in range(num_res_blocks):
                blocks.append(UNetBlock(ch, width, attention=res in attn_resolutions, **kw))
                ch = width
                skips.append(ch)
            self.skip_channels.append(skips)
            self.enc.append(Level(down, blocks, res))

        # Middle: res block with attention, res block (ADM).
        self.mid = nn.ModuleList([UNetBlock(ch, ch, attention=mid_attention, **kw), UNetBlock(ch, ch, **kw)])

        # Decoder, stored by level like the encoder; built bottom-up. Level l's up-sampler takes
        # level l+1's output (width ch) to level l's resolution.
        dec: list[Level] = [None] * num_levels  # type: ignore[list-item]
        for level in reversed(range(num_levels)):
            res, width = resolutions[level], self.channels[level]
            up = None
            if level < num_levels - 1:
                up = UNetBlock(ch, ch, resample="up", **kw) if resblock_updown else ConvResample(ch, "up")
            blocks = []
            for skip_ch in reversed(self.skip_channels[level]):
                blocks.append(UNetBlock(ch + skip_ch, width, attention=res in attn_resolutions, **kw))
                ch = width
            dec[level] = Level(up, blocks, res)
        self.dec = nn.ModuleList(dec)

        self.out_norm = group_norm(ch)
        self.out_conv = zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        self.checkpoint, self.channels_last = bool(checkpoint), bool(channels_last)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def run_block(self, block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        """``block(h, emb)``, under gradient checkpointing when ``checkpoint`` is on and grads are taken."""
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    # --- parts, in the order forward uses them -------------------------------------------------
    def embed(self, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """c_noise [B] float (and labels [B] long) -> SiLU'd embedding [B, emb_mult * model_channels]."""
        emb = F.silu(self.map0(noise_embedding(c_noise, self.model_channels, self.max_positions)))
        emb = self.map1(emb)
        if labels is not None:
            if self.label_emb is None:
                raise ValueError("labels were given to a UNet built with num_classes=0")
            labels = labels.long()
            keep = labels != NULL_LABEL  # the null label adds no class embedding
            if bool(((labels < 0) & keep).any()) or bool((labels >= self.label_emb.num_embeddings).any()):
                raise ValueError(
                    f"labels must be in [0, {self.label_emb.num_embeddings}) or {NULL_LABEL} (the null label)"
                )
            emb = emb + self.label_emb(labels.clamp(min=0)) * keep[:, None].to(emb.dtype)
        return F.silu(emb)

    def stem(self, x: Tensor) -> Tensor:
        """``conv_in`` of the image, in the net's memory format -> [B, channels[0], H, W]."""
        return self.conv_in(x.contiguous(memory_format=self.memory_format))

    def encode(
        self, h: Tensor, emb: Tensor, start_level: int = 0
    ) -> tuple[Tensor, list[list[Tensor] | None]]:
        """Run the encoder from ``start_level`` down.

        h: the level's entry features [B, skip_channels[start_level][0], H_l, W_l]
           (``conv_in(x)`` at level 0; a 1x1 adapter's output when entering lower).
        Returns the bottom features and the skips per level (None for levels above ``start_level``).
        """
        skips: list[list[Tensor] | None] = [None] * self.num_levels
        for level in range(start_level, self.num_levels):
            enc = self.enc[level]
            if level > start_level:
                h = self.run_block(enc.resample, h, emb)  # [B, C, H/2, W/2]
            skips[level] = [h]
            for block in enc.blocks:
                h = self.run_block(block, h, emb)
                skips[level].append(h)
        return h, skips

    def middle(self, h: Tensor, emb: Tensor) -> Tensor:
        for block in self.mid:
            h = self.run_block(block, h, emb)
        return h

    def decode(self, h: Tensor, emb: Tensor, skips: list[list[Tensor] | None], stop_level: int = 0) -> Tensor:
        """Run the decoder from the bottom up to ``stop_level``; returns [B, channels[stop_level], H_l, W_l].

        A level whose skips are None (the encoder started below it) gets zeros in their place.
        """
        for level in reversed(range(stop_level, self.num_levels)):
            dec = self.dec[level]
            if dec.resample is not None:
                h = self.run_block(dec.resample, h, emb)  # [B, C, 2H, 2W]
            stack = list(skips[level]) if skips[level] is not None else None
            for i, block in enumerate(dec.blocks):
                if stack is not None:
                    s = stack.pop()
                else:
                    s = h.new_zeros(h.shape[0], self.skip_channels[level][-1 - i], *h.shape[2:])
                h = self.run_block(block, torch.cat([h, s], dim=1), emb)
        return h

    def head(self, h: Tensor) -> Tensor:
        """[B, channels[0], H, W] -> [B, out_channels, H, W], always in fp32 with autocast off.

        The output layer is the one whose error reaches x0_hat multiplied (by σ/a for ε-prediction:
        ~157 at t = 1 for linear β), so it never runs in bf16 (the precision policy, processes/ops.py).
        """
        with torch.autocast(h.device.type, enabled=False):
            return self.out_conv(F.silu(self.out_norm(h.float()))).contiguous()

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        B, _, H, W = x.shape
        factor = 2 ** (self.num_levels - 1)
        if H % factor or W % factor:
            raise ValueError(f"input resolution {H}x{W} is not divisible by 2**(levels-1) = {factor}")
        c_noise = torch.as_tensor(c_noise, device=x.device).reshape(-1).expand(B)
        emb = self.embed(c_noise, labels)
        h = self.stem(x)  # [B, channels[0], H, W]
        h, skips = self.encode(h, emb)  # [B, channels[-1], H/f, W/f]
        h = self.middle(h, emb)
        h = self.decode(h, emb, skips)  # [B, channels[0], H, W]
        return self.head(h)
