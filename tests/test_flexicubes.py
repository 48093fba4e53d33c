"""FlexiCubes mesh extraction: official parity on the stage-2 fixture, synthetic SDFs, edge cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sam3d_core.geometry.flexicubes import MeshResult, _case_ids, _member_sum, _tables, extract_mesh

FIXTURE = Path(__file__).parent / "fixtures" / "stage2_small"
CORNERS = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)])


def _dense_input(corner_sdf, res: int, lo: int = 0, hi: int | None = None):
    """Every voxel of [lo, hi)^3 decoded, with sdf given per lattice vertex by corner_sdf(ijk [..., 3]).
    The sdf bias that extract_mesh adds is pre-compensated; deform, weights and colours are zero."""
    hi = res if hi is None else hi
    axis = torch.arange(lo, hi)
    xyz = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    feats = torch.zeros(xyz.shape[0], 101)
    feats[:, :8] = corner_sdf(xyz[:, None] + CORNERS) + 1.0 / res
    coords = torch.cat([torch.zeros(xyz.shape[0], 1, dtype=torch.long), xyz], 1)
    return coords, feats


def _edge_use(faces: torch.Tensor) -> torch.Tensor:
    """How many faces use each undirected mesh edge."""
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values
    return torch.unique(edges, dim=0, return_counts=True)[1]


def _signed_volume(mesh: MeshResult) -> float:
    v = mesh.vertices.double()[mesh.faces]  # [F, 3, 3]
    return torch.linalg.det(v).sum().item() / 6


def test_official_parity():
    data = load_file(FIXTURE / "data.safetensors")
    mesh = extract_mesh(data["mesh/fine_coords"].long(), data["mesh/fine_feats"], resolution=256)
    assert mesh.vertices.dtype == torch.float32 and mesh.faces.dtype == torch.int64
    assert mesh.vertices.shape == (5320, 3) and mesh.faces.shape == (10640, 3)
    # same vertex order and face order as the official extraction
    torch.testing.assert_close(mesh.vertices, data["mesh/vertices"], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(mesh.vertex_attrs, data["mesh/vertex_colors"], atol=1e-6, rtol=1e-4)
    assert torch.equal(mesh.faces, data["mesh/faces"].long())
    assert torch.equal(mesh.colors, mesh.vertex_attrs[:, :3])


def test_member_sum_is_index_add_in_order():
    """The dual vertices' sums equal the CPU's sequential index_add_ bit for bit (rows of 0 to 7 members, padding
    anywhere in a row, values of mixed magnitude so that the order of the adds shows)."""
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(500, 7, generator=g) < 0.6
    valid[:3] = False  # rows without members sum to 0
    values = torch.randn(int(valid.sum()), 3, generator=g)
    values *= 10 ** torch.randint(-6, 7, (values.shape[0], 1), generator=g).float()
    rows = torch.arange(500)[:, None].expand(-1, 7)[valid]
    expected = torch.zeros(500, 3).index_add_(0, rows, values)
    assert torch.equal(_member_sum(values, valid), expected)
    doubles = torch.zeros(500, 3, dtype=torch.float64).index_add_(0, rows, values.double())
    assert torch.equal(_member_sum(values.double(), valid), doubles)


def test_input_not_modified():
    data = load_file(FIXTURE / "data.safetensors")
    feats = data["mesh/fine_feats"][:512].clone()
    extract_mesh(data["mesh/fine_coords"][:512].long(), feats)
    assert torch.equal(feats, data["mesh/fine_feats"][:512])


def test_sphere_closed_and_on_surface():
    res, radius = 24, 0.3

    def sphere(ijk):
        return (ijk.float() / res - 0.5).norm(dim=-1) - radius

    mesh = extract_mesh(*_dense_input(sphere, res), resolution=res)
    assert mesh.faces.shape[0] > 500
    r = mesh.vertices.norm(dim=-1)
    assert (r - radius).abs().max() < 0.5 / res
    assert (_edge_use(mesh.faces) == 2).all()  # closed, every edge shared by 2 faces
    n_edges = mesh.faces.shape[0] * 3 // 2
    assert mesh.vertices.shape[0] - n_edges + mesh.faces.shape[0] == 2  # genus 0
    # faces wind towards positive sdf: outward normals, positive volume close to the ball's
    assert _signed_volume(mesh) == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.05)
    # zero colour logits -> 0.5 everywhere
    torch.testing.assert_close(mesh.vertex_attrs, torch.full_like(mesh.vertex_attrs, 0.5))


def test_random_sdf_is_watertight():
    # a random field inside a positive shell exercises the ambiguous cases and their inversion
    res = 10
    gen = torch.Generator().manual_seed(0)
    field = torch.randn((res + 1,) * 3, generator=gen)
    field[[0, 1, -2, -1]] = 1.0
    field[:, [0, 1, -2, -1]] = 1.0
    field[:, :, [0, 1, -2, -1]] = 1.0
    coords, feats = _dense_input(lambda ijk: field[ijk[..., 0], ijk[..., 1], ijk[..., 2]], res)
    feats[:, 32:53] = torch.randn(feats.shape[0], 21, generator=gen)
    mesh = extract_mesh(coords, feats, resolution=res)
    assert mesh.faces.shape[0] > 0
    assert (_edge_use(mesh.faces) == 2).all()


def test_single_negative_vertex_gives_a_closed_cell():
    # one decoded voxel with only corner 0 inside: the 8 cubes around that lattice vertex each emit one
    # dual vertex and its 6 edges each emit a quad, i.e. a closed hexahedron of 12 triangles
    res = 8
    coords = torch.tensor([[0, 3, 3, 3]])
    feats = torch.zeros(1, 101)
    feats[0, :8] = 0.5
    feats[0, 0] = -0.5
    mesh = extract_mesh(coords, feats, resolution=res)
    assert mesh.vertices.shape == (8, 3) and mesh.faces.shape == (12, 3)
    assert (_edge_use(mesh.faces) == 2).all()
    centre = torch.tensor([3, 3, 3]) / res - 0.5
    assert ((mesh.vertices - centre).abs() < 1.0 / res).all()
    assert _signed_volume(mesh) > 0


def test_empty_input_and_no_surface():
    empty = extract_mesh(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 101))
    assert empty.vertices.shape == (0, 3) and empty.faces.shape == (0, 3)
    assert empty.vertex_attrs.shape == (0, 6) and empty.faces.dtype == torch.int64
    outside = extract_mesh(torch.tensor([[0, 1, 2, 3]]), torch.ones(1, 101), resolution=8)
    assert outside.vertices.shape == (0, 3) and outside.faces.shape == (0, 3)


def test_ambiguous_neighbours_are_inverted():
    # case 61 looks at +x, case 188 at -x: side by side, both take the inverted case; alone, neither does
    _, _, check, _ = _tables(torch.device("cpu"))

    def occ(case):
        return torch.tensor([(case >> i) & 1 for i in range(8)], dtype=torch.bool)

    pair = _case_ids(torch.stack([occ(61), occ(188)]), torch.tensor([[2, 2, 2], [3, 2, 2]]), 8, check)
    assert pair.tolist() == [255 - 61, 255 - 188]
    apart = _case_ids(torch.stack([occ(61), occ(188)]), torch.tensor([[2, 2, 2], [5, 2, 2]]), 8, check)
    assert apart.tolist() == [61, 188]
    edge = _case_ids(occ(61)[None], torch.tensor([[7, 2, 2]]), 8, check)  # neighbour off the grid
    assert edge.tolist() == [61]


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="fine_coords"):
        extract_mesh(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 101))
    with pytest.raises(ValueError, match="fine_feats"):
        extract_mesh(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 100))
    with pytest.raises(ValueError, match="single batch"):
        extract_mesh(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), torch.zeros(2, 101))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    data = load_file(FIXTURE / "data.safetensors")
    coords, feats = data["mesh/fine_coords"].long(), data["mesh/fine_feats"]
    cpu = extract_mesh(coords, feats)
    gpu = extract_mesh(coords.cuda(), feats.cuda())
    torch.testing.assert_close(gpu.vertices.cpu(), cpu.vertices, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gpu.vertex_attrs.cpu(), cpu.vertex_attrs, atol=1e-6, rtol=1e-4)
    assert torch.equal(gpu.faces.cpu(), cpu.faces)


@pytest.mark.gpu
def test_cuda_is_the_same_on_every_run():
    """On CUDA the same input gives the same mesh bit for bit (the decimation after it turns last-bit differences
    into different meshes)."""
    data = load_file(FIXTURE / "data.safetensors")
    coords, feats = data["mesh/fine_coords"].long().cuda(), data["mesh/fine_feats"].cuda()
    first = extract_mesh(coords, feats)
    for _ in range(3):
        again = extract_mesh(coords, feats)
        assert torch.equal(again.vertices, first.vertices) and torch.equal(again.faces, first.faces)
        assert torch.equal(again.vertex_attrs, first.vertex_attrs)
