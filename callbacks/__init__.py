"""Callbacks: they only call ``pl_module.sample(...)``, so each works for every method."""

import freqdiff  # noqa: F401  (installs the torchvision-on-CPU-torch import hook before lightning)
