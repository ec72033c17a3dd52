"""Real multi-process data checks (slow): 2-rank gloo DDP with 2 workers each; a new user's JPEG folder.

- Lightning ``strategy="ddp"`` from a script in a subprocess (docs/platform.md: plain ddp re-launches the
  whole pytest session otherwise). The script imports ``lightning`` first, before anything of this
  project, so it only works where the torchvision hook reaches every process through the venv's
  ``.pth`` file; each rank records whether the hook was installed at start-up.
- ``make shards`` as a new user runs it (the CLI underneath), on a few hundred JPEGs of mixed sizes
  made from scikit-image's bundled photographs, then the quickstart model trains at 64x64 from them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from datamodules.demo_photos import write_photo_folder
from datamodules.manifest import read_manifest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
HOOK_AT_START = any(type(f).__name__ == "_Hook" for f in sys.meta_path)  # from the venv's .pth file
import lightning as L  # raises at torchvision::nms on a CPU torch unless the hook is there

import json, os
import torch
from datamodules.webdataset import ShardDataModule

class Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.batches = {}

    def training_step(self, batch, batch_idx):
        e = self.current_epoch
        self.batches[e] = self.batches.get(e, 0) + 1
        return (batch["x0"].mean() - self.w) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

if __name__ == "__main__":
    path, out = sys.argv[1], sys.argv[2]
    dm = ShardDataModule(path, resolution=8, batch_size=4, num_workers=2, max_bad_fraction=0.2)
    probe = Probe()
    trainer = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(probe, datamodule=dm)
    skipped_train = dm.skipped["train"]
    # the exact pass runs after fit, outside Lightning's loop: ranks may get unequal batch counts
    index = [i for b in dm.eval_dataloader(batch_size=3) for i in b["index"].tolist()]
    padded = list(dm.eval_dataloader(batch_size=3, pad=True))
    rank = trainer.global_rank
    result = {
        "rank": rank,
        "hook_at_start": HOOK_AT_START,
        "torchvision_loaded": "torchvision" in sys.modules,
        "train_batches": probe.batches,
        "len_train_loader": len(dm.train_dataloader()),
        "eval_index": index,
        "padded_batches": len(padded),
        "padded_index": [i for b in padded for i in b["index"][b["mask"]].tolist()],
        "logged_skipped": float(trainer.logged_metrics.get("data/skipped", -1)),
        "skipped": {"train": skipped_train, "eval": dm.skipped["eval"]},
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
"""


@pytest.mark.slow
def test_two_process_gloo_ddp(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data_streams import N, write_set

    path = write_set(tmp_path / "set", bad={11: b"not a png"})
    script = tmp_path / "ddp_probe.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path)],
        cwd=tmp_path,  # not the repository: the project comes from the installed venv, as for a user
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    res = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [x["rank"] for x in res] == [0, 1]
    assert all(x["hook_at_start"] and x["torchvision_loaded"] for x in res)  # the .pth reached both ranks
    per_epoch = N // (4 * 2)
    assert all(x["train_batches"] == {"0": per_epoch, "1": per_epoch} for x in res)  # same count everywhere
    assert all(x["len_train_loader"] == per_epoch for x in res)
    good = [i for i in range(N) if i != 11]
    assert sorted(res[0]["eval_index"] + res[1]["eval_index"]) == good  # each sample once over both ranks
    assert sorted(res[0]["padded_index"] + res[1]["padded_index"]) == good
    assert res[0]["padded_batches"] == res[1]["padded_batches"]
    assert res[0]["skipped"]["eval"] + res[1]["skipped"]["eval"] == 1
    assert res[0]["logged_skipped"] == res[1]["logged_skipped"] >= 1  # summed over ranks, same on both


@pytest.mark.slow
def test_new_user_jpeg_folder_to_quickstart_at_64(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    write_photo_folder(photos, 300, seed=0, min_side=64, max_side=400)
    out = tmp_path / "data" / "photos64"
    cmd = [
        sys.executable,
        "-m",
        "datamodules.write_shards",
        str(photos),
        str(out),
        "--res",
        "64",
        "--workers",
        "2",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote 300 samples at [64]" in r.stdout
    m = read_manifest(out)
    assert m["count"] == 300 and m["resolutions"] == [64] and m["skipped"]["count"] == 0

    from experiments.runner import run
    from freqdiff.config import load

    monkeypatch.chdir(tmp_path)
    overrides = [f"data.path={out}", "data.resolution=64", f"run.root={tmp_path / 'runs'}"]
    overrides += ["trainer.max_steps=3", "data.batch_size=16", "module.sample_steps=2"]
    overrides += [
        "+module.net.attn_resolutions=[16]"
    ]  # the tiny preset attends at 8², absent at 64² (reported)
    cfg = load("quickstart", overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.callbacks = {}  # the data path is under test here, not the sampling callbacks
    result = run(cfg)
    dm = result["datamodule"]
    assert dm.resolution == 64 and dm.manifest["count"] == 300
    assert not (out / "train").exists()  # the quickstart's dead-leaves generator left the real set alone
    assert result["trainer"].global_step == 3
    saved = OmegaConf.load(result["run_dir"] / "config.yaml")
    assert saved.module.net.resolution == saved.module.process.resolution == 64
