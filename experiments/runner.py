"""The composition root: config -> data, module, callbacks, trainer; run folders; resume (DESIGN.md §3, §6).

Run folder: ``<run.root>/<experiment>/<run.name>/`` holds ``config.yaml`` (the resolved config),
TensorBoard events, ``checkpoints/last.ckpt`` and ``samples/``. Running the same experiment again
resumes from ``last.ckpt``; a config that differs from the saved one is refused, naming the keys,
except keys that may change on resume (``RESUMABLE_KEYS``). ``run.resume=false`` starts over under a
new name (``default-2``, ``default-3``, ...).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from callbacks.checkpoint import AtomicCheckpointIO, CheckpointOnException, EmbedConfig
from freqdiff.checkpoints import find_checkpoint, load_run  # noqa: F401  (re-exported for scripts)
from freqdiff.config import ConfigError, instantiate, load

# keys whose change does not alter what is trained: allowed when resuming
RESUMABLE_KEYS = (
    "trainer.max_steps",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "run.resume",
)
RESUMABLE_SUFFIXES = ("every_n_steps",)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not d and prefix:
            out[prefix[:-1]] = {}
    else:
        out[prefix[:-1]] = d
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two resolved configs, except those allowed on resume."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in keys
        if a.get(k, "<absent>") != b.get(k, "<absent>")
        and k not in RESUMABLE_KEYS
        and not k.endswith(RESUMABLE_SUFFIXES)
    ]


def run_dir_for(cfg: DictConfig) -> Path:
    return Path(cfg.run.root) / str(cfg.experiment) / str(cfg.run.name)


def prepare_run_dir(cfg: DictConfig) -> tuple[DictConfig, Path, str | None]:
    """Pick the run folder, check resume compatibility; returns (cfg, run_dir, ckpt_path or None)."""
    run_dir = run_dir_for(cfg)
    if not cfg.run.resume and run_dir.exists() and any(run_dir.iterdir()):
        base, k = str(cfg.run.name), 2
        while (run_dir.parent / f"{base}-{k}").exists():
            k += 1
        cfg.run.name = f"{base}-{k}"
        run_dir = run_dir_for(cfg)
        print(f"run.resume=false: starting over in {run_dir}")
    saved = run_dir / "config.yaml"
    new = OmegaConf.to_container(cfg, resolve=True)
    if saved.exists():
        diff = config_diff(OmegaConf.to_container(OmegaConf.load(saved), resolve=True), new)
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run with a different config; refusing to resume. Changed keys:\n  "
                + "\n  ".join(diff)
                + "\nUse run.resume=false to start over under a new name, or run.name=... for another run."
            )
    last = run_dir / "checkpoints" / "last.ckpt"
    return cfg, run_dir, (str(last) if last.exists() else None)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {
        "self",
        "logger",
        "callbacks",
        "plugins",
    }
    for k in kwargs:
        if k not in allowed:
            raise ConfigError(f"trainer.{k}: not an argument of lightning.Trainer")
    logger = TensorBoardLogger(
        save_dir=str(run_dir.parent.parent), name=str(cfg.experiment), version=str(cfg.run.name)
    )
    ckpt_dir = run_dir / "checkpoints"
    checkpointing = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=int(cfg.run.checkpoint_every_n_steps),
            save_on_train_epoch_end=False,
        ),
        CheckpointOnException(ckpt_dir / "last.ckpt"),
        EmbedConfig(OmegaConf.to_container(cfg, resolve=True)),
    ]
    return L.Trainer(
        **kwargs,
        logger=logger,
        callbacks=checkpointing + extra_callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
    )


def resolve_data_resolution(cfg: DictConfig, exp: str, overrides: list[str]) -> DictConfig:
    """``data.resolution: null`` means "the manifest's (largest) resolution": read it, reload with it.

    The reload (rather than setting the key) re-resolves every ``${data.resolution}`` interpolation.
    """
    if "data" not in cfg or "resolution" not in cfg.data or cfg.data.resolution is not None:
        return cfg
    res = int(instantiate(cfg.data, "data").resolution)  # reads the manifest (writes synthetic data first)
    print(f"data.resolution from the manifest: {res}")
    return load(exp, [*overrides, f"data.resolution={res}"])


def run(cfg: DictConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Train (or resume) the experiment; returns {run_dir, trainer, module, datamodule}.

    ``callbacks`` are added to the ones the config names (for tests and scripts).
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config values: {', '.join(missing)} (give them as key=value)")
    cfg, run_dir, ckpt_path = prepare_run_dir(cfg)
    L.seed_everything(int(cfg.run.seed), workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    datamodule = instantiate(cfg.data, "data")
    module = instantiate(cfg.module, "module")
    cbs = [instantiate(node, f"callbacks.{k}") for k, node in cfg.callbacks.items()] + list(callbacks or [])
    trainer = build_trainer(cfg, run_dir, cbs)
    if trainer.is_global_zero:
        write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if ckpt_path:
        print(f"resuming from {ckpt_path}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return {"run_dir": run_dir, "trainer": trainer, "module": module, "datamodule": datamodule}
