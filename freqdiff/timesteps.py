"""Training-time samplers of t ∈ [0, 1] (METHODS.md §1): callables ``(n, generator) -> t [n]``.

Kept apart from the process: which times a model trains on is a training choice.
- ``UniformTime``: t ~ U(t_min, t_max).
- ``LogitNormalTime``: t = sigmoid(μ + ς z), z ~ N(0, 1) (SD3 uses μ = 0, ς = 1; Esser et al. 2024).
"""

from __future__ import annotations

import torch
from torch import Tensor


class UniformTime:
    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):  # interval of t
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"UniformTime needs 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = t_min, t_max

    def __call__(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        u = torch.rand(n, generator=generator)
        return (self.t_min + (self.t_max - self.t_min) * u).to(device)


class LogitNormalTime:
    def __init__(self, mean: float = 0.0, std: float = 1.0):  # μ, ς of logit(t)
        if std <= 0:
            raise ValueError(f"LogitNormalTime needs std > 0, got {std}")
        self.mean, self.std = mean, std

    def __call__(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        z = torch.randn(n, generator=generator)
        return torch.sigmoid(self.mean + self.std * z).to(device)
