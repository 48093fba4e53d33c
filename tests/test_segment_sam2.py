"""SAM 2: checkpoint import (runs everywhere) and the back-end on a random-weight SAM 2.1 tiny (needs sam2).

The sam2 package needs torchvision; where it is missing (this project's CPU CI: no CPU torchvision
wheel on PyPI for our torch) the model tests skip and say so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam3d_core.segment import Prompt
from sam3d_core.segment import weights as W
from sam3d_core.segment.sam1 import mask_to_logits as sam1_logits
from sam3d_core.segment.sam2 import config_name, import_error
from sam3d_core.segment.sam2 import mask_to_logits as sam2_logits
from sam3d_core.weights.store import CheckpointError


def _fake_sam2_state(blocks: int, v21: bool) -> dict[str, torch.Tensor]:
    """Key layout of a SAM 2 checkpoint (the import path is format-level; the strict load is model-level)."""
    g = torch.Generator().manual_seed(0)
    sd = {f"image_encoder.trunk.blocks.{i}.attn.qkv.weight": torch.randn(6, 2, generator=g) for i in range(blocks)}
    sd |= {
        "image_encoder.trunk.patch_embed.proj.weight": torch.randn(96, 3, 7, 7, generator=g),
        "sam_prompt_encoder.point_embeddings.0.weight": torch.randn(1, 256, generator=g),
        "sam_mask_decoder.iou_token.weight": torch.randn(1, 256, generator=g),
        "memory_encoder.out_proj.weight": torch.randn(64, 256, 1, 1, generator=g),
    }
    if v21:
        sd["no_obj_embed_spatial"] = torch.randn(1, 64, generator=g)
    return sd


def test_sam2_checkpoints_import_by_size_and_version(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    tiny, small = tmp_path / "sam2.1_hiera_tiny.pt", tmp_path / "sam2_hiera_small.pt"
    torch.save({"model": _fake_sam2_state(12, v21=True)}, tiny)  # official files wrap the state in "model"
    torch.save({"model": _fake_sam2_state(16, v21=False)}, small)
    assert W.import_sam_checkpoint(tiny).name == "sam2.1_hiera_tiny"
    assert W.import_sam_checkpoint(small).name == "sam2_hiera_small"
    assert [m["name"] for m in W.list_sam(kind="sam2")] == ["sam2.1_hiera_tiny", "sam2_hiera_small"]
    assert W.list_sam(kind="sam") == []
    size, version, state, digest = W.load_sam2_state("sam2.1_hiera_tiny")
    assert (size, version, len(digest)) == ("tiny", "2.1", 64)
    assert torch.equal(state["no_obj_embed_spatial"], _fake_sam2_state(12, v21=True)["no_obj_embed_spatial"])
    assert W.load_sam2_state("sam2_hiera_small")[:2] == ("small", "2")
    with pytest.raises(CheckpointError, match="is a sam2 checkpoint, not sam"):
        W.load_sam_state("sam2.1_hiera_tiny")

    broken = tmp_path / "no_decoder.pt"
    sd = {k: v for k, v in _fake_sam2_state(12, v21=True).items() if not k.startswith("sam_mask_decoder.")}
    torch.save({"model": sd}, broken)
    with pytest.raises(CheckpointError, match="no 'sam_mask_decoder.' entries; not a complete SAM 2"):
        W.import_sam_checkpoint(broken)


def test_sam2_config_names():
    assert config_name("tiny") == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert config_name("base_plus") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert config_name("large", "2") == "configs/sam2/sam2_hiera_l.yaml"
    with pytest.raises(ValueError, match="expected one of tiny, small, base_plus, large"):
        config_name("custom")


def test_masks_become_logits_in_each_models_frame():
    mask = np.zeros((48, 80), bool)  # wide photo: SAM pads below, SAM 2 stretches to a square
    mask[:, 40:] = True  # right half
    one = sam1_logits(mask, 64, 16)
    assert one.shape == (1, 16, 16) and one.dtype == np.float32
    assert (one[0, :9, 9:] > 0).all() and (one[0, :9, :7] < 0).all()  # 80 -> 64 wide, 48 -> 38 (9.6 rows)
    assert (one[0, 11:] < 0).all()  # the padding below the photo is background
    two = sam2_logits(mask, 16)
    assert two.shape == (1, 16, 16) and (two[0, :, 8:] > 0).all() and (two[0, :, :8] < 0).all()


_err = import_error()
needs_sam2 = pytest.mark.skipif(
    _err is not None, reason=f"sam2 unusable here: {_err} (pip install sam2 with a torchvision built for this torch)"
)


@needs_sam2
@pytest.mark.slow  # SAM 2.1 tiny at its 1024 px input on a CPU: a few seconds
def test_sam2_tiny_random_weights_predict_refine(tmp_path, monkeypatch):
    from sam2.build_sam import build_sam2

    from sam3d_core.segment.sam2 import Sam2Segmenter

    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    model = build_sam2(config_name("tiny"), ckpt_path=None, device="cpu")
    torch.save({"model": model.state_dict()}, tmp_path / "sam2.1_hiera_tiny.pt")
    W.import_sam_checkpoint(tmp_path / "sam2.1_hiera_tiny.pt")
    seg = Sam2Segmenter.from_imported("sam2.1_hiera_tiny")
    assert seg.name == "sam2.1 tiny" and not seg.is_basic
    photo = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    seg.set_image(photo)
    cands = seg.predict(Prompt(points=((40, 20, 1),)))
    assert len(cands) == 3 and [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)
    assert all(c.mask.shape == (48, 80) and c.native.shape == (1, 256, 256) for c in cands)
    again = seg.predict(Prompt(points=((40, 20, 1), (5, 5, 0)), mask_input=cands[0].native), multimask=False)
    assert len(again) == 1 and again[0].mask.shape == (48, 80)
