"""Data (docs/architecture.md, Data): WebDataset shard sets with manifests, read by one ShardDataModule
for every method.

- ``manifest.py``: the manifest format, a deterministic tar-shard writer, PNG encode / decode.
- ``write_shards.py``: image folder -> shards (``make shards``): centre crop, resize filter, several
  resolutions per sample, labels from class folders, bad inputs skipped and listed.
- ``splits.py``: the seeded train / val assignment of ``make shards VAL=`` (disjoint, deterministic).
- ``sources.py``: where a shard set is (folder, manifest, brace / glob pattern); missing shards.
- ``streams.py``: rank x worker splitting, seeded training stream, exact evaluation pass.
- ``health.py``: bad-data counts shared by a rank's workers and the stopping rule (a 99 % lower
  confidence bound of bad / read against ``max_bad_fraction``).
- ``loaders.py``: the epoch and evaluation loaders ``ShardDataModule`` hands to Lightning.
- ``webdataset.py``: ``ShardDataModule`` (Lightning), ``data/skipped`` logging.
- ``synthetic.py``: the embedded dead-leaves dataset (written only into an empty folder or over its
  own earlier set: ``placement``); ``demo_photos.py``: a folder of real JPEGs made
  from scikit-image's bundled photographs (tests, benchmarks, trying ``make shards``).

``freqdiff`` is imported first: it installs the import hook that lets ``import lightning`` work
next to a CPU-only torch (see ``freqdiff/_torchvision_compat.py``), before any module here imports
Lightning.
"""

import freqdiff  # noqa: F401
