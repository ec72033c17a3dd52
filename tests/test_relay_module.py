"""Relay's stage-2 module, label dropout, the two-stage pipeline, paper configs (docs/methods/relay.md)."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.pipeline import load_pipeline, run_pipeline
from freqdiff.checkpoints import load_run
from freqdiff.config import instantiate
from freqdiff.nets.presets import count_parameters, unet
from freqdiff.nets.unet import NULL_LABEL
from freqdiff.processes.relay import RelayProcess
from freqdiff.timesteps import UniformTime
from lightning_modules.relay import RelayModule


def test_null_label_is_the_unconditional_branch_per_sample():
    torch.manual_seed(0)
    net = unet("tiny", resolution=8, attn_resolutions=[], num_classes=5)
    torch.nn.init.normal_(net.label_emb.weight)
    for p in net.parameters():  # the zero-initialised output conv would hide every difference
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    x, c = torch.randn(3, 3, 8, 8), torch.randn(3)
    uncond = net(x, c, None)
    mixed = net(x, c, torch.tensor([NULL_LABEL, 2, NULL_LABEL]))
    torch.testing.assert_close(mixed[[0, 2]], uncond[[0, 2]])
    assert not torch.allclose(mixed[1], uncond[1])
    torch.testing.assert_close(mixed[1:2], net(x[1:2], c[1:2], torch.tensor([2])))
    with pytest.raises(ValueError, match="null label"):
        net(x, c, torch.tensor([0, 5, 1]))


def _module(**kw) -> RelayModule:
    net = unet("tiny", resolution=8, attn_resolutions=[], num_classes=kw.pop("num_classes", 4))
    return RelayModule(net, RelayProcess(resolution=8, patch=4), UniformTime(), **kw)


def test_label_dropout_trains_the_unconditional_branch_at_its_rate():
    m = _module(label_dropout=0.25)
    seen = []
    orig = m.denoiser.net.forward
    m.denoiser.net.forward = lambda x, c, labels=None: (seen.append(labels), orig(x, c, labels))[1]
    x0, labels = torch.rand(64, 3, 8, 8) * 2 - 1, torch.randint(0, 4, (64,))
    for step in range(25):  # 1600 labels; the generator changes with the (fake) global step
        m._generators = {}
        m.seed = step
        m.loss(x0, labels)
    got = torch.cat(seen)
    share = float((got == NULL_LABEL).float().mean())
    assert share == pytest.approx(0.25, abs=4 * (0.25 * 0.75 / got.numel()) ** 0.5)
    kept = got != NULL_LABEL
    assert torch.equal(got[kept], labels.repeat(25)[kept])  # the rest keep their labels
    seen.clear()
    _module(label_dropout=0.0).loss(x0, labels)


def test_guidance_needs_a_conditional_net_and_matching_sigma_data():
    with pytest.raises(ValueError, match="num_classes"):
        _module(num_classes=0, cfg_scale=3.5)
    with pytest.raises(ValueError, match="sigma_data"):
        _module(sigma_data=1.0)
    with pytest.raises(ValueError, match="module.stage1"):
        _module().sample([0])
    assert "not set" in _module().sampling_unavailable()


def test_relay_loss_weight_is_edms_clamped():
    p = RelayProcess(pl=0.89)
    t = torch.tensor([0.0, 0.3, 1.0])
    s = p.sigma(t).double()
    torch.testing.assert_close(p.loss_weight(t).double(), ((s**2 + 0.25) / (s**2 * 0.25)), rtol=1e-6, atol=0)
    assert float(RelayProcess(weight_max=100.0).loss_weight(torch.tensor([0.0]))) == 100.0


PIPE = [
    "trainer.max_steps=3",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.synthetic.n_train=48",
    "data.synthetic.n_val=16",
    "callbacks.samples.every_n_steps=0",
    "stages.stage1.data.batch_size=8",
    "stages.stage1.module.sample_steps=4",
    "stages.stage2.data.batch_size=4",
    "stages.stage2.callbacks.strips.every_n_steps=0",
    "stages.stage2.module.sample_steps=12",
    "evaluate.n=8",
    "evaluate.ref_n=8",
    "evaluate.swd_n=8",
    "evaluate.chunk=8",
    "evaluate.batch_size=8",
    "evaluate.panel=2",
    "+evaluate.progress=false",
]


def test_quickstart_relay_pipeline_runs_resumes_and_composes_the_stages(tmp_path, capsys):
    root = tmp_path / "runs"
    args = [
        *PIPE,
        f"run.root={root}",
        f"data.path={tmp_path / 'leaves'}",
        f"evaluate.cache_dir={tmp_path / 'c'}",
    ]
    out = run_pipeline("quickstart_relay", args)
    s1, s2 = (
        root / "quickstart_relay" / "stage1" / "default",
        root / "quickstart_relay" / "stage2" / "default",
    )
    for d in (s1, s2):
        assert (d / "checkpoints" / "last.ckpt").is_file() and (d / "config.yaml").is_file()
    assert (s2 / "stages.png").is_file()
    record = out["evaluate"]
    assert record["n"] == 8 and "swd/avg" in record["metrics"]
    assert "stage1-step3" in next((s2 / "eval").glob("*.json")).name  # stage 1's step names the cache
    # the pipeline's record for compare: the cost of both stages, the metrics also on the board
    pipe = json.loads((s2 / "pipeline_metrics.json").read_text())
    c1, c2 = (json.loads((d / "cost.json").read_text()) for d in (s1, s2))
    assert pipe["cost"]["images_seen"] == c1["images_seen"] + c2["images_seen"] > c2["images_seen"]
    assert pipe["cost"]["params"] == c1["params"] + c2["params"] and pipe["metrics"] == record["metrics"]
    assert (s2 / pipe["record_file"]).with_suffix(".npz").is_file()
    from test_dashboards import events  # tests/ is on sys.path

    (point,) = events(s2).Scalars("eval/swd/avg")
    assert point.value == pytest.approx(record["metrics"]["swd/avg"])
    # the stage-2 module composes stage 1: seeded, batch-independent two-stage samples at 32²
    module, cfg = load_run(s2)
    assert cfg.module.stage1 == str(s1)
    x = module.sample([3, 4], steps=12)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
    torch.testing.assert_close(module.sample([4], steps=12), x[1:], atol=1e-5, rtol=1e-5)
    stages = module.sample_stages([0, 1])
    assert [v.shape[-1] for v in stages.values()] == [8, 32]
    # the x0_hat strips pick their frames from the truncated grid the sampler actually runs
    from callbacks.strips import frame_steps, x0_hat_strip

    n = module.reported_steps(60)
    assert n == 22  # Karras 60 points, 22 below σ 0.95
    strip, ts = x0_hat_strip(module, [0], steps=60, frames=8)
    assert len(ts) == len(frame_steps(n, 8)) + 1 == 9 and strip.shape == (9, 3, 32, 32)
    # a rerun skips what is done: no training step, the evaluation record is read back
    capsys.readouterr()
    again = run_pipeline("quickstart_relay", args)
    text = capsys.readouterr().out
    assert "already done" in text and again["evaluate"] == json.loads(json.dumps(record))
    # one part, one stage's key
    run_pipeline("quickstart_relay", [*args, "pipeline.only=stage1", "stages.stage1.trainer.max_steps=4"])
    assert torch.load(s1 / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_pipeline_overrides_are_checked():
    from freqdiff.config import ConfigError

    with pytest.raises(ConfigError, match="module.nonsense"):
        load_pipeline("quickstart_relay", ["module.nonsense=1"])
    with pytest.raises(ConfigError, match="pipeline.only"):
        load_pipeline("quickstart_relay", ["pipeline.only=stage3"])
    _, stages = load_pipeline("quickstart_relay", ["module.lr=0.5", "stages.stage2.module.s_noise=0.3"])
    assert stages["stage1"].module.lr == 0.5 == stages["stage2"].module.lr  # reaches every stage
    assert stages["stage2"].module.s_noise == 0.3 and stages["stage1"].data.resolution == 8


@pytest.mark.parametrize("exp", ["relay_celeba256", "relay_imagenet256"])
def test_paper_configs_instantiate_with_the_papers_sizes(exp):
    _, stages = load_pipeline(exp, ["data.path=/nowhere"])
    counts = {}
    for name, cfg in stages.items():
        with torch.device("meta"):
            module = instantiate(cfg.module, f"stages.{name}.module")
        counts[name] = count_parameters(module.denoiser)
    print(exp, {k: f"{v / 1e6:.2f} M" for k, v in counts.items()})
    cond = exp == "relay_imagenet256"
    # EDM's ADM UNets (tests/test_unet.py: 295.13 M and 552.81 M unconditional), plus 1000 label rows
    emb = {"stage1": 1000 * 768, "stage2": 1000 * 1024} if cond else {"stage1": 0, "stage2": 0}
    assert counts["stage1"] == pytest.approx(295.13e6 + emb["stage1"], rel=1e-4)
    assert counts["stage2"] == pytest.approx(552.81e6 + emb["stage2"], rel=1e-4)
    s2 = stages["stage2"].module
    if cond:
        assert (s2.process.pl, s2.process.sigma_B_max, s2.cfg_scale, s2.rho, s2.truncation_sigma) == (
            0.93,
            3.0,
            3.5,
            100.0,
            0.9,
        )
    else:
        assert (s2.process.pl, s2.process.sigma_B_max, s2.sampler_pl, s2.sample_steps, s2.s_noise) == (
            0.89,
            2.0,
            1.05,
            150,
            0.2,
        )
        assert stages["stage1"].module.sde_scale == 0.05 and stages["stage1"].module.sample_steps == 120
