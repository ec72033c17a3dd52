"""Reading runs back: find a checkpoint, load it safely, rebuild the module it was trained as
(docs/architecture.md, Checkpoints).

Lives in the core (no Lightning import) so that both the runner and the method modules may use it:
Relay's stage 2 loads its stage-1 run with ``load_run`` without importing ``experiments``.

- ``CONFIG_KEY``: where ``callbacks.checkpoint.EmbedConfig`` puts the resolved config in a checkpoint.
- ``find_checkpoint(path)``: a run folder (``<run>/checkpoints/last.ckpt``) or a ``.ckpt`` file;
  ``run_folder(path)`` the run folder of either (where ``sample`` / ``eval`` write their outputs).
- ``read_checkpoint(path)``: ``torch.load(weights_only=True)``: tensors and plain containers only, no
  code runs while loading; a foreign, truncated or unsafe file raises ``CheckpointError`` naming it.
- ``load_run(path)``: rebuilds the module from the embedded config and loads its weights (EMA too).
  The embedded config is data from a file, not code the user wrote: every ``_target_`` in it must lie
  in one of the project's own packages (``TRUSTED_PACKAGES``), or in a package the user trusts
  explicitly (``trusted=`` or ``FREQDIFF_TRUSTED_PACKAGES=mypkg,other``); anything else is refused
  before anything is imported. (A YAML experiment the user runs is code: it may name any target.)
- ``LinkedRun(path)``: another run a module samples with (Relay's stage 1), loaded lazily.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from freqdiff.config import instantiate

CONFIG_KEY = "freqdiff_config"
# packages whose classes an embedded checkpoint config may name (the project's own)
TRUSTED_PACKAGES = ("freqdiff", "lightning_modules", "datamodules", "callbacks", "experiments")
TRUSTED_ENV = "FREQDIFF_TRUSTED_PACKAGES"  # comma-separated extra packages, e.g. "mylab.models"


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


def run_folder(path: str | Path) -> Path:
    """The run folder of a run folder or checkpoint (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
    p = Path(path)
    if p.is_dir():
        return p
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


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


def trusted_packages(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """``TRUSTED_PACKAGES`` plus ``extra`` plus those in ``$FREQDIFF_TRUSTED_PACKAGES``."""
    env = [p.strip() for p in os.environ.get(TRUSTED_ENV, "").split(",") if p.strip()]
    return (*TRUSTED_PACKAGES, *extra, *env)


def untrusted_targets(node: Any, trusted: Iterable[str], path: str = "") -> list[str]:
    """``path: target`` of every ``_target_`` in a plain config tree outside the ``trusted`` packages."""
    trusted = tuple(trusted)
    bad: list[str] = []
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None:
            t = str(target)
            if not any(t == p or t.startswith(p + ".") for p in trusted):
                bad.append(f"{path or '<root>'}: {t}")
        for k, v in node.items():
            bad += untrusted_targets(v, trusted, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            bad += untrusted_targets(v, trusted, f"{path}[{i}]")
    return bad


def load_run(
    path: str | Path, map_location: str | torch.device = "cpu", trusted: Iterable[str] = ()
) -> tuple[Any, DictConfig]:
    """Rebuild a trained module from a run folder or checkpoint; returns (module in eval mode, config).

    ``trusted``: packages beyond the project's own whose classes the embedded config may name.
    The module's ``checkpoint_step`` is the checkpoint's global step (what its samples depend on).
    """
    ckpt = read_checkpoint(path, map_location)
    embedded = ckpt[CONFIG_KEY]
    if not isinstance(embedded, dict) or not isinstance(embedded.get("module"), dict):
        raise CheckpointError(f"{find_checkpoint(path)}: the embedded config has no 'module' section")
    bad = untrusted_targets(embedded, trusted_packages(trusted))
    if bad:
        raise CheckpointError(
            f"{find_checkpoint(path)}: the embedded config names classes outside the trusted packages "
            f"({', '.join(bad)}); refusing to build them. If you trust this checkpoint, add the package "
            f"with {TRUSTED_ENV}=<package> (trusted now: {', '.join(trusted_packages(trusted))})"
        )
    cfg = OmegaConf.create(embedded)
    module = instantiate(cfg.module, "module")
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{find_checkpoint(path)}: weights do not fit the embedded config: {e}") from e
    module.checkpoint_step = int(ckpt.get("global_step", 0))
    return module.eval(), cfg


class LinkedRun:
    """Another run a module uses at sampling time (Relay's stage 2 uses its stage-1 run), loaded lazily.

    Not an ``nn.Module``: the linked module is not trained, not in the user's state_dict or checkpoints.
    ``module(device)`` loads it once (again when its checkpoint file changes) in eval mode;
    ``unavailable()`` says why it cannot be loaded yet (None when it can); ``step()`` is its
    checkpoint's global step (what samples depend on).
    """

    def __init__(self, path: str | Path | None, what: str = "the linked run"):
        self.path, self.what = path, what
        self._key: str | None = None
        self._module = None

    def unavailable(self) -> str | None:
        if self.path is None:
            return f"{self.what} is not set"
        try:
            find_checkpoint(self.path)
        except FileNotFoundError:
            return f"{self.what} has no checkpoint yet at {self.path}"
        return None

    def module(self, device: torch.device | str = "cpu"):
        if self.path is None:
            raise ValueError(f"{self.what} is not set")
        p = find_checkpoint(self.path)  # FileNotFoundError names the path
        key = f"{p}:{p.stat().st_mtime_ns}"
        if self._module is None or self._key != key:
            self._module, _ = load_run(self.path, map_location="cpu")
            self._module.eval()
            self._key = key
        return self._module.to(device)

    def step(self) -> int:
        return int(read_checkpoint(self.path)["global_step"])
