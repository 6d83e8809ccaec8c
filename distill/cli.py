"""The `distill` command line. Every subcommand takes `--config FILE` plus `key=value` overrides where it trains;
bad input stops it with exit status 2 and one line on stderr."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

from distill.errors import DistillError

EXIT_BAD_INPUT = 2


def _config_help(schema_name: str) -> str:
    from distill import config

    return "config keys (override any with key=value):\n" + config.describe(getattr(config, schema_name))


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill", formatter_class=_Formatter,
        description="One-step diffusion distillation (DMD/DMD2) with the CARV hierarchical Monte Carlo estimator.",
        epilog=textwrap.dedent("""\
            examples:
              distill data digits --out data/digits
              distill teacher --config configs/teacher-digits.yaml
              distill fit --config configs/digits.yaml trainer.max_steps=2000 run.dir=runs/my-run
              distill fit --config configs/gmm.yaml
              distill bench variance --config configs/gmm.yaml --json bench.json
              distill submit --config configs/digits.yaml --ntasks-per-node 4 --gpus-per-node 4 --time 04:00:00
            Run `distill COMMAND --help` for every option of a command."""))
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, schema, summary in (
        ("fit", "FitConfig", "distil a teacher into a one-step generator (DMD2); re-running resumes"),
        ("teacher", "TeacherTrainConfig", "train a small class-conditional diffusers UNet teacher on shards"),
    ):
        sp = sub.add_parser(name, help=summary, description=summary + ".", formatter_class=_Formatter,
                            epilog=_config_help(schema))
        sp.add_argument("--config", metavar="FILE", help="YAML config (see configs/); defaults apply without it")
        sp.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. trainer.max_steps=100 run.dir=runs/x")
        sp.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    bench = sub.add_parser("bench", help="benchmarks that print tables and write JSON (never pass/fail)",
                           formatter_class=_Formatter)
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    bv = bsub.add_parser(
        "variance", formatter_class=_Formatter,
        help="gradient variance and compute of the CARV estimators against the DMD2 baseline",
        description="At one frozen training state (a checkpoint, or the end of a short warm-up run of the config), "
                    "estimate the generator's parameter gradient R times with each estimator (baseline, K=4, K=16, "
                    "K=16+adaptive, K=16+adaptive+stratified, auto) and report the trace of its covariance, the "
                    "distance of its mean from the baseline's (with its standard error), FLOPs, seconds, ECM "
                    "against the baseline at equal compute, and the oracle ECM.",
        epilog=_config_help("FitConfig"))
    bv.add_argument("--config", metavar="FILE", help="YAML config of the run (configs/digits.yaml, configs/gmm.yaml)")
    bv.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    bv.add_argument("--ckpt", metavar="PATH", help="checkpoint to measure at (default: a short warm-up run)")
    bv.add_argument("--replicates", type=int, default=32, metavar="R", help="gradient estimates per estimator [32]")
    bv.add_argument("--warmup-steps", type=int, default=200, metavar="S",
                    help="steps of the warm-up run when no --ckpt is given [200]")
    bv.add_argument("--device", default="cpu", help="cpu or cuda [cpu]")
    bv.add_argument("--json", metavar="OUT", help="write the table as JSON here")

    st = sub.add_parser("stats", help="reference statistics (mu, sigma) of a shard folder's features, for FID",
                        formatter_class=_Formatter,
                        description="Features of every image of a split -> an npz with mu, sigma, the sample count "
                                    "and the extractor id. FID refuses statistics made with another extractor.")
    st.add_argument("--data", required=True, metavar="SHARDS", help="folder of shards (train-*.tar, val-*.tar)")
    st.add_argument("--out", required=True, metavar="FILE", help="output .npz")
    st.add_argument("--features", default="digits", choices=("digits", "inception", "raw"), help="extractor [digits]")
    st.add_argument("--split", default="train", help="which split to read [train]")
    st.add_argument("--max-samples", type=int, default=None, metavar="N", help="stop after N images [all]")
    st.add_argument("--features-path", metavar="FILE", help="digits classifier weights [the shipped one]")
    st.add_argument("--inception-weights", metavar="FILE", help="Inception weights [env DISTILL_INCEPTION_WEIGHTS]")

    fd = sub.add_parser("fid", help="FID of checkpoints (or of the teacher) against reference statistics",
                        formatter_class=_Formatter,
                        description="PATH is a checkpoint, a run directory or its checkpoints/ folder. Each checkpoint "
                                    "not yet in the folder's fid_results.csv is evaluated (EMA one-step generator, "
                                    "balanced labels, fixed noise) and appended as a row: path, step, model, FID, "
                                    "samples, extractor, seconds. --teacher-steps S evaluates the run's teacher "
                                    "with an S-step DDIM sampler instead, on the same protocol.")
    fd.add_argument("path", metavar="PATH", help="checkpoint file, run directory, or checkpoints folder")
    fd.add_argument("--ref", required=True, metavar="FILE", help="reference statistics (.npz from `distill stats`)")
    fd.add_argument("--num-samples", type=int, default=1000, metavar="N", help="generated samples per FID [1000]")
    fd.add_argument("--features", default=None, choices=("digits", "inception", "raw"),
                    help="extractor [the run's eval.features]")
    fd.add_argument("--features-path", metavar="FILE", help="digits classifier weights [the shipped one]")
    fd.add_argument("--inception-weights", metavar="FILE", help="Inception weights [env DISTILL_INCEPTION_WEIGHTS]")
    fd.add_argument("--teacher-steps", type=int, default=None, metavar="S",
                    help="evaluate the teacher with S DDIM steps instead of the checkpoints")
    fd.add_argument("--batch-size", type=int, default=250, metavar="B", help="samples per call [250]")
    fd.add_argument("--seed", type=int, default=0, help="noise seed of the protocol [0]")
    fd.add_argument("--device", default="auto", help="cpu, cuda or auto [auto]")
    fd.add_argument("--json", metavar="OUT", help="also write this call's rows as JSON")
    fd.add_argument("--no-wandb", action="store_true", help="do not log the results to W&B")

    from distill.slurm import add_submit_parser

    add_submit_parser(sub, _Formatter)

    cl = sub.add_parser("classifier", help="train the small digits classifier used as the digits FID feature",
                        formatter_class=_Formatter)
    cl.add_argument("--data", required=True, metavar="SHARDS", help="digits shards (train and val splits)")
    cl.add_argument("--out", required=True, metavar="DIR", help="output folder (classifier.pt, classifier.json)")
    cl.add_argument("--steps", type=int, default=2000, help="training steps [2000]")
    cl.add_argument("--seed", type=int, default=0, help="seed [0]")

    data = sub.add_parser("data", help="write webdataset shards (digits, or a folder of images)",
                          description="Write webdataset tar shards: train-*.tar, val-*.tar and meta.json.",
                          formatter_class=_Formatter)
    dsub = data.add_subparsers(dest="data_command", metavar="SOURCE", required=True)
    d = dsub.add_parser("digits", help="scikit-learn's digits (1,797 8x8 images, 10 classes; ships with it)",
                        formatter_class=_Formatter)
    d.add_argument("--out", required=True, metavar="DIR", help="output folder (must hold no shards yet)")
    _shard_options(d)
    f = dsub.add_parser("shards", help="a folder of images in class subfolders (PNG/JPEG)", formatter_class=_Formatter,
                        description="SRC/<class name>/*.png|jpg: the class index is the position of the sorted name.")
    f.add_argument("--src", required=True, metavar="FOLDER", help="folder with one subfolder per class")
    f.add_argument("--out", required=True, metavar="DIR", help="output folder (must hold no shards yet)")
    f.add_argument("--channels", type=int, default=3, choices=(1, 3), help="1 (grayscale) or 3 (RGB) [3]")
    f.add_argument("--resolution", type=int, default=None, metavar="R",
                   help="resize to R x R (bicubic); default: keep the size (all images must match)")
    _shard_options(f)
    return p


def _shard_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="fraction held out as val [0.1]")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed before the split [0]")
    p.add_argument("--shard-size", type=int, default=500, metavar="N", help="samples per shard [500]")


# --------------------------------------------------------------------------------------------------------------


def _check_writable(run_dir: Path) -> None:
    """Fail early, creating nothing, when the run directory cannot be made or written."""
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise DistillError(f"run directory {str(run_dir)!r} is not writable ({str(probe)!r} is not a writable "
                           f"folder); expected a folder you can write to (set run.dir=...)")


def _make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistillError(f"run directory {str(run_dir)!r} cannot be created ({e.strerror}); "
                           f"expected a folder you can write to (set run.dir=...)") from None


def _loggers(cfg, run_dir: Path):
    from distill.callbacks import CSVLogger

    loggers = [CSVLogger(run_dir / "metrics.csv")]
    # W&B on the global rank 0 only (Lightning logs from there anyway): one run id, even when every rank of a SLURM
    # job starts at once
    if cfg.logging.wandb != "disabled" and _is_rank_zero():
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
        loggers.append(WandbLogger(experiment=run, log_model=False))
    return loggers


def _trainer(cfg, run_dir: Path, callbacks: list, progress_desc: str):
    """The Lightning Trainer with distill's callbacks; `callbacks` adds command-specific ones."""
    import lightning as L

    from lightning.fabric.plugins.environments import SLURMEnvironment

    from distill.callbacks import (AtomicCheckpointIO, RequeueOnSignal, SampleGrid, StepCheckpoint, StepProgressBar,
                                   StepTimer)

    t = cfg.trainer
    strategy = t.strategy
    if strategy == "auto" and t.devices * t.num_nodes > 1:
        strategy = "ddp_find_unused_parameters_true"  # the fake-score update leaves G's parameters unused
    checkpoint = StepCheckpoint(run_dir / "checkpoints", t.checkpoint_every_steps, t.keep_checkpoints)
    callbacks = [checkpoint, SampleGrid(run_dir / "samples", cfg.logging.samples_every_steps), StepTimer(), *callbacks]
    if cfg.logging.progress_bar:
        callbacks.append(StepProgressBar(progress_desc))
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # preemption: checkpoint at a step boundary and requeue (see RequeueOnSignal)
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(RequeueOnSignal(checkpoint))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_epochs=1, max_steps=-1, logger=_loggers(cfg, run_dir), callbacks=callbacks,
        plugins=plugins, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=t.deterministic,
        default_root_dir=str(run_dir), use_distributed_sampler=False,
    )


