"""Noise sources: white Gaussian noise for the processes, per sample (seeded) or per batch.

``NoiseSource(generator)`` draws a whole batch with ``torch.randn`` from one torch.Generator (or the
global RNG): training. ``NoiseSource.from_seeds(seeds, device, stream)`` draws row b from seed b only,
so a sample never depends on the batch it is drawn in, nor on the batch size or the world size
(sampling). Seeded noise is made on the sampling device by a vectorised counter-based hash, with no
Python loop over the samples per call.

Seeded noise, exactly (all arithmetic on 32-bit words, mod 2**32):

1. Construction. The stream path (``stream`` and then any ``.stream(name)`` below it, strings folded in
   by their UTF-8 bytes, ints mod 2**64) is hashed with ``splitmix64`` into a 64-bit stream key P;
   seed s gets the 64-bit base key ``splitmix64(P ^ splitmix64(s mod 2**64))``, a bijection of the
   seed, so two seeds of one stream never share a key. Its two words go to the device as int32.
2. Call k (a per-source counter from 0). With ``c_lo = mix(k + S1)`` and ``c_hi = mix(c_lo + S2)``, the
   row keys are ``a = mix(lo + c_lo)``, ``k1 = mix((hi ^ a) + c_hi)``, ``k0 = mix(a ^ k1)``: for a fixed
   k a bijection of the 64-bit base key. They are made with torch ops on the device for a block of
   64 calls at once ([B, 64] tensors), so a call costs no host-to-device copy. ``mix`` is a
   lowbias32-style xorshift-multiply hash (C. Wellons' hash prospector): ``x ^= x >> 16; x *= M1;
   x ^= x >> 16; x *= M2; x ^= x >> 16``.
3. Element j of a row of n = prod(shape[1:]) (C order): ``T[j] = mix(mix(j + C1) + C2)`` (a table
   made once per n and device), then ``x = T[j] + k0; x ^= x >> 16; x = x * M1 + k1; x ^= x >> 16;
   x *= M2``. The two key words enter at different rounds, so the whole 64-bit key matters, and T
   scrambles the index first, so rows with different keys are unrelated rather than shifted copies
   of each other (a shared 32-bit k1 or k0 leaves only isolated coincidences).
4. The top 22 bits of x, y = x >> 10 (signed, in [-2**21, 2**21)), give w = (2y + 1) 2**-22, a
   symmetric 22-bit uniform grid on (-1, 1), built exactly in float32: the int32 ``2y + 0x4B400001``
   is the float 1.5 2**23 + 2y + 1, and w is that float times 2**-22 minus 3. Then z = √2 erfinv(w)
   in float32, cast to ``dtype``. |z| <= 5.17 (P(|Z| > 5.17) = 2.4e-7; CPU ``torch.randn`` stops
   near 5.8).

The integer ops (wrap-around int32 add and multiply, a half-word xor for the logical shift, one
arithmetic shift, no unsigned types) give the same bits on CPU and CUDA; the erfinv may differ by an
ulp between devices. Everything after the key derivation runs in place in the output's own storage:
one allocation and ten elementwise passes. ``x ^= x >> 16`` is done as "low half-word ^= high
half-word" on an int16 view (little-endian hosts and GPUs), which needs no temporary.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from freqdiff.rng import MASK64, splitmix64


def _s32(v: int) -> int:
    """v mod 2**32 as a signed 32-bit value, the way an int32 tensor holds it."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


M1 = 0x7FEB352D  # the two odd multipliers of lowbias32
M2 = _s32(0x846CA68B)
C1 = _s32(0x9E3779B9)  # index-table offsets: golden ratio and sqrt(3) fraction bits
C2 = _s32(0xBB67AE85)
S1 = _s32(0x3C6EF372)  # call-counter offsets: sqrt(5) and sqrt(7) fraction bits
S2 = _s32(0xA54FF53A)
KEY_BLOCK = 64  # call keys are made for this many calls at a time
STREAM_START = 0x6A09E667F3BCC908  # sqrt(2) fraction bits: the stream hash's start
_LOW_HALF = 0 if sys.byteorder == "little" else 1  # int16 index of an int32's low half-word
_SQRT2 = math.sqrt(2.0)


