"""Means over seeds of the ablation (benchmarks/ablation.sh writes one JSON per seed), with 95% intervals.

For each variant: the mean FID over the seeds that ran it, its t-interval, and the paired differences to the
teacher (student - teacher; below zero = the student beats the teacher) and to the one-step DMD student of the same
seed, each with its t-interval; prompt accuracy likewise where the teacher is text-to-image. With
two or three seeds the intervals are wide; they are printed as they come. A fit marked `wall_time_shared` (its cores
were shared) counts for its FID, not for the wall-time mean. Prints a table and writes JSON.

    python benchmarks/ablation_summary.py [--config digits|t2i-digits]
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# two-sided 95% quantiles of Student's t, by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
ORDER = ["dmd", "gan", "four", "four_gan", "four_lr"]
LABELS = {"dmd": "DMD only (one step)", "gan": "+ GAN", "four": "four steps", "four_gan": "four steps + GAN",
          "four_lr": "four steps, lr_generator 2e-5"}


def mean_ci(xs: list[float]) -> tuple[float, list[float] | None]:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, None
    h = T975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / len(xs) ** 0.5
    return m, [m - h, m + h]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="digits", choices=["digits", "t2i-digits"], help="the teacher [digits]")
    ap.add_argument("--results", help="the per-seed JSON files (a glob) "
                    "[benchmarks/results/ablation-CONFIG-seed*.json]")
    ap.add_argument("--json", help="write here [benchmarks/results/ablation-CONFIG.json]")
    args = ap.parse_args()
    args.results = args.results or str(REPO / f"benchmarks/results/ablation-{args.config}-seed*.json")
    args.json = args.json or str(REPO / f"benchmarks/results/ablation-{args.config}.json")
    runs = [json.loads(Path(p).read_text()) for p in sorted(glob.glob(args.results))]
    if not runs:
        raise SystemExit(f"no results match {args.results}: run `bash benchmarks/ablation.sh SEED` first")
    fmt = lambda m, ci: f"{m:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")  # noqa: E731
    for r in runs:  # the digits seeds written before the text-to-image teacher's were always 50 steps
        r.setdefault("teacher_fid", r.get("teacher_50step_fid"))
        r.setdefault("teacher_steps", 50)
    teacher = [r["teacher_fid"] for r in runs]
    teacher_acc = [r["teacher_prompt_accuracy"] for r in runs if r.get("teacher_prompt_accuracy") is not None]
    rows = []
    for name in ORDER:
        per = [(r["seed"], v, r["teacher_fid"]) for r in runs for v in r["variants"] if v["variant"] == name]
        if not per:
            continue
        fid, fid_ci = mean_ci([v["fid"] for _, v, _ in per])
        gap, gap_ci = mean_ci([v["fid"] - t for _, v, t in per])
        dmd = {r["seed"]: v["fid"] for r in runs for v in r["variants"] if v["variant"] == "dmd"}
        paired = [v["fid"] - dmd[seed] for seed, v, _ in per if seed in dmd]
        vs_dmd, vs_dmd_ci = mean_ci(paired) if paired and name != "dmd" else (None, None)
        # a fit whose cores were shared (marked `wall_time_shared` in its JSON) keeps its FID, not its wall time
        clean = [float(v["fit_seconds"]) for _, v, _ in per if not v.get("wall_time_shared")]
        secs, secs_ci = mean_ci(clean) if clean else (None, None)  # None: every fit of it shared its cores
        rows.append({"variant": name, "seeds": [s for s, _, _ in per], "fid": fid, "fid_ci95": fid_ci,
                     "minus_teacher": gap, "minus_teacher_ci95": gap_ci, "minus_dmd": vs_dmd,
                     "minus_dmd_ci95": vs_dmd_ci, "fit_seconds": secs,
                     "fit_seconds_ci95": secs_ci, "fids": [v["fid"] for _, v, _ in per]})
        accs = [v["prompt_accuracy"] for _, v, _ in per if v.get("prompt_accuracy") is not None]
        if accs:
            rows[-1]["prompt_accuracy"], rows[-1]["prompt_accuracy_ci95"] = mean_ci(accs)
    t_mean, t_ci = mean_ci(teacher)
    text = bool(teacher_acc)
    acc_fmt = lambda m, ci: f"{m:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")  # noqa: E731
    print("| variant | seeds | FID, mean [95% interval] | student - teacher, paired | - DMD only, paired | "
          + ("prompt accuracy | " if text else "") + "fit wall time |\n|---|---|---|---|---|---|"
          + ("---|" if text else ""))
    for r in rows:
        acc = f"{acc_fmt(r['prompt_accuracy'], r['prompt_accuracy_ci95'])} | " if "prompt_accuracy" in r else \
            ("| " if text else "")
        print(f"| {LABELS[r['variant']]} | {len(r['seeds'])} | {fmt(r['fid'], r['fid_ci95'])} | "
              f"{fmt(r['minus_teacher'], r['minus_teacher_ci95'])} | "
              f"{fmt(r['minus_dmd'], r['minus_dmd_ci95']) if r['minus_dmd'] is not None else ''} | "
              f"{acc}{'shared' if r['fit_seconds'] is None else format(r['fit_seconds'], '.0f') + ' s'} |")
    same = len(set(teacher)) == 1  # its samples do not depend on the fit's seed
    steps = runs[0]["teacher_steps"]
    t_acc = f"{acc_fmt(*mean_ci(teacher_acc))} | " if text else ""
    print(f"| teacher, {steps} DDIM steps | {len(teacher)} | {fmt(t_mean, None if same else t_ci)}"
          f"{' (the same for every seed)' if same else ''} | | | {t_acc}|")
    result = {"variants": rows, "teacher_fid": t_mean, "teacher_fid_ci95": t_ci, "teacher_steps": steps,
              "teacher_prompt_accuracy": mean_ci(teacher_acc)[0] if text else None,
              "seeds": [r["seed"] for r in runs], "commits": sorted({r["commit"] for r in runs}),
              "interval": "t-interval over seeds (two-sided 95%)", "protocol": runs[0]["protocol"]}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
