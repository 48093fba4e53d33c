"""Target latents of a training sample: an object's mesh and occupancy -> the stage-1 shape latent and the stage-2
structured latent (SLAT), through the VAE encoders whose decoders the pipeline uses.

    enc = LatentEncoder.from_imported("official")   # encoders imported with the model (or fitted: docs/encoders.md)
    out = enc.encode_sample(mesh, occupancy)        # trimesh.Trimesh in the local frame, [N, 3] voxel indices
    out["ss_latent"]                                # [8, 16, 16, 16] float32
    out["slat_coords"], out["slat_feats"]           # [M, 3] int64, [M, 8] float32

Frames and conventions
  local frame  the object in [-0.5, 0.5]^3, z up (`geometry.frames` "local"). Voxel (x, y, z) of the 64^3 grid spans
               [x, x + 1] / 64 - 0.5 on each axis; its centre is (x + 0.5) / 64 - 0.5 (TRELLIS voxelize.py).
  ss_latent    SSEncoder's posterior mean (no sampling, as TRELLIS encode_ss_latent.py) for the grid with 1 at each
               occupied voxel (axes x, y, z): [C, R, R, R], latent cell (i, j, k) covering voxels 4i..4i+3, ...: the
               layout SSDecoder reads (`shape_latent_to_grid` of the flow's tokens). Not normalised.
  slat_coords  the occupied voxels that are visible in at least one view, sorted by (x, y, z); occupied voxels that
               no view sees (inside a closed shell) get no feature and are left out (paper C.6: features go only to
               visible voxels).
  slat_feats   SLatEncoder's posterior mean for those voxels: the de-normalised SLAT the decoders read. The stage-2
               flow is trained on (feats - slat_mean) / slat_std (Stage2Config).
  views        `num_views` cameras on a sphere of radius `camera_distance` around the origin, yaw / pitch from a
               Hammersley sequence shifted by a `view_seed` draw (TRELLIS render.py), each looking at the origin with
               world +z up, square images of the DINO input size with `fov_degrees`.
  rendering    the training-data renderer (`data.render`, sam3d_kernels.rasterize: Triton on CUDA, PyTorch reference
               on CPU). Unlit albedo from textures (perspective-correct UVs, bilinear), vertex or face colours: the
               paper's "de-lighted" rendering (C.5). A mesh of one colour (no texture; or no colour: grey) is lit by a
               headlight instead, so that its shape shows. Black background (TRELLIS composites its renders over
               black), 8-bit colours, no anti-aliasing.
  features     DINOv2 `x_prenorm` patch tokens (the last block's output before the final norm, TRELLIS
               extract_feature.py) of every view, sampled bilinearly at each voxel centre's projection (grid_sample,
               align_corners False: pixel u spans [u, u + 1]) and averaged over the views where the voxel is visible:
               its centre lies within `depth_tolerance` of the rendered depth at its pixel (paper C.6.1, eq. 6, with
               the exact rendered depth in place of the splatted one).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sam3d_core.config import LatentEncoderConfig
from sam3d_core.data.render import Light, Placed, RenderMesh, Shot, render_views
from sam3d_core.models.condition import IMAGENET_MEAN, IMAGENET_STD
from sam3d_core.models.dinov2 import DinoVisionTransformer
from sam3d_core.models.slat_vae import SLatEncoder, radical_inverse
from sam3d_core.models.ss_vae import SSEncoder, occupancy_grid
from sam3d_core.models.stages import init_random_weights
from sam3d_core.registry import encoder_preset

GRID = 64  # the occupancy / SLAT grid
BOUNDS_TOLERANCE = 0.01  # how far (local units) a vertex may stray outside [-0.5, 0.5]^3
GREY = 0.7  # albedo of meshes without colour (as data.meshio)


# ---------------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Views:
    """Cameras: world_to_camera [V, 4, 4] (local frame -> OpenCV camera: x right, y down, z forward), K [3, 3] in
    pixels of a size x size image (pixel (i, j) centred at (j + 0.5, i + 0.5))."""

    world_to_camera: torch.Tensor
    K: torch.Tensor
    size: int


def sphere_views(num_views: int, fov_degrees: float, distance: float, size: int, seed: int) -> Views:
    """TRELLIS's camera layout: yaw / pitch from a 2D Hammersley sequence with a random offset (drawn from `seed`)."""
    offset = np.random.default_rng(seed).random(2)
    rows = []
    for i in range(num_views):
        u = i / num_views + offset[0] / num_views
        v = radical_inverse(2, i) + offset[1]
        u = 2 * u if u < 0.25 else 2 / 3 * u + 1 / 3  # TRELLIS's area-preserving warp
        pitch, yaw = math.acos(1 - 2 * u) - math.pi / 2, v * 2 * math.pi
        eye = distance * np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)])
        forward = -eye / np.linalg.norm(eye)
        up = np.array([0.0, 0.0, 1.0]) if abs(forward[2]) < 0.999 else np.array([0.0, 1.0, 0.0])  # poles
        right = np.cross(forward, up)
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        rot = np.stack([right, down, forward])  # rows: camera axes in the local frame
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = rot, -rot @ eye
        rows.append(m)
    focal = size / 2 / math.tan(math.radians(fov_degrees) / 2)
    K = torch.tensor([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]], dtype=torch.float32)
    return Views(torch.tensor(np.stack(rows), dtype=torch.float32), K, size)


