"""Memory of FID statistics against the number of images n: streaming sums vs kept features
(docs/architecture.md, Callbacks).

Each case runs in a fresh interpreter (peak RSS, ``ru_maxrss``, is per process): n images of 32²
(generated batch by batch, never all held) go through a cheap 2048-d feature map (a fixed random
projection of 8x8-pooled pixels, standing in for Inception so that n = 16k takes seconds), into

- streaming: ``SetStats`` (float64 ``sum f`` and ``sum f f^T``: 2048² × 8 B = 32 MB, whatever n);
- kept: the features themselves (what torch-fidelity and KID / precision-recall hold: n × 2048 × 4 B).

The table shows the growth of peak RSS above a baseline taken after imports and eight warm-up batches
through another set of statistics (allocator pools and BLAS workspaces are not counted), and the ratio
of the two growths between the smallest and largest n (0: memory independent of n).
"""

from __future__ import annotations

import json
import subprocess
import sys

NS = (1024, 4096, 16384)
_CHILD = r"""
import json, resource, sys
import freqdiff  # noqa: F401
import torch
from torch import nn
from freqdiff.metrics.evaluator import SetStats

torch.set_num_threads(1)
n, mode = int(sys.argv[1]), sys.argv[2]


class Cheap(nn.Module):
    name, resize, dim = "bench/random-projection", "none", 2048

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(192, 2048, generator=torch.Generator().manual_seed(0)))

    def forward(self, u8):
        x = torch.nn.functional.avg_pool2d(u8.float() / 255, 4).flatten(1)  # [B, 3*8*8]
        return torch.relu(x @ self.w)


stats = SetStats(Cheap(), spectra=True, keep_features=(mode == "kept"))
g = torch.Generator().manual_seed(0)
warm = SetStats(Cheap(), spectra=True)  # 8 batches first (allocator, BLAS workspaces), then the baseline
for _ in range(8):
    warm.update(torch.randint(0, 256, (256, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(256))
del warm
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for i in range(0, n, 256):
    b = min(256, n - i)
    x = torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)
    stats.update(x, torch.arange(i, i + b))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"delta_mb": (peak - base) / 1024, "n": stats.n}))
"""


def _run(n: int, mode: str) -> float:
    cmd = [sys.executable, "-c", _CHILD, str(n), mode]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["delta_mb"]


def main() -> None:
    res = {(n, m): _run(n, m) for n in NS for m in ("streaming", "kept")}
    print("peak RSS growth above the warm baseline, MB (2048-d features, 32² images, batches of 256)")
    print(f"| {'n':>6} | {'streaming':>9} | {'kept features':>13} | {'n x 2048 x 4 B':>14} |")
    print(f"|{'-' * 8}|{'-' * 11}|{'-' * 15}|{'-' * 16}|")
    for n in NS:
        s, k = res[(n, "streaming")], res[(n, "kept")]
        print(f"| {n:>6} | {s:>9.1f} | {k:>13.1f} | {n * 2048 * 4 / 2**20:>14.1f} |")
    lo, hi = NS[0], NS[-1]
    growth = (res[(hi, "streaming")] - res[(lo, "streaming")]) / (res[(hi, "kept")] - res[(lo, "kept")])
    print(f"streaming / kept growth from n = {lo} to {hi}: {growth:.3f}")


if __name__ == "__main__":
    main()
