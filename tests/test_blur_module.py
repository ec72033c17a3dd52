"""Blur diffusion end to end: the paper configs, BlurModule's data range and samplers, its x0_hat strips,
the quickstart_blur recipe through the command line, and the blur-ops benchmark (docs/methods/blur.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from test_training import tiny_overrides
from torch import nn

import lightning_modules.blur as blur_module
from callbacks.strips import x0_hat_strip
from datamodules.synthetic import DeadLeaves
from freqdiff.config import instantiate, load
from freqdiff.nets.presets import count_parameters, unet
from freqdiff.processes.blur import BlurProcess
from freqdiff.timesteps import UniformTime
from lightning_modules.blur import BlurModule

PAPER = ("blur_lsun_church64", "blur_lsun_bedroom64", "ddpm_lsun_church64")


def flat(cfg) -> dict:
    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    return dict(walk(OmegaConf.to_container(cfg, resolve=True)))


def dead_leaves(n: int, resolution: int = 16) -> torch.Tensor:
    """n dead-leaves images in [-1, 1], [n, 3, res, res]."""
    imgs = DeadLeaves(resolution=resolution, seed=0).images(n)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


def small_module(sampler: str = "ancestral", data_range=(-1.0, 1.0), **process) -> BlurModule:
    net = unet("tiny", resolution=16, channel_mult=(1, 2), attn_resolutions=(8,))
    proc = BlurProcess(resolution=16, data_range=data_range, **process)
    ts = UniformTime(0.001, 1.0)
    return BlurModule(net, proc, ts, sampler=sampler, data_range=data_range, sample_steps=8)


def high_freq_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean squared (valid) Laplacian per image, [B]."""
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(x, lap, groups=x.shape[1]).square().flatten(1).mean(1)


# ---------------------------------------------------------------------------------- paper configs
def test_paper_configs_load_and_build_the_121m_unet(tmp_path):
    cfgs = {exp: load(exp, [f"data.path={tmp_path}"]) for exp in PAPER}
    assert "data.path" in OmegaConf.missing_keys(load("blur_lsun_church64"))  # required
    for exp, cfg in cfgs.items():
        m = cfg.module
        assert m._target_ == "lightning_modules.blur.BlurModule" and m.net.preset == "adm_blur64"
        assert (cfg.data.batch_size, cfg.data.resolution, cfg.trainer.devices) == (16, 64, 1)
        assert (m.lr, m.weight_decay, list(m.betas), m.warmup_steps, m.ema_decay) == (
            5e-5,
            0.0,
            [0.9, 0.999],
            0,
            0.9999,
        )
        assert (m.prediction, m.sampler, m.sample_steps) == ("eps", "predictor", 999)
        assert list(m.data_range) == list(m.process.data_range) == [0.0, 1.0]
        p = m.process
        assert (p.basis, p.blur_schedule, p.sigma_k, p.sigma_min, p.schedule, p.T) == (
            "gaussian",
            "quartic",
            0.4,
            0.0,
            "linear",
            1000,
        )
        ev = cfg.callbacks.eval
        assert (ev.n, ev.ref_n, ev.fid, ev.every_n_steps, ev.steps) == (10000, 10000, True, 0, None)
        with torch.device("meta"):  # nothing allocated: the 121 M net (and its EMA copy) in no time
            module = instantiate(cfg.module, "module")
        assert isinstance(module, BlurModule) and module.data_range == (0.0, 1.0)
        assert abs(count_parameters(module.denoiser.net) - 121.06e6) < 0.01 * 121.06e6, exp
        process = instantiate(cfg.module.process, "module.process")  # on the CPU: its tables
        assert process.blur_off == module.process.blur_off == (exp == "ddpm_lsun_church64")
        assert process.F[-1].item() == pytest.approx(0.0 if process.blur_off else 28.195, abs=1e-3)
    assert cfgs["blur_lsun_church64"].trainer.max_steps == 600_000
    assert cfgs["blur_lsun_bedroom64"].trainer.max_steps == 450_000

    # the baseline is the blur config with the blur off, and bedroom is church with other iterations
    church, bedroom, ddpm = (flat(cfgs[e]) for e in PAPER)
    diff = {k for k in church.keys() | ddpm.keys() if church.get(k) != ddpm.get(k)}
    assert diff == {"experiment", "module.process.sigma_max"} and ddpm["module.process.sigma_max"] == 0
    diff = {k for k in church.keys() | bedroom.keys() if church.get(k) != bedroom.get(k)}
    assert diff == {"experiment", "trainer.max_steps"}


