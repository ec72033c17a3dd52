"""A method-comparison layout for TensorBoard's Custom Scalars tab (docs/dashboards.md, "Comparing methods").

``comparison_layout()`` is one multiline chart per metric; ``write_layout(logdir)`` writes it as the
only events file of the run ``<logdir>/.layout/`` (a run of its own with no scalars), so one
TensorBoard over ``runs/`` shows, under ``#custom_scalars``, every run's value of a metric in one
chart. ``python -m experiments.board_layout LOGDIR [--port PORT]`` writes it and prints the URL
(what ``make board`` runs before TensorBoard).

How the plugin (``tensorboard/plugins/custom_scalar/custom_scalars_plugin.py``) reads it:

- ``/data/plugin/custom_scalars/layout`` reads the tag ``custom_scalars__config__`` of every run,
  in sorted run order, and *merges* them: the first becomes the layout, a later run's category with
  a title already seen has its charts appended (exact duplicates skipped), other categories are
  appended. No layout "wins"; ``.layout`` sorts before the usual run names, so ours comes first.
  Nothing else in the project writes a layout, so ours is the only one.
- ``/data/plugin/custom_scalars/scalars?run=RUN&tag=REGEX`` returns, for one run, every scalar tag
  for which ``re.match(REGEX, tag)`` holds (anchored at the start only, hence ``train/loss$`` to
  leave out ``train/loss_t0..3``; ``train/lr`` also matches ``train/lr/<group>``). The chart asks
  this of every run selected in the run list and plots all of them in one chart, so the same metric
  of all methods and runs shares one chart; ``.layout`` has no scalars and adds no line.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from tensorboard.summary.writer.record_writer import RecordWriter

LAYOUT_RUN = ".layout"  # the run folder under the logdir that holds the layout (and nothing else)
DEFAULT_PORT = 6006

# category title -> the charts' tag regexes (each chart's title is its regex's metric)
CATEGORIES: dict[str, list[str]] = {
    "compare: evaluation": [
        "eval/spectral",
        "eval/swd/avg",
        "eval/swd/16",
        "eval/swd/8",
        "eval/swd/32",
        "eval/fid",
    ],
    "compare: training": ["train/loss$", "train/grad_norm", "train/lr", "perf/img_per_s"],
    "compare: cost": [
        "cost/flops_per_image",
        "cost/img_per_s",
        "cost/sample_img_per_s",
        "cost/peak_memory_mb",
    ],
}


def _title(regex: str) -> str:
    return regex.rstrip("$")


def comparison_layout() -> layout_pb2.Layout:
    """The Custom Scalars layout: per category, one multiline chart per metric (title: the metric)."""
    return layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title=title,
                chart=[
                    layout_pb2.Chart(title=_title(r), multiline=layout_pb2.MultilineChartContent(tag=[r]))
                    for r in regexes
                ],
            )
            for title, regexes in CATEGORIES.items()
        ]
    )


def _layout_event(layout: layout_pb2.Layout, wall_time: float) -> event_pb2.Event:
    """The event the plugin reads (as ``torch.utils.tensorboard.summary.custom_scalars`` builds it)."""
    tensor = tensor_pb2.TensorProto(
        dtype="DT_STRING",
        string_val=[layout.SerializeToString()],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
    )
    value = summary_pb2.Summary.Value(
        tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor, metadata=metadata.create_summary_metadata()
    )
    return event_pb2.Event(wall_time=wall_time, step=0, summary=summary_pb2.Summary(value=[value]))


def write_layout(logdir: Path, layout: layout_pb2.Layout | None = None) -> Path:
    """Write ``layout`` (default: ``comparison_layout()``) as the one events file of ``<logdir>/.layout/``.

    The file is written under a name TensorBoard ignores (no "tfevents" in it), renamed into place
    (atomic on one filesystem), and only then are the folder's older files removed: a board reading
    the folder meanwhile sees a complete layout, and rewriting leaves one events file. Returns the
    folder. (A board already running keeps the layout it read; restart it to see a changed one.)
    """
    folder = Path(logdir) / LAYOUT_RUN
    folder.mkdir(parents=True, exist_ok=True)
    old = [p for p in folder.iterdir() if p.is_file()]
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{time.time_ns():d}.freqdiff_layout"
    tmp = folder / f".tmp-{os.getpid()}-{time.time_ns()}"
    start = event_pb2.Event(wall_time=now, file_version="brain.Event:2")
    with tmp.open("wb") as f:
        writer = RecordWriter(f)
        for event in (start, _layout_event(layout or comparison_layout(), now)):
            writer.write(event.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    final = folder / name
    os.replace(tmp, final)
    for p in old:
        if p != final:
            p.unlink(missing_ok=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the method-comparison layout into a TensorBoard logdir.")
    ap.add_argument("logdir", type=Path, help="the folder TensorBoard is started over (e.g. runs)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", DEFAULT_PORT)))
    args = ap.parse_args(argv)
    folder = write_layout(args.logdir)
    print(f"layout written to {folder}")
    print(f"comparison charts: http://127.0.0.1:{args.port}/#custom_scalars")


if __name__ == "__main__":
    main()
