"""Flexi-UNet (Scale Space Diffusion): entry/exit at every level, UNet parity, what runs, gradients."""

import pytest
import torch

from freqdiff.nets.flexi_unet import FlexiUNet, flexi
from freqdiff.nets.presets import count_parameters, unet
from freqdiff.nets.unet import NULL_LABEL


def perturb(net: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Move every weight off its init: the zero-initialised convs would hide every difference."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def four_levels(**kw) -> FlexiUNet:
    """Levels [32, 16, 8, 4] with widths 24, 48, 72, 96: every level has its own adapters."""
    return FlexiUNet(unet("tiny", resolution=32, attn_resolutions=[], channel_mult=(1, 2, 3, 4), **kw))


def pairs(levels: int):
    return [(e, x) for e in range(levels) for x in range(e + 1)]  # exit level <= entry level


@pytest.mark.parametrize("resblock_updown", [False, True])
def test_full_resolution_is_the_unet_exactly(resblock_updown):
    u = perturb(unet("tiny", resolution=16, channel_mult=(1, 2, 2), resblock_updown=resblock_updown))
    net = FlexiUNet(u)
    x, c = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 700.0])
    assert torch.equal(net(x, c), u(x, c))
    assert torch.equal(net(x, c, out_resolution=16), u(x, c))


def test_every_entry_exit_pair_has_the_exit_shape_and_a_fresh_net_outputs_zero():
    net = four_levels()
    assert net.levels == [32, 16, 8, 4] and net.resolution == 32
    for e, x in pairs(4):
        r_in, r_out = net.levels[e], net.levels[x]
        out = net(torch.randn(2, 3, r_in, r_in), torch.tensor([1.0, 500.0]), out_resolution=r_out)
        assert out.shape == (2, 3, r_out, r_out), (e, x)
        assert torch.equal(out, torch.zeros_like(out)), (e, x)  # the head's last conv is zero at init
    perturb(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 500.0]), out_resolution=16)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32 and out.abs().sum() > 0


def _expected_modules(u, entry: int, exit_: int) -> set[str]:
    """The encoder / middle / decoder parts a pair (entry, exit) must run, and no others."""
    L, names = u.num_levels, {"mid.0", "mid.1"}
    for level in range(entry, L):
        names |= {f"enc.{level}.blocks.{i}" for i in range(len(u.enc[level].blocks))}
        if level > entry:
            names.add(f"enc.{level}.resample")
    for level in range(exit_, L):
        names |= {f"dec.{level}.blocks.{i}" for i in range(len(u.dec[level].blocks))}
        if level < L - 1:
            names.add(f"dec.{level}.resample")
    return names


def test_only_the_needed_blocks_run():
    net = four_levels()
    u, ran = net.unet, set()
    hooked = {f"mid.{i}": m for i, m in enumerate(u.mid)}
    for part in ("enc", "dec"):
        for level, lv in enumerate(getattr(u, part)):
            hooked |= {f"{part}.{level}.blocks.{i}": b for i, b in enumerate(lv.blocks)}
            if lv.resample is not None:
                hooked[f"{part}.{level}.resample"] = lv.resample
    for name, module in hooked.items():
        module.register_forward_hook(lambda m, i, o, name=name: ran.add(name))
    for e, x in pairs(4):
        ran.clear()
        r_in = net.levels[e]
        net(torch.randn(1, 3, r_in, r_in), torch.tensor([2.0]), out_resolution=net.levels[x])
        assert ran == _expected_modules(u, e, x), (e, x)
    # The brief's cases spelled out: entering at level 2 skips enc[0] and enc[1]; exiting at 1 skips dec[0].
    ran.clear()
    net(torch.randn(1, 3, 8, 8), torch.tensor([2.0]), out_resolution=16)
    assert not {n for n in ran if n.startswith(("enc.0.", "enc.1.", "enc.2.resample", "dec.0."))}
    assert {"enc.2.blocks.0", "dec.1.blocks.0", "dec.1.resample"} <= ran


@pytest.mark.parametrize("entry, exit_", [(0, 0), (1, 1), (2, 1), (3, 0), (3, 3), (2, 0)])
def test_gradients_reach_exactly_the_parts_a_step_uses(entry, exit_):
    net = perturb(four_levels())
    u = net.unet
    r_in = net.levels[entry]
    out = net(torch.randn(2, 3, r_in, r_in), torch.tensor([0.5, 300.0]), out_resolution=net.levels[exit_])
    out.square().mean().backward()
    used_in, used_out = net._in_keys[entry], net._out_keys[exit_]
    for key, adapter in net.adapters_in.items():
        for p in adapter.parameters():
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (key == used_in), key
    for key, adapter in net.adapters_out.items():
        for p in adapter.parameters():
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (key == used_out), key
    # Inside the UNet: the embedding, conv_in, head and the expected levels, nothing else.
    expected = _expected_modules(u, entry, exit_) | {"map0", "map1", "conv_in", "out_norm", "out_conv"}
    for name, p in u.named_parameters():
        used = any(name.startswith(prefix + ".") for prefix in expected)
        assert (p.grad is not None and p.grad.abs().sum() > 0) == used, name


