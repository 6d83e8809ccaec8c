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
from distill.runs import PROTOCOL_SEED

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
              distill export runs/my-run --out students/my-run
            Run `distill COMMAND --help` for every option of a command."""))
    from distill import __version__

    p.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, schema, summary in (
        ("fit", "FitConfig", "distil a teacher into a one-step generator (DMD2); re-running resumes"),
        ("teacher", "TeacherTrainConfig", "train a small diffusers teacher on shards: a class-conditional UNet "
                                          "(kind unet), or a latent text-to-image Stable Diffusion pipeline (kind t2i)"),
    ):
        sp = sub.add_parser(name, help=summary, description=summary + ".", formatter_class=_Formatter,
                            epilog=_config_help(schema))
        sp.add_argument("--config", metavar="FILE", help="YAML config (see configs/); defaults apply without it")
        sp.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. trainer.max_steps=100 run.dir=runs/x")
        sp.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        sp.add_argument("--allow-change", action="append", metavar="KEY",
                        help="resume although KEY (e.g. estimator.K) differs from the run's config, and apply the new "
                             "value from the resumed step on; repeat it or give a comma list, `all` for every key. "
                             "Without it a resumed run refuses changes to keys that change the math")
        if name == "teacher":
            sp.add_argument("--overwrite", action="store_true",
                            help="write the trained teacher into `out` even if that folder already holds files")

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
                    "against the baseline at equal compute, and the oracle ECM; each variance cut and ECM with its "
                    "95% bootstrap interval over the replicates, the ceiling (sigma_b2 + sigma_w2) / sigma_b2 that no "
                    "estimator of the family passes and each one's fraction of it, and a heavy-tail flag where a "
                    "few replicates hold most of a variance. A multi-step student (generator.timesteps) is measured "
                    "at the step training draws, by backward simulation.",
        epilog=_config_help("FitConfig"))
    bv.add_argument("--config", metavar="FILE", help="YAML config of the run (configs/digits.yaml, configs/gmm.yaml)")
    bv.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    bv.add_argument("--ckpt", metavar="PATH", help="checkpoint to measure at (default: a short warm-up run)")
    bv.add_argument("--replicates", type=int, default=32, metavar="R", help="gradient estimates per estimator [32]")
    bv.add_argument("--warmup-steps", type=int, default=200, metavar="S",
                    help="steps of the warm-up run when no --ckpt is given [200]")
    bv.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (a GPU when there is one) [cpu]")
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
                                    "not yet evaluated on this protocol (reference statistics by content, "
                                    "extractor, samples, seed, teacher steps and guidance) is evaluated (EMA "
                                    "one-step generator, balanced labels, fixed noise) and appended as a row to "
                                    "the folder's fid_results.csv. --teacher-steps S evaluates the run's teacher "
                                    "with an S-step DDIM sampler instead, on the same protocol. Results are also "
                                    "logged into the run's own W&B run (offline unless WANDB_MODE says).")
    fd.add_argument("path", metavar="PATH", help="checkpoint file, run directory, or checkpoints folder")
    fd.add_argument("--ref", required=True, metavar="FILE", help="reference statistics (.npz from `distill stats`)")
    fd.add_argument("--num-samples", type=int, default=1000, metavar="N", help="generated samples per FID [1000]")
    fd.add_argument("--features", default=None, choices=("digits", "inception", "raw"),
                    help="extractor [the run's eval.features]")
    fd.add_argument("--features-path", metavar="FILE",
                    help="digits classifier weights, for digits features [the run's eval.features_path]")
    fd.add_argument("--inception-weights", metavar="FILE",
                    help="Inception weights, for inception features [eval.inception_weights, env "
                         "DISTILL_INCEPTION_WEIGHTS]")
    fd.add_argument("--teacher-steps", type=int, default=None, metavar="S",
                    help="evaluate the teacher with S >= 1 DDIM steps instead of the checkpoints")
    fd.add_argument("--teacher", metavar="FOLDER",
                    help="the run's teacher folder, where it is now (a moved teacher, or a run whose config "
                         "stored a relative teacher.path) [the run's teacher.path]")
    fd.add_argument("--batch-size", type=int, default=250, metavar="B", help="samples per call [250]")
    fd.add_argument("--seed", type=int, default=PROTOCOL_SEED,
                    help=f"noise seed of the protocol, the in-loop fid/ema's too [{PROTOCOL_SEED}]")
    fd.add_argument("--device", default="auto",
                    help="cpu, cuda, cuda:N or auto; under torchrun/srun cuda and auto take cuda:LOCAL_RANK, cpu "
                         "keeps every process on the CPU [auto]")
    fd.add_argument("--json", metavar="OUT", help="also write this call's rows as JSON")
    fd.add_argument("--no-wandb", action="store_true", help="do not log the results to W&B")

    from distill.slurm import add_submit_parser

    add_submit_parser(sub, _Formatter)
    from distill.export import add_export_parser

    add_export_parser(sub, _Formatter)

    cl = sub.add_parser("classifier", help="train the small digits classifier used as the digits FID feature",
                        formatter_class=_Formatter)
    cl.add_argument("--data", required=True, metavar="SHARDS", help="digits shards (train and val splits)")
    cl.add_argument("--out", required=True, metavar="DIR", help="output folder (classifier.pt, classifier.json)")
    cl.add_argument("--steps", type=int, default=2000, help="training steps [2000]")
    cl.add_argument("--seed", type=int, default=0, help="seed [0]")

    data = sub.add_parser("data", help="write webdataset shards (digits, images, prompts, captioned images, latents)",
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
    pr = dsub.add_parser(
        "prompts", help="a text file with one prompt per line (the data of a text-to-image teacher)",
        formatter_class=_Formatter,
        description=textwrap.fill(
            "SRC: UTF-8 text (a byte-order mark is fine), one prompt per line, surrounding whitespace stripped; "
            "blank lines are skipped and counted. Writes samples <key>.txt, the key line-<n> naming the prompt's "
            "line in SRC. Bad input (a missing or empty file, no prompt, bytes that are not UTF-8) stops it with one "
            "line naming the file and the line.", 108))
    pr.add_argument("--src", required=True, metavar="FILE.txt", help="the prompt file")
    c = dsub.add_parser(
        "captions", help="images with a caption beside each (x.png + x.txt)", formatter_class=_Formatter,
        description=textwrap.fill(
            "SRC/x.png|jpg|jpeg with SRC/x.txt (the same stem; subfolders are not searched) -> samples <key>.png + "
            "<key>.txt. An image without its caption, a caption without its image, an unreadable image and a blank "
            "or non-UTF-8 caption are skipped, each named on stderr and counted in meta.json.", 108))
    c.add_argument("--src", required=True, metavar="FOLDER", help="folder of images and their .txt captions")
    la = dsub.add_parser(
        "latents", help="latents of image or caption shards, encoded once by a latent teacher's VAE (GAN real data)",
        formatter_class=_Formatter,
        description=textwrap.fill(
            "Encode every image of SHARDS (written by `distill data shards|digits` or `distill data captions`) once "
            "with the frozen VAE of the Stable Diffusion pipeline folder PIPELINE (a posterior draw, scaled as the "
            "UNet sees latents) -> samples <key>.npy (float16) + <key>.cls or <key>.txt, with the same keys and "
            "train/val splits: the real data of DMD2's GAN term for a latent teacher (gan.data). The images must "
            "have the VAE's input size (the UNet's sample_size times the VAE's scale factor) and channels.", 108))
    la.add_argument("--teacher", required=True, metavar="PIPELINE", help="Stable Diffusion (1.x/2.x or XL) pipeline "
                    "folder whose VAE encodes")
    la.add_argument("--src", required=True, metavar="SHARDS", help="image shards (with labels) or caption shards")
    la.add_argument("--out", required=True, metavar="DIR", help="output folder (must be new or empty, unless "
                    "--overwrite)")
    la.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per VAE call [64]")
    la.add_argument("--seed", type=int, default=0, help="seed of the VAE posterior draws [0]")
    la.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (a GPU when there is one) [cpu]")
    la.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty output folder (only once the new one is complete)")
    for sp in (f, pr, c):  # each has its --src; what they share
        sp.add_argument("--out", required=True, metavar="DIR", help="output folder (must hold no shards yet)")
        if sp is not pr:
            sp.add_argument("--channels", type=int, default=3, choices=(1, 3), help="1 (grayscale) or 3 (RGB) [3]")
            sp.add_argument("--resolution", type=int, default=None, metavar="R",
                            help="resize to R x R (bicubic); default: keep the size (all images must match)")
        _shard_options(sp)
    return p


def _shard_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="fraction held out as val [0.1]")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed before the split [0]")
    p.add_argument("--shard-size", type=int, default=500, metavar="N", help="samples per shard [500]")


# --------------------------------------------------------------------------------------------------------------


def _load_run_config(schema_name: str, args: argparse.Namespace):
    """The resolved config of a training command; None when --print-config only asked to see it."""
    from distill import config

    cfg = config.load_config(getattr(config, schema_name), args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        return None
    return cfg


def cmd_fit(args: argparse.Namespace) -> int:
    cfg = _load_run_config("FitConfig", args)
    if cfg is None:
        return 0
    from distill.train import fit

    return fit(cfg, allow_changes=_allowed(args)).exit_code


def cmd_teacher(args: argparse.Namespace) -> int:
    cfg = _load_run_config("TeacherTrainConfig", args)
    if cfg is None:
        return 0
    from distill.train import train_teacher

    return train_teacher(cfg, allow_changes=_allowed(args), overwrite=args.overwrite).exit_code


def _allowed(args: argparse.Namespace) -> list[str]:
    return [k.strip() for item in args.allow_change or [] for k in item.split(",") if k.strip()]


def cmd_data(args: argparse.Namespace) -> int:
    from distill import data

    if args.data_command == "latents":
        if args.batch_size < 1:
            raise DistillError(f"--batch-size {args.batch_size}: expected an integer >= 1")
        meta = data.write_latent_shards(args.teacher, args.src, args.out, batch_size=args.batch_size, seed=args.seed,
                                        device=args.device, overwrite=args.overwrite)
        what = f"{meta['num_classes']} classes" if "num_classes" in meta else "with captions"
        print(f"wrote {meta['train']} train and {meta['val']} val latents ({what}, "
              f"{'x'.join(map(str, meta['latent_shape']))} {meta['dtype']}, largest float16 round-trip error "
              f"{meta['float16_max_abs_error']:.2g}) to {args.out}, encoded from {args.src} by the VAE of "
              f"{args.teacher}")
        return 0
    if not 0 < args.val_fraction < 1:
        raise DistillError(f"--val-fraction {args.val_fraction}: expected a fraction in (0, 1)")
    if args.shard_size < 1:
        raise DistillError(f"--shard-size {args.shard_size}: expected an integer >= 1")
    split = dict(val_fraction=args.val_fraction, seed=args.seed, shard_size=args.shard_size)
    if args.data_command == "prompts":
        meta = data.write_prompt_shards(args.src, args.out, **split)
        print(f"wrote {meta['train']} train and {meta['val']} val prompts to {args.out}; skipped "
              f"{meta['skipped_blank']} blank lines of {args.src}")
        return 0
    if args.data_command == "captions":
        meta = data.write_caption_shards(args.src, args.out, channels=args.channels, resolution=args.resolution,
                                         **split)
        print(f"wrote {meta['train']} train and {meta['val']} val image-caption pairs ({meta['channels']}x"
              f"{meta['resolution'][0]}x{meta['resolution'][1]}) to {args.out}")
        no_caption, no_image, bad_images, bad_captions = (meta[key] for key in (
            "images_without_caption", "captions_without_image", "skipped_images", "skipped_captions"))
        if no_caption or no_image or bad_images or bad_captions:
            print(f"skipped {no_caption} images without a caption, {no_image} captions without an image, {bad_images} "
                  f"unreadable images and {bad_captions} blank or unreadable captions (each named on stderr; counted "
                  f"in {args.out}/meta.json)")
        return 0
    if args.data_command == "digits":
        meta = data.write_digits_shards(args.out, **split)
    else:
        meta = data.write_folder_shards(args.src, args.out, channels=args.channels, resolution=args.resolution, **split)
    print(f"wrote {meta['train']} train and {meta['val']} val samples ({meta['num_classes']} classes, "
          f"{meta['channels']}x{meta['resolution'][0]}x{meta['resolution'][1]}) to {args.out}")
    if meta.get("skipped_images") or meta.get("skipped_classes"):
        print(f"skipped {meta.get('skipped_images', 0)} unreadable images and {len(meta.get('skipped_classes', []))} "
              f"class folders without a readable image (each named on stderr; listed in {args.out}/meta.json)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from distill.bench import bench_variance, check_bench_options, format_table, unbiased, write_json
    from distill.config import FitConfig, load_config

    device = check_bench_options(args.replicates, args.warmup_steps, args.device, args.ckpt)
    cfg = load_config(FitConfig, args.config, args.overrides)
    result = bench_variance(cfg, args.ckpt, args.replicates, args.warmup_steps, device=str(device),
                            config_path=args.config, overrides=args.overrides)
    print(format_table(result))
    print(f"\nunbiased (every mean within 3 standard errors of the baseline's): {unbiased(result)}")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from distill.data import iterate_split, read_meta
    from distill.metrics import compute_stats, extractor_for, refuse_unused_weights, save_stats

    refuse_unused_weights(args.features, f"--features {args.features}", args.features_path, args.inception_weights)
    meta = read_meta(args.data)
    dim = int(meta["channels"]) * int(meta["resolution"][0]) * int(meta["resolution"][1])
    extractor = extractor_for(args.features, args.features_path, args.inception_weights, num_features=dim)
    stats = compute_stats(extractor, iterate_split(args.data, args.split, batch_size=256),
                          max_samples=args.max_samples, progress=True)
    save_stats(args.out, stats)
    print(f"wrote {args.out}: {stats['n']} samples of {args.data} ({args.split}), features {stats['extractor_id']}")
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    from distill.evaluate import fid_command

    return fid_command(args.path, args.ref, num_samples=args.num_samples, features=args.features,
                       features_path=args.features_path, inception_weights=args.inception_weights,
                       teacher_steps=args.teacher_steps, teacher=args.teacher, batch_size=args.batch_size,
                       seed=args.seed, device=args.device, json_out=args.json, wandb=not args.no_wandb)


def cmd_classifier(args: argparse.Namespace) -> int:
    from distill.metrics import train_digits_classifier

    info = train_digits_classifier(args.data, args.out, steps=args.steps, seed=args.seed)
    print(f"saved {args.out}/classifier.pt: val accuracy {info['val_accuracy']:.4f}, features {info['extractor_id']}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from distill.slurm import cmd_submit as submit

    return submit(args)


def cmd_export(args: argparse.Namespace) -> int:
    from distill.export import cmd_export as export

    return export(args)


COMMANDS = {"fit": cmd_fit, "teacher": cmd_teacher, "data": cmd_data, "bench": cmd_bench, "stats": cmd_stats,
            "fid": cmd_fid, "classifier": cmd_classifier, "submit": cmd_submit, "export": cmd_export}


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
    finally:  # every process leaves through one clean teardown (see distill.distributed)
        if "torch" in sys.modules:
            from distill import distributed

            distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
