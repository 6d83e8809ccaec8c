"""SLURM jobs: render the sbatch templates of slurm/ and submit them (`distill submit`).

A template is a bash script with `{{name}}` placeholders. `render` fills them in; an `#SBATCH` line whose value is
empty (None or "") is left out, so one template serves jobs with and without GPUs, partition, account or time
limit. Values for `#SBATCH` lines go in verbatim (sbatch does not read them through a shell); values for the
script's body are quoted with shlex by the builders here (the `*_q` placeholders).

Training jobs launch one `distill fit` per task with `srun`; Lightning reads the rank layout from SLURM, which
needs `--nodes` and `--ntasks-per-node` (not `--ntasks` alone), with trainer.devices = tasks per node and
trainer.num_nodes = nodes, and one task per GPU (--gpus-per-node = --ntasks-per-node); a job without GPUs is pinned to
trainer.accelerator=cpu. On SIGUSR1 (`--signal=SIGUSR1@90`, or `scancel --signal=USR1 JOB`) the job checkpoints and
requeues itself; the requeued job runs the same script, and `distill fit` resumes from the newest checkpoint. So a
time limit must outlast that warning, and the job reads a snapshot of its config written at submit time
(RUN_DIR/slurm/train-<timestamp>.yaml, next to the script), not the YAML file the user may go on editing.

No torch or Lightning here: `distill --help` builds this parser.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time as _time
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import DistillError
from distill.runs import CKPT_GLOB

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "slurm"
START_LOCAL_CLUSTER = "bash slurm/local-cluster.sh start"

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
# `#SBATCH --signal=[{R|B}:]SIG[@SECONDS]`: SLURM sends SIG that many seconds (default 60) before the time limit
_SIGNAL = re.compile(r"^#SBATCH[ \t]+--signal[= ](?:[RB]{1,2}:)?\w+(?:@(\d+))?[ \t]*$", re.M)


def time_seconds(value: str) -> int:
    """A SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS) in seconds; 0 is SLURM's "no limit"."""
    m = _TIME.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise DistillError(f"--time {value!r}: expected a SLURM time limit such as HH:MM:SS, MM or D-HH:MM:SS")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # HH:MM:SS
        return a * 3600 + b * 60 + c
    return a * 60 + (b or 0)  # MM, MM:SS


def _check_time_outlasts_signal(time: str | None, script: str) -> None:
    """A job signalled SIGUSR1 N s before its limit must be given more than N s, or it requeues as soon as it
    starts (the warning comes from the rendered script, so a copied template with its own --signal counts)."""
    m = _SIGNAL.search(script)
    if not time or m is None:
        return
    seconds, warning = time_seconds(time), int(m[1] or 60)
    if 0 < seconds <= warning:  # 0: no time limit, no warning
        raise DistillError(f"--time {time!r} is {seconds} s, but the job is sent its checkpoint-and-requeue signal "
                           f"{warning} s before the limit ({m[0].split()[-1]}), so it would requeue as soon as it "
                           f"started; expected a time limit longer than {warning} s (MM counts minutes: --time 30 "
                           f"is 30 minutes)")


def render(template_path: str | Path, **values) -> str:
    """The template with every `{{name}}` replaced by str(values[name]); `#SBATCH` lines with an empty value are
    dropped. A placeholder without a value is an error; values the template does not use are ignored."""
    path = Path(template_path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DistillError(f"sbatch template {str(path)!r} cannot be read ({e.strerror}); expected a file such as "
                           f"slurm/train.sbatch") from None
    missing = sorted(set(_PLACEHOLDER.findall(text)) - values.keys())
    if missing:
        raise DistillError(f"sbatch template {str(path)!r} has placeholders with no value: "
                           f"{', '.join('{{' + m + '}}' for m in missing)}; expected only {sorted(values)}")
    lines = []
    for line in text.splitlines(keepends=True):
        names = _PLACEHOLDER.findall(line)
        if line.lstrip().startswith("#SBATCH") and any(values[n] in (None, "") for n in names):
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: "" if values[m[1]] is None else str(values[m[1]]), line))
    return "".join(lines)


def _sbatch_value(option: str, value, expected: str = "a plain name") -> str | None:
    """A value for an `#SBATCH` line: sbatch splits those lines itself, so no whitespace or quotes; `%` would be
    read as a filename pattern (%j)."""
    if value in (None, ""):
        return None
    value = str(value)
    if re.search(r"[\s\"'\\%]", value):
        raise DistillError(f"{option} {value!r}: an #SBATCH line cannot hold whitespace, quotes, backslashes or '%'; "
                           f"expected {expected}")
    return value


