"""Decoded images per second of the shard loader against image-folder loaders and the training rate.

Data: 256 JPEGs of mixed sizes (256-400 px, random crops of scikit-image's bundled photographs),
converted once by ``write_shards`` into three shard sets holding 64² and 256² images per sample, in
the three encodings below. Loaders, all with 2 DataLoader worker processes and batches of 64 float
images in [-1, 1], timed interleaved (median of 3 rounds, after a first batch that pays for worker
start-up):

- ``shards png6``: ``ShardDataModule.train_dataloader()`` (random access in the tar, decode, shuffle
  buffer, flips) over shards written with ``--encoding png`` (PNG level 6, the default until raw);
- ``folder jpeg``: a plain map-style Dataset over the original JPEGs that decodes with PIL and does
  the same centre-crop + Lanczos resize on the fly (what training from the folder would do);
- ``folder png``: a plain Dataset over one pre-resized PNG file per image (the format alone);
- ``shards png0``: the same shards written with ``--encoding png --png-level 0`` (stored PNG: ~2x
  faster decode, ~1.7x the bytes);
- ``shards raw``: the same shards written with ``--encoding raw``, the default (``<key>.<res>.u8``,
  the uint8 array's bytes: decoding is ``np.frombuffer``); ``vs png6`` is its img/s over ``shards
  png6``'s, ``raw/png6`` its bytes per image over PNG 6's at that resolution (tar members only).

Training consumption: img/s of one training step (forward, eps-MSE, backward, AdamW) of the
quickstart model (``unet("tiny")``, bf16 autocast, batch 32) at 64², on the same 2 cores. Targets
(the data issue): shards >= 2x the image-folder loader, and >= 5x the consumption rate at 64² (raw).
"""

from __future__ import annotations

import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.demo_photos import write_photo_folder
from datamodules.prepare import centre_square, load_rgb
from datamodules.webdataset import ShardDataModule
from datamodules.write_shards import write_shards

N_IMAGES, BATCH, WORKERS, ROUNDS = 256, 64, 2, 3
BATCHES = 6  # timed batches per round and loader (after the first one)


class FolderDataset(Dataset):
    """Image files -> float ``[C, r, r]`` in [-1, 1]; ``crop``: centre-crop + Lanczos resize on the fly."""

    def __init__(self, files: list[Path], resolution: int, crop: bool):
        self.files, self.resolution, self.crop = files, resolution, crop

    def __len__(self) -> int:
        return BATCH * (BATCHES + 1)  # cycles over the files

    def __getitem__(self, i: int) -> torch.Tensor:
        i = i % len(self.files)
        if self.crop:
            x = centre_square(load_rgb(self.files[i]), self.resolution, Image.Resampling.LANCZOS)
        else:
            with Image.open(self.files[i]) as im:
                x = np.asarray(im.convert("RGB"))
        if np.random.random() < 0.5:  # the same work as the shard loader's flips
            x = x[:, ::-1]
        return torch.from_numpy(np.array(x)).permute(2, 0, 1).float() / 127.5 - 1  # [C, r, r]


def member_bytes(folder: Path, res: int) -> float:
    """Mean bytes of the ``<key>.<res>.*`` image members in a shard set (tar headers only)."""
    sizes = []
    for tar in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            sizes += [ti.size for ti in tf if ti.name.split(".")[1:2] == [str(res)]]
    return statistics.mean(sizes)


def timed(make, n_batches: int) -> float:
    """img/s over ``n_batches`` after the first batch (which pays for worker start-up)."""
    loader = make()
    it = iter(loader)
    first = next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(n_batches):
        b = next(it)
        n += (b["x0"] if isinstance(b, dict) else b).shape[0]
    dt = time.perf_counter() - t0
    del it, first
    return n / dt


