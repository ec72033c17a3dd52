"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Training is ``DDPMModule``'s: with prediction "edm" (EDM Table 1 preconditioning) the Denoiser's natural
loss ``|F − target|²`` equals EDM's ``λ(σ) |D(x0 + σ ε; σ) − x0|²`` with λ(σ) = (σ² + σ_d²)/(σ σ_d)²
(EDM eq. 8 and Table 1; ``training/loss.py`` ``EDMLoss``), and ``LogNormalSigmaTime`` draws EDM's
ln σ ~ N(P_mean, P_std²) through ``EDMProcess.t_from_sigma``. Sampling: ``samplers.sample_heun``,
EDM Algorithm 2 (Heun with optional churn; 18 steps = 35 NFE by default, EDM's CIFAR-10 setting), or
with ``sde_scale`` > 0 Relay Diffusion's stage-1 sampler (fresh noise g = sde_scale σ_next per step).
"""

from __future__ import annotations

from torch import Tensor, nn

from freqdiff.config import check_args
from freqdiff.processes.base import Process
from freqdiff.samplers import sample_heun
from lightning_modules.ddpm import DDPMModule


class EDMModule(DDPMModule):
    def __init__(
        self,
        net: nn.Module,  # backbone, e.g. freqdiff.nets.presets.unet
        process: Process,  # a white-noise process, e.g. freqdiff.processes.edm.EDMProcess
        time_sampler,  # training t sampler, e.g. LogNormalSigmaTime (EDM: P_mean −1.2, P_std 1.2)
        prediction: str = "edm",  # eps | x0 | edm (EDM: edm)
        sample_steps: int = 18,  # Heun grid points N (2N − 1 NFE; EDM CIFAR-10: 18)
        S_churn: float = 0.0,  # EDM Algorithm 2 churn (0: the deterministic ODE sampler)
        S_min: float = 0.0,  # churn only for S_min <= σ <= S_max
        S_max: float = float("inf"),
        S_noise: float = 1.0,  # churn noise inflation
        sde_scale: float = 0.0,  # fresh noise per Heun step, g = sde_scale σ_next (Relay's stage 1: 0.05)
        **ddpm,  # DDPMModule / DiffusionModule arguments (min_snr, channels, lr, ema_halflife_kimg, ...)
    ):
        check_args("a non-negative number", S_churn=S_churn, S_min=S_min, S_noise=S_noise)
        if not (isinstance(sde_scale, (int, float)) and 0 <= sde_scale < 1):
            raise ValueError(f"sde_scale={sde_scale!r}: expected a number in [0, 1)")
        if not (isinstance(S_max, (int, float)) and S_max >= S_min):
            raise ValueError(f"S_max={S_max!r}: expected a number >= S_min={S_min!r}")
        super().__init__(net, process, time_sampler, prediction=prediction, sample_steps=sample_steps, **ddpm)
        self.S_churn, self.S_min, self.S_max, self.S_noise = S_churn, S_min, S_max, S_noise
        self.sde_scale = float(sde_scale)

    def sample(self, seeds, steps: int | None = None, use_ema: bool = True, **kw) -> Tensor:
        """Images [B, C, H, W] for per-sample ``seeds``; ``kw`` goes to ``sample_heun`` (callback, churn)."""
        churn = {"S_churn": self.S_churn, "S_min": self.S_min, "S_max": self.S_max, "S_noise": self.S_noise}
        churn["sde_scale"] = self.sde_scale
        if kw.pop("eta", None) not in (None, 0, 0.0):  # DDPMModule's keyword (callbacks pass it through)
            raise ValueError("EDMModule samples with Heun, which has no eta: its stochasticity is S_churn")
        return self.run_sampler(sample_heun, seeds, steps, use_ema, **{**churn, **kw})
