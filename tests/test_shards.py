"""The shard writer: image folder -> shards + manifest (``make shards``; DESIGN.md §4 Data).

References are computed here independently of ``write_shards.py``: decode with Pillow, convert the
way the docstring promises (grey replicated, alpha over white, 16-bit high byte), centre-crop with
``(W - s) // 2`` offsets, resize with the filter. What the datamodule reads back must equal them.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.demo_photos import write_photo_folder
from datamodules.manifest import read_manifest
from datamodules.webdataset import ShardDataModule
from datamodules.write_shards import main, write_shards

ROOT = Path(__file__).resolve().parent.parent


def png16_rgb(a: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one): uint16 [H, W, 3]."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def reference(rgb: np.ndarray, res: int, resample=Image.Resampling.LANCZOS) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    sq = Image.fromarray(rgb[top : top + s, left : left + s])
    return np.asarray(sq.resize((res, res), resample))


def read_all(path, res: int) -> tuple[np.ndarray, list[int]]:
    """Every sample of a shard set in index order, as uint8 [N, r, r, C], and labels (-1 without)."""
    dm = ShardDataModule(str(path), resolution=res, num_workers=0)
    imgs, labels = [], []
    for b in dm.eval_dataloader(batch_size=7):
        assert b["index"].tolist() == list(range(len(labels), len(labels) + len(b["index"])))
        imgs.append(torch.round((b["x0"] + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        labels += b["label"].tolist() if "label" in b else [-1] * len(b["index"])
    return np.concatenate(imgs), labels


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """Two class folders of photographs plus the awkward inputs; returns (src, expected RGB per kept file)."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    write_photo_folder(src, 6, seed=1, min_side=40, max_side=90, classes=["cats", "dogs"])
    want = {
        p.relative_to(src).as_posix(): np.asarray(Image.open(p).convert("RGB")) for p in src.rglob("*.jpg")
    }
    grey = rng.integers(0, 256, (50, 41), dtype=np.uint8)
    Image.fromarray(grey).save(src / "cats" / "grey.png")
    want["cats/grey.png"] = np.repeat(grey[:, :, None], 3, 2)
    rgba = rng.integers(0, 256, (36, 48, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(src / "dogs" / "rgba.png")
    a = rgba[:, :, 3:].astype(np.float64) / 255
    want["dogs/rgba.png"] = np.rint(rgba[:, :, :3] * a + 255 * (1 - a)).astype(np.uint8)
    g16 = rng.integers(0, 65536, (40, 40), dtype=np.uint16)
    Image.fromarray(g16).save(src / "dogs" / "grey16.png")  # mode I;16
    want["dogs/grey16.png"] = np.repeat((g16 >> 8).astype(np.uint8)[:, :, None], 3, 2)
    c16 = rng.integers(0, 65536, (34, 45, 3), dtype=np.uint16)
    (src / "dogs" / "rgb16.png").write_bytes(png16_rgb(c16))
    want["dogs/rgb16.png"] = (c16 >> 8).astype(np.uint8)
    # inputs that must be skipped, each for its own reason
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(buf, "JPEG")
    (src / "cats" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (src / "dogs" / "notes.txt").write_text("not an image")
    Image.fromarray(grey[:20, :25]).save(src / "cats" / "tiny.png")
    Image.fromarray(grey).save(src / "loose.png")  # outside any class folder
    (src / ".hidden.jpg").write_text("ignored")
    return src, dict(sorted(want.items()))


def test_round_trip_labels_and_manifest(folder, tmp_path):
    src, want = folder
    m = write_shards(
        src, tmp_path / "out", [16, 32], labels="folders", workers=1, shard_size=4, progress=False
    )
    assert m["count"] == len(want) == 10 and m["resolutions"] == [16, 32] and m["channels"] == 3
    assert m["labels"] == ["cats", "dogs"] and m["filter"] == "lanczos" and m["source"] == str(src.resolve())
    assert [s["count"] for s in m["shards"]] == [4, 4, 2] and all(len(s["sha256"]) == 64 for s in m["shards"])
    reasons = {"not an image": 1, "not inside a class folder": 1, "too small": 1, "truncated": 1}
    assert m["skipped"]["count"] == 4 and m["skipped"]["reasons"] == reasons
    items = "\n".join(m["skipped"]["items"])
    for name in ("cats/truncated.jpg: truncated", "dogs/notes.txt: not an image", "loose.png: not inside"):
        assert name in items
    assert "cats/tiny.png: too small (25x20: square side 20 < 32" in items
    assert read_manifest(tmp_path / "out") == m

    for res in (16, 32):
        imgs, labels = read_all(tmp_path / "out", res)
        assert labels == [0 if k.startswith("cats/") else 1 for k in want]
        for img, (name, rgb) in zip(imgs, want.items()):
            ref = reference(rgb, res)
            if name == "dogs/rgba.png":  # Pillow's integer compositing may differ from float by 1
                assert np.abs(img.astype(int) - ref).max() <= 1, name
            else:
                np.testing.assert_array_equal(img, ref, err_msg=name)


def test_filter_upscale_and_deterministic(folder, tmp_path):
    src, want = folder
    kw = {"labels": "folders", "filter": "bicubic", "allow_upscale": True, "shard_size": 3, "progress": False}
    m1 = write_shards(src, tmp_path / "a", [32], workers=1, **kw)
    m2 = write_shards(src, tmp_path / "b", [32], workers=2, **kw)
    assert m1["count"] == 11 and m1["skipped"]["reasons"] == {
        "not an image": 1,
        "not inside a class folder": 1,
        "truncated": 1,
    }
    assert m1["shards"] == m2["shards"]  # same names, counts, sizes and sha256 whatever the workers
    for s in m1["shards"]:
        assert (tmp_path / "a" / s["name"]).read_bytes() == (tmp_path / "b" / s["name"]).read_bytes()
    imgs, _ = read_all(tmp_path / "a", 32)
    tiny = np.repeat(np.asarray(Image.open(src / "cats" / "tiny.png"))[:, :, None], 3, 2)
    i = sorted([*want, "cats/tiny.png"]).index("cats/tiny.png")
    np.testing.assert_array_equal(imgs[i], reference(tiny, 32, Image.Resampling.BICUBIC))  # upsampled


def test_overwrite_rules_and_input_errors(folder, tmp_path):
    src, _ = folder
    out = tmp_path / "out"
    write_shards(src, out, [16], labels="folders", shard_size=2, workers=1, progress=False)
    assert len(list(out.glob("shard-*.tar"))) == 6  # 11 images at 16² (tiny.png is large enough)
    write_shards(src, out, [16], labels="folders", shard_size=2, workers=1, progress=False)  # same set: ok
    with pytest.raises(
        FileExistsError, match=r"different shard set \(resolutions: \[16\] -> \[32\]\).*FORCE=1"
    ):
        write_shards(src, out, [32], labels="folders", workers=1, progress=False)
    m = write_shards(src, out, [32], labels="folders", shard_size=20, force=True, workers=1, progress=False)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]  # stale shards removed
    assert read_manifest(out) == m

    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.pdf").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty and holds no manifest.json"):
        write_shards(src, other, [16], workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match=f"SRC {tmp_path / 'nowhere'} does not exist"):
        write_shards(tmp_path / "nowhere", tmp_path / "x", [16], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        write_shards(tmp_path / "empty", tmp_path / "x", [16], progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ValueError, match=r"no usable images .*\(1 skipped, .*a.jpg: not an image"):
        write_shards(tmp_path / "bad", tmp_path / "x", [16], workers=1, progress=False)
    with pytest.raises(ValueError, match="unknown filter 'sinc'"):
        write_shards(src, tmp_path / "x", [16], filter="sinc", progress=False)


def test_command_line(folder, tmp_path, capsys):
    src, _ = folder
    out = tmp_path / "out"
    assert (
        main([str(src), str(out), "--res", "16,32", "--labels", "folders", "--workers", "1", "--quiet"]) == 0
    )
    text = capsys.readouterr().out
    assert "wrote 10 samples at [16, 32] into 1 shards" in text and "labels: 2 classes (cats, dogs)" in text
    assert "skipped 4 inputs" in text
    assert main([str(tmp_path / "nowhere"), str(out), "--res", "16", "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(src), str(out)])
    assert "RES required" in capsys.readouterr().err

    # `make shards` passes the variables through (dry run: prints the command)
    cmd = [
        "make",
        "-n",
        "-C",
        str(ROOT),
        "shards",
        f"SRC={src}",
        f"OUT={out}",
        "RES=64,256",
        "LABELS=folders",
    ]
    text = subprocess.run(
        cmd + ["ALLOW_UPSCALE=1", "FORCE=1"], capture_output=True, text=True, check=True
    ).stdout
    assert f'-m datamodules.write_shards "{src}" "{out}" --res "64,256" --labels folders' in text
    assert "--allow-upscale" in text and "--force" in text and "--filter lanczos" in text
    r = subprocess.run(
        [sys.executable, "-m", "datamodules.write_shards", "-h"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "ALLOW_UPSCALE" in r.stdout
