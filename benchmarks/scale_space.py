"""Scale Space Diffusion (``ScaleSpaceProcess`` + ``FlexiUNet``) against DDPM on the same backbone at 64².

4 levels (8-64), convex schedule (γ 0.5), T = 1000; the ``small`` preset with channel_mult (1, 2, 2, 2)
(attention at 16², the preset's), fp32, batch 8. Each (entry r(t), exit r(s)) pair of the schedule is
timed on its own, interleaved with DDPM (order alternating per repeat, medians), and weighted by its
share of the steps: (1) training, ``ScaleSpaceModule.loss`` + backward + AdamW with the step draw
pinned to the pair's steps, by share of the T steps, against ``DDPMModule`` (x0, Min-SNR-5) at 64²;
(2) sampling, one ``sample_ancestral`` step (EMA denoiser + ``process.step``, η = 1), by share of
``sample_grid(100)`` (106 steps: it keeps each change step and its predecessor), against one DDPM
step: the speed-up at equal step count; (3) predicted, ``FlopCounterMode`` flops of one forward per
pair, weighted alike, next to the pixel-count bound 1 / mean_pixel_cost and the paper's 1.58×
(target: measured >= 0.9 × predicted); (4) the exact change-step noise (``process.step``: per-axis
eigendecomposition) against the same mean plus 40 Lanczos iterations for √(I − ρc² MᵀM) ε per sample
(Python loop, as the official code; no reorthogonalisation): speed at 32² -> 64², batch 8 (target
>= 10×), the difference on the same ε, and the covariance of 4000 draws of each at 8² -> 16² (1
channel, mean 0) against the dense σ_s² (I − ρc² MᵀM), next to the floor √((‖Σ‖² + (tr Σ)²) / N) / ‖Σ‖.

Ratios only: absolute times drift with the machine's load, which is printed with the table.
"""

from __future__ import annotations

import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._timing import timed
from freqdiff.nets.flexi_unet import flexi
from freqdiff.nets.presets import count_parameters, unet
from freqdiff.processes.base import NoiseSource
from freqdiff.processes.gaussian import GaussianProcess
from freqdiff.processes.scale_space import ScaleSpaceProcess, down2_matrix
from freqdiff.timesteps import UniformTime
from lightning_modules.ddpm import DDPMModule
from lightning_modules.scale_space import ScaleSpaceModule

RES, LEVELS, GRID_STEPS, PAPER, TARGET, SPEED_TARGET = 64, 4, 100, 1.58, 0.9, 10.0
NET = dict(resolution=RES, channel_mult=(1, 2, 2, 2))


