"""What the framework adds to a training step: a bare PyTorch loop against ``make exp``'s own path.

Both arms step the same model (the experiment's ``DiffusionModule``, built from its config), on the
same data loader (its datamodule's), with the same precision (the runner's ``precision: auto``),
gradient clipping (``trainer.gradient_clip_val``), AdamW, warm-up schedule and EMA:

- **bare**: ``module.loss`` under autocast, backward, clipping, AdamW, the scheduler, the EMA as one
  ``torch._foreach_lerp_`` over the parameters;
- **framework**: ``experiments.runner.run`` (a Lightning ``Trainer`` with the runner's progress line,
  TensorBoard logging, cost accounting and checkpointing at their default intervals), with the
  sampling, strip and evaluation callbacks off (the same as in the bare arm: their cost is theirs).

Segments alternate (bare, framework, bare, ...), so drifts of the machine hit both; a framework
segment resumes the run of the previous one (a new ``Trainer``, as a resumed run). A step's time is
the interval between two consecutive step starts (data fetch, forward, backward, optimiser, EMA,
logging and callbacks); the first ``WARM`` steps of every segment are dropped (start-up, the FLOP
count of a new run), and the medians of the rest are compared. Target: framework / bare ≤ 1.03.
Cases: the quickstart (16², ``tiny``, batch 32) and a 64² ``small`` UNet at batch 16.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

WARM = 5  # steps dropped at the start of every segment
SEGMENTS = 3  # per arm
CASES = {
    "quickstart 16² tiny b32": (["data.resolution=16"], 40),
    "64² small b16": (
        [
            "data.resolution=64",
            "data.synthetic.resolution=64",
            "data.synthetic.n_train=2048",
            "data.synthetic.n_val=64",
            "module.net.preset=small",
            "data.batch_size=16",
        ],
        20,
    ),
}
QUIET = ("samples", "strips", "eval")  # callbacks removed in the framework arm (the bare one has none)


class StepClock(L.Callback):
    """Host time at the start of every training step."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())


def _intervals(starts: list[float]) -> list[float]:
    return [b - a for a, b in zip(starts[WARM:], starts[WARM + 1 :])]


def bare_arm(cfg, steps_per_segment: int):
    """A closure running one bare segment; returns its step intervals."""
    from experiments.runner import auto_precision
    from freqdiff.config import instantiate

    L.seed_everything(int(cfg.run.seed), verbose=False)
    dm = instantiate(cfg.data, "data")
    module = instantiate(cfg.module, "module")
    dm.setup("fit")
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    params = [p for p in module.denoiser.parameters() if p.requires_grad]
    ema = [p for p, q in zip(module.ema.parameters(), module.denoiser.parameters()) if q.requires_grad]
    bf16 = str(auto_precision("cpu")).startswith("bf16")
    clip = cfg.trainer.get("gradient_clip_val")
    batches = iter(dm.train_dataloader())

    def segment() -> list[float]:
        nonlocal batches
        starts = []
        for _ in range(steps_per_segment + WARM + 1):
            starts.append(time.perf_counter())
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(dm.train_dataloader())
                batch = next(batches)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                per_sample, _ = module.loss(batch["x0"])
            per_sample.mean().backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1 - module.ema_beta(batch["x0"].shape[0]))
        return _intervals(starts)

    return segment


def framework_arm(overrides: list[str], root: Path, steps_per_segment: int):
    from experiments.runner import run
    from freqdiff.config import load

    done = [0]

    def segment() -> list[float]:
        done[0] += steps_per_segment + WARM + 1
        clock = StepClock()
        cfg = load("quickstart", [*overrides, f"run.root={root}", f"trainer.max_steps={done[0]}"])
        for name in QUIET:
            cfg.callbacks[name] = None
        with contextlib.redirect_stdout(io.StringIO()):  # its progress line is written, not shown
            run(cfg, [clock])
        return _intervals(clock.starts)

    return segment


def bench_case(name: str, extra: list[str], steps: int, segments: int = SEGMENTS) -> dict:
    from freqdiff.config import load

    with tempfile.TemporaryDirectory() as tmp:
        # constant lr: the bare arm has no trainer whose max_steps would end quickstart.yaml's cosine
        overrides = [*extra, "module.lr_schedule=constant", f"data.path={Path(tmp) / 'data'}"]
        bare = bare_arm(load("quickstart", [*overrides, f"run.root={tmp}/bare"]), steps)
        fw = framework_arm(overrides, Path(tmp) / "runs", steps)
        times: dict[str, list[float]] = {"bare": [], "framework": []}
        for _ in range(segments):
            times["bare"] += bare()
            times["framework"] += fw()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": name, "n": {k: len(v) for k, v in times.items()}, **med}


def main() -> None:
    head = f"{'case':<26} {'bare ms/step':>13} {'framework ms/step':>18} {'framework/bare':>15}"
    print(head + "  (target <= 1.03)")
    for name, (extra, steps) in CASES.items():
        r = bench_case(name, extra, steps)
        ratio = r["framework"] / r["bare"]
        print(
            f"{name:<26} {1e3 * r['bare']:>13.1f} {1e3 * r['framework']:>18.1f} {ratio:>15.3f}"
            f"  (median of {r['n']['bare']} / {r['n']['framework']} steps)",
            flush=True,
        )


if __name__ == "__main__":
    main()