def xorshift16_(x: Tensor) -> Tensor:
    """``x ^= x >> 16`` (logical shift) in place on a contiguous int32 tensor, via its int16 halves."""
    halves = x.view(torch.int16)
    halves[..., _LOW_HALF::2].bitwise_xor_(halves[..., 1 - _LOW_HALF :: 2])
    return x


def mix32_(x: Tensor) -> Tensor:
    """The bijective 32-bit mix, in place on a contiguous int32 tensor."""
    xorshift16_(x).mul_(M1)
    xorshift16_(x).mul_(M2)
    return xorshift16_(x)


def stream_key(path: Sequence[str | int]) -> int:
    """The 64-bit key of a stream path; strings by their UTF-8 bytes, ints mod 2**64, tagged apart."""
    h = STREAM_START
    for name in path:
        if isinstance(name, str):
            data = name.encode("utf-8")
            h = splitmix64(h ^ 1 ^ (len(data) << 8))
            for i in range(0, len(data), 8):
                h = splitmix64(h ^ int.from_bytes(data[i : i + 8], "little"))
        else:
            h = splitmix64(splitmix64(h ^ 2) ^ (operator.index(name) & MASK64))
    return h


def seed_key(seed: int, stream: int) -> int:
    """The 64-bit base key of ``seed`` in the stream with key ``stream`` (a bijection of the seed)."""
    return splitmix64(stream ^ splitmix64(seed & MASK64))


def call_keys(lo: Tensor, hi: Tensor, first: int) -> tuple[Tensor, Tensor]:
    """Row keys (k0, k1) [B, KEY_BLOCK] of calls first, first + 1, ... from the base key words [B]."""
    calls = torch.arange(first, first + KEY_BLOCK, dtype=torch.int32, device=lo.device)
    c_lo = mix32_(calls.add_(S1))
    c_hi = mix32_(c_lo + S2)
    a = mix32_(lo[:, None] + c_lo)
    k1 = mix32_((hi[:, None] ^ a).add_(c_hi))
    return mix32_(a.bitwise_xor_(k1)), k1


def index_table(n: int, device: torch.device) -> Tensor:
    """T[j] for j < n: the scrambled element index (int32 [n])."""
    return mix32_(mix32_(torch.arange(n, dtype=torch.int32, device=device).add_(C1)).add_(C2))


def hash_rows(table: Tensor, k0: Tensor, k1: Tensor) -> Tensor:
    """The int32 [B, n] hash of element j of row b (its top bits are the best): keys [B], table [n]."""
    x = torch.empty((k0.shape[0], table.shape[0]), dtype=torch.int32, device=table.device)
    torch.add(table, k0[:, None], out=x)  # x = T[j] + k0
    xorshift16_(x)
    torch.add(k1[:, None], x, alpha=M1, out=x)  # x = x * M1 + k1
    return xorshift16_(x).mul_(M2)


@functools.cache
def _constants(device: torch.device) -> tuple[Tensor, Tensor]:
    """The two tensor constants of ``bits_to_normal_``, made once per device (no copy per call)."""
    magic = torch.tensor(0x4B400001, dtype=torch.int32, device=device)  # the bits of 1.5 2**23 + 1
    return magic, torch.tensor(-3.0, dtype=torch.float32, device=device)


def bits_to_normal_(x: Tensor) -> Tensor:
    """Standard normals from the int32 hashes x, in place: the float32 view of x's storage."""
    magic, minus3 = _constants(x.device)
    torch.add(magic, x.bitwise_right_shift_(10), alpha=2, out=x)  # the float 1.5 2**23 + 2y + 1
    w = torch.add(minus3, x.view(torch.float32), alpha=2.0**-22, out=x.view(torch.float32))
    return w.erfinv_().mul_(_SQRT2)


