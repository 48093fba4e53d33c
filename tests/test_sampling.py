"""Stage-1 sampling: schedule, CFG window, noise order, Euler, fast == reference, shortcut, bf16."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from stage1_fixture import group, load_official_generator

from sam3d_core.config import SamplerConfig
from sam3d_core.models.ss_flow import SSFlowModel
from sam3d_core.pipeline.sampling import (
    cfg_strength_at,
    euler_sample,
    sample_stage1,
    stage1_noise,
    time_grid,
)
from sam3d_core.registry import stage1_preset

SAMPLER = SamplerConfig()


@pytest.fixture(scope="module")
def model():
    """The tiny preset at an 8^3 shape grid (every code path of the tiny preset, 8x fewer tokens)."""
    torch.manual_seed(0)
    return SSFlowModel(dataclasses.replace(stage1_preset("tiny").flow, resolution=8)).eval()


def _cond(model, batch=1, seed=1):
    return torch.randn(batch, 23, model.cfg.cond_channels, generator=torch.Generator().manual_seed(seed))


def test_time_grid_matches_numpy_float64_and_formula():
    np = pytest.importorskip("numpy")
    ts = time_grid(25, 3.0)
    assert ts.dtype == torch.float64 and ts.shape == (26,)
    u = np.linspace(0, 1, 26)
    assert torch.equal(ts, torch.from_numpy(u / (1 + (3 - 1) * (1 - u))))  # bit for bit, as ShortCut
    assert ts[0] == 0 and ts[-1] == 1 and bool((ts.diff() > 0).all())
    assert abs(ts[13].item() - (13 / 25) / (1 + 2 * (12 / 25))) < 1e-15
    assert torch.equal(time_grid(4, 1.0), torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))


def test_cfg_window_gives_19_guided_steps_of_25():
    ts = time_grid(25, 3.0)
    s = [cfg_strength_at(float(t), 7.0, (0.0, 500.0), 1000.0) for t in ts[:-1]]
    assert s.count(7.0) == 19 and s.count(0.0) == 6
    assert s[:19] == [7.0] * 19  # the noisy half, t <= 0.5
    assert cfg_strength_at(0.5, 7.0, (0, 500), 1000.0) == 7.0  # both ends inclusive
    assert cfg_strength_at(0.5001, 7.0, (0, 500), 1000.0) == 0.0


def test_noise_is_drawn_in_sorted_key_order():
    cfg = stage1_preset("tiny").flow
    noise = stage1_noise(2, cfg, torch.Generator().manual_seed(7))
    assert list(noise) == ["6drotation_normalized", "scale", "shape", "translation", "translation_scale"]
    g = torch.Generator().manual_seed(7)
    for name, shape in [
        ("6drotation_normalized", (2, 1, 6)),
        ("scale", (2, 1, 3)),
        ("shape", (2, 4096, 8)),
        ("translation", (2, 1, 3)),
        ("translation_scale", (2, 1, 1)),
    ]:
        assert noise[name].dtype == torch.float32
        assert torch.equal(noise[name], torch.randn(shape, generator=g))
    torch.manual_seed(7)  # generator=None draws from the global generator, like the official code
    assert torch.equal(stage1_noise(2, cfg)["shape"], noise["shape"])


def test_euler_evaluates_left_endpoints_and_reports_progress():
    ts = time_grid(5, 3.0)
    seen, steps = [], []
    out = euler_sample(
        lambda x, t: seen.append(t) or {"a": torch.full_like(x["a"], t)},
        {"a": torch.zeros(1, dtype=torch.float64)},
        ts,
        progress=lambda i, n: steps.append((i, n)),
    )
    assert seen == ts[:-1].tolist()
    assert steps == [(i, 5) for i in range(1, 6)]
    left_riemann = sum(t0 * (t1 - t0) for t0, t1 in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True))
    assert abs(out["a"].item() - left_riemann) < 1e-6 and out["a"].dtype == torch.float32


@pytest.fixture(scope="module")
def reference_run(model):
    """One default reference sample, with every model call's (t, cond, d) recorded."""
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(args[1:]))
    cond = _cond(model)
    noise = stage1_noise(1, model.cfg, torch.Generator().manual_seed(3))
    try:
        out = sample_stage1(model, cond, noise, SAMPLER, use_fast_path=False)
        n_default = len(calls)
        sample_stage1(model, cond, noise, SAMPLER, shortcut=True, use_fast_path=False)
    finally:
        hook.remove()
    return cond, noise, out, calls[:n_default], calls[n_default:]


def _net_times(steps: int) -> list[float]:
    return [torch.tensor(float(t) * 1000, dtype=torch.float32).item() for t in time_grid(steps, 3.0)[:-1]]


