"""Image folder -> WebDataset shards with a manifest (docs/architecture.md, "Data"): ``make shards``.

    make shards SRC=/data/celeba_hq OUT=data/celebahq RES=64,256 [LABELS=folders] [FILTER=lanczos]
                [VAL=1000|0.05] [VAL_SEED=0] [ENCODING=raw|png]
    python -m datamodules.write_shards /data/celeba_hq data/celebahq --res 64,256

Per input image (``prepare.py``): decode, EXIF orientation, 8-bit RGB, centre square, one resize
filter (Lanczos by default) to every resolution, all into the same sample (Relay's 64/256 pair and
Scale Space's levels share their source). Images whose square side is smaller than the largest
resolution are rejected unless ``--allow-upscale``.

A sample (see ``manifest.py``): ``<key>.<res>.u8`` for each resolution (the uint8 array's bytes; with
``--encoding png`` ``<key>.<res>.png``, both lossless; why raw is the default: ``write_shards``),
``<key>.cls`` (class index) with ``--labels folders``, ``<key>.src.txt`` (path relative to SRC). Keys
are the positions ``%08d`` in the sorted list of inputs that were kept, so they are stable.

Deterministic: inputs are walked in sorted order, results are written in input order whatever the
number of workers, tar members have fixed metadata and PNG has no time stamp: the same input gives
byte-identical shards. Unreadable, truncated or non-image files are skipped and listed in the
manifest with the reason. A folder that already holds another shard set is not overwritten
unless ``--force`` (an update of the same dataset, same source and options, is allowed).

Held-out split (``--val``, see ``splits.py``): a seeded uniform choice of the listed inputs goes to
``OUT/val``, the rest to ``OUT/train``, each a complete shard set with its own manifest; keys count
within each split. Inputs skipped by ``LABELS=folders`` are listed in the train manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from datamodules import encodings, splits
from datamodules.encodings import ENCODINGS
from datamodules.manifest import MANIFEST, ShardWriter, make_manifest, read_manifest, write_manifest
from datamodules.prepare import FILTERS, Prepare
from datamodules.prepare import centre_square as centre_square  # re-exported: they lived here
from datamodules.prepare import load_rgb as load_rgb
from datamodules.prepare import to_rgb8 as to_rgb8

TOOL, VERSION = "write_shards", 1  # bump VERSION when the image processing (prepare.py) changes
LABEL_MODES = ("none", "folders")
ENCODING = "raw"  # the default image encoding of make shards (the reasons: write_shards's docstring)


# -------------------------------------------------------------------- the folder
def list_inputs(
    src: Path, labels: str, exclude: Path | None = None
) -> tuple[list[tuple[str, str, int | None]], list[str] | None, list[str]]:
    """Files under ``src`` in sorted order -> (tasks (path, relpath, label), class names, skipped items).

    Hidden files and folders (``.name``) are ignored; with ``labels="folders"`` the class is the first
    sub-folder of ``src`` (sorted names -> 0, 1, ...) and files directly in ``src`` are skipped.
    """
    if not src.exists():
        raise FileNotFoundError(f"SRC {src} does not exist")
    if not src.is_dir():
        raise NotADirectoryError(f"SRC {src} is not a folder of images")
    files: list[str] = []
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(root, d).resolve() != exclude)
        files += [Path(root, n).relative_to(src).as_posix() for n in names if not n.startswith(".")]
    files.sort()
    if not files:
        raise ValueError(f"SRC {src} holds no files (expected images, optionally in class sub-folders)")
    skipped: list[str] = []
    if labels == "none":
        return [(str(src / f), f, None) for f in files], None, skipped
    classes = sorted({f.split("/")[0] for f in files if "/" in f})
    if not classes:
        raise ValueError(f"LABELS=folders but SRC {src} has no sub-folders (one per class expected)")
    index = {c: i for i, c in enumerate(classes)}
    tasks = []
    for f in files:
        if "/" in f:
            tasks.append((str(src / f), f, index[f.split("/")[0]]))
        else:
            skipped.append(f"{f}: not inside a class folder (LABELS=folders)")
    return tasks, classes, skipped


def _reason_kind(item: str) -> str:
    return item.split(": ", 1)[1].split(" (")[0]


def _identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes two shard sets the same dataset (shard size and image encoding do not)."""
    params = {
        f"params.{k}": v
        for k, v in (manifest.get("params") or {}).items()
        if k not in ("shard_size", "png_level")
    }
    keys = ("source", "resolutions", "filter", "channels")
    return {**{k: manifest.get(k) for k in keys}, **params}


