"""Texture baking: a dense icosphere with a known colour function of position, decimated and unwrapped here, baked,
then read back through the UVs and compared with the function."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

trimesh = pytest.importorskip("trimesh")
xatlas = pytest.importorskip("xatlas")
fast_simplification = pytest.importorskip("fast_simplification")
pytest.importorskip("scipy")
from scipy import ndimage  # noqa: E402

from sam3d_core.export.bake import (  # noqa: E402
    _NEIGHBOURS,
    GaussianSource,
    VertexColorSource,
    _closest_point_torch,
    _grow_charts,
    _TriangleGrid,
    bake_texture,
    closest_point_barycentric,
    sample_texture,
)
from sam3d_core.geometry.gaussians import SH_C0, Gaussians, inverse_softplus, logit  # noqa: E402
from sam3d_kernels.rasterize import rasterize  # noqa: E402

SIZE, PADDING, RADIUS = 256, 4, 0.4
_M = np.array([[0.6, -0.3, 0.2], [0.2, 0.5, -0.4], [-0.3, 0.2, 0.6]])
BAND_Z, BAND_HALF = 0.1, 0.06  # a sharp red band around the sphere


def colour_fn(p: np.ndarray, band: bool = True) -> np.ndarray:
    """Smooth gradients (linear in position, within [0.27, 0.73]) plus, optionally, a sharp red band."""
    c = 0.5 + 0.8 * p @ _M
    if band:
        c = np.where((np.abs(p[:, 2] - BAND_Z) < BAND_HALF)[:, None], np.array([0.9, 0.1, 0.1]), c)
    return c


def away_from_band_edges(p: np.ndarray, margin: float = 0.03) -> np.ndarray:
    return np.abs(np.abs(p[:, 2] - BAND_Z) - BAND_HALF) > margin


@dataclass
class Case:
    dense_v: np.ndarray  # [V, 3] the dense sphere
    dense_f: np.ndarray
    vertices: np.ndarray  # [V', 3] the decimated, unwrapped mesh (vertices split along seams)
    faces: np.ndarray
    uvs: np.ndarray  # [V', 2] trimesh convention
    texture: np.ndarray  # colour_fn baked at SIZE with PADDING


@pytest.fixture(scope="module")
def case() -> Case:
    dense = trimesh.creation.icosphere(subdivisions=5, radius=RADIUS)
    low_v, low_f = fast_simplification.simplify(
        dense.vertices.astype(np.float32), dense.faces.astype(np.int32), target_reduction=0.95
    )
    atlas = xatlas.Atlas()
    atlas.add_mesh(low_v, low_f)
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding = SIZE, 2
    atlas.generate(pack_options=pack)
    vmapping, faces, uvs = atlas[0]
    vertices = low_v[vmapping].astype(np.float64)
    source = VertexColorSource(dense.vertices, dense.faces, colour_fn(dense.vertices))
    texture = bake_texture(vertices, faces, uvs, source, size=SIZE, padding=PADDING, convention="trimesh")
    return Case(dense.vertices, dense.faces, vertices, faces.astype(np.int64), uvs.astype(np.float64), texture)


def surface_samples(case: Case, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Area-uniform random points on the low-poly surface -> (points [n, 3], their uvs [n, 2])."""
    rng = np.random.default_rng(seed)
    tri = case.vertices[case.faces]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    f = rng.choice(len(case.faces), n, p=area / area.sum())
    w = rng.dirichlet([1, 1, 1], n)
    return np.einsum("nk,nkc->nc", w, tri[f]), np.einsum("nk,nkc->nc", w, case.uvs[case.faces[f]])


def test_bake_reproduces_the_colour_function(case):
    points, uv = surface_samples(case, 20000)
    err = np.abs(sample_texture(case.texture, uv) - colour_fn(points)) * 255
    clean = away_from_band_edges(points)
    in_band = clean & (np.abs(points[:, 2] - BAND_Z) < BAND_HALF)
    assert err[clean].mean() < 3 and in_band.sum() > 1000
    assert err[in_band].mean() < 3  # the sharp band keeps its colour, not blended with its surroundings
    assert np.percentile(err[clean], 99) < 6


