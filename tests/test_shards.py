"""The shard writer: image folder -> shards + manifest (``make shards``; docs/architecture.md, "Data").

References are computed here independently of ``write_shards.py``: decode with Pillow, convert the
way the docstring promises (grey replicated, alpha over white, 16-bit high byte), centre-crop with
``(W - s) // 2`` offsets, resize with the filter. What the datamodule reads back must equal them.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tarfile
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
    assert "--val" not in text
    text = subprocess.run(cmd + ["VAL=0.05", "VAL_SEED=3"], capture_output=True, text=True, check=True).stdout
    assert '--val "0.05" --val-seed "3"' in text
    r = subprocess.run(
        [sys.executable, "-m", "datamodules.write_shards", "-h"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "ALLOW_UPSCALE" in r.stdout


# -------------------------------------------------------------------- held-out splits (VAL=, VAL_SEED=)
def tiny_folder(
    src: Path, n: int, classes: list[str] | None = None, broken: tuple[int, ...] = ()
) -> list[str]:
    """``n`` random 12x10 PNGs (dealt into class folders in runs of n / len(classes)), ``broken`` ones
    not images; returns the relative paths of the usable ones, sorted."""
    rng, good = np.random.default_rng(0), []
    for i in range(n):
        rel = f"{classes[i * len(classes) // n]}/im{i:03d}.png" if classes else f"im{i:03d}.png"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        if i in broken:
            (src / rel).write_bytes(b"not a png")
            continue
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(src / rel)
        good.append(rel)
    return sorted(good)


def members(folder: Path, ext: str) -> list[str]:
    """The ``<key>.<ext>`` members of a shard set in manifest order (``src.txt``: source paths)."""
    out = []
    for s in read_manifest(folder)["shards"]:
        with tarfile.open(folder / s["name"]) as t:
            out += [t.extractfile(m).read().decode() for m in t.getmembers() if m.name.endswith("." + ext)]
    return out


def test_held_out_split(tmp_path, capsys):
    src = tmp_path / "src"
    usable = tiny_folder(src, 42, broken=(3, 17, 30))  # 42 inputs listed, 39 usable
    kw = {"workers": 1, "shard_size": 8, "progress": False}
    plain = write_shards(src, tmp_path / "plain", [8], **kw)  # without VAL: one set directly in OUT
    assert "split" not in plain["params"] and not (tmp_path / "plain" / "train").exists()

    ms = write_shards(src, tmp_path / "a", [8], val=10, **kw)
    train, val = members(tmp_path / "a" / "train", "src.txt"), members(tmp_path / "a" / "val", "src.txt")
    assert not set(train) & set(val) and sorted(train + val) == usable  # disjoint, every usable input once
    assert train == sorted(train) and val == sorted(val)  # input order inside each split
    for name, n in (("train", 32), ("val", 10)):
        m = ms[name]
        assert m["params"] == {**plain["params"], "split": name, "val": 10, "val_seed": 0, "assigned": n}
        assert m["count"] == n - m["skipped"]["count"] and read_manifest(tmp_path / "a" / name) == m
        assert [s["count"] for s in m["shards"]] == [min(8, m["count"] - i) for i in range(0, m["count"], 8)]
        assert m["resolutions"] == [8]
    assert ms["train"]["skipped"]["count"] + ms["val"]["skipped"]["count"] == 3
    assert not (tmp_path / "a" / "manifest.json").exists()

    # deterministic: another folder, same bytes; another seed, another choice; a fraction of the inputs
    ms_b = write_shards(src, tmp_path / "b", [8], val=10, **kw)
    assert json.dumps(ms_b, sort_keys=True) == json.dumps(ms, sort_keys=True)
    for name in ("train", "val"):
        for s in ms[name]["shards"]:
            a, b = (tmp_path / d / name / s["name"] for d in "ab")
            assert a.read_bytes() == b.read_bytes()
    write_shards(src, tmp_path / "c", [8], val=10, val_seed=1, **kw)
    val_c = members(tmp_path / "c" / "val", "src.txt")
    assert val_c != val and not set(val_c) & set(members(tmp_path / "c" / "train", "src.txt"))
    frac = write_shards(src, tmp_path / "f", [8], val=0.2, **kw)  # round(0.2 * 42) = 8
    assert frac["val"]["params"]["assigned"] == 8 and frac["train"]["params"]["assigned"] == 34
    assert frac["val"]["params"]["val"] == 0.2

    dm = ShardDataModule(path=str(tmp_path / "a"), resolution=8, num_workers=0)
    assert dm.manifest == ms["train"] and dm.val_manifest == ms["val"]
    n_val = sum(len(b["index"]) for b in dm.eval_dataloader(split="val", batch_size=4))
    assert n_val == ms["val"]["count"]

    assert (
        main([str(src), str(tmp_path / "cli"), "--res", "8", "--val", "10", "--workers", "1", "--quiet"]) == 0
    )
    text = capsys.readouterr().out
    assert f"train: wrote {ms['train']['count']} samples at [8] into 1 shards" in text
    assert (
        f"in {tmp_path / 'cli' / 'val'}" in text
        and "val: 10 of 42 inputs listed were assigned to it (VAL=10, VAL_SEED=0)" in text
    )
    short = 10 - ms["val"]["count"]
    assert (f"val is {short} short" in text) == (short > 0)
    assert members(tmp_path / "cli" / "val", "src.txt") == val  # the same choice (another shard size)


def test_split_class_folders_hold_out_every_class(tmp_path):
    src = tmp_path / "src"
    tiny_folder(src, 60, classes=["a_cats", "b_dogs", "c_owls"])  # sorted: 20 cats, then dogs, then owls
    ms = write_shards(src, tmp_path / "out", [8], labels="folders", val=15, workers=1, progress=False)
    assert ms["val"]["count"] == 15 and ms["train"]["count"] == 45
    assert ms["val"]["labels"] == ms["train"]["labels"] == ["a_cats", "b_dogs", "c_owls"]
    cls = [int(c) for c in members(tmp_path / "out" / "val", "cls")]
    assert sorted(set(cls)) == [0, 1, 2] and cls == sorted(cls)  # uniform choice, not the first 15 files
    srcs = members(tmp_path / "out" / "val", "src.txt")
    assert [s.split("/")[0] for s in srcs] == [["a_cats", "b_dogs", "c_owls"][c] for c in cls]
    _, labels = read_all(tmp_path / "out" / "train", 8)
    assert sorted(set(labels)) == [0, 1, 2] and len(labels) == 45


def test_split_bad_values_and_layouts(tmp_path, capsys):
    src = tmp_path / "src"
    tiny_folder(src, 12)
    kw = {"workers": 1, "progress": False}
    x = tmp_path / "x"
    for bad, shown in (
        (0, "got 0"),
        (1.5, "got 1.5"),
        (-3, "got -3"),
        ("abc", "got 'abc'"),
        (0.0, "got 0.0"),
    ):
        with pytest.raises(
            ValueError, match=rf"VAL must be a count \(an int >= 1\) or a fraction in \(0, 1\), {shown}"
        ):
            write_shards(src, x, [8], val=bad, **kw)
    with pytest.raises(ValueError, match=r"VAL=12 must be less than the 12 inputs listed in SRC"):
        write_shards(src, x, [8], val=12, **kw)
    with pytest.raises(
        ValueError, match=r"VAL=0.01 of the 12 inputs listed in SRC holds out 0 \(expected 1 to 11\)"
    ):
        write_shards(src, x, [8], val=0.01, **kw)
    with pytest.raises(ValueError, match="VAL_SEED must be a non-negative int, got -1"):
        write_shards(src, x, [8], val=2, val_seed=-1, **kw)
    with pytest.raises(ValueError, match="VAL_SEED=3 given without VAL"):
        write_shards(src, x, [8], val_seed=3, **kw)
    assert not x.exists()
    for args, msg in (
        (
            ["--val", "1.5"],
            "argument --val: VAL must be a count (an int >= 1) or a fraction in (0, 1), got 1.5",
        ),
        (["--val", "ten"], "VAL must be a count (an int >= 1) or a fraction in (0, 1), got 'ten'"),
        (
            ["--val", "2", "--val-seed", "x"],
            "argument --val-seed: VAL_SEED must be a non-negative int, got 'x'",
        ),
        (["--val-seed", "3"], "VAL_SEED=3 given without VAL"),
    ):
        with pytest.raises(SystemExit):
            main([str(src), str(x), "--res", "8", "--quiet", *args])
        assert msg in capsys.readouterr().err
    assert main([str(src), str(x), "--res", "8", "--val", "20", "--quiet"]) == 2
    assert "VAL=20 must be less than the 12 inputs" in capsys.readouterr().err

    # an unsplit set in OUT: a split write is refused without FORCE, then replaces only the tool's files
    out = tmp_path / "out"
    write_shards(src, out, [8], shard_size=5, **kw)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"OUT {out} holds an unsplit shard set .*3 shards.*FORCE=1"):
        write_shards(src, out, [8], val=3, **kw)
    assert (out / "manifest.json").exists()
    ms = write_shards(src, out, [8], val=3, force=True, **kw)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train", "val"]
    assert ShardDataModule(path=str(out)).val_manifest == ms["val"]
    write_shards(src, out, [8], val=3, **kw)  # the same split set again: an update, allowed
    with pytest.raises(FileExistsError, match=r"different shard set \(params.val_seed: 0 -> 1\).*FORCE=1"):
        write_shards(src, out, [8], val=3, val_seed=1, **kw)
    with pytest.raises(
        FileExistsError, match=r"different shard set \(params.assigned: 9 -> 8, params.val: 3 -> 4"
    ):
        write_shards(src, out, [8], val=4, **kw)
    # ... and the reverse: an unsplit write over a split set
    with pytest.raises(FileExistsError, match=rf"OUT {out} holds a split shard set .*train.*val.*FORCE=1"):
        write_shards(src, out, [8], **kw)
    m = write_shards(src, out, [8], force=True, **kw)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "shard-000000.tar"]
    assert ShardDataModule(path=str(out)).val_manifest is None and read_manifest(out) == m

    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.pdf").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty and holds no shard set"):
        write_shards(src, other, [8], val=3, **kw)
