"""The comparison of a set of runs: ``python -m experiments.compare RUNS`` (``make compare``).

Reads every run folder under ``RUNS`` with an evaluation record: ``final_metrics.json`` (the
evaluation at the end of training, with ``cost.json`` and ``config.yaml``) or, for a multi-stage
experiment (Relay), ``pipeline_metrics.json`` in its last stage's folder (the pipeline's evaluation,
with the cost of all its stages together, ``experiments/pipeline.py``). It writes into
``<RUNS>/compare/``:

- ``table.csv``: one row per run, plain numbers; ``report.md``: the same table with each metric as
  ``value ± spread`` beside its real-vs-real floor, and the plots below;
- ``metrics.png``: each metric against training images seen and against training wall-clock, one
  line per run through its evaluations (``eval/metrics.jsonl``; error bars: the spread), the floor
  dashed (``experiments/compare_plots.py``);
- ``samples.png``: the first evaluated samples of every run side by side with real images;
- ``spectra.png``: the mean power spectrum of every run's samples against the data's, and their ratio.

Runs that were not trained on the same number of images, or not evaluated at the same n against the
same reference, are flagged in the report instead of being ranked silently.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

METRIC_ORDER = ("spectral", "swd/avg", "fid", "kid", "precision", "recall")


RECORDS = ("pipeline_metrics.json", "final_metrics.json")  # a pipeline's record wins over a stage's


def find_runs(root: Path) -> list[Path]:
    """The run folders under ``root`` with a record (a matrix's root, with ``matrix.json``: its cells)."""
    status = root / "matrix.json"
    if status.is_file():
        cells = json.loads(status.read_text()).get("cells", {}).values()
        dirs = [_under(root, Path(c["run_dir"])) for c in cells if c.get("run_dir")]
        dirs = list(dict.fromkeys(dirs))  # in the matrix's order
    else:
        dirs = [p.parent for name in RECORDS for p in root.rglob(name) if "compare" not in p.parts]
        dirs = sorted(set(dirs))
    return [d for d in dirs if has_record(d)]


def has_record(run_dir: Path) -> bool:
    return any((run_dir / name).is_file() for name in RECORDS)


def _under(root: Path, d: Path) -> Path:
    """A cell folder recorded relative to where the matrix ran, found under ``root`` from anywhere."""
    if d.is_absolute() or d.is_dir():
        return d
    for i, part in enumerate(d.parts):  # runs/<matrix>/<experiment>/<cell>: after the matrix's name
        if part == root.name and root.joinpath(*d.parts[i + 1 :]).is_dir():
            return root.joinpath(*d.parts[i + 1 :])
    return d


def record_of(run_dir: Path) -> tuple[dict[str, Any], bool]:
    """(the run's evaluation record with its metrics at top level, whether it is a pipeline's)."""
    pipe = run_dir / RECORDS[0]
    final = read_json(pipe if pipe.is_file() else run_dir / RECORDS[1])
    return {**final, **final.get("metrics", {})}, pipe.is_file()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _method(run_dir: Path) -> tuple[str, str]:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return "?", "?"
    cfg = OmegaConf.load(cfg_path)
    target = str(OmegaConf.select(cfg, "module._target_", default="?"))
    return target.rsplit(".", 1)[-1], str(cfg.get("experiment", "?"))


def _metrics(final: dict[str, Any]) -> list[str]:
    """The record's metrics: those with a floor first, then the others, in a fixed order."""
    names = [*final.get("floor", {}), *METRIC_ORDER, *(k for k in final if k.startswith("swd/"))]
    return [k for k in dict.fromkeys(names) if isinstance(final.get(k), (int, float))]


def collect(root: Path, runs: list[Path] | None = None) -> list[dict[str, Any]]:
    rows = []
    found = find_runs(root) if runs is None else [Path(r) for r in runs if has_record(Path(r))]
    for run_dir in found:
        final, pipeline = record_of(run_dir)
        cost = (
            final.get("cost", {}) if pipeline else read_json(run_dir / "cost.json") or final.get("cost", {})
        )
        method, experiment = _method(run_dir)
        row = {
            "run": str(run_dir.relative_to(root)),
            "method": f"{method} ({len(final.get('stages', {}))} stages)" if pipeline else method,
            "experiment": experiment,
            "params": cost.get("params"),
            "mflop_per_img": None if cost.get("flops_per_image") is None else cost["flops_per_image"] / 1e6,
            "images_seen": cost.get("images_seen"),
            "train_s": cost.get("train_seconds"),
            "img_per_s": cost.get("img_per_s"),
            "peak_mb": None if cost.get("peak_memory_bytes") is None else cost["peak_memory_bytes"] / 2**20,
            "sampler": final.get("sampler"),
            "nfe": final.get("nfe"),
            "sample_img_per_s": cost.get("sample_img_per_s"),
            "n": final.get("n"),
            "ref": f"{final.get('ref_split')}{final.get('ref_n')}@{final.get('ref_manifest')}",
        }
        for k in _metrics(final):
            row[k] = final[k]
            row[f"{k} spread"] = final.get("spread", {}).get(k)
            row[f"{k} floor"] = final.get("floor", {}).get(k)
        rows.append(row)
    return rows


def flags(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for key, what in (("images_seen", "training images"), ("n", "evaluated samples"), ("ref", "reference")):
        values = {r["run"]: r.get(key) for r in rows}
        unknown = [k for k, v in values.items() if v is None]
        if unknown:  # e.g. a run without cost.json (trained before cost accounting)
            out.append(f"{what} unknown for: {', '.join(unknown)}")
        elif len(set(map(str, values.values()))) > 1:
            listed = ", ".join(f"{k}: {v}" for k, v in values.items())
            out.append(f"not comparable on {what}: {listed}")
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 10**digits:  # no exponent for what has more integer digits than asked
            return f"{v:,.0f}" if abs(v) < 1e9 else f"{v:.3e}"
        return f"{v:.{digits}g}"
    if isinstance(v, int) and v >= 10_000:
        return f"{v:,}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    metrics = [k for k in rows[0] if f"{k} floor" in rows[0]] if rows else []
    head = ["run", "method", "params", "MFLOP/img", "images", "train s", "img/s", "peak MB", "NFE", "n"]
    lines = ["| " + " | ".join(head + metrics) + " |", "|" + "---|" * (len(head) + len(metrics))]
    for r in rows:
        cells = [r["run"], r["method"], _fmt(r["params"]), _fmt(r["mflop_per_img"]), _fmt(r["images_seen"])]
        cells += [_fmt(r["train_s"]), _fmt(r["img_per_s"]), _fmt(r["peak_mb"]), _fmt(r["nfe"]), _fmt(r["n"])]
        for k in metrics:
            v, s, f = r.get(k), r.get(f"{k} spread"), r.get(f"{k} floor")
            cells.append("-" if v is None else f"{_fmt(v)} ± {_fmt(s, 2)} (floor {_fmt(f)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(root: Path, plots: bool = True, runs: list[Path] | None = None) -> Path:
    """``<root>/compare/``: table, report and plots of the runs under ``root`` (or of ``runs``)."""
    rows = collect(root, runs)
    if not rows:
        raise FileNotFoundError(f"no run with a {' or '.join(RECORDS)} under {root}")
    out = root / "compare"
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    warn = flags(rows)
    text = [f"# Comparison of {len(rows)} runs under {root}", "", markdown(rows), ""]
    text += [
        "Each metric: value ± spread over resamplings of the samples (floor: two disjoint real sets at",
        "the same n). Two runs differ where their values differ by several spreads.",
        "",
    ]
    text += [f"**{w}**" for w in warn] or [
        "Every run saw the same number of training images, n and reference."
    ]
    if plots:
        from experiments.compare_plots import write_plots

        written = write_plots(root, rows, out)
        text += ["", "Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in written)]
        text += [f"![{p.stem}]({p.name})" for p in written]
    (out / "report.md").write_text("\n".join(text) + "\n")
    return out


def print_report(out: Path, stream=None) -> None:
    """The report on the terminal (without its image links) and the files written."""
    text = [t for t in (out / "report.md").read_text().splitlines() if not t.startswith("![")]
    files = ", ".join(str(p) for p in sorted(out.iterdir()) if p.suffix in (".md", ".csv", ".png"))
    print("\n".join(text) + f"\nwrote {files}", file=stream or sys.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    root = Path((argv if argv is not None else sys.argv[1:] or ["runs"])[0])
    try:
        out = write_report(root)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
