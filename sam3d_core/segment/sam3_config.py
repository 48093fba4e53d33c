"""SAM 3's sizes and the words shared by its back-end (sam3.py) and its checkpoint import (weights.py); no imports
beyond the standard library, so that both can use it without a cycle."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

INSTALL_HINT = (
    'pip install sam3 psutil torchvision (a torchvision built for your torch: `python -c "import torchvision.ops"` '
    "must work)"
)
WHERE_TO_GET = (
    "SAM 3 weights are gated: request access to facebook/sam3 on Hugging Face, download sam3.pt, then run "
    "`sam3d weights import-sam sam3.pt`"
)
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's byte-pair vocabulary, which SAM 3's text encoder tokenises with
BPE_HINT = (
    f"SAM 3's text encoder needs CLIP's {BPE_NAME} (in the sam3 GitHub repository under assets/, and in the "
    "open_clip_torch package); import it with `sam3d weights import-sam sam3.pt --bpe FILE`"
)
SCORE_KIND = "presence x probability"
VISUAL_TEXT = "visual"  # the text SAM 3 is given when only exemplar boxes are: "rely on the boxes"


@dataclass(frozen=True)
class Sam3Config:
    """Sizes of a SAM 3 image model. The defaults are the official checkpoint (facebook/sam3, sam3.pt)."""

    resolution: int = 1008  # the square the photo is resized to
    patch_size: int = 14
    vit_dim: int = 1024
    vit_depth: int = 32
    vit_heads: int = 16
    vit_mlp_ratio: float = 4.625
    vit_window: int = 24
    vit_global_blocks: tuple[int, ...] = (7, 15, 23, 31)
    pretrain_img_size: int = 336
    d_model: int = 256
    heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    geometry_layers: int = 3
    num_queries: int = 200
    text_width: int = 1024
    text_heads: int = 16
    text_layers: int = 24
    context_length: int = 32
    vocab_size: int = 49408

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Sam3Config:
        """A config stored beside a checkpoint; unknown or mistyped fields are refused (ValueError)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"SAM 3 config {text[:80]!r}: expected a JSON object of sizes")
        known = {f: v for f, v in cls.__dataclass_fields__.items()}
        bad = sorted(set(data) - set(known))
        if bad:
            raise ValueError(f"SAM 3 config: unknown field(s) {bad}; expected some of {sorted(known)}")
        if "vit_global_blocks" in data:
            data["vit_global_blocks"] = tuple(int(b) for b in data["vit_global_blocks"])
        cfg = cls(**data)
        for name in known:
            value = getattr(cfg, name)
            if name != "vit_global_blocks" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"SAM 3 config: {name} is {value!r}, expected a number")
        if cfg.resolution % cfg.patch_size:
            raise ValueError(f"SAM 3 config: resolution {cfg.resolution} is not a multiple of {cfg.patch_size}")
        return cfg


OFFICIAL = Sam3Config()


def detector_state(state: dict) -> dict:
    """The image model's entries of a full SAM 3 checkpoint: "detector.X" -> "X" (the "tracker." video entries are
    not used by the image model). A state dict without the prefix is returned as it is."""
    if any(k.startswith("detector.") for k in state):
        return {k[len("detector.") :]: v for k, v in state.items() if k.startswith("detector.")}
    return {k: v for k, v in state.items() if not k.startswith("tracker.")}
