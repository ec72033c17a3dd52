"""Sampling throughput of ``make sample`` against a bare PyTorch loop of the same sampler.

Both arms sample ``n`` images from one run's EMA network (a run trained for two steps: the weights do
not change the cost), with the same NFE, batch size and precision (the run's ``precision: auto``:
bf16 autocast around the backbone where the device computes it natively), and write them as one uint8
``.npz``:

- **framework**: ``experiments.evaluate.sample_run`` (what ``make sample`` runs): it loads the
  checkpoint, draws the start noise and every step's noise per sample from the seeds (``NoiseSource``),
  runs ``sample_ancestral`` with the Denoiser's preconditioning and the process's step in fp32
  outside autocast (the precision policy), and writes a chunk atomically;
- **bare**: the backbone called directly in a hand-written DDIM-η loop over a table of the schedule's
  (a, σ) computed once, ``torch.randn`` noise from one global generator, the same EDM / ε
  preconditioning written out, ``np.savez`` at the end.

Before timing, the bare loop is checked to be the same sampler: started from the framework's start
noise with η = 0 it must give the framework's images (``same_sampler``). The arms alternate
(``benchmarks._timing.timed``) and the medians are compared. Target: framework / bare img/s ≥ 0.95.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks._timing import timed

AT64 = ["data.resolution=64", "data.synthetic.resolution=64", "data.batch_size=8"]
CASES = {  # name -> (overrides of the quickstart, n, batch, steps, eta)
    "quickstart 16² tiny, DDIM 50": (["data.resolution=16"], 256, 64, 50, 0.0),
    "quickstart 16² tiny, DDPM 50 (η=1)": (["data.resolution=16"], 256, 64, 50, 1.0),
    "64² small, DDIM 10": ([*AT64, "module.net.preset=small"], 32, 32, 10, 0.0),
}
CUDA_CASES = {  # with a GPU: larger batches, and the DDPM baseline's paper-scale 64² UNet
    "quickstart 16² tiny, DDIM 50": (["data.resolution=16"], 8192, 1024, 50, 0.0),
    "quickstart 16² tiny, DDPM 50 (η=1)": (["data.resolution=16"], 8192, 1024, 50, 1.0),
    "64² adm_celeba64, DDIM 50": ([*AT64, "module.net.preset=adm_celeba64"], 1024, 256, 50, 0.0),
}


def train_run(overrides: list[str], root: Path) -> Path:
    """A run folder with a checkpoint: the quickstart with ``overrides``, two training steps, no callbacks."""
    from experiments.runner import run
    from freqdiff.config import load

    small_data = ["data.synthetic.n_train=256", "data.synthetic.n_val=64"]  # the data do not change the cost
    where = [f"run.root={root}", f"data.path={root / 'data'}", "trainer.max_steps=2"]
    cfg = load("quickstart", [*small_data, *overrides, *where])
    for name in ("samples", "strips", "eval"):
        cfg.callbacks[name] = None
    with contextlib.redirect_stdout(io.StringIO()):
        run(cfg)
    return root / "quickstart" / "default"


class BareSampler:
    """DDIM-η with the run's EMA backbone, written out in plain torch (module docstring)."""

    def __init__(self, run: Path, steps: int, eta: float, device: torch.device):
        from experiments.evaluate import autocast_for
        from freqdiff.checkpoints import load_run

        module, cfg = load_run(str(run), map_location="cpu")
        den = module.ema.to(device).eval()
        self.net, self.prediction, self.sigma_data = den.net, den.prediction, den.sigma_data
        self.autocast = lambda: autocast_for(cfg.trainer.get("precision"), device)
        self.shape = (module.channels, module.process.resolution(0.0), module.process.resolution(0.0))
        self.eta, self.device = float(eta), device
        grid = torch.tensor([1 - i / steps for i in range(steps + 1)])
        a, sigma = module.process.scalings(grid)
        self.table = list(zip(grid.tolist(), a.tolist(), sigma.tolist()))

    def x0_hat(self, x: torch.Tensor, t: float, a: float, sigma: float) -> torch.Tensor:
        B = x.shape[0]
        if self.prediction == "edm":  # Karras et al. Table 1 on x/a with σ = sigma/a
            sig, sd = sigma / a, self.sigma_data
            c_skip, c_out, c_in = (
                sd**2 / (sig**2 + sd**2),
                sig * sd / (sig**2 + sd**2) ** 0.5,
                1 / (sig**2 + sd**2) ** 0.5,
            )
            with self.autocast():
                F = self.net(c_in * x / a, torch.full((B,), np.log(sig) / 4, device=x.device))
            return c_skip * x / a + c_out * F.float()
        with self.autocast():
            F = self.net(x, torch.full((B,), 1000.0 * t, device=x.device))
        return (x - sigma * F.float()) / a  # ε-prediction

    @torch.no_grad()
    def sample(self, x: torch.Tensor) -> torch.Tensor:
        for (t, a_t, s_t), (_, a_s, s_s) in itertools.pairwise(self.table):
            x0 = self.x0_hat(x, t, a_t, s_t)
            eps = (x - a_t * x0) / s_t
            c2 = self.eta**2 * max(s_t**2 - (a_t / a_s) ** 2 * s_s**2, 0.0) * s_s**2 / s_t**2
            x = a_s * x0 + max(s_s**2 - c2, 0.0) ** 0.5 * eps
            if c2 > 0:
                x = x + c2**0.5 * torch.randn_like(x)
        return x

    def __call__(self, n: int, batch: int, out: Path) -> None:
        images = []
        for i in range(0, n, batch):
            x = self.sample(torch.randn(min(batch, n - i), *self.shape, device=self.device))
            images.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        np.savez(out, images=torch.cat(images).numpy())


