"""A render pack: an asset library boiled down to what on-the-fly training views need, small enough to carry.

    report = build_furniture_pack("pack/")            # Sweet Home 3D furniture (benchmark objects refused)
    pack = RenderPack.load("pack/")                   # numpy arrays, any process
    ds = RenderPackDataset(pack, seed=0)              # ds[i] -> a Sample (rendered on the CPU, deterministic in i)

Why a pack rather than sample shards: a from-scratch model wants hundreds of thousands of views; as shards (photo,
point map, masks) that is hundreds of GB, while the meshes they come from fit in a few tens of MB. The pack
holds, per object, a render mesh (decimated to `max_faces`, colours baked into its vertices), the 64^3 surface
occupancy of the FULL mesh (the target), the real size, group, licence and attribution; plus background photos
(resized). `RenderPackDataset` renders a view per index with the render-paste recipe of `data.synth` (flying
occluders are other pack objects; SAM-like mask noise) into a `Sample` that the training loop's collate turns
into a batch exactly as it does a stored sample.

Files (a folder): `pack.json` (format "sam3d-render-pack", version, objects, backgrounds, licences, settings)
and `pack.npz` (compressed): `vertices` float16 [sum V, 3] local frame, `faces` int32 [sum F, 3] (per-object
vertex indices), `colors` uint8 [sum V, 3] (sRGB), `occupancy` uint8 [N, 64^3 / 8] (np.packbits of the x, y, z
grid), `v_offsets` / `f_offsets` int64 [N + 1], `backgrounds` uint8 (the photos' JPEG bytes, concatenated) with
`bg_offsets` int64 [B + 1]. Stage-1 latents of the objects are added later by the default model's
training (`latents.npy` float32 [N, C, R, R, R] + `latents.json`), written beside them.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sam3d_core.data.build import BuildReport, check_output
from sam3d_core.data.sample import SampleError

PACK_FORMAT, PACK_VERSION = "sam3d-render-pack", 1
GRID = 64
MAX_FACES = 2500  # render-mesh budget per object: silhouettes and colours of a coarse model need no more
BACKGROUND_SIDE = 384  # longest side of the stored background photos
# Training views follow the benchmark's scene ranges (data/benchmark.py) at a smaller size; the crop the model
# sees is resized to its input size anyway.
VIEW_SIZE = 384
MIN_MASK_FRACTION = 0.002  # the render-paste recipe's minimum visible area (data/synth.py)


# ---------------------------------------------------------------------------------------------------
# Building (CPU, once, where the package registries are reachable)
# ---------------------------------------------------------------------------------------------------


def _vertex_colours(asset) -> np.ndarray:
    """Per-vertex sRGB colours [V, 3] uint8: texture colours sampled at each face's UV centroid, averaged over
    the faces around each vertex (area-weighted); vertex colours where a face has no texture."""
    v, f = asset.vertices, asset.faces
    face_rgb = asset.colors[f].mean(axis=1)  # [F, 3] in [0, 1]
    if asset.uvs is not None and asset.face_texture is not None and asset.textures:
        uv = asset.uvs[f].mean(axis=1)  # [F, 2], v up
        for t, tex in enumerate(asset.textures):
            sel = np.flatnonzero(asset.face_texture == t)
            if not len(sel):
                continue
            h, w = tex.shape[:2]
            x = np.mod(uv[sel, 0], 1.0) * (w - 1)
            y = (1.0 - np.mod(uv[sel, 1], 1.0)) * (h - 1)
            face_rgb[sel] = tex[y.round().astype(int), x.round().astype(int), :3] / 255.0
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1) + 1e-12
    acc = np.zeros((len(v), 3))
    wsum = np.zeros(len(v))
    for k in range(3):
        np.add.at(acc, f[:, k], face_rgb * area[:, None])
        np.add.at(wsum, f[:, k], area)
    rgb = acc / np.maximum(wsum, 1e-12)[:, None]
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def render_mesh_arrays(asset, max_faces: int = MAX_FACES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An Asset -> (vertices float16 [V, 3], faces int32 [F, 3], colours uint8 [V, 3]) with at most `max_faces`
    faces: fast-simplification's quadric decimation; each kept vertex takes the colour of the nearest original one."""
    from scipy.spatial import cKDTree

    colours = _vertex_colours(asset)
    v, f = np.asarray(asset.vertices, np.float64), np.asarray(asset.faces, np.int64)
    if len(f) > max_faces:
        import fast_simplification

        v2, f2 = fast_simplification.simplify(v.astype(np.float32), f.astype(np.int32), 1.0 - max_faces / len(f))
        if len(f2) >= 4:
            _, nearest = cKDTree(v).query(v2)
            v, f, colours = np.asarray(v2, np.float64), np.asarray(f2, np.int64), colours[nearest]
    return v.astype(np.float16), f.astype(np.int32), colours


