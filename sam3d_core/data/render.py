"""Training views: meshes placed by their poses, rasterised into a photo with exact masks, depth and point map.

    mesh = RenderMesh.from_asset(asset, device)                  # once per asset (tensors on the device)
    view = render_view([Placed(mesh, R, t, s), Placed(occluder, ...)], K, 518, 518, light, background)
    view.rgb, view.mask, view.amodal, view.depth, view.pointmap  # [H, W, 3] uint8 composite, [H, W] bool ...

    batch = render_views([Shot(placed, K, light, background), ...], 518, 518)   # many views in one go
    batch.rgb, batch.mask                                        # [B, H, W, 3], [B, H, W]; batch[i] is a View
    masks = target_masks(shots, 518, 518)                        # [B, H, W] batch.mask alone (no shading)

Frames as everywhere (`geometry.frames`): a pose maps the local frame into the PyTorch3D camera frame,
p_cam = (p_local * s) @ R + t (row vectors); K is the OpenCV pixel matrix (pixel centres at j + 0.5, i + 0.5).
The first placed mesh is the target; the others are occluders or scenery: `mask` is where the target is the
nearest surface, `amodal` is the target rendered alone (so the occluders cut `mask` but not `amodal`).

Rasterisation is `sam3d_kernels.rasterize` (exact coverage, the Triton kernel for CUDA tensors, pure PyTorch
otherwise). Its depth is interpolated linearly in screen space, so we hand it -1/z, which IS linear in screen
space: the z-test is exact. Attributes (colour, uv, camera point) are interpolated perspective-correctly
from the screen-space barycentrics (b_k / z_k, normalised). Faces with a vertex closer than `near` are
dropped, not clipped: keep objects in front of the camera (the generators do).

Batches: `render_view` is `render_views` of one shot. A batch flattens every placed mesh of every view into one
vertex list, rasterises all views (and the target-alone views of the amodal masks) in one `rasterize_batch`
call and shades all covered pixels at once; every per-vertex and per-pixel step is elementwise, so a view comes
out bit for bit the same in any batch. On a GPU this removes the per-view kernel launches that bound the
one-at-a-time renderer; on a CPU the work is the same either way.

Shading: Lambert with an ambient term, one directional light, face normals turned towards the camera (so
inconsistent winding and open meshes shade the same from both sides). No anti-aliasing: the masks are exact
pixel-centre coverage, the colours hard-edged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sam3d_kernels.rasterize import rasterize_batch

MAX_PIXELS = 2**19  # projected coordinates beyond this (pixels) are culled: the rasteriser's range is 2^20


@dataclass
class RenderMesh:
    """A mesh ready to render: vertices [V, 3] local frame, faces [F, 3] int64, colors [V, 3] in [0, 1], and
    optionally uvs [V, 2] (v up), face_texture [F] int64 (-1 = vertex colour) and textures [h, w, 3] float."""

    vertices: torch.Tensor
    faces: torch.Tensor
    colors: torch.Tensor
    uvs: torch.Tensor | None = None
    face_texture: torch.Tensor | None = None
    textures: tuple[torch.Tensor, ...] = ()

    @classmethod
    def from_asset(cls, asset, device: str | torch.device = "cpu") -> RenderMesh:
        """From a `meshio.Asset` (numpy) to tensors on `device`."""
        dev = torch.device(device)
        textured = asset.uvs is not None and asset.face_texture is not None and len(asset.textures) > 0
        return cls(
            vertices=torch.as_tensor(asset.vertices, dtype=torch.float32, device=dev),
            faces=torch.as_tensor(asset.faces, dtype=torch.int64, device=dev),
            colors=torch.as_tensor(asset.colors, dtype=torch.float32, device=dev),
            uvs=torch.as_tensor(asset.uvs, dtype=torch.float32, device=dev) if textured else None,
            face_texture=torch.as_tensor(asset.face_texture, dtype=torch.int64, device=dev) if textured else None,
            textures=tuple(torch.tensor(np.asarray(t), device=dev).float().div(255.0) for t in asset.textures)
            if textured
            else (),
        )


@dataclass
class Placed:
    """A mesh and its pose: rotation [3, 3] (row-vector), translation [3], scale (scalar or [3])."""

    mesh: RenderMesh
    rotation: np.ndarray
    translation: np.ndarray
    scale: float | np.ndarray


@dataclass
class Light:
    """Directional light: direction [3] towards the light in the PyTorch3D camera frame; intensities in [0, 1+]."""

    direction: np.ndarray
    ambient: float = 0.45
    diffuse: float = 0.65
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def random(cls, rng: np.random.Generator) -> Light:
        """A light from the camera's side of the object (z < 0 in the camera frame), random strength and tint
        (paper appendix B.3: randomised direction and intensity)."""
        d = rng.normal(size=3)
        d[2] = -abs(d[2]) - 0.3
        tint = 1.0 + rng.uniform(-0.08, 0.08, 3)
        return cls(d / np.linalg.norm(d), float(rng.uniform(0.25, 0.6)), float(rng.uniform(0.4, 0.9)), tuple(tint))


@dataclass
class View:
    """One rendered view. rgb [H, W, 3] uint8 (composited over the background); mask / amodal [H, W] bool;
    depth [H, W] float32 camera z of the nearest surface (inf where none); pointmap [H, W, 3] float32
    PyTorch3D camera points of the nearest surface (0 where none); coverage [H, W] bool (any surface)."""

    rgb: np.ndarray
    mask: np.ndarray
    amodal: np.ndarray
    depth: np.ndarray
    pointmap: np.ndarray
    coverage: np.ndarray


class Shot(NamedTuple):
    """One view to render: the placed meshes (the first is the target), K [3, 3], the light (None: a default
    frontal one) and the background ([H, W, 3] uint8 or float in [0, 1], numpy or tensor; None: black)."""

    placed: list[Placed]
    K: np.ndarray
    light: Light | None = None
    background: np.ndarray | torch.Tensor | None = None


@dataclass
class ViewBatch:
    """Views rendered together: View's fields with a leading batch axis (rgb [B, H, W, 3], mask [B, H, W] ...),
    numpy or tensors on the meshes' device. `batch[i]` is view i as a View (its fields are views, not copies)."""

    rgb: np.ndarray
    mask: np.ndarray
    amodal: np.ndarray
    depth: np.ndarray
    pointmap: np.ndarray
    coverage: np.ndarray

    def __len__(self) -> int:
        return self.rgb.shape[0]

    def __getitem__(self, i: int) -> View:
        return View(self.rgb[i], self.mask[i], self.amodal[i], self.depth[i], self.pointmap[i], self.coverage[i])


