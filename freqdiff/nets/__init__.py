"""Backbones: the ADM UNet family (Dhariwal & Nichol 2021) and its named size presets.

``precond.Denoiser`` wraps any of them (EDM-style preconditioning, Karras et al. 2022).
"""

from freqdiff.nets.presets import PRESETS, count_parameters, unet
from freqdiff.nets.unet import UNet

__all__ = ["PRESETS", "UNet", "count_parameters", "unet"]
