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
    if cfg.logging.wandb != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        from lightning.pytorch.loggers import WandbLogger

        id_file = run_dir / "wandb_id.txt"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            import secrets

            run_id = secrets.token_hex(4)  # W&B run ids: 8 lowercase alphanumerics
            id_file.write_text(run_id + "\n")
        loggers.append(WandbLogger(project=cfg.logging.project, name=cfg.run.name or run_dir.name, id=run_id,
                                   save_dir=str(run_dir), offline=cfg.logging.wandb == "offline", resume="allow",
                                   log_model=False))
    return loggers


def _trainer(cfg, run_dir: Path, callbacks: list, progress_desc: str):
    """The Lightning Trainer with distill's callbacks; `callbacks` adds command-specific ones."""
    import lightning as L

    from distill.callbacks import AtomicCheckpointIO, SampleGrid, StepCheckpoint, StepProgressBar, StepTimer

    t = cfg.trainer
    strategy = t.strategy
    if strategy == "auto" and t.devices * t.num_nodes > 1:
        strategy = "ddp_find_unused_parameters_true"  # the fake-score update leaves G's parameters unused
    callbacks = [
        StepCheckpoint(run_dir / "checkpoints", t.checkpoint_every_steps, t.keep_checkpoints),
        SampleGrid(run_dir / "samples", cfg.logging.samples_every_steps),
        StepTimer(),
        *callbacks,
    ]
    if cfg.logging.progress_bar:
        callbacks.append(StepProgressBar(progress_desc))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_epochs=1, max_steps=-1, logger=_loggers(cfg, run_dir), callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=t.deterministic,
        default_root_dir=str(run_dir), use_distributed_sampler=False,
    )


def _resume(run_dir: Path) -> tuple[Path | None, int]:
    """The newest checkpoint of the run directory and its step (None, 0 for a new run)."""
    from distill.callbacks import find_resume_checkpoint

    ckpt = find_resume_checkpoint(run_dir)
    step = 0
    if ckpt is not None:
        import torch

        try:
            step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["distill"]["step"])
        except Exception as e:  # noqa: BLE001 - any failure to read it is reported the same way
            raise DistillError(f"checkpoint {str(ckpt)!r} cannot be loaded ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); move it away to resume from an older one")
        print(f"resuming from {ckpt} (step {step})", flush=True)
    return ckpt, step


def _data_seed(seed: int, step: int) -> int:
    """The data stream's seed: a resumed run starts a fresh stream rather than replaying the first batches."""
    import numpy as np

    return seed if step == 0 else int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def _is_rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_PROCID", "0"))) == 0 and \
        int(os.environ.get("NODE_RANK", "0")) == 0


def cmd_fit(args: argparse.Namespace) -> int:
    from distill.config import FitConfig, load_config, save_config, to_yaml

    cfg = load_config(FitConfig, args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    run_dir = Path(cfg.run.dir)
    _check_writable(run_dir)

    import lightning as L

    from distill.callbacks import CSVLogger
    from distill.module import DMDModule

    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = DMDModule(cfg)  # loads the teacher: a bad folder fails here, before anything is written
    ckpt, step = _resume(run_dir)
    datamodule = _fit_data(cfg, module, _data_seed(cfg.trainer.seed, step))
    if _is_rank_zero():  # everything is checked: from here on the run directory is written
        _make_run_dir(run_dir)
        print(to_yaml(cfg), end="", flush=True)
        save_config(cfg, run_dir)
        CSVLogger(run_dir / "metrics.csv").truncate_after(step)
    from distill.callbacks import ProposalPlot

    plot_every = cfg.logging.proposal_plot_every_steps
    trainer = _trainer(cfg, run_dir, [ProposalPlot(run_dir / "plots", plot_every)] if plot_every else [],
                       "distill fit")
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    if trainer.is_global_zero:
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
    return ShardDataModule(cfg.data.path, per_device, num_workers=cfg.data.num_workers, seed=seed,
                           shuffle_buffer=cfg.data.shuffle_buffer)


def cmd_teacher(args: argparse.Namespace) -> int:
    from distill.config import TeacherTrainConfig, load_config, save_config, to_yaml

    cfg = load_config(TeacherTrainConfig, args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    run_dir = Path(cfg.run.dir)
    _check_writable(run_dir)

    import lightning as L

    from distill.callbacks import CSVLogger
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
    if _is_rank_zero():
        _make_run_dir(run_dir)
        print(to_yaml(cfg), end="", flush=True)
        save_config(cfg, run_dir)
        CSVLogger(run_dir / "metrics.csv").truncate_after(step)
    trainer = _trainer(cfg, run_dir, [], "distill teacher")
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    seconds = time.perf_counter() - t0
    if trainer.is_global_zero:
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


COMMANDS = {"fit": cmd_fit, "teacher": cmd_teacher, "data": cmd_data, "bench": cmd_bench}


def _quiet_known_noise() -> None:
    """Silence messages that are expected here and say nothing to the user."""
    import logging
    import warnings

    for message in (r"Found \d+ module\(s\) in eval mode",  # the frozen teacher and the EMA copy, on purpose
                    r".*weights_only.*", r".*LeafSpec.*", r".*anonymous setting.*"):
        warnings.filterwarnings("ignore", message=message)
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
