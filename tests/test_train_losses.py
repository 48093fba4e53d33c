"""Each objective against the official formulas on a fixed batch (values computed here from the formulas with
the real tiny networks), the training targets against the pipeline's decoders, and the loss going down."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_fixture import make_sample, objective_and_batch

from sam3d_core.geometry.layout import decode_pose
from sam3d_core.models.ss_vae import shape_latent_to_grid
from sam3d_core.pipeline.sampling import denormalize_slat
from sam3d_core.registry import stage1_preset, stage2_preset
from sam3d_core.training.data import Collate
from sam3d_core.training.losses import blind_velocity_error, sample_time

W1 = {"shape": 1.0, "6drotation_normalized": 0.1, "translation": 1.0, "scale": 0.1, "translation_scale": 0.0}


def mse(a, b):
    return ((a.float() - b.float()) ** 2).mean()


# --- targets ----------------------------------------------------------------------------------------------


def test_stage1_targets_decode_back_to_the_sample():
    """The pose latents are what the sampler must produce for decode_pose to return the sample's pose."""
    samples = [make_sample(i) for i in range(3)]
    collate = Collate(stage1_preset("tiny"), 1, pairs=False)
    batch = collate(samples)
    from sam3d_core.pipeline.preprocess import preprocess_stage1

    for i, s in enumerate(samples):
        v = preprocess_stage1(s.photo, s.mask, s.pointmap, stage1_preset("tiny").preprocess)
        pose = decode_pose({k: x[i : i + 1] for k, x in batch.target.items()}, v["pointmap_scale"], v["pointmap_shift"])
        torch.testing.assert_close(pose.rotation[0].double(), torch.from_numpy(s.rotation), atol=1e-5, rtol=0)
        torch.testing.assert_close(pose.translation[0].double(), torch.from_numpy(s.translation), atol=1e-5, rtol=0)
        torch.testing.assert_close(pose.scale[0].double(), torch.from_numpy(s.scale), atol=1e-5, rtol=1e-5)
        grid = shape_latent_to_grid(batch.target["shape"][i : i + 1])[0]  # the occupancy decoder's input
        torch.testing.assert_close(grid, torch.from_numpy(s.ss_latent))
    assert batch.target["translation_scale"].abs().max() == 0  # log(1): the official ScaleShiftInvariant target


def test_stage2_targets_denormalize_to_the_sample():
    samples = [make_sample(i) for i in range(2)]
    cfg = stage2_preset("tiny")
    batch = Collate(cfg, 2, pairs=False)(samples)
    rows = [len(s.slat_coords) for s in samples]
    assert batch.target["coords"][:, 0].tolist() == [0] * rows[0] + [1] * rows[1]
    torch.testing.assert_close(
        denormalize_slat(batch.target["feats"], cfg)[: rows[0]], torch.from_numpy(samples[0].slat_feats)
    )


def test_the_time_samplers():
    t = sample_time(20000, "lognormal", -1.0, 1.0, torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) + 1.0) < 0.03 and abs(float(logit.std()) - 1.0) < 0.03
    u = sample_time(20000, "uniform", 0, 1, torch.Generator().manual_seed(0))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


# --- parity with the official formulas --------------------------------------------------------------------


def stage1_cond(obj, batch):
    with torch.no_grad():
        return obj.condition_embedder(**batch.views).float()


def test_flow_matching_stage1_matches_the_official_formula():
    obj, batch, draws = objective_and_batch("sft-stage1", p_uncond=0.0, pointmap_dropout=0.0)
    loss, parts = obj(batch, draws)
    # official FlowMatching.loss: x_t = (1 - t) x0 + t x1, target x1 - x0, sum_m w_m * mse_mean(pred_m, target_m);
    # the shortcut generator is fed d = 0 in flow mode
    t, x0, x1 = draws.t, draws.noise, batch.target
    xt = {k: (1 - t[:, None, None]) * x0[k] + t[:, None, None] * x1[k] for k in x1}
    pred = obj.generator(xt, t * 1000, stage1_cond(obj, batch), torch.zeros(2))
    expected = sum(W1[k] * mse(pred[k], x1[k] - x0[k]) for k in x1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parts["loss_shape"], mse(pred["shape"], x1["shape"] - x0["shape"]))


def test_cfg_and_pointmap_dropout_zero_the_right_tokens():
    obj, batch, draws = objective_and_batch("sft-stage1")
    draws.keep_cond = torch.tensor([1.0, 0.0])
    draws.keep_pointmap = torch.tensor([0.0, 1.0])
    cond, full = obj.condition(batch.views, draws)
    n = 2 * stage1_preset("tiny").condition.pointmap.num_tokens
    assert cond[1].abs().max() == 0  # the unconditional sample: every token zero (official force_zeros_cond)
    assert cond[0, -n:].abs().max() == 0 and torch.equal(cond[0, :-n], full[0, :-n])  # point-map blocks dropped


