"""Slurm: ``make submit EXP=...`` (and the matrix's ``LAUNCHER=slurm``), through submitit (docs/cluster.md).

A run is submitted as one job whose tasks are its DDP ranks (``cluster.nodes`` × ``tasks_per_node``,
one task per GPU): the job function (``TrainJob``) runs the experiment in each task, in process, with
``trainer.num_nodes`` / ``trainer.devices`` (and ``accelerator=cpu`` without GPUs) set from the request;
Lightning reads the ranks from srun's environment. The job writes into the run's deterministic folder
and resumes from its ``last.ckpt`` like any rerun; it is requeued on its time-limit / preemption
signal by ``callbacks/requeue.py`` (the only requeue mechanism). A pipeline (Relay) is one job per
stage, submitted together so they run in parallel, and its evaluation as a job that starts
``afterok`` on them.

Each run folder gets ``slurm/``: the job logs (``<job>_<task>_log.out``, appended across requeues),
submitit's files, and ``jobs.json``, the jobs submitted for this run, which ``make status`` reads
and which refuses a second submission while one of them is still queued or running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from freqdiff.config import ConfigError, load

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}  # fmt: skip
STRINGS = ("partition", "account", "qos", "constraint")


# ------------------------------------------------------------------ the cluster section
def cluster_section(cfg: DictConfig) -> dict:
    """``cfg.cluster`` as a checked plain dict (ConfigError naming ``cluster.<key>``)."""
    if "cluster" not in cfg:
        raise ConfigError(f"{cfg.get('experiment')}: no cluster: section (experiments/_base.yaml has one)")
    c = OmegaConf.to_container(cfg.cluster, resolve=True)
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for key, low in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("time_min", 1),
                     ("signal_delay_s", 0), ("max_requeues", 0), ("check_every_n_steps", 1)):  # fmt: skip
        if not is_int(c.get(key)) or c[key] < low:
            raise ConfigError(f"cluster.{key}={c.get(key)!r}: expected an integer >= {low}")
    tpn = c.get("tasks_per_node")
    if tpn is not None and not (is_int(tpn) and tpn >= 1):
        raise ConfigError(f"cluster.tasks_per_node={tpn!r}: expected a positive integer or null")
    mem = c.get("mem_gb")
    if mem is not None and not (isinstance(mem, (int, float)) and not isinstance(mem, bool) and mem > 0):
        raise ConfigError(f"cluster.mem_gb={mem!r}: expected a positive number of GB per node, or null")
    for key in STRINGS:
        if c.get(key) is not None and not (isinstance(c[key], str) and c[key].strip()):
            raise ConfigError(f"cluster.{key}={c[key]!r}: expected a name, or null")
    if c["signal_delay_s"] >= c["time_min"] * 60:
        raise ConfigError(
            f"cluster.signal_delay_s={c['signal_delay_s']}: expected less than the time limit "
            f"(cluster.time_min={c['time_min']} minutes)"
        )
    from callbacks.requeue import signal_number

    try:
        signal_number(c.get("signal"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(c.get("setup"), list) or not all(isinstance(s, str) for s in c["setup"]):
        raise ConfigError(f"cluster.setup={c.get('setup')!r}: expected a list of shell lines")
    if not isinstance(c.get("sbatch"), dict):
        raise ConfigError(f"cluster.sbatch={c.get('sbatch')!r}: expected a mapping of sbatch option -> value")
    return c


def tasks_per_node(c: dict) -> int:
    return int(c["tasks_per_node"] or max(1, c["gpus_per_node"]))


def trainer_overrides(c: dict, prefix: str = "") -> list[str]:
    """The Trainer's part of the request: one rank per task."""
    out = [f"{prefix}trainer.num_nodes={c['nodes']}", f"{prefix}trainer.devices={tasks_per_node(c)}"]
    if c["gpus_per_node"] == 0:
        out.append(f"{prefix}trainer.accelerator=cpu")
    return out


