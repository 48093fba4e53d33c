"""The stage-1 parity fixture (made by running the official code; see fixtures/stage1_small/meta.json)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sam3d_core.models.ss_flow import SSFlowModel
from sam3d_core.registry import stage1_preset

FIXTURE = Path(__file__).parent / "fixtures" / "stage1_small"
GENERATOR_PREFIX = "_base_models.generator.reverse_fn.backbone."


def load_official_generator() -> tuple[SSFlowModel, dict[str, torch.Tensor]]:
    """The fixture's ss_generator.ckpt in our model (strict load), and the fixture tensors."""
    ckpt = torch.load(FIXTURE / "official" / "ss_generator.ckpt", weights_only=True, map_location="cpu")
    n = len(GENERATOR_PREFIX)
    weights = {k[n:]: v for k, v in ckpt["state_dict"].items() if k.startswith(GENERATOR_PREFIX)}
    model = SSFlowModel(stage1_preset("tiny").flow).eval()
    model.load_state_dict(weights, strict=True)
    return model, load_file(FIXTURE / "data.safetensors")


def group(data: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The fixture tensors under `prefix`, keyed by the rest of their name."""
    return {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}
