"""Official SAM 3D Objects files -> our configs and state dicts.

The official folder holds hydra YAMLs and pickled `.ckpt` files. We read the YAMLs as plain data
(yaml.safe_load; `_target_` strings are checked, never instantiated) and the checkpoints with
`torch.load(weights_only=True)`, which refuses any pickled code. Our modules use the official parameter
names, so converting a checkpoint is a prefix map; hub.py then checks every key and shape.
"""

from __future__ import annotations

import functools
import reprlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from sam3d_core.config import (
    POSE_LATENTS,
    ConditionConfig,
    DinoConfig,
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
from sam3d_core.weights.store import CheckpointError, torch_load_refusal

HF_REPO = "facebook/sam-3d-objects"
WHERE_TO_GET = (
    f"download the gated Hugging Face repository {HF_REPO} (folder checkpoints/) after accepting its "
    "licence, then run `sam3d weights import <that folder>`"
)

# name -> (embed_dim, depth, num_heads) for the DINOv2 hub entries the official YAMLs may name.
DINO_ARCHS = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16)}
DINO_OVERRIDABLE = {"embed_dim", "depth", "num_heads", "img_size", "pretrained"}


@dataclass(frozen=True)
class Component:
    """One official checkpoint file and where its tensors go in our model."""

    name: str  # official stem: ss_generator, ss_decoder, ...
    state_dict_key: str | None  # "state_dict" for Lightning-style files, None for flat ones
    prefixes: tuple[tuple[str, str], ...]  # (official prefix, our prefix)
    target_suffix: str  # expected end of the YAML's _target_


STAGE1_COMPONENTS = (
    Component(
        "ss_generator",
        "state_dict",
        (
            ("_base_models.condition_embedder.", "condition_embedder."),
            ("_base_models.generator.reverse_fn.backbone.", "generator."),
        ),
        "ShortCut",
    ),
    Component("ss_decoder", None, (("", "decoder."),), "SparseStructureDecoderTdfyWrapper"),
)


STAGE2_COMPONENTS = (
    Component(
        "slat_generator",
        "state_dict",
        (
            ("_base_models.condition_embedder.", "condition_embedder."),
            ("_base_models.generator.reverse_fn.backbone.", "generator."),
        ),
        "FlowMatching",
    ),
    Component("slat_decoder_gs", None, (("", "decoder_gs."),), "SLatGaussianDecoderTdfyWrapper"),
    Component("slat_decoder_mesh", None, (("", "decoder_mesh."),), "SLatMeshDecoderTdfyWrapper"),
)


# The encoders (released after the first revision, whose encoder files were empty): flat state dicts, loaded
# by the official pipeline with state_dict_key None, as the decoders. Our modules are the encoders themselves.
SS_ENCODER_COMPONENTS = (Component("ss_encoder", None, (("", ""),), "SparseStructureEncoderTdfyWrapper"),)
SLAT_ENCODER_COMPONENTS = (Component("slat_encoder", None, (("", ""),), "SLatEncoderTdfyWrapper"),)


# ---------------------------------------------------------------------------------------------
# YAML -> config


MAX_YAML_BYTES = 1 << 20  # the official YAMLs are a few KB
MAX_YAML_NODES = 100_000  # after aliases are expanded: a "billion laughs" file of 1 KB is refused, not built


