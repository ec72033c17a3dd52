"""The spectrum-weighted training-time sampler (docs/methods/ddpm.md, Training times; docs/frequencies.md).

From the timestep-sampling report: spend more training on the times where the data has more
structure than a power law predicts. Computed once per dataset (``fit_data``, which the module calls
at the start of training with real training images; cached on disk by the data's checksum):

1. per image, its RAPS over its own power-law fit ``β f^−γ`` (``fit_power_law`` over 1 .. Nyquist);
   the ratio averaged over the images, ``ρ(f)``, normalised to mean 1 over the frequencies;
2. each frequency mapped onto the time where its SNR crosses 1 through the process:
   ``λ(t_f) + ln P(f) = 0`` (P the mean RAPS; per-frequency SNR = e^λ P(f) with white noise);
3. the density ``p(t) ∝ p_base(t) · w(t)``, with ``w`` the piecewise-linear interpolation of ``ρ`` over
   the ``t_f`` (1 before the first and after the last: no frequency resolves there) and the base
   the resolution-shifted logit-normal (``ShiftedLogitNormalTime``, estimated on a fine grid from a
   fixed set of its draws);
4. drawn by inverse CDF on that grid (``t = F⁻¹(u)``, u from the rank's generator).

A pure power-law data set has ρ ≡ 1: the sampler is its base. Needs a process with ``logsnr`` and
``t_from_logsnr`` (the Gaussian processes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from freqdiff.metrics.spectra import fit_power_law, raps
from freqdiff.timesteps import ShiftedLogitNormalTime, _gen_device


class SpectrumWeightedTime(ShiftedLogitNormalTime):
    def __init__(
        self,
        mean: float = 0.0,  # the base: logit-normal μ, ς at the reference resolution
        std: float = 1.0,
        resolution: int = 64,
        reference_resolution: int = 64,
        n_images: int = 512,  # training images fit_data is given (the module reads them)
        cache_dir: str | None = None,  # where the fitted spectrum is kept (None: not kept)
        grid: int = 2048,  # bins of the density on [0, 1]
    ):
        super().__init__(mean, std, resolution, reference_resolution)
        if n_images < 1 or grid < 16:
            raise ValueError(f"n_images={n_images}, grid={grid}: expected n_images >= 1 and grid >= 16")
        self.n_images, self.cache_dir, self.grid = int(n_images), cache_dir, int(grid)
        self.spectrum: dict[str, np.ndarray] | None = None  # freqs, power, ratio
        self._cdf: tuple[int, Tensor] | None = None  # (id of the process, CDF on the grid)

    # ---- the data's spectrum ---------------------------------------------------------------------
    def _cache_path(self, key: str | None) -> Path | None:
        if self.cache_dir is None or key is None:
            return None
        return Path(self.cache_dir) / f"spectrum_time-{key[:16]}-{self.resolution}.npz"

    def fit_data(self, images: Tensor, key: str | None = None) -> dict[str, np.ndarray]:
        """ρ(f) and P(f) of ``images`` [N, C, H, W] in [-1, 1], or from the cache file of ``key``."""
        path = self._cache_path(key)
        if path is not None and path.is_file():
            with np.load(path) as z:
                self.spectrum = {k: z[k] for k in ("freqs", "power", "ratio")}
        else:
            f, p = raps(images.double(), reduce=False)  # [R], [N, C, R]
            p = p.mean(1)  # [N, R] per image
            nyq = int(f[-1])
            ratios = []
            for row in p:
                beta, gamma = fit_power_law(f, row, 1, nyq)
                ratios.append(row[1:] / (beta * f[1:] ** -gamma))
            ratio = torch.stack(ratios).mean(0)
            ratio = ratio / ratio.mean()
            self.spectrum = {"freqs": f[1:].numpy(), "power": p.mean(0)[1:].numpy(), "ratio": ratio.numpy()}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.parent / f".{path.name}.{os.getpid()}.tmp.npz"  # ranks may write at once
                np.savez(tmp, **self.spectrum)
                tmp.replace(path)
        self._cdf = None
        return self.spectrum

    # ---- the density over t ----------------------------------------------------------------------
    def density(self, process) -> tuple[Tensor, Tensor, Tensor]:
        """(bin centres [G], base density [G], weighted density [G]) on [0, 1], each integrating to 1."""
        if self.spectrum is None:
            raise ValueError(
                "SpectrumWeightedTime needs the data's spectrum: fit_data(images) (the module calls it "
                "at the start of training)"
            )
        edges = torch.linspace(0, 1, self.grid + 1, dtype=torch.float64)
        centres = (edges[1:] + edges[:-1]) / 2
        draws = super().__call__(400_000, torch.Generator().manual_seed(0), process=process).double()
        base = torch.histc(draws, bins=self.grid, min=0, max=1) + 1e-12
        base = base / base.sum() * self.grid
        lam_f = -torch.log(torch.as_tensor(self.spectrum["power"], dtype=torch.float64))
        t_f = process.t_from_logsnr(lam_f.float()).double()
        order = torch.argsort(t_f)
        excess = self.spectrum["ratio"][order.numpy()] - 1.0  # 0 beyond the frequencies' times: w = 1
        w = 1.0 + np.interp(centres.numpy(), t_f[order].numpy(), excess, left=0.0, right=0.0)
        weighted = base * torch.as_tensor(w, dtype=torch.float64)
        return centres, base, weighted / weighted.sum() * self.grid

    def __call__(
        self, n: int, generator: torch.Generator | None = None, device="cpu", process=None
    ) -> Tensor:
        if process is None or not (hasattr(process, "logsnr") and hasattr(process, "t_from_logsnr")):
            raise ValueError("SpectrumWeightedTime needs the process (its logsnr and t_from_logsnr)")
        if self._cdf is None or self._cdf[0] != id(process):
            _, _, dens = self.density(process)
            cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(dens, 0) / dens.sum()])
            self._cdf = (id(process), cdf)
        cdf = self._cdf[1]
        u = torch.rand(n, generator=generator, device=_gen_device(generator, device), dtype=torch.float64)
        i = torch.searchsorted(cdf.to(u.device), u).clamp(1, self.grid)
        lo, hi = cdf.to(u.device)[i - 1], cdf.to(u.device)[i]
        t = (i - 1 + (u - lo) / (hi - lo).clamp_min(1e-300)) / self.grid  # linear within the bin
        return t.float().clamp(0.0, 1.0).to(device)
