"""Will it fit? The memory of a training setting, and the setting that would fit when it does not.

Static memory (before any activation): every parameter in its storage dtype, plus, per trained parameter,
its gradient (4 bytes), AdamW's two moments (8) and the EMA copy (4, when on). FSDP divides all of it by the
number of processes. Activations are measured: when the first step runs out of memory, the loop measures one
sample's activations and `fit_advice` names the largest micro-batch that fits, or the setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

GiB = 1024**3
HEADROOM = 0.92  # the allocator's fragmentation and the CUDA context take the rest


class GPUTooSmall(RuntimeError):
    """The chosen setting does not fit the GPU; the message names a setting that does."""


@dataclass(frozen=True)
class Footprint:
    weights: int  # bytes of every parameter and buffer
    trained: int  # number of trained parameters
    ema: bool

    @property
    def static(self) -> int:
        return self.weights + self.trained * (4 + 8 + (4 if self.ema else 0))


def footprint(model: nn.Module, ema: bool) -> Footprint:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Footprint(weights, trained, ema)


def fit_advice(
    total: int,
    static: int,
    per_sample: int | None,
    micro_batch: int,
    batch_size: int,
    world: int,
    *,
    lora: bool,
    checkpointing: bool,
    fsdp: bool,
    device_name: str = "the GPU",
) -> str:
    """One paragraph: why the setting does not fit `total` bytes and which setting would.

    static: bytes held before activations (per process); per_sample: measured activation bytes of one
    sample (None when even one sample did not fit, or was not measured).
    """
    usable = total * HEADROOM
    head = (
        f"micro_batch = {micro_batch} does not fit on {device_name} ({total / GiB:.0f} GiB): the weights, gradients "
        f"and optimizer state take {static / GiB:.1f} GiB"
    )
    if per_sample is not None and static + per_sample <= usable:
        fit = max(1, int((usable - static) // per_sample))
        fit = max(1, min(fit, micro_batch - 1))
        accum = -(-batch_size // (fit * world))
        return (
            f"{head} and one sample's activations {per_sample / GiB:.1f} GiB. micro_batch = {fit} fits: set "
            f"micro_batch = {fit} (batch_size = {batch_size} is kept by accumulating {accum} micro-batches"
            + ("" if batch_size % (fit * world) == 0 else "; choose a batch_size divisible by micro_batch x processes")
            + ")"
            + ("" if checkpointing else ", or set grad_checkpointing = true to fit more samples per pass")
            + "."
        )
    options = []
    if not checkpointing:
        options.append("grad_checkpointing = true (recompute activations in the backward pass)")
    if not lora and static > 0.3 * usable:
        options.append("params = 'lora' (trains adapters only: no full-size gradients or optimizer state)")
    if not fsdp and static > 0.5 * usable:  # FSDP shards weights and optimizer state, not activations
        n = max(2, -(-int(static) // int(max(usable - (per_sample or 0), 1))) + 1)
        options.append(f"shard the model over {n}+ GPUs: torchrun --nproc-per-node {n} ... with distributed = 'fsdp'")
    if not options:
        options.append("fewer voxels or tokens per sample, or a GPU with more memory")
    what = f"one sample's activations ({per_sample / GiB:.1f} GiB)" if per_sample is not None else "one sample"
    return f"{head}, and {what} does not fit on top of them even at micro_batch = 1. Use " + "; or ".join(options) + "."


def static_advice(total: int, fp: Footprint, world: int, fsdp: bool, lora: bool, device_name: str) -> str | None:
    """A message when the static memory alone exceeds the GPU (checked before anything is allocated)."""
    static = fp.static / (world if fsdp else 1)
    if static <= total * HEADROOM:
        return None
    return fit_advice(
        total, int(static), None, 1, 1, world, lora=lora, checkpointing=True, fsdp=fsdp, device_name=device_name
    )
