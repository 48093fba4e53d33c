"""`sam3d reconstruct` and `sam3d scene`: photo -> placed, textured objects in a folder.

    sam3d reconstruct PHOTO (--mask M.png ... | --point X,Y[,+/-] ... | --box X0,Y0,X1,Y1) --out DIR
    sam3d scene PHOTO --out DIR                     # every object the segmenter finds
    sam3d scene PHOTO --text chair [--text lamp] --out DIR   # every instance of each phrase (SAM 3)

Both write per object NAME.glb (UV-textured mesh), NAME.ply (Gaussians), NAME_mask.png, and for the photo
scene.glb (objects placed, camera at the origin) and scene.json (poses, intrinsics, provenance); see
`Pipeline.export`. Progress goes to stderr as one line per stage. With --no-stage2 (or a model without stage 2)
NAME.glb is stage 1's coarse shape with the photo projected as its texture, and there is no NAME.ply; with
--voxels NAME_voxels.glb holds the stage-1 voxels instead.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

from sam3d_core.cli.segment import add_concept_args, check_clicks, concept_instances, parse_box, parse_point, path_arg
from sam3d_core.export.output import output_folder
from sam3d_core.inputs.imageio import load_mask, load_photo

ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLE_PHOTO = ASSETS / "examples" / "coffee.png"
EXAMPLE_MASK = ASSETS / "examples" / "coffee_mask.png"
# The demo: an armchair of the default model's training kind (bench/make_demo_photo.py; assets/examples/README.md)
DEMO_PHOTO = ASSETS / "examples" / "armchair.png"
DEMO_MASK = ASSETS / "examples" / "armchair_mask.png"
DEMO_DEPTH = ASSETS / "examples" / "armchair_depth.npy"
DEMO_FOV_DEG = 50.0


class StageBar:
    """One progress line per stage on stderr: `stage1  [#######.....] 17/25  3.1 s`."""

    def __init__(self, prefix: str = "", stream=None, width: int = 24):
        self.prefix, self.stream, self.width = prefix, stream or sys.stderr, width
        self.stage, self.t0 = None, time.perf_counter()

    def __call__(self, stage: str, step: int, total: int) -> None:
        if stage != self.stage:
            if self.stage is not None:
                self.stream.write("\n")
            self.stage, self.t0 = stage, time.perf_counter()
        done = int(self.width * step / max(total, 1))
        bar = "#" * done + "." * (self.width - done)
        elapsed = time.perf_counter() - self.t0
        self.stream.write(f"\r{self.prefix}{stage:<11} [{bar}] {step}/{total}  {elapsed:5.1f} s")
        self.stream.flush()

    def close(self) -> None:
        if self.stage is not None:
            self.stream.write("\n")
        self.stage = None


def add_model_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--out",
        default="sam3d_out",
        type=path_arg("--out"),
        help="output folder: a new or empty one, or one with earlier results (new files are added beside them with "
        "a numbered suffix; nothing is replaced)",
    )
    sp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace our own earlier results in --out (the files its scene.json lists); nothing else is replaced",
    )
    sp.add_argument("--model", default=None, help="an imported model name, or 'tiny' (default: the best available)")
    sp.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    sp.add_argument("--seed", type=int, default=42, help="seed of the first object; object i uses seed + i")
    sp.add_argument("--steps", type=int, default=None, help="sampling steps (default 25; 4 with --fast)")
    sp.add_argument("--fast", action="store_true", help="shortcut mode for stage 1: few steps, no CFG")
    sp.add_argument("--texture-size", type=int, default=1024, help="baked texture size in pixels (default 1024)")
    sp.add_argument("--faces", type=int, default=20000, help="target face count after decimation (default 20000)")
    sp.add_argument("--low-vram", action="store_true", help="one stage on the GPU at a time (about 8 GB or less)")
    sp.add_argument(
        "--no-stage2",
        action="store_true",
        help="stage 1 only: its coarse shape with the photo projected as the texture (seconds on a CPU; the "
        "default for models without a stage 2)",
    )
    sp.add_argument(
        "--voxels",
        action="store_true",
        help="stage 1 only, written as its voxels (NAME_voxels.glb, untextured) instead of a textured mesh",
    )
    sp.add_argument(
        "--max-voxels",
        type=int,
        default=None,
        help="cap on stage-1 voxels (default: the model's; fewer is faster and coarser)",
    )
    sp.add_argument(
        "--fov",
        type=float,
        default=None,
        help="horizontal field of view in degrees when the photo has no EXIF focal length (default 60)",
    )
    sp.add_argument(
        "--depth",
        default=None,
        type=path_arg("--depth"),
        help="a depth map (.npy, metres, the photo's size) for metric layout",
    )
    sp.add_argument(
        "--depth-model",
        default="auto",
        metavar="{auto,none,NAME}",
        help="depth model for a metric point map when no --depth is given: auto (the first installed "
        "with imported weights, e.g. moge), none (a plane at unit distance), or a name",
    )
    sp.add_argument("--compile", action="store_true", help="torch.compile the stage-1 flow model (slow start)")
    sp.add_argument(
        "--refine-layout",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="move each object's pose onto the photo's point map (turns about the vertical, ICP; kept only when "
        "its silhouette fits the mask better). Default: on when the point map comes from depth (--depth or a "
        "depth model), off for the fallback plane (nothing to align to)",
    )
    sp.add_argument(
        "--carve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="models without stage 2: cut each object's occupancy down to what projects inside its mask (or "
        "behind an occluder) before its surface is taken (default: on)",
    )


def _check_sizes(args) -> None:
    if not 64 <= args.texture_size <= 8192:
        raise ValueError(f"--texture-size {args.texture_size}: expected 64..8192 (1024 is a good default)")
    if not 100 <= args.faces <= 2_000_000:
        raise ValueError(f"--faces {args.faces}: expected 100..2000000 (20000 is a good default)")
    check_common(args)


def check_common(args) -> None:
    """Options shared by reconstruct, scene, demo and stage1, checked before anything is loaded."""
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps {args.steps}: expected 1..1000")
    if getattr(args, "max_voxels", None) is not None and not 16 <= args.max_voxels <= 10_000_000:
        raise ValueError(f"--max-voxels {args.max_voxels}: expected at least 16 (default: the model's cap)")
    if not -(2**63) < args.seed < 2**63:
        raise ValueError(f"--seed {args.seed}: expected an integer within +-2**63")
    fov = getattr(args, "fov", None)
    if fov is not None and not (math.isfinite(fov) and 1.0 <= fov <= 179.0):
        raise ValueError(f"--fov {fov}: expected a horizontal field of view of 1..179 degrees")
    if getattr(args, "max_objects", None) is not None and args.max_objects < 1:
        raise ValueError(f"--max-objects {args.max_objects}: expected at least 1")


def _inputs(args) -> list:
    return [args.photo, *(getattr(args, "mask", None) or []), getattr(args, "depth", None)]


def _open(args):
    """(pipeline, photo context) for the options of `add_model_args`; see `_prepare`."""
    pipe, ctx, _, _ = _prepare(args)
    return pipe, ctx


def _prepare(args, objects: int = 1):
    """Inputs and the output folder checked (cheap, before anything loads), then the model and the photo's camera.
    Returns (pipeline, photo context, output folder, the --mask masks checked)."""
    from sam3d_core.inputs.depth import check_depth_map, load_depth_file
    from sam3d_core.pipeline.reconstruct import Pipeline

    _check_sizes(args)
    photo = load_photo(args.photo)
    depth = check_depth_map(load_depth_file(args.depth), photo.width, photo.height) if args.depth else None
    masks = [load_mask(m, photo) for m in getattr(args, "mask", None) or ()]
    overwrite = getattr(args, "overwrite", False)
    folder = output_folder(args.out, overwrite=overwrite, inputs=_inputs(args), what="--out folder")
    stage2 = not (getattr(args, "no_stage2", False) or getattr(args, "voxels", False))
    pipe, which = Pipeline.load(
        args.model, args.device, low_vram=args.low_vram, compile=args.compile, max_voxels=args.max_voxels, stage2=stage2
    )
    pipe.voxels_only = getattr(args, "voxels", False)
    pipe.carve = getattr(args, "carve", True)
    print(f"model: {which}", file=sys.stderr)
    if pipe.stage2 is None and not pipe.voxels_only:
        print(
            "stage 1 only: the coarse shape, textured by projecting the photo (--voxels: the voxels)", file=sys.stderr
        )
    folder.check_room(pipe.estimate_bytes(objects, texture_size=args.texture_size, faces=args.faces))
    depth_model = getattr(args, "depth_model", "auto")
    ctx = pipe.open_photo(photo, fov_deg=args.fov, depth=depth, depth_model=depth_model)
    why = ""
    if ctx.pointmap_source == "fallback plane":
        why = "; layout in relative units"
        if depth_model == "auto":  # say what would give a metric point map
            from sam3d_core.inputs.depth import load_depth_model

            why += f" ({load_depth_model('auto')[1]})"
    print(
        f"photo: {ctx.width}x{ctx.height}; intrinsics from {ctx.intrinsics_source} "
        f"(fx {ctx.K[0, 0]:.1f} px); point map: {ctx.pointmap_source}{why}",
        file=sys.stderr,
    )
    return pipe, ctx, folder, masks


def layout_words(record: dict | None) -> str:
    """`; layout refined (turned 35.2 deg, IoU 0.41 -> 0.83)` or why not, for the per-object line."""
    if not record or not record.get("ran"):
        return "" if not record or record.get("mode") == "off" else f"; layout not refined ({record.get('why')})"
    if record.get("skipped"):
        return f"; layout not refined ({record['skipped']})"
    if record.get("accepted"):
        return (
            f"; layout refined (turned {record['yaw_change_deg']:+.1f} deg, silhouette IoU "
            f"{record['iou_before']:.2f} -> {record['iou_after']:.2f})"
        )
    return f"; layout kept ({record.get('reason')})"


def _run(pipe, ctx, masks, names, args, folder) -> int:
    bar = StageBar()
    t0 = time.perf_counter()

    def done(res) -> None:
        bar.close()
        iou = "n/a" if res.mask_iou is None else f"{res.mask_iou:.3f}"
        print(
            f"{res.name}: {res.num_voxels} voxels, "
            f"{len(res.mesh.faces) if res.mesh is not None else 0} faces, reprojected mask IoU {iou}"
            f"{layout_words(res.settings.get('layout_refine'))}",
            file=sys.stderr,
        )

    results = pipe.reconstruct(
        ctx,
        masks,
        names=names,
        seed=args.seed,
        steps=args.steps,
        fast=args.fast,
        texture_size=args.texture_size,
        faces=args.faces,
        refine_layout=getattr(args, "refine_layout", None),
        progress=bar,
        on_object=done,
    )
    scene = pipe.export(ctx, results, folder)
    dt = time.perf_counter() - t0
    print(
        f"wrote {len(results)} object(s) to {folder.path} in {dt:.1f} s ({dt / max(len(results), 1):.1f} s per "
        f"object): {scene['scene_json']}" + (f", {scene['scene_glb']}" if "scene_glb" in scene else ""),
        file=sys.stderr,
    )
    if scene["scene_json"] != "scene.json":
        print(
            f"note: {folder.path} already held results; these were added beside them with a numbered suffix "
            "(--overwrite replaces our earlier results instead)",
            file=sys.stderr,
        )
    for o in scene["objects"]:
        print(
            f"  {o['name']}: "
            + ", ".join(o[k] for k in ("mesh_glb", "gaussians_ply", "glb") if k in o)
            + f"  (mask IoU {o['mask_iou']})"
        )
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from sam3d_core.segment import Prompt, load_segmenter

    if not args.mask and not args.point and not args.box:
        raise ValueError(
            "say which object: --mask M.png (one per object), or --point X,Y [--point X,Y,-] and/or --box X0,Y0,X1,Y1"
        )
    prompt = None
    if not args.mask:
        check_clicks(args.point, args.box)
        prompt = Prompt(points=tuple(args.point or ()), box=args.box)
    pipe, ctx, folder, masks = _prepare(args, objects=max(1, len(args.mask or ())))
    if args.mask:
        names = [f"object_{i}" for i in range(len(masks))]
    else:
        prompt.validate(ctx.height, ctx.width)
        seg = load_segmenter("auto")
        print(f"segmenter: {seg.name}", file=sys.stderr)
        seg.set_image(ctx.photo.rgb)
        cand = seg.predict(prompt)[0]
        masks, names = [pipe.load_mask(ctx, cand.mask)], ["object_0"]
    return _run(pipe, ctx, masks, names, args, folder)


def _concept_names(phrase: str | None, count: int, taken: set[str]) -> list[str]:
    """Object names from a phrase: 'red mug' -> red_mug_0, red_mug_1, ... (letters, digits, '_' and '-' only)."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", phrase or "exemplar").strip("_")[:40] or "object"
    names = []
    i = 0
    while len(names) < count:
        if f"{base}_{i}" not in taken:
            names.append(f"{base}_{i}")
        i += 1
    return names


