"""The reference of a standalone evaluation (``experiments.evaluate``): the run's data, another shard
folder or published Inception statistics, and the samples-vs-real panel written beside the record.
The reference itself (random subset, floors, cache) is ``callbacks.reference.load_reference``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from callbacks.reference import Reference, load_reference, split_manifest
from freqdiff.analysis.images import make_grid, save_png, side_by_side
from freqdiff.config import instantiate
from freqdiff.metrics.evaluator import SetStats
from freqdiff.metrics.fid import FeatureStats, StatsCache


def build_reference(
    cfg, ref: str | None, o: dict[str, Any], extractor, swd_opts, keep: bool, batch_size: int, progress: bool
) -> tuple[Reference, int | None]:
    """(Reference, its image side or None) for the settings ``o`` (evaluate_run)."""
    if ref is not None and str(ref).endswith(".npz"):
        if extractor is None:
            raise ValueError(
                f"reference {ref} holds Inception statistics: FID needs weights (fid=true / --weights)"
            )
        with np.load(ref) as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"reference {ref}: expected arrays 'mu' and 'sigma', found {list(z.keys())}")
            mu, sigma = torch.from_numpy(z["mu"]), torch.from_numpy(z["sigma"])
            count = int(z["n"]) if "n" in z else 50000
        stats = SetStats(extractor, spectra=False)
        stats.fid = FeatureStats.from_moments(mu, sigma, count)
        stats.n = count
        info = {"ref_path": str(ref), "ref_split": None, "ref_n": count, "ref_cache": "npz"}
        return Reference(stats, info), None
    if ref is None:
        dm = instantiate(cfg.data, "data", num_workers=min(int(cfg.data.get("num_workers", 0)), 4))
    else:
        from datamodules.webdataset import ShardDataModule

        dm = ShardDataModule(
            path=str(ref), resolution=cfg.data.get("resolution"), batch_size=batch_size, num_workers=2
        )
    dm.prepare_data()
    dm.setup()
    count = split_manifest(dm, o["ref_split"])["count"]
    reference = load_reference(
        dm,
        o["ref_split"],
        min(o["ref_n"] or o["n"], count),
        extractor,
        True,
        int(o["swd_n"]),
        keep,
        StatsCache(o["cache_dir"]),
        seed=int(o["ref_seed"]),
        floor=(dict(swd_opts) if swd_opts else {}) if o["floor"] else None,
        bootstrap=int(o["bootstrap"]),
        batch_size=batch_size,
        progress=progress,
    )
    return reference, int(dm.resolution)


def write_panel(gen: SetStats, reference, k: int, path: Path, step: int) -> None:
    """The first ``k`` evaluated samples beside as many reference images (both kept for SWD)."""
    a, b = gen.swd_images(), reference.stats.swd_images() if reference.stats is not None else None
    if a is None or b is None:
        print("eval: no panel (it shows the SWD images: needs swd_n > 0)")
        return
    k = min(k, a.shape[0], b.shape[0])
    up = max(1, 64 // a.shape[-1])
    f = lambda u8: make_grid(u8[:k].float() / 127.5 - 1, upscale=up)  # noqa: E731
    split = reference.info.get("ref_split", "reference")
    save_png(side_by_side({f"samples (EMA, step {step})": f(a), f"real ({split}, random)": f(b)}), path)
    print(f"wrote {path}")
