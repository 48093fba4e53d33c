"""`train(config)`: the one training loop, for both stages, every objective, full or LoRA, 1 or N processes.

    from sam3d_core.training import recipe, train
    result = train(recipe("lora-stage1", data=("captures/samples",), output="runs/props", steps=2000).check())
    result.weights      # a weights folder: sam3d reconstruct --model runs/props/weights ...

The recipe: 1. check the configuration and the run folder; 2. open the data; 3. build the model (base weights,
freezing or LoRA, gradient checkpointing, DDP / FSDP); 4. optimizer, warm-up + cosine schedule, EMA; 5. resume
from the newest checkpoint when asked; 6. the steps: micro-batches (bf16 autocast on CUDA), gradient clipping,
NaN stop, optimizer + EMA update, metrics, validation, checkpoints; 7. export the weights folder + model card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sam3d_core.config import to_dict
from sam3d_core.data.sample import SampleError, read_manifest
from sam3d_core.models.slat_flow import SLatTransformerBlock
from sam3d_core.models.ss_flow import MoTBlock
from sam3d_core.training import checkpoint, distributed, memory, output
from sam3d_core.training.config import ConfigError, TrainConfig, to_mapping
from sam3d_core.training.data import Collate, MicroBatches, device_batches, global_indices, open_dataset
from sam3d_core.training.objective import Objective, draw
from sam3d_core.training.params import apply_freeze
from sam3d_core.weights.store import CheckpointError, models_dir

BLOCKS = (MoTBlock, SLatTransformerBlock)
RUN_FILE = "run.json"
Progress = Callable[[dict], None]


class TrainingError(RuntimeError):
    """Training stopped (a non-finite loss); the message names the last good checkpoint and what to change."""


@dataclass
class TrainResult:
    weights: Path | None  # the exported weights folder (None on processes other than rank 0)
    steps: int
    loss: float  # the last step's loss
    run_dir: Path
    paused: bool = False  # stopped at `stop_after_s` with a checkpoint: call again with resume=True to go on


# --- 1. the run folder ---------------------------------------------------------------------------------


def _check_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    run = Path(cfg.output)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"output = {run} is a file; name a folder for the run")
    if run.is_dir() and any(run.iterdir()):
        if not (run / RUN_FILE).is_file():
            raise ConfigError(f"output = {run} is not empty and holds no sam3d run; choose a new or empty folder")
        if not resume:
            raise ConfigError(
                f"output = {run} already holds a run; pass --resume to continue it, or choose another folder"
            )
    if cfg.install and (models_dir() / cfg.model_name).exists():
        raise ConfigError(f"install = true: a model named {cfg.model_name!r} exists already; set another name")
    if not os.access(run.parent if not run.exists() else run, os.W_OK) and run.parent.exists():
        raise ConfigError(f"output = {run}: the folder is not writable")
    return run


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


# --- 3. the model --------------------------------------------------------------------------------------


def load_base(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """The stage model with the base weights on the CPU, and {"name", "folder", "digest"} of the base."""
    from sam3d_core.models.stages import Stage1Model, Stage2Model, init_random_weights
    from sam3d_core.registry import stage1_preset, stage2_preset

    cls = Stage1Model if cfg.stage == 1 else Stage2Model
    if cfg.base == "random":
        model_cfg = (stage1_preset if cfg.stage == 1 else stage2_preset)(cfg.preset)
        model_cfg = _with_step_embedder(cfg, model_cfg)
        model = init_random_weights(cls(model_cfg), cfg.seed)
        return model, {"name": f"random:{cfg.preset}", "folder": None, "digest": f"random:{cfg.preset}:{cfg.seed}"}
    from sam3d_core.weights import hub

    loader = hub.load_stage1_state if cfg.stage == 1 else hub.load_stage2_state
    model_cfg, state, digest = loader(cfg.base)
    new_cfg = _with_step_embedder(cfg, model_cfg)
    with torch.device("meta"):
        model = cls(new_cfg)
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    if missing:  # only the new step embedder of a shortcut run may be missing
        _init_step_embedder(model, missing)
    return model, {"name": cfg.base, "folder": str(hub.resolve_model_dir(cfg.base)), "digest": digest}


def _with_step_embedder(cfg: TrainConfig, model_cfg):
    if cfg.objective != "shortcut" or model_cfg.flow.is_shortcut_model:
        return model_cfg
    if cfg.params == "lora":
        raise ConfigError("the base model has no step-size embedder; shortcut distillation of it needs params = 'full'")
    return dataclasses.replace(model_cfg, flow=dataclasses.replace(model_cfg.flow, is_shortcut_model=True))


def _init_step_embedder(model: nn.Module, missing: list[str]) -> None:
    """Paper C.4: a new step-size embedder starts with its last layer at zero (it adds nothing at first)."""
    if any(not k.startswith("generator.d_embedder.") for k in missing):
        raise CheckpointError(f"the base weights lack {missing[:4]}; they do not match this model")
    emb = model.generator.d_embedder
    emb.to_empty(device="cpu")
    with torch.no_grad():
        for m in emb.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        emb.mlp[-1].weight.zero_()


def build_objective(cfg: TrainConfig, stage_model: nn.Module) -> Objective:
    """Freezing or LoRA, the DPO reference, gradient checkpointing: the module the loop trains."""
    obj = Objective(stage_model, cfg)
    if cfg.params == "full":
        apply_freeze(obj, cfg.freeze, cfg.stage)
        if cfg.objective == "dpo":
            obj.make_frozen_reference()
    else:
        from sam3d_core.training.lora import apply_lora

        obj.requires_grad_(False)
        obj.generator = apply_lora(obj.generator, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if not any(p.requires_grad for p in obj.condition_embedder.parameters()):
        obj.condition_embedder.eval()
    if cfg.grad_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(obj.generator, check_fn=lambda m: isinstance(m, BLOCKS))
    return obj


def _signature(cfg: TrainConfig, obj: Objective, base: dict) -> dict:
    names = sorted((n, tuple(p.shape)) for n, p in obj.named_parameters() if p.requires_grad)
    model_json = json.dumps(to_dict(obj.model_cfg), sort_keys=True, default=str)
    return {
        "stage": cfg.stage,
        "model_config": hashlib.sha256(model_json.encode()).hexdigest()[:16],
        "base_weights": base["digest"],
        "params": cfg.params,
        "trained_tensors": hashlib.sha256(repr(names).encode()).hexdigest()[:16],
    }


# --- 4. optimizer, schedule, EMA -----------------------------------------------------------------------


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class EMA:
    """An exponential moving average of the trained parameters (float32, on their device)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """name -> full CPU tensor (sharded FSDP parameters are gathered: a collective, call on every rank)."""
        out = {}
        for n, s in zip(self.names, self.shadow, strict=True):
            out[n] = (s.full_tensor() if hasattr(s, "full_tensor") else s).cpu()
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for n, s in zip(self.names, self.shadow, strict=True):
            src = state[n]
            if hasattr(s, "to_local"):  # FSDP: keep this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(s.device), s.device_mesh, s.placements).to_local()
                s.to_local().copy_(src)
            else:
                s.copy_(src)


