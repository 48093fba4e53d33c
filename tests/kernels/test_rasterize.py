"""Triangle rasterizer: the reference against a brute-force per-pixel oracle, the Triton path against the reference.

The oracle is written independently of `sam3d_kernels/rasterize/reference.py`: exact rational arithmetic on the
1/256-pixel snapped vertices, the top-left rule stated geometrically (a pixel centre on an edge belongs to the
triangle whose interior lies below a horizontal edge or to the right of a slanted one), depth in float64.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from sam3d_kernels.rasterize import interpolate, rasterize, rasterize_batch
from sam3d_kernels.rasterize.reference import check_face_count, coverage_reference, resolve, setup

SUB = 256


def _snap(v: float) -> int:
    return round(v * SUB)  # half to even, as torch.round


def _owned(u, v, w) -> bool:
    """Edge u-v of a triangle whose third vertex is w: True for a top edge (horizontal, interior below, y down)
    or a left edge (interior to the right of the line)."""
    if u[1] == v[1]:
        return w[1] > u[1]
    x_line = u[0] + Fraction((w[1] - u[1]) * (v[0] - u[0]), v[1] - u[1])
    return w[0] > x_line


def _cross(o, a, b) -> int:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def oracle(pos: torch.Tensor, faces: torch.Tensor, height: int, width: int):
    """-> face_id [H, W] (list of lists), bary {(i, j): (w0, w1, w2)} by looping over every pixel and triangle."""
    tris = []
    for f, idx in enumerate(faces.tolist()):
        corners = [pos[k].tolist() for k in idx]
        if not all(math.isfinite(c) for v in corners for c in v):
            continue
        q = [(_snap(x), _snap(y)) for x, y, _ in corners]
        area2 = _cross(q[0], q[1], q[2])
        if area2 != 0:
            tris.append((f, q, [z for _, _, z in corners], area2))
    face_id = [[-1] * width for _ in range(height)]
    bary = {}
    for i in range(height):
        for j in range(width):
            p = (j * SUB + SUB // 2, i * SUB + SUB // 2)
            best = None
            for f, q, z, area2 in tris:
                ws, inside = [], True
                for k in range(3):
                    u, v, w = q[(k + 1) % 3], q[(k + 2) % 3], q[k]
                    e = Fraction(_cross(u, v, p), area2)  # barycentric weight of vertex k
                    if e < 0 or (e == 0 and not _owned(u, v, w)):
                        inside = False
                        break
                    ws.append(e)
                if inside:
                    depth = sum(float(wk) * zk for wk, zk in zip(ws, z, strict=True))
                    if best is None or (depth, f) < best[:2]:
                        best = (depth, f, ws)
            if best is not None:
                face_id[i][j] = best[1]
                bary[i, j] = [float(w) for w in best[2]]
    return face_id, bary


def assert_matches_oracle(pos, faces, height, width):
    raster = rasterize(pos, faces, height, width, backend="reference")
    face_id, bary = oracle(pos, faces, height, width)
    assert raster.face_id.dtype == torch.int32 and raster.bary.dtype == torch.float32
    assert raster.face_id.tolist() == face_id
    for (i, j), w in bary.items():
        torch.testing.assert_close(raster.bary[i, j], torch.tensor(w), atol=1e-6, rtol=0)
    assert (raster.bary[raster.face_id < 0] == 0).all()
    return raster


def random_triangles(n: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n independent triangles with vertices spilling past the image borders and random depths."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(3 * n, 2, generator=g) * torch.tensor([width + 6.0, height + 6.0]) - 3
    z = torch.rand(3 * n, 1, generator=g) * 2 - 1
    return torch.cat([xy, z], 1), torch.arange(3 * n).reshape(n, 3)


def grid_mesh(nx: int, ny: int, cell: float, origin: float, jitter: float = 0.0, seed: int = 0):
    """A triangulated nx x ny quad grid (shared edges everywhere) with jittered interior vertices, depth 0."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = torch.meshgrid(torch.arange(nx + 1.0), torch.arange(ny + 1.0), indexing="xy")
    xy = torch.stack([xs, ys], -1).reshape(-1, 2)
    interior = ((xy > 0) & (xy < torch.tensor([nx, ny]))).all(1, keepdim=True)
    xy = origin + cell * (xy + interior * (torch.rand(xy.shape, generator=g) - 0.5) * jitter)
    idx = torch.arange((nx + 1) * (ny + 1)).reshape(ny + 1, nx + 1)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    flip = torch.rand(a.shape, generator=g) < 0.5  # both diagonal directions
    t1 = torch.where(flip[..., None], torch.stack([a, b, d], -1), torch.stack([a, b, c], -1))
    t2 = torch.where(flip[..., None], torch.stack([a, d, c], -1), torch.stack([b, d, c], -1))
    faces = torch.cat([t1.reshape(-1, 3), t2.reshape(-1, 3)])
    return torch.cat([xy, torch.zeros(xy.shape[0], 1)], 1), faces[torch.randperm(faces.shape[0], generator=g)]


