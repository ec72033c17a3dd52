"""The plots of the comparison report (``experiments.compare``): PNGs under ``<RUNS>/compare/``.

- ``metrics.png``: one row per metric that has a real-vs-real floor (spectral distance, SWD per
  level and average, FID when computed); left, the metric against training images seen; right,
  against training wall-clock (``cost.json``'s ``train_seconds``, evaluation time excluded). Each run
  is a line through its evaluations (``<run>/eval/metrics.jsonl``; a pipeline: its one record) with
  the bootstrap spread as error bars; an evaluation at step s is placed at s / steps of the run's
  images and seconds (constant throughput). Where every run was evaluated once at the same budget
  (the default matrix), the images column shows the runs side by side at that budget. The dashed
  line is the floor: what two real sets of the same n score, the best any model can read.
- ``samples.png``: 36 real images of the reference, then the first 36 evaluated samples of every run
  (the seeds 0..35 of its evaluation), three panels per row.
- ``spectra.png``: left, the mean radially averaged power spectrum of every run's samples and of the
  reference images (log-log; bin i = i cycles per image); right, samples / data: 1 where a run
  reproduces the data's power at that frequency, below 1 where its samples are too smooth.

Samples and spectra come from ``<run>/eval/final.npz`` (``callbacks.reference.write_eval_arrays``),
written by every evaluation; a run without it is left out of those two plots and says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from experiments.compare import read_json, record_of

GRID = 36  # samples per run in samples.png (6 x 6)
PER_ROW = 3  # panels per row of samples.png


def _label(row: dict[str, Any]) -> str:
    return f"{Path(row['run']).name} ({row['method']})"


def history(root: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's evaluations, oldest first, each with its metrics at top level and ``x_images`` /
    ``x_seconds`` (where it lies in training images and training seconds)."""
    run_dir = root / row["run"]
    records = []
    jsonl = run_dir / "eval" / "metrics.jsonl"
    if jsonl.is_file() and not (run_dir / "pipeline_metrics.json").is_file():
        for line in jsonl.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                records.append(
                    {"step": rec.get("step"), **rec.get("metrics", {}), "spread": rec.get("spread")}
                )
    if not records:  # a pipeline, or a run without the log: its final record
        final, _ = record_of(run_dir)
        records = [{**final, "step": None}]
    by_step = {}  # a resumed run may have evaluated the same step twice: keep the last
    for r in records:
        by_step[r["step"]] = r
    cost = read_json(run_dir / "cost.json")
    last = cost.get("step") or max((s for s in by_step if s is not None), default=None)
    out = []
    for step, r in by_step.items():
        frac = 1.0 if step is None or not last else step / last
        r = dict(r)
        r["x_images"] = None if row.get("images_seen") is None else row["images_seen"] * frac
        r["x_seconds"] = None if row.get("train_s") is None else row["train_s"] * frac
        out.append(r)
    return sorted(out, key=lambda r: r["x_images"] or 0)


def _metrics(rows: list[dict[str, Any]]) -> list[str]:
    return [
        k for k in dict.fromkeys(k for r in rows for k in r if f"{k} floor" in r) if not k.endswith(" floor")
    ]