_DEFAULT_LIGHT = np.array([0.3, 0.5, -1.0]) / np.linalg.norm([0.3, 0.5, -1.0])


@dataclass
class _Scenes:
    """The shots' placed meshes flattened into one vertex / face list on the device: B views, P placements.

    v_cam [V, 3] camera points, pos [V, 3] the rasteriser's (u, v, -1/z), faces [F, 3] into v_cam, face_pl [F]
    each face's placement, kept [F'] the faces in front of the near plane and within range. Per placement [P]:
    view, voff / foff (first vertex / face), target (the first of its shot), alone (the extra view of its shot's
    target-alone pass, for targets, else -1), tex (its textured mesh in `textured`, else -1). Per view: light
    [B, 8] (direction 3, ambient, diffuse, tint 3). alone_views [A] the shots given a target-alone pass;
    textured: the placements of each textured mesh (host lists, one entry per distinct RenderMesh)."""

    v_cam: torch.Tensor
    pos: torch.Tensor
    faces: torch.Tensor
    face_pl: torch.Tensor
    kept: torch.Tensor
    pl: dict[str, torch.Tensor]
    light: torch.Tensor
    alone_views: torch.Tensor
    textured: list[list[int]]


_PL = ("view", "voff", "foff", "nv", "nf", "target", "alone", "tex")  # integer columns per placement


