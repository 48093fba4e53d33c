"""Sparse 2x down/upsampling against the definition, including the official mean-with-include_self quirk."""

from __future__ import annotations

import pytest
import torch

from sam3d_kernels.sparse_resample import downsample2, upsample2


def downsample_by_definition(coords, feats):
    """Group children by (b, x//2, y//2, z//2) in a dict; parents sorted; mean = sum / (count + 1)."""
    groups: dict[tuple, list[int]] = {}
    for i, (b, x, y, z) in enumerate(coords.tolist()):
        groups.setdefault((b, x // 2, y // 2, z // 2), []).append(i)
    keys = sorted(groups)
    out = torch.stack([feats[groups[k]].sum(0) / (len(groups[k]) + 1) for k in keys])
    inverse = torch.empty(coords.shape[0], dtype=torch.int64)
    for j, k in enumerate(keys):
        inverse[groups[k]] = j
    return torch.tensor(keys), out, inverse


@pytest.mark.parametrize("batch,res,density", [(2, 7, 0.3), (1, 4, 1.0), (3, 5, 0.05)])
def test_downsample_matches_definition(voxels, batch, res, density):
    coords = voxels(batch, res, density, seed=res)
    feats = torch.randn(coords.shape[0], 5, dtype=torch.float64)
    c, f, inv = downsample2(coords, feats)
    c_ref, f_ref, inv_ref = downsample_by_definition(coords, feats)
    assert c.dtype == coords.dtype and torch.equal(c.long(), c_ref)
    assert torch.equal(inv, inv_ref)
    torch.testing.assert_close(f, f_ref)


def test_include_self_quirk_divides_by_count_plus_one():
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1], [0, 5, 5, 5]])
    feats = torch.tensor([[2.0], [4.0], [3.0]])
    c, f, inv = downsample2(coords, feats)
    assert c.tolist() == [[0, 0, 0, 0], [0, 2, 2, 2]] and inv.tolist() == [0, 0, 1]
    assert f.flatten().tolist() == [2.0, 1.5]  # (2 + 4) / 3 and 3 / 2, not 3 and 3


def test_backward_and_upsample(voxels):
    coords = voxels(2, 6, 0.4, seed=3)
    feats = torch.randn(coords.shape[0], 4, dtype=torch.float64, requires_grad=True)
    c, f, inv = downsample2(coords, feats)
    up = upsample2(f, inv)
    assert up.shape == feats.shape
    torch.testing.assert_close(up, f[inv])
    g = torch.randn_like(up)
    up.backward(g)
    count = torch.bincount(inv, minlength=c.shape[0]).double()
    g_parent = torch.zeros_like(f).index_add_(0, inv, g)  # upsample's backward: sum over children
    torch.testing.assert_close(feats.grad, (g_parent / (count[:, None] + 1))[inv])


def test_single_voxel_and_empty():
    c, f, inv = downsample2(torch.tensor([[1, 9, 4, 3]], dtype=torch.int32), torch.tensor([[6.0, -2.0]]))
    assert c.tolist() == [[1, 4, 2, 1]] and f.tolist() == [[3.0, -1.0]] and inv.tolist() == [0]
    c, f, inv = downsample2(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 3))
    assert c.shape == (0, 4) and f.shape == (0, 3) and inv.shape == (0,)
    assert upsample2(f, inv).shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(voxels, dtype):
    coords = voxels(1, 6, 0.5)
    feats = torch.randn(coords.shape[0], 8)
    _, f, inv = downsample2(coords, feats.to(dtype))
    _, f_ref, _ = downsample2(coords, feats.double())
    assert f.dtype == dtype
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_matches_cpu(shell):
    coords = shell(32, batch=2)
    feats = torch.randn(coords.shape[0], 64)
    c, f, inv = downsample2(coords, feats)
    c_gpu, f_gpu, inv_gpu = downsample2(coords.cuda(), feats.cuda())
    assert torch.equal(c_gpu.cpu(), c) and torch.equal(inv_gpu.cpu(), inv)
    torch.testing.assert_close(f_gpu.cpu(), f, rtol=1e-5, atol=1e-6)
