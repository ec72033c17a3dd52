"""Two-process gloo DDP training (slow): per-rank t and noise, a rank-shared generator, resumable streams.

Runs ``DDPMModule`` under Lightning ``strategy="ddp"`` from a script in a subprocess (plain ddp would
re-launch the pytest session). Each rank records the times and the first noise values it trained
on, and draws from ``generator(shared=True)``; a second pair of runs stops at step 2, then resumes
from its checkpoint to step 4, and must draw exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    from lightning_modules.ddpm import DDPMModule
    from freqdiff.nets.presets import unet
    from freqdiff.processes.gaussian import GaussianProcess
    from freqdiff.timesteps import UniformTime

    class Record(L.Callback):
        def __init__(self):
            self.t, self.eps, self.shared = {}, {}, {}

        def on_train_start(self, trainer, m):
            sampler, marginal = m.time_sampler, m.process.marginal

            def rec_t(n, generator=None, device="cpu", process=None):
                t = sampler(n, generator=generator, device=device, process=process)
                self.t[trainer.global_step] = t.tolist()
                return t

            def rec_marginal(x0, t, noise):
                x_t, eps = marginal(x0, t, noise)
                self.eps[trainer.global_step] = eps.flatten(1)[:, :3].tolist()
                return x_t, eps

            m.time_sampler, m.process.marginal = rec_t, rec_marginal

        def on_train_batch_start(self, trainer, m, batch, batch_idx):
            g = m.generator(shared=True)
            self.shared[trainer.global_step] = torch.rand(2, generator=g).tolist()

    def fit(max_steps, out, ckpt_in=None, ckpt_out=None):
        torch.manual_seed(0)
        net = unet("tiny", resolution=8, channel_mult=(1, 2), attn_resolutions=(4,))
        m = DDPMModule(net, GaussianProcess(resolution=8), UniformTime(), seed=7)
        data = [{"x0": torch.rand(3, 8, 8) * 2 - 1} for _ in range(64)]
        loader = torch.utils.data.DataLoader(data, batch_size=4)
        rec = Record()
        tr = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=max_steps, logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                       callbacks=[rec])
        tr.fit(m, loader, ckpt_path=ckpt_in)
        if ckpt_out:
            tr.save_checkpoint(ckpt_out)
        with open(f"{out}.rank{tr.global_rank}.json", "w") as f:
            json.dump({"t": rec.t, "eps": rec.eps, "shared": rec.shared, "nimg": int(m.nimg)}, f)

    if __name__ == "__main__":
        d = sys.argv[1]
        fit(4, f"{d}/straight")
        fit(2, f"{d}/first", ckpt_out=f"{d}/split.ckpt")
        fit(4, f"{d}/second", ckpt_in=f"{d}/split.ckpt")
    """
)


@pytest.mark.slow
def test_ddp_ranks_draw_their_own_streams_and_resume_them(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = {
        (name, r): json.loads((tmp_path / f"{name}.rank{r}.json").read_text())
        for name in ("straight", "first", "second")
        for r in (0, 1)
    }
    s0, s1 = rec["straight", 0], rec["straight", 1]
    assert s0["nimg"] == s1["nimg"] == 4 * 4 * 2  # 4 steps of 4 images on each of 2 ranks
    for step in "0123":
        assert s0["t"][step] != s1["t"][step]  # distinct per-rank times ...
        assert s0["eps"][step] != s1["eps"][step]  # ... and noise
        assert s0["shared"][step] == s1["shared"][step]  # the shared generator agrees across ranks
    assert s0["shared"]["0"] != s0["shared"]["1"]
    for r in (0, 1):  # resume continues the same streams, with no saved generator state
        straight, first, second = rec["straight", r], rec["first", r], rec["second", r]
        assert sorted(first["t"]) == ["0", "1"] and sorted(second["t"]) == ["2", "3"]
        for step in "0123":
            part = first if step in first["t"] else second
            assert part["t"][step] == straight["t"][step]
            assert part["eps"][step] == straight["eps"][step]
