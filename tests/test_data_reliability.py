"""Reliability of the data layer (docs/architecture.md, Data): where dead leaves may be written, when bad data
stops a run, shards that disagree with their manifest, temporary files left by killed writers, and
the datamodule's argument checks. Shard sets are tiny and written into ``tmp_path``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from datamodules.health import _MIN_BAD, BadDataError, CorruptDataWarning, Health, wilson_lower
from datamodules.manifest import (
    MANIFEST,
    ShardSetError,
    ShardWriter,
    check_shards,
    encode_png,
    make_manifest,
    read_manifest,
    remove_stale_temp,
    sample_dict,
    write_manifest,
)
from datamodules.synthetic import DeadLeaves, placement
from datamodules.webdataset import ShardDataModule
from datamodules.write_shards import write_shards
from freqdiff.config import ConfigError

STALE = ".shard-000000.tar.k1ll3d00.tmp"  # what a killed ShardWriter leaves (mkstemp's random part)


def small(**kw) -> DeadLeaves:
    return DeadLeaves(**{"resolution": 8, "n_train": 24, "n_val": 8, "shard_size": 10, **kw})


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: relative path -> (size, mtime)."""
    found = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in found}


def write_set(folder: Path, n: int, shard_size: int, bad: set[int] = frozenset()) -> Path:
    """A flat shard set of 8² dead-leaves images; samples in ``bad`` hold a non-PNG ``8.png``."""
    imgs = DeadLeaves(resolution=8).images(n)
    with ShardWriter(folder, shard_size=shard_size) as w:
        for i in range(n):
            s = sample_dict(i, {8: imgs[i]})
            if i in bad:
                s["8.png"] = b"not a png"
            w.write(s)
    write_manifest(folder, make_manifest(count=n, resolutions=[8], channels=3, shards=w.shards))
    return folder


def complete(folder: Path, count: int) -> None:
    """``folder`` holds a whole shard set of ``count`` samples and no temporary file."""
    m = read_manifest(folder)
    check_shards(folder, m, sha256=True)
    assert m["count"] == count and not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# -------------------------------------------------------------------- 1. where dead leaves go
