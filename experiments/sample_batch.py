"""The sampling batch size of ``make sample`` when ``--batch-size`` is not given.

On a CUDA device it is chosen from free memory: two probe calls of ``module.sample`` (``probe`` and
``2 probe`` seeds, two sampler steps, the sampling precision) measure the peak memory one more sample
costs; the batch is the largest multiple of 8 whose peak fits in ``fraction`` of the memory free after
the probes, at most ``cap`` (the chunk size: a larger batch would only be cut by the chunk). The
probes' seeds are thrown away: samples depend on their own seed only, not on the batch size. On the
CPU the batch is ``CPU_BATCH`` (memory is rarely the limit there, and larger batches were not faster).
"""

from __future__ import annotations

import torch

CPU_BATCH = 64


def batch_from_memory(
    free_bytes: float,  # device memory free for sampling
    per_sample_bytes: float,  # peak memory one more sample in the batch costs
    fixed_bytes: float = 0.0,  # peak memory of a call that does not grow with the batch
    fraction: float = 0.8,  # of the free memory the batch may use
    cap: int = 1024,  # largest batch returned
    multiple: int = 8,  # the batch is rounded down to a multiple of this (when above it)
) -> int:
    """The largest batch ``b`` with ``fixed + b * per_sample <= fraction * free``, in [1, cap]."""
    if free_bytes <= 0 or per_sample_bytes < 0 or not 0 < fraction <= 1 or cap < 1:
        raise ValueError(
            f"free_bytes={free_bytes}, per_sample_bytes={per_sample_bytes}, fraction={fraction}, "
            f"cap={cap}: expected free > 0, per-sample >= 0, fraction in (0, 1], cap >= 1"
        )
    if per_sample_bytes == 0:
        return cap
    b = int((fraction * free_bytes - fixed_bytes) // per_sample_bytes)
    if b > multiple:
        b -= b % multiple
    return max(1, min(cap, b))


@torch.no_grad()
def _peak_bytes(module, seeds: list[int], s: dict, device: torch.device) -> int:
    from experiments.evaluate import autocast_for

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with autocast_for(s["precision"], device):
        module.sample(seeds, steps=2, eta=s["eta"], use_ema=True)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def auto_batch_size(module, s: dict, device: torch.device, cap: int = 1024, probe: int = 8) -> int:
    """``CPU_BATCH`` on the CPU, else the batch that fits the free memory of ``device`` (module docstring)."""
    if device.type != "cuda":
        return min(CPU_BATCH, cap)
    small = _peak_bytes(module, list(range(probe)), s, device)
    large = _peak_bytes(module, list(range(2 * probe)), s, device)
    per_sample = max(large - small, 0) / probe
    fixed = max(small - probe * per_sample, 0)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return batch_from_memory(free, per_sample, fixed, cap=cap)
