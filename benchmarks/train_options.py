"""The backbone options a user may switch on, each against the plain eager UNet on the same weights.

- **gradient checkpointing** (``module.net.checkpoint=true``): time per training step and peak
  memory of the step, for the paper-scale UNets (``adm_celeba64`` at 64²; with CUDA also
  ``edm_relay256``, Relay's 552 M stage-2 net, at 256²);
- **channels-last** (``module.net.channels_last=true``): time per training step;
- **torch.compile** (``module.compile_backbone=true``): compilation time, then time per step.

A training step is forward (bf16 autocast where the device computes it natively, as ``precision:
auto``), ε-MSE, backward and AdamW. Times: ``benchmarks._timing.timed`` (arms interleaved, medians).
Peak memory above the memory held before the step: on CUDA ``torch.cuda.max_memory_allocated``; on
the CPU the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs`` after
``malloc_trim`` returns freed pages), the smaller of two steps. Parameters, gradients and AdamW
state are allocated before the measurement (one warm-up step), so the figure is the step's
activations and temporaries. Ratios only; absolute times drift with the machine's load.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import re
import time
from collections.abc import Callable

import torch

from benchmarks._timing import timed
from freqdiff.nets.presets import count_parameters, unet

CPU = {
    "checkpoint": [("small", 64, 8), ("adm_celeba64", 64, 4)],
    "channels_last": [("small", 64, 8)],
    "compile": [("tiny", 16, 32)],
}
CUDA = {
    "checkpoint": [("adm_celeba64", 64, 64), ("edm_relay256", 256, 16)],
    "channels_last": [("adm_celeba64", 64, 64), ("edm_relay256", 256, 16)],
    "compile": [("adm_celeba64", 64, 64)],
}


def bf16_native(device: torch.device) -> bool:
    from experiments.runner import auto_precision

    return str(auto_precision(device.type)).startswith("bf16")


def build(preset: str, res: int, device: torch.device, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    try:
        return unet(preset, resolution=res, **kw).to(device)
    except ValueError:  # the preset's attention resolutions do not exist at this size
        return unet(preset, resolution=res, attn_resolutions=(), **kw).to(device)


def train_step(net: torch.nn.Module, batch: int, res: int, device: torch.device) -> Callable[[], None]:
    """One forward/backward/AdamW step of ``net`` on a fixed random batch."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, net.in_channels, res, res, device=device)
    c = 1000 * torch.rand(batch, device=device)
    bf16 = bf16_native(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(x, c)
        (out.float() - x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory of one call of ``fn`` above the memory held before it (module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def bench_checkpoint(preset: str, res: int, batch: int, device: torch.device, budget_s: float = 30.0) -> dict:
    net = build(preset, res, device)
    step = train_step(net, batch, res, device)

    def arm(on: bool) -> Callable[[], None]:
        def go() -> None:
            net.checkpoint = on
            step()

        return go

    arms = {"off": arm(False), "on": arm(True)}
    sec = timed(arms, device, repeats=5, min_s=0.0, budget_s=budget_s)
    mem = {k: min(peak_bytes(fn, device) for _ in range(2)) for k, fn in arms.items()}
    return {"params": count_parameters(net), "sec": sec, "mem": mem}


def bench_channels_last(
    preset: str, res: int, batch: int, device: torch.device, budget_s: float = 30.0
) -> dict:
    plain = build(preset, res, device)
    nhwc = build(preset, res, device, channels_last=True)
    arms = {"off": train_step(plain, batch, res, device), "on": train_step(nhwc, batch, res, device)}
    return {
        "params": count_parameters(plain),
        "sec": timed(arms, device, repeats=5, min_s=0.0, budget_s=budget_s),
    }


def bench_compile(preset: str, res: int, batch: int, device: torch.device, budget_s: float = 30.0) -> dict:
    eager = build(preset, res, device)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    arms = {"off": train_step(eager, batch, res, device), "on": train_step(compiled, batch, res, device)}
    t0 = time.perf_counter()
    arms["on"]()  # compiles forward and backward
    compile_s = time.perf_counter() - t0
    sec = timed(arms, device, repeats=5, min_s=0.0, budget_s=budget_s)
    return {"params": count_parameters(eager), "sec": sec, "compile_s": compile_s}


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = CUDA if device.type == "cuda" else CPU
    prec = "bf16" if bf16_native(device) else "fp32"
    print(f"device {device}, {prec}, {torch.get_num_threads()} threads; training step = fwd + bwd + AdamW")
    print(
        f"\n{'gradient checkpointing':<34} {'time on/off':>11} {'peak MiB off':>13} {'on':>8} {'on/off':>7}"
    )
    for preset, res, batch in cases["checkpoint"]:
        r = bench_checkpoint(preset, res, batch, device)
        name = f"{preset} {res}² b{batch} ({r['params'] / 1e6:.1f} M)"
        off, on = (r["mem"][k] / 2**20 for k in ("off", "on"))
        ratio = r["sec"]["on"] / r["sec"]["off"]
        print(f"{name:<34} {ratio:>11.2f} {off:>13.0f} {on:>8.0f} {on / off:>7.2f}", flush=True)
    print(f"\n{'channels-last':<34} {'time on/off':>11}")
    for preset, res, batch in cases["channels_last"]:
        r = bench_channels_last(preset, res, batch, device)
        name = f"{preset} {res}² b{batch} ({r['params'] / 1e6:.1f} M)"
        print(f"{name:<34} {r['sec']['on'] / r['sec']['off']:>11.2f}", flush=True)
    print(f"\n{'torch.compile':<34} {'time on/off':>11} {'compile s':>10}")
    for preset, res, batch in cases["compile"]:
        r = bench_compile(preset, res, batch, device)
        name = f"{preset} {res}² b{batch} ({r['params'] / 1e6:.1f} M)"
        print(f"{name:<34} {r['sec']['on'] / r['sec']['off']:>11.2f} {r['compile_s']:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
