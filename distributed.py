"""Distributed training helpers: this process's place in a torchrun job and small collectives
(rank 0 of 1, and no-ops, when run directly)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run directly)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0



def init_distributed(device_name: str) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)



def all_mean(values: torch.Tensor, ddp: Dist) -> torch.Tensor:
    """Average a small tensor over the processes of the job."""
    if ddp.world == 1:
        return values
    import torch.distributed as dist
    values = values.clone()
    dist.all_reduce(values)
    return values / ddp.world



def gather_objects(obj, ddp: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if ddp.world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * ddp.world
    dist.all_gather_object(out, obj)
    return out


def shutdown(ddp: Dist) -> None:
    """Leave the process group (torchrun jobs)."""
    if ddp.world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
