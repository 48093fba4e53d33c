"""The SAM back-end on a tiny random-weight Sam built from segment-anything's own classes.

Real code path: SamPredictor (resize, pad, encode once, prompt encoder, mask decoder, upscaling to
the original size), SamAutomaticMaskGenerator, torch.save -> our import -> safetensors -> strict load.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from sam3d_core.segment import Prompt
from sam3d_core.segment import weights as W
from sam3d_core.segment.sam1 import SamSegmenter, import_error

_err = import_error()
pytestmark = pytest.mark.skipif(
    _err is not None, reason=f"segment-anything unusable here: {_err} (it needs a torchvision built for this torch)"
)


def tiny_sam(seed: int = 0):
    """64 px input, 4x4 embedding, 32 channels: the real modules at toy size (~0.2 M parameters)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    dim, img, patch = 32, 64, 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img,
            patch_size=patch,
            embed_dim=dim,
            depth=2,
            num_heads=2,
            mlp_ratio=2,
            out_chans=dim,
            qkv_bias=True,
            use_rel_pos=True,
            window_size=2,
            global_attn_indexes=(1,),
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(img // patch, img // patch),
            input_image_size=(img, img),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=dim,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)  # not square on purpose


def test_predict_point_box_and_refine(photo):
    seg = SamSegmenter(tiny_sam(), name="sam tiny")
    seg.set_image(photo)
    cands = seg.predict(Prompt(points=((40, 20, 1), (10, 40, 0))))
    assert len(cands) == 3 and [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)
    for c in cands:
        assert c.mask.shape == (48, 80) and c.mask.dtype == bool and c.native.shape == (1, 16, 16)
        assert c.backend == "sam tiny" and c.score_kind == "predicted IoU"
    one = seg.predict(Prompt(box=(5, 5, 60, 40), mask_input=cands[0].native), multimask=False)
    assert len(one) == 1 and one[0].mask.shape == (48, 80)
    with pytest.raises(ValueError, match="outside the 80x48 image"):
        seg.predict(Prompt(points=((80, 10, 1),)))


def test_saved_checkpoint_imports_and_loads_strictly(photo, tmp_path, monkeypatch):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    sam = tiny_sam(seed=1)
    torch.save(sam.state_dict(), tmp_path / "tiny.pth")
    W.import_sam_checkpoint(tmp_path / "tiny.pth", name="tiny")
    model_type, state, _ = W.load_sam_state("tiny")
    assert model_type == "custom"  # not vit_h/l/b: the registry cannot build it, so we do
    loaded = tiny_sam(seed=2)
    loaded.load_state_dict(state, strict=True)
    a, b = SamSegmenter(sam), SamSegmenter(loaded)
    for s in (a, b):
        s.set_image(photo)
    pa, pb = (s.predict(Prompt(points=((30, 30, 1),)))[0] for s in (a, b))
    assert np.array_equal(pa.mask, pb.mask) and pa.score == pytest.approx(pb.score)
    with pytest.raises(ValueError, match="custom-size checkpoint"):
        SamSegmenter.from_state_dict(model_type, state)


def test_segment_all_runs_the_automatic_generator(photo):
    seg = SamSegmenter(tiny_sam(), amg={"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
    seg.set_image(photo)
    objs = seg.segment_all()
    assert all(o.mask.shape == (48, 80) and o.mask.dtype == bool for o in objs)
    assert [o.area for o in objs] == sorted((o.area for o in objs), reverse=True)
