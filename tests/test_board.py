"""The method-comparison layout (experiments/board_layout.py, docs/dashboards.md "Comparing methods"):
its charts, its events file, and a real TensorBoard serving it over two fake runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tb_server import get_json, tensorboard_server  # tests/ is on sys.path
from torch.utils.tensorboard import SummaryWriter

from experiments.board_layout import CATEGORIES, LAYOUT_RUN, comparison_layout, main, write_layout

RUNS = {  # run -> tag -> {step: value}
    "a/default": {
        "eval/swd/avg": {10: 3.5, 20: 2.25, 30: 1.5},
        "train/loss": {0: 0.9, 10: 0.5, 20: 0.25},
        "train/loss_t0": {0: 0.1, 10: 0.05},
    },
    "b/default": {
        "eval/swd/avg": {10: 4.0, 20: 3.0, 30: 2.5},
        "train/loss": {0: 1.0, 10: 0.75, 20: 0.5},
    },
}


def fake_runs(root: Path) -> Path:
    for run, tags in RUNS.items():
        with SummaryWriter(str(root / run)) as w:
            for tag, series in tags.items():
                for step, value in series.items():
                    w.add_scalar(tag, value, step)
    return root


def events_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if "tfevents" in p.name)


def charts(layout_json: dict) -> dict[str, list[tuple[str, list[str]]]]:
    return {
        c["title"]: [(ch["title"], ch["multiline"]["tag"]) for ch in c.get("chart", [])]
        for c in layout_json.get("category", [])
    }


# ---------------------------------------------------------------------------------- the layout
def test_one_multiline_chart_per_metric_titled_by_it():
    layout = comparison_layout()
    assert [c.title for c in layout.category] == ["compare: evaluation", "compare: training", "compare: cost"]
    got = {c.title: [(ch.title, list(ch.multiline.tag)) for ch in c.chart] for c in layout.category}
    assert got["compare: evaluation"][1] == ("eval/swd/avg", ["eval/swd/avg"])
    assert [t for t, _ in got["compare: evaluation"]] == [
        "eval/spectral",
        "eval/swd/avg",
        "eval/swd/16",
        "eval/swd/8",
        "eval/swd/32",
        "eval/fid",
    ]
    assert got["compare: training"][0] == ("train/loss", ["train/loss$"])
    assert [t for t, _ in got["compare: cost"]] == [
        "cost/flops_per_image",
        "cost/img_per_s",
        "cost/sample_img_per_s",
        "cost/peak_memory_mb",
    ]
    assert all(len(tags) == 1 for cat in got.values() for _, tags in cat)
    assert {c: [r for _, (r,) in v] for c, v in got.items()} == CATEGORIES

    # the plugin's matching: re.match, anchored at the start only
    def matches(regex):
        tags = ["train/loss", "train/loss_t0", "train/lr", "train/lr/0", "eval/swd/8", "eval/floor/fid"]
        tags += ["cost/img_per_s", "cost/sample_img_per_s", "perf/img_per_s", "eval/fid"]
        return [t for t in tags if re.match(regex, t)]

    assert matches("train/loss$") == ["train/loss"]  # not the per-quartile losses
    assert matches("train/lr") == ["train/lr", "train/lr/0"]  # one line per param group
    assert matches("cost/img_per_s") == ["cost/img_per_s"]
    assert matches("eval/fid") == ["eval/fid"]  # not the floor


def test_write_layout_is_one_events_file_of_its_own_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    folder = write_layout(tmp_path / "runs")
    assert folder == tmp_path / "runs" / LAYOUT_RUN
    first = events_files(folder)
    assert len(first) == 1
    assert write_layout(tmp_path / "runs") == folder
    second = events_files(folder)
    assert len(second) == 1 and list(folder.iterdir()) == second  # no temporary file left either
    assert second != first  # a new file replaced the old one

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    assert acc.Tags()["scalars"] == [] and acc.Tags()["tensors"] == [metadata.CONFIG_SUMMARY_TAG]
    (point,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(point.tensor_proto.string_val[0])
    assert layout == comparison_layout()


def test_the_cli_writes_the_layout_and_prints_the_url(tmp_path, capsys):
    main([str(tmp_path), "--port", "6123"])
    assert len(events_files(tmp_path / LAYOUT_RUN)) == 1
    assert "comparison charts: http://127.0.0.1:6123/#custom_scalars" in capsys.readouterr().out


# ------------------------------------------------------------------------------ a real TensorBoard
@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """TensorBoard over two fake runs and the layout; yields (base URL, logdir)."""
    root = fake_runs(tmp_path_factory.mktemp("board") / "runs")
    write_layout(root)
    write_layout(root)  # rewriting: still one layout

    def ready(base: str) -> bool:
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
        return all("eval/swd/avg" in tags.get(r, {}) for r in RUNS) and bool(layout)

    log = tmp_path_factory.mktemp("board_log") / "tensorboard.log"
    with tensorboard_server(root, log, ready, what="both runs' eval/swd/avg and the layout") as base:
        yield base, root


def test_tensorboard_serves_the_layout_and_every_runs_series_for_a_chart(board):
    base, root = board
    assert len(events_files(root / LAYOUT_RUN)) == 1
    layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
    got = charts(layout)
    assert list(got) == list(CATEGORIES)  # ours, once: no other run carries a layout
    assert ("eval/swd/avg", ["eval/swd/avg"]) in got["compare: evaluation"]
    assert got == charts(
        {
            "category": [
                {"title": k, "chart": [{"title": r.rstrip("$"), "multiline": {"tag": [r]}} for r in v]}
                for k, v in CATEGORIES.items()
            ]
        }
    )

    runs = get_json(f"{base}/data/runs")
    assert set(RUNS) <= set(runs) and LAYOUT_RUN in runs

    def series(run: str, regex: str) -> dict:
        q = urllib.parse.urlencode({"run": run, "tag": regex})
        body = get_json(f"{base}/data/plugin/custom_scalars/scalars?{q}")
        assert body["regex_valid"] is True
        # each event is [wall time, step, value]
        return {tag: {s[1]: s[2] for s in ev} for tag, ev in body["tag_to_events"].items()}

    for run, tags in RUNS.items():  # the chart's regex, asked of each run: both runs' lines in one chart
        got = series(run, "eval/swd/avg")
        assert list(got) == ["eval/swd/avg"]
        assert got["eval/swd/avg"] == pytest.approx(tags["eval/swd/avg"])
        loss = series(run, "train/loss$")
        assert list(loss) == ["train/loss"] and loss["train/loss"] == pytest.approx(tags["train/loss"])
    assert series(LAYOUT_RUN, "eval/swd/avg") == {}  # the layout's run adds no line
    assert set(series("a/default", "train/loss")) == {"train/loss", "train/loss_t0"}  # why the `$`


# ------------------------------------------------------------------------------ headless browser
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


@pytest.mark.slow
def test_the_custom_scalars_page_renders_in_a_headless_browser(board, tmp_path):
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None:
        pytest.skip(f"no chromium/chrome found: none of {', '.join(BROWSERS)} is on PATH")
    base, _ = board
    png = tmp_path / "custom_scalars.png"
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--screenshot={png}",
        "--window-size=1400,900",
        "--virtual-time-budget=15000",
        f"{base}/#custom_scalars",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert png.stat().st_size > 5000
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (900, 1400)
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"a near-blank page: {len(colours)} colours"
    print(f"screenshot: {png} ({len(colours)} colours)")
