"""Training views: meshes placed by their poses, rasterised into a photo with exact masks, depth and point map.

    mesh = RenderMesh.from_asset(asset, device)                  # once per asset (tensors on the device)
    view = render_view([Placed(mesh, R, t, s), Placed(occluder, ...)], K, 518, 518, light, background)
    view.rgb, view.mask, view.amodal, view.depth, view.pointmap  # [H, W, 3] uint8 composite, [H, W] bool ...

Frames as everywhere (`geometry.frames`): a pose maps the local frame into the PyTorch3D camera frame,
p_cam = (p_local * s) @ R + t (row vectors); K is the OpenCV pixel matrix (pixel centres at j + 0.5, i + 0.5).
The first placed mesh is the target; the others are occluders or scenery: `mask` is where the target is the
nearest surface, `amodal` is the target rendered alone (so the occluders cut `mask` but not `amodal`).

Rasterisation is `kernels.rasterize` (exact coverage, the Triton kernel for CUDA tensors, pure PyTorch
otherwise). Its depth is interpolated linearly in screen space, so we hand it -1/z, which IS linear in screen
space: the z-test is exact. Attributes (colour, uv, camera point) are interpolated perspective-correctly
from the screen-space barycentrics (b_k / z_k, normalised). Faces with a vertex closer than `near` are
dropped, not clipped: keep objects in front of the camera (the generators do).

Shading: Lambert with an ambient term, one directional light, face normals turned towards the camera (so
inconsistent winding and open meshes shade the same from both sides). No anti-aliasing: the masks are exact
pixel-centre coverage, the colours hard-edged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kernels.rasterize import rasterize

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


def _to_camera(p: Placed) -> torch.Tensor:
    m = p.mesh
    r = torch.as_tensor(np.asarray(p.rotation), dtype=torch.float32, device=m.vertices.device)
    t = torch.as_tensor(np.asarray(p.translation), dtype=torch.float32, device=m.vertices.device)
    s = torch.as_tensor(np.broadcast_to(np.asarray(p.scale, np.float64), (3,)).copy(), dtype=torch.float32)
    return (m.vertices * s.to(m.vertices.device)) @ r + t  # [V, 3] PyTorch3D camera frame


def _project(v_cam: torch.Tensor, K: np.ndarray) -> torch.Tensor:
    """PyTorch3D camera points [V, 3] -> pos [V, 3]: (u, v) pixels, -1/z (the rasteriser's depth key)."""
    k = torch.as_tensor(np.asarray(K, np.float64), dtype=torch.float32, device=v_cam.device)
    x, y, z = -v_cam[:, 0], -v_cam[:, 1], v_cam[:, 2]  # OpenCV: x right, y down
    zs = torch.where(z.abs() > 1e-12, z, torch.full_like(z, 1e-12))
    u = (k[0, 0] * x + k[0, 1] * y) / zs + k[0, 2]
    v = k[1, 1] * y / zs + k[1, 2]
    return torch.stack([u, v, -1.0 / zs], 1)


def _raster(v_cam: torch.Tensor, faces: torch.Tensor, K, height: int, width: int, near: float):
    pos = _project(v_cam, K)
    tri_z = v_cam[:, 2][faces]  # [F, 3]
    tri_uv = pos[:, :2][faces]
    finite = torch.isfinite(tri_uv).flatten(1).all(1)
    keep = (tri_z > near).all(1) & (tri_uv.abs() < MAX_PIXELS).flatten(1).all(1) & finite
    kept = keep.nonzero().squeeze(1)
    raster = rasterize(pos, faces[kept], height, width)
    fid = raster.face_id.long()
    fid = torch.where(fid >= 0, kept[fid.clamp(min=0)], fid)  # back to indices into `faces`
    return fid, raster.bary


def silhouette(
    vertices: torch.Tensor, faces: torch.Tensor, rotation, translation, scale, K, height: int, width: int
) -> torch.Tensor:
    """Silhouette [H, W] bool of one mesh (vertices [V, 3] local frame) placed by a pose: the cheap pass the
    pose fit calls hundreds of times (no shading, no attributes)."""
    v_cam = _to_camera(Placed(RenderMesh(vertices, faces, vertices), rotation, translation, scale))
    fid, _ = _raster(v_cam, faces, K, height, width, 1e-3)
    return fid >= 0


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
    """Render placed meshes (the first is the target) into one view; see the module doc.

    background: [H, W, 3] uint8 (or float in [0, 1]) photo or tensor, or None for black. amodal=False skips the
    second raster pass (amodal then equals mask; use it when there is nothing in front of the target).
    to_numpy=False keeps the View's fields as tensors on the mesh's device (on-the-fly training on the GPU).
    """
    if not placed:
        raise ValueError("placed: got no meshes; give at least the target")
    dev = placed[0].mesh.vertices.device
    light = light or Light(np.array([0.3, 0.5, -1.0]) / np.linalg.norm([0.3, 0.5, -1.0]))
    cams = [_to_camera(p) for p in placed]
    offsets = np.cumsum([0] + [len(c) for c in cams])
    v_cam = torch.cat(cams)  # [V, 3]
    faces = torch.cat([p.mesh.faces + int(o) for p, o in zip(placed, offsets[:-1], strict=True)])
    owner = torch.cat(
        [torch.full((len(p.mesh.faces),), i, dtype=torch.int64, device=dev) for i, p in enumerate(placed)]
    )
    fid, bary = _raster(v_cam, faces, K, height, width, near)
    hit = fid >= 0  # [H, W]
    mask = hit & (owner[fid.clamp(min=0)] == 0)
    if amodal and len(placed) > 1:
        fid0, _ = _raster(cams[0], placed[0].mesh.faces, K, height, width, near)
        amodal_mask = fid0 >= 0
    else:
        amodal_mask = mask

    # Perspective-correct weights and the camera point of each covered pixel.
    flat = hit.view(-1).nonzero().squeeze(1)  # [N]
    f = fid.view(-1)[flat]  # [N]
    corners = faces[f]  # [N, 3]
    b = bary.view(-1, 3)[flat]  # [N, 3] screen-space
    zc = v_cam[:, 2][corners]  # [N, 3]
    w = b / zc
    w = w / w.sum(1, keepdim=True).clamp(min=1e-20)  # [N, 3] perspective-correct
    p = (v_cam[corners] * w[..., None]).sum(1)  # [N, 3] camera points

    colour = _surface_colour(placed, offsets, corners, f, owner, w)  # [N, 3]
    tri = v_cam[faces[f]]  # [N, 3, 3]
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n = n * torch.where((n * p).sum(1, keepdim=True) > 0, -1.0, 1.0)  # face the camera (at the origin)
    n = F.normalize(n, dim=1)
    ld = torch.as_tensor(np.asarray(light.direction, np.float64), dtype=torch.float32, device=dev)
    lam = (n @ F.normalize(ld, dim=0)).clamp(min=0)[:, None]
    tint = torch.as_tensor(light.color, dtype=torch.float32, device=dev)
    shaded = (colour * (light.ambient + light.diffuse * lam) * tint).clamp(0, 1)

    if background is None:
        out = torch.zeros(height * width, 3, device=dev)
    else:
        bg = background.to(dev) if torch.is_tensor(background) else torch.tensor(np.asarray(background), device=dev)
        if tuple(bg.shape) != (height, width, 3):
            raise ValueError(f"background: got shape {tuple(bg.shape)}, expected [{height}, {width}, 3]")
        out = (bg.float() / 255.0 if bg.dtype == torch.uint8 else bg.float()).reshape(-1, 3).clone()
    out[flat] = shaded
    depth = torch.full((height * width,), float("inf"), device=dev)
    depth[flat] = p[:, 2]
    pointmap = torch.zeros(height * width, 3, device=dev)
    pointmap[flat] = p
    fields = (
        (out * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).view(height, width, 3),
        mask,
        amodal_mask,
        depth.view(height, width),
        pointmap.view(height, width, 3),
        hit,
    )
    return View(*(f.cpu().numpy() for f in fields) if to_numpy else fields)


def _surface_colour(placed, offsets, corners, f, owner, w) -> torch.Tensor:
    """Per covered pixel [N, 3]: interpolated vertex colour, or the texture sample on textured faces."""
    colors = torch.cat([p.mesh.colors for p in placed])
    colour = (colors[corners] * w[..., None]).sum(1)
    for i, p in enumerate(placed):
        m = p.mesh
        if m.uvs is None or m.face_texture is None:
            continue
        sel = (owner[f] == i).nonzero().squeeze(1)  # covered pixels of mesh i
        if sel.numel() == 0:
            continue
        start = int(sum(len(q.mesh.faces) for q in placed[:i]))
        tex_id = m.face_texture[f[sel] - start]  # [n]
        uv = (m.uvs[corners[sel] - int(offsets[i])] * w[sel, :, None]).sum(1)  # [n, 2]
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
