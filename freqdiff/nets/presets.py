"""Named sizes of the ADM UNet (Dhariwal & Nichol 2021), from the CPU quickstart to the papers' backbones.

``unet(preset, **overrides)`` builds ``freqdiff.nets.unet.UNet`` from a preset; overrides are UNet
keyword arguments (``resolution``, ``dropout``, ``num_classes``, ...). Parameter counts below are for the
preset as written (3 channels in and out, unconditional); ``tests/test_unet.py`` checks them, the 121 M
against the paper and edm_relay64 (with 1000 classes, 6 outputs) against ADM's 296 M.

| preset       | params   | use                                                                    |
|--------------|----------|------------------------------------------------------------------------|
| tiny         | 0.62 M   | CPU quickstart at 16-32² (docs/platform.md: < 1 M learns in minutes)   |
| small        | 4.31 M   | CPU experiments at 32²                                                 |
| base         | 30.58 M  | GPU-scale 32² (DDPM CIFAR-10 size)                                     |
| adm_blur64   | 121.06 M | blur diffusion, LSUN 64² (docs/methods/blur.md) and its DDPM baseline  |
| adm_celeba64 | 129.38 M | DDPM baseline on CelebA 64²: ADM's own 64² recipe at 128 channels      |
| edm_relay64  | 295.13 M | Relay stage 1 at 64² (EDM's ADM, docs/methods/relay.md)                |
| edm_relay256 | 552.81 M | Relay stage 2 at 256² (EDM's ADM, docs/methods/relay.md)               |
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from freqdiff.nets.unet import UNet

PRESETS: dict[str, dict[str, Any]] = {
    # 0.62 M. ~200 img/s training at 32² with bf16 on 2 cores (see `python -m benchmarks unet`).
    # Narrow and one block per level; conv resampling (ADM resblock_updown=False) keeps it cheap.
    "tiny": dict(
        resolution=32,
        model_channels=24,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_levels=(2,),  # attention at resolution / 4 (8² at 32², 16² at 64²), whatever the resolution
        head_channels=48,
        emb_mult=2,
        resblock_updown=False,
    ),
    # 4.31 M.
    "small": dict(
        resolution=32,
        model_channels=48,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        head_channels=32,
    ),
    # 30.58 M.
    "base": dict(
        resolution=32,
        model_channels=128,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        head_channels=64,
    ),
    # 121.06 M, as the paper reports. The official code (sangyun884/blur-diffusion, its guided_diffusion
    # UNetModel defaults) uses 4 heads at every width, scale-shift norm and conv resampling
    # (resblock_updown=False); with ADM's resblock up/down instead it would be 129.38 M.
    "adm_blur64": dict(
        resolution=64,
        model_channels=128,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attn_resolutions=(16, 8),
        num_heads=4,
        scale_shift=True,
        resblock_updown=False,
    ),
    # 129.38 M. ADM's 64² recipe (64 channels per head, resblock up/down, scale-shift) at 128 channels;
    # dropout 0.1 as in ADM's 64² models. Use adm_blur64 where the DDPM baseline must match blur diffusion.
    "adm_celeba64": dict(
        resolution=64,
        model_channels=128,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attn_resolutions=(16, 8),
        head_channels=64,
        dropout=0.1,
    ),
    # 295.13 M unconditional (295.90 M with 1000 classes, ADM's 296 M ImageNet-64 model; EDM's
    # DhariwalUNet). Dropout 0.15 as in the official CelebA-HQ stage-1 command (ImageNet: 0.1).
    # Not built: EDM's augmentation-label input (augment_dim=9 when --augment is on, +1.7 k parameters).
    "edm_relay64": dict(
        resolution=64,
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attn_resolutions=(32, 16, 8),
        head_channels=64,
        dropout=0.15,
    ),
    # 552.81 M unconditional. ADM's 256² layout as EDM/Relay configure it; dropout 0.2 as in the
    # official CelebA-HQ stage-2 command (ImageNet: 0.1).
    "edm_relay256": dict(
        resolution=256,
        model_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attn_resolutions=(32, 16, 8),
        head_channels=64,
        dropout=0.2,
    ),
}


def unet(preset: str = "tiny", **overrides: Any) -> UNet:
    """Build a UNet from a named preset; ``overrides`` replace the preset's keyword arguments."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {', '.join(map(repr, sorted(PRESETS)))}")
    accepted = set(inspect.signature(UNet).parameters) | {"attn_levels"}
    for key in overrides:
        if key not in accepted:
            hint = difflib.get_close_matches(key, sorted(accepted), n=1)
            raise TypeError(
                f"unet() got an unexpected keyword argument {key!r} (not a UNet argument)"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
    kwargs = {**PRESETS[preset], **overrides}
    levels = kwargs.pop("attn_levels", None)  # preset-relative attention: resolution / 2**level
    if levels is not None and "attn_resolutions" not in overrides:
        kwargs["attn_resolutions"] = tuple(int(kwargs.get("resolution", 32)) >> int(lv) for lv in levels)
    for key in ("channel_mult", "attn_resolutions"):  # YAML gives lists; keep the tuples hashable
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return UNet(**kwargs)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device: nothing is allocated)."""
    return sum(p.numel() for p in module.parameters())