def sbatch_parameters(c: dict, job_name: str, dependency: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``submitit.SlurmExecutor.update_parameters`` for this request."""
    p: dict[str, Any] = {
        "job_name": job_name,
        "nodes": c["nodes"],
        "ntasks_per_node": tasks_per_node(c),
        "cpus_per_task": c["cpus_per_task"],
        "time": c["time_min"],
        "stderr_to_stdout": True,  # one log per task: <job>_<task>_log.out
        "setup": list(c["setup"]),
        "additional_parameters": {"signal": f"{c['signal']}@{c['signal_delay_s']}", **c["sbatch"]},
    }
    if c["gpus_per_node"]:
        p["gpus_per_node"] = c["gpus_per_node"]
    if c.get("mem_gb") is not None:
        p["mem"] = f"{int(round(float(c['mem_gb'])))}G"
    for key in STRINGS:
        if c.get(key):
            p[key] = c[key]
    if dependency:
        p["dependency"] = dependency
    return p


# ------------------------------------------------------------------ what runs in the job
class TrainJob:
    """The job function: runs experiment ``exp`` (or one part of a pipeline) in this task."""

    def __init__(self, exp: str, overrides: list[str], part: str | None, c: dict):
        self.exp, self.overrides, self.part = exp, list(overrides), part
        self.signal, self.max_requeues, self.every = c["signal"], c["max_requeues"], c["check_every_n_steps"]

    def __call__(self) -> dict:
        from callbacks.requeue import JobRequeued, SlurmRequeue, requeue, slurm_job_id, watch

        if self.part == "evaluate":  # chunks are cached: requeue at once, the next job goes on
            watch(self.signal, lambda: sys.exit(requeue(slurm_job_id(), "evaluation requeued")))
        else:
            watch(self.signal)  # before anything is built: replaces submitit's requeue handler
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if threads:
            import torch

            torch.set_num_threads(threads)
        cb = SlurmRequeue(self.max_requeues, self.every, self.signal)
        from experiments.pipeline import run_pipeline
        from experiments.runner import quiet_libraries, resolve_data, run

        try:
            with quiet_libraries():
                if self.part is not None:
                    run_pipeline(self.exp, [*self.overrides, f"pipeline.only={self.part}"], callbacks=[cb])
                else:
                    cfg, source = resolve_data(load(self.exp, self.overrides), self.exp, self.overrides)
                    run(cfg, callbacks=[cb], data_note=source)
        except JobRequeued as e:
            if not e.requeued:
                raise RuntimeError(str(e)) from None
            return {"requeued": True, "message": str(e)}
        return {"requeued": False}


# ------------------------------------------------------------------ requests, records, submission
@dataclass
class Request:
    name: str  # job name
    exp: str
    overrides: list[str]  # the job's (the request's trainer keys included)
    part: str | None  # pipeline part, None for a plain run
    run_dir: Path  # the run it trains (a pipeline's evaluation: the last stage's)
    cluster: dict
    after: list[str] = field(default_factory=list)  # names of requests it waits for (afterok)
    folder: Path | None = None  # submitit's folder (logs); default <run_dir>/slurm

    @property
    def log_folder(self) -> Path:
        return (self.folder or self.run_dir / "slurm").resolve()


def requests_for(exp: str, overrides: list[str]) -> list[Request]:
    """The jobs of ``make submit EXP=exp``: one, or a pipeline's stages and its evaluation."""
    from experiments.pipeline import is_pipeline, load_pipeline
    from experiments.rundir import run_dir_for
    from experiments.validate import check_config

    if not is_pipeline(exp):
        cfg = load(exp, overrides)
        check_config(cfg)
        c = cluster_section(cfg)
        name = f"{cfg.experiment}/{cfg.run.name}"
        return [Request(name, exp, [*overrides, *trainer_overrides(c)], None, run_dir_for(cfg), c)]
    raw, stages = load_pipeline(exp, overrides)
    parts = [p for p in raw.pipeline.parts if raw.pipeline.get("only") in (None, p)]
    out: list[Request] = []
    for s, cfg in stages.items():
        check_config(cfg)
        if s in parts:
            c = cluster_section(cfg)
            over = [*overrides, *trainer_overrides(c, f"stages.{s}.")]
            out.append(Request(f"{cfg.experiment}/{cfg.run.name}", exp, over, s, run_dir_for(cfg), c))
    if "evaluate" in parts:  # on one node, with the last stage's GPUs (evaluate_run: a worker per GPU)
        last = list(stages.values())[-1]
        c = {**cluster_section(last), "nodes": 1, "tasks_per_node": 1}
        after = [r.name for r in out]
        name = f"{raw.experiment}/evaluate/{last.run.name}"
        out.append(Request(name, exp, list(overrides), "evaluate", run_dir_for(last), c, after))
    return out


def read_jobs(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "slurm" / "jobs.json"
    return json.loads(p.read_text()) if p.is_file() else []


def record_job(run_dir: Path, entry: dict) -> None:
    from experiments.runner import write_atomic

    jobs = read_jobs(run_dir) + [entry]
    write_atomic(Path(run_dir) / "slurm" / "jobs.json", json.dumps(jobs, indent=1) + "\n")


def queue() -> dict[str, tuple[str, str]]:
    """{job id: (state, time used or why pending)} of this user's queued and running jobs (array tasks
    one by one); {} where squeue is not there (``executor`` then raises ``SubmitError``)."""
    try:
        out = subprocess.run(
            ["squeue", "--me", "-h", "-r", "-o", "%i|%T|%M|%r"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    jobs = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            jid, state, used, reason = parts
            jobs[jid] = (state, used if state == "RUNNING" else reason)
    return jobs


def active_jobs(r: Request, q: dict | None = None) -> list[tuple[str, str]]:
    """(job id, state) of the jobs recorded for ``r``'s run (and part, for a pipeline's) that Slurm
    still has queued or running."""
    q = queue() if q is None else q
    jobs = [j for j in read_jobs(r.run_dir) if r.part in (None, j.get("part"))]
    return [(j["job"], q[j["job"]][0]) for j in jobs if q.get(j["job"], ("",))[0] in ACTIVE]


def refuse_active(reqs: list[Request], q: dict | None = None) -> None:
    q = queue() if q is None else q
    for r in reqs:
        busy = active_jobs(r, q)
        if busy:
            jobs = ", ".join(f"{j} ({s})" for j, s in busy)
            raise ConfigError(
                f"{r.run_dir}: job {jobs} of this run is still queued or running; not submitting it again "
                f"(make status RUN={r.run_dir}; scancel {busy[0][0]} to stop it)"
            )


class SubmitError(RuntimeError):
    """sbatch refused a job (its message), or there is no sbatch."""


def executor(folder: Path, params: dict):
    import submitit

    if not _has("sbatch"):
        raise SubmitError("sbatch not found: submitting needs a Slurm cluster (docs/cluster.md)")
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=0)
    ex.update_parameters(**params)
    return ex


def send(ex, fn):
    """``ex.submit(fn)``, with sbatch's refusal as a ``SubmitError`` naming the job."""
    from submitit.core.utils import FailedJobError

    try:
        return ex.submit(fn)
    except FailedJobError as e:
        name = ex.parameters.get("job_name", "?")
        raise SubmitError(f"sbatch refused job {name}: {' '.join(str(e).split())}") from None


def sbatch_text(req: Request, dependency: str | None = None) -> str:
    """The sbatch script submitit would write for ``req`` (``DRY=1``)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{sys.executable} -u -m submitit.core._submit {req.log_folder}"
    params = sbatch_parameters(req.cluster, req.name, dependency)
    return _make_sbatch_string(command, req.log_folder, **params)


def submit(exp: str, overrides: list[str] | None = None, dry: bool = False, out=None) -> dict[str, str]:
    """Submit the jobs of ``exp``; returns {job name: job id} ({} with ``dry``)."""
    out = out or sys.stdout
    reqs = requests_for(exp, list(overrides or []))
    if dry:
        for r in reqs:
            ranks = r.cluster["nodes"] * tasks_per_node(r.cluster)
            dep = "afterok:<" + ">:<".join(r.after) + ">" if r.after else None
            print(f"# ---- job {r.name} -> {r.run_dir} ({ranks} rank{'s' * (ranks > 1)})", file=out)
            print(f"# job function: experiments.cluster.TrainJob({r.exp!r}, part={r.part!r})", file=out)
            print("# overrides: " + " ".join(r.overrides), file=out)
            print(sbatch_text(r, dep), file=out)
        return {}
    refuse_active(reqs)
    return submit_requests(reqs, out)


def submit_requests(reqs: list[Request], out) -> dict[str, str]:
    """One job per request, in order, each ``afterok`` on the ones it names; {job name: job id}."""
    ids: dict[str, str] = {}
    for r in reqs:
        after = [ids[a] for a in r.after if a in ids]
        ex = executor(
            r.log_folder,
            sbatch_parameters(r.cluster, r.name, "afterok:" + ":".join(after) if after else None),
        )
        job = send(ex, TrainJob(r.exp, r.overrides, r.part, r.cluster))
        ids[r.name] = str(job.job_id)
        note(r, str(job.job_id), Path(job.paths.stdout), out)
    return ids


def note(r: Request, job: str, log: Path, out) -> None:
    """Record a submitted job in its run's ``slurm/jobs.json`` (a log elsewhere gets a link there)."""
    here = r.run_dir / "slurm"
    here.mkdir(parents=True, exist_ok=True)
    log = Path(str(log).replace("%t", "0"))
    if log.parent.resolve() != here.resolve():
        link = here / log.name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(log, here))
    entry = {"job": job, "part": r.part, "name": r.name, "log": str(log), "after": r.after}
    record_job(r.run_dir, {**entry, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"submitted job {job}: {r.name} -> {r.run_dir} (log {log})", file=out, flush=True)


def _has(cmd: str) -> bool:
    return shutil.which(cmd) is not None


# ------------------------------------------------------------------ make status
def job_outcome(folder: Path, job: str) -> tuple[str, str]:
    """(outcome, detail) from submitit's result file of task 0: completed / failed / requeued / ended."""
    import pickle

    p = Path(folder) / f"{job}_0_result.pkl"
    if not p.is_file():
        return "ended", "no result (killed, or cancelled before it ran)"
    try:
        kind, value = pickle.loads(p.read_bytes())
    except Exception as e:  # a result written by another submitit version
        return "ended", f"unreadable result ({type(e).__name__})"
    if kind == "error":
        return "failed", str(value).strip().splitlines()[-1][:200]
    if isinstance(value, dict) and value.get("requeued"):
        return "requeued", value.get("message", "")[:200]
    return "completed", ""


def last_progress(log: Path) -> str:
    """The last progress line (``step i/N ...``) or, failing that, the last line of a job log."""
    import re

    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 16384))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").replace("\r", "\n").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    steps = [ln for ln in lines if re.match(r"^(done: )?step \d+/\d+", ln)]
    return (steps or lines or [""])[-1][:160]


def status(path: str | Path, out=None) -> int:
    """``make status RUN=<run folder>`` / ``MATRIX=<name>``: every job recorded under ``path``, its state
    (Slurm's while it is known to squeue, else the job's outcome) and its last progress line."""
    out = out or sys.stdout
    path = Path(path)
    records = sorted({*path.glob("slurm/jobs.json"), *path.rglob("*/slurm/jobs.json")})
    if not records:
        print(f"no Slurm jobs recorded under {path} (make submit EXP=... records them)", file=out)
        return 1
    q = queue()
    rows = []
    for rec in records:
        run_dir = rec.parent.parent
        for j in json.loads(rec.read_text()):
            state, detail = q.get(j["job"], (None, ""))
            if state is None:
                state, detail = job_outcome(Path(j["log"]).parent, j["job"])
            where = os.path.relpath(run_dir, path) if run_dir != path else "."
            last = last_progress(Path(j["log"]))
            rows.append((where, j.get("part") or "train", j["job"], state, detail, last))
    heads = ("run", "part", "job", "state", "time/reason", "last line")
    widths = [max(len(str(r[i])) for r in [heads, *rows]) for i in range(5)]
    for r in [heads, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r[:5], widths)) + "  " + r[5], file=out)
    return 0
