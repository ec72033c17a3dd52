"""Experiment configs: strict OmegaConf loading and `_target_` instantiation (DESIGN.md §3).

- ``load(exp, overrides)`` reads ``experiments/<exp>.yaml`` (or a path), merges its ``base:`` list
  (one level, paths relative to the file), applies ``key=value`` overrides and returns a struct-mode
  config: a key that does not exist is an error naming it, with the closest existing keys.
  ``+key=value`` adds a key on purpose.
- ``instantiate(node, path)`` builds objects from ``_target_`` import paths, depth first. A bad
  constructor argument is reported with the node's full config path, e.g.
  ``module.process: GaussianProcess got an unexpected keyword argument 'sigmma'``.
No Lightning here; the runner in ``experiments/`` is the composition root.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


class ConfigError(ValueError):
    """A config problem; the message names the config path."""


def resolve_path(exp: str) -> Path:
    """An experiment name (``quickstart``) or a path to a YAML file."""
    p = Path(exp)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p.resolve()
    candidate = EXPERIMENTS_DIR / f"{exp}.yaml"
    if candidate.exists():
        return candidate
    names = sorted(f.stem for f in EXPERIMENTS_DIR.glob("*.yaml") if not f.stem.startswith("_"))
    hint = difflib.get_close_matches(exp, names, n=3)
    raise ConfigError(
        f"experiment {exp!r} not found: expected experiments/{exp}.yaml or a path to a .yaml file"
        + (f"; did you mean {', '.join(hint)}?" if hint else f"; available: {', '.join(names)}")
    )


def _read(path: Path) -> DictConfig:
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return cfg


def _all_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(cfg._get_node(k), full + "."))
    return keys


def _check_key(cfg: DictConfig, key: str) -> None:
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or node._get_node(part, validate_access=False) is None:
            here = ".".join(parts[:i])
            siblings = (
                [f"{here}.{k}" if here else str(k) for k in node.keys()]
                if isinstance(node, DictConfig)
                else []
            )
            hint = difflib.get_close_matches(key, siblings or _all_keys(cfg), n=3, cutoff=0.5)
            raise ConfigError(
                f"unknown config key {key!r}"
                + (f"; did you mean {', '.join(repr(h) for h in hint)}?" if hint else "")
                + " (prefix with '+' to add a new key)"
            )
        node = node._get_node(part)


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply ``key=value`` (existing keys only) and ``+key=value`` (new keys) overrides."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        add = key.startswith("+")
        key = key.lstrip("+")
        if not add:
            _check_key(cfg, key)
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
        OmegaConf.set_struct(cfg, False)
        cfg = OmegaConf.merge(cfg, parsed)
    OmegaConf.set_struct(cfg, True)
    return cfg


def load(exp: str, overrides: list[str] | None = None) -> DictConfig:
    """Load an experiment with its ``base:`` files merged underneath, then overrides; struct mode."""
    path = resolve_path(exp)
    cfg = _read(path)
    bases = cfg.pop("base", None) or []
    merged = OmegaConf.create({})
    for b in [bases] if isinstance(bases, str) else bases:
        base_cfg = _read((path.parent / b).resolve())
        if "base" in base_cfg:
            raise ConfigError(f"{b}: base files may not have their own 'base:' (one level only)")
        merged = OmegaConf.merge(merged, base_cfg)
    merged = OmegaConf.merge(merged, cfg)
    if "experiment" not in merged:
        merged.experiment = path.stem
    OmegaConf.set_struct(merged, True)
    cfg = apply_overrides(merged, list(overrides or []))
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:  # interpolation to a missing key, etc.
        raise ConfigError(f"{path.name}: {e}") from e
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def locate(target: str, path: str = "") -> Any:
    """Import ``package.module.attr`` (attr may be nested: ``module.Class.method``)."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name and ".".join(parts[:i]).startswith(e.name):
                continue
            raise
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"{path or '<root>'}: cannot import _target_ {target!r}")


def instantiate(node: Any, path: str = "", **extra: Any) -> Any:
    """Build the object tree of ``node`` depth first; ``extra`` kwargs go to the top-level call."""
    if isinstance(node, DictConfig):
        children = {
            str(k): instantiate(node[k], f"{path}.{k}" if path else str(k))
            for k in node.keys()
            if k != "_target_"
        }
        if "_target_" not in node:
            return {**children, **extra}
        target = locate(str(node["_target_"]), path)
        kwargs = {**children, **extra}
        try:
            inspect.signature(target).bind(**kwargs)
        except TypeError as e:
            params = _param_names(target)
            msg = f"{path or '<root>'}: {getattr(target, '__name__', target)} {e}"
            bad = [k for k in kwargs if params is not None and k not in params]
            for k in bad:
                hint = difflib.get_close_matches(k, params or [], n=1)
                if hint:
                    msg += f"; did you mean {hint[0]!r} for {k!r}?"
            raise ConfigError(msg) from None
        except ValueError:  # builtins without a signature
            pass
        return target(**kwargs)
    if isinstance(node, ListConfig):
        return [instantiate(v, f"{path}[{i}]") for i, v in enumerate(node)]
    return node


def _param_names(target: Any) -> list[str] | None:
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return list(sig.parameters)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