def test_colour_statistics_match_the_source(case):
    # The "not washed out" check: a gamma mistake or blending with a background would shift the mean and shrink
    # the spread by tens of levels.
    points, uv = surface_samples(case, 20000, seed=1)
    baked, truth = sample_texture(case.texture, uv) * 255, colour_fn(points) * 255
    np.testing.assert_allclose(baked.mean(0), truth.mean(0), atol=2)
    np.testing.assert_allclose(baked.std(0), truth.std(0), atol=3)


def test_chart_borders_read_the_surface_not_the_background(case):
    edges = np.sort(case.faces[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2), axis=1)
    unique, count = np.unique(edges, axis=0, return_counts=True)
    seams = unique[count == 1]  # the sphere is closed, so every open edge of the unwrapped mesh is a chart border
    assert len(seams) > 50
    t = np.random.default_rng(2).random((len(seams), 1))
    points = case.vertices[seams[:, 0]] * (1 - t) + case.vertices[seams[:, 1]] * t
    uv = case.uvs[seams[:, 0]] * (1 - t) + case.uvs[seams[:, 1]] * t
    clean = away_from_band_edges(points)
    assert clean.sum() > 50
    err = np.abs(sample_texture(case.texture, uv) - colour_fn(points)) * 255
    assert err[clean].mean() < 2 and err[clean].max() < 6  # taps outside the chart read gutter texels of its colour


def test_gutter_texels_are_filled_from_their_chart(case):
    size = 128  # band-free colours (a gutter texel at the band's edge may legitimately differ from all neighbours)
    tex = bake_texture(
        case.vertices, case.faces, case.uvs, _smooth_source(case), size=size, padding=PADDING, convention="trimesh"
    )
    xy = np.stack([case.uvs[:, 0], 1 - case.uvs[:, 1]], 1) * size
    pos = torch.from_numpy(np.concatenate([xy, np.zeros((len(xy), 1))], 1)).float()
    covered = rasterize(pos, torch.from_numpy(case.faces), size, size).mask.numpy()
    dist = ndimage.distance_transform_cdt(~covered, metric="chessboard")
    ring = (dist >= 1) & (dist <= PADDING)
    assert ring.sum() > 1000 and (~covered & ~ring).any()
    # A gutter texel continues one of the charts within reach (two charts may share a gutter): its colour is
    # close to some covered texel within PADDING texels.
    tex = tex.astype(np.float64)
    padded = np.pad(np.where(covered[..., None], tex, np.inf), ((PADDING, PADDING), (PADDING, PADDING), (0, 0)))
    best = np.full(ring.shape, np.inf)
    for dr in range(-PADDING, PADDING + 1):
        for dc in range(-PADDING, PADDING + 1):
            other = padded[PADDING + dr : PADDING + dr + size, PADDING + dc : PADDING + dc + size]
            best = np.minimum(best, np.abs(tex - other).max(-1))
    assert np.median(best[ring]) <= 1 and best[ring].max() <= 8
    assert tex.min() >= 60  # no black texel anywhere: the band-free colours stay within [70, 186]


def test_gltf_convention_is_the_trimesh_one_flipped(case):
    flipped = np.stack([case.uvs[:, 0], 1 - case.uvs[:, 1]], 1)
    tex = bake_texture(case.vertices, case.faces, flipped, _smooth_source(case), size=64, padding=2, convention="gltf")
    ref = bake_texture(
        case.vertices, case.faces, case.uvs, _smooth_source(case), size=64, padding=2, convention="trimesh"
    )
    np.testing.assert_array_equal(tex, ref)
    _, uv = surface_samples(case, 100)
    np.testing.assert_allclose(
        sample_texture(tex, uv), sample_texture(tex, np.stack([uv[:, 0], 1 - uv[:, 1]], 1), convention="gltf")
    )
    # trimesh reads TextureVisuals.uv with v = 0 at the bottom row, as "trimesh" here.
    image = np.zeros((8, 8, 3), np.uint8)
    image[:4] = (255, 0, 0)  # top half red
    top = np.array([[0.5, 0.9]])
    assert sample_texture(image, top)[0, 0] == 1.0
    assert tuple(trimesh.visual.uv_to_color(top, _pil(image))[0, :3]) == (255, 0, 0)


def _smooth_source(case: Case) -> VertexColorSource:
    return VertexColorSource(case.dense_v, case.dense_f, colour_fn(case.dense_v, band=False))


def _pil(image):
    from PIL import Image

    return Image.fromarray(image)


