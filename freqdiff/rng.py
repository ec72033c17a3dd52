"""Derived seeds and generators: randomness that is a pure function of its coordinates.

Training draws its times and noise from generators seeded by ``derive_seed(seed, "train", rank,
global_step, micro_batch)``: every rank has its own stream (ranks never draw the same t and ε), and a
resumed run continues the same streams without saving any generator state, because the coordinates
(the global step is in the checkpoint) determine the seed. ``derive_seed(seed, "shared",
global_step, micro_batch)`` is the same on every rank: for batch-wide decisions (one resolution per
global batch). ``splitmix64`` (Steele, Lea & Flood 2014) mixes the coordinates; strings are folded
in by their UTF-8 bytes, so the result does not depend on Python's hash randomisation.
"""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One splitmix64 output for the 64-bit state x (a bijection of 64-bit integers)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _as_int(key: int | str) -> int:
    if isinstance(key, str):  # every byte counts: 8-byte little-endian words chained through splitmix64
        data = key.encode("utf-8")
        h = splitmix64(len(data))
        for i in range(0, len(data), 8):
            h = splitmix64(h ^ int.from_bytes(data[i : i + 8], "little"))
        return h
    if isinstance(key, bool) or not isinstance(key, int):
        key = int(key)
    return key & MASK64


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends on every key and their order (ints or strings)."""
    h = 0x243F6A8885A308D3  # π's fraction bits: a non-zero start
    for k in keys:
        h = splitmix64(h ^ _as_int(k))
    return h >> 1  # torch.Generator.manual_seed takes up to 2**63 - 1 comfortably


def generator(*keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``derive_seed(*keys)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*keys))
    return g
