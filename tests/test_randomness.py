"""Per-rank training randomness, resumable streams, and image counts under gradient accumulation.

- t and ε come from ``DiffusionModule.generator()``, seeded by (seed, rank, global step, micro-batch):
  a run interrupted and resumed draws exactly what the uninterrupted run drew (no saved RNG state).
- With ``accumulate_grad_batches = k`` every micro-batch counts: nimg and the EMA decay of an
  optimiser step equal those of the same global batch without accumulation.
(The two-process test that ranks draw different streams is in test_ddp_training.py, marked slow.)
"""

from __future__ import annotations

import lightning as L
import pytest
from test_training import tiny_overrides

from experiments.runner import run
from freqdiff.config import load
from freqdiff.rng import derive_seed


class RecordTimes(L.Callback):
    """Wraps the module's time sampler to record (global step, t) of every training draw."""

    def __init__(self):
        self.draws: dict[int, list[float]] = {}

    def on_train_start(self, trainer, pl_module):
        inner = pl_module.time_sampler

        def recording(n, generator=None, device="cpu", process=None):
            t = inner(n, generator=generator, device=device, process=process)
            self.draws.setdefault(trainer.global_step, []).extend(t.tolist())
            return t

        pl_module.time_sampler = recording


class RecordStep(L.Callback):
    def __init__(self):
        self.nimg, self.beta = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if hasattr(pl_module, "_last_ema_beta") and len(self.nimg) < trainer.global_step:
            self.nimg.append(int(pl_module.nimg))
            self.beta.append(pl_module._last_ema_beta)


def _quiet(tmp_path, **extra):
    base = {"callbacks.samples.every_n_steps": 0, "callbacks.strips.every_n_steps": 0}
    base.update(extra)
    return tiny_overrides(tmp_path, **base)


def test_derive_seed_separates_coordinates():
    seeds = {derive_seed(0, "train", r, s, 0) for r in range(4) for s in range(50)}
    assert len(seeds) == 200
    assert derive_seed(0, "train", 1, 2, 0) != derive_seed(0, "train", 2, 1, 0)
    assert derive_seed(0, "shared", 5, 0) == derive_seed(0, "shared", 5, 0)
    assert derive_seed(0, "train", 0, 0, 0) != derive_seed(1, "train", 0, 0, 0)
    assert derive_seed("stage2_x1") != derive_seed("stage2_x2")  # every byte of a string counts


def test_resumed_run_continues_the_same_time_and_noise_streams(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    straight = RecordTimes()
    run(load("quickstart", _quiet(tmp_path, **{"run.name": "straight"})), callbacks=[straight])
    first = RecordTimes()
    run(
        load("quickstart", _quiet(tmp_path, **{"run.name": "split", "trainer.max_steps": 2})),
        callbacks=[first],
    )
    second = RecordTimes()
    run(load("quickstart", _quiet(tmp_path, **{"run.name": "split"})), callbacks=[second])
    assert sorted(first.draws) == [0, 1] and sorted(second.draws) == [2, 3]
    for step in range(4):
        part = first.draws.get(step) or second.draws[step]
        assert part == pytest.approx(straight.draws[step], abs=0)
    assert straight.draws[0] != straight.draws[1]  # each step draws afresh


def test_gradient_accumulation_counts_every_micro_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    whole, accum = RecordStep(), RecordStep()
    run(
        load(
            "quickstart",
            _quiet(tmp_path, **{"run.name": "whole", "trainer.max_steps": 3, "data.batch_size": 8}),
        ),
        callbacks=[whole],
    )
    run(
        load(
            "quickstart",
            _quiet(
                tmp_path,
                **{
                    "run.name": "accum",
                    "trainer.max_steps": 3,
                    "data.batch_size": 4,
                    "+trainer.accumulate_grad_batches": 2,
                },
            ),
        ),
        callbacks=[accum],
    )
    assert whole.nimg == accum.nimg == [8, 16, 24]
    assert whole.beta == pytest.approx(accum.beta)
    # the half-life with ramp-up: 0.5 ** (batch / min(halflife, rampup * nimg))
    assert whole.beta[1] == pytest.approx(0.5 ** (8 / (0.05 * 16)))


def test_fixed_ema_decay_per_step():
    from freqdiff.nets.presets import unet
    from freqdiff.processes.gaussian import GaussianProcess
    from freqdiff.timesteps import UniformTime
    from lightning_modules.ddpm import DDPMModule

    net = unet("tiny", resolution=8, channel_mult=(1, 2), attn_resolutions=(4,))
    m = DDPMModule(net, GaussianProcess(resolution=8), UniformTime(), ema_decay=0.9999)
    assert m.ema_beta(64) == 0.9999 and m.ema_beta(1024) == 0.9999
    with pytest.raises(ValueError, match="ema_decay"):
        DDPMModule(net, GaussianProcess(resolution=8), UniformTime(), ema_decay=1.5)


def test_ema_update_is_the_lerp_of_every_parameter():
    import torch

    from freqdiff.nets.presets import unet
    from freqdiff.processes.gaussian import GaussianProcess
    from freqdiff.timesteps import UniformTime
    from lightning_modules.ddpm import DDPMModule

    net = unet("tiny", resolution=8, channel_mult=(1, 2), attn_resolutions=())
    m = DDPMModule(net, GaussianProcess(resolution=8), UniformTime(), ema_decay=0.9)
    with torch.no_grad():
        for p in m.denoiser.parameters():
            p.add_(torch.randn_like(p))
    before = [e.clone() for e in m.ema.parameters()]
    m._update_ema(64)
    pairs = zip(m.ema.parameters(), before, m.denoiser.parameters())
    for e, e0, p in pairs:  # one fused lerp: ema = 0.9 ema + 0.1 p, parameter by parameter
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * p, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(e, e0) for e, e0 in zip(m.ema.parameters(), before))
