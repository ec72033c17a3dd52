"""Shard-set manifests and a deterministic tar-shard writer (docs/architecture.md, Data).

Every dataset, real or synthetic, is a folder of WebDataset tar shards plus one ``manifest.json``:

    {
      "format": "freqdiff-shards/1",
      "count": 20000,                       # samples in all shards
      "resolutions": [32],                  # every sample stores one image per resolution
      "channels": 3,                        # 1 (grey) or 3 (RGB)
      "encoding": "png",                    # or "raw" (encodings.py); absent in older sets: "png"
      "labels": null,                       # or the class names; samples then hold "cls" = index
      "filter": "...",                      # how images were resized / rendered
      "source": "...",                      # where they came from
      "shards": [{"name": "shard-000000.tar", "count": 2000, "bytes": 5140480, "sha256": "..."}],
      "skipped": {"count": 0, "items": [],  # inputs left out ("relpath: reason") and,
                  "reasons": {}},           # optionally, their count per reason
      "params": {...}                       # optional: generator / converter parameters
    }

A sample is a group of tar members sharing the key ``"%08d" % index`` (its position in the whole
set): ``<key>.<res>.png`` for every resolution (lossless PNG, so a round trip is exact; with
``"encoding": "raw"`` ``<key>.<res>.u8``, the array's bytes) and ``<key>.cls`` (the label index as
ASCII) when the set has labels; readers ignore other members (``write_shards.py`` adds
``<key>.src.txt``, the source file).

Writes are atomic (temporary name, then ``os.replace``) and deterministic: the same samples give
byte-identical shards (fixed mtime, owner and mode; PNG has no time stamp), so two processes that
write the same data concurrently leave identical files, and the sha256 in the manifest is a stable
identity for the data (e.g. for cached FID reference statistics). A temporary file
(``.shard-NNNNNN.tar.<random>.tmp``, ``.manifest.json.<random>.tmp``) is locked (``flock``) while its
writer lives; a killed writer leaves it unlocked, and the next ``ShardWriter`` in that folder removes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from datamodules.encodings import ENCODINGS, check, encode, member
from datamodules.encodings import decode_png as decode_png  # re-exported (they lived here)
from datamodules.encodings import encode_png as encode_png
from freqdiff.config import ConfigError

FORMAT = "freqdiff-shards/1"
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
_MTIME = 0  # fixed tar member mtime: byte-identical shards for identical input
_REQUIRED = ("format", "count", "resolutions", "channels", "labels", "shards")
_TEMP_TAIL = r"\.[a-z0-9_]+\.tmp"  # what tempfile.mkstemp adds after the prefix ".<name>."


class ShardSetError(ConfigError):
    """A shard set, or the folder meant for one, that cannot be used as it is; the message says what to do."""


def is_pattern(path: str) -> bool:
    """Whether ``path`` is a brace / glob pattern of tar files rather than a folder or a manifest."""
    return any(c in path for c in "*?[{")


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json`` atomically (temporary file + ``os.replace``); returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check_manifest(manifest, folder / MANIFEST)
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    return _atomic_write(folder / MANIFEST, text.encode("utf-8"))


def read_manifest(path_or_folder: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a manifest, given its file or its folder.

    Raises FileNotFoundError (naming the path) when it is missing, ValueError when it is malformed.
    """
    path = Path(path_or_folder)
    if path.is_dir() or path.suffix != ".json":
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed shard manifest {path}: {e}") from e
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(m: Any, path: Path) -> None:
    where = f"shard manifest {path}"
    if not isinstance(m, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(m).__name__}")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    if m["format"] != FORMAT:
        raise ValueError(f"{where}: format {m['format']!r}, expected {FORMAT!r}")
    res = m["resolutions"]
    if not (isinstance(res, list) and res and all(isinstance(r, int) and r > 0 for r in res)):
        raise ValueError(f"{where}: resolutions must be a non-empty list of positive ints, got {res!r}")
    if m["channels"] not in (1, 3):
        raise ValueError(f"{where}: channels must be 1 or 3, got {m['channels']!r}")
    if m.get("encoding", "png") not in ENCODINGS:
        raise ValueError(f"{where}: encoding {m['encoding']!r}, expected one of {list(ENCODINGS)}")
    if m["labels"] is not None and not isinstance(m["labels"], list):
        raise ValueError(f"{where}: labels must be null or a list of class names, got {m['labels']!r}")
    shards = m["shards"]
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and "name" in s and "count" in s for s in shards
    ):
        raise ValueError(f"{where}: shards must be a list of {{name, count, bytes, sha256}} objects")
    total = sum(s["count"] for s in shards)
    if total != m["count"]:
        raise ValueError(f"{where}: count {m['count']} but the shards hold {total} samples")


