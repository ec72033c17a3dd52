"""Experiment matrices (experiments/matrix.py): cells into fixed folders, skipped when done, resumed when
interrupted, a failing cell reported while the others run, progress lines with the matrix's ETA."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.compare import flags
from experiments.matrix import load_plan, run_matrix
from experiments.pipeline import is_pipeline
from freqdiff.config import ConfigError, load
from freqdiff.metrics.evaluator import spectral_distance_from_raps

REPO = Path(__file__).resolve().parents[1]


def tiny(tmp_path: Path, steps: int = 4) -> list[str]:
    """Overrides every cell of the test matrices gets: a tiny net on a tiny dead-leaves set."""
    o = {
        "data.path": str(tmp_path / "data" / "dl16"),
        "data.resolution": 16,
        "data.synthetic.resolution": 16,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.synthetic.n_train": 64,
        "data.synthetic.n_val": 16,
        "module.sample_steps": 2,
        "+module.net.channel_mult": "[1,2]",
        "+module.net.attn_resolutions": "[]",
        "trainer.max_steps": steps,
        "trainer.log_every_n_steps": 1,
        "run.checkpoint_every_n_steps": 2,
        "callbacks.samples.every_n_steps": 0,
        "callbacks.strips.every_n_steps": 0,
        "+callbacks.strips.at_end": False,
        "callbacks.eval.n": 8,
        "callbacks.eval.ref_n": 8,
        "callbacks.eval.swd_n": 8,
        "+callbacks.eval.bootstrap": 2,
        "callbacks.eval.panel": 0,
    }
    return [f"{k}={v}" for k, v in o.items()]


def write_matrix(tmp_path: Path, cells: dict, shared: list[str], name: str = "tiny") -> Path:
    lines = [f"matrix: {name}", "seeds: [0]", "overrides:"]
    lines += [f"  - {json.dumps(o)}" for o in shared]
    lines.append("cells:")
    for cname, (exp, own) in cells.items():
        lines.append(f"  {cname}: {{experiment: {exp}, overrides: {json.dumps(own)}}}")
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plan_names_fixed_folders_and_refuses_bad_cells(tmp_path):
    path = write_matrix(tmp_path, {"ddpm": ("quickstart", []), "edm": ("quickstart_edm", [])}, tiny(tmp_path))
    plan = load_plan(str(path), root=tmp_path / "runs")
    assert [c.name for c in plan.cells] == ["ddpm-s0", "edm-s0"]
    assert plan.cells[0].run_dir == tmp_path / "runs" / "tiny" / "quickstart" / "ddpm-s0"
    assert plan.cells[1].run_dir == tmp_path / "runs" / "tiny" / "quickstart_edm" / "edm-s0"
    assert "run.seed=0" in plan.cells[0].overrides
    # the same plan twice: the same digests (what "done" is checked against)
    again = load_plan(str(path), root=tmp_path / "runs")
    assert [c.digest for c in again.cells] == [c.digest for c in plan.cells]
    # a key no experiment has, named with its cell, before anything runs
    bad = write_matrix(tmp_path, {"ddpm": ("quickstart", ["module.nope=1"])}, [], name="bad")
    with pytest.raises(ConfigError, match=r"cells\.ddpm: unknown config key 'module\.nope'"):
        load_plan(str(bad), root=tmp_path / "runs")
    clash = write_matrix(tmp_path, {"ddpm": ("quickstart", ["run.seed=3"])}, [], name="clash")
    with pytest.raises(ConfigError, match="the matrix sets run.seed"):
        load_plan(str(clash), root=tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"LAUNCHER='nope': expected one of \['local', 'slurm'\]"):
        run_matrix(str(path), tmp_path / "runs", launcher="nope")
    # the shipped matrix files load
    for f in sorted((REPO / "experiments" / "matrices").glob("*.yaml")):
        assert load_plan(str(f), root=tmp_path / "shipped").cells


def test_default_comparison_gives_every_network_one_recipe(tmp_path):
    """quickstart.yaml alone decays its lr over 4000 steps; in `make exp` every single-stage cell trains
    1000 steps of batch 32 at a constant lr 1e-3 (the two-stage cells split the same steps)."""
    plan = load_plan(str(REPO / "experiments" / "matrices" / "quickstart.yaml"), root=tmp_path)
    single = [c for c in plan.cells if not is_pipeline(c.experiment)]
    assert {c.name for c in single} == {"ddpm-s0", "edm-s0", "blur-s0", "ssd-s0"}
    for c in single:
        cfg = load(c.experiment, c.overrides)
        recipe = (cfg.trainer.max_steps, cfg.data.batch_size, cfg.module.lr, cfg.module.get("lr_schedule"))
        assert recipe[:3] == (1000, 32, 1e-3) and recipe[3] in (None, "constant"), (c.name, recipe)


def test_matrix_runs_skips_done_cells_and_reports_a_failing_one(tmp_path):
    cells = {
        "ddpm": ("quickstart", []),
        "broken": ("quickstart", ["module.lr=-1.0"]),  # refused by the module: exit code 2
        "edm": ("quickstart_edm", []),
    }
    path = write_matrix(tmp_path, cells, tiny(tmp_path))
    out = io.StringIO()
    results = run_matrix(str(path), tmp_path / "runs", out=out)
    text = out.getvalue()
    status = {r.name: r.status for r in results}
    assert status == {"ddpm-s0": "done", "broken-s0": "failed", "edm-s0": "done"}, text
    assert "1 failed: broken-s0" in text
    assert (
        "(exit code 2: config error: module.lr: DDPMModule: lr=-1.0" in text
    )  # its own error, in the summary
    # progress lines carry the cell and the matrix's ETA
    assert re.search(r"\[cell 1/3 ddpm-s0 \| matrix eta \d+:\d\d\] (done: )?step \d+/4", text), text
    for name in ("quickstart/ddpm-s0", "quickstart_edm/edm-s0"):
        run_dir = tmp_path / "runs" / "tiny" / name
        final = json.loads((run_dir / "final_metrics.json").read_text())
        assert final["step"] == 4
    # the comparison of the finished cells, from their own files
    with open(tmp_path / "runs" / "tiny" / "compare" / "table.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"quickstart/ddpm-s0", "quickstart_edm/edm-s0"}
    assert (rows["quickstart/ddpm-s0"]["method"], rows["quickstart_edm/edm-s0"]["method"]) == (
        "DDPMModule",
        "EDMModule",
    )
    for r in rows.values():
        final = json.loads((tmp_path / "runs" / "tiny" / r["run"] / "final_metrics.json").read_text())
        cost = json.loads((tmp_path / "runs" / "tiny" / r["run"] / "cost.json").read_text())
        assert float(r["swd/avg"]) == pytest.approx(final["swd/avg"])
        assert float(r["swd/avg floor"]) == pytest.approx(final["floor"]["swd/avg"])
        assert int(r["images_seen"]) == cost["images_seen"] == 4 * 8 and int(r["params"]) == cost["params"]
    report = (tmp_path / "runs" / "tiny" / "compare" / "report.md").read_text()
    assert "| quickstart/ddpm-s0 | DDPMModule |" in report and "(floor " in report
    assert "Every run saw the same number of training images" in report
    # the plots, from the runs' own evaluations: the saved spectra are the ones the metric was computed from
    for png in ("metrics.png", "samples.png", "spectra.png"):
        img = np.asarray(Image.open(tmp_path / "runs" / "tiny" / "compare" / png))
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 10, png
        assert f"]({png})" in report
    for name in ("quickstart/ddpm-s0", "quickstart_edm/edm-s0"):
        run_dir = tmp_path / "runs" / "tiny" / name
        z = np.load(run_dir / "eval" / "final.npz")
        assert z["samples"].shape == z["real"].shape == (8, 3, 16, 16) and z["samples"].dtype == np.uint8
        final = json.loads((run_dir / "final_metrics.json").read_text())
        pa, pb = (torch.from_numpy(z[k]) for k in ("raps_samples", "raps_real"))
        assert spectral_distance_from_raps(pa, pb) == pytest.approx(final["spectral"], rel=1e-6)
    grid = np.asarray(Image.open(tmp_path / "runs" / "tiny" / "compare" / "samples.png"))
    assert grid.shape[1] > 3 * 6 * 16  # two runs and the real images, side by side
    record = json.loads((tmp_path / "runs" / "tiny" / "matrix.json").read_text())
    assert record["cells"]["broken-s0"]["returncode"] == 2
    # again: the done cells are skipped, the failed one is tried again
    out2 = io.StringIO()
    again = run_matrix(str(path), tmp_path / "runs", out=out2)
    assert {r.name: r.status for r in again} == {
        "ddpm-s0": "skipped",
        "broken-s0": "failed",
        "edm-s0": "skipped",
    }
    assert "3 cells under" in out2.getvalue() and "1 to run" in out2.getvalue()
    # a changed budget is another command: the cell runs again (and resumes its run to the new step)
    out3 = io.StringIO()
    more = run_matrix(str(path), tmp_path / "runs", extra=["trainer.max_steps=6"], out=out3)
    assert {r.name: r.status for r in more}["ddpm-s0"] == "done"
    assert "resuming from step 4" in out3.getvalue()


def test_an_interrupted_cell_resumes_from_its_checkpoint(tmp_path):
    # the first checkpoint at step 50, the next 50 steps later: the kill lands between them
    shared = [*tiny(tmp_path, steps=400), "run.checkpoint_every_n_steps=50"]
    path = write_matrix(tmp_path, {"ddpm": ("quickstart", [])}, shared)
    run_dir = tmp_path / "runs" / "tiny" / "quickstart" / "ddpm-s0"
    cmd = [sys.executable, "-m", "experiments.matrix", str(path), "--root", str(tmp_path / "runs")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 240
        while not ckpt.is_file():  # killed as soon as it has a checkpoint, long before step 400
            assert proc.poll() is None, "the matrix ended before it was interrupted"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the matrix and its cell, with no chance to clean up
        proc.wait()
    status = (
        json.loads((tmp_path / "runs" / "tiny" / "matrix.json").read_text())
        if (tmp_path / "runs" / "tiny" / "matrix.json").is_file()
        else {"cells": {}}
    )
    assert status["cells"].get("ddpm-s0", {}).get("status") != "done"
    out = io.StringIO()
    results = run_matrix(str(path), tmp_path / "runs", extra=["trainer.max_steps=60"], out=out)
    assert results[0].status == "done", out.getvalue()
    assert "resuming from step 50" in out.getvalue(), out.getvalue()
    assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 60


def test_runs_trained_or_evaluated_differently_are_flagged():
    same = {"images_seen": 32000, "n": 500, "ref": "val500@ab"}
    rows = [{"run": "a", **same}, {"run": "b", **same}]
    assert flags(rows) == []
    rows[1] = {**rows[1], "images_seen": 16000, "n": 250}
    out = flags(rows)
    assert out == [
        "not comparable on training images: a: 32000, b: 16000",
        "not comparable on evaluated samples: a: 500, b: 250",
    ]
    rows[0] = {**rows[0], "images_seen": None}  # no cost.json: not silently "the same"
    assert flags(rows)[0] == "training images unknown for: a"
