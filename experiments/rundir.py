"""Run folders: where a run lives, whether a config may resume it, and resuming from the folder alone.

Run folder: ``<run.root>/<experiment>/<run.name>/``. Running the same experiment again resumes from
``checkpoints/last.ckpt``; a config that differs from the saved one is refused, naming the keys,
except keys that may change on resume (``RESUMABLE_KEYS``) and the keys that only say where the run
lives (``LOCATION_KEYS``). Only a checkpoint is protected: a folder whose first attempt died before
its first checkpoint takes the corrected config. ``load_saved`` resumes a folder from its own
``config.yaml`` (``python -m experiments resume RUN``), also after it was moved or copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from freqdiff.config import ConfigError, apply_overrides

# keys whose change does not alter what is trained: allowed when resuming
RESUMABLE_KEYS = (
    "trainer.max_steps",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "run.resume",
    "trainer.devices",  # the world size may change on resume (lightning_modules/base.py, "Randomness")
    "trainer.num_nodes",
    "trainer.accelerator",  # a run started on a laptop continues on the cluster
)
# speed options that change no number (docs/performance.md): a run may resume with them switched
RESUMABLE_SUFFIXES = ("every_n_steps", "net.checkpoint", "net.channels_last")
RESUMABLE_PARTS = ("compile_backbone",)  # any key with this component (true/false or its dict)
RESUMABLE_PREFIXES = ("cluster.",)  # where and how the jobs run (experiments/cluster.py)
# keys that only say where a run lives: a run folder moved or copied elsewhere is the same run
LOCATION_KEYS = ("run.root", "run.name", "experiment")


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
    """Keys whose values differ between two resolved configs, except those allowed on resume.

    Location keys (``LOCATION_KEYS``) are not compared, and a path under the old ``run.root`` is
    compared as if it lay under the new one (e.g. ``callbacks.eval.cache_dir: ${run.root}/.cache``).
    """
    a, b = flatten(old), flatten(new)
    root_a, root_b = str(a.get("run.root", "")), str(b.get("run.root", ""))
    if root_a and root_a != root_b:
        a = {k: _rebase(v, root_a, root_b) for k, v in a.items()}
    for k in LOCATION_KEYS:
        a.pop(k, None)
        b.pop(k, None)
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in keys
        if a.get(k, "<absent>") != b.get(k, "<absent>") and not resumable(k)
    ]


def resumable(key: str) -> bool:
    """Whether ``key`` may differ between a run's saved config and the one that resumes it."""
    return (
        key in RESUMABLE_KEYS
        or key.endswith(RESUMABLE_SUFFIXES)
        or key.startswith(RESUMABLE_PREFIXES)
        or any(part in RESUMABLE_PARTS for part in key.split("."))
    )


def _rebase(value: Any, old_root: str, new_root: str) -> Any:
    if isinstance(value, str) and (value == old_root or value.startswith(old_root.rstrip("/") + "/")):
        return new_root.rstrip("/") + value[len(old_root.rstrip("/")) :]
    return value


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
    last = run_dir / "checkpoints" / "last.ckpt"
    new = OmegaConf.to_container(cfg, resolve=True)
    if saved.exists():
        diff = config_diff(OmegaConf.to_container(OmegaConf.load(saved), resolve=True), new)
        if diff and last.exists():  # only a checkpoint is worth protecting
            raise ConfigError(
                f"{run_dir} holds a run with a different config; refusing to resume. Changed keys:\n  "
                + "\n  ".join(diff)
                + "\nUse run.resume=false to start over under a new name, or run.name=... for another run."
            )
        if diff:
            print(f"{run_dir}: the earlier attempt left no checkpoint; starting again with this config")
    return cfg, run_dir, (str(last) if last.exists() else None)


def load_saved(run_dir: str | Path, overrides: list[str]) -> DictConfig:
    """The saved config of a run folder, to resume it (``python -m experiments resume RUN``).

    Only the keys that may change on resume can be overridden; the location keys are set from where
    the folder is now (``<run.root>/<experiment>/<run.name>``), so a moved or copied run resumes.
    """
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a run folder (no config.yaml); expected runs/<experiment>/<name>"
        )
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+")
        if not resumable(key):
            raise ConfigError(
                f"{key}: cannot be changed when resuming {run_dir} (resumable: "
                f"{', '.join(RESUMABLE_KEYS)}, *.every_n_steps, cluster.*); "
                "start a new run with `make exp` instead"
            )
    try:
        saved_cfg = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    except Exception as e:
        raise ConfigError(f"{saved}: unreadable ({type(e).__name__}: {e})") from e
    old_root, new_root = str(saved_cfg.get("run", {}).get("root", "")), str(run_dir.parent.parent)
    cfg = OmegaConf.create(_rebase_tree(saved_cfg, old_root, new_root) if old_root else saved_cfg)
    OmegaConf.set_struct(cfg, True)
    location = [f"run.root={new_root}", f"run.name={run_dir.name}", f"experiment={run_dir.parent.name}"]
    return apply_overrides(cfg, [*location, *overrides])


def _rebase_tree(node: Any, old_root: str, new_root: str) -> Any:
    """``node`` with every path under ``old_root`` moved under ``new_root`` (e.g. a cache folder)."""
    if isinstance(node, dict):
        return {k: _rebase_tree(v, old_root, new_root) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase_tree(v, old_root, new_root) for v in node]
    return _rebase(node, old_root, new_root)
