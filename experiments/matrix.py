"""Experiment matrices: experiments × seeds × shared overrides, run cell by cell into fixed folders.

A matrix file (``experiments/matrices/<name>.yaml``, or any path) lists cells::

    matrix: quickstart              # optional; default: the file's name
    seeds: [0]                      # each cell runs once per seed (run.seed=<seed>)
    overrides: [trainer.max_steps=1000]     # given to every cell (the same budget for every method)
    cells:
      ddpm: {experiment: quickstart}
      edm:  {experiment: quickstart_edm, overrides: [module.sample_steps=25]}

Cell ``c`` with seed ``s`` is the experiment run with ``run.root=<root>/<matrix>`` and
``run.name=<c>-s<s>``: its folder is ``<root>/<matrix>/<experiment>/<c>-s<s>`` (a multi-stage
experiment's stages lie under ``.../<experiment>/<stage>/<c>-s<s>``, experiments/pipeline.py). Every
cell runs in its own process (``python -m experiments run``), so a crash, a bad config or a diverged
run fails that cell only: it is reported, and the others still run. ``<root>/<matrix>/matrix.json``
records each cell's status; a cell recorded as done with the same command is skipped, a partial one
resumes from its last checkpoint (the runner's own resume), a failed one runs again.

Launchers: ``local`` (one cell after another on this machine, progress lines prefixed with the cell
and the matrix's ETA) and ``slurm`` (job arrays, experiments/cluster_matrix.py). A launcher is a class with
``launch(plan, todo, on_result) -> list[CellResult]`` (``on_result(cell, result)`` records each cell as
it ends).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from experiments.cluster import SubmitError
from freqdiff.config import ConfigError, load

HERE = Path(__file__).resolve().parent
MATRIX_KEYS = {"matrix", "seeds", "overrides", "cells", "description"}
CELL_KEYS = {"experiment", "overrides"}
RESERVED = ("run.root", "run.name", "run.seed")  # the matrix sets these


@dataclass
class Cell:
    name: str  # <cell>-s<seed>
    experiment: str
    overrides: list[str]
    run_dir: Path  # where its results are (a pipeline: the last stage's folder)

    @property
    def digest(self) -> str:
        text = json.dumps([self.experiment, self.overrides])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "experiments", "run", self.experiment, *self.overrides]


@dataclass
class CellResult:
    name: str
    status: str  # done | failed | skipped
    seconds: float = 0.0
    returncode: int | None = None
    run_dir: str = ""
    reason: str = ""


@dataclass
class Plan:
    matrix: str
    root: Path  # <run root>/<matrix>
    cells: list[Cell] = field(default_factory=list)


def resolve_matrix_path(name: str) -> Path:
    p = Path(name)
    for cand in (p, p.with_suffix(".yaml"), HERE / "matrices" / p, HERE / "matrices" / f"{name}.yaml"):
        if cand.is_file():
            return cand
    known = sorted(f.stem for f in (HERE / "matrices").glob("*.yaml"))
    raise FileNotFoundError(f"matrix {name!r} not found: expected a file or one of {known}")


def _strings(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, ListConfig)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}={value!r}: expected a list of 'key=value' strings")
    for v in value:
        key = v.split("=", 1)[0].lstrip("+")
        if "=" not in v:
            raise ConfigError(f"{where}: {v!r} is not 'key=value'")
        if key in RESERVED:
            raise ConfigError(f"{where}: {v!r}: the matrix sets {key} itself (seeds:, the root)")
    return list(value)


def load_plan(
    name: str, root: str | Path = "runs", extra: list[str] | None = None, fid: bool = False
) -> Plan:
    """The cells of matrix ``name`` (every experiment loaded once, so a bad cell fails here, early);
    ``fid``: FID in every cell's evaluation too (``callbacks.eval.fid``, a pipeline's ``evaluate.fid``)."""
    from experiments.pipeline import is_pipeline

    path = resolve_matrix_path(name)
    raw = OmegaConf.load(path)
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping with 'cells:'")
    unknown = set(raw.keys()) - MATRIX_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}: expected some of {sorted(MATRIX_KEYS)}")
    if not raw.get("cells"):
        raise ConfigError(
            f"{path}: cells: expected a mapping of cell name -> {{experiment: ..., overrides: [...]}}"
        )
    matrix = str(raw.get("matrix") or path.stem)
    seeds = list(raw.get("seeds") or [0])
    if not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds={seeds!r}: expected a list of integers")
    shared = _strings(raw.get("overrides"), f"{path.name}: overrides")
    plan = Plan(matrix=matrix, root=Path(root) / matrix)
    for cname, spec in raw.cells.items():
        where = f"{path.name}: cells.{cname}"
        if not re.fullmatch(r"[A-Za-z0-9_.]+", str(cname)):
            raise ConfigError(f"{where}: a cell name is letters, digits, '_' and '.'")
        if not isinstance(spec, DictConfig) or "experiment" not in spec:
            raise ConfigError(f"{where}={spec!r}: expected {{experiment: <name or path>, overrides: [...]}}")
        if set(spec.keys()) - CELL_KEYS:
            raise ConfigError(f"{where}: unknown key(s) {sorted(set(spec.keys()) - CELL_KEYS)}")
        own = _strings(spec.get("overrides"), f"{where}.overrides")
        if fid:
            own.append(
                "evaluate.fid=true" if is_pipeline(str(spec.experiment)) else "callbacks.eval.fid=true"
            )
        for seed in seeds:
            cell_name = f"{cname}-s{seed}"
            where_run = [f"run.root={plan.root}", f"run.name={cell_name}", f"run.seed={seed}"]
            overrides = [*shared, *own, *(extra or []), *where_run]
            plan.cells.append(
                Cell(
                    cell_name,
                    str(spec.experiment),
                    overrides,
                    _run_dir(str(spec.experiment), overrides, where),
                )
            )
    return plan


def _run_dir(exp: str, overrides: list[str], where: str) -> Path:
    """Where the cell's results are; loading its config here also checks it before anything runs."""
    from experiments.pipeline import is_pipeline, load_pipeline
    from experiments.rundir import run_dir_for

    try:
        if is_pipeline(exp):
            _, stages = load_pipeline(exp, overrides)
            return run_dir_for(list(stages.values())[-1])
        return run_dir_for(load(exp, overrides))
    except (ConfigError, FileNotFoundError) as e:
        raise ConfigError(f"{where}: {e}") from e


