"""Experiments: YAML configs and the composition root (run, load_run). ``python -m experiments --help``."""

import freqdiff  # noqa: F401  (installs the torchvision-on-CPU-torch import hook before lightning)
from freqdiff.config import RECEIVERS

RECEIVERS["trainer"] = "lightning.Trainer"  # cfg.trainer holds lightning.Trainer's keyword arguments
