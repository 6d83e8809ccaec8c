"""Build and run a training job: `distill fit` (DMD) and `distill teacher`. The CLI parses arguments and calls these;
from Python the same call behaves the same way:

    from distill.config import FitConfig, load_config
    from distill.train import fit

    result = fit(load_config(FitConfig, "configs/digits.yaml", ["run.dir=runs/mine", "trainer.max_steps=500"]))
    result.exit_code, result.step   # 0, 500

A run directory is bound to its config:
- the first start writes `config.yaml` (paths made absolute, so checkpoints evaluate from anywhere);
- re-running finished work does nothing and touches nothing; raising `trainer.max_steps` continues;
- a key that changes the math (teacher, generator, fake score, estimator, optim, data, seed, devices, precision)
  differing from the run's config stops the command with one line listing the keys, unless each is allowed with
  `allow_changes` (`--allow-change KEY`); then it is applied from the resumed step on, and the config in force
  before is kept as `config-step=NNNNNNN.yaml` (the config that ran up to step N). Keys that do not touch the math
  (max_steps, logging, eval, checkpoint cadence) change freely and are recorded the same way;
- a start at step s moves what an earlier attempt wrote past step s (sample grids, plots; with no checkpoint at
  all, its config, metrics and W&B id) into `superseded/<time>/`, and says so: nothing is mixed silently.

Signals: SIGTERM and SIGINT end at a step boundary with that step's checkpoint and exit status 143 / 130; SIGUSR1
under SLURM does the same and requeues the job (see distill.callbacks.StopOnSignal).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distill.errors import DistillError

# keys that do not change what is computed: a resumed run takes new values freely (and records them)
FREE_KEYS = ("run.", "trainer.max_steps", "trainer.checkpoint_every_steps", "trainer.keep_checkpoints",
             "trainer.log_every_steps", "trainer.max_nonfinite", "trainer.accelerator", "trainer.strategy",
             "trainer.deterministic", "data.num_workers", "logging.", "eval.", "out", "sample_steps",
             "sample_guidance_scale")
# file-system paths: resolved to absolute paths when a run starts
PATH_KEYS = ("teacher.path", "data.path", "gan.data", "eval.fid_ref", "eval.features_path", "eval.inception_weights",
             "out")
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


@dataclass
class RunResult:
    """What a call of `fit` or `train_teacher` did."""

    run_dir: Path
    start_step: int  # the step it started (resumed) from
    step: int  # the step it ended at
    seconds: float
    status: str  # finished | up to date | stopped by SIGTERM | stopped by SIGINT | requeued
    exit_code: int  # 0, or 143 / 130 when stopped by SIGTERM / SIGINT


# --------------------------------------------------------------------------------------------------------------
# The two commands.


def fit(cfg, allow_changes: tuple[str, ...] | list[str] = ()) -> RunResult:
    """`distill fit`: distil cfg.teacher into a one-step generator in cfg.run.dir (resuming from its newest
    checkpoint). Bad input raises DistillError before anything is written."""
    import lightning as L

    from distill.module import DMDModule

    cfg, given = resolve_paths(cfg)
    run_dir = check_run_dir(cfg.run.dir)
    check_wandb(cfg)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = DMDModule(cfg)  # loads the teacher: a bad folder fails here, before anything is written
    plan = plan_resume(run_dir, cfg, allow_changes, module)
    if plan.up_to_date:
        return _up_to_date(run_dir, plan.step, cfg.trainer.max_steps)
    datamodule = fit_data(cfg, module, data_seed(cfg.trainer.seed, plan.step))
    from distill.callbacks import FIDMonitor, GradientVariance, ProposalPlot

    extra = []
    if cfg.eval.fid_every_steps:  # builds the extractor and the reference now: a mismatch fails before any write
        extra.append(FIDMonitor(cfg, run_dir / "checkpoints", module))
    if cfg.logging.proposal_plot_every_steps:
        extra.append(ProposalPlot(run_dir / "plots", cfg.logging.proposal_plot_every_steps))
    if cfg.eval.variance_every_steps:
        extra.append(GradientVariance(cfg.eval.variance_every_steps, cfg.estimator.diagnostic_K))
    start_run(cfg, run_dir, plan, given)
    return _run(cfg, run_dir, module, datamodule, plan, extra, "distill fit")


def train_teacher(cfg, allow_changes: tuple[str, ...] | list[str] = (), overwrite: bool = False) -> RunResult:
    """`distill teacher`: train a class-conditional diffusers UNet (kind unet) or a latent text-to-image Stable
    Diffusion pipeline (kind t2i, distill.pretrain_t2i) on shards; save it (EMA weights) to cfg.out, or to
    <run.dir>/teacher when cfg.out is empty. An existing teacher folder is never written into unless `overwrite`
    is set. Kind t2i first trains its VAE (or reuses <run.dir>/vae), and ends by measuring the saved pipeline's
    prompt accuracy (cfg.eval) into its distill.json."""
    import lightning as L

    from distill.data import ShardDataModule, read_meta
    from distill.pretrain import TeacherModule

    if not cfg.out:
        cfg = replace(cfg, out=str(Path(cfg.run.dir) / "teacher"))
    cfg, given = resolve_paths(cfg)
    run_dir = check_run_dir(cfg.run.dir)
    check_wandb(cfg)
    out = Path(cfg.out)
    own = out.resolve().is_relative_to(Path(cfg.run.dir).resolve())  # the run's own output: a resume replaces it
    if out.exists() and any(out.iterdir()) and not (overwrite or own):
        raise DistillError(f"teacher output folder {str(out)!r} already holds files; expected a new folder (set "
                           f"out=... or leave it empty for <run.dir>/teacher), or pass --overwrite to replace it")
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    t2i = cfg.kind == "t2i"
    if t2i:
        from distill import pretrain_t2i
        from distill.synthetic import StepStream

        module = pretrain_t2i.T2ITeacherModule(cfg, *pretrain_t2i.load_digits(cfg.data.path, "train"))
    else:
        meta = read_meta(cfg.data.path)
        shape = (int(meta["channels"]), *map(int, meta["resolution"]))
        module = TeacherModule(cfg, shape, int(meta["num_classes"]))
    plan = plan_resume(run_dir, cfg, allow_changes, module)
    if plan.up_to_date:
        return _up_to_date(run_dir, plan.step, cfg.trainer.max_steps)
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    if t2i:  # each step draws its batch from the digits in memory (a function of seed, rank and step)
        datamodule = StepStream()
    else:
        datamodule = ShardDataModule(cfg.data.path, cfg.data.batch_size // world, num_workers=cfg.data.num_workers,
                                     seed=data_seed(cfg.trainer.seed, plan.step),
                                     shuffle_buffer=cfg.data.shuffle_buffer)
    start_run(cfg, run_dir, plan, given)
    vae_info = None
    if t2i and plan.ckpt is None:  # a resumed run gets its VAE back from the checkpoint
        vae_info = pretrain_t2i.prepare_vae(module, run_dir, cfg, progress=cfg.logging.progress_bar)
    result = _run(cfg, run_dir, module, datamodule, plan, [], "distill teacher", report=False)
    if result.status == "finished" and is_rank_zero():
        from distill.plots import save_atomic

        extra = {"train_seconds_this_invocation": round(result.seconds, 1),
                 "command": " ".join(["distill", *sys.argv[1:]])}
        if t2i:
            pretrain_t2i.finish(cfg, run_dir, module, result, extra, vae_info)
            return result
        saved = module.save_teacher(cfg.out, extra=extra)
        save_atomic(module.sample_image(), saved / "samples.png")
        print(f"\ndone: {result.step - result.start_step} steps in {result.seconds:.1f} s (now at step "
              f"{result.step}); teacher saved to {saved} (unet/, scheduler/, samples.png with {cfg.sample_steps} "
              f"DDIM steps)", flush=True)
    return result


def _run(cfg, run_dir: Path, module, datamodule, plan: "ResumePlan", extra: list, desc: str,
         report: bool = True) -> RunResult:
    from distill import distributed

    trainer, stop = build_trainer(cfg, run_dir, extra, desc)
    log_config(trainer, cfg)
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(plan.ckpt) if plan.ckpt else None)
    finally:
        stop.restore()
        distributed.teardown()
    seconds = time.perf_counter() - t0
    result = RunResult(run_dir, plan.step, module.step, seconds, "finished", 0)
    if stop.stopped_by is not None:
        name = signal.Signals(stop.stopped_by).name
        result.status = "requeued" if stop.requeued else f"stopped by {name}"
        result.exit_code = 0 if stop.requeued else EXIT_CODES.get(stop.stopped_by, 1)
        if is_rank_zero() and not stop.requeued:
            print(f"\n{name}: stopped at step {module.step} with its checkpoint written; run the same command to "
                  f"resume", file=sys.stderr, flush=True)
    elif module.step < module.max_steps:
        result.status = "stopped"
    elif report and is_rank_zero():
        print(f"\ndone: {module.step - plan.step} steps in {seconds:.1f} s (now at step {module.step})", flush=True)
        print(f"  samples:     {run_dir / 'samples'}  (newest: step_{module.step:07d}.png)")
        print(f"  checkpoints: {run_dir / 'checkpoints'}  (last.ckpt)")
        print(f"  metrics:     {run_dir / 'metrics.csv'}")
        if cfg.logging.wandb == "offline":
            print(f"  W&B (offline): wandb sync {run_dir / 'wandb'}/offline-run-*")
    return result


def _up_to_date(run_dir: Path, step: int, max_steps: int) -> RunResult:
    if is_rank_zero():
        print(f"nothing to do: {run_dir} is at step {step} and trainer.max_steps = {max_steps} (raise "
              f"trainer.max_steps to continue training)", flush=True)
    return RunResult(run_dir, step, step, 0.0, "up to date", 0)


# --------------------------------------------------------------------------------------------------------------
# Paths and the run directory.


def resolve_paths(cfg) -> tuple[Any, dict[str, str]]:
    """(cfg with every file-system path absolute, {key: the path as given} for those that were relative)."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cfg)
    given = {}
    for key in PATH_KEYS:
        value = OmegaConf.select(node, key, default=None)
        if isinstance(value, str) and value and not os.path.isabs(value):
            given[key] = value
            OmegaConf.update(node, key, os.path.abspath(value))
    return (OmegaConf.to_object(node) if given else cfg), given


