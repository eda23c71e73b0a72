"""The processes of one run started by torchrun: which one this is, and their process group.

`torchrun --nproc-per-node N -m ffsolve run NAME ...` starts N copies of the command line, each
with RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT) in its environment. The
runner reads them with `launched()` before it makes anything: only rank 0 makes a run folder,
writes and prints; and for an experiment that runs over several processes it opens the group
with `process_group`: NCCL on CUDA with each rank on `cuda:LOCAL_RANK`, gloo on the CPU.
Without torchrun (no WORLD_SIZE) a run is one process, rank 0 of 1, and no group is made.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ffsolve.errors import FFSolveError

__all__ = ["Launch", "launched", "process_group"]


@dataclass(frozen=True)
class Launch:
    """Where this process stands among those of one run: rank (0: the one that writes),
    world size, and its rank on this host (its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise FFSolveError(f"${name} must be an integer (torchrun sets it), got {raw!r}") from None


def launched() -> Launch:
    """This process's rank, world size and local rank, as torchrun set them (rank 0 of 1 when
    it did not)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise FFSolveError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return Launch(rank, world, local)


@contextmanager
def process_group(device: torch.device, launch: Launch) -> Iterator[torch.device]:
    """The device this rank computes on, with the default process group open over the
    launch's ranks while the block runs (destroyed after it).

    With one process nothing is opened and `device` is returned as it is. With several, a
    CUDA device becomes `cuda:LOCAL_RANK` (made current) and the group is NCCL's; a CPU
    device keeps gloo. The group starts from torchrun's environment (`env://`).
    """
    if launch.world_size == 1:
        yield device
        return
    if device.type == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise FFSolveError(
                f"LOCAL_RANK {launch.local_rank} but torch sees {torch.cuda.device_count()} "
                "CUDA device(s): start at most one process per GPU"
            )
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if dist.is_initialized():  # a caller's own group (a test, a notebook): use it as it is
        yield device
        return
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size)
    try:
        yield device
    finally:
        dist.destroy_process_group()
