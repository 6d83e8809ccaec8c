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
    python benchmarks/time_to_quality.py --methods baseline carv carv-fake --fake-ttur 2 5 --keep-scored
                                                              (add CARV on both updates beside runs already scored)
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

CARV = ["estimator.K=auto", "estimator.proposal=adaptive", "estimator.stratify=per_sample",
        "estimator.diagnostic_every=10", "estimator.auto_every=10"]
METHODS = {
    "baseline": [],  # the config as shipped: K = 1, uniform, iid (DMD2)
    "carv": CARV,
    # CARV on both updates: the fake score's K auto, adaptive and stratified too, and optim.ttur from --fake-ttur
    # (the run's carv_fake/ttur_equivalent: docs/method.md §9, "Splitting compute between the updates")
    "carv-fake": CARV + ["fake_score.K=auto", "fake_score.proposal=adaptive", "fake_score.stratify=per_sample"],
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
    palette = iter(["tab:green", "tab:red", "tab:purple", "tab:brown"])
    colours = {"baseline": "tab:blue", "carv": "tab:orange"}
    colours.update({m: next(palette) for m in sorted({m for m, _ in curves}) if m not in colours})
    for ax, (key, label) in zip(axes[0], keys):
        for (method, seed), pts in sorted(curves.items()):
            ax.plot([p["seconds"] for p in pts], [p[key] for p in pts], marker="o", ms=3, color=colours[method],
                    alpha=0.8, label=f"{method}" if seed == min(s for m, s in curves if m == method) else None)
        ax.set_xlabel("training wall time (s, 2 CPU cores)")
        ax.set_ylabel(label + (", log scale" if key == "fid" else ""))
        if key == "fid":  # one diverging method must not flatten the others
            ax.set_yscale("log")
        ax.set_title(f"{name}: {label.split(' (')[0]} against wall-clock, one line per seed", fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(base: list[dict], other: list[dict]) -> dict:
    """One seed: the method's time to the baseline's final FID (and its ratio), its FID (and prompt accuracy) at the
    baseline's final time, and both finals."""
    target, t_base = base[-1]["fid"], base[-1]["seconds"]
    t_other = time_to(other, target)
    row = {"baseline_final_fid": target, "baseline_seconds": t_base, "final_fid": other[-1]["fid"],
           "seconds": other[-1]["seconds"], "seconds_to_baseline_fid": t_other,
           "time_ratio": t_other / t_base if t_other is not None else None,
           "fid_at_baseline_seconds": fid_at(other, t_base)}
    if base[-1]["prompt_accuracy"] is not None:
        row.update({"baseline_final_accuracy": base[-1]["prompt_accuracy"],
                    "final_accuracy": other[-1]["prompt_accuracy"],
                    "accuracy_at_baseline_seconds": fid_at(other, t_base, "prompt_accuracy")})
    return row


def summarise(rows: list[dict]) -> dict:
    """Means with 95% t-intervals over seeds."""
    ratios = [r["time_ratio"] for r in rows if r["time_ratio"] is not None]
    diffs = [r["fid_at_baseline_seconds"] - r["baseline_final_fid"] for r in rows
             if r["fid_at_baseline_seconds"] is not None]
    out = {"reached": f"{len(ratios)} of {len(rows)}", "time_ratio": mean_ci(ratios) if ratios else None,
           "fid_diff_at_baseline_time": mean_ci(diffs) if diffs else None,
           "final_fid_diff": mean_ci([r["final_fid"] - r["baseline_final_fid"] for r in rows]),
           "step_time_ratio": mean_ci([r["seconds"] / r["baseline_seconds"] for r in rows])}
    if "baseline_final_accuracy" in rows[0]:
        acc = [r["accuracy_at_baseline_seconds"] - r["baseline_final_accuracy"] for r in rows
               if r["accuracy_at_baseline_seconds"] is not None]
        out["accuracy_diff_at_baseline_time"] = mean_ci(acc) if acc else None
        out["final_accuracy_diff"] = mean_ci([r["final_accuracy"] - r["baseline_final_accuracy"] for r in rows])
    return out


def print_table(method: str, rows: list[dict], summary: dict) -> None:
    fmt = lambda v, f, unit="": "never" if v is None else format(v, f) + unit  # noqa: E731
    print(f"\n{method} against the baseline\n| seed | baseline final FID | baseline time | {method} final FID | "
          f"{method} time | {method} time to the baseline's FID | ratio | {method} FID at the baseline's time |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['baseline_final_fid']:.2f} | {r['baseline_seconds']:.0f} s | {r['final_fid']:.2f} | "
              f"{r['seconds']:.0f} s | {fmt(r['seconds_to_baseline_fid'], '.0f', ' s')} | {fmt(r['time_ratio'], '.2f')} "
              f"| {fmt(r['fid_at_baseline_seconds'], '.2f')} |")
    if "baseline_final_accuracy" in rows[0]:
        print(f"\n| seed | baseline final prompt accuracy | {method} final | {method} at the baseline's time |\n"
              "|---|---|---|---|")
        for r in rows:
            at = r["accuracy_at_baseline_seconds"]
            print(f"| {r['seed']} | {r['baseline_final_accuracy']:.3f} | {r['final_accuracy']:.3f} | "
                  + ("past its end" if at is None else f"{at:.3f}") + " |")
    for key, value in summary.items():
        if isinstance(value, (tuple, list)):
            m, ci = value
            print(f"{key}: {m:.3f}" + (f", 95% t-interval [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits.yaml",
                    help="the run's config [configs/digits.yaml]; configs/t2i-digits.yaml adds prompt accuracy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds [0 1 2]")
    ap.add_argument("--methods", nargs="+", default=["baseline", "carv"], choices=list(METHODS),
                    help="what to train and compare with the baseline [baseline carv]; carv-fake: CARV on both "
                         "updates, with --fake-ttur")
    ap.add_argument("--fake-ttur", type=int, nargs="+", default=None,
                    help="carv-fake's optim.ttur, one run per value, named carv-fake-tturX [the config's, named "
                         "carv-fake]: e.g. the carv_fake/ttur_equivalent a run logged")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run [the config's trainer.max_steps]")
    ap.add_argument("--every", type=int, default=250, help="checkpoint (and FID) every this many steps [250]")
    ap.add_argument("--root", default=None, help="run directories [runs/time-to-quality-NAME, NAME the config's stem]")
    ap.add_argument("--json", default=None, help="write here [benchmarks/results/time-to-quality-NAME.json]")
    ap.add_argument("--plot", default=None, help="and here [benchmarks/results/time-to-quality-NAME.png]")
    ap.add_argument("--summarise-only", action="store_true", help="only read the runs already under --root")
    ap.add_argument("--keep-scored", action="store_true",
                    help="train and score only the runs under --root that have no scores yet (add a method or seed)")
    args = ap.parse_args()
    if "baseline" not in args.methods:
        ap.error("--methods: the baseline is what the others are compared with; include it")
    name = Path(args.config).stem
    if args.steps is None:
        from omegaconf import OmegaConf

        args.steps = int(OmegaConf.load(REPO / args.config).trainer.max_steps)
    args.json = args.json or str(REPO / f"benchmarks/results/time-to-quality-{name}.json")
    args.plot = args.plot or str(REPO / f"benchmarks/results/time-to-quality-{name}.png")
    root = Path(args.root or REPO / f"runs/time-to-quality-{name}")
    root.mkdir(parents=True, exist_ok=True)
    methods = {}
    for m in args.methods:
        if m == "carv-fake" and args.fake_ttur:
            methods.update({f"{m}-ttur{x}": METHODS[m] + [f"optim.ttur={x}"] for x in args.fake_ttur})
        else:
            methods[m] = METHODS[m]
    py = sys.executable
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    curves, trained_at = {}, {}
    for seed in args.seeds:
        for method, overrides in methods.items():
            run_dir = root / f"{method}-seed{seed}"
            scored = (run_dir / "checkpoints" / "fid_results.csv").exists()
            if not args.summarise_only and not (args.keep_scored and scored):
                run([py, "-m", "distill", "fit", "--config", args.config, f"run.dir={run_dir}",
                     f"trainer.seed={seed}", f"trainer.max_steps={args.steps}", "logging.wandb=disabled",
                     "logging.progress_bar=false", "logging.samples_every_steps=0", "eval.fid_every_steps=0",
                     f"trainer.checkpoint_every_steps={args.every}", "trainer.keep_checkpoints=1000", *overrides],
                    root / f"{method}-seed{seed}-fit.log")
                run([py, "-m", "distill", "fid", str(run_dir), "--ref", "data/digits/ref-digits.npz", "--no-wandb"],
                    root / f"{method}-seed{seed}-fid.log")
                (root / f"{method}-seed{seed}.commit").write_text(commit + "\n")
            stamp = root / f"{method}-seed{seed}.commit"  # the commit that trained it (runs may predate the stamp)
            trained_at[f"{method}-seed{seed}"] = stamp.read_text().strip() if stamp.exists() else None
            curves[(method, seed)] = curve(run_dir)
            print(f"seed {seed} {method}: " + ", ".join(
                f"{p['step']}: {p['fid']:.2f}" + (f" ({p['prompt_accuracy']:.3f})" if p["prompt_accuracy"] is not None
                                                  else "") + f" @ {p['seconds']:.0f} s" for p in curves[(method, seed)]))
    compared = {}
    for method in methods:
        if method == "baseline":
            continue
        rows = [{"seed": seed, **compare(curves[("baseline", seed)], curves[(method, seed)])} for seed in args.seeds]
        compared[method] = {"overrides": methods[method], "per_seed": rows, "summary": summarise(rows)}
        print_table(method, rows, compared[method]["summary"])
    result = {"commit": commit, "trained_at": trained_at, "config": args.config, "seeds": args.seeds, "methods": methods, "steps": args.steps,
              "every": args.every, "compared": compared,
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
