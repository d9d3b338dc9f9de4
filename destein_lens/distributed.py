"""Data-parallel runs on torch.distributed: one process (rank) per device, as `torchrun` or
`accelerate launch` start them.

A launcher sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; `setup` joins the process group
(NCCL where CUDA is, gloo on CPUs). Work is cut into units that do not depend on the number of
ranks (fixed batches of prompts, heads), handed out round-robin by `share`; each rank writes its
own resumable shard and rank 0 merges. Results travel through the output folder, never through
collectives (those are barriers only), so every rank can read every shard: a multi-node run needs
its output folder on a filesystem all nodes share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import DesteinError

T = TypeVar("T")
# A rank waits at a barrier while the others finish their share: generous, since shares differ
# by at most one unit but a unit of a large model can be long.
BARRIER_TIMEOUT = timedelta(hours=2)


def launched() -> bool:
    """Whether a launcher started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> None:
    """Join the launcher's process group (once); a no-op for a plain single process."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    try:
        dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    except (RuntimeError, ValueError) as e:  # a bad MASTER_ADDR, a port in use, a missing variable
        raise DesteinError(f"cannot join the process group of this launch: {e}".splitlines()[0]) from None


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def joined() -> bool:
    """Whether this process has joined a launch's process group (`setup` ran)."""
    return dist.is_initialized()


def rank() -> int:
    """This process's rank; before `setup`, the one the launcher assigned."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one that merges shards, writes reports and prints."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    """Every rank reaches this point before any goes on (nothing in a single process)."""
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[local_rank()])
        else:
            dist.barrier()


def main_writes(write: Callable[[], object]) -> None:
    """Rank 0 writes a file every rank shares; the others wait until it is there."""
    if is_main():
        write()
    barrier()


def share(units: Sequence[T]) -> list[T]:
    """This rank's units: every world_size-th, starting at its rank."""
    return list(units[rank() :: world_size()])


def rank_device(device: str | None) -> str | None:
    """Under a launch with CUDA, the unspecified or bare "cuda" device is this rank's own GPU."""
    if launched() and torch.cuda.is_available() and device in (None, "cuda"):
        return f"cuda:{local_rank()}"
    return device
