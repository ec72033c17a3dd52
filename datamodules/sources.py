"""Where a shard set is: a folder, a manifest file, or a brace / glob pattern of tar files
(docs/architecture.md, Data).

``find_splits(path, val_path)`` resolves the ``path`` of ``ShardDataModule``:
- a folder with ``train/manifest.json`` (and optionally ``val/manifest.json``): the layout the
  dead-leaves generator writes;
- a folder with ``manifest.json`` (what ``make shards`` writes) or the manifest file itself: one
  split, ``train``;
- a pattern such as ``data/ffhq/shard-{000000..000009}.tar`` or ``data/ffhq/*.tar`` (braces as in
  webdataset, ``::`` joins lists): those shards.
  When the folder of the matched shards has a manifest listing all of them, their entries are taken
  from it; otherwise the tar files are scanned (counts, resolutions, channels, labels, encoding).

Shards the manifest lists but that are missing are dropped with a warning and their samples counted
as bad; when that is more than ``max_bad_fraction`` of the split, it fails here, naming them. A shard
whose size differs from the manifest's ``bytes`` (truncated, or overwritten) is refused here with a
``ShardSetError`` naming it, both sizes and what to do: a set is used whole or not at all.
"""

from __future__ import annotations

import glob
import io
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from webdataset.shardlists import expand_urls

from datamodules.manifest import FORMAT, MANIFEST, is_pattern, read_manifest, size_mismatch
from datamodules.streams import CorruptDataWarning, Shard

_IMAGE = re.compile(r"^(\d+)\.(png|u8)$")  # <res>.png, or <res>.u8 (raw, encodings.py)


@dataclass
class Split:
    name: str  # "train" or "val"
    where: str  # the folder or pattern it came from (for messages)
    manifest: dict[str, Any]  # the manifest (for a pattern: the matched shards only)
    shards: list[Shard]  # every listed shard, in order, with its global start index
    missing: list[str]  # listed shards that do not exist (dropped from training, counted as bad)

    @property
    def present(self) -> list[Shard]:
        gone = set(self.missing)
        return [s for s in self.shards if s.url not in gone]


def find_splits(path: str, val_path: str | None, max_bad_fraction: float) -> dict[str, Split] | None:
    """``{"train": Split, ["val": Split]}``, or None when ``path`` holds no shard set."""
    root, key = Path(path), f"data.path={path}"  # named in errors
    if is_pattern(path):
        splits = {"train": _pattern_split("train", path, key)}
    elif (root / "train" / MANIFEST).is_file():
        splits = {"train": _folder_split("train", root / "train", key)}
        if (root / "val" / MANIFEST).is_file():
            splits["val"] = _folder_split("val", root / "val", key)
    elif (root / MANIFEST).is_file() or (root.suffix == ".json" and root.is_file()):
        splits = {"train": _folder_split("train", root, key)}
    else:
        return None
    if val_path is not None:
        if is_pattern(val_path):
            splits["val"] = _pattern_split("val", val_path, f"data.val_path={val_path}")
        elif (Path(val_path) / MANIFEST).is_file() or Path(val_path).suffix == ".json":
            splits["val"] = _folder_split("val", Path(val_path), f"data.val_path={val_path}")
        else:
            raise FileNotFoundError(f"no shard set at val_path {val_path} (no {Path(val_path) / MANIFEST})")
    for split in splits.values():
        _check_missing(split, max_bad_fraction)
    return splits


def _shards(folder: Path, manifest: dict[str, Any], key: str) -> tuple[list[Shard], list[str]]:
    """The manifest's shards with their start indices, and the missing ones; refuses a size mismatch.

    ``key`` (``"data.path=<value>"``) starts the error message."""
    shards, missing, start = [], [], 0
    for s in manifest["shards"]:
        p = folder.resolve() / s["name"]
        shards.append(Shard(url=str(p), count=int(s["count"]), start=start))
        start += int(s["count"])
        if not p.is_file():
            missing.append(str(p))
        elif "bytes" in s and p.stat().st_size != s["bytes"]:
            e = size_mismatch(p, p.stat().st_size, manifest, folder)
            raise type(e)(f"{key}: {e}")
    return shards, missing


def _folder_split(name: str, folder: Path, key: str) -> Split:
    manifest = read_manifest(folder)
    if folder.suffix == ".json":
        folder = folder.parent
    shards, missing = _shards(folder, manifest, key)
    return Split(name, str(folder), manifest, shards, missing)