def project(points: torch.Tensor, views: Views) -> tuple[torch.Tensor, torch.Tensor]:
    """Local points [N, 3] -> pixel coordinates [V, N, 2] and camera depth [V, N]."""
    cam = points @ views.world_to_camera[:, :3, :3].transpose(1, 2) + views.world_to_camera[:, None, :3, 3]  # [V, N, 3]
    z = cam[..., 2]
    uv = (cam @ views.K.to(cam).T)[..., :2] / z[..., None]
    return uv, z


# ---------------------------------------------------------------------------------------------------
# Rendering (albedo + depth), through the training-data renderer
# ---------------------------------------------------------------------------------------------------

# Light directions point towards the light in the PyTorch3D camera frame: -z is the camera's side.
DELIT = Light(np.array([0.0, 0.0, -1.0]), ambient=1.0, diffuse=0.0)  # albedo as is (paper C.5)
HEADLIGHT = Light(np.array([0.0, 0.0, -1.0]), ambient=0.3, diffuse=0.7)  # for meshes of one colour


def render_mesh(mesh, device: str | torch.device = "cpu") -> RenderMesh:
    """A trimesh.Trimesh (texture: PBR base colour x factor, or a simple material's image; vertex or face colours;
    none: grey) or a `data.meshio.Asset` (vertex colours and any number of textures) -> RenderMesh on `device`."""
    if hasattr(mesh, "colors") and hasattr(mesh, "textures"):  # a meshio.Asset
        return RenderMesh.from_asset(mesh, device)
    v = np.asarray(mesh.vertices, dtype=np.float32)
    f = np.asarray(mesh.faces, dtype=np.int64)
    visual, grey = getattr(mesh, "visual", None), np.full((len(v), 3), GREY, np.float32)
    kind = getattr(visual, "kind", None)
    if kind == "vertex":
        return _render_mesh(v, f, np.asarray(visual.vertex_colors, np.float32)[:, :3] / 255.0, device)
    if kind == "face":  # unshare the vertices so that each face keeps its colour
        fc = np.asarray(visual.face_colors, np.float32)[:, :3] / 255.0
        return _render_mesh(v[f].reshape(-1, 3), np.arange(3 * len(f)).reshape(-1, 3), np.repeat(fc, 3, 0), device)
    if kind != "texture":
        return _render_mesh(v, f, grey, device)
    mat = visual.material
    image = getattr(mat, "baseColorTexture", None)
    image = getattr(mat, "image", None) if image is None else image
    factor = getattr(mat, "baseColorFactor", None)
    factor = getattr(mat, "diffuse", None) if factor is None and image is None else factor
    rgb = np.ones(3) if factor is None else np.asarray(factor)[:3]
    rgb = (rgb / 255.0 if np.issubdtype(rgb.dtype, np.integer) else rgb).astype(np.float32)  # uint8 RGBA usually
    colours = np.broadcast_to(rgb, (len(v), 3)).copy()
    if image is None or visual.uv is None or len(visual.uv) != len(v):
        return _render_mesh(v, f, colours, device)
    tex = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    uv = np.asarray(visual.uv, np.float32)
    return _render_mesh(v, f, colours, device, uv, np.zeros(len(f), np.int64), tex)


