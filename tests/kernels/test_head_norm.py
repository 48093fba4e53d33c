"""Per-head RMS norm: the reference against the definition, the Triton path against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from sam3d_kernels.head_norm import head_rms_norm, head_rms_norm_reference


def definition(x, gamma):
    """normalize(x) * sqrt(D) * gamma, the official MultiHeadRMSNorm, in float64."""
    return torch.nn.functional.normalize(x.double(), dim=-1) * math.sqrt(x.shape[-1]) * gamma.double()


@pytest.mark.parametrize("shape", [(5, 3, 8), (2, 7, 4, 16), (1, 1, 2)])
def test_reference_matches_the_definition(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    gamma = torch.rand(shape[-2:], generator=g, dtype=torch.float64) + 0.5
    torch.testing.assert_close(head_rms_norm_reference(x, gamma).double(), definition(x, gamma), rtol=1e-6, atol=1e-9)


def test_strided_slice_of_packed_qkv_and_errors():
    qkv = torch.randn(6, 3, 4, 8)
    q = qkv[:, 0]  # a non-contiguous view, as the attention layers pass it
    gamma = torch.rand(4, 8) + 0.5
    out = head_rms_norm(q, gamma)
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), definition(q, gamma), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        head_rms_norm(q, torch.ones(4, 4))
    with pytest.raises(ValueError, match="triton"):
        head_rms_norm(q, gamma, backend="triton")  # CPU float32: no fast path


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 63, 10336])
def test_triton_matches_reference_on_gpu(dtype, rows):
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(rows)
    qkv = torch.randn(rows, 3, 16, 64, device="cuda", generator=g).to(dtype) * 4
    gamma = (torch.rand(16, 64, device="cuda", generator=g) + 0.5).to(dtype)
    for part in (qkv[:, 0], qkv[:, 1], qkv.reshape(1, rows, 3, 16, 64)[:, :, 2]):
        fast = head_rms_norm(part, gamma, backend="triton")
        ref = head_rms_norm_reference(part, gamma)
        assert fast.shape == part.shape and fast.dtype == dtype and fast.is_contiguous()
        # both compute in float32 and round once: equal up to the summation order (one unit in the last place)
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        assert ((fast.float() - ref.float()).abs() <= ulp * ref.float().abs().clamp_min(1e-3)).all()
        assert (fast == ref).float().mean() > 0.99
