"""Denoiser parameterisations round-trip (eps <-> x0 <-> v <-> edm) through the process
(docs/architecture.md, Parameterisations)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from freqdiff.nets.precond import Denoiser
from freqdiff.processes.base import NoiseSource
from freqdiff.processes.gaussian import GaussianProcess


class Oracle(nn.Module):
    """Returns a preset output; records what it was called with."""

    def __init__(self):
        super().__init__()
        self.out = None

    def forward(self, x, c_noise, labels=None):
        self.seen = (x, c_noise)
        return self.out


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_target_then_x0_from_raw_recovers_x0(prediction):
    p = GaussianProcess(resolution=8)
    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 1.0])
    x_t, eps = p.marginal(x0, t, NoiseSource(torch.Generator().manual_seed(0)))
    net = Oracle()
    D = Denoiser(net, p, prediction)
    net.out = D.target(x0, eps, x_t, t)
    torch.testing.assert_close(D(x_t, t), x0, atol=3e-3, rtol=1e-3)


def test_edm_inputs_are_preconditioned():
    p = GaussianProcess(resolution=8)
    net = Oracle()
    net.out = torch.zeros(2, 3, 8, 8)
    D = Denoiser(net, p, "edm", sigma_data=0.5)
    t = torch.tensor([0.5, 0.9])
    x_t = torch.randn(2, 3, 8, 8)
    D(x_t, t)
    a, sigma = p.scalings(t)
    sig = sigma / a
    torch.testing.assert_close(net.seen[1], torch.log(sig) / 4)
    expected = x_t / a.view(-1, 1, 1, 1) / torch.sqrt(sig**2 + 0.25).view(-1, 1, 1, 1)
    torch.testing.assert_close(net.seen[0], expected)


def test_unknown_prediction_is_an_error():
    with pytest.raises(ValueError, match="'score'"):
        Denoiser(Oracle(), GaussianProcess(), "score")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_natural_weight_and_x0_space_weights(prediction):
    """|F − target|² = natural_weight · |x0_hat − x0|²; loss(weight=w) = w · |x0_hat − x0|² (x0 space)."""
    p = GaussianProcess(resolution=8)
    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    t = torch.tensor([0.05, 0.1, 0.3, 0.5, 0.8, 0.95])
    x_t, eps = p.marginal(x0, t, NoiseSource(torch.Generator().manual_seed(0)))
    net = Oracle()
    D = Denoiser(net, p, prediction)
    net.out = D.target(x0, eps, x_t, t) + 0.1 * torch.randn(6, 3, 8, 8)  # an imperfect network
    x0_err = ((D(x_t, t) - x0) ** 2).flatten(1).mean(1)
    natural = D.loss(x0, eps, x_t, t)
    torch.testing.assert_close(natural, D.natural_weight(t) * x0_err, rtol=2e-3, atol=1e-6)
    w = torch.linspace(0.5, 3.0, 6)
    torch.testing.assert_close(D.loss(x0, eps, x_t, t, weight=w), w * x0_err, rtol=2e-3, atol=1e-6)


def test_predictions_the_process_does_not_support_are_refused():
    from freqdiff.processes.edm import EDMProcess

    with pytest.raises(ValueError, match=r"'v' is not supported by EDMProcess"):
        Denoiser(Oracle(), EDMProcess(), "v")

    class Coloured(GaussianProcess):
        predictions = ("eps", "x0")
        white_noise = False

    with pytest.raises(ValueError, match="'v' is not supported"):
        Denoiser(Oracle(), Coloured(), "v")
    D = Denoiser(Oracle(), Coloured(), "eps")
    with pytest.raises(ValueError, match="coloured noise"):
        D.natural_weight(torch.tensor([0.5]))
