"""Samplers: a flat library of functions (DESIGN.md §2.4).

``sample_ancestral`` is the generic loop; its step math lives in ``process.step`` (DDPM ancestral
for eta = 1, DDIM for eta = 0, Song et al. 2021), so it serves every process. Samplers that call the
denoiser more than once per step (EDM Heun, Relay's corrected step) join this file as their own
functions. Seeds are per sample: a sample does not depend on batch size or world size.

``callback(d)`` is called after every step with ``d = {i, x, x0_hat, t, s}`` (x is the new state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from freqdiff.processes.base import NoiseSource, Process


def time_grid(steps: int, t_start: float = 1.0, timesteps: Sequence[float] | None = None) -> list[float]:
    """Decreasing grid [t_start, ..., 0] of ``steps`` steps (uniform in t unless ``timesteps`` given).

    With T = 1000 and ``steps`` dividing T, the uniform grid is a sub-grid of the discrete DDPM steps.
    """
    if timesteps is not None:
        grid = [float(v) for v in timesteps]
        if grid[-1] != 0.0:
            grid.append(0.0)
        if any(b >= a for a, b in zip(grid, grid[1:])) or not 0 < grid[0] <= 1:
            raise ValueError(f"timesteps must decrease strictly from (0, 1] to 0, got {grid}")
        return grid
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < t_start <= 1:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    return [t_start * (1 - i / steps) for i in range(steps + 1)]


@torch.no_grad()
def sample_ancestral(
    process: Process,
    denoiser: Callable[..., Tensor],
    seeds: Sequence[int] | Tensor | NoiseSource,  # per-sample seeds (or a ready noise source)
    shape: Sequence[int],  # data shape of one sample, (C, H, W)
    steps: int = 50,
    eta: float = 1.0,  # 1: DDPM ancestral; 0: DDIM deterministic
    x: Tensor | None = None,  # start state (default: the prior)
    t_start: float = 1.0,
    timesteps: Sequence[float] | None = None,
    labels: Tensor | None = None,
    clip_x0: bool = False,  # clamp x0_hat to [-1, 1]
    callback: Callable[[dict], None] | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw one sample per seed; returns the final state at t = 0, [B, *shape]."""
    noise = seeds if isinstance(seeds, NoiseSource) else NoiseSource.from_seeds(seeds, device)
    batch = len(noise)
    if x is None:
        x = process.prior((batch, *shape), noise)
    grid = time_grid(steps, t_start, timesteps)
    for i, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        t_b = torch.full((batch,), t, device=device)
        s_b = torch.full((batch,), s, device=device)
        kwargs = {}
        res_s = process.resolution(s)
        if res_s != x.shape[-1]:  # the state changes resolution on this step (Scale Space)
            kwargs["out_resolution"] = res_s
        x0_hat = denoiser(x, t_b, labels, **kwargs)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        x = process.step(x, x0_hat, t_b, s_b, eta, noise)
        if callback is not None:
            callback({"i": i, "x": x, "x0_hat": x0_hat, "t": t, "s": s})
    return x