def _scene_concepts(args, pipe, ctx, folder) -> int:
    """`scene --text A [--text B] [--exemplar ...]`: every instance of each phrase, reconstructed and placed."""
    from sam3d_core.segment import ConceptPrompt, load_concept_segmenter

    phrases = [t.strip() for t in args.text or () if t.strip()] or [None]  # exemplars alone: one "phrase"
    for p in phrases:
        ConceptPrompt(text=p, boxes=tuple(args.exemplar or ())).validate(ctx.height, ctx.width)
    seg = load_concept_segmenter(device=args.device)
    print(f"segmenter: {seg.reason}", file=sys.stderr)
    seg.set_image(ctx.photo.rgb)
    masks, names = [], []
    for p in phrases:
        found = concept_instances(seg, ctx.photo.rgb, p, args.exemplar, args.min_score, args.max_objects)
        print(f"{p or 'exemplars'}: {len(found)} instance(s) above score {args.min_score}", file=sys.stderr)
        masks += [pipe.load_mask(ctx, c.mask) for c in found]
        names += _concept_names(p, len(found), set(names))
    if not masks:
        raise ValueError(
            f"SAM 3 found no instance of {', '.join(repr(p) for p in phrases if p) or 'the exemplars'} above score "
            f"{args.min_score}; try a lower --min-score, another phrase, or an --exemplar box around one instance"
        )
    return _run(pipe, ctx, masks, names, args, folder)


