"""The module that DDP / FSDP wrap: condition embedding + one objective on one micro-batch -> loss.

Everything that carries a gradient runs inside `Objective.forward`, so the data-parallel wrapper sees it.
Its attributes `condition_embedder` and `generator` carry the stage models' prefixes, so parameter names
(freezing patterns, checkpoints) are those of the weight files. The random draws of a micro-batch (`Draws`)
come from one seeded generator per (step, micro-batch), made by the loop: the same batch gets the same noise
whatever the number of processes, and a resumed run repeats nothing and skips nothing.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from sam3d_core.models.slat_flow import SLatGrids
from sam3d_core.models.ss_flow import latent_shapes
from sam3d_core.training import losses
from sam3d_core.training.config import TrainConfig
from sam3d_core.training.data import Batch


@dataclass
class Draws:
    """The random choices of one micro-batch of b samples (all on the CPU until `to`).

    t [b]; noise: stage 1 {latent: [b, n, c]}, stage 2 {"chosen": [N, 8], "rejected": [N', 8]};
    keep_cond [b] (0 = condition zeroed, the CFG dropout); keep_pointmap [b]; d [b] shortcut step sizes;
    shortcut_cfg: whether this batch's self-consistency targets use CFG.
    """

    t: torch.Tensor
    noise: dict[str, torch.Tensor]
    keep_cond: torch.Tensor
    keep_pointmap: torch.Tensor
    d: torch.Tensor
    shortcut_cfg: bool

    def to(self, device: torch.device) -> Draws:
        return Draws(
            self.t.to(device),
            {k: v.to(device) for k, v in self.noise.items()},
            self.keep_cond.to(device),
            self.keep_pointmap.to(device),
            self.d.to(device),
            self.shortcut_cfg,
        )


def draw(cfg: TrainConfig, model_cfg, batch: Batch, generator: torch.Generator) -> Draws:
    """All random choices of one micro-batch, from `generator`, in a fixed order."""
    b = batch.size
    t = losses.sample_time(b, cfg.time_sampler, cfg.time_mean, cfg.time_std, generator)
    if cfg.stage == 1:
        shapes = latent_shapes(model_cfg.flow)
        noise = {k: torch.randn((b, *shapes[k]), generator=generator) for k in sorted(shapes)}
    else:
        noise = {"chosen": torch.randn(batch.target["feats"].shape, generator=generator)}
        if batch.rejected is not None:
            noise["rejected"] = torch.randn(batch.rejected["feats"].shape, generator=generator)
    keep_cond = (torch.rand(b, generator=generator) >= cfg.p_uncond).float()
    keep_pointmap = (torch.rand(b, generator=generator) >= cfg.pointmap_dropout).float()
    d = torch.zeros(b)
    shortcut_cfg = False
    if cfg.objective == "shortcut":
        # official batch mode: the whole batch is self-consistency with probability shortcut_prob
        if float(torch.rand((), generator=generator)) < cfg.shortcut_prob:
            k = torch.randint(0, cfg.shortcut_max_exponent + 1, (b,), generator=generator)
            d = 1.0 / 2.0 ** k.float()
        shortcut_cfg = float(torch.rand((), generator=generator)) < cfg.shortcut_cfg_prob
    return Draws(t, noise, keep_cond, keep_pointmap, d, shortcut_cfg)


class Objective(nn.Module):
    """condition_embedder + generator (+ the frozen reference for full-fine-tuning DPO) and the loss."""

    def __init__(self, stage_model: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.model_cfg = stage_model.cfg
        self.condition_embedder = stage_model.condition_embedder
        self.generator = stage_model.generator
        self.frozen_reference: nn.Module | None = None
        self.weights = cfg.loss_weights.by_latent()

    def make_frozen_reference(self) -> None:
        """DPO with full fine-tuning: a frozen copy of the base generator (LoRA needs none: adapters off)."""
        # a submodule (it moves with .to(), DDP / FSDP see it) whose parameters are all frozen: never trained
        # and never saved (checkpoints and exports hold the trainable parameters only)
        self.frozen_reference = copy.deepcopy(self.generator).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference velocity model: the base with its adapters disabled (peft), or the copy."""
        if self.frozen_reference is not None:
            yield self.frozen_reference
        elif hasattr(self.generator, "disable_adapter"):
            with self.generator.disable_adapter():
                yield self.generator
        else:
            raise RuntimeError("DPO needs a reference: use params = 'lora' or call make_frozen_reference()")

    # --- condition ---

    def condition(self, views: dict[str, torch.Tensor], draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """(the condition with CFG / point-map dropout applied, the full condition) [b, Nc, C]."""
        trainable = any(p.requires_grad for p in self.condition_embedder.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            full = self.condition_embedder(**views).float()
        cond = full
        pm = self.model_cfg.condition.pointmap if self.cfg.stage == 1 else None
        if pm is not None and self.cfg.pointmap_dropout > 0:
            n = 2 * pm.num_tokens  # the point-map blocks (cropped, full) are the last tokens of the fused order
            cond = torch.cat([cond[:, :-n], cond[:, -n:] * draws.keep_pointmap[:, None, None]], dim=1)
        return cond * draws.keep_cond[:, None, None], full

    # --- velocities ---

    def _d(self, b: int, device) -> torch.Tensor | None:
        shortcut_model = self.model_cfg.flow.is_shortcut_model if self.cfg.stage == 1 else False
        return torch.zeros(b, device=device) if shortcut_model else None

    @staticmethod
    def _velocity2(model: nn.Module, coords: torch.Tensor, grids: SLatGrids):
        return lambda feats, t, cond: model(feats, coords, t, cond, grids)

    # --- the objectives ---

    def forward(self, batch: Batch, draws: Draws) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch and its logged parts (detached)."""
        cond, full = self.condition(batch.views, draws)
        if self.cfg.stage == 1:
            return self._stage1(batch, draws, cond, full)
        return self._stage2(batch, draws, cond)

    def _stage1(self, batch: Batch, draws: Draws, cond, full):
        x1, x0, t, w = batch.target, draws.noise, draws.t, self.weights
        d0 = self._d(batch.size, t.device)
        if self.cfg.objective == "flow":
            loss, terms = losses.flow_matching_stage1(self.generator, x1, x0, t, cond, w, d0)
            return loss, {f"loss_{k}": v.detach() for k, v in terms.items()}
        if self.cfg.objective == "shortcut":
            return losses.shortcut_loss(
                self.generator, x1, x0, t, draws.d, cond, full, w,
                self.cfg.shortcut_cfg_strength, draws.shortcut_cfg, self.cfg.shortcut_loss_weight,
            )  # fmt: skip
        # DPO: chosen and rejected as one batch of 2b, the same noise and time for both
        xt, v = {}, {}
        for k in x1:
            pair = torch.cat([x1[k], batch.rejected[k]])
            xt[k], v[k] = losses.interpolate(torch.cat([x0[k], x0[k]]), pair, torch.cat([t, t]))
        t2, c2 = torch.cat([t, t]) * losses.TIME_SCALE, torch.cat([cond, cond])
        d2 = None if d0 is None else torch.cat([d0, d0])
        err = losses.per_sample_error(self.generator(xt, t2, c2, d2), v, w)
        with torch.no_grad(), self.reference() as ref:
            ref_err = losses.per_sample_error(ref(xt, t2, c2, d2), v, w)
        b = batch.size
        return losses.dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], self.cfg.dpo_beta)

    def _stage2(self, batch: Batch, draws: Draws, cond):
        b, fc = batch.size, self.model_cfg.flow.model_channels
        x1, coords = batch.target["feats"], batch.target["coords"]
        if self.cfg.objective == "flow":
            grids = SLatGrids.from_coords(coords, b, fc)
            obj = grids.fine.batch_index
            loss = losses.flow_matching_stage2(
                self._velocity2(self.generator, coords, grids), x1, draws.noise["chosen"], draws.t, obj, cond
            )
            return loss, {}
        # DPO: the rejected objects follow the chosen ones as objects b .. 2b-1
        rej = batch.rejected
        rej_coords = rej["coords"] + rej["coords"].new_tensor([b, 0, 0, 0])
        coords2 = torch.cat([coords, rej_coords])
        grids = SLatGrids.from_coords(coords2, 2 * b, fc)
        obj = grids.fine.batch_index
        t2 = torch.cat([draws.t, draws.t])
        xt, v = losses.interpolate(
            torch.cat([draws.noise["chosen"], draws.noise["rejected"]]), torch.cat([x1, rej["feats"]]), t2[obj]
        )
        c2 = torch.cat([cond, cond])
        err = losses.segment_error(self.generator(xt, coords2, t2 * losses.TIME_SCALE, c2, grids), v, obj, 2 * b)
        with torch.no_grad(), self.reference() as ref:
            ref_err = losses.segment_error(ref(xt, coords2, t2 * losses.TIME_SCALE, c2, grids), v, obj, 2 * b)
        return losses.dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], self.cfg.dpo_beta)
