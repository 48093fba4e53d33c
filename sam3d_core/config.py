"""Frozen dataclass configurations, one per model. The configuration is the constructor.

On disk a configuration is the JSON of `to_dict(cfg)`; `from_dict(cls, d)` reads it back. Field names
follow the official YAMLs where one exists, so the importer (convert.py) is a plain field-by-field map.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Pose latents of the stage-1 MoT, in the order the pose stream concatenates them
# (official `latent_share_transformer`), with their channel counts.
POSE_LATENTS: tuple[tuple[str, int], ...] = (
    ("6drotation_normalized", 6),
    ("translation", 3),
    ("scale", 3),
    ("translation_scale", 1),
)


@dataclass(frozen=True)
class DinoConfig:
    """DINOv2 ViT with register tokens (official: dinov2_vitl14_reg at 518 px)."""

    image_size: int = 518  # input side in pixels; the position table covers exactly this size
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    # False: affine-normed [CLS, patches] (stage 1). True: non-affine LN over all tokens (stage 2).
    prenorm_features: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class PointmapEmbedConfig:
    """Point-map patch embedder: a small ViT block per 8x8 window, one token per window."""

    input_size: int = 256
    patch_size: int = 8
    embed_dim: int = 512
    num_heads: int = 16
    mlp_ratio: float = 2.0

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ConditionConfig:
    """Embedder fuser: image and mask through DINO, optionally the point map; cropped + full views."""

    dino: DinoConfig = field(default_factory=DinoConfig)
    pointmap: PointmapEmbedConfig | None = field(default_factory=PointmapEmbedConfig)
    projection_hidden_multiplier: float = 4.0
    ffn_multiple_of: int = 256

    @property
    def embed_dim(self) -> int:
        dims = [self.dino.embed_dim] + ([self.pointmap.embed_dim] if self.pointmap else [])
        return max(dims)

    @property
    def num_tokens(self) -> int:
        d = self.dino
        per_dino = d.num_patches + (1 + d.num_register_tokens if d.prenorm_features else 1)
        return 4 * per_dino + (2 * self.pointmap.num_tokens if self.pointmap else 0)


@dataclass(frozen=True)
class SSFlowConfig:
    """Stage-1 mixture-of-transformers flow model (shape stream + pose stream)."""

    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    resolution: int = 16  # the shape latent is a resolution^3 grid of tokens
    latent_channels: int = 8
    qk_rms_norm: bool = True
    is_shortcut_model: bool = True  # has the step-size embedder `d_embedder`

    @property
    def num_shape_tokens(self) -> int:
        return self.resolution**3


@dataclass(frozen=True)
class SSDecoderConfig:
    """Sparse-structure VAE decoder: 16^3 x 8 latent -> 64^3 occupancy logits (dense 3D CNN)."""

    latent_channels: int = 8
    channels: tuple[int, ...] = (512, 128, 32)
    num_res_blocks: int = 2
    num_res_blocks_middle: int = 2
    out_channels: int = 1


@dataclass(frozen=True)
class PreprocessConfig:
    """Crop around the mask, pad to square, resize (official pipeline.yaml ss_preprocessor)."""

    image_size: int = 518
    box_size_factor: float = 1.2
    padding_factor: float = 0.0


@dataclass(frozen=True)
class SamplerConfig:
    """Stage-1 sampler settings as the official pipeline resolves them."""

    steps: int = 25
    rescale_t: float = 3.0
    cfg_strength: float = 7.0
    cfg_interval: tuple[float, float] = (0.0, 500.0)  # in network time units (t * time_scale)
    time_scale: float = 1000.0
    shortcut_steps: int = 4


@dataclass(frozen=True)
class Stage1Config:
    """Everything stage 1 needs: condition embedder, MoT flow model, occupancy decoder, sampler."""

    condition: ConditionConfig = field(default_factory=ConditionConfig)
    flow: SSFlowConfig = field(default_factory=SSFlowConfig)
    decoder: SSDecoderConfig = field(default_factory=SSDecoderConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    max_voxels: int = 42000  # the official cap (an int32 limit in mesh decoding)

    def check(self) -> None:
        """Raise ValueError when the parts do not fit together."""
        if self.condition.embed_dim != self.flow.cond_channels:
            raise ValueError(
                f"condition embedder width {self.condition.embed_dim} != flow cond_channels "
                f"{self.flow.cond_channels}; fix the configuration so both match"
            )
        if self.flow.model_channels % self.flow.num_heads:
            raise ValueError(f"model_channels {self.flow.model_channels} not divisible by heads")
        if self.condition.dino.image_size != self.preprocess.image_size:
            raise ValueError(
                f"DINO input size {self.condition.dino.image_size} != preprocess size {self.preprocess.image_size}"
            )
        if self.decoder.latent_channels != self.flow.latent_channels:
            raise ValueError("decoder latent_channels must equal flow latent_channels")


@dataclass(frozen=True)
class SLatFlowConfig:
    """Stage-2 sparse flow transformer over the structured latent (SLAT), 32^3 tokens after patch 2."""

    resolution: int = 64
    latent_channels: int = 8
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 2
    io_block_channels: tuple[int, ...] = (128,)
    num_io_res_blocks: int = 2
    qk_rms_norm: bool = True


@dataclass(frozen=True)
class SLatGaussianDecoderConfig:
    """SLAT -> 3D Gaussians (num_gaussians per voxel), swin sparse transformer."""

    resolution: int = 64
    latent_channels: int = 8
    model_channels: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 8
    num_gaussians: int = 32
    voxel_size: float = 1.5
    scaling_bias: float = 0.004
    opacity_bias: float = 0.1
    filter_3d: float = 0.0009  # official 3d_filter_kernel_size
    lr_xyz: float = 1.0
    lr_features_dc: float = 1.0
    lr_opacity: float = 1.0
    lr_scaling: float = 1.0
    lr_rotation: float = 0.1


@dataclass(frozen=True)
class SLatMeshDecoderConfig:
    """SLAT -> 256^3 FlexiCubes mesh with vertex colours (two sparse subdivisions)."""

    resolution: int = 64
    latent_channels: int = 8
    model_channels: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 8
    use_color: bool = True


@dataclass(frozen=True)
class SSEncoderConfig:
    """Sparse-structure VAE encoder: 64^3 occupancy -> 16^3 x 8 latent mean and log-variance (dense 3D CNN).

    The mirror of `SSDecoderConfig`: channels run from the fine level to the coarse one.
    """

    in_channels: int = 1
    latent_channels: int = 8
    channels: tuple[int, ...] = (32, 128, 512)
    num_res_blocks: int = 2
    num_res_blocks_middle: int = 2


@dataclass(frozen=True)
class SLatEncoderConfig:
    """SLAT VAE encoder: per-voxel DINO features [N, in_channels] -> latent mean and log-variance [N, 8].

    A swin sparse transformer like the SLAT decoders (window 8, shift 4 on odd blocks), on the 64^3 grid.
    """

    resolution: int = 64
    in_channels: int = 1024  # the DINO width (ViT-L/14)
    model_channels: int = 768
    latent_channels: int = 8
    num_blocks: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 8


@dataclass(frozen=True)
class LatentEncoderConfig:
    """The target-latent recipe: both encoders, the DINO whose patch features feed the SLAT encoder, the views.

    Views (TRELLIS `render.py` conventions): `num_views` cameras on a sphere of radius `camera_distance`
    around the origin of the local frame, spread by a Hammersley sequence shifted by `view_seed`, each looking
    at the origin with world +z up and a square image of `dino.image_size` pixels with `fov_degrees`.
    A voxel is visible in a view when its centre is within `depth_tolerance` (local units) of the rendered
    surface depth at its pixel (paper C.6.1).
    """

    ss_encoder: SSEncoderConfig = field(default_factory=SSEncoderConfig)
    slat_encoder: SLatEncoderConfig = field(default_factory=SLatEncoderConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    num_views: int = 150
    fov_degrees: float = 40.0
    camera_distance: float = 2.0
    depth_tolerance: float = 1.0 / 64  # one voxel edge: a surface voxel's centre may lie behind the surface
    view_seed: int = 0
    views_per_batch: int = 8  # DINO batch

    def check(self) -> None:
        """Raise ValueError when the parts do not fit together."""
        if self.slat_encoder.in_channels != self.dino.embed_dim:
            raise ValueError(
                f"slat_encoder.in_channels {self.slat_encoder.in_channels} != DINO embed_dim {self.dino.embed_dim}; "
                "the SLAT encoder reads DINO patch features, so both widths must match"
            )
        if self.num_views < 1 or self.views_per_batch < 1:
            raise ValueError(f"num_views {self.num_views} and views_per_batch {self.views_per_batch} must be >= 1")
        if not 0.0 < self.fov_degrees < 180.0 or not self.camera_distance > 0.8660254:
            raise ValueError(
                f"fov_degrees {self.fov_degrees} must lie in (0, 180) and camera_distance {self.camera_distance} "
                "beyond the local cube's corners (> sqrt(3) / 2)"
            )


SLAT_MEAN = (0.12211431, 0.37204156, -1.26521907, -2.05276058, -3.10432536, -0.11294304, -0.85146744, 0.45506954)
SLAT_STD = (2.37326008, 2.13174402, 2.2413953, 2.30589401, 2.1191894, 1.8969511, 2.41684989, 2.08374642)


@dataclass(frozen=True)
class Stage2Config:
    """Texture and refinement: condition embedder, SLAT flow, decoders, sampler, SLAT statistics."""

    condition: ConditionConfig = field(
        default_factory=lambda: ConditionConfig(dino=DinoConfig(prenorm_features=True), pointmap=None)
    )
    flow: SLatFlowConfig = field(default_factory=SLatFlowConfig)
    gaussian: SLatGaussianDecoderConfig = field(default_factory=SLatGaussianDecoderConfig)
    mesh: SLatMeshDecoderConfig = field(default_factory=SLatMeshDecoderConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(rescale_t=1.0, cfg_strength=1.0))
    slat_mean: tuple[float, ...] = SLAT_MEAN  # official pipeline.yaml values (not TRELLIS's)
    slat_std: tuple[float, ...] = SLAT_STD


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict) -> T:
    """Build a (nested) frozen dataclass from a dict; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(inner[0], value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if origin is tuple:
        return tuple(value)
    return value


def save_json(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps({"type": type(cfg).__name__, **to_dict(cfg)}, indent=2))


def load_json(cls: type[T], path: str | Path) -> T:
    data = json.loads(Path(path).read_text())
    kind = data.pop("type", cls.__name__)
    if kind != cls.__name__:
        raise ValueError(f"{path}: holds a {kind} config, expected {cls.__name__}")
    return from_dict(cls, data)
