"""Speed options that must change no number (gradient checkpointing, channels-last, torch.compile),
the sampling batch size chosen from memory, and the performance benchmarks on tiny sizes
(docs/performance.md)."""

from __future__ import annotations

import copy

import pytest
import torch

from freqdiff.nets.flexi_unet import FlexiUNet
from freqdiff.nets.unet import UNet


def small_unet(**kw) -> UNet:
    torch.manual_seed(0)
    net = UNet(
        resolution=16,
        model_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        **kw,
    )
    with torch.no_grad():  # no zero-initialised layers: every block shapes the output and the gradients
        for p in net.parameters():
            p.normal_(0, 0.2 / max(1, p[0].numel() ** 0.5) if p.ndim > 1 else 0.1)
    return net


def grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    plain = small_unet(dropout=0.2)
    ck = copy.deepcopy(plain)
    ck.checkpoint = True
    x, c = torch.randn(3, 3, 16, 16), torch.tensor([10.0, 400.0, 900.0])
    outs = []
    for net in (plain, ck):
        torch.manual_seed(1)  # the same dropout masks: the recomputation replays the RNG state
        out = net(x, c)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)
    g0, g1 = grads(plain), grads(ck)
    assert g0.keys() == g1.keys() and len(g0) == len(list(plain.parameters()))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_gradient_checkpointing_keeps_fewer_activations_for_backward():
    """Bytes autograd saves outside checkpointed regions: the blocks' activations are no longer kept."""

    def saved_bytes(net: UNet) -> int:
        total = [0]

        def pack(t: torch.Tensor):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(torch.randn(4, 3, 16, 16), torch.full((4,), 500.0))
        out.square().mean().backward()
        return total[0]

    plain = small_unet()
    ck = copy.deepcopy(plain)
    ck.checkpoint = True
    full, kept = saved_bytes(plain), saved_bytes(ck)
    assert kept < 0.2 * full, (kept, full)  # measured 0.13: what is left is conv_in, the head, the embedding
    ck.eval()  # not training: checkpointing is off, all activations kept as usual
    assert saved_bytes(ck) == full


def test_channels_last_is_the_same_function_in_nhwc():
    plain = small_unet()
    nhwc = small_unet(channels_last=True)
    nhwc.load_state_dict(plain.state_dict())  # (in-place random init fills NHWC memory in another order)
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # kept by the load
    x, c = torch.randn(2, 3, 16, 16), torch.tensor([5.0, 700.0])
    out = nhwc(x, c)
    assert out.is_contiguous()  # the processes get plain NCHW
    torch.testing.assert_close(out, plain(x, c), rtol=1e-4, atol=1e-5)
    # Flexi-UNet: every (entry, exit) pair, adapters converted too
    fp, fn = FlexiUNet(copy.deepcopy(plain)), FlexiUNet(copy.deepcopy(nhwc))
    fn.load_state_dict(fp.state_dict())
    adapters = [*fn.adapters_in.values(), *fn.adapters_out.values()]
    assert adapters and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in adapters)
    for side, out_side in ((8, 8), (8, 16), (4, 4), (4, 16)):
        xs = torch.randn(2, 3, side, side)
        torch.testing.assert_close(
            fn(xs, c, out_resolution=out_side), fp(xs, c, out_resolution=out_side), rtol=1e-4, atol=1e-5
        )


def quick_module(tmp_path, **extra):
    from freqdiff.config import instantiate, load

    # lr_decay_steps given: the module builds its optimiser without a trainer's max_steps
    over = ["data.resolution=16", f"run.root={tmp_path}", "module.net.preset=tiny"]
    over.append("+module.lr_decay_steps=1000")
    cfg = load("quickstart", over)
    for k, v in extra.items():
        cfg.module[k] = v
    torch.manual_seed(0)
    return instantiate(cfg.module, "module")


