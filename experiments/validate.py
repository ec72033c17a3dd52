"""Checks of the run-level config values (``run.*``, ``trainer.*``) before anything is built.

Values that objects receive are checked by the objects' constructors (their errors get the config
path from ``freqdiff.config.instantiate``); the keys here go to the runner and to Lightning, so they
are checked here, each with one clear line naming the key, the bad value and what is expected.
A key the config does not have is not checked (Lightning's default applies).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from freqdiff.config import ConfigError

# trainer.precision values (Lightning accepts more; these are the ones this project runs with)
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
PRECISION_INTS = (16, 32, 64)

_MISSING = object()


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return _MISSING
        node = node[part]
    return OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node


def _show(v: Any) -> str:
    return {None: "null", True: "true", False: "false"}[v] if v is None or isinstance(v, bool) else repr(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(cfg: DictConfig, key: str) -> None:
    v = _get(cfg, key)
    if v is not _MISSING and not (_is_int(v) and v >= 1):
        raise ConfigError(f"{key}={_show(v)}: expected a positive integer")


def _precision(cfg: DictConfig) -> None:
    v = _get(cfg, "trainer.precision")
    if v is _MISSING or v in PRECISIONS or (_is_int(v) and v in PRECISION_INTS):
        return
    choices = f"{', '.join(PRECISIONS)} (or the integers {', '.join(map(str, PRECISION_INTS))})"
    raise ConfigError(f"trainer.precision={_show(v)}: expected one of {choices}")


def _devices(cfg: DictConfig) -> None:
    v = _get(cfg, "trainer.devices")
    if v is _MISSING:
        return
    if _is_int(v) and (v >= 1 or v == -1):
        return
    if isinstance(v, list) and v and all(_is_int(d) and d >= 0 for d in v) and len(set(v)) == len(v):
        return
    if isinstance(v, str) and v.strip():  # "auto", "-1", "0,1" (Lightning parses and checks these)
        return
    raise ConfigError(
        f"trainer.devices={_show(v)}: expected a positive integer, -1 (all), 'auto' "
        "or a list of distinct device indices"
    )


def _run_name(cfg: DictConfig) -> None:
    v = _get(cfg, "run.name")
    if v is _MISSING:
        return
    name = str(v) if _is_int(v) else v
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or any(c in name for c in "/\\"):
        raise ConfigError(f"run.name={_show(v)}: expected a non-empty folder name without '/'")


def check_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first bad run-level value."""
    _run_name(cfg)
    root = _get(cfg, "run.root")
    if root is not _MISSING and not (isinstance(root, str) and root.strip()):
        raise ConfigError(f"run.root={_show(root)}: expected a folder path")
    seed = _get(cfg, "run.seed")
    if seed is not _MISSING and not _is_int(seed):
        raise ConfigError(f"run.seed={_show(seed)}: expected an integer")
    resume = _get(cfg, "run.resume")
    if resume is not _MISSING and not isinstance(resume, bool):
        raise ConfigError(f"run.resume={_show(resume)}: expected true or false")
    for key in ("run.checkpoint_every_n_steps", "trainer.max_steps", "trainer.log_every_n_steps"):
        _positive_int(cfg, key)
    _positive_int(cfg, "trainer.num_nodes")
    _devices(cfg)
    _precision(cfg)