def test_reference_sampler_feeds_official_times_d_and_zero_condition(reference_run):
    _, _, _, default, shortcut = reference_run
    assert len(default) == 25 + 19  # 25 conditional passes + 19 unconditional ones
    conditional = [c for c in default if c[1].abs().sum() > 0]
    assert [c[0].item() for c in conditional] == _net_times(25)
    assert all(c[2].item() == 0.0 for c in default)  # d = 0 is still fed
    assert len(shortcut) == 4 and all(c[1].abs().sum() > 0 for c in shortcut)  # CFG off
    assert all(c[2].item() == 250.0 for c in shortcut)  # d = 1/steps in network units
    assert [c[0].item() for c in shortcut] == _net_times(4)


def test_fast_sample_equals_reference_sample(model, reference_run):
    cond, noise, ref, _, _ = reference_run
    done = []
    fast = sample_stage1(model, cond, noise, SAMPLER, progress=lambda i, n: done.append(i))
    assert done == list(range(1, 26))
    for k in ref:
        assert fast[k].dtype == torch.float32 and fast[k].shape == noise[k].shape
        assert (fast[k] - ref[k]).abs().max() <= 1e-5 * ref[k].abs().max(), k


def test_shortcut_mode_runs_and_differs(model):
    cond = _cond(model)
    noise = stage1_noise(1, model.cfg, torch.Generator().manual_seed(4))
    short = sample_stage1(model, cond, noise, SAMPLER, shortcut=True)
    ref = sample_stage1(model, cond, noise, SAMPLER, shortcut=True, use_fast_path=False)
    assert sorted(short) == sorted(ref) and len(ref) == 5
    for k in ref:
        torch.testing.assert_close(short[k], ref[k], rtol=1e-5, atol=1e-6)
    plain = sample_stage1(model, cond, noise, SAMPLER, steps=4, cfg_strength=0.0)  # same grid, d = 0
    assert not torch.allclose(short["shape"], plain["shape"])


def test_bfloat16_model_samples_in_float32_state(model):
    bf16 = SSFlowModel(model.cfg)
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16).eval()
    noise = stage1_noise(1, model.cfg, torch.Generator().manual_seed(5))
    out = sample_stage1(bf16, _cond(model).to(torch.bfloat16), noise, SAMPLER, steps=6)
    assert len(out) == 5
    for k, v in out.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k


def test_bad_arguments_raise(model):
    noise = stage1_noise(1, model.cfg)
    with pytest.raises(ValueError, match="steps=0"):
        time_grid(0, 3.0)
    with pytest.raises(ValueError, match="rescale_t=0"):
        time_grid(25, 0.0)
    with pytest.raises(ValueError, match="batch=0"):
        stage1_noise(0, model.cfg)
    with pytest.raises(ValueError, match="cfg_strength=-1"):
        sample_stage1(model, _cond(model), noise, SAMPLER, cfg_strength=-1.0)
    with pytest.raises(ValueError, match="latents has keys"):
        sample_stage1(model, _cond(model), {"shape": noise["shape"]}, SAMPLER)
    with pytest.raises(ValueError, match="cond has shape"):
        sample_stage1(model, _cond(model)[0], noise, SAMPLER)
    plain = SSFlowModel(dataclasses.replace(model.cfg, is_shortcut_model=False, num_blocks=1))
    with pytest.raises(ValueError, match="shortcut=True"):
        sample_stage1(plain, _cond(model), noise, SAMPLER, shortcut=True)


# --- parity with the official code (tests/fixtures/stage1_small, see its meta.json) --------------------


def test_official_schedule_and_noise():
    _, data = load_official_generator()
    assert torch.equal(time_grid(25, 3.0)[:-1], data["sample/t_steps"])  # bit for bit, float64
    assert torch.equal(time_grid(4, 3.0)[:-1], data["shortcut/t_steps"])
    assert torch.equal(data["shortcut/d_steps"], torch.full((4,), 0.25, dtype=torch.float64))
    torch.manual_seed(42)  # the fixture's sampling seed, global CPU generator
    noise = stage1_noise(1, stage1_preset("tiny").flow)
    expected = group(data, "sample/noise/")
    assert sorted(expected) == sorted(noise) and len(noise) == 5  # shape + the 4 pose latents
    for k, v in expected.items():
        assert torch.equal(noise[k], v), k


@torch.no_grad()
def test_official_shortcut_sample():
    model, data = load_official_generator()
    noise = group(data, "sample/noise/")
    out = sample_stage1(model, data["cond/tokens"], noise, SAMPLER, shortcut=True)
    expected = group(data, "shortcut/final/")
    assert sorted(expected) == sorted(out) and len(out) == 5  # the fixture holds every latent
    for k, ref in expected.items():
        assert (out[k] - ref).abs().max() <= 1e-5 * ref.abs().max(), k


@pytest.mark.slow
@torch.no_grad()
def test_official_full_default_sample():
    """25 steps, 19 of them guided (about 20 s on a 2-core CPU: 44 DiT passes at 4096 tokens)."""
    model, data = load_official_generator()
    out = sample_stage1(model, data["cond/tokens"], group(data, "sample/noise/"), SAMPLER)
    expected = group(data, "sample/final/")
    assert sorted(expected) == sorted(out) and len(out) == 5
    for k, ref in expected.items():
        assert (out[k] - ref).abs().max() <= 1e-5 * ref.abs().max(), k