class _CheckedLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only, no tags that build objects)."""


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes of a composed YAML graph once aliases are expanded, counted with memoisation (a shared node counts
    every time it is used) and stopped past `limit`."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        sizes[id(n)] = 1  # a recursive alias counts once while it is being measured
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        else:
            total = 1
        sizes[id(n)] = min(total, limit + 1)
        return sizes[id(n)]

    return size(node)


def read_yaml(path: Path) -> dict:
    """A YAML file as plain data (safe_load semantics), refusing oversized files and alias bombs before they are
    expanded."""
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}; {WHERE_TO_GET}")
    if path.stat().st_size > MAX_YAML_BYTES:
        size = path.stat().st_size
        raise CheckpointError(f"{path} is {size} bytes, not an official config (a few KB); re-download it")
    try:
        loader = _CheckedLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
                raise CheckpointError(
                    f"{path} expands to more than {MAX_YAML_NODES} values through YAML aliases (an alias bomb?); "
                    "refusing to read it: use the official file"
                )
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid YAML ({str(e)[:200]}); re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds no mapping; re-download it")
    return data


def _fields_checked(fn: Callable) -> Callable:
    """A config reader whose last argument is `where` (the file): a missing field, or one of the wrong type, is a
    CheckpointError naming the file and the field, not a KeyError or TypeError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CheckpointError:
            raise
        except KeyError as e:
            where = kwargs.get("where", args[-1])
            raise CheckpointError(
                f"{where}: field {e.args[0]!r} is missing; is this an official SAM 3D file? Re-download it"
            ) from None
        except (TypeError, ValueError, AttributeError, IndexError) as e:
            where = kwargs.get("where", args[-1])
            raise CheckpointError(
                f"{where}: a field has the wrong type or value ({type(e).__name__}: {str(e)[:160]}); is this an "
                "official SAM 3D file? Re-download it"
            ) from None

    return wrapper


