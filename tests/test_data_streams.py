"""ShardDataModule streams: rank x worker splits, multi-resolution batches, seeding, bad data
(docs/architecture.md, Data).

Ranks are simulated with the ``RANK`` / ``WORLD_SIZE`` environment variables (the datamodule reads them
when no Trainer or process group is there) and real DataLoader worker processes; the real two-process
gloo run is in ``test_ddp_data.py`` (slow).
"""

from __future__ import annotations

import tarfile
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.manifest import ShardSetError, ShardWriter, make_manifest, sample_dict, write_manifest
from datamodules.streams import BadDataError, CorruptDataWarning, Shard, TrainStream, train_units
from datamodules.synthetic import DeadLeaves
from datamodules.webdataset import ShardDataModule

N, SHARD = 37, 16  # samples, samples per shard: shards of 16, 16 and 5


def images(res: int, n: int = N) -> np.ndarray:
    """The same dead-leaves scenes at any resolution: uint8 [n, res, res, 3]."""
    return DeadLeaves(resolution=res).images(n)


def write_set(folder: Path, n: int = N, bad: dict[int, bytes] | None = None) -> Path:
    """Samples i = scene i at 8² and 16², label i % 3; ``bad`` replaces some samples' 8.png payloads."""
    lo, hi = images(8, n), images(16, n)
    with ShardWriter(folder, shard_size=SHARD) as w:
        for i in range(n):
            s = sample_dict(i, {8: lo[i], 16: hi[i]}, label=i % 3)
            if bad and i in bad:
                s["8.png"] = bad[i]
            w.write(s)
    m = make_manifest(count=n, resolutions=[8, 16], channels=3, shards=w.shards, labels=["a", "b", "c"])
    write_manifest(folder, m)
    return folder


