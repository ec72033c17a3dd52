"""What a user sees: ``--dry`` shows the resolution the run will use, and a short run's terminal output."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from test_training import tiny_overrides as training_overrides

from callbacks.progress import ProgressLine, _LineConsole, format_line, hms
from datamodules.manifest import ShardWriter, make_manifest, sample_dict, write_manifest
from experiments.__main__ import main
from experiments.runner import flatten, quiet_libraries, resolve_data, run
from freqdiff.config import load


def tiny_overrides(tmp_path: Path, **extra) -> list[str]:
    """test_training's tiny run, but data.resolution stays null (read from the data) and the bar is on."""
    o = {
        "data.synthetic.n_train": 64,
        "module.sample_steps": 2,
        "trainer.enable_progress_bar": True,
        "callbacks.samples.every_n_steps": 0,
        "callbacks.eval.n": 8,
        "callbacks.eval.ref_n": 8,
        "callbacks.eval.swd_n": 8,
        "callbacks.eval.panel": 8,
        **extra,
    }
    return [x for x in training_overrides(tmp_path, **o) if not x.startswith("data.resolution=")]


def dry(capsys, *overrides: str) -> tuple[str, dict]:
    assert main(["run", "quickstart", *overrides, "--dry"]) == 0
    out = capsys.readouterr().out
    first, _, body = out.partition("\n")
    return first, flatten(OmegaConf.to_container(OmegaConf.create(body)))


def resolutions(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if k.endswith("resolution") and k != "data.synthetic.resolution"}


def test_dry_run_shows_the_generators_resolution_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "fresh"
    first, flat = dry(capsys, f"data.path={data}", "data.synthetic.resolution=8")
    assert first == "# data.resolution: 8 (from the synthetic generator's settings; no data written)"
    res = resolutions(flat)
    assert len(res) >= 3 and set(res.values()) == {8}, res  # data, module.net, module.process ...
    assert not data.exists() and list(tmp_path.iterdir()) == []


def test_dry_run_reads_an_existing_manifest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "real"
    rng = np.random.default_rng(0)
    with ShardWriter(data, shard_size=4) as w:
        for i in range(4):
            w.write(sample_dict(i, {r: rng.integers(0, 256, (r, r, 3), dtype=np.uint8) for r in (8, 12)}))
    write_manifest(data, make_manifest(count=w.count, resolutions=[8, 12], channels=3, shards=w.shards))
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    first, flat = dry(capsys, f"data.path={data}")  # data.synthetic stays (resolution 16): ignored
    assert first.startswith("# data.resolution: 12 (the largest in the manifest of ")
    assert set(resolutions(flat).values()) == {12}
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before
    # the real run peeks the same way
    cfg, source = resolve_data(load("quickstart", [f"data.path={data}"]), "quickstart", [f"data.path={data}"])
    assert cfg.data.resolution == 12 and source.startswith("the largest in the manifest")


def test_progress_line_format_is_stable():
    line = format_line(step=40, max_steps=200, loss=0.041234, img_per_s=1234.5, elapsed=65, eta=3722)
    assert line == "step 40/200 (20%)  loss 0.0412  1,234 img/s  elapsed 1:05  eta 1:02:02"
    done = format_line(step=200, max_steps=200, loss=0.03, img_per_s=8.456, elapsed=600, eta=None, done=True)
    assert done == "done: step 200/200 (100%)  loss 0.0300  8.46 img/s  elapsed 10:00"
    assert format_line(step=1, max_steps=0, loss=None, img_per_s=None, elapsed=0, eta=None) == (
        "step 1  loss -  - img/s  elapsed 0:00  eta -"
    )
    assert hms(None) == hms(float("nan")) == "-"


def test_tty_line_is_cleared_before_other_output(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    console = _LineConsole(out, err)
    console.install()
    console.draw("step 1/4")
    print("hello")  # through the proxy: the line is erased first
    console.draw("step 2/4")
    console.uninstall(keep=True)
    assert sys.stdout is out and sys.stderr is err
    assert out.getvalue() == "\rstep 1/4\x1b[K\r\x1b[Khello\n\rstep 2/4\x1b[K\n"


def test_short_run_terminal(tmp_path, monkeypatch, capfd):
    """Header, one plain progress line per 10 % (stdout is no TTY here), the summary; no library noise."""
    monkeypatch.chdir(tmp_path)
    over = tiny_overrides(tmp_path)
    with quiet_libraries():
        cfg, source = resolve_data(load("quickstart", over), "quickstart", over)
        out = run(cfg, data_note=source)
    assert sum(isinstance(c, ProgressLine) for c in out["trainer"].callbacks) == 1
    text, err = capfd.readouterr()
    run_dir = out["run_dir"]
    assert f"run folder  {run_dir}  (new run)" in text
    assert re.search(
        r"^module      DDPMModule: [\d,]+ trainable parameters \([\d.]+ M\), EMA [\d,]+$", text, re.M
    )
    assert "data        16x16 px (from the synthetic generator's settings), batch 8 per device" in text
    assert re.search(
        r"^step 4/4 \(100%\)  loss \d+\.\d{4}  [\d.,]+ img/s  elapsed \d+:\d\d  eta 0:00$", text, re.M
    )
    assert re.search(r"^done: step 4/4 \(100%\)  loss \d+\.\d{4}  ", text, re.M)
    assert "  metrics     final_metrics.json, eval/metrics.jsonl" in text
    for noise in ("litlogger", "litmodels", "FLOPs", "v_num", "Epoch", "GPU available", "LeafSpec"):
        assert noise not in text + err, noise