def consumption_rate(resolution: int, batch: int = 32, steps: int = 2) -> float:
    """img/s of quickstart training steps (tiny UNet, bf16 autocast) at ``resolution``."""
    from freqdiff.nets.presets import unet

    torch.manual_seed(0)
    try:
        net = unet("tiny", resolution=resolution)
    except ValueError:  # the preset's attention level may not exist at this resolution
        net = unet("tiny", resolution=resolution, attn_resolutions=(resolution // 4,))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x0 = torch.randn(batch, 3, resolution, resolution)

    def step() -> None:
        eps = torch.randn_like(x0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x0 + eps, 1000.0 * torch.rand(batch))
        (out.float() - eps).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="freqdiff-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        jpegs = write_photo_folder(tmp / "photos", N_IMAGES, seed=0, min_side=256, max_side=400)
        args = {"resolutions": [64, 256], "workers": 2, "progress": False}
        m = write_shards(tmp / "photos", tmp / "shards", encoding="png", **args)  # level 6
        write_shards(tmp / "photos", tmp / "shards0", encoding="png", png_level=0, **args)
        write_shards(tmp / "photos", tmp / "raw", encoding="raw", **args)  # the default
        pngs = {}
        for res in (64, 256):
            folder = tmp / f"png{res}"
            folder.mkdir()
            pngs[res] = [folder / f"{i:05d}.png" for i in range(len(jpegs))]
            for p, q in zip(jpegs, pngs[res]):
                Image.fromarray(centre_square(load_rgb(p), res, Image.Resampling.LANCZOS)).save(q)
        took = time.perf_counter() - t0
        print(f"data: {len(jpegs)} JPEGs -> {m['count']} samples at {m['resolutions']} ({took:.0f} s)")

        rows = []
        for res in (64, 256):

            def loaders(res=res):
                def shards(folder: str):
                    return lambda: ShardDataModule(
                        str(tmp / folder),
                        resolution=res,
                        batch_size=BATCH,
                        num_workers=WORKERS,
                        batches_per_epoch=BATCHES + 1,
                        shuffle_buffer=256,
                    ).train_dataloader()

                return {
                    "shards png6": shards("shards"),
                    "shards png0": shards("shards0"),
                    "shards raw": shards("raw"),
                    "folder jpeg": lambda: DataLoader(
                        FolderDataset(jpegs, res, crop=True), BATCH, shuffle=True, num_workers=WORKERS
                    ),
                    "folder png": lambda: DataLoader(
                        FolderDataset(pngs[res], res, crop=False), BATCH, shuffle=True, num_workers=WORKERS
                    ),
                }

            results: dict[str, list[float]] = {k: [] for k in loaders()}
            for r in range(ROUNDS):
                names = list(results) if r % 2 == 0 else list(results)[::-1]
                for name in names:
                    results[name].append(timed(loaders()[name], BATCHES))
            med = {k: statistics.median(v) for k, v in results.items()}
            rows.append((res, med, member_bytes(tmp / "raw", res) / member_bytes(tmp / "shards", res)))

        train64 = consumption_rate(64)
        print()
        cols = [("res", 5), ("shards png6", 11), ("folder jpeg", 11), ("folder png", 10), ("vs jpeg", 7)]
        cols += [("vs png", 6), ("shards png0", 11), ("vs jpeg", 7), ("shards raw", 10), ("vs jpeg", 7)]
        cols += [("vs png6", 7), ("raw/png6", 8)]
        print(" | ".join(f"{name:>{w}}" for name, w in cols))
        print("-" * (sum(w for _, w in cols) + 3 * (len(cols) - 1)))
        for res, med, ratio in rows:
            s, j, p, z = med["shards png6"], med["folder jpeg"], med["folder png"], med["shards png0"]
            w = med["shards raw"]
            cells = [f"{res}²", f"{s:.0f}", f"{j:.0f}", f"{p:.0f}", f"{s / j:.1f}x", f"{s / p:.1f}x"]
            cells += [
                f"{z:.0f}",
                f"{z / j:.1f}x",
                f"{w:.0f}",
                f"{w / j:.1f}x",
                f"{w / s:.1f}x",
                f"{ratio:.2f}x",
            ]
            print(" | ".join(f"{c:>{width}}" for c, (_, width) in zip(cells, cols)))
        print(f"\nimg/s decoded, {WORKERS} workers, batch {BATCH}, median of {ROUNDS} interleaved rounds")
        print("raw/png6: bytes per image of the raw members over PNG level 6's (shard size on disk)")
        s64 = rows[0][1]["shards raw"]
        print(f"training consumption at 64² (quickstart tiny UNet, bf16, batch 32): {train64:.1f} img/s")
        print(f"shard loader (raw) / consumption at 64²: {s64 / train64:.0f}x (target >= 5x)")