def _get(d: dict, dotted: str, where: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CheckpointError(f"{where}: field {dotted!r} is missing; is this an official SAM 3D file?")
        node = node[part]
    return node


def _short(value: Any, limit: int = 200) -> str:
    """repr() cut to `limit` characters: error messages never print a whole (possibly huge) structure."""
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_target(node: dict, suffix: str, where: str) -> None:
    if not isinstance(node, dict):
        raise CheckpointError(f"{where}: expected a mapping with _target_ ...{suffix}, found {_short(node)}")
    target = node.get("_target_", "")
    if not isinstance(target, str) or not target.endswith(suffix):
        raise CheckpointError(f"{where}: _target_ is {_short(target)}, expected one ending in {suffix!r}")


@_fields_checked
def dino_config(entry: dict, where: str) -> DinoConfig:
    _check_target(entry, ".Dino", where)
    name = str(entry.get("dino_model", ""))
    arch = name.removeprefix("dinov2_").removesuffix("_reg")
    if arch not in DINO_ARCHS:
        raise CheckpointError(
            f"{where}: dino_model {name!r} is not supported; expected one of "
            f"{sorted('dinov2_' + a + '_reg' for a in DINO_ARCHS)}"
        )
    embed_dim, depth, heads = DINO_ARCHS[arch]
    kwargs = dict(entry.get("backbone_kwargs") or {})
    unknown = set(kwargs) - DINO_OVERRIDABLE
    if unknown:
        raise CheckpointError(f"{where}: backbone_kwargs {sorted(unknown)} are not supported")
    size = int(entry.get("input_size", 224))
    if int(kwargs.get("img_size", 518)) != size:
        raise CheckpointError(
            f"{where}: DINO img_size {kwargs.get('img_size', 518)} != input_size {size}; "
            "position-embedding interpolation is not supported"
        )
    return DinoConfig(
        image_size=size,
        embed_dim=int(kwargs.get("embed_dim", embed_dim)),
        depth=int(kwargs.get("depth", depth)),
        num_heads=int(kwargs.get("num_heads", heads)),
        num_register_tokens=4 if name.endswith("_reg") else 0,
        prenorm_features=bool(entry.get("prenorm_features", False)),
    )


@_fields_checked
def condition_config(fuser: dict, where: str) -> ConditionConfig:
    _check_target(fuser, ".EmbedderFuser", where)
    entries = fuser.get("embedder_list") or []
    if not isinstance(entries, list) or len(entries) not in (2, 3):
        raise CheckpointError(f"{where}: embedder_list has {_short(entries)}; expected the official 2 or 3 entries")
    inputs = [[tuple(kg) for kg in e[1]] for e in entries]
    expected = [[("image", "cropped"), ("rgb_image", "full")], [("mask", "cropped"), ("rgb_image_mask", "full")]]
    if inputs[:2] != expected:
        raise CheckpointError(f"{where}: embedder_list inputs {_short(inputs)} do not match the official layout")
    dinos = [dino_config(e[0], f"{where} embedder_list[{i}]") for i, e in enumerate(entries[:2])]
    if dinos[0] != dinos[1]:
        raise CheckpointError(f"{where}: the image and mask DINO configurations differ ({_short(dinos)})")
    pointmap = None
    if len(entries) == 3:
        pm = entries[2][0]
        _check_target(pm, ".PointPatchEmbed", where)
        if pm.get("remap_output", "exp") != "linear":
            raise CheckpointError(f"{where}: PointPatchEmbed remap_output {pm.get('remap_output')!r} unsupported")
        pointmap = PointmapEmbedConfig(
            input_size=int(pm["input_size"]), patch_size=int(pm["patch_size"]), embed_dim=int(pm["embed_dim"])
        )
    return ConditionConfig(
        dino=dinos[0],
        pointmap=pointmap,
        projection_hidden_multiplier=float(fuser.get("projection_net_hidden_dim_multiplier", 4.0)),
    )


@_fields_checked
def flow_config(backbone: dict, where: str) -> SSFlowConfig:
    _check_target(backbone, "SparseStructureFlowTdfyWrapper", where)
    mapping = backbone.get("latent_mapping") or {}
    want = dict(POSE_LATENTS) | {"shape": int(backbone.get("in_channels", 8))}
    got = {k: int(v.get("in_channels", -1)) for k, v in mapping.items()}
    if got != want:
        raise CheckpointError(f"{where}: latent_mapping {_short(got)} differs from the official {want}")
    shared = backbone.get("latent_share_transformer") or {}
    if list(shared.get("6drotation_normalized", [])) != [n for n, _ in POSE_LATENTS]:
        raise CheckpointError(
            f"{where}: latent_share_transformer {_short(shared)} differs from the official pose stream"
        )
    if backbone.get("pe_mode", "ape") != "ape" or int(backbone.get("patch_size", 1)) != 1:
        raise CheckpointError(f"{where}: only pe_mode 'ape' with patch_size 1 is supported")
    return SSFlowConfig(
        model_channels=int(backbone["model_channels"]),
        cond_channels=int(backbone["cond_channels"]),
        num_blocks=int(backbone["num_blocks"]),
        num_heads=int(backbone["num_heads"]),
        mlp_ratio=float(backbone.get("mlp_ratio", 4)),
        resolution=int(backbone["resolution"]),
        latent_channels=int(backbone.get("in_channels", 8)),
        qk_rms_norm=bool(backbone.get("qk_rms_norm", False)),
        is_shortcut_model=bool(backbone.get("is_shortcut_model", False)),
    )


@_fields_checked
def decoder_config(data: dict, where: str) -> SSDecoderConfig:
    _check_target(data, "SparseStructureDecoderTdfyWrapper", where)
    if data.get("norm_type", "layer") != "layer":
        raise CheckpointError(f"{where}: norm_type {data.get('norm_type')!r} unsupported (expected 'layer')")
    return SSDecoderConfig(
        latent_channels=int(data["latent_channels"]),
        channels=tuple(int(c) for c in data["channels"]),
        num_res_blocks=int(data["num_res_blocks"]),
        num_res_blocks_middle=int(data.get("num_res_blocks_middle", 2)),
        out_channels=int(data["out_channels"]),
    )


@_fields_checked
def preprocess_config(pipeline: dict, where: str) -> PreprocessConfig:
    pre = _get(pipeline, "ss_preprocessor", where)
    resize = [t for t in _get(pre, "img_transform.transforms", where) if "Resize" in str(t.get("_target_"))]
    crop = [
        t
        for t in _get(pre, "img_mask_pointmap_joint_transform", where)
        if str(t.get("_target_", "")).endswith("crop_around_mask_with_padding")
    ]
    if len(resize) != 1 or len(crop) != 1:
        raise CheckpointError(f"{where}: ss_preprocessor does not have the official resize + crop")
    return PreprocessConfig(
        image_size=int(resize[0]["size"]),
        box_size_factor=float(crop[0].get("box_size_factor", 1.2)),
        padding_factor=float(crop[0].get("padding_factor", 0.0)),
    )


def stage1_config_from_official(folder: Path) -> Stage1Config:
    """Read pipeline.yaml, ss_generator.yaml and ss_decoder.yaml of an official folder."""
    pipeline = read_yaml(folder / "pipeline.yaml")
    gen_path = folder / str(pipeline.get("ss_generator_config_path", "ss_generator.yaml"))
    dec_path = folder / str(pipeline.get("ss_decoder_config_path", "ss_decoder.yaml"))
    gen, dec = read_yaml(gen_path), read_yaml(dec_path)
    w = gen_path.name
    _check_target(_get(gen, "module.generator.backbone", w), "ShortCut", w)
    cfg = Stage1Config(
        condition=condition_config(_get(gen, "module.condition_embedder.backbone", w), w),
        flow=flow_config(_get(gen, "module.generator.backbone.reverse_fn.backbone", w), w),
        decoder=decoder_config(dec, dec_path.name),
        preprocess=preprocess_config(pipeline, "pipeline.yaml"),
    )
    try:
        cfg.check()
    except ValueError as e:
        raise CheckpointError(f"{folder}: inconsistent configuration: {e}") from e
    return cfg


@_fields_checked
def slat_flow_config(backbone: dict, where: str) -> SLatFlowConfig:
    _check_target(backbone, "SLatFlowModelTdfyWrapper", where)
    if backbone.get("pe_mode", "ape") != "ape" or int(backbone.get("patch_size", 2)) != 2:
        raise CheckpointError(f"{where}: only pe_mode 'ape' with patch_size 2 is supported")
    if int(backbone.get("in_channels", 8)) != int(backbone.get("out_channels", 8)):
        raise CheckpointError(f"{where}: in_channels and out_channels differ; expected one latent width")
    return SLatFlowConfig(
        resolution=int(backbone["resolution"]),
        latent_channels=int(backbone.get("in_channels", 8)),
        model_channels=int(backbone["model_channels"]),
        cond_channels=int(backbone["cond_channels"]),
        num_blocks=int(backbone["num_blocks"]),
        num_heads=int(backbone["num_heads"]),
        mlp_ratio=float(backbone.get("mlp_ratio", 4)),
        io_block_channels=tuple(int(c) for c in backbone["io_block_channels"]),
        num_io_res_blocks=int(backbone.get("num_io_res_blocks", 2)),
        qk_rms_norm=bool(backbone.get("qk_rms_norm", False)),
    )


@_fields_checked
def _swin(data: dict, where: str) -> dict:
    if data.get("attn_mode", "swin") != "swin":
        raise CheckpointError(f"{where}: attn_mode {data.get('attn_mode')!r} unsupported (expected 'swin')")
    return dict(
        resolution=int(data["resolution"]),
        latent_channels=int(data["latent_channels"]),
        model_channels=int(data["model_channels"]),
        num_blocks=int(data["num_blocks"]),
        num_heads=int(data["num_heads"]),
        mlp_ratio=float(data.get("mlp_ratio", 4)),
        window_size=int(data.get("window_size", 8)),
    )


@_fields_checked
def gaussian_decoder_config(data: dict, where: str) -> SLatGaussianDecoderConfig:
    _check_target(data, "SLatGaussianDecoderTdfyWrapper", where)
    rep = data.get("representation_config") or {}
    lr = rep.get("lr") or {}
    if rep.get("scaling_activation", "softplus") != "softplus":
        raise CheckpointError(f"{where}: scaling_activation {rep.get('scaling_activation')!r} unsupported")
    return SLatGaussianDecoderConfig(
        **_swin(data, where),
        num_gaussians=int(rep.get("num_gaussians", 32)),
        voxel_size=float(rep.get("voxel_size", 1.5)),
        scaling_bias=float(rep.get("scaling_bias", 0.004)),
        opacity_bias=float(rep.get("opacity_bias", 0.1)),
        filter_3d=float(rep.get("3d_filter_kernel_size", 0.0009)),
        lr_xyz=float(lr.get("_xyz", 1.0)),
        lr_features_dc=float(lr.get("_features_dc", 1.0)),
        lr_opacity=float(lr.get("_opacity", 1.0)),
        lr_scaling=float(lr.get("_scaling", 1.0)),
        lr_rotation=float(lr.get("_rotation", 0.1)),
    )


@_fields_checked
def mesh_decoder_config(data: dict, where: str) -> SLatMeshDecoderConfig:
    _check_target(data, "SLatMeshDecoderTdfyWrapper", where)
    use_color = bool((data.get("representation_config") or {}).get("use_color", False))
    return SLatMeshDecoderConfig(**_swin(data, where), use_color=use_color)


def encoder_files(folder: Path, name: str) -> tuple[Path, Path]:
    """(YAML, weights) of encoder `name` ("ss_encoder" | "slat_encoder"): pipeline.yaml's `<name>_config_path` /
    `<name>_ckpt_path` where it names them, else `<name>.yaml` and `<name>.ckpt` (or a non-empty
    `<name>.safetensors` when the .ckpt is absent or empty; the official loader reads either)."""
    pipeline = {}
    if (folder / "pipeline.yaml").is_file():
        pipeline = read_yaml(folder / "pipeline.yaml")
    yaml_path = folder / str(pipeline.get(f"{name}_config_path") or f"{name}.yaml")
    weights = folder / str(pipeline.get(f"{name}_ckpt_path") or f"{name}.ckpt")
    alt = weights.with_suffix(".safetensors")
    if (not weights.is_file() or weights.stat().st_size == 0) and alt.is_file() and alt.stat().st_size:
        weights = alt
    return yaml_path, weights


def ss_encoder_config(data: dict, where: str) -> SSEncoderConfig:
    _check_target(data, "SparseStructureEncoderTdfyWrapper", where)
    if data.get("norm_type", "layer") != "layer":
        raise CheckpointError(f"{where}: norm_type {data.get('norm_type')!r} unsupported (expected 'layer')")
    return SSEncoderConfig(
        in_channels=int(data.get("in_channels", 1)),
        latent_channels=int(_get(data, "latent_channels", where)),
        channels=tuple(int(c) for c in _get(data, "channels", where)),
        num_res_blocks=int(_get(data, "num_res_blocks", where)),
        num_res_blocks_middle=int(data.get("num_res_blocks_middle", 2)),
    )


def slat_encoder_config(data: dict, where: str) -> SLatEncoderConfig:
    _check_target(data, "SLatEncoderTdfyWrapper", where)
    if data.get("attn_mode", "swin") != "swin":
        raise CheckpointError(f"{where}: attn_mode {data.get('attn_mode')!r} unsupported (expected 'swin')")
    if data.get("pe_mode", "ape") != "ape" or data.get("qk_rms_norm", False):
        raise CheckpointError(f"{where}: only pe_mode 'ape' without qk_rms_norm is supported")
    width = int(_get(data, "model_channels", where))
    return SLatEncoderConfig(
        resolution=int(_get(data, "resolution", where)),
        in_channels=int(_get(data, "in_channels", where)),
        model_channels=width,
        latent_channels=int(_get(data, "latent_channels", where)),
        num_blocks=int(_get(data, "num_blocks", where)),
        # the official default when the YAML gives no head count: 64 channels per head
        num_heads=int(data.get("num_heads") or width // int(data.get("num_head_channels", 64))),
        mlp_ratio=float(data.get("mlp_ratio", 4)),
        window_size=int(data.get("window_size", 8)),
    )


def ss_encoder_config_from_official(folder: Path) -> SSEncoderConfig:
    yaml_path, _ = encoder_files(folder, "ss_encoder")
    return ss_encoder_config(read_yaml(yaml_path), yaml_path.name)


def slat_encoder_config_from_official(folder: Path) -> SLatEncoderConfig:
    yaml_path, _ = encoder_files(folder, "slat_encoder")
    return slat_encoder_config(read_yaml(yaml_path), yaml_path.name)


def stage2_config_from_official(folder: Path) -> Stage2Config:
    """Read pipeline.yaml, slat_generator.yaml and the Gaussian and mesh decoder YAMLs."""
    pipeline = read_yaml(folder / "pipeline.yaml")
    paths = {
        k: folder / str(pipeline.get(f"{k}_config_path", f"{k}.yaml"))
        for k in ("slat_generator", "slat_decoder_gs", "slat_decoder_mesh")
    }
    gen = read_yaml(paths["slat_generator"])
    w = paths["slat_generator"].name
    _check_target(_get(gen, "module.generator.backbone", w), "FlowMatching", w)
    condition = condition_config(_get(gen, "module.condition_embedder.backbone", w), w)
    if condition.pointmap is not None or not condition.dino.prenorm_features:
        raise CheckpointError(f"{w}: expected the stage-2 condition (image + mask DINO with prenorm features)")
    slat_pre = _get(pipeline, "slat_preprocessor", "pipeline.yaml")
    joint = _get(slat_pre, "img_mask_joint_transform", "pipeline.yaml slat_preprocessor")
    pre = preprocess_config(
        {"ss_preprocessor": {**slat_pre, "img_mask_pointmap_joint_transform": joint}},
        "pipeline.yaml (slat_preprocessor)",
    )
    cfg = Stage2Config(
        condition=condition,
        flow=slat_flow_config(_get(gen, "module.generator.backbone.reverse_fn.backbone", w), w),
        gaussian=gaussian_decoder_config(read_yaml(paths["slat_decoder_gs"]), paths["slat_decoder_gs"].name),
        mesh=mesh_decoder_config(read_yaml(paths["slat_decoder_mesh"]), paths["slat_decoder_mesh"].name),
        preprocess=pre,
        sampler=SamplerConfig(
            rescale_t=float(pipeline.get("slat_rescale_t", 1)), cfg_strength=float(pipeline.get("slat_cfg_strength", 1))
        ),
        slat_mean=tuple(float(x) for x in _get(pipeline, "slat_mean", "pipeline.yaml")),
        slat_std=tuple(float(x) for x in _get(pipeline, "slat_std", "pipeline.yaml")),
    )
    if cfg.condition.embed_dim != cfg.flow.cond_channels:
        raise CheckpointError(
            f"{w}: condition width {cfg.condition.embed_dim} != cond_channels {cfg.flow.cond_channels}"
        )
    if len(cfg.slat_mean) != cfg.flow.latent_channels or len(cfg.slat_std) != cfg.flow.latent_channels:
        raise CheckpointError("pipeline.yaml: slat_mean / slat_std must have one value per latent channel")
    return cfg


# ---------------------------------------------------------------------------------------------
# .ckpt -> our state dict


def load_official_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True (never unpickles code) and mmap (no RAM copy of 6 GB files); a
    `.safetensors` file (offered for the encoders) through safetensors."""
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}; {WHERE_TO_GET}")
    if path.suffix == ".safetensors":  # tensors only by design (the official loader accepts these too)
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises SafetensorError or OSError on a damaged file
            raise CheckpointError(f"{path} cannot be read ({e}); it is corrupt or truncated: re-download it") from None
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} ({path.stat().st_size} bytes) is truncated or not a PyTorch checkpoint "
            f"(no zip central directory); re-download it ({WHERE_TO_GET})"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError or zip errors
        why = torch_load_refusal(path, e)
        if "could run code" in why:
            raise CheckpointError(
                f"{path} contains pickled objects other than tensors (possible code); refusing to load it. "
                f"Use the official file from {HF_REPO}"
            ) from None
        raise CheckpointError(f"{path.parent}/{why} Re-download it ({WHERE_TO_GET})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{path} holds a {type(raw).__name__}, not a dict of tensors; is this the official {path.name}? "
            "Re-download it"
        )
    return raw


def state_dict_of(raw: dict, component: Component, path: Path) -> dict:
    """The component's state dict inside a loaded checkpoint: `raw[state_dict_key]`, or `raw` for flat files."""
    if component.state_dict_key is not None:
        if not isinstance(raw, dict) or component.state_dict_key not in raw:
            keys = _short(list(raw)[:5]) if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(
                f"{path}: no {component.state_dict_key!r} entry (found {keys}); "
                f"is this the official {component.name}.ckpt?"
            )
        raw = raw[component.state_dict_key]
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise CheckpointError(f"{path}: the state dict is a {kind}, not a dict of tensors; re-download it")
    return raw


def convert_state_dict(raw: dict, component: Component, path: Path) -> dict[str, torch.Tensor]:
    """Select the component's tensors by official prefix and rename them to our prefix."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict_of(raw, component, path).items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"{path}: entry {_short(key)} has a key of type {type(key).__name__}, not a tensor name; re-download it"
            )
        for official, ours in component.prefixes:
            if key.startswith(official):
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
                out[ours + key[len(official) :]] = value
                break
    return out
