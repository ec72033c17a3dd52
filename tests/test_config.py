"""Configs: strict keys, `_target_` errors naming the path, every experiment instantiates
(docs/architecture.md, Configuration)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from freqdiff.config import EXPERIMENTS_DIR, ConfigError, instantiate, load

EXPERIMENTS = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml") if not p.stem.startswith("_"))
PIPELINES = [e for e in EXPERIMENTS if "pipeline" in load(e, resolve=False)]  # multi-stage: one run per stage
EXPERIMENTS = [e for e in EXPERIMENTS if e not in PIPELINES]


def shrink(exp: str, tmp_path: Path) -> list[str]:
    """Overrides that make any experiment small enough to instantiate on the CPU in a test."""
    cfg = load(exp, [f"data.path={tmp_path / 'data'}"])
    out = [f"data.path={tmp_path / 'data'}", f"run.root={tmp_path / 'runs'}", "data.resolution=16"]
    if "preset" in cfg.module.get("net", {}):
        out.append("module.net.preset=tiny")
    if "channel_mult" in cfg.module.get("net", {}):
        out.append("module.net.channel_mult=[1,2,2]")
    if "levels" in cfg.module.get("process", {}):  # Scale Space: as many levels as the tiny net has
        out.append("module.process.levels=2")
    return out


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_loads_and_instantiates(exp, tmp_path):
    cfg = load(exp, shrink(exp, tmp_path))
    assert cfg.experiment == exp
    data = instantiate(cfg.data, "data")
    module = instantiate(cfg.module, "module")
    callbacks = [instantiate(v, f"callbacks.{k}") for k, v in cfg.callbacks.items()]
    assert hasattr(module, "loss") and hasattr(module, "sample") and hasattr(data, "train_dataloader")
    assert callbacks


@pytest.mark.parametrize("exp", PIPELINES)
def test_every_pipeline_stage_loads_and_instantiates(exp, tmp_path):
    from experiments.pipeline import load_pipeline

    # the paper stages are 295 M / 553 M: instantiate a small net (their sizes: tests/test_relay_module.py)
    shrink = [f"data.path={tmp_path / 'data'}", f"run.root={tmp_path / 'runs'}", "module.net.preset=tiny"]
    _, stages = load_pipeline(exp, shrink)
    assert stages
    for name, cfg in stages.items():
        assert cfg.experiment == f"{exp}/{name}" and cfg.pipeline.name == exp
        module = instantiate(cfg.module, f"stages.{name}.module")
        data = instantiate(cfg.data, f"stages.{name}.data")
        callbacks = [instantiate(v, f"stages.{name}.callbacks.{k}") for k, v in cfg.callbacks.items()]
        assert hasattr(module, "sample") and hasattr(data, "train_dataloader") and callbacks


def test_base_is_merged_and_overrides_apply():
    cfg = load("quickstart", ["trainer.max_steps=7", "data.resolution=16"])
    assert cfg.trainer.max_steps == 7
    assert cfg.trainer.precision == "auto"  # from _base.yaml
    assert cfg.module.net.resolution == 16 and cfg.module.process.resolution == 16  # interpolation


def test_unknown_override_key_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer\.max_step'.*'trainer\.max_steps'"):
        load("quickstart", ["trainer.max_step=10"])
    cfg = load("quickstart", ["+module.extra_key=1"])  # '+' adds on purpose
    assert cfg.module.extra_key == 1


def test_bad_constructor_argument_names_the_config_path(tmp_path):
    cfg = load("quickstart", ["+module.process.sigmma=3", "data.resolution=16"])
    with pytest.raises(ConfigError, match=r"module\.process: GaussianProcess .*'sigmma'"):
        instantiate(cfg.module, "module")
    cfg = OmegaConf.create({"x": {"_target_": "freqdiff.nope.Missing"}})
    with pytest.raises(ConfigError, match=r"x: cannot import _target_ 'freqdiff.nope.Missing'"):
        instantiate(cfg.x, "x")


def test_unknown_experiment_lists_close_names():
    with pytest.raises(ConfigError, match="quickstart"):
        load("quickstar")


def test_dry_run_prints_resolved_config():
    out = subprocess.run(
        [sys.executable, "-m", "experiments", "run", "quickstart", "trainer.max_steps=3"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "DRY": "1"},
        cwd=EXPERIMENTS_DIR.parent,
    )
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.trainer.max_steps == 3 and cfg.module.net.resolution == cfg.data.resolution
    bad = subprocess.run(
        [sys.executable, "-m", "experiments", "run", "quickstart", "trainer.max_stepz=3", "--dry"],
        capture_output=True,
        text=True,
        cwd=EXPERIMENTS_DIR.parent,
    )
    assert bad.returncode == 2 and "trainer.max_stepz" in bad.stderr


def test_auto_precision_uses_bf16_only_where_the_device_computes_it(monkeypatch):
    from experiments import runner

    monkeypatch.setattr(runner, "cpu_has_bf16", lambda: False)
    assert runner.auto_precision("cpu") == "32-true"
    monkeypatch.setattr(runner, "cpu_has_bf16", lambda: True)
    assert runner.auto_precision("cpu") == "bf16-mixed"
    monkeypatch.setattr(runner.torch.cuda, "is_bf16_supported", lambda: False)
    assert runner.auto_precision("cuda") == "32-true"


def test_bases_may_have_bases_and_experiments_live_anywhere(tmp_path):
    """A user's file extends quickstart.yaml (which has its own base) from outside experiments/."""
    from freqdiff.config import EXPERIMENTS_DIR

    mine = tmp_path / "lab" / "my_quick.yaml"
    mine.parent.mkdir()
    (tmp_path / "lab" / "common.yaml").write_text(
        f"base: [{EXPERIMENTS_DIR / 'quickstart.yaml'}]\ntrainer:\n  max_steps: 7\n"
    )
    mine.write_text("base: [common.yaml]\nmodule:\n  lr: 0.0005\n")
    cfg = load(str(mine), ["data.resolution=16"])
    assert cfg.experiment == "my_quick"  # the file's own name, not its base's
    assert cfg.trainer.max_steps == 7 and cfg.module.lr == 0.0005
    assert cfg.trainer.precision == "auto" and cfg.module.net.preset == "tiny"  # from _base.yaml / quickstart
    (tmp_path / "lab" / "a.yaml").write_text("base: [b.yaml]\n")
    (tmp_path / "lab" / "b.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"cycle: a.yaml -> b.yaml -> a.yaml"):
        load(str(tmp_path / "lab" / "a.yaml"))