def check_run_dir(value: str) -> Path:
    """The run directory, checked (not created): set, not the current folder, and writable."""
    if not value or not str(value).strip() or Path(value).resolve() == Path.cwd().resolve():
        raise DistillError(f"run.dir {value!r}: expected a folder of its own for the run (e.g. run.dir=runs/my-run), "
                           f"not the current folder")
    run_dir = Path(value)
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise DistillError(f"run directory {str(run_dir)!r} is not writable ({str(probe)!r} is not a writable "
                           f"folder); expected a folder you can write to (set run.dir=...)")
    return run_dir


def is_rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_PROCID", "0"))) == 0 and \
        int(os.environ.get("NODE_RANK", "0")) == 0


def data_seed(seed: int, step: int) -> int:
    """The data stream's seed: a resumed run starts a fresh stream rather than replaying the first batches."""
    import numpy as np

    return seed if step == 0 else int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------------------
# Resume: which checkpoint, and whether the config may go on from it.


@dataclass
class ResumePlan:
    ckpt: Path | None  # the checkpoint to resume from (None: a new run)
    step: int  # its step (0 for a new run)
    up_to_date: bool  # nothing left to do
    changed: dict[str, tuple[Any, Any]]  # key -> (run's value, new value), every key that differs
    earlier: str | None  # the YAML of the config in force before (None for a new run)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_dict(cfg_or_yaml, schema: type) -> dict[str, Any]:
    """Flat {dotted key: value} of a config object or of a saved YAML (defaults filled in, paths absolute as the
    run saw them)."""
    import yaml
    from omegaconf import OmegaConf

    if isinstance(cfg_or_yaml, str):
        data = yaml.safe_load(cfg_or_yaml) or {}
        try:
            node = OmegaConf.merge(OmegaConf.structured(schema), data)
            data = OmegaConf.to_container(node)
        except Exception:  # noqa: BLE001 - a config of an older version: compare what is there
            pass
    else:
        data = OmegaConf.to_container(OmegaConf.structured(cfg_or_yaml))
    return _flat(data)


