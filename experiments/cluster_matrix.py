"""``make matrix LAUNCHER=slurm``: a matrix's cells as Slurm jobs (experiments/matrix.py, docs/cluster.md).

Plain cells go out as job arrays (one array per distinct resource request, one array task per
cell); a pipeline cell (Relay) as its stage jobs plus its evaluation job (``afterok``), as ``make
submit`` sends it. A last job, ``afterany`` on all of them, records each cell's status in
``matrix.json`` from its outputs and writes the comparison (``<root>/<matrix>/compare/``). Submitting
again skips the cells that are finished or still queued or running, and submits the others.
Array logs are under ``<root>/<matrix>/slurm/``, linked from each cell's ``<run>/slurm/``.
"""

from __future__ import annotations

import json
import sys

from submitit.core.utils import FailedJobError

from experiments.cluster import (
    SubmitError,
    TrainJob,
    active_jobs,
    executor,
    note,
    queue,
    requests_for,
    sbatch_parameters,
    send,
    submit_requests,
)
from experiments.matrix import Cell, CellResult, Plan, read_status, status_entry, write_status


def finished(cell: Cell) -> bool:
    """Whether a cell's final outputs are there (its evaluation record)."""
    return any((cell.run_dir / f).is_file() for f in ("final_metrics.json", "pipeline_metrics.json"))


class FinishMatrix:
    """The matrix's last job: each cell's status from its outputs, then the comparison."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self) -> dict:
        from experiments.compare import write_report

        status = read_status(self.plan)
        for c in self.plan.cells:
            ok = finished(c)
            reason = "" if ok else "no final outputs: see make status MATRIX=" + self.plan.matrix
            r = CellResult(c.name, "done" if ok else "failed", run_dir=str(c.run_dir), reason=reason)
            status["cells"][c.name] = status_entry(c, r)
        write_status(self.plan, status)
        try:
            return {"report": str(write_report(self.plan.root, runs=[c.run_dir for c in self.plan.cells]))}
        except FileNotFoundError:
            return {"report": None}


class SlurmLauncher:
    """The matrix launcher interface: ``launch(plan, todo, on_result)``; cells end as ``submitted``."""

    def __init__(self, out=None):
        self.out = out or sys.stdout

    def launch(self, plan: Plan, todo: list[Cell], on_result) -> list[CellResult]:
        q, results, ids, groups, first = queue(), [], [], {}, None
        for cell in todo:
            reqs = requests_for(cell.experiment, cell.overrides)
            first = first or reqs[0].cluster  # the compare job's partition, account, ...
            busy = [js for r in reqs for js in active_jobs(r, q)]
            if busy or finished(cell):
                why = f"job {busy[0][0]} is {busy[0][1]}" if busy else "its outputs are there"
                results.append(CellResult(cell.name, "skipped", run_dir=str(cell.run_dir), reason=why))
                continue
            if len(reqs) == 1 and reqs[0].part is None:
                key = json.dumps(sbatch_parameters(reqs[0].cluster, plan.matrix), sort_keys=True)
                groups.setdefault(key, []).append((cell, reqs[0]))
                continue
            got = submit_requests(reqs, self.out)  # a pipeline: its stages, then its evaluation after them
            ids += got.values()
            results.append(self._submitted(cell, ", ".join(got.values()), on_result))
        folder = (plan.root / "slurm").resolve()
        for members in groups.values():
            c = members[0][1].cluster
            ex = executor(folder, sbatch_parameters(c, f"{plan.matrix}/cells"))
            try:
                with ex.batch():
                    jobs = [ex.submit(TrainJob(r.exp, r.overrides, None, r.cluster)) for _, r in members]
            except FailedJobError as e:
                raise SubmitError(
                    f"sbatch refused the array of {plan.matrix}: {' '.join(str(e).split())}"
                ) from None
            for (cell, r), job in zip(members, jobs):
                note(r, str(job.job_id), job.paths.stdout, self.out)
                ids.append(str(job.job_id))
                results.append(self._submitted(cell, str(job.job_id), on_result))
        if ids:
            small = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "cpus_per_task": 1, "time_min": 60}
            params = sbatch_parameters(
                {**first, **small}, f"{plan.matrix}/compare", "afterany:" + ":".join(ids)
            )
            job = send(executor(folder, params), FinishMatrix(plan))
            print(
                f"submitted job {job.job_id}: {plan.matrix}/compare, after the {len(ids)} jobs", file=self.out
            )
        return results

    def _submitted(self, cell: Cell, jobs: str, on_result) -> CellResult:
        r = CellResult(cell.name, "submitted", run_dir=str(cell.run_dir), reason=f"job {jobs}")
        on_result(cell, r)
        return r
