"""PyTorch's own distributed engine, as torchrun sets it up: one process per device.

Under ``torchrun --nproc_per_node N`` the environment names each process's RANK, LOCAL_RANK and
WORLD_SIZE; :func:`setup` joins the process group (gloo on CPU, nccl on GPU). A plain run is a
world of one and touches nothing distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..inference import resolve_device


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Only the main process (rank 0) writes files and prints."""
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Sum numbers across processes (identity in a world of one)."""
        if self.size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, rows: np.ndarray) -> np.ndarray | None:
        """On the main process, the ``rows`` of every process concatenated in rank order (``rows``
        in a world of one); None on the others. Every process must call it; each may hold a
        different number of rows."""
        if self.size == 1:
            return rows
        parts = [None] * self.size if self.main else None
        dist.gather_object(rows, parts, dst=0)
        return np.concatenate(parts) if self.main else None

    def average_gradients(self, params) -> None:
        """Average the gradients of ``params`` across processes (used where DDP is not wrapping)."""
        if self.size == 1:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.size


def setup(device: str) -> World:
    """Join the torchrun process group if there is one; pick this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return World(rank, size, chosen)


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
