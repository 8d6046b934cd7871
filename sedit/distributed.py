"""Rank-aware helpers that also work on one GPU or a CPU with no launcher.

Launchers differ in what they set: ``deepspeed``/``torchrun`` set RANK, LOCAL_RANK and WORLD_SIZE
(``deepspeed`` also appends ``--local_rank``); SLURM's ``srun`` sets SLURM_PROCID, SLURM_LOCALID
and SLURM_NTASKS, which ``torch.distributed`` does not read. ``env_from_slurm`` maps the latter
onto the former so every entry point sees one convention.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist


def env_from_slurm(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT derived from SLURM variables, where unset."""
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env or "RANK" in env:
        return {}
    out = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
    }
    if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
        ).stdout.split()
        out["MASTER_ADDR"] = hosts[0]
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def apply_launcher_env(local_rank_arg: int | None = None) -> None:
    """Bring SLURM variables and a ``--local_rank`` argument into the RANK/LOCAL_RANK convention."""
    os.environ.update(env_from_slurm())
    if local_rank_arg is not None and local_rank_arg >= 0 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank_arg)


def describe_ranks() -> list[dict[str, str]]:
    """Every rank's view of the launch (rank, world size, master, node), gathered (collective)."""
    view = {k: os.environ.get(k, "") for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    view["node"] = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    return gather_objects(view)


def gather_objects(obj) -> list:
    """[obj of rank 0, rank 1, ...] from every rank (collective); [obj] without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only, flushed (SLURM logs stay readable)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def device() -> torch.device:
    """This rank's device: its GPU under a launcher, else the CPU."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def start() -> torch.device:
    """Join the launcher's process group on this rank's device and return the device.

    The GPU is bound first: NCCL collectives (``all_gather_object`` included) run on the current CUDA
    device, and a rank that has not bound its own GPU sends from cuda:0, which NCCL refuses.
    """
    import deepspeed

    here = device()
    if here.type == "cuda":
        torch.cuda.set_device(here)
    deepspeed.init_distributed(dist_backend="nccl" if here.type == "cuda" else "gloo")
    return here


def cpu_allreduce_buffer() -> Path:
    """The shared-memory file that DeepSpeed's CPU all-reduce keeps for this rank.

    DeepSpeed 0.19.8 (``ops/csrc/cpu/comm/shm.cpp``) creates it when all ranks run on one machine,
    named after the user id, MASTER_ADDR, MASTER_PORT and the rank, and never removes it: each
    multi-process CPU run would leave ~69 MB per rank in /dev/shm until the machine restarts.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank()}"


def stop() -> None:
    """Leave the process group (before interpreter shutdown, where teardown order is not ours) and
    remove this rank's CPU all-reduce buffer. Every rank mapped the others' buffers while joining, and a
    mapping outlives its file's name, so removing the names then takes nothing from a running peer."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    buffer = cpu_allreduce_buffer()
    dist.destroy_process_group()
    buffer.unlink(missing_ok=True)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