def _flatten(shots: list[Shot], near: float, alone: list[int]) -> _Scenes:
    """Place every mesh of every shot in its camera and project it. Every per-vertex and per-face op is
    elementwise, so a view's numbers do not depend on the batch it is rendered in; all the small per-placement
    and per-view numbers travel in ONE host -> device copy (a float64 buffer; its integers are exact)."""
    dev = shots[0].placed[0].mesh.vertices.device
    placed = [p for shot in shots for p in shot.placed]
    n_pl, b = len(placed), len(shots)
    textured: dict[int, list[int]] = {}  # id(mesh) -> its placements
    for i, p in enumerate(placed):
        if p.mesh.uvs is not None and p.mesh.face_texture is not None:
            textured.setdefault(id(p.mesh), []).append(i)
    ints = np.zeros((n_pl, len(_PL)))
    ints[:, 0] = np.repeat(np.arange(b), [len(s.placed) for s in shots])
    ints[:, 3] = [len(p.mesh.vertices) for p in placed]
    ints[:, 4] = [len(p.mesh.faces) for p in placed]
    ints[:, 1], ints[:, 2] = np.cumsum(ints[:, 3]) - ints[:, 3], np.cumsum(ints[:, 4]) - ints[:, 4]
    first = np.cumsum([0] + [len(s.placed) for s in shots[:-1]])  # the target's placement in each shot
    ints[first, 5] = 1
    ints[:, 6:8] = -1
    ints[first[alone], 6] = b + np.arange(len(alone))
    for j, idx in enumerate(textured.values()):
        ints[idx, 7] = j
    pose = np.zeros((n_pl, 15))  # rotation 9 (row-major), translation 3, scale 3
    pose[:, 0:9] = [np.asarray(p.rotation, np.float64).reshape(9) for p in placed]
    pose[:, 9:12] = [np.asarray(p.translation, np.float64).reshape(3) for p in placed]
    pose[:, 12:15] = [np.broadcast_to(np.asarray(p.scale, np.float64), (3,)) for p in placed]
    view = np.zeros((b, 13))  # K 5 (fx, skew, cx, fy, cy), light 8
    for i, s in enumerate(shots):
        k, light = np.asarray(s.K, np.float64), s.light or Light(_DEFAULT_LIGHT)
        view[i, :5] = k[0, 0], k[0, 1], k[0, 2], k[1, 1], k[1, 2]
        view[i, 5:] = [*np.reshape(light.direction, 3), light.ambient, light.diffuse, *light.color]
    parts = [ints, pose, view, np.asarray(alone, np.float64)]
    buf = torch.from_numpy(np.concatenate([a.reshape(-1) for a in parts])).to(dev)
    ends = np.cumsum([a.size for a in parts])
    pli = buf[: ends[0]].long().view(n_pl, len(_PL))
    pl = {name: pli[:, j] for j, name in enumerate(_PL)}
    pose_t, view_t = buf[ends[0] : ends[1]].float().view(n_pl, 15), buf[ends[1] : ends[2]].float().view(b, 13)

    n_v, n_f = int(ints[:, 3].sum()), int(ints[:, 4].sum())
    vert_pl = torch.repeat_interleave(torch.arange(n_pl, device=dev), pl["nv"], output_size=n_v)  # [V]
    face_pl = torch.repeat_interleave(torch.arange(n_pl, device=dev), pl["nf"], output_size=n_f)  # [F]
    faces = torch.cat([p.mesh.faces for p in placed]) + pl["voff"][face_pl, None]  # [F, 3] into the concatenation
    # p_cam = (p_local * s) @ R + t with the product spelled out per component: elementwise, so independent of
    # the batch and the same arithmetic on CPU and GPU (no BLAS kernel choice; on the CPU the same bits as `@`)
    vp = pose_t[vert_pl]  # [V, 15]
    vs = torch.cat([p.mesh.vertices for p in placed]) * vp[:, 12:15]
    v_cam = vs[:, 0:1] * vp[:, 0:3] + vs[:, 1:2] * vp[:, 3:6] + vs[:, 2:3] * vp[:, 6:9] + vp[:, 9:12]  # [V, 3]
    k = view_t[pl["view"][vert_pl], :5]  # [V, 5] the intrinsics of each vertex's view
    x, y, z = -v_cam[:, 0], -v_cam[:, 1], v_cam[:, 2]  # OpenCV: x right, y down
    zs = torch.where(z.abs() > 1e-12, z, torch.full_like(z, 1e-12))
    u = (k[:, 0] * x + k[:, 1] * y) / zs + k[:, 2]
    v = k[:, 3] * y / zs + k[:, 4]
    pos = torch.stack([u, v, -1.0 / zs], 1)  # -1/z is linear in screen space: the z-test is exact

    tri_z, tri_uv = v_cam[:, 2][faces], pos[:, :2][faces]  # [F, 3], [F, 3, 2]
    finite = torch.isfinite(tri_uv).flatten(1).all(1)
    keep = (tri_z > near).all(1) & (tri_uv.abs() < MAX_PIXELS).flatten(1).all(1) & finite
    kept = keep.nonzero().squeeze(1)
    alone_views = buf[ends[2] :].long()
    return _Scenes(v_cam, pos, faces, face_pl, kept, pl, view_t[:, 5:], alone_views, list(textured.values()))


