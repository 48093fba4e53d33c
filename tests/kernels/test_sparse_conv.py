"""Submanifold 3x3x3 sparse convolution: the reference against dense Conv3d, the Triton path against the reference."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sam3d_kernels.sparse_conv import KERNEL_OFFSETS, build_neighbour_map, submanifold_conv3d


def dense_subm_conv(feats, coords, weight, bias, res):
    """The definition: scatter onto a dense zero grid, torch Conv3d (cross-correlation), read the active sites."""
    b = int(coords[:, 0].max()) + 1 if coords.shape[0] else 1
    c = coords.long()
    grid = feats.new_zeros(b, res, res, res, feats.shape[1])
    grid = grid.index_put((c[:, 0], c[:, 1], c[:, 2], c[:, 3]), feats)
    out = F.conv3d(grid.permute(0, 4, 1, 2, 3), weight.permute(0, 4, 1, 2, 3), bias, padding=1)
    return out.permute(0, 2, 3, 4, 1)[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]


def test_neighbour_map_matches_brute_force(voxels):
    coords = voxels(2, 5, 0.35, seed=1)
    nbr = build_neighbour_map(coords)
    where = {tuple(r): i for i, r in enumerate(coords.tolist())}
    for i, (b, x, y, z) in enumerate(coords.tolist()):
        for k, (dx, dy, dz) in enumerate(KERNEL_OFFSETS.tolist()):
            assert nbr[i, k].item() == where.get((b, x + dx, y + dy, z + dz), -1)


def test_neighbour_map_edge_cases():
    assert build_neighbour_map(torch.zeros(0, 4, dtype=torch.int32)).shape == (0, 27)
    one = build_neighbour_map(torch.tensor([[0, 0, 0, 0]]))
    assert one[0, 13] == 0 and (one[0, torch.arange(27) != 13] == -1).all()
    # Two batch items at the same site are not neighbours.
    two = build_neighbour_map(torch.tensor([[0, 2, 2, 2], [1, 2, 2, 2]]))
    assert (two[:, 13] == torch.tensor([0, 1])).all() and (two.sum(1) == two[:, 13] - 26).all()


@pytest.mark.parametrize("cin,cout", [(5, 7), (1, 1), (16, 3)])
def test_forward_backward_match_dense_conv3d(voxels, cin, cout):
    res = 6
    coords = voxels(2, res, 0.4, seed=cin)
    g = torch.Generator().manual_seed(cout)
    feats = torch.randn(coords.shape[0], cin, dtype=torch.float64, generator=g)
    weight = torch.randn(cout, 3, 3, 3, cin, dtype=torch.float64, generator=g)
    bias = torch.randn(cout, dtype=torch.float64, generator=g)
    grad = torch.randn(coords.shape[0], cout, dtype=torch.float64, generator=g)
    ours = [t.clone().requires_grad_() for t in (feats, weight, bias)]
    dense = [t.clone().requires_grad_() for t in (feats, weight, bias)]
    out = submanifold_conv3d(ours[0], coords, ours[1], ours[2])
    ref = dense_subm_conv(dense[0], coords, dense[1], dense[2], res)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(ours, dense, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(importlib.util.find_spec("spconv") is None, reason="needs spconv (pip install spconv, CPU build)")
def test_matches_spconv_submconv3d(voxels):
    """The ground truth the official code runs: spconv's SubMConv3d, same weight tensor, no re-layout."""
    import spconv.pytorch as spconv

    coords = voxels(2, 6, 0.4, seed=11)
    feats = torch.randn(coords.shape[0], 4)
    conv = spconv.SubMConv3d(4, 6, 3, bias=True)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    out = conv(spconv.SparseConvTensor(feats, coords, [6, 6, 6], 2))
    assert torch.equal(out.indices, coords)
    ours = submanifold_conv3d(feats, coords, conv.weight.detach(), conv.bias.detach())
    torch.testing.assert_close(ours, out.features, rtol=1e-5, atol=1e-5)


