"""Stage-1 MoT flow model: official key table, semantics, fast path == reference path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from stage1_fixture import group, load_official_generator

from sam3d_core.config import SSFlowConfig
from sam3d_core.models.layers import absolute_position_embedding
from sam3d_core.models.ss_flow import ConditionCache, CrossAttention, SSFlowModel, latent_shapes
from sam3d_core.registry import stage1_preset

POSE_STREAM = "6drotation_normalized"


def official_table(c: int = 1024, heads: int = 16, cond: int = 1024, blocks: int = 24, res: int = 16) -> dict:
    """Spec §4.6 written out: every tensor of `reverse_fn.backbone.*` with its shape."""
    t = {}
    for emb in ("d_embedder", "t_embedder"):
        t |= {f"{emb}.mlp.0.weight": (c, 256), f"{emb}.mlp.0.bias": (c,)}
        t |= {f"{emb}.mlp.2.weight": (c, c), f"{emb}.mlp.2.bias": (c,)}
    linears = {  # name -> (out, in)
        "self_attn.to_qkv.{s}": (3 * c, c),
        "self_attn.to_out.{s}": (c, c),
        "cross_attn.{s}.to_q": (c, c),
        "cross_attn.{s}.to_kv": (2 * c, cond),
        "cross_attn.{s}.to_out": (c, c),
        "mlp.{s}.mlp.0": (4 * c, c),
        "mlp.{s}.mlp.2": (c, 4 * c),
    }
    for i in range(blocks):
        p = f"blocks.{i}."
        for s in ("shape", POSE_STREAM):
            t |= {f"{p}norm2.{s}.weight": (c,), f"{p}norm2.{s}.bias": (c,)}
            t |= {f"{p}self_attn.q_rms_norm.{s}.gamma": (heads, c // heads)}
            t |= {f"{p}self_attn.k_rms_norm.{s}.gamma": (heads, c // heads)}
            for name, (o, n) in linears.items():
                t |= {p + name.format(s=s) + ".weight": (o, n), p + name.format(s=s) + ".bias": (o,)}
        t |= {f"{p}adaLN_modulation.1.weight": (6 * c, c), f"{p}adaLN_modulation.1.bias": (6 * c,)}
    for name, ch in [
        ("6drotation_normalized", 6),
        ("scale", 3),
        ("shape", 8),
        ("translation", 3),
        ("translation_scale", 1),
    ]:
        p = f"latent_mapping.{name}."
        t |= {p + "input_layer.weight": (c, ch), p + "input_layer.bias": (c,)}
        t |= {p + "out_layer.weight": (ch, c), p + "out_layer.bias": (ch,)}
        t |= {p + "pos_emb": (res**3, c) if name == "shape" else (1, c)}
    return t


def test_official_state_dict_matches_spec_table():
    with torch.device("meta"):
        model = SSFlowModel(stage1_preset("official").flow)
    sd = model.state_dict()
    table = official_table()
    assert len(table) == 945 and len(sd) == 945
    assert set(sd) == set(table), (sorted(set(sd) - set(table))[:5], sorted(set(table) - set(sd))[:5])
    wrong = {k: (tuple(v.shape), table[k]) for k, v in sd.items() if tuple(v.shape) != table[k]}
    assert not wrong
    buffers = dict(model.named_buffers())
    assert list(buffers) == ["latent_mapping.shape.pos_emb"]  # persistent buffer, in the checkpoint
    assert isinstance(model.latent_mapping["scale"].pos_emb, torch.nn.Parameter)
    # strict load of a same-keyed state dict works with no renaming
    model.load_state_dict({k: torch.empty(s, device="meta") for k, s in table.items()}, strict=True, assign=True)


def test_shape_pos_emb_is_ij_grid_embedding():
    cfg = dataclasses.replace(stage1_preset("tiny").flow, resolution=4)
    pos = SSFlowModel(cfg).latent_mapping["shape"].pos_emb
    assert torch.equal(pos[1], absolute_position_embedding(torch.tensor([[0, 0, 1]]), 64)[0])  # z fastest
    assert torch.equal(pos[16], absolute_position_embedding(torch.tensor([[1, 0, 0]]), 64)[0])  # x slowest


def _inputs(cfg: SSFlowConfig, batch: int, seed: int = 0, n_cond: int = 37):
    g = torch.Generator().manual_seed(seed)
    x = {k: torch.randn(batch, n, c, generator=g) for k, (n, c) in latent_shapes(cfg).items()}
    cond = torch.randn(batch, n_cond, cfg.cond_channels, generator=g)
    t = torch.full((batch,), 312.5)
    d = torch.full((batch,), 250.0)
    return x, cond, t, d


def _rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


@pytest.fixture(scope="module")
def small():
    """The tiny preset at an 8^3 shape grid: the same code paths, 8x fewer tokens."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(stage1_preset("tiny").flow, resolution=8)
    return SSFlowModel(cfg).eval()


@torch.no_grad()
def test_tiny_preset_fast_path_equals_reference():
    torch.manual_seed(1)
    cfg = stage1_preset("tiny").flow
    model = SSFlowModel(cfg).eval()
    x, cond, t, d = _inputs(cfg, batch=1)
    v_cond = model(x, t, cond, d)
    v_uncond = model(x, t, cond * 0, d)  # the official force_zeros_cond pass
    for k, (n, c) in latent_shapes(cfg).items():
        assert v_cond[k].shape == (1, n, c) and v_cond[k].dtype == torch.float32
    guided = {k: 8 * v_cond[k] - 7 * v_uncond[k] for k in v_cond}
    assert _rel(model.forward_cfg(x, t, model.prepare_condition(cond), d, 7.0), guided) < 1e-5


