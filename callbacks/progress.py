"""What a training run prints: a short header at the start and one progress line
(docs/architecture.md, Callbacks).

The runner adds both callbacks to every run (``RunHeader`` always, ``ProgressLine`` when
``trainer.enable_progress_bar`` is true; Lightning's own bar and model summary are then off):

- ``RunHeader``: at ``on_train_start`` (everything is known then, the resumed step included):
  experiment, run folder, new run or resumed step, the module class, parameter counts (trainable
  and EMA), data resolution and batch size, device and precision, ``max_steps``.
- ``ProgressLine``: ``step 120/2000 (6%)  loss 0.0412  1,234 img/s  elapsed 1:05  eta 17:02``.
  On a TTY it is redrawn in place at most every ``refresh_s`` seconds (and anything else written
  to stdout / stderr meanwhile first clears it, so output never lands in the middle of it); when
  stdout is not a TTY (CI logs, ``| tee``) a plain line is printed every ``every_n_steps`` steps
  (default: 10 % of ``max_steps``). A final ``done`` line is printed when training ends.

The loss and throughput are the module's values of the current step (``DiffusionModule.last_loss``
and ``last_img_per_s``; for another module, ``train/loss`` and ``perf/img_per_s`` from
``trainer.callback_metrics``); they are read at most once per ``refresh_s`` (that read is one
device→host synchronisation) and smoothed with an exponential moving average over those reads.
ETA is from the wall-clock time per step in this session (after its first step, which includes
start-up). Only global rank 0 prints.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch

LOSS_KEY = "train/loss"  # logged by the module (prog_bar)
IMG_PER_S_KEY = "perf/img_per_s"  # logged by the module


def hms(seconds: float | None) -> str:
    """``m:ss`` below an hour, ``h:mm:ss`` above; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_line(
    step: int,  # optimiser steps done (trainer.global_step)
    max_steps: int,  # the step budget (<= 0: unknown, no percentage or ETA)
    loss: float | None,  # smoothed train/loss (None: not logged yet)
    img_per_s: float | None,  # smoothed images per second, all ranks (None: not logged yet)
    elapsed: float,  # seconds since training started in this session
    eta: float | None,  # seconds left (None: unknown)
    done: bool = False,  # the final line: "done: " in front, no ETA
) -> str:
    """The progress line; its format is stable (tests and log scrapers read it)."""
    total = f"/{max_steps} ({100 * step / max_steps:.0f}%)" if max_steps > 0 else ""
    parts = [f"{'done: ' if done else ''}step {step}{total}"]
    parts.append("loss -" if loss is None else f"loss {loss:.4f}")
    parts.append(f"{_rate(img_per_s)} img/s")
    parts.append(f"elapsed {hms(elapsed)}")
    if not done:
        parts.append(f"eta {hms(eta)}")
    return "  ".join(parts)