def _clean(name: str) -> str:
    """A parameter name without wrapper prefixes (DDP `module.`, activation-checkpoint wrappers)."""
    name = name.replace("._checkpoint_wrapped_module", "")
    return name.removeprefix("module.")


# --- 6. helpers of the steps ---------------------------------------------------------------------------


def _seed(cfg_seed: int, step: int, micro: int) -> int:
    """The seed of one micro-batch's random draws: a function of (seed, step, global micro-batch index) only."""
    return (cfg_seed * 1_000_003 + step) * 4099 + micro


class Metrics:
    """metrics.jsonl (always) and TensorBoard (when installed), written by rank 0."""

    def __init__(self, run: Path, enabled: bool):
        self.enabled = enabled
        self.path = run / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _run_micro(model, batch, draws, device, cfg, sync_ctx, accum: int) -> tuple[torch.Tensor, dict]:
    """Forward + backward of one micro-batch; the loss is scaled for gradient accumulation."""
    batch, draws = batch.to(device), draws.to(device)
    with sync_ctx:
        with _autocast(cfg, device):
            loss, parts = model(batch, draws)
        (loss / accum).backward()
    return loss.detach().float(), parts


def _first_sample(batch, draws, stage: int):
    """The micro-batch cut to its first sample (to measure one sample's activations)."""
    if stage == 1:
        target = {k: v[:1] for k, v in batch.target.items()}
        rejected = None if batch.rejected is None else {k: v[:1] for k, v in batch.rejected.items()}
        noise = {k: v[:1] for k, v in draws.noise.items()}
    else:
        keep = batch.target["coords"][:, 0] == 0
        target = {k: v[keep] for k, v in batch.target.items()}
        noise = {"chosen": draws.noise["chosen"][keep.to(draws.noise["chosen"].device)]}
        rejected = None
        if batch.rejected is not None:
            rkeep = batch.rejected["coords"][:, 0] == 0
            rejected = {k: v[rkeep] for k, v in batch.rejected.items()}
            noise["rejected"] = draws.noise["rejected"][rkeep.to(draws.noise["rejected"].device)]
    one = dataclasses.replace(
        batch, views={k: v[:1] for k, v in batch.views.items()}, target=target, rejected=rejected, ids=batch.ids[:1]
    )
    one_draws = dataclasses.replace(
        draws, t=draws.t[:1], noise=noise, keep_cond=draws.keep_cond[:1], keep_pointmap=draws.keep_pointmap[:1],
        d=draws.d[:1],
    )  # fmt: skip
    return one, one_draws


