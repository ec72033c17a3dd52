"""Samplers: a flat library of functions (docs/architecture.md, Samplers).

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


def _fresh(noise: NoiseSource, like: Tensor, g: Tensor, sde_scale: float) -> Tensor | float:
    """g z with a fresh z [B, ...] like ``like`` (float64), or 0 without SDE noise (no draw)."""
    if not sde_scale:
        return 0.0
    return g.view(-1, *([1] * (like.ndim - 1))) * noise(like.shape, dtype=like.dtype).to(like)


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
    sde_scale: float = 0.0,  # g = sde_scale σ̃_next of fresh noise per step (Relay's stage-1 sampler: 0.05)
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
    ``sde_scale`` > 0 is Relay Diffusion's stage-1 sampler (THUDM/RelayDiffusion ``edm_sampler``): each
    step keeps g = sde_scale σ̃_{i+1} of fresh noise, σ̃_{i+1} − σ̂ becoming √(σ̃_{i+1}² − g²) − σ̂ in both
    the Euler and the corrected step, each of which adds g z with its own z (0: EDM's sampler exactly).
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
    if not 0 <= sde_scale < 1:
        raise ValueError(f"sde_scale={sde_scale!r}: expected a number in [0, 1)")
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
        g = sde_scale * sig_next  # Relay's stage-1 SDE noise (0: EDM)
        h = view(((sig_next**2 - g**2).sqrt() if sde_scale else sig_next) - sig_hat)  # σ̃_next − σ̂ for g = 0
        x_tilde = x_hat + h * d + _fresh(noise, x_hat, g, sde_scale)  # line 8: Euler step
        if float(sig_next.min()) > 0:  # lines 9-11: 2nd-order correction
            d_prime = (x_tilde - D(x_tilde, t_next, a_next)) / view(sig_next)
            x_tilde = x_hat + h * (0.5 * d + 0.5 * d_prime) + _fresh(noise, x_hat, g, sde_scale)
        if callback is not None:
            x_now = (view(a_next) * x_tilde).float()
            callback({"i": i, "x": x_now, "x0_hat": x0_hat.float(), "t": ts[i], "s": ts[i + 1]})
    return (view(grid[-1][1]) * x_tilde).float()


def relay_grid(
    steps: int = 150,
    sigma_min: float = 0.008,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    truncation: float = 0.95,
) -> list[float]:
    """The Karras grid σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N, without every
    σ >= ``truncation`` (Relay's stage-2 grid; CelebA-HQ's 150 steps keep 54, from 0.92191)."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if not 0 < sigma_min < truncation:
        raise ValueError(
            f"need 0 < sigma_min < truncation, got sigma_min={sigma_min}, truncation={truncation}"
        )
    i = torch.arange(steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    grid = (hi + i / (steps - 1) * (lo - hi)) ** rho
    return [float(v) for v in grid[grid < truncation]]


@torch.no_grad()
def sample_relay(
    process: Process,  # RelayProcess: start_from, blur_step, blur_sigma_at, t_from_sigma
    denoiser: Callable[..., Tensor],  # x0_hat = denoiser(x, t, labels)
    seeds: Sequence[int] | Tensor | NoiseSource,  # per-sample seeds (or the stage-1 sampler's source)
    shape: Sequence[int],  # data shape of one sample at stage 2, (C, H, W)
    x_low: Tensor,  # stage-1 samples [B, C, H/n, W/n] (nearest-upsampled by start_from)
    steps: int = 150,  # N of the full Karras grid, before truncation
    sigma_min: float = 0.008,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    truncation_sigma: float = 0.95,  # drop every σ >= this; start at the first σ below it
    pl: float | None = None,  # the σ -> u map's quantile (None: the training pl)
    s_noise: float = 0.2,  # fresh-noise fraction of each blurring step
    corrector: bool = True,  # the Heun-like correction (2 NFE per step; the official sampler)
    cfg_scale: float = 1.0,  # classifier-free guidance w: w D(x, y) − (w − 1) D(x, ∅)
    labels: Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Relay Diffusion's stage-2 sampler (THUDM/RelayDiffusion ``blur_sampler``; docs/methods/relay.md).

    ``x = process.start_from(x_low, σ_0)`` at the first σ of ``relay_grid``, then per grid point σ_c with
    successor σ_n: x0_hat = D(x; σ_c), ``process.blur_step`` from σ_c to σ_n with the blur of
    ``blur_sigma_at(σ, pl)`` and ``s_noise``; with ``corrector`` the step is recomputed from x_c with the
    averaged slope d̄ = (d + d')/2 (d = (x_c − x0_hat)/σ_c in the patch-DCT domain, d' the same at the
    Euler result) and *fresh* noise, i.e. with x0_eff = x_c − σ_c d̄. The last grid point returns D.
    The denoiser is called at t = t_from_sigma(σ) (the training map: the network sees the exact σ).
    The state is float64, as in the official sampler. Returns [B, *shape] float32.
    """
    noise = seeds if isinstance(seeds, NoiseSource) else NoiseSource.from_seeds(seeds, device)
    batch = len(noise)
    grid = relay_grid(steps, sigma_min, sigma_max, rho, truncation_sigma)
    hi = float(process.sigma(torch.ones(1)))
    if grid[0] > hi * (1 + 1e-6):
        raise ValueError(
            f"truncation_sigma={truncation_sigma}: the grid starts at σ {grid[0]:.4g}, above the "
            f"largest σ stage 2 was trained on ({hi:.4g})"
        )
    f64 = torch.float64

    def D(x: Tensor, sigma: float) -> Tensor:
        t = process.t_from_sigma(torch.full((batch,), sigma, dtype=f64, device=device)).float()
        d = denoiser(x.float(), t, labels).to(f64)
        if cfg_scale != 1.0 and labels is not None:
            d = cfg_scale * d - (cfg_scale - 1) * denoiser(x.float(), t, None).to(f64)
        return d

    def full(v: float | Tensor) -> Tensor:
        return torch.as_tensor(v, dtype=f64, device=device).expand(batch)

    def info(i: int, x: Tensor, x0_hat: Tensor, sc: float, sn: float) -> dict:  # times of the process
        t, s = (float(process.t_from_sigma(torch.tensor(v, dtype=f64))) if v > 0 else 0.0 for v in (sc, sn))
        return {"i": i, "x": x.float(), "x0_hat": x0_hat.float(), "t": t, "s": s, "sigma": sc}

    x = process.start_from(x_low.to(device=device, dtype=f64), full(grid[0]), noise).to(f64)
    for i, sc in enumerate(grid):
        x0_hat = D(x, sc)
        if i == len(grid) - 1:
            if callback is not None:
                callback(info(i, x0_hat, x0_hat, sc, 0.0))
            return x0_hat.float()
        sn = grid[i + 1]
        b_c, b_n = (process.blur_sigma_at(full(v), pl) for v in (sc, sn))
        x_next = process.blur_step(x, x0_hat, full(sc), full(sn), b_c, b_n, s_noise, noise)
        if corrector:
            x0_eff = 0.5 * (x + x0_hat) - (0.5 * sc / sn) * (x_next - D(x_next, sn))
            x_next = process.blur_step(x, x0_eff, full(sc), full(sn), b_c, b_n, s_noise, noise)
        x = x_next
        if callback is not None:
            callback(info(i, x, x0_hat, sc, sn))
    raise AssertionError("unreachable: the grid is never empty")