def test_gaussian_source(case):
    rng = np.random.default_rng(3)
    xyz = case.dense_v + rng.normal(scale=0.002, size=case.dense_v.shape)
    colors = colour_fn(case.dense_v)
    n = len(xyz)
    gaussians = Gaussians(
        _xyz=torch.from_numpy(xyz + 0.5).float(),
        _features_dc=torch.from_numpy((colors - 0.5) / SH_C0).float()[:, None],
        _scaling=(inverse_softplus(torch.tensor(0.012)) - inverse_softplus(torch.tensor(0.004))).expand(n, 3).clone(),
        _rotation=torch.from_numpy(rng.normal(scale=0.3, size=(n, 4))).float(),
        _opacity=(logit(torch.tensor(0.8)) - logit(torch.tensor(0.1))).expand(n, 1).clone(),
    )
    tex = bake_texture(
        case.vertices, case.faces, case.uvs, GaussianSource(gaussians), size=128, padding=2, convention="trimesh"
    )
    points, uv = surface_samples(case, 5000, seed=4)
    err = np.abs(sample_texture(tex, uv) - colour_fn(points)) * 255
    assert err[away_from_band_edges(points)].mean() < 4


def test_gaussian_source_weights_by_oriented_shape_and_opacity():
    # A red Gaussian stretched along (cos 45, sin 45, 0) (a 45 degree turn about z of its x axis) and a small
    # blue one: a point along the stretched axis is red, the mirrored point (along (cos 45, -sin 45, 0)) is blue.
    half = np.radians(22.5)
    rotation = torch.tensor([[np.cos(half) - 1, 0, 0, np.sin(half)], [0, 0, 0, 0]], dtype=torch.float32)
    scales = torch.tensor([[0.1, 0.005, 0.005], [0.02, 0.02, 0.02]])
    colors = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    opacity = torch.tensor([[0.9], [0.9]])
    gaussians = Gaussians(
        _xyz=torch.tensor([[0.5, 0.5, 0.5], [0.52, 0.5, 0.5]]),
        _features_dc=((colors - 0.5) / SH_C0)[:, None],
        _scaling=inverse_softplus(scales) - inverse_softplus(torch.tensor(0.004)),
        _rotation=rotation,
        _opacity=logit(opacity) - logit(torch.tensor(0.1)),
        min_kernel_size=0.0,
    )
    d = 0.08 / np.sqrt(2)
    out = GaussianSource(gaussians).colors(np.array([[d, d, 0.0], [d, -d, 0.0]]))
    assert out[0, 0] > 0.9 and out[1, 2] > 0.9
    gaussians._opacity = logit(torch.tensor([[1e-6], [0.9]])) - logit(torch.tensor(0.1))  # red made transparent
    assert GaussianSource(gaussians).colors(np.array([[d, d, 0.0]]))[0, 2] > 0.9


def test_closest_point_is_optimal_in_2d_and_3d():
    rng = np.random.default_rng(5)
    for dim in (2, 3):
        a, b, c = rng.normal(size=(3, 500, dim))
        c[:20] = a[:20] + 0.5 * (b[:20] - a[:20])  # degenerate (collinear) triangles too
        p = rng.normal(size=(500, dim)) * 2
        bary, d2 = closest_point_barycentric(p, a, b, c)
        assert (bary >= -1e-12).all() and np.allclose(bary.sum(-1), 1)
        q = bary[:, :1] * a + bary[:, 1:2] * b + bary[:, 2:] * c
        np.testing.assert_allclose(d2, ((p - q) ** 2).sum(-1))
        for v in (a, b, c):  # q is optimal on a convex set: no vertex lies ahead of q along p - q
            assert (((p - q) * (v - q)).sum(-1) <= 1e-9).all()


def test_torch_closest_point_matches_numpy():
    rng = np.random.default_rng(6)
    for dim in (2, 3):
        a, b, c = rng.normal(size=(3, 500, dim))
        c[:20] = a[:20] + 0.5 * (b[:20] - a[:20])  # degenerate (collinear) triangles
        b[20:30] = a[20:30]  # and with a repeated corner
        p = rng.normal(size=(500, dim)) * 2
        bary, d2 = closest_point_barycentric(p, a, b, c)
        bary_t, d2_t = _closest_point_torch(*(torch.from_numpy(x) for x in (p, a, b, c)))
        np.testing.assert_allclose(bary_t.numpy(), bary, atol=1e-9)
        np.testing.assert_allclose(d2_t.numpy(), d2, rtol=1e-9, atol=1e-12)


