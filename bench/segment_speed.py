"""Speed of the click back-ends (SAM and SAM 2) at their official sizes: image encoding once, then prompts.

The weights do not change the work done, so the models are built with random weights through the packages'
own builders (segment-anything's registry, sam2's Hydra configs) and wrapped in our back-end classes, exactly
what `sam3d segment` and the worker run with imported checkpoints. Needs segment-anything and / or sam2 (each
with a torchvision whose C ops load beside torch); a back-end that cannot import is reported, not fatal.

    PYTHONPATH=$PWD python bench/segment_speed.py --device cuda                       # every size of both
    PYTHONPATH=$PWD python bench/segment_speed.py --device cpu --models "sam vit_b"    # one size, on a CPU

Prints one JSON line per model: device, photo size, encode_s (set_image, median), box_s (one box, median),
click_s (one click, three candidates, median), peak GPU memory. Companion of bench/sam3_speed.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from sam3d_core.segment.base import Prompt

MODELS = (
    "sam vit_b",
    "sam vit_l",
    "sam vit_h",
    "sam2.1 tiny",
    "sam2.1 small",
    "sam2.1 base_plus",
    "sam2.1 large",
)


def build(name: str, device: str):
    """A back-end object with random weights, or raise ImportError saying why it cannot be built here."""
    family, size = name.split()
    if family == "sam":
        from sam3d_core.segment import sam1

        err = sam1.import_error()
        if err:
            raise ImportError(err)
        import segment_anything as sa

        return sam1.SamSegmenter(sa.sam_model_registry[size](checkpoint=None), name, device)
    from sam3d_core.segment import sam2

    err = sam2.import_error()
    if err:
        raise ImportError(err)
    import sam2.build_sam as b

    model = b.build_sam2(sam2.config_name(size, family.removeprefix("sam")), ckpt_path=None, device="cpu")
    return sam2.Sam2Segmenter(model, name, device)


def timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def measure(seg, photo, box: Prompt, click: Prompt, repeats: int, sync) -> tuple[float, float, float]:
    """Median seconds of set_image, a box prompt and a click prompt (after one warm-up of each kind)."""
    seg.set_image(photo)  # warm-up (cuDNN / kernel choice)
    seg.predict(box, multimask=False)
    encode = statistics.median(timed(lambda: seg.set_image(photo), sync) for _ in range(repeats))
    box_s = statistics.median(timed(lambda: seg.predict(box, multimask=False), sync) for _ in range(repeats))
    click_s = statistics.median(timed(lambda: seg.predict(click), sync) for _ in range(repeats))
    return encode, box_s, click_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", default="1280x960", help="photo WxH")
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    box = Prompt(box=(0.3 * w, 0.3 * h, 0.7 * w, 0.75 * h))
    click = Prompt(points=((0.5 * w, 0.5 * h, 1),))
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        torch.manual_seed(0)
        try:
            seg = build(name, args.device)
        except ImportError as e:
            print(json.dumps({"model": name, "error": str(e).splitlines()[0]}), flush=True)
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        encode, box_s, click_s = measure(seg, photo, box, click, args.repeats, sync)
        record = {
            "model": name,
            "device": torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()} threads",
            "torch": torch.__version__,
            "photo": args.size,
            "encode_s": round(encode, 4),
            "box_s": round(box_s, 4),
            "click_s": round(click_s, 4),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        }
        print(json.dumps(record), flush=True)
        del seg
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
