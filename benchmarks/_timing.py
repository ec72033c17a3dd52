"""Interleaved timing shared by the benchmarks: median seconds per call of several cases.

The cases alternate order on every repeat, so slow drifts of the machine hit them alike and their
ratio holds; each sample repeats a fast call until it lasts ``min_s``; CUDA is synchronised around
every sample.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(
    cases: dict[str, Callable[[], object]],  # name -> one call of the case
    device: torch.device,  # synchronised around every sample when CUDA
    repeats: int = 7,  # interleaved samples per case, fewer (down to 2) where they would pass budget_s
    min_s: float = 0.05,  # a sample repeats its call until it lasts about this long
    budget_s: float = 6.0,  # about the longest the samples of all cases may take together
) -> dict[str, float]:
    """Median seconds per call of each case, the cases interleaved (order alternating per repeat)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def sample(fn: Callable[[], object], k: int = 1) -> float:  # seconds per call over k calls
        sync()
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        sync()
        return (time.perf_counter() - t0) / k

    calls, first = {}, {}
    for name, fn in cases.items():  # warm-up; a fast case runs again to size its samples
        first[name] = sample(fn)
        if first[name] < min_s:
            first[name] = sample(fn)
        calls[name] = max(1, round(min_s / max(first[name], 1e-6)))
    per_round = sum(max(min_s, sample_s) for sample_s in first.values())
    repeats = max(2, min(repeats, int(budget_s / per_round)))
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(sample(cases[name], calls[name]))
    return {name: statistics.median(v) for name, v in samples.items()}
