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

from sam3d_core.config import SamplerConfig, SSFlowConfig, Stage2Config
from sam3d_core.models.slat_flow import SLatFlowModel, SLatGrids
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


class FlowGraphs:
    """CUDA graphs of `SSFlowModel.forward_cfg` for one (batch, condition length), one per CFG strength.

    At batch 1 an evaluation of the MoT launches ~2,400 small kernels, so eager stage 1 is bound by
    Python and launch overhead, not by the GPU. Capturing the evaluation once and replaying it each step
    runs the same kernels on the same values (the result is identical to eager). The condition K/V is
    written into the graphs' static cache by `set_condition`; the inputs are copied in at each call.
    """

    def __init__(self, model: SSFlowModel, batch: int, num_cond_tokens: int, device: torch.device | str):
        self.model = model
        self.key = (batch, num_cond_tokens)
        self.x = {k: torch.zeros((batch, *s), device=device) for k, s in latent_shapes(model.cfg).items()}
        self.t = torch.zeros(1, device=device)  # one time for the whole batch (see sample_stage1)
        self.d = torch.zeros(1, device=device) if model.cfg.is_shortcut_model else None
        self.cache = model.empty_condition_cache(batch, num_cond_tokens, device)
        self.graphs: dict[float, tuple[torch.cuda.CUDAGraph, Latents]] = {}
        self.pool = None  # one memory pool shared by every captured strength

    def set_condition(self, cond: torch.Tensor) -> None:
        self.model.prepare_condition(cond, out=self.cache)

    def _capture(self, strength: float) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy initialisation must happen outside the capture
            for _ in range(2):
                self.model.forward_cfg(self.x, self.t, self.cache, self.d, strength)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model.forward_cfg(self.x, self.t, self.cache, self.d, strength)
        self.pool = graph.pool()
        self.graphs[strength] = (graph, out)

    def __call__(self, x: Latents, t_net: torch.Tensor, d_net: torch.Tensor | None, strength: float) -> Latents:
        for k, v in x.items():
            self.x[k].copy_(v)
        self.t.copy_(t_net)
        if self.d is not None and d_net is not None:
            self.d.copy_(d_net)
        if strength not in self.graphs:
            self._capture(strength)
        graph, out = self.graphs[strength]
        graph.replay()
        return {k: v.clone() for k, v in out.items()}


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
    graphs: FlowGraphs | None = None,
) -> Latents:
    """Denoise the stage-1 latents from `noise` (t = 0) to data (t = 1).

    cond: condition tokens [B, Nc, Cc]. noise: stage1_noise(...) or equal shapes.
    Default: sampler.steps (25) Euler steps on the rescaled grid, CFG sampler.cfg_strength (7) on
    sampler.cfg_interval, d = 0. shortcut=True (the distilled mode): sampler.shortcut_steps steps,
    CFG 0 unless cfg_strength is given, d = 1 / steps. use_fast_path=False runs the reference
    SSFlowModel.forward passes instead of the cached, batched fast path. `graphs` (CUDA only) replays
    captured graphs of the fast path instead of launching its kernels one by one. Returns float32 latents.
    """
    # 1. validate and resolve the settings
    steps, strength, d = _resolve(model, sampler, shortcut, steps, cfg_strength)
    b = model.check_latents(noise)
    ts = time_grid(steps, sampler.rescale_t)
    device = noise["shape"].device
    # One network time (and step size) for the whole batch, shape [1]: the model computes the time embedding
    # once and broadcasts it, so each object's result is the same as when it is sampled alone.
    d_net = None
    if model.cfg.is_shortcut_model:
        d_net = torch.full((1,), d * sampler.time_scale, dtype=torch.float32, device=device)

    # 2. the condition, once
    if graphs is not None:
        if graphs.model is not model or graphs.key != (b, cond.shape[1]):
            raise ValueError(f"graphs were captured for {graphs.key} (batch, tokens), not {(b, cond.shape[1])}")
        graphs.set_condition(cond)
    cache = model.prepare_condition(cond) if use_fast_path and graphs is None else None

    # 3. integrate
    def velocity(x: Latents, t: float) -> Latents:
        t_net = torch.full((1,), t * sampler.time_scale, dtype=torch.float32, device=device)
        s = cfg_strength_at(t, strength, sampler.cfg_interval, sampler.time_scale)
        if graphs is not None:
            return graphs(x, t_net, d_net, s)
        if cache is not None:
            return model.forward_cfg(x, t_net, cache, d_net, s)
        return guided_velocity(model, x, t_net, cond, d_net, s)

    return euler_sample(velocity, {k: noise[k] for k in LATENT_NAMES}, ts, progress)


