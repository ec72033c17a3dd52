"""Experiment configs: strict OmegaConf loading and `_target_` instantiation (docs/architecture.md).

- ``load(exp, overrides)`` reads ``experiments/<exp>.yaml`` (or a .yaml anywhere), merges its ``base:``
  list (paths relative to the file naming them; a base may have bases; cycles are refused), applies
  ``key=value`` overrides and returns a struct-mode config: a key that does not exist is an error
  naming it, with the closest existing keys. ``+key=value`` adds a key on purpose. An override keeps
  the type the config holds (an integer key takes an integer, a number key a number, a true/false key
  a bool, a list a list), unless the receiving keyword argument's annotation admits more
  (``trainer.devices=auto``, ``…=null`` where the argument may be None); ``???`` and unparsable values
  are refused.
- ``instantiate(node, path)`` builds objects from ``_target_`` import paths, depth first. A bad
  constructor argument is reported with the node's full config path, e.g.
  ``module.process: GaussianProcess got an unexpected keyword argument 'sigmma'``; a ``ValueError`` or
  ``TypeError`` raised by the constructor becomes ``ConfigError("<path>: <Target>: <message>")`` (the
  path names the argument when the message starts with it: ``module.lr: DDPMModule: lr=-1: ...``).
- ``check_args`` is the constructors' one-line argument check (``name=value: expected <kind>``).
Every message is one line. No Lightning here; the runner in ``experiments/`` is the composition root.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
import re
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"

# Config nodes without a ``_target_`` whose keys are keyword arguments of a callable, as import paths:
# their annotations say which types an override may take. Empty here (the core imports no Lightning);
# ``experiments`` registers ``"trainer": "lightning.Trainer"``, the callable its runner passes it to.
RECEIVERS: dict[str, str] = {}


class ConfigError(ValueError):
    """A config problem; the message names the config path."""


def one_line(text: Any) -> str:
    return "; ".join(s.strip() for s in str(text).splitlines() if s.strip())


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
    try:
        cfg = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        context = ""
        if e.context and e.context_mark and e.context_mark is not mark:
            context = f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError(f"{where}: YAML syntax error: {e.problem or e.context}{context}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML syntax error: {one_line(e)}") from e
    except OmegaConfBaseException as e:  # e.g. a malformed ${...} interpolation
        first = str(e.msg or e).splitlines()[0]
        raise ConfigError(f"{path}: {e.full_key or '<root>'}: {first}") from e
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


def _leaf(cfg: DictConfig, key: str) -> Any:
    """The node at dotted ``key`` (None when absent)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return None
        node = node._get_node(part, validate_access=False)
    return node


def _show(v: Any) -> str:
    if isinstance(v, (DictConfig, ListConfig)):
        v = OmegaConf.to_container(v)
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    return repr(v)


def _same_kind(cur: Any, new: Any) -> bool:
    if new is None:
        return False
    if isinstance(cur, bool):
        return isinstance(new, bool)
    if isinstance(cur, int):
        return isinstance(new, int) and not isinstance(new, bool)
    if isinstance(cur, float):
        return isinstance(new, (int, float)) and not isinstance(new, bool)
    if isinstance(cur, ListConfig):
        return isinstance(new, ListConfig)
    if isinstance(cur, DictConfig):
        return isinstance(new, DictConfig)
    return not isinstance(new, (DictConfig, ListConfig))  # a string (or other scalar) key: any scalar


def _expected(cur: Any, new: Any, key: str) -> str:
    if isinstance(cur, bool):
        return "true or false"
    if isinstance(cur, int):
        return "an integer"
    if isinstance(cur, float):
        return "a number"
    if isinstance(cur, ListConfig):
        return "a list"
    if isinstance(cur, DictConfig):
        return f"a mapping, as in the config (set its keys one by one: {key}.<name>=...)"
    return "a string" if new is None else "a single value, not a list or mapping"


