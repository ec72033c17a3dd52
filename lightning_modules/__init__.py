"""LightningModules: ``base.DiffusionModule`` (EMA, optimiser, logging) and one thin file per method."""

import freqdiff  # noqa: F401  (installs the torchvision-on-CPU-torch import hook before lightning)