def _pattern_split(name: str, pattern: str, key: str) -> Split:
    urls = sorted({str(Path(p).resolve()) for b in expand_urls(pattern) for p in _glob_or_self(b)})
    urls = [u for u in urls if Path(u).is_file()]
    if not urls:
        raise FileNotFoundError(f"no shard matches the pattern {pattern}")
    folder = Path(urls[0]).parent
    listed = None
    if all(Path(u).parent == folder for u in urls) and (folder / MANIFEST).is_file():
        listed = read_manifest(folder)
        by_name = {s["name"]: s for s in listed["shards"]}
        if not all(Path(u).name in by_name for u in urls):
            listed = None
    if listed is not None:
        manifest = dict(listed, shards=[by_name[Path(u).name] for u in urls])
    else:
        manifest = scan(urls)
    manifest["count"] = sum(s["count"] for s in manifest["shards"])
    shards, missing = _shards(folder, manifest, key)
    return Split(name, pattern, manifest, shards, missing)


def _glob_or_self(p: str) -> list[str]:
    return glob.glob(p) if any(c in p for c in "*?[") else [p]


def scan(urls: list[str]) -> dict[str, Any]:
    """A manifest for tar shards without one: counts, resolutions, channels, labels, encoding (headers)."""
    shards, resolutions, labels_max, channels = [], None, -1, None
    for u in urls:
        keys, count, exts = None, 0, set()
        try:
            with tarfile.open(u, "r:") as tf:
                for ti in tf:
                    if not ti.isreg():
                        continue
                    k, _, suffix = ti.name.rpartition("/")[2].partition(".")
                    if k != keys:
                        keys, count = k, count + 1
                    if count == 1:
                        exts.add(suffix)
                    if suffix == "cls":
                        labels_max = max(labels_max, int(tf.extractfile(ti).read()))
                    image = _IMAGE.match(suffix)
                    if channels is None and image and image.group(2) == "png":
                        with Image.open(io.BytesIO(tf.extractfile(ti).read())) as im:
                            channels = 1 if im.mode in ("1", "L", "I;16") else 3
                    elif channels is None and image:  # raw: the byte size gives the channels
                        channels = ti.size // int(image.group(1)) ** 2
                    tf.members = []
        except (tarfile.TarError, OSError, ValueError) as e:
            raise ValueError(
                f"cannot scan shard {u} ({type(e).__name__}: {e}); write a manifest with make shards"
            ) from e
        found = [m for m in map(_IMAGE.match, exts) if m]
        res = sorted(int(m.group(1)) for m in found)
        if resolutions is None:
            resolutions, kinds = res, {m.group(2) for m in found}
        elif res != resolutions:
            raise ValueError(f"shard {u} stores resolutions {res}, {urls[0]} stores {resolutions}")
        shards.append({"name": u, "count": count})
    if not resolutions:
        raise ValueError(f"no <key>.<res>.png (or .u8) members in {urls[0]}: not a freqdiff shard set")
    if len(kinds) > 1 or channels not in (1, 3):
        what = "both .png and .u8 image members" if len(kinds) > 1 else f"{channels} channels"
        raise ValueError(f"shard {urls[0]}: {what}, expected one image encoding with 1 or 3 channels")
    return {
        "format": FORMAT,
        "count": sum(s["count"] for s in shards),
        "resolutions": resolutions,
        "channels": channels,
        "encoding": "raw" if kinds == {"u8"} else "png",
        "labels": [str(i) for i in range(labels_max + 1)] if labels_max >= 0 else None,
        "filter": "unknown (scanned, no manifest)",
        "source": urls[0],
        "shards": shards,
        "skipped": {"count": 0, "items": []},
    }


def _check_missing(split: Split, max_bad_fraction: float) -> None:
    if not split.missing:
        return
    total = max(1, split.manifest["count"])
    lost = sum(s.count for s in split.shards if s.url in set(split.missing))
    msg = f"{split.name} shard set {split.where}: {len(split.missing)} listed shard(s) missing"
    msg += f" ({lost} of {total} samples)"
    if lost > max_bad_fraction * total or lost == total:
        raise FileNotFoundError(f"{msg}, more than max_bad_fraction={max_bad_fraction}: {split.missing[:5]}")
    warnings.warn(f"data: {msg}; training without them: {split.missing[:5]}", CorruptDataWarning, 3)
