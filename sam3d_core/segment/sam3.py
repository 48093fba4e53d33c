"""SAM 3 back-end (Meta's `sam3` package): concept prompts, every instance of a noun phrase and/or exemplar boxes.

    seg = Sam3Segmenter.from_imported("sam3")               # an imported checkpoint (`sam3d weights import-sam`)
    seg.set_image(rgb)                                      # [H, W, 3] uint8; the image encoder runs once
    found = seg.segment_concept(ConceptPrompt(text="chair"), min_score=0.5, max_objects=20)
    for c in found: c.mask, c.score, c.detected_box         # [H, W] bool; presence x probability; SAM 3's box

What this module does itself, and is tested against Meta's own `Sam3Processor` on a fixture made with its code
(tests/fixtures/sam3_tiny, tests/make_sam3_fixture.py): the pre-processing (the photo squashed to a
`resolution`-square with antialiased bilinear resizing on uint8, then (x / 255 - 0.5) / 0.5), the exemplar boxes
(photo pixels -> normalised cx, cy, w, h, appended one at a time), and the post-processing (score = sigmoid(logit) *
sigmoid(presence logit), kept above `min_score`, boxes back to photo pixels, mask logits resized bilinearly to the
photo, sigmoid > 0.5). The networks are `sam3`'s classes, built here at any size from a `Sam3Config` (the official
one, or a reduced one for tests) and loaded strictly from our verified safetensors: `sam3`'s own builder reads
the checkpoint with torch.load and downloads from the hub when given none, so it is never used.

`sam3` is imported lazily: without it (or without a torchvision whose C ops load beside torch) everything here
but the model itself still works, and `import_error()` says why.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sam3d_core.segment.base import MaskCandidate, check_image
from sam3d_core.segment.sam3_config import (  # noqa: F401  (re-exported: the back-end's public names)
    BPE_HINT,
    BPE_NAME,
    INSTALL_HINT,
    OFFICIAL,
    SCORE_KIND,
    VISUAL_TEXT,
    WHERE_TO_GET,
    Sam3Config,
    detector_state,
)


@dataclass(frozen=True, eq=False)
class ConceptPrompt:
    """What to find: a noun phrase, exemplar boxes, or both. Boxes are (x0, y0, x1, y1, label) in photo pixels,
    label 1 = an example of the concept, 0 = not one (a negative exemplar)."""

    text: str | None = None
    boxes: tuple[tuple[float, float, float, float, int], ...] = field(default=())

    def validate(self, height: int, width: int) -> None:
        """Raise ValueError naming the bad value and the fix."""
        text = (self.text or "").strip()
        if not text and not self.boxes:
            raise ValueError(
                'the concept prompt is empty: give a noun phrase (--text "chair") and/or an exemplar box '
                "(--exemplar X0,Y0,X1,Y1)"
            )
        if len(text) > 200:
            raise ValueError(f"text prompt of {len(text)} characters: use a short noun phrase such as 'red mug'")
        if self.boxes and not any(b[4] == 1 for b in self.boxes) and not text:
            raise ValueError(
                "every exemplar box is negative, so nothing says what to find; add a positive box around one "
                "instance, or a text prompt"
            )
        for x0, y0, x1, y1, label in self.boxes:
            if label not in (0, 1):
                raise ValueError(f"exemplar box label {label!r}: expected 1 (an example) or 0 (not one)")
            if not (x0 < x1 and y0 < y1):
                raise ValueError(f"exemplar box {(x0, y0, x1, y1)}: expected x0 < x1 and y0 < y1 (top-left first)")
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                raise ValueError(f"exemplar box {(x0, y0, x1, y1)} does not overlap the {width}x{height} photo")


# ---------------------------------------------------------------------------------------------------------------
# Pre- and post-processing (no sam3 needed; tested against the fixture)


def preprocess(image: np.ndarray, resolution: int):
    """[H, W, 3] uint8 RGB -> [1, 3, R, R] float32 in [-1, 1]: squashed to the square without keeping the aspect
    ratio (as SAM 3 was trained), antialiased bilinear on uint8 (rounded back to uint8, as torchvision's Resize on
    a uint8 image does), then (x / 255 - 0.5) / 0.5."""
    import torch

    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None]  # [1, 3, H, W] uint8
    if x.shape[-2:] != (resolution, resolution):
        x = torch.nn.functional.interpolate(
            x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )  # uint8 in, uint8 out: torch's own antialiased kernel for uint8 (what torchvision calls)
    x = x.float() / 255.0
    return (x - 0.5) / 0.5


def boxes_to_model(boxes, width: int, height: int):
    """Exemplar boxes in photo pixels [(x0, y0, x1, y1, label), ...] -> ([N, 4] float32 normalised cx, cy, w, h
    clipped to the photo, [N] bool labels)."""
    import torch

    b = np.array([bx[:4] for bx in boxes], np.float64).reshape(-1, 4)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    cxcywh = np.stack(
        [(b[:, 0] + b[:, 2]) / 2 / width, (b[:, 1] + b[:, 3]) / 2 / height, (b[:, 2] - b[:, 0]) / width,
         (b[:, 3] - b[:, 1]) / height], 1
    )  # fmt: skip
    labels = torch.tensor([bool(bx[4]) for bx in boxes], dtype=torch.bool)
    return torch.from_numpy(cxcywh.astype(np.float32)), labels


def postprocess(
    outputs: dict, width: int, height: int, min_score: float = 0.5, max_objects: int | None = None
) -> tuple[np.ndarray, np.ndarray, list]:
    """SAM 3's raw grounding outputs -> (scores [K] float32 best first, boxes [K, 4] float32 x0, y0, x1, y1 in photo
    pixels, masks: K lazily resized [H, W] bool masks as a list of callables).

    outputs: pred_logits [1, Q, 1], pred_boxes [1, Q, 4] (normalised cx, cy, w, h), pred_masks [1, Q, h, w] (logits),
    presence_logit_dec [1, 1]. Instances with score > min_score are kept (SAM 3's processor keeps > 0.5)."""
    import torch

    probs = outputs["pred_logits"].float().sigmoid() * outputs["presence_logit_dec"].float().sigmoid().unsqueeze(1)
    probs = probs.squeeze(-1)[0]  # [Q]
    keep = torch.nonzero(probs > min_score).flatten()
    keep = keep[torch.argsort(probs[keep], descending=True, stable=True)]
    if max_objects is not None:
        keep = keep[:max_objects]
    cx, cy, w, h = outputs["pred_boxes"][0, keep].float().unbind(-1)
    boxes = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
    boxes = boxes * torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
    logits = outputs["pred_masks"][0, keep]  # [K, h, w]

    def mask(i: int):
        def resize() -> np.ndarray:  # one instance at a time: a 4000 x 3000 float mask is 48 MB
            up = torch.nn.functional.interpolate(
                logits[i][None, None].float(), size=(height, width), mode="bilinear", align_corners=False
            )
            return (up.sigmoid() > 0.5)[0, 0].cpu().numpy()

        return resize

    return probs[keep].cpu().numpy(), boxes.cpu().numpy().reshape(-1, 4), [mask(i) for i in range(len(keep))]


# ---------------------------------------------------------------------------------------------------------------
# The model (needs sam3)


@contextlib.contextmanager
def cpu_safe():
    """sam3 0.1.4 pins a small tensor in host memory on every box encoding (Tensor.pin_memory), which raises on a
    machine without CUDA. There pinning can only fail, so while SAM 3 runs it is the identity (the tensor is then
    moved to its device as before). On a CUDA machine nothing changes."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.pin_memory = original


def import_error() -> str | None:
    """Why sam3 cannot be used here, or None when it imports (torchvision's C ops included).

    Importing sam3 (its package __init__ imports model_builder) switches TensorFloat-32 on for every matmul and
    convolution of the process on Ampere and later GPUs. In our worker that would silently change the precision of
    both reconstruction stages after the first concept prompt (and it broke the float32 tolerance of the sparse-conv
    GPU tests run after it), so the flags are restored right after the import."""
    import torch

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        import sam3.model.sam3_image  # noqa: F401
        import torchvision.ops  # noqa: F401  (a torchvision built for another torch fails only here)
    except Exception as e:  # ImportError, or RuntimeError "operator torchvision::nms does not exist"
        return f"{type(e).__name__}: {e}"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    return None


def _require_sam3() -> None:
    err = import_error()
    if err:
        raise ImportError(f"the SAM 3 back-end needs Meta's sam3 package ({err}); {INSTALL_HINT}")


def build_model(cfg: Sam3Config, bpe_path: str | os.PathLike):
    """A `sam3.model.sam3_image.Sam3Image` of the given sizes (eval mode, on the CPU, weights uninitialised for
    loading). The wiring follows the official image model (detector only; no video tracker)."""
    _require_sam3()
    import torch.nn as nn
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
    from sam3.model.model_misc import MultiheadAttentionWrapper as MHA
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT
    from sam3.model.vl_combiner import SAM3VLBackbone

    d = cfg.d_model

    def sine():  # no precompute_resolution: sam3 0.1.4 precomputes its cache on "cuda" (a cache only)
        return PositionEmbeddingSine(num_pos_feats=d, normalize=True, scale=None, temperature=10000)

    def mha(batch_first: bool | None, dropout: float = 0.1):
        kw = {} if batch_first is None else {"batch_first": batch_first}
        return MHA(num_heads=cfg.heads, dropout=dropout, embed_dim=d, **kw)

    vit = ViT(
        img_size=cfg.resolution, pretrain_img_size=cfg.pretrain_img_size, patch_size=cfg.patch_size,
        embed_dim=cfg.vit_dim, depth=cfg.vit_depth, num_heads=cfg.vit_heads, mlp_ratio=cfg.vit_mlp_ratio,
        norm_layer="LayerNorm", drop_path_rate=0.1, qkv_bias=True, use_abs_pos=True, tile_abs_pos=True,
        global_att_blocks=tuple(cfg.vit_global_blocks), rel_pos_blocks=(), use_rope=True, use_interp_rope=True,
        window_size=cfg.vit_window, pretrain_use_cls_token=True, retain_cls_token=False, ln_pre=True, ln_post=False,
        return_interm_layers=False, bias_patch_embed=False, compile_mode=None,
    )  # fmt: skip
    neck = Sam3DualViTDetNeck(
        position_encoding=sine(), d_model=d, scale_factors=[4.0, 2.0, 1.0, 0.5], trunk=vit,
        add_sam2_neck=False,
    )  # fmt: skip
    text = VETextEncoder(
        tokenizer=SimpleTokenizer(bpe_path=str(bpe_path)), d_model=d, width=cfg.text_width, heads=cfg.text_heads,
        layers=cfg.text_layers, context_length=cfg.context_length, vocab_size=cfg.vocab_size,
    )  # fmt: skip
    backbone = SAM3VLBackbone(visual=neck, text=text, scalp=1)
    enc_layer = TransformerEncoderLayer(
        activation="relu", d_model=d, dim_feedforward=cfg.ffn_dim, dropout=0.1, pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
        self_attention=mha(True), cross_attention=mha(True),
    )  # fmt: skip
    encoder = TransformerEncoderFusion(
        layer=enc_layer, num_layers=cfg.encoder_layers, d_model=d, num_feature_levels=1, frozen=False,
        use_act_checkpoint=True, add_pooled_text_to_img_feat=False, pool_text_with_mask=True,
    )  # fmt: skip
    dec_layer = TransformerDecoderLayer(
        activation="relu", d_model=d, dim_feedforward=cfg.ffn_dim, dropout=0.1, cross_attention=mha(None),
        n_heads=cfg.heads, use_text_cross_attention=True,
    )  # fmt: skip
    decoder = TransformerDecoder(
        layer=dec_layer,
        num_layers=cfg.decoder_layers,
        num_queries=cfg.num_queries,
        return_intermediate=True,
        box_refine=True,
        num_o2m_queries=0,
        dac=True,
        boxRPB="log",
        d_model=d,
        frozen=False,
        interaction_layer=None,
        dac_use_selfatt_ln=True,
        resolution=None,
        stride=None,
        use_act_checkpoint=True,
        presence_token=True,
    )  # fmt: skip  (resolution/stride only precompute a coordinate cache, on "cuda" in sam3 0.1.4)
    transformer = TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d)
    scoring = DotProductScoring(
        d_model=d, d_proj=d,
        prompt_mlp=MLP(input_dim=d, hidden_dim=cfg.ffn_dim, output_dim=d, num_layers=2, dropout=0.1, residual=True,
                       out_norm=nn.LayerNorm(d)),
    )  # fmt: skip
    seg_head = UniversalSegmentationHead(
        hidden_dim=d, upsampling_stages=3, aux_masks=False, presence_head=False, dot_product_scorer=None,
        act_ckpt=True, cross_attend_prompt=mha(None, dropout=0),
        pixel_decoder=PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=d,
                                   compile_mode=None),
    )  # fmt: skip
    geo_layer = TransformerEncoderLayer(
        activation="relu", d_model=d, dim_feedforward=cfg.ffn_dim, dropout=0.1, pos_enc_at_attn=False, pre_norm=True,
        self_attention=mha(False), pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
        cross_attention=mha(False),
    )  # fmt: skip
    geometry = SequenceGeometryEncoder(
        pos_enc=sine(), encode_boxes_as_points=False, points_direct_project=True, points_pool=True,
        points_pos_enc=True, boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True, d_model=d,
        num_layers=cfg.geometry_layers, layer=geo_layer, use_act_ckpt=True, add_cls=True, add_post_encode_proj=True,
    )  # fmt: skip
    model = Sam3Image(
        backbone=backbone, transformer=transformer, input_geometry_encoder=geometry, segmentation_head=seg_head,
        num_feature_levels=1, o2m_mask_predict=True, dot_prod_scoring=scoring, use_instance_query=False,
        multimask_output=True, inst_interactive_predictor=None, matcher=None,
    )  # fmt: skip
    return model.eval()


def load_weights(model, state: dict) -> None:
    """Load strictly: every parameter and buffer of the built model must be in the checkpoint, nothing else
    (CheckpointError naming the first few otherwise)."""
    from sam3d_core.weights.store import CheckpointError

    sd = detector_state(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"the SAM 3 checkpoint does not fit the model built from its config: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}) entries; "
            f"re-import it with `sam3d weights import-sam FILE --overwrite`. {WHERE_TO_GET}"
        )
    bad = [k for k in expected if tuple(sd[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"the SAM 3 checkpoint's {k} has shape {tuple(sd[k].shape)} but the model built from its config "
            f"expects {tuple(expected[k].shape)} ({len(bad)} such entries); the config stored with it does not "
            f"match the weights. {WHERE_TO_GET}"
        )
    model.load_state_dict(sd, strict=True)


class Sam3Segmenter:
    """Concept segmentation with a built SAM 3 image model: `set_image` once, then `segment_concept` per prompt."""

    is_basic = False
    reason = ""

    def __init__(self, model, cfg: Sam3Config, name: str = "sam3", device: str | None = None):
        import torch

        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.name = name
        self.image: np.ndarray | None = None
        self._vision: dict | None = None  # the image encoder's output for self.image

    @classmethod
    def from_state_dict(
        cls, cfg: Sam3Config, state: dict, bpe_path: str | os.PathLike, name: str = "sam3", device: str | None = None
    ) -> Sam3Segmenter:
        model = build_model(cfg, bpe_path)
        load_weights(model, state)
        return cls(model, cfg, name, device)

    @classmethod
    def from_imported(cls, name: str | Path = "sam3", device: str | None = None, root=None) -> Sam3Segmenter:
        from sam3d_core.segment.weights import load_sam3_state

        cfg, state, bpe, _ = load_sam3_state(name, root)
        return cls.from_state_dict(cfg, state, bpe, f"sam3 ({Path(str(name)).name})", device)

    # -- the photo -----------------------------------------------------------------------------------------
    def set_image(self, image: np.ndarray) -> None:
        """image: [H, W, 3] uint8 RGB. Runs the image encoder once."""
        import torch

        image = check_image(image)
        with torch.inference_mode():
            x = preprocess(image, self.cfg.resolution).to(self.device)
            self._vision = self.model.backbone.forward_image(x)
        self.image = image

    def image_state(self) -> tuple:
        return self.image, self._vision

    def restore_image_state(self, state: tuple) -> None:
        self.image, self._vision = state

    # -- prompts -------------------------------------------------------------------------------------------
    def raw_outputs(self, prompt: ConceptPrompt) -> dict:
        """SAM 3's grounding outputs for the current photo (pred_logits, pred_boxes, pred_masks, presence_logit_dec)."""
        import torch
        from sam3.model.data_misc import FindStage

        if self.image is None:
            raise RuntimeError("call set_image(image) before segment_concept()")
        h, w = self.image.shape[:2]
        prompt.validate(h, w)
        dev = self.device
        with torch.inference_mode(), cpu_safe():
            state = dict(self._vision)  # the text entries are added per prompt; the image's stay as they are
            text = (prompt.text or "").strip() or VISUAL_TEXT
            state.update(self.model.backbone.forward_text([text], device=dev))
            geometric = self.model._get_dummy_prompt()
            if prompt.boxes:
                boxes, labels = boxes_to_model(prompt.boxes, w, h)
                for i in range(len(boxes)):  # one at a time, as SAM 3's processor appends them
                    geometric.append_boxes(boxes[i].to(dev).view(1, 1, 4), labels[i].to(dev).view(1, 1))
            find = FindStage(
                img_ids=torch.tensor([0], device=dev, dtype=torch.long),
                text_ids=torch.tensor([0], device=dev, dtype=torch.long),
                input_boxes=None, input_boxes_mask=None, input_boxes_label=None, input_points=None,
                input_points_mask=None,
            )  # fmt: skip
            out = self.model.forward_grounding(
                backbone_out=state, find_input=find, geometric_prompt=geometric, find_target=None
            )
        return {k: out[k] for k in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec")}

    def segment_concept(
        self, prompt: ConceptPrompt, min_score: float = 0.5, max_objects: int | None = None
    ) -> list[MaskCandidate]:
        """Every instance of the concept with score > min_score, best first (at most max_objects)."""
        check_limits(min_score, max_objects)
        h, w = self.image.shape[:2] if self.image is not None else (0, 0)
        out = self.raw_outputs(prompt)
        scores, boxes, masks = postprocess(out, w, h, min_score, max_objects)
        return [
            MaskCandidate(mask(), float(score), self.name, SCORE_KIND, detected_box=tuple(map(float, box)))
            for score, box, mask in zip(scores, boxes, masks, strict=True)
        ]


def check_limits(min_score: float, max_objects: int | None) -> None:
    if not (isinstance(min_score, (int, float)) and 0.0 <= min_score < 1.0):
        raise ValueError(f"min_score {min_score!r}: expected 0 <= min_score < 1 (0.5 is SAM 3's default)")
    bad_count = isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1
    if max_objects is not None and bad_count:
        raise ValueError(f"max_objects {max_objects!r}: expected a whole number >= 1, or none for every instance")
