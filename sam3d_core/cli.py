"""`sam3d` command line: thin subcommands over library functions."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLE_PHOTO = ASSETS / "examples" / "coffee.png"
EXAMPLE_MASK = ASSETS / "examples" / "coffee_mask.png"


def _fail(msg: str) -> int:
    print(f"sam3d: error: {msg}", file=sys.stderr)
    return 2


def cmd_weights(args: argparse.Namespace) -> int:
    from sam3d_core import hub
    from sam3d_core.segment import weights as sam_weights

    if args.action == "import":
        t0 = time.perf_counter()
        rep = hub.import_official(args.folder, name=args.name, root=args.root, overwrite=args.overwrite)
        print(f"imported {' + '.join(rep.stages)}: {rep.num_tensors} tensors "
              f"({rep.num_parameters / 1e6:.1f} M parameters) "
              f"into {rep.folder} in {time.perf_counter() - t0:.1f} s"
              + (f"; {rep.ignored_keys} other entries ignored" if rep.ignored_keys else ""))
    elif args.action == "list":
        models = hub.list_models()
        sams = sam_weights.list_sam()
        if not models and not sams:
            print(f"no models in {hub.data_dir()}; import SAM 3D weights with `sam3d weights import FOLDER` "
                  "and SAM weights with `sam3d weights import-sam FILE`")
        for m in models:
            print(f"sam3d  {m['name']:<16} {m['bytes'] / 1e9:6.2f} GB  {m['folder']}  (from {m['source']})")
        from sam3d_core import depth

        for m in depth.list_depth_weights():
            print(f"depth  {m.get('name', '?'):<16} {m.get('bytes', 0) / 1e9:6.2f} GB  {m.get('folder', '')}")
        for m in sams:
            print(f"{m.get('kind', 'sam'):<6} {m['name']:<16} {m.get('bytes', 0) / 1e9:6.2f} GB  {m.get('folder', '')}")
    elif args.action == "verify":
        problems = _on_either(args.name, hub.verify, sam_weights.verify)
        for p in problems:
            print(f"FAIL {p}")
        print("ok" if not problems else f"{len(problems)} problem(s); re-import the model")
        return 0 if not problems else 1
    elif args.action == "remove":
        print(f"removed {_on_either(args.name, hub.remove, sam_weights.remove)}")
    return 0


def _on_either(name: str, sam3d_fn, sam_fn):
    """Apply to the SAM 3D model called `name`, else to the SAM checkpoint of that name."""
    from sam3d_core.convert import CheckpointError

    try:
        return sam3d_fn(name)
    except CheckpointError as first:
        try:
            return sam_fn(name)
        except (CheckpointError, FileNotFoundError):
            raise first from None


def _load_inputs(photo: Path, mask: Path):
    import numpy as np
    from PIL import Image

    for p in (photo, mask):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist")
    image = np.asarray(Image.open(photo).convert("RGB"))
    m = np.asarray(Image.open(mask).convert("L")) > 127
    return image, m


def cmd_stage1(args: argparse.Namespace) -> int:
    import numpy as np

    from sam3d_core.camera import fallback_pointmap
    from sam3d_core.export.voxels import save_voxels_glb

    image, mask = _load_inputs(Path(args.photo), Path(args.mask))
    from sam3d_core.stage1 import Stage1Pipeline

    pipe, which = Stage1Pipeline.best_available(args.model, args.device, args.compile)
    print(f"model: {which}")
    pointmap, K = fallback_pointmap(*image.shape[:2])
    print("point map: none given; a plane at unit distance with a 60 degree field of view (relative units)")
    t0 = time.perf_counter()
    out = pipe(image, mask, pointmap, seed=args.seed, steps=args.steps, shortcut=args.fast,
               progress=lambda i, n: print(f"\rstage 1: step {i}/{n}", end="", flush=True))
    print(f"\rstage 1: {len(out.coords)} voxels in {time.perf_counter() - t0:.1f} s")
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    pose = out.pose
    rot, trans, scale = (pose.rotation[0].cpu().numpy(), pose.translation[0].cpu().numpy(),
                         pose.scale[0].cpu().numpy())
    glb = save_voxels_glb(outdir / "object_0_voxels.glb", out.coords[:, 1:].cpu().numpy(), rot, trans, scale)
    record = {
        "frame": "PyTorch3D camera (x left, y up, z forward); the GLB is in glTF camera space (camera at the "
                 "origin looking down -z)",
        "intrinsics": np.asarray(K).tolist(), "image_size": list(image.shape[:2]),
        "objects": [{"glb": glb.name, "num_voxels": int(len(out.coords)),
                     "rotation_wxyz": pose.quaternion[0].tolist(), "translation": trans.tolist(),
                     "scale": scale.tolist(), "settings": out.settings}],
        "model": which,
    }
    (outdir / "scene.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {glb} and {outdir / 'scene.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the bundled example: photo + mask -> placed, textured object, scene GLB and JSON."""
    from sam3d_core.reconstruct_cli import cmd_reconstruct

    args.photo, args.mask, args.point, args.box = str(EXAMPLE_PHOTO), [str(EXAMPLE_MASK)], None, None
    return cmd_reconstruct(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sam3d", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("weights", help="import, list, verify or remove model weights (offline)")
    wsub = w.add_subparsers(dest="action", required=True)
    wi = wsub.add_parser("import", help="convert an official checkpoint folder (YAML + .ckpt)")
    wi.add_argument("folder")
    wi.add_argument("--name", default="official")
    wi.add_argument("--root", type=Path, default=None, help="models folder (default: the user data folder)")
    wi.add_argument("--overwrite", action="store_true")
    wsub.add_parser("list")
    for action in ("verify", "remove"):
        wsub.add_parser(action).add_argument("name")
    w.set_defaults(func=cmd_weights)
    from sam3d_core.segment.cli import add_segment_parser, add_weights_sam_parser

    add_weights_sam_parser(wsub)
    from sam3d_core.download import add_download_parser

    add_download_parser(wsub)
    from sam3d_core.depth import add_depth_parser

    add_depth_parser(wsub)
    add_segment_parser(sub)

    def common(sp):
        sp.add_argument("--out", default="sam3d_out")
        sp.add_argument("--model", default=None, help="an imported model name, or 'tiny'")
        sp.add_argument("--device", default=None)
        sp.add_argument("--seed", type=int, default=42)
        sp.add_argument("--compile", action="store_true",
                        help="torch.compile the flow model (faster sampling after a one-off compile; needs triton)")

    s1 = sub.add_parser("stage1", help="coarse shape + layout of one masked object")
    s1.add_argument("photo")
    s1.add_argument("--mask", required=True)
    s1.add_argument("--steps", type=int, default=None)
    s1.add_argument("--fast", action="store_true", help="shortcut mode: few steps, no CFG")
    common(s1)
    s1.set_defaults(func=cmd_stage1)

    from sam3d_core.reconstruct_cli import add_model_args, add_reconstruct_parsers

    add_reconstruct_parsers(sub)
    d = sub.add_parser("demo", help="the main job on the bundled example photo (writes demo_out/)")
    add_model_args(d)
    d.set_defaults(func=cmd_demo, out="demo_out")

    from sam3d_core.doctor import add_doctor_parser
    from sam3d_core.serve.cli import add_serve_parser

    add_doctor_parser(sub)

    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sam3d_core.convert import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError, ImportError) as e:
        return _fail(str(e))
    except RuntimeError as e:  # GPU out of memory even in low-VRAM mode, an empty mesh: already explained
        from sam3d_core.pipeline import GPUOutOfMemory

        if isinstance(e, GPUOutOfMemory) or "stage 2 produced" in str(e):
            return _fail(str(e))
        raise


if __name__ == "__main__":
    sys.exit(main())
