"""The shared forward-process interface (docs/architecture.md, The process contract).

Every method is a linear Gaussian forward process ``q(x_t | x0) = N(A_t x0, Σ_t)`` in continuous time
``t ∈ [0, 1]`` (0 data, 1 prior). A ``Process`` holds only math (non-persistent buffers, no
parameters) and offers:

- ``marginal(x0, t, noise) -> (x_t, eps)``: a draw of q(x_t | x0); ``eps`` is the white noise an
  ε-predicting network is trained to recover (the process colours it if it must).
- ``prior(shape, noise)``: the sampling start at t = 1 (``shape`` is the data shape; the state may
  have another resolution: see ``resolution``). ``prior_std`` is its per-pixel std (None for a
  process that has no prior and starts from ``start_from``), which scales the residual signal.
- ``step(x_t, x0_hat, t, s, eta, noise)``: one reverse step t -> s < t given a prediction of
  ``x0_at(x0, s)``: the exact posterior q(x_s | x_t, x0) for eta = 1, deterministic for eta = 0.
- ``x0_at(x0, t)``: the clean image at the state's resolution at t (identity except for Scale Space,
  where it is ``M_{0:t} x0``). A denoiser called with ``out_resolution`` predicts it.
- ``resolution(t)``: the state's spatial size at time t (constant except for Scale Space).
- ``scalings(t) -> (a, sigma)``: per-sample scalars with ``x_t ≈ a x0 + sigma eps`` used by the
  Denoiser's preconditioning (exact for white-noise processes, a summary for coloured ones).
- ``x0_from_eps`` / ``eps_from_x0``: conversions that belong to the process (blur's noise is
  coloured); ``x0_from_eps`` returns ``x0_at(x0, t)``.
- ``predictions``: the parameterisations the process supports (``Denoiser`` checks it); ``v`` and
  scalar conversions of loss weights need ``white_noise``.
- ``loss_weight(t)``: the process's default per-sample loss weight *in x0 space* (the weight of
  ``|x0_hat − x0|²``), or None for "the natural loss of the parameterisation"; the Denoiser converts
  an x0-space weight into the network's output space.
- ``clip_x0(x0_hat)``: clamps a prediction to the data range where x0 has one (``data_range``).
- ``t_from_sigma(sigma)``: the time at which the EDM noise level sigma/a equals ``sigma`` (for
  time samplers defined on σ, e.g. EDM's log-normal).

Precision: every contract method of every subclass is wrapped in ``ops.full_precision_fn`` by
``__init_subclass__``: process math runs with autocast off and full-precision matmuls, whatever the
trainer's precision (see ``ops``). Randomness always comes from a ``NoiseSource`` so that
per-sample seeds make a sample independent of batch size and world size.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from freqdiff.processes.noise import NoiseSource
from freqdiff.processes.ops import full_precision_fn

__all__ = ["NoiseSource", "Process", "CONTRACT_METHODS"]

# methods that always run in full precision (wrapped automatically in every subclass)
CONTRACT_METHODS = (
    "marginal",
    "prior",
    "step",
    "x0_at",
    "scalings",
    "x0_from_eps",
    "eps_from_x0",
    "loss_weight",
    "t_from_sigma",
    "clip_x0",
)


class Process(nn.Module):
    """Interface; see the module docstring. Subclasses implement the methods that raise."""

    predictions: tuple[str, ...] = ("eps", "x0")  # parameterisations this process supports
    white_noise: bool = False  # x_t = a x0 + sigma eps with white eps exactly (v is exact then)
    data_range: tuple[float, float] | None = None  # x0's range where it has one (for clip_x0)
    prior_std: float | None = 1.0  # per-pixel std of the prior; None: no prior (start_from)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in CONTRACT_METHODS:
            if name in cls.__dict__:
                setattr(cls, name, full_precision_fn(cls.__dict__[name]))

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

    def x0_at(self, x0: Tensor, t: Tensor | float) -> Tensor:
        return x0

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def loss_weight(self, t: Tensor) -> Tensor | None:
        return None

    def clip_x0(self, x0_hat: Tensor) -> Tensor:
        if self.data_range is None:
            return x0_hat
        return x0_hat.clamp(*self.data_range)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not map an EDM noise level to a time")
