"""Condition embedder: official key table (meta device), token order and view groups (tiny, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sam3d_core.config import ConditionConfig
from sam3d_core.models.condition import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConditionEmbedder,
    DinoEmbedder,
    PointPatchEmbed,
)
from sam3d_core.models.dinov2 import DinoVisionTransformer
from sam3d_core.registry import stage1_preset

TINY = stage1_preset("tiny").condition


def spec_pointmap_table(c: int, g: int, p: int, hidden: int) -> dict[str, tuple]:
    """Spec section 4.2, written out independently of the module."""
    table = {
        "point_proj.weight": (c, 3), "point_proj.bias": (c,), "invalid_xyz_token": (c,),
        "pos_embed": (1, c, g, g), "pos_embed_window": (1, 1 + p * p, c), "cls_token": (1, 1, c),
    }  # fmt: skip
    b = "blocks.0."
    table.update({
        b + "norm1.weight": (c,), b + "norm1.bias": (c,),
        b + "attn.qkv.weight": (3 * c, c), b + "attn.qkv.bias": (3 * c,),
        b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,),
        b + "norm2.weight": (c,), b + "norm2.bias": (c,),
        b + "mlp.fc1.weight": (hidden, c), b + "mlp.fc1.bias": (hidden,),
        b + "mlp.fc2.weight": (c, hidden), b + "mlp.fc2.bias": (c,),
    })  # fmt: skip
    return table


def test_official_keys_and_shapes_on_meta():
    cfg = stage1_preset("official").condition
    with torch.device("meta"):
        model = ConditionEmbedder(cfg)
        dino = DinoVisionTransformer(cfg.dino)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(got) == 722
    dino_table = {k: tuple(v.shape) for k, v in dino.state_dict().items()}  # checked in test_dinov2
    want = {"idx_emb": (3, 1024)}
    for i in (0, 1):
        want.update({f"module_list.{i}.backbone.{k}": s for k, s in dino_table.items()})
    want.update({f"module_list.2.{k}": s for k, s in spec_pointmap_table(512, 32, 8, 1024).items()})
    for i, d_in in enumerate((1024, 1024, 512)):
        n = f"projection_nets.{i}."
        want.update({
            n + "0.weight": (d_in,), n + "0.bias": (d_in,),
            n + "1.w1.weight": (2816, d_in), n + "1.w3.weight": (2816, d_in), n + "1.w2.weight": (1024, 2816),
        })  # fmt: skip
    assert got == want
    assert sum(k.startswith("module_list.2.") for k in got) == 18
    assert sum(k.startswith("module_list.0.") for k in got) == 344
    assert cfg.num_tokens == 7528  # 4 x 1370 + 2 x 1024, the official SS condition length


def test_no_pointmap_config_has_no_pointmap_keys():
    cfg = ConditionConfig(dino=TINY.dino, pointmap=None)
    keys = ConditionEmbedder(cfg).state_dict()
    assert not any(k.startswith(("module_list.2", "projection_nets.2")) for k in keys)
    assert keys["idx_emb"].shape == (3, TINY.dino.embed_dim)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ConditionEmbedder(TINY).eval()


def _views(b: int, s: int = 70, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pm = torch.randn(b, 3, s, s, generator=g)
    pm[:, :, :5, :7] = float("nan")
    return {
        "image": torch.rand(b, 3, s, s, generator=g),
        "rgb_image": torch.rand(b, 3, s, s, generator=g),
        "mask": (torch.rand(b, 1, s, s, generator=g) > 0.5).float(),
        "rgb_image_mask": (torch.rand(b, 1, s, s, generator=g) > 0.5).float(),
        "pointmap": pm,
        "rgb_pointmap": torch.randn(b, 3, s, s, generator=g),
    }


def test_forward_is_the_official_order_of_projected_blocks(tiny):
    views = _views(2)
    with torch.no_grad():
        tokens = tiny(**views)
        order = [("image", 0, 0), ("rgb_image", 0, 1), ("mask", 1, 0), ("rgb_image_mask", 1, 1),
                 ("pointmap", 2, 0), ("rgb_pointmap", 2, 1)]  # fmt: skip
        want = [
            tiny.projection_nets[i](tiny.module_list[i](views[name])) + tiny.idx_emb[group] for name, i, group in order
        ]
    assert tokens.shape == (2, TINY.num_tokens, TINY.embed_dim)
    torch.testing.assert_close(tokens, torch.cat(want, dim=1))
    assert torch.isfinite(tokens).all()


def test_shared_full_views_broadcast_over_objects(tiny):
    views = _views(3)
    full = {k: v[:1] for k, v in views.items() if k.startswith("rgb_")}
    with torch.no_grad():
        cropped = tiny.embed_views(views["image"], views["mask"], views["pointmap"], view="cropped")
        shared = tiny.embed_views(full["rgb_image"], full["rgb_image_mask"], full["rgb_pointmap"], view="full")
        fused = tiny.fuse(cropped, shared)
        repeated = {k: (v[:1].expand_as(v) if k.startswith("rgb_") else v) for k, v in views.items()}
        reference = tiny(**repeated)
    torch.testing.assert_close(fused, reference)


def test_dino_embedder_mask_is_grey_image_and_resizes():
    torch.manual_seed(0)
    emb = DinoEmbedder(TINY.dino).eval()
    mask = (torch.rand(2, 1, 70, 70) > 0.5).float()
    with torch.no_grad():
        torch.testing.assert_close(emb(mask), emb(mask.repeat(1, 3, 1, 1)))
        big = torch.rand(1, 3, 90, 110)
        resized = F.interpolate(big, size=(70, 70), mode="bilinear", align_corners=False)
        torch.testing.assert_close(emb(big), emb(resized))
        out = emb(torch.rand(1, 3, 70, 70, dtype=torch.float64).float())
    assert out.shape == (1, 1 + TINY.dino.num_patches, TINY.dino.embed_dim)
    assert "mean" not in emb.state_dict() and "std" not in emb.state_dict()


def test_dino_embedder_prenorm_features_are_non_affine_ln_over_all_tokens():
    torch.manual_seed(0)
    cfg = type(TINY.dino)(**{**TINY.dino.__dict__, "prenorm_features": True})
    emb = DinoEmbedder(cfg).eval()
    x = torch.rand(1, 3, 70, 70)
    with torch.no_grad():
        out = emb(x)
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        prenorm = emb.backbone.forward_features((x - mean) / std)["x_prenorm"]
    assert out.shape == (1, 1 + cfg.num_register_tokens + cfg.num_patches, cfg.embed_dim)
    torch.testing.assert_close(out, F.layer_norm(prenorm, (cfg.embed_dim,), eps=1e-5))


def test_pointmap_windows_are_row_major_and_invalid_points_use_the_token():
    torch.manual_seed(0)
    cfg = TINY.pointmap  # 40 px, 8 px windows -> 5 x 5 tokens
    emb = PointPatchEmbed(cfg).eval()
    xyz = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        base = emb(xyz)
        moved = xyz.clone()
        moved[:, :, 8 * 2 + 3, 8 * 4 + 1] += 1.0  # a point inside window (row 2, col 4)
        changed = (emb(moved) - base).abs().amax(-1)[0] > 0
        assert changed.nonzero().flatten().tolist() == [2 * 5 + 4]
        # An invalid pixel (any non-finite coordinate) is embedded as invalid_xyz_token, whatever it held.
        a, b = xyz.clone(), xyz.clone()
        a[:, :, 0, 0], b[:, 0, 0, 0] = float("nan"), float("inf")
        torch.testing.assert_close(emb(a), emb(b))
        assert not torch.equal(emb(a), base)
        x = emb.embed_points(a)
    torch.testing.assert_close(x[0, 0, 0], emb.invalid_xyz_token)
    torch.testing.assert_close(x[0, 0, 1], emb.point_proj(a[0, :, 0, 1]))
    assert base.shape == (1, cfg.num_tokens, cfg.embed_dim)


def test_pointmap_is_resized_with_nearest():
    torch.manual_seed(0)
    emb = PointPatchEmbed(TINY.pointmap).eval()
    xyz = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(emb(xyz.repeat_interleave(2, -1).repeat_interleave(2, -2)), emb(xyz))


def test_bad_inputs_are_clear_errors(tiny):
    views = _views(1)
    with pytest.raises(ValueError, match="cropped pointmap: got None"):
        tiny(**{**views, "pointmap": None})
    with pytest.raises(ValueError, match=r"full mask: got \(1, 3, 70, 70\)"):
        tiny(**{**views, "rgb_image_mask": views["rgb_image"]})
    with pytest.raises(ValueError, match="batch sizes differ"):
        tiny(**{**views, "image": views["image"].repeat(2, 1, 1, 1)})
    with pytest.raises(ValueError, match="view"):
        tiny.embed_views(views["image"], views["mask"], views["pointmap"], view="crop")
    cropped = tiny.embed_views(views["image"], views["mask"], views["pointmap"])
    with pytest.raises(ValueError, match="fuse"):
        tiny.fuse(cropped, cropped[:2])


# ---------------------------------------------------------------------------------------------
# parity with the official code (fixture made by running it; see tests/fixtures/stage1_small/meta.json)

FIXTURE = Path(__file__).parent / "fixtures" / "stage1_small"
PREFIX = "_base_models.condition_embedder."


@pytest.mark.skipif(not (FIXTURE / "data.safetensors").is_file(), reason="parity fixture missing")
def test_matches_official_condition_tokens():
    from safetensors.torch import load_file

    data = load_file(FIXTURE / "data.safetensors")
    ckpt = torch.load(FIXTURE / "official" / "ss_generator.ckpt", weights_only=True)["state_dict"]
    model = ConditionEmbedder(TINY).eval()
    model.load_state_dict({k[len(PREFIX) :]: v for k, v in ckpt.items() if k.startswith(PREFIX)}, strict=True)
    names = ("image", "rgb_image", "mask", "rgb_image_mask", "pointmap", "rgb_pointmap")
    with torch.no_grad():
        for tag, ref in (("pre", "cond/tokens"), ("pre_border", "cond_border/tokens")):
            # The fixture stores rgb_image once: the full photo is the same for both masks.
            views = {k: data[f"{tag}/{k}"] if f"{tag}/{k}" in data else data[f"pre/{k}"] for k in names}
            tokens = model(**views)
            torch.testing.assert_close(tokens, data[ref], rtol=1e-4, atol=1e-5, msg=ref)
