"""The training objectives as plain functions over a velocity callable, with every random draw passed in.

Convention (the pipeline's, `pipeline/sampling.py`): t = 0 is noise, t = 1 is data, the network sees t * 1000.
    x_t = (1 - t) x0 + t x1,   v = x1 - x0                        (rectified flow, sigma_min = 0)

Flow matching (paper eq. 1; official `FlowMatching.loss`): sum over modalities m of
    lambda_m * mean((v_theta^m(x_t, c, t) - v^m)^2)
with the mean over the whole batch of that modality (`F.mse_loss(reduction="mean")`), so the stage-2 SLAT
loss averages over all voxels of the batch.

DPO (paper eq. 2-3, after Diffusion-DPO): per pair, with the same t and, in stage 1, the same noise,
    err(model, x) = sum_m lambda_m mean_over_elements((v^m - model^m(x_t))^2)   (per sample)
    Delta = [err(theta, w) - err(ref, w)] - [err(theta, l) - err(ref, l)]
    loss = -log sigmoid(-beta Delta)      (beta stands for beta * T * w(t) with a constant w)

Shortcut (paper eq. 4 and Algorithm 2; official `ShortCut.loss`): the model is queried with step 2d;
samples with d = 0 regress the flow velocity, samples with d > 0 the two-step average
    s_t = v(x_t, t, d); x' = x_t + d s_t; s_td = v(x', t + d, d); target = stopgrad((s_t + s_td) / 2)
where, on CFG batches, the shape latent's s uses (1 + w) v(c) - w v(0) (the pipeline's guidance form, as
the official code; Algorithm 2 writes v(0) + w (v(c) - v(0))).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

TIME_SCALE = 1000.0  # the network time unit (official time_scale)

Latents = dict[str, torch.Tensor]
# velocity(latents, t_net [B], cond [B, Nc, C], d_net [B] | None) -> latents (stage 1)
Velocity1 = Callable[[Latents, torch.Tensor, torch.Tensor, torch.Tensor | None], Latents]
# velocity(feats [N, 8], t_net [B], cond [B, Nc, C]) -> [N, 8] (stage 2; the voxel coords are bound)
Velocity2 = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_time(
    n: int, sampler: str, mean: float, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Training times [n] float32 in (0, 1): sigmoid(N(mean, std)) ("lognormal", official) or U(0, 1)."""
    if sampler == "lognormal":
        return torch.sigmoid(torch.randn(n, generator=generator) * std + mean)
    if sampler == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"time sampler {sampler!r}: expected 'lognormal' or 'uniform'")


def blind_velocity_error(
    targets: torch.Tensor, mean: float = -1.0, std: float = 1.0, samples: int = 4096, seed: int = 0
) -> float:
    """The flow-matching loss (mean squared error per dimension) of the best model that never looks at its
    condition: it knows only the distribution of the targets [N, D] (their empirical distribution) and predicts
    E[x1 - x0 | x_t], with x0 ~ N(0, I) and the logit-normal times of training (`mean`, `std`). A trained term at
    this value learnt nothing from the image; below it, the model reads the target from what it sees. Monte Carlo
    over `samples` draws (t, x1, x0); the posterior over the N targets is exact (x_t | x1 ~ N(t x1, (1 - t)^2 I))."""
    x = targets.detach().double().reshape(len(targets), -1)
    if len(x) < 2:
        raise ValueError(f"targets: got {len(x)} rows, expected at least 2")
    gen = torch.Generator().manual_seed(seed)
    t = torch.sigmoid(torch.randn(samples, generator=gen, dtype=torch.float64) * std + mean).clamp(max=1 - 1e-6)
    x1 = x[torch.randint(len(x), (samples,), generator=gen)]
    x0 = torch.randn(x1.shape, generator=gen, dtype=torch.float64)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    err = 0.0
    for lo in range(0, samples, 256):  # [chunk, N] posterior weights
        sl = slice(lo, lo + 256)
        tt = t[sl, None]
        sq = (xt[sl] ** 2).sum(1, keepdim=True) - 2 * tt * (xt[sl] @ x.T) + tt**2 * (x**2).sum(1)[None]
        d2 = sq / (2 * (1 - tt) ** 2)  # ||x_t - t x1_j||^2 / (2 (1 - t)^2) for every target j
        w = torch.softmax(-d2, dim=1)
        ex1 = w @ x
        ev = ex1 - (xt[sl] - tt * ex1) / (1 - tt)  # E[x1 - x0 | x_t], x0 = (x_t - t x1) / (1 - t)
        err += float(((x1[sl] - x0[sl] - ev) ** 2).sum())
    return err / x1.numel()


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (1 - t) x0 + t x1 and the target velocity x1 - x0; t [rows] broadcast over the other dims."""
    tb = _bcast(t, x1)
    return (1 - tb) * x0 + tb * x1, x1 - x0


def weighted_mse(pred: Latents, target: Latents, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """lambda_m * mean((pred_m - target_m)^2) per modality (the official per-modality loss terms)."""
    return {k: weights[k] * F.mse_loss(pred[k].float(), target[k].float()) for k in target}


def per_sample_error(pred: Latents, target: Latents, weights: dict[str, float]) -> torch.Tensor:
    """sum_m lambda_m * mean over each sample's elements of (pred_m - target_m)^2 -> [B]."""
    return sum(
        weights[k] * (pred[k].float() - target[k].float()).pow(2).flatten(1).mean(1) for k in target if weights[k]
    )