def _oom_message(model, batch, draws, device, cfg, d, micro: int, footprint: memory.Footprint) -> str:
    """After an out-of-memory error: measure one sample's activations and name the setting that fits."""
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    per_sample = None
    try:
        one, one_draws = _first_sample(batch, draws, cfg.stage)
        _run_micro(model, one, one_draws, device, cfg, contextlib.nullcontext(), 1)
        per_sample = torch.cuda.max_memory_allocated(device) - base
    except torch.OutOfMemoryError:
        per_sample = None
    model.zero_grad(set_to_none=True)
    total = torch.cuda.get_device_properties(device).total_memory
    return memory.fit_advice(
        total,
        footprint.static // (d.world if cfg.distributed == "fsdp" and d.active else 1),
        per_sample,
        micro,
        cfg.batch_size,
        d.world,
        lora=cfg.params == "lora",
        checkpointing=cfg.grad_checkpointing,
        fsdp=cfg.distributed == "fsdp" and d.active,
        device_name=torch.cuda.get_device_name(device),
    )


# --- the loop ------------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    stop_after_s: float | None = None,
    end_after_s: float | None = None,
) -> TrainResult:
    """Run the training `config` describes (also under torchrun); returns where the weights went.

    `stop_after_s`: leave after the first step that ends this many seconds after the call began, with a checkpoint
    of that step (result.paused; no export): a run split over several time-limited sessions, each resuming.
    `end_after_s`: end the run after the first step that ends this many seconds after the call began, and export
    the weights of that step (a time-boxed run; the model card records the steps done).
    """
    cfg = config.check()
    d = distributed.init(cfg.device)
    try:
        return _train(cfg, d, resume, progress, stop_after_s, end_after_s)
    finally:
        distributed.shutdown(d)


