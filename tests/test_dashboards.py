"""Dashboards (docs/dashboards.md): the run's hyper-parameters, ``train/lr`` and ``train/grad_norm``,
labelled x0_hat strips, and a real TensorBoard server serving them from a tiny run's folder."""

from __future__ import annotations

import math
import urllib.parse
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tb_server import get_json, tensorboard_server  # tests/ is on sys.path
from test_training import tiny_overrides

from callbacks.strips import frame_label, x0_hat_frames
from experiments.hparams import run_hparams
from experiments.runner import auto_precision, run
from freqdiff.config import instantiate, load

EVAL = {  # a tiny final evaluation (as tests/test_reliability.py), strips at steps 2 and 4
    "callbacks.eval.n": 8,
    "callbacks.eval.ref_n": 8,
    "callbacks.eval.swd_n": 8,
    "callbacks.eval.panel": 8,
    "callbacks.eval.batch_size": 8,
    "callbacks.eval.fid": False,
    "callbacks.strips.every_n_steps": 2,
    "+callbacks.strips.seeds": "[0,1]",
}
RUN = ("quickstart", "default")
STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]  # HParams session filter


def over(tmp_path: Path, **extra) -> list[str]:
    return tiny_overrides(tmp_path, **{**EVAL, **extra})


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


# ------------------------------------------------------------------------------------ run_hparams
def test_run_hparams_are_the_configs_settings_as_flat_scalars():
    hp = run_hparams(load("quickstart", ["data.resolution=16"]))
    assert all(isinstance(v, (str, int, float, bool)) for v in hp.values())
    assert hp["method"] == "DDPMModule"
    assert (hp["module.process"], hp["module.process.schedule"], hp["module.process.T"]) == (
        "GaussianProcess",
        "linear",
        1000,
    )
    assert (hp["module.prediction"], hp["module.time_sampler"]) == ("edm", "LogNormalSigmaTime")
    assert (hp["module.net"], hp["module.net.preset"]) == ("unet", "tiny")
    assert (hp["data.path"], hp["data.resolution"], hp["data.batch_size"]) == ("data/deadleaves16", 16, 32)
    assert (hp["module.lr"], hp["module.warmup_steps"], hp["module.ema_halflife_kimg"]) == (1e-3, 100, 5.0)
    assert (hp["module.lr_schedule"], hp["module.lr_decay_steps"]) == ("cosine", "none")
    assert (hp["run.seed"], hp["trainer.max_steps"], hp["trainer.precision"]) == (0, 4000, "auto")
    assert (hp["world_size"], hp["global_batch"]) == (1, 32)
    # defaults of the targets' signatures, for what the config leaves out; None and lists as text
    assert (hp["module.sigma_data"], hp["module.process.shift"], hp["module.ema_decay"]) == (0.5, 1.0, "none")
    assert hp["module.betas"] == "[0.9, 0.999]"

    # the same code reads every method's settings (no per-method branch)
    ssd = run_hparams(load("quickstart_ssd", ["data.resolution=16"]))
    assert (ssd["method"], ssd["module.process"], ssd["module.process.levels"]) == (
        "ScaleSpaceModule",
        "ScaleSpaceProcess",
        2,
    )
    blur = run_hparams(load("quickstart_blur", ["data.resolution=16"]))
    assert (blur["module.process.basis"], blur["module.sampler"]) == ("gaussian", "ancestral")
    edm = run_hparams(load("quickstart_edm", ["data.resolution=16"]))
    assert (edm["method"], edm["module.process.sigma_max"], edm["module.S_max"]) == ("EDMModule", 80.0, "inf")

    many = load("quickstart", ["data.resolution=16", "trainer.devices=2", "trainer.num_nodes=3"])
    assert (run_hparams(many)["world_size"], run_hparams(many)["global_batch"]) == (6, 192)
    assert (
        run_hparams(load("quickstart", ["data.resolution=16", "trainer.devices=auto"]))["world_size"]
        == "auto"
    )

    module = instantiate(load("quickstart", ["data.resolution=16"]).module, "module")
    counted = run_hparams(load("quickstart", ["data.resolution=16"]), module=module)
    assert counted["module.net.params"] == sum(p.numel() for p in module.denoiser.parameters()) > 0


