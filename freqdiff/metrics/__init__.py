"""Image and spectrum metrics: RAPS, spectral log-distance, power-law fits, FID, SWD; docs/evaluation.md."""

from freqdiff.metrics.spectra import (
    KAISER_BETA,
    fit_power_law,
    per_frequency_snr,
    power_spectrum_2d,
    raps,
    spectral_distance,
)

__all__ = [
    "KAISER_BETA",
    "fit_power_law",
    "per_frequency_snr",
    "power_spectrum_2d",
    "raps",
    "spectral_distance",
]