def _train(
    cfg: TrainConfig,
    d: distributed.Dist,
    resume: bool,
    progress: Progress | None,
    stop_after_s: float | None = None,
    end_after_s: float | None = None,
) -> TrainResult:
    t_call = time.perf_counter()
    # 1. the configuration against this launch, and the run folder
    micro = cfg.micro_batch or max(1, cfg.batch_size // d.world)
    if cfg.batch_size % (micro * d.world):
        raise ConfigError(
            f"batch_size = {cfg.batch_size} is not a multiple of micro_batch ({micro}) x processes ({d.world}); "
            f"choose batch_size = {micro * d.world * max(1, round(cfg.batch_size / (micro * d.world)))}"
        )
    accum = cfg.batch_size // (micro * d.world)
    run = _check_run_dir(cfg, resume)

    # every draw outside the per-micro-batch generators (peft's adapter initialisation, LoRA dropout) is seeded
    random.seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)
    torch.manual_seed(cfg.seed * 1000 + d.rank)  # DDP then copies rank 0's initial weights to the others

    # 2. data (the first sample is converted now: a missing target fails before the model loads)
    train_ds = open_dataset(cfg.data, "data", cfg.seed)
    val_ds = open_dataset(cfg.val_data, "val_data", cfg.seed + 1) if cfg.val_data else None
    stage_model, base = load_base(cfg)
    collate = Collate(stage_model.cfg, cfg.stage, pairs=cfg.objective == "dpo")
    # render-pack views made on the training device (view_device): the loader's processes then only draw scenes
    on_device = device_batches(cfg.view_device, train_ds, stage_model.cfg, d.device, cfg.stage, cfg.objective == "dpo")
    if on_device is None:
        collate([train_ds[0]])
    else:
        on_device(on_device.collate([on_device.source[0]]))
    distributed.barrier(d)
    if d.main:  # the run folder is made once the inputs are known to be usable
        run.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(run / RUN_FILE, {"format": "sam3d-train-run", "config": to_mapping(cfg)})

    # 3. the model
    obj = build_objective(cfg, stage_model)
    fp = memory.footprint(obj, ema=cfg.ema_decay > 0)
    if d.device.type == "cuda":
        total = torch.cuda.get_device_properties(d.device).total_memory
        fsdp = cfg.distributed == "fsdp" and d.active
        msg = memory.static_advice(total, fp, d.world, fsdp, cfg.params == "lora", torch.cuda.get_device_name(d.device))
        if msg:
            raise memory.GPUTooSmall(msg)
    obj.to(d.device)
    signature = _signature(cfg, obj, base)
    model = distributed.wrap(obj, d, cfg.distributed, BLOCKS)
    named = [(_clean(n), p) for n, p in model.named_parameters() if p.requires_grad]

    # 4. optimizer, schedule, EMA
    optimizer = torch.optim.AdamW(
        [p for _, p in named], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=1e-8
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    ema = EMA(named, cfg.ema_decay) if cfg.ema_decay > 0 else None
    sd_opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)

    # 5. resume
    start, elapsed, last, restore_rng = 0, 0.0, {}, None
    ckpt = checkpoint.latest(run) if resume else None
    if ckpt is not None:
        state, trainable, ema_state, opt_state, restore_rng = checkpoint.load(ckpt, signature)
        set_model_state_dict(model, trainable, options=StateDictOptions(full_state_dict=True, strict=False))
        # strict=False: a trained tensor that never got a gradient (DINO's unused mask token) has no AdamW state
        set_optimizer_state_dict(
            model, optimizer, opt_state["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False)
        )
        scheduler.load_state_dict(opt_state["scheduler"])
        if ema is not None and ema_state is not None:
            ema.load(ema_state)
        start, elapsed, last = state.step, state.elapsed_s, state.metrics

    metrics = Metrics(run, d.main)
    loader = torch.utils.data.DataLoader(
        MicroBatches(
            on_device.source if on_device else train_ds, on_device.collate if on_device else collate,
            start=start, steps=cfg.steps, batch_size=cfg.batch_size,
            micro=micro, rank=d.rank, world=d.world, seed=cfg.seed,
        ),
        batch_size=None,
        num_workers=cfg.num_workers,
        prefetch_factor=2 if cfg.num_workers else None,
    )  # fmt: skip
    params = [p for _, p in named]
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    def save(step: int) -> None:
        trainable = get_model_state_dict(model, options=sd_opts)
        opt = {
            "optimizer": get_optimizer_state_dict(model, optimizer, options=sd_opts),
            "scheduler": scheduler.state_dict(),
        }
        ema_full = ema.full_state() if ema is not None else None
        error = None
        if d.main:
            st = checkpoint.RunState(step, step * cfg.batch_size, signature, last, elapsed)
            try:
                checkpoint.save(run, st, trainable, ema_full, opt, cfg.keep_checkpoints)
            except checkpoint.DiskFullError as e:
                error = str(e)
        error = distributed.broadcast_object(error, d)
        if error:
            metrics.write({"event": "disk_full", "step": step, "message": error})
            raise checkpoint.DiskFullError(28, error)

    # 6. the steps
    loss_value = float("nan")
    it = iter(loader)  # draws a seed from the global generator, in the first run as in a resumed one
    if restore_rng is not None:
        restore_rng()
    t_start = time.perf_counter() - elapsed
    t_window, n_window = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=d.device)
        parts_sum: dict[str, torch.Tensor] = {}
        for a in range(accum):
            batch = next(it)
            if on_device is not None:
                batch = on_device(batch)  # PlanBatch -> Batch, rendered and preprocessed on d.device
            m = a * d.world + d.rank
            draws = draw(cfg, obj.model_cfg, batch, torch.Generator().manual_seed(_seed(cfg.seed, step, m)))
            sync = contextlib.nullcontext() if (a == accum - 1 or not ddp) else model.no_sync()
            try:
                loss, parts = _run_micro(model, batch, draws, d.device, cfg, sync, accum)
            except torch.OutOfMemoryError:
                if step != start:
                    raise
                loss = None  # measured below, once the failed pass's tensors are released
            if loss is None:
                raise memory.GPUTooSmall(_oom_message(model, batch, draws, d.device, cfg, d, micro, fp))
            total_loss += loss / accum
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0) + v.float() / accum
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if cfg.grad_clip > 0
            else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        )
        if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm of sharded gradients is a DTensor
            grad_norm = grad_norm.full_tensor()
        stats = distributed.mean(torch.stack([total_loss, grad_norm.float().to(d.device)]), d)
        loss_value, norm_value = (float(x) for x in stats.tolist())
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            good = checkpoint.latest(run)
            msg = (
                f"training stopped at step {step + 1}: the loss became {loss_value} (gradient norm {norm_value}); "
                f"the weights of that step were not applied. "
                + (f"The last good checkpoint is {good}. " if good else "No checkpoint was saved before it. ")
                + f"Lower lr (now {cfg.lr}) or check the samples of this step ({', '.join(batch.ids[:4])}), then "
                + ("resume with --resume." if good else "start again.")
            )
            metrics.write({"event": "nan", "step": step + 1, "loss": loss_value, "message": msg})
            metrics.close()
            raise TrainingError(msg)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update()
        done = step + 1
        n_window += cfg.batch_size
        elapsed = time.perf_counter() - t_start
        rate = n_window / max(time.perf_counter() - t_window, 1e-9)
        last = {"loss": loss_value, **{k: float(distributed.mean(v.reshape(()), d)) for k, v in parts_sum.items()}}
        if d.main and progress is not None:
            eta = (cfg.steps - done) * cfg.batch_size / max(rate, 1e-9)
            progress({"step": done, "steps": cfg.steps, "loss": loss_value, "samples_per_s": rate, "eta_s": eta})
        if done % cfg.log_every == 0 or done == cfg.steps or done == start + 1:
            record = {"step": done, **last, "lr": scheduler.get_last_lr()[0], "grad_norm": norm_value}
            record.update({"samples_per_s": rate, "elapsed_s": elapsed})
            if d.device.type == "cuda":
                record["peak_memory_gb"] = torch.cuda.max_memory_allocated(d.device) / memory.GiB
            metrics.write(record)
            t_window, n_window = time.perf_counter(), 0
        if val_ds is not None and cfg.val_every and done % cfg.val_every == 0:
            last["val_loss"] = _validate(model, obj, val_ds, collate, cfg, d, micro)
            metrics.write({"step": done, "val_loss": last["val_loss"]})
        if cfg.eval_every and done % cfg.eval_every == 0:
            last.update(_evaluate(cfg, model, ema, base, run, d, metrics, done))
        saved = done % cfg.save_every == 0 or done == cfg.steps
        if saved:
            save(done)
        if stop_after_s is not None and done < cfg.steps:
            out_of_time = time.perf_counter() - t_call >= stop_after_s
            if distributed.broadcast_object(out_of_time, d):  # every rank stops at the same step
                if not saved:
                    save(done)
                metrics.write({"event": "paused", "step": done, "elapsed_s": elapsed})
                metrics.close()
                return TrainResult(None, done, loss_value, run, paused=True)
        if end_after_s is not None and done < cfg.steps:
            if distributed.broadcast_object(time.perf_counter() - t_call >= end_after_s, d):
                if not saved:
                    save(done)
                metrics.write({"event": "ended", "step": done, "planned_steps": cfg.steps, "elapsed_s": elapsed})
                break

    # 7. export
    done = step + 1 if cfg.steps > start else start
    weights = _export(cfg, model, ema, base, run, d, train_ds_info(cfg), done, elapsed, last)
    metrics.write({"event": "done", "step": done, "weights": str(weights) if weights else None})
    metrics.close()
    return TrainResult(weights, done, loss_value, run)


