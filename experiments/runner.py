"""The composition root: config -> data, module, callbacks, trainer; run folders; resume
(docs/architecture.md, "Layers" and "Checkpoints").

Run folder: ``<run.root>/<experiment>/<run.name>/`` holds ``config.yaml`` (the resolved config),
TensorBoard events, ``hparams.yaml`` (the run's settings, ``experiments/hparams.py``; docs/dashboards.md),
``checkpoints/last.ckpt`` and ``samples/``. Running the same experiment again
resumes from ``last.ckpt``; a config that differs from the saved one is refused, naming the keys,
except keys that may change on resume (``RESUMABLE_KEYS``). ``run.resume=false`` starts over under a
new name (``default-2``, ``default-3``, ...).

``data.resolution: null`` is decided before anything is built, from a read-only peek at the data
(``resolve_data``: the manifest at ``data.path``, else the synthetic generator's settings), so
``--dry`` and the real run agree. The terminal: a short header and one progress
line (``callbacks/progress.py``) instead of Lightning's bar and model summary; ``quiet_libraries``
(called by the command line) silences library messages that do not matter to the user, in one place.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from callbacks.checkpoint import (
    AtomicCheckpointIO,
    CheckpointOnException,
    EmbedConfig,
    FinishRun,
    StopOnDivergence,
)
from callbacks.cost import describe as describe_cost
from callbacks.cost import read_cost
from callbacks.progress import ProgressLine, RunHeader
from experiments.hparams import log_run_hparams
from experiments.rundir import (  # noqa: F401  (re-exported for scripts and tests)
    RESUMABLE_KEYS,
    config_diff,
    flatten,
    load_saved,
    prepare_run_dir,
    run_dir_for,
)
from experiments.validate import check_config
from freqdiff.checkpoints import find_checkpoint, load_run  # noqa: F401  (re-exported for scripts)
from freqdiff.config import ConfigError, instantiate, load

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Library warnings that tell a user of this project nothing to act on: (message regex, why silenced).
# Everything else is shown, in particular every warning of the project's own code (bad data, NaN, FID off).
QUIET_WARNINGS = (
    (r"The '\w+' does not have many workers", "data.num_workers is a deliberate config value"),
    (
        r"You're resuming from a checkpoint that ended before the epoch ended",
        "the data streams are seeded per (seed, rank, worker, epoch); a resumed epoch replays its stream",
    ),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "torch's pytree deprecation, inside Lightning"),
    (r"The number of training batches \(\d+\) is smaller than the logging", "steps are logged, not epochs"),
    (r"Checkpoint directory .* exists and is not empty", "a resumed run writes into its own checkpoints/"),
)
# Lightning loggers whose INFO lines are banners ("GPU available: ...", "Using bfloat16 AMP", the
# litlogger / litmodels tips, "`Trainer.fit` stopped"); their warnings still show. The header says it.
QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",  # "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]"
)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence ``QUIET_WARNINGS`` and the banners of ``QUIET_LOGGERS`` inside the block (restored after).

    Warnings are shown as ``Category: message`` (plus ``file:line`` when raised in the project's own
    code), not with the path of the library frame that happened to call the project's hook.
    """
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for pattern, _why in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.showwarning = _show_warning
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    path = Path(filename).resolve()
    where = ""
    if path.is_relative_to(PROJECT_ROOT) and not re.search(r"[/\\](\.venv|site-packages)[/\\]", str(path)):
        where = f" ({path.relative_to(PROJECT_ROOT)}:{lineno})"
    stream = file or sys.stderr
    try:
        stream.write(f"{category.__name__}: {message}{where}\n")
    except OSError:  # no usable stderr (as warnings.showwarning does)
        pass


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): without it bf16 autocast is ~12×
    slower than fp32 (measured on an AVX2-only EPYC, 0.62 M UNet at 16²: 23 vs 200 img/s)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def auto_precision(device_type: str) -> str:
    """``trainer.precision: auto``: bf16-mixed where the device computes bf16 natively, else 32-true."""
    if device_type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if device_type == "cpu" and cpu_has_bf16() else "32-true"


