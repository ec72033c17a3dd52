"""Reliability of runs: divergence, safe loading, finishing a finished run, one last.ckpt, resume.

Each test drives the real runner on a tiny config (a 2-level UNet on 96 generated 16² images).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from test_training import tiny_overrides  # tests/ is on sys.path

from callbacks.checkpoint import AtomicCheckpointIO, TrainingDiverged
from experiments.__main__ import main
from experiments.runner import load_saved, run
from freqdiff.checkpoints import CONFIG_KEY, CheckpointError, load_run, read_checkpoint
from freqdiff.config import ConfigError, load

EVAL = {
    "callbacks.eval.n": 8,
    "callbacks.eval.ref_n": 8,
    "callbacks.eval.swd_n": 8,
    "callbacks.eval.panel": 8,
    "callbacks.eval.batch_size": 8,
    "callbacks.eval.fid": False,
    "callbacks.strips.every_n_steps": 0,
}


def over(tmp_path: Path, **extra) -> list[str]:
    return tiny_overrides(tmp_path, **{**EVAL, **extra})


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "quickstart" / "default"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished tiny run (4 steps, with its final evaluation); returns the run folder."""
    tmp = tmp_path_factory.mktemp("trained")
    run(load("quickstart", over(tmp)))
    return run_dir(tmp)