@torch.no_grad()
def test_fast_path_batch_of_two_equals_reference(small):
    x, cond, t, d = _inputs(small.cfg, batch=2, seed=3)
    t = torch.tensor([10.0, 480.0])  # different times per sample
    v_cond, v_uncond = small(x, t, cond, d), small(x, t, cond * 0, d)
    guided = {k: 3.5 * v_cond[k] - 2.5 * v_uncond[k] for k in v_cond}
    cache = small.prepare_condition(cond)
    assert isinstance(cache, ConditionCache) and cache.batch == 2
    assert _rel(small.forward_cfg(x, t, cache, d, 2.5), guided) < 1e-5
    assert _rel(small.forward_cfg(x, t, cache, d, 0.0), v_cond) < 1e-6  # conditional-only branch
    one = small({k: v[1:] for k, v in x.items()}, t[1:], cond[1:], d[1:])  # rows are independent
    assert _rel({k: v[1:] for k, v in v_cond.items()}, one) < 1e-5


@torch.no_grad()
def test_zero_condition_cross_attention_is_constant():
    torch.manual_seed(2)
    attn = CrossAttention(64, 48, num_heads=2)
    x = torch.randn(2, 11, 64)
    out = attn(x, torch.zeros(2, 29, 48))
    assert torch.allclose(out, attn.zero_condition_output().expand_as(out), atol=1e-6)


@torch.no_grad()
def test_mot_mask_shape_ignores_pose_pose_sees_shape(small):
    x, cond, t, d = _inputs(small.cfg, batch=1, seed=4)
    base = small(x, t, cond, d)
    pose_moved = small({**x, "translation": x["translation"] + 1.0}, t, cond, d)
    assert torch.equal(pose_moved["shape"], base["shape"])  # shape never attends to pose
    assert not torch.allclose(pose_moved["translation"], base["translation"])
    shape_moved = small({**x, "shape": x["shape"] * 0.5}, t, cond, d)
    assert not torch.allclose(shape_moved["scale"], base["scale"], atol=1e-4)  # pose attends to shape


@torch.no_grad()
def test_d_zero_still_adds_d_embedder(small):
    x, cond, t, _ = _inputs(small.cfg, batch=1, seed=5)
    with_d0 = small(x, t, cond, torch.zeros(1))
    without = small(x, t, cond, None)
    assert not torch.allclose(with_d0["shape"], without["shape"])


@torch.no_grad()
def test_bfloat16_model_runs_and_stays_close(small):
    x, cond, t, d = _inputs(small.cfg, batch=1, seed=6)
    ref = small(x, t, cond, d)
    bf16 = SSFlowModel(small.cfg)
    bf16.load_state_dict(small.state_dict())
    bf16 = bf16.to(torch.bfloat16).eval()
    out = bf16(x, t, cond, d)
    fast = bf16.forward_cfg(x, t, bf16.prepare_condition(cond), d, 7.0)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in [*out.values(), *fast.values()])
    assert _rel(out, ref) < 0.1


def test_bad_inputs_raise(small):
    x, cond, t, d = _inputs(small.cfg, batch=1)
    with pytest.raises(ValueError, match="latents has keys"):
        small({k: v for k, v in x.items() if k != "scale"}, t, cond, d)
    with pytest.raises(ValueError, match=r"latents\['shape'\] has shape"):
        small({**x, "shape": x["shape"][:, :10]}, t, cond, d)
    with pytest.raises(ValueError, match="t has shape"):
        small(x, torch.tensor(5.0), cond, d)
    with pytest.raises(ValueError, match="cond has shape"):
        small(x, t, cond[..., :10], d)
    with pytest.raises(ValueError, match="cache holds 2 blocks for a condition batch of 2"):
        small.forward_cfg(x, t, small.prepare_condition(torch.cat([cond, cond])), d, 1.0)
    with pytest.raises(ValueError, match="qk_rms_norm"):
        SSFlowModel(dataclasses.replace(small.cfg, qk_rms_norm=False))
    no_d = SSFlowModel(dataclasses.replace(small.cfg, is_shortcut_model=False, num_blocks=1))
    with pytest.raises(ValueError, match="no d_embedder"):
        no_d(x, t, cond, d)


# --- parity with the official code (tests/fixtures/stage1_small, see its meta.json) --------------------


@torch.no_grad()
def test_velocity_matches_official_cond_uncond_cfg():
    model, data = load_official_generator()
    x, cond = group(data, "eval/latent/"), data["cond/tokens"]
    t, d = torch.tensor([300.0]), torch.tensor([0.0])  # meta.json single_eval: t = 0.3, d = 0
    assert _rel(model(x, t, cond, d), group(data, "eval/cond/")) < 1e-5
    assert _rel(model(x, t, cond * 0, d), group(data, "eval/uncond/")) < 1e-5
    fast = model.forward_cfg(x, t, model.prepare_condition(cond), d, 7.0)
    assert _rel(fast, group(data, "eval/cfg/")) < 1e-5
