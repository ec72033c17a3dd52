"""Jobs on a real Slurm (marker ``slurm``; ``make test-slurm`` starts a single-node Slurm on this
machine with scripts/local_slurm.sh): a submitted run completes into its folder, a second
submission is refused, the time-limit / preemption signal checkpoints and requeues and the job
resumes from that step, a 2-task srun job trains one DDP run (and matches the single-process loss),
and a matrix goes out as a job array with a Relay pipeline's stages and its ``afterok`` evaluation.

Slurm delays a requeued job's start by about two minutes (its BeginTime); ``wait`` moves that start
to now (``scontrol update StartTime=now``) so the suite does not sit idle, and reports both times.
"""

import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_dashboards import events  # tests/ is on sys.path
from test_matrix import tiny, write_matrix
from test_relay_module import PIPE

from experiments import cluster
from experiments.matrix import run_matrix
from freqdiff.config import ConfigError

pytestmark = pytest.mark.slurm
DEFAULT_CONF = Path(os.environ.get("FREQDIFF_SLURM_DIR", "/tmp/freqdiff-slurm")) / "slurm.conf"
CPU_JOB = ["cluster.gpus_per_node=0", "cluster.cpus_per_task=1", "cluster.time_min=15"]


@pytest.fixture(autouse=True)
def slurm(monkeypatch):
    if "SLURM_CONF" not in os.environ and DEFAULT_CONF.is_file():
        monkeypatch.setenv("SLURM_CONF", str(DEFAULT_CONF))
    if shutil.which("sbatch") is None:
        pytest.skip("no Slurm here (sbatch not found): make test-slurm installs and starts a local one")
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not re.search(r"idle|mixed|allocated", out.stdout):
        pytest.skip(f"no Slurm answers (sinfo: {(out.stderr or out.stdout).strip()[:200]}): make test-slurm")


def state(job: str) -> tuple[str, str]:
    return cluster.queue().get(job, ("", ""))


def wait(jobs: list[str], timeout: float = 420) -> dict:
    """Until no job of ``jobs`` is queued or running; a requeued job's delayed start is moved to now.
    Returns {job: [seconds from the first wait to each (re)start]}."""
    t0, starts, seen = time.time(), {j: [] for j in jobs}, {}
    while time.time() - t0 < timeout:
        q = cluster.queue()
        live = [j for j in jobs if q.get(j, ("",))[0] in cluster.ACTIVE]
        if not live:
            return starts
        for j in live:
            st, why = q[j]
            if st == "PENDING" and why == "BeginTime":
                subprocess.run(["scontrol", "update", f"jobid={j}", "StartTime=now"], capture_output=True)
            if st == "RUNNING" and seen.get(j) != "RUNNING":
                starts[j].append(round(time.time() - t0, 1))
            seen[j] = st
        time.sleep(1)
    raise AssertionError(f"jobs {jobs} still queued or running after {timeout} s: {cluster.queue()}")


