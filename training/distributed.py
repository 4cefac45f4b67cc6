"""Process groups under ``torchrun`` (NCCL on GPU, gloo on CPU) and a gather that carries gradients."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, local rank, and the group used for feature gathers."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # noqa: ANN401 (a torch ProcessGroup)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world > 1


def launched_by_torchrun() -> bool:
    """True when WORLD_SIZE > 1 is set (torchrun, or another launcher setting the same variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL for CUDA, gloo for CPU); one process: no group."""
    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # a group of its own, so feature gathers in backward never interleave with DDP's gradient buckets
    group = dist.new_group(backend=dist.get_backend())
    return DistInfo(rank, world, local_rank, group)


def shutdown(info: DistInfo) -> None:
    """Leave the process group (no-op for one process)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in forward; in backward, every rank's gradient of the gathered tensor is summed and
    each rank keeps its own slice (so a loss term on any rank reaches the features that made it)."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: ANN001, ANN205
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.size = dist.get_rank(group), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size], None


def gather(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """(b, ...) on each rank -> (world * b, ...) in rank order; differentiable when ``x`` needs grad."""
    if not info.enabled:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherWithGrad.apply(x, info.group)
    parts = [torch.empty_like(x) for _ in range(info.world)]
    dist.all_gather(parts, x.contiguous(), group=info.group)
    return torch.cat(parts, dim=0)


def max_across(value: int, info: DistInfo, device: torch.device) -> int:
    """The largest ``value`` over all ranks."""
    if not info.enabled:
        return value
    t = torch.tensor([value], device=device, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.group)
    return int(t.item())


def sum_across(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise sum over ranks of a detached tensor (for logging)."""
    if not info.enabled:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=info.group)
    return values


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:  # noqa: ANN401
    """Picklable ``obj`` of every rank, in rank order (e.g. the report texts of a global batch)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj, group=info.group)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:  # noqa: ANN401
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=info.group)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.enabled:
        dist.barrier(group=info.group)
