"""Make tests/fixtures/sam3_tiny: Meta's `sam3` code at a reduced size with random weights, its inputs and outputs.

Run it in an environment where `sam3` imports (torch + a torchvision whose C ops load + sam3 + psutil), never in CI:

    PYTHONPATH=$PWD /work/venv-sam3/bin/python tests/make_sam3_fixture.py --bpe .../bpe_simple_vocab_16e6.txt.gz

What is Meta's here: the networks (sam3's classes, wired by `sam3d_core.segment.sam3.build_model`, whose wiring
is first checked against sam3's own `build_sam3_image_model` at the official size: same entries, same shapes,
same module tree) and the reference pre/post-processing (`sam3.model.sam3_image_processor.Sam3Processor`, given a
PIL image as its notebooks do, and exemplar boxes normalised with sam3's own box_ops). What is saved (small,
committed): the photo, the weights (float16 safetensors with the config in its metadata), and per case the image
tensor the processor fed the model, the normalised boxes it was given, the model's raw outputs and the processor's
final boxes, scores and masks. sam3's code itself is never copied.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sam3d_core.segment.sam3 import OFFICIAL, Sam3Config, build_model, cpu_safe  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "sam3_tiny"
TINY = Sam3Config(
    resolution=112, patch_size=14, vit_dim=32, vit_depth=2, vit_heads=2, vit_mlp_ratio=2.0, vit_window=4,
    vit_global_blocks=(1,), pretrain_img_size=56, d_model=32, heads=2, ffn_dim=64, encoder_layers=1,
    decoder_layers=1, geometry_layers=1, num_queries=8, text_width=8, text_heads=2, text_layers=1,
)  # fmt: skip
# (name, text or None, [(x0, y0, x1, y1, label)] in photo pixels)
CASES = [
    ("text", "chair", []),
    ("exemplar", None, [(20, 30, 70, 90, 1), (100, 10, 150, 60, 0)]),
    ("combined", "red mug", [(-10, 40, 60, 130, 1)]),  # a box reaching past the photo: clipped
]


def photo() -> np.ndarray:
    """160 x 120 RGB: a gradient with two coloured blocks (larger than the tiny model's 112 square: downscaled)."""
    h, w = 120, 160
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)
    img[30:90, 20:70] = (200, 40, 40)
    img[10:60, 100:150] = (40, 60, 210)
    return img


def check_wiring(bpe: str) -> None:
    """Our build_model at the official size against sam3's own builder (one at a time: 3.4 GB each)."""
    import gc

    import sam3.model.decoder as dec
    import sam3.model.position_encoding as pe
    from sam3.model_builder import build_sam3_image_model

    orig_init, orig_coords = pe.PositionEmbeddingSine.__init__, dec.TransformerDecoder.__dict__["_get_coords"]

    def init(self, *a, precompute_resolution=None, **k):  # sam3 precomputes this cache on "cuda"
        orig_init(self, *a, **k)

    pe.PositionEmbeddingSine.__init__ = init
    dec.TransformerDecoder._get_coords = staticmethod(lambda h, w, device: orig_coords.__func__(h, w, "cpu"))
    try:
        theirs = build_sam3_image_model(bpe_path=bpe, device="cpu", checkpoint_path=None, load_from_HF=False)
        a, tree_a = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}, repr(theirs)
        del theirs
        gc.collect()
    finally:
        pe.PositionEmbeddingSine.__init__, dec.TransformerDecoder._get_coords = orig_init, orig_coords
    ours = build_model(OFFICIAL, bpe)
    b, tree_b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}, repr(ours)
    del ours
    gc.collect()
    assert a == b, (sorted(set(a) ^ set(b))[:5], [k for k in a if k in b and a[k] != b[k]][:5])
    assert tree_a == tree_b, "the module trees differ"
    print(f"wiring: {len(a)} entries, {sum(np.prod(s) for s in a.values()) / 1e6:.1f} M values, same module tree")