def _raster(sc: _Scenes, views: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shots' views and, as views B .. B + A - 1, the targets of the shots in `alone_views` alone, in one
    raster call -> face ids [B + A, H, W] int64 (into sc.faces, -1 empty), bary [B + A, H, W, 3]."""
    faces, kept_pl = sc.kept, sc.face_pl[sc.kept]
    band = sc.pl["view"][kept_pl]
    if sc.alone_views.numel():
        alone = sc.pl["alone"][kept_pl]  # [F'] the target-alone view of the face's placement, -1 none
        also = (alone >= 0).nonzero().squeeze(1)
        faces, band = torch.cat([faces, faces[also]]), torch.cat([band, alone[also]])
    raster = rasterize_batch(sc.pos, sc.faces[faces], band, views + sc.alone_views.numel(), height, width)
    lut = torch.cat([faces, faces.new_tensor([-1])])  # raster face -> sc.faces row; -1 (empty, the last) stays -1
    return lut[raster.face_id.long()], raster.bary


def silhouette(
    vertices: torch.Tensor, faces: torch.Tensor, rotation, translation, scale, K, height: int, width: int
) -> torch.Tensor:
    """Silhouette [H, W] bool of one mesh (vertices [V, 3] local frame) placed by a pose: the cheap pass the
    pose fit calls hundreds of times (no shading, no attributes)."""
    sc = _flatten([Shot([Placed(RenderMesh(vertices, faces, vertices), rotation, translation, scale)], K)], 1e-3, [])
    fid, _ = _raster(sc, 1, height, width)
    return fid[0] >= 0


def target_masks(shots: list[Shot] | list[tuple], height: int, width: int, *, near: float = 1e-3) -> torch.Tensor:
    """[B, H, W] bool on the meshes' device: where each shot's target (its first mesh) is the nearest surface,
    bit for bit `render_views(shots, ...).mask`, without shading or amodal passes: one raster call that decides
    between candidate scenes (which occluder placement to keep) before the chosen ones are rendered."""
    shots = [Shot(*s) for s in shots]
    if not shots or any(not s.placed for s in shots):
        raise ValueError("shots: got no views or a view with no mesh; give each at least its target")
    sc = _flatten(shots, near, [])
    fid, _ = _raster(sc, len(shots), height, width)
    return (fid >= 0) & (sc.pl["target"][sc.face_pl[fid.clamp(min=0)]] > 0)


def render_view(
    placed: list[Placed],
    K: np.ndarray,
    height: int,
    width: int,
    light: Light | None = None,
    background: np.ndarray | torch.Tensor | None = None,
    *,
    near: float = 1e-3,
    amodal: bool = True,
    to_numpy: bool = True,
) -> View:
    """Render placed meshes (the first is the target) into one view; see the module doc. A batch of one of
    `render_views`.

    background: [H, W, 3] uint8 (or float in [0, 1]) photo or tensor, or None for black. amodal=False skips the
    second raster pass (amodal then equals mask; use it when there is nothing in front of the target).
    to_numpy=False keeps the View's fields as tensors on the mesh's device (on-the-fly training on the GPU).
    """
    return render_views(
        [Shot(placed, K, light, background)], height, width, near=near, amodal=amodal, to_numpy=to_numpy
    )[0]


def render_views(
    shots: list[Shot] | list[tuple],
    height: int,
    width: int,
    *,
    near: float = 1e-3,
    amodal: bool = True,
    to_numpy: bool = True,
) -> ViewBatch:
    """Render many views of one size at once: shots [B] of (placed, K, light, background) -> ViewBatch [B, ...]
    whose view b is what `render_view(placed, K, height, width, light, background)` gives for shots[b]. One
    raster call for all views (the amodal passes as extra views), the small per-view numbers in one host ->
    device copy, shading and compositing over the whole batch: one view at a time the GPU is bound by kernel
    launches. amodal, near and to_numpy as in `render_view`; all meshes on one device (the same RenderMesh may
    appear in many shots).
    """
    shots = [Shot(*s) for s in shots]
    shots = [s._replace(background=_as_array(s.background)) for s in shots]
    if not shots:
        raise ValueError("shots: got no views; give at least one (placed meshes, K, light, background)")
    dev = shots[0].placed[0].mesh.vertices.device if shots[0].placed else None
    for i, s in enumerate(shots):
        if not s.placed:
            raise ValueError(f"shots[{i}]: got no meshes; give at least the target")
        if any(p.mesh.vertices.device != dev for p in s.placed):
            raise ValueError(f"shots[{i}]: a mesh is not on {dev} (the first mesh's device); put all on one device")
        if s.background is not None and tuple(s.background.shape) != (height, width, 3):
            raise ValueError(
                f"shots[{i}].background: got shape {tuple(s.background.shape)}, expected [{height}, {width}, 3]"
            )
    b, hw = len(shots), height * width
    sc = _flatten(shots, near, [i for i, s in enumerate(shots) if amodal and len(s.placed) > 1])
    fid, bary = _raster(sc, b, height, width)
    hit = fid[:b] >= 0  # [B, H, W]
    mask = hit & (sc.pl["target"][sc.face_pl[fid[:b].clamp(min=0)]] > 0)
    amodal_mask = mask
    if sc.alone_views.numel():
        amodal_mask = mask.clone()
        amodal_mask[sc.alone_views] = fid[b:] >= 0

    # Perspective-correct weights and the camera point of each covered pixel.
    flat = hit.view(-1).nonzero().squeeze(1)  # [N]
    f = fid[:b].reshape(-1)[flat]  # [N]
    corners = sc.faces[f]  # [N, 3]
    bw = bary[:b].reshape(-1, 3)[flat]  # [N, 3] screen-space
    zc = sc.v_cam[:, 2][corners]  # [N, 3]
    w = bw / zc
    w = w / w.sum(1, keepdim=True).clamp(min=1e-20)  # [N, 3] perspective-correct
    p = (sc.v_cam[corners] * w[..., None]).sum(1)  # [N, 3] camera points

    shaded = _shade(shots, sc, flat // hw, corners, f, w, p)  # [N, 3]
    out = _backgrounds(shots, height, width, dev).view(-1, 3)
    out[flat] = shaded
    depth = torch.full((b * hw,), float("inf"), device=dev)
    depth[flat] = p[:, 2]
    pointmap = torch.zeros(b * hw, 3, device=dev)
    pointmap[flat] = p
    fields = (
        (out * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).view(b, height, width, 3),
        mask,
        amodal_mask,
        depth.view(b, height, width),
        pointmap.view(b, height, width, 3),
        hit,
    )
    return ViewBatch(*(f.cpu().numpy() for f in fields) if to_numpy else fields)


def _shade(shots, sc: _Scenes, view, corners, f, w, p) -> torch.Tensor:
    """Per covered pixel [N, 3]: the surface colour under its view's light (Lambert + ambient, face normals
    turned towards the camera). view [N] each pixel's view; corners [N, 3], f [N], w [N, 3], p [N, 3]."""
    colour = _surface_colour(shots, sc, corners, f, w)
    tri = sc.v_cam[corners]  # [N, 3, 3]
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n = n * torch.where((n * p).sum(1, keepdim=True) > 0, -1.0, 1.0)  # face the camera (at the origin)
    n = F.normalize(n, dim=1)
    light = sc.light[view]  # [N, 8] direction 3, ambient, diffuse, tint 3
    lam = (n * F.normalize(sc.light[:, 0:3], dim=1)[view]).sum(1).clamp(min=0)[:, None]
    return (colour * (light[:, 3:4] + light[:, 4:5] * lam) * light[:, 5:8]).clamp(0, 1)