@pytest.mark.parametrize("seed,size", [(0, (13, 17)), (1, (9, 7)), (2, (1, 11)), (3, (16, 1))])
def test_overlapping_random_triangles_match_oracle(seed, size):
    pos, faces = random_triangles(9, *size, seed=seed)
    raster = assert_matches_oracle(pos, faces, *size)
    assert raster.mask.any()


@pytest.mark.parametrize("jitter", [0.0, 0.8])
def test_shared_edges_cover_every_pixel_centre_once(jitter):
    # Vertices on pixel centres (jitter 0) put many pixel centres exactly on edges and vertices.
    pos, faces = grid_mesh(4, 3, cell=3.0, origin=1.5, jitter=jitter, seed=5)
    height, width = 12, 15
    assert_matches_oracle(pos, faces, height, width)
    count = sum(rasterize(pos, faces[f : f + 1], height, width).mask.int() for f in range(faces.shape[0]))
    # The mesh fills [1.5, 13.5) x [1.5, 10.5): top/left borders are owned, bottom/right are not.
    centres_x, centres_y = torch.arange(width) + 0.5, torch.arange(height) + 0.5
    expected = ((centres_y >= 1.5) & (centres_y < 10.5))[:, None] & ((centres_x >= 1.5) & (centres_x < 13.5))[None]
    assert torch.equal(count, expected.int())


def test_winding_does_not_matter_and_ties_go_to_the_lowest_face():
    pos, faces = random_triangles(6, 11, 10, seed=7)
    pos[:, 2] = 0.0  # every depth equal: the tie rule decides
    flipped = rasterize(pos, faces.flip(1), 11, 10)
    same = rasterize(pos, faces, 11, 10)
    assert torch.equal(flipped.face_id, same.face_id)
    torch.testing.assert_close(flipped.bary, same.bary.flip(-1), atol=1e-6, rtol=0)
    twice = rasterize(pos, torch.cat([faces, faces]), 11, 10)
    assert torch.equal(twice.face_id, same.face_id)  # the copies (higher indices) never win
    assert_matches_oracle(pos, faces, 11, 10)