def _log_config(trainer, cfg) -> None:
    """The resolved config as the W&B run's config (nested sections)."""
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(OmegaConf.structured(cfg))
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


def _resume(run_dir: Path, module=None) -> tuple[Path | None, int]:
    """The newest checkpoint of the run directory and its step (None, 0 for a new run). One that cannot be loaded
    stops the command, naming it and the next newest to fall back on."""
    from distill.callbacks import list_checkpoints

    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        return None, 0
    ckpt = found[-1]
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        step = int(state["distill"]["step"])
        cfg_text = state["distill"].get("config")
    except Exception as e:  # noqa: BLE001 - any failure to read it is reported the same way
        older = f"the next newest is {str(found[-2])!r}" if len(found) > 1 else "there is no older checkpoint"
        raise DistillError(f"checkpoint {str(ckpt)!r} cannot be loaded ({type(e).__name__}); {older}: move the "
                           f"broken file away and run the same command again to resume from it") from None
    if module is not None:
        _check_fits(ckpt, state["state_dict"], module)
    del state, cfg_text
    print(f"resuming from {ckpt} (step {step})", flush=True)
    return ckpt, step


def _check_fits(ckpt: Path, saved: dict, module) -> None:
    """A checkpoint written by another configuration (other networks) is named as such, before Lightning fails."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.startswith("teacher.")}
    got = {k: tuple(v.shape) for k, v in saved.items() if not k.startswith("teacher.")}
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            raise DistillError(f"checkpoint {str(ckpt)!r} was written for other networks ({key}: "
                               f"{got.get(key, 'missing')} in the file, {expected.get(key, 'absent')} here); "
                               f"expected a checkpoint of this configuration: use another run.dir")


def _data_seed(seed: int, step: int) -> int:
    """The data stream's seed: a resumed run starts a fresh stream rather than replaying the first batches."""
    import numpy as np

    return seed if step == 0 else int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def _is_rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_PROCID", "0"))) == 0 and \
        int(os.environ.get("NODE_RANK", "0")) == 0


