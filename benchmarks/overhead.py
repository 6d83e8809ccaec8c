"""Framework overhead: `distill fit` against a bare PyTorch loop of the same math.

The bare loop (`--bare N`, run as its own process) does what one DMD2 training step needs and nothing else: the same
UNet teacher, generator and fake score; one generator forward per step, reused by the fake-score update; the
generator updated every `ttur` steps (one (t, eps) draw per sample, the DMD integrand, the surrogate loss); AdamW
(fused, as distill uses), gradient clipping, the EMA. No Lightning, no callbacks, no logging, no checkpoints.

Per-step wall time is measured inside each process, between the end of step S_short and the end of step S_long, so
that start-up (imports, loading, the cost measurement) is not counted: for distill, the difference of its logged
`time/elapsed_seconds` at the two steps (distill.callbacks.StepTimer: everything between steps counts: data,
callbacks, logging); for the bare loop, the same two points. That is the quantity the difference of an S_long-step and
an S_short-step run estimates, without the start-up's jitter (seconds from run to run on 2 cores, which made that
estimator's interval about +-8% at 8 repeats). distill runs with configs/digits.yaml at batch 32, ttur 5, K = 1, W&B
and the in-loop FID off, and everything else it does by default (CSV every 10 steps, progress bar). Each repeat runs
both, in alternating order. Two figures per loop and repeat: the mean step over the 200 steps, and the median of the
twenty 10-step windows, which the VM's bursts of stolen time (a few windows of a run, up to 40% slower) move far
less; every window holds the same work (one CSV flush), so the median still counts the framework's per-step cost.
Each ratio is of the means over repeats, with a 95% bootstrap interval (pairs of runs resampled). Prints a table
and writes JSON; never passes or fails.

    python benchmarks/overhead.py --repeats 10 --json benchmarks/results/overhead.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTILL_ARGS = ["data.batch_size=32", "optim.ttur=5", "estimator.K=1", "logging.wandb=disabled",
                "eval.fid_every_steps=0"]


def bare_loop(steps: int, mark: int, batch: int = 32, ttur: int = 5) -> list[float]:
    """The same math as `distill fit --config configs/digits.yaml` (see the module docstring); returns the clock
    (perf_counter seconds) at the end of steps mark, mark + 10, ..., steps (counted from 1, as distill counts)."""
    import copy

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # "accelerate not found": harmless here
    import torch

    from distill.config import FitConfig, load_config
    from distill.losses import denoising_loss, dmd_grad, dmd_loss
    from distill.teachers import Generator, ema_update, load_diffusers_teacher, sample_shape_of, trainable_copy

    cfg = load_config(FitConfig, REPO / "configs/digits.yaml", [f"data.path={REPO / 'data'}"])  # DMD reads no data
    torch.manual_seed(0)
    teacher = load_diffusers_teacher(REPO / cfg.teacher.path).requires_grad_(False).eval()
    fake = trainable_copy(teacher)
    gen = Generator(trainable_copy(teacher), cfg.generator.t_init)
    ema = copy.deepcopy(gen).requires_grad_(False).eval()
    o = cfg.optim
    kw = dict(betas=tuple(o.betas), weight_decay=o.weight_decay, fused=True)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=o.lr_generator, **kw)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=o.lr_fake_score, **kw)
    shape, T, C = (batch, *sample_shape_of(teacher)), teacher.T, teacher.num_classes
    lo, hi = int(0.02 * T), min(int(0.98 * T), T - 1)
    marks = []
    for step in range(steps):
        if step >= mark and step % 10 == 0:  # `step` steps done
            marks.append(time.perf_counter())
        z = torch.randn(shape)
        labels = torch.randint(0, C, (batch,))
        update_g = step % ttur == 0
        with torch.set_grad_enabled(update_g):
            x = gen(z, labels)
        if update_g:
            t = torch.randint(lo, hi + 1, (batch,))
            with torch.no_grad():
                x_t = teacher.schedule.add_noise(x.detach(), torch.randn_like(x), t)
                g = dmd_grad(x.detach(), teacher(x_t, t, labels, guidance_scale=cfg.teacher.guidance_scale),
                             fake(x_t, t, labels))
            loss = dmd_loss(x, g).mean()
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gen.parameters(), o.grad_clip)
            opt_g.step()
            ema_update(ema, gen, cfg.generator.ema_decay, step // ttur)
        x0 = x.detach()
        t_f = torch.randint(0, T, (batch,))
        x_t = teacher.schedule.add_noise(x0, torch.randn_like(x0), t_f)
        loss_f = denoising_loss(fake(x_t, t_f, labels), x0, fake.loss_weight(t_f, x0)).mean()
        opt_f.zero_grad(set_to_none=True)
        loss_f.backward()
        torch.nn.utils.clip_grad_norm_(fake.parameters(), o.grad_clip)
        opt_f.step()
    return marks + [time.perf_counter()]


def _run(kind: str, short: int, long: int, data: Path, tmp: Path, env: dict) -> tuple[list[float], float]:
    """(the wall seconds of each 10-step window between the end of step `short` and the end of step `long`, the
    process's wall seconds)."""
    if kind == "bare":
        cmd = [sys.executable, __file__, "--bare", str(long), str(short)]
    else:
        run_dir = tmp / f"run-{random.getrandbits(32):08x}"
        cmd = [sys.executable, "-m", "distill", "fit", "--config", "configs/digits.yaml", f"run.dir={run_dir}",
               f"data.path={data}", f"trainer.max_steps={long}", *DISTILL_ARGS]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    if kind == "bare":
        clock = json.loads(r.stdout.strip().splitlines()[-1])
    else:
        with open(run_dir / "metrics.csv", newline="") as fh:
            elapsed = {int(row["step"]): float(row["time/elapsed_seconds"]) for row in csv.DictReader(fh)}
        clock = [elapsed[s] for s in range(short, long + 1, 10)]
    return [b - a for a, b in zip(clock, clock[1:])], wall


def _bootstrap_ratio(per: dict, draws: int = 4000) -> list[float]:
    """95% interval of sum(distill) / sum(bare) over the repeats, the repeats (pairs) resampled."""
    rng = random.Random(0)
    R = len(per["bare"])
    out = []
    for _ in range(draws):
        pick = [rng.randrange(R) for _ in range(R)]
        out.append(sum(per["distill"][i] for i in pick) / sum(per["bare"][i] for i in pick))
    out.sort()
    return [out[int(0.025 * draws)], out[int(0.975 * draws) - 1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bare", type=int, nargs=2, metavar=("STEPS", "MARK"), help=argparse.SUPPRESS)  # the child
    ap.add_argument("--repeats", type=int, default=10, help="repeats, each running both loops [10]")
    ap.add_argument("--short", type=int, default=10, help="timing starts at the end of this step [10]")
    ap.add_argument("--long", type=int, default=210, help="and ends at the end of this one (the run's length) [210]")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--add-to", metavar="JSON", help="pool with the repeats of an earlier result of this script (same "
                    "steps and distill arguments; its commit is kept in `commits`): more repeats across sittings")
    args = ap.parse_args()
    if args.bare is not None:
        print(json.dumps(bare_loop(*args.bare)))
        return
    if args.long % 10 or args.short % 10:
        ap.error("--short and --long must be multiples of 10 (distill logs every 10 steps)")
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    windows: dict = {"bare": [], "distill": []}  # per repeat, the 10-step windows' seconds
    walls: dict = {"bare": [], "distill": []}
    commits = []
    if args.add_to:
        prev = json.loads(Path(args.add_to).read_text())
        if "window_seconds" not in prev or (prev["short_steps"], prev["long_steps"], prev["distill_args"]) != (
                args.short, args.long, DISTILL_ARGS):
            ap.error(f"--add-to {args.add_to}: not a result of this script with --short {args.short} --long "
                     f"{args.long} and distill arguments {DISTILL_ARGS}")
        windows, walls = prev["window_seconds"], prev["process_wall_seconds"]
        commits = prev.get("commits", [prev["commit"]])
    with tempfile.TemporaryDirectory(prefix="distill-overhead-") as tmp:
        tmp = Path(tmp)
        data = tmp / "digits"
        subprocess.run([sys.executable, "-m", "distill", "data", "digits", "--out", str(data)], cwd=REPO, env=env,
                       check=True, capture_output=True)
        for r in range(args.repeats):
            for kind in (("bare", "distill") if r % 2 == 0 else ("distill", "bare")):
                w, wall = _run(kind, args.short, args.long, data, tmp, env)
                windows[kind].append(w)
                walls[kind].append(wall)
                print(f"repeat {r + 1}/{args.repeats}: {kind:>7} {sum(w) / len(w) / 10:.4f} s/step mean, "
                      f"{statistics.median(w) / 10:.4f} median of 10-step windows (process {wall:5.1f} s)", flush=True)
    R = len(windows["bare"])
    # per repeat: the mean step (all windows) and the median 10-step window (robust to the VM's bursts of stolen
    # time, which hit a few windows of a run; every window holds one CSV flush, so the median still counts it)
    per = {k: [sum(w) / len(w) / 10 for w in v] for k, v in windows.items()}
    per_median = {k: [statistics.median(w) / 10 for w in v] for k, v in windows.items()}
    mean = {k: sum(v) / R for k, v in per.items()}
    median = {k: sum(v) / R for k, v in per_median.items()}
    ratio, ratio_median = mean["distill"] / mean["bare"], median["distill"] / median["bare"]
    lo, hi = _bootstrap_ratio(per)
    lo_m, hi_m = _bootstrap_ratio(per_median)
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {"per_step_seconds": mean, "ratio": ratio, "ratio_ci95": [lo, hi],
              "per_step_seconds_median_window": median, "ratio_median_window": ratio_median,
              "ratio_median_window_ci95": [lo_m, hi_m], "repeats": R,
              "short_steps": args.short, "long_steps": args.long, "distill_args": DISTILL_ARGS,
              "window_seconds": windows, "process_wall_seconds": walls,
              "method": "in-process wall time of the 10-step windows from the end of step short to the end of step "
                        "long (distill: time/elapsed_seconds); per repeat the mean step and the median window; "
                        "ratio of the means over repeats; bootstrap over repeats",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "commit": commit, "commits": sorted(set(commits) | {commit})}
    print(f"\n| loop | s/step, steps {args.short + 1}-{args.long} (mean over {R} repeats) | s/step, median "
          f"10-step window |\n|---|---|---|\n| bare PyTorch | {mean['bare']:.4f} | {median['bare']:.4f} |\n"
          f"| distill fit | {mean['distill']:.4f} | {median['distill']:.4f} |")
    print(f"\nratio distill / bare: {ratio:.3f} (95% bootstrap interval [{lo:.3f}, {hi:.3f}]); median windows "
          f"{ratio_median:.3f} ([{lo_m:.3f}, {hi_m:.3f}]); {R} repeats")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
