"""Make the bundled demo photo: a Sweet Home 3D armchair (CC0; one of the default model's training objects, not a
benchmark object) rendered by the training renderer into an OpenCV sample photo, with its exact mask and depth.

    python bench/make_demo_photo.py --out assets/examples [--cache DIR] [--overwrite]

Writes armchair.png (640 x 480), armchair_mask.png (255 = object), armchair_depth.npy (metres; the background is a
wall 1.2 m behind the chair, as a depth model would give) and prints the horizontal field of view (the demo passes
it as --fov). Deterministic: the same files on every run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

FOV_DEG = 50.0
PIECE = ("BlendSwap-CC-0", "blendswap-cc-0/armchair/armchair.obj")
BACKGROUND = ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/stuff.jpg")


def main() -> None:
    from PIL import Image

    from sam3d_core.data import benchmark as bm
    from sam3d_core.data.build import read_rgb
    from sam3d_core.data.render import Light, Placed, RenderMesh, render_view
    from sam3d_core.data.synth import look_rotation
    from sam3d_core.inputs.camera import pointmap_from_depth

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace armchair*.* files already in --out")
    args = p.parse_args()
    cache = Path(args.cache) if args.cache else bm.default_cache()
    furn = bm.fetch_source("sweethome3d-furniture", cache) / bm.FURNITURE
    sh3f = furn / f"{PIECE[0]}.sh3f"
    piece = next(x for x in bm.read_catalogue(sh3f) if x.model == PIECE[1])
    asset = bm.load_piece(bm.extract_piece(sh3f, piece.model, cache / "extracted"), piece.model_rotation)
    size = max(piece.size_cm) / 100.0
    w, h = 640, 480
    f = w / 2 / math.tan(math.radians(FOV_DEG) / 2)
    K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])
    rot = look_rotation(math.radians(-125.0), math.radians(18.0))
    t = np.array([0.0, 0.08, 2.0])  # PyTorch3D camera: +y up, a little above the image centre
    bg_root = bm.fetch_source(BACKGROUND[0], cache)
    photo = read_rgb(bg_root / BACKGROUND[1])
    bg = np.asarray(Image.fromarray(photo).resize((w, h), Image.BILINEAR))
    light = Light(direction=np.array([0.4, 0.6, -0.7]), ambient=0.45, diffuse=0.65)
    view = render_view([Placed(RenderMesh.from_asset(asset), rot, t, size)], K, h, w, light, bg)
    out = Path(args.out)
    names = ("armchair.png", "armchair_mask.png", "armchair_depth.npy")
    if not args.overwrite and any((out / n).exists() for n in names):
        sys.exit(f"{out} already holds {', '.join(n for n in names if (out / n).exists())}; pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    depth = np.where(np.isfinite(view.depth), view.depth, t[2] + 1.2).astype(np.float32)
    assert np.isfinite(pointmap_from_depth(depth, K)).all()
    writers = {
        names[0]: lambda f: Image.fromarray(view.rgb).save(f, format="PNG", optimize=True),
        names[1]: lambda f: Image.fromarray((view.mask * 255).astype(np.uint8)).save(f, format="PNG", optimize=True),
        names[2]: lambda f: np.save(f, depth.astype(np.float16)),  # half the size; read back as float32
    }
    for name, write in writers.items():  # each under a temporary name, then renamed into place
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, out / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    print(f"wrote {out}: fov {FOV_DEG} degrees, {int(view.mask.sum())} object pixels, size {size:.2f} m")


if __name__ == "__main__":
    main()
