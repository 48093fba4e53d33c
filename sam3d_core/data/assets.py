"""Source (b): an asset library rendered into background photos (render-paste with flying occlusion).

    report = build_assets("library/", "backgrounds/", "out/", AssetSettings(views=4, seed=0))

Folder layout (docs/data.md):

    library/                      meshes at any depth: .obj (+ .mtl + textures) .glb .gltf .ply .stl .off .fbx .blend
      chairs/oak_chair.glb        the first folder level is the object group ("chairs"); files at the top: no group
      licences.json               optional: {"chairs/oak_chair.glb": "CC-BY-4.0 (Jane Doe)", "*": "CC0-1.0"}
    backgrounds/                  photos (.jpg .png ...), any size >= 64 px; a random crop of one is each background
    hdrs/                         optional (--hdrs): equirectangular .exr / .hdr maps; with probability p_hdr a view
                                  is lit from one (`envlight`: its dominant direction, ambient share and tint)

Per asset: load (y-up files turned z-up, normalised into the local frame), 64^3 surface occupancy, the held-out
check (`heldout.HeldOut`: benchmark objects and photos, libero-pro scans), the latents (when an encoder is
given), then `views` renders: random camera, pose, light, background crop, and the flying-occlusion modes of
`synth` with the other assets as occluders. The stored `mask` is the visible mask after SAM-like noise (with
probability `mask_noise`; what was done is in provenance), `amodal_mask` is exact, and so are the pose, K,
occupancy and latents. Real size: GLB / glTF are metres; other formats follow `units` ("m", "cm", "mm", or
"auto": a longest side above 20 units is read as cm).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sam3d_core.data.build import BuildReport, LatentEncoderLike, check_output, encode_latents, photo_files, read_rgb
from sam3d_core.data.heldout import HeldOut
from sam3d_core.data.meshio import SUFFIXES, Asset, MeshError, file_sha256, load_asset
from sam3d_core.data.render import RenderMesh
from sam3d_core.data.sample import Sample, ShardWriter
from sam3d_core.data.synth import SceneConfig, background_crop, mask_noise, render_scene, sample_scene
from sam3d_core.data.voxelize import sample_surface, voxelize

UNITS = {"m": 1.0, "cm": 0.01, "mm": 0.001}
OCCLUDER_POOL = 12  # assets kept loaded as occluders


@dataclass(frozen=True)
class AssetSettings:
    views: int = 4  # renders per asset
    seed: int = 0
    scene: SceneConfig = field(default_factory=SceneConfig)
    mask_noise: float = 0.5  # probability of SAM-like noise on the stored visible mask
    units: str = "auto"
    up: str = "y"
    fill: bool = False  # solid occupancy (flood fill) instead of surface voxels
    surface_points: int = 0  # points sampled on the surface, stored for evaluation (0 = none)
    pointmap: bool = False  # store the rendered point map (3.2 MB per 518^2 sample)
    licence: str = "unknown"  # for assets that licences.json does not name
    p_hdr: float = 0.5  # with --hdrs: probability that a view is lit from an environment map
    device: str = "cpu"
    samples_per_shard: int = 256

    def check(self) -> AssetSettings:
        if self.views < 1:
            raise ValueError(f"views: got {self.views}, expected at least 1 render per asset")
        if self.units not in ("auto", *UNITS):
            raise ValueError(f"units: got {self.units!r}, expected one of auto, {', '.join(UNITS)}")
        if not 0 <= self.mask_noise <= 1:
            raise ValueError(f"mask_noise: got {self.mask_noise}, expected a probability in [0, 1]")
        self.scene.check()
        return self


class EncoderFailed(RuntimeError):
    pass


@dataclass
class Prepared:
    """An asset ready to render: the mesh, its targets and where it came from."""

    rel: str
    asset: Asset
    mesh: RenderMesh
    size_m: float
    occupancy: np.ndarray
    latents: dict
    group: str
    licence: str


def size_in_metres(asset: Asset, suffix: str, units: str) -> float:
    if suffix in (".glb", ".gltf"):
        return asset.size
    if units == "auto":
        return asset.size * (0.01 if asset.size > 20 else 1.0)
    return asset.size * UNITS[units]


def _licences(folder: Path, report: BuildReport) -> dict:
    path = folder / "licences.json"
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
        return {str(k): str(v) for k, v in table.items()}
    except (OSError, ValueError) as e:
        report.skip("unreadable licences.json", str(path), f"cannot be read ({e}); licences fall back to --licence")
        return {}


def prepare_asset(
    path: Path,
    root: Path,
    settings: AssetSettings,
    guard: HeldOut,
    encoder: LatentEncoderLike | None,
    licences: dict,
) -> Prepared:
    """Load, voxelise, check against the held-out lists, encode. Raises MeshError / ValueError with the reason."""
    rel = path.relative_to(root).as_posix()
    if reason := guard.path_reason(path):
        raise PermissionError(reason)
    sha = file_sha256(path)
    if reason := guard.mesh_reason(sha, path):
        raise PermissionError(reason)
    asset = load_asset(path, up=settings.up)
    occ = voxelize(asset.vertices, asset.faces, fill=settings.fill)
    if reason := guard.mesh_reason(asset.sha256, path, occ):
        raise PermissionError(reason)
    try:
        latents = encode_latents(encoder, asset, occ)  # the Asset: geometry, colours and textures
    except Exception as e:  # the encoder is someone else's code: one failure must not stop the build
        raise EncoderFailed(f"the latent encoder failed on it ({type(e).__name__}: {e})") from None
    parts = Path(rel).parts
    return Prepared(
        rel=rel,
        asset=asset,
        mesh=RenderMesh.from_asset(asset, settings.device),
        size_m=size_in_metres(asset, path.suffix.lower(), settings.units),
        occupancy=occ,
        latents=latents,
        group=parts[0] if len(parts) > 1 else "",
        licence=licences.get(rel, licences.get("*", settings.licence)),
    )


def _try_prepare(path, root, settings, guard, encoder, licences, report) -> Prepared | None:
    try:
        return prepare_asset(path, root, settings, guard, encoder, licences)
    except PermissionError as e:
        report.skip("held out (benchmark / reserved)", path.relative_to(root).as_posix(), str(e))
    except MeshError as e:
        reason = "mesh without faces" if "no faces" in str(e) or "no triangles" in str(e) else "unreadable mesh"
        report.skip(reason, path.relative_to(root).as_posix(), str(e))
    except EncoderFailed as e:
        report.skip("encoder failed", path.relative_to(root).as_posix(), str(e))
    except Exception as e:  # a file that trips a reader in an unforeseen way: count it, build the rest
        report.skip("unreadable mesh", path.relative_to(root).as_posix(), f"{type(e).__name__}: {e}")
    return None


def load_backgrounds(folder: str | Path, guard: HeldOut, report: BuildReport) -> list[tuple[str, np.ndarray]]:
    out = []
    for p in photo_files(folder):
        name = p.relative_to(folder).as_posix()
        try:
            rgb = read_rgb(p)
        except (ValueError, OSError) as e:
            report.skip("unreadable background", name, str(e))
            continue
        if reason := guard.photo_reason(file_sha256(p), p, rgb):
            report.skip("held out (benchmark / reserved)", name, reason)
            continue
        out.append((name, rgb))
    if not out:
        raise FileNotFoundError(
            f"no usable background photo in {folder} (see the skipped list); add .jpg / .png photos that are not "
            "benchmark backgrounds"
        )
    return out


def render_sample(
    prep: Prepared,
    view: int,
    rng: np.random.Generator,
    others: list[tuple[str, RenderMesh, float]],
    backgrounds: list[tuple[str, np.ndarray]],
    settings: AssetSettings,
    source: str = "asset",
    environments: list[tuple[str, np.ndarray]] = (),
) -> Sample:
    """One render-paste view of a prepared asset -> Sample (raises ValueError when the target is not visible)."""
    cfg = settings.scene
    scene = sample_scene(rng, prep.mesh, prep.size_m, others, cfg)
    light_info: dict = {}
    if environments and rng.uniform() < settings.p_hdr:
        from sam3d_core.data.envlight import light_from_environment

        env_name, env = environments[int(rng.integers(0, len(environments)))]
        scene.light, light_info = light_from_environment(env, rng, np.asarray(scene.target.rotation))
        light_info["hdr"] = env_name
    bg_name, bg = backgrounds[int(rng.integers(0, len(backgrounds)))]
    background = background_crop(rng, bg, cfg.width, cfg.height)
    view_, info = render_scene(scene, rng, others, background, cfg)
    mask, noise = view_.mask, None
    if rng.uniform() < settings.mask_noise:
        mask, noise = mask_noise(view_.mask, rng)
    pts = None
    if settings.surface_points:
        pts = sample_surface(prep.asset.vertices, prep.asset.faces, settings.surface_points, seed=view)
    t = scene.target
    return Sample(
        sample_id=f"{prep.rel}#{view}",
        photo=view_.rgb,
        mask=mask,
        amodal_mask=view_.amodal,
        K=scene.K,
        rotation=np.asarray(t.rotation, np.float64),
        translation=np.asarray(t.translation, np.float64),
        scale=np.full(3, float(t.scale)),
        occupancy=prep.occupancy.copy(),  # own arrays per sample: a shard refuses tensors that share memory
        # NaN where no surface (the sample format's invalid point; preprocess skips NaN, a 0 would count)
        pointmap=np.where(view_.coverage[..., None], view_.pointmap, np.nan).astype(np.float32)
        if settings.pointmap
        else None,
        **{k: v.copy() for k, v in prep.latents.items()},
        surface_points=pts,
        source=source,
        licence=prep.licence,
        group=prep.group,
        occlusion=info["occlusion"],
        provenance={
            "asset": prep.rel,
            "asset_sha256": prep.asset.sha256,
            "size_m": round(prep.size_m, 6),
            "background": bg_name,
            "view": view,
            "scene": info,
            "fov_deg": round(float(np.degrees(2 * np.arctan(cfg.width / 2 / scene.K[0, 0]))), 3),
            "light": {
                "direction": np.round(scene.light.direction, 4).tolist(),
                "ambient": round(scene.light.ambient, 4),
                "diffuse": round(scene.light.diffuse, 4),
                **light_info,
            },
            "mask_noise": noise,
            "visible_pixels_exact": int(view_.mask.sum()),
        },
    )


def load_environments(folder: str | Path, guard: HeldOut, report: BuildReport) -> list[tuple[str, np.ndarray]]:
    """The HDR environment maps of a folder (.exr / .hdr), benchmark ones refused, unreadable ones counted."""
    from sam3d_core.data.envlight import SUFFIXES as HDR_SUFFIXES
    from sam3d_core.data.envlight import read_environment

    folder = Path(folder)
    out = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.suffix.lower() in HDR_SUFFIXES):
        name = p.relative_to(folder).as_posix()
        if reason := guard.photo_reason(file_sha256(p), p):
            report.skip("held out (benchmark / reserved)", name, reason)
            continue
        try:
            out.append((name, read_environment(p)))
        except ValueError as e:
            report.skip("unreadable HDR", name, str(e))
    return out


def build_assets(
    folder: str | Path,
    backgrounds: str | Path,
    out: str | Path,
    settings: AssetSettings | None = None,
    *,
    encoder: LatentEncoderLike | None = None,
    heldout: HeldOut | None = None,
    occluders: str | Path | None = None,
    hdrs: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """Render every usable asset of `folder` `views` times into samples in `out` (new or empty). See the
    module doc. Bad inputs are skipped and counted in the returned report, never fatal; an output folder
    that is not empty, or no usable background at all, raises before any work."""
    settings = (settings or AssetSettings()).check()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"asset folder {folder} does not exist; give a folder of meshes")
    out = check_output(out)
    guard = heldout if heldout is not None else HeldOut.load()
    report = BuildReport("assets")
    bgs = load_backgrounds(backgrounds, guard, report)
    envs = load_environments(hdrs, guard, report) if hdrs is not None else []
    licences = _licences(folder, report)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no mesh files ({', '.join(SUFFIXES)}) in {folder}")

    # The occluder pool: other assets of the library (plus --occluders), loaded once.
    order = np.random.default_rng(settings.seed).permutation(len(files))
    cache: dict[Path, Prepared | None] = {}
    pool = []
    for i in order[: 2 * OCCLUDER_POOL]:
        if len(pool) >= OCCLUDER_POOL:
            break
        cache[files[i]] = prep = _try_prepare(files[i], folder, settings, guard, encoder, licences, report)
        if prep is not None:
            pool.append((prep.rel, prep.mesh, prep.size_m))
    if occluders is not None:
        occ_root = Path(occluders)
        for p in sorted(q for q in occ_root.rglob("*") if q.suffix.lower() in SUFFIXES):
            prep = _try_prepare(p, occ_root, settings, guard, None, {}, report)
            if prep is not None:
                pool.append(("occluders/" + prep.rel, prep.mesh, prep.size_m))

    with ShardWriter(out, samples_per_shard=settings.samples_per_shard) as writer:
        for n, path in enumerate(files):
            prep = (
                cache.pop(path)
                if path in cache
                else _try_prepare(path, folder, settings, guard, encoder, licences, report)
            )
            if prep is not None:
                others = [o for o in pool if o[0] != prep.rel]
                for view in range(settings.views):
                    rng = np.random.default_rng([settings.seed, n, view])
                    try:
                        writer.add(render_sample(prep, view, rng, others, bgs, settings, environments=envs))
                        report.written += 1
                    except ValueError as e:
                        report.skip("view without a visible target", f"{prep.rel}#{view}", str(e))
                    except (RuntimeError, IndexError, TypeError) as e:  # counted, the build goes on
                        report.skip("render failed", f"{prep.rel}#{view}", f"{type(e).__name__}: {e}")
            if progress:
                progress(n + 1, len(files))
        writer.info = {"builder": "assets", "settings": _settings_record(settings), "report": report.as_dict()}
    return report


def _settings_record(settings: AssetSettings) -> dict:
    rec = asdict(settings)
    rec["occupancy"] = "solid" if settings.fill else "surface"
    return rec