def same_sampler(run: Path, steps: int, device: torch.device, n: int = 4) -> float:
    """Max |framework − bare| over ``n`` images, η = 0, from the framework's start noise ([-1, 1])."""
    from experiments.evaluate import autocast_for
    from freqdiff.checkpoints import load_run
    from freqdiff.processes.noise import NoiseSource

    module, cfg = load_run(str(run), map_location="cpu")
    module = module.to(device).eval()
    seeds = list(range(n))
    with autocast_for(cfg.trainer.get("precision"), device):
        ref = module.sample(seeds, steps=steps, eta=0.0)
    bare = BareSampler(run, steps, 0.0, device)
    shape = (n, *bare.shape)
    x = module.process.prior(shape, NoiseSource.from_seeds(seeds, device))
    return float((bare.sample(x) - ref).abs().max())


def bench_case(
    overrides: list[str], n: int, batch: int, steps: int, eta: float, budget_s: float = 60.0
) -> dict:
    from experiments.evaluate import sample_run

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="freqdiff-bench-") as tmp:
        tmp = Path(tmp)
        run = train_run(overrides, tmp)
        gap = same_sampler(run, min(steps, 10), device)
        bare, count = BareSampler(run, steps, eta, device), itertools.count()

        def framework() -> None:
            out = tmp / f"fw{next(count)}"
            with contextlib.redirect_stdout(io.StringIO()):
                sample_run(
                    str(run),
                    n=n,
                    chunk=n,
                    batch_size=batch,
                    steps=steps,
                    eta=eta,
                    workers=1,
                    out=str(out),
                    progress=False,
                )

        def bare_arm() -> None:
            bare(n, batch, tmp / f"bare{next(count)}.npz")

        sec = timed(
            {"bare": bare_arm, "framework": framework}, device, repeats=5, min_s=0.0, budget_s=budget_s
        )
    return {"gap": gap, "bare": n / sec["bare"], "framework": n / sec["framework"], "nfe": steps}


def main() -> None:
    print(f"{'case':<36} {'bare img/s':>10} {'framework img/s':>16} {'framework/bare':>15}  (target >= 0.95)")
    cases = CUDA_CASES if torch.cuda.is_available() else CASES
    for name, (overrides, n, batch, steps, eta) in cases.items():
        r = bench_case(overrides, n, batch, steps, eta)
        ratio = r["framework"] / r["bare"]
        print(
            f"{name:<36} {r['bare']:>10.1f} {r['framework']:>16.1f} {ratio:>15.3f}"
            f"  (n {n}, batch {batch}, NFE {r['nfe']}; same sampler: max gap {r['gap']:.1e})",
            flush=True,
        )


if __name__ == "__main__":
    main()
