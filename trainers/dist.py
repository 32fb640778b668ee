"""The one module of trainers/ that talks to torch.distributed.

Whoever launches the processes (Ray Train, torchrun, or nobody) sets up the process group;
the trainer reads rank and world size from it and works unchanged in one plain process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context(use_gpu: bool | None = None) -> DistContext:
    """Rank, world size and device of this process (world 1 without a process group)."""
    gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(torch.cuda.current_device()) if gpu else 0
    else:
        rank, world, local = 0, 1, 0
    device = torch.device("cuda", local) if gpu else torch.device("cpu")
    return DistContext(rank, world, local, device)


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP on more than one process; SyncBatchNorm on GPUs (it does not run on CPU/gloo)."""
    if ctx.world_size == 1:
        return model
    if ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[ctx.device.index])
    return DistributedDataParallel(model)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (identity in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all processes."""
    return all_reduce_sum(tensor) / _world_size()


def all_reduce_mean_own_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over processes, differentiated as this process's own / world size.

    What an in-place all_reduce (which autograd passes straight through) then / world size gives
    (U2PL's train_semi.py:514-519). Identity in one process.
    """
    world = _world_size()
    if world == 1:
        return tensor
    # t − t.detach() is exactly zero: the value is the reduced mean, the gradient the own one / world.
    return (all_reduce_sum(tensor.detach()) + tensor - tensor.detach()) / world


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated along dim 0 in rank order (identity in one process).

    The processes' row counts may differ: the counts travel first, then the rows padded to the longest.
    """
    world = _world_size()
    if world == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    rows = torch.cat(counts).tolist()
    if max(rows) == 0:
        return tensor
    padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:n] for part, n in zip(gathered, rows, strict=True)])


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_buffers(module: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    Plain per-process BatchNorm (gloo/CPU) lets running statistics drift apart; evaluating with
    rank 0's makes the reported mIoU the mIoU of the checkpoint rank 0 saves.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, 0)


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def collective_timeout() -> timedelta | None:
    """How long a collective of this process's default process group waits (None without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.distributed_c10d._get_default_group()
    # The launcher's `timeout=` lives on the backend's options; torch has no public getter for it.
    return group._get_backend(context().device).options._timeout