def config_changes(saved_yaml: str, cfg) -> dict[str, tuple[Any, Any]]:
    """Every key whose value differs between the run's saved config and cfg: key -> (saved, new)."""
    old, new = _config_dict(saved_yaml, type(cfg)), _config_dict(cfg, type(cfg))
    changed = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key in PATH_KEYS and isinstance(a, str) and a and not os.path.isabs(a):
            a = os.path.abspath(a)  # a run made before paths were stored absolute
        if a != b:
            changed[key] = (a, b)
    return changed


def plan_resume(run_dir: Path, cfg, allow_changes, module) -> ResumePlan:
    """The newest checkpoint of the run directory and whether cfg may go on from it. One that cannot be loaded
    stops the command, naming it and what to do; a changed math key stops it unless allowed."""
    import torch

    from distill.runs import list_checkpoints

    found = list_checkpoints(run_dir / "checkpoints")
    config_file = run_dir / "config.yaml"
    if not found:
        earlier = config_file.read_text() if config_file.is_file() else None
        return ResumePlan(None, 0, False, {}, earlier)
    ckpt = found[-1]
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        step = int(state["distill"]["step"])
        saved = state["distill"].get("config")
    except Exception as e:  # noqa: BLE001 - any failure to read it is reported the same way
        if len(found) > 1:
            what = (f"the next newest is {str(found[-2])!r}: move the broken file away and run the same command to "
                    f"resume from that one")
        else:
            what = (f"there is no older checkpoint to resume from: move the broken file away and the same command "
                    f"starts the run again from step 0 (the files of the earlier attempt move to "
                    f"{str(run_dir / 'superseded')!r}), or use a new run.dir")
        raise DistillError(f"checkpoint {str(ckpt)!r} cannot be loaded ({type(e).__name__}); {what}") from None
    check_fits(ckpt, state["state_dict"], module)
    del state
    if saved is None and config_file.is_file():
        saved = config_file.read_text()
    changed = config_changes(saved, cfg) if saved else {}
    refused = [k for k in changed if not k.startswith(FREE_KEYS) and k not in allow_changes
               and "all" not in allow_changes]
    if refused:
        listed = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in refused)
        flags = " ".join(f"--allow-change {k}" for k in refused)
        raise DistillError(f"run directory {str(run_dir)!r} was made with other settings that change the math: "
                           f"{listed}; expected its own config (use another run.dir), or pass {flags} to apply "
                           f"the change from step {step} on")
    up_to_date = step >= cfg.trainer.max_steps
    if is_rank_zero() and not up_to_date:
        print(f"resuming from {ckpt} (step {step})", flush=True)
    return ResumePlan(ckpt, step, up_to_date, changed, saved)


