"""The precision policy (freqdiff/processes/ops.py): process math is immune to bf16 autocast and TF32.

The motivating measurement: a marginal through an orthonormal 64x64 basis at σ = 0.01, computed as a
plain matmul under CPU bf16 autocast, is off by tens of percent of σ; through ``apply_per_axis``
(autocast off, full-precision matmuls) it is exact to float32.
"""

from __future__ import annotations

import torch

from freqdiff.nets.presets import unet
from freqdiff.processes.ops import apply_per_axis, dct_matrix, full_precision, full_precision_fn


def _basis_marginal_error(transform) -> float:
    """rms error (in units of σ) of x_t = Cᵀ(a C x0 C ᵀ + σ C ε Cᵀ)C at σ = 0.01, a = 1, vs float64."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    eps = torch.randn(4, 3, 64, 64, generator=g)
    C, sigma = dct_matrix(64, torch.float32), 0.01
    ref = (x0.double() + sigma * eps.double()).float()
    with torch.autocast("cpu", torch.bfloat16):
        u = transform(C, x0) + sigma * transform(C, eps)  # in the basis
        x_t = transform(C.T.contiguous(), u)  # and back
    return float(((x_t.float() - ref) ** 2).mean().sqrt() / sigma)


def test_dct_matrix_is_orthonormal():
    C = dct_matrix(16)
    torch.testing.assert_close(C @ C.T, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    y = apply_per_axis(x, C)
    assert y.dtype == torch.float64
    torch.testing.assert_close(apply_per_axis(y, C.T), x, atol=1e-12, rtol=0)  # round trip < 1e-12
    torch.testing.assert_close(y.norm(), x.norm())  # norm-preserving


def test_basis_transform_under_bf16_autocast_needs_the_policy():
    naive = _basis_marginal_error(lambda C, x: C @ x @ C.T)
    policy = _basis_marginal_error(lambda C, x: apply_per_axis(x, C))
    assert naive > 0.1  # the defect the policy exists for: a bf16 matmul is off by >10 % of σ
    assert policy < 1e-3, policy


def test_full_precision_restores_settings_and_casts_arguments():
    torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast("cpu", torch.bfloat16):
            with full_precision():
                assert torch.get_float32_matmul_precision() == "highest"
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
            assert torch.get_float32_matmul_precision() == "high"
            f = full_precision_fn(lambda a, b: a @ b)
            out = f(torch.ones(2, 2, dtype=torch.bfloat16), b=torch.ones(2, 2))
            assert out.dtype == torch.float32
    finally:
        torch.set_float32_matmul_precision("highest")


def test_unet_output_layer_runs_in_fp32_under_autocast():
    net = unet("tiny", resolution=8, channel_mult=(1, 2), attn_resolutions=(4,))
    with torch.no_grad():
        for p in net.out_conv.parameters():
            p.normal_(0, 0.1)
    x, c = torch.randn(2, 3, 8, 8), torch.full((2,), 500.0)
    with torch.autocast("cpu", torch.bfloat16):
        out = net(x, c)
        h = torch.randn(2, net.channels[0], 8, 8, dtype=torch.bfloat16)
        head = net.head(h)
    assert out.dtype == torch.float32 and head.dtype == torch.float32
    ref = net.out_conv(torch.nn.functional.silu(net.out_norm(h.float())))
    torch.testing.assert_close(head, ref, atol=1e-6, rtol=1e-5)  # not a bf16 conv
