"""Paper-scale training steps on a CUDA GPU: img/s, peak memory and model FLOP utilisation (MFU).

Cases: the DDPM baseline's ``adm_celeba64`` UNet at 64² (``ddpm_celeba64``) and Relay's stage-2
``edm_relay256`` UNet at 256², bf16 autocast, batches 16-64, one training step = forward, ε-MSE,
backward, AdamW (``benchmarks.train_options.train_step``). FLOPs per step from torch's flop counter
(``FlopCounterMode``, forward + backward, matmuls and convolutions); MFU = FLOPs per second over
the device's peak dense bf16 rate (``PEAK_BF16_TFLOPS`` by device name, or
``FREQDIFF_PEAK_TFLOPS``). Target (the performance issue): MFU >= 40 % for the 256² UNet.
Without a CUDA device the benchmark says so and measures nothing (CI has none).
"""

from __future__ import annotations

import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._timing import timed
from benchmarks.train_options import build, peak_bytes, train_step
from freqdiff.nets.presets import count_parameters

CASES = [("adm_celeba64", 64, 64), ("adm_celeba64", 64, 16), ("edm_relay256", 256, 16)]
PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity)
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
}


def peak_tflops(name: str) -> float | None:
    """The peak dense bf16 TFLOP/s of a device name (longest matching entry), or the environment's."""
    env = os.environ.get("FREQDIFF_PEAK_TFLOPS")
    if env:
        return float(env)
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def step_flops(step, device: torch.device) -> int:
    """FLOPs of one call of ``step`` (forward and backward), counted by torch's flop counter."""
    with FlopCounterMode(display=False) as fc:
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return int(fc.get_total_flops())


def mfu(flops_per_step: float, sec_per_step: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak (TFLOP/s), None without a peak."""
    return None if not peak else flops_per_step / sec_per_step / (peak * 1e12)


def bench_case(preset: str, res: int, batch: int, device: torch.device, budget_s: float = 20.0) -> dict:
    net = build(preset, res, device)
    step = train_step(net, batch, res, device)
    step()  # AdamW state allocated, kernels chosen
    flops = step_flops(step, device)
    sec = timed({"step": step}, device, repeats=7, min_s=0.0, budget_s=budget_s)["step"]
    return {
        "params": count_parameters(net),
        "img_s": batch / sec,
        "peak_gib": peak_bytes(step, device) / 2**30,
        "flops": flops,
        "sec": sec,
    }


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: skipped (run `make bench` on a GPU machine for img/s, peak memory and MFU)")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name)
    print(f"{name}; peak dense bf16 {peak or 'unknown (set FREQDIFF_PEAK_TFLOPS)'} TFLOP/s; bf16 autocast")
    print(
        f"{'case':<30} {'img/s':>8} {'peak GiB':>9} {'TFLOP/step':>11} {'MFU':>6}  (target >= 0.40 at 256²)"
    )
    for preset, res, batch in CASES:
        r = bench_case(preset, res, batch, device)
        u = mfu(r["flops"], r["sec"], peak)
        label = f"{preset} {res}² b{batch} ({r['params'] / 1e6:.0f} M)"
        mfu_s = f"{u:.2f}" if u is not None else "n/a"
        print(
            f"{label:<30} {r['img_s']:>8.1f} {r['peak_gib']:>9.1f} {r['flops'] / 1e12:>11.2f} {mfu_s:>6}",
            flush=True,
        )
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
