"""Data: WebDataset shard sets with manifests, ShardDataModule, dead-leaves generator (DESIGN.md §4).

``freqdiff`` is imported first: it installs the import hook that lets ``import lightning`` work
next to a CPU-only torch (see ``freqdiff/_torchvision_compat.py``), before any module here imports
Lightning.
"""

import freqdiff  # noqa: F401
