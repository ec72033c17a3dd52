"""Shard sets, the dead-leaves generator and the ShardDataModule (docs/architecture.md, Data)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.manifest import (
    MANIFEST,
    ShardWriter,
    make_manifest,
    read_manifest,
    sample_dict,
    write_manifest,
)
from datamodules.synthetic import DeadLeaves
from datamodules.webdataset import ShardDataModule


def small(**kw) -> DeadLeaves:
    args = {"resolution": 16, "n_train": 96, "n_val": 24, "shard_size": 40}
    args.update(kw)
    return DeadLeaves(**args)


def as_float(imgs: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1], written independently of the datamodule."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


def mtimes(folder) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shard_round_trip_exact(tmp_path):
    dl = small()
    dl.write(tmp_path / "dl", progress=False)
    m = read_manifest(tmp_path / "dl" / "train")
    assert m["count"] == 96 and m["resolutions"] == [16] and m["channels"] == 3 and m["labels"] is None
    assert [s["count"] for s in m["shards"]] == [40, 40, 16]
    assert m["params"] == dl.params("train") and m["skipped"] == {"count": 0, "items": []}
    assert not list((tmp_path / "dl").rglob("*.tmp"))

    dm = ShardDataModule(str(tmp_path / "dl"), num_workers=0, flip=False)
    for split in ("train", "val"):
        n = dl.n[split]
        torch.testing.assert_close(dm.real_images(n, split), as_float(dl.images(n, split)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="asked for 25 val images"):
        dm.real_images(25, "val")

    # the training path decodes the same images: every (unflipped) image is one of the set
    real = as_float(dl.images(96, "train")).flatten(1)
    x0 = next(iter(dm.train_dataloader()))["x0"].flatten(1)
    assert (x0[:, None] == real[None]).all(-1).any(1).all()


def test_write_is_deterministic(tmp_path):
    for name in ("a", "b"):
        small().write(tmp_path / name, progress=False)
    for split in ("train", "val"):
        ma, mb = (read_manifest(tmp_path / name / split) for name in ("a", "b"))
        assert ma["shards"] == mb["shards"]
        for s in ma["shards"]:
            a, b = ((tmp_path / name / split / s["name"]).read_bytes() for name in ("a", "b"))
            assert a == b


def test_dead_leaves_determinism_and_spectrum():
    a = DeadLeaves(resolution=32, seed=0).images(128)
    assert a.shape == (128, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, DeadLeaves(resolution=32, seed=0).images(128))
    np.testing.assert_array_equal(a[5:9], DeadLeaves(resolution=32, seed=0).images(4, start=5))
    assert (a != DeadLeaves(resolution=32, seed=1).images(128)).mean() > 0.5
    assert (a[:16] != DeadLeaves(resolution=32, seed=0).images(16, "val")).mean() > 0.5
    assert 0.2 < a.std() / 255 < 0.35  # colours spread over the range, not flat images

    # radially averaged power spectrum: log-log slope over mid frequencies, ~1/f^2 .. 1/f^3
    x = a.astype(np.float64).mean(-1)  # grey [N, H, W]
    x -= x.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(x)) ** 2).mean(0)  # [H, W]
    k = np.fft.fftfreq(32, 1 / 32)
    radius = np.rint(np.hypot(k[:, None], k[None, :])).astype(int).ravel()
    raps = np.bincount(radius, power.ravel()) / np.bincount(radius)
    f = np.arange(2, 9)  # cycles per image
    slope = np.polyfit(np.log(f), np.log(raps[f]), 1)[0]
    assert -3.5 < slope < -1.5, slope


def test_train_loader_batches_and_seeding(tmp_path):
    path = str(tmp_path / "dl")
    small().write(path, progress=False)

    def first_batch(seed: int, workers: int = 0):
        dm = ShardDataModule(path, batch_size=8, num_workers=workers, seed=seed, shuffle_buffer=50)
        return next(iter(dm.train_dataloader()))["x0"]

    dm = ShardDataModule(path, batch_size=8, num_workers=0)
    loader = dm.train_dataloader()
    assert len(loader) == 96 // 8
    batches = list(loader)
    assert len(batches) == 12
    b = batches[0]
    assert set(b) == {"x0"} and b["x0"].shape == (8, 3, 16, 16) and b["x0"].dtype == torch.float32
    assert b["x0"].min() >= -1 and b["x0"].max() <= 1 and b["x0"].std() > 0.2
    assert not torch.equal(next(iter(loader))["x0"], b["x0"])  # the next pass (epoch) draws anew

    torch.testing.assert_close(first_batch(0, workers=2), first_batch(0, workers=2), rtol=0, atol=0)
    torch.testing.assert_close(first_batch(0), first_batch(0), rtol=0, atol=0)
    assert not torch.equal(first_batch(0), first_batch(1))

    # under a Trainer: the epoch comes from it, batches per epoch split over ranks, ranks differ
    per_rank = []
    for rank in (0, 1):
        dm = ShardDataModule(path, batch_size=8, num_workers=0)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=3)
        loader = dm.train_dataloader()
        assert len(loader) == 96 // (8 * 2)
        per_rank.append(next(iter(loader))["x0"])
    assert not torch.equal(per_rank[0], per_rank[1])


def test_labels_and_flat_layout(tmp_path):
    imgs = DeadLeaves(resolution=8, channels=1).images(30)  # [30, 8, 8, 1]
    with ShardWriter(tmp_path, shard_size=16) as w:
        for i, img in enumerate(imgs):
            w.write(sample_dict(i, {8: img}, label=i % 3))
    write_manifest(
        tmp_path,
        make_manifest(count=w.count, resolutions=[8], channels=1, shards=w.shards, labels=["a", "b", "c"]),
    )
    dm = ShardDataModule(str(tmp_path), batch_size=10, num_workers=0, shuffle_buffer=0, flip=False)
    assert dm.channels == 1 and dm.labels == ["a", "b", "c"] and dm.val_manifest is None
    batch = next(iter(dm.train_dataloader()))
    assert batch["x0"].shape == (10, 1, 8, 8) and batch["label"].dtype == torch.int64
    keys = [int(np.flatnonzero((as_float(imgs).flatten(1) == x).all(1))[0]) for x in batch["x0"].flatten(1)]
    assert batch["label"].tolist() == [k % 3 for k in keys]  # each image keeps its own label
    with pytest.warns(UserWarning, match="no val shard set"):
        torch.testing.assert_close(dm.real_images(30), as_float(imgs), rtol=0, atol=0)


def test_errors_name_the_problem(tmp_path):
    small().write(tmp_path / "dl", progress=False)
    with pytest.raises(ValueError, match=r"resolution 32 not in the train .* resolutions \[16\]"):
        ShardDataModule(str(tmp_path / "dl"), resolution=32).setup()
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ShardDataModule(str(missing)).setup()
    with pytest.raises(FileNotFoundError, match="no shard manifest at"):
        read_manifest(missing)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=f"malformed shard manifest {bad / MANIFEST}"):
        read_manifest(bad)
    (bad / MANIFEST).write_text(json.dumps({"format": "freqdiff-shards/1", "count": 1}))
    with pytest.raises(ValueError, match="missing keys"):
        read_manifest(bad)

    (tmp_path / "dl" / "train" / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        ShardDataModule(str(tmp_path / "dl")).setup()


def test_synthetic_written_once_and_regenerated_on_change(tmp_path, capsys):
    path = tmp_path / "dl"
    dm = ShardDataModule(str(path), num_workers=0, synthetic=small())
    dm.setup()  # without prepare_data: writes
    assert dm.resolution == 16 and dm.manifest["count"] == 96 and dm.val_manifest["count"] == 24
    before = mtimes(path)
    assert any(p.endswith(MANIFEST) for p in before)

    dm = ShardDataModule(str(path), num_workers=0, synthetic=small())
    dm.prepare_data()
    dm.setup()
    assert mtimes(path) == before  # same parameters: nothing rewritten

    capsys.readouterr()
    ShardDataModule(str(path), num_workers=0, synthetic=small(n_discs=5)).prepare_data()
    assert "written with other n_discs; regenerating" in capsys.readouterr().out
    assert read_manifest(path / "train")["params"]["n_discs"] == 5
