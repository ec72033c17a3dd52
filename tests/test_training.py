"""A short real training run through the runner, resume, and refusal of a changed config (DESIGN §3, §6)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from experiments.runner import run
from freqdiff.checkpoints import load_run
from freqdiff.config import ConfigError, load
from lightning_modules.base import lr_factor


def tiny_overrides(tmp_path: Path, **extra) -> list[str]:
    o = {
        "run.root": str(tmp_path / "runs"),
        "data.path": str(tmp_path / "data" / "dl16"),
        "data.resolution": 16,
        "data.synthetic.resolution": 16,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.synthetic.n_train": 96,
        "data.synthetic.n_val": 16,
        "module.sample_steps": 3,
        "+module.net.channel_mult": "[1,2]",
        "+module.net.attn_resolutions": "[8]",
        "trainer.max_steps": 4,
        "trainer.enable_progress_bar": False,
        "trainer.log_every_n_steps": 1,
        "run.checkpoint_every_n_steps": 2,
        "callbacks.samples.every_n_steps": 2,
        "callbacks.samples.n": 8,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


class Probe(L.Callback):
    """Records the state a (resumed) run starts from."""

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        self.ema = {k: v.clone() for k, v in pl_module.ema.state_dict().items()}
        opt = trainer.optimizers[0]
        self.exp_avg = [
            opt.state[p]["exp_avg"].clone() for p in pl_module.denoiser.parameters() if p in opt.state
        ]
        self.nimg = int(pl_module.nimg)


def test_train_resume_and_refuse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load("quickstart", tiny_overrides(tmp_path))
    out = run(cfg)
    run_dir = out["run_dir"]
    assert run_dir == tmp_path / "runs" / "quickstart" / "default"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (run_dir / "config.yaml").is_file()
    assert not list(run_dir.glob("checkpoints/*.tmp"))
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "samples" / "step_0000002.png").is_file()
    assert (run_dir / "samples_vs_real.png").is_file()
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    assert metrics["spectral_distance"] > 0
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 4 and saved["freqdiff_config"]["module"]["lr"] == cfg.module.lr

    # resume: the same experiment with a larger budget continues from step 4, same EMA and optimiser state
    probe = Probe()
    cfg2 = load("quickstart", tiny_overrides(tmp_path, **{"trainer.max_steps": 6}))
    out2 = run(cfg2, callbacks=[probe])
    assert probe.start_step == 4 and probe.nimg == 4 * 8
    ema_saved = {k[len("ema.") :]: v for k, v in saved["state_dict"].items() if k.startswith("ema.")}
    for k, v in probe.ema.items():
        torch.testing.assert_close(v, ema_saved[k])
    opt_saved = saved["optimizer_states"][0]["state"]
    assert len(probe.exp_avg) == len(opt_saved) > 0
    for i, v in enumerate(probe.exp_avg):
        torch.testing.assert_close(v, opt_saved[i]["exp_avg"])
    assert out2["trainer"].global_step == 6
    assert torch.load(ckpt, weights_only=False)["global_step"] == 6

    # a changed config is refused, naming the key
    with pytest.raises(ConfigError, match=r"module\.lr: 0\.001 -> 0\.5"):
        run(load("quickstart", tiny_overrides(tmp_path, **{"module.lr": 0.5})))
    # ... unless started over under a new name
    out3 = run(
        load(
            "quickstart",
            tiny_overrides(tmp_path, **{"module.lr": 0.5, "run.resume": False, "trainer.max_steps": 2}),
        )
    )
    assert out3["run_dir"].name == "default-2"

    # load_run rebuilds the trained module from the run folder
    module, loaded_cfg = load_run(run_dir)
    assert loaded_cfg.trainer.max_steps == 6
    x = module.sample([0, 1], steps=2)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


class Crash(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            raise RuntimeError("simulated crash")


def test_crash_keeps_a_resumable_checkpoint(tmp_path, monkeypatch):
    """A run that dies between periodic checkpoints still leaves last.ckpt at the step it reached."""
    monkeypatch.chdir(tmp_path)
    over = tiny_overrides(
        tmp_path, **{"run.checkpoint_every_n_steps": 100, "callbacks.samples.every_n_steps": 0}
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(load("quickstart", over), callbacks=[Crash()])
    ckpt = tmp_path / "runs" / "quickstart" / "default" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    probe = Probe()
    run(load("quickstart", over), callbacks=[probe])
    assert probe.start_step == 3


def test_lr_schedule_formula():
    # warm-up 10 steps, then cosine from 1 to 0.1 at step 110 (the factor of 0-based step s is at s + 1)
    f = [lr_factor("cosine", 10, 110, 0.1, s) for s in (0, 4, 9, 59, 109, 500)]
    assert f == pytest.approx([0.1, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1])
    assert [lr_factor("linear", 0, 100, 0.0, s) for s in (24, 49, 99, 150)] == pytest.approx(
        [0.75, 0.5, 0, 0]
    )
    assert [lr_factor("constant", 4, None, 0.0, s) for s in (0, 3, 10**6)] == [0.25, 1.0, 1.0]


class LRProbe(L.Callback):
    def __init__(self):
        self.lrs = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_lr_decay_in_a_run_and_its_resume(tmp_path, monkeypatch):
    """The optimiser's LR follows the curve to the first run's max_steps; a resume with more steps
    continues at the final LR (the end step is in the checkpoint), not on a re-stretched curve."""
    monkeypatch.chdir(tmp_path)
    extra = {"+module.lr_schedule": "linear", "+module.lr_final": 0.25, "module.warmup_steps": 0}
    probe = LRProbe()
    run(load("quickstart", tiny_overrides(tmp_path, **extra)), callbacks=[probe])
    lr = 1e-3
    # step s trains with the factor at u = (s + 1) / 4: the last step of the curve is at lr_final
    assert probe.lrs == pytest.approx({0: lr * 0.8125, 1: lr * 0.625, 2: lr * 0.4375, 3: lr * 0.25})
    ckpt = tmp_path / "runs" / "quickstart" / "default" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["lr_decay_end"] == 4
    probe2 = LRProbe()
    run(load("quickstart", tiny_overrides(tmp_path, **extra, **{"trainer.max_steps": 6})), callbacks=[probe2])
    assert probe2.lrs == pytest.approx({4: lr * 0.25, 5: lr * 0.25})