# ------------------------------------------------------------------ status file
def _status_path(plan: Plan) -> Path:
    return plan.root / "matrix.json"


def read_status(plan: Plan) -> dict:
    p = _status_path(plan)
    return json.loads(p.read_text()) if p.is_file() else {"matrix": plan.matrix, "cells": {}}


def write_status(plan: Plan, status: dict) -> None:
    p = _status_path(plan)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    os.replace(tmp, p)


def status_entry(cell: Cell, r: CellResult) -> dict:
    """A cell's record in ``matrix.json``: its result, its command and digest, and when."""
    return {
        **{k: v for k, v in asdict(r).items() if k != "name"},
        "experiment": cell.experiment,
        "overrides": cell.overrides,
        "digest": cell.digest,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def is_done(cell: Cell, status: dict) -> bool:
    s = status["cells"].get(cell.name, {})
    return s.get("status") == "done" and s.get("digest") == cell.digest and cell.run_dir.is_dir()


# ------------------------------------------------------------------ the local launcher
_STEP = re.compile(r"^(done: )?step \d+/\d+")
_ETA = re.compile(r"eta (\d+):(\d\d)(?::(\d\d))?")


def _seconds(m: re.Match) -> float:
    a, b, c = m.groups()
    return int(a) * 3600 + int(b) * 60 + int(c) if c else int(a) * 60 + int(b)


def _hms(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LocalLauncher:
    """One cell after another, each in its own process; its output is passed through, progress lines
    prefixed with ``[cell i/N <name> | matrix eta m:ss]``."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.last = ""  # the cell's last line of output (its error, when it fails)

    def launch(self, plan: Plan, todo: list[Cell], on_result) -> list[CellResult]:
        results, durations = [], []
        for i, cell in enumerate(todo):
            left = len(todo) - i - 1
            print(
                f"==== matrix {plan.matrix}: cell {i + 1}/{len(todo)} {cell.name} ({cell.experiment})",
                file=self.out,
                flush=True,
            )
            t0 = time.perf_counter()
            rc = self._run(cell, f"{i + 1}/{len(todo)} {cell.name}", left, durations, t0)
            dt = time.perf_counter() - t0
            durations.append(dt)
            r = CellResult(cell.name, "done" if rc == 0 else "failed", dt, rc, str(cell.run_dir))
            if rc != 0:
                r.reason = f"exit code {rc}" + (f": {self.last}" if self.last else "")
            results.append(r)
            on_result(cell, r)
        return results

    def _run(self, cell: Cell, label: str, left: int, durations: list[float], t0: float) -> int:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.last = ""
        proc = subprocess.Popen(cell.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        buf = b""
        try:
            while True:
                chunk = proc.stdout.read1(65536)  # what is there, without waiting for a full buffer
                if not chunk:
                    break
                buf += chunk
                while True:
                    cut = min((i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0), default=-1)
                    if cut < 0:
                        break
                    line, end, buf = buf[:cut], buf[cut : cut + 1], buf[cut + 1 :]
                    self._emit(line.decode(errors="replace"), end.decode(), label, left, durations, t0)
            if buf:
                self._emit(buf.decode(errors="replace"), "\n", label, left, durations, t0)
            return proc.wait()
        except BaseException:  # Ctrl-C: stop the cell too (it checkpoints on the way out)
            proc.terminate()
            proc.wait()
            raise

    def _emit(self, line: str, end: str, label: str, left: int, durations: list[float], t0: float) -> None:
        if _STEP.match(line):
            m = _ETA.search(line)
            here = time.perf_counter() - t0
            cell_left = _seconds(m) if m else 0.0
            per_cell = sum(durations) / len(durations) if durations else here + cell_left
            line = f"[cell {label} | matrix eta {_hms(cell_left + left * per_cell)}] {line}"
        if line.strip():
            self.last = line.strip()[:300]
        self.out.write(line + end)
        self.out.flush()


def _slurm(out=None):
    from experiments.cluster_matrix import SlurmLauncher

    return SlurmLauncher(out)


LAUNCHERS = {"local": LocalLauncher, "slurm": _slurm}  # slurm: experiments/cluster_matrix.py


def run_matrix(
    name: str,
    root: str | Path = "runs",
    launcher: str = "local",
    extra: list[str] | None = None,
    out=None,
    fid: bool = False,
) -> list[CellResult]:
    """Run every cell of matrix ``name`` that is not done; returns one result per cell (skipped ones too)."""
    out = out or sys.stdout
    if launcher not in LAUNCHERS:
        raise ConfigError(f"LAUNCHER={launcher!r}: expected one of {sorted(LAUNCHERS)}")
    plan = load_plan(name, root, extra, fid)
    status = read_status(plan)
    todo = [c for c in plan.cells if not is_done(c, status)]
    results = {
        c.name: CellResult(c.name, "skipped", run_dir=str(c.run_dir), reason="done earlier")
        for c in plan.cells
        if c not in todo
    }
    print(
        f"matrix {plan.matrix}: {len(plan.cells)} cells under {plan.root}, {len(todo)} to run",
        file=out,
        flush=True,
    )

    def record(cell: Cell, r: CellResult) -> None:
        status["cells"][cell.name] = status_entry(cell, r)
        write_status(plan, status)

    for r in LAUNCHERS[launcher](out).launch(plan, todo, record):
        results[r.name] = r
    ordered = [results[c.name] for c in plan.cells]
    print(summary(plan, ordered), file=out, flush=True)
    from experiments.compare import print_report, write_report

    try:  # the comparison of every cell that has its final metrics
        report = write_report(plan.root, runs=[c.run_dir for c in plan.cells])
        print_report(report, out)
    except FileNotFoundError:
        pass  # no cell finished
    return ordered


def summary(plan: Plan, results: list[CellResult]) -> str:
    w = max(len(r.name) for r in results)
    lines = [f"matrix {plan.matrix}:"]
    for r in results:
        took = f"{_hms(r.seconds)}" if r.status != "skipped" else "-"
        why = f"  ({r.reason})" if r.reason and r.status != "done" else ""
        lines.append(f"  {r.name:<{w}}  {r.status:<7}  {took:>7}  {r.run_dir}{why}")
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        lines.append(
            f"  {len(failed)} failed: {', '.join(failed)}; "
            "rerun the same command to retry them (done cells are skipped)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m experiments.matrix", description=__doc__)
    p.add_argument("matrix", help="matrix name under experiments/matrices/ or a path")
    p.add_argument("overrides", nargs="*", help="key=value given to every cell (after the matrix's own)")
    p.add_argument("--root", default="runs", help="run root (cells go to <root>/<matrix>/...)")
    p.add_argument("--launcher", default="local", help="local | slurm")
    p.add_argument("--fid", action="store_true", help="FID in every evaluation (needs Inception weights)")
    a = p.parse_args(argv)
    try:
        results = run_matrix(a.matrix, a.root, a.launcher, a.overrides, fid=a.fid)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except SubmitError as e:  # sbatch refused a job (LAUNCHER=slurm)
        print(f"slurm error: {e}", file=sys.stderr)
        return 2
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
