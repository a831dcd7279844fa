"""Data-parallel training under ``torchrun`` (gloo on the CPU, NCCL on CUDA)
for the training chapter.

``torchrun --nproc_per_node=N -m feedback_lib.training ...`` starts N
processes with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set. Each process
takes its rows of the same global batch and DistributedDataParallel averages
the gradients, so N processes follow the single-process run with the same
global batch (up to the order of floating-point sums).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: ``rank`` of ``world_size`` processes
    (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This process's rows of a global batch of ``batch`` rows."""
        if batch % self.world_size:
            raise ValueError(
                f"the global batch of {batch} rows does not split evenly "
                f"over {self.world_size} processes; choose batch_tokens so "
                "that it does"
            )
        per = batch // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over all processes (itself when not
        distributed)."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is True in some process (itself when not
        distributed), so that all processes take the same decision;
        ``device`` is the run's (NCCL reduces CUDA tensors, gloo CPU
        ones)."""
        if not self.enabled:
            return flag
        on = device if device.type == "cuda" else "cpu"
        value = torch.tensor(float(flag), device=on)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` for the training step: in a distributed run wrapped in
        DistributedDataParallel, which averages the gradients over the
        processes during the backward pass; else ``model`` itself."""
        if not self.enabled:
            return model
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
        )


def launched() -> Distributed:
    """This process's place as torchrun's environment variables give it
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), without joining the
    process group; not distributed without them."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    return Distributed(
        int(os.environ["RANK"]),
        world_size,
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def start(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by torchrun; returns this
    process's place and device. On CUDA each process uses GPU ``LOCAL_RANK``
    (an explicit ``cuda:N`` only names the device type)."""
    place = launched()
    if not place.enabled:
        return place, device
    if device.type == "cuda":
        device = torch.device("cuda", place.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(
            "distributed training runs on CUDA (nccl) or the CPU (gloo), "
            f"not {device.type}"
        )
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return place, device


def stop() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()
