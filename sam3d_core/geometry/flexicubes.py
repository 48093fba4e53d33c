"""FlexiCubes mesh extraction from the mesh decoder's per-fine-voxel features (spec §4.10).

The official path densifies a 257^3 vertex lattice and scans all 256^3 cubes. Undecoded lattice
vertices get sdf 1, so a cube can only cross the surface if one of its corners is a decoded vertex
with negative sdf; we work on that sparse set of cubes instead; ordering every step by the dense linear index
(x slowest, then y, then z) reproduces the official vertex and face order exactly.

Only the inference path is implemented: dual vertices are beta-weighted means of the alpha-weighted
edge crossings (no QEF), and each quad is split along the diagonal with the larger gamma product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sam3d_core.geometry.flexicubes_tables import AMBIGUOUS_CASES, CUBE_EDGES, DMC_EDGE_GROUPS

__all__ = ["MeshResult", "extract_mesh", "flexicubes"]

FEATURE_CHANNELS = 101  # sdf 8 | deform 8x3 | weights 21 (beta 12, alpha 8, gamma 1) | colour 8x6
WEIGHT_SCALE = 0.99
_QUAD_SPLIT_02 = (0, 1, 2, 0, 2, 3)  # cut along the 0-2 diagonal
_QUAD_SPLIT_13 = (0, 1, 3, 3, 1, 2)  # cut along the 1-3 diagonal


@dataclass
class MeshResult:
    """A triangle mesh in the object's local frame (z up).

    vertices: [V, 3] float32 in [-0.5, 0.5]; faces: [F, 3] int64 vertex indices;
    vertex_attrs: [V, C] float32 in [0, 1] (C = 6 for the mesh decoder: RGB then 3 normal-map channels).
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    vertex_attrs: torch.Tensor

    @property
    def colors(self) -> torch.Tensor:
        return self.vertex_attrs[:, :3]


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense tensors of the case tables: edge groups [256, 4, 7] (-1 padded), vd counts [256],
    ambiguity [256, 5] (flag, dx, dy, dz, inverted case), cube edges [12, 2]."""
    groups = torch.full((256, 4, 7), -1, dtype=torch.long)
    num_vd = torch.zeros(256, dtype=torch.long)
    for case, case_groups in enumerate(DMC_EDGE_GROUPS):
        num_vd[case] = len(case_groups)
        for j, edges in enumerate(case_groups):
            groups[case, j, : len(edges)] = torch.tensor(edges)
    check = torch.zeros((256, 5), dtype=torch.long)
    for case, (dx, dy, dz, inverted) in AMBIGUOUS_CASES.items():
        check[case] = torch.tensor([1, dx, dy, dz, inverted])
    edges = torch.tensor(CUBE_EDGES, dtype=torch.long)
    return groups.to(device), num_vd.to(device), check.to(device), edges.to(device)


def _lookup(sorted_keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, found) of each query in a sorted 1-D key tensor."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(queries), torch.zeros_like(queries, dtype=torch.bool)
    idx = torch.searchsorted(sorted_keys, queries).clamp_(max=sorted_keys.numel() - 1)
    return idx, sorted_keys[idx] == queries


def _interp(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Zero crossing of a linear function along edges: weights [E, 2, 1], values [E, 2, C] -> [E, C]."""
    w = torch.cat([weights[:, 1:2], -weights[:, 0:1]], dim=1)
    return (values * w).sum(1) / w.sum(1)


def _case_ids(occ: torch.Tensor, cube_coords: torch.Tensor, resolution: int, check: torch.Tensor) -> torch.Tensor:
    """Marching-cubes case of each surface cube, with the ambiguous-face fix: a cube whose case is
    ambiguous towards a neighbour that is itself ambiguous takes the inverted case. occ [S, 8] bool,
    cube_coords [S, 3] long (sorted by dense index)."""
    case = (occ.long() << torch.arange(8, device=occ.device)).sum(-1)  # [S]
    config = check[case]  # [S, 5]
    problem = config[:, 0] == 1
    keys = (cube_coords[:, 0] * resolution + cube_coords[:, 1]) * resolution + cube_coords[:, 2]
    problem_keys = keys[problem]  # sorted, as keys are
    adj = cube_coords[problem] + config[problem, 1:4]  # [P, 3]
    inside = ((adj >= 0) & (adj < resolution)).all(-1)
    adj_keys = (adj[:, 0] * resolution + adj[:, 1]) * resolution + adj[:, 2]
    _, found = _lookup(problem_keys, adj_keys)
    invert = inside & found
    idx = torch.nonzero(problem).squeeze(1)[invert]
    case = case.clone()
    case[idx] = config[idx, 4]
    return case


