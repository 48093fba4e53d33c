"""Varlen and shifted-window sparse attention against dense masked attention built from the definition."""

from __future__ import annotations

import math

import pytest
import torch

from sam3d_kernels.sparse_attention import varlen_attention, window_partition, windowed_attention


def masked_attention(q, k, v, allowed):
    """Dense attention over all rows with allowed [Tq, Tk] bool; rows with nothing allowed give zeros."""
    logits = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, v)


def segment_ids(cu, total):
    return torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long(), output_size=total)


def window_mask(coords, window, shift):
    """Same batch item and same window cell ⌊(x + shift) / window⌋ on all three axes."""
    cell = torch.cat([coords[:, :1], (coords[:, 1:] + shift) // window], 1)
    return (cell[:, None, :] == cell[None, :, :]).all(-1)


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def check_fwd_bwd(fn, reference, tensors, seed=0):
    ours = [t.clone().requires_grad_() for t in tensors]
    dense = [t.clone().requires_grad_() for t in tensors]
    out, ref = fn(*ours), reference(*dense)
    torch.testing.assert_close(out, ref)
    g = rand(*out.shape, seed=seed + 99)
    out.backward(g)
    ref.backward(g)
    for a, b in zip(ours, dense, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(
    "lens_q,lens_k", [([1, 5, 9], [1, 5, 9]), ([3, 1, 4], [2, 7, 1]), ([1], [1]), ([4, 0, 2], [3, 5, 2])]
)
def test_varlen_matches_block_diagonal_dense(lens_q, lens_k):
    cu_q = torch.tensor([0] + lens_q).cumsum(0).int()
    cu_k = torch.tensor([0] + lens_k).cumsum(0).int()
    tq, tk = sum(lens_q), sum(lens_k)
    allowed = segment_ids(cu_q, tq)[:, None] == segment_ids(cu_k, tk)[None, :]
    q, k, v = rand(tq, 3, 8, seed=1), rand(tk, 3, 8, seed=2), rand(tk, 3, 8, seed=3)
    check_fwd_bwd(
        lambda q, k, v: varlen_attention(q, k, v, cu_q, cu_k),
        lambda q, k, v: masked_attention(q, k, v, allowed),
        [q, k, v],
    )


def test_varlen_empty_and_errors():
    z = torch.zeros(0, 2, 8)
    cu = torch.zeros(1, dtype=torch.int32)
    assert varlen_attention(z, z, z, cu, cu).shape == (0, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        varlen_attention(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), cu, cu)
    with pytest.raises(ValueError, match="packed"):
        varlen_attention(torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(3, 8), cu, cu)


def test_window_partition_groups_windows(voxels):
    coords = voxels(2, 20, 0.05, seed=4)
    for shift in (0, 4):
        perm, cu = window_partition(coords, window=8, shift=shift)
        assert torch.equal(perm.sort().values, torch.arange(coords.shape[0]))
        cell = torch.cat([coords[:, :1], (coords[:, 1:] + shift) // 8], 1)[perm]  # [N, 4]
        ids = segment_ids(cu, coords.shape[0])
        same_window = (cell[:, None] == cell[None, :]).all(-1)
        assert torch.equal(same_window, ids[:, None] == ids[None, :])  # one segment per non-empty window
        starts = cell[cu[:-1].long()]
        assert starts.tolist() == sorted(starts.tolist())  # windows in (batch, x, y, z) order


def test_window_partition_shift_moves_the_boundary():
    coords = torch.tensor([[0, 3, 0, 0], [0, 4, 0, 0], [0, 7, 0, 0], [0, 8, 0, 0]])
    _, cu = window_partition(coords, 8, 0)
    assert cu.tolist() == [0, 3, 4]  # {3, 4, 7} {8}
    perm, cu = window_partition(coords, 8, 4)
    assert cu.tolist() == [0, 1, 4] and perm[0] == 0  # {3} {4, 7, 8}
    perm, cu = window_partition(torch.zeros(0, 4, dtype=torch.int32))
    assert perm.shape == (0,) and cu.tolist() == [0]


@pytest.mark.parametrize("shift", [0, 4])
def test_windowed_attention_matches_dense_masked(voxels, shift):
    a = voxels(1, 12, 0.05, seed=5)
    b = voxels(1, 10, 0.08, seed=6)
    b[:, 0] = 1
    coords = torch.cat([a, b])[torch.randperm(a.shape[0] + b.shape[0], generator=torch.Generator().manual_seed(0))]
    n = coords.shape[0]
    allowed = window_mask(coords, 8, shift)
    check_fwd_bwd(
        lambda q, k, v: windowed_attention(q, k, v, coords, window=8, shift=shift),
        lambda q, k, v: masked_attention(q, k, v, allowed),
        [rand(n, 2, 16, seed=7), rand(n, 2, 16, seed=8), rand(n, 2, 16, seed=9)],
    )


def test_windowed_attention_single_and_empty():
    q = rand(1, 2, 8)
    out = windowed_attention(q, q * 2, q * 3, torch.tensor([[0, 5, 6, 7]]), shift=4)
    torch.testing.assert_close(out, q * 3)  # one key: the output is its value
    z = torch.zeros(0, 2, 8)
    assert windowed_attention(z, z, z, torch.zeros(0, 4, dtype=torch.int32)).shape == (0, 2, 8)


# --- GPU: PyTorch's flash varlen op against the reference ---------------------------------------------------------

TOLERANCES = {torch.float16: 1e-2, torch.bfloat16: 5e-2}  # max |error| / max |reference|


def relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("shift", [0, 4])
def test_flash_windowed_matches_reference_on_gpu(shell, dtype, shift):
    second = shell(24) + torch.tensor([1, 0, 0, 0], dtype=torch.int32)  # batch item 1, a smaller object
    coords = torch.cat([shell(32), second]).cuda()
    n = coords.shape[0]
    q, k, v, g = (rand(n, 12, 64, seed=s).float().cuda() for s in (1, 2, 3, 4))
    fast = [t.detach().clone().to(dtype).requires_grad_() for t in (q, k, v)]
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = windowed_attention(*fast, coords, 8, shift, backend="flash")
    expect = windowed_attention(*ref, coords, 8, shift, backend="reference")
    out.backward(g.to(dtype))
    expect.backward(g)
    tol = TOLERANCES[dtype]
    assert relative_error(out, expect) < tol
    for name, a, b in zip("qkv", fast, ref, strict=True):
        assert relative_error(a.grad, b.grad) < tol, f"grad {name}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("scale", [None, 0.3])
def test_flash_varlen_full_attention_on_gpu(dtype, scale):
    lens = [1, 777, 64, 3001]
    cu = torch.tensor([0] + lens).cumsum(0).int().cuda()
    t = sum(lens)
    q, k, v = (rand(t, 16, 64, seed=s).float().cuda() for s in (1, 2, 3))
    out = varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu, cu, scale=scale, backend="flash")
    expect = varlen_attention(q, k, v, cu, cu, scale=scale, backend="reference")
    assert relative_error(out, expect) < TOLERANCES[dtype]
    auto = varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu, cu, scale=scale)  # auto picks flash
    assert auto.dtype == dtype and torch.equal(auto, out)


@pytest.mark.parametrize("segments,lq,lk", [(1, 7, 7), (2, 5, 9), (3, 4, 1)])
def test_dense_path_matches_varlen_reference(segments, lq, lk):
    cu_q = torch.arange(segments + 1, dtype=torch.int32) * lq
    cu_k = torch.arange(segments + 1, dtype=torch.int32) * lk
    q, k, v = rand(segments * lq, 3, 8, seed=1), rand(segments * lk, 3, 8, seed=2), rand(segments * lk, 3, 8, seed=3)

    def dense(q, k, v):
        return varlen_attention(q, k, v, cu_q, cu_k, lq, lk, scale=0.2, backend="dense")

    def ref(q, k, v):
        allowed = segment_ids(cu_q, len(q))[:, None] == segment_ids(cu_k, len(k))[None, :]
        return masked_attention(q * (0.2 * math.sqrt(q.shape[-1])), k, v, allowed)

    check_fwd_bwd(dense, ref, [q, k, v])


def test_dense_path_refuses_unequal_segments():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    q = rand(5, 2, 8)
    with pytest.raises(ValueError, match="equal length"):
        varlen_attention(q, q, q, cu, cu, backend="dense")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_auto_dense_path_on_gpu(dtype):
    """Equal segments with the maxima given: 'auto' takes the batched dense (cuDNN-first) path."""
    n, nk = 1500, 700
    cu_q = torch.tensor([0, n, 2 * n], dtype=torch.int32).cuda()
    cu_k = torch.tensor([0, nk, 2 * nk], dtype=torch.int32).cuda()
    q = rand(2 * n, 16, 64, seed=1).float().cuda()
    k, v = (rand(2 * nk, 16, 64, seed=s).float().cuda() for s in (2, 3))
    fast = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out = varlen_attention(*fast, cu_q, cu_k, n, nk)
    expect = varlen_attention(*ref, cu_q, cu_k, n, nk, backend="reference")
    assert relative_error(out, expect) < TOLERANCES[dtype]
    g = rand(2 * n, 16, 64, seed=4).float().cuda()
    out.backward(g.to(dtype))
    expect.backward(g)
    for name, a, b in zip("qkv", fast, ref, strict=True):
        assert relative_error(a.grad, b.grad) < TOLERANCES[dtype], f"grad {name}"
