"""Stage-1 condition tokens: image and mask through DINOv2, the point map through a window embedder.

Official: `EmbedderFuser` with embedders [Dino (image), Dino (mask), PointPatchEmbed (point map)],
each applied to a cropped view (group 0) and a full-image view (group 1). Every token block goes
through its embedder's projection net (LayerNorm -> SwiGLU) and gets a learned group embedding.
Token order: [image, rgb_image, mask, rgb_image_mask, pointmap, rgb_pointmap]
(official checkpoint prefix `_base_models.condition_embedder.`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sam3d_core.config import ConditionConfig, DinoConfig, PointmapEmbedConfig
from sam3d_core.models.dinov2 import DinoVisionTransformer, ViTBlock
from sam3d_core.models.layers import SwiGLU

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIEWS = ("cropped", "full")  # group index = position in this tuple (row of idx_emb)


def _check_nchw(name: str, x: torch.Tensor, channels: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] not in channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        want = " or ".join(f"[B, {c}, H, W]" for c in channels)
        raise ValueError(
            f"{name}: got {got}, expected a tensor {want}; "
            f"use the output of sam3d_core.pipeline.preprocess.preprocess_stage1"
        )


class DinoEmbedder(nn.Module):
    """Image or mask [B, 1|3, H, W] in [0, 1] -> DINOv2 tokens [B, N, C] (official `Dino`)."""

    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.backbone = DinoVisionTransformer(cfg)
        # ImageNet statistics are constants, not in the checkpoints: plain values rather than buffers, so
        # a model built on the meta device and loaded with assign=True has nothing left unmaterialised.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw("DinoEmbedder input", x, (1, 3))
        s = self.cfg.image_size
        h = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)  # no-op at size S
        if h.shape[1] == 1:
            h = h.repeat(1, 3, 1, 1)  # masks go through the RGB network as grey images
        mean = torch.tensor(IMAGENET_MEAN, dtype=h.dtype).view(3, 1, 1).to(h.device, non_blocking=True)
        std = torch.tensor(IMAGENET_STD, dtype=h.dtype).view(3, 1, 1).to(h.device, non_blocking=True)
        h = (h - mean) / std
        out = self.backbone.forward_features(h)
        if self.cfg.prenorm_features:
            feats = out["x_prenorm"]  # [B, 1+R+P, C], non-affine LN over every token
            tokens = F.layer_norm(feats, feats.shape[-1:])
        else:  # affine-normed CLS + patches; the registers are dropped
            tokens = torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], dim=1)
        return tokens.to(x.dtype)


class PointPatchEmbed(nn.Module):
    """Point map [B, 3, H, W] -> one token per patch_size^2 window [B, (n/p)^2, C].

    Non-finite points are invalid: their projected feature is replaced by `invalid_xyz_token`.
    Each window is [CLS; p*p point tokens] + `pos_embed_window`, runs one ViT block, and keeps its
    CLS, to which the learned `pos_embed` of the window grid is added.
    """

    def __init__(self, cfg: PointmapEmbedConfig):
        super().__init__()
        if cfg.input_size % cfg.patch_size:
            raise ValueError(
                f"PointmapEmbedConfig.input_size {cfg.input_size} is not a multiple of patch_size "
                f"{cfg.patch_size}; choose an input_size divisible by the patch size"
            )
        self.cfg = cfg
        self.embed_dim = c = cfg.embed_dim
        g, p = cfg.input_size // cfg.patch_size, cfg.patch_size
        # Own parameters first, then submodules: the official state_dict order.
        # Small random init (the real values come from the checkpoint).
        self.invalid_xyz_token = nn.Parameter(torch.randn(c) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, c, g, g) * 0.02)
        self.pos_embed_window = nn.Parameter(torch.randn(1, 1 + p * p, c) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c) * 0.02)
        self.point_proj = nn.Linear(3, c)
        self.blocks = nn.ModuleList([ViTBlock(c, cfg.num_heads, cfg.mlp_ratio, layer_scale=False)])

    def embed_points(self, xyz: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, n, n, C]
        n = self.cfg.input_size
        xyz = F.interpolate(xyz, size=(n, n), mode="nearest").permute(0, 2, 3, 1)  # [B, n, n, 3]
        valid = xyz.isfinite().all(dim=-1, keepdim=True)  # [B, n, n, 1]
        x = self.point_proj(torch.where(valid, xyz, 0.0))  # remap "linear" is the identity
        return torch.where(valid, x, self.invalid_xyz_token.to(x.dtype))

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        _check_nchw("PointPatchEmbed input", xyz, (3,))
        b, c, p = xyz.shape[0], self.embed_dim, self.cfg.patch_size
        g = self.cfg.input_size // p
        x = self.embed_points(xyz)  # [B, n, n, C]
        # Windows in row-major order over the (g, g) grid, each p*p points row-major inside.
        x = x.view(b, g, p, g, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b * g * g, p * p, c)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed_window
        for block in self.blocks:
            x = block(x)  # [B*g*g, 1+p*p, C]
        windows = x[:, 0].reshape(b, g * g, c)
        # The official bilinear resampling of pos_embed to the window grid is the identity here:
        # the input is always resized to input_size, so the grid always equals the table.
        return windows + self.pos_embed.permute(0, 2, 3, 1).reshape(1, g * g, c)


def _projection_net(d_in: int, cfg: ConditionConfig) -> nn.Sequential:
    """LayerNorm(d_in) -> SwiGLU(d_in -> embed_dim); keys `.0.{weight,bias}`, `.1.{w1,w2,w3}`."""
    hidden = int(cfg.projection_hidden_multiplier * cfg.embed_dim)
    return nn.Sequential(nn.LayerNorm(d_in), SwiGLU(d_in, hidden, cfg.embed_dim, multiple_of=cfg.ffn_multiple_of))


_VIEW_NAMES = ("image", "rgb_image", "mask", "rgb_image_mask", "pointmap", "rgb_pointmap")


class ConditionEmbedder(nn.Module):
    """The stage-1 condition embedder (official `EmbedderFuser`): views -> tokens [B, N, embed_dim].

    `embed_views` embeds one view group (cropped or full); `fuse` interleaves the groups in the
    official order. The full-image views of a photo can thus be embedded once and reused for every
    object in it (`fuse` broadcasts a batch-1 group over the other group's batch).
    """

    def __init__(self, cfg: ConditionConfig):
        super().__init__()
        self.cfg = cfg
        # Own parameter first, then submodules: the official state_dict order.
        rows = len(VIEWS) + 1  # the official table has one spare row (row 2, never used)
        self.idx_emb = nn.Parameter(torch.randn(rows, cfg.embed_dim) / cfg.embed_dim**0.5)
        embedders: list[nn.Module] = [DinoEmbedder(cfg.dino), DinoEmbedder(cfg.dino)]
        if cfg.pointmap is not None:
            embedders.append(PointPatchEmbed(cfg.pointmap))
        self.module_list = nn.ModuleList(embedders)
        self.projection_nets = nn.ModuleList(_projection_net(e.embed_dim, cfg) for e in embedders)

    def _check_views(self, view: str, image, mask, pointmap) -> None:
        if view not in VIEWS:
            raise ValueError(f"view: got {view!r}, expected one of {VIEWS}")
        _check_nchw(f"{view} image", image, (3,))
        _check_nchw(f"{view} mask", mask, (1,))
        if self.cfg.pointmap is not None:
            if pointmap is None:
                raise ValueError(
                    f"{view} pointmap: got None, expected [B, 3, H, W]; this configuration embeds a "
                    f"point map, so pass the preprocessed one"
                )
            _check_nchw(f"{view} pointmap", pointmap, (3,))
        elif pointmap is not None:
            raise ValueError(
                f"{view} pointmap: got a tensor, but this configuration has no point-map embedder "
                f"(ConditionConfig.pointmap is None); pass pointmap=None"
            )
        inputs = [image, mask] + ([pointmap] if pointmap is not None else [])
        if len({t.shape[0] for t in inputs}) != 1:
            raise ValueError(
                f"{view} views: batch sizes differ ({[t.shape[0] for t in inputs]}); "
                f"image, mask and pointmap must share the batch dimension"
            )

    def embed_views(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        pointmap: torch.Tensor | None = None,
        view: str = "cropped",
    ) -> list[torch.Tensor]:
        """One view group -> one projected token block per embedder, [B, N_i, embed_dim] each.

        image [B, 3, H, W] and mask [B, 1, H, W] in [0, 1]; pointmap [B, 3, H, W] (NaN = invalid).
        """
        self._check_views(view, image, mask, pointmap)
        inputs = [image, mask, pointmap][: len(self.module_list)]
        return [self.embed_one(i, x, view) for i, x in enumerate(inputs)]

    def embed_one(self, index: int, x: torch.Tensor, view: str = "cropped") -> torch.Tensor:
        """Embedder `index` (0 image, 1 mask, 2 point map) of one view group -> [B, N_i, embed_dim].

        The full-image RGB block (index 0, view "full") depends on the photo only, not on the object's
        mask, so a pipeline computes it once per photo and passes it to `forward(full_image_block=...)`.
        """
        tokens = self.projection_nets[index](self.module_list[index](x))
        return tokens + self.idx_emb[VIEWS.index(view)].to(tokens.dtype)

    def fuse(self, cropped: list[torch.Tensor], full: list[torch.Tensor]) -> torch.Tensor:
        """Interleave per-embedder blocks as [c0, f0, c1, f1, ...] -> [B, N, embed_dim]."""
        if len(cropped) != len(full):
            raise ValueError(
                f"fuse: got {len(cropped)} cropped and {len(full)} full blocks; pass the two "
                f"outputs of embed_views for the same model"
            )
        b = max(t.shape[0] for t in cropped + full)
        blocks = [t for pair in zip(cropped, full, strict=True) for t in pair]
        for t in blocks:
            if t.shape[0] not in (1, b):
                raise ValueError(
                    f"fuse: block batch {t.shape[0]} does not match batch {b}; a group may have "
                    f"batch 1 (shared full-image views) or the same batch as the other group"
                )
        return torch.cat([t.expand(b, -1, -1) for t in blocks], dim=1)

    def forward(
        self,
        image: torch.Tensor,
        rgb_image: torch.Tensor,
        mask: torch.Tensor,
        rgb_image_mask: torch.Tensor,
        pointmap: torch.Tensor | None = None,
        rgb_pointmap: torch.Tensor | None = None,
        full_image_block: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Preprocessed views (the keys of `preprocess_stage1`) -> condition tokens [B, N, C].

        full_image_block: `embed_one(0, rgb_image, "full")` computed earlier for this photo (the same
        tokens; skips one DINO pass per object)."""
        cropped = self.embed_views(image, mask, pointmap, view="cropped")
        if full_image_block is None:
            full = self.embed_views(rgb_image, rgb_image_mask, rgb_pointmap, view="full")
        else:
            self._check_views("full", rgb_image, rgb_image_mask, rgb_pointmap)
            rest = [rgb_image_mask, rgb_pointmap][: len(self.module_list) - 1]
            full = [full_image_block] + [self.embed_one(i + 1, x, "full") for i, x in enumerate(rest)]
        return self.fuse(cropped, full)

    def encode(self, inputs: dict[str, torch.Tensor], dtype: torch.dtype, shared: dict | None = None) -> torch.Tensor:
        """Condition tokens [B, N, C] of a stage pipeline's preprocessed inputs (`preprocess_stage1` / `_stage2`).

        shared: a dict kept per photo (e.g. `PhotoContext.shared`); the full-image RGB tokens, which do not
        depend on the object's mask, are computed for the first object and reused for the others (exact)."""
        views = {k: inputs[k].to(dtype) for k in _VIEW_NAMES if k in inputs}
        if shared is None:
            return self(**views)
        key = ("full_image_tokens", id(self), dtype, tuple(views["rgb_image"].shape))
        if key not in shared:
            shared[key] = self.embed_one(0, views["rgb_image"], "full")
        return self(**views, full_image_block=shared[key])
