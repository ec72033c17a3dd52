"""Fault injection (slow): SIGKILL a real run at random points, over and over, then let it finish.

Each round resumes the same run with a slightly larger ``trainer.max_steps`` (a resumable key), so
every round has start-up, data generation (the first), training, periodic checkpoint writes and the
final evaluation to be killed in. After every kill: every file of the run folder is readable (the
checkpoints with ``weights_only=True``, the JSON, the PNGs), and the next round resumes from the step
that ``last.ckpt`` holds. At the end, one uninterrupted rerun leaves every final output in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import tiny_overrides  # tests/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
KILLS = 20
MARKERS = {"training": "run folder", "final evaluation": "done: step"}  # lines that start a phase


def overrides(tmp: Path, max_steps: int) -> list[str]:
    return tiny_overrides(
        tmp,
        **{
            "trainer.max_steps": max_steps,
            "run.checkpoint_every_n_steps": 2,
            "callbacks.samples.every_n_steps": 3,
            "callbacks.strips.every_n_steps": 0,
            "callbacks.eval.n": 128,  # long enough (~1-2 s) to be killed in
            "callbacks.eval.ref_n": 16,
            "callbacks.eval.swd_n": 16,
            "callbacks.eval.panel": 16,
            "callbacks.eval.batch_size": 16,
            "+callbacks.eval.steps": 20,
            "callbacks.eval.fid": False,
            "data.synthetic.n_train": 400,
            "trainer.enable_progress_bar": True,  # its "done: step" line marks the end of training
        },
    )


def start(tmp: Path, max_steps: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "experiments", "run", "quickstart", *overrides(tmp, max_steps)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def last_step(run_dir: Path) -> int | None:
    p = run_dir / "checkpoints" / "last.ckpt"
    return int(torch.load(p, map_location="cpu", weights_only=True)["global_step"]) if p.exists() else None


def check_intact(run_dir: Path) -> None:
    """Every file the run wrote is whole (temp files aside, which are never read)."""
    if not run_dir.exists():
        return
    for p in run_dir.rglob("*"):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        if p.suffix == ".ckpt":
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
            assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            lines = p.read_text().splitlines()
            for line in lines[:-1]:  # a killed append may cut the last line only
                json.loads(line)
        elif p.suffix == ".png":
            with Image.open(p) as im:
                np.asarray(im)
        elif p.name == "config.yaml":
            assert "experiment:" in p.read_text()


def phase(out: str) -> str:
    """How far a killed round got, from its terminal output."""
    if "eval @ step" in out:
        return "after the final evaluation"
    if "done: step" in out:
        return "final evaluation"
    if "step " in out and "run folder" in out:
        return "training"
    return "start-up"


def run_round(tmp: Path, max_steps: int, kill_after: float | None = None, timeout: float = 600):
    """One run; SIGKILL ``kill_after`` s after its start (None: let it finish).

    Returns (output, return code, {marker: seconds after the start when its line appeared}), with
    "exit" for the end of the process."""
    proc = start(tmp, max_steps)
    t0, lines, marks = time.monotonic(), [], {}

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            for name, marker in MARKERS.items():
                if marker in line and name not in marks:
                    marks[name] = time.monotonic() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = t0 + (timeout if kill_after is None else kill_after)
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    marks["exit"] = time.monotonic() - t0
    reader.join(timeout=10)
    return "".join(lines), proc.returncode, marks


@pytest.mark.slow
def test_sigkill_at_random_points_never_loses_or_corrupts(tmp_path):
    rng = random.Random(0)
    run_dir = tmp_path / "runs" / "quickstart" / "default"
    out, rc, _ = run_round(tmp_path, 4, kill_after=1.5)  # a first kill during start-up / data generation
    assert rc == -signal.SIGKILL, out[-3000:]
    check_intact(run_dir)
    max_steps, timings = 6, []
    for _ in range(2):  # uninterrupted rounds: when each phase starts (the second one is typical)
        out, rc, marks = run_round(tmp_path, max_steps)
        assert rc == 0 and {"training", "final evaluation"} <= set(marks), out[-3000:]
        timings.append(marks)
        max_steps += 2
    m = timings[-1]
    spans = {  # (from, to) seconds after the start, one phase each
        "start-up": (0.2, m["training"]),
        "training": (m["training"], m["final evaluation"]),
        "final evaluation": (m["final evaluation"], m["exit"]),
    }
    kills, phases, resumed = 1, {}, []
    while kills < KILLS:
        before = last_step(run_dir)
        lo, hi = spans[list(spans)[kills % len(spans)]]
        out, rc, _ = run_round(tmp_path, max_steps, kill_after=rng.uniform(lo, hi))
        if rc == -signal.SIGKILL:
            kills += 1
            phases[phase(out)] = phases.get(phase(out), 0) + 1
        else:
            assert rc == 0, out[-3000:]  # finished before the kill
        found = re.search(r"resuming from step (\d+)", out)
        if found:
            resumed.append(int(found.group(1)))
            assert int(found.group(1)) == before, out[-3000:]  # resumed from what last.ckpt held
        check_intact(run_dir)
        after = last_step(run_dir)
        assert before is None or (after is not None and after >= before)  # never goes back
        max_steps += 2
    max_steps -= 2  # the last round's: if it was killed after training, the rerun only finishes it
    out, rc, _ = run_round(tmp_path, max_steps)
    assert rc == 0, out[-3000:]
    check_intact(run_dir)
    assert last_step(run_dir) == max_steps
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == max_steps and (run_dir / "samples_vs_real.png").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["last.ckpt"]
    assert phases.get("training") and phases.get("final evaluation"), phases
    print(f"{kills} SIGKILLs by phase {phases}; rounds resumed at steps {resumed}; phases of a round {m}")
