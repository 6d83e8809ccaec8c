"""Measured costs c_u (generator forward + its backward) and c_i (one inner draw) for the accounting (docs/method.md §5:
"measured FLOPs (torch.utils.flop_counter) for reproducible accounting, wall time for reality")."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call fn(*args, **kwargs), as counted by torch.utils.flop_counter (matmuls and convolutions,
    including any backward that fn runs). Deterministic, device independent."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _sync() -> None:
    # a closure may hold CUDA tensors that we cannot see, so synchronise whenever CUDA is in use at all
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_call(fn, *args, repeats: int = 5, warmup: int = 1, **kwargs) -> float:
    """Median wall time in seconds of fn(*args, **kwargs) over `repeats` calls after `warmup` untimed ones."""
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
    for _ in range(warmup):
        fn(*args, **kwargs)
    seconds = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn(*args, **kwargs)
        _sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)
