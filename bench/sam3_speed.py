"""Speed of the SAM 3 back-end at the official size: image encoding once, then one concept prompt.

The weights do not change the work done, so this runs with random weights (no gated download needed) and reports
what a real sam3.pt would cost. Needs Meta's sam3 (and a torchvision whose C ops load beside torch) and CLIP's
BPE vocabulary (sam3's assets/ or the open_clip_torch package).

    PYTHONPATH=$PWD python bench/sam3_speed.py                    # CPU
    PYTHONPATH=$PWD python bench/sam3_speed.py --device cuda      # GPU, float32 and bfloat16 autocast
    PYTHONPATH=$PWD python bench/sam3_speed.py --tiny             # the test fixture's reduced size

Prints one JSON line per setting: device, dtype, photo size, encode_s (set_image), prompt_s (text prompt, median),
exemplar_s (text plus one exemplar box, median), peak GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import numpy as np
import torch

from sam3d_core.segment import weights as W
from sam3d_core.segment.sam3 import OFFICIAL, ConceptPrompt, Sam3Config, Sam3Segmenter, build_model

TINY = dict(
    resolution=112, vit_dim=32, vit_depth=2, vit_heads=2, vit_mlp_ratio=2.0, vit_window=4, vit_global_blocks=(1,),
    pretrain_img_size=56, d_model=32, heads=2, ffn_dim=64, encoder_layers=1, decoder_layers=1, geometry_layers=1,
    num_queries=8, text_width=8, text_heads=2, text_layers=1,
)  # fmt: skip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="1280x960", help="photo WxH")
    args = ap.parse_args()
    cfg = Sam3Config(**TINY) if args.tiny else OFFICIAL
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(cfg, W.find_bpe())
    with torch.no_grad():  # sam3 leaves these two uninitialised (torch.empty)
        enc = model.backbone.language_backbone.encoder
        torch.nn.init.normal_(enc.positional_embedding, std=0.01)
        torch.nn.init.normal_(enc.text_projection, std=cfg.text_width**-0.5)
    seg = Sam3Segmenter(model, cfg, "sam3 (random weights)", args.device)
    build_s = time.perf_counter() - t0
    w, h = (int(v) for v in args.size.split("x"))
    rgb = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    dtypes = ["float32"] + (["bfloat16"] if args.device.startswith("cuda") else [])
    for dtype in dtypes:
        amp = (
            torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
        )  # sam3's own demos run under bfloat16 autocast on the GPU
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with amp:
            seg.set_image(rgb)  # warm-up
            sync(args.device)
            t = time.perf_counter()
            seg.set_image(rgb)
            sync(args.device)
            encode_s = time.perf_counter() - t
            times = {"prompt_s": [], "exemplar_s": []}
            for _ in range(args.repeats):
                for key, prompt in (
                    ("prompt_s", ConceptPrompt(text="chair")),
                    ("exemplar_s", ConceptPrompt(text="chair", boxes=((100, 100, 400, 500, 1),))),
                ):
                    t = time.perf_counter()
                    seg.segment_concept(prompt, min_score=0.0, max_objects=20)
                    sync(args.device)
                    times[key].append(time.perf_counter() - t)
        rec = {
            "config": "tiny" if args.tiny else "official",
            "device": args.device,
            "dtype": dtype,
            "photo": args.size,
            "build_s": round(build_s, 2),
            "encode_s": round(encode_s, 3),
            **{k: round(statistics.median(v), 3) for k, v in times.items()},
            "threads": torch.get_num_threads(),
        }
        if args.device.startswith("cuda"):
            rec["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
