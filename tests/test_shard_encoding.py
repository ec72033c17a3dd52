"""Shard image encodings (``datamodules/encodings.py``): raw uint8 members beside PNG, chosen by the
manifest's ``"encoding"``; older manifests without it read as PNG; a raw member of the wrong size
is a counted bad sample (docs/architecture.md, Data).
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.demo_photos import write_photo_folder
from datamodules.encodings import decode_raw, encode_raw, encoding_of
from datamodules.manifest import (
    MANIFEST,
    ShardWriter,
    make_manifest,
    read_manifest,
    sample_dict,
    write_manifest,
)
from datamodules.streams import CorruptDataWarning
from datamodules.webdataset import ShardDataModule
from datamodules.write_shards import main, write_shards

N = 11
ROOT = Path(__file__).resolve().parent.parent


def images(res: int, channels: int, n: int = N, seed: int = 0) -> np.ndarray:
    """Random uint8 [n, res, res, channels] (noise: nothing a codec could round off unnoticed)."""
    return np.random.default_rng([seed, res, channels]).integers(0, 256, (n, res, res, channels), np.uint8)


def write_set(folder: Path, channels: int, encoding: str, corrupt: dict[int, bytes] | None = None) -> Path:
    """Samples i at 8² and 16² (``images``) in ``encoding``; ``corrupt`` replaces some 8² members."""
    lo, hi = images(8, channels), images(16, channels)
    with ShardWriter(folder, shard_size=4) as w:
        for i in range(N):
            s = sample_dict(i, {8: lo[i], 16: hi[i]}, encoding=encoding)
            if corrupt and i in corrupt:
                s["8.u8" if encoding == "raw" else "8.png"] = corrupt[i]
            w.write(s)
    m = make_manifest(count=N, resolutions=[8, 16], channels=channels, shards=w.shards, encoding=encoding)
    write_manifest(folder, m)
    return folder


def read_all(path: Path, res: int) -> np.ndarray:
    """Every sample at ``res`` in index order through the loader, back to uint8 [N, r, r, C]."""
    dm = ShardDataModule(str(path), resolution=res, num_workers=0)
    x = torch.cat([b["x0"] for b in dm.eval_dataloader(batch_size=4)])
    return torch.round((x + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("channels", [1, 3])
def test_raw_round_trip_exact(tmp_path, channels):
    for res in (8, 16):
        img = images(res, channels, n=1)[0]
        data = encode_raw(img)
        assert len(data) == res * res * channels
        assert np.array_equal(decode_raw(data, res, channels), img)
    assert encode_raw(img[:, :, 0]) == encode_raw(img[:, :, :1])  # [H, W] is one channel

    path = write_set(tmp_path / "raw", channels, "raw")
    m = read_manifest(path)
    assert m["encoding"] == "raw" and m["channels"] == channels
    with tarfile.open(path / "shard-000000.tar") as tf:
        assert tf.getnames()[:2] == ["00000000.16.u8", "00000000.8.u8"]
    for res in (8, 16):
        assert np.array_equal(read_all(path, res), images(res, channels))  # exact, both resolutions


def test_raw_and_png_sets_of_the_same_images_load_identically(tmp_path):
    src = tmp_path / "photos"
    write_photo_folder(src, 9, seed=2, min_side=32, max_side=60)
    kw = {"workers": 1, "shard_size": 4, "progress": False}
    png = write_shards(src, tmp_path / "png", [16, 32], encoding="png", **kw)
    raw = write_shards(src, tmp_path / "raw", [16, 32], **kw)  # the default
    assert png["encoding"] == "png" and png["params"]["png_level"] == 6
    assert raw["encoding"] == "raw" and "png_level" not in raw["params"]
    bytes_png, bytes_raw = (sum(s["bytes"] for s in m["shards"]) for m in (png, raw))
    assert bytes_raw > bytes_png  # raw is larger (about 2.5x for photographs at 256², see write_shards)

    def loaders(folder):
        dm = ShardDataModule(
            str(tmp_path / folder), resolution=32, resolutions=[16], batch_size=4, num_workers=0
        )
        return dm.eval_dataloader(batch_size=4), dm.train_dataloader()

    (eval_png, train_png), (eval_raw, train_raw) = loaders("png"), loaders("raw")
    for a, b in [*zip(eval_png, eval_raw), *zip(train_png, train_raw)]:  # same seed: same shuffles, flips
        assert a.keys() == b.keys() and {"x0", "x0_16"} <= a.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k

    assert main([str(src), str(tmp_path / "cli"), "--res", "16", "--encoding", "png", "--quiet"]) == 0
    assert read_manifest(tmp_path / "cli")["encoding"] == "png"
    with tarfile.open(tmp_path / "cli" / "shard-000000.tar") as tf:
        assert tf.getnames()[0] == "00000000.16.png"
    make = ["make", "-n", "-C", str(ROOT), "shards", "SRC=a", "OUT=b", "RES=16", "ENCODING=png"]
    assert '--encoding "png"' in subprocess.run(make, capture_output=True, text=True, check=True).stdout
    with pytest.raises(ValueError, match=r"png_level=0 applies to encoding='png' only, got encoding='raw'"):
        write_shards(src, tmp_path / "bad", [16], png_level=0, **kw)
    with pytest.raises(ValueError, match=r"encoding='jpeg': expected one of 'png', 'raw'"):
        write_shards(src, tmp_path / "bad", [16], encoding="jpeg", **kw)


def test_manifest_without_encoding_reads_as_png(tmp_path):
    path = write_set(tmp_path / "old", 3, "png")
    m = json.loads((path / MANIFEST).read_text())
    del m["encoding"]  # what every set written before raw existed looks like
    (path / MANIFEST).write_text(json.dumps(m))
    assert encoding_of(read_manifest(path)) == "png"
    assert np.array_equal(read_all(path, 16), images(16, 3))

    m["encoding"] = "webp"
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"encoding 'webp', expected one of \['png', 'raw'\]"):
        read_manifest(path)


def test_pattern_without_manifest_scans_raw(tmp_path):
    path = write_set(tmp_path / "raw", 1, "raw")
    (path / MANIFEST).unlink()
    dm = ShardDataModule(str(path / "*.tar"), resolution=8, num_workers=0)
    assert dm.manifest["encoding"] == "raw" and dm.channels == 1 and dm.manifest["resolutions"] == [8, 16]
    assert np.array_equal(read_all(path / "*.tar", 8), images(8, 1))


def test_corrupt_raw_member_is_a_counted_bad_sample(tmp_path):
    good = encode_raw(images(8, 3, n=1)[0])
    path = write_set(tmp_path / "bad", 3, "raw", corrupt={3: good[:-5], 7: good + b"x" * 64})
    dm = ShardDataModule(str(path), resolution=8, batch_size=4, num_workers=0, max_bad_fraction=0.3)
    with pytest.warns(CorruptDataWarning) as record:
        idx = [i for b in dm.eval_dataloader() for i in b["index"].tolist()]
    assert idx == [i for i in range(N) if i not in (3, 7)] and dm.skipped["eval"] == 2
    text = " ".join(str(r.message) for r in record)
    assert "sample 3 (key 00000003): 8.u8 is 187 bytes, expected 192 (8x8x3 uint8; truncated" in text
    assert "sample 7 (key 00000007): 8.u8 is 256 bytes, expected 192" in text
    assert len(read_all(path, 16)) == N  # the 16² members are intact

    with pytest.warns(CorruptDataWarning, match="8.u8 is"):  # training skips them too, full batches
        batches = list(dm.train_dataloader())
    assert all(b["x0"].shape == (4, 3, 8, 8) for b in batches) and dm.skipped["train"] >= 1