def _rate(x: float | None) -> str:
    """Three significant digits below 100 (``1.23``, ``12.3``), whole numbers above (``1,234``)."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:,.0f}"


class _Smoothed:
    """Bias-corrected exponential moving average of a scalar (``beta`` per update)."""

    def __init__(self, beta: float):
        self.beta, self.avg, self.n = beta, 0.0, 0

    def update(self, x: float) -> None:
        self.avg = self.beta * self.avg + (1 - self.beta) * x
        self.n += 1

    @property
    def value(self) -> float | None:
        return self.avg / (1 - self.beta**self.n) if self.n else None


class _LineConsole:
    """Draws one line in place on a TTY; other writes to stdout / stderr clear it first."""

    def __init__(self, out: TextIO, err: TextIO):
        self.out, self.err, self.shown = out, err, False
        self._proxies: list[_ClearingStream] = []

    def draw(self, text: str) -> None:
        width = shutil.get_terminal_size().columns - 1  # a wrapped line could not be redrawn with \r
        self.out.write("\r" + text[:width] + "\x1b[K")  # \x1b[K: erase what a longer line left
        self.out.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False

    def install(self) -> None:
        """Route ``sys.stdout`` / ``sys.stderr`` through proxies that clear the line before writing."""
        self._proxies = [_ClearingStream(sys.stdout, self), _ClearingStream(sys.stderr, self)]
        sys.stdout, sys.stderr = self._proxies

    def uninstall(self, keep: bool = False) -> None:
        if keep and self.shown:
            self.out.write("\n")
            self.out.flush()
            self.shown = False
        self.clear()
        if self._proxies:
            if sys.stdout is self._proxies[0]:
                sys.stdout = self._proxies[0].inner
            if sys.stderr is self._proxies[1]:
                sys.stderr = self._proxies[1].inner
            self._proxies = []


class _ClearingStream:
    """A text stream wrapper: clears the progress line, then writes (everything else is delegated)."""

    def __init__(self, inner: TextIO, console: _LineConsole):
        self.inner, self.console = inner, console

    def write(self, s: str) -> int:
        if s:
            self.console.clear()
        return self.inner.write(s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ProgressLine(L.Callback):
    """One clean progress line instead of Lightning's progress bar (module docstring)."""

    def __init__(
        self,
        every_n_steps: int | None = None,  # non-TTY: a line every n steps (None: 10 % of max_steps)
        refresh_s: float = 0.25,  # at most one metrics read (and TTY redraw) per refresh_s seconds
        beta: float = 0.9,  # moving-average factor per metrics read (loss and img/s)
        tty: bool | None = None,  # None: sys.stdout.isatty()
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.every_n_steps, self.refresh_s, self.beta, self.tty = every_n_steps, refresh_s, beta, tty
        self._console: _LineConsole | None = None
        self._active = False

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._active = trainer.is_global_zero
        if not self._active:
            return
        self._tty = sys.stdout.isatty() if self.tty is None else bool(self.tty)
        self._max_steps = int(trainer.max_steps)
        if self.every_n_steps is not None:
            self._every = self.every_n_steps
        else:  # 10 % of the budget (100 steps without one)
            self._every = max(1, round(self._max_steps / 10)) if self._max_steps > 0 else 100
        self._loss, self._ips = _Smoothed(self.beta), _Smoothed(self.beta)
        self._t0 = time.perf_counter()
        self._t_read = -math.inf  # time of the last metrics read
        self._read_step = -1  # step of the last metrics read
        self._first = None  # (time, step) when the first step of this session ended
        self._step = self._start_step = int(trainer.global_step)
        if self._tty:
            self._console = _LineConsole(sys.stdout, sys.stderr)
            self._console.install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active or int(trainer.global_step) == self._step:
            return  # not rank 0, or a gradient-accumulation micro-batch
        self._step = step = int(trainer.global_step)
        now = time.perf_counter()
        if self._first is None:
            self._first = (now, step)
        due_print = not self._tty and step % self._every == 0
        due_read = now - self._t_read >= self.refresh_s or step == self._max_steps
        if due_read or due_print:
            self._read(trainer)
            self._t_read = now
            if self._tty:
                self._console.draw(self._line(now))
        if due_print:
            print(self._line(now), flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._active:
            return
        self._read(trainer)  # no-op when the last step was read already
        self._close(keep=False)
        print(format_line(**self._fields(time.perf_counter()), done=True), flush=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._active:
            self._close(keep=True)  # the last line stays above the traceback

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._active:
            self._close(keep=True)

    # ------------------------------------------------------------------ internals
    def _read(self, trainer) -> None:
        """Fold the latest logged loss and img/s into the averages (one device→host transfer)."""
        if self._read_step == self._step:
            return
        self._read_step = self._step
        module, metrics = trainer.lightning_module, trainer.callback_metrics
        values = [  # the module's values of this step (DiffusionModule), else what it logged
            getattr(module, "last_loss", None),
            getattr(module, "last_img_per_s", None),
        ]
        values = [metrics.get(k) if v is None else v for k, v in zip((LOSS_KEY, IMG_PER_S_KEY), values)]
        present = [v for v in values if v is not None]
        if not present:
            return
        device = torch.as_tensor(present[0]).device
        stacked = torch.stack([torch.as_tensor(v).detach().float().reshape(()).to(device) for v in present])
        floats = iter(stacked.tolist())
        for v, avg in zip(values, (self._loss, self._ips)):
            if v is not None:
                avg.update(next(floats))

    def _fields(self, now: float) -> dict[str, Any]:
        eta = None
        if self._first is not None and self._max_steps > 0:
            t, s = self._first if self._step > self._first[1] else (self._t0, self._start_step)
            eta = (now - t) / max(self._step - s, 1) * max(self._max_steps - self._step, 0)
        return {
            "step": self._step,
            "max_steps": self._max_steps,
            "loss": self._loss.value,
            "img_per_s": self._ips.value,
            "elapsed": now - self._t0,
            "eta": eta,
        }

    def _line(self, now: float) -> str:
        return format_line(**self._fields(now))

    def _close(self, keep: bool) -> None:
        """Give stdout / stderr back; ``keep``: end the drawn line with a newline instead of erasing it."""
        if self._console is not None:
            self._console.uninstall(keep=keep)
            self._console = None


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, parameters of the module's EMA copy ``module.ema``; 0 without one)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    ema = getattr(module, "ema", None)
    n_ema = sum(p.numel() for p in ema.parameters()) if isinstance(ema, torch.nn.Module) else 0
    return trainable, n_ema


class RunHeader(L.Callback):
    """Prints what the run is, once, at the start of training (module docstring)."""

    def __init__(
        self,
        experiment: str,  # the config's experiment name
        run_dir: str | Path,  # the run folder
        ckpt_path: str | None = None,  # the checkpoint it resumes from (None: a new run)
        data_note: str = "",  # where data.resolution came from (the runner's manifest peek)
    ):
        self.experiment, self.run_dir, self.ckpt_path = experiment, Path(run_dir), ckpt_path
        self.data_note = data_note

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print("\n".join(self.lines(trainer, pl_module)), flush=True)

    def lines(self, trainer, pl_module) -> list[str]:
        if self.ckpt_path:
            ckpt = Path(self.ckpt_path)
            shown = ckpt.relative_to(self.run_dir) if ckpt.is_relative_to(self.run_dir) else ckpt
            start = f"resuming from step {trainer.global_step}: {shown}"
        else:
            start = "new run"
        trainable, ema = count_parameters(pl_module)
        params = f"{trainable:,} trainable parameters ({trainable / 1e6:.2f} M)"
        if ema:
            params += f", EMA {ema:,}"
        dm = trainer.datamodule
        res = getattr(dm, "resolution", None)
        data = f"{res}x{res} px" if res is not None else "resolution unknown"
        if self.data_note:
            data += f" ({self.data_note})"
        batch = getattr(dm, "batch_size", None)
        if batch is not None:
            data += f", batch {batch} per device"
            if trainer.world_size > 1:
                data += f" x {trainer.world_size} = {batch * trainer.world_size}"
        device = str(trainer.strategy.root_device)
        if trainer.strategy.root_device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(trainer.strategy.root_device)})"
        devices = f" x {trainer.world_size}" if trainer.world_size > 1 else ""
        return [
            f"experiment  {self.experiment}",
            f"run folder  {self.run_dir}  ({start})",
            f"module      {type(pl_module).__name__}: {params}",
            f"data        {data}",
            f"device      {device}{devices}, precision {trainer.precision}",
            f"max_steps   {trainer.max_steps}",
        ]
