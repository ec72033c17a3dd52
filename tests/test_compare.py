"""The comparison report (experiments/compare.py, compare_plots.py) and the default matrix it serves:
a pipeline's cost is all its stages', a matrix root compares its own cells only, and the default
`make exp` matrix gives every method the same data, network, optimiser, budget and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.compare import collect, find_runs
from experiments.matrix import load_plan
from experiments.pipeline import is_pipeline, load_pipeline, write_pipeline_metrics
from freqdiff.config import load


def _run(d: Path, target: str, cost: dict | None, final: dict | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"experiment: x\nmodule:\n  _target_: {target}\n")
    if cost is not None:
        (d / "cost.json").write_text(json.dumps(cost))
    if final is not None:
        (d / "final_metrics.json").write_text(json.dumps(final))
    return d


COST1 = {"params": 100, "images_seen": 1000, "train_seconds": 10.0, "flops_per_image": 2e6}
COST2 = {"params": 300, "images_seen": 3000, "train_seconds": 30.0, "flops_per_image": 6e6}


def test_a_pipeline_costs_all_its_stages_and_compares_as_one_run(tmp_path):
    s1 = _run(
        tmp_path / "relay" / "stage1" / "c-s0",
        "lightning_modules.edm.EDMModule",
        {**COST1, "peak_memory_bytes": 5},
    )
    s2 = _run(
        tmp_path / "relay" / "stage2" / "c-s0",
        "lightning_modules.relay.RelayModule",
        {**COST2, "peak_memory_bytes": 7},
    )
    record = {"n": 500, "nfe": 61, "sampler": "RelayModule.sample", "metrics": {"swd/avg": 40.0}}
    record["floor"], record["spread"] = {"swd/avg": 30.0}, {"swd/avg": 1.5}
    path = write_pipeline_metrics(s2, record, {"stage1": s1, "stage2": s2})
    cost = json.loads(path.read_text())["cost"]
    assert (cost["params"], cost["images_seen"], cost["train_seconds"]) == (400, 4000, 40.0)
    assert cost["flops_per_image"] == pytest.approx((2e6 * 1000 + 6e6 * 3000) / 4000)  # weighted by images
    assert cost["img_per_s"] == pytest.approx(100.0) and cost["peak_memory_bytes"] == 7
    assert cost["nfe"] == 61
    # CPU memory: the process that ran the evaluation counts too (a single-stage run's peak includes its own)
    import resource

    for d in (s1, s2):
        c = json.loads((d / "cost.json").read_text())
        (d / "cost.json").write_text(json.dumps({**c, "peak_memory_kind": "cpu_rss"}))
    cost = json.loads(write_pipeline_metrics(s2, record, {"stage1": s1, "stage2": s2}).read_text())["cost"]
    assert cost["peak_memory_bytes"] >= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > 7
    # a single-stage run beside it, with the same budget
    _run(
        tmp_path / "ddpm" / "c-s0",
        "lightning_modules.ddpm.DDPMModule",
        {**COST1, "images_seen": 4000},
        {"n": 500, "swd/avg": 45.0, "floor": {"swd/avg": 30.0}, "spread": {"swd/avg": 2.0}},
    )
    rows = {r["run"]: r for r in collect(tmp_path)}
    assert set(rows) == {"relay/stage2/c-s0", "ddpm/c-s0"}  # the stage-1 folder is not a run of its own
    relay = rows["relay/stage2/c-s0"]
    assert relay["method"] == "RelayModule (2 stages)" and relay["images_seen"] == 4000
    assert relay["swd/avg"] == 40.0 and relay["swd/avg floor"] == 30.0 and relay["nfe"] == 61


def test_a_matrix_root_compares_its_own_cells_only(tmp_path, monkeypatch):
    root = tmp_path / "runs" / "m"
    final = {"n": 8, "swd/avg": 1.0, "floor": {"swd/avg": 0.5}}
    _run(root / "m" / "b-s0", "m.A", COST1, final)  # experiment "m" in matrix "m": runs/m/m/b-s0
    _run(root / "e" / "a-s0", "m.A", COST1, final)
    _run(root / "default", "m.B", COST1, final)  # another run that happens to lie under the same folder
    assert len(find_runs(root)) == 3
    cells = {"b-s0": {"run_dir": "runs/m/m/b-s0"}, "a-s0": {"run_dir": "runs/m/e/a-s0"}}  # as recorded
    (root / "matrix.json").write_text(json.dumps({"matrix": "m", "cells": cells}))
    for cwd in (tmp_path, root):  # where the matrix ran, and anywhere else
        monkeypatch.chdir(cwd)
        assert [d.resolve() for d in find_runs(root)] == [root / "m" / "b-s0", root / "e" / "a-s0"]


def _stages(cell) -> list:
    if is_pipeline(cell.experiment):
        return list(load_pipeline(cell.experiment, cell.overrides)[1].values())
    return [load(cell.experiment, cell.overrides)]


def test_the_default_matrix_compares_the_methods_fairly(tmp_path):
    plan = load_plan("quickstart", root=tmp_path)
    names = {"ddpm-s0", "edm-s0", "blur-s0", "relay-s0", "ssd-s0", "cascade-s0"}
    assert {c.name for c in plan.cells} == names
    methods, evals = set(), []
    for cell in plan.cells:
        stages = _stages(cell)
        methods.add(stages[-1].module._target_)
        last = stages[-1].data  # null: the data's own (16)
        assert (last.resolution or last.synthetic.resolution) == 16, cell.name  # one output resolution
        images = 0
        for cfg in stages:  # the same data, network, optimiser and EMA for every network
            assert cfg.data.path == "data/deadleaves16x8" and cfg.data.batch_size == 32, cell.name
            net = cfg.module.net
            assert net.preset == "tiny" and list(net.attn_resolutions) == [], cell.name
            assert cfg.module.lr == 1e-3 and cfg.module.ema_halflife_kimg == 5.0, cell.name
            images += cfg.trainer.max_steps * cfg.data.batch_size
        assert images == 32000, cell.name  # one budget; Relay's and the cascade's two stages share it
        if is_pipeline(cell.experiment):
            e = load_pipeline(cell.experiment, cell.overrides)[0].evaluate
            evals.append((e.n, e.ref_n, e.ref_split, e.swd_n, e.swd_min_res))
        else:
            e = stages[0].callbacks.eval
            evals.append((e.n, e.ref_n, e.split, e.swd_n, e.swd_min_res))
    assert len(methods) == 6  # six modules, not one method under six names
    assert set(evals) == {(500, 500, "val", 500, 8)}  # one evaluation
    # FID is opt-in: make exp FID=1
    fid = load_plan("quickstart", root=tmp_path, fid=True)
    for cell in fid.cells:
        assert (
            "evaluate.fid=true" if is_pipeline(cell.experiment) else "callbacks.eval.fid=true"
        ) in cell.overrides


def test_evaluations_during_training_are_placed_at_their_images_and_seconds(tmp_path):
    from experiments.compare_plots import history, plot_metrics

    cost = {"step": 4, "params": 1, "images_seen": 32, "train_seconds": 10.0, "flops_per_image": 1.0}
    final = {"step": 4, "n": 8, "swd/avg": 2.0, "floor": {"swd/avg": 1.0}, "spread": {"swd/avg": 0.1}}
    d = _run(tmp_path / "e" / "a-s0", "m.A", cost, final)
    (d / "eval").mkdir()
    recs = [{"step": 2, "metrics": {"swd/avg": 3.0}}, {"step": 4, "metrics": {"swd/avg": 2.0}}]
    (d / "eval" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (row,) = collect(tmp_path)
    h = history(tmp_path, row)
    assert [(p["x_images"], p["x_seconds"], p["swd/avg"]) for p in h] == [(16, 5.0, 3.0), (32, 10.0, 2.0)]
    assert plot_metrics(tmp_path, [row], tmp_path / "m.png").stat().st_size > 1000


def test_make_exp_runs_the_default_matrix_and_one_experiment_on_request():
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def last(*args: str) -> str:
        out = subprocess.run(
            ["make", "-n", "--no-print-directory", "-C", str(root), "exp", *args],
            capture_output=True,
            text=True,
        )
        return out.stdout.strip().splitlines()[-1].strip()

    assert last().endswith("-m experiments.matrix quickstart --launcher local")
    assert last("FID=1").endswith("-m experiments.matrix quickstart --launcher local --fid")
    assert last("EXP=quickstart_ssd").endswith("-m experiments run quickstart_ssd")
    assert last("RUN=runs/x/y").endswith('-m experiments resume "runs/x/y"')


def test_the_spectra_plot_sets_each_run_against_the_data_at_its_own_resolution(tmp_path):
    """A matrix may mix resolutions (16² cells, a 32² Relay cell): each spectrum has its own bins."""
    import numpy as np

    from experiments.compare_plots import plot_spectra

    rows = []
    for name, bins in (("a16", 9), ("b32", 17), ("c32", 17)):
        d = tmp_path / name / "eval"
        d.mkdir(parents=True)
        f = np.arange(bins, dtype=float)
        np.savez(d / "final.npz", raps_samples=1.0 / (1 + f) ** 2, raps_real=1.5 / (1 + f) ** 2)
        rows.append({"run": name, "method": "M"})
    path = plot_spectra(tmp_path, rows, tmp_path / "spectra.png")
    assert path is not None and path.is_file() and path.stat().st_size > 10_000