def as_uint8(x: torch.Tensor) -> np.ndarray:
    return torch.round((x + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def index_of(x: torch.Tensor, ref: np.ndarray) -> tuple[list[int], list[bool]]:
    """For each image of a batch: its index in ``ref`` and whether it is flipped (each must match one)."""
    out, flips = [], []
    for img in as_uint8(x):
        plain = np.flatnonzero((ref == img).all(axis=(1, 2, 3)))
        flip = np.flatnonzero((ref[:, :, ::-1] == img).all(axis=(1, 2, 3)))
        assert len(plain) + len(flip) >= 1, "an image that is not in the set"
        out.append(int(plain[0]) if len(plain) else int(flip[0]))
        flips.append(not len(plain))
    return out, flips


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_set(tmp_path / "set")


def ranks(monkeypatch, world: int):
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        yield rank


@pytest.mark.parametrize("pad", [False, True])
def test_eval_pass_exactly_once_over_2_ranks_x_2_workers(shards, monkeypatch, pad):
    lo, hi = images(8), images(16)
    seen, counts = [], []
    for _ in ranks(monkeypatch, 2):
        dm = ShardDataModule(str(shards), resolution=16, resolutions=[8], batch_size=3, num_workers=2)
        loader = dm.eval_dataloader(pad=pad)
        batches = list(loader)
        assert len(batches) == len(loader)
        counts.append(len(batches))
        for b in batches:
            assert set(b) == {"x0", "x0_8", "label", "index"} | ({"mask"} if pad else set())
            keep = b["mask"] if pad else torch.ones(len(b["index"]), dtype=torch.bool)
            if pad:
                assert len(b["index"]) == 3 and (b["index"][~keep] == -1).all()
            idx = b["index"][keep].numpy()
            np.testing.assert_array_equal(as_uint8(b["x0"][keep]), hi[idx])  # unflipped, in order
            np.testing.assert_array_equal(as_uint8(b["x0_8"][keep]), lo[idx])
            assert b["label"][keep].tolist() == [i % 3 for i in idx]
            seen += idx.tolist()
    assert sorted(seen) == list(range(N))  # every sample once over ranks and workers: no duplicates
    # 37 samples over 4 consumers: 9, 9, 9, 10 -> 3, 3, 3, 4 batches of 3: ranks differ unless padded
    assert counts == ([8, 8] if pad else [6, 7])


def test_training_equal_batches_and_splits(shards, monkeypatch):
    for _ in ranks(monkeypatch, 2):
        dm = ShardDataModule(str(shards), batch_size=4, num_workers=2, shuffle_buffer=8)
        loader = dm.train_dataloader()
        assert len(loader) == len(list(loader)) == N // (4 * 2)  # the same on every rank
        dm = ShardDataModule(str(shards), batch_size=4, num_workers=2, batches_per_epoch=7)
        assert len(list(dm.train_dataloader())) == 7

    # the units of an epoch: disjoint over 2 ranks x 2 workers, covering the set; a new deal per epoch
    sh = [Shard("a", 16, 0), Shard("b", 16, 16), Shard("c", 5, 32)]
    assert len(train_units(sh, 4)) == 6 and len(train_units(sh, 2)) == 3

    def deal(epoch: int, world: int, workers: int) -> list[list[tuple[str, int, int]]]:
        out = []
        for rank in range(world):
            s = TrainStream(sh, [8], 3, False, 4, False, 0, seed=0, rank=rank, world_size=world, health=None)
            s.epoch = epoch
            out += [[(u.shard.url, u.lo, u.hi) for u in s.units(w, workers)] for w in range(workers)]
        return out

    parts = deal(0, 2, 2)
    flat = sorted(u for p in parts for u in p)
    assert all(parts) and len(flat) == len(set(flat)) == 6
    covered = sorted((url, pos) for url, a, b in flat for pos in range(a, b))
    assert covered == sorted((s.url, p) for s in sh for p in range(s.count))
    assert deal(1, 2, 2) != parts and deal(0, 2, 2) == parts


def test_seeded_first_batches_multires_and_flips(shards, monkeypatch):
    lo, hi = images(8), images(16)

    def first(seed: int, rank: int = 0, n: int = 3, workers: int = 2) -> list[dict]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = ShardDataModule(str(shards), resolutions=[8], batch_size=6, num_workers=workers, seed=seed)
        return list(dm.train_dataloader())[:n]

    a = first(0)
    for x, y in zip(a, first(0)):
        assert x.keys() == y.keys() == {"x0", "x0_8", "label"}
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
    assert not torch.equal(a[0]["x0"], first(1)[0]["x0"])  # another seed
    assert not torch.equal(a[0]["x0"], first(0, rank=1)[0]["x0"])  # another rank
    dm = ShardDataModule(str(shards), batch_size=6, num_workers=0)
    loader = dm.train_dataloader()
    assert not torch.equal(next(iter(loader))["x0"], next(iter(loader))["x0"])  # the next epoch draws anew

    flips = []
    for b in a:
        idx, flip = index_of(b["x0"], hi)
        idx8, flip8 = index_of(b["x0_8"], lo)
        assert idx == idx8 and flip == flip8  # both resolutions of one sample, flipped together
        assert b["label"].tolist() == [i % 3 for i in idx]
        flips += flip
    assert 0 < sum(flips) < len(flips)  # flips happen, not always


def test_corrupt_member_non_image_and_fraction(tmp_path):
    not_png = b"this is text, not an image"
    wrong_size = sample_dict(0, {16: images(16, 1)[0]})["16.png"]  # a 16x16 PNG stored as 8.png
    path = write_set(tmp_path / "bad", bad={3: not_png, 20: wrong_size})
    dm = ShardDataModule(str(path), resolution=8, batch_size=8, num_workers=0, max_bad_fraction=0.25)
    with pytest.warns(CorruptDataWarning) as record:
        idx = [i for b in dm.eval_dataloader() for i in b["index"].tolist()]
    assert idx == [i for i in range(N) if i not in (3, 20)] and dm.skipped["eval"] == 2
    text = " ".join(str(r.message) for r in record)
    assert "sample 3 (key 00000003): 8.png does not decode" in text
    assert "sample 20 (key 00000020): 8.png is (16, 16, 3), expected (8, 8, 3)" in text

    with pytest.warns(CorruptDataWarning):  # training skips them too and keeps full batches
        batches = list(dm.train_dataloader())
    assert all(b["x0"].shape == (8, 3, 8, 8) for b in batches) and dm.skipped["train"] >= 1

    strict = ShardDataModule(str(path), resolution=8, batch_size=8, num_workers=2, max_bad_fraction=0.02)
    with pytest.raises(
        BadDataError,
        match=r"2 of 37 eval samples read so far \(5.4 %\) are unreadable, more than data.max_bad_fraction",
    ):
        list(strict.eval_dataloader())
    with pytest.raises(
        BadDataError, match="train samples read so far .* more than data.max_bad_fraction=0.02"
    ):
        list(strict.train_dataloader())  # raised in a worker process, re-raised here


def test_truncated_and_missing_shards(shards, tmp_path):
    tar = shards / "shard-000001.tar"  # samples 16..31
    data = tar.read_bytes()
    dm = ShardDataModule(str(shards), resolution=8, batch_size=8, num_workers=0, max_bad_fraction=0.5)
    strict = ShardDataModule(str(shards), resolution=8, batch_size=8, num_workers=0)  # 1 %
    dm.setup()  # opened whole: the shard is cut afterwards, the reader counts what it lacks
    strict.setup()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardSetError, match=r"shard-000001.tar is \d+ bytes but .*manifest.json records"):
        ShardDataModule(str(shards)).setup()  # a set opened now is refused (test_data_reliability.py)
    with pytest.warns(
        CorruptDataWarning, match=r"shard-000001.tar positions 0..15: .*(truncated|end of data)"
    ):
        idx = [i for b in dm.eval_dataloader() for i in b["index"].tolist()]
    lost = dm.skipped["eval"]  # the samples after the cut; those before it are read
    assert 0 < lost < 16 and idx == list(range(32 - lost)) + list(range(32, N))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptDataWarning)
        with pytest.raises(BadDataError, match="shard-000001.tar"):
            list(strict.train_dataloader())

    tar.unlink()  # a missing shard: 16 of 37 samples
    with pytest.raises(
        FileNotFoundError, match=r"1 listed shard\(s\) missing \(16 of 37 samples\).*000001.tar"
    ):
        ShardDataModule(str(shards), max_bad_fraction=0.4).setup()
    with pytest.warns(CorruptDataWarning, match="training without them"):
        dm = ShardDataModule(str(shards), resolution=8, batch_size=7, num_workers=0, max_bad_fraction=0.5)
        assert len(dm.train_dataloader()) == (N - 16) // 7
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        ShardDataModule(str(tmp_path / "nowhere")).setup()
    with pytest.raises(FileNotFoundError, match=r"no shard matches the pattern .*nowhere/\*\.tar"):
        ShardDataModule(str(tmp_path / "nowhere" / "*.tar")).setup()


