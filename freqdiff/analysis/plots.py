"""Spectral plots: RAPS curves on log-log axes (Resolution Chromatography; docs/frequencies.md).

Uses matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``, no pyplot), so nothing
needs a display, no global figure state is kept and figures are freed with their last reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ArrayLike = torch.Tensor | np.ndarray


def _to_numpy(v: ArrayLike) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().to("cpu", torch.float64).numpy()
    return np.asarray(v, dtype=np.float64).reshape(-1)


def plot_raps(
    curves: dict[str, tuple[ArrayLike, ArrayLike]],
    path: str | Path | None = None,
    title: str = "",
    xlabel: str = "frequency (cycles / image)",
    ylabel: str = "power",
    figsize: tuple[float, float] = (5.0, 3.8),
    dpi: int = 100,
) -> Figure:
    """Log-log RAPS plot, one line per label (``curves[label] = (freqs [R], power [R])``).

    Bins with ``f <= 0`` (the DC bin) or ``P <= 0`` cannot be drawn on log axes and are dropped.
    Saves a PNG at ``path`` (parent folders created) when given. Returns the Agg-backed Figure.
    """
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    ax = fig.add_subplot(1, 1, 1)
    for label, (freqs, power) in curves.items():
        f, p = _to_numpy(freqs), _to_numpy(power)
        if f.shape != p.shape:
            raise ValueError(f"{label!r}: freqs {f.shape} and power {p.shape} differ")
        keep = (f > 0) & (p > 0) & np.isfinite(p)
        ax.loglog(f[keep], p[keep], marker=".", markersize=3, linewidth=1.2, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a Figure to uint8 ``[H, W, 3]`` RGB (e.g. for TensorBoard ``add_image(..., "HWC")``)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # [H, W, 4] -> [H, W, 3]
