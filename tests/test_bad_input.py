"""Bad input: one line naming the config path and the bad value, exit code 2, no traceback.

Every case runs ``python -m experiments run`` in-process and must fail before any data is generated
or training starts (``Trainer.fit`` is patched to fail the test if it is reached).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from omegaconf import OmegaConf

from experiments.__main__ import main
from experiments.validate import check_config
from freqdiff.config import ConfigError, instantiate, load

# (override(s), substrings the error line must contain: the config path, the bad value, the expectation)
BAD = {
    "path-grammar": (["data.path=[abc"], ["data.path", "[abc", "not a valid value"]),
    "batch-size-negative": (["data.batch_size=-1"], ["data.batch_size", "-1"]),
    "batch-size-zero": (["data.batch_size=0"], ["data.batch_size", "0"]),
    "lr-negative": (["module.lr=-1"], ["module.lr", "-1", "positive number"]),
    "num-workers-negative": (["data.num_workers=-1"], ["data.num_workers", "-1"]),
    "precision": (["trainer.precision=bf17"], ["trainer.precision", "bf17", "32-true", "bf16-mixed"]),
    "prediction": (["module.prediction=foo"], ["module.prediction", "foo", "'eps'", "'edm'"]),
    "fid": (["callbacks.eval.fid=maybe"], ["callbacks.eval.fid", "maybe", "'auto'"]),
    "preset": (["module.net.preset=huge"], ["module.net.preset", "huge", "'tiny'"]),
    "max-steps-negative": (["trainer.max_steps=-5"], ["trainer.max_steps", "-5", "positive integer"]),
    "resolution": (["data.resolution=17"], ["resolution", "17"]),
    "max-steps-string": (["trainer.max_steps=abc"], ["trainer.max_steps", "abc", "integer", "config has"]),
    "lr-missing-marker": (["module.lr=???"], ["module.lr", "???", "give a value"]),
    "max-steps-float": (["trainer.max_steps=10.5"], ["trainer.max_steps", "10.5", "integer"]),
    "checkpoint-every-zero": (["run.checkpoint_every_n_steps=0"], ["run.checkpoint_every_n_steps", "0"]),
    "net-misspelled-keyword": (["+module.net.bogus=1"], ["module.net", "bogus"]),
    "module-misspelled-keyword": (["+module.lrr=1"], ["module.lrr", "did you mean 'lr'"]),
    "constructor-value-error": (["+module.ema_decay=2"], ["module.ema_decay", "2", "[0, 1)"]),
    "lr-schedule": (["+module.lr_schedule=step"], ["module.lr_schedule", "step", "'cosine'"]),
    "lr-final": (["+module.lr_final=2"], ["module.lr_final", "2", "[0, 1]"]),
    "warmup-negative": (["module.warmup_steps=-1"], ["module.warmup_steps", "-1"]),
    "halflife-negative": (["module.ema_halflife_kimg=-1"], ["module.ema_halflife_kimg", "-1"]),
    "samples-every-negative": (
        ["callbacks.samples.every_n_steps=-1"],
        ["callbacks.samples.every_n_steps", "-1"],
    ),
    "samples-n-zero": (["callbacks.samples.n=0"], ["callbacks.samples.n", "0"]),
    "strips-frames-zero": (["callbacks.strips.frames=0"], ["callbacks.strips.frames", "0"]),
    "eval-split": (["callbacks.eval.split=test"], ["callbacks.eval.split", "test", "'val'"]),
    "log-every-zero": (["trainer.log_every_n_steps=0"], ["trainer.log_every_n_steps", "0"]),
    "num-nodes-zero": (["trainer.num_nodes=0"], ["trainer.num_nodes", "0"]),
    "devices-zero": (["trainer.devices=0"], ["trainer.devices", "0"]),
    "seed-string": (["run.seed=abc"], ["run.seed", "abc", "integer"]),
    "name-slash": (["run.name=a/b"], ["run.name", "a/b"]),
    "bool-key": (
        ["trainer.enable_progress_bar=maybe"],
        ["trainer.enable_progress_bar", "maybe", "true or false"],
    ),
    "section-to-scalar": (["module.time_sampler=3"], ["module.time_sampler", "3", "mapping"]),
    "null-int": (["trainer.max_steps=null"], ["trainer.max_steps", "null", "integer"]),
    "null-path": (["data.path="], ["data.path", "null"]),
    "key-under-a-value": (["+trainer.max_steps.x=1"], ["trainer.max_steps", "not a section"]),
    "interpolation-to-nothing": (["module.lr=${nope}"], ["module.lr", "'nope' not found"]),
    # the ones that already gave one line
    "unknown-key": (["trainer.max_stepz=3"], ["trainer.max_stepz", "did you mean", "trainer.max_steps"]),
    "not-key-value": (["trainer.max_steps"], ["trainer.max_steps", "key=value"]),
    "bad-target": (
        ["module._target_=lightning_modules.nope.Module"],
        ["module", "lightning_modules.nope.Module"],
    ),
}


@pytest.fixture
def no_training(monkeypatch):
    def fit(*args, **kwargs):
        raise AssertionError("training started: the bad input was not refused")

    monkeypatch.setattr(L.Trainer, "fit", fit)


def run_main(tmp_path: Path, capsys, exp: str, *overrides: str) -> tuple[int, str, str]:
    rc = main(["run", exp, f"run.root={tmp_path / 'runs'}", f"data.path={tmp_path / 'data'}", *overrides])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, out: str, err: str, expected: list[str]) -> None:
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("config error: "), err
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(case, tmp_path, capsys, no_training):
    overrides, expected = BAD[case]
    assert_one_line_error(*run_main(tmp_path, capsys, "quickstart", *overrides), expected)
    assert not (tmp_path / "data").exists()


def test_unknown_experiment(tmp_path, capsys, no_training):
    assert_one_line_error(*run_main(tmp_path, capsys, "quickstar"), ["'quickstar'", "quickstart"])


@pytest.mark.parametrize("where", ["experiment", "base"])
def test_yaml_syntax_error_names_file_and_line(where, tmp_path, capsys, no_training):
    bad = "run:\n  name: x\ntrainer:\n  max_steps: [1, 2\n  precision: auto\n"
    exp = tmp_path / "exp.yaml"
    if where == "experiment":
        exp.write_text(bad)
        name = "exp.yaml"
    else:
        (tmp_path / "mybase.yaml").write_text(bad)
        exp.write_text("base: [mybase.yaml]\nexperiment: exp\n")
        name = "mybase.yaml"
    rc, out, err = run_main(tmp_path, capsys, str(exp))
    assert_one_line_error(rc, out, err, [name + ":5", "YAML syntax error", "line 4"])


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, no_training):
    monkeypatch.setenv("FREQDIFF_DEBUG", "1")
    rc, out, err = run_main(tmp_path, capsys, "quickstart", "module.lr=-1")
    assert rc == 2 and "Traceback" in err and "ValueError: lr=-1" in err
    assert err.strip().splitlines()[-1].startswith("config error: module.lr")


@pytest.mark.parametrize(
    "override, value",
    [
        ("trainer.devices=auto", "auto"),  # the receiver (lightning.Trainer) takes int | str | list
        ("trainer.devices=[0,1]", [0, 1]),
        ("trainer.limit_val_batches=0.5", 0.5),
        ("trainer.gradient_clip_val=null", None),
        ("trainer.precision=32", 32),
        ("module.lr=1", 1),  # an integer for a number
        ("module.ema_rampup=null", None),  # DiffusionModule: float | None
        ("callbacks.eval.fid=true", True),
        ("run.name=123", 123),
        ("data.resolution=16", 16),  # null in the config: anything
        ("module.seed=5", 5),  # an interpolation in the config: the type of its value
    ],
)
def test_good_overrides_are_accepted(override, value):
    cfg = load("quickstart", [override])
    key = override.split("=", 1)[0]
    got = cfg
    for part in key.split("."):
        got = got[part]
    assert (list(got) if value == [0, 1] else got) == value


def test_check_config_refuses_a_bad_precision_itself():
    cfg = load("quickstart", ["trainer.precision=bf17"])
    with pytest.raises(ConfigError, match=r"^trainer\.precision='bf17': expected one of auto, 32-true"):
        check_config(cfg)
    check_config(load("quickstart", ["trainer.precision=bf16-mixed"]))


def test_instantiate_wraps_constructor_errors_once_and_chains_them():
    cfg = load("quickstart", ["data.resolution=16", "module.lr=-1"])
    with pytest.raises(ConfigError) as info:
        instantiate(cfg.module, "module")
    assert str(info.value) == "module.lr: DDPMModule: lr=-1: expected a positive number"
    assert isinstance(info.value.__cause__, ValueError) and str(info.value.__cause__).startswith("lr=-1")
    node = OmegaConf.create({"_target_": "freqdiff.config.resolve_path", "exp": "no-such-exp"})
    with pytest.raises(ConfigError, match=r"^experiment 'no-such-exp' not found"):  # not prefixed again
        instantiate(node, "outer")
