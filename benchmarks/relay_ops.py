"""Relay Diffusion's stage-2 process (``RelayProcess``) against one training step at 256², and its NFE.

The process adds, per training step, one ``marginal`` (patch DCT blur, white noise and sliding block
noise) and, per sampling step, one or two ``blur_step``s (two patch DCTs, one IDCT and fresh noise each;
the corrector recomputes the step, and the sampler's state is float64 as in the official code). Each is
timed against one training step of the denoiser at the same batch (EDM-preconditioned loss with the
process's weight, backward, AdamW; x_t precomputed, so the step excludes the marginal), interleaved with
it (order alternating per repeat), medians: on the CPU the ``tiny`` preset at 256² without attention,
batch 2, fp32; on CUDA the paper's ``edm_relay256`` (553 M) at batch 8 in bf16 autocast around the net
only (the process math runs in full precision either way; the CUDA branch has not been run here).
Target: ``marginal`` at most 2 % of the training step. ``blur_step`` is also given per forward.

Then the NFE of the published two-stage samplers (``relay_grid``, no timing) next to a full-length
chain at 256²: EDM Heun on all the grid's points, untruncated.

Ratios only: absolute times drift with the machine's load, which is printed with the table.
"""

from __future__ import annotations

import contextlib
import os

import torch

from benchmarks._timing import timed
from freqdiff.nets.precond import Denoiser
from freqdiff.nets.presets import count_parameters, unet
from freqdiff.processes.base import NoiseSource
from freqdiff.processes.relay import RelayProcess
from freqdiff.samplers import relay_grid

TARGET = 0.02  # marginal at most 2 % of a training step
# name: (stage-1 Heun grid points at 64², stage-2 relay_grid keywords, stage-2 cfg_scale); stage 1 runs
# unguided. Stage 1: generate_celebahq.py --num_steps_first 120, generate_imagenet.py 256 (with churn).
PUBLISHED = {
    "CelebA-HQ": (120, dict(steps=150, sigma_min=0.008, sigma_max=80.0, rho=7.0, truncation=0.95), 1.0),
    "ImageNet": (256, dict(steps=200, sigma_min=0.008, sigma_max=80.0, rho=100.0, truncation=0.9), 3.5),
}


def bench(preset: str, device: torch.device, batch: int, bf16: bool = False, budget_s: float = 30.0) -> dict:
    """Median seconds of the process ops, one training step and one forward; returns a dict."""
    torch.manual_seed(0)
    res = 256
    extra = dict(attn_resolutions=[]) if preset == "tiny" else {}
    net = unet(preset, resolution=res, **extra).to(device)
    process = RelayProcess(resolution=res, patch=4, sigma_B_max=2.0, pl=0.89, block_scale=0.15).to(device)
    denoiser = Denoiser(net, process, "edm").to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    t = torch.rand(batch, device=device)
    noise = NoiseSource(torch.Generator(device=device).manual_seed(0), device)
    x_t, eps = process.marginal(x0, t, noise)
    weight = process.loss_weight(t)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    # one sampler step, as sample_relay takes it: float64 state, σ_B from blur_sigma_at, s_noise 0.2
    grid = relay_grid(150, truncation=0.95)
    sc, sn = (torch.full((batch,), v, dtype=torch.float64, device=device) for v in grid[20:22])
    bc, bn = process.blur_sigma_at(sc), process.blur_sigma_at(sn)
    xc, x0_hat = x_t.double(), (x0 + 0.1 * torch.randn_like(x0)).double()

    def train_step() -> None:
        with amp:
            loss = denoiser.loss(x0, eps, x_t, t, weight).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward() -> None:
        with torch.no_grad(), amp:
            denoiser.raw(x_t, t)

    cases = {
        "train step": train_step,
        "forward": forward,
        "marginal": lambda: process.marginal(x0, t, noise),
        "blur_step": lambda: process.blur_step(xc, x0_hat, sc, sn, bc, bn, 0.2, noise),
    }
    med = timed(cases, device, repeats=5, budget_s=budget_s)  # the process ops build no graph
    return dict(preset=preset, params=count_parameters(net), batch=batch, bf16=bf16, med=med)


def print_table(device: torch.device, r: dict) -> None:
    med = r["med"]
    train, fwd = med["train step"], med["forward"]
    where = f"{r['preset']} ({r['params'] / 1e6:.2f} M) 256², batch {r['batch']}"
    print(f"{device.type}: {where}, {'bf16 autocast (net only)' if r['bf16'] else 'fp32'}")
    header = f"| {'operation':<12} | {'ms':>9} | {'/ train step':>12} | {'/ forward':>9} | {'target':>14} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name in ("train step", "forward"):
        print(f"| {name:<12} | {med[name] * 1e3:>9.2f} | {med[name] / train:>12.1%} | {'':>9} | {'':>14} |")
    for name in ("marginal", "blur_step"):
        target = f"<= 2 % {'ok' if med[name] / train <= TARGET else 'MISSED'}" if name == "marginal" else ""
        print(
            f"| {name:<12} | {med[name] * 1e3:>9.2f} | {med[name] / train:>12.2%} | "
            f"{med[name] / fwd:>9.1%} | {target:>14} |",
            flush=True,
        )


def print_nfe() -> None:
    """NFE of the published samplers and the cost in 256²-equivalent net evaluations (a proxy)."""
    print("\nNFE of the published samplers (net evals: ×2 at 256² where CFG is on; 256²-eq. = 64² evals / 16")
    print("+ 256² evals, a pixel-count proxy for the cost, not a measurement)")
    header = (
        f"| {'sampler':<21} | {'stage-2 σ kept':>16} | {'NFE 64²':>7} | {'NFE 256²':>8} | {'CFG':>3} | "
        f"{'net evals':>9} | {'256²-eq.':>8} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, (steps1, kw, cfg) in PUBLISHED.items():
        nfe1 = 2 * steps1 - 1  # EDM Heun: the corrector doubles every point but the last
        steps, grid = kw["steps"], relay_grid(**kw)
        mult = 2 if cfg != 1 else 1
        nfe2, full = 2 * (len(grid) - 1) + 1, 2 * steps - 1  # the last point is one plain D
        rows = (
            (f"{name} relay", f"{len(grid)}/{steps} <{grid[0]:.5f}", str(nfe1), nfe2, nfe1 / 16),
            (f"{name} full 256²", f"{steps}/{steps}", "-", full, 0.0),
        )
        for label, kept, n1, n2, eq1 in rows:
            evals = (nfe1 if n1 != "-" else 0) + mult * n2
            print(
                f"| {label:<21} | {kept:>16} | {n1:>7} | {n2:>8} | {cfg:>3g} | {evals:>9} | "
                f"{eq1 + mult * n2:>8.1f} |"
            )


def main() -> None:
    load = os.getloadavg()[0]
    print(
        f"relay ops: median of interleaved samples; {torch.get_num_threads()} threads, "
        f"load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    if load > torch.get_num_threads() + 0.5:
        print("warning: other processes share the CPUs; the ratios are more reliable than the times")
    cpu = torch.device("cpu")
    print_table(cpu, bench("tiny", cpu, batch=2))
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print_table(gpu, bench("edm_relay256", gpu, batch=8, bf16=True))
    print_nfe()


if __name__ == "__main__":
    main()