def test_synthetic_refuses_a_folder_of_images(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    img = DeadLeaves(resolution=8).images(1)[0]
    for i in range(12):
        (photos / f"{chr(ord('a') + i)}.png").write_bytes(encode_png(img))
    before = files(photos)
    want = (
        rf"data.path={photos}: holds 12 files such as a.png, b.png, c.png and no shard set.*"
        rf"make shards SRC={photos} OUT=<shard folder> RES=<res>"
    )
    for step in ("prepare_data", "setup", "planned_resolution"):
        dm = ShardDataModule(str(photos), num_workers=0, synthetic=small())
        with pytest.raises(ConfigError, match=want) as e:
            getattr(dm, step)()
        assert isinstance(e.value, ShardSetError) and isinstance(e.value, ValueError)
    assert files(photos) == before  # nothing written, nothing removed

    # the command line: one line and exit code 2, also for the dry run
    from experiments.__main__ import main

    capsys.readouterr()
    assert main(["run", "quickstart", f"data.path={photos}", "--dry"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"config error: data.path={photos}: holds 12 files") and "\n" not in err
    assert files(photos) == before


def test_synthetic_refuses_anything_but_its_own_remnants(tmp_path):
    def refused(path: Path, what: str) -> None:
        before = files(path) if path.is_dir() else None
        with pytest.raises(ShardSetError, match=what):
            ShardDataModule(str(path), synthetic=small()).prepare_data()
        assert before is None or files(path) == before

    notes = tmp_path / "notes"
    (notes / "train").mkdir(parents=True)
    (notes / "thesis.pdf").write_text("precious")
    refused(notes, rf"data.path={notes}: holds 1 file such as thesis.pdf and no shard set")

    inside = tmp_path / "inside"  # a train/ folder with a file the generator never writes
    (inside / "train").mkdir(parents=True)
    (inside / "train" / "shard-000000.tar").write_bytes(b"")
    (inside / "train" / "readme.md").write_text("mine")
    refused(inside, r"holds 1 file such as train/readme.md")

    loose = tmp_path / "loose"  # shards without a manifest: not overwritten, a pattern reads them
    with ShardWriter(loose, shard_size=4) as w:
        for i, img in enumerate(DeadLeaves(resolution=8).images(6)):
            w.write(sample_dict(i, {8: img}))
    refused(loose, rf"2 files such as shard-000000.tar, shard-000001.tar .*pattern like {loose}/\*\.tar")
    dm = ShardDataModule(str(loose / "*.tar"), num_workers=0, synthetic=small())
    assert dm.planned_resolution()[0] == 8 and dm.manifest["count"] == 6

    classes = tmp_path / "classes"
    (classes / "cats").mkdir(parents=True)
    refused(classes, r"holds 1 empty folder such as cats/")
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(afile, rf"data.path={afile}: a file; expected a folder")


def test_synthetic_writes_only_into_empty_or_its_own_folder(tmp_path, capsys):
    path = tmp_path / "dl"  # a missing folder: the dry peek writes nothing, prepare_data generates
    dm = ShardDataModule(str(path), num_workers=0, synthetic=small())
    assert dm.planned_resolution() == (8, "from the synthetic generator's settings") and not path.exists()
    dm.prepare_data()
    complete(path / "train", 24)
    complete(path / "val", 8)
    peek = ShardDataModule(str(path), synthetic=small()).planned_resolution()
    assert peek == (8, f"from the dead-leaves set in {path}")

    empty = tmp_path / "empty"
    empty.mkdir()
    ShardDataModule(str(empty), num_workers=0, synthetic=small()).setup()  # setup without prepare_data
    complete(empty / "train", 24)

    # the remnants of an interrupted generation: a partial shard, a temporary file, no manifest
    rem = tmp_path / "remnant"
    (rem / "train").mkdir(parents=True)
    (rem / "val").mkdir()
    (rem / "train" / "shard-000000.tar").write_bytes(b"half a shard")
    (rem / "train" / STALE).write_bytes(b"partial")
    before = files(rem)
    assert ShardDataModule(str(rem), synthetic=small()).planned_resolution()[0] == 8
    assert files(rem) == before  # the peek is read-only
    capsys.readouterr()
    ShardDataModule(str(rem), num_workers=0, synthetic=small()).prepare_data()
    assert "unreadable or incomplete (interrupted?); regenerating" in capsys.readouterr().out
    complete(rem / "train", 24)
    complete(rem / "val", 8)

    # an earlier dead-leaves set with other parameters: regenerated with a notice
    ShardDataModule(str(rem), num_workers=0, synthetic=small(seed=3)).prepare_data()
    assert "written with other seed; regenerating" in capsys.readouterr().out
    assert read_manifest(rem / "train")["params"]["seed"] == 3

    # a real set in the train/ + val/ layout: used as it is, never written into
    real = tmp_path / "real"
    write_set(real / "train", 20, 10)
    write_set(real / "val", 6, 10)
    before = files(real)
    assert placement(str(real)) == "use"
    dm = ShardDataModule(str(real), num_workers=0, synthetic=small())
    dm.prepare_data()
    assert "holds a shard set; using it (data.synthetic is ignored)" in capsys.readouterr().out
    assert dm.manifest["count"] == 20 and files(real) == before


# -------------------------------------------------------------------- 2. when bad data stops a run
def feed(health: Health, bad: np.ndarray, batch: int = 64) -> None:
    """Samples decoded batch by batch as TrainStream does: each counted as it is decoded."""
    for a in range(0, len(bad), batch):
        for i in range(a, min(a + batch, len(bad))):
            if bad[i]:
                health.add_bad(1, f"sample {i} (key {i:08d}): 8.png does not decode")
            else:
                health.add_good(1)


def test_wilson_lower_bound():
    z2 = 2.326**2
    assert wilson_lower(0, 10) == 0 and wilson_lower(3, 0) == 0
    assert wilson_lower(7, 7) == pytest.approx(7 / (7 + z2))  # all bad: n / (n + z^2)
    p, n = 0.25, 400
    direct = (p + z2 / (2 * n) - 2.326 * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n)
    assert wilson_lower(100, 400) == pytest.approx(direct) and 0.19 < direct < 0.25
    assert wilson_lower(100, 20000) < 0.01 < wilson_lower(23, 140)


def test_half_percent_bad_never_stops_quarter_bad_stops_early():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptDataWarning)
        for seed in range(8):  # 0.5 % bad over 20,000 samples: below the 1 % limit, never stopped
            bad = np.random.default_rng(seed).random(20000) < 0.005
            h = Health("train", 0.01)
            feed(h, bad)
            h.check(final=True)
            assert h.read == 20000 and h.bad == bad.sum() > 50

        reads = []
        for seed in range(8):  # 25 % bad: stopped within the first 200 samples
            h = Health("train", 0.01)
            with pytest.raises(BadDataError) as e:
                feed(h, np.random.default_rng(seed).random(20000) < 0.25)
            reads.append(h.read)
            b, n = h.bad, h.read
            assert str(e.value) == (
                f"data: {b} of {n} train samples read so far ({100 * b / n:.1f} %) are unreadable; "
                f"at 99 % confidence at least {100 * wilson_lower(b, n):.1f} % of the data is bad, more "
                f"than data.max_bad_fraction=0.01; last problem: sample {n - 1} (key {n - 1:08d}): "
                "8.png does not decode"
            )
        assert max(reads) < 200 and min(reads) >= _MIN_BAD

        # a few bad samples are never enough while streaming; after a full pass the plain fraction decides
        h = Health("eval", 0.01)
        feed(h, np.arange(100) < _MIN_BAD - 1)
        h.check(final=False)
        with pytest.raises(BadDataError, match=r"4 of 100 eval samples read so far \(4.0 %\) .*, more than"):
            h.check(final=True)

        # a shard's missing range comes at once: the message says how many were read in all
        h = Health("train", 0.01)
        h.add_good(30)
        with pytest.raises(
            BadDataError,
            match=r"^data: 100 of 130 train samples read so far \(76.9 %\) are unreadable \(100 of them "
            r"missing from shards that do not open or end early\).*last problem: shard s.tar positions",
        ):
            h.add_missing(100, "shard s.tar positions 0..99: it ends after 0 of 100 samples")


def test_bad_shards_stop_within_a_hundred_samples_across_workers(tmp_path):
    path = write_set(tmp_path / "quarter", 400, 200, bad=set(range(0, 400, 4)))  # a pair of shards
    dm = ShardDataModule(
        str(path), batch_size=8, num_workers=2, batches_per_epoch=60, shuffle_buffer=32, max_bad_fraction=0.01
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptDataWarning)
        with pytest.raises(BadDataError) as e:
            list(dm.train_dataloader())  # raised in a worker: the counts are those of both workers
    m = re.search(r"data: (\d+) of (\d+) train samples read so far \(([\d.]+) %\)", str(e.value))
    bad, read = int(m[1]), int(m[2])
    assert read < 100 and bad >= _MIN_BAD and float(m[3]) == round(100 * bad / read, 1)
    assert bad / read > 0.1 and "more than data.max_bad_fraction=0.01" in str(e.value)  # not diluted
    assert dm._health["train"].read < 200  # both workers stopped long before a full pass

    ok = write_set(tmp_path / "fine", 400, 200, bad={17, 301})  # 0.5 %: trains through a full pass
    dm = ShardDataModule(str(ok), batch_size=8, num_workers=2, batches_per_epoch=60, shuffle_buffer=32)
    with warnings.catch_warnings():  # warned in the worker processes
        warnings.simplefilter("ignore", CorruptDataWarning)
        assert len(list(dm.train_dataloader())) == 60
    assert dm._health["train"].read >= 400 and dm.skipped["train"] <= 4


# -------------------------------------------------------------------- 3. shards unlike their manifest
def test_size_mismatch_refused_when_opened(tmp_path):
    path = write_set(tmp_path / "set", 30, 10)
    tar = path / "shard-000001.tar"
    size = tar.stat().st_size
    tar.write_bytes(tar.read_bytes()[: size // 2])
    refusal = (
        rf"shard {tar} is {size // 2} bytes but {path / MANIFEST} records {size} \(truncated or overwritten "
        rf"since it was written\); restore it from a copy, or write the set again: make shards "
        rf"SRC=<image folder> OUT={path} RES=8 FORCE=1"
    )
    with pytest.raises(ShardSetError, match=rf"^data.path={path}: {refusal}$"):
        ShardDataModule(str(path)).setup()
    with pytest.raises(ShardSetError, match=r"^data.path=.*\*\.tar: shard .*is \d+ bytes but"):
        ShardDataModule(str(path / "*.tar")).setup()
    tar.write_bytes(b"\0" * (size + 512))  # longer than recorded: refused too
    with pytest.raises(
        ShardSetError, match=rf"^data.val_path={path}: .*is {size + 512} bytes but .* records {size}"
    ):
        ShardDataModule(str(tmp_path / "other"), val_path=str(path), synthetic=small()).setup()

    # a set written by make shards names its source in the remedy
    src = tmp_path / "src"
    src.mkdir()
    for i, img in enumerate(DeadLeaves(resolution=16).images(3)):
        (src / f"{i}.png").write_bytes(encode_png(img))
    out = tmp_path / "shards"
    write_shards(src, out, [8], workers=1, shard_size=2, progress=False)
    (out / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(
        ShardSetError, match=rf"make shards SRC={src.resolve()} OUT={out.resolve()} RES=8 FORCE"
    ):
        ShardDataModule(str(out)).setup()


def test_truncated_dead_leaves_refused_not_regenerated(tmp_path, capsys):
    path = tmp_path / "dl"
    small().write(path, progress=False)
    tar = path / "train" / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    before = files(path)
    hint = rf"shard {tar} is 1000 bytes but .*; delete {path / 'train'} \(a generated dead-leaves split\)"
    with pytest.raises(ShardSetError, match=rf"^data.path={path}: {hint}"):
        ShardDataModule(str(path)).setup()  # without data.synthetic too
    for step in (
        lambda: ShardDataModule(str(path), synthetic=small()).prepare_data(),
        lambda: ShardDataModule(str(path), synthetic=small()).setup(),
        lambda: small().write(path, progress=False),
    ):
        with pytest.raises(ShardSetError, match=hint):
            step()
    assert files(path) == before  # nothing regenerated over it

    # other parameters are a deliberate change of settings: regenerated, with the notice
    capsys.readouterr()
    ShardDataModule(str(path), num_workers=0, synthetic=small(n_discs=5)).prepare_data()
    assert "written with other n_discs; regenerating" in capsys.readouterr().out
    complete(path / "train", 24)

    # deleting the split, as the message says, regenerates it
    for p in (path / "train").iterdir():
        p.unlink()
    (path / "train").rmdir()
    ShardDataModule(str(path), num_workers=0, synthetic=small(n_discs=5)).prepare_data()
    complete(path / "train", 24)


# -------------------------------------------------------------------- 4. temporary files of killed writers
def test_stale_temp_files_removed_on_next_write(tmp_path):
    # dead leaves: a killed generation's temporary files go on the next write, the set is complete
    path = tmp_path / "dl"
    small().write(path, progress=False)
    for split in ("train", "val"):
        (path / split / STALE).write_bytes(b"partial")
        (path / split / ".manifest.json.abcd_123.tmp").write_bytes(b"{")
    small().write(path, progress=False)  # up to date: nothing regenerated, the leftovers removed
    complete(path / "train", 24)
    complete(path / "val", 8)
    ShardDataModule(str(path), num_workers=0, synthetic=small(seed=1)).prepare_data()
    complete(path / "train", 24)

    # make shards: only the writer's own names are touched
    src = tmp_path / "src"
    src.mkdir()
    for i, img in enumerate(DeadLeaves(resolution=16).images(5)):
        (src / f"{i}.png").write_bytes(encode_png(img))
    out = tmp_path / "out"
    out.mkdir()
    keep = [".shard-000000.tar.tmp", ".notes.tmp", ".shard-000000.tar.k1ll3d00.bak"]
    for name in [STALE, ".shard-000007.tar.zz9_x8yq.tmp", *keep]:
        (out / name).write_bytes(b"x")
    write_shards(src, out, [8], workers=1, shard_size=2, progress=False)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == sorted(keep)
    assert read_manifest(out)["count"] == 5 and ShardDataModule(str(out)).manifest["count"] == 5

    # a live writer's temporary file is locked: another writer in the same folder leaves it alone
    live = tmp_path / "live"
    with ShardWriter(live, shard_size=3) as w:
        w.write(sample_dict(0, {8: DeadLeaves(resolution=8).images(1)[0]}))
        (tmp,) = live.glob(".shard-*.tmp")
        assert remove_stale_temp(live) == [] and ShardWriter(live).removed == [] and tmp.exists()
    assert not tmp.exists() and [s["count"] for s in w.shards] == [1]
    assert remove_stale_temp(live) == [] and (live / "shard-000000.tar").exists()


# -------------------------------------------------------------------- constructor arguments
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"path": None}, "path=None: expected a shard folder, a manifest file or a pattern"),
        ({"path": ""}, "path='': expected a shard folder, a manifest file or a pattern"),
        ({"val_path": " "}, "val_path=' ': expected a shard folder, a manifest file or a pattern"),
        ({"batch_size": 0}, "batch_size=0: expected a positive integer"),
        ({"batch_size": -1}, "batch_size=-1: expected a positive integer"),
        ({"batch_size": 2.5}, "batch_size=2.5: expected a positive integer"),
        ({"num_workers": -1}, "num_workers=-1: expected a non-negative integer"),
        ({"resolution": 0}, "resolution=0: expected a positive integer or null"),
        ({"resolution": "64"}, "resolution='64': expected a positive integer or null"),
        (
            {"resolutions": [64, -8]},
            r"resolutions=\[64, -8\]: expected a list of positive integers \(or null\)",
        ),
        ({"batches_per_epoch": 0}, "batches_per_epoch=0: expected a positive integer or null"),
        ({"shuffle_buffer": -5}, "shuffle_buffer=-5: expected a non-negative integer"),
        ({"max_bad_fraction": 1.5}, r"max_bad_fraction=1.5: expected a number in \[0, 1\]"),
        ({"max_bad_fraction": "0.1"}, r"max_bad_fraction='0.1': expected a number in \[0, 1\]"),
    ],
)
def test_constructor_checks_arguments(kw, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        ShardDataModule(**{"path": "data/anywhere", **kw})


def test_constructor_accepts_edge_values():
    dm = ShardDataModule("x", batch_size=1, num_workers=0, max_bad_fraction=0, shuffle_buffer=0)
    assert dm.batch_size == 1 and dm.max_bad_fraction == 0.0 and dm.requested_resolution is None
    assert ShardDataModule("x", resolution=np.int64(32), max_bad_fraction=1).requested_resolution == 32