def _triangulate(
    edge_vd: torch.Tensor, edge_id: torch.Tensor, edge_sdf0: torch.Tensor, vd_gamma: torch.Tensor
) -> torch.Tensor:
    """Quads around shared crossing edges, split into triangles by gamma.

    edge_vd [4Q] dual vertex of each (cube, edge) entry in cube order, edge_id [4Q] its unique edge,
    edge_sdf0 [E] sdf at each unique edge's first endpoint, vd_gamma [V]. Returns faces [2Q, 3].
    Quads are wound towards positive sdf; all quads whose edge starts outside come first.
    """
    sorted_edges, perm = torch.sort(edge_id, stable=True)
    quads = edge_vd[perm].reshape(-1, 4)  # [Q, 4]
    flip = edge_sdf0[sorted_edges.reshape(-1, 4)[:, 0]] > 0
    quads = torch.cat([quads[flip][:, [0, 1, 3, 2]], quads[~flip][:, [2, 3, 1, 0]]])
    g = vd_gamma[quads]  # [Q, 4]
    use_02 = g[:, 0] * g[:, 2] > g[:, 1] * g[:, 3]
    split = torch.where(
        use_02[:, None],
        torch.tensor(_QUAD_SPLIT_02, device=quads.device),
        torch.tensor(_QUAD_SPLIT_13, device=quads.device),
    )
    return quads.gather(1, split).reshape(-1, 3)