def _common_values(*, job_name: str, nodes: int, ntasks_per_node: int, gpus_per_node: int, cpus_per_task: int,
                   time: str | None, partition: str | None, account: str | None, dependency: str | None,
                   log: Path, workdir: Path, python: str) -> dict:
    for option, value, low in (("--nodes", nodes, 1), ("--ntasks-per-node", ntasks_per_node, 1),
                               ("--gpus-per-node", gpus_per_node, 0), ("--cpus-per-task", cpus_per_task, 1)):
        if not isinstance(value, int) or value < low:
            raise DistillError(f"{option} {value!r}: expected an integer >= {low}")
    if time:
        time_seconds(time)
    if gpus_per_node and gpus_per_node != ntasks_per_node:
        why = (f"each task drives one GPU, so {gpus_per_node - ntasks_per_node} GPU(s) per node would sit idle"
               if gpus_per_node > ntasks_per_node else "each task needs one GPU of its own (one GPU per task)")
        raise DistillError(f"--gpus-per-node {gpus_per_node} with --ntasks-per-node {ntasks_per_node}: {why}; "
                           f"expected --gpus-per-node equal to --ntasks-per-node (one task per GPU): "
                           f"--gpus-per-node {ntasks_per_node}, or --ntasks-per-node {gpus_per_node}")
    if job_name in ("bash", "interactive"):  # Lightning then assumes an interactive shell and ignores SLURM
        raise DistillError(f"--job-name {job_name!r}: Lightning treats this name as an interactive session and "
                           f"would not use SLURM's ranks; pick another name")
    return {
        "job_name": _sbatch_value("--job-name", job_name),
        "nodes": nodes,
        "ntasks_per_node": ntasks_per_node,
        "gpus_per_node": gpus_per_node or None,
        "cpus_per_task": cpus_per_task,
        "time": _sbatch_value("--time", time),
        "partition": _sbatch_value("--partition", partition),
        "account": _sbatch_value("--account", account),
        "dependency": _sbatch_value("--after", dependency and f"afterok:{dependency}"),
        # the log's name holds SLURM's %j: check the folder
        "log": _sbatch_value("run directory", log.parent, "a run directory path without them") and str(log),
        "workdir_q": shlex.quote(str(workdir)),
        "python_q": shlex.quote(python),
    }


def _pinned(nodes: int, ntasks_per_node: int, gpus_per_node: int, run_dir: Path) -> dict:
    """What the script itself decides: the rank layout, the (absolute) run directory and, with no GPUs, the CPU."""
    cpu = {} if gpus_per_node else {"trainer.accelerator": "cpu"}
    return {**cpu, "trainer.devices": ntasks_per_node, "trainer.num_nodes": nodes, "run.dir": run_dir}


def _train_overrides(overrides: list[str], nodes: int, ntasks_per_node: int, gpus_per_node: int,
                     run_dir: Path) -> list[str]:
    """The user's overrides with the pinned values (`_pinned`) last, replacing the user's own for those keys."""
    pinned = _pinned(nodes, ntasks_per_node, gpus_per_node, run_dir)
    kept = [o for o in overrides if o.partition("=")[0] not in pinned]
    return kept + [f"{k}={v}" for k, v in pinned.items()]


def build_train_script(config_path: str | Path, overrides: list[str], nodes: int, ntasks_per_node: int,
                       gpus_per_node: int, cpus_per_task: int, time: str | None, partition: str | None,
                       account: str | None, run_dir: str | Path, *, job_name: str | None = None,
                       dependency: str | None = None, template: str | Path | None = None,
                       workdir: str | Path | None = None, python: str | None = None) -> str:
    """The sbatch script of a `distill fit` job: `nodes` x `ntasks_per_node` processes launched by srun, each
    running `python -m distill fit --config CONFIG OVERRIDES [trainer.accelerator=cpu] trainer.devices=T
    trainer.num_nodes=N run.dir=RUN` from `workdir` (default: the current directory); accelerator=cpu is pinned
    when `gpus_per_node` is 0. `distill submit` passes its config snapshot and no OVERRIDES."""
    run_dir = Path(run_dir).absolute()
    workdir = Path(workdir or os.getcwd()).absolute()
    values = _common_values(
        job_name=job_name or f"distill-{run_dir.name}", nodes=nodes, ntasks_per_node=ntasks_per_node,
        gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time=time, partition=partition, account=account,
        dependency=dependency, log=run_dir / "slurm-%j.out", workdir=workdir, python=python or sys.executable)
    values["config_q"] = shlex.quote(str(Path(config_path).absolute()))
    values["overrides_q"] = shlex.join(_train_overrides(list(overrides), nodes, ntasks_per_node, gpus_per_node,
                                                        run_dir))
    script = render(template or TEMPLATE_DIR / "train.sbatch", **values)
    _check_time_outlasts_signal(time, script)
    return script