def run_case(proc, rgb: np.ndarray, text, boxes, box_ops, seen: dict) -> dict:
    """One prompt through Meta's processor: a PIL photo, the text, then each box normalised with sam3's box_ops."""
    h, w = rgb.shape[:2]
    state = proc.set_image(Image.fromarray(rgb))
    if text is not None:
        state = proc.set_text_prompt(text, state)
    norm = []
    for x0, y0, x1, y1, label in boxes:
        xyxy = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32).clamp(min=0)
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clamp(max=w)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clamp(max=h)
        cxcywh = box_ops.box_xyxy_to_cxcywh(xyxy) / torch.tensor([w, h, w, h], dtype=torch.float32)
        norm.append(cxcywh[0])
        state = proc.add_geometric_prompt(cxcywh[0].tolist(), bool(label), state)
    state["normalised"] = norm
    return state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpe", required=True, help="CLIP's bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--skip-wiring", action="store_true")
    args = ap.parse_args()
    import sam3
    from sam3.model import box_ops
    from sam3.model.sam3_image_processor import Sam3Processor

    if not args.skip_wiring:
        check_wiring(args.bpe)
    torch.manual_seed(0)
    model = build_model(TINY, args.bpe)
    with torch.no_grad():  # sam3 leaves two text-encoder tensors uninitialised (torch.empty: garbage, at times NaN)
        enc = model.backbone.language_backbone.encoder
        torch.nn.init.normal_(enc.positional_embedding, std=0.01)
        torch.nn.init.normal_(enc.text_projection, std=TINY.text_width**-0.5)
        bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not v.abs().max() < 100]
        assert not bad, f"uninitialised weights: {bad}"
    with torch.no_grad():  # the weights as they are stored (float16), so that the outputs are those of the file
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    weights = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        str(OUT / "sam3_tiny.safetensors"),
        metadata={"sam3d_sam3_config": TINY.to_json(), "format": "pt"},
    )
    rgb = photo()
    Image.fromarray(rgb).save(OUT / "photo.png")
    h, w = rgb.shape[:2]

    seen: dict = {}
    fwd_image, fwd_grounding = model.backbone.forward_image, model.forward_grounding

    def spy_image(x):
        seen["image"] = x.detach().clone()
        return fwd_image(x)

    def spy_grounding(**kw):
        out = fwd_grounding(**kw)
        seen["raw"] = {k: out[k].detach().clone() for k in ("pred_logits", "pred_boxes", "pred_masks",
                                                             "presence_logit_dec")}  # fmt: skip
        return out

    model.backbone.forward_image, model.forward_grounding = spy_image, spy_grounding
    proc = Sam3Processor(model, resolution=TINY.resolution, device="cpu", confidence_threshold=0.0)
    with cpu_safe():
        probs = [run_case(proc, rgb, text, boxes, box_ops, seen)["scores"].sort().values for _, text, boxes in CASES]
        # random weights score in a narrow band: a threshold that keeps some instances of every case, not all
        threshold = round(float(np.median([float(p[len(p) // 2]) for p in probs])), 4)
        proc.confidence_threshold = threshold
        tensors: dict[str, torch.Tensor] = {}
        cases = []
        for name, text, boxes in CASES:
            state = run_case(proc, rgb, text, boxes, box_ops, seen)
            norm = state["normalised"]
            tensors["image"] = seen["image"][0]
            for k, v in seen["raw"].items():
                tensors[f"{name}.raw.{k}"] = v
            if norm:
                tensors[f"{name}.boxes_normalised"] = torch.stack(norm)
            tensors[f"{name}.scores"] = state["scores"].float()
            tensors[f"{name}.boxes"] = state["boxes"].float()
            tensors[f"{name}.masks"] = state["masks"][:, 0].to(torch.uint8)
            cases.append({"name": name, "text": text, "boxes": [list(b) for b in boxes],
                          "kept": int(len(state["scores"]))})  # fmt: skip
            print(f"{name}: {len(state['scores'])} of {TINY.num_queries} kept, scores {state['scores'].tolist()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "cases.safetensors"))
    meta = {
        "made_by": "tests/make_sam3_fixture.py",
        "sam3": getattr(sam3, "__version__", "0.1.4"),
        "torch": torch.__version__,
        "threshold": threshold,
        "photo": "photo.png",
        "weights": "sam3_tiny.safetensors",
        "config": json.loads(TINY.to_json()),
        "cases": cases,
    }
    (OUT / "cases.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