def check_shards(folder: str | os.PathLike, manifest: dict[str, Any], sha256: bool = False) -> None:
    """Check that every shard of ``manifest`` exists in ``folder`` with its recorded size (and hash).

    Cheap without ``sha256``; raises FileNotFoundError (a missing shard) or ShardSetError (a size or
    hash that differs, see :func:`size_mismatch`) naming the shard.
    """
    for s in manifest["shards"]:
        p = Path(folder) / s["name"]
        if not p.is_file():
            raise FileNotFoundError(f"shard {p} listed in {Path(folder) / MANIFEST} is missing")
        if "bytes" in s and p.stat().st_size != s["bytes"]:
            raise size_mismatch(p, p.stat().st_size, manifest, Path(folder))
        if sha256 and "sha256" in s and file_sha256(p) != s["sha256"]:
            fix = _remedy(manifest, folder)
            raise ShardSetError(f"shard {p}: sha256 differs from the manifest (corrupt or rewritten); {fix}")


def size_mismatch(shard: Path, size: int, manifest: dict[str, Any], folder: Path) -> ShardSetError:
    """The error for a shard whose size differs from its manifest's ``bytes``: names both and the remedy."""
    return ShardSetError(
        f"shard {shard} is {size} bytes but {Path(folder) / MANIFEST} records "
        f"{manifest_bytes(manifest, shard.name)} (truncated or overwritten since it was written); "
        f"{_remedy(manifest, folder)}"
    )


def manifest_bytes(manifest: dict[str, Any], name: str) -> int | None:
    return next((s.get("bytes") for s in manifest["shards"] if s["name"] == name), None)


def _remedy(manifest: dict[str, Any], folder: str | os.PathLike) -> str:
    params = manifest.get("params") or {}
    if params.get("generator") == "dead-leaves":
        return f"delete {folder} (a generated dead-leaves split) and it is written again on the next run"
    res = ",".join(map(str, manifest.get("resolutions") or [])) or "<res>"
    labels = " LABELS=folders" if params.get("labels") == "folders" else ""
    src = manifest.get("source") or "<image folder>"
    make = f"make shards SRC={src} OUT={folder} RES={res}{labels} FORCE=1"
    return f"restore it from a copy, or write the set again: {make}"