def build_fid_script(run_dir: str | Path, ref: str | Path, num_samples: int, nodes: int = 1, ntasks_per_node: int = 1,
                     gpus_per_node: int = 0, cpus_per_task: int = 1, time: str | None = None,
                     partition: str | None = None, account: str | None = None, *, job_name: str | None = None,
                     dependency: str | None = None, template: str | Path | None = None,
                     workdir: str | Path | None = None, python: str | None = None) -> str:
    """The sbatch script of a `distill fid RUN_DIR --ref REF --num-samples N` job over nodes x ntasks_per_node
    processes (each generates its share of the samples)."""
    run_dir = Path(run_dir).absolute()
    workdir = Path(workdir or os.getcwd()).absolute()
    if not isinstance(num_samples, int) or num_samples < 2:
        raise DistillError(f"--num-samples {num_samples!r}: expected an integer >= 2")
    values = _common_values(
        job_name=job_name or f"distill-fid-{run_dir.name}", nodes=nodes, ntasks_per_node=ntasks_per_node,
        gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time=time, partition=partition, account=account,
        dependency=dependency, log=run_dir / "slurm-fid-%j.out", workdir=workdir, python=python or sys.executable)
    values.update(run_dir_q=shlex.quote(str(run_dir)), ref_q=shlex.quote(str(Path(ref).absolute())),
                  num_samples=num_samples)
    script = render(template or TEMPLATE_DIR / "fid.sbatch", **values)
    _check_time_outlasts_signal(time, script)  # fid.sbatch asks for no signal; a copied template may
    return script


def submission_path(run_dir: str | Path, kind: str = "train") -> Path:
    """RUN_DIR/slurm/KIND-<timestamp>, a name no earlier submission used (with .sbatch: the script; with .yaml: the
    config snapshot of a training job). Creates nothing."""
    folder = Path(run_dir).absolute() / "slurm"
    stamp = _time.strftime("%Y%m%d-%H%M%S")
    base, n = folder / f"{kind}-{stamp}", 1
    while base.with_suffix(".sbatch").exists() or base.with_suffix(".yaml").exists():
        base, n = folder / f"{kind}-{stamp}-{n}", n + 1
    return base