def _receiver_admits(cfg: DictConfig, key: str, new: Any) -> bool:
    """Whether the keyword argument that receives ``key`` is annotated to take ``new``'s type."""
    parent, name = key.rpartition(".")[::2]
    node = _leaf(cfg, parent) if parent else cfg
    try:
        if isinstance(node, DictConfig) and "_target_" in node:
            target = locate(str(node["_target_"]), parent)
        elif parent in RECEIVERS:
            target = locate(RECEIVERS[parent], parent)
        else:
            return False
    except Exception:  # an unimportable target is reported by instantiate, with its path
        return False
    for fn in _init_functions(target):
        try:
            p = inspect.signature(fn).parameters.get(name)
        except (TypeError, ValueError):
            continue
        if p is None or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.annotation is p.empty:
            return False
        ann = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
        words = set(re.findall(r"[A-Za-z_]\w*", ann))
        if new is None:
            return bool(words & {"None", "NoneType", "Optional"}) or p.default is None
        if isinstance(new, bool):
            return "bool" in words
        if isinstance(new, (int, float)):
            return "float" in words or (isinstance(new, int) and "int" in words)
        if isinstance(new, str):
            return bool(words & {"str", "Literal"})
        if isinstance(new, ListConfig):
            return bool(words & {"list", "List", "tuple", "Tuple", "Sequence"})
        return bool(words & {"dict", "Dict", "Mapping"})
    return False


def _init_functions(target: Any) -> list[Any]:
    """The callables whose parameters a call of ``target`` may reach (``**kwargs`` up the MRO)."""
    if inspect.isclass(target):
        return [c.__init__ for c in target.__mro__ if "__init__" in vars(c)]
    return [target]


def _check_value(cfg: DictConfig, key: str, parsed: DictConfig) -> None:
    new_node = _leaf(parsed, key)
    if new_node._is_missing():
        raise ConfigError(f"{key}=???: a required-value marker, give a value")
    if new_node._is_interpolation():
        return
    new = new_node if isinstance(new_node, (DictConfig, ListConfig)) else new_node._value()
    parts = key.split(".")
    for i in range(1, len(parts)):
        above, where = _leaf(cfg, ".".join(parts[:i])), ".".join(parts[:i])
        if above is not None and not isinstance(above, DictConfig):
            shown = _show(above if isinstance(above, ListConfig) else above._value())
            raise ConfigError(f"{key}: {where} is not a section (the config has {shown})")
    cur_node = _leaf(cfg, key)
    if cur_node is None or cur_node._is_missing():
        return
    if cur_node._is_interpolation():
        try:
            cur = OmegaConf.select(cfg, key)
        except Exception:  # resolved (and reported) later
            return
    else:
        cur = cur_node if isinstance(cur_node, (DictConfig, ListConfig)) else cur_node._value()
    if cur is None or _same_kind(cur, new) or _receiver_admits(cfg, key, new):
        return
    has = "" if isinstance(cur, DictConfig) else f" (the config has {_show(cur)})"
    raise ConfigError(f"{key}={_show(new)}: expected {_expected(cur, new, key)}{has}")


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
        try:
            parsed = OmegaConf.from_dotlist([f"{key}={value}"])
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            problem = getattr(e, "problem", None) or str(getattr(e, "msg", e)).splitlines()[0]
            raise ConfigError(
                f"{key}={value!r}: not a valid value ({problem}); quote it for a string: {key}='\"...\"'"
            ) from e
        _check_value(cfg, key, parsed)  # a new key ('+') has no type to keep
        OmegaConf.set_struct(cfg, False)
        try:
            cfg = OmegaConf.merge(cfg, parsed)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{item}: {str(e.msg or e).splitlines()[0]}") from e
    OmegaConf.set_struct(cfg, True)
    return cfg


