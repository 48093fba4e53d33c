"""Fit a sparse-structure encoder against a FROZEN stage-1 decoder, for weight folders that have none.

The first releases of SAM 3D Objects shipped empty encoder files, yet training needs the stage-1 latent of every
sample. The decoder defines the latent space, so we train a fresh `SSEncoder` (the decoder's mirror) until the
frozen decoder turns its latents back into the occupancy: the TRELLIS sparse-structure VAE objective (soft dice on
the decoded occupancy of a posterior sample, plus 1e-3 x KL to N(0, 1), which keeps the latents at the scale the
decoder and the flow model were trained on), with the decoder's weights fixed. It stops when the mean IoU of the
decoded occupancy (logit > 0) on held-out shapes reaches `target_iou`. docs/encoders.md has the commands and the
numbers to expect.

    result = fit_ss_encoder(encoder, decoder, train_occupancies, held_out_occupancies, FitConfig())
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sam3d_core.config import SSDecoderConfig, SSEncoderConfig
from sam3d_core.models.ss_vae import SSDecoder, SSEncoder, occupancy_grid


@dataclass(frozen=True)
class FitConfig:
    """One fitting run. The defaults are the official-size recipe (docs/encoders.md)."""

    max_steps: int = 20000
    batch_size: int = 4
    lr: float = 1e-4  # TRELLIS's sparse-structure VAE learning rate (AdamW, no weight decay)
    kl_weight: float = 1e-3  # TRELLIS's lambda_kl
    grad_clip: float = 1.0
    target_iou: float = 0.90  # mean decoded IoU on the held-out shapes at which fitting stops
    eval_every: int = 250
    resolution: int = 64  # occupancy grid side
    seed: int = 0


@dataclass
class FitResult:
    steps: int  # optimiser steps taken
    iou: float  # mean decoded IoU on the held-out shapes at the last evaluation
    reached: bool  # iou >= target_iou
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, training loss, held-out IoU)
    latent_mean: float = 0.0  # statistics of the held-out latents (posterior means), to compare with the flow's
    latent_std: float = 0.0


def mirror_config(decoder: SSDecoderConfig) -> SSEncoderConfig:
    """The encoder configuration that mirrors a decoder (as TRELLIS pairs them): channels reversed."""
    return SSEncoderConfig(
        latent_channels=decoder.latent_channels,
        channels=tuple(reversed(decoder.channels)),
        num_res_blocks=decoder.num_res_blocks,
        num_res_blocks_middle=decoder.num_res_blocks_middle,
    )


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TRELLIS's soft dice over the whole batch: 1 - (2 |p t| + 1) / (|p| + |t| + 1), p = sigmoid(logits)."""
    p = torch.sigmoid(logits)
    return 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over elements as TRELLIS does."""
    return 0.5 * torch.mean(mean.pow(2) + logvar.exp() - logvar - 1)


def _grids(shapes: Sequence[np.ndarray], resolution: int, device: torch.device) -> torch.Tensor:
    coords = [torch.as_tensor(np.asarray(s, dtype=np.int64), device=device) for s in shapes]
    return torch.cat([occupancy_grid(c, resolution) for c in coords])  # [B, 1, R, R, R]


@torch.no_grad()
def decoded_iou(encoder: SSEncoder, decoder: SSDecoder, shapes: Sequence[np.ndarray], resolution: int = 64) -> float:
    """Mean over shapes of IoU(decoder(encoder mean) > 0, occupancy); shapes are [N, 3] voxel indices."""
    device = next(encoder.parameters()).device
    ious = []
    for s in shapes:
        x = _grids([s], resolution, device)
        occupied = decoder(encoder(x)[0])[:, :1] > 0
        target = x > 0.5
        ious.append(float((occupied & target).sum()) / max(1, int((occupied | target).sum())))
    return float(np.mean(ious))


def fit_ss_encoder(
    encoder: SSEncoder,
    decoder: SSDecoder,
    train: Sequence[np.ndarray],
    held_out: Sequence[np.ndarray],
    cfg: FitConfig = FitConfig(),
    progress: Callable[[int, float, float], None] | None = None,
) -> FitResult:
    """Train `encoder` in place against the frozen `decoder` until the held-out IoU reaches cfg.target_iou or
    cfg.max_steps. train / held_out: occupancies [N, 3] int on the cfg.resolution grid. progress(step, loss, iou) is
    called at every evaluation."""
    if not train or not held_out:
        raise ValueError(f"train: got {len(train)} shapes, held_out {len(held_out)}; both need at least one")
    device = next(encoder.parameters()).device
    decoder.eval().requires_grad_(False)
    encoder.train()
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = FitResult(steps=0, iou=decoded_iou(encoder, decoder, held_out, cfg.resolution), reached=False)
    result.history.append((0, float("nan"), result.iou))
    for step in range(1, cfg.max_steps + 1):
        pick = torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist()
        x = _grids([train[i] for i in pick], cfg.resolution, device)  # [B, 1, R, R, R]
        mean, logvar = encoder(x)  # [B, C, r, r, r] each
        noise = torch.randn(mean.shape, generator=gen).to(device)
        z = mean + torch.exp(0.5 * logvar) * noise  # a posterior sample, as the VAE was trained
        logits = decoder(torch.cat([mean, z]))  # [2B, 1, R, R, R]: the mean (the target we store) and the sample
        loss = dice_loss(logits[: len(x)], x) + dice_loss(logits[len(x) :], x)
        loss = loss + cfg.kl_weight * kl_divergence(mean, logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.grad_clip)
        opt.step()
        result.steps = step
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            encoder.eval()
            result.iou = decoded_iou(encoder, decoder, held_out, cfg.resolution)
            encoder.train()
            result.history.append((step, float(loss.detach()), result.iou))
            if progress is not None:
                progress(step, float(loss.detach()), result.iou)
            if result.iou >= cfg.target_iou:
                break
    encoder.eval()
    result.reached = result.iou >= cfg.target_iou
    with torch.no_grad():  # encoder only: cheaper than another decoded_iou
        latents = torch.cat([encoder(_grids([s], cfg.resolution, device))[0] for s in held_out])
    result.latent_mean, result.latent_std = float(latents.mean()), float(latents.std())
    return result


def fit_for_model(
    name: str,
    data: Sequence[str | Path],
    cfg: FitConfig = FitConfig(),
    device: str = "cpu",
    held_out_fraction: float = 0.1,
    overwrite: bool = False,
    progress: Callable[[int, float, float], None] | None = None,
) -> FitResult:
    """`sam3d weights fit-encoder`: fit an SS encoder for imported model `name` on the occupancies of the sample
    folders `data` (data/sample.py format; every `held_out_fraction`-th sample is held out) and, when the target
    IoU is reached, add it to the model folder (hub.save_encoder) so that `LatentEncoder.from_imported` finds it."""
    from sam3d_core.data.sample import SampleDataset
    from sam3d_core.weights import hub

    if hub.has_stage(name, "ss_encoder") and not overwrite:
        raise ValueError(f"model {name!r} already has an ss_encoder; pass --overwrite to replace it with a fitted one")
    stage1, decoder_state = hub.load_ss_decoder_state(name)
    decoder = SSDecoder(stage1.decoder)
    decoder.load_state_dict(decoder_state, strict=True)
    dataset = SampleDataset(*data)
    shapes = [dataset[i].occupancy for i in range(len(dataset))]
    every = max(2, round(1 / held_out_fraction))
    held_out = shapes[::every]
    train = [s for i, s in enumerate(shapes) if i % every] or held_out
    enc_cfg = mirror_config(stage1.decoder)
    torch.manual_seed(cfg.seed)
    encoder = SSEncoder(enc_cfg).to(device)
    result = fit_ss_encoder(encoder, decoder.to(device), train, held_out, cfg, progress)
    if result.reached:
        info = {
            "method": "sam3d_core.data.fit_encoder.fit_ss_encoder against the frozen ss_decoder",
            "held_out_iou": result.iou,
            "target_iou": cfg.target_iou,
            "steps": result.steps,
            "train_shapes": len(train),
            "held_out_shapes": len(held_out),
            "data": [str(Path(d).resolve()) for d in data],
            "latent_mean": result.latent_mean,
            "latent_std": result.latent_std,
        }
        hub.save_encoder(name, "ss_encoder", enc_cfg, encoder.state_dict(), info, overwrite=overwrite)
    return result
