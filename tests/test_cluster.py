"""The Slurm side that needs no Slurm: sbatch parameters (DRY), the cluster section's checks, the
refusal of a second submission, the requeue callback in a real training, and ``make status``.
The jobs themselves run on a real local Slurm in tests/test_slurm.py (marker ``slurm``)."""

import io
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from test_training import Probe, tiny_overrides  # tests/ is on sys.path

from callbacks.requeue import JobRequeued, SlurmRequeue, requeue, watch
from experiments import cluster
from experiments.rundir import config_diff
from experiments.runner import run
from freqdiff.config import ConfigError, load

REPO = Path(__file__).resolve().parents[1]
REQUEST = [
    "cluster.nodes=2",
    "cluster.gpus_per_node=4",
    "cluster.partition=gpu",
    "cluster.time_min=90",
    "cluster.account=proj",
    "cluster.qos=high",
    "cluster.mem_gb=64",
    "cluster.constraint=a100",
    "cluster.cpus_per_task=6",
    "+cluster.sbatch.exclusive=true",
]


def dry(exp: str, overrides: list[str]) -> str:
    out = io.StringIO()
    assert cluster.submit(exp, overrides, dry=True, out=out) == {}
    return out.getvalue()


def test_dry_prints_the_sbatch_parameters_of_the_request(tmp_path):
    text = dry("quickstart", [f"run.root={tmp_path}", *REQUEST])
    for flag in (
        "--nodes=2",
        "--ntasks-per-node=4",  # one task (DDP rank) per GPU
        "--gpus-per-node=4",
        "--cpus-per-task=6",
        "--partition=gpu",
        "--time=90",
        "--account=proj",
        "--qos=high",
        "--mem=64G",
        "--constraint=a100",
        "--exclusive",
        "--signal=USR2@120",  # the signal callbacks/requeue.py watches, 120 s before the limit
        "--open-mode=append",  # the log goes on across requeues
        f"--output={tmp_path}/quickstart/default/slurm/%j_0_log.out",
    ):
        assert f"#SBATCH {flag}\n" in text, (flag, text)
    assert "trainer.num_nodes=2 trainer.devices=4" in text and "trainer.accelerator" not in text
    assert "(8 ranks)" in text
    # CPU tasks: accelerator cpu, tasks as asked; a user-chosen signal
    cpu = dry("quickstart", [f"run.root={tmp_path}", "cluster.gpus_per_node=0", "cluster.tasks_per_node=2",
                             "cluster.signal=USR1", "cluster.signal_delay_s=30"])  # fmt: skip
    assert "--gpus-per-node" not in cpu and "#SBATCH --ntasks-per-node=2\n" in cpu
    assert "trainer.devices=2 trainer.accelerator=cpu" in cpu and "#SBATCH --signal=USR1@30\n" in cpu


def test_make_submit_maps_its_variables_to_the_cluster_section(tmp_path):
    cmd = ["make", "-s", "submit", "EXP=quickstart", "NODES=3", "GPUS=2", "TIME=45", "PARTITION=p1",
           "MEM=32", "DRY=1", f"ARGS=run.root={tmp_path}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for flag in ("--nodes=3", "--gpus-per-node=2", "--ntasks-per-node=2", "--time=45", "--partition=p1"):
        assert f"#SBATCH {flag}\n" in out.stdout, (flag, out.stdout)
    assert "#SBATCH --mem=32G\n" in out.stdout


def test_dry_of_a_pipeline_runs_its_stages_in_parallel_and_evaluates_after_them(tmp_path):
    over = [f"run.root={tmp_path}", "stages.stage2.cluster.gpus_per_node=8", "cluster.time_min=600"]
    text = dry("quickstart_relay", over)
    jobs = text.split("# ---- job ")[1:]
    assert [j.split(" ")[0] for j in jobs] == [
        "quickstart_relay/stage1/default",
        "quickstart_relay/stage2/default",
        "quickstart_relay/evaluate/default",
    ]
    s1, s2, ev = jobs
    assert "--dependency" not in s1 + s2  # the two trainings are independent
    assert "#SBATCH --gpus-per-node=1\n" in s1 and "#SBATCH --gpus-per-node=8\n" in s2
    assert "stages.stage2.trainer.devices=8" in s2 and "pipeline.only" not in s2  # the job adds it
    assert "part='stage2'" in s2 and "part='evaluate'" in ev
    dep = "#SBATCH --dependency='afterok:<quickstart_relay/stage1/default>:<quickstart_relay/stage2/default>'"
    assert dep in ev and "#SBATCH --ntasks-per-node=1\n" in ev and "#SBATCH --nodes=1\n" in ev
    # pipeline.only: that part alone
    only = dry("quickstart_relay", [*over, "pipeline.only=stage1"])
    assert only.count("# ---- job ") == 1 and "stage1" in only


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.nodes=0", r"cluster.nodes=0: expected an integer >= 1"),
        ("cluster.tasks_per_node=-2", r"cluster.tasks_per_node=-2: expected a positive integer or null"),
        ("cluster.signal=NOPE", r"cluster.signal='NOPE': expected a signal name"),
        ("cluster.signal_delay_s=600", r"cluster.signal_delay_s=600: expected less than the time limit"),
        ("cluster.mem_gb=-1", r"cluster.mem_gb=-1: expected a positive number"),
        ("cluster.partition=''", r"cluster.partition='': expected a name"),
        ("cluster.setup=[3]", r"cluster.setup=\[3\]: expected a list of shell lines"),
    ],
)
def test_bad_cluster_values_are_named(tmp_path, override, message):
    over = [f"run.root={tmp_path}", "cluster.time_min=5", override]
    with pytest.raises(ConfigError, match=message):
        dry("quickstart", over)