def _load_run_config(schema_name: str, args: argparse.Namespace):
    """The resolved config of a training command and its run directory (checked, not yet created); None when
    --print-config only asked to see it."""
    from distill import config

    cfg = config.load_config(getattr(config, schema_name), args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        return None, None
    run_dir = Path(cfg.run.dir)
    _check_writable(run_dir)
    return cfg, run_dir


def _start_run(cfg, run_dir: Path, step: int) -> None:
    """Everything is checked: create the run directory, print and save the config, align the CSV with `step`."""
    if not _is_rank_zero():
        return
    from distill.callbacks import CSVLogger
    from distill.config import save_config, to_yaml

    _make_run_dir(run_dir)
    print(to_yaml(cfg), end="", flush=True)
    save_config(cfg, run_dir)
    CSVLogger(run_dir / "metrics.csv").truncate_after(step)


def cmd_fit(args: argparse.Namespace) -> int:
    cfg, run_dir = _load_run_config("FitConfig", args)
    if cfg is None:
        return 0

    import lightning as L

    from distill.module import DMDModule

    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = DMDModule(cfg)  # loads the teacher: a bad folder fails here, before anything is written
    ckpt, step = _resume(run_dir, module)
    datamodule = _fit_data(cfg, module, _data_seed(cfg.trainer.seed, step))
    _start_run(cfg, run_dir, step)
    from distill.callbacks import FIDMonitor, GradientVariance, ProposalPlot

    extra = []
    if cfg.eval.fid_every_steps:
        extra.append(FIDMonitor(cfg, run_dir / "checkpoints"))
    if cfg.logging.proposal_plot_every_steps:
        extra.append(ProposalPlot(run_dir / "plots", cfg.logging.proposal_plot_every_steps))
    if cfg.eval.variance_every_steps:
        extra.append(GradientVariance(cfg.eval.variance_every_steps, cfg.estimator.diagnostic_K))
    trainer = _trainer(cfg, run_dir, extra, "distill fit")
    _log_config(trainer, cfg)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    if trainer.is_global_zero and module.step >= module.max_steps:  # (fewer: stopped by SIGUSR1 to be requeued)
        print(f"\ndone: {module.step} steps in {time.perf_counter() - t0:.1f} s", flush=True)
        print(f"  samples:     {run_dir / 'samples'}  (newest: step_{module.step:07d}.png)")
        print(f"  checkpoints: {run_dir / 'checkpoints'}  (last.ckpt)")
        print(f"  metrics:     {run_dir / 'metrics.csv'}")
        if cfg.logging.wandb == "offline":
            print(f"  W&B (offline): wandb sync {run_dir / 'wandb'}/offline-run-*")
    return 0


def _fit_data(cfg, module, seed: int):
    from distill.data import ShardDataModule, read_meta
    from distill.synthetic import MixtureDataModule

    world = cfg.trainer.devices * cfg.trainer.num_nodes
    per_device = cfg.data.batch_size // world
    if cfg.teacher.kind == "gmm":
        mixture = module.teacher.mixture
        return MixtureDataModule(mixture.sample, per_device, seed=seed)
    meta = read_meta(cfg.data.path)
    from distill.teachers import sample_shape_of

    shape = tuple(sample_shape_of(module.teacher))
    data_shape = (int(meta["channels"]), *map(int, meta["resolution"]))
    if data_shape != shape:
        raise DistillError(f"data.path {cfg.data.path!r} holds samples of shape {data_shape}; the teacher "
                           f"{cfg.teacher.path!r} expects {shape} (channels, height, width)")
    n_cls = module.teacher.num_classes
    if n_cls is not None and int(meta["num_classes"]) > n_cls:
        raise DistillError(f"data.path {cfg.data.path!r} has {meta['num_classes']} classes; the teacher "
                           f"{cfg.teacher.path!r} knows {n_cls} (labels 0..{n_cls - 1})")
    from distill.data import first_sample

    image, label = first_sample(cfg.data.path)  # meta.json could lie: check what the shards really hold
    if tuple(image.shape) != shape:
        raise DistillError(f"data.path {cfg.data.path!r}: its samples are {tuple(image.shape)}, meta.json says "
                           f"{data_shape} and the teacher expects {shape}; expected shards written for this teacher")
    if n_cls is not None and not 0 <= label < n_cls:
        raise DistillError(f"data.path {cfg.data.path!r}: a sample has label {label}; the teacher "
                           f"{cfg.teacher.path!r} knows labels 0..{n_cls - 1}")
    return ShardDataModule(cfg.data.path, per_device, num_workers=cfg.data.num_workers, seed=seed,
                           shuffle_buffer=cfg.data.shuffle_buffer)


def cmd_teacher(args: argparse.Namespace) -> int:
    cfg, run_dir = _load_run_config("TeacherTrainConfig", args)
    if cfg is None:
        return 0

    import lightning as L

    from distill.data import ShardDataModule, read_meta
    from distill.pretrain import TeacherModule
    from distill.plots import save_atomic

    meta = read_meta(cfg.data.path)
    shape = (int(meta["channels"]), *map(int, meta["resolution"]))
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = TeacherModule(cfg, shape, int(meta["num_classes"]))
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    ckpt, step = _resume(run_dir)
    datamodule = ShardDataModule(cfg.data.path, cfg.data.batch_size // world, num_workers=cfg.data.num_workers,
                                 seed=_data_seed(cfg.trainer.seed, step), shuffle_buffer=cfg.data.shuffle_buffer)
    _start_run(cfg, run_dir, step)
    trainer = _trainer(cfg, run_dir, [], "distill teacher")
    _log_config(trainer, cfg)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    seconds = time.perf_counter() - t0
    if trainer.is_global_zero and module.step >= module.max_steps:  # (fewer: stopped by SIGUSR1 to be requeued)
        out = module.save_teacher(cfg.out, extra={"train_seconds_this_invocation": round(seconds, 1),
                                                  "command": " ".join(["distill", *sys.argv[1:]])})
        save_atomic(module.sample_image(), out / "samples.png")
        print(f"\ndone: {module.step} steps in {seconds:.1f} s; teacher saved to {out} "
              f"(unet/, scheduler/, samples.png with {cfg.sample_steps} DDIM steps)", flush=True)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from distill.data import write_digits_shards, write_folder_shards

    if not 0 < args.val_fraction < 1:
        raise DistillError(f"--val-fraction {args.val_fraction}: expected a fraction in (0, 1)")
    if args.shard_size < 1:
        raise DistillError(f"--shard-size {args.shard_size}: expected an integer >= 1")
    if args.data_command == "digits":
        meta = write_digits_shards(args.out, args.val_fraction, args.seed, args.shard_size)
    else:
        meta = write_folder_shards(args.src, args.out, channels=args.channels, resolution=args.resolution,
                                   val_fraction=args.val_fraction, seed=args.seed, shard_size=args.shard_size)
    print(f"wrote {meta['train']} train and {meta['val']} val samples ({meta['num_classes']} classes, "
          f"{meta['channels']}x{meta['resolution'][0]}x{meta['resolution'][1]}) to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from distill.bench import bench_variance, format_table, unbiased, write_json
    from distill.config import FitConfig, load_config

    cfg = load_config(FitConfig, args.config, args.overrides)
    if args.replicates < 2:
        raise DistillError(f"--replicates {args.replicates}: expected an integer >= 2")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        raise DistillError(f"--ckpt {args.ckpt!r} does not exist; expected a checkpoint file (runs/.../last.ckpt)")
    result = bench_variance(cfg, args.ckpt, args.replicates, args.warmup_steps, device=args.device,
                            config_path=args.config, overrides=args.overrides)
    print(format_table(result))
    print(f"\nunbiased (every mean within 3 standard errors of the baseline's): {unbiased(result)}")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from distill.data import iterate_split, read_meta
    from distill.metrics import compute_stats, extractor_for, save_stats

    meta = read_meta(args.data)
    dim = int(meta["channels"]) * int(meta["resolution"][0]) * int(meta["resolution"][1])
    extractor = extractor_for(args.features, args.features_path, args.inception_weights, num_features=dim)
    stats = compute_stats(extractor, iterate_split(args.data, args.split, batch_size=256),
                          max_samples=args.max_samples, progress=True)
    save_stats(args.out, stats)
    print(f"wrote {args.out}: {stats['n']} samples of {args.data} ({args.split}), features {stats['extractor_id']}")
    return 0


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fid_process_group():
    """(rank, world, device): launched by torchrun with WORLD_SIZE > 1, every process takes its share of the
    samples (one GPU each, or gloo on the CPU) and the feature statistics are all-reduced."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def cmd_fid(args: argparse.Namespace) -> int:
    import math

    from distill import evaluate as ev
    from distill.metrics import compute_stats, extractor_for, frechet_distance, load_stats

    if args.num_samples < 2:
        raise DistillError(f"--num-samples {args.num_samples}: expected an integer >= 2")
    if not Path(args.ref).is_file():
        raise DistillError(f"--ref {args.ref!r} does not exist; expected reference statistics from `distill stats`")
    rank, world, device = _fid_process_group()
    device = device or _device(args.device)
    ckpts = ev.list_checkpoint_files(args.path)
    folder = ckpts[0].parent
    results_path = folder / ev.RESULTS_FILE
    done = {(r["path"], r["model"], r["samples"], r["extractor"]) for r in ev.read_results(results_path)}
    start, count = ev.rank_share(args.num_samples, rank, world)
    rows = []
    for ckpt in (ckpts if args.teacher_steps is None else ckpts[-1:]):
        module, step = ev.load_checkpoint_module(ckpt, device)
        cfg = module.cfg
        shape = module.sample_shape()
        extractor = extractor_for(args.features or cfg.eval.features, args.features_path or cfg.eval.features_path,
                               args.inception_weights or cfg.eval.inception_weights,
                               num_features=math.prod(shape)).to(device)
        ref = load_stats(args.ref, expected_extractor_id=extractor.extractor_id, num_features=extractor.num_features)
        if args.teacher_steps is not None:
            model = f"teacher-{args.teacher_steps}step"
            path = str(cfg.teacher.path if cfg.teacher.kind == "diffusers" else "gmm")
            batches = ev.teacher_batches(module.teacher, shape, count, args.batch_size, args.teacher_steps,
                                         cfg.teacher.guidance_scale, args.seed, device, start=start)
        else:
            model, path = "ema-1step", str(ckpt)
            batches = ev.generator_batches(module.ema, shape, getattr(module.teacher, "num_classes", None), count,
                                           args.batch_size, args.seed, device, start=start)
        if (path, model, str(args.num_samples), extractor.extractor_id) in done:
            if rank == 0:
                print(f"skipping {path} ({model}): already in {results_path}")
            continue
        fake, seconds = ev.timed(compute_stats, extractor, batches, progress=rank == 0)
        if world > 1:
            fake = ev.merge_stats(fake)
        fid = frechet_distance(fake["mu"], fake["sigma"], ref["mu"], ref["sigma"])
        row = {"path": path, "step": "" if args.teacher_steps is not None else step, "model": model, "fid": fid,
               "samples": fake["n"], "extractor": extractor.extractor_id, "seconds": round(seconds, 2)}
        rows.append(row)
        if rank == 0:
            ev.append_result(results_path, row)
    if rank != 0:
        return 0
    print(ev.format_results(ev.read_results(results_path)))
    print(f"results: {results_path}" + (f" ({world} processes)" if world > 1 else ""))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if rows and not args.no_wandb:
        _log_fid_to_wandb(folder, rows)
    return 0


def _log_fid_to_wandb(folder: Path, rows: list[dict]) -> None:
    """A W&B run of job type `fid`, grouped with the training run (same id file), offline unless WANDB_MODE says."""
    run_dir = folder.parent if folder.name == "checkpoints" else folder
    id_file = run_dir / "wandb_id.txt"
    if not id_file.is_file():
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "distill"), group=id_file.read_text().strip(),
                     job_type="fid", dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                     name=f"{run_dir.name}-fid")
    table = wandb.Table(columns=list(rows[0].keys()), data=[list(r.values()) for r in rows])
    run.log({"fid/results": table, **{f"fid/{r['model']}": r["fid"] for r in rows[-1:]}})
    run.finish()


def cmd_classifier(args: argparse.Namespace) -> int:
    from distill.metrics import train_digits_classifier

    info = train_digits_classifier(args.data, args.out, steps=args.steps, seed=args.seed)
    print(f"saved {args.out}/classifier.pt: val accuracy {info['val_accuracy']:.4f}, features {info['extractor_id']}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from distill.slurm import cmd_submit as submit

    return submit(args)


COMMANDS = {"fit": cmd_fit, "teacher": cmd_teacher, "data": cmd_data, "bench": cmd_bench, "stats": cmd_stats,
            "fid": cmd_fid, "classifier": cmd_classifier, "submit": cmd_submit}


def _quiet_known_noise() -> None:
    """Silence messages that are expected here and say nothing to the user."""
    import logging
    import warnings

    for message in (r"Found \d+ module\(s\) in eval mode",  # the frozen teacher and the EMA copy, on purpose
                    r".*weights_only.*", r".*LeafSpec.*", r".*anonymous setting.*",
                    r"The `srun` command is available"):  # Lightning, on a node with SLURM installed
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # "accelerate not found": harmless here
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.getMessage()).startswith("💡"))  # advertisements for other products


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_known_noise()
    try:
        return COMMANDS[args.command](args)
    except DistillError as e:
        print(f"distill {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