def test_single_voxel_and_empty():
    weight = torch.randn(4, 3, 3, 3, 2)
    bias = torch.randn(4)
    x = torch.randn(1, 2)
    out = submanifold_conv3d(x, torch.tensor([[0, 7, 0, 3]]), weight, bias)
    torch.testing.assert_close(out, x @ weight[:, 1, 1, 1, :].t() + bias)
    empty = torch.zeros(0, 2, requires_grad=True)
    out = submanifold_conv3d(empty, torch.zeros(0, 4, dtype=torch.int32), weight, bias)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert empty.grad.shape == (0, 2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_reference_dtypes(voxels, dtype, tol):
    coords = voxels(1, 5, 0.5)
    feats, weight = torch.randn(coords.shape[0], 8), torch.randn(6, 3, 3, 3, 8) / 8
    out = submanifold_conv3d(feats.to(dtype), coords, weight, None)  # weight is cast to feats' dtype
    assert out.dtype == dtype
    ref = submanifold_conv3d(feats.double(), coords, weight.double(), None)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_errors_name_the_problem():
    coords = torch.zeros(3, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\[Cout, 3, 3, 3, Cin\]"):
        submanifold_conv3d(torch.randn(3, 2), coords, torch.randn(4, 2, 3, 3, 3))
    with pytest.raises(ValueError, match="backend"):
        submanifold_conv3d(torch.randn(3, 2), coords, torch.randn(4, 3, 3, 3, 2), backend="cuda")


_INTERPRETER_CHECK = """
import torch
from sam3d_kernels.sparse_conv import build_neighbour_map, submanifold_conv3d_reference
from sam3d_kernels.sparse_conv.triton import _launch
g = torch.Generator().manual_seed(0)
coords = (torch.rand(2, 4, 4, 4, generator=g) < 0.5).nonzero()
nbr = build_neighbour_map(coords)
x, w, b = torch.randn(coords.shape[0], 20, generator=g), torch.randn(19, 3, 3, 3, 20, generator=g), torch.randn(19)
w_kic = w.reshape(19, 27, 20).permute(1, 2, 0).contiguous()
out = _launch(x, w_kic, b, nbr, {"BLOCK_N": 16, "BLOCK_CO": 16, "BLOCK_CI": 16})
torch.testing.assert_close(out, submanifold_conv3d_reference(x, coords, w, b, nbr), rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_triton_kernel_in_interpreter_mode():
    """Runs the Triton kernel on the CPU through TRITON_INTERPRET=1 (a separate process: the flag is read at import).

    ~12 s (the interpreter), hence `slow`; it runs wherever triton is installed, GPU or not.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# --- GPU: the Triton fast path against the reference -------------------------------------------------------------

TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # relative to max |ref|


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("n_res,cin,cout", [(3, 3, 5), (12, 13, 70), (24, 128, 128), (16, 256, 1024)])
def test_triton_matches_reference_on_gpu(voxels, dtype, n_res, cin, cout):
    coords = voxels(2, n_res, 0.3, seed=n_res).cuda()
    g = torch.Generator().manual_seed(cin)
    feats = torch.randn(coords.shape[0], cin, generator=g).cuda()
    weight = (torch.randn(cout, 3, 3, 3, cin, generator=g) / (27 * cin) ** 0.5).cuda()
    bias = torch.randn(cout, generator=g).cuda()
    grad = torch.randn(coords.shape[0], cout, generator=g).cuda()
    nbr = build_neighbour_map(coords)
    fast = [t.detach().clone().to(dtype).requires_grad_() for t in (feats, weight, bias)]
    ref = [t.detach().double().requires_grad_() for t in (feats, weight, bias)]
    out = submanifold_conv3d(fast[0], coords, fast[1], fast[2], nbr, backend="triton")
    expect = submanifold_conv3d(ref[0], coords, ref[1], ref[2], nbr, backend="reference")
    out.backward(grad.to(dtype))
    expect.backward(grad.double())
    tol = TOLERANCES[dtype]
    pairs = [("out", out, expect)] + [
        (f"grad{i}", a.grad, b.grad) for i, (a, b) in enumerate(zip(fast, ref, strict=True))
    ]
    for name, a, b in pairs:
        err = (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
        assert err < tol, f"{name} {dtype}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.gpu
def test_triton_single_and_empty_on_gpu():
    weight, bias = torch.randn(4, 3, 3, 3, 2, device="cuda"), torch.randn(4, device="cuda")
    x = torch.randn(1, 2, device="cuda")
    out = submanifold_conv3d(x, torch.tensor([[0, 1, 2, 3]], device="cuda"), weight, bias, backend="triton")
    torch.testing.assert_close(out, x @ weight[:, 1, 1, 1, :].t() + bias, rtol=1e-4, atol=1e-4)
    empty = torch.zeros(0, 2, device="cuda", requires_grad=True)
    coords = torch.zeros(0, 4, dtype=torch.int32, device="cuda")
    out = submanifold_conv3d(empty, coords, weight, bias, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 4) and empty.grad.shape == (0, 2)