# -------------------------------------------------------------------------- train/lr, grad norm
class GradProbe(L.Callback):
    """Per optimiser step: the step the logger would write it at, the unclipped grads' norm (what
    clip_grad_norm_ returns on a copy), their dtype, the lr; and the norm after clipping."""

    def __init__(self):
        self.steps, self.clipped = {}, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before the module's hook
        grads = [
            p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        copies = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for c, g in zip(copies, grads):
            c.grad = g
        norm = float(torch.nn.utils.clip_grad_norm_(copies, max_norm=math.inf))
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.steps[step] = {"norm": norm, "dtype": grads[0].dtype, "lr": optimizer.param_groups[0]["lr"]}

    def on_before_zero_grad(self, trainer, pl_module, optimizer):  # the previous step's clipped grads
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:  # (not get_total_norm: the test counts the module's calls of it)
            self.clipped.append(float(torch.stack([g.norm() for g in grads]).norm()))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_grad_norm_is_the_unclipped_norm_on_logged_steps_only(tmp_path, monkeypatch, precision):
    calls = []
    real = torch.nn.utils.get_total_norm

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    clip = 1e-3  # small enough to act on every step
    o = over(
        tmp_path,
        **{
            "trainer.max_steps": 6,
            "trainer.log_every_n_steps": 3,
            "trainer.precision": precision,
            "trainer.gradient_clip_val": clip,
            "callbacks.strips.every_n_steps": 0,
            "+callbacks.strips.at_end": False,
            "callbacks.samples.every_n_steps": 0,
            "callbacks.eval.every_n_steps": 0,
            "callbacks.eval.n": 4,
            "callbacks.eval.ref_n": 4,
            "callbacks.eval.swd_n": 4,
            "callbacks.eval.panel": 0,
        },
    )
    probe = GradProbe()
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counting)
    out = run(load("quickstart", o), callbacks=[probe])
    monkeypatch.undo()
    assert out["trainer"].precision == precision
    acc = events(out["run_dir"])
    logged = {e.step: e.value for e in acc.Scalars("train/grad_norm")}
    lrs = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert sorted(logged) == sorted(lrs) == [2, 5]  # Lightning's log steps: (step + 1) % 3 == 0
    assert len(calls) == 2  # the norm is computed on those steps only
    for step, value in logged.items():
        ref = probe.steps[step]
        assert ref["dtype"] == torch.float32  # bf16-mixed: the fp32 parameters' grads
        assert value == pytest.approx(ref["norm"], rel=1e-5)
        assert value > 10 * clip  # before clipping
        assert lrs[step] == pytest.approx(ref["lr"], rel=1e-6)
        assert lrs[step] == pytest.approx(1e-3 * (step + 1) / 100, rel=1e-6)  # the warm-up's lr
    assert probe.clipped and all(n <= clip * (1 + 1e-3) for n in probe.clipped)  # clipping acted