def test_a_run_with_a_job_in_the_queue_is_not_submitted_again(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "queue", lambda: {})  # a Slurm of this machine does not take part
    (req,) = cluster.requests_for("quickstart", [f"run.root={tmp_path}"])
    cluster.record_job(req.run_dir, {"job": "17", "part": None, "log": str(tmp_path / "17_0_log.out")})
    with pytest.raises(ConfigError, match=r"job 17 \(RUNNING\) of this run is still queued or running"):
        cluster.refuse_active([req], q={"17": ("RUNNING", "1:02")})
    cluster.refuse_active([req], q={"17": ("COMPLETED", "")})  # ended: a new job may continue the run
    cluster.refuse_active([req], q={})  # no longer known to squeue
    # make status: Slurm's state while it is known, else the job's outcome from submitit's result
    out = io.StringIO()
    assert cluster.status(tmp_path, out=out) == 0
    assert "quickstart/default  train  17   ended" in out.getvalue()
    (tmp_path / "17_0_result.pkl").write_bytes(pickle.dumps(("success", {"requeued": False})))
    out = io.StringIO()
    cluster.status(req.run_dir, out=out)
    assert ".    train  17   completed" in out.getvalue()
    assert cluster.status(tmp_path / "nothing", out=io.StringIO()) == 1


def plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True)


def test_cluster_keys_and_the_world_size_may_change_on_resume(tmp_path):
    a = load("quickstart", [f"run.root={tmp_path}"])
    b = load(
        "quickstart", [f"run.root={tmp_path}", "cluster.nodes=4", "trainer.devices=8", "trainer.num_nodes=4"]
    )
    assert config_diff(plain(a), plain(b)) == []
    c = load("quickstart", [f"run.root={tmp_path}", "module.lr=0.5"])
    assert config_diff(plain(a), plain(c)) == ["module.lr: 0.001 -> 0.5"]


class SignalAt(L.Callback):
    """Sends this process ``sig`` at the end of step ``step`` (as srun delivers --signal)."""

    def __init__(self, step: int, sig: int = signal.SIGUSR2):
        self.step, self.sig = step, sig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_the_signal_checkpoints_at_the_next_step_and_the_rerun_resumes_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")  # requeued 3 times already: the limit below
    previous = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)
    try:
        watch("USR2")
        over = tiny_overrides(tmp_path, **{"trainer.max_steps": 8, "run.checkpoint_every_n_steps": 100})
        cfg = load("quickstart", over)
        with pytest.raises(JobRequeued) as e:
            run(cfg, callbacks=[SignalAt(3), SlurmRequeue(max_requeues=3, signal_name="USR2")])
    finally:
        import callbacks.requeue as rq

        rq._requested.clear()
        signal.signal(signal.SIGUSR2, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    assert not e.value.requeued and "cluster.max_requeues=3" in str(e.value)
    assert "SIGUSR2 at step 3: saved" in str(e.value)  # at the end of the step it arrived in
    run_dir = tmp_path / "runs" / "quickstart" / "default"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    assert not (run_dir / "final_metrics.json").exists()  # not finished: no end-of-training outputs
    probe = Probe()
    run(load("quickstart", over), callbacks=[probe])
    assert probe.start_step == 3
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8


def test_requeue_without_a_job_id_says_so():
    assert "not requeued: no Slurm job id" in requeue(None, "m")
    assert "not requeued: no Slurm job id" in requeue("12; rm -rf /", "m")