def log_of(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*_log.out")))


def until(run_dir: Path, pattern: str, timeout: float = 240) -> re.Match:
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = re.search(pattern, log_of(run_dir))
        if m:
            return m
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in the log after {timeout} s:\n{log_of(run_dir)[-3000:]}")


def overrides(tmp_path: Path, steps: int, name: str = "default", **extra) -> list[str]:
    o = [
        *tiny(tmp_path, steps),
        f"run.root={tmp_path / 'runs'}",
        f"run.name={name}",
        "callbacks.strips.every_n_steps=0",
        *CPU_JOB,
    ]
    return o + [f"{k}={v}" for k, v in extra.items()]


def test_a_submitted_run_completes_into_its_folder_and_is_not_submitted_twice(tmp_path):
    over = overrides(tmp_path, 6)
    ids = cluster.submit("quickstart", over, out=io.StringIO())
    with pytest.raises(ConfigError, match="still queued or running; not submitting it again"):
        cluster.submit("quickstart", over, out=io.StringIO())
    wait(list(ids.values()))
    run_dir = tmp_path / "runs" / "quickstart" / "default"
    assert (run_dir / "final_metrics.json").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "done: step 6/6" in log_of(run_dir)
    out = io.StringIO()
    cluster.status(run_dir, out=out)
    assert re.search(r"\.\s+train\s+\d+\s+completed", out.getvalue()), out.getvalue()


def test_the_preemption_signal_checkpoints_requeues_and_the_job_resumes_there(tmp_path):
    over = overrides(tmp_path, 1500, "signal")
    (job,) = cluster.submit("quickstart", over, out=io.StringIO()).values()
    run_dir = tmp_path / "runs" / "quickstart" / "signal"
    until(run_dir, r"step (1[5-9]\d|[2-9]\d\d)/1500")  # well into training
    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    m = until(run_dir, r"SIGUSR2 at step (\d+): saved .*last\.ckpt \(([\d.]+) s after the signal\); requeued")
    step = int(m.group(1))
    assert 150 <= step < 1500
    while state(job)[0] != "PENDING":  # requeued: Slurm holds it back for a while (its BeginTime)
        time.sleep(0.2)
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    start = time.mktime(time.strptime(re.search(r"StartTime=(\S+)", info).group(1), "%Y-%m-%dT%H:%M:%S"))
    held = start - time.time()
    assert "Restarts=1" in info
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    until(run_dir, rf"resuming from step {step}: checkpoints/last\.ckpt")
    round_trip = time.time() - t_signal
    wait([job])
    text = log_of(run_dir)
    assert "done: step 1500/1500" in text and (run_dir / "final_metrics.json").is_file(), text[-2000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1500
    print(
        f"requeue round trip: signal -> saved {m.group(2)} s, signal -> resumed at step {step} "
        f"{round_trip:.1f} s with the start moved to now (Slurm held the requeued job {held:.0f} s more)"
    )


def test_the_time_limit_signal_requeues_and_the_run_finishes_in_the_next_job(tmp_path):
    # 2-minute jobs; the signal 60 s before the end (Slurm may send it up to a minute early)
    over = overrides(tmp_path, 1500, "timelimit", **{"cluster.time_min": 2, "cluster.signal_delay_s": 60})
    (job,) = cluster.submit("quickstart", over, out=io.StringIO()).values()
    run_dir = tmp_path / "runs" / "quickstart" / "timelimit"
    wait([job], timeout=600)
    text = log_of(run_dir)
    saved = [int(s) for s in re.findall(r"SIGUSR2 at step (\d+): saved .* requeued job", text)]
    assert saved, text[-3000:]
    for s in saved:
        assert f"resuming from step {s}: checkpoints/last.ckpt" in text
    assert "done: step 1500/1500" in text and (run_dir / "final_metrics.json").is_file(), text[-3000:]


def losses(run_dir: Path) -> list[float]:
    return [e.value for e in events(run_dir).Scalars("train/loss")]


def test_a_two_task_srun_job_is_one_ddp_run_with_the_single_process_loss(tmp_path):
    steps = 240
    common = {"run.seed": 3}
    one = overrides(tmp_path, steps, "one", **{**common, "data.batch_size": 16})
    two = overrides(tmp_path, steps, "two", **{**common, "data.batch_size": 8, "cluster.tasks_per_node": 2})
    ids = [*cluster.submit("quickstart", one, out=io.StringIO()).values()]
    ids += cluster.submit("quickstart", two, out=io.StringIO()).values()
    wait(ids, timeout=600)
    root = tmp_path / "runs" / "quickstart"
    text = log_of(root / "two")
    assert "done: step 240/240" in text, text[-3000:]
    assert len(list((root / "two" / "slurm").glob("*_log.out"))) == 2  # one log per task
    assert len(list((root / "two").glob("events.out.tfevents.*"))) == 1  # rank 0 logs
    cfg = OmegaConf.load(root / "two" / "config.yaml")
    assert cfg.trainer.devices == 2 and cfg.trainer.accelerator == "cpu"
    assert torch.load(root / "two" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    a, b = losses(root / "one"), losses(root / "two")
    assert len(a) == len(b) == steps
    ma, mb = sum(a[steps // 2 :]) / (steps // 2), sum(b[steps // 2 :]) / (steps // 2)
    print(
        f"mean loss over the last half: 1 task x 16 = {ma:.4f}, 2 tasks x 8 = {mb:.4f} ({mb / ma - 1:+.1%})"
    )
    assert abs(mb / ma - 1) < 0.05


def test_a_matrix_goes_out_as_a_job_array_and_a_pipeline_with_its_dependency(tmp_path):
    relay = [*PIPE, f"data.path={tmp_path / 'leaves'}", f"evaluate.cache_dir={tmp_path / 'c'}"]
    cells = {
        "ddpm": ("quickstart", [*tiny(tmp_path), "callbacks.strips.every_n_steps=0"]),
        "edm": ("quickstart_edm", tiny(tmp_path)),
        "relay": ("quickstart_relay", relay),
    }
    path = write_matrix(tmp_path, cells, CPU_JOB)
    out = io.StringIO()
    results = run_matrix(str(path), tmp_path / "runs", launcher="slurm", out=out)
    text = out.getvalue()
    assert {r.name: r.status for r in results} == dict.fromkeys(
        ("ddpm-s0", "edm-s0", "relay-s0"), "submitted"
    )
    jobs = re.findall(r"submitted job (\S+): (\S+)", text)
    names = {n: j for j, n in jobs}
    array = [j for j, n in jobs if "_" in j]
    assert len(array) == 2 and len({j.split("_")[0] for j in array}) == 1, text  # one array, two tasks
    ev = names["quickstart_relay/evaluate/relay-s0"]
    info = subprocess.run(["scontrol", "show", "job", ev], capture_output=True, text=True).stdout
    s1, s2 = names["quickstart_relay/stage1/relay-s0"], names["quickstart_relay/stage2/relay-s0"]
    assert re.search(rf"Dependency=afterok:{s1}(_\*)?\(\w+\),afterok:{s2}(_\*)?\(\w+\)", info), info
    compare = re.search(r"submitted job (\d+): tiny/compare", text).group(1)
    wait([j for j, _ in jobs] + [compare], timeout=600)
    status = json.loads((tmp_path / "runs" / "tiny" / "matrix.json").read_text())
    assert {c: s["status"] for c, s in status["cells"].items()} == dict.fromkeys(
        ("ddpm-s0", "edm-s0", "relay-s0"), "done"
    ), status
    assert (tmp_path / "runs" / "tiny" / "compare" / "report.md").is_file()
    # the array's logs are linked from each cell's run folder; make status lists every job
    assert list((tmp_path / "runs" / "tiny" / "quickstart" / "ddpm-s0" / "slurm").glob("*_log.out"))
    st = io.StringIO()
    cluster.status(tmp_path / "runs" / "tiny", out=st)
    assert st.getvalue().count("completed") == 5, st.getvalue()  # 2 cells, 2 stages, 1 evaluation
