"""Evaluation of checkpoints and teachers: samples in batches, FID against reference statistics, the results file
of `distill fid`. The protocol is explicit: which extractor, how many samples, which labels, which seed."""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from distill.conditions import Condition
from distill.errors import DistillError
from distill.runs import PROTOCOL_SEED, list_checkpoints

RESULTS_FILE = "fid_results.csv"
RESULT_FIELDS = ["path", "step", "model", "fid", "samples", "extractor", "seconds", "ref", "ref_sha", "seed",
                 "teacher_steps", "guidance", "prompt_accuracy"]
# What a row's number depends on: a row equal to a new evaluation in all of these is not computed again. The
# reference counts by content (ref_sha), not by file name (ref). Rows written before these columns existed have
# blanks there and match nothing, so they are computed again.
CACHE_KEY = ("path", "model", "samples", "extractor", "ref_sha", "seed", "teacher_steps", "guidance")


def protocol_inputs(shape: tuple[int, ...], condition: Callable[[Tensor], Condition | None] | None, n: int,
                    batch_size: int, seed: int, device, start: int = 0, draws: int = 1
                    ) -> Iterator[tuple[Tensor, Condition | None]]:
    """(z, condition) for samples start .. start + n - 1 in batches: noise seeded by (seed, sample index) and the
    condition a function of the sample index (`condition(indices)`: balanced labels, or prompts in turn), so any
    split across ranks gives the same set (the evaluation protocol). z is (B, *shape); with `draws` > 1 it is
    (B, draws, *shape): a multi-step student's starting noise and its re-noising draws, all from the sample's seed
    (the first draw is the one-step protocol's z)."""
    for s in range(start, start + n, batch_size):
        b = min(batch_size, start + n - s)
        size = shape if draws == 1 else (draws, *shape)
        z = torch.stack([torch.randn(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                         for i in range(s, s + b)]).to(device)
        yield z, (condition(torch.arange(s, s + b)) if condition is not None else None)


@torch.no_grad()
def generator_batches(generator: torch.nn.Module, shape: tuple[int, ...],
                      condition: Callable[[Tensor], Condition | None] | None, n: int, batch_size: int, seed: int,
                      device, start: int = 0, decode: Callable[[Tensor], Tensor] | None = None) -> Iterator[Tensor]:
    """n student samples (one step, or the generator's steps) in batches on the protocol of `protocol_inputs`;
    `start` is the index of the first sample (a rank's share starts there); `decode` turns latents into images."""
    steps = getattr(generator, "steps", 1)
    for z, cond in protocol_inputs(shape, condition, n, batch_size, seed, device, start, draws=steps):
        x = (generator(z, cond) if steps == 1 else generator(z[:, 0], cond, noise=z[:, 1:])).float()
        yield decode(x) if decode is not None else x


@torch.no_grad()
def teacher_batches(teacher: torch.nn.Module, shape: tuple[int, ...],
                    condition: Callable[[Tensor], Condition | None] | None, n: int, batch_size: int, steps: int,
                    guidance_scale: float, seed: int, device, start: int = 0,
                    decode: Callable[[Tensor], Tensor] | None = None) -> Iterator[Tensor]:
    """n teacher samples by `steps` DDIM steps, on the same protocol as `generator_batches`."""
    from distill.teachers import ddim_sample

    for z, cond in protocol_inputs(shape, condition, n, batch_size, seed, device, start):
        x = ddim_sample(teacher, z, cond, steps=steps, guidance_scale=guidance_scale).float()
        yield decode(x) if decode is not None else x


def rank_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of rank's contiguous share of n samples."""
    counts = [n // world + (r < n % world) for r in range(world)]
    return sum(counts[:rank]), counts[rank]


def merge_stats(stats: dict) -> dict:
    """All-reduce feature statistics across the ranks of a process group: sums of x and of x x^T are added.
    Under NCCL the sums travel on this rank's GPU (NCCL reduces CUDA tensors only; as distributed.all_mean)."""
    import numpy as np
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([float(stats["n"])], dtype=torch.float64)
    mu = torch.as_tensor(stats["mu"], dtype=torch.float64)
    sigma = torch.as_tensor(stats["sigma"], dtype=torch.float64)
    sums = [n, mu * n, sigma * (n - 1) + n * torch.outer(mu, mu)]
    sums = [t.to(dev) for t in sums]
    for tensor in sums:
        dist.all_reduce(tensor)
    n, s1, s2 = (t.cpu() for t in sums)
    total = float(n)
    mean = s1 / total
    cov = (s2 - total * torch.outer(mean, mean)) / (total - 1)
    return {"mu": mean.numpy(), "sigma": np.asarray(0.5 * (cov + cov.T)), "n": int(total),
            "extractor_id": stats["extractor_id"]}


def list_checkpoint_files(path: str | Path) -> list[Path]:
    """A checkpoint file, or every step=*.ckpt in a folder (or in its checkpoints/ subfolder), oldest first."""
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
    return [p.resolve() for p in found]  # as for a file: the same row key from any cwd and either way of naming it


def read_checkpoint(ckpt: str | Path) -> dict:
    """What `distill fit` saved in a checkpoint; one line for anything else (missing, truncated, foreign)."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise DistillError(f"checkpoint {str(ckpt)!r} cannot be loaded ({type(e).__name__}); expected a file "
                           f"written by `distill fit`") from None
    if not isinstance(state, dict) or "state_dict" not in state or "distill" not in state:
        raise DistillError(f"checkpoint {str(ckpt)!r} holds no distill training state; expected a file written "
                           f"by `distill fit`")
    return state


def load_checkpoint_module(ckpt: Path, device="cpu", teacher: str | None = None):
    """The DMD module of a checkpoint, with the config stored in it (or the run directory's config.yaml);
    `teacher` replaces the run's teacher folder (see `_moved_paths`)."""
    from distill.module import DMDModule

    state = read_checkpoint(ckpt)
    info = state["distill"]
    text = info["config"] if "config" in info else _run_config_text(ckpt)
    cfg = _config_from_text(text, ["eval.fid_ref=null", *_moved_paths(ckpt, text, teacher)])
    module = DMDModule(cfg)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    return module.to(device).eval(), int(info.get("step", 0))


def _run_config_text(ckpt: Path) -> str:
    run_cfg = ckpt.parent.parent / "config.yaml"
    if not run_cfg.is_file():
        raise DistillError(f"checkpoint {str(ckpt)!r} holds no config and {str(run_cfg)!r} does not exist; "
                           f"expected a checkpoint inside a run directory")
    return run_cfg.read_text()


def _config_from_text(text: str, overrides: list[str]):
    import tempfile

    from distill.config import FitConfig, load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(text)
    try:
        return load_config(FitConfig, fh.name, overrides, read_data=False)
    finally:
        os.unlink(fh.name)


def _moved_paths(ckpt: Path, text: str, teacher: str | None) -> list[str]:
    """Overrides that let a checkpoint load away from where it was made. Runs made before absolute paths were
    stored keep folders relative to the directory they ran in, and teachers move: `teacher` (--teacher) replaces
    the teacher folder, and a stored one that is gone is named with that hint. Evaluation reads no shards, so the
    config is loaded with `read_data=False` and a data folder that is gone does not matter."""
    import json

    import yaml

    try:
        stored = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return []  # load_config names what is wrong with it
    kind, path = (stored.get("teacher") or {}).get("kind", "diffusers"), (stored.get("teacher") or {}).get("path")
    out = []
    if teacher is not None:
        if kind != "diffusers":
            raise DistillError(f"--teacher {teacher!r}: checkpoint {str(ckpt)!r} distils the {kind} teacher, which "
                               f"has no folder; expected no --teacher")
        out.append(f"teacher.path={json.dumps(os.path.abspath(teacher))}")  # JSON quotes are YAML quotes
    elif kind == "diffusers" and not (path and os.path.isdir(path)):
        where = "" if path is None or os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise DistillError(f"checkpoint {str(ckpt)!r} was made with teacher folder {path!r}, which does not exist"
                           f"{where}; expected the teacher there, or --teacher FOLDER naming where it is now")
    return out


# --------------------------------------------------------------------------------------------------------------
# The results file


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def cache_key(row: dict) -> tuple[str, ...]:
    """The CACHE_KEY fields of a row as the CSV holds them (strings; blank where missing)."""
    return tuple("" if row.get(k) is None else str(row[k]) for k in CACHE_KEY)


def append_result(path: Path, row: dict) -> None:
    """Append a row. A file with an older header is first rewritten (temp file + rename) with RESULT_FIELDS plus
    any columns of its own, its rows keeping blanks in the new columns."""
    header = _header(path)
    if header is not None and set(RESULT_FIELDS) <= set(header):
        with open(path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=header, restval="").writerow({k: row.get(k, "") for k in header})
        return
    fields = RESULT_FIELDS + [k for k in header or [] if k not in RESULT_FIELDS]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows([*read_results(path), row])
    os.replace(tmp, path)


def _header(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return next(csv.reader(fh), None)


def format_results(rows: list[dict]) -> str:
    accuracy = any(r.get("prompt_accuracy") not in (None, "") for r in rows)  # a column only when there is one
    lines = [f"{'checkpoint':<48} {'step':>8} {'model':>14} {'FID':>10} {'samples':>8} {'extractor':>28} "
             f"{'ref':>12} {'seed':>5} {'s':>7}" + (f" {'prompt acc':>10}" if accuracy else "")]
    for r in rows:
        acc = r.get("prompt_accuracy")
        lines.append(f"{Path(r['path']).name:<48} {r['step']:>8} {r['model']:>14} {float(r['fid']):>10.3f} "
                     f"{r['samples']:>8} {r['extractor']:>28} {r.get('ref_sha') or '':>12} "
                     f"{r.get('seed') or '':>5} {float(r['seconds']):>7.1f}"
                     + (f" {float(acc) if acc not in (None, '') else float('nan'):>10.4f}" if accuracy else ""))
    return "\n".join(lines)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------------------
# `distill fid`: every checkpoint of a run (or the teacher) against reference statistics.


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """auto (a GPU when there is one) or a device this machine has: one line otherwise, not torch's `Torch not
    compiled with CUDA enabled` at the first tensor moved."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise DistillError(f"{flag} {name!r}: expected cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistillError(f"{flag} {name}: no CUDA device here; expected cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DistillError(f"{flag} {name}: this machine has {count} CUDA device(s); expected cuda:0 to "
                               f"cuda:{count - 1}, cpu or auto")
    return dev


def check_fid_options(ref: str, num_samples: int, batch_size: int, teacher_steps: int | None,
                      teacher: str | None) -> None:
    """The options of `distill fid` that need no checkpoint, checked before anything runs or is written."""
    if num_samples < 2:
        raise DistillError(f"--num-samples {num_samples}: expected an integer >= 2")
    if batch_size < 1:
        raise DistillError(f"--batch-size {batch_size}: expected an integer >= 1")
    if teacher_steps is not None and teacher_steps < 1:
        raise DistillError(f"--teacher-steps {teacher_steps}: expected an integer >= 1 (DDIM steps)")
    if not Path(ref).is_file():
        raise DistillError(f"--ref {ref!r} does not exist; expected reference statistics from `distill stats`")
    if teacher is not None and not Path(teacher).is_dir():
        raise DistillError(f"--teacher {teacher!r} does not exist; expected a diffusers teacher folder (unet/ and "
                           f"scheduler/)")


def fid_command(path: str, ref: str, *, num_samples: int = 1000, features: str | None = None,
                features_path: str | None = None, inception_weights: str | None = None,
                teacher_steps: int | None = None, teacher: str | None = None, batch_size: int = 250,
                seed: int = PROTOCOL_SEED, device: str = "auto", json_out: str | None = None,
                wandb: bool = True) -> int:
    """Evaluate each checkpoint under `path` not yet in its results file on this protocol (CACHE_KEY), or the
    run's teacher with `teacher_steps` DDIM steps; append the rows, print the table. `teacher` replaces the run's
    teacher folder. Under torchrun / srun every process takes its share of the samples and the statistics are
    all-reduced."""
    import math

    from distill import distributed
    from distill.metrics import compute_stats, frechet_distance, load_stats

    check_fid_options(ref, num_samples, batch_size, teacher_steps, teacher)
    dev = resolve_device(device)
    rank, world, launched = distributed.init_from_env(device)
    dev = launched or dev
    ckpts = list_checkpoint_files(path)
    folder = ckpts[0].parent
    results_path = folder / RESULTS_FILE
    done = {cache_key(r) for r in read_results(results_path)}
    start, count = rank_share(num_samples, rank, world)
    refs, rows, steps, project = {}, [], [], None
    for ckpt in (ckpts if teacher_steps is None else ckpts[-1:]):
        module, step = load_checkpoint_module(ckpt, dev, teacher)
        project = module.cfg.logging.project
        extractor = _extractor(module.cfg, features, features_path, inception_weights,
                               math.prod(module.eval_shape())).to(dev)
        if extractor.extractor_id not in refs:  # read and checked once, not per checkpoint
            refs[extractor.extractor_id] = load_stats(ref, expected_extractor_id=extractor.extractor_id,
                                                      num_features=extractor.num_features)
        ref_stats = refs[extractor.extractor_id]
        protocol, batches = _protocol(module, ckpt, teacher_steps, count, batch_size, seed, dev, start)
        protocol.update(samples=num_samples, extractor=extractor.extractor_id, ref=os.path.abspath(ref),
                        ref_sha=ref_stats["sha"], seed=seed)
        if cache_key(protocol) in done:
            if rank == 0:
                print(f"skipping {protocol['path']} ({protocol['model']}): already in {results_path}")
            continue
        counter = None
        if module.cfg.eval.prompt_accuracy and hasattr(extractor, "classifier"):
            from distill.metrics import PromptAccuracy

            counter = PromptAccuracy(extractor.classifier, module.prompts, start)
            batches = counter.observe(batches)
        fake, seconds = timed(compute_stats, extractor, batches, progress=rank == 0)
        if world > 1:
            fake = merge_stats(fake)
        fid = frechet_distance(fake["mu"], fake["sigma"], ref_stats["mu"], ref_stats["sigma"])
        row = {**protocol, "step": "" if teacher_steps is not None else step, "fid": fid, "samples": fake["n"],
               "seconds": round(seconds, 2)}
        if counter is not None:
            counts = torch.tensor([counter.correct, counter.n], dtype=torch.float64, device=dev)
            if world > 1:
                torch.distributed.all_reduce(counts)
            row["prompt_accuracy"] = float(counts[0] / counts[1])
        rows.append(row)
        steps.append(step)
        if rank == 0:
            append_result(results_path, row)
    if rank != 0:
        return 0
    print(format_results(read_results(results_path)))
    print(f"results: {results_path}" + (f" ({world} processes)" if world > 1 else ""))
    if json_out:
        import json

        Path(json_out).write_text(json.dumps([{k: r.get(k, "") for k in RESULT_FIELDS} for r in rows], indent=2) + "\n")
    if rows and wandb:
        try:
            _log_fid_to_wandb(folder, project, list(zip(rows, steps)), read_results(results_path))
        except Exception as e:  # noqa: BLE001 - the results are written; W&B is a copy of them
            print(f"distill fid: warning: W&B logging failed ({type(e).__name__}: {e}); the results are in "
                  f"{results_path}", file=sys.stderr)
    return 0


def _extractor(cfg, features: str | None, features_path: str | None, inception_weights: str | None,
               num_features: int):
    """The extractor of --features (default: the run's eval.features) with its weights: --features-path for
    digits, --inception-weights for inception, else the run's own. A weights file for an extractor that is not
    the one used is refused, not silently ignored."""
    from distill.metrics import extractor_for, refuse_unused_weights

    name = features or cfg.eval.features
    refuse_unused_weights(name, "--features" if features else "the run's eval.features", features_path,
                          inception_weights)
    return extractor_for(name, features_path or cfg.eval.features_path,
                         inception_weights or cfg.eval.inception_weights, num_features=num_features)


def _protocol(module, ckpt: Path, teacher_steps: int | None, count: int, batch_size: int, seed: int, dev,
              start: int) -> tuple[dict, Iterator[Tensor]]:
    """What is evaluated (path, model, teacher_steps, guidance) and its batches: the checkpoint's EMA generator
    (its steps), or the run's teacher with `teacher_steps` DDIM steps at the run's guidance scale."""
    cfg, shape = module.cfg, module.sample_shape()
    if teacher_steps is not None:
        protocol = {"path": os.path.abspath(cfg.teacher.path) if cfg.teacher.kind == "diffusers" else "gmm",
                    "model": f"teacher-{teacher_steps}step", "teacher_steps": teacher_steps,
                    "guidance": cfg.teacher.guidance_scale}
        return protocol, teacher_batches(module.teacher, shape, module.protocol_condition, count, batch_size,
                                         teacher_steps, cfg.teacher.guidance_scale, seed, dev, start=start,
                                         decode=module.eval_images)
    protocol = {"path": str(ckpt), "model": f"ema-{module.ema.steps}step", "teacher_steps": "", "guidance": ""}
    return protocol, generator_batches(module.ema, shape, module.protocol_condition, count, batch_size, seed, dev,
                                       start=start, decode=module.eval_images)


def _log_fid_to_wandb(folder: Path, project: str, logged: list[tuple[dict, int]], table: list[dict]) -> None:
    """Into the training run's own W&B run, resumed by the id in wandb_id.txt (as `distill fit` resumes it), so
    that `fid/<model>` sits beside the training curves; offline unless WANDB_MODE says otherwise. Each FID is
    logged at its checkpoint's step as `trainer/global_step`, the x-axis Lightning's WandbLogger writes, rather
    than as W&B's own `step=`: a resumed run drops steps below the last one it logged, and evaluation comes after
    training. A teacher row is logged at the step of the checkpoint whose config named the teacher."""
    run_dir = folder.parent if folder.name == "checkpoints" else folder
    id_file = run_dir / "wandb_id.txt"
    if not id_file.is_file():
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project=project, id=id_file.read_text().strip(), resume="allow", dir=str(run_dir.resolve()),
                     mode=os.environ.get("WANDB_MODE", "offline"))
    run.define_metric("fid/*", step_metric="trainer/global_step")
    for row, step in logged:
        run.log({f"fid/{row['model']}": row["fid"], "trainer/global_step": step})
    run.log({"fid/results": wandb.Table(columns=RESULT_FIELDS, data=[[r.get(k) or "" for k in RESULT_FIELDS]
                                                                      for r in table]),
             "trainer/global_step": max(step for _, step in logged)})
    run.finish()