def cmd_scene(args: argparse.Namespace) -> int:
    from sam3d_core.segment import load_segmenter

    args.mask = None
    concept = bool(args.text) or bool(args.exemplar)
    if not concept and (args.min_score != 0.5):
        raise ValueError("--min-score goes with --text / --exemplar (SAM 3 concept prompts)")

    if concept:
        from sam3d_core.segment.backends import check_concept_available

        check_concept_available()  # no SAM 3: say how to get it before any model loads
    pipe, ctx, folder, _ = _prepare(args, objects=args.max_objects or 5)
    if concept:
        return _scene_concepts(args, pipe, ctx, folder)
    seg = load_segmenter("auto")
    print(f"segmenter: {seg.name}", file=sys.stderr)
    seg.set_image(ctx.photo.rgb)
    cands = seg.segment_all()[: args.max_objects or 5]
    if not cands:
        raise ValueError(
            "the segmenter found no object in this photo; pick objects with "
            "`sam3d reconstruct PHOTO --point X,Y` instead"
        )
    masks = [pipe.load_mask(ctx, c.mask) for c in cands]
    return _run(pipe, ctx, masks, [f"object_{i}" for i in range(len(masks))], args, folder)


def cmd_stage1(args: argparse.Namespace) -> int:
    from sam3d_core.export.voxels import save_voxels_glb
    from sam3d_core.inputs.camera import fallback_pointmap
    from sam3d_core.pipeline.stage1 import Stage1Pipeline
    from sam3d_core.version import __version__

    check_common(args)
    photo = load_photo(args.photo)
    image, mask = photo.rgb, load_mask(args.mask, photo)
    folder = output_folder(args.out, overwrite=args.overwrite, inputs=[args.photo, args.mask], what="--out folder")
    pipe, which = Stage1Pipeline.best_available(args.model, args.device, args.compile)
    print(f"model: {which}")
    folder.check_room(pipe.cfg.max_voxels * 400 + (1 << 20))  # the voxel GLB and scene.json
    pointmap, K = fallback_pointmap(*image.shape[:2])
    print("point map: none given; a plane at unit distance with a 60 degree field of view (relative units)")
    t0 = time.perf_counter()
    out = pipe(
        image,
        mask,
        pointmap,
        seed=args.seed,
        steps=args.steps,
        shortcut=args.fast,
        progress=lambda i, n: print(f"\rstage 1: step {i}/{n}", end="", flush=True),
    )
    print(f"\rstage 1: {len(out.coords)} voxels in {time.perf_counter() - t0:.1f} s")
    pose = out.pose
    trans, scale = pose.translation[0].cpu().numpy(), pose.scale[0].cpu().numpy()
    with folder.writer() as w:  # all or nothing, nothing of the user's replaced (export/output.py)
        scene_json = w.claim("scene", (".json",), last=True) + ".json"
        glb = w.claim("object_0", ("_voxels.glb",)) + "_voxels.glb"
        save_voxels_glb(w.staged(glb), out.coords[:, 1:].cpu().numpy(), pose.as_matrix()[0].cpu().numpy())
        record = {
            "generator": f"sam3d {__version__}",
            "frame": "PyTorch3D camera (x left, y up, z forward); the GLB is in glTF camera space (camera at the "
            "origin looking down -z)",
            "intrinsics": np.asarray(K).tolist(),
            "image_size": list(image.shape[:2]),
            "objects": [
                {
                    "glb": glb,
                    "num_voxels": int(len(out.coords)),
                    "rotation_wxyz": pose.quaternion[0].tolist(),
                    "translation": trans.tolist(),
                    "scale": scale.tolist(),
                    "settings": out.settings,
                }
            ],
            "model": which,
        }
        w.staged(scene_json).write_text(json.dumps(record, indent=2))
    print(f"wrote {folder.path / glb} and {folder.path / scene_json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the bundled example: photo + mask -> placed, textured object, scene GLB and JSON."""
    args.photo, args.mask, args.point, args.box = str(DEMO_PHOTO), [str(DEMO_MASK)], None, None
    if getattr(args, "depth", None) is None:
        args.depth = str(DEMO_DEPTH)  # the photo's exact depth: metric placement without a depth model
    if getattr(args, "fov", None) is None:
        args.fov = DEMO_FOV_DEG
    return cmd_reconstruct(args)


def add_reconstruct_parsers(sub) -> None:
    r = sub.add_parser("reconstruct", help="photo + mask(s) or clicks -> placed, textured objects")
    r.add_argument("photo", type=path_arg("photo"))
    r.add_argument(
        "--mask",
        action="append",
        default=None,
        type=path_arg("--mask"),
        help="mask PNG of one object (repeat for more)",
    )
    r.add_argument(
        "--point",
        action="append",
        type=parse_point,
        default=None,
        help="X,Y (include) or X,Y,- (exclude), photo pixels; segments one object",
    )
    r.add_argument("--box", type=parse_box, default=None, help="X0,Y0,X1,Y1 box around the object")
    add_model_args(r)
    r.set_defaults(func=cmd_reconstruct)

    s = sub.add_parser(
        "scene", help="every object of a photo, or every instance of --text phrases -> placed, textured objects"
    )
    s.add_argument("photo", type=path_arg("photo"))
    add_concept_args(s, repeat_text=True)  # --text (repeatable), --exemplar, --min-score, --max-objects
    add_model_args(s)
    s.set_defaults(func=cmd_scene)

    s1 = sub.add_parser("stage1", help="coarse shape + layout of one masked object (voxels only)")
    s1.add_argument("photo", type=path_arg("photo"))
    s1.add_argument("--mask", required=True, type=path_arg("--mask"))
    s1.add_argument("--steps", type=int, default=None)
    s1.add_argument("--fast", action="store_true", help="shortcut mode: few steps, no CFG")
    s1.add_argument("--out", default="sam3d_out", type=path_arg("--out"), help="output folder (see reconstruct --out)")
    s1.add_argument("--overwrite", action="store_true", help="replace our own earlier results in --out")
    s1.add_argument("--model", default=None, help="an imported model name, or 'tiny'")
    s1.add_argument("--device", default=None)
    s1.add_argument("--seed", type=int, default=42)
    s1.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the flow model (faster sampling after a one-off compile; needs triton)",
    )
    s1.set_defaults(func=cmd_stage1)

    d = sub.add_parser("demo", help="the main job on the bundled example photo (writes demo_out/)")
    add_model_args(d)
    d.set_defaults(func=cmd_demo, out="demo_out")
