"""Reading runs back: find a checkpoint, load it safely, rebuild the module it was trained as (DESIGN.md §3).

Lives in the core (no Lightning import) so that both the runner and the method modules may use it:
Relay's stage 2 loads its stage-1 run with ``load_run`` without importing ``experiments``.

- ``CONFIG_KEY``: where ``callbacks.checkpoint.EmbedConfig`` puts the resolved config in a checkpoint.
- ``find_checkpoint(path)``: a run folder (``<run>/checkpoints/last.ckpt``) or a ``.ckpt`` file.
- ``read_checkpoint(path)``: ``torch.load(weights_only=True)``: tensors and plain containers only, no
  code runs while loading; a foreign, truncated or unsafe file raises ``CheckpointError`` naming it.
- ``load_run(path)``: rebuilds the module from the embedded config and loads its weights (EMA too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from freqdiff.config import instantiate

CONFIG_KEY = "freqdiff_config"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what was wrong."""


def find_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.ckpt"
    if not p.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {p} (expected a run folder with checkpoints/last.ckpt or a .ckpt)"
        )
    return p


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict of a run folder or file, loaded with ``weights_only=True``."""
    p = find_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of arbitrary objects, not a torch file, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{p}: not a readable freqdiff checkpoint ({type(e).__name__}: {reason[:300]})"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{p}: not a Lightning checkpoint (no 'state_dict')")
    if CONFIG_KEY not in ckpt:
        raise CheckpointError(
            f"{p}: checkpoint has no embedded freqdiff config (key {CONFIG_KEY!r}); "
            "was it written by `python -m experiments run`?"
        )
    return ckpt


def load_run(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Any, DictConfig]:
    """Rebuild a trained module from a run folder or checkpoint; returns (module in eval mode, config)."""
    ckpt = read_checkpoint(path, map_location)
    cfg = OmegaConf.create(ckpt[CONFIG_KEY])
    module = instantiate(cfg.module, "module")
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{find_checkpoint(path)}: weights do not fit the embedded config: {e}") from e
    return module.eval(), cfg
