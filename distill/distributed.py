"""The process group: the few collectives distill uses outside Lightning, and the one way every process leaves.

Why `teardown` exists: Lightning destroys the default process group at exit only for NCCL. A gloo group left alive
at interpreter exit is torn down during static destruction, where a still-joinable gloo thread makes the C++
runtime call std::terminate ("terminate called without an active exception", pytorch/pytorch#190489): a job that
finished its work then ends FAILED under srun. Every command therefore leaves through `teardown()` (distill.cli
calls it in a `finally`), which destroys the group while the interpreter is whole.
"""

from __future__ import annotations

import os

import torch


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_mean(values: list[float]) -> list[float]:
    """The mean over ranks of each value (identity without a process group)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return (t / torch.distributed.get_world_size()).cpu().tolist()


def init_from_env(device: str = "auto") -> tuple[int, int, torch.device | None]:
    """(rank, world, device) for a command launched by torchrun or srun with WORLD_SIZE > 1, (0, 1, None) when
    launched alone. `device` is the command's --device: auto takes one GPU per process (cuda:LOCAL_RANK, NCCL) when
    CUDA is visible and the CPU (gloo) otherwise; cpu keeps every process on the CPU (gloo) even where GPUs are
    visible, so an explicit choice is never overridden; cuda or cuda:N take the GPU of LOCAL_RANK (the launcher
    gives each process its own)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    cuda = torch.cuda.is_available() if device == "auto" else torch.device(device).type == "cuda"
    if not is_distributed():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(chosen)
    return torch.distributed.get_rank(), world, chosen


def teardown() -> None:
    """Destroy the default process group, if any (a no-op otherwise; safe to call twice)."""
    if is_distributed():
        torch.distributed.destroy_process_group()