def plot_metrics(root: Path, rows: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _metrics(rows)
    if not metrics:
        return None
    hist = {r["run"]: history(root, r) for r in rows}
    # one budget and one evaluation per run: the images axis is the runs side by side at that budget
    at = {h.get("x_images") for hs in hist.values() for h in hs}
    one_budget = len(at) == 1 and all(len(hs) == 1 for hs in hist.values())
    height = 2.8 * len(metrics) + 1.0  # inches: a row per metric, and the title and legend above
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, height), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    axes_x = (("x_images", "training images seen"), ("x_seconds", "training seconds"))
    for i, m in enumerate(metrics):
        for j, (xkey, xlabel) in enumerate(axes_x):
            ax, runs_side = axes[i][j], one_budget and j == 0
            for k, r in enumerate(rows):
                pts = [h for h in hist[r["run"]] if _num(h.get(m)) and h.get(xkey) is not None]
                if not pts:
                    continue
                xs = [k] if runs_side else [p[xkey] for p in pts]
                err = [(p.get("spread") or {}).get(m) or 0.0 for p in pts]
                style = dict(marker="o", ms=5, capsize=3, color=colors[k % len(colors)], label=_label(r))
                ax.errorbar(xs, [p[m] for p in pts], yerr=err, **style)
            floors = [r.get(f"{m} floor") for r in rows if r.get(f"{m} floor") is not None]
            if floors:
                ax.axhline(floors[0], ls="--", color="0.4", lw=1, label="floor (real vs real)")
            if runs_side:
                ax.set_xticks(range(len(rows)), [Path(r["run"]).name for r in rows], fontsize=8)
                xlabel = f"run (each at {next(iter(at)):,.0f} training images)"
            ax.set_xlabel(xlabel)
            ax.set_ylabel(m)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(
        f"{root.name}: metrics (lower is better; error bars: bootstrap spread)",
        fontsize=10,
        y=1 - 0.1 / height,
    )
    fig.legend(
        handles, labels, loc="upper center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, 1 - 0.3 / height)
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 1.0 / height))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _arrays(root: Path, row: dict[str, Any]) -> dict[str, np.ndarray] | None:
    run_dir = root / row["run"]
    pipe = run_dir / "pipeline_metrics.json"
    if pipe.is_file():  # the pipeline's evaluation record lies under eval/ with its arrays beside it
        record_file = json.loads(pipe.read_text()).get("record_file")
        path = (run_dir / record_file).with_suffix(".npz") if record_file else None
    else:
        path = run_dir / "eval" / "final.npz"
    if path is None or not Path(path).is_file():
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def plot_samples(root: Path, rows: list[dict[str, Any]], path: Path) -> tuple[Path | None, list[str]]:
    import torch

    from freqdiff.analysis.images import make_grid, save_png, side_by_side

    panels, missing, real = {}, [], None
    for r in rows:
        a = _arrays(root, r)
        if a is None or "samples" not in a:
            missing.append(r["run"])
            continue
        x = torch.from_numpy(a["samples"][:GRID]).float() / 127.5 - 1
        up = max(1, 96 // x.shape[-1])
        panels[_label(r)] = make_grid(x, nrow=int(math.sqrt(GRID)), upscale=up)
        if real is None and "real" in a:
            real = torch.from_numpy(a["real"][:GRID]).float() / 127.5 - 1
    if not panels:
        return None, missing
    if real is not None:  # first: the reference the others are read against
        grid = make_grid(real, nrow=int(math.sqrt(GRID)), upscale=max(1, 96 // real.shape[-1]))
        panels = {"real images (reference)": grid, **panels}
    items = list(panels.items())
    lines = [side_by_side(dict(items[i : i + PER_ROW])) for i in range(0, len(items), PER_ROW)]
    width = max(x.shape[1] for x in lines)
    lines = [np.pad(x, ((0, 12), (0, width - x.shape[1]), (0, 0)), constant_values=255) for x in lines]
    return save_png(np.concatenate(lines), path), missing


def plot_spectra(root: Path, rows: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, data = {}, {}  # data: the reference spectrum per number of bins (one per resolution)
    for r in rows:
        a = _arrays(root, r)
        if a is None or "raps_samples" not in a:
            continue
        curves[_label(r)] = a["raps_samples"]
        if "raps_real" in a:
            data.setdefault(len(a["raps_real"]), a["raps_real"])
    curves = {k: p for k, p in curves.items() if len(p) in data}  # each against its resolution's data
    if not curves:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for (n, d), style in zip(sorted(data.items()), ("k-", "k--", "k:", "k-.")):
        f = np.arange(n)
        keep = (f > 0) & (d > 0)  # the DC bin is the mean colour, not a frequency
        what = "data (reference)" if len(data) == 1 else f"data, {2 * (n - 1)}² (reference)"
        ax.loglog(f[keep], d[keep], style, lw=2.5, label=what)
    for label, p in curves.items():
        d = data[len(p)]
        f = np.arange(len(p))
        keep = (f > 0) & (d > 0)
        ax.loglog(f[keep], p[keep], marker=".", label=label)
        bx.semilogy(f[keep], p[keep] / d[keep], marker=".", label=label)
    bx.axhline(1.0, color="k", lw=1.5)
    ax.set_xlabel("frequency (cycles per image)")
    ax.set_ylabel("mean power")
    ax.set_title("power spectrum of samples and data")
    bx.set_xlabel("frequency (cycles per image)")
    bx.set_ylabel("samples / data")
    bx.set_title("ratio: 1 = the data's power")
    for a in (ax, bx):
        a.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(root: Path, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Every plot this module draws, under ``out``; returns the files written."""
    written = [plot_metrics(root, rows, out / "metrics.png")]
    grid, missing = plot_samples(root, rows, out / "samples.png")
    written += [grid, plot_spectra(root, rows, out / "spectra.png")]
    if missing:
        print(f"compare: no eval/final.npz (samples and spectra) for {', '.join(missing)}")
    return [p for p in written if p is not None]