def check_fits(ckpt: Path, saved: dict, module) -> None:
    """A checkpoint written by another configuration (other networks) is named as such, before Lightning fails."""
    # entries reloaded from the teacher's folder are not stored (the distillation module says which)
    reloaded = getattr(module, "reloaded", lambda k: k.startswith("teacher."))
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if not reloaded(k)}
    got = {k: tuple(v.shape) for k, v in saved.items() if not reloaded(k)}
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            raise DistillError(f"checkpoint {str(ckpt)!r} was written for other networks ({key}: "
                               f"{got.get(key, 'missing')} in the file, {expected.get(key, 'absent')} here); "
                               f"expected a checkpoint of this configuration: use another run.dir")


# --------------------------------------------------------------------------------------------------------------
# Starting: the run directory's files, then the Trainer.


def _superseded(run_dir: Path, step: int, fresh: bool) -> list[Path]:
    """Files an earlier attempt wrote past `step` (all of its files when `fresh`, i.e. no checkpoint)."""
    import re

    late = []
    for folder, pattern in (("samples", r"step_(\d+)\.png$"), ("plots", r"_step_(\d+)\.png$")):
        for f in sorted((run_dir / folder).glob("*.png")) if (run_dir / folder).is_dir() else []:
            m = re.search(pattern, f.name)
            if m and (int(m.group(1)) > step or fresh):
                late.append(f)
    if fresh:
        late += [run_dir / n for n in ("config.yaml", "metrics.csv", "wandb_id.txt", "fid_results.csv")
                 if (run_dir / n).exists()]
        late += sorted(run_dir.glob("config-step=*.yaml"))
    return late