def _surface_colour(shots, sc: _Scenes, corners, f, w) -> torch.Tensor:
    """Per covered pixel [N, 3]: interpolated vertex colour, or the texture sample on textured faces. One
    texture lookup per (mesh, texture) however many views show it."""
    placed = [p for s in shots for p in s.placed]
    colour = (torch.cat([p.mesh.colors for p in placed])[corners] * w[..., None]).sum(1)
    if not sc.textured:
        return colour
    pl = sc.face_pl[f]  # [N] the placement of each covered pixel's face
    tex_mesh = sc.pl["tex"][pl]  # [N] its textured mesh, -1 none
    for j, idx in enumerate(sc.textured):
        m = placed[idx[0]].mesh
        sel = (tex_mesh == j).nonzero().squeeze(1)  # covered pixels of mesh m, in any view
        if sel.numel() == 0:
            continue
        tex_id = m.face_texture[f[sel] - sc.pl["foff"][pl[sel]]]  # [n]
        uv = (m.uvs[corners[sel] - sc.pl["voff"][pl[sel], None]] * w[sel, :, None]).sum(1)  # [n, 2]
        for t in torch.unique(tex_id).tolist():
            if t < 0:
                continue
            s = (tex_id == t).nonzero().squeeze(1)
            g = uv[s].remainder(1.0)  # wrap (repeat)
            grid = torch.stack([g[:, 0] * 2 - 1, (1 - g[:, 1]) * 2 - 1], 1)[None, None]  # [1, 1, n, 2]
            img = m.textures[t].permute(2, 0, 1)[None]  # [1, 3, h, w]
            sample = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
            colour[sel[s]] = sample[0, :, 0].T * colour[sel[s]]
    return colour


