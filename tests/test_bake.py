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

from kernels.rasterize import rasterize  # noqa: E402
from sam3d_core.export.bake import (  # noqa: E402
    GaussianSource,
    VertexColorSource,
    bake_texture,
    closest_point_barycentric,
    sample_texture,
)
from sam3d_core.gaussians import SH_C0, Gaussians, inverse_softplus, logit  # noqa: E402

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
    texture = bake_texture(vertices, faces, uvs, source, size=SIZE, padding=PADDING)
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
    tex = bake_texture(case.vertices, case.faces, case.uvs, _smooth_source(case), size=size, padding=PADDING)
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
    ref = bake_texture(case.vertices, case.faces, case.uvs, _smooth_source(case), size=64, padding=2)
    np.testing.assert_array_equal(tex, ref)
    _, uv = surface_samples(case, 100)
    np.testing.assert_allclose(sample_texture(tex, uv), sample_texture(tex, np.stack([uv[:, 0], 1 - uv[:, 1]], 1),
                                                                        convention="gltf"))
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
    tex = bake_texture(case.vertices, case.faces, case.uvs, GaussianSource(gaussians), size=128, padding=2)
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