def _write_atomic(path: Path, text: str, run_dir: str | Path, mode: int = 0o644, exclusive: bool = False) -> Path:
    """Write `text` to `path` through a temporary file and a rename (the folder is created: SLURM writes the job's
    log into the run directory and does not create folders). `exclusive`: never replace an existing file (a hard
    link instead of the rename, where the file system has them)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistillError(f"run directory {str(run_dir)!r} cannot be created ({e.strerror}); expected a folder "
                           f"you can write to") from None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        taken = DistillError(f"{path} was written by another submission in the same second; expected a new file: "
                             f"submit again")
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise taken from None
            except OSError:  # a file system without hard links
                if path.exists():
                    raise taken from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_script(script_text: str, run_dir: str | Path, kind: str = "train", path: str | Path | None = None) -> Path:
    """RUN_DIR/slurm/KIND-<timestamp>.sbatch (or `path`), written atomically; the run directory is created."""
    path = Path(path) if path is not None else submission_path(run_dir, kind).with_suffix(".sbatch")
    return _write_atomic(path, script_text, run_dir, 0o755)


def _sbatch_executable() -> str:
    found = shutil.which("sbatch")
    if found is None:
        raise DistillError(f"SLURM's sbatch was not found on PATH; expected a SLURM cluster (load its module), or "
                           f"start a one-node cluster on this machine with `{START_LOCAL_CLUSTER}` (as root)")
    return found


def sbatch(script_path: str | Path) -> str:
    """`sbatch --parsable SCRIPT`: the job id."""
    proc = subprocess.run([_sbatch_executable(), "--parsable", str(script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        hint = f" (is the cluster up? on this machine: `{START_LOCAL_CLUSTER}`)" if "contact" in msg else ""
        raise DistillError(f"sbatch rejected {script_path}: {msg}{hint}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable prints JOBID[;CLUSTER]
    if not re.fullmatch(r"\d+", job_id):
        raise DistillError(f"sbatch printed {proc.stdout.strip()!r} for {script_path}; expected a job id")
    return job_id


def submit(script_text: str, run_dir: str | Path, kind: str = "train") -> str:
    """Write the script to RUN_DIR/slurm/KIND-<timestamp>.sbatch, submit it with `sbatch --parsable` and return
    the job id."""
    _sbatch_executable()  # no SLURM: say so before writing anything
    return sbatch(write_script(script_text, run_dir, kind))


# --------------------------------------------------------------------------------------------------------------
# `distill submit`


def add_submit_parser(subparsers, formatter_class) -> argparse.ArgumentParser:
    """`distill submit`: a training job (--config FILE key=value ...) or a checkpoint evaluation (--fid RUN_DIR)."""
    summary = "submit a training job (or, with --fid, a checkpoint evaluation) to SLURM"
    sp = subparsers.add_parser(
        "submit", help=summary, formatter_class=formatter_class,
        description=textwrap.dedent("""\
            Render slurm/train.sbatch (or slurm/fid.sbatch) into RUN_DIR/slurm/ and submit it with sbatch.
            Each of nodes x ntasks-per-node tasks runs one `distill fit` (srun), with trainer.devices =
            ntasks-per-node and trainer.num_nodes = nodes; data.batch_size stays the global batch. One task per
            GPU: --gpus-per-node equals --ntasks-per-node; without GPUs the job runs on CPUs
            (trainer.accelerator=cpu). The job log goes to RUN_DIR/slurm-JOBID.out. The config is checked before
            anything is submitted, and the resolved config (file and key=value overrides) is saved next to the
            script as RUN_DIR/slurm/train-<timestamp>.yaml: the job, and every requeue of it, reads that
            snapshot, so editing the YAML file after submitting changes nothing.

            Preemption: 90 s before the time limit, or on `scancel --signal=USR1 JOBID`, the job writes a
            checkpoint at the end of the current step and requeues itself; the requeued job resumes from it
            with the same step count, metrics.csv and W&B run id."""),
        epilog=textwrap.dedent(f"""\
            examples:
              distill submit --config configs/digits.yaml run.dir=runs/big --nodes 2 --ntasks-per-node 4 \\
                  --gpus-per-node 4 --time 24:00:00 --partition gpu
              distill submit --config configs/gmm.yaml trainer.accelerator=cpu --ntasks-per-node 2 --dry-run
              distill submit --fid runs/big --ref data/digits/ref-digits.npz --after 12345
            no cluster? try it on this machine: {START_LOCAL_CLUSTER}  (as root; `stop` to end)"""))
    sp.add_argument("--config", metavar="FILE", help="YAML config of the training run (see configs/); required "
                                                     "unless --fid")
    sp.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides for the training run, e.g. trainer.max_steps=10000 run.dir=runs/x")
    sp.add_argument("--fid", metavar="RUN_DIR",
                    help="instead of training, evaluate RUN_DIR's checkpoints (`distill fid RUN_DIR`) in a job")
    sp.add_argument("--ref", metavar="FILE", help="with --fid: reference statistics (.npz from `distill stats`)")
    sp.add_argument("--num-samples", type=int, default=1000, metavar="N",
                    help="with --fid: generated samples per FID, split over the tasks [1000]")
    sp.add_argument("--nodes", type=int, metavar="N",
                    help="nodes (sets trainer.num_nodes) [trainer.num_nodes of the config; 1 with --fid]")
    sp.add_argument("--ntasks-per-node", type=int, metavar="T",
                    help="processes per node, one per GPU (sets trainer.devices) [trainer.devices of the config; "
                         "1 with --fid]")
    sp.add_argument("--gpus-per-node", type=int, metavar="G",
                    help="GPUs per node, one per task: equal to --ntasks-per-node; 0 asks for none and runs the job "
                         "on CPUs (trainer.accelerator=cpu) [T when trainer.accelerator is gpu or cuda, else 0]")
    sp.add_argument("--cpus-per-task", type=int, metavar="C",
                    help="CPUs per process, also its torch threads [data.num_workers + 1; 1 with --fid]")
    sp.add_argument("--time", metavar="HH:MM:SS",
                    help="time limit (SLURM formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS), longer than "
                         "90 s: the job checkpoints and requeues 90 s before it [the partition's default]")
    sp.add_argument("--partition", metavar="P", help="SLURM partition [the cluster's default]")
    sp.add_argument("--account", metavar="A", help="SLURM account to charge [your default]")
    sp.add_argument("--job-name", metavar="NAME", help="job name in squeue [distill-RUN or distill-fid-RUN]")
    sp.add_argument("--after", metavar="JOBID",
                    help="start only after job JOBID has completed successfully (afterok), e.g. --fid after training")
    sp.add_argument("--template", metavar="FILE",
                    help="sbatch template to render instead of slurm/train.sbatch or slurm/fid.sbatch (copy one and "
                         "add your module loads)")
    sp.add_argument("--dry-run", action="store_true",
                    help="print the rendered script (and the config snapshot's path); write and submit nothing")
    return sp


def _gpus_default(gpus: int | None, accelerator: str, ntasks_per_node: int) -> int:
    if gpus is not None:
        return gpus
    return ntasks_per_node if accelerator in ("gpu", "cuda") else 0


def _check_layout(option: str, given: int | None, key: str, configured: int) -> int:
    if given is None:
        return configured
    if given != configured and configured != 1:
        raise DistillError(f"{option} {given} disagrees with {key}={configured}; give one of them (the job sets "
                           f"{key} from {option})")
    return given


def _check_accelerator(accelerator: str, gpus: int, tasks: int) -> None:
    """The config's trainer.accelerator against the GPUs the job asks SLURM for."""
    if accelerator == "mps":
        raise DistillError("trainer.accelerator=mps: Apple GPUs are not SLURM GPUs; expected cpu, or gpu with "
                           f"--gpus-per-node {tasks}")
    if gpus and accelerator == "cpu":
        raise DistillError(f"--gpus-per-node {gpus} with trainer.accelerator=cpu: the GPUs would sit idle; expected "
                           f"one of them: leave out --gpus-per-node for a CPU job, or set trainer.accelerator=gpu "
                           f"(or auto)")
    if not gpus and accelerator in ("gpu", "cuda"):
        raise DistillError(f"--gpus-per-node 0 with --ntasks-per-node {tasks} and trainer.accelerator={accelerator}: "
                           f"expected one GPU per task (--gpus-per-node {tasks}), or trainer.accelerator=cpu")


