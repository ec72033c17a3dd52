"""ADM UNet (Dhariwal & Nichol 2021) and its presets: shapes, zero init, conditioning, attention
placement, parameter counts (docs/methods/blur.md: 121 M for the blur paper's 64² ADM), bf16,
DDP-safe grads."""

from __future__ import annotations

import pytest
import torch

from freqdiff.nets import PRESETS, UNet, count_parameters, unet
from freqdiff.nets.unet import Attention, noise_embedding

SMALL = dict(model_channels=16, num_res_blocks=1, head_channels=16)  # fast widths for CPU tests


def perturb(net: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Move every weight off its init (the zero-initialised convs included)."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(resolution=16, channel_mult=(1, 2, 2), attn_resolutions=(8,)), (2, 3, 16, 16)),
        (
            dict(in_channels=1, out_channels=2, resolution=8, channel_mult=(1, 2), attn_resolutions=(4,)),
            (3, 1, 8, 8),
        ),
        (
            dict(
                in_channels=4,
                out_channels=6,
                resolution=32,
                channel_mult=(1, 2, 2, 2),
                attn_resolutions=(16, 4),
            ),
            (1, 4, 32, 32),
        ),
        (dict(resolution=16, channel_mult=(1, 2), attn_resolutions=()), (2, 3, 16, 24)),  # non-square input
    ],
)
def test_output_shape_and_zero_init(kwargs, shape):
    net = UNet(**SMALL, **kwargs)
    x = torch.randn(shape)
    out = net(x, torch.rand(shape[0]) * 1000)
    assert out.shape == (shape[0], net.out_channels, *shape[2:])
    assert torch.count_nonzero(out) == 0  # zero-initialised head: a fresh net predicts exactly 0


def test_output_depends_on_c_noise_and_labels():
    net = perturb(UNet(**SMALL, resolution=8, channel_mult=(1, 2), attn_resolutions=(4,), num_classes=5))
    x = torch.randn(2, 3, 8, 8).repeat(2, 1, 1, 1)  # [4, 3, 8, 8]: the same two images twice
    labels = torch.tensor([1, 2, 1, 2])
    with torch.no_grad():
        base = net(x, torch.full((4,), 0.1), labels)
        torch.testing.assert_close(base[:2], base[2:])
        assert (net(x, torch.full((4,), 0.2), labels) - base).abs().max() > 1e-4  # EDM range ln(σ)/4
        assert (
            net(x, torch.full((4,), 500.0), labels) - net(x, torch.full((4,), 501.0), labels)
        ).abs().max() > 1e-4
        assert (net(x, torch.full((4,), 0.1), torch.tensor([3, 4, 3, 4])) - base).abs().max() > 1e-4
        assert (net(x, torch.full((4,), 0.1)) - base).abs().max() > 1e-4  # labels=None: no class term
        torch.testing.assert_close(net(x, torch.tensor(0.1), labels), base)  # scalar c_noise broadcasts


def test_noise_embedding_resolves_both_conventions():
    e = noise_embedding(torch.tensor([0.0, 0.05, 999.0, 1000.0, -1.5]), 64)
    assert e.shape == (5, 64) and e.dtype == torch.float32
    assert (e[0] - e[1]).norm() > 0.05 and (e[2] - e[3]).norm() > 0.5


def test_labels_need_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        UNet(**SMALL, resolution=8, channel_mult=(1, 2), attn_resolutions=())(
            torch.randn(1, 3, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long)
        )


@pytest.mark.parametrize("mid_attention", [True, False])
def test_attention_exactly_at_requested_resolutions(mid_attention):
    attn = (16, 4)
    net = UNet(
        **SMALL, resolution=32, channel_mult=(1, 1, 1, 1), attn_resolutions=attn, mid_attention=mid_attention
    )
    assert net.level_resolutions == [32, 16, 8, 4]
    for part in (net.enc, net.dec):
        for level in part:
            assert all((b.attn is not None) == (level.resolution in attn) for b in level.blocks)
    seen = []
    for m in net.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-1]))
    net(torch.randn(1, 3, 32, 32), torch.zeros(1))
    expected = {16: 3, 4: 3 + (1 if mid_attention else 0)}  # enc 1 block + dec 2 blocks, + middle
    assert {r: seen.count(r) for r in set(seen)} == expected