def test_patterns_and_real_set_beside_synthetic(shards, tmp_path, capsys):
    dm = ShardDataModule(str(shards / "shard-{000000..000001}.tar"), num_workers=0)
    assert dm.manifest["count"] == 32 and dm.labels == ["a", "b", "c"] and dm.resolution == 16
    loose = tmp_path / "loose"  # shards without a manifest: scanned
    loose.mkdir()
    for p in shards.glob("*.tar"):
        (loose / p.name).write_bytes(p.read_bytes())
    dm = ShardDataModule(str(loose / "*.tar"), resolution=8, batch_size=5, num_workers=0)
    assert (
        dm.manifest["count"] == N and dm.manifest["resolutions"] == [8, 16] and dm.labels == ["0", "1", "2"]
    )
    assert sorted(i for b in dm.eval_dataloader() for i in b["index"].tolist()) == list(range(N))
    (loose / "notes.tar").write_text("not a tar")
    with pytest.raises(ValueError, match="cannot scan shard .*notes.tar"):
        ShardDataModule(str(loose / "*.tar")).setup()

    # a real shard set at `path` is used as it is; the dead-leaves generator never writes into it
    dm = ShardDataModule(
        str(shards), resolution=8, num_workers=0, synthetic=DeadLeaves(resolution=8, n_train=8)
    )
    dm.prepare_data()
    assert "holds a shard set; using it (data.synthetic is ignored)" in capsys.readouterr().out
    assert dm.manifest["count"] == N and not (shards / "train").exists()
    with pytest.raises(
        ValueError, match=r"resolution 32 not in the train shard set .*\[8, 16\].*RES=8,16,32"
    ):
        ShardDataModule(str(shards), resolution=32).setup()


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        x0 = batch["x0"]  # uint8 from the workers, float after the datamodule's on_after_batch_transfer
        assert x0.dtype == torch.float32 and -1 <= x0.min() and x0.max() <= 1 and x0.shape == (8, 3, 8, 8)
        return ((x0.mean() - self.w) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_data_skipped_is_logged(tmp_path):
    path = write_set(tmp_path / "bad", n=24, bad={5: b"garbage"})
    dm = ShardDataModule(str(path), resolution=8, batch_size=8, num_workers=0, max_bad_fraction=0.5)
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(CorruptDataWarning):
        trainer.fit(_Tiny(), datamodule=dm)
    assert trainer.logged_metrics["data/skipped"] >= 1  # 6 batches of 8 from 23 good samples: seen twice
    assert trainer.logged_metrics["data/skipped"] == dm.skipped["train"]


def test_tar_members_are_plain_webdataset(shards):
    with tarfile.open(shards / "shard-000002.tar") as tf:
        names = tf.getnames()
    assert names[:3] == ["00000032.16.png", "00000032.8.png", "00000032.cls"]