def under_srun() -> bool:
    """Launched by srun in a batch job (as ``SLURMEnvironment.detect`` decides, without its warning)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list) -> L.Trainer:
    """The Trainer of ``cfg.trainer``; ``enable_progress_bar`` means the runner's ``ProgressLine``."""
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
    if kwargs.get("precision") == "auto":
        accel = str(kwargs.get("accelerator", "auto"))
        gpu = accel in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        kwargs["precision"] = auto_precision("cuda" if gpu else "cpu")
    progress = [ProgressLine()] if kwargs.pop("enable_progress_bar", True) else []
    kwargs.setdefault("enable_model_summary", False)  # RunHeader prints the parameter counts
    # events straight into the run folder (an experiment name may have several parts: relay/stage1)
    # (no hp_metric -1 series: the run's hparams are logged by log_run_hparams, the hparams summary with
    # metrics by the evaluation)
    logger = TensorBoardLogger(
        save_dir=str(run_dir.parent), name="", version=str(cfg.run.name), default_hp_metric=False
    )
    ckpt_dir = run_dir / "checkpoints"
    checkpointing = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=int(cfg.run.checkpoint_every_n_steps),
            save_on_train_epoch_end=False,
            enable_version_counter=False,  # one last.ckpt, whatever wrote the previous one
        ),
        CheckpointOnException(ckpt_dir / "last.ckpt"),
        EmbedConfig(OmegaConf.to_container(cfg, resolve=True)),
    ]
    first = [FinishRun(ckpt_dir / "last.ckpt"), StopOnDivergence()]  # before the end-of-training work
    plugins: list = [AtomicCheckpointIO()]
    if under_srun():  # ranks from srun; requeue is callbacks/requeue.py's, not Lightning's
        plugins.append(SLURMEnvironment(auto_requeue=False))
    try:
        return L.Trainer(
            **kwargs,
            logger=logger,
            callbacks=first + progress + extra_callbacks + checkpointing,
            enable_progress_bar=False,  # Lightning's bar: replaced by ProgressLine
            plugins=plugins,
            default_root_dir=str(run_dir),
        )
    except (ValueError, TypeError) as e:  # Lightning's MisconfigurationException is a ValueError
        raise ConfigError(f"trainer: {' '.join(str(e).split())}") from e


def complete_final_outputs(trainer: L.Trainer, module: L.LightningModule) -> None:
    """A rerun of a finished run: write the end-of-training outputs that are missing (if any).

    Lightning skips the training loop, and with it ``on_train_end``, when a run resumes at
    ``max_steps``; a run killed during its final evaluation would never get it. Callbacks that write
    outputs at the end say which are missing (``missing_final_outputs``); only those are rerun.
    """
    finisher = next((c for c in trainer.callbacks if isinstance(c, FinishRun)), None)
    if finisher is None or finisher.trained or trainer.global_step < int(trainer.max_steps):
        return
    cbs = [c for c in trainer.callbacks if callable(getattr(c, "missing_final_outputs", None))]
    missing = trainer.strategy.broadcast([c.missing_final_outputs(trainer) for c in cbs])  # rank 0 decides
    names = sorted({m for ms in missing for m in ms})
    if not names:
        if trainer.is_global_zero:
            print(
                f"the run finished at step {trainer.global_step}; its end-of-training outputs are all there"
            )
        return
    if trainer.is_global_zero:
        print(f"the run finished at step {trainer.global_step} without {', '.join(names)}: writing them")
    module.to(trainer.strategy.root_device)
    for cb, ms in zip(cbs, missing):
        if ms:
            cb.on_train_end(trainer, module)