def test_bad_resolutions_are_errors():
    with pytest.raises(ValueError, match="resolution 18"):
        UNet(**SMALL, resolution=18, channel_mult=(1, 2, 2), attn_resolutions=())
    with pytest.raises(ValueError, match=r"\[12\]"):
        UNet(**SMALL, resolution=32, channel_mult=(1, 2, 2), attn_resolutions=(12,))
    net = UNet(**SMALL, resolution=16, channel_mult=(1, 2, 2), attn_resolutions=())
    with pytest.raises(ValueError, match="18x16"):
        net(torch.randn(1, 3, 18, 16), torch.zeros(1))


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match="'huge'.*tiny"):
        unet("huge")


def test_preset_overrides_accept_lists():
    net = unet("tiny", resolution=16, channel_mult=[1, 2], attn_resolutions=[8], dropout=0.1)
    assert net.level_resolutions == [16, 8]
    assert net(torch.randn(1, 3, 16, 16), torch.zeros(1)).shape == (1, 3, 16, 16)


def meta_count(preset: str, **overrides) -> int:
    with torch.device("meta"):
        return count_parameters(unet(preset, **overrides))


def test_parameter_counts():
    assert meta_count("tiny") < 1e6
    assert 2e6 < meta_count("small") < 7e6
    assert 25e6 < meta_count("base") < 35e6
    assert abs(meta_count("adm_blur64") / 121e6 - 1) < 0.03  # docs/methods/blur.md, blur diffusion paper
    # ADM's ImageNet-64 model (class-conditional, learned variance) is reported at 296 M parameters.
    assert abs(meta_count("edm_relay64", num_classes=1000, out_channels=6) / 296e6 - 1) < 0.005
    for name in PRESETS:  # every preset builds at its own resolution
        assert meta_count(name) > 0


def test_bf16_autocast_forward_is_finite():
    net = perturb(unet("tiny", resolution=16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 16, 16), torch.tensor([10.0, 900.0]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out.float()).all()
    assert out.abs().max() > 0


@pytest.mark.parametrize("resblock_updown", [True, False])
def test_every_parameter_gets_a_gradient(resblock_updown):
    net = UNet(
        **SMALL,
        resolution=8,
        channel_mult=(1, 2),
        attn_resolutions=(4,),
        num_classes=3,
        resblock_updown=resblock_updown,
    )
    perturb(net)
    out = net(torch.randn(2, 3, 8, 8), torch.tensor([0.3, 700.0]), torch.tensor([0, 2]))
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    zero = [n for n, p in net.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, zero


def test_encode_decode_from_an_inner_level():
    """What FlexiUNet needs: enter at level 1, leave at level 1, zeros for the skips never made."""
    net = perturb(UNet(**SMALL, resolution=16, channel_mult=(1, 2, 2), attn_resolutions=(8,)))
    emb = net.embed(torch.tensor([0.5, 600.0]))
    entry = torch.randn(2, net.skip_channels[1][0], 8, 8)
    h, skips = net.encode(entry, emb, start_level=1)
    assert skips[0] is None and len(skips[1]) == 1 + 1 and h.shape == (2, net.channels[-1], 4, 4)
    out = net.decode(net.middle(h, emb), emb, skips, stop_level=1)
    assert out.shape == (2, net.channels[1], 8, 8)
    # Entering at level 2 leaves level 1 without skips: decode fills them with zeros.
    h2, skips2 = net.encode(torch.randn(2, net.skip_channels[2][0], 4, 4), emb, start_level=2)
    assert net.decode(net.middle(h2, emb), emb, skips2).shape == (2, net.channels[0], 16, 16)
    # The full path through the parts equals forward.
    x, c = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 600.0])
    h, skips = net.encode(net.conv_in(x), net.embed(c))
    torch.testing.assert_close(net.head(net.decode(net.middle(h, emb), emb, skips)), net(x, c))


def test_throughput_benchmark_is_found_and_runs():
    from benchmarks.__main__ import discover
    from benchmarks.unet_throughput import bench_case

    assert "unet_throughput" in discover([]) and discover(["nomatch"]) == []
    r = bench_case("tiny", 16, batch=2, repeats=1, sample_s=0.0)
    assert r["med"]["fp32"] > 0 and r["med"]["bf16"] > 0