def test_compile_backbone_keeps_parameter_names_and_the_loss(tmp_path):
    eager = quick_module(tmp_path)
    compiled = quick_module(tmp_path, compile_backbone={"backend": "aot_eager"})
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    compiled.load_state_dict(eager.state_dict())
    assert (
        compiled.denoiser.net._compiled_call_impl is not None
        and compiled.ema.net._compiled_call_impl is not None
    )
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    for p in eager.denoiser.net.out_conv.parameters():  # a non-zero output, so the loss depends on the net
        torch.nn.init.normal_(p, std=0.1)
    compiled.load_state_dict(eager.state_dict())
    loss_e, t_e = eager.loss(x0)
    loss_c, t_c = compiled.loss(x0)
    torch.testing.assert_close(t_c, t_e)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    loss_c.mean().backward()
    assert compiled.denoiser.net.out_conv.weight.grad is not None


def test_compile_backbone_refuses_a_bad_value(tmp_path):
    from freqdiff.config import ConfigError

    with pytest.raises(ConfigError, match=r"module.*compile_backbone='yes'.*torch.compile keyword"):
        quick_module(tmp_path, compile_backbone="yes")


@pytest.mark.slow
def test_inductor_compiled_unet_matches_eager():
    """torch.compile's default backend (inductor: generated C++ on the CPU, ~50 s to compile)."""
    net = small_unet()
    x, c = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 800.0])
    ref = net(x, c)
    net.compile()
    torch.testing.assert_close(net(x, c), ref, rtol=1e-4, atol=1e-5)


def test_speed_options_may_change_when_a_run_resumes():
    from experiments.rundir import resumable

    for key in (
        "module.net.checkpoint",
        "module.net.channels_last",
        "module.compile_backbone",
        "module.compile_backbone.mode",
        "stages.stage2.module.net.checkpoint",
    ):
        assert resumable(key), key
    for key in ("module.net.channel_mult", "module.net.dropout", "module.lr"):
        assert not resumable(key), key


def test_sampling_batch_from_memory():
    from experiments.sample_batch import CPU_BATCH, auto_batch_size, batch_from_memory

    gib = 2**30
    # 80 % of 10 GiB, 0.5 GiB fixed, 30 MiB a sample: 256 samples fit, rounded down to a multiple of 8
    assert batch_from_memory(10 * gib, 30 * 2**20, 0.5 * gib) == 256
    assert batch_from_memory(10 * gib, 31 * 2**20, 0.5 * gib) == 240  # 247.7 -> 247 -> 240
    assert batch_from_memory(10 * gib, 1 * 2**20, cap=500) == 500
    assert batch_from_memory(gib, 2 * gib) == 1  # never 0
    assert batch_from_memory(gib, 0.0, cap=64) == 64
    assert batch_from_memory(gib, 0.15 * gib) == 5  # below the multiple: not rounded to 0
    with pytest.raises(ValueError, match="free_bytes=0"):
        batch_from_memory(0, 1.0)
    assert auto_batch_size(None, {}, torch.device("cpu"), cap=1000) == CPU_BATCH
    assert auto_batch_size(None, {}, torch.device("cpu"), cap=10) == 10


@pytest.mark.gpu
def test_auto_batch_size_fits_the_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from experiments.sample_batch import auto_batch_size

    device = torch.device("cuda")
    module = quick_module(tmp_path).to(device).eval()
    s = {"precision": "bf16-mixed", "eta": 0.0}
    b = auto_batch_size(module, s, device, cap=4096)
    assert 8 <= b <= 4096
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        module.sample(list(range(b)), steps=2, eta=0.0)  # does not run out of memory


# ---------------------------------------------------------------- the benchmarks on tiny sizes
def test_benchmarks_are_found():
    from benchmarks.__main__ import discover

    assert {"sample_throughput", "train_options", "train_overhead"} <= set(discover([]))


