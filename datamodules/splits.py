"""Held-out splits at write time for ``make shards VAL=... VAL_SEED=...`` (docs/architecture.md, "Data").

With a val option, ``write_shards`` routes every listed input to one of two shard sets,
``OUT/train`` and ``OUT/val`` (the layout ``datamodules.sources.find_splits`` reads). The held-out
inputs are the first ``n_val`` of ``numpy.random.default_rng(val_seed).permutation(n)`` over the
sorted input list: uniform at random, deterministic, disjoint. Order inside a split stays the input
order. ``VAL`` is a count (an int >= 1, less than the number of inputs) or a fraction in (0, 1) of
the inputs listed (rounded to the nearest count).

This module also keeps the two layouts apart: a split write into an ``OUT`` that holds an unsplit set
(or the reverse) is refused unless ``force``; then the old layout's ``manifest.json`` and
``shard-NNNNNN.tar`` files are removed, nothing else.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.manifest import MANIFEST

SPLITS = ("train", "val")
_SHARD = re.compile(r"^shard-\d{6}\.tar$")  # what manifest.SHARD_PATTERN writes
_EXPECTED = "a count (an int >= 1) or a fraction in (0, 1)"


def check_val(val: Any) -> int | float:
    """``val`` as a count (int) or a fraction (float); ValueError naming the value otherwise."""
    if isinstance(val, str):
        text = val.strip()
        try:
            val = int(text)
        except ValueError:
            try:
                val = float(text)
            except ValueError:
                raise ValueError(f"VAL must be {_EXPECTED}, got {text!r}") from None
    if isinstance(val, (bool, np.bool_)) or not isinstance(val, (int, float, np.integer, np.floating)):
        raise ValueError(f"VAL must be {_EXPECTED}, got {val!r}")
    if isinstance(val, (int, np.integer)):
        if val < 1:
            raise ValueError(f"VAL must be {_EXPECTED}, got {int(val)} (a count must be >= 1)")
        return int(val)
    if not 0 < val < 1:  # also NaN
        raise ValueError(f"VAL must be {_EXPECTED}, got {float(val)} (a fraction must be in (0, 1))")
    return float(val)


def check_val_seed(seed: Any) -> int:
    if isinstance(seed, str):
        try:
            seed = int(seed.strip())
        except ValueError:
            raise ValueError(f"VAL_SEED must be a non-negative int, got {seed!r}") from None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"VAL_SEED must be a non-negative int, got {seed!r}")
    return int(seed)


def arg(check):
    """An argparse ``type`` from a check function (its message becomes the usage error)."""

    def parse(text: str):
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = check.__name__.removeprefix("check_")
    return parse


def held_out(n: int, val: int | float, val_seed: int) -> np.ndarray:
    """Boolean mask over the ``n`` sorted inputs: True for the held-out (val) ones."""
    n_val = val if isinstance(val, int) else int(round(val * n))
    if isinstance(val, int) and n_val >= n:
        raise ValueError(
            f"VAL={val} must be less than the {n} inputs listed in SRC (the train split would be empty)"
        )
    if not 0 < n_val < n:
        raise ValueError(
            f"VAL={val} of the {n} inputs listed in SRC holds out {n_val} (expected 1 to {n - 1}); "
            "give a count or a larger / smaller fraction"
        )
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(val_seed).permutation(n)[:n_val]] = True
    return mask


def split_params(name: str, val: int | float, val_seed: int, assigned: int) -> dict[str, Any]:
    """What a split's manifest records in ``params`` (part of the shard set's identity)."""
    return {"split": name, "val": val, "val_seed": val_seed, "assigned": int(assigned)}


def _describe(folder: Path) -> str:
    return f"{folder / MANIFEST} ({len([p for p in folder.iterdir() if _SHARD.match(p.name)])} shards)"


def check_layout(out: Path, split: bool, force: bool) -> list[Path]:
    """Folders of ``out`` holding the other layout's shard set (to clear with ``force``); refuses without.

    Also refuses a split write into a non-empty ``out`` that holds neither layout (as for unsplit).
    """
    if not out.is_dir():
        return []
    subs = [out / s for s in SPLITS if (out / s / MANIFEST).is_file()]
    if split:
        other = [out] if (out / MANIFEST).exists() else []
        if other and not force:
            raise FileExistsError(
                f"OUT {out} holds an unsplit shard set ({_describe(out)}), not train/ and val/ as "
                "VAL=... writes; choose another OUT or FORCE=1 (--force) to replace it"
            )
        extra = [p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in SPLITS]
        if extra and not other and not subs and not force:  # as for unsplit: a set may have company
            raise FileExistsError(
                f"OUT {out} is not empty and holds no shard set (e.g. {sorted(extra)[:3]}); "
                "choose an empty folder or FORCE=1 (--force)"
            )
        if force and any(_SHARD.match(p.name) for p in out.iterdir()):  # also shards a crash left
            return [out]
        return other
    if subs and not (out / MANIFEST).exists():
        if not force:
            raise FileExistsError(
                f"OUT {out} holds a split shard set ({', '.join(map(_describe, subs))}, written with "
                "VAL=...); without VAL the set goes directly into OUT: choose another OUT, give the same "
                "VAL and VAL_SEED, or FORCE=1 (--force) to replace it"
            )
        return subs
    return []


def clear_set(folder: Path, top: Path) -> None:
    """Remove the tool's files in ``folder`` (manifest, then shard-NNNNNN.tar), and ``folder`` if emptied."""
    (folder / MANIFEST).unlink(missing_ok=True)  # never a manifest over missing shards
    for p in folder.iterdir():
        if _SHARD.match(p.name) and p.is_file():
            p.unlink()
    if folder != top and not any(folder.iterdir()):
        folder.rmdir()