def test_adapters_are_identity_where_widths_match_and_shared_by_width():
    u = unet("tiny", resolution=32, attn_resolutions=[], channel_mult=(1, 2, 2, 2))  # widths 24, 48, 48, 48
    shared, own = FlexiUNet(u), FlexiUNet(u, share_adapters=False)
    assert list(shared.adapters_in) == ["24_to_48"] and list(shared.adapters_out) == ["48_to_24"]
    assert list(own.adapters_in) == ["level2", "level3"]
    assert list(own.adapters_out) == ["level1", "level2", "level3"]
    for net in (shared, own):
        assert isinstance(net.input_adapter(0), torch.nn.Identity)  # level 0: conv_in alone
        assert isinstance(net.input_adapter(1), torch.nn.Identity)  # level 1's first block takes 24
        assert isinstance(net.output_adapter(0), torch.nn.Identity)
        assert net.input_adapter(2).in_channels == 24 and net.input_adapter(2).out_channels == 48
    assert shared.input_adapter(2) is shared.input_adapter(3)
    assert shared.output_adapter(1) is shared.output_adapter(3)
    assert own.output_adapter(1) is not own.output_adapter(3)
    adapter = lambda c_in, c_out: c_in * c_out + c_out  # a 1x1 conv with bias
    assert count_parameters(shared) == count_parameters(u) + adapter(24, 48) + adapter(48, 24)
    assert count_parameters(own) == count_parameters(u) + 2 * adapter(24, 48) + 3 * adapter(48, 24)


def test_bad_sides_raise_naming_the_value():
    net = FlexiUNet(unet("tiny", resolution=16, attn_resolutions=[], channel_mult=(1, 2, 2)))
    assert net.levels == [16, 8, 4]
    c = torch.tensor([1.0])
    with pytest.raises(ValueError, match=r"input resolution 12: .*\[16, 8, 4\]"):
        net(torch.randn(1, 3, 12, 12), c)
    with pytest.raises(ValueError, match=r"out_resolution 4 is below the input resolution 8.*\[16, 8\]"):
        net(torch.randn(1, 3, 8, 8), c, out_resolution=4)
    with pytest.raises(ValueError, match=r"out_resolution 12: .*\[16, 8, 4\]"):
        net(torch.randn(1, 3, 8, 8), c, out_resolution=12)
    with pytest.raises(ValueError, match=r"\(1, 3, 16, 8\): expected a square"):
        net(torch.randn(1, 3, 16, 8), c)
    with pytest.raises(TypeError, match="got Linear"):
        FlexiUNet(torch.nn.Linear(2, 2))
    assert net(torch.randn(1, 3, 4, 4), c, out_resolution=16).shape == (1, 3, 16, 16)


def test_labels_condition_through_the_flexi_unet():
    net = perturb(four_levels(num_classes=4))
    torch.nn.init.normal_(net.unet.label_emb.weight)
    assert net.num_classes == 4
    x, c = torch.randn(3, 3, 8, 8), torch.tensor([0.5, 1.0, 2.0])
    uncond = net(x, c, None, out_resolution=16)
    mixed = net(x, c, torch.tensor([NULL_LABEL, 2, NULL_LABEL]), out_resolution=16)
    torch.testing.assert_close(mixed[[0, 2]], uncond[[0, 2]])  # the null label is the unconditional branch
    assert not torch.allclose(mixed[1], uncond[1])
    full = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([1, 3])
    assert torch.equal(net(full, c[:2], labels), net.unet(full, c[:2], labels))
    with pytest.raises(ValueError, match="null label"):
        net(x, c, torch.tensor([0, 4, 1]))


def test_factory_builds_from_a_preset_with_config_lists():
    net = flexi("tiny", resolution=32, channel_mult=[1, 2, 2, 2], attn_resolutions=[])
    assert isinstance(net, FlexiUNet) and net.levels == [32, 16, 8, 4]
    assert net.unet.channels == [24, 48, 48, 48]
    assert FlexiUNet.needs_unused_parameters and net.needs_unused_parameters
    own = flexi("tiny", share_adapters=False, resolution=32, channel_mult=[1, 2, 2, 2])
    assert len(own.adapters_out) == 3