def start_run(cfg, run_dir: Path, plan: ResumePlan, given: dict[str, str]) -> None:
    """Everything is checked: create the run directory, move an earlier attempt's later files aside, save the
    config (keeping the one in force before when it changed), align the CSV with the step."""
    if not is_rank_zero():
        return
    from distill.callbacks import CSVLogger
    from distill.config import to_yaml

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistillError(f"run directory {str(run_dir)!r} cannot be created ({e.strerror}); "
                           f"expected a folder you can write to (set run.dir=...)") from None
    fresh = plan.ckpt is None
    late = _superseded(run_dir, plan.step, fresh)
    if late:
        dest = run_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        for f in late:
            target = dest / f.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(f), target)
        what = "no checkpoint to resume from" if fresh else f"files past the checkpoint at step {plan.step}"
        print(f"{run_dir} held an earlier attempt ({what}): moved {len(late)} of its files to {dest}", flush=True)
    text = to_yaml(cfg)
    if given:  # what the user typed, beside the absolute paths the run uses
        text = "".join(f"# {k} as given: {v}\n" for k, v in given.items()) + text
    config_file = run_dir / "config.yaml"
    if not fresh and plan.earlier is not None and plan.changed:
        _write_atomic(run_dir / f"config-step={plan.step:07d}.yaml", plan.earlier)
        print(f"config changed from step {plan.step} on: {', '.join(plan.changed)} (the earlier config is kept as "
              f"config-step={plan.step:07d}.yaml)", flush=True)
    _write_atomic(config_file, text)
    print(f"config: {config_file} (distill ... --print-config shows it in full)", flush=True)
    CSVLogger(run_dir / "metrics.csv").truncate_after(plan.step)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def loggers(cfg, run_dir: Path) -> list:
    from distill.callbacks import CSVLogger

    out = [CSVLogger(run_dir / "metrics.csv")]
    # W&B on the global rank 0 only (Lightning logs from there anyway): one run id, even when every rank of a SLURM
    # job starts at once
    if cfg.logging.wandb != "disabled" and is_rank_zero():
        out.append(wandb_logger(cfg, run_dir))
    return out


def wandb_logger(cfg, run_dir: Path):
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    id_file = run_dir / "wandb_id.txt"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        import secrets

        run_id = secrets.token_hex(4)  # W&B run ids: 8 lowercase alphanumerics
        id_file.write_text(run_id + "\n")
    run = wandb.init(project=cfg.logging.project, name=cfg.run.name or run_dir.name, id=run_id, dir=str(run_dir),
                     mode=cfg.logging.wandb, resume="allow")
    return WandbLogger(experiment=run, log_model=False)


def check_wandb(cfg) -> None:
    """logging.wandb=online without a key would fail inside wandb after the run directory was written."""
    if cfg.logging.wandb == "online" and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()):
        raise DistillError("logging.wandb=online needs a W&B API key (set WANDB_API_KEY or run `wandb login`); "
                           "expected a key, or logging.wandb=offline (files in the run directory, "
                           "`wandb sync` later)")


def _wandb_logged_in() -> bool:
    try:
        import wandb

        return bool(wandb.api.api_key)
    except Exception:  # noqa: BLE001 - no key found in any form
        return False


