"""Who am I in a multi-process launch? Rank, world size and device, with or without a launcher.

Order of precedence: explicit arguments, then an initialised ``torch.distributed`` process group, then
the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables that torchrun and the deepspeed launcher set,
then a single process (rank 0 of 1). Nothing here needs a GPU or initialises a process group.
"""

from __future__ import annotations

import os

import torch


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size), each taken from the argument when given, else from the environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        default_rank, default_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        default_rank = int(os.environ.get("RANK", 0))
        default_world = int(os.environ.get("WORLD_SIZE", 1))
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return rank, world_size


def local_device() -> torch.device:
    """This process's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