# ------------------------------------------------------------------------------------ divergence
class PoisonAt(L.Callback):
    """Sets a weight to NaN before step ``step``: the loss of that step is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.denoiser.parameters()).fill_(float("nan"))


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path):
    o = over(tmp_path, **{"trainer.max_steps": 8, "callbacks.samples.every_n_steps": 0})
    with pytest.raises(TrainingDiverged, match="at step 3"):
        run(load("quickstart", o), callbacks=[PoisonAt(3)])
    ckpt = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert step_of(ckpt) == 2  # the periodic one; neither the exception handler nor the end overwrote it
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (run_dir(tmp_path) / "final_metrics.json").exists()


def test_divergence_exit_code_from_the_command_line(tmp_path, capsys, monkeypatch):
    from lightning_modules.ddpm import DDPMModule

    real = DDPMModule.training_step

    def nan_from_step_3(self, batch, batch_idx):
        loss = real(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 3 else loss

    monkeypatch.setattr(DDPMModule, "training_step", nan_from_step_3)
    o = over(tmp_path, **{"trainer.max_steps": 8, "callbacks.samples.every_n_steps": 0})
    assert main(["run", "quickstart", *o]) == 3
    err = capsys.readouterr().err
    assert "diverged" in err and "step 3" in err and "Traceback" not in err
    assert step_of(run_dir(tmp_path) / "checkpoints" / "last.ckpt") == 2


def test_checkpoint_writer_refuses_nonfinite_weights(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
    with pytest.raises(TrainingDiverged, match="step 2"):
        AtomicCheckpointIO().save_checkpoint(
            {"state_dict": {"w": torch.tensor([1.0, float("inf")])}, "global_step": 2}, path
        )
    assert step_of(path) == 1 and not path.with_name("last.ckpt.tmp").exists()


# ------------------------------------------------------------------------------------ safe loading
class Payload:
    """Unpickling this creates the marker file (stands in for any code a checkpoint could run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payload_and_foreign_targets_are_refused(trained, tmp_path):
    marker = tmp_path / "ran"
    good = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({**good, "extra": Payload(marker)}, pickled)
    foreign = tmp_path / "foreign.ckpt"
    cfg = json.loads(json.dumps(good[CONFIG_KEY]))
    cfg["module"] = {"_target_": "os.system", "command": f"touch {marker}"}
    torch.save({**good, CONFIG_KEY: cfg}, foreign)
    nested = tmp_path / "nested.ckpt"
    cfg = json.loads(json.dumps(good[CONFIG_KEY]))
    cfg["module"]["net"] = {"_target_": "subprocess.call", "args": ["touch", str(marker)]}
    torch.save({**good, CONFIG_KEY: cfg}, nested)

    with pytest.raises(CheckpointError, match="not a readable freqdiff checkpoint"):
        load_run(pickled)
    for path, what in ((foreign, "module: os.system"), (nested, "module.net: subprocess.call")):
        with pytest.raises(CheckpointError, match=what):
            load_run(path)
    for cmd in ("sample", "eval"):
        for path in (pickled, foreign, nested):
            assert main([cmd, str(path), "--n", "2", "--no-progress"]) == 2
    assert not marker.exists()


def test_trusted_packages_extend_the_allow_list(trained, tmp_path, monkeypatch):
    """A user's own package is refused until trusted (FREQDIFF_TRUSTED_PACKAGES); then it loads."""
    (tmp_path / "mylab_nets.py").write_text("from freqdiff.nets.presets import unet  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    good = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cfg = json.loads(json.dumps(good[CONFIG_KEY]))
    cfg["module"]["net"]["_target_"] = "mylab_nets.unet"
    path = tmp_path / "own.ckpt"
    torch.save({**good, CONFIG_KEY: cfg}, path)
    with pytest.raises(CheckpointError, match="FREQDIFF_TRUSTED_PACKAGES"):
        load_run(path)
    monkeypatch.setenv("FREQDIFF_TRUSTED_PACKAGES", "mylab_nets")
    module, _ = load_run(path)
    assert module.sample([0], steps=2).shape == (1, 3, 16, 16)


# ------------------------------------------------------------------------------------ finishing
def test_rerun_of_a_finished_run_writes_the_missing_final_outputs(tmp_path, monkeypatch, capsys):
    o = over(tmp_path, **{"trainer.max_steps": 5})
    calls = {"n": 0}
    from callbacks.fid import Evaluate

    real = Evaluate.evaluate

    def crash_once(self, trainer, pl_module, final=False):
        if final and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("killed during the final evaluation")
        return real(self, trainer, pl_module, final=final)

    monkeypatch.setattr(Evaluate, "evaluate", crash_once)
    with pytest.raises(RuntimeError, match="final evaluation"):
        run(load("quickstart", o))
    rd = run_dir(tmp_path)
    assert step_of(rd / "checkpoints" / "last.ckpt") == 5  # the end of training checkpointed first
    assert not (rd / "final_metrics.json").exists()

    run(load("quickstart", o))
    final = json.loads((rd / "final_metrics.json").read_text())
    assert final["step"] == 5 and (rd / "samples_vs_real.png").is_file()
    assert "without final_metrics.json" in capsys.readouterr().out
    stamp = (rd / "final_metrics.json").stat().st_mtime_ns
    lines = (rd / "eval" / "metrics.jsonl").read_text().splitlines()

    run(load("quickstart", o))  # all there: nothing is redone
    assert "outputs are all there" in capsys.readouterr().out
    assert (rd / "final_metrics.json").stat().st_mtime_ns == stamp
    assert (rd / "eval" / "metrics.jsonl").read_text().splitlines() == lines


def test_last_checkpoint_is_at_max_steps(tmp_path):
    run(load("quickstart", over(tmp_path, **{"trainer.max_steps": 5, "run.checkpoint_every_n_steps": 2})))
    ckpt = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert step_of(ckpt) == 5
    assert json.loads((run_dir(tmp_path) / "final_metrics.json").read_text())["step"] == 5


# ------------------------------------------------------------------------------------ interrupt, resume
class InterruptAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupt_then_resumes_keep_one_last_checkpoint(tmp_path):
    o = {"run.checkpoint_every_n_steps": 100, "callbacks.samples.every_n_steps": 0}
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            run(
                load("quickstart", over(tmp_path, **o, **{"trainer.max_steps": 20})),
                callbacks=[InterruptAt(3)],
            )
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    ckpts = run_dir(tmp_path) / "checkpoints"
    assert step_of(ckpts / "last.ckpt") == 3
    for max_steps in (6, 9):
        run(load("quickstart", over(tmp_path, **o, **{"trainer.max_steps": max_steps})))
        assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt"]
        assert step_of(ckpts / "last.ckpt") == max_steps


def test_failed_first_attempt_does_not_block_the_corrected_rerun(tmp_path):
    class FailAtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            raise RuntimeError("failed before the first step")

    with pytest.raises(RuntimeError, match="before the first step"):
        run(load("quickstart", over(tmp_path, **{"module.lr": 0.5})), callbacks=[FailAtStart()])
    assert (run_dir(tmp_path) / "config.yaml").exists()
    assert not (run_dir(tmp_path) / "checkpoints" / "last.ckpt").exists()
    run(load("quickstart", over(tmp_path, **{"module.lr": 1e-3, "trainer.max_steps": 2})))
    assert step_of(run_dir(tmp_path) / "checkpoints" / "last.ckpt") == 2
    with pytest.raises(ConfigError, match="module.lr"):  # now there is a checkpoint to protect
        run(load("quickstart", over(tmp_path, **{"module.lr": 0.5, "trainer.max_steps": 2})))


def test_resume_from_the_run_folder_alone(trained, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "quickstart" / "copy"
    shutil.copytree(trained, moved)
    assert main(["resume", str(moved), "trainer.max_steps=6"]) == 0
    assert step_of(moved / "checkpoints" / "last.ckpt") == 6
    assert step_of(trained / "checkpoints" / "last.ckpt") == 4  # the original is untouched
    cfg = load_saved(moved, [])
    assert cfg.run.root == str(tmp_path / "elsewhere") and cfg.run.name == "copy"
    assert main(["resume", str(moved), "module.lr=0.1"]) == 2
    assert "module.lr: cannot be changed when resuming" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "nothing")]) == 2


# ------------------------------------------------------------------------------------ sample / eval
def test_sample_and_eval_accept_a_checkpoint_file(trained):
    ckpt = trained / "checkpoints" / "last.ckpt"
    assert main(["sample", str(ckpt), "--n", "3", "--chunk", "3", "--steps", "2", "--no-progress"]) == 0
    assert list((trained / "generated").glob("*/chunk_*"))
    args = ["--n", "3", "--steps", "2", "--fid", "false", "--swd-n", "0", "--no-progress"]
    assert main(["eval", str(ckpt), *args]) == 0
    assert list((trained / "eval").glob("*-n3-*.json"))
    assert not (ckpt / "eval").exists() and os.path.isfile(ckpt)
    assert read_checkpoint(ckpt)["global_step"] == 4