def lanczos_sqrt(matvec, v: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """√A v for symmetric PSD A by Lanczos: ‖v‖ Q √T e₁ (Krylov basis Q, tridiagonal T)."""
    norm, tol = v.norm(), 100 * torch.finfo(v.dtype).eps
    q, q_prev, b = v / norm, torch.zeros_like(v), 0.0
    Q, alpha, beta = [], [], []
    for i in range(iters):
        Q.append(q)
        w = matvec(q) - b * q_prev
        alpha.append(torch.dot(w, q))
        w = w - alpha[-1] * q
        b = w.norm()
        if i == iters - 1 or b <= tol:  # the last iteration, or an invariant subspace reached
            break
        beta.append(b)
        q_prev, q = q, w / b
    off = torch.stack(beta) if beta else v.new_zeros(0)
    T = torch.diag(torch.stack(alpha)) + torch.diag(off, 1) + torch.diag(off, -1)
    lam, S = torch.linalg.eigh(T)
    return norm * (torch.stack(Q, 1) @ (S @ (lam.clamp(min=0).sqrt() * S[0])))


def coefficients(process, t: float, s: float) -> tuple[float, float, float, float]:
    """(a_s, c, ρ, σ_s) of the step t -> s."""
    (a_t, s_t), (a_s, s_s) = (process.scalings(torch.tensor([u], dtype=torch.float64)) for u in (t, s))
    return float(a_s), float(a_t / a_s), float((s_s / s_t) ** 2), float(s_s)


def posterior_mean(process, x_t, x0_hat, t: float, s: float) -> torch.Tensor:
    """μ_s + ρ c Mᵀ (x_t − c M μ_s), μ_s = √ᾱ_s x0_hat (the change step's mean)."""
    a_s, c, rho, _ = coefficients(process, t, s)
    mu = a_s * x0_hat
    return mu + rho * c * process.up_adjoint(x_t - c * process.down(mu, x_t.shape[-1]), x0_hat.shape[-1])


def lanczos_step(process, x_t, x0_hat, t: float, s: float, noise: NoiseSource) -> torch.Tensor:
    """The change step's posterior draw: the mean of ``process.step``, the noise by Lanczos."""
    _, c, rho, s_s = coefficients(process, t, s)
    mean = posterior_mean(process, x_t, x0_hat, t, s)
    m = down2_matrix(x0_hat.shape[-1]).to(x_t)  # M per axis, r(s) -> r(t) = r(s) / 2
    shape = mean.shape[1:]

    def matvec(v):  # v − ρc² Mᵀ M v on one sample [C, rs, rs], flattened
        v = v.view(shape)
        return (v - rho * c**2 * (m.T @ (m @ v @ m.T) @ m)).flatten()

    eps = noise(mean.shape).to(mean)
    z = torch.stack([lanczos_sqrt(matvec, e.flatten()).view(shape) for e in eps])
    return mean + s_s * z


def header(*cells: str) -> None:
    head = "| " + " | ".join(cells) + " |"
    print(head + "\n|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")


def bench_models(device: torch.device, batch: int, budget_s: float) -> None:
    """1-3: training and sampling steps per (r(t), r(s)) pair against DDPM, and their flops."""
    torch.manual_seed(0)
    process = ScaleSpaceProcess(RES, LEVELS).to(device)
    T, grid = process.T, process.sample_grid(GRID_STEPS)
    full = lambda n, v: torch.full((n,), v, device=device)
    ssd = ScaleSpaceModule(flexi("small", **NET), process).to(device)
    ddpm = DDPMModule(unet("small", **NET), GaussianProcess(resolution=RES), UniformTime(), "x0", 5.0)
    ddpm = ddpm.to(device)  # x0-prediction, Min-SNR-5 (the SSD module's loss)
    opts = {m: torch.optim.AdamW(m.denoiser.parameters(), lr=1e-4) for m in (ssd, ddpm)}
    x0 = torch.rand(batch, 3, RES, RES, device=device) * 2 - 1
    src = lambda n: NoiseSource.from_seeds(range(n), device)
    js, ts = {}, {}  # (r(t), r(s)) -> its training steps j; its grid steps (t, s)
    for j in range(T):
        js.setdefault((process.step_res[j], process.resolution(j / T)), []).append(j)
    for t, s in zip(grid[:-1], grid[1:]):
        ts.setdefault((process.resolution(t), process.resolution(s)), []).append((t, s))
    pairs = sorted(js, key=lambda p: (-p[1], -p[0]))

    def train(module, steps=None):
        def call():
            if steps is not None:  # pin the module's step draw to these steps
                module.draw_steps = lambda n, dev: steps[torch.randint(len(steps), (n,))].to(dev)
            module.loss(x0)[0].mean().backward()
            opts[module].step()
            opts[module].zero_grad(set_to_none=True)

        return call

    def sample_step(module, r_in, r_out, t, s):
        x, t, s = torch.randn(batch, 3, r_in, r_in, device=device), full(batch, t), full(batch, s)
        kw, den, noise = {} if r_in == r_out else dict(out_resolution=r_out), module.ema.eval(), src(batch)
        return torch.no_grad()(lambda: module.process.step(x, den(x, t, None, **kw), t, s, 1.0, noise))

    def flops(net, r_in, r_out) -> int:  # of one forward of one image
        kw = {} if net is ddpm.denoiser.net else dict(out_resolution=r_out)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            net(torch.zeros(1, 3, r_in, r_in, device=device), full(1, 1.0), **kw)
        return fc.get_total_flops()

    cases = {p: train(ssd, torch.tensor(js[p])) for p in pairs}
    train_s = timed({"ddpm": train(ddpm)} | cases, device, 5, budget_s=budget_s)
    cases = {p: sample_step(ssd, *p, *ts[p][0]) for p in pairs}
    step_s = timed({"ddpm": sample_step(ddpm, RES, RES, 0.5, 0.49)} | cases, device, 5, budget_s=budget_s / 2)
    fl = {p: flops(ssd.denoiser.net, *p) for p in pairs} | {"ddpm": flops(ddpm.denoiser.net, RES, RES)}
    js["ddpm"], ts["ddpm"] = range(T), range(GRID_STEPS)
    n = count_parameters(ssd.denoiser.net) / 1e6, count_parameters(ddpm.denoiser.net) / 1e6
    print(
        f"{device.type}: small {NET['channel_mult']} at {RES}² ({n[0]:.2f} M Flexi, {n[1]:.2f} M UNet), "
        f"attention at 16², levels {process.levels}, batch {batch}, fp32; flops of one forward"
    )
    header(f"{'r(t) -> r(s)':<12}", "T steps", "grid steps", "MFLOP/img", "/ full", "train ms", "step ms")
    for p in ["ddpm", *pairs]:
        name = f"DDPM {RES}²" if p == "ddpm" else f"{p[0]} -> {p[1]}"
        cells = f"{len(js[p]):>7} | {len(ts[p]):>10} | {fl[p] / 1e6:>9.0f} | {fl[p] / fl['ddpm']:>6.1%}"
        print(f"| {name:<12} | {cells} | {train_s[p] * 1e3:>8.0f} | {step_s[p] * 1e3:>7.0f} |")
    w_train = {p: len(js[p]) / T for p in pairs}  # share of the T steps (training draws j uniformly)
    w_grid = {p: len(ts[p]) / (len(grid) - 1) for p in pairs}  # share of the grid's steps
    ratio = lambda w, v: v["ddpm"] / sum(w[p] * v[p] for p in pairs)
    print(
        f"\nSSD / DDPM speed-up (sample_grid({GRID_STEPS}) has {len(grid) - 1} steps; pixel-count bound "
        f"1 / mean_pixel_cost = 1 / {process.mean_pixel_cost():.3f})"
    )
    header(f"{'':<17}", "predicted", "measured", "pixels", "paper", f"{'target':>28}")
    for name, w, meas in (("training img/s", w_train, train_s), ("sampling per step", w_grid, step_s)):
        pred, meas = ratio(w, fl), ratio(w, meas)
        target = f">= {TARGET} × predicted {'ok' if meas >= TARGET * pred else 'MISSED'}"
        cells = f"{pred:>8.2f}× | {meas:>7.2f}× | {1 / process.mean_pixel_cost():>5.2f}× | {PAPER:>4.2f}×"
        print(f"| {name:<17} | {cells} | {target:>28} |", flush=True)


def bench_noise(device: torch.device, batch: int = 8, draws: int = 4000) -> None:
    """4: the exact change-step noise against Lanczos: speed at 32² -> 64², covariance at 8² -> 16²."""
    process = ScaleSpaceProcess(RES, LEVELS).to(device)
    src = lambda lo, n: NoiseSource.from_seeds(range(lo, lo + n), device)
    times = {process.step_res[j]: ((j + 1) / process.T, j / process.T) for j in process.change_steps()}
    r = RES // 2
    t, s = times[r]  # r(t) -> its change step's (t, s)
    tb, sb = (torch.full((batch,), v, device=device) for v in (t, s))
    x_t, x0_hat = (
        torch.randn(batch, 3, r, r, device=device),
        torch.randn(batch, 3, 2 * r, 2 * r, device=device),
    )
    exact = lambda: process.step(x_t, x0_hat, tb, sb, 1.0, src(0, batch))
    lanczos = lambda: lanczos_step(process, x_t, x0_hat, t, s, src(0, batch))
    med = timed({"exact": exact, "lanczos": lanczos}, device, repeats=5, budget_s=6.0)
    noise = exact() - posterior_mean(process, x_t, x0_hat, t, s)
    rel, speed = float((exact() - lanczos()).norm() / noise.norm()), med["lanczos"] / med["exact"]
    ok = "ok" if speed >= SPEED_TARGET else "MISSED"
    print(
        f"\nchange-step noise {RES // 2}² -> {RES}², batch {batch}, 3 channels: exact process.step "
        f"{med['exact'] * 1e3:.2f} ms, mean + Lanczos {med['lanczos'] * 1e3:.1f} ms: {speed:.1f}× "
        f"(>= {SPEED_TARGET:.0f}× {ok}); same ε: ‖exact − Lanczos‖ / ‖exact − mean‖ = {rel:.1e}"
    )
    (t, s), lo = times[process.levels[0]], process.levels[0]
    tb, sb = (torch.full((draws,), v, device=device) for v in (t, s))
    zt, z0 = (torch.zeros(draws, 1, r, r, device=device) for r in (lo, 2 * lo))  # the mean is 0
    z = {"exact": process.step(zt, z0, tb, sb, 1.0, src(0, draws))}
    z["Lanczos"] = lanczos_step(process, zt, z0, t, s, src(draws, draws))  # independent of the exact draws
    _, c, rho, s_s = coefficients(process, t, s)
    MtM = torch.kron(*[down2_matrix(2 * lo).T @ down2_matrix(2 * lo)] * 2)  # M = M₁ ⊗ M₁ (row-major)
    cov = s_s**2 * (torch.eye(MtM.shape[0], dtype=torch.float64) - rho * c**2 * MtM)
    floor = float(((cov.square().sum() + cov.trace() ** 2) / draws).sqrt() / cov.norm())
    err = lambda v: float((v.T @ v / draws - cov).norm() / cov.norm())
    errs = ", ".join(f"{k} {err(v.reshape(draws, -1).double().cpu()):.3f}" for k, v in z.items())
    print(
        f"covariance of {draws} draws at {lo}² -> {2 * lo}² (1 channel, ρc² = {rho * c**2:.3f}, "
        f"σ_s = {s_s:.3f}): relative Frobenius error {errs}; Monte Carlo floor {floor:.3f}"
    )


def main() -> None:
    load = os.getloadavg()[0]
    print(
        f"scale space: median of interleaved samples; {torch.get_num_threads()} threads, "
        f"load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    if load > torch.get_num_threads() + 0.5:
        print("warning: other processes share the CPUs; the ratios are more reliable than the times")
    for name, batch, budget_s in [("cpu", 8, 65.0)] + [("cuda", 64, 15.0)] * torch.cuda.is_available():
        bench_models(torch.device(name), batch, budget_s)  # CUDA: not run here
        bench_noise(torch.device(name))


if __name__ == "__main__":
    main()