# ------------------------------------------------------------------------------------ strip labels
def test_strip_frames_know_t_sigma_and_resolution():
    edm = instantiate(
        load("quickstart_edm", ["data.resolution=16", "+module.net.attn_resolutions=[]"]).module, "module"
    )
    _, infos = x0_hat_frames(edm, [0], steps=6, frames=3)
    assert [f["t"] for f in infos][0] == 1.0 and infos[0]["sigma"] == pytest.approx(80.0)
    assert frame_label(infos[0]) == "t=1\nσ=80" and frame_label(infos[-1]) == "sample"
    ssd = instantiate(load("quickstart_ssd", ["data.resolution=16"]).module, "module")
    strip, infos = x0_hat_frames(ssd, [0], steps=6, frames=4)
    assert "sigma" not in infos[0] and {f["res"] for f in infos} == {8, 16} and strip.shape[-1] == 16
    assert frame_label(infos[0], show_res=True) == "t=1\n8²"


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny quickstart run (4 steps, strips at 2 and 4, the final evaluation); its root."""
    tmp = tmp_path_factory.mktemp("dash")
    run(load("quickstart", over(tmp)))
    return tmp / "runs"


def run_dir(root: Path) -> Path:
    return root.joinpath(*RUN)


def test_a_run_folder_carries_its_settings_lr_grad_norm_and_labelled_strips(trained):
    d = run_dir(trained)
    hp = yaml.safe_load((d / "hparams.yaml").read_text())
    assert hp["method"] == "DDPMModule" and hp["module.process.schedule"] == "linear"
    precision = auto_precision("cpu")  # trainer.precision: auto, resolved
    assert (hp["trainer.max_steps"], hp["trainer.precision"], hp["world_size"]) == (4, precision, 1)
    assert hp["module.net.params"] > 0 and hp["data.batch_size"] == 8
    acc = events(d)
    tags = acc.Tags()
    assert {"train/lr", "train/grad_norm", "train/loss", "perf/kimg"} <= set(tags["scalars"])
    assert "hp_metric" not in tags["scalars"]  # no stray -1 series
    assert [e.step for e in acc.Scalars("train/grad_norm")] == [0, 1, 2, 3]  # log_every_n_steps 1
    assert "x0_hat_strip" in tags["images"]
    text = acc.Tensors("x0_hat_strip/frames/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| column | sampler step | t |" in text and "sample" in text

    png = d / "strips" / "step_0000004.png"
    img = np.asarray(Image.open(png).convert("RGB"))
    cell = 16 * 4  # upscale 4
    band = img.shape[0] - (2 * (cell + 1) + 1)  # two seeds' rows below the caption band
    assert img.shape[1] == 4 * (cell + 1) + 1  # 3 sampler steps + the sample
    assert band >= 10 and (img[:band] < 128).any()  # text drawn above the frames


def test_a_resumed_run_rewrites_hparams_yaml(tmp_path):
    quick = {"callbacks.strips.every_n_steps": 0, "+callbacks.strips.at_end": False, "callbacks.eval.n": 4}
    quick.update({"callbacks.eval.ref_n": 4, "callbacks.eval.swd_n": 4, "callbacks.eval.panel": 0})
    first = run(load("quickstart", over(tmp_path, **quick, **{"trainer.max_steps": 2})))
    path = first["run_dir"] / "hparams.yaml"
    assert yaml.safe_load(path.read_text())["trainer.max_steps"] == 2
    run(load("quickstart", over(tmp_path, **quick, **{"trainer.max_steps": 3})))  # resumes (a resumable key)
    assert yaml.safe_load(path.read_text())["trainer.max_steps"] == 3  # Lightning alone would keep 2


@pytest.fixture(scope="module")
def board(trained, tmp_path_factory):
    """A real TensorBoard over the run root on 127.0.0.1; yields its base URL (stopped by its PID)."""

    def ready(base: str) -> bool:
        return "train/grad_norm" in get_json(f"{base}/data/plugin/scalars/tags").get("/".join(RUN), {})

    log = tmp_path_factory.mktemp("board") / "tensorboard.log"
    with tensorboard_server(trained, log, ready, what="train/grad_norm") as base:
        yield base


def test_tensorboard_serves_lr_grad_norm_and_the_runs_hparams(trained, board):
    tags = get_json(f"{board}/data/plugin/scalars/tags")["/".join(RUN)]
    assert {"train/lr", "train/grad_norm", "train/loss", "eval/swd/avg"} <= set(tags)
    assert "hp_metric" not in tags
    query = urllib.parse.urlencode({"run": "/".join(RUN), "tag": "train/grad_norm"})
    series = get_json(f"{board}/data/plugin/scalars/scalars?{query}")
    assert [s[1] for s in series] == [0, 1, 2, 3] and all(s[2] > 0 for s in series)  # [wall, step, value]

    # the HParams plugin (tensorboard/plugins/hparams/hparams_plugin.py: POST /experiment, /session_groups)
    exp = get_json(f"{board}/data/plugin/hparams/experiment", {"experimentName": ""})
    names = {h["name"] for h in exp.get("hparamInfos", [])}
    metrics = {m["name"]["tag"] for m in exp.get("metricInfos", [])}
    assert "eval/n" in names and "eval/swd/avg" in metrics  # the evaluation's summary
    saved = yaml.safe_load((run_dir(trained) / "hparams.yaml").read_text())
    ours = {
        "method",
        "module.process",
        "module.process.schedule",
        "module.lr",
        "data.batch_size",
        "world_size",
    }
    assert ours <= set(saved)
    assert ours <= names, f"the evaluation's hparams lack the run's settings: {sorted(names)}"
    groups = get_json(
        f"{board}/data/plugin/hparams/session_groups",
        {"experimentName": "", "allowedStatuses": STATUSES, "startIndex": 0, "sliceSize": 10},
    )
    shown = groups["sessionGroups"][0]["hparams"]
    assert shown["method"] == "DDPMModule" and shown["module.lr"] == saved["module.lr"]
