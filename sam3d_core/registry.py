"""Named presets. `official` reproduces the released SAM 3D Objects; `tiny` is for tests on a CPU."""

from __future__ import annotations

from sam3d_core.config import (
    ConditionConfig,
    DinoConfig,
    LatentEncoderConfig,
    PointmapEmbedConfig,
    PreprocessConfig,
    SamplerConfig,
    SLatEncoderConfig,
    SLatFlowConfig,
    SLatGaussianDecoderConfig,
    SLatMeshDecoderConfig,
    SSDecoderConfig,
    SSEncoderConfig,
    SSFlowConfig,
    Stage1Config,
    Stage2Config,
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
    # Our own small model (issue 14), trained from scratch by `sam3d train-default`: the official architecture
    # at 224 px with an 8^3 x 8 shape latent (three x2 upsamplings to 64^3), ~19 M parameters (fp16 < 40 MB), so
    # that a whole object takes seconds on a laptop CPU. Stage 1 only: its texture is projected from the photo.
    "default": Stage1Config(
        condition=ConditionConfig(
            dino=DinoConfig(image_size=224, embed_dim=192, depth=4, num_heads=3),
            pointmap=PointmapEmbedConfig(input_size=128, patch_size=8, embed_dim=192, num_heads=3, mlp_ratio=2.0),
        ),
        flow=SSFlowConfig(model_channels=256, cond_channels=192, num_blocks=5, num_heads=4, resolution=8),
        decoder=SSDecoderConfig(channels=(64, 32, 16, 16), num_res_blocks=1, num_res_blocks_middle=1),
        preprocess=PreprocessConfig(image_size=224),
        sampler=SamplerConfig(steps=16, cfg_strength=2.0),
    ),
}


STAGE2_PRESETS: dict[str, Stage2Config] = {
    "official": Stage2Config(),
    # The sizes of tests/fixtures/stage2_small (made by the official code; see its meta.json).
    "tiny": Stage2Config(
        condition=ConditionConfig(
            dino=DinoConfig(image_size=70, embed_dim=64, depth=2, num_heads=2, prenorm_features=True), pointmap=None
        ),
        flow=SLatFlowConfig(model_channels=64, cond_channels=64, num_blocks=2, num_heads=2, io_block_channels=(16,)),
        gaussian=SLatGaussianDecoderConfig(model_channels=64, num_blocks=2, num_heads=2),
        mesh=SLatMeshDecoderConfig(model_channels=256, num_blocks=1, num_heads=4, mlp_ratio=1.0),
        preprocess=PreprocessConfig(image_size=70),
    ),
}


def stage2_preset(name: str) -> Stage2Config:
    try:
        return STAGE2_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown stage-2 preset {name!r}; choose one of {sorted(STAGE2_PRESETS)}") from None


def stage1_preset(name: str) -> Stage1Config:
    try:
        return STAGE1_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown stage-1 preset {name!r}; choose one of {sorted(STAGE1_PRESETS)}") from None


ENCODER_PRESETS: dict[str, LatentEncoderConfig] = {
    # TRELLIS's ss_enc_conv3d_16l8 and slat_enc_swin8_B_64l8 sizes (the official decoders' mirrors), DINOv2 ViT-L/14
    # at 518 px, 150 views as TRELLIS's dataset toolkit.
    "official": LatentEncoderConfig(),
    # The default model's stage-1 encoder (the mirror of its decoder); it has no stage 2, hence no SLAT encoder
    # of its own (the tiny one stands in, unused).
    "default": LatentEncoderConfig(
        ss_encoder=SSEncoderConfig(channels=(16, 16, 32, 64), num_res_blocks=1, num_res_blocks_middle=1),
        slat_encoder=SLatEncoderConfig(in_channels=64, model_channels=64, num_blocks=2, num_heads=2),
        dino=DinoConfig(image_size=70, embed_dim=64, depth=2, num_heads=2),
        num_views=6,
    ),
    # The tiny stage-1 decoder's mirror and the tiny stage-2 DINO, few views: CPU tests in seconds.
    "tiny": LatentEncoderConfig(
        ss_encoder=SSEncoderConfig(channels=(8, 16, 32)),
        slat_encoder=SLatEncoderConfig(in_channels=64, model_channels=64, num_blocks=2, num_heads=2),
        dino=DinoConfig(image_size=70, embed_dim=64, depth=2, num_heads=2),
        num_views=6,
    ),
}


def encoder_preset(name: str) -> LatentEncoderConfig:
    try:
        return ENCODER_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown encoder preset {name!r}; choose one of {sorted(ENCODER_PRESETS)}") from None