@torch.no_grad()
def _validate(model, obj, val_ds, collate, cfg: TrainConfig, d: distributed.Dist, micro: int) -> float:
    """The mean loss over val_batches fixed batches (fixed samples and draws: comparable across steps)."""
    model.eval()
    total = torch.zeros((), device=d.device)
    for i in range(cfg.val_batches):
        idx = global_indices(len(val_ds), i, micro * d.world, cfg.seed + 1)[d.rank * micro : (d.rank + 1) * micro]
        batch = collate([val_ds[j] for j in idx])
        draws = draw(cfg, obj.model_cfg, batch, torch.Generator().manual_seed(_seed(cfg.seed + 1, i, d.rank)))
        with _autocast(cfg, d.device):
            loss, _ = model(batch.to(d.device), draws.to(d.device))
        total += loss.float() / cfg.val_batches
    model.train()
    return float(distributed.mean(total, d))


def train_ds_info(cfg: TrainConfig) -> list[dict]:
    from sam3d_core.data.pack import is_pack

    out = []
    for folder in cfg.data:
        if is_pack(folder):
            meta = json.loads((Path(folder) / "pack.json").read_text())
            out.append({"folder": str(folder), "samples": "rendered on the fly", "licences": meta.get("licences", {})})
            continue
        try:
            m = read_manifest(folder)
        except SampleError:
            continue
        out.append({"folder": str(folder), "samples": m.get("samples", 0), "licences": m.get("licences", {})})
    return out


