"""The shared forward-process interface (DESIGN.md §2.1, METHODS.md "One family").

Every method is a linear Gaussian forward process ``q(x_t | x0) = N(A_t x0, Σ_t)`` in continuous time
``t ∈ [0, 1]`` (0 data, 1 prior). A ``Process`` holds only math (non-persistent buffers, no
parameters) and offers:

- ``marginal(x0, t, noise) -> (x_t, eps)``: a draw of q(x_t | x0); ``eps`` is the white noise an
  ε-predicting network is trained to recover (the process colours it if it must).
- ``prior(shape, noise)``: the sampling start at t = 1 (``shape`` is the data shape; the state may
  have another resolution: see ``resolution``).
- ``step(x_t, x0_hat, t, s, eta, noise)``: one reverse step t -> s < t given a prediction of x0:
  the exact posterior q(x_s | x_t, x0 = x0_hat) for eta = 1, deterministic for eta = 0.
- ``resolution(t)``: the state's spatial size at time t (constant except for Scale Space).
- ``scalings(t) -> (a, sigma)``: per-sample scalars with ``x_t ≈ a x0 + sigma eps`` used by the
  Denoiser's preconditioning (exact for the Gaussian process, a summary for coloured ones).
- ``x0_from_eps`` / ``eps_from_x0``: conversions that belong to the process (blur's noise is coloured).
- ``loss_weight(t)``: the process's default per-sample loss weight in the network's output space.

Randomness always comes from a ``NoiseSource`` so that per-sample seeds make a sample independent of
batch size and world size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


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


class Process(nn.Module):
    """Interface; see the module docstring. Subclasses implement every method below."""

    def resolution(self, t: float | Tensor) -> int:
        raise NotImplementedError

    def state_shape(self, shape: Sequence[int], t: float | Tensor) -> tuple[int, ...]:
        """The data shape [B, C, H, W] mapped to the state's shape at time t (square images)."""
        r = self.resolution(t)
        return (*tuple(shape[:-2]), r, r)

    def marginal(self, x0: Tensor, t: Tensor, noise: NoiseSource) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def prior(self, shape: Sequence[int], noise: NoiseSource) -> Tensor:
        raise NotImplementedError

    def step(
        self, x_t: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor, eta: float, noise: NoiseSource
    ) -> Tensor:
        raise NotImplementedError

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def loss_weight(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)
