"""Seeded per-sample noise (``NoiseSource.from_seeds``): its cost against a denoiser forward and torch.randn.

Three comparisons, each measured side by side in one process (interleaved repetitions, alternating
which case goes first, medians):

1. one sampling step's seeded noise against one denoiser forward at the same batch: the quickstart
   network (``tiny`` at 16², batch 64) and a 256² network (``small``, batch 1 on the CPU, where one
   forward takes seconds; ``base``, batch 64 on CUDA), both without the presets' 16² attention, which
   has no level at 256² (the middle block's attention stays). Target: at most 5 %.
2. on the CPU, seeded noise at 64×3×256² against unseeded ``torch.randn`` of the same shape (target
   at most 1.5×), with the former per-sample-generator approach (one CPU generator per seed, a Python
   loop, a copy to the device) for comparison; the same again on one thread, because on a machine
   shared with other jobs the multi-threaded elementwise passes wait for their second thread while the
   single-threaded ``torch.randn`` does not.
3. with CUDA, the same on the GPU (synchronised around every timing).

Ratios only: absolute times drift with the machine's load, which is printed with the table.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch

from benchmarks._timing import timed
from freqdiff.nets.presets import unet
from freqdiff.processes.noise import NoiseSource


def per_sample_generators(seeds: Sequence[int], device: torch.device) -> Callable[[tuple], torch.Tensor]:
    """The former ``from_seeds``: one seeded CPU generator per sample, a row each, copied to ``device``."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return lambda shape: torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[str]:
    """torch's intra-op threads set to n for the block (None: unchanged); yields a label for the table."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n or previous)
    try:
        yield f", {n} thread" if n else ""
    finally:
        torch.set_num_threads(previous)


def step_vs_forward(
    preset: str,  # UNet preset
    resolution: int,  # image size
    batch: int,  # samples per step
    device: torch.device,
    repeats: int,  # interleaved samples per case
    threads: int | None = None,  # torch threads for the measurement (None: as they are)
    **overrides,  # UNet keyword arguments over the preset's
) -> dict:
    """Seeded noise for one step against one forward of ``preset`` at ``resolution``, batch ``batch``."""
    torch.manual_seed(0)
    net = unet(preset, resolution=resolution, **overrides).to(device).eval()
    x = torch.randn(batch, net.in_channels, resolution, resolution, device=device)
    c_noise = torch.full((batch,), 500.0, device=device)
    source = NoiseSource.from_seeds(range(batch), device)

    def forward() -> None:
        with torch.no_grad():
            net(x, c_noise, None)

    with num_threads(threads) as where:
        t = timed({"forward": forward, "noise": lambda: source(x.shape)}, device, repeats)
    case = f"{preset} {resolution}², batch {batch}{where}: noise / forward"
    return dict(case=case, a=t["noise"], b=t["forward"], target="<= 5 %", pct=True)


def noise_vs_randn(device: torch.device, repeats: int, threads: int | None = None) -> list[dict]:
    """Seeded noise and the per-sample-generator approach against torch.randn at 64×3×256²."""
    shape = (64, 3, 256, 256)
    source = NoiseSource.from_seeds(range(shape[0]), device)
    old = per_sample_generators(range(shape[0]), device)
    with num_threads(threads) as where:
        cases = {
            "randn": lambda: torch.randn(shape, device=device),
            "seeded": lambda: source(shape),
            "generators": lambda: old(shape),
        }
        t = timed(cases, device, repeats)
    return [
        dict(case=f"64×3×256²{where}: seeded / randn", a=t["seeded"], b=t["randn"], target="<= 1.5×"),
        dict(case=f"64×3×256²{where}: per-sample generators / randn", a=t["generators"], b=t["randn"]),
    ]


def print_table(device: torch.device, rows: list[dict]) -> None:
    header = f"| {'device':<6} | {'case':<50} | {'a ms':>9} | {'b ms':>9} | {'a / b':>7} | {'target':>7} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        ratio = f"{r['a'] / r['b']:.1%}" if r.get("pct") else f"{r['a'] / r['b']:.2f}×"
        print(
            f"| {device.type:<6} | {r['case']:<50} | {r['a'] * 1e3:>9.2f} | {r['b'] * 1e3:>9.2f} | "
            f"{ratio:>7} | {r.get('target', ''):>7} |",
            flush=True,
        )


def main() -> None:
    load = os.getloadavg()[0]
    print(
        f"seeded noise: median of interleaved samples; {torch.get_num_threads()} threads, "
        f"load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    if load > torch.get_num_threads() + 0.5:
        print("warning: other processes share the CPUs; multi-threaded passes suffer most (see 1 thread)")
    cpu = torch.device("cpu")
    rows = [step_vs_forward("tiny", 16, 64, cpu, repeats=7)]
    rows += [step_vs_forward("tiny", 16, 64, cpu, repeats=7, threads=1)]
    rows += [step_vs_forward("small", 256, 1, cpu, repeats=3, attn_resolutions=())]
    rows += noise_vs_randn(cpu, repeats=7) + noise_vs_randn(cpu, repeats=5, threads=1)
    print_table(cpu, rows)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        rows = [step_vs_forward("tiny", 16, 64, gpu, repeats=7)]
        rows += [step_vs_forward("base", 256, 64, gpu, repeats=5, attn_resolutions=())]
        rows += noise_vs_randn(gpu, repeats=7)
        print_table(gpu, rows)


if __name__ == "__main__":
    main()