def test_flow_matching_stage2_matches_the_official_formula():
    obj, batch, draws = objective_and_batch("sft-stage2", p_uncond=0.0)
    loss, _ = obj(batch, draws)
    coords, x1, x0 = batch.target["coords"], batch.target["feats"], draws.noise["chosen"]
    t_rows = draws.t[coords[:, 0].long()][:, None]
    with torch.no_grad():
        cond = obj.condition_embedder(**batch.views).float()
    pred = obj.generator((1 - t_rows) * x0 + t_rows * x1, coords, draws.t * 1000, cond)
    torch.testing.assert_close(loss, mse(pred, x1 - x0), rtol=1e-6, atol=1e-7)


def _randomise_adapters(obj):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in obj.generator.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_dpo_stage1_matches_eq2_with_the_base_as_reference():
    obj, batch, draws = objective_and_batch("dpo-stage1", dpo_beta=50.0)
    base = copy.deepcopy(obj.generator.get_base_model())  # the model before any adapter update
    _randomise_adapters(obj)
    loss, parts = obj(batch, draws)
    cond = stage1_cond(obj, batch)
    w = {"shape": 1.0, "6drotation_normalized": 0.0, "translation": 0.0, "scale": 0.0, "translation_scale": 0.0}
    t, x0 = draws.t, draws.noise

    def err(model, x1):  # per sample: sum_m w_m * mean over the sample's elements of (v - v_model)^2
        xt = {k: (1 - t[:, None, None]) * x0[k] + t[:, None, None] * x1[k] for k in x1}
        with torch.no_grad():
            pred = model(xt, t * 1000, cond, torch.zeros(2))
        return sum(w[k] * ((x1[k] - x0[k] - pred[k]) ** 2).flatten(1).mean(1) for k in x1)

    with torch.no_grad():
        merged = copy.deepcopy(obj.generator).merge_and_unload()  # theta: base + adapters
    delta = (err(merged, batch.target) - err(base, batch.target)) - (
        err(merged, batch.rejected) - err(base, batch.rejected)
    )
    expected = -F.logsigmoid(-50.0 * delta).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert delta.abs().min() > 0  # the adapters changed the model, so the test is not comparing zeros
    torch.testing.assert_close(parts["dpo_accuracy"], (delta < 0).float().mean())