def _write_pack(out: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """pack.npz then pack.json, each under a temporary name renamed into place (pack.json last: its presence
    means the pack is complete)."""
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".pack-", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, out / "pack.npz")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".pack-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(tmp, out / "pack.json")


def build_furniture_pack(
    out: str | Path,
    *,
    cache: str | Path | None = None,
    manifest: str | Path | None = None,
    max_faces: int = MAX_FACES,
    limit: int | None = None,
    log: Callable[[str], None] = lambda s: None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """The Debian `sweethome3d-furniture` pieces the benchmark's filter admits (same categories, 10..150 cm), minus
    every benchmark object (sha256 and shape fingerprint, `data.heldout`), and every scikit-image / opencv-doc
    colour photo that is not a benchmark background -> a render pack in `out` (new or empty)."""
    from sam3d_core.data import benchmark as bm
    from sam3d_core.data.heldout import HeldOut
    from sam3d_core.data.meshio import MeshError, file_sha256
    from sam3d_core.data.voxelize import voxelize

    out = check_output(out)
    cache = Path(cache) if cache else bm.default_cache()
    guard = HeldOut.load(manifest)
    report = BuildReport("pack")
    furn = bm.fetch_source("sweethome3d-furniture", cache, log) / bm.FURNITURE
    pieces = []
    for cat in sorted(bm.CATALOGUE_LICENCES):
        for piece in bm.read_catalogue(furn / f"{cat}.sh3f"):
            if piece.category in bm.EXCLUDED_CATEGORIES or piece.door_or_window or not piece.model.endswith(".obj"):
                continue
            if 10.0 <= max(piece.size_cm) <= 150.0:
                pieces.append((piece, furn / f"{cat}.sh3f"))
    if limit is not None:
        pieces = pieces[:limit]
    verts, faces, cols, occs, objects = [], [], [], [], []
    for k, (piece, sh3f) in enumerate(pieces):
        name = f"{piece.catalogue}/{Path(piece.model).stem}"
        try:
            obj = bm.extract_piece(sh3f, piece.model, cache / "extracted")
            if bm._triangles(obj) > 200_000:
                report.skip("mesh too large", name, "over 200k triangles")
                continue
            sha = file_sha256(obj)
            if r := guard.mesh_reason(sha, obj):
                report.skip("held out", name, r)
                continue
            asset = bm.load_piece(obj, piece.model_rotation)
            occ = voxelize(asset.vertices, asset.faces)
            if r := guard.mesh_reason(sha, obj, occ):
                report.skip("held out", name, r)
                continue
            v, f, c = render_mesh_arrays(asset, max_faces)
        except (MeshError, ValueError, OSError) as e:
            report.skip("mesh unusable", name, str(e))
            continue
        grid = np.zeros((GRID, GRID, GRID), bool)
        grid[occ[:, 0], occ[:, 1], occ[:, 2]] = True
        verts.append(v)
        faces.append(f)
        cols.append(c)
        occs.append(np.packbits(grid.reshape(-1)))
        licence, holder = bm.CATALOGUE_LICENCES[piece.catalogue]
        objects.append(
            {
                "name": name,
                "title": piece.name,
                "group": piece.group,
                "size_m": max(piece.size_cm) / 100.0,
                "sha256": sha,
                "licence": licence,
                "attribution": f"\u201c{piece.name}\u201d by {piece.creator}; {holder}",
                "voxels": int(len(occ)),
            }
        )
        report.written += 1
        if progress:
            progress(k + 1, len(pieces))
    if not objects:
        raise SampleError("no usable object: nothing to pack")
    backgrounds, bg_meta = _pack_backgrounds(cache, guard, report, log)
    source = "Debian sweethome3d-furniture 1.8-1; scikit-image 0.26.0 and Debian opencv-doc 4.6.0 photos"
    write_pack(out, verts, faces, cols, occs, objects, backgrounds, bg_meta, source, max_faces, report.as_dict())
    return report


def write_pack(
    out: Path,
    verts: list[np.ndarray],
    faces: list[np.ndarray],
    cols: list[np.ndarray],
    occs: list[np.ndarray],
    objects: list[dict],
    backgrounds: list[np.ndarray],
    bg_meta: list[dict],
    source: str,
    max_faces: int = MAX_FACES,
    report: dict | None = None,
) -> None:
    """Write a pack from per-object arrays (render_mesh_arrays' output, np.packbits of the 64^3 occupancy) and
    per-object records (name, group, size_m, licence, attribution), backgrounds as JPEG bytes (uint8 arrays)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    v_off = np.cumsum([0] + [len(v) for v in verts])
    f_off = np.cumsum([0] + [len(f) for f in faces])
    bg_off = np.cumsum([0] + [b.size for b in backgrounds])
    arrays = {
        "vertices": np.concatenate(verts).astype(np.float16),
        "faces": np.concatenate(faces).astype(np.int32),
        "colors": np.concatenate(cols).astype(np.uint8),
        "occupancy": np.stack(occs),
        "v_offsets": v_off.astype(np.int64),
        "f_offsets": f_off.astype(np.int64),
        "backgrounds": np.concatenate([b.reshape(-1) for b in backgrounds]),
        "bg_offsets": bg_off.astype(np.int64),
    }
    licences: dict[str, int] = {}
    for o in objects + bg_meta:
        licences[o["licence"]] = licences.get(o["licence"], 0) + 1
    meta = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "source": source,
        "max_faces": max_faces,
        "objects": objects,
        "backgrounds": bg_meta,
        "licences": licences,
        "report": report or {},
    }
    _write_pack(out, meta, arrays)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> np.ndarray:
    """[h, w, 3] uint8 -> the JPEG file's bytes as a uint8 array (how a pack stores its backgrounds)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, np.uint8)).save(buf, format="JPEG", quality=quality)
    return np.frombuffer(buf.getvalue(), np.uint8)


def _pack_backgrounds(cache: Path, guard, report: BuildReport, log) -> tuple[list[np.ndarray], list[dict]]:
    """Colour photos of scikit-image's and opencv-doc's sample data that are not benchmark backgrounds, resized so
    that the longest side is BACKGROUND_SIDE."""
    from PIL import Image

    from sam3d_core.data import benchmark as bm
    from sam3d_core.data.build import read_rgb
    from sam3d_core.data.meshio import file_sha256

    sources = {
        "scikit-image": ("skimage/data", "CC0-1.0 / public domain (scikit-image data; see its README)"),
        "opencv-doc": ("usr/share/doc/opencv-doc/examples/data", "Apache-2.0 AND BSD-3-Clause (OpenCV samples)"),
    }
    images, meta = [], []
    for source, (folder, licence) in sources.items():
        root = bm.fetch_source(source, cache, log) / folder
        for path in sorted(p for p in root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
            try:
                rgb = read_rgb(path)
            except Exception as e:  # noqa: BLE001 (any unreadable sample photo is skipped and counted)
                report.skip("photo unusable", path.name, str(e).splitlines()[0])
                continue
            if r := guard.photo_reason(file_sha256(path), path, rgb):
                report.skip("held out", path.name, r)
                continue
            h, w = rgb.shape[:2]
            chroma = float(np.abs(rgb.astype(np.int16) - rgb.mean(axis=2, keepdims=True)).mean())
            if min(h, w) < 200 or chroma < 4.0:  # thumbnails and grey-level pictures make poor backgrounds
                report.skip("photo unsuitable", path.name, f"{w}x{h}, colourfulness {chroma:.1f}")
                continue
            s = BACKGROUND_SIDE / max(h, w)
            if s < 1:
                rgb = np.asarray(Image.fromarray(rgb).resize((round(w * s), round(h * s)), Image.BILINEAR))
            images.append(jpeg_bytes(rgb))
            meta.append({"name": f"{source}/{path.name}", "licence": licence})
    if not images:
        raise SampleError("no usable background photo")
    return images, meta


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


@dataclass
class RenderPack:
    """A loaded pack (numpy). `latents` [N, C, R, R, R] float32 once the default model's VAE has encoded them."""

    folder: Path
    meta: dict
    arrays: dict[str, np.ndarray]
    latents: np.ndarray | None = None

    @classmethod
    def load(cls, folder: str | Path) -> RenderPack:
        folder = Path(folder)
        if not (folder / "pack.json").is_file() or not (folder / "pack.npz").is_file():
            raise SampleError(
                f"{folder}: not a render pack (no pack.json + pack.npz); build one with `sam3d data pack`"
            )
        meta = json.loads((folder / "pack.json").read_text())
        if meta.get("format") != PACK_FORMAT or meta.get("version") != PACK_VERSION:
            raise SampleError(
                f"{folder}: pack format {meta.get('format')!r} v{meta.get('version')}, expected {PACK_FORMAT} "
                f"v{PACK_VERSION}; rebuild it with `sam3d data pack`"
            )
        with np.load(folder / "pack.npz") as z:
            arrays = {k: z[k] for k in z.files}
        latents = np.load(folder / "latents.npy") if (folder / "latents.npy").is_file() else None
        if latents is not None and len(latents) != len(meta["objects"]):
            raise SampleError(f"{folder}: latents.npy has {len(latents)} rows for {len(meta['objects'])} objects")
        return cls(folder, meta, arrays, latents)

    def __len__(self) -> int:
        return len(self.meta["objects"])

    def mesh(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Object i -> vertices float32 [V, 3], faces int64 [F, 3], colours float32 [V, 3] in [0, 1] (linear)."""
        a = self.arrays
        v = a["vertices"][a["v_offsets"][i] : a["v_offsets"][i + 1]].astype(np.float32)
        f = a["faces"][a["f_offsets"][i] : a["f_offsets"][i + 1]].astype(np.int64)
        c = (a["colors"][a["v_offsets"][i] : a["v_offsets"][i + 1]].astype(np.float32) / 255.0) ** 2.2
        return v, f, c

    def occupancy(self, i: int) -> np.ndarray:
        """Object i's surface occupancy as a bool grid [64, 64, 64] (axes x, y, z)."""
        return np.unpackbits(self.arrays["occupancy"][i])[: GRID**3].reshape(GRID, GRID, GRID).astype(bool)

    def background(self, b: int) -> np.ndarray:
        """Background photo b -> [h, w, 3] uint8 RGB (stored as JPEG)."""
        from PIL import Image

        a = self.arrays
        data = a["backgrounds"][a["bg_offsets"][b] : a["bg_offsets"][b + 1]].tobytes()
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    @property
    def num_backgrounds(self) -> int:
        return len(self.arrays["bg_offsets"]) - 1

    def save_latents(self, latents: np.ndarray, info: dict) -> None:
        """Write latents.npy + latents.json beside the pack (temporary names, renamed into place)."""
        if len(latents) != len(self):
            raise ValueError(f"latents: {len(latents)} rows for {len(self)} objects")
        for name, write in (
            ("latents.npy", lambda p: np.save(p, np.ascontiguousarray(latents, np.float32))),
            ("latents.json", lambda p: Path(p).write_text(json.dumps(info, indent=1))),
        ):
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".latents-", suffix=Path(name).suffix)
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, self.folder / name)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        self.latents = np.ascontiguousarray(latents, np.float32)


# ---------------------------------------------------------------------------------------------------
# On-the-fly training views
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewSettings:
    """How RenderPackDataset draws a view (defaults: the benchmark's ranges, data/benchmark.py)."""

    size: int = VIEW_SIZE
    p_occluded: float = 0.5
    p_occluder: float = 0.1
    p_mask_noise: float = 0.5
    p_flat_pointmap: float = 0.2  # share of views given the no-depth fallback plane instead of the true points
    p_wall: float = 0.4  # of the others: the background gets a wall's depth (as a depth model gives) instead of NaN
    held_out_objects: tuple[int, ...] = ()  # pack indices never drawn (validation objects)


class RenderPackDataset:
    """Index -> a rendered Sample (the render-paste recipe), deterministic in (seed, index); picklable (each
    DataLoader worker builds its render meshes on first use). `len` is nominal: the training loop draws indices
    from a permutation of it, and any index renders.

    `data.packviews` renders the same recipe on the training device: `plan_view` draws a view's scene (every
    random choice, with the drawing functions __getitem__ calls), `DeviceViews` renders a micro-batch at once."""

    def __init__(self, pack: RenderPack, seed: int = 0, settings: ViewSettings | None = None, length: int = 1 << 24):
        if pack.latents is None:
            raise SampleError(
                f"{pack.folder}: the pack has no stage-1 latents yet (latents.npy); `sam3d train-default` encodes them"
            )
        self.pack, self.seed, self.settings, self.length = pack, seed, settings or ViewSettings(), length
        held = set(self.settings.held_out_objects)
        self.objects = [i for i in range(len(pack)) if i not in held]
        self._meshes: dict[int, object] = {}
        self._backgrounds: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_meshes"], d["_backgrounds"] = {}, {}
        return d

    def _render_mesh(self, i: int):
        import torch

        from sam3d_core.data.render import RenderMesh

        if i not in self._meshes:
            v, f, c = self.pack.mesh(i)
            self._meshes[i] = RenderMesh(torch.from_numpy(v), torch.from_numpy(f), torch.from_numpy(c))
        return self._meshes[i]

    def background(self, b: int) -> np.ndarray:
        """Background photo b, decoded once per process."""
        if b not in self._backgrounds:
            self._backgrounds[b] = self.pack.background(b)
        return self._backgrounds[b]

    def scene_config(self):
        from sam3d_core.data.synth import SceneConfig

        s = self.settings
        return SceneConfig(
            width=s.size, height=s.size, fov_deg=(35.0, 65.0), elevation_deg=(0.0, 45.0), size_frac=(0.25, 0.7),
            centre_frac=0.5, p_occluded=s.p_occluded, p_occluder=s.p_occluder, occluder_size=(0.3, 1.1),
        )  # fmt: skip

    def pick_objects(self, rng: np.random.Generator) -> tuple[int, list[int]]:
        """The target's pack index and the candidates for occluders / objects behind it (up to 2 others)."""
        n = len(self.objects)
        obj = self.objects[int(rng.integers(0, n))]
        return obj, [int(j) for j in rng.choice(self.objects, size=min(3, n), replace=False) if int(j) != obj]

    def others(self, picks: list[int]) -> list[tuple[str, object, float]]:
        """(name, render mesh, size 1) of the candidates `pick_objects` chose, as data.synth takes them."""
        return [(self.pack.meta["objects"][j]["name"], self._render_mesh(j), 1.0) for j in picks]

    def __getitem__(self, index: int):
        from sam3d_core.data.sample import Sample
        from sam3d_core.data.synth import background_crop, mask_noise, render_scene, sample_scene
        from sam3d_core.inputs.camera import fallback_pointmap, pointmap_from_depth

        s = self.settings
        rng = np.random.default_rng([self.seed, int(index)])
        obj, picks = self.pick_objects(rng)
        meta = self.pack.meta["objects"][obj]
        cfg = self.scene_config()
        others = self.others(picks)
        for _attempt in range(MAX_ATTEMPTS):  # a view whose target is (nearly) hidden is drawn again, deterministically
            scene = sample_scene(rng, self._render_mesh(obj), meta["size_m"], others, cfg)
            bg = self.background(int(rng.integers(0, self.pack.num_backgrounds)))
            try:
                view, info = render_scene(scene, rng, others, background_crop(rng, bg, s.size, s.size), cfg)
            except ValueError:
                continue
            mask = view.mask
            if rng.uniform() < s.p_mask_noise:
                mask, _ = mask_noise(mask, rng)
            if _usable(mask):
                break
        else:
            raise ValueError(f"pack object {obj}: no usable view in {MAX_ATTEMPTS} draws (index {index})")
        t = scene.target
        translation, size = np.asarray(t.translation, np.float64), float(meta["size_m"])
        kind, wall = draw_pointmap_kind(rng, s)
        if kind == "flat":
            pointmap = fallback_pointmap(s.size, s.size, flat_fov_deg(s.size, scene.K))[0].astype(np.float32)
            # Without depth the product places the object about the plane's unit distance away (relative units):
            # the target is the scene scaled so that the visible surface lies at depth 1, as it is then.
            seen = view.pointmap[view.mask & view.coverage][:, 2]
            unit = float(np.median(seen)) if len(seen) else float(translation[2])
            translation, size = translation / unit, size / unit
        else:
            pointmap = np.where(view.coverage[..., None], view.pointmap, np.nan).astype(np.float32)
            if kind == "wall":  # a depth model gives depth everywhere: the photo as a wall behind
                wall_depth = np.full((s.size, s.size), float(scene.target.translation[2]) * wall, np.float32)
                pointmap = np.where(view.coverage[..., None], pointmap, pointmap_from_depth(wall_depth, scene.K))
                pointmap = pointmap.astype(np.float32)
        return Sample(
            sample_id=f"pack:{obj}:{int(index)}",
            photo=view.rgb,
            mask=mask,
            amodal_mask=view.amodal,
            K=scene.K,
            rotation=np.asarray(t.rotation, np.float64),
            translation=translation,
            scale=np.full(3, size),
            occupancy=np.argwhere(self.pack.occupancy(obj)),
            pointmap=pointmap,
            ss_latent=self.pack.latents[obj],
            source="render-pack",
            licence=meta["licence"],
            group=meta["group"],
            occlusion=info["occlusion"],
        )


MAX_ATTEMPTS = 8  # draws of a view before its object is reported as unusable


def draw_pointmap_kind(rng: np.random.Generator, s: ViewSettings) -> tuple[str, float]:
    """The point map a view gets: ("flat", 0) the no-depth fallback plane, ("wall", f) the true points with the
    background as a wall at f times the target's depth (as a depth model gives), or ("nan", 0) the true points
    with NaN off the surfaces."""
    if rng.uniform() < s.p_flat_pointmap:
        return "flat", 0.0
    if rng.uniform() < s.p_wall:
        return "wall", float(rng.uniform(1.3, 3.0))
    return "nan", 0.0


def flat_fov_deg(size: int, K: np.ndarray) -> float:
    """The horizontal field of view (degrees) of the fallback plane of a size x size view with intrinsics K."""
    return 2 * math.degrees(math.atan(size / 2 / K[0, 0]))


def _usable(mask: np.ndarray) -> bool:
    """A mask the stage-1 preprocessing accepts and that shows enough: >= 0.2 % of the image, a box >= 8 px."""
    ys, xs = np.nonzero(mask)
    if len(ys) < MIN_MASK_FRACTION * mask.size:
        return False
    return ys.max() - ys.min() >= 8 and xs.max() - xs.min() >= 8


def is_pack(folder: str | Path) -> bool:
    return (Path(folder) / "pack.json").is_file()


__all__ = [
    "RenderPack",
    "RenderPackDataset",
    "ViewSettings",
    "build_furniture_pack",
    "is_pack",
    "render_mesh_arrays",
]
