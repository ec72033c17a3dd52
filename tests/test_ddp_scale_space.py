"""Two-process gloo DDP training of Scale Space Diffusion (slow): every rank runs the same resolution.

The step j of a batch comes from the rank-shared generator, so both ranks train at one resolution each
step (their per-element steps and noise still differ); the Flexi-UNet's unused levels need
``ddp_find_unused_parameters_true``.
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
    from freqdiff.nets.flexi_unet import flexi
    from freqdiff.processes.scale_space import ScaleSpaceProcess
    from lightning_modules.scale_space import ScaleSpaceModule

    class Record(L.Callback):
        def __init__(self):
            self.res, self.t = {}, {}

        def on_train_start(self, trainer, m):
            marginal = m.process.marginal

            def rec(x0, t, noise):
                x_t, eps = marginal(x0, t, noise)
                self.res[trainer.global_step], self.t[trainer.global_step] = x_t.shape[-1], t.tolist()
                return x_t, eps

            m.process.marginal = rec

    torch.manual_seed(0)
    net = flexi("tiny", resolution=8, channel_mult=(1, 2), attn_resolutions=[])
    m = ScaleSpaceModule(net, ScaleSpaceProcess(resolution=8, levels=2), seed=3)
    data = [{"x0": torch.rand(3, 8, 8) * 2 - 1} for _ in range(256)]
    rec = Record()
    tr = L.Trainer(strategy="ddp_find_unused_parameters_true", devices=2, accelerator="cpu", max_steps=24,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[rec])
    tr.fit(m, torch.utils.data.DataLoader(data, batch_size=4))
    with open(f"{sys.argv[1]}/rank{tr.global_rank}.json", "w") as f:
        json.dump({"res": rec.res, "t": rec.t}, f)
    """
)


@pytest.mark.slow
def test_ddp_ranks_train_the_same_resolution_every_step(tmp_path):
    script = tmp_path / "ddp_ssd.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert sorted(r0["res"]) == sorted(r1["res"]) and len(r0["res"]) == 24
    assert r0["res"] == r1["res"]  # the same resolution on both ranks, every step
    assert set(r0["res"].values()) == {4, 8}  # and both resolutions occur
    assert any(r0["t"][k] != r1["t"][k] for k in r0["t"])  # the ranks' own steps still differ