def _with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[DictConfig, Any]:
    """(the file at ``path`` merged over its ``base:`` files, the file's own ``experiment``). Bases are
    resolved relative to the file naming them, recursively; a file that is its own base is refused."""
    if path in chain:
        raise ConfigError(f"base files form a cycle: {' -> '.join(p.name for p in (*chain, path))}")
    cfg = _read(path)
    bases = cfg.pop("base", None) or []
    merged = OmegaConf.create({})
    for b in [bases] if isinstance(bases, str) else bases:
        base_path = (path.parent / str(b)).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path.name}: base file {b!r} not found (looked for {base_path})")
        merged = OmegaConf.merge(merged, _with_bases(base_path, (*chain, path))[0])
    return OmegaConf.merge(merged, cfg), cfg.get("experiment")


def load(exp: str, overrides: list[str] | None = None, resolve: bool = True) -> DictConfig:
    """Load an experiment with its ``base:`` files merged underneath, then overrides; struct mode.

    ``resolve=False`` keeps the interpolations (a multi-stage experiment resolves each stage's own)."""
    path = resolve_path(exp)
    merged, own = _with_bases(path.resolve(), ())
    merged.experiment = path.stem if own is None else own  # a base's name is not inherited
    OmegaConf.set_struct(merged, True)
    cfg = apply_overrides(merged, list(overrides or []))
    return resolve_config(cfg, path.name) if resolve else cfg


def resolve_config(cfg: DictConfig, where: str) -> DictConfig:
    """Resolve every interpolation in place (ConfigError naming ``where`` for a bad one)."""
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:  # interpolation to a missing key, etc.
        raise ConfigError(f"{where}: {one_line(e)}") from e
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
        try:
            return target(**kwargs)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(_call_error(path, target, list(children), e)) from e
    if isinstance(node, ListConfig):
        return [instantiate(v, f"{path}[{i}]") for i, v in enumerate(node)]
    return node


def _call_error(path: str, target: Any, given: list[str], e: Exception) -> str:
    """``<path>[.<argument>]: <Target>: <message>`` for an error raised by ``target(**kwargs)``."""
    msg = one_line(e) or type(e).__name__
    start = re.match(r"([A-Za-z_]\w*)(?=[=\s:'])", msg)
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", msg)
    arg = next((m[1] for m in (start, unexpected) if m and m[1] in given), None)
    if unexpected and "did you mean" not in msg:
        names = {n for fn in _init_functions(target) for n in (_param_names(fn, var_kw=True) or [])}
        hint = difflib.get_close_matches(unexpected[1], sorted(names - {"self"}), n=1)
        msg += f"; did you mean {hint[0]!r}?" if hint else ""
    where = ".".join(p for p in (path, arg) if p) or "<root>"
    return f"{where}: {getattr(target, '__name__', type(target).__name__)}: {msg}"


def _param_names(target: Any, var_kw: bool = False) -> list[str] | None:
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    if not var_kw and any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return [n for n, p in sig.parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


_KINDS = {
    "a positive integer": lambda v: isinstance(v, Integral) and not isinstance(v, bool) and v >= 1,
    "a non-negative integer": lambda v: isinstance(v, Integral) and not isinstance(v, bool) and v >= 0,
    "an integer": lambda v: isinstance(v, Integral) and not isinstance(v, bool),
    "a positive number": lambda v: isinstance(v, Real) and not isinstance(v, bool) and 0 < v < math.inf,
    "a non-negative number": lambda v: isinstance(v, Real) and not isinstance(v, bool) and 0 <= v < math.inf,
}


def check_args(kind: str, allow_none: bool = False, **values: Any) -> None:
    """``ValueError("name=value: expected <kind>")`` for the first of ``values`` that is not ``kind``
    (one of ``_KINDS``: "a positive integer", "a non-negative number", ...); ``allow_none``: or None."""
    ok = _KINDS[kind]
    for name, v in values.items():
        if not ((allow_none and v is None) or ok(v)):
            raise ValueError(f"{name}={_show(v)}: expected {kind}{' or null' if allow_none else ''}")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
