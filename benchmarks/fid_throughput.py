"""Inception throughput of our FID pipeline against torch-fidelity's own, on the same images
(docs/architecture.md, Callbacks).

Ours: ``SetStats`` (uint8 quantisation, torch-fidelity's ``FeatureExtractorInceptionV3`` with the
TF1-bilinear resize, float64 streaming sums) over both sets, then ``compare`` (Fréchet distance).
Theirs: ``torch_fidelity.calculate_metrics(input1=..., input2=..., fid=True)`` on the same uint8
images as torch Datasets (its defaults: a DataLoader with workers, features kept, scipy ``sqrtm``).

Two rows, each the median of interleaved repeats (the order alternates), so both see the same machine:
- features: the feature pass alone (torch-fidelity's ``get_featuresdict_from_dataset``), img/s;
- end to end: two sets of images to an FID number, img/s (both sets counted).
The two FID values are printed too: same network, same resize, so they agree up to the matrix square
root (scipy's ``sqrtm`` against our eigenvalue route). Weights: the real file when
``resolve_inception_weights`` finds one, else random ones written to a temporary folder (speed is the
same; the FID values then mean nothing).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from freqdiff.metrics.evaluator import SetStats, compare
from freqdiff.metrics.fid import (
    INCEPTION_FILE,
    InceptionFeatures,
    InceptionWeightsNotFound,
    resolve_inception_weights,
    write_random_inception_weights,
)

N = 32  # images per set (Inception runs at ~6-10 img/s on 2 CPU cores)
BATCH = 32
REPEATS = 2


class _Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x  # uint8 [N, 3, H, W]

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def _sets() -> tuple[torch.Tensor, torch.Tensor]:
    from datamodules.synthetic import DeadLeaves

    dl = DeadLeaves(resolution=32)
    a = torch.from_numpy(dl.images(N, "train")).permute(0, 3, 1, 2).contiguous()
    b = torch.from_numpy(dl.images(N, "val")).permute(0, 3, 1, 2).contiguous()
    return a, b


def main() -> None:
    import torch_fidelity
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    tmp = tempfile.TemporaryDirectory()
    try:
        weights, kind = resolve_inception_weights(), "real"
    except InceptionWeightsNotFound:
        weights, kind = write_random_inception_weights(Path(tmp.name) / INCEPTION_FILE), "random"
    a, b = _sets()
    ours_net = InceptionFeatures(weights)
    theirs_net = create_feature_extractor(
        "inception-v3-compat", ["2048"], cuda=False, feature_extractor_weights_path=str(weights), verbose=0
    )

    def ours_features() -> None:
        s = SetStats(ours_net, spectra=False)
        for i in range(0, N, BATCH):
            s.update(a[i : i + BATCH], torch.arange(i, min(i + BATCH, N)))

    def theirs_features() -> None:
        get_featuresdict_from_dataset(_Images(a), theirs_net, BATCH, False, False, False)

    fids: dict[str, float] = {}

    def ours_e2e() -> None:
        sa, sb = SetStats(ours_net, spectra=False), SetStats(ours_net, spectra=False)
        for i in range(0, N, BATCH):
            idx = torch.arange(i, min(i + BATCH, N))
            sa.update(a[i : i + BATCH], idx)
            sb.update(b[i : i + BATCH], idx)
        fids["ours"] = compare(sa, sb)["fid"]

    def theirs_e2e() -> None:
        m = torch_fidelity.calculate_metrics(
            input1=_Images(a),
            input2=_Images(b),
            fid=True,
            cuda=False,
            batch_size=BATCH,
            feature_extractor_weights_path=str(weights),
            cache=False,
            verbose=False,
        )
        fids["torch-fidelity"] = m["frechet_inception_distance"]

    rows = []
    for label, ours, theirs, images in (
        ("features", ours_features, theirs_features, N),
        ("end to end (FID)", ours_e2e, theirs_e2e, 2 * N),
    ):
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for r in range(REPEATS):
            order = [("ours", ours), ("theirs", theirs)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        o, t = (images / statistics.median(times[k]) for k in ("ours", "theirs"))
        rows.append((label, o, t))
    threads = torch.get_num_threads()
    print(
        f"Inception ({kind} weights), {N} images per set of 32², batch {BATCH}, {threads} threads, "
        f"median of {REPEATS} interleaved repeats"
    )
    print(f"| {'measure':<18} | {'ours img/s':>10} | {'torch-fidelity img/s':>20} | {'ratio':>6} |")
    print(f"|{'-' * 20}|{'-' * 12}|{'-' * 22}|{'-' * 8}|")
    for label, o, t in rows:
        print(f"| {label:<18} | {o:>10.2f} | {t:>20.2f} | {o / t:>6.2f} |")
    ours, theirs = fids["ours"], fids["torch-fidelity"]
    rel = abs(ours - theirs) / max(abs(ours), 1e-12)
    print(f"FID ours {ours:.6g}, torch-fidelity {theirs:.6g} (relative difference {rel:.2e})")
    tmp.cleanup()


if __name__ == "__main__":
    main()