def _render_mesh(v, f, colours, device, uvs=None, face_texture=None, texture=None) -> RenderMesh:
    t = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return RenderMesh(
        t(v),
        t(f, torch.int64),
        t(colours),
        None if uvs is None else t(uvs),
        None if face_texture is None else t(face_texture, torch.int64),
        () if texture is None else (t(texture),),
    )


def one_colour(mesh: RenderMesh) -> bool:
    """No texture and a single vertex colour: an unlit render would show a flat silhouette."""
    return mesh.uvs is None and bool((mesh.colors == mesh.colors[:1]).all())


def render(mesh: RenderMesh, views: Views, index: int, light: Light) -> tuple[torch.Tensor, torch.Tensor]:
    """View `index` of a mesh in the local frame -> rgb [3, S, S] float in [0, 1] (black background) and depth
    [S, S] (camera z, inf where empty), on the mesh's device."""
    rgb, depth = render_batch(mesh, views, [index], light)
    return rgb[0], depth[0]


def render_batch(
    mesh: RenderMesh, views: Views, indices: list[int] | range, light: Light
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views `indices` of a mesh in one `render_views` call -> rgb [B, 3, S, S] float in [0, 1] and depth [B, S, S],
    each view exactly what `render` gives for it."""
    w2c = views.world_to_camera[list(indices)].double().cpu().numpy()  # [B, 4, 4], one copy for the batch
    flip = np.diag([-1.0, -1.0, 1.0])  # OpenCV camera -> PyTorch3D camera
    K, s = views.K.double().cpu().numpy(), views.size
    shots = [Shot([Placed(mesh, (flip @ m[:3, :3]).T, flip @ m[:3, 3], 1.0)], K, light) for m in w2c]
    batch = render_views(shots, s, s, amodal=False, to_numpy=False)
    rgb = batch.rgb.permute(0, 3, 1, 2).contiguous()  # NCHW in memory, as the network had it view by view
    return rgb.float() / 255.0, batch.depth


# ---------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------


def _check_inputs(mesh, occupancy) -> np.ndarray:
    """Validate the mesh and the occupancy -> occupancy [N, 3] int64, unique rows sorted by (x, y, z)."""
    vertices = np.asarray(getattr(mesh, "vertices", None) if mesh is not None else None, dtype=np.float64)
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1:] != (3,) or faces.ndim != 2 or len(faces) == 0:
        raise ValueError(f"mesh: got {type(mesh).__name__} without faces; pass a trimesh.Trimesh with triangles")
    if not np.isfinite(vertices).all() or np.abs(vertices).max() > 0.5 + BOUNDS_TOLERANCE:
        raise ValueError(
            f"mesh: vertices span {vertices.min(0).round(3).tolist()}..{vertices.max(0).round(3).tolist()}, expected "
            "the local frame [-0.5, 0.5]^3 (z up); normalise the mesh as the occupancy was made"
        )
    occ = np.asarray(occupancy)
    if occ.ndim != 2 or occ.shape[1] != 3 or not np.issubdtype(occ.dtype, np.integer) or len(occ) == 0:
        raise ValueError(f"occupancy: got {occ.dtype} {occ.shape}, expected integer voxel indices [N, 3] with N >= 1")
    if occ.min() < 0 or occ.max() >= GRID:
        raise ValueError(f"occupancy: indices span {occ.min()}..{occ.max()}, expected 0..{GRID - 1} (the 64^3 grid)")
    return np.unique(occ.astype(np.int64), axis=0)


class LatentEncoder:
    """Sparse-structure encoder + DINOv2 + SLAT encoder, turning an object into its target latents.

    Build it with `from_imported(name)` (the encoders imported, or fitted, into a model folder) or
    `from_random(preset, seed)` (tests). `encode_sample` is the one entry point; conventions in the module doc.
    """

    def __init__(
        self,
        cfg: LatentEncoderConfig,
        ss_encoder: SSEncoder,
        slat_encoder: SLatEncoder,
        dino: DinoVisionTransformer,
        device: str | torch.device = "cpu",
        weights_id: str = "",
    ):
        cfg.check()
        self.cfg = cfg
        self.device = torch.device(device)
        self.ss_encoder = ss_encoder.to(self.device).eval()
        self.slat_encoder = slat_encoder.to(self.device).eval()
        self.dino = dino.to(self.device).eval()
        self.weights_id = weights_id
        self.views = sphere_views(
            cfg.num_views, cfg.fov_degrees, cfg.camera_distance, cfg.dino.image_size, cfg.view_seed
        )

    @classmethod
    def from_random(cls, preset: str = "tiny", seed: int = 0, device: str | torch.device = "cpu") -> LatentEncoder:
        """Deterministic random weights at a registry preset's sizes (tests; the latents mean nothing)."""
        cfg = encoder_preset(preset)
        nets = [SSEncoder(cfg.ss_encoder), SLatEncoder(cfg.slat_encoder), DinoVisionTransformer(cfg.dino)]
        for i, net in enumerate(nets):
            init_random_weights(net, seed=seed + i)
        return cls(cfg, *nets, device=device, weights_id=f"random:{preset}:{seed}")

    @classmethod
    def from_imported(
        cls, name: str, device: str | torch.device = "cpu", num_views: int | None = None
    ) -> LatentEncoder:
        """The encoders of an imported model (`sam3d weights import`, or added by `sam3d weights fit-encoder`) and its
        condition embedder's DINOv2, hash-checked. num_views: None keeps the official 150."""
        from sam3d_core.weights import hub

        ss_cfg, ss_state, ss_id = hub.load_ss_encoder_state(name)
        slat_cfg, slat_state, slat_id = hub.load_slat_encoder_state(name)
        dino_cfg, dino_state = hub.load_dino_state(name)
        cfg = LatentEncoderConfig(ss_encoder=ss_cfg, slat_encoder=slat_cfg, dino=dino_cfg)
        nets = [SSEncoder(ss_cfg), SLatEncoder(slat_cfg), DinoVisionTransformer(dino_cfg)]
        for net, state in zip(nets, (ss_state, slat_state, dino_state), strict=True):
            net.load_state_dict(state, strict=True)
        enc = cls(cfg, *nets, device=device, weights_id=f"ss:{ss_id} slat:{slat_id}")
        return enc if num_views is None else enc.with_views(num_views)

    @classmethod
    def load(cls, name: str, device: str | torch.device = "cpu") -> LatentEncoder:
        """`from_imported(name)` with the official 150 views: what `sam3d data ... --encoder NAME` resolves."""
        return cls.from_imported(name, device=device)

    def with_views(self, num_views: int, view_seed: int | None = None) -> LatentEncoder:
        """The same networks with another camera set (fewer views: faster, noisier features)."""
        seed = self.cfg.view_seed if view_seed is None else view_seed
        cfg = dataclasses.replace(self.cfg, num_views=num_views, view_seed=seed)
        return LatentEncoder(
            cfg, self.ss_encoder, self.slat_encoder, self.dino, device=self.device, weights_id=self.weights_id
        )

    @torch.no_grad()
    def encode_ss(self, occupancy: np.ndarray) -> np.ndarray:
        """Occupancy [N, 3] int on the 64^3 grid -> the shape latent [8, 16, 16, 16] float32 (posterior mean)."""
        coords = torch.as_tensor(np.asarray(occupancy, dtype=np.int64), device=self.device)
        mean, _ = self.ss_encoder(occupancy_grid(coords, GRID))
        return mean[0].cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def voxel_features(self, mesh, occupancy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-voxel DINO features averaged over the views that see each voxel.

        -> (features [N, C] float32, view counts [N] int64) for the rows of `occupancy` [N, 3]; rows seen by no
        view have count 0 and features 0.
        """
        dev, s = self.device, self.cfg.dino.image_size
        rmesh = render_mesh(mesh, dev)
        light = HEADLIGHT if one_colour(rmesh) else DELIT
        views = Views(self.views.world_to_camera.to(dev), self.views.K.to(dev), s)
        centres = (torch.as_tensor(occupancy, device=dev).float() + 0.5) / GRID - 0.5  # [N, 3]
        uv, z = project(centres, views)  # [V, N, 2], [V, N]
        n, c = len(centres), self.cfg.dino.embed_dim
        sums, counts = torch.zeros(n, c, device=dev), torch.zeros(n, dtype=torch.long, device=dev)
        mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
        side = s // self.cfg.dino.patch_size
        for start in range(0, self.cfg.num_views, self.cfg.views_per_batch):
            idx = range(start, min(start + self.cfg.views_per_batch, self.cfg.num_views))
            rgb, depths = render_batch(rmesh, views, idx, light)  # [B, 3, S, S], [B, S, S]
            tokens = self.dino.forward_features((rgb - mean) / std)["x_prenorm"]  # [B, 1 + R + P, C]
            fmap = tokens[:, 1 + self.cfg.dino.num_register_tokens :].transpose(1, 2).reshape(len(idx), c, side, side)
            for b, i in enumerate(idx):
                depth = depths[b]
                u, v = uv[i].unbind(-1)
                inside = (u >= 0) & (u < s) & (v >= 0) & (v < s) & (z[i] > 0)
                px, py = u.clamp(0, s - 1).long(), v.clamp(0, s - 1).long()
                seen = inside & (z[i] <= depth[py, px] + self.cfg.depth_tolerance)  # [N]
                rows = seen.nonzero().squeeze(1)
                grid = (uv[i, rows] / s * 2 - 1)[None, :, None]  # [1, M, 1, 2]
                feats = F.grid_sample(fmap[b : b + 1].float(), grid, mode="bilinear", align_corners=False)
                sums[rows] += feats[0, :, :, 0].T
                counts[rows] += 1
        feats = sums / counts.clamp(min=1)[:, None]
        return feats.cpu().numpy().astype(np.float32), counts.cpu().numpy()

    @torch.no_grad()
    def encode_sample(self, mesh, occupancy: np.ndarray) -> dict[str, np.ndarray]:
        """mesh (trimesh.Trimesh in the local frame [-0.5, 0.5]^3, z up; or a `data.meshio.Asset`, whose textures
        it keeps), occupancy [N, 3] int voxel indices on the 64^3 grid
        -> dict(ss_latent [8, 16, 16, 16] float32, slat_coords [M, 3] int64, slat_feats [M, 8] float32).

        Raises ValueError naming the problem for a mesh without faces or outside the local frame, bad occupancy, or
        an occupancy that no view sees (not made from this mesh?).
        """
        occ = _check_inputs(mesh, occupancy)
        feats, counts = self.voxel_features(mesh, occ)
        seen = counts > 0
        if not seen.any():
            raise ValueError(
                f"occupancy: none of its {len(occ)} voxels is visible in any of the {self.cfg.num_views} views; "
                "is it the voxelisation of this mesh, in the same local frame?"
            )
        coords = torch.as_tensor(occ[seen], device=self.device)  # [M, 3], sorted (x, y, z)
        batch = torch.zeros(len(coords), 1, dtype=coords.dtype, device=self.device)
        slat, _ = self.slat_encoder(torch.as_tensor(feats[seen], device=self.device), torch.cat([batch, coords], 1))
        return {
            "ss_latent": self.encode_ss(occ),
            "slat_coords": occ[seen].astype(np.int64),
            "slat_feats": slat.cpu().numpy().astype(np.float32),
        }

    @property
    def provenance(self) -> dict:
        """What made the latents, for a sample's provenance record."""
        c = self.cfg
        return {
            "encoders": self.weights_id,
            "num_views": c.num_views,
            "view_seed": c.view_seed,
            "fov_degrees": c.fov_degrees,
            "camera_distance": c.camera_distance,
            "depth_tolerance": c.depth_tolerance,
            "dino_image_size": c.dino.image_size,
        }
