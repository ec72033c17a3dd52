"""Forward processes: one file per method, one shared interface (``base.Process``)."""

from freqdiff.processes.base import NoiseSource, Process

__all__ = ["NoiseSource", "Process"]