def build_trainer(cfg, run_dir: Path, callbacks: list, progress_desc: str):
    """The Lightning Trainer with distill's callbacks, and the signal handler (StopOnSignal) it stops by."""
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from distill.callbacks import (AtomicCheckpointIO, FlushMetrics, SampleGrid, StepCheckpoint, StepProgressBar,
                                   StepTimer, StopOnSignal)

    t = cfg.trainer
    strategy = t.strategy
    if strategy == "auto" and t.devices * t.num_nodes > 1:
        strategy = "ddp_find_unused_parameters_true"  # the fake-score update leaves G's parameters unused
    checkpoint = StepCheckpoint(run_dir / "checkpoints", t.checkpoint_every_steps, t.keep_checkpoints)
    slurm = SLURMEnvironment.detect()
    stop = StopOnSignal(checkpoint, requeue=slurm)  # installs its handlers now: signals during start-up count too
    # order matters: the monitors add the step's figures, FlushMetrics writes its row, then the checkpoint (which
    # so holds the monitors' state after the step, e.g. the best FID), then the signal check
    callbacks = [SampleGrid(run_dir / "samples", cfg.logging.samples_every_steps), StepTimer(), *callbacks,
                 FlushMetrics(), checkpoint, stop]
    if cfg.logging.progress_bar:
        callbacks.append(StepProgressBar(progress_desc))
    plugins = [AtomicCheckpointIO()]
    if slurm:  # preemption by StopOnSignal, not Lightning's handler (see there)
        plugins.append(SLURMEnvironment(auto_requeue=False))
    try:
        trainer = L.Trainer(
            accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
            precision=t.precision, max_epochs=-1, max_steps=-1, logger=loggers(cfg, run_dir), callbacks=callbacks,
            plugins=plugins, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=t.deterministic,
            default_root_dir=str(run_dir), use_distributed_sampler=False,
        )
    except BaseException:
        stop.restore()
        raise
    return trainer, stop


def log_config(trainer, cfg) -> None:
    """The resolved config as the W&B run's config (nested sections)."""
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(OmegaConf.structured(cfg))
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


# --------------------------------------------------------------------------------------------------------------
# Data for `distill fit`.


def fit_data(cfg, module, seed: int):
    """What the Trainer iterates: DMD reads no real data, so each step gets only its index (no decoding); the
    shards are still checked against the teacher, since evaluation reads them. The GAN term draws its real batches
    itself, by random access (a function of seed, rank and step, like the noise)."""
    from distill.synthetic import StepStream

    if cfg.teacher.kind == "diffusers" and module.text is None:  # a text teacher has read its prompts already
        check_shards_fit(cfg, module)
    if module.gan_head is not None:  # the GAN's real data, checked against the teacher before anything is written
        module.real = module.open_real_data()
    return StepStream()


def check_shards_fit(cfg, module) -> None:
    from distill.data import first_sample, read_meta
    from distill.teachers import sample_shape_of

    meta = read_meta(cfg.data.path)
    shape = tuple(sample_shape_of(module.teacher))
    data_shape = (int(meta["channels"]), *map(int, meta["resolution"]))
    if data_shape != shape:
        raise DistillError(f"data.path {cfg.data.path!r} holds samples of shape {data_shape}; the teacher "
                           f"{cfg.teacher.path!r} expects {shape} (channels, height, width)")
    n_cls = module.teacher.num_classes
    if n_cls is not None and int(meta["num_classes"]) > n_cls:
        raise DistillError(f"data.path {cfg.data.path!r} has {meta['num_classes']} classes; the teacher "
                           f"{cfg.teacher.path!r} knows {n_cls} (labels 0..{n_cls - 1})")
    image, label = first_sample(cfg.data.path)  # meta.json could lie: check what the shards really hold
    if tuple(image.shape) != shape:
        raise DistillError(f"data.path {cfg.data.path!r}: its samples are {tuple(image.shape)}, meta.json says "
                           f"{data_shape} and the teacher expects {shape}; expected shards written for this teacher")
    if n_cls is not None and not 0 <= label < n_cls:
        raise DistillError(f"data.path {cfg.data.path!r}: a sample has label {label}; the teacher "
                           f"{cfg.teacher.path!r} knows labels 0..{n_cls - 1}")