def check_args(val: Any, val_seed: Any) -> tuple[int | float | None, int]:
    """``(val, val_seed)`` checked (``val`` None: no split; then ``val_seed`` must stay 0)."""
    val_seed = check_val_seed(val_seed)
    if val is None and val_seed != 0:
        raise ValueError(f"VAL_SEED={val_seed} given without VAL (the count or fraction to hold out)")
    return (None if val is None else check_val(val)), val_seed


def plan(n: int, val: Any, val_seed: int, params: dict[str, Any]) -> tuple[list, dict[Any, dict]]:
    """(set name per input, params per set): ``{None: params}`` without ``val``, else train and val."""
    if val is None:  # one set directly in OUT: exactly as without splits
        return [None] * n, {None: params}
    route = ["val" if h else "train" for h in held_out(n, val, val_seed)]
    return route, {s: {**params, **split_params(s, val, val_seed, route.count(s))} for s in SPLITS}


def summary(sets: dict[str | None, dict[str, Any]], out: Path) -> None:
    """Print what was written: per set counts, MiB, folder; for a split also what was assigned."""
    total = sum(m["params"]["assigned"] for n, m in sets.items() if n is not None)
    for name, m in sets.items():
        head, folder = ("", out) if name is None else (f"{name}: ", out / name)
        size = sum(s["bytes"] for s in m["shards"]) / 2**20
        print(
            f"{head}wrote {m['count']} samples at {m['resolutions']} into {len(m['shards'])} shards "
            f"({size:.1f} MiB) in {folder}"
        )
        if name is not None:
            p = m["params"]
            short = p["assigned"] - m["count"]
            note = f"; {short} skipped, so {name} is {short} short" if short else ""
            how = f"VAL={p['val']}, VAL_SEED={p['val_seed']}"
            print(f"{head}{p['assigned']} of {total} inputs listed were assigned to it ({how}){note}")
        if m["skipped"]["count"]:
            reasons, where = m["skipped"]["reasons"], folder / MANIFEST
            print(f"{head}skipped {m['skipped']['count']} inputs: {reasons} (listed in {where})")
    labels = next(iter(sets.values()))["labels"]
    if labels:
        names = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
        print(f"labels: {len(labels)} classes ({names})")
