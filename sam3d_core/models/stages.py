"""The model containers both the weight store and the pipelines build: the stage-1 and stage-2 networks under
the state-dict prefixes of our weight files, deterministic random initialisation, and the inference cast.

    Stage1Model: condition_embedder., generator. (MoT flow), decoder. (occupancy VAE decoder)
    Stage2Model: condition_embedder., generator. (SLAT flow), decoder_gs., decoder_mesh.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from sam3d_core.config import Stage1Config, Stage2Config
from sam3d_core.models.condition import ConditionEmbedder
from sam3d_core.models.layers import LayerNorm32, MultiHeadRMSNorm
from sam3d_core.models.slat_flow import SLatFlowModel
from sam3d_core.models.slat_vae import SLatGaussianDecoder, SLatMeshDecoder
from sam3d_core.models.ss_flow import SSFlowModel
from sam3d_core.models.ss_vae import SSDecoder


class Stage1Model(nn.Module):
    """The stage-1 networks. State-dict prefixes: condition_embedder., generator., decoder."""

    def __init__(self, cfg: Stage1Config):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.condition_embedder = ConditionEmbedder(cfg.condition)
        self.generator = SSFlowModel(cfg.flow)
        self.decoder = SSDecoder(cfg.decoder)


def init_random_weights(model: nn.Module, seed: int = 0, std: float = 0.5) -> nn.Module:
    """Deterministic random weights for tests and the no-weights demo (not a trained model).

    Matrices get N(0, std^2 / fan_in), norm gains 1 + N(0, 0.1^2), everything else N(0, 0.05^2), so that
    every path (including the official zero-initialised modulation and output layers) carries signal.
    """
    params = sorted(model.named_parameters())
    device = params[0][1].device if params else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32, device=device)
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                value = noise * (std / fan_in**0.5)
            elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight", ".gamma", "0.weight")) and p.ndim == 1:
                value = 1.0 + 0.1 * noise
            else:
                value = 0.05 * noise
            p.copy_(value.to(p.dtype))
    return model


def cast_for_inference(model: Stage1Model, dtype: torch.dtype) -> Stage1Model:
    """Cast the networks to `dtype`, keeping in float32 what the official fp16 mode keeps there.

    The heavy matrices (DINO, the MoT blocks, the decoder convolutions) take `dtype`; the flow model's
    latent projections, position embeddings, time embedders and every norm gain stay float32, like the
    official `use_fp16` "torso" conversion. The norms compute in float32 either way.
    """
    model.to(dtype)
    if dtype == torch.float32:
        return model
    gen = model.generator
    keep = [gen.latent_mapping, gen.t_embedder, getattr(gen, "d_embedder", None)]
    keep += [m for m in model.modules() if isinstance(m, (LayerNorm32, MultiHeadRMSNorm))]
    for m in keep:
        if m is not None:
            m.float()
    return model


class Stage2Model(nn.Module):
    """The stage-2 networks. State-dict prefixes: condition_embedder., generator., decoder_gs., decoder_mesh."""

    def __init__(self, cfg: Stage2Config):
        super().__init__()
        self.cfg = cfg
        self.condition_embedder = ConditionEmbedder(cfg.condition)
        self.generator = SLatFlowModel(cfg.flow)
        self.decoder_gs = SLatGaussianDecoder(cfg.gaussian)
        self.decoder_mesh = SLatMeshDecoder(cfg.mesh)