@dataclass
class _Job:
    kind: str  # train | fid
    script: str
    run_dir: Path
    layout: str  # for the user: "N node(s) x T task(s)"
    script_path: Path  # where a submission writes the script
    snapshot: tuple[Path, str] | None = None  # a training job's config snapshot: path and YAML text
    notes: list[str] = field(default_factory=list)  # one line each, for the user


def _train_job(args: argparse.Namespace) -> _Job:
    from distill.config import FitConfig, load_config, to_yaml

    if args.config is None:
        raise DistillError("a training job needs --config FILE (e.g. configs/digits.yaml); or --fid RUN_DIR to "
                           "evaluate checkpoints")
    cfg = load_config(FitConfig, args.config, args.overrides)
    nodes = _check_layout("--nodes", args.nodes, "trainer.num_nodes", cfg.trainer.num_nodes)
    tasks = _check_layout("--ntasks-per-node", args.ntasks_per_node, "trainer.devices", cfg.trainer.devices)
    gpus = _gpus_default(args.gpus_per_node, cfg.trainer.accelerator, tasks)
    _check_accelerator(cfg.trainer.accelerator, gpus, tasks)
    run_dir = Path(cfg.run.dir).absolute()
    # the config the job runs (e.g. the batch must divide by N*T): the snapshot it reads, pinned values included
    job_cfg = load_config(FitConfig, args.config, _train_overrides(list(args.overrides), nodes, tasks, gpus, run_dir))
    base = submission_path(run_dir, "train")
    snapshot = base.with_suffix(".yaml")
    script = build_train_script(snapshot, [], nodes, tasks, gpus, args.cpus_per_task or cfg.data.num_workers + 1,
                                args.time, args.partition, args.account, run_dir, job_name=args.job_name,
                                dependency=args.after, template=args.template)
    notes = [] if gpus else [f"no GPUs asked for: the job runs on CPUs (trainer.accelerator=cpu); pass "
                             f"--gpus-per-node N for N GPUs per node (N = --ntasks-per-node, {tasks})"]
    return _Job("train", script, run_dir, f"{nodes} node(s) x {tasks} task(s)", base.with_suffix(".sbatch"),
                (snapshot, to_yaml(job_cfg)), notes)


