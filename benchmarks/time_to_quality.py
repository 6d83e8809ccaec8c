"""Time to quality: FID against training wall-clock for the DMD2 baseline and CARV, on a config (digits by default).

For each seed and method, `distill fit` writes a checkpoint every --every steps (all kept); `distill fid` then scores
every checkpoint on the demo's protocol (EMA student, digits features, 1,000 samples, data/digits/ref-digits.npz;
for a text-to-image config also the prompt accuracy: the digits classifier reads the digit each prompt names), and
each checkpoint's training wall time is the run's `time/elapsed_seconds` at that step (training only: start-up
and the FID evaluations are not in it; checkpoint writes are, equally for both). From the curves:

- the baseline's final FID per seed, and the wall time CARV needs to reach it (linear between checkpoints; `null`
  when it never does), as a ratio to the baseline's own time (the issue's target: at most 0.7), with its t-interval
  over seeds;
- FID at the baseline's final wall time (CARV's curve interpolated there), paired per seed.

Run it with nothing else on the machine: the numbers are wall-clock. Prints a table, writes JSON and a plot.

    python benchmarks/time_to_quality.py --seeds 0 1 2        (after `make data`; about 10 min a seed on 2 cores)
    python benchmarks/time_to_quality.py --config configs/t2i-digits.yaml --seeds 0 1 2   (about 15 min a seed)
    python benchmarks/time_to_quality.py --summarise-only     (re-read the runs under --root)
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from ablation_summary import mean_ci  # noqa: E402

METHODS = {
    "baseline": [],  # configs/digits.yaml as shipped: K = 1, uniform, iid (DMD2)
    "carv": ["estimator.K=auto", "estimator.proposal=adaptive", "estimator.stratify=per_sample",
             "estimator.diagnostic_every=10", "estimator.auto_every=10"],
}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}); see {log}")


def curve(run_dir: Path) -> list[dict]:
    """[(step, elapsed seconds, FID, prompt accuracy or None)] for every scored checkpoint of a run, by step."""
    elapsed = {}
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("time/elapsed_seconds"):
                elapsed[int(float(row["step"]))] = float(row["time/elapsed_seconds"])
    points = {}
    with open(run_dir / "checkpoints" / "fid_results.csv") as f:
        for row in csv.DictReader(f):
            if row.get("teacher_steps"):
                continue
            step = int(row["step"])
            if step in elapsed:
                acc = row.get("prompt_accuracy")
                points[step] = {"step": step, "seconds": elapsed[step], "fid": float(row["fid"]),
                                "prompt_accuracy": float(acc) if acc not in (None, "") else None}
    return [points[s] for s in sorted(points)]


def time_to(points: list[dict], target: float) -> float | None:
    """The first wall time at which the curve reaches FID <= target (linear between checkpoints)."""
    prev = None
    for p in points:
        if p["fid"] <= target:
            if prev is None:
                return p["seconds"]
            frac = (prev["fid"] - target) / (prev["fid"] - p["fid"])
            return prev["seconds"] + frac * (p["seconds"] - prev["seconds"])
        prev = p
    return None


def fid_at(points: list[dict], seconds: float, key: str = "fid") -> float | None:
    """The curve's FID (or another `key`) at a wall time (linear between checkpoints; None past its end)."""
    for a, b in zip(points, points[1:]):
        if a["seconds"] <= seconds <= b["seconds"]:
            return a[key] + (seconds - a["seconds"]) / (b["seconds"] - a["seconds"]) * (b[key] - a[key])
    return None


