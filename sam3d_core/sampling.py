"""Stage-1 sampling as plain functions: time grid, CFG schedule, noise, Euler on dicts.

Convention (rectified flow): t = 0 is noise, t = 1 is data; the network sees t * time_scale.
Each Euler step evaluates the velocity at the left end of its interval:
    x <- x + v(x, t_i) * (t_{i+1} - t_i)
With guidance on, v = (1 + s) * v_cond - s * v_uncond, where the unconditional pass sees an all-zero
condition; s applies only where interval[0] <= t * time_scale <= interval[1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sam3d_core.config import SamplerConfig, SSFlowConfig
from sam3d_core.models.ss_flow import LATENT_NAMES, SSFlowModel, latent_shapes

Latents = dict[str, torch.Tensor]
VelocityFn = Callable[[Latents, float], Latents]


def time_grid(steps: int, rescale_t: float) -> torch.Tensor:
    """The stage-1 schedule, float64 [steps + 1] from 0 to 1: t = u / (1 + (r - 1)(1 - u)).

    u is numpy.linspace(0, 1, steps + 1) bit for bit (i * (1 / steps), last set to 1), and the
    rescale runs in float64, as the official ShortCut generator does (FlowMatching, stage 2, uses
    a float32 torch.linspace instead). r = 1 is the uniform grid; r > 1 spends more steps near t = 0.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r}; expected an int >= 1 (the number of Euler steps)")
    if not rescale_t > 0:
        raise ValueError(f"rescale_t={rescale_t!r}; expected a float > 0 (1.0 for a uniform grid)")
    u = [i * (1.0 / steps) for i in range(steps)] + [1.0]
    return torch.tensor([x / (1 + (rescale_t - 1) * (1 - x)) for x in u], dtype=torch.float64)


def cfg_strength_at(t: float, strength: float, interval: tuple[float, float], time_scale: float) -> float:
    """The guidance strength at time t: `strength` inside the interval (network units), else 0.

    The comparison uses the float32 network time, as the official code compares its time tensor.
    """
    t_net = torch.tensor(float(t) * time_scale, dtype=torch.float32).item()
    return float(strength) if interval[0] <= t_net <= interval[1] else 0.0


def stage1_noise(
    batch: int,
    cfg: SSFlowConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Latents:
    """Initial noise: one float32 randn per latent, drawn in sorted key order like the official optree map.

    Seeding the global generator and passing generator=None reproduces the official draws on the
    same device.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r}; expected an int >= 1")
    shapes = latent_shapes(cfg)
    return {
        name: torch.randn((batch, *shapes[name]), generator=generator, device=device, dtype=torch.float32)
        for name in sorted(shapes)
    }


def euler_sample(
    velocity_fn: VelocityFn,
    x: Latents,
    ts: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
) -> Latents:
    """Integrate dx/dt = velocity_fn(x, t) over the grid ts with Euler steps; the state stays float32."""
    x = {k: v.float() for k, v in x.items()}
    times = [float(t) for t in ts]
    n = len(times) - 1
    for i in range(n):
        t0, t1 = times[i], times[i + 1]
        v = velocity_fn(x, t0)
        x = {k: x[k] + v[k].float() * (t1 - t0) for k in x}
        if progress is not None:
            progress(i + 1, n)
    return x


def guided_velocity(
    model: SSFlowModel,
    x: Latents,
    t: torch.Tensor,
    cond: torch.Tensor,
    d: torch.Tensor | None,
    strength: float,
) -> Latents:
    """Reference CFG through SSFlowModel.forward: (1 + s) v(cond) - s v(cond * 0); v(cond) if s == 0."""
    v_cond = model(x, t, cond, d)
    if strength == 0:
        return v_cond
    v_uncond = model(x, t, cond * 0, d)
    return {k: (1 + strength) * v_cond[k] - strength * v_uncond[k] for k in v_cond}


def _resolve(
    model: SSFlowModel, sampler: SamplerConfig, shortcut: bool, steps: int | None, cfg_strength: float | None
) -> tuple[int, float, float]:
    """Steps, CFG strength and shortcut step size d (time units) for one run."""
    if shortcut and not model.cfg.is_shortcut_model:
        raise ValueError(
            "shortcut=True but the model has no d_embedder (is_shortcut_model=False); "
            "use shortcut=False or a shortcut checkpoint"
        )
    steps = steps if steps is not None else (sampler.shortcut_steps if shortcut else sampler.steps)
    strength = cfg_strength if cfg_strength is not None else (0.0 if shortcut else sampler.cfg_strength)
    if not strength >= 0:
        raise ValueError(f"cfg_strength={cfg_strength!r}; expected a float >= 0 (0 turns guidance off)")
    d = 1.0 / steps if shortcut else 0.0  # the official no-shortcut mode still feeds d = 0
    return steps, float(strength), d


@torch.no_grad()
def sample_stage1(
    model: SSFlowModel,
    cond: torch.Tensor,
    noise: Latents,
    sampler: SamplerConfig,
    shortcut: bool = False,
    steps: int | None = None,
    cfg_strength: float | None = None,
    use_fast_path: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Latents:
    """Denoise the stage-1 latents from `noise` (t = 0) to data (t = 1).

    cond: condition tokens [B, Nc, Cc]. noise: stage1_noise(...) or equal shapes.
    Default: sampler.steps (25) Euler steps on the rescaled grid, CFG sampler.cfg_strength (7) on
    sampler.cfg_interval, d = 0. shortcut=True (the distilled mode): sampler.shortcut_steps steps,
    CFG 0 unless cfg_strength is given, d = 1 / steps. use_fast_path=False runs the reference
    SSFlowModel.forward passes instead of the cached, batched fast path. Returns float32 latents.
    """
    # 1. validate and resolve the settings
    steps, strength, d = _resolve(model, sampler, shortcut, steps, cfg_strength)
    b = model.check_latents(noise)
    ts = time_grid(steps, sampler.rescale_t)
    device = noise["shape"].device
    d_net = None
    if model.cfg.is_shortcut_model:
        d_net = torch.full((b,), d * sampler.time_scale, dtype=torch.float32, device=device)

    # 2. the condition, once
    cache = model.prepare_condition(cond) if use_fast_path else None

    # 3. integrate
    def velocity(x: Latents, t: float) -> Latents:
        t_net = torch.full((b,), t * sampler.time_scale, dtype=torch.float32, device=device)
        s = cfg_strength_at(t, strength, sampler.cfg_interval, sampler.time_scale)
        if cache is not None:
            return model.forward_cfg(x, t_net, cache, d_net, s)
        return guided_velocity(model, x, t_net, cond, d_net, s)

    return euler_sample(velocity, {k: noise[k] for k in LATENT_NAMES}, ts, progress)
