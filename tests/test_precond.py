"""Denoiser parameterisations round-trip (eps <-> x0 <-> v <-> edm) through the process (DESIGN.md §2.3)."""

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
