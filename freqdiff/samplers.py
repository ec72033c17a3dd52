"""Samplers: a flat library of functions (DESIGN.md §2.4).

``sample_ancestral`` is the generic loop; its step math lives in ``process.step`` (DDPM ancestral
for eta = 1, DDIM for eta = 0, Song et al. 2021), so it serves every process. Samplers that call the
denoiser more than once per step (EDM Heun, Relay's corrected step), or step by another rule
(``sample_predictor``: the reverse-diffusion predictor of blur diffusion), join this file as their
own functions. Seeds are per sample: a sample does not depend on batch size or world size.

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


def _start(
    process: Process, seeds, shape: Sequence[int], x: Tensor | None, device
) -> tuple[NoiseSource, int, Tensor]:
    """(the seeds' noise source, batch size, start state: ``x``, else a draw of the prior)."""
    noise = seeds if isinstance(seeds, NoiseSource) else NoiseSource.from_seeds(seeds, device)
    if x is None:
        x = process.prior((len(noise), *shape), noise)
    return noise, len(noise), x


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
    clip_x0: bool = False,  # clamp x0_hat to the data range (process.clip_x0; a no-op without one)
    callback: Callable[[dict], None] | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw one sample per seed; returns the final state at t = 0, [B, *shape]."""
    noise, batch, x = _start(process, seeds, shape, x, device)
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
            x0_hat = process.clip_x0(x0_hat)
        x = process.step(x, x0_hat, t_b, s_b, eta, noise)
        if callback is not None:
            callback({"i": i, "x": x, "x0_hat": x0_hat, "t": t, "s": s})
    return x


@torch.no_grad()
def sample_predictor(
    process: Process,  # needs T and predictor_step (e.g. BlurProcess)
    denoiser: Callable[..., Tensor],
    seeds: Sequence[int] | Tensor | NoiseSource,
    shape: Sequence[int],  # data shape of one sample, (C, H, W)
    steps: int | None = None,  # None: T − 1, every step of the discrete chain (the paper)
    quiet_steps: int = 2,  # the last steps add no noise (the official sampler: noise only while i > 2)
    x: Tensor | None = None,
    labels: Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Reverse-diffusion predictor (Song et al. 2021) from t = (T − 1)/T to 0 through
    ``process.predictor_step`` with ε̂ = ``process.eps_from_x0(x, x0_hat, t)``; T − 1 denoiser calls
    by default, as in the blur-diffusion paper. Returns the final state, [B, *shape]."""
    noise, batch, x = _start(process, seeds, shape, x, device)
    T = int(process.T)
    steps = T - 1 if steps is None else int(steps)
    grid = time_grid(steps, t_start=(T - 1) / T)
    for i, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        t_b = torch.full((batch,), t, device=device)
        s_b = torch.full((batch,), s, device=device)
        x0_hat = denoiser(x, t_b, labels)
        eps_hat = process.eps_from_x0(x, x0_hat, t_b)
        x = process.predictor_step(x, eps_hat, t_b, s_b, noise if steps - i > quiet_steps else None)
        if callback is not None:
            callback({"i": i, "x": x, "x0_hat": x0_hat, "t": t, "s": s})
    return x


@torch.no_grad()
def sample_heun(
    process: Process,
    denoiser: Callable[..., Tensor],
    seeds: Sequence[int] | Tensor | NoiseSource,  # per-sample seeds (or a ready noise source)
    shape: Sequence[int],  # data shape of one sample, (C, H, W)
    steps: int = 18,  # N: grid points uniform in t from t_start to 0 (EDM: 18, 35 NFE)
    S_churn: float = 0.0,  # total churn; γ = min(S_churn / N, √2 − 1) (EDM Algorithm 2)
    S_min: float = 0.0,  # churn only for S_min <= σ <= S_max
    S_max: float = float("inf"),
    S_noise: float = 1.0,  # std inflation of the churn noise
    x: Tensor | None = None,  # start state at t_start in the process's x space (default: the prior)
    t_start: float = 1.0,
    labels: Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Karras et al. 2022, Algorithm 2 (EDM's ``edm_sampler``): Heun steps with stochastic churn.

    Runs EDM's ODE ``dx̃/dσ̃ = (x̃ − D(x̃; σ̃)) / σ̃`` (EDM eq. 4 with s = 1) in x̃ = x / a, σ̃ = sigma / a,
    which is exact for every white-noise process (x̃ = x0 + σ̃ ε); for ``EDMProcess`` (a = 1) it is
    EDM's sampler. Grid: t_i = t_start (1 − i / (N − 1)), i < N, σ̃_i from ``process.scalings``, then
    σ̃_N = 0 (skipped where t = 0 already is the data, σ̃ = 0). Per step i (EDM Algorithm 2, lines 4-11):
    γ_i = min(S_churn / N, √2 − 1) if S_min <= σ̃_i <= S_max else 0, σ̂ = σ̃_i (1 + γ_i) (rounded to a
    noise level of the process through t̂ = t_from_sigma(σ̂), EDM's ``round_sigma``: σ̂ above σ̃(1) becomes
    σ̃(1), so with S_max >= σ_max the first step gets no churn, where EDM's σ-conditioned net would churn),
    x̂ = x̃_i + √(σ̂² − σ̃_i²) S_noise z, d = (x̂ − D(x̂; σ̂)) / σ̂, x̃_{i+1} = x̂ + (σ̃_{i+1} − σ̂) d, and for
    σ̃_{i+1} > 0 the 2nd-order correction with d' = (x̃_{i+1} − D(x̃_{i+1}; σ̃_{i+1})) / σ̃_{i+1}:
    x̃_{i+1} = x̂ + (σ̃_{i+1} − σ̂) (d + d') / 2; the last step, to σ̃ = 0, is Euler.
    D(x̃; σ̃) is ``denoiser(a x̃, t, labels)`` at t = t_from_sigma(σ̃) (the grid's own t on grid points).

    As in EDM the state is float64 (the denoiser sees float32), and churn noise is drawn on every step
    (zero-weighted where γ = 0) as ``edm_sampler`` does, so a seed's noise does not depend on S_churn,
    S_min, S_max: changing them changes only where the same noise is used.
    On a VP process the uniform-t grid's first step spans σ̃(1) → σ̃(t_1) (linear β: 157 → ~2 for 40
    points; cosine: 20291 → ~6), and the trapezoid correction multiplies the denoiser's change over it
    by σ̂ / σ̃_next: Heun then needs the EDM process (whose grid is Karras') or ``sample_ancestral``.
    ``callback`` gets ``{i, x, x0_hat, t, s}`` after each step (x the new state in x space, x0_hat
    D at the step's start; s = 0.0 on the final step to the data). Returns the final x [B, *shape].
    """
    if not getattr(process, "white_noise", False):
        raise ValueError(f"sample_heun needs a white-noise process, got {type(process).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < t_start <= 1:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    noise, batch, x = _start(process, seeds, shape, x, device)
    f64 = torch.float64
    view = lambda v: v.view(-1, *([1] * len(shape)))  # [B] -> [B, 1, 1, 1]

    def at(t: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:  # [B] t, a and σ̃ = sigma / a, float64
        t_b = torch.as_tensor(t, dtype=f64, device=device).expand(batch)
        a, sigma = (v.to(f64) for v in process.scalings(t_b))
        return t_b, a, sigma / a

    def D(x_tilde: Tensor, t_b: Tensor, a: Tensor) -> Tensor:  # D(x̃; σ̃) = denoiser(a x̃, t) (x0 space)
        return denoiser((view(a) * x_tilde).float(), t_b.float(), labels).to(f64)

    ts = [t_start * (1 - i / (steps - 1)) for i in range(steps)] if steps > 1 else [t_start]
    grid = [at(t) for t in ts]
    if float(grid[-1][2].max()) > 0:  # t = 0 is not the data (EDM: σ_min): append σ̃ = 0 (a of t = 0)
        t0, a0, _ = grid[-1]
        grid.append((t0, a0, torch.zeros_like(a0)))
        ts.append(0.0)
    gamma = min(S_churn / steps, 2**0.5 - 1)  # γ (EDM Algorithm 2, line 5)

    t_b, a, sig = grid[0]
    x_tilde = x.to(f64) / view(a)  # x̃ = x / a
    for i in range(len(grid) - 1):
        (t_b, a, sig), (t_next, a_next, sig_next) = grid[i], grid[i + 1]
        z = noise(x_tilde.shape, dtype=f64).to(x_tilde)  # drawn every step, as edm_sampler does
        churn = (sig >= S_min) & (sig <= S_max) if gamma > 0 else torch.zeros_like(sig, dtype=torch.bool)
        if bool(churn.any()):  # σ̂ = σ (1 + γ), rounded to a noise level the process has
            t_hat = torch.where(churn, process.t_from_sigma(sig * (1 + gamma)).to(f64), t_b)
            _, a_hat, sig_hat = at(t_hat)
        else:
            t_hat, a_hat, sig_hat = t_b, a, sig
        x_hat = x_tilde + view((sig_hat**2 - sig**2).clamp(min=0).sqrt() * S_noise) * z  # line 6
        x0_hat = D(x_hat, t_hat, a_hat)
        d = (x_hat - x0_hat) / view(sig_hat)  # line 7: dx̃/dσ̃ at σ̂
        x_tilde = x_hat + view(sig_next - sig_hat) * d  # line 8: Euler step
        if float(sig_next.min()) > 0:  # lines 9-11: 2nd-order correction
            d_prime = (x_tilde - D(x_tilde, t_next, a_next)) / view(sig_next)
            x_tilde = x_hat + view(sig_next - sig_hat) * (0.5 * d + 0.5 * d_prime)
        if callback is not None:
            x_now = (view(a_next) * x_tilde).float()
            callback({"i": i, "x": x_now, "x0_hat": x0_hat.float(), "t": ts[i], "s": ts[i + 1]})
    return (view(grid[-1][1]) * x_tilde).float()