def test_smaller_depth_wins_whatever_the_order():
    pos = torch.tensor([[0.0, 0, 1], [8, 0, 1], [0, 8, 1], [0, 0, 0.5], [8, 0, 0.5], [0, 8, 0.5]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert (rasterize(pos, faces, 8, 8).face_id[rasterize(pos, faces, 8, 8).mask] == 1).all()
    assert (rasterize(pos, faces.flip(0), 8, 8).face_id[rasterize(pos, faces, 8, 8).mask] == 0).all()


def test_degenerate_and_non_finite_triangles_are_skipped():
    pos, faces = random_triangles(5, 10, 12, seed=3)
    extra = torch.tensor(
        [[1.0, 1.0, 0.0], [9.0, 9.0, 0.0], [5.0, 5.0, 0.0], [float("nan"), 2.0, 0.0], [3.0, 8.0, float("inf")]]
    )
    pos = torch.cat([pos, extra])
    v = pos.shape[0] - 5
    bad = torch.tensor([[v, v + 1, v + 2], [0, 0, 1], [v, v + 3, v + 1], [v, v + 1, v + 4], [v + 2, v + 2, v + 2]])
    raster = rasterize(pos, torch.cat([bad, faces]), 10, 12)
    good = rasterize(pos, faces, 10, 12)
    assert torch.equal(raster.face_id, torch.where(good.mask, good.face_id + bad.shape[0], -1))
    assert_matches_oracle(pos, torch.cat([bad, faces]), 10, 12)


def test_empty_inputs():
    for pos, faces in [
        (torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)),
        (torch.rand(4, 3), torch.zeros(0, 3, dtype=torch.int32)),
    ]:
        raster = rasterize(pos, faces, 5, 3)
        assert raster.face_id.shape == (5, 3) and (raster.face_id == -1).all()
        assert raster.bary.shape == (5, 3, 3) and (raster.bary == 0).all()
        assert interpolate(torch.rand(pos.shape[0], 2), faces, raster).abs().sum() == 0
    off_screen = torch.tensor([[-5.0, -5, 0], [-1, -5, 0], [-5, -1, 0]])
    assert not rasterize(off_screen, torch.tensor([[0, 1, 2]]), 4, 4).mask.any()


def test_barycentrics_reproduce_positions_and_chunking_is_invisible():
    pos, faces = grid_mesh(3, 4, cell=5.3, origin=0.7, jitter=0.9, seed=2)
    pos[:, 2] = torch.rand(pos.shape[0], generator=torch.Generator().manual_seed(0))
    raster = rasterize(pos, faces, 23, 18)
    assert raster.mask.sum() > 200
    xy = interpolate(pos[:, :2].double(), faces, raster)[raster.mask]
    ii, jj = raster.mask.nonzero(as_tuple=True)
    centres = torch.stack([jj + 0.5, ii + 0.5], 1).double()
    torch.testing.assert_close(xy, centres, atol=2.0 / SUB, rtol=0)  # only the 1/256 snap separates them
    torch.testing.assert_close(raster.bary[raster.mask].sum(-1), torch.ones(len(ii)), atol=1e-6, rtol=0)
    st = setup(pos, faces, 23, 18)
    tiny = resolve(coverage_reference(st, 23, 18, chunk=5), st, 23, 18)
    assert torch.equal(tiny.face_id, raster.face_id) and torch.equal(tiny.bary, raster.bary)


def test_bad_inputs_name_the_problem():
    pos, faces = random_triangles(2, 4, 4, seed=0)
    with pytest.raises(ValueError, match="pos must be a float"):
        rasterize(pos[:, :2], faces, 4, 4)
    with pytest.raises(ValueError, match="faces must be an integer"):
        rasterize(pos, faces.float(), 4, 4)
    with pytest.raises(ValueError, match="faces index vertices"):
        rasterize(pos, faces + 1, 4, 4)
    with pytest.raises(ValueError, match="height must be"):
        rasterize(pos, faces, 0, 4)
    with pytest.raises(ValueError, match="Clip or cull"):
        rasterize(pos * 1e7, faces, 4, 4)
    with pytest.raises(ValueError, match="backend must be"):
        rasterize(pos, faces, 4, 4, backend="cuda")
    with pytest.raises(ValueError, match="needs CUDA"):
        rasterize(pos, faces, 4, 4, backend="triton")
    with pytest.raises(ValueError, match="attr must be"):
        interpolate(torch.ones(6, dtype=torch.long), faces, rasterize(pos, faces, 4, 4))


def sphere_screen(rings: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A latitude-longitude sphere in perspective: front and back overlap, so the z-test is exercised."""
    segs = 2 * rings
    theta = torch.linspace(0, math.pi, rings + 1)[:, None]
    phi = torch.linspace(0, 2 * math.pi, segs + 1)[None, :]
    shape = (rings + 1, segs + 1)
    xyz = torch.stack([theta.sin() * phi.cos(), theta.cos().expand(shape), theta.sin() * phi.sin()], -1)
    xyz = xyz.reshape(-1, 3) + torch.tensor([0.1, -0.2, 3.0])
    f = 0.5 * size / math.tan(math.radians(20))
    pos = torch.stack([f * xyz[:, 0] / xyz[:, 2] + size / 2, f * xyz[:, 1] / xyz[:, 2] + size / 2, xyz[:, 2]], 1)
    idx = torch.arange((rings + 1) * (segs + 1)).reshape(rings + 1, segs + 1)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    return pos, torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3), torch.stack([b, d, c], -1).reshape(-1, 3)])


def test_closed_sphere_shows_its_front_half():
    pos, faces = sphere_screen(8, 40)
    raster = rasterize(pos, faces, 40, 40)
    depth = interpolate(pos[:, 2:], faces, raster)[..., 0]
    seen = raster.mask
    assert seen.sum() > 300
    assert (depth[seen] < 3.0 + 1e-6).all()  # only the near hemisphere (z < 3 at the centre plane) is visible


def random_batch(views: int, height: int, width: int, seed: int):
    """Faces of `views` views interleaved in one list: random triangles reaching far past every border (one is
    huge), some sharing one depth (the tie rule), the last view left empty; vertices in their view's pixels."""
    g = torch.Generator().manual_seed(seed)
    pos, faces = random_triangles(12 * views, height, width, seed=seed)
    pos[:, :2] = pos[:, :2] * 3 - torch.tensor([width, height])  # span [-W, 2W] x [-H, 2H]
    pos[: 3 * views, 2] = 0.25  # equal depths: ties go to the smaller face index within a view
    face_view = torch.randint(0, views - 1, (faces.shape[0],), generator=g)
    huge = torch.tensor([[-900.0, -700, 0.9], [3000, -10, 0.9], [-20, 2500, 0.9]])
    pos = torch.cat([pos, huge])
    v = pos.shape[0] - 3
    faces = torch.cat([faces, torch.tensor([[v, v + 1, v + 2]])])  # covers its whole view, from behind
    face_view = torch.cat([face_view, torch.tensor([views - 2])])
    return pos, faces, face_view


def assert_batch_is_views_one_at_a_time(pos, faces, face_view, views, height, width, backend="reference"):
    batch = rasterize_batch(pos, faces, face_view, views, height, width, backend=backend)
    assert batch.face_id.shape == (views, height, width) and batch.bary.shape == (views, height, width, 3)
    assert batch.face_id.dtype == torch.int32 and batch.bary.dtype == torch.float32
    for b in range(views):
        sel = (face_view == b).nonzero().squeeze(1)
        one = rasterize(pos, faces[sel], height, width, backend="reference")
        lut = torch.cat([sel, sel.new_tensor([-1])])  # face in the view -> face in the batch; -1 (empty) stays -1
        want = lut[one.face_id.long()].int()
        assert torch.equal(batch.face_id[b].cpu(), want.cpu()), f"view {b}"
        assert torch.equal(batch.bary[b].cpu(), one.bary.cpu()), f"view {b}"
    return batch


@pytest.mark.parametrize("seed,views,size", [(0, 5, (13, 17)), (1, 3, (1, 9)), (2, 7, (11, 1)), (3, 2, (20, 20))])
def test_batch_is_bit_for_bit_each_view_alone(seed, views, size):
    pos, faces, face_view = random_batch(views, *size, seed=seed)
    batch = assert_batch_is_views_one_at_a_time(pos, faces, face_view, views, *size)
    assert batch.mask[:-1].any() and not batch.mask[-1].any()  # the last view has no faces
    assert batch.mask[views - 2].all()  # the huge triangle fills its view, and only its view (no bleeding)
    assert_matches_oracle(pos, faces[face_view == 0], *size)


def test_batch_of_one_and_empty_batches():
    pos, faces = grid_mesh(4, 3, cell=3.0, origin=-2.5, jitter=0.7, seed=4)
    pos[:, 2] = torch.rand(pos.shape[0], generator=torch.Generator().manual_seed(1))
    one = rasterize(pos, faces, 9, 11)
    batch = rasterize_batch(pos, faces, torch.zeros(faces.shape[0], dtype=torch.int32), 1, 9, 11)
    assert torch.equal(batch.face_id[0], one.face_id) and torch.equal(batch.bary[0], one.bary)
    # the same mesh in three views: three equal images; interpolate works on the batch as on one view
    three = rasterize_batch(pos, faces.repeat(3, 1), torch.arange(3).repeat_interleave(faces.shape[0]), 3, 9, 11)
    for b in range(3):
        assert torch.equal(three.face_id[b], torch.where(one.mask, one.face_id + b * faces.shape[0], -1))
    z = interpolate(pos[:, 2:], faces.repeat(3, 1), three)
    assert z.shape == (3, 9, 11, 1) and torch.equal(z[2], interpolate(pos[:, 2:], faces, one))
    empty = rasterize_batch(pos, faces[:0], torch.zeros(0, dtype=torch.long), 4, 5, 6)
    assert empty.face_id.shape == (4, 5, 6) and (empty.face_id == -1).all() and (empty.bary == 0).all()


def test_batch_bad_inputs_name_the_problem():
    pos, faces, face_view = random_batch(3, 6, 7, seed=0)
    with pytest.raises(ValueError, match="views must be an int >= 1"):
        rasterize_batch(pos, faces, face_view, 0, 6, 7)
    with pytest.raises(ValueError, match=r"face_view names views 0\.\.1 but views is 1"):
        rasterize_batch(pos, faces, face_view, 1, 6, 7)
    with pytest.raises(ValueError, match="face_view names views -1"):
        rasterize_batch(pos, faces, face_view - 1, 3, 6, 7)
    with pytest.raises(ValueError, match="face_view must be an integer \\[F\\] tensor"):
        rasterize_batch(pos, faces, face_view.float(), 3, 6, 7)
    with pytest.raises(ValueError, match="face_view must be an integer \\[F\\] tensor"):
        rasterize_batch(pos, faces, face_view[1:], 3, 6, 7)
    with pytest.raises(ValueError, match="faces must be an integer"):
        rasterize_batch(pos, faces.float(), face_view, 3, 6, 7)
    # the key keeps a face in 32 bits: the limit counts the faces of all views together
    with pytest.raises(ValueError, match="got 2147483648 faces over 8 views: split the mesh or render fewer views"):
        check_face_count(2**31, 8)
    check_face_count(2**31 - 1, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("seed,views,size", [(5, 9, (61, 47)), (6, 2, (513, 515)), (7, 33, (32, 32))])
def test_triton_batch_matches_reference_batch_and_single_views(seed, views, size):
    pytest.importorskip("triton")
    pos, faces, face_view = random_batch(views, *size, seed=seed)
    ref = rasterize_batch(pos, faces, face_view, views, *size, backend="reference")
    cuda = [pos.cuda(), faces.cuda(), face_view.cuda()]
    fast = assert_batch_is_views_one_at_a_time(*cuda, views, *size, backend="triton")
    auto = rasterize_batch(*cuda, views, *size)
    for out in (fast, auto):
        assert torch.equal(out.face_id.cpu(), ref.face_id) and torch.equal(out.bary.cpu(), ref.bary)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["random", "grid", "sphere", "empty", "large"])
def test_triton_matches_reference(case):
    pytest.importorskip("triton")
    if case == "random":
        pos, faces, size = *random_triangles(300, 61, 47, seed=11), (61, 47)
    elif case == "grid":
        pos, faces = grid_mesh(40, 30, cell=2.0, origin=0.5, jitter=0.0, seed=1)
        size = (64, 83)
    elif case == "sphere":
        pos, faces = sphere_screen(64, 257)
        size = (257, 257)
    elif case == "empty":
        pos, faces, size = torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), (7, 9)
    else:  # triangles far larger than one block of the kernel, partly off-screen
        pos = torch.tensor([[-50.0, -20, 0.3], [700, 10, 0.9], [30, 650, 0.1], [600, 600, 0.5], [5, 5, 0.7]])
        faces, size = torch.tensor([[0, 1, 2], [1, 3, 2], [4, 3, 0]]), (513, 515)
    ref = rasterize(pos, faces, *size, backend="reference")
    cuda = [pos.cuda(), faces.cuda()]
    fast = rasterize(*cuda, *size, backend="triton")
    auto = rasterize(*cuda, *size)
    ref_cuda = rasterize(*cuda, *size, backend="reference")
    for out in (fast, auto, ref_cuda):
        assert torch.equal(out.face_id.cpu(), ref.face_id)
        assert torch.equal(out.bary.cpu(), ref.bary)
