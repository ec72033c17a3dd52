"""``make spectra EXP=NAME`` / ``make spectra RUN=<run folder>``: the frequency view of an experiment
(docs/frequencies.md, "make spectra").

Figures (PNG in ``<out>``, and to TensorBoard under ``<out>/tb``, tag ``spectra/<name>``):

- ``data_spectra.png``: RAPS of the experiment's data at its resolution and 2× and 4× average-pooled,
  each with its fitted power-law exponent;
- ``snr.png``: the per-frequency SNR of the experiment's process at several times, with the data's
  spectrum (``analysis.frequency.process_spectra``: analytic from the process's linear map; from
  draws, ``empirical_spectra``, above 32²), against the line SNR = 1; for a white-noise process also
  at t = 0.3 for the data pooled 2× and 4× (dotted: the same noise crosses SNR 1 at coarser
  frequencies of a smaller image);
- ``chromatography.png``: the rate of each resolution level's signal share over t,
  ``sigmoid(λ(t) + 2 ln n)``, with λ(t) = ln(a²/σ²) from the process's scalings;
- with ``RUN``: ``sample_spectra.png`` (RAPS of EMA samples against the data) and
  ``chromatography_empirical.png`` (the power of the change of x0_hat between sampling steps, per
  frequency band, normalised over the steps, against the exact-denoiser theory of Gaussian data with
  the data's spectrum).

A pipeline experiment (Relay) is shown through its last stage. ``<out>``: ``runs/<experiment>/spectra``
for ``EXP``, ``<run>/spectra`` for ``RUN``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from callbacks.spectra import octave_bands
from freqdiff.analysis import frequency as fq
from freqdiff.analysis.plots import figure_to_array, plot_raps
from freqdiff.config import ConfigError, instantiate, load
from freqdiff.metrics.spectra import fit_power_law, raps

TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
MOVE_T = 0.3  # the time whose SNR is also drawn for the data average-pooled 2× and 4×
LEVELS = (1, 2, 4, 8)


def _stage_config(exp: str, overrides: list[str]):
    from experiments.pipeline import is_pipeline, load_pipeline
    from experiments.runner import resolve_data_resolution

    if is_pipeline(exp):
        _, stages = load_pipeline(exp, overrides)
        return list(stages.values())[-1]
    return resolve_data_resolution(load(exp, overrides), exp, overrides)


def _logsnr(process, ts: torch.Tensor) -> torch.Tensor:
    a, s = process.scalings(ts)
    return (2 * (torch.log(a.double()) - torch.log(s.double().clamp_min(1e-30)))).double()


def _save(fig: Figure, out: Path, name: str, writer) -> Path:
    path = out / f"{name}.png"
    fig.savefig(path, format="png")
    writer.add_image(f"spectra/{name}", figure_to_array(fig), dataformats="HWC")
    return path


def data_figure(x: torch.Tensor) -> Figure:
    curves = {}
    for n in (1, 2, 4):
        if x.shape[-1] // n < 4:
            continue
        xn = torch.nn.functional.avg_pool2d(x, n) if n > 1 else x
        f, p = raps(xn)
        gamma = fit_power_law(f, p, 1, max(2, xn.shape[-1] // 2))[1]
        curves[f"{xn.shape[-1]}² (γ = {gamma:.2f})"] = (f, p)
    return plot_raps(curves, title="data RAPS at several resolutions")


def snr_figure(process, x: torch.Tensor, p_data: torch.Tensor) -> Figure:
    """``p_data``: the RAPS of ``x`` [R]."""
    side = x.shape[-1]
    fig = Figure(figsize=(5.5, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for t in TIMES:
        if side <= 32:
            r = fq.process_spectra(process, side, t, p_data)
        else:
            r = fq.empirical_spectra(process, x[:, :1], t)
        f, snr = r["freqs"].numpy(), r["snr"].numpy()
        keep = (f > 0) & (snr > 0) & np.isfinite(snr)
        ax.loglog(f[keep], snr[keep], marker=".", label=f"t = {t} ({process.resolution(t)}²)")
    if getattr(process, "white_noise", False):  # the same t at lower resolutions: the crossing moves
        a, sig = (float(v) for v in process.scalings(torch.tensor([MOVE_T])))
        for n in (2, 4):
            if side // n >= 4:
                f, p = raps(torch.nn.functional.avg_pool2d(x, n))
                keep = f > 0
                snr = (a * a / (sig * sig) * p)[keep]
                ax.loglog(f[keep].numpy(), snr.numpy(), linestyle=":", label=f"t = {MOVE_T} at {side // n}²")
    ax.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
    ax.set(
        xlabel="frequency (cycles / image)",
        ylabel="SNR",
        title=f"per-frequency SNR, {type(process).__name__}",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def chromatography_figure(process) -> Figure:
    ts = torch.linspace(0.001, 1.0, 500)
    lam = _logsnr(process, ts)
    fig = Figure(figsize=(5.5, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for n in LEVELS:
        _, rate = fq.chromatography(lam, n)
        ax.plot(ts.numpy(), rate.numpy(), label=f"1/{n} resolution" if n > 1 else "full resolution")
    ax.set(xlabel="t", ylabel="rate of signal share", title="resolution chromatography")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def run_figures(
    module, data_power: tuple[torch.Tensor, torch.Tensor], n: int, steps: int, autocast
) -> dict[str, Figure]:
    """Sample spectra and the empirical chromatography of a trained module (EMA weights);
    ``data_power``: (freqs, RAPS) of the data; ``autocast``: the run's precision context."""
    x0_hats: list[torch.Tensor] = []
    times: list[float] = []

    def record(d: dict) -> None:
        x0_hats.append(d["x0_hat"].detach().cpu())
        times.append(float(d["t"]))

    with torch.no_grad(), autocast:  # every sampler reports its steps through ``callback``
        samples = module.sample(list(range(n)), steps=steps, callback=record).float()
    side = samples.shape[-1]
    figs = {
        "sample_spectra": plot_raps(
            {"data": data_power, "samples": raps(samples.clamp(-1, 1))}, title="samples vs data"
        )
    }
    keep = [i for i, h in enumerate(x0_hats) if h.shape[-1] == side]
    if len(keep) >= 3:
        freqs, emp = fq.change_spectra([x0_hats[i] for i in keep])
        lam = _logsnr(module.process, torch.tensor([times[i] for i in keep]))
        theory = fq.exact_change_spectra(data_power[1], lam)
        bands = octave_bands(side // 2)
        edges = [lo for lo, _ in bands] + [bands[-1][1]]
        e, th = fq.band_curves(emp, freqs, edges), fq.band_curves(theory, freqs, edges)
        fig = Figure(figsize=(6.0, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ts = [times[i] for i in keep[1:]]
        for b, (lo, hi) in enumerate(zip(edges, edges[1:])):
            name = f"{lo}-{hi - 1}" if hi - 1 > lo else f"{lo}"
            (line,) = ax.plot(ts, e[:, b].numpy(), label=f"{name} c/img")
            ax.plot(ts, th[:, b].numpy(), color=line.get_color(), linestyle=":", linewidth=1)
        ax.invert_xaxis()
        ax.set(xlabel="t (sampling runs right)", ylabel="share of the band's change",
               title="empirical chromatography (dotted: Gaussian theory)")  # fmt: skip
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        figs["chromatography_empirical"] = fig
    return figs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.spectra", description=__doc__.splitlines()[0])
    p.add_argument("target", help="experiment name / YAML, or a run folder (with --run)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (experiments)")
    p.add_argument("--run", action="store_true", help="target is a trained run folder")
    p.add_argument("--n", type=int, default=256, help="data images and samples (default 256)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the module's)")
    p.add_argument("--out", default=None, help="output folder")
    a = p.parse_args(argv)
    from torch.utils.tensorboard import SummaryWriter

    from freqdiff.checkpoints import CheckpointError, load_run, run_folder

    module = None
    try:
        if a.run:
            module, cfg = load_run(a.target)
            out = Path(a.out) if a.out else run_folder(a.target) / "spectra"
        else:
            cfg = _stage_config(a.target, a.overrides)
            out = Path(a.out) if a.out else Path(cfg.run.root) / str(cfg.experiment) / "spectra"
        dm = instantiate(cfg.data, "data")
        process = module.process if module is not None else instantiate(cfg.module.process, "module.process")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError) as e:  # --run on a folder without a readable checkpoint
        print(f"spectra: {e}", file=sys.stderr)
        return 2
    dm.setup("fit")
    try:
        x = dm.real_images(a.n, split="val").double()  # [n, C, H, W] in [-1, 1]
    except ValueError as e:  # e.g. more images than the split holds
        print(f"spectra: --n {a.n}: {e}", file=sys.stderr)
        return 2
    data_power = raps(x)
    out.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out / "tb"))
    figs = {
        "data_spectra": data_figure(x),
        "snr": snr_figure(process, x, data_power[1]),
        "chromatography": chromatography_figure(process),
    }
    if module is not None:
        from experiments.evaluate import autocast_for

        steps = a.steps or getattr(module, "sample_steps", 50)
        precision = autocast_for(cfg.trainer.get("precision"), module.device)
        figs.update(run_figures(module.eval(), data_power, min(a.n, 64), steps, precision))
    for name, fig in figs.items():
        print(f"spectra: {_save(fig, out, name, writer)}")
    writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