class NoiseSource:
    """White Gaussian noise, drawn either per sample (from seeds) or for a whole batch (one generator).

    ``noise((B, C, H, W))`` returns a [B, C, H, W] standard normal tensor on ``noise.device``. With
    seeds, row b of the k-th call is a pure function of (seed b, stream, k, shape[1:]).
    """

    def __init__(
        self,
        generators: torch.Generator | None = None,  # one generator for the whole batch (None: global RNG)
        device: torch.device | str = "cpu",  # where the noise is made (a CUDA generator for CUDA)
        batch_size: int | None = None,  # batch size, for a source with one generator used by a sampler
    ):
        if isinstance(generators, Sequence):
            raise TypeError("per-sample generators are gone: use NoiseSource.from_seeds(seeds, device)")
        self.generator = generators
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.seeds: list[int] | None = None
        self._path: tuple[str | int, ...] = ()
        self._calls = 0
        self._tables: dict[int, Tensor] = {}
        self._keys: tuple = (None,)  # (block, k0, k1) of the calls in block * KEY_BLOCK + [0, KEY_BLOCK)

    @classmethod
    def from_seeds(
        cls,
        seeds: Sequence[int] | Tensor,  # one seed per sample (taken mod 2**64)
        device: torch.device | str = "cpu",  # where the noise is made
        stream: str | int = "sample",  # the consumer: other streams give unrelated numbers
    ) -> NoiseSource:
        """A source whose row b depends only on ``seeds[b]``, the stream and the call count."""
        seeds = seeds.tolist() if isinstance(seeds, Tensor) else seeds
        return cls._seeded([int(s) for s in seeds], torch.device(device), (stream,), {})

    @classmethod
    def _seeded(
        cls, seeds: list[int], device: torch.device, path: tuple[str | int, ...], tables: dict[int, Tensor]
    ) -> NoiseSource:
        self = cls(None, device, len(seeds))
        self.seeds, self._path, self._tables = seeds, path, tables
        keys = [seed_key(s, stream_key(path)) for s in seeds]
        self._key_lo = torch.tensor([_s32(k) for k in keys], dtype=torch.int32, device=device)
        self._key_hi = torch.tensor([_s32(k >> 32) for k in keys], dtype=torch.int32, device=device)
        return self

    def stream(self, name: str | int) -> NoiseSource:
        """The same seeds on the same device, in the sub-stream ``name`` (its own call counter from 0)."""
        if self.seeds is None:
            raise TypeError("only a seeded NoiseSource (from_seeds) has streams")
        return self._seeded(self.seeds, self.device, (*self._path, name), self._tables)

    def __len__(self) -> int:
        if self.batch_size is None:
            raise TypeError("this NoiseSource has no fixed batch size")
        return self.batch_size

    def __repr__(self) -> str:
        if self.seeds is None:
            return f"NoiseSource(generator, device={self.device}, batch_size={self.batch_size})"
        where = f"device={self.device}, stream={self._path}, calls={self._calls}"
        return f"NoiseSource({len(self.seeds)} seeds, {where})"

    def _bits(self, shape: tuple[int, ...]) -> Tensor:
        """The int32 [B, n] hashes of the next call (advances the call counter)."""
        if not shape or shape[0] != len(self.seeds):
            got = shape[0] if shape else "a scalar"
            raise ValueError(f"noise for batch {got} asked of a source with {len(self.seeds)} seeds")
        n = math.prod(shape[1:])
        if n >= 1 << 31:
            raise ValueError(f"at most 2**31 - 1 elements per sample, got {n}")
        if n not in self._tables:
            self._tables[n] = index_table(n, self.device)
        block, col = divmod(self._calls, KEY_BLOCK)
        if self._keys[0] != block:
            if (block + 1) * KEY_BLOCK >= 1 << 31:
                raise OverflowError("a seeded NoiseSource counts its calls in 31 bits")
            self._keys = (block, *call_keys(self._key_lo, self._key_hi, block * KEY_BLOCK))
        k0, k1 = self._keys[1][:, col], self._keys[2][:, col]
        self._calls += 1
        return hash_rows(self._tables[n], k0, k1)

    def __call__(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        shape = tuple(int(s) for s in shape)
        if not dtype.is_floating_point:
            raise TypeError(f"noise dtype must be floating point, got {dtype}")
        if self.seeds is None:
            return torch.randn(shape, generator=self.generator, dtype=dtype, device=self.device)
        return bits_to_normal_(self._bits(shape)).view(shape).to(dtype)
