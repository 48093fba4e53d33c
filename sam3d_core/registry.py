"""Named presets. `official` reproduces the released SAM 3D Objects; `tiny` is for tests on a CPU."""

from __future__ import annotations

from sam3d_core.config import (
    ConditionConfig,
    DinoConfig,
    PointmapEmbedConfig,
    PreprocessConfig,
    SSDecoderConfig,
    SSFlowConfig,
    Stage1Config,
)

STAGE1_PRESETS: dict[str, Stage1Config] = {
    "official": Stage1Config(),
    # Every shape rule of the official model, at a size that runs in well under a second on a CPU.
    "tiny": Stage1Config(
        condition=ConditionConfig(
            dino=DinoConfig(image_size=70, embed_dim=64, depth=2, num_heads=2),
            pointmap=PointmapEmbedConfig(input_size=40, patch_size=8, embed_dim=32),
        ),
        flow=SSFlowConfig(model_channels=64, cond_channels=64, num_blocks=2, num_heads=2),
        decoder=SSDecoderConfig(channels=(32, 16, 8)),
        preprocess=PreprocessConfig(image_size=70),
    ),
}


def stage1_preset(name: str) -> Stage1Config:
    try:
        return STAGE1_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown stage-1 preset {name!r}; choose one of {sorted(STAGE1_PRESETS)}") from None
