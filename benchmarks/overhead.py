"""Framework overhead: `distill fit` against a bare PyTorch loop of the same math.

The bare loop (`--bare N`, run as its own process) does what one DMD2 training step needs and nothing else: the same
UNet teacher, generator and fake score; one generator forward per step, reused by the fake-score update; the
generator updated every `ttur` steps (one (t, eps) draw per sample, the DMD integrand, the surrogate loss); AdamW
(fused, as distill uses), gradient clipping, the EMA. No Lightning, no callbacks, no logging, no checkpoints.

Per-step wall time is the difference of an S_long-step and an S_short-step run of the same command divided by
S_long - S_short, so that start-up (imports, loading, cost measurement) cancels. distill runs with
configs/digits.yaml at batch 32, ttur 5, K = 1, W&B and the in-loop FID off, and everything else it does by default
(CSV every 10 steps, sample grids, progress bar, checkpoints). The pairs are interleaved and repeated; the ratio's
95% interval comes from a bootstrap over the repeats. Prints a table and writes JSON; never passes or fails.

    python benchmarks/overhead.py --repeats 3 --json benchmarks/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTILL_ARGS = ["data.batch_size=32", "optim.ttur=5", "estimator.K=1", "logging.wandb=disabled",
                "eval.fid_every_steps=0"]


def bare_loop(steps: int, batch: int = 32, ttur: int = 5) -> None:
    """The same math as `distill fit --config configs/digits.yaml` (see the module docstring)."""
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
    for step in range(steps):
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


def _timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the child) of one command. CPU time does not count time the
    machine gave to others (steal, other processes), so it is the steadier measure on a shared machine."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _commands(kind: str, steps: int, data: Path, tmp: Path) -> list[str]:
    if kind == "bare":
        return [sys.executable, __file__, "--bare", str(steps)]
    run_dir = tmp / f"run-{steps}-{random.getrandbits(32):08x}"
    return [sys.executable, "-m", "distill", "fit", "--config", "configs/digits.yaml", f"run.dir={run_dir}",
            f"data.path={data}", f"trainer.max_steps={steps}", *DISTILL_ARGS]


def _per_step(times: dict, short: int, long: int) -> dict[str, float]:
    R = len(times[("bare", long)])
    return {k: (sum(times[(k, long)]) - sum(times[(k, short)])) / R / (long - short) for k in ("bare", "distill")}


def _bootstrap_ratio(times: dict, short: int, long: int, draws: int = 2000) -> list[float]:
    rng = random.Random(0)
    R = len(times[("bare", long)])
    out = []
    for _ in range(draws):
        pick = [rng.randrange(R) for _ in range(R)]
        per = {k: (sum(times[(k, long)][i] for i in pick) - sum(times[(k, short)][i] for i in pick)) / R / (long - short)
               for k in ("bare", "distill")}
        out.append(per["distill"] / per["bare"])
    out.sort()
    return [out[int(0.025 * draws)], out[int(0.975 * draws) - 1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bare", type=int, metavar="STEPS", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each command [3]")
    ap.add_argument("--short", type=int, default=10, help="steps of the short run [10]")
    ap.add_argument("--long", type=int, default=210, help="steps of the long run [210]")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    if args.bare is not None:
        bare_loop(args.bare)
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory(prefix="distill-overhead-") as tmp:
        tmp = Path(tmp)
        data = tmp / "digits"
        subprocess.run([sys.executable, "-m", "distill", "data", "digits", "--out", str(data)], cwd=REPO, env=env,
                       check=True, capture_output=True)
        times: dict = {}
        cpu: dict = {}
        for r in range(args.repeats):
            for kind in ("bare", "distill"):
                for steps in (args.short, args.long):
                    wall, cpu_s = _timed(_commands(kind, steps, data, tmp), env)
                    times.setdefault((kind, steps), []).append(wall)
                    cpu.setdefault((kind, steps), []).append(cpu_s)
                    print(f"repeat {r + 1}/{args.repeats}: {kind:>7} {steps:>4} steps {wall:6.1f} s wall, "
                          f"{cpu_s:6.1f} s CPU", flush=True)
    per, per_cpu = _per_step(times, args.short, args.long), _per_step(cpu, args.short, args.long)
    ratio, ratio_cpu = per["distill"] / per["bare"], per_cpu["distill"] / per_cpu["bare"]
    lo, hi = _bootstrap_ratio(times, args.short, args.long)
    lo_c, hi_c = _bootstrap_ratio(cpu, args.short, args.long)
    import torch

    result = {"per_step_seconds": per, "ratio": ratio, "ratio_ci95": [lo, hi],
              "per_step_cpu_seconds": per_cpu, "ratio_cpu": ratio_cpu, "ratio_cpu_ci95": [lo_c, hi_c],
              "repeats": args.repeats, "short_steps": args.short, "long_steps": args.long,
              "distill_args": DISTILL_ARGS, "times": {f"{k}-{s}": v for (k, s), v in times.items()},
              "cpu_times": {f"{k}-{s}": v for (k, s), v in cpu.items()},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip()}
    print(f"\n| loop | s/step (wall) | s/step (CPU) |\n|---|---|---|\n"
          f"| bare PyTorch | {per['bare']:.4f} | {per_cpu['bare']:.4f} |\n"
          f"| distill fit | {per['distill']:.4f} | {per_cpu['distill']:.4f} |")
    print(f"\nratio distill / bare: wall {ratio:.3f} (95% bootstrap interval [{lo:.3f}, {hi:.3f}]), CPU time "
          f"{ratio_cpu:.3f} ([{lo_c:.3f}, {hi_c:.3f}]), {args.repeats} repeats")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
