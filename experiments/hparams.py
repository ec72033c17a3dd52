"""The run's settings as flat hyper-parameters: TensorBoard's HParams table and ``<run>/hparams.yaml``.

``run_hparams(cfg)`` reads the resolved config generically, with no per-method code: every node with
a ``_target_`` (the module, its process, net and time sampler, the datamodule and what it nests) gives
one key holding the class (or function) name and one key per scalar setting: those the config gives
and, for the module and its components, the defaults of the target's signature (so
``module.process.T`` is there even when the config leaves it out). Keys are the config's own dotted
keys (``module.lr``, ``module.process.schedule``, ``data.batch_size``), the ones a ``key=value``
override uses; a few are derived: ``method`` (the
module class), ``module.net.params`` (trainable parameters of the denoiser, when the module is given),
``world_size`` (devices × nodes), ``global_batch`` (batch × world size × accumulation) and the
precision the run really uses (``trainer.precision: auto`` resolved). Values are TensorBoard-safe
scalars: str, int, float, bool (None is ``"none"``, a list its compact text, ``inf`` ``"inf"``).

``log_run_hparams`` logs them once at the start of training through the TensorBoard logger (the
runner calls it before ``trainer.fit``): ``logger.hparams`` holds them and ``hparams.yaml`` in the run
folder is (re)written with them. Nothing goes into the event files there: the runner's logger has
``default_hp_metric=False`` (no stray ``hp_metric`` series), and TensorBoard keeps only the first
hparams summary of a run, so the one summary is written by the evaluation (``callbacks/fid.py``),
which merges ``trainer.logger.hparams`` into its ``eval/*`` hparams next to the final metrics.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

Scalar = str | int | float | bool

# trainer keys worth a column (the rest are the runner's plumbing: progress bar, validation off, ...)
TRAINER_KEYS = (
    "max_steps",
    "precision",
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "accumulate_grad_batches",
    "log_every_n_steps",
)


def scalar(v: Any) -> Scalar:
    """A TensorBoard-safe scalar of a config value."""
    if v is None:
        return "none"
    if isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(str(scalar(x)) for x in v) + "]"
    return str(v)


def _is_leaf(v: Any) -> bool:
    return not isinstance(v, Mapping)


def _signature_defaults(target: str) -> dict[str, Any]:
    """Scalar defaults of ``target``'s parameters (through ``**kwargs`` up the MRO); {} if unknown."""
    from freqdiff.config import ConfigError, locate

    try:
        obj = locate(target)
    except (ConfigError, ImportError):
        return {}
    fns = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    out: dict[str, Any] = {}
    for fn in fns:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is p.empty or p.name in out:
                continue
            d = p.default
            if (
                d is None
                or isinstance(d, bool | int | float | str)
                or (isinstance(d, list | tuple) and all(isinstance(x, int | float | str) for x in d))
            ):
                out[p.name] = d
    return out


def _node(node: Mapping, prefix: str, out: dict[str, Scalar], defaults: bool) -> None:
    """The settings of one config node under ``prefix`` (recursing into nested nodes); ``defaults``:
    with the target's signature defaults for what the config leaves out."""
    values = dict(node)
    target = values.pop("_target_", None)
    if target is not None:
        out[prefix] = str(target).rsplit(".", 1)[-1]
        for k, d in _signature_defaults(str(target)).items() if defaults else ():
            values.setdefault(k, d)
    for k in sorted(values, key=str):
        v = values[k]
        if _is_leaf(v):
            out[f"{prefix}.{k}"] = scalar(v)
        else:
            _node(v, f"{prefix}.{k}", out, defaults)


def _count(value: Any) -> int | None:
    """An int of a ``devices`` / ``num_nodes`` value (a list of device ids counts them), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, list | tuple):
        return len(value)
    if isinstance(value, str) and "," in value:
        return len([s for s in value.split(",") if s.strip()])
    if isinstance(value, str) and value.strip().isdigit():
        return int(value) or None
    return None


def run_hparams(cfg: DictConfig | Mapping, module=None, trainer=None) -> dict[str, Scalar]:
    """Flat TensorBoard-safe hyper-parameters of the resolved run config (see the module docstring).

    ``module`` (the built LightningModule) adds the denoiser's parameter count; ``trainer`` the
    precision and world size it really uses (else they are read from ``cfg.trainer``).
    """
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    out: dict[str, Scalar] = {}
    if "experiment" in c:
        out["experiment"] = scalar(c["experiment"])
    run = c.get("run") or {}
    for k in ("name", "seed"):
        if k in run:
            out[f"run.{k}"] = scalar(run[k])
    mod = c.get("module") or {}
    if "_target_" in mod:
        out["method"] = str(mod["_target_"]).rsplit(".", 1)[-1]
        _node(mod, "module", out, defaults=True)
        del out["module"]  # = method
    if module is not None:
        net = getattr(module, "denoiser", module)
        out["module.net.params"] = int(sum(p.numel() for p in net.parameters() if p.requires_grad))
    data = c.get("data") or {}
    if data:
        _node(data, "data", out, defaults=False)  # the data: as the config gives it
    tr = c.get("trainer") or {}
    for k in TRAINER_KEYS:
        if k in tr:
            out[f"trainer.{k}"] = scalar(tr[k])
    if trainer is not None:
        out["trainer.precision"] = str(trainer.precision)
        world = int(trainer.world_size)
    else:
        dev, nodes = _count(tr.get("devices", 1)), _count(tr.get("num_nodes", 1))
        world = dev * nodes if dev is not None and nodes is not None else None
    out["world_size"] = world if world is not None else "auto"
    batch = data.get("batch_size")
    accum = tr.get("accumulate_grad_batches", 1)
    if isinstance(batch, int) and isinstance(world, int) and isinstance(accum, int):
        out["global_batch"] = batch * world * accum
    return out


def log_run_hparams(trainer, cfg: DictConfig, module=None) -> dict[str, Scalar]:
    """Log ``run_hparams`` through ``trainer.logger`` and write ``<log_dir>/hparams.yaml`` (rank 0)."""
    params = run_hparams(cfg, module=module, trainer=trainer)
    logger = trainer.logger
    if logger is None:
        return params
    logger.log_hyperparams(params)  # rank 0 only (Lightning's rank_zero_only)
    log_dir = getattr(logger, "log_dir", None)
    if trainer.is_global_zero and log_dir is not None and Path(log_dir).is_dir():
        # Lightning writes hparams.yaml only when it does not exist yet: a resumed run (whose
        # resumable keys may have changed) would keep the old one
        from lightning.pytorch.core.saving import save_hparams_to_yaml

        path = Path(log_dir) / "hparams.yaml"
        tmp = path.with_name(path.name + ".tmp")
        save_hparams_to_yaml(tmp, dict(logger.hparams))
        os.replace(tmp, path)
    return params
