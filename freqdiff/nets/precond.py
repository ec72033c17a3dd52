"""Denoiser: preconditioning around any backbone; always returns x0_hat
(docs/architecture.md, Parameterisations and loss weights).

The one place that knows the network's parameterisation:
- ``eps``: F predicts the white noise; x0_hat = process.x0_from_eps(x_t, F, t) (Ho et al. 2020).
- ``x0``:  F predicts x0 directly.
- ``v``:   F predicts v = a eps − sigma x0 (Salimans & Ho 2022; VP, a² + sigma² = 1);
           x0_hat = a x_t − sigma F.
- ``edm``: Karras et al. 2022, Table 1, on x̃ = x_t / a with σ = sigma / a:
           D = c_skip x̃ + c_out F(c_in x̃, c_noise), c_skip = σ_d²/(σ² + σ_d²),
           c_out = σ σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²), c_noise = ln(σ)/4.
``target(...)`` is what F should output, so the natural loss of each parameterisation is
``|F − target|²`` (for edm this equals EDM's λ(σ)|D − x0|²).

Loss weights are defined in x0 space (the weight of ``|x0_hat − x0|²``, e.g. Min-SNR-γ's
``min(SNR, γ)``), by the module or the process (``Process.loss_weight``), and converted here, once:
the natural loss equals ``natural_weight(t) · |x0_hat − x0|²`` with ``natural_weight`` = SNR (eps),
1 (x0), SNR + 1 (v), SNR + 1/σ_d² (edm, = 1/c_out²); ``loss(..., weight=w)`` multiplies the natural
loss by ``w / natural_weight``. For eps and v that ratio is a scalar only for white noise, so a
coloured process (blur) may use them only with the natural loss.

The process declares which predictions it supports (``Process.predictions``; v assumes
``x_t = a x0 + sigma eps`` with white eps and a² + sigma² = 1); an unsupported one is refused here.
The network sees ``c_noise``: 1000 t for eps / x0 / v (DDPM convention), ln(σ)/4 for edm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from freqdiff.processes.base import Process
from freqdiff.processes.ops import append_dims, as_batch_time, full_precision_fn

PREDICTIONS = ("eps", "x0", "v", "edm")


class Denoiser(nn.Module):
    def __init__(
        self,
        net: nn.Module,  # backbone: net(x, c_noise [B], labels) -> F
        process: Process,  # the forward process the model is trained for
        prediction: str = "eps",  # one of PREDICTIONS
        sigma_data: float = 0.5,  # σ_d of EDM preconditioning
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction {prediction!r} unknown; expected one of {PREDICTIONS}")
        supported = tuple(getattr(process, "predictions", PREDICTIONS))
        if prediction not in supported:
            raise ValueError(
                f"prediction {prediction!r} is not supported by {type(process).__name__}; "
                f"it supports {supported}"
            )
        self.net, self.process, self.prediction, self.sigma_data = net, process, prediction, sigma_data

    def _edm_coefs(self, t: Tensor, ndim: int):
        a, sigma = self.process.scalings(t)
        sig = (sigma / a).clamp(min=1e-8)  # EDM σ of x̃ = x_t / a
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sig**2 + sd2)
        c_out = sig * self.sigma_data / torch.sqrt(sig**2 + sd2)
        c_in = 1 / torch.sqrt(sig**2 + sd2)
        return [append_dims(v, ndim) for v in (a, c_skip, c_out, c_in)], torch.log(sig) / 4

    def raw(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, **net_kwargs) -> Tensor:
        """The network output F (in fp32), with the input scaling of the parameterisation."""
        t = as_batch_time(t, x_t.shape[0], x_t.device)
        if self.prediction == "edm":
            (a, _, _, c_in), c_noise = self._edm_coefs(t, x_t.ndim)
            x_in = c_in * x_t / a
        else:
            x_in, c_noise = x_t, 1000.0 * t
        return self.net(x_in, c_noise, labels, **net_kwargs).float()

    @full_precision_fn
    def x0_from_raw(self, F: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        t = as_batch_time(t, x_t.shape[0], x_t.device)
        if self.prediction == "eps":
            return self.process.x0_from_eps(x_t, F, t)
        if self.prediction == "x0":
            return F
        if self.prediction == "v":
            a, sigma = (append_dims(v, x_t.ndim) for v in self.process.scalings(t))
            return a * x_t - sigma * F
        (a, c_skip, c_out, _), _ = self._edm_coefs(t, x_t.ndim)
        return c_skip * x_t / a + c_out * F

    @full_precision_fn
    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """What F should be for this (x0, eps, x_t, t): the regression target of the natural loss."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        if self.prediction == "v":
            a, sigma = (append_dims(v, x_t.ndim) for v in self.process.scalings(t))
            return a * eps - sigma * x0
        (a, c_skip, c_out, _), _ = self._edm_coefs(t, x_t.ndim)
        return (x0 - c_skip * x_t / a) / c_out

    @full_precision_fn
    def natural_weight(self, t: Tensor) -> Tensor:
        """w [B] with ``|F − target|² = w |x0_hat − x0|²`` for this parameterisation (x0-space weight)."""
        if self.prediction == "x0":
            return torch.ones_like(t, dtype=torch.float32)
        if self.prediction in ("eps", "v") and not getattr(self.process, "white_noise", False):
            raise ValueError(
                f"an x0-space loss weight cannot be converted for prediction {self.prediction!r} on "
                f"{type(self.process).__name__} (coloured noise): use its natural loss (weight None)"
            )
        a, sigma = self.process.scalings(t)
        snr = (a / sigma.clamp(min=1e-20)) ** 2
        if self.prediction == "eps":
            return snr
        if self.prediction == "v":
            return snr + 1
        return snr + 1 / self.sigma_data**2  # edm: 1 / c_out² with σ = sigma / a

    def loss(
        self,
        x0: Tensor,  # clean target at the output resolution, [B, C, H, W]
        eps: Tensor,  # the white noise of the marginal
        x_t: Tensor,  # the noisy state
        t: Tensor,  # [B]
        weight: Tensor | None = None,  # x0-space weight [B]; None: the natural loss
        labels: Tensor | None = None,
        **net_kwargs,
    ) -> Tensor:
        """Per-sample loss [B]: pixel mean of ``(F − target)²``, reweighted to ``weight`` in x0 space."""
        t = as_batch_time(t, x_t.shape[0], x_t.device)
        F = self.raw(x_t, t, labels, **net_kwargs)
        per_sample = ((F - self.target(x0, eps, x_t, t)) ** 2).flatten(1).mean(1)
        if weight is not None:
            per_sample = per_sample * (weight / self.natural_weight(t))
        return per_sample

    def forward(self, x_t: Tensor, t: Tensor | float, labels: Tensor | None = None, **net_kwargs) -> Tensor:
        """x0_hat [B, C, H', W'] (H' may differ from H where the backbone changes resolution)."""
        t = as_batch_time(t, x_t.shape[0], x_t.device)
        return self.x0_from_raw(self.raw(x_t, t, labels, **net_kwargs), x_t, t)
