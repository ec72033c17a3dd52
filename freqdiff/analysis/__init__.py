"""Figures and images for people to look at: RAPS plots (docs/frequencies.md) and sample grids.

``plots``: ``plot_raps`` and ``figure_to_array`` (matplotlib Agg, no display).
``images``: sample grids and PNG writing.
"""

from freqdiff.analysis.plots import figure_to_array, plot_raps

__all__ = ["figure_to_array", "plot_raps"]
