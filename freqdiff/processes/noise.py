"""Noise sources: white Gaussian noise for the processes, per sample (seeded) or per batch.

``NoiseSource(generator)`` draws a whole batch from one torch.Generator (training);
``NoiseSource.from_seeds(seeds)`` draws row b from seed b only, so a sample never depends on the
batch it is drawn in (sampling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class NoiseSource:
    """White Gaussian noise, drawn either per sample (one generator per seed) or for a whole batch.

    ``noise((B, C, H, W))`` returns a [B, C, H, W] standard normal tensor. With per-sample seeds,
    row b depends only on seed b and on the sequence of shapes asked for, not on the batch it is in.
    """

    def __init__(
        self,
        generators: Sequence[torch.Generator] | torch.Generator | None,  # per-sample list, or one for all
        device="cpu",
        batch_size: int | None = None,  # batch size, for a source with one generator used by a sampler
    ):
        self.generators = generators
        self.device = torch.device(device)
        self.batch_size = len(generators) if isinstance(generators, Sequence) else batch_size

    def __len__(self) -> int:
        if self.batch_size is None:
            raise TypeError("this NoiseSource has no fixed batch size")
        return self.batch_size

    @classmethod
    def from_seeds(cls, seeds: Sequence[int] | Tensor, device="cpu") -> NoiseSource:
        gens = []
        for s in [int(s) for s in seeds]:
            g = torch.Generator(device="cpu")
            g.manual_seed(s)
            gens.append(g)
        return cls(gens, device)

    def __call__(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        shape = tuple(int(s) for s in shape)
        if isinstance(self.generators, Sequence):
            if shape[0] != len(self.generators):
                raise ValueError(
                    f"noise for batch {shape[0]} asked of a source with {len(self.generators)} seeds"
                )
            z = torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in self.generators])
            return z.to(self.device)
        return torch.randn(shape, generator=self.generators, dtype=dtype, device=self.device)
