"""Blur diffusion's basis operations (``BlurProcess``) against one training step of a 64² UNet.

The blur adds, per training step, one forward marginal (two basis transforms of the batch and the
per-coefficient factors in float64) and, per sampling step, one reverse step (``step``: the exact
posterior, η = 1, or its deterministic form, η = 0; ``predictor_step``: the paper's reverse-diffusion
predictor; each three or four transforms). Each is timed against one training step (forward + ε MSE
+ backward + AdamW) of a UNet at the same batch, interleaved with it (order alternating per repeat),
medians: on the CPU the ``small`` preset at 64², batch 16, fp32; on CUDA the paper's ``adm_blur64``
(121 M) at batch 16 in bf16 autocast (the blur math runs in full precision either way). Target: each
operation at most 2 % of the training step. The sampling rows also give the share of one denoiser
forward (what a sampling step costs besides the blur).

Ratios only: absolute times drift with the machine's load, which is printed with the table.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from benchmarks._timing import timed
from freqdiff.nets.presets import count_parameters, unet
from freqdiff.processes.base import NoiseSource
from freqdiff.processes.blur import BlurProcess

TARGET = 0.02  # at most 2 % of a training step


def bench(
    preset: str,  # UNet preset of the training step
    device: torch.device,
    batch: int = 16,
    resolution: int = 64,
    bf16: bool = False,  # bf16 autocast around the net (and the blur ops, as in bf16-mixed training)
    repeats: int = 7,
    budget_s: float = 30.0,
) -> dict:
    """Median seconds of the blur operations, one training step and one forward; returns a dict."""
    torch.manual_seed(0)
    net = unet(preset, resolution=resolution).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    process = BlurProcess(resolution=resolution).to(device)  # the paper's blur: gaussian, quartic 0.15
    x0 = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    t = torch.rand(batch, device=device).clamp(min=1e-3)
    s = (t - 1e-3).clamp(min=0)
    g = torch.Generator(device=device).manual_seed(0)
    train_noise = NoiseSource(g, device)
    x_t, eps = process.marginal(x0, t, train_noise)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    eps_hat = eps + 0.1 * torch.randn_like(eps)
    sample_noise = NoiseSource.from_seeds(range(batch), device)
    c_noise = 1000.0 * t
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def train_step() -> None:
        with amp:
            x, e = process.marginal(x0, t, train_noise)
            out = net(x, c_noise)
        (out.float() - e).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward() -> None:
        with torch.no_grad(), amp:
            net(x_t, c_noise)

    def op(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad(), amp:
                return fn()

        return call

    cases = {
        "train step": train_step,
        "forward": forward,
        "marginal": op(lambda: process.marginal(x0, t, train_noise)),
        "step η=1": op(lambda: process.step(x_t, x0_hat, t, s, 1.0, sample_noise)),
        "step η=0": op(lambda: process.step(x_t, x0_hat, t, s, 0.0, sample_noise)),
        "predictor_step": op(lambda: process.predictor_step(x_t, eps_hat, t, s, sample_noise)),
    }
    med = timed(cases, device, repeats=repeats, budget_s=budget_s)
    return dict(preset=preset, params=count_parameters(net), batch=batch, res=resolution, bf16=bf16, med=med)


def print_table(device: torch.device, r: dict) -> None:
    med = r["med"]
    train, fwd = med["train step"], med["forward"]
    where = f"{r['preset']} ({r['params'] / 1e6:.2f} M) {r['res']}², batch {r['batch']}"
    print(f"{device.type}: {where}, {'bf16 autocast' if r['bf16'] else 'fp32'}")
    header = f"| {'operation':<16} | {'ms':>9} | {'/ train step':>12} | {'/ forward':>9} | {'target':>14} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name in ("train step", "forward"):
        print(f"| {name:<16} | {med[name] * 1e3:>9.2f} | {med[name] / train:>12.1%} | {'':>9} | {'':>14} |")
    for name in ("marginal", "step η=1", "step η=0", "predictor_step"):
        ok = "ok" if med[name] / train <= TARGET else "MISSED"
        per_fwd = "" if name == "marginal" else f"{med[name] / fwd:.1%}"
        print(
            f"| {name:<16} | {med[name] * 1e3:>9.2f} | {med[name] / train:>12.2%} | {per_fwd:>9} | "
            f"{f'<= 2 % {ok}':>14} |",
            flush=True,
        )


def main() -> None:
    load = os.getloadavg()[0]
    print(
        f"blur ops: median of interleaved samples; {torch.get_num_threads()} threads, "
        f"load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    if load > torch.get_num_threads() + 0.5:
        print("warning: other processes share the CPUs; the ratios are more reliable than the times")
    cpu = torch.device("cpu")
    print_table(cpu, bench("small", cpu, repeats=5))
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print_table(gpu, bench("adm_blur64", gpu, bf16=True, repeats=7))


if __name__ == "__main__":
    main()
