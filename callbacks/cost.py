"""What a run costs: parameters, FLOPs, throughput, peak memory, sampling speed (docs/dashboards.md).

``CostMeter`` is in every experiment (``experiments/_base.yaml``, ``callbacks.cost``; ``cost: null`` in
an experiment file removes it) and writes ``<run>/cost.json`` when training ends (and on an error or
Ctrl-C), TensorBoard scalars ``cost/*`` at the last step, and a ``cost`` entry in
``<run>/final_metrics.json`` when the evaluation wrote one. The fields:

- ``params``: trainable parameters of the module (the runner header's count).
- ``flops_per_step``, ``flops_per_image``: FLOPs (``torch.utils.flop_counter.FlopCounterMode``:
  matmuls and convolutions, a multiply-add = 2 FLOPs) of the forward and backward passes of one
  optimiser step on this rank, from ``on_train_batch_start`` to ``on_before_optimizer_step`` (before
  gradient clipping, the optimiser and the EMA), of the first step of a new run (``flop_steps: 1``;
  0: not counted); per image: divided by the images of the step on this rank (a method whose step
  cost varies, Scale Space's resolution segments, reports its first step's). A resumed run keeps the
  value of its ``cost.json``. Counting dispatches every op through Python (the measured steps are slower)
  but changes no value and draws no random number.
- ``img_per_s``: global images per wall-clock second, the median over the logging intervals
  (``trainer.log_every_n_steps``) of this session after the measured steps, from host clocks only
  (no device synchronisation); ``images_seen``: global_step × batch × world size × accumulation;
  ``train_seconds``: wall time from the start to the end of training, summed over resumes, less the
  time the evaluation callbacks spent (their records' ``seconds``), so methods compare on training.
- ``peak_memory_bytes`` with ``peak_memory_kind``: ``cuda_max_allocated``
  (``torch.cuda.max_memory_allocated``) on a GPU, else ``cpu_rss`` (the process's peak resident set,
  ``ru_maxrss``); the maximum over resumes.
- ``sampler``, ``nfe``, ``sample_seconds``, ``sample_img_per_s``: from the last evaluation record
  (``callbacks/fid.py``; ``sample_seconds`` times the sampler calls only), null without one.

The runner orders it after the other callbacks of the config (``run_after_others``), so at the end
of training it reads the record the evaluation has just written; placed before an evaluation by
hand, it writes again at ``on_fit_end``. Only global rank 0 writes and logs.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from callbacks.progress import count_parameters
from freqdiff.config import check_args

FILE = "cost.json"
KEYS = (
    "step",
    "params",
    "flops_per_step",
    "flops_per_image",
    "flop_steps",
    "img_per_s",
    "images_seen",
    "train_seconds",
    "peak_memory_bytes",
    "peak_memory_kind",
    "sampler",
    "nfe",
    "sample_seconds",
    "sample_img_per_s",
)


class CostMeter(L.Callback):
    run_after_others = True  # the runner puts it after the config's other callbacks (module docstring)

    def __init__(self, flop_steps: int = 1):  # 1: the first optimiser step's FLOPs are counted, 0: none
        check_args("a non-negative integer", flop_steps=flop_steps)
        if flop_steps > 1:  # counting across two steps changed the trained weights (cause not found)
            raise ValueError(f"CostMeter: flop_steps={flop_steps}: expected 0 or 1")
        self.flop_steps = int(flop_steps)
        self._reset()

    def _reset(self) -> None:
        self._t_start: float | None = None
        self._t_end: float | None = None  # when training ended (the end-of-training evaluation is after)
        self._prior: dict[str, Any] = {}
        self._mode: FlopCounterMode | None = None
        self._step_images = 0
        self._measured: list[tuple[int, int]] = []  # (FLOPs, images on this rank) per measured step
        self._to_measure = 0
        self._enter_step = 0
        self._batch: int | None = None  # per-device batch seen
        self._mark: tuple[float, int] | None = None  # (time, global_step) of the interval's start
        self._rates: list[float] = []
        self._deferred = False
        self.record: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._reset()
        self._t_start = time.perf_counter()
        if trainer.global_step > 0:  # resumed: what the earlier sessions measured
            self._prior = read_cost(Path(trainer.default_root_dir)) or {}
        self._to_measure = 0 if self._prior.get("flops_per_step") is not None else self.flop_steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch_size_of(batch) or self._batch
        if self._to_measure > 0:
            if self._mode is None:
                self._mode, self._step_images = FlopCounterMode(display=False), 0
                self._enter_step = trainer.global_step
                self._mode.__enter__()
            self._step_images += self._batch or 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._stop_counting()  # forward and backward are done; clipping, the step and the EMA follow

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._mode is not None and trainer.global_step > self._enter_step:
            self._stop_counting()  # (an optimiser step that bypassed on_before_optimizer_step)
        if self._mode is not None or self._to_measure > 0:
            return  # throughput intervals start after the measured steps
        now, step = time.perf_counter(), trainer.global_step
        if self._mark is None:
            self._mark = (now, step)
            return
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        if step % every == 0 and step > self._mark[1]:
            self._rates.append(self._rate(trainer, now, step))
            self._mark = (now, step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._t_end = time.perf_counter()
        self.finish(trainer, pl_module, final=True)
        later = trainer.callbacks[trainer.callbacks.index(self) + 1 :] if self in trainer.callbacks else []
        self._deferred = any(getattr(c, "at_end", False) and hasattr(c, "history") for c in later)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._deferred:  # an evaluation ran after on_train_end: merge its record now
            self._deferred = False
            self.finish(trainer, pl_module, final=True)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stop_counting(keep=False)
        if self._t_start is not None:
            self.finish(trainer, pl_module, final=False)

    def missing_final_outputs(self, trainer) -> list[str]:
        """End-of-training outputs not written (``experiments.runner.complete_final_outputs``)."""
        run_dir = Path(trainer.default_root_dir)
        cost = read_cost(run_dir)
        missing = [] if cost is not None and cost.get("step") == trainer.global_step else [FILE]
        evals = [
            c
            for c in trainer.callbacks
            if hasattr(c, "history") and callable(getattr(c, "missing_final_outputs", None))
        ]
        if any("final_metrics.json" in c.missing_final_outputs(trainer) for c in evals):
            missing.append("final_metrics.json (cost)")  # the evaluation rewrites it: merge again after
        elif (run_dir / "final_metrics.json").is_file() and "cost" not in (
            read_json(run_dir / "final_metrics.json") or {}
        ):
            missing.append("final_metrics.json (cost)")
        return missing

    # ------------------------------------------------------------------------------------ measures
    def _stop_counting(self, keep: bool = True) -> None:
        if self._mode is None:
            return
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        if keep:
            self._measured.append((int(mode.get_total_flops()), int(self._step_images)))
            self._to_measure -= 1

    def _images_per_step(self, trainer) -> int:
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        batch = batch if isinstance(batch, int) else (self._batch or 0)
        return batch * trainer.world_size * int(trainer.accumulate_grad_batches)

    def _rate(self, trainer, now: float, step: int) -> float:
        t0, s0 = self._mark
        return (step - s0) * self._images_per_step(trainer) / max(now - t0, 1e-9)

    def measure(self, trainer, pl_module) -> dict[str, Any]:
        """The cost record of the run so far (every rank can call it; only rank 0 writes it)."""
        prior, now = self._prior, time.perf_counter()
        if self._measured:
            flops = sum(f for f, _ in self._measured) / len(self._measured)
            imgs = sum(i for _, i in self._measured) / len(self._measured)
            flop_steps, per_image = len(self._measured), flops / max(imgs, 1)
        else:
            flops, per_image, flop_steps = (
                prior.get(k) for k in ("flops_per_step", "flops_per_image", "flop_steps")
            )
        rates = list(self._rates)
        if not rates and self._mark is not None and trainer.global_step > self._mark[1]:
            rates = [self._rate(trainer, now, trainer.global_step)]  # shorter than one logging interval
        session = 0.0 if self._t_start is None else (self._t_end or now) - self._t_start
        session = max(session - _eval_seconds(trainer), 0.0)
        peak, kind = peak_memory(pl_module.device)
        if prior.get("peak_memory_kind") == kind and (prior.get("peak_memory_bytes") or 0) > peak:
            peak = int(prior["peak_memory_bytes"])
        record = {
            "step": int(trainer.global_step),
            "params": count_parameters(pl_module)[0],
            "flops_per_step": flops,
            "flops_per_image": per_image,
            "flop_steps": flop_steps,
            "img_per_s": statistics.median(rates) if rates else prior.get("img_per_s"),
            "images_seen": int(trainer.global_step) * self._images_per_step(trainer),
            "train_seconds": round(float(prior.get("train_seconds") or 0.0) + session, 3),
            "peak_memory_bytes": int(peak),
            "peak_memory_kind": kind,
            **sampling_fields(trainer, prior),
        }
        return record

    def finish(self, trainer, pl_module, final: bool) -> None:
        record = self.measure(trainer, pl_module)
        self.record = record
        if not trainer.is_global_zero:
            return
        run_dir = Path(trainer.default_root_dir)
        write_json(run_dir / FILE, record)
        if final:
            metrics = read_json(run_dir / "final_metrics.json")
            if metrics is not None:
                write_json(run_dir / "final_metrics.json", {**metrics, "cost": record})
            self._log(trainer, record)

    @staticmethod
    def _log(trainer, record: dict[str, Any]) -> None:
        scalars = {
            "cost/params": record["params"],
            "cost/flops_per_image": record["flops_per_image"],
            "cost/img_per_s": record["img_per_s"],
            "cost/peak_memory_mb": record["peak_memory_bytes"] / 1e6,
            "cost/sample_img_per_s": record["sample_img_per_s"],
        }
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        if trainer.logger is not None:
            trainer.logger.log_metrics(scalars, step=record["step"])
            trainer.logger.save()


# ---------------------------------------------------------------------------------------- helpers
def batch_size_of(batch: Any) -> int | None:
    """Images in a batch (``x0`` of a dict, a tensor, or the first of a tuple); a host-side shape."""
    if isinstance(batch, dict):
        batch = batch.get("x0")
    elif isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() else None


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_rss"  # bytes on macOS, KiB on Linux


def _eval_seconds(trainer) -> float:
    """Seconds the evaluation callbacks spent in this session (the records of their ``history``)."""
    return sum(
        float(r.get("seconds") or 0.0)
        for c in trainer.callbacks
        if isinstance(getattr(c, "history", None), list)
        for r in c.history
        if isinstance(r, dict)
    )


def sampling_fields(trainer, prior: dict[str, Any]) -> dict[str, Any]:
    """``sampler``, ``nfe``, ``sample_seconds``, ``sample_img_per_s`` of the last evaluation record."""
    record = None
    for cb in trainer.callbacks:
        history = getattr(cb, "history", None)
        if isinstance(history, list) and history and isinstance(history[-1], dict):
            record = history[-1]
    if record is None:  # none in this session: the last written one
        record = read_json(Path(trainer.default_root_dir) / "final_metrics.json")
    if record is None or record.get("sample_seconds") is None:
        return {k: prior.get(k) for k in ("sampler", "nfe", "sample_seconds", "sample_img_per_s")}
    seconds = float(record["sample_seconds"])
    return {
        "sampler": record.get("sampler"),
        "nfe": record.get("nfe"),
        "sample_seconds": seconds,
        "sample_img_per_s": record["n"] / seconds if seconds > 0 and record.get("n") else None,
    }


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_cost(run_dir: Path) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / FILE)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def describe(record: dict[str, Any]) -> str:
    """``0.59 M params, 12.3 MFLOP/img train, 330 img/s, peak 1.2 GB RSS, sampling 27 img/s (NFE 50)``."""
    parts = [f"{record['params'] / 1e6:.2f} M params"]
    if record.get("flops_per_image") is not None:
        parts.append(f"{_si(record['flops_per_image'], 'FLOP')}/img train")
    if record.get("img_per_s") is not None:
        parts.append(f"{record['img_per_s']:,.0f} img/s")
    kind = {"cpu_rss": "RSS", "cuda_max_allocated": "CUDA"}.get(record.get("peak_memory_kind"), "")
    if record.get("peak_memory_bytes"):
        parts.append(f"peak {record['peak_memory_bytes'] / 1e9:.1f} GB {kind}".rstrip())
    if record.get("sample_img_per_s") is not None:
        parts.append(f"sampling {record['sample_img_per_s']:.3g} img/s (NFE {record.get('nfe')})")
    return ", ".join(parts)
