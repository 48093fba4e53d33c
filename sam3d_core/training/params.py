"""Which parameters train: freezing by module for full fine-tuning (LoRA freezes every base weight instead).

Names are those of the training container (`condition_embedder.*`, `generator.*`, the prefixes of the
stage models). Groups name the parts the paper's architecture separates:

    condition_embedder   DINOv2 + point-map embedders and their projections (frozen by default, as officially)
    shared               the time embedder and the adaLN modulation shared by both MoT streams
                         (the official `freeze_shared_parameters`)
    d_embedder           the shortcut step-size embedder (stage 1)
    shape_stream         every per-modality weight of the shape stream, and its input / output projection
    pose_stream          the same for the layout stream (rotation, translation, scale, translation scale)
    layout_only          everything except the pose stream: the MoT attention mask (shape attends to shape only)
                         then leaves the shape predictions bit-identical while the layout trains
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch.nn as nn

from sam3d_core.config import POSE_LATENTS
from sam3d_core.training.config import ConfigError

_POSE_NAMES = [name for name, _ in POSE_LATENTS]

GROUPS: dict[int, dict[str, tuple[str, ...]]] = {
    1: {
        "condition_embedder": ("condition_embedder.*",),
        "shared": ("generator.t_embedder.*", "generator.blocks.*.adaLN_modulation.*"),
        "d_embedder": ("generator.d_embedder.*",),
        "shape_stream": ("generator.blocks.*.shape.*", "generator.latent_mapping.shape.*"),
        "pose_stream": (
            f"generator.blocks.*.{_POSE_NAMES[0]}.*",  # the pose stream's dict key is its first latent
            *(f"generator.latent_mapping.{n}.*" for n in _POSE_NAMES),
        ),
    },
    2: {
        "condition_embedder": ("condition_embedder.*",),
        "shared": ("generator.t_embedder.*", "generator.blocks.*.adaLN_modulation.*"),
    },
}


def _matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def frozen_names(model: nn.Module, freeze: tuple[str, ...], stage: int) -> set[str]:
    """The parameter names that `freeze` (groups or fnmatch patterns) selects; an entry matching none is an error."""
    names = [n for n, _ in model.named_parameters()]
    groups = GROUPS[stage]
    out: set[str] = set()
    for entry in freeze:
        if entry == "layout_only":
            if stage != 1:
                raise ConfigError("freeze = ['layout_only'] is for stage 1 (the MoT with a separate layout stream)")
            hit = {n for n in names if not _matches(n, groups["pose_stream"])}
        else:
            patterns = groups.get(entry, (entry,))
            hit = {n for n in names if _matches(n, patterns)}
        if not hit:
            known = ", ".join([*groups, "layout_only"] if stage == 1 else groups)
            raise ConfigError(
                f"freeze entry {entry!r} matches no parameter of the stage-{stage} model; use a group "
                f"({known}) or a pattern such as 'generator.blocks.0.*'"
            )
        out |= hit
    return out


def apply_freeze(model: nn.Module, freeze: tuple[str, ...], stage: int) -> list[str]:
    """Set requires_grad from `freeze`; returns the trainable names. Nothing trainable is an error."""
    frozen = frozen_names(model, freeze, stage)
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
        if name not in frozen:
            trainable.append(name)
    if not trainable:
        raise ConfigError(f"freeze = {list(freeze)} leaves nothing to train; freeze fewer modules")
    return trainable
