"""Checkpoint and requeue a Slurm job on its time-limit / preemption signal (docs/cluster.md).

The one requeue mechanism of this project. A job submitted by ``make submit`` asks Slurm for
``--signal=<cluster.signal>@<cluster.signal_delay_s>`` (USR2 by default: NCCL may use USR1), so the
tasks get that signal ``signal_delay_s`` seconds before the time limit, or when an operator or a
preempting scheduler sends it (``scancel --signal=USR2 <job>``). Then:

1. the signal handler only sets a flag (``watch``): nothing is saved from inside a signal handler,
   mid-step, where the other ranks are somewhere else;
2. at the end of the next training step (every ``check_every_n_steps`` steps under DDP, where the
   ranks agree by one all-reduce), every rank stops: ``last.ckpt`` is written atomically, the
   folder's usual checkpoint that the requeued job resumes from (``experiments/rundir.py``);
3. rank 0 runs ``scontrol requeue <job>`` (a job array's task: ``<array job>_<task>``) unless the job
   was requeued ``max_requeues`` times already, and every rank leaves training with
   ``JobRequeued``: no end-of-training evaluation runs, as the run is not finished.

Why not Lightning's auto-requeue: its handler saves ``hpc_ckpt_<n>.ckpt`` into the trainer's root
inside the signal handler (mid-step, which this project's resume does not read) and finalizes the
loggers; the runner turns it off (``SLURMEnvironment(auto_requeue=False)``). Why not submitit's:
it requeues and exits from inside its handler, before anything is saved; the job function replaces
that handler with ``watch`` before it builds anything. SIGTERM (``scancel``, a preemption with
``PreemptMode=REQUEUE``, the end of the time limit) is Lightning's: it stops at the next step and
``CheckpointOnException`` writes ``last.ckpt``; Slurm requeues a preempted job itself.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import lightning as L

_requested: dict[str, float] = {}  # signal name -> time it arrived (set by the handler)


class JobRequeued(SystemExit):
    """Training left early because the job was checkpointed for a requeue (or its requeues ran out)."""

    def __init__(self, message: str, requeued: bool):
        super().__init__(0)
        self.message, self.requeued = message, requeued

    def __str__(self) -> str:
        return self.message


def signal_number(name: str) -> int:
    """``USR2`` / ``SIGUSR2`` / ``12`` -> the signal's number (ValueError naming the value)."""
    text = str(name).strip().upper()
    if text.isdigit():
        return int(text)
    sig = getattr(signal, text if text.startswith("SIG") else "SIG" + text, None)
    if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"cluster.signal={name!r}: expected a signal name such as USR2, USR1 or TERM")
    return int(sig)


def watch(name: str, action=None) -> None:
    """Replace the handler of signal ``name`` by one that records its arrival (then calls ``action()``,
    if given: a job without a training loop to stop at a step boundary)."""

    def handler(signum, frame) -> None:
        _requested.setdefault(name, time.time())
        if action is not None:
            action()

    signal.signal(signal_number(name), handler)


def requested() -> bool:
    return bool(_requested)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` in an array, else ``SLURM_JOB_ID``."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


class SlurmRequeue(L.Callback):
    """Steps 2 and 3 of the module docstring; ``watch`` must have been called (the job function does)."""

    def __init__(self, max_requeues: int = 50, check_every_n_steps: int = 1, signal_name: str = "USR2"):
        self.max_requeues, self.every = int(max_requeues), int(check_every_n_steps)
        self.signal_name = signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = requested()
        if trainer.world_size > 1:
            if trainer.global_step % self.every:
                return
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)  # any rank got it
        if not flag:
            return
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the full state: it must resume
        for c in trainer.checkpoint_callbacks:
            c._last_global_step_saved = trainer.global_step
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        step, job = trainer.global_step, slurm_job_id()
        arrived = min(_requested.values()) if _requested else time.time()
        waited = f"{time.time() - arrived:.1f} s after the signal"
        if restarts >= self.max_requeues:
            message = (
                f"SIG{self.signal_name} at step {step}: saved {path} ({waited}); not requeued: the job "
                f"was requeued {restarts} times (cluster.max_requeues={self.max_requeues}); "
                "`make submit` the same experiment again to continue from this checkpoint"
            )
            requeued = False
        else:
            requeued = True
            message = f"SIG{self.signal_name} at step {step}: saved {path} ({waited}); requeued job {job}"
            if trainer.is_global_zero:
                message = requeue(job, message)
        signal.signal(signal.SIGTERM, lambda *_: None)  # the requeue's own SIGTERM: we are leaving anyway
        if trainer.is_global_zero:
            print(message, flush=True)
        raise JobRequeued(message, requeued)


def requeue(job: str | None, message: str) -> str:
    """``scontrol requeue <job>``; returns ``message``, or what went wrong instead."""
    if not job or not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        return message + f" -- not requeued: no Slurm job id (SLURM_JOB_ID={job!r})"
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return message + f" -- scontrol requeue failed: {e}"
    if out.returncode != 0:
        return message + f" -- scontrol requeue {job} failed: {(out.stderr or out.stdout).strip()}"
    return message