def _as_array(background):
    """A background as given (None, tensor, ndarray) or, for anything else (nested lists), as an ndarray."""
    return background if background is None or torch.is_tensor(background) else np.asarray(background)


def _backgrounds(shots, height: int, width: int, dev: torch.device) -> torch.Tensor:
    """[B, H, W, 3] float32 in [0, 1]: each shot's background (uint8 / 255, float as is), black where None. Photos
    of one kind (numpy arrays, or tensors) come in one copy / one stack; a mix goes one by one."""
    bgs = [s.background for s in shots]
    if len({b.dtype for b in bgs if b is not None}) == 1:
        if all(isinstance(b, np.ndarray) for b in bgs):
            return _unit(torch.from_numpy(np.stack(bgs)).to(dev))
        if all(torch.is_tensor(b) for b in bgs):
            return _unit(torch.stack([b.to(dev) for b in bgs]))
    out = torch.zeros(len(shots), height, width, 3, device=dev)
    for i, b in enumerate(bgs):
        if b is not None:
            out[i] = _unit(b.to(dev) if torch.is_tensor(b) else torch.from_numpy(b).to(dev))
    return out


def _unit(bg: torch.Tensor) -> torch.Tensor:
    return bg.float() / 255.0 if bg.dtype == torch.uint8 else bg.float()
