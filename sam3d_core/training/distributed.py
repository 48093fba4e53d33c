"""One script on one device or under `torchrun` (DDP by default, FSDP2 `fully_shard` when asked).

    torchrun --nproc-per-node 8 -m sam3d_core.cli train run.toml                  # one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 --rdzv-id run1 -m sam3d_core.cli train run.toml   # two machines

No launcher of ours: torchrun starts the processes and sets RANK / WORLD_SIZE / LOCAL_RANK; `init` reads
them and joins the process group (NCCL on CUDA, gloo on CPU). Checkpoints are gathered into full tensors
(`torch.distributed.checkpoint.state_dict`), so a run saved on 8 GPUs resumes on 1 and the other way round;
every process reads the run folder, which must be on a file system they share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init(device: str = "") -> Dist:
    """Join torchrun's process group when there is one (WORLD_SIZE > 1); pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local)
    else:
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
        )
    return Dist(rank, world, local, dev)


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(objective: nn.Module, d: Dist, mode: str, block_types: tuple[type, ...]) -> nn.Module:
    """DDP (every process holds the whole model) or FSDP2 (`fully_shard` per transformer block, then the root).

    With one process the objective is returned as it is.
    """
    if not d.active:
        return objective
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in objective.modules():
            if isinstance(m, block_types):
                fully_shard(m)
        fully_shard(objective)
        return objective
    from torch.nn.parallel import DistributedDataParallel

    trainable_cond = any(p.requires_grad for p in objective.condition_embedder.parameters())
    return DistributedDataParallel(
        objective,
        device_ids=[d.device.index] if d.device.type == "cuda" else None,
        # a trainable condition embedder holds weights no forward uses (DINO's mask token)
        find_unused_parameters=trainable_cond,
    )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not isinstance(model, nn.ModuleDict) else model


def mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a tensor over the processes (the value itself with one process)."""
    if d.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world
    return value


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def broadcast_object(obj, d: Dist):
    """rank 0's Python object on every process (e.g. an error message to raise everywhere)."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
