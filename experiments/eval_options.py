"""The settings of a standalone evaluation (``make eval``), and the name of the record they produce.

A run evaluated with no arguments is evaluated exactly as its own ``Evaluate`` callback did during
training (``callbacks.fid.Evaluate`` in the run's saved config): the same n, reference split, subset
seed, sampler settings, SWD pyramid and patches, bootstrap and floor, so the command reproduces the
run's ``final_metrics.json``. Every argument given on the command line overrides one setting; a run
without an ``Evaluate`` callback falls back to ``DEFAULTS``.

The record's file name holds everything that changes the numbers: the sample tag (checkpoint step,
sampler, seed, precision), n, the reference (its split and size) and a digest of the rest
(reference path, subset seed, metric settings), so evaluations against two references, or with two
SWD settings, never overwrite each other.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

# where a run has no Evaluate callback (the FID convention: 50k samples against the training split)
DEFAULTS: dict[str, Any] = {
    "n": 50000,
    "ref_split": "train",
    "ref_n": None,  # None: n, capped at the split size
    "ref_seed": 0,
    "seed": 0,
    "steps": None,  # None: the module's sample_steps
    "eta": None,
    "batch_size": 64,
    "fid": "auto",
    "weights": None,
    "swd_n": 2048,
    "swd_min_res": 16,
    "swd_patches": 128,
    "kid": False,
    "prc": False,
    "bootstrap": 10,
    "floor": True,
    "cache_dir": None,
    "panel": 64,  # samples in the PNG written beside the record (0: none)
}
_FROM_CALLBACK = {  # Evaluate's argument -> the setting here
    "n": "n",
    "split": "ref_split",
    "ref_n": "ref_n",
    "ref_seed": "ref_seed",
    "seed": "seed",
    "steps": "steps",
    "eta": "eta",
    "batch_size": "batch_size",
    "fid": "fid",
    "weights": "weights",
    "swd_n": "swd_n",
    "swd_min_res": "swd_min_res",
    "swd_patches": "swd_patches",
    "kid": "kid",
    "prc": "prc",
    "bootstrap": "bootstrap",
    "floor": "floor",
    "cache_dir": "cache_dir",
    "panel": "panel",
}
EVALUATE_TARGETS = ("callbacks.fid.Evaluate", "callbacks.fid.FIDCallback")


def run_evaluate_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings of the run's own ``Evaluate`` callback ({} if it has none), as ``DEFAULTS`` keys."""
    callbacks = cfg.get("callbacks") or {}
    for node in callbacks.values():
        if isinstance(node, DictConfig) and node.get("_target_") in EVALUATE_TARGETS:
            given = OmegaConf.to_container(node, resolve=True)
            out = {_FROM_CALLBACK[k]: v for k, v in given.items() if k in _FROM_CALLBACK}
            if given.get("swd") is False:
                out["swd_n"] = 0
            return out
    return {}


def resolve_options(cfg: DictConfig, given: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(settings, where they came from): each one given, else the run's Evaluate, else DEFAULTS."""
    own = run_evaluate_settings(cfg)
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown evaluation settings {sorted(unknown)}; expected some of {sorted(DEFAULTS)}"
        )
    out = {**DEFAULTS, **own, **{k: v for k, v in given.items() if v is not None}}
    if out["fid"] not in (True, False, "auto"):
        raise ValueError(f"fid={out['fid']!r}: expected 'auto', true or false")
    if out["ref_split"] not in ("train", "val"):
        raise ValueError(f"ref_split={out['ref_split']!r}: expected 'train' or 'val'")
    for k in ("n", "batch_size"):
        if not isinstance(out[k], int) or out[k] < 1:
            raise ValueError(f"{k}={out[k]!r}: expected a positive integer")
    where = "the run's Evaluate callback" if own else "the defaults (the run has no Evaluate callback)"
    return out, where


def record_name(tag: str, o: dict[str, Any], ref: str | None, fid: bool) -> str:
    """``<tag>-n<n>-<split><ref_n>-<digest>``: the record's file stem (module docstring)."""
    what = {
        "ref": ref,
        "ref_split": o["ref_split"],
        "ref_n": o["ref_n"],
        "ref_seed": o["ref_seed"],
        "fid": bool(fid),  # with the weights file named (its identity is in the record)
        "weights": o["weights"] if fid else None,
        "swd": [o["swd_n"], o["swd_min_res"], o["swd_patches"]],
        "kid": bool(o["kid"]),
        "prc": bool(o["prc"]),
        "bootstrap": o["bootstrap"],
        "floor": bool(o["floor"]),
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
    where = "npz" if ref is not None and str(ref).endswith(".npz") else o["ref_split"]
    return f"{tag}-n{o['n']}-{where}{o['ref_n'] or o['n']}-{digest}"