@pytest.fixture(scope="module")
def shards64(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lsun64") / "shards"
    DeadLeaves(resolution=64, n_train=8, n_val=4, shard_size=4).write(path, progress=False)
    return path


@pytest.mark.parametrize("exp", ["blur_lsun_church64", "ddpm_lsun_church64"])
def test_paper_config_runs_one_training_step_from_shards(exp, shards64, tmp_path, monkeypatch):
    """The paper config as it is, smaller only where a CPU needs it: one step of batch 2, the tiny
    preset instead of adm_blur64 (one fp32 step of the 121 M net takes ~13 s on one core), fp32,
    2 sampler steps and a 4-sample evaluation without FID (no Inception weights in tests)."""
    from experiments.runner import run

    monkeypatch.chdir(tmp_path)
    over = {
        "data.path": str(shards64),
        "data.batch_size": 2,
        "data.num_workers": 0,
        "run.root": str(tmp_path / "runs"),
        "trainer.max_steps": 1,
        "trainer.precision": "32-true",
        "trainer.enable_progress_bar": False,
        "trainer.log_every_n_steps": 1,
        "module.net.preset": "tiny",
        "module.sample_steps": 2,
        "callbacks.samples.n": 2,
        "callbacks.strips.frames": 2,
        "callbacks.eval.n": 4,
        "callbacks.eval.ref_n": 4,
        "callbacks.eval.batch_size": 4,
        "callbacks.eval.fid": False,
        "callbacks.eval.panel": 0,
        "+callbacks.eval.swd": False,
    }
    out = run(load(exp, [f"{k}={v}" for k, v in over.items()]))
    module, run_dir = out["module"], out["run_dir"]
    assert out["trainer"].global_step == 1 and isinstance(module, BlurModule)
    assert module.data_range == (0.0, 1.0) and module.process.blur_off == exp.startswith("ddpm")
    assert torch.isfinite(torch.stack([p.detach().sum() for p in module.parameters()])).all()
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 1 and final["n"] == 4 and final["nfe"] == 2 and final["ref_split"] == "train"
    assert (run_dir / "strips" / "step_0000001.png").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


# ---------------------------------------------------------------------------------- BlurModule
def test_data_range_maps_the_batch_for_the_loss_and_samples_back(monkeypatch):
    module = small_module("predictor", data_range=(0.0, 1.0))
    x = dead_leaves(4)
    torch.testing.assert_close(module.to_process(x), (x + 1) / 2)
    torch.testing.assert_close(module.from_process(module.to_process(x)), x)
    seen = {}
    marginal = module.process.marginal

    def spy(x0, t, noise):
        seen["x0"] = x0
        return marginal(x0, t, noise)

    monkeypatch.setattr(module.process, "marginal", spy)
    loss, t = module.loss(x)
    torch.testing.assert_close(seen["x0"], (x + 1) / 2)  # the process sees [0, 1]
    assert loss.shape == t.shape == (4,) and torch.isfinite(loss).all()

    # sample(): the sampler's final state is in the process's [0, 1]; the module returns [-1, 1]
    def fake(process, net, seeds, shape, steps, device, **kw):
        assert process is module.process and steps == 8
        return torch.full((len(seeds), *shape), 0.75)

    monkeypatch.setattr(blur_module, "sample_predictor", fake)
    torch.testing.assert_close(module.sample([0, 1]), torch.full((2, 3, 16, 16), 0.5))
    identity = small_module("ancestral")  # [-1, 1]: the identity
    monkeypatch.setattr(blur_module, "sample_ancestral", lambda *a, **kw: torch.full((2, 3, 16, 16), 0.75))
    torch.testing.assert_close(identity.sample([0, 1]), torch.full((2, 3, 16, 16), 0.75))


@pytest.mark.parametrize(
    "sampler, data_range, process, kw",
    [
        ("predictor", (0.0, 1.0), {}, {}),  # the paper's sampler on the paper's scale
        ("predictor", (0.0, 1.0), {"sigma_max": 0.0}, {}),  # the DDPM baseline's (blur off)
        ("ancestral", (-1.0, 1.0), {}, {"eta": 1.0}),
        ("ancestral", (-1.0, 1.0), {}, {"eta": 0.0}),
    ],
)
def test_fresh_module_samples_finite_images(sampler, data_range, process, kw):
    module = small_module(sampler, data_range, **process)
    x = module.sample([0, 1, 2], steps=6, **kw)
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    torch.testing.assert_close(module.sample([0, 1, 2], steps=6, **kw), x)  # per-seed, reproducible


class Oracle(nn.Module):
    """A denoiser that knows x0: x0_hat = x0 (in the process's scale) whatever x_t."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.register_buffer("x0", x0)

    def forward(self, x, t, labels=None, **kw):
        return self.x0.expand_as(x)


@pytest.mark.parametrize("sampler", ["predictor", "ancestral"])
def test_x0_hat_strip_shows_the_visible_estimate_coarse_to_fine(sampler):
    seeds, frames = [0, 1], 5
    # on a fresh module the strip callback runs: frames then the sample, per seed
    module = small_module(sampler)
    strip, ts = x0_hat_strip(module, seeds, steps=12, frames=frames)
    assert strip.shape == (len(seeds) * (frames + 1), 3, 16, 16) and torch.isfinite(strip).all()
    assert ts == sorted(ts, reverse=True) and ts[-1] == 0.0 and ts[0] > 0.99

    # with an exact x0_hat the frames are W^{F(t)} x0 (not x0_hat, which is amplified noise at large
    # t): coarse to fine, the high-frequency energy rising to the last frame's
    x0 = dead_leaves(len(seeds))
    module.ema = Oracle(x0)
    strip, ts = x0_hat_strip(module, seeds, steps=12, frames=frames)
    cols = strip.view(len(seeds), frames + 1, 3, 16, 16)
    for k, t in enumerate(ts[:-1]):
        t_b = torch.full((len(seeds),), t)
        torch.testing.assert_close(cols[:, k], module.process.visible_x0(x0, t_b).clamp(-1, 1))
    energy = torch.stack([high_freq_energy(cols[:, k]) for k in range(frames)], 1)  # [S, frames]
    assert (energy[:, 1:] >= energy[:, :-1] * 0.999).all(), energy  # never less detail later
    assert (energy[:, 0] < 0.5 * energy[:, -1]).all(), energy  # the first frame is clearly smooth


def test_x0_hat_strip_maps_the_visible_estimate_from_the_0_1_scale():
    module = small_module("predictor", data_range=(0.0, 1.0))
    x0 = dead_leaves(2)
    module.ema = Oracle(module.to_process(x0))
    strip, ts = x0_hat_strip(module, [0, 1], steps=6, frames=3)
    cols = strip.view(2, 4, 3, 16, 16)
    for k, t in enumerate(ts[:-1]):
        visible = module.process.visible_x0(module.to_process(x0), torch.full((2,), t))
        torch.testing.assert_close(cols[:, k], module.from_process(visible).clamp(-1, 1))


# ---------------------------------------------------------------------------------- quickstart_blur
def test_quickstart_blur_through_the_command_line(tmp_path, monkeypatch, capsys):
    from experiments.__main__ import main

    monkeypatch.chdir(tmp_path)
    over = tiny_overrides(
        tmp_path,
        **{
            "trainer.max_steps": 3,
            "callbacks.eval.n": 16,
            "callbacks.eval.ref_n": 16,
            "callbacks.eval.swd_n": 16,
            "callbacks.eval.fid": False,
            "callbacks.eval.panel": 8,
            "callbacks.strips.frames": 2,
        },
    )
    assert main(["run", "quickstart_blur", *over, "--dry"]) == 0
    dry = capsys.readouterr().out
    assert "lightning_modules.blur.BlurModule" in dry and "freqdiff.processes.blur.BlurProcess" in dry
    assert not (tmp_path / "runs").exists()

    assert main(["run", "quickstart_blur", *over]) == 0
    run_dir = tmp_path / "runs" / "quickstart_blur" / "default"
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 3 and final["n"] == 16 and final["nfe"] == 3
    assert final["sampler"] == "BlurModule.sample(steps=3, eta=0.5, sampler=ancestral)"
    assert final["spectral"] > 0
    assert (run_dir / "samples_vs_real.png").is_file() and list((run_dir / "strips").glob("*.png"))

    from freqdiff.checkpoints import load_run  # `make sample` / `make eval` rebuild it from the folder

    module, _ = load_run(run_dir)
    x = module.sample([0, 1], steps=2)
    assert isinstance(module, BlurModule) and x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    assert module.clip_x0 is True and module.sample_eta == 0.5  # the quickstart's sampler


# ---------------------------------------------------------------------------------- benchmark
def test_blur_ops_benchmark_is_found_and_runs(capsys):
    from benchmarks.__main__ import discover
    from benchmarks.blur_ops import bench, print_table

    assert "blur_ops" in discover(["blur"])
    r = bench("tiny", torch.device("cpu"), batch=2, resolution=16, repeats=2, budget_s=0.5)
    assert set(r["med"]) == {"train step", "forward", "marginal", "step η=1", "step η=0", "predictor_step"}
    assert all(v > 0 for v in r["med"].values())
    print_table(torch.device("cpu"), r)
    assert "predictor_step" in capsys.readouterr().out