def resolve_data(
    cfg: DictConfig, exp: str, overrides: list[str], write: bool = True
) -> tuple[DictConfig, str]:
    """``data.resolution: null``: the data's (largest) resolution; returns (cfg, where it came from).

    Read-only: the datamodule's ``planned_resolution`` reads the manifest at ``data.path``, else the
    synthetic generator's settings (nothing is generated). The config is then reloaded with
    ``data.resolution=<res>`` (rather than setting the key) so every ``${data.resolution}``
    interpolation shows it. When the datamodule cannot tell (no ``planned_resolution``, no shard set
    and no generator): ``write`` builds and sets it up (which may write data, or fail naming the path),
    else the config is returned unchanged with the reason.
    """
    if "data" not in cfg or "resolution" not in cfg.data:
        return cfg, ""
    if cfg.data.resolution is not None:
        return cfg, "set in the config"
    dm = instantiate(cfg.data, "data")  # constructing writes nothing
    peek = getattr(dm, "planned_resolution", None)
    res, source = peek() if peek is not None else (None, f"{type(dm).__name__} tells only after setup")
    if res is None:
        if not write:
            return cfg, source
        res, source = int(dm.resolution), "read from the data after setting it up"
    return load(exp, [*overrides, f"data.resolution={res}"]), source


def resolve_data_resolution(cfg: DictConfig, exp: str, overrides: list[str]) -> DictConfig:
    """``resolve_data`` without the note (for scripts)."""
    return resolve_data(cfg, exp, overrides)[0]


def outputs_summary(run_dir: Path) -> list[str]:
    """Where a finished run put its results (what exists of it), one line per kind."""
    kinds = {
        "samples": ("samples_vs_real.png", "samples"),
        "strips": ("strips",),
        "metrics": ("final_metrics.json", "eval/metrics.jsonl", "cost.json"),
        "checkpoint": ("checkpoints/last.ckpt",),
    }
    lines = [f"run folder  {run_dir}"]
    for kind, rels in kinds.items():
        shown = []
        for rel in rels:
            p = run_dir / rel
            if p.is_dir():
                n = len(list(p.glob("*.png")))
                shown.append(f"{rel}/ ({n} PNG{'' if n == 1 else 's'})")
            elif p.exists():
                shown.append(rel)
        if shown:
            lines.append(f"  {kind:<12}{', '.join(shown)}")
    cost = read_cost(run_dir)
    if cost is not None and cost.get("params") is not None:
        lines.append(f"  {'cost':<12}{describe_cost(cost)}")
    lines.append(f"  {'curves':<12}tensorboard --logdir {run_dir.parent.parent}  (make board)")
    return lines


def run(cfg: DictConfig, callbacks: list | None = None, data_note: str = "") -> dict[str, Any]:
    """Train (or resume) the experiment; returns {run_dir, trainer, module, datamodule}.

    ``callbacks`` are added to the ones the config names (for tests and scripts); ``data_note`` (from
    ``resolve_data``) goes into the header.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config values: {', '.join(missing)} (give them as key=value)")
    check_config(cfg)
    cfg, run_dir, ckpt_path = prepare_run_dir(cfg)
    L.seed_everything(int(cfg.run.seed), workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    datamodule = instantiate(cfg.data, "data")
    module = instantiate(cfg.module, "module")
    header = RunHeader(
        experiment=str(cfg.experiment), run_dir=run_dir, ckpt_path=ckpt_path, data_note=data_note
    )
    cbs = [header] + [
        instantiate(node, f"callbacks.{k}") for k, node in cfg.callbacks.items() if node is not None
    ]
    cbs.sort(
        key=lambda c: bool(getattr(c, "run_after_others", False))
    )  # CostMeter reads the evaluation's record
    trainer = build_trainer(cfg, run_dir, cbs + list(callbacks or []))
    if trainer.is_global_zero:
        write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    log_run_hparams(trainer, cfg, module)  # logger.hparams and <run>/hparams.yaml
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    complete_final_outputs(trainer, module)
    if trainer.is_global_zero:
        print("\n".join(outputs_summary(run_dir)), flush=True)
    return {"run_dir": run_dir, "trainer": trainer, "module": module, "datamodule": datamodule}
