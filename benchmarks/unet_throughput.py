"""Training-step throughput of the ADM UNet presets (Dhariwal & Nichol 2021): fp32 against bf16 autocast.

One step = forward + eps-style MSE loss + backward + AdamW step, batch 64, for the ``tiny`` and ``small``
presets at 16² and 32². The two precisions share the net and the optimiser and are timed interleaved
(alternating which goes first), each sample a few steps long, median of several samples after warm-up,
so the bf16/fp32 ratio is measured under the same machine conditions. docs/platform.md has reference numbers.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from freqdiff.nets.presets import count_parameters, unet

CASES = (("tiny", 16), ("tiny", 32), ("small", 16), ("small", 32))
MODES = ("fp32", "bf16")


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, bf16: bool) -> None:
    c_noise = 1000.0 * torch.rand(x.shape[0])
    eps = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = net(x + eps, c_noise)
    loss = (out.float() - eps).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_case(preset: str, resolution: int, batch: int, repeats: int, sample_s: float) -> dict:
    """img/s per mode (median over ``repeats`` interleaved samples of about ``sample_s`` seconds)."""
    torch.manual_seed(0)
    net = unet(preset, resolution=resolution)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, net.in_channels, resolution, resolution)
    step_s = {}
    for mode in MODES:  # warm-up (allocator, kernels), and a step time to size the samples
        train_step(net, opt, x, mode == "bf16")
        t0 = time.perf_counter()
        train_step(net, opt, x, mode == "bf16")
        step_s[mode] = time.perf_counter() - t0
    steps = max(1, round(sample_s / max(step_s.values())))
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(repeats):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(net, opt, x, mode == "bf16")
            rates[mode].append(steps * batch / (time.perf_counter() - t0))
    med = {m: statistics.median(v) for m, v in rates.items()}
    spread = {m: (max(v) - min(v)) / med[m] for m, v in rates.items()}
    return dict(
        preset=preset, res=resolution, params=count_parameters(net), steps=steps, med=med, spread=spread
    )


def main(batch: int = 64, repeats: int = 5, sample_s: float = 0.6) -> None:
    print(
        f"UNet training step (fwd + bwd + AdamW), batch {batch}, {torch.get_num_threads()} threads, "
        f"median of {repeats} interleaved samples (spread = (max - min) / median)"
    )
    header = (
        f"| {'preset':<6} | {'res':>3} | {'params':>7} | {'fp32 img/s':>10} | {'bf16 img/s':>10} | "
        f"{'bf16/fp32':>9} | {'spread fp32/bf16':>16} |"
    )
    load = os.getloadavg()[0]
    if load > torch.get_num_threads() + 0.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs; other processes skew the numbers")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for preset, res in CASES:
        r = bench_case(preset, res, batch, repeats, sample_s)
        fp32, bf16 = r["med"]["fp32"], r["med"]["bf16"]
        spread = f"{r['spread']['fp32']:.0%} / {r['spread']['bf16']:.0%}"
        print(
            f"| {preset:<6} | {res:>3} | {r['params'] / 1e6:>6.2f}M | {fp32:>10.1f} | {bf16:>10.1f} | "
            f"{bf16 / fp32:>8.2f}x | {spread:>16} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