def test_sample_throughput_benchmark_runs_the_same_sampler():
    from benchmarks.sample_throughput import bench_case

    r = bench_case(["data.resolution=16"], n=8, batch=4, steps=3, eta=1.0, budget_s=0.0)
    assert r["gap"] < 1e-4  # the bare loop reproduces the framework's samples from the same noise
    assert r["bare"] > 0 and r["framework"] > 0 and r["nfe"] == 3


def test_train_options_benchmark_runs():
    from benchmarks.train_options import bench_channels_last, bench_checkpoint, peak_bytes

    cpu = torch.device("cpu")
    r = bench_checkpoint("tiny", 16, 2, cpu, budget_s=0.0)
    assert r["sec"]["on"] > 0 and r["sec"]["off"] > 0 and r["params"] > 0
    assert min(r["mem"].values()) >= 0
    assert bench_channels_last("tiny", 16, 2, cpu, budget_s=0.0)["sec"]["on"] > 0
    big = peak_bytes(lambda: torch.ones(64, 2**20).sum(), cpu)  # 256 MiB held for a moment
    assert big > 200 * 2**20


def test_train_overhead_benchmark_runs():
    from benchmarks.train_overhead import bench_case

    r = bench_case(
        "tiny", ["data.resolution=16", "data.synthetic.n_train=256", "data.synthetic.n_val=32"], 2, segments=1
    )
    assert r["n"] == {"bare": 2, "framework": 2} and r["bare"] > 0 and r["framework"] > 0


def test_gpu_training_benchmark_counts_flops_and_mfu(monkeypatch, capsys):
    from benchmarks import gpu_training as g
    from benchmarks.train_options import build, train_step

    monkeypatch.delenv("FREQDIFF_PEAK_TFLOPS", raising=False)
    assert g.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and g.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert g.peak_tflops("NVIDIA H100 PCIe") == 756.0 and g.peak_tflops("Some GPU") is None
    monkeypatch.setenv("FREQDIFF_PEAK_TFLOPS", "100")
    assert g.peak_tflops("Some GPU") == 100.0
    assert g.mfu(50e12, 1.0, 100.0) == pytest.approx(0.5) and g.mfu(1.0, 1.0, None) is None
    cpu = torch.device("cpu")
    net = build("tiny", 16, cpu)
    with torch.no_grad(), g.FlopCounterMode(display=False) as fc:
        net(torch.randn(2, 3, 16, 16), torch.full((2,), 500.0))
    ratio = g.step_flops(train_step(net, 2, 16, cpu), cpu) / fc.get_total_flops()
    assert 2.8 < ratio <= 3.0  # backward costs two forwards (less the image's own gradient)
    if not torch.cuda.is_available():
        g.main()
        assert "no CUDA device: skipped" in capsys.readouterr().out


def test_fused_adamw_is_clipped_and_steps_like_the_per_tensor_loop(tmp_path):
    module = quick_module(tmp_path)
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] and module._fused_optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(opt, 0.5, "norm")  # Lightning refuses this for fused; done here
    assert float(torch.nn.utils.get_total_norm([p.grad for p in params])) == pytest.approx(0.5, rel=1e-5)
    module.configure_gradient_clipping(opt, 1e-3, "value")
    assert max(float(p.grad.abs().max()) for p in params) <= 1e-3
    # one step equals the per-tensor AdamW on the same gradients
    ref = copy.deepcopy(params)
    lr = opt.param_groups[0]["lr"]  # (the warm-up schedule's first value)
    plain = torch.optim.AdamW(ref, lr=lr, betas=module.betas, weight_decay=module.weight_decay, foreach=False)
    for r, p in zip(ref, params):
        r.grad = p.grad.clone()
    opt.step()
    plain.step()
    for r, p in zip(ref, params):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    # with fp16's loss scaler the step must not unscale internally: foreach, and Lightning clips
    module._trainer = type("T", (), {"precision": "16-mixed"})()
    opt16 = module.configure_optimizers()["optimizer"]
    assert not opt16.defaults["fused"] and opt16.defaults["foreach"] and not module._fused_optimizer
