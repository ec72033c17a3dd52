"""Cost accounting (callbacks/cost.py): cost.json, the cost/* scalars, FLOPs = 3x forward, resume."""

from __future__ import annotations

import json
import time

import pytest
import torch
from test_dashboards import events, over  # tests/ is on sys.path
from torch.utils.flop_counter import FlopCounterMode

from callbacks.cost import KEYS, CostMeter
from callbacks.fid import Evaluate
from experiments.runner import outputs_summary, run
from freqdiff.config import load
from freqdiff.nets.presets import count_parameters

QUIET = {
    "callbacks.strips.every_n_steps": 0,
    "+callbacks.strips.at_end": False,
    "callbacks.samples.every_n_steps": 0,
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cost")
    return run(
        load("quickstart", over(tmp, **QUIET, **{"trainer.max_steps": 4, "trainer.precision": "32-true"}))
    )


def test_cost_json_has_every_field_and_flops_are_three_forwards(finished):
    run_dir, module = finished["run_dir"], finished["module"]
    cost = json.loads((run_dir / "cost.json").read_text())
    assert set(KEYS) <= set(cost)
    assert cost["params"] == count_parameters(module.denoiser) > 0  # the EMA copy is not trainable
    assert cost["step"] == 4 and cost["images_seen"] == 4 * 8 and cost["flop_steps"] == 1
    assert cost["peak_memory_bytes"] > 0 and cost["peak_memory_kind"] == "cpu_rss"
    assert cost["img_per_s"] > 0 and cost["train_seconds"] > 0
    with torch.no_grad(), FlopCounterMode(display=False) as fc:  # the network's forward on a batch of 8
        module.cpu().loss(torch.randn(8, 3, 16, 16))
    forward_per_image = fc.get_total_flops() / 8
    assert cost["flops_per_image"] == pytest.approx(3 * forward_per_image, rel=0.05)
    assert cost["flops_per_step"] == pytest.approx(8 * cost["flops_per_image"])
    # the evaluation's sampling speed
    assert cost["nfe"] and cost["sampler"].startswith("DDPMModule.sample")
    assert 0 < cost["sample_seconds"] and cost["sample_img_per_s"] == pytest.approx(
        8 / cost["sample_seconds"]
    )
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["cost"] == cost and final["sample_seconds"] == cost["sample_seconds"]
    assert final["sample_seconds"] <= final["seconds"]


def test_cost_runs_after_the_evaluation_logs_scalars_and_is_in_the_summary(finished):
    cbs = finished["trainer"].callbacks
    idx = {type(c): i for i, c in enumerate(cbs)}
    assert idx[CostMeter] > idx[Evaluate]
    acc = events(finished["run_dir"])
    for tag in ("params", "flops_per_image", "img_per_s", "peak_memory_mb", "sample_img_per_s"):
        (point,) = acc.Scalars(f"cost/{tag}")
        assert point.step == 4 and point.value > 0
    lines = outputs_summary(finished["run_dir"])
    assert any("cost.json" in line for line in lines)
    (line,) = [ln for ln in lines if ln.strip().startswith("cost ")]
    assert "M params" in line and "FLOP/img train" in line and "img/s" in line and "RSS" in line
    assert "sampling" in line and "NFE 3" in line


def _weights(out) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in out["module"].state_dict().items()}


def test_the_meter_changes_no_weight(tmp_path):
    o = over(tmp_path, **QUIET, **{"trainer.max_steps": 3})
    with_cost = load("quickstart", [*o, "run.name=with"])
    without = load("quickstart", [*o, "run.name=without"])
    with_cost.callbacks.eval = without.callbacks.eval = None  # no evaluation needed here
    without.callbacks.cost = None  # (as `cost: null` in an experiment file)
    a, b = run(with_cost), run(without)
    assert any(isinstance(c, CostMeter) for c in a["trainer"].callbacks)
    assert not any(isinstance(c, CostMeter) for c in b["trainer"].callbacks)
    assert not (b["run_dir"] / "cost.json").exists()
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert json.loads((a["run_dir"] / "cost.json").read_text())["flop_steps"] == 1


def test_resume_keeps_the_flops_and_sums_the_training_time(tmp_path):
    o = over(tmp_path, **QUIET)
    first = run(load("quickstart", [*o, "trainer.max_steps=2"]))
    c1 = json.loads((first["run_dir"] / "cost.json").read_text())
    second = run(load("quickstart", [*o, "trainer.max_steps=4"]))  # resumes (a resumable key)
    c2 = json.loads((second["run_dir"] / "cost.json").read_text())
    meter = next(c for c in second["trainer"].callbacks if isinstance(c, CostMeter))
    assert meter._measured == []  # not measured again
    assert (c2["flops_per_step"], c2["flops_per_image"]) == (c1["flops_per_step"], c1["flops_per_image"])
    assert c2["step"] == 4 and c2["images_seen"] == 32
    assert c2["train_seconds"] > c1["train_seconds"]


def test_training_time_leaves_out_the_evaluations(tmp_path, monkeypatch):
    """An evaluation (here made 3 s slower) is not training time: methods compare on training."""
    import callbacks.fid as fid

    original, marks = fid.add_generated, {}

    def slow(*a, **k):  # inside the evaluation's own clock (its record's "seconds")
        time.sleep(3.0)
        return original(*a, **k)

    def mark(name):
        def hook(self, trainer, pl_module):
            marks.setdefault(name, time.perf_counter())
            return getattr(Evaluate.__mro__[1], name)(self, trainer, pl_module)

        return hook

    monkeypatch.setattr(fid, "add_generated", slow)
    monkeypatch.setattr(Evaluate, "on_train_start", mark("on_train_start"), raising=False)
    end = Evaluate.on_train_end

    def on_train_end(self, trainer, pl_module):  # training is over before the evaluation starts
        marks["end"] = time.perf_counter()
        return end(self, trainer, pl_module)

    monkeypatch.setattr(Evaluate, "on_train_end", on_train_end)
    out = run(load("quickstart", over(tmp_path, **QUIET, **{"trainer.max_steps": 2})))
    cost = json.loads((out["run_dir"] / "cost.json").read_text())
    final = json.loads((out["run_dir"] / "final_metrics.json").read_text())
    assert final["seconds"] >= 3.0
    training = marks["end"] - marks["on_train_start"]
    assert 0 < cost["train_seconds"] <= training + 0.5  # not training + the evaluation's 3 s
    assert final["cost"]["train_seconds"] == cost["train_seconds"]
