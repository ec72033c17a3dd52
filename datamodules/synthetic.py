"""The embedded default dataset: a dead-leaves model written as WebDataset shards
(docs/architecture.md, Data).

Dead leaves (Matheron 1968; Lee, Mumford & Huang, "Occlusion models for natural images", IJCV 2001):
an image is a stack of opaque coloured discs that occlude each other. With disc radii drawn from a
power law ``p(r) ∝ r^-3`` the model is scale invariant between ``r_min`` and ``r_max``, and its
radially averaged power spectrum falls like ``1/f^2`` for ``1/r_max << f << 1/r_min``, as for
natural images; above ``1/r_min`` single sharp edges dominate and it falls like ``1/f^3``.

Here, per image (lengths in units of the image side, so one seed gives the same scene at any
resolution):
- a uniform background colour, then ``n_discs`` discs painted back to front;
- centres uniform in ``[-margin, 1 + margin]^2`` (discs may enter from outside the frame);
- radii by inverse-CDF sampling of ``p(r) ∝ r^-alpha`` on ``[r_min, r_max]``:
  ``r = (r_min^(1-a) + u (r_max^(1-a) - r_min^(1-a)))^(1/(1-a))``;
- colours uniform in RGB (or grey when ``channels=1``);
- antialiased by analytic pixel coverage ``clip((r - d) * res + 1/2, 0, 1)`` of each disc at the
  pixel centre's distance ``d`` (a one-pixel ramp across the edge), composited "over" the image.

The defaults are deliberately easier than the classic 1-pixel-minimum model (docs/platform.md: a
~0.5 M-parameter DDPM must learn the structure in minutes on 2 CPU cores): fewer, larger discs
(``r_min`` = 8 % of the side, 20 discs), so images are a handful of clear occluding shapes with a
fat-tailed size distribution. With only ``r_max / r_min`` ≈ 6 the scale-invariant range is short:
the measured RAPS slope at 32² is about -2.9 (log-log, 2-8 cycles per image), between natural
images' -2 and the edge regime's -3; ``r_min=0.01, n_discs=300`` gives about -2 at 64² and up.

Image ``i`` of a split depends only on ``(seed, split, i)`` (numpy ``SeedSequence``);
train and val are disjoint seed streams.

Several resolutions per sample (``box_resolutions``, e.g. ``[8]`` beside ``resolution=32``): each is
the p×p box average (p = resolution / r) of the stored uint8 image at ``resolution``, rounded to uint8
once (:func:`box_downsample`), not a separate rendering. A two-stage model whose hand-off assumes the
low-resolution image is the box average of the high-resolution one (Relay Diffusion) then trains both
stages from one shard set, and ``avg_pool2d(x_32, 4)`` matches ``x_8`` to within half a grey level.

Where the shards go (:func:`placement`): only into a missing or empty folder, over an earlier
dead-leaves set (its manifest's ``params.generator``), or over the remnants of an interrupted
generation (only ``train/`` and ``val/`` holding only shards, manifests and the writer's temporary
files). A folder with another shard set is used as it is; anything else is refused, so the quickstart
never writes into a folder of the user's own files.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datamodules.manifest import (
    MANIFEST,
    ShardSetError,
    ShardWriter,
    check_shards,
    is_pattern,
    is_writer_temp,
    make_manifest,
    read_manifest,
    remove_stale_temp,
    sample_dict,
    write_manifest,
)

GENERATOR_VERSION = 1  # bump when the rendering changes: cached shard sets are then regenerated
SPLITS = {"train": 0, "val": 1}  # split -> seed-stream id
_CHUNK = 500  # images rendered per vectorised batch


class DeadLeaves:
    """Procedural dead-leaves images at any resolution, deterministic per (seed, split, index)."""

    def __init__(
        self,
        resolution: int = 32,  # image side in pixels
        n_train: int = 20000,  # images in the train split
        n_val: int = 1000,  # images in the val split (a disjoint seed stream)
        seed: int = 0,  # dataset seed
        r_min: float = 0.08,  # smallest disc radius, fraction of the image side
        r_max: float = 0.5,  # largest disc radius, fraction of the image side
        alpha: float = 3.0,  # radius density p(r) ∝ r^-alpha (3: scale invariant, ~1/f^2 spectrum)
        n_discs: int = 20,  # discs per image, painted back to front over a background colour
        margin: float = 0.1,  # disc centres uniform in [-margin, 1 + margin]^2
        channels: int = 3,  # 3: RGB colours, 1: grey levels
        shard_size: int = 2000,  # samples per tar shard
        box_resolutions: list[int] | None = None,  # extra sides, exact p×p box averages (Relay stage 1)
    ):
        if resolution < 2:
            raise ValueError(f"resolution must be >= 2, got {resolution}")
        if not 0 < r_min <= r_max:
            raise ValueError(f"need 0 < r_min <= r_max, got r_min={r_min}, r_max={r_max}")
        if n_discs < 0 or n_train < 0 or n_val < 0:
            raise ValueError(f"counts must be >= 0: n_discs={n_discs}, n_train={n_train}, n_val={n_val}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.resolution = int(resolution)
        self.n = {"train": int(n_train), "val": int(n_val)}
        self.seed = int(seed)
        self.r_min, self.r_max, self.alpha = float(r_min), float(r_max), float(alpha)
        self.n_discs = int(n_discs)
        self.margin = float(margin)
        self.channels = int(channels)
        self.shard_size = int(shard_size)
        if isinstance(box_resolutions, (numbers.Number, str)):
            raise ValueError(f"box_resolutions={box_resolutions!r}: expected a list of sides (or null)")
        box = list(box_resolutions or [])
        for r in box:
            integral = isinstance(r, numbers.Integral) and not isinstance(r, bool)
            if not (integral and 0 < r < self.resolution and self.resolution % r == 0):
                raise ValueError(
                    f"box_resolutions={box!r}: {r!r} is not allowed; each must be a positive integer that "
                    f"divides resolution={self.resolution} and is smaller"
                )
        self.box_resolutions = sorted({int(r) for r in box}, reverse=True)  # largest first

    # ---------------------------------------------------------------- generation
    def params(self, split: str) -> dict[str, Any]:
        """Everything that determines the split's shards (stored in, and compared with, its manifest)."""
        _check_split(split)
        p: dict[str, Any] = {
            "generator": "dead-leaves",
            "version": GENERATOR_VERSION,
            "split": split,
            "count": self.n[split],
            "resolution": self.resolution,
            "seed": self.seed,
            "r_min": self.r_min,
            "r_max": self.r_max,
            "alpha": self.alpha,
            "n_discs": self.n_discs,
            "margin": self.margin,
            "channels": self.channels,
            "shard_size": self.shard_size,
        }
        if self.box_resolutions:  # only when set: sets written without it keep their params (not regenerated)
            p["box_resolutions"] = list(self.box_resolutions)
        return p

    @property
    def resolutions(self) -> list[int]:
        """Every side written per sample, largest (``resolution``, the primary one) first."""
        return [self.resolution, *self.box_resolutions]

    def scene(self, split: str, index: int) -> dict[str, np.ndarray]:
        """The random scene of one image: background [C], centres [n, 2], radii [n], colours [n, C]."""
        rng = np.random.default_rng([self.seed, SPLITS[split], int(index)])
        n, c, m = self.n_discs, self.channels, self.margin
        background = rng.random(c)
        centres = rng.uniform(-m, 1 + m, size=(n, 2))  # (y, x)
        u = rng.random(n)
        if abs(self.alpha - 1.0) < 1e-9:  # p(r) ∝ 1/r: log-uniform
            radii = self.r_min * (self.r_max / self.r_min) ** u
        else:
            e = 1.0 - self.alpha
            radii = (self.r_min**e + u * (self.r_max**e - self.r_min**e)) ** (1.0 / e)
        colours = rng.random((n, c))
        return {"background": background, "centres": centres, "radii": radii, "colours": colours}

    def images(self, n: int, split: str = "train", start: int = 0) -> np.ndarray:
        """Images ``start .. start + n - 1`` of a split at ``resolution``: uint8 ``[n, H, W, C]``."""
        _check_split(split)
        out = np.empty((n, self.resolution, self.resolution, self.channels), np.uint8)
        for a in range(0, n, _CHUNK):
            b = min(n, a + _CHUNK)
            scenes = [self.scene(split, start + i) for i in range(a, b)]
            out[a:b] = render(scenes, self.resolution)
        return out

    def images_at(self, n: int, resolution: int, split: str = "train", start: int = 0) -> np.ndarray:
        """Images ``start .. start + n - 1`` at ``resolution``: the primary one or a ``box_resolutions`` one.

        uint8 ``[n, r, r, C]``: exactly what the shards store for those samples at that resolution.
        """
        if resolution not in self.resolutions:
            raise ValueError(f"resolution={resolution!r}: not written; it writes {self.resolutions}")
        return self._at_all(self.images(n, split, start))[resolution]

    def _at_all(self, imgs: np.ndarray) -> dict[int, np.ndarray]:
        """Primary-resolution images -> {side: images} for every side written, largest first."""
        return {r: box_downsample(imgs, self.resolution // r) for r in self.resolutions}

    # ---------------------------------------------------------------- shards
    def write(self, folder: str | os.PathLike, progress: bool = True) -> dict[str, Path]:
        """Write ``folder/train`` and ``folder/val`` shard sets with manifests; returns both folders.

        Only where :func:`placement` allows it (else ShardSetError). A split whose manifest records
        the same parameters is left untouched, unless a shard's size differs from the manifest
        (ShardSetError: corruption is reported, not papered over); one recorded with other parameters,
        missing a shard, or without a readable manifest is deleted and regenerated (with a notice).
        """
        folder = Path(folder)
        if placement(str(folder), key="folder") != "write":
            raise ShardSetError(
                f"folder={folder}: holds a shard set that is not dead leaves; not writing there"
            )
        out = {}
        for split in SPLITS:
            sub = folder / split
            out[split] = sub
            want = self.params(split)
            manifest = _manifest(sub)
            old = None if manifest is None else manifest.get("params")
            if old == want:
                try:
                    check_shards(sub, manifest)  # ShardSetError for a size that differs
                    remove_stale_temp(sub)
                    continue
                except FileNotFoundError as e:
                    print(f"dead leaves: {e}; regenerating")
            elif old is not None:
                changed = sorted(k for k in set(want) | set(old) if old.get(k) != want.get(k))
                print(f"dead leaves: {sub} was written with other {', '.join(changed)}; regenerating")
            elif sub.is_dir() and any(sub.iterdir()):
                print(f"dead leaves: {sub} is unreadable or incomplete (interrupted?); regenerating")
            self._write_split(sub, split, progress)
        return out

    def written_in(self, folder: str | os.PathLike) -> bool:
        """Whether ``folder`` holds a dead-leaves set with these parameters (manifests only; read-only)."""
        return all((_manifest(Path(folder) / s) or {}).get("params") == self.params(s) for s in SPLITS)

    def _write_split(self, sub: Path, split: str, progress: bool) -> None:
        if sub.exists():  # drop the old manifest first, so a crash never leaves a stale one
            (sub / MANIFEST).unlink(missing_ok=True)
            for p in sub.glob("shard-*.tar"):
                p.unlink()
        sub.mkdir(parents=True, exist_ok=True)
        n, res = self.n[split], self.resolution
        extra = "".join(f"+{r}" for r in self.box_resolutions)
        bar = tqdm(total=n, desc=f"dead leaves {split} {res}x{res}{extra}", unit="img", disable=not progress)
        with ShardWriter(sub, shard_size=self.shard_size) as w:
            for a in range(0, n, _CHUNK):
                at = self._at_all(self.images(min(_CHUNK, n - a), split, start=a))  # side -> [B, r, r, C]
                for j in range(len(at[res])):
                    w.write(sample_dict(a + j, {r: imgs[j] for r, imgs in at.items()}))
                bar.update(len(at[res]))
        bar.close()
        how = ["analytic pixel coverage (1-pixel edge ramp)"]
        how += [f"{r}: exact {res // r}x{res // r} box average of {res}" for r in self.box_resolutions]
        manifest = make_manifest(
            count=w.count,
            resolutions=self.resolutions,
            channels=self.channels,
            shards=w.shards,
            labels=None,
            filter="; ".join(how),
            source=f"synthetic:dead-leaves seed={self.seed} split={split}",
            params=self.params(split),
        )
        write_manifest(sub, manifest)

    def __repr__(self) -> str:
        p = self.params("train")
        del p["split"], p["count"], p["generator"], p["version"]
        args = ", ".join(f"{k}={v}" for k, v in p.items())
        return f"DeadLeaves(n_train={self.n['train']}, n_val={self.n['val']}, {args})"


def render(scenes: list[dict[str, np.ndarray]], resolution: int) -> np.ndarray:
    """Rasterise dead-leaves scenes (all with the same disc count): uint8 ``[B, R, R, C]``."""
    bg = np.stack([s["background"] for s in scenes]).astype(np.float32)  # [B, C]
    yx = np.stack([s["centres"] for s in scenes]).astype(np.float32)  # [B, n, 2]
    r = np.stack([s["radii"] for s in scenes]).astype(np.float32)  # [B, n]
    col = np.stack([s["colours"] for s in scenes]).astype(np.float32)  # [B, n, C]
    b, c = bg.shape
    u = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution  # pixel centres [R]
    img = np.repeat(np.repeat(bg[:, None, None, :], resolution, 1), resolution, 2)  # [B, R, R, C]
    d2 = np.empty((b, resolution, resolution), np.float32)
    for k in range(yx.shape[1]):
        dy2 = np.square(u[None, :] - yx[:, k, 0:1])  # [B, R]
        dx2 = np.square(u[None, :] - yx[:, k, 1:2])  # [B, R]
        np.add(dy2[:, :, None], dx2[:, None, :], out=d2)  # squared distance [B, R, R]
        cover = (r[:, k, None, None] - np.sqrt(d2)) * resolution + 0.5  # signed distance in px + 1/2
        np.clip(cover, 0.0, 1.0, out=cover)
        img += cover[..., None] * (col[:, k, None, None, :] - img)  # "over" compositing
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def box_downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Box average: uint8 ``[B, H, W, C]`` -> uint8 ``[B, H/f, W/f, C]``, each pixel a f×f block's mean.

    The mean is taken in float64 (exact: integer sums), then rounded once (``np.rint``, half to even)
    and clipped to 0..255. ``factor=1`` returns a copy. H and W must be multiples of ``factor``.
    """
    f = int(factor)
    b, h, w, c = img.shape
    if f < 1 or h % f or w % f:
        raise ValueError(f"factor={factor!r}: must be a positive integer dividing the image size {h}x{w}")
    if f == 1:
        return np.array(img, dtype=np.uint8)
    blocks = img.reshape(b, h // f, f, w // f, f, c)
    mean = blocks.mean(axis=(2, 4), dtype=np.float64)
    return np.clip(np.rint(mean), 0, 255).astype(np.uint8)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def _manifest(sub: Path) -> dict[str, Any] | None:
    """``sub``'s manifest; None when it is missing or malformed."""
    try:
        return read_manifest(sub)
    except (FileNotFoundError, ValueError):
        return None


def placement(path: str, key: str = "data.path") -> str:
    """Whether dead leaves may be written at ``path``: ``"write"`` or ``"use"`` (another shard set is there).

    ``"write"``: a missing or empty folder, a folder whose ``train/manifest.json`` says dead leaves, or
    one holding only the remnants of an interrupted generation. ``"use"``: a pattern, a manifest file,
    or a folder with a shard set that is not dead leaves. Anything else raises ShardSetError naming
    ``key``, the path and what is there. Reads only.
    """
    root = Path(path)
    if is_pattern(path) or root.suffix == ".json" or (root / MANIFEST).is_file():
        return "use"
    if not root.exists():
        return "write"
    if not root.is_dir():
        raise ShardSetError(f"{key}={path}: a file; expected a folder for the dead-leaves shards")
    try:
        generator = (json.loads((root / "train" / MANIFEST).read_text()).get("params") or {}).get("generator")
        return "write" if generator == "dead-leaves" else "use"
    except (OSError, ValueError, AttributeError):  # no train manifest, or an unreadable one
        pass
    foreign = []  # what a dead-leaves generation does not leave behind
    for entry in sorted(root.iterdir()):
        if entry.name in SPLITS and entry.is_dir() and not entry.is_symlink():
            foreign += [f for f in sorted(entry.iterdir()) if not (f.is_file() and _generated(f.name))]
        else:
            foreign.append(entry)
    if not foreign:
        return "write"
    raise ShardSetError(
        f"{key}={path}: holds {_describe(root, foreign)} and no shard set, so data.synthetic does not write "
        "dead leaves there (only into a missing or empty folder, or over an earlier dead-leaves set); "
        f"to train on a folder of images, convert it with make shards SRC={path} OUT=<shard folder> "
        "RES=<res> and set data.path to that folder; for the dead leaves, set data.path to a new folder"
        + (
            f"; for tar shards without a manifest, set data.path to a pattern like {root / '*.tar'}"
            if any(p.suffix == ".tar" for p in foreign)
            else ""
        )
    )


def _generated(name: str) -> bool:
    """A file name a dead-leaves split folder holds: shards, the manifest, the writer's temporary files."""
    return name == MANIFEST or is_writer_temp(name) or (name.startswith("shard-") and name.endswith(".tar"))


def _describe(root: Path, entries: list[Path], cap: int = 10000) -> str:
    """``"12 files such as a.png, b.png"``: the files under ``entries`` (counted up to ``cap``)."""
    files: list[str] = []
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            for dirpath, dirs, names in os.walk(e):
                dirs.sort()
                files += [Path(dirpath, n).relative_to(root).as_posix() for n in sorted(names)]
                if len(files) > cap:
                    break
        else:
            files.append(e.relative_to(root).as_posix())
        if len(files) > cap:
            break
    if not files:
        return f"{len(entries)} empty folder{'s' if len(entries) > 1 else ''} such as {entries[0].name}/"
    n = f"more than {cap}" if len(files) > cap else str(len(files))
    return f"{n} file{'s' if len(files) > 1 else ''} such as {', '.join(files[:3])}"