def plot(curves: dict, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("fid", "FID (digits features, 1,000 samples)")]
    if any(p["prompt_accuracy"] is not None for pts in curves.values() for p in pts):
        keys.append(("prompt_accuracy", "prompt accuracy (digits classifier)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    colours = {"baseline": "tab:blue", "carv": "tab:orange"}
    for ax, (key, label) in zip(axes[0], keys):
        for (method, seed), pts in sorted(curves.items()):
            ax.plot([p["seconds"] for p in pts], [p[key] for p in pts], marker="o", ms=3, color=colours[method],
                    alpha=0.8, label=f"{method}" if seed == min(s for m, s in curves if m == method) else None)
        ax.set_xlabel("training wall time (s, 2 CPU cores)")
        ax.set_ylabel(label)
        ax.set_title(f"{name}: {key.replace('_', ' ')} against wall-clock, one line per seed", fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits.yaml",
                    help="the run's config [configs/digits.yaml]; configs/t2i-digits.yaml adds prompt accuracy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds [0 1 2]")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run [the config's trainer.max_steps]")
    ap.add_argument("--every", type=int, default=250, help="checkpoint (and FID) every this many steps [250]")
    ap.add_argument("--root", default=None, help="run directories [runs/time-to-quality-NAME, NAME the config's stem]")
    ap.add_argument("--json", default=None, help="write here [benchmarks/results/time-to-quality-NAME.json]")
    ap.add_argument("--plot", default=None, help="and here [benchmarks/results/time-to-quality-NAME.png]")
    ap.add_argument("--summarise-only", action="store_true", help="only read the runs already under --root")
    args = ap.parse_args()
    name = Path(args.config).stem
    if args.steps is None:
        from omegaconf import OmegaConf

        args.steps = int(OmegaConf.load(REPO / args.config).trainer.max_steps)
    args.json = args.json or str(REPO / f"benchmarks/results/time-to-quality-{name}.json")
    args.plot = args.plot or str(REPO / f"benchmarks/results/time-to-quality-{name}.png")
    root = Path(args.root or REPO / f"runs/time-to-quality-{name}")
    root.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    curves = {}
    for seed in args.seeds:
        for method, overrides in METHODS.items():
            run_dir = root / f"{method}-seed{seed}"
            if not args.summarise_only:
                run([py, "-m", "distill", "fit", "--config", args.config, f"run.dir={run_dir}",
                     f"trainer.seed={seed}", f"trainer.max_steps={args.steps}", "logging.wandb=disabled",
                     "logging.progress_bar=false", "logging.samples_every_steps=0", "eval.fid_every_steps=0",
                     f"trainer.checkpoint_every_steps={args.every}", "trainer.keep_checkpoints=1000", *overrides],
                    root / f"{method}-seed{seed}-fit.log")
                run([py, "-m", "distill", "fid", str(run_dir), "--ref", "data/digits/ref-digits.npz", "--no-wandb"],
                    root / f"{method}-seed{seed}-fid.log")
            curves[(method, seed)] = curve(run_dir)
            print(f"seed {seed} {method}: " + ", ".join(
                f"{p['step']}: {p['fid']:.2f}" + (f" ({p['prompt_accuracy']:.3f})" if p["prompt_accuracy"] is not None
                                                  else "") + f" @ {p['seconds']:.0f} s" for p in curves[(method, seed)]))
    per_seed = []
    for seed in args.seeds:
        base, carv = curves[("baseline", seed)], curves[("carv", seed)]
        target, t_base = base[-1]["fid"], base[-1]["seconds"]
        t_carv = time_to(carv, target)
        per_seed.append({"seed": seed, "baseline_final_fid": target, "baseline_seconds": t_base,
                         "carv_final_fid": carv[-1]["fid"], "carv_seconds": carv[-1]["seconds"],
                         "carv_seconds_to_baseline_fid": t_carv,
                         "time_ratio": t_carv / t_base if t_carv is not None else None,
                         "carv_fid_at_baseline_seconds": fid_at(carv, t_base)})
        if base[-1]["prompt_accuracy"] is not None:
            per_seed[-1].update({"baseline_final_accuracy": base[-1]["prompt_accuracy"],
                                 "carv_final_accuracy": carv[-1]["prompt_accuracy"],
                                 "carv_accuracy_at_baseline_seconds": fid_at(carv, t_base, "prompt_accuracy")})
    ratios = [r["time_ratio"] for r in per_seed if r["time_ratio"] is not None]
    diffs = [r["carv_fid_at_baseline_seconds"] - r["baseline_final_fid"] for r in per_seed
             if r["carv_fid_at_baseline_seconds"] is not None]
    summary = {"seeds": args.seeds, "reached": f"{len(ratios)} of {len(per_seed)}",
               "time_ratio": mean_ci(ratios) if ratios else None,
               "fid_diff_at_baseline_time": mean_ci(diffs) if diffs else None,
               "final_fid_diff": mean_ci([r["carv_final_fid"] - r["baseline_final_fid"] for r in per_seed])}
    if "baseline_final_accuracy" in per_seed[0]:
        acc = [r["carv_accuracy_at_baseline_seconds"] - r["baseline_final_accuracy"] for r in per_seed
               if r["carv_accuracy_at_baseline_seconds"] is not None]
        summary["accuracy_diff_at_baseline_time"] = mean_ci(acc) if acc else None
        summary["final_accuracy_diff"] = mean_ci([r["carv_final_accuracy"] - r["baseline_final_accuracy"]
                                                  for r in per_seed])
    print("\n| seed | baseline final FID | baseline time | CARV final FID | CARV time | CARV time to the baseline's FID "
          "| ratio | CARV FID at the baseline's time |\n|---|---|---|---|---|---|---|---|")
    for r in per_seed:
        fmt = lambda v, f, unit="": "never" if v is None else format(v, f) + unit  # noqa: E731
        print(f"| {r['seed']} | {r['baseline_final_fid']:.2f} | {r['baseline_seconds']:.0f} s | "
              f"{r['carv_final_fid']:.2f} | {r['carv_seconds']:.0f} s | {fmt(r['carv_seconds_to_baseline_fid'], '.0f', ' s')} "
              f"| {fmt(r['time_ratio'], '.2f')} | {fmt(r['carv_fid_at_baseline_seconds'], '.2f')} |")
    if "baseline_final_accuracy" in per_seed[0]:
        print("\n| seed | baseline final prompt accuracy | CARV final | CARV at the baseline's time |\n|---|---|---|---|")
        for r in per_seed:
            at = r["carv_accuracy_at_baseline_seconds"]
            print(f"| {r['seed']} | {r['baseline_final_accuracy']:.3f} | {r['carv_final_accuracy']:.3f} | "
                  + ("past its end" if at is None else f"{at:.3f}") + " |")
    for key in ("time_ratio", "fid_diff_at_baseline_time", "final_fid_diff", "accuracy_diff_at_baseline_time",
                "final_accuracy_diff"):
        if summary.get(key):
            m, ci = summary[key]
            print(f"{key}: {m:.3f}" + (f", 95% t-interval [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "config": args.config, "methods": METHODS, "steps": args.steps,
              "every": args.every, "per_seed": per_seed, "summary": summary,
              "curves": {f"{m}-seed{s}": pts for (m, s), pts in curves.items()},
              "protocol": "distill fid on every checkpoint, digits features, 1000 samples, data/digits/ref-digits.npz"
                          " (and prompt accuracy for a text config); wall time = time/elapsed_seconds at the"
                          " checkpoint's step"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    plot(curves, Path(args.plot), name)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
