"""Dead leaves at several resolutions per sample: box averages of the primary image (Relay's stage 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.manifest import read_manifest
from datamodules.synthetic import DeadLeaves, box_downsample, render
from datamodules.webdataset import ShardDataModule

# the params of a dead-leaves split as written before box_resolutions existed (cached sets keep them)
PARAM_KEYS = {
    "generator",
    "version",
    "split",
    "count",
    "resolution",
    "seed",
    "r_min",
    "r_max",
    "alpha",
    "n_discs",
    "margin",
    "channels",
    "shard_size",
}


def as_float(imgs: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1], independently of the datamodule."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).double() / 127.5 - 1


def test_shards_hold_box_averages_read_back_at_every_resolution(tmp_path):
    dl = DeadLeaves(resolution=16, box_resolutions=[4, 8], n_train=12, n_val=4, shard_size=5)
    assert dl.box_resolutions == [8, 4] and dl.resolutions == [16, 8, 4]
    dl.write(tmp_path / "dl", progress=False)
    for split, n in (("train", 12), ("val", 4)):
        m = read_manifest(tmp_path / "dl" / split)
        assert sorted(m["resolutions"], reverse=True) == [16, 8, 4] and m["count"] == n
        assert [s["count"] for s in m["shards"]] == ([5, 5, 2] if split == "train" else [4])
        assert "; 8: exact 2x2 box average of 16; 4: exact 4x4 box average of 16" in m["filter"]
        assert m["params"]["box_resolutions"] == [8, 4]

    path = str(tmp_path / "dl")
    kw = {"batch_size": 4, "num_workers": 0, "flip": False}
    dm4 = ShardDataModule(path, resolution=4, **kw)
    dm16 = ShardDataModule(path, resolution=16, **kw)
    assert dm16.resolution == 16 and dm4.resolution == 4
    for split, n in (("train", 12), ("val", 4)):
        x4 = dm4.real_images(n, split).double()  # real_images: shard order, unshuffled, unflipped
        x16 = dm16.real_images(n, split).double()
        assert x4.shape == (n, 3, 4, 4) and x16.shape == (n, 3, 16, 16)
        # stored once-rounded box average: within half a grey level (1/255 in [-1, 1] units) everywhere
        err = (F.avg_pool2d(x16, 4) - x4).abs()
        assert err.max() <= 1 / 255 + 1e-6, err.max()
        assert err.max() > 0  # rounding did happen somewhere: x4 really is a separate, stored image
        # and exactly what the generator gives for those samples
        torch.testing.assert_close(x4, as_float(dl.images_at(n, 4, split)), rtol=0, atol=1e-6)
        torch.testing.assert_close(x16, as_float(dl.images(n, split)), rtol=0, atol=1e-6)

    # one sample decoded at several resolutions (the multi-resolution path): same sample at each side
    dm = ShardDataModule(path, resolution=16, resolutions=[8, 4], **kw)
    batches = list(dm.eval_dataloader("train"))
    idx = torch.cat([b["index"] for b in batches])
    assert idx.tolist() == list(range(12))
    x16 = torch.cat([b["x0"] for b in batches]).double()
    for r in (8, 4):
        xr = torch.cat([b[f"x0_{r}"] for b in batches]).double()
        assert (F.avg_pool2d(x16, 16 // r) - xr).abs().max() <= 1 / 255 + 1e-6

    # planned_resolution / written_in see the set as up to date with these settings, not with others
    dm = ShardDataModule(path, synthetic=dl, **kw)
    assert dm.planned_resolution() == (16, f"from the dead-leaves set in {path}")
    assert dl.written_in(path)
    other = {"resolution": 16, "n_train": 12, "n_val": 4, "shard_size": 5}
    assert not DeadLeaves(**other).written_in(path)
    assert not DeadLeaves(**other, box_resolutions=[8]).written_in(path)


def test_images_at_is_box_average_not_a_rendering():
    dl = DeadLeaves(resolution=32, box_resolutions=[8], n_train=6, n_val=0)
    x32, x8 = dl.images(6), dl.images_at(6, 8)
    assert np.array_equal(dl.images_at(6, 32), x32)
    assert np.array_equal(x8, box_downsample(x32, 4))
    rendered = render([dl.scene("train", i) for i in range(6)], 8)
    assert not np.array_equal(x8, rendered)  # an 8x8 rendering has 1-pixel edge ramps, not 4-pixel ones
    with pytest.raises(ValueError, match="resolution=16: not written"):
        dl.images_at(2, 16)


def test_box_downsample_matches_brute_force():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 12, 18, 3), dtype=np.uint8)
    img[0, :2, :2, 0] = [[0, 1], [0, 1]]  # a block whose mean is exactly 0.5: rounds half to even (0)
    for f in (1, 2, 3, 6):
        out = box_downsample(img, f)
        assert out.dtype == np.uint8 and out.shape == (2, 12 // f, 18 // f, 3)
        want = np.empty_like(out)
        for b in range(2):
            for i in range(12 // f):
                for j in range(18 // f):
                    for c in range(3):
                        s = sum(int(img[b, i * f + u, j * f + v, c]) for u in range(f) for v in range(f))
                        want[b, i, j, c] = round(s / (f * f))  # Python's round: half to even, like np.rint
        assert np.array_equal(out, want), f
    assert box_downsample(img, 2)[0, 0, 0, 0] == 0
    with pytest.raises(ValueError, match="factor=5"):
        box_downsample(img, 5)
    with pytest.raises(ValueError, match="factor=0"):
        box_downsample(img, 0)


@pytest.mark.parametrize("bad", [5, 16, 0, 32, -4])
def test_bad_box_resolutions_are_refused_naming_the_value(bad):
    want = rf"box_resolutions=\[8, {bad}\]: {bad} is not allowed.*resolution=16"
    with pytest.raises(ValueError, match=want):
        DeadLeaves(resolution=16, box_resolutions=[8, bad])


def test_params_without_box_resolutions_are_unchanged():
    for box in (None, []):
        dl = DeadLeaves(resolution=16, n_train=12, n_val=4, box_resolutions=box)
        for split in ("train", "val"):
            assert set(dl.params(split)) == PARAM_KEYS
        assert dl.resolutions == [16] and "box_resolutions" not in repr(dl)
    plain, empty = DeadLeaves(resolution=16), DeadLeaves(resolution=16, box_resolutions=[])
    assert plain.params("train") == empty.params("train")

    dl = DeadLeaves(resolution=16, box_resolutions=[4, 8, 4])
    p = dl.params("train")
    assert set(p) == PARAM_KEYS | {"box_resolutions"} and p["box_resolutions"] == [8, 4]
    assert "box_resolutions=[8, 4]" in repr(dl)