def _check_out(out: Path, want: dict[str, Any], force: bool) -> None:
    """Refuse to overwrite another dataset (or a folder of other files) unless ``force``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"OUT {out} exists and is not a folder")
    if force:
        return
    if (out / MANIFEST).exists():
        try:
            old = read_manifest(out)
        except ValueError as e:
            raise FileExistsError(
                f"OUT {out} holds an unreadable manifest ({e}); FORCE=1 to overwrite"
            ) from e
        have = _identity(old)
        diff = sorted(k for k in want if have.get(k) != want[k])
        if diff:
            details = ", ".join(f"{k}: {have.get(k)!r} -> {want[k]!r}" for k in diff)
            raise FileExistsError(
                f"OUT {out} already holds a different shard set ({details}); "
                "choose another OUT or FORCE=1 (--force) to replace it"
            )
        return
    others = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    if others:
        raise FileExistsError(
            f"OUT {out} is not empty and holds no {MANIFEST} (e.g. {sorted(others)[:3]}); "
            "choose an empty folder or FORCE=1 (--force)"
        )


def write_shards(
    src: str | os.PathLike,  # folder of images (class sub-folders with labels="folders")
    out: str | os.PathLike,  # output folder: shard-NNNNNN.tar + manifest.json (with val: train/, val/)
    resolutions: list[int],  # square sides to store, all in every sample
    labels: str = "none",  # "folders": class index from the first sub-folder name
    filter: str = "lanczos",  # resize filter, one of FILTERS
    allow_upscale: bool = False,  # keep images smaller than the largest resolution (upsampled)
    workers: int | None = None,  # decode/encode processes (None: all cores, 1: in this process)
    shard_size: int = 1000,  # samples per shard
    encoding: str = ENCODING,  # "raw" (the arrays' bytes) or "png": see below
    png_level: int | None = None,  # PNG zlib level 0-9 (None: 6); with encoding="png" only
    force: bool = False,  # replace a different shard set in `out`
    progress: bool = True,  # tqdm progress bar
    val: int | float | None = None,  # held out into out/val: a count, or a fraction in (0, 1) of the inputs
    val_seed: int = 0,  # seed of the held-out choice
) -> dict[str, Any]:
    """Convert an image folder into shards; returns the manifest (also written to ``out``).

    With ``val``: writes ``out/train`` and ``out/val`` and returns ``{"train": manifest, "val": manifest}``.

    Encoding (recorded in the manifest, ``encodings.py``): ``"raw"`` by default, since the loader is
    clearly faster with it where PNG decoding bounds it, at 256²; ``"png"`` where disk space or read
    bandwidth is short. Measured on a shared 2-core machine (absolute times noisy, ratios hold),
    photo crops from ``demo_photos``, RGB: decoding one 256² image takes ~1.45 ms as PNG level 6
    (80 KB, ~135 MB/s of pixels), ~0.85 ms as PNG level 0 (197 KB), ~1 µs raw (197 KB, a view of the
    bytes); with the tar read and the float conversion every loader does, 2.1-2.5 / 1.2-1.6 /
    0.6-0.8 ms per image. The shard loader (``benchmarks/data_loader.py``, 2 workers) then delivers
    2.6-3.0x PNG 6's images per second at 256² (PNG 6: 1.0-1.4x the JPEG-folder baseline, raw
    3.0-4.2x) and 1.3-1.8x at 64². The cost is the size: 2.45x PNG 6's bytes at 256² (196,608 B per
    image) and 1.7x at 64² (12,288 B), so 70k images at 64+256 take ~14.6 GB instead of ~6 GB, and
    1,000 img/s read ~210 MB/s. PNG level 0 is as large and half as fast; zlib level 1 over the raw
    bytes (1.4x PNG 6's size, 1.6-1.8x faster) is not offered. Dead-leaves sets stay PNG (``synthetic.py``).
    """
    resolutions = sorted({int(r) for r in resolutions})
    if not resolutions or resolutions[0] < 1:
        raise ValueError(f"resolutions must be positive ints, got {resolutions}")
    if filter not in FILTERS:
        raise ValueError(f"unknown filter {filter!r}; choose one of {', '.join(FILTERS)}")
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    encodings.check(encoding)
    if png_level is not None and encoding != "png":
        raise ValueError(
            f"png_level={png_level} applies to encoding='png' only, got encoding={encoding!r} "
            "(pass encoding='png', --encoding png, with it)"
        )
    png_level = 6 if png_level is None else png_level
    if not 0 <= png_level <= 9:
        raise ValueError(f"png_level must be in 0..9, got {png_level}")
    val, val_seed = splits.check_args(val, val_seed)
    src, out = Path(src).resolve(), Path(out).resolve()
    params = {
        "tool": TOOL,
        "version": VERSION,
        "labels": labels,
        "allow_upscale": bool(allow_upscale),
        "shard_size": int(shard_size),
        **({"png_level": int(png_level)} if encoding == "png" else {}),
        "crop": "centre square",
        "exif_transpose": True,
        "alpha": "composited over white",
    }
    tasks, classes, listed_skipped = list_inputs(src, labels, exclude=out)
    route, set_params = splits.plan(len(tasks), val, val_seed, params)  # set name None: no split
    folders = {n: out if n is None else out / n for n in set_params}
    meta = {"source": str(src), "resolutions": resolutions, "filter": filter, "channels": 3}
    stale = splits.check_layout(out, val is not None, force)
    for n, folder in folders.items():
        _check_out(folder, _identity({**meta, "params": set_params[n]}), force)
    for folder in stale:  # FORCE=1 over the other layout
        splits.clear_set(folder, out)

    old = {}
    for n, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # a crash never leaves a manifest over other shards
        old[n] = {p.name for p in folder.glob("shard-*.tar")}
    skipped = {n: list(listed_skipped) if n != "val" else [] for n in folders}
    workers = max(1, (len(os.sched_getaffinity(0)) if workers is None else int(workers)))
    prepare = Prepare(resolutions, filter, allow_upscale, png_level, encoding)
    bar = tqdm(
        total=len(tasks), desc=f"shards {','.join(map(str, resolutions))}", unit="img", disable=not progress
    )
    pool = mp.get_context().Pool(workers) if workers > 1 and len(tasks) > 1 else None
    try:
        results = pool.imap(prepare, tasks, chunksize=8) if pool else map(prepare, tasks)
        with contextlib.ExitStack() as stack:
            writers = {
                n: stack.enter_context(ShardWriter(f, shard_size=shard_size)) for n, f in folders.items()
            }
            for (_, rel, _), n, (members, reason) in zip(tasks, route, results):  # input order: deterministic
                bar.update(1)
                if members is None:
                    skipped[n].append(f"{rel}: {reason}")
                    continue
                w = writers[n]
                w.write({"__key__": f"{w.count:08d}", **members})
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    manifests = {}
    for n, w in writers.items():
        if w.count == 0:
            where = f"SRC {src}" if n is None else f"the {n} split of SRC {src}"
            e = f"({len(skipped[n])} skipped, e.g. {skipped[n][:3]}); nothing written"
            raise ValueError(f"no usable images in {where} {e}")
        for name in old[n] - {s["name"] for s in w.shards}:  # stale shards of a larger earlier version
            (folders[n] / name).unlink()
        manifests[n] = make_manifest(
            count=w.count,
            resolutions=resolutions,
            channels=3,
            shards=w.shards,
            labels=classes,
            encoding=encoding,
            filter=filter,
            source=str(src),
            skipped=skipped[n],
            reasons=dict(sorted(Counter(_reason_kind(s) for s in skipped[n]).items())),
            params=set_params[n],
        )
    for n, m in manifests.items():  # only once every split is complete
        write_manifest(folders[n], m)
    return manifests[None] if val is None else manifests


# -------------------------------------------------------------------- command line
def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"RES must be comma-separated ints like 64,256, got {text!r}"
        ) from None
    if values and min(values) < 1:
        raise argparse.ArgumentTypeError(f"RES must be positive ints like 64,256, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m datamodules.write_shards",
        description="Convert a folder of images into WebDataset tar shards with a manifest (make shards).",
    )
    p.add_argument("src", nargs="?", default="", help="folder of images (SRC)")
    p.add_argument("out", nargs="?", default="", help="output folder (OUT)")
    p.add_argument("--res", type=_ints, default=None, help="resolutions, e.g. 64,256 (RES)")
    p.add_argument(
        "--labels", choices=LABEL_MODES, default="none", help="folders: class = sub-folder (LABELS)"
    )
    p.add_argument("--filter", choices=sorted(FILTERS), default="lanczos", help="resize filter (FILTER)")
    p.add_argument(
        "--allow-upscale", action="store_true", help="keep images smaller than RES (ALLOW_UPSCALE=1)"
    )
    p.add_argument("--workers", type=int, default=None, help="processes (WORKERS; default: all cores)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    enc_help = "raw (default): ~2.5x the bytes of png, ~3x faster to load at 256² (ENCODING)"
    p.add_argument("--encoding", choices=ENCODINGS, default=ENCODING, help=enc_help)
    p.add_argument("--png-level", type=int, default=None, help="PNG zlib level, with --encoding png (6)")
    val_help = "hold out a count (1000) or fraction (0.05) of the inputs: OUT/val, rest OUT/train (VAL)"
    p.add_argument("--val", type=splits.arg(splits.check_val), help=val_help)
    p.add_argument("--val-seed", type=splits.arg(splits.check_val_seed), help="seed of VAL (VAL_SEED, 0)")
    p.add_argument("--force", action="store_true", help="replace another shard set in OUT (FORCE=1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    missing = [n for n, v in (("SRC", a.src), ("OUT", a.out), ("RES", a.res)) if not v]
    if missing:
        p.error(f"{', '.join(missing)} required, e.g. make shards SRC=/data/images OUT=data/name RES=64,256")
    if a.val_seed is not None and a.val is None:
        p.error(f"VAL_SEED={a.val_seed} given without VAL (e.g. VAL=1000 or VAL=0.05)")
    try:
        m = write_shards(
            a.src,
            a.out,
            a.res,
            labels=a.labels,
            filter=a.filter,
            allow_upscale=a.allow_upscale,
            workers=a.workers,
            shard_size=a.shard_size,
            encoding=a.encoding,
            png_level=a.png_level,
            force=a.force,
            progress=not a.quiet,
            val=a.val,
            val_seed=a.val_seed or 0,
        )
    except (OSError, ValueError) as e:
        print(f"write_shards: error: {e}", file=sys.stderr)
        return 2
    splits.summary({None: m} if a.val is None else m, Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