def _member_sum(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per dual vertex, the sum of its members' values: values [G, C] of the True entries of valid [V, 7], row-major
    -> [V, C].

    Written out instead of `index_add_`: on CUDA that adds with float atomics in no fixed order, so the same latent
    gave vertices differing in the last bits from run to run, which the decimation then turned into different
    meshes. Here each row adds its members left to right from zero, the order the CPU's `index_add_` uses, so the
    result is the same on every run and every device (a padded slot adds 0, which changes nothing).
    """
    full = values.new_zeros((*valid.shape, values.shape[-1]))  # [V, 7, C]
    full[valid] = values
    total = values.new_zeros((valid.shape[0], values.shape[-1]))
    for k in range(valid.shape[1]):
        total = total + full[:, k]
    return total


def flexicubes(
    vertices: torch.Tensor,
    sdf: torch.Tensor,
    cubes: torch.Tensor,
    cube_coords: torch.Tensor,
    resolution: int,
    beta: torch.Tensor,
    alpha: torch.Tensor,
    gamma: torch.Tensor,
    colors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dual-marching-cubes extraction with FlexiCubes weights (inference path).

    vertices [N, 3] lattice positions, sdf [N] (negative inside), colors [N, C] or None;
    cubes [K, 8] corner indices into the lattice (corner bits x=1, y=2, z=4), cube_coords [K, 3] their
    integer grid positions in [0, resolution); beta [K, 12], alpha [K, 8], gamma [K] already activated
    (positive). To match the dense official ordering, cubes must be sorted by dense index and the
    lattice indices must increase with the dense vertex index.
    Returns (vertices [V, 3], faces [F, 3] int64, colors [V, C] or None).
    """
    device = vertices.device
    groups_t, num_vd_t, check_t, edges_t = _tables(device)

    # 1. surface cubes: corners of both signs
    occ_v = sdf < 0
    occ = occ_v[cubes]  # [K, 8]
    n_in = occ.sum(-1)
    surf = (n_in > 0) & (n_in < 8)
    if not bool(surf.any()):
        empty_c = None if colors is None else colors.new_zeros((0, colors.shape[-1]))
        return vertices.new_zeros((0, 3)), torch.zeros((0, 3), dtype=torch.long, device=device), empty_c
    cubes, occ = cubes[surf], occ[surf]
    beta, alpha, gamma = beta[surf], alpha[surf], gamma[surf]
    case = _case_ids(occ, cube_coords[surf], resolution, check_t)
    n_cubes = cubes.shape[0]

    # 2. unique cube edges (lexicographic in lattice index), crossing edges and their share counts
    cube_edges = cubes[:, edges_t]  # [S, 12, 2]
    n_vert = vertices.shape[0]
    edge_keys = cube_edges[..., 0] * n_vert + cube_edges[..., 1]  # [S, 12]
    uniq, inverse, counts = torch.unique(edge_keys.reshape(-1), return_inverse=True, return_counts=True)
    uniq_ends = torch.stack([uniq // n_vert, uniq % n_vert], dim=-1)  # [E, 2]
    crossing = occ_v[uniq_ends].sum(-1) == 1  # [E]
    edge_crossing = crossing[inverse]  # [S*12]
    edge_counts = counts[inverse]  # [S*12]

    # 3. dual vertices, ordered by (vertex count of the cube, cube, group), as the official batching does
    num_vd = num_vd_t[case]  # [S]
    vd_cube = torch.repeat_interleave(torch.arange(n_cubes, device=device), num_vd)
    first = torch.cumsum(num_vd, 0) - num_vd
    vd_slot = torch.arange(vd_cube.numel(), device=device) - first[vd_cube]
    order = torch.sort(num_vd[vd_cube], stable=True).indices
    vd_cube, vd_slot = vd_cube[order], vd_slot[order]
    n_vd = vd_cube.numel()

    members = groups_t[case[vd_cube], vd_slot]  # [V, 7] cube-edge ids, -1 padded
    valid = members != -1
    m_vd = torch.arange(n_vd, device=device)[:, None].expand(-1, 7)[valid]  # [G]
    m_cube = vd_cube[:, None].expand(-1, 7)[valid]
    m_edge = members[valid]
    m_flat = m_cube * 12 + m_edge
    ends = uniq_ends[inverse[m_flat]]  # [G, 2]
    s_pair = sdf[ends].unsqueeze(-1)  # [G, 2, 1]
    a_pair = alpha[m_cube[:, None], edges_t[m_edge]].unsqueeze(-1)  # [G, 2, 1]
    b = beta.reshape(-1)[m_flat].unsqueeze(-1)  # [G, 1]
    w = s_pair * a_pair

    b_sum = _member_sum(b, valid)
    crossing_pos = _interp(w, vertices[ends])  # [G, 3]
    vd = _member_sum(crossing_pos * b, valid) / b_sum
    vd_color = None
    if colors is not None:
        crossing_col = _interp(w, colors[ends])
        vd_color = _member_sum(crossing_col * b, valid) / b_sum
    vd_gamma = gamma[vd_cube]  # [V]
    vd_of_edge = torch.zeros(n_cubes * 12, dtype=torch.long, device=device)
    vd_of_edge[m_flat] = m_vd

    # 4. one quad per crossing edge shared by four surface cubes
    quad_mask = (edge_counts == 4) & edge_crossing
    faces = _triangulate(vd_of_edge[quad_mask], inverse[quad_mask], sdf[uniq_ends[:, 0]], vd_gamma)
    return vd, faces, vd_color


def extract_mesh(fine_coords: torch.Tensor, fine_feats: torch.Tensor, resolution: int = 256) -> MeshResult:
    """Mesh from the mesh decoder output (one object).

    fine_coords [M, 4] int (batch, x, y, z) on the resolution^3 grid; fine_feats [M, 101] float, the
    decoder's out_layer output BEFORE the sdf bias (added here, not in place).
    """
    if fine_coords.ndim != 2 or fine_coords.shape[1] != 4:
        raise ValueError(f"fine_coords must be [M, 4] (batch, x, y, z); got {tuple(fine_coords.shape)}")
    if fine_feats.shape != (fine_coords.shape[0], FEATURE_CHANNELS):
        raise ValueError(
            f"fine_feats must be [{fine_coords.shape[0]}, {FEATURE_CHANNELS}] to match fine_coords; "
            f"got {tuple(fine_feats.shape)}"
        )
    if fine_coords.shape[0] and (fine_coords[:, 0] != fine_coords[0, 0]).any():
        raise ValueError("extract_mesh takes one object: fine_coords[:, 0] must hold a single batch index")
    device, dtype = fine_feats.device, fine_feats.dtype
    n_attrs = 6
    if fine_coords.shape[0] == 0:
        return MeshResult(
            fine_feats.new_zeros((0, 3)),
            torch.zeros((0, 3), dtype=torch.long, device=device),
            fine_feats.new_zeros((0, n_attrs)),
        )
    res, res_v = resolution, resolution + 1
    corners = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], device=device)
    xyz = fine_coords[:, 1:].long()  # [M, 3]

    # 1. per-corner attributes averaged onto the shared lattice vertices
    m = fine_feats.shape[0]
    sdf = fine_feats[:, 0:8].reshape(m, 8, 1) - 1.0 / res  # sdf bias
    deform = fine_feats[:, 8:32].reshape(m, 8, 3)
    color = fine_feats[:, 53:101].reshape(m, 8, n_attrs)
    corner_attrs = torch.cat([sdf, deform, color], dim=-1)  # [M, 8, 10]
    corner_offsets = (corners[:, 0] * res_v + corners[:, 1]) * res_v + corners[:, 2]  # [8]
    corner_keys = ((xyz[:, 0] * res_v + xyz[:, 1]) * res_v + xyz[:, 2])[:, None] + corner_offsets  # [M, 8]
    touched_keys, corner_idx = torch.unique(corner_keys.reshape(-1), return_inverse=True)
    touched = torch.zeros((touched_keys.numel(), corner_attrs.shape[-1]), device=device, dtype=dtype)
    touched = touched.scatter_reduce(
        0,
        corner_idx[:, None].expand(-1, corner_attrs.shape[-1]),
        corner_attrs.reshape(-1, corner_attrs.shape[-1]),
        reduce="mean",
        include_self=False,
    )

    # 2. candidate cubes: every cube with a decoded negative corner (only those can be surface cubes)
    neg = touched_keys[touched[:, 0] < 0]
    neg_xyz = torch.stack([neg // (res_v * res_v), (neg // res_v) % res_v, neg % res_v], dim=-1)
    cand = (neg_xyz[:, None] - corners).reshape(-1, 3)
    cand = cand[((cand >= 0) & (cand < res)).all(-1)]
    cand_keys = torch.unique((cand[:, 0] * res + cand[:, 1]) * res + cand[:, 2])  # sorted = dense cube order
    cube_xyz = torch.stack([cand_keys // (res * res), (cand_keys // res) % res, cand_keys % res], dim=-1)  # [K, 3]

    # 3. the lattice restricted to the candidates' corners; undecoded vertices: sdf 1, deform 0, colour 0
    base = (cube_xyz[:, 0] * res_v + cube_xyz[:, 1]) * res_v + cube_xyz[:, 2]
    lat_keys, cubes = torch.unique((base[:, None] + corner_offsets).reshape(-1), return_inverse=True)
    cubes = cubes.reshape(-1, 8)  # [K, 8], lattice indices increase with the dense vertex index
    attrs = torch.zeros((lat_keys.numel(), corner_attrs.shape[-1]), device=device, dtype=dtype)
    attrs[:, 0] = 1.0
    idx, found = _lookup(touched_keys, lat_keys)
    attrs[found] = touched[idx[found]]
    lat_int = torch.stack([lat_keys // (res_v * res_v), (lat_keys // res_v) % res_v, lat_keys % res_v], dim=-1)
    positions = (lat_int / res - 0.5 + (1 - 1e-8) / (res * 2) * torch.tanh(attrs[:, 1:4])).to(dtype)

    # 4. per-cube weights (cubes without a decoded voxel carry raw weights 0)
    weights = torch.zeros((cand_keys.numel(), 21), device=device, dtype=dtype)
    voxel_keys = (xyz[:, 0] * res + xyz[:, 1]) * res + xyz[:, 2]
    idx, found = _lookup(cand_keys, voxel_keys)
    weights[idx[found]] = fine_feats[found, 32:53]
    beta = torch.tanh(weights[:, :12]) * WEIGHT_SCALE + 1
    alpha = torch.tanh(weights[:, 12:20]) * WEIGHT_SCALE + 1
    gamma = torch.sigmoid(weights[:, 20]) * WEIGHT_SCALE + (1 - WEIGHT_SCALE) / 2

    vertices, faces, attrs_out = flexicubes(
        positions, attrs[:, 0], cubes, cube_xyz, res, beta, alpha, gamma, torch.sigmoid(attrs[:, 4:])
    )
    return MeshResult(vertices, faces, attrs_out)