def segment_error(pred: torch.Tensor, target: torch.Tensor, obj: torch.Tensor, count: int) -> torch.Tensor:
    """Per-object mean squared error of rows [N, C] grouped by object index obj [N] -> [count]."""
    sq = (pred.float() - target.float()).pow(2).mean(1)  # [N]
    total = torch.zeros(count, device=sq.device).index_add_(0, obj, sq)
    rows = torch.bincount(obj, minlength=count).clamp_min(1)
    return total / rows


# --- flow matching ------------------------------------------------------------------------------------


def flow_matching_stage1(
    velocity: Velocity1,
    x1: Latents,
    x0: Latents,
    t: torch.Tensor,
    cond: torch.Tensor,
    weights: dict[str, float],
    d: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-1 loss (paper eq. 1) and its per-modality terms. d: [B] step sizes (zeros for a shortcut model's
    flow mode, as the official code feeds d = 0) or None for a model without a step embedder."""
    xt, v = {}, {}
    for k in x1:
        xt[k], v[k] = interpolate(x0[k], x1[k], t)
    pred = velocity(xt, t * TIME_SCALE, cond, None if d is None else d * TIME_SCALE)
    terms = weighted_mse(pred, v, weights)
    return sum(terms.values()), terms


def flow_matching_stage2(
    velocity: Velocity2, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, obj: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """Stage-2 loss: mean over every voxel feature of the batch; x1, x0 [N, 8], t [B], obj [N] object index."""
    xt, v = interpolate(x0, x1, t[obj])
    pred = velocity(xt, t * TIME_SCALE, cond)
    return F.mse_loss(pred.float(), v.float())


# --- DPO ----------------------------------------------------------------------------------------------


def dpo_loss(
    err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Paper eq. 2 from per-pair errors [B] of the trained model and of the reference (no gradient)."""
    delta = (err_w - ref_w.detach()) - (err_l - ref_l.detach())
    loss = -F.logsigmoid(-beta * delta).mean()
    return loss, {"dpo_delta": delta.detach().mean(), "dpo_accuracy": (delta < 0).float().mean().detach()}


# --- shortcut -----------------------------------------------------------------------------------------


@torch.no_grad()
def shortcut_target(
    velocity: Velocity1,
    xt: Latents,
    t: torch.Tensor,
    d: torch.Tensor,
    cond: torch.Tensor,
    cfg_strength: float,
    use_cfg: bool,
    cfg_keys: tuple[str, ...] = ("shape",),
) -> Latents:
    """The self-consistency target of samples with step d > 0 (two guided steps of d, averaged)."""

    def guided(x: Latents, tt: torch.Tensor) -> Latents:
        s = velocity(x, tt * TIME_SCALE, cond, d * TIME_SCALE)
        if use_cfg:
            u = velocity(x, tt * TIME_SCALE, cond * 0, d * TIME_SCALE)
            s = dict(s)
            for k in cfg_keys:
                s[k] = (1 + cfg_strength) * s[k] - cfg_strength * u[k]
        return s

    s_t = guided(xt, t)
    x_td = {k: xt[k] + s_t[k] * _bcast(d, xt[k]) for k in xt}
    s_td = guided(x_td, t + d)
    return {k: ((s_t[k] + s_td[k]) / 2).detach() for k in s_t}


def shortcut_loss(
    velocity: Velocity1,
    x1: Latents,
    x0: Latents,
    t: torch.Tensor,
    d: torch.Tensor,
    cond: torch.Tensor,
    teacher_cond: torch.Tensor,
    weights: dict[str, float],
    cfg_strength: float,
    use_cfg: bool,
    sc_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Paper eq. 4: flow matching on samples with d = 0, self-consistency at step 2d on samples with d > 0.

    cond: the condition of the trained pass (with the CFG dropout); teacher_cond: the full condition the
    targets are computed with (the official target passes use p_unconditional = 0 and 1).
    """
    xt, v = {}, {}
    for k in x1:
        xt[k], v[k] = interpolate(x0[k], x1[k], t)
    pred = velocity(xt, t * TIME_SCALE, cond, 2 * d * TIME_SCALE)
    zero = pred["shape"].new_zeros(())
    fm, sc = (d == 0).nonzero().squeeze(1), (d > 0).nonzero().squeeze(1)
    fm_loss, sc_loss = zero, zero
    if fm.numel():
        fm_loss = sum(
            weighted_mse({k: p[fm] for k, p in pred.items()}, {k: x[fm] for k, x in v.items()}, weights).values()
        )
    if sc.numel():
        target = shortcut_target(
            velocity, {k: x[sc] for k, x in xt.items()}, t[sc], d[sc], teacher_cond[sc], cfg_strength, use_cfg
        )
        sc_loss = sum(weighted_mse({k: p[sc] for k, p in pred.items()}, target, weights).values())
    total = fm_loss + sc_weight * sc_loss
    return total, {"flow_matching_loss": fm_loss.detach(), "self_consistency_loss": sc_loss.detach()}