def _trained_state(model, ema: EMA | None) -> dict[str, torch.Tensor]:
    """The weights to export: the EMA when on, else the current ones (full tensors; call on every rank)."""
    if ema is not None:
        return ema.full_state()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=opts)


def _export(cfg, model, ema, base, run: Path, d, data_info, steps, elapsed, last, folder_name="weights") -> Path | None:
    """Rank 0 writes run/<folder_name> (and installs it when asked); every rank joins the gathers."""
    trained = _trained_state(model, ema)
    if not d.main:
        distributed.barrier(d)
        return None
    stage_model, _ = load_base(cfg)
    adapter = None
    if cfg.params == "lora":
        from sam3d_core.training.lora import apply_lora, merge

        peft_model = apply_lora(
            stage_model.generator, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets
        )
        peft_state = {k.removeprefix("generator."): v for k, v in trained.items()}
        missing = set(peft_state) - set(peft_model.state_dict())
        if missing:
            raise CheckpointError(f"adapter tensors {sorted(missing)[:3]} do not fit the LoRA model")
        peft_model.load_state_dict(peft_state, strict=False)
        if cfg.lora_merge:
            stage_model.generator = merge(peft_model)
        else:
            adapter = peft_model
    else:
        unexpected = stage_model.load_state_dict(trained, strict=False).unexpected_keys
        if unexpected:
            raise CheckpointError(f"trained tensors {unexpected[:3]} are not weights of the stage-{cfg.stage} model")
    card = output.model_card(
        cfg.model_name, to_mapping(cfg), base, data_info, steps, steps * cfg.batch_size,
        torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu", d.world, elapsed,
        {k: v for k, v in last.items() if isinstance(v, (int, float))},
    )  # fmt: skip
    training = {"config": to_mapping(cfg), "base": base, "steps": steps, "device_time_s": elapsed * d.world}
    state = None if adapter is not None else stage_model.state_dict()
    weights = output.write_weights(
        run, folder_name, cfg.stage, stage_model.cfg, state, base, card, training, adapter=adapter, overwrite=True
    )
    if cfg.install and folder_name == "weights":
        import shutil

        from sam3d_core.weights.store import staged_folder

        with staged_folder(models_dir(), cfg.model_name, overwrite=False) as tmp:
            shutil.copytree(weights, tmp, dirs_exist_ok=True)
    distributed.barrier(d)
    return weights


def _evaluate(cfg, model, ema, base, run: Path, d, metrics: Metrics, step: int) -> dict:
    """Export the current weights and run `sam3d eval` (sam3d_core.evaluation) on eval_data with them: the
    overall means of the paper's metrics go to the metrics log as eval_<metric>."""
    from sam3d_core.evaluation.run import EvalSettings, evaluate, make_predictors, open_dataset

    if d.main:  # one evaluated copy of the weights at a time (each is the size of the model)
        import shutil

        for old in run.glob("eval-*"):
            shutil.rmtree(old, ignore_errors=True)
    folder = _export(cfg, model, ema, base, run, d, train_ds_info(cfg), step, 0.0, {}, folder_name=f"eval-{step:06d}")
    if not d.main:
        return {}
    if not (folder / "stage1.json").is_file():  # a stage-2 run without a base model: nothing places the object
        why = "the exported weights have no stage 1 (set base_model to evaluate a stage-2 run)"
        metrics.write({"event": "eval_skipped", "step": step, "why": why})
        return {}
    settings = EvalSettings(device=str(next(model.parameters()).device)).check()
    result = evaluate(open_dataset(cfg.eval_data), make_predictors([str(folder)], settings), settings)
    overall = result["models"][0]["aggregates"]["overall"]
    scores = {f"eval_{k}": float(v) for k, v in overall.items() if isinstance(v, (int, float))}
    metrics.write({"step": step, **scores})
    return scores