# --- stage 2 ----------------------------------------------------------------------------------------


def slat_time_grid(steps: int, rescale_t: float = 1.0) -> torch.Tensor:
    """The stage-2 (FlowMatching) schedule, float32 [steps + 1] from 0 to 1.

    torch.linspace(0, 1, steps + 1) in float32, then t / (1 + (r - 1)(1 - t)) in float32, as the
    official generator computes it; r = 1 (the pipeline's value) leaves the uniform grid unchanged.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r}; expected an int >= 1 (the number of Euler steps)")
    if not rescale_t > 0:
        raise ValueError(f"rescale_t={rescale_t!r}; expected a float > 0 (1.0 for a uniform grid)")
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float32)
    return t / (1 + (rescale_t - 1) * (1 - t))


def stage2_noise(
    num_voxels: int,
    channels: int = 8,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Initial SLAT noise [N, channels] float32: the same draws as the official randn (1, N, channels)."""
    if not isinstance(num_voxels, int) or num_voxels < 0:
        raise ValueError(f"num_voxels={num_voxels!r}; expected an int >= 0 (the rows of the coords)")
    return torch.randn((1, num_voxels, channels), generator=generator, device=device, dtype=torch.float32)[0]


def denormalize_slat(feats: torch.Tensor, cfg: Stage2Config) -> torch.Tensor:
    """Sampled (normalised) SLAT feats [N, C] -> decoder space: feats * slat_std + slat_mean."""
    if feats.ndim != 2 or feats.shape[1] != len(cfg.slat_mean):
        raise ValueError(f"feats has shape {tuple(feats.shape)}, expected (N, {len(cfg.slat_mean)})")
    mean = torch.tensor(cfg.slat_mean, dtype=feats.dtype, device=feats.device)
    std = torch.tensor(cfg.slat_std, dtype=feats.dtype, device=feats.device)
    return feats * std + mean


@torch.no_grad()
def sample_stage2(
    model: SLatFlowModel,
    cond: torch.Tensor,
    coords: torch.Tensor,
    noise: torch.Tensor,
    sampler: SamplerConfig,
    steps: int | None = None,
    cfg_strength: float | None = None,
    use_fast_path: bool = True,
    progress: Callable[[int, int], None] | None = None,
    grids: SLatGrids | None = None,
) -> torch.Tensor:
    """Denoise the SLAT feats of the voxels `coords` [N, 4] from `noise` [N, 8] (t = 0) to data (t = 1).

    cond: condition tokens [B, Nc, Cc], one row per object of coords' batch column. Default (a
    Stage2Config's sampler): 25 Euler steps on the uniform float32 grid, CFG strength 1 where
    t * 1000 lies in [0, 500], the unconditional pass with cond * 0. use_fast_path=False runs the
    reference SLatFlowModel.forward passes. Returns normalised float32 feats [N, 8]; see
    denormalize_slat.
    """
    # 1. validate and resolve the settings
    steps = steps if steps is not None else sampler.steps
    strength = float(cfg_strength if cfg_strength is not None else sampler.cfg_strength)
    if not strength >= 0:
        raise ValueError(f"cfg_strength={cfg_strength!r}; expected a float >= 0 (0 turns guidance off)")
    ts = slat_time_grid(steps, sampler.rescale_t)
    grids = grids if grids is not None else model.build_grids(coords, cond.shape[0])
    if grids.fine.coords.shape != coords.shape:
        raise ValueError(f"grids were built for {tuple(grids.fine.coords.shape)} coords, not {tuple(coords.shape)}")

    # 2. the condition, once
    cache = model.prepare_condition(cond) if use_fast_path else None

    # 3. integrate
    def velocity(x: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
        t_net = torch.full((1,), t * sampler.time_scale, dtype=torch.float32, device=noise.device)  # shared
        s = cfg_strength_at(t, strength, sampler.cfg_interval, sampler.time_scale)
        if cache is not None:
            return {"slat": model.forward_cfg(x["slat"], t_net, cache, grids, s)}
        v = model(x["slat"], coords, t_net, cond, grids)
        if s != 0:
            v = (1 + s) * v - s * model(x["slat"], coords, t_net, cond * 0, grids)
        return {"slat": v}

    return euler_sample(velocity, {"slat": noise}, ts, progress)["slat"]
