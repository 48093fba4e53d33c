"""Stage-2 SLAT flow model and sampler: official key table, parity with the official code, fast == reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sam3d_core.models.condition import ConditionEmbedder
from sam3d_core.models.slat_flow import SLatFlowModel
from sam3d_core.pipeline.sampling import cfg_strength_at, denormalize_slat, sample_stage2, slat_time_grid, stage2_noise
from sam3d_core.registry import stage2_preset

FIXTURE = Path(__file__).parent / "fixtures" / "stage2_small"
GENERATOR_PREFIX = "_base_models.generator.reverse_fn.backbone."
CONDITION_PREFIX = "_base_models.condition_embedder."
TINY = stage2_preset("tiny")

needs_fixture = pytest.mark.skipif(not (FIXTURE / "data.safetensors").is_file(), reason="parity fixture missing")


def official_table(c: int = 1024, io: int = 128, cond: int = 1024, heads: int = 16, blocks: int = 24) -> dict:
    """Spec: every tensor of `reverse_fn.backbone.*` of the SLAT flow model with its shape, in order."""
    t = {"t_embedder.mlp.0.weight": (c, 256), "t_embedder.mlp.0.bias": (c,)}
    t |= {"t_embedder.mlp.2.weight": (c, c), "t_embedder.mlp.2.bias": (c,)}
    t |= {"input_layer.weight": (io, 8), "input_layer.bias": (io,)}

    def res(p: str, cin: int, cout: int) -> dict:
        r = {f"{p}norm1.weight": (cin,), f"{p}norm1.bias": (cin,)}
        r |= {f"{p}conv1.conv.weight": (cout, 3, 3, 3, cin), f"{p}conv1.conv.bias": (cout,)}
        r |= {f"{p}conv2.conv.weight": (cout, 3, 3, 3, cout), f"{p}conv2.conv.bias": (cout,)}
        r |= {f"{p}emb_layers.1.weight": (2 * cout, c), f"{p}emb_layers.1.bias": (2 * cout,)}
        if cin != cout:
            r |= {f"{p}skip_connection.weight": (cout, cin), f"{p}skip_connection.bias": (cout,)}
        return r

    t |= res("input_blocks.0.", io, io) | res("input_blocks.1.", io, c)
    for i in range(blocks):
        p = f"blocks.{i}."
        t |= {f"{p}norm2.weight": (c,), f"{p}norm2.bias": (c,)}
        t |= {f"{p}self_attn.to_qkv.weight": (3 * c, c), f"{p}self_attn.to_qkv.bias": (3 * c,)}
        t |= {f"{p}self_attn.{n}_rms_norm.gamma": (heads, c // heads) for n in "qk"}
        t |= {f"{p}self_attn.to_out.weight": (c, c), f"{p}self_attn.to_out.bias": (c,)}
        t |= {f"{p}cross_attn.to_q.weight": (c, c), f"{p}cross_attn.to_q.bias": (c,)}
        t |= {f"{p}cross_attn.to_kv.weight": (2 * c, cond), f"{p}cross_attn.to_kv.bias": (2 * c,)}
        t |= {f"{p}cross_attn.to_out.weight": (c, c), f"{p}cross_attn.to_out.bias": (c,)}
        t |= {f"{p}mlp.mlp.0.weight": (4 * c, c), f"{p}mlp.mlp.0.bias": (4 * c,)}
        t |= {f"{p}mlp.mlp.2.weight": (c, 4 * c), f"{p}mlp.mlp.2.bias": (c,)}
        t |= {f"{p}adaLN_modulation.1.weight": (6 * c, c), f"{p}adaLN_modulation.1.bias": (6 * c,)}
    t |= res("out_blocks.0.", 2 * c, io) | res("out_blocks.1.", 2 * io, io)
    t |= {"out_layer.weight": (8, io), "out_layer.bias": (8,)}
    return t


def test_official_preset_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = SLatFlowModel(stage2_preset("official").flow)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_table()
    assert len(got) == 526
    assert list(got) == list(want)
    assert got == want


def test_tiny_preset_keys_match_the_table():
    got = {k: tuple(v.shape) for k, v in SLatFlowModel(TINY.flow).state_dict().items()}
    assert got == official_table(c=64, io=16, cond=64, heads=2, blocks=2)


def test_unsupported_configs_are_clear_errors():
    import dataclasses

    with pytest.raises(ValueError, match="patch_size"):
        SLatFlowModel(dataclasses.replace(TINY.flow, patch_size=4, io_block_channels=(16, 32)))
    with pytest.raises(ValueError, match="num_heads"):
        SLatFlowModel(dataclasses.replace(TINY.flow, num_heads=3))


# ---------------------------------------------------------------------------------------------
# semantics on a random tiny model


def _random_object(seed: int, n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.unique(torch.randint(0, 12, (n, 3), generator=g), dim=0)  # sorted, unique
    return torch.cat([torch.zeros(len(c), 1, dtype=torch.int64), c], dim=1).int()


@pytest.fixture(scope="module")
def tiny_model() -> SLatFlowModel:
    torch.manual_seed(0)
    model = SLatFlowModel(TINY.flow).eval()
    with torch.no_grad():  # the official init zeroes the output and adaLN layers; perturb everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_objects_in_one_batch_are_independent(tiny_model):
    a, b = _random_object(1), _random_object(2)
    both = torch.cat([a, b + torch.tensor([1, 0, 0, 0], dtype=a.dtype)])
    feats = torch.randn(len(both), 8)
    cond = torch.randn(2, 7, 64)
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        v = tiny_model(feats, both, t, cond)
        va = tiny_model(feats[: len(a)], a, t[:1], cond[:1])
        vb = tiny_model(feats[len(a) :], b, t[1:], cond[1:])
    torch.testing.assert_close(v, torch.cat([va, vb]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strength", [0.0, 1.0, 3.0])
def test_fast_path_equals_reference(tiny_model, strength):
    a, b = _random_object(3), _random_object(4)
    coords = torch.cat([a, b + torch.tensor([1, 0, 0, 0], dtype=a.dtype)])
    feats, cond, t = torch.randn(len(coords), 8), torch.randn(2, 9, 64), torch.tensor([120.0, 480.0])
    grids = tiny_model.build_grids(coords)
    with torch.no_grad():
        ref = tiny_model(feats, coords, t, cond, grids)
        if strength:
            ref = (1 + strength) * ref - strength * tiny_model(feats, coords, t, cond * 0, grids)
        fast = tiny_model.forward_cfg(feats, t, tiny_model.prepare_condition(cond), grids, strength)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors(tiny_model):
    coords = _random_object(5)
    feats, cond = torch.randn(len(coords), 8), torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="feats has shape"):
        tiny_model(feats[:, :4], coords, torch.tensor([1.0]), cond)
    with pytest.raises(ValueError, match="t has shape"):
        tiny_model(feats, coords, torch.tensor([1.0, 2.0]), cond)
    with pytest.raises(ValueError, match="cond has shape"):
        tiny_model(feats, coords, torch.tensor([1.0]), torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="grouped by object"):
        tiny_model.build_grids(torch.cat([coords + torch.tensor([1, 0, 0, 0], dtype=coords.dtype), coords]))
    with pytest.raises(ValueError, match="batch column spans"):
        tiny_model(feats, coords + torch.tensor([1, 0, 0, 0], dtype=coords.dtype), torch.tensor([1.0]), cond)
    with pytest.raises(ValueError, match="integer"):
        tiny_model.build_grids(coords.float())


def test_slat_time_grid_and_noise():
    ts = slat_time_grid(25)
    assert ts.dtype == torch.float32 and ts.shape == (26,)
    torch.testing.assert_close(ts, torch.linspace(0, 1, 26), rtol=0, atol=0)
    r3 = slat_time_grid(4, 3.0)
    u = torch.linspace(0, 1, 5)
    torch.testing.assert_close(r3, u / (1 + 2 * (1 - u)))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.testing.assert_close(stage2_noise(5, generator=g1), torch.randn(1, 5, 8, generator=g2)[0])
    with pytest.raises(ValueError, match="steps"):
        slat_time_grid(0)


def test_denormalize_slat():
    feats = torch.randn(3, 8)
    want = feats * torch.tensor(TINY.slat_std) + torch.tensor(TINY.slat_mean)
    torch.testing.assert_close(denormalize_slat(feats, TINY), want)
    with pytest.raises(ValueError, match="feats has shape"):
        denormalize_slat(feats[:, :4], TINY)


# ---------------------------------------------------------------------------------------------
# parity with the official code (fixture made by running it; see tests/fixtures/stage2_small/meta.json)


@pytest.fixture(scope="module")
def official():
    from safetensors.torch import load_file

    data = load_file(FIXTURE / "data.safetensors")
    ckpt = torch.load(FIXTURE / "official" / "slat_generator.ckpt", weights_only=True)["state_dict"]
    model = SLatFlowModel(TINY.flow).eval()
    weights = {k[len(GENERATOR_PREFIX) :]: v for k, v in ckpt.items() if k.startswith(GENERATOR_PREFIX)}
    assert list(weights) == list(model.state_dict())  # same keys in the same order
    model.load_state_dict(weights, strict=True)
    embedder = ConditionEmbedder(TINY.condition).eval()
    cond_weights = {k[len(CONDITION_PREFIX) :]: v for k, v in ckpt.items() if k.startswith(CONDITION_PREFIX)}
    embedder.load_state_dict(cond_weights, strict=True)
    return model, embedder, data, data["input/coords"].int()


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-4, f"{name}: max error {rel:.2e} relative to the largest value"


@needs_fixture
def test_condition_tokens_match_official(official):
    _, embedder, data, _ = official
    names = ("image", "rgb_image", "mask", "rgb_image_mask")
    with torch.no_grad():
        tokens = embedder(**{k: data[f"pre/{k}"] for k in names})
    _close(tokens, data["cond/tokens"], "cond/tokens")


@needs_fixture
def test_internals_match_official(official):
    model, _, data, coords = official
    grids = model.build_grids(coords)
    got = {}
    modules = ["input_layer", "input_blocks.0", "input_blocks.1", "blocks.0", "out_blocks.0"]
    hooks = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: got.__setitem__(name, o))
        for name in modules
    ]
    try:
        with torch.no_grad():
            model(data["eval/latent"][0], coords, torch.tensor([300.0]), data["cond/tokens"], grids)
    finally:
        for h in hooks:
            h.remove()
    for name in modules:
        _close(got[name], data[f"eval/internal/{name}/feats"], name)
    # the 2x average pool (count + 1 mean) and the parent order
    assert torch.equal(grids.coarse.coords, data["eval/internal/input_blocks.1.updown/coords"].int())
    _close(grids.downsample(got["input_blocks.0"]), data["eval/internal/input_blocks.1.updown/feats"], "updown")


@needs_fixture
def test_single_evaluation_matches_official(official):
    model, _, data, coords = official
    x, cond = data["eval/latent"][0], data["cond/tokens"]
    t = torch.tensor([0.3 * 1000], dtype=torch.float32)
    assert cfg_strength_at(0.3, TINY.sampler.cfg_strength, TINY.sampler.cfg_interval, 1000.0) == 1.0
    with torch.no_grad():
        v_cond = model(x, coords, t, cond)
        v_uncond = model(x, coords, t, cond * 0)
        fast = model.forward_cfg(x, t, model.prepare_condition(cond), model.build_grids(coords), 1.0)
    _close(v_cond, data["eval/cond"][0], "eval/cond")
    _close(v_uncond, data["eval/uncond"][0], "eval/uncond")
    _close(2 * v_cond - v_uncond, data["eval/cfg"][0], "eval/cfg")
    _close(fast, data["eval/cfg"][0], "eval/cfg (fast path)")


@needs_fixture
def test_schedule_matches_official(official):
    _, _, data, _ = official
    ts = slat_time_grid(TINY.sampler.steps, TINY.sampler.rescale_t)
    torch.testing.assert_close(ts[:-1].double(), data["sample/t_steps"], rtol=0, atol=0)
    s = TINY.sampler
    guided = [t for t in ts[:-1].tolist() if cfg_strength_at(t, s.cfg_strength, s.cfg_interval, s.time_scale)]
    assert len(guided) == 13  # t = 0, 0.04, ..., 0.48


@needs_fixture
@pytest.mark.parametrize("fast", [True, False])
def test_sample_matches_official(official, fast):
    model, _, data, coords = official
    torch.manual_seed(42)
    noise = stage2_noise(coords.shape[0])
    torch.testing.assert_close(noise, data["sample/noise"][0], rtol=0, atol=0)
    raw = sample_stage2(model, data["cond/tokens"], coords, noise, TINY.sampler, use_fast_path=fast)
    _close(raw, data["sample/raw"][0], "sample/raw")
    _close(denormalize_slat(raw, TINY), data["sample/slat_feats"], "sample/slat_feats")