def test_dpo_stage2_matches_eq2_per_object():
    obj, batch, draws = objective_and_batch("dpo-stage2", dpo_beta=20.0)
    base = copy.deepcopy(obj.generator.get_base_model())
    _randomise_adapters(obj)
    loss, _ = obj(batch, draws)
    with torch.no_grad():
        cond = obj.condition_embedder(**batch.views).float()
        merged = copy.deepcopy(obj.generator).merge_and_unload()

    def err(model, coords, x1, x0):  # per object: mean over its voxels and channels
        t_rows = draws.t[coords[:, 0].long()][:, None]
        with torch.no_grad():
            pred = model((1 - t_rows) * x0 + t_rows * x1, coords, draws.t * 1000, cond)
        sq = ((x1 - x0 - pred) ** 2).mean(1)
        return torch.stack([sq[coords[:, 0] == i].mean() for i in range(2)])

    c, r = batch.target, batch.rejected
    nw, nl = draws.noise["chosen"], draws.noise["rejected"]
    delta = (err(merged, c["coords"], c["feats"], nw) - err(base, c["coords"], c["feats"], nw)) - (
        err(merged, r["coords"], r["feats"], nl) - err(base, r["coords"], r["feats"], nl)
    )
    torch.testing.assert_close(loss, -F.logsigmoid(-20.0 * delta).mean(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_cfg", [False, True])
def test_shortcut_self_consistency_matches_algorithm_2(use_cfg):
    obj, batch, draws = objective_and_batch("shortcut-stage1", p_uncond=0.0, pointmap_dropout=0.0)
    draws.d = torch.tensor([0.25, 0.125])  # a self-consistency batch
    draws.t = torch.tensor([0.5, 0.25])
    draws.shortcut_cfg = use_cfg
    loss, parts = obj(batch, draws)
    cond, x0, x1, t, d = stage1_cond(obj, batch), draws.noise, batch.target, draws.t, draws.d
    g, s = obj.generator, 2.0
    xt = {k: (1 - t[:, None, None]) * x0[k] + t[:, None, None] * x1[k] for k in x1}

    def guided(x, tt):  # v(c) everywhere; (1 + s) v(c) - s v(0) on the shape latent in CFG batches
        with torch.no_grad():
            v = g(x, tt * 1000, cond, d * 1000)
            if use_cfg:
                u = g(x, tt * 1000, cond * 0, d * 1000)
                v["shape"] = (1 + s) * v["shape"] - s * u["shape"]
        return v

    s_t = guided(xt, t)
    s_td = guided({k: xt[k] + s_t[k] * d[:, None, None] for k in xt}, t + d)
    target = {k: (s_t[k] + s_td[k]) / 2 for k in s_t}
    pred = g(xt, t * 1000, cond, 2 * d * 1000)  # the shortcut is queried with step 2d
    expected = sum(W1[k] * mse(pred[k], target[k]) for k in x1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert float(parts["flow_matching_loss"]) == 0.0


def test_shortcut_flow_batch_is_flow_matching_at_d_zero():
    obj, batch, draws = objective_and_batch("shortcut-stage1", p_uncond=0.0, pointmap_dropout=0.0)
    draws.d = torch.zeros(2)
    loss, parts = obj(batch, draws)
    t, x0, x1 = draws.t, draws.noise, batch.target
    xt = {k: (1 - t[:, None, None]) * x0[k] + t[:, None, None] * x1[k] for k in x1}
    pred = obj.generator(xt, t * 1000, stage1_cond(obj, batch), torch.zeros(2))
    torch.testing.assert_close(loss, sum(W1[k] * mse(pred[k], x1[k] - x0[k]) for k in x1), rtol=1e-6, atol=1e-7)
    assert float(parts["self_consistency_loss"]) == 0.0


# --- the loss goes down on a fixed batch -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kw",
    [
        ("sft-stage1", {}),
        ("lora-stage1", {}),
        ("dpo-stage1", {"dpo_beta": 200.0}),
        ("shortcut-stage1", {"shortcut_prob": 1.0}),
        ("sft-stage2", {}),
        ("dpo-stage2", {"dpo_beta": 200.0}),
    ],
)
def test_loss_goes_down_on_a_fixed_batch(name, kw):
    obj, batch, draws = objective_and_batch(name, n=1, p_uncond=0.0, **kw)
    params = [p for p in obj.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2 if obj.cfg.params == "lora" else 1e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss, _ = obj(batch, draws)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], f"{name}: {losses}"


def test_the_image_blind_floor_is_zero_for_one_target_and_analytic_for_gaussian_targets():
    """blind_velocity_error: one target is known without looking (0); for x1 ~ N(0, I) the best blind velocity
    error per dimension is E_t[2 - (2t - 1)^2 / (t^2 + (1 - t)^2)] (jointly Gaussian v and x_t), t logit-normal."""
    assert blind_velocity_error(torch.full((5, 6), 0.7)) < 1e-12
    gen = torch.Generator().manual_seed(3)
    got = blind_velocity_error(torch.randn(4000, 3, generator=gen), samples=8192, seed=1)
    t = torch.sigmoid(torch.randn(400_000, generator=gen, dtype=torch.float64) - 1.0)
    want = float((2 - (2 * t - 1) ** 2 / (t**2 + (1 - t) ** 2)).mean())
    assert got == pytest.approx(want, abs=0.05)
    # two points +-(a, a): only the direction (1, 1) / sqrt(2) is uncertain, a 1D problem with x1 = +-A, A = a sqrt 2;
    # there E[x1 | x_t] = A tanh(A t x_t / (1 - t)^2) and v - E[v | x_t] = (x1 - E[x1 | x_t]) / (1 - t). Quadrature
    # over the logit-normal time and x0 (Gauss-Hermite), per dimension (/ 2), written independently of the code
    a = 3.0
    two = torch.cat([torch.full((50, 2), -a), torch.full((50, 2), a)])
    big_a = a * np.sqrt(2.0)
    z, wz = np.polynomial.hermite_e.hermegauss(80)  # nodes / weights for N(0, 1)
    t = 1 / (1 + np.exp(-(z - 1.0)))  # logit-normal, mean -1, std 1
    x0, w0 = z[None, :], wz[None, :] / wz.sum()
    tt = t[:, None]
    xt = tt * big_a + (1 - tt) * x0  # x1 = +A (the -A half is its mirror image)
    err = ((big_a - big_a * np.tanh(big_a * tt * xt / (1 - tt) ** 2)) / (1 - tt)) ** 2
    want = float((wz / wz.sum()) @ (err * w0).sum(1)) / 2
    assert blind_velocity_error(two, samples=16384, seed=2) == pytest.approx(want, rel=0.05)
    with pytest.raises(ValueError, match="at least 2"):
        blind_velocity_error(torch.zeros(1, 6))
