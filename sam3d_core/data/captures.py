"""Source (a): captures, i.e. real photos of objects with their meshes (scans, or models matched by hand).

    report = build_captures("captures/", "out/", CaptureSettings())

Folder layout (docs/data.md), one folder per object in one photo:

    captures/
      mug_01/
        photo.jpg          the photo (one file named photo.*: jpg, png, webp, ...)
        mask.png           the object's visible mask in the photo (white = object), the photo's size
        mesh.glb           the object's mesh (one file named mesh.*: glb, gltf, obj + mtl + textures, ply, fbx, blend)
        pose.json          optional: {"matrix": 4x4 (column vectors) mesh-file coordinates -> camera,
                                      "convention": "opencv" | "pytorch3d" | "gltf"}   (default "opencv")
        camera.json        optional: {"K": 3x3 pixel intrinsics} or {"fov_deg": horizontal degrees}
        licence.txt        optional: the capture's licence (first line), else --licence

K: camera.json, else the photo's EXIF, else a 50-degree default (`inputs.camera.resolve_intrinsics`).
Pose: from pose.json (any similarity; its scale times the mesh's size is the sample's scale; marked "given",
with the reprojection IoU against the mask in provenance as a check), else found by render-and-compare of
the mesh against the mask (`posefit`; marked "fitted" with its silhouette IoU; the scale is the mesh's real
size, so the mesh must be in real units: `units`). A fit below `min_iou` is skipped and counted. The
amodal mask of a real photo is unknown (None).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sam3d_core.data.assets import UNITS, size_in_metres
from sam3d_core.data.build import PHOTO_SUFFIXES, BuildReport, LatentEncoderLike, check_output, encode_latents
from sam3d_core.data.meshio import SUFFIXES, Asset, MeshError, load_asset
from sam3d_core.data.posefit import FitSettings, fit_pose
from sam3d_core.data.sample import Sample, SampleError, ShardWriter
from sam3d_core.data.voxelize import sample_surface, voxelize
from sam3d_core.geometry import frames


@dataclass(frozen=True)
class CaptureSettings:
    units: str = "m"  # of the mesh files, for fitted poses (a given pose matrix carries its own scale)
    up: str = "y"  # the mesh files' up axis (glTF / OBJ: y)
    min_iou: float = 0.5  # fitted poses below this silhouette IoU are skipped
    fill: bool = False
    surface_points: int = 0
    licence: str = "unknown"
    fit: FitSettings = field(default_factory=FitSettings)
    samples_per_shard: int = 256

    def check(self) -> CaptureSettings:
        if self.units not in ("auto", *UNITS):
            raise ValueError(f"units: got {self.units!r}, expected one of auto, {', '.join(UNITS)}")
        if not 0 <= self.min_iou <= 1:
            raise ValueError(f"min_iou: got {self.min_iou}, expected a value in [0, 1]")
        return self


class CaptureError(ValueError):
    """One capture folder that cannot become a sample; `reason` is the summary's category."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def pose_from_matrix(matrix, convention: str, asset: Asset, up: str) -> tuple[np.ndarray, np.ndarray, float]:
    """A 4x4 mesh-file -> camera matrix (column vectors, in `convention`'s camera frame) -> the sample's
    (rotation [3, 3] row-vector, translation [3], scale) for the asset's local frame.

    With turn = the up-axis turn `load_asset` applied and v_turned = size * v_local + centre:
    p_p3d = C A turn^T (size v_local + centre) + C b, so with L = C A turn^T = s_A Rc: rotation = Rc^T,
    scale = size * s_A, translation = C (A turn^T centre + b).
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise ValueError(f"pose matrix: got shape {m.shape}, expected a finite 4x4 (column vectors)")
    C = frames.frame_matrix(convention, "pytorch3d")
    turn = frames.GLTF_LOCAL_TO_LOCAL if up == "y" else np.eye(3)
    L = C @ m[:3, :3] @ turn.T
    det = np.linalg.det(L)
    if not det > 0:
        raise ValueError("pose matrix: its 3x3 part mirrors or collapses the mesh (det <= 0); give a rotation x scale")
    s_a = det ** (1 / 3)
    Rc = L / s_a
    if not np.allclose(Rc @ Rc.T, np.eye(3), atol=1e-3):
        raise ValueError("pose matrix: its 3x3 part is not a rotation times a uniform scale (shear or per-axis scale)")
    u, _, vt = np.linalg.svd(Rc)  # nearest exact rotation
    Rc = u @ vt
    t = C @ (m[:3, :3] @ turn.T @ asset.centre + m[:3, 3])
    return Rc.T, t, float(asset.size * s_a)


def _one(folder: Path, pattern: tuple[str, ...], what: str) -> Path | None:
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.stem == what and p.suffix.lower() in pattern)
    return found[0] if found else None


def _camera(folder: Path, photo) -> tuple[np.ndarray, str]:
    from sam3d_core.inputs.camera import resolve_intrinsics

    path = folder / "camera.json"
    if not path.is_file():
        return resolve_intrinsics(photo, notes=[])
    try:
        cam = json.loads(path.read_text())
        K = np.asarray(cam["K"], np.float64) if "K" in cam else None
        fov = float(cam["fov_deg"]) if "fov_deg" in cam else None
        if K is None and fov is None:
            raise KeyError("K or fov_deg")
        return resolve_intrinsics(photo, K=K, fov=fov)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CaptureError("bad camera.json", f"camera.json cannot be used ({e}); give {{'K': 3x3}}") from None


def capture_sample(folder: Path, settings: CaptureSettings, encoder: LatentEncoderLike | None = None) -> Sample:
    """One capture folder -> Sample, or CaptureError with the reason (see the module doc)."""
    from sam3d_core.inputs.imageio import InputError, load_mask, load_photo

    name = folder.name
    photo_path = _one(folder, PHOTO_SUFFIXES, "photo")
    if photo_path is None:
        raise CaptureError("no photo", "no photo.* file (photo.jpg, photo.png, ...) in the folder")
    mask_path = _one(folder, PHOTO_SUFFIXES, "mask")
    if mask_path is None:
        raise CaptureError("photo without mask", "has a photo but no mask.png; paint the object white on black")
    mesh_path = _one(folder, SUFFIXES, "mesh")
    if mesh_path is None:
        raise CaptureError("no mesh", f"no mesh.* file ({', '.join(SUFFIXES)}) in the folder")
    try:
        photo = load_photo(photo_path)
        mask = load_mask(mask_path, photo, notes=[])
    except (InputError, OSError) as e:
        raise CaptureError("unreadable photo or mask", str(e)) from None
    K, k_source = _camera(folder, photo)
    try:
        asset = load_asset(mesh_path, up=settings.up)
        occ = voxelize(asset.vertices, asset.faces, fill=settings.fill)
    except MeshError as e:
        reason = "mesh without faces" if "no faces" in str(e) or "no triangles" in str(e) else "unreadable mesh"
        raise CaptureError(reason, str(e)) from None
    except Exception as e:  # a file that trips a reader in an unforeseen way: count it, build the rest
        raise CaptureError("unreadable mesh", f"{type(e).__name__}: {e}") from None
    prov: dict = {"capture": name, "photo": photo_path.name, "mesh": mesh_path.name, "mesh_sha256": asset.sha256}
    prov["intrinsics"] = k_source
    pose_path = folder / "pose.json"
    if pose_path.is_file():
        try:
            rec = json.loads(pose_path.read_text())
            R, t, s = pose_from_matrix(rec["matrix"], rec.get("convention", "opencv"), asset, settings.up)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CaptureError("bad pose.json", f"pose.json cannot be used ({e})") from None
        v_cam = (asset.vertices * s) @ R + t
        sil = frames.render_silhouette(v_cam, asset.faces, K, photo.width, photo.height)
        prov |= {"pose_source": "given", "mask_iou": round(frames.mask_iou(sil, mask), 4)}
    else:
        size = size_in_metres(asset, mesh_path.suffix.lower(), settings.units)
        fit = fit_pose(asset.vertices, asset.faces, size, mask, K, settings.fit)
        if fit.iou < settings.min_iou:
            raise CaptureError(
                "pose fit failed",
                f"the best fitted pose reaches silhouette IoU {fit.iou:.3f} < {settings.min_iou}; check the mask "
                "and the mesh, or give pose.json",
            )
        R, t, s = fit.rotation, fit.translation, fit.scale
        prov |= {"pose_source": "fitted", "fit_iou": round(fit.iou, 4), "fit_evaluations": fit.evaluations}
    try:
        latents = encode_latents(encoder, asset, occ)  # the Asset: geometry, colours and textures
    except Exception as e:  # the encoder is someone else's code: one failure must not stop the build
        raise CaptureError("encoder failed", f"{type(e).__name__}: {e}") from None
    licence_path = folder / "licence.txt"
    licence = settings.licence
    if licence_path.is_file():
        licence = (licence_path.read_text(errors="replace").strip().splitlines() or [licence])[0]
    pts = sample_surface(asset.vertices, asset.faces, settings.surface_points) if settings.surface_points else None
    return Sample(
        sample_id=name,
        photo=photo.rgb,
        mask=mask,
        K=np.asarray(K, np.float64),
        rotation=R,
        translation=np.asarray(t, np.float64),
        scale=np.full(3, s),
        occupancy=occ,
        ss_latent=latents.get("ss_latent"),
        slat_coords=latents.get("slat_coords"),
        slat_feats=latents.get("slat_feats"),
        surface_points=pts,
        source="capture",
        licence=licence,
        provenance=prov,
    )


def build_captures(
    folder: str | Path,
    out: str | Path,
    settings: CaptureSettings | None = None,
    *,
    encoder: LatentEncoderLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """Every capture folder under `folder` -> samples in `out` (new or empty). Bad captures are skipped and
    counted in the returned report."""
    settings = (settings or CaptureSettings()).check()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"capture folder {folder} does not exist")
    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not subs:
        raise FileNotFoundError(f"{folder} holds no capture folders (one folder per object: photo, mask, mesh)")
    out = check_output(out)
    report = BuildReport("captures")
    with ShardWriter(out, samples_per_shard=settings.samples_per_shard) as writer:
        for i, sub in enumerate(subs):
            try:
                writer.add(capture_sample(sub, settings, encoder))
                report.written += 1
            except CaptureError as e:
                report.skip(e.reason, sub.name, str(e))
            except SampleError as e:
                report.skip("invalid sample", sub.name, str(e))
            if progress:
                progress(i + 1, len(subs))
        rec = asdict(settings) | {"occupancy": "solid" if settings.fill else "surface"}
        writer.info = {"builder": "captures", "settings": rec, "report": report.as_dict()}
    return report