def _brute_nearest(points: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Squared distance from each point [N, 3] to the nearest of the triangles [F, 3, 3]."""
    return np.array([closest_point_barycentric(p, tri[:, 0], tri[:, 1], tri[:, 2])[1].min() for p in points])


@pytest.mark.parametrize("cell", [None, 0.02])
def test_grid_finds_the_nearest_triangle(cell):
    # A soup of small, large and sliver triangles; queries near them, in empty space and far outside their box.
    # cell=0.02 makes the finest grid fine enough that many queries need the coarser ones.
    rng = np.random.default_rng(7)
    centre = rng.uniform(-0.5, 0.5, (400, 1, 3))
    size = np.where(rng.random((400, 1, 1)) < 0.9, 0.01, 0.3)
    tri = centre + rng.normal(size=(400, 3, 3)) * size
    tri[:10, 2] = tri[:10, 0] + 40 * (tri[:10, 1] - tri[:10, 0]) + 0.01 * rng.normal(size=(10, 3))  # slivers
    points = np.concatenate(
        [
            tri[rng.integers(0, 400, 300), 0] + rng.normal(scale=0.01, size=(300, 3)),
            rng.uniform(-1, 1, (300, 3)),
            rng.normal(size=(20, 3)) * 5,
        ]
    )
    grid = _TriangleGrid(torch.from_numpy(tri).float(), cell=cell)
    face, bary = grid.nearest(torch.from_numpy(points).float(), max_pairs=20000)  # small: many chunks
    found = np.einsum("nk,nkc->nc", bary.double().numpy(), tri[face.numpy()])
    d2 = ((found - points) ** 2).sum(1)
    expected = _brute_nearest(points, tri)
    np.testing.assert_allclose(d2, expected, rtol=1e-4, atol=1e-9)  # float32 grid, float64 reference
    assert np.allclose(bary.sum(1).numpy(), 1, atol=1e-5) and (bary >= -1e-6).all()


def test_torch_source_matches_the_scipy_reference(case):
    points, _ = surface_samples(case, 5000, seed=8)
    points += np.random.default_rng(9).normal(scale=0.004, size=points.shape)  # off the surface both ways
    colours = colour_fn(case.dense_v)
    reference = VertexColorSource(case.dense_v, case.dense_f, colours).colors(points)
    fast = VertexColorSource(case.dense_v, case.dense_f, colours, device="cpu")
    diff = np.abs(fast.colors(points) - reference) * 255
    # the same nearest point, except where the reference's 8 nearest centroids miss the nearest triangle
    assert np.median(diff) < 1e-3 and (diff.max(1) > 0.5).mean() < 0.002
    # and the fast path is exact: never farther than the true nearest point
    face, bary = fast._grid.nearest(torch.from_numpy(points[:100]).float(), 1 << 16)
    tri = case.dense_v[case.dense_f]
    d2 = ((np.einsum("nk,nkc->nc", bary.double().numpy(), tri[face.numpy()]) - points[:100]) ** 2).sum(1)
    np.testing.assert_allclose(d2, _brute_nearest(points[:100], tri), rtol=1e-3, atol=1e-10)


def test_bake_with_the_torch_path_matches_the_reference_bake(case):
    fast = VertexColorSource(case.dense_v, case.dense_f, colour_fn(case.dense_v), device="cpu")
    tex = bake_texture(
        case.vertices, case.faces, case.uvs, fast, size=SIZE, padding=PADDING, device="cpu", convention="trimesh"
    )
    diff = np.abs(tex.astype(int) - case.texture.astype(int)).max(-1)
    assert (diff <= 1).mean() > 0.999  # float32 vs float64 rounding; the sharp band's edge may differ by more
    points, uv = surface_samples(case, 20000)
    err = np.abs(sample_texture(tex, uv) - colour_fn(points)) * 255
    assert err[away_from_band_edges(points)].mean() < 3


def test_gutter_picks_the_nearest_neighbouring_face_first_on_ties():
    # The rule of step 3, written plainly: each empty texel next to a chart takes, among its 8 neighbours' faces,
    # the one whose UV triangle is nearest its centre, the earliest neighbour on equal distances.
    # Charts as in a UV atlas: one small triangle per 6 x 6 block (no overlaps, so no texel centre lies in two),
    # plus a duplicate of face 4 (an exact tie, same arithmetic); the raster marks random texels with faces of
    # their own and neighbouring blocks.
    rng = np.random.default_rng(10)
    size, block = 24, 6
    corner = np.stack(np.meshgrid(np.arange(0, size, block), np.arange(0, size, block)), -1).reshape(-1, 1, 2)
    uv_tri = corner + 0.5 + rng.uniform(0, block - 1, (len(corner), 3, 2))
    uv_tri = torch.from_numpy(np.concatenate([uv_tri, uv_tri[4:5]])).float()
    near_block = (np.arange(size)[:, None] // block + rng.integers(-1, 2, (size, size))).clip(0, size // block - 1)
    near_block = near_block * (size // block) + (np.arange(size)[None, :] // block)
    face = np.where(rng.random((size, size)) < 0.3, near_block, -1)
    face[face == 4] = np.where(rng.random((face == 4).sum()) < 0.5, 4, len(corner))
    expected_face, expected_bary = face.copy(), np.zeros((size, size, 3), np.float32)
    padded = np.pad(face, 1, constant_values=-1)
    for r, c in zip(*np.nonzero(face < 0), strict=True):
        cand = [padded[r + 1 + dr, c + 1 + dc] for dr, dc in _NEIGHBOURS]
        if max(cand) < 0:
            continue
        centre = torch.tensor([c + 0.5, r + 0.5])
        near = [_closest_point_torch(centre, *uv_tri[k]) if k >= 0 else (None, torch.tensor(np.inf)) for k in cand]
        best = int(np.argmin([float(d2) for _, d2 in near]))  # the first of equal minima
        expected_face[r, c], expected_bary[r, c] = cand[best], near[best][0].numpy()
    got, got_bary = torch.from_numpy(face), torch.zeros((size, size, 3))
    _grow_charts(got, got_bary, uv_tri, 1)
    np.testing.assert_array_equal(got.numpy(), expected_face)
    np.testing.assert_allclose(got_bary.numpy(), expected_bary, atol=1e-5)


@pytest.mark.gpu
def test_cuda_bake_matches_the_cpu_bake(case):
    colours = colour_fn(case.dense_v)
    points, _ = surface_samples(case, 20000, seed=11)
    cpu = VertexColorSource(case.dense_v, case.dense_f, colours, device="cpu")
    gpu = VertexColorSource(case.dense_v, case.dense_f, colours, device="cuda")
    diff = np.abs(gpu.colors(points) - cpu.colors(points)) * 255
    assert np.median(diff) < 1e-3 and (diff.max(1) > 0.5).mean() < 0.001  # ties may resolve differently
    tex_gpu = bake_texture(case.vertices, case.faces, case.uvs, gpu, size=SIZE, padding=PADDING, device="cuda")
    tex_cpu = bake_texture(case.vertices, case.faces, case.uvs, cpu, size=SIZE, padding=PADDING, device="cpu")
    assert (np.abs(tex_gpu.astype(int) - tex_cpu.astype(int)).max(-1) <= 1).mean() > 0.999


def test_bad_inputs_raise_clear_errors(case):
    source = _smooth_source(case)
    v, f, uv = case.vertices, case.faces, case.uvs
    with pytest.raises(ValueError, match="has no faces"):
        bake_texture(v, f[:0], uv, source)
    with pytest.raises(ValueError, match="uvs must be"):
        bake_texture(v, f, uv[:-1], source)
    with pytest.raises(ValueError, match="uvs must lie in"):
        bake_texture(v, f, uv * 2, source)
    with pytest.raises(ValueError, match="no texel centre"):
        bake_texture(v, f, np.full_like(uv, 0.3), source, size=16)
    with pytest.raises(ValueError, match="convention must be"):
        bake_texture(v, f, uv, source, size=16, convention="opengl")
    with pytest.raises(ValueError, match="faces index vertices"):
        bake_texture(v, f + len(v), uv, source)
    with pytest.raises(ValueError, match="source mesh has no faces"):
        VertexColorSource(case.dense_v, case.dense_f[:0], colour_fn(case.dense_v))
    with pytest.raises(ValueError, match="vertex_attrs"):
        VertexColorSource(case.dense_v, case.dense_f, np.ones((len(case.dense_v), 6)))
    with pytest.raises(ValueError, match="divide 0..255"):
        VertexColorSource(case.dense_v, case.dense_f, colour_fn(case.dense_v) * 255)