def shard_urls(folder: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    """Absolute paths of the manifest's shards, in manifest order."""
    return [str(Path(folder).resolve() / s["name"]) for s in manifest["shards"]]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sample_dict(
    index: int, images: dict[int, np.ndarray], label: int | None = None, encoding: str = "png"
) -> dict[str, Any]:
    """A tar sample: key ``"%08d" % index``, one ``"{res}.png"`` per image, optional ``"cls"``.

    ``images`` maps resolution -> uint8 ``[res, res, C]``; the key must match the image size. With
    ``encoding="raw"`` the members are ``"{res}.u8"`` (``encodings.py``).
    """
    sample: dict[str, Any] = {"__key__": f"{index:08d}"}
    for res, img in images.items():
        if img.shape[0] != res or img.shape[1] != res:
            raise ValueError(f"sample {index}: image for resolution {res} has shape {img.shape}")
        sample[member(res, encoding)] = encode(img, encoding)
    if label is not None:
        sample["cls"] = str(int(label)).encode("ascii")
    return sample


class ShardWriter:
    """Streams samples into ``folder/shard-NNNNNN.tar``, at most ``shard_size`` samples per shard.

    Each shard is written under a temporary name (locked while it is written) and renamed when
    complete; temporary files that killed writers left in the folder are removed when it starts.
    ``close()`` returns the manifest's shard list (name, count, bytes, sha256). Use as a context manager::

        with ShardWriter(folder, shard_size=2000) as w:
            for i, img in enumerate(images):
                w.write(sample_dict(i, {32: img}))
        manifest = {..., "count": w.count, "shards": w.shards}
    """

    def __init__(self, folder: str | os.PathLike, shard_size: int = 2000, pattern: str = SHARD_PATTERN):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size  # samples per shard
        self.pattern = pattern  # shard file name, formatted with the shard index
        self.shards: list[dict[str, Any]] = []
        self.count = 0  # samples written in all shards
        self.removed = remove_stale_temp(self.folder, pattern)  # left by killed writers
        self._tar: wds.TarWriter | None = None
        self._tmp: Path | None = None
        self._lock: int | None = None  # descriptor holding the temporary file's lock
        self._in_shard = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._in_shard += 1
        self.count += 1
        if self._in_shard >= self.shard_size:
            self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # failed: drop the partial shard
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            os.close(self._lock)
            self._tar, self._lock = None, None

    def _open(self) -> None:
        name = self.pattern.format(len(self.shards))
        self._lock, self._tmp = _locked_temp(self.folder, name)
        self._tar = wds.TarWriter(str(self._tmp), mtime=_MTIME, user="freqdiff", group="freqdiff")
        self._in_shard = 0

    def _finish(self) -> None:
        self._tar.close()
        name = self.pattern.format(len(self.shards))
        final = self.folder / name
        os.chmod(self._tmp, 0o644)  # mkstemp makes 0600; shards are data others may read
        os.replace(self._tmp, final)
        os.close(self._lock)  # after the rename: a cleaner never sees an unlocked live file
        self.shards.append(
            {
                "name": name,
                "count": self._in_shard,
                "bytes": final.stat().st_size,
                "sha256": file_sha256(final),
            }
        )
        self._tar, self._tmp, self._lock = None, None, None


def is_writer_temp(name: str, pattern: str = SHARD_PATTERN) -> bool:
    """Whether a file name is a temporary file of ``ShardWriter`` (``pattern``) or ``write_manifest``."""
    head, _, rest = pattern.partition("{")
    tail = rest.partition("}")[2]
    shard = rf"\.{re.escape(head)}\d+{re.escape(tail)}{_TEMP_TAIL}"
    return re.fullmatch(f"{shard}|\\.{re.escape(MANIFEST)}{_TEMP_TAIL}", name) is not None


def remove_stale_temp(folder: str | os.PathLike, pattern: str = SHARD_PATTERN) -> list[Path]:
    """Remove the writers' temporary files in ``folder`` that no live writer holds; returns them.

    Only names of :func:`is_writer_temp` are touched; a file still locked by its writer (another
    process writing into the same folder) is left alone.
    """
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if not is_writer_temp(p.name, pattern) or p.is_symlink() or not p.is_file():
            continue
        try:
            fd = os.open(p, os.O_RDWR)
        except OSError:  # renamed or removed meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: its writer is alive
            pass
        else:
            p.unlink(missing_ok=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


def _locked_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new ``folder/.<name>.<random>.tmp`` and a descriptor holding its lock (close it to release)."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, Path(tmp)
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by a cleaner before the lock was taken: take another name


def make_manifest(
    *,
    count: int,
    resolutions: list[int],
    channels: int,
    shards: list[dict[str, Any]],
    labels: list[str] | None = None,
    encoding: str = "png",
    filter: str = "",
    source: str = "",
    skipped: list[str] | None = None,
    reasons: dict[str, int] | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A manifest dict in the canonical key order (see the module docstring)."""
    m: dict[str, Any] = {
        "format": FORMAT,
        "count": int(count),
        "resolutions": sorted(int(r) for r in resolutions),
        "channels": int(channels),
        "encoding": check(encoding),
        "labels": labels,
        "filter": filter,
        "source": source,
        "shards": shards,
        "skipped": {"count": len(skipped or []), "items": list(skipped or [])},
    }
    if reasons is not None:  # skipped inputs per reason, e.g. {"truncated": 2, "too small": 5}
        m["skipped"]["reasons"] = reasons
    if params is not None:
        m["params"] = params
    return m


def _atomic_write(path: Path, data: bytes) -> Path:
    fd, tmp = _locked_temp(path.parent, path.name)
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return path
