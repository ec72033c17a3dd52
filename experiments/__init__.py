"""Experiments: YAML configs and the composition root (run, load_run). ``python -m experiments --help``."""

import freqdiff  # noqa: F401  (installs the torchvision-on-CPU-torch import hook before lightning)