def _fid_job(args: argparse.Namespace) -> _Job:
    run_dir = Path(args.fid).absolute()
    if args.ref is None:
        raise DistillError("--fid needs --ref FILE: reference statistics from `distill stats`")
    if args.overrides or args.config:
        raise DistillError("--fid evaluates a finished or running training run; it takes no --config or key=value "
                           f"(got {' '.join(([args.config] if args.config else []) + args.overrides)})")
    if not Path(args.ref).is_file():
        raise DistillError(f"--ref {args.ref!r} does not exist; expected reference statistics from `distill stats`")
    if not run_dir.is_dir():
        raise DistillError(f"--fid {args.fid!r} does not exist; expected a run directory")
    if args.after is None and not any((run_dir / "checkpoints").glob(CKPT_GLOB)):
        raise DistillError(f"--fid {args.fid!r} holds no checkpoints/{CKPT_GLOB} yet; expected a run directory "
                           f"with checkpoints (or add --after JOBID to wait for its training job)")
    accelerator = "cpu"
    if (run_dir / "config.yaml").is_file():
        from distill.config import FitConfig, load_config

        try:
            accelerator = load_config(FitConfig, run_dir / "config.yaml").trainer.accelerator
        except DistillError:
            pass  # only a default is taken from it; `distill fid` reads the checkpoint's own config
    nodes, tasks = args.nodes or 1, args.ntasks_per_node or 1
    script = build_fid_script(run_dir, args.ref, args.num_samples, nodes, tasks,
                              _gpus_default(args.gpus_per_node, accelerator, tasks), args.cpus_per_task or 1,
                              args.time, args.partition, args.account, job_name=args.job_name,
                              dependency=args.after, template=args.template)
    return _Job("fid", script, run_dir, f"{nodes} node(s) x {tasks} task(s)",
                submission_path(run_dir, "fid").with_suffix(".sbatch"))


def cmd_submit(args: argparse.Namespace) -> int:
    """`distill submit`: check, render, and submit (or print, with --dry-run) one sbatch script."""
    if args.ref is not None and args.fid is None:
        raise DistillError("--ref is for --fid RUN_DIR (evaluating checkpoints); training jobs take none")
    if args.after is not None and not re.fullmatch(r"\d+(_\d+)?", args.after):
        raise DistillError(f"--after {args.after!r}: expected a job id such as 12345")
    job = _train_job(args) if args.fid is None else _fid_job(args)
    for note in job.notes:  # on stderr: --dry-run's stdout is the script alone
        print(f"distill submit: {note}", file=sys.stderr)
    if args.dry_run:
        print(job.script, end="")
        if job.snapshot:
            print(f"distill submit: dry run, nothing written; the job would read its config from {job.snapshot[0]}",
                  file=sys.stderr)
        return 0
    _sbatch_executable()  # no SLURM: say so before writing anything
    if job.snapshot:
        # exclusive: the job reads it when it starts (sbatch copies the script at once), so a submission to the
        # same run directory in the same second must not replace it
        _write_atomic(job.snapshot[0], job.snapshot[1], job.run_dir, exclusive=True)
    path = write_script(job.script, job.run_dir, job.kind, job.script_path)
    job_id = sbatch(path)
    log = job.run_dir / (f"slurm-{job_id}.out" if job.kind == "train" else f"slurm-fid-{job_id}.out")
    print(f"submitted {job.kind} job {job_id} ({job.layout})")
    print(f"  script: {path}")
    if job.snapshot:
        print(f"  config: {job.snapshot[0]}   (what the job reads, requeues included)")
    print(f"  log:    {log}")
    print(f"  watch:  squeue -j {job_id}; tail -f {shlex.quote(str(log))}")
    print(f"  stop:   scancel {job_id}   (checkpoint and requeue now: scancel --signal=USR1 {job_id})"
          if job.kind == "train" else f"  stop:   scancel {job_id}")
    return 0


def requeue_job() -> bool:
    """Put the SLURM job this process runs in back in the queue (`scontrol requeue`, what Lightning's auto-requeue
    runs): SLURM ends it and starts the same script again. False, with a line on stderr, when that fails."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        print("distill: not in a SLURM job (no SLURM_JOB_ID): nothing to requeue", file=sys.stderr, flush=True)
        return False
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        ok, why = proc.returncode == 0, " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
    except FileNotFoundError:
        ok, why = False, "scontrol not found"
    if not ok:
        print(f"distill: `scontrol requeue {job}` failed ({why}); submit the same job again to resume from the "
              f"checkpoint", file=sys.stderr, flush=True)
    return ok
