"""Evaluation of checkpoints and teachers: samples in batches, FID against reference statistics, the results file
of `distill fid`. The protocol is explicit: which extractor, how many samples, which labels, which seed."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from distill.errors import DistillError

RESULTS_FILE = "fid_results.csv"
RESULT_FIELDS = ["path", "step", "model", "fid", "samples", "extractor", "seconds"]


def balanced_labels(n: int, num_classes: int | None, device) -> Tensor | None:
    """Labels 0, 1, ..., C-1, 0, 1, ...: every class equally often (the protocol for conditional models)."""
    if num_classes is None:
        return None
    return torch.arange(n, device=device) % num_classes


@torch.no_grad()
def generator_batches(generator: torch.nn.Module, shape: tuple[int, ...], num_classes: int | None, n: int,
                      batch_size: int, seed: int, device, start: int = 0) -> Iterator[Tensor]:
    """n one-step samples in batches, noise seeded by (seed, sample index): any split across ranks gives the same
    set. `start` is the index of the first sample (a rank's share starts there)."""
    for s in range(start, start + n, batch_size):
        b = min(batch_size, start + n - s)
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                         for i in range(s, s + b)]).to(device)
        labels = balanced_labels(s + b, num_classes, device)
        yield generator(z, labels[s:] if labels is not None else None).float()


@torch.no_grad()
def teacher_batches(teacher: torch.nn.Module, shape: tuple[int, ...], n: int, batch_size: int, steps: int,
                    guidance_scale: float, seed: int, device, start: int = 0) -> Iterator[Tensor]:
    """n teacher samples by `steps` DDIM steps, same noise and labels protocol as `generator_batches`."""
    from distill.teachers import ddim_sample

    num_classes = getattr(teacher, "num_classes", None)
    for s in range(start, start + n, batch_size):
        b = min(batch_size, start + n - s)
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                         for i in range(s, s + b)]).to(device)
        labels = balanced_labels(s + b, num_classes, device)
        yield ddim_sample(teacher, z, labels[s:] if labels is not None else None, steps=steps,
                          guidance_scale=guidance_scale).float()


def rank_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of rank's contiguous share of n samples."""
    counts = [n // world + (r < n % world) for r in range(world)]
    return sum(counts[:rank]), counts[rank]


def merge_stats(stats: dict) -> dict:
    """All-reduce feature statistics across the ranks of a process group: sums of x and of x x^T are added."""
    import numpy as np
    import torch.distributed as dist

    n = torch.tensor([float(stats["n"])], dtype=torch.float64)
    mu = torch.as_tensor(stats["mu"], dtype=torch.float64)
    sigma = torch.as_tensor(stats["sigma"], dtype=torch.float64)
    s1 = mu * n
    s2 = sigma * (n - 1) + n * torch.outer(mu, mu)
    for tensor in (n, s1, s2):
        dist.all_reduce(tensor)
    total = float(n)
    mean = s1 / total
    cov = (s2 - total * torch.outer(mean, mean)) / (total - 1)
    return {"mu": mean.numpy(), "sigma": np.asarray(0.5 * (cov + cov.T)), "n": int(total),
            "extractor_id": stats["extractor_id"]}


def list_checkpoint_files(path: str | Path) -> list[Path]:
    """A checkpoint file, or every step=*.ckpt in a folder (or in its checkpoints/ subfolder), oldest first."""
    from distill.callbacks import list_checkpoints

    path = Path(path)
    if path.is_file():
        return [path.resolve()]  # last.ckpt -> the step=*.ckpt it points at: one row per checkpoint
    if not path.is_dir():
        raise DistillError(f"{str(path)!r} does not exist; expected a checkpoint file or a folder of checkpoints "
                           f"(a run directory or its checkpoints/)")
    found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
    if not found:
        raise DistillError(f"{str(path)!r} holds no step=*.ckpt checkpoints; expected a run directory or its "
                           f"checkpoints/ folder")
    return found


def load_checkpoint_module(ckpt: Path, device="cpu"):
    """The DMD module of a checkpoint, with the config stored in it (or the run directory's config.yaml)."""
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise DistillError(f"checkpoint {str(ckpt)!r} cannot be loaded ({type(e).__name__}); expected a file "
                           f"written by `distill fit`") from None
    info = state.get("distill", {})
    if "config" in info:
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
            fh.write(info["config"])
        try:
            cfg = load_config(FitConfig, fh.name, ["eval.fid_ref=null"])
        finally:
            os.unlink(fh.name)
    else:
        run_cfg = ckpt.parent.parent / "config.yaml"
        if not run_cfg.is_file():
            raise DistillError(f"checkpoint {str(ckpt)!r} holds no config and {str(run_cfg)!r} does not exist; "
                               f"expected a checkpoint inside a run directory")
        cfg = load_config(FitConfig, run_cfg, ["eval.fid_ref=null"])
    module = DMDModule(cfg)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    return module.to(device).eval(), int(info.get("step", 0))


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def append_result(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESULT_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row[k] for k in RESULT_FIELDS})


def format_results(rows: list[dict]) -> str:
    lines = [f"{'checkpoint':<48} {'step':>8} {'model':>14} {'FID':>10} {'samples':>8} {'extractor':>28} {'s':>7}"]
    for r in rows:
        lines.append(f"{Path(r['path']).name:<48} {r['step']:>8} {r['model']:>14} {float(r['fid']):>10.3f} "
                     f"{r['samples']:>8} {r['extractor']:>28} {float(r['seconds']):>7.1f}")
    return "\n".join(lines)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
