"""Training-time samplers of t ∈ [0, 1]: ``(n, generator, device, process) -> t [n]``.

docs/methods/ddpm.md, "Training times", describes them; Relay's own u ~ U(0, 1): docs/methods/relay.md.

Kept apart from the process: which times a model trains on is a training choice. The module passes
its process, so a sampler defined on the noise level works through the process's own time map.
- ``UniformTime``: t ~ U(t_min, t_max).
- ``LogitNormalTime``: t = sigmoid(μ + ς z), z ~ N(0, 1) (SD3 uses μ = 0, ς = 1; Esser et al. 2024).
- ``ShiftedLogitNormalTime``: the logit-normal of a reference resolution carried to this one in
  log-SNR through the process: t_ref = sigmoid(μ + ς z), then ``t = process.t_from_logsnr(
  process.logsnr(t_ref) − ln(N/N_ref))`` (N: pixel counts), the resolution shift of the
  timestep-sampling report applied where it belongs for any schedule, not to the logit.
- ``LogNormalSigmaTime``: EDM's ln σ ~ N(P_mean, P_std²) (Karras et al. 2022, Table 1; P_mean −1.2,
  P_std 1.2), mapped to t by ``process.t_from_sigma`` (σ is the EDM noise level sigma/a, so it works
  for the variance-exploding EDM process and the VP processes alike). σ outside the process's range
  [σ(0+), σ(1)] is clamped to its end (for EDM's σ ∈ [0.002, 80]: a 1.7e-5 share of the draws).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class UniformTime:
    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):  # interval of t
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"UniformTime needs 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = t_min, t_max

    def __call__(
        self, n: int, generator: torch.Generator | None = None, device="cpu", process=None
    ) -> Tensor:
        u = torch.rand(n, generator=generator, device=_gen_device(generator, device))
        return (self.t_min + (self.t_max - self.t_min) * u).to(device)


class LogitNormalTime:
    def __init__(self, mean: float = 0.0, std: float = 1.0):  # μ, ς of logit(t)
        if std <= 0:
            raise ValueError(f"LogitNormalTime needs std > 0, got {std}")
        self.mean, self.std = mean, std

    def __call__(
        self, n: int, generator: torch.Generator | None = None, device="cpu", process=None
    ) -> Tensor:
        z = torch.randn(n, generator=generator, device=_gen_device(generator, device))
        return torch.sigmoid(self.mean + self.std * z).to(device)


class ShiftedLogitNormalTime(LogitNormalTime):
    def __init__(
        self,
        mean: float = 0.0,  # μ of logit(t) at the reference resolution
        std: float = 1.0,  # ς
        resolution: int = 64,  # this model's image side
        reference_resolution: int = 64,  # the side the logit-normal was chosen for
    ):
        super().__init__(mean, std)
        if not (resolution > 0 and reference_resolution > 0):
            raise ValueError(
                f"resolution={resolution}, reference_resolution={reference_resolution}: "
                "expected positive sides"
            )
        self.resolution, self.reference_resolution = int(resolution), int(reference_resolution)
        self.logsnr_shift = 2 * math.log(self.resolution / self.reference_resolution)  # ln(N / N_ref)

    def __call__(
        self, n: int, generator: torch.Generator | None = None, device="cpu", process=None
    ) -> Tensor:
        if process is None or not (hasattr(process, "logsnr") and hasattr(process, "t_from_logsnr")):
            raise ValueError("ShiftedLogitNormalTime needs the process (its logsnr and t_from_logsnr)")
        t_ref = super().__call__(n, generator, device)
        return process.t_from_logsnr(process.logsnr(t_ref) - self.logsnr_shift).clamp(0.0, 1.0)


class LogNormalSigmaTime:
    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2):  # mean and std of ln σ (EDM)
        if P_std <= 0:
            raise ValueError(f"LogNormalSigmaTime needs P_std > 0, got {P_std}")
        self.P_mean, self.P_std = P_mean, P_std

    def sigma(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        z = torch.randn(n, generator=generator, device=_gen_device(generator, device))
        return torch.exp(self.P_mean + self.P_std * z).to(device)

    def __call__(
        self, n: int, generator: torch.Generator | None = None, device="cpu", process=None
    ) -> Tensor:
        if process is None or not hasattr(process, "t_from_sigma"):
            raise ValueError("LogNormalSigmaTime needs the process (its t_from_sigma) to map σ to t")
        return process.t_from_sigma(self.sigma(n, generator, device)).clamp(0.0, 1.0)


def _gen_device(generator: torch.Generator | None, device) -> torch.device:
    """Draw on the generator's device (a CPU generator cannot fill a CUDA tensor)."""
    return generator.device if generator is not None else torch.device(device)
