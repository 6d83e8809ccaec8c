#!/usr/bin/env bash
# DMD2's parts on the digits teacher: DMD only / + GAN / four steps / four steps + GAN, each scored like the demo
# (`distill fid` on the last checkpoint against data/digits/ref-digits.npz, digits features, 1,000 samples), beside
# the 50-step teacher. Prints a table and writes JSON (one seed per call; run it per seed, then
# `python benchmarks/ablation_summary.py` for the means and their intervals over seeds). VARIANTS picks some of the
# variants; rows of an existing OUT.json for the others are kept.
#
#   bash benchmarks/ablation.sh SEED [OUT.json]        (after `make data`; about 30 min on 2 CPU cores)
#   VARIANTS="four_lr" bash benchmarks/ablation.sh 0   (one variant, added to the seed's JSON)
set -euo pipefail
seed=${1:-0}
out=${2:-benchmarks/results/ablation-digits-seed$seed.json}
py=.venv/bin/python
root=runs/ablation-seed$seed
ref=data/digits/ref-digits.npz
gan="gan.weight_generator=3e-3 gan.weight_discriminator=1e-2"   # DMD2's ImageNet-64 weights
four="generator.timesteps=[500,375,250,125]"                     # four steps from the digits config's t_init 500
# four_lr: the four-step student at a tenth of the generator's learning rate (multi-step training is sensitive to it)
declare -A variants=([dmd]="" [gan]="$gan" [four]="$four" [four_gan]="$four $gan"
                     [four_lr]="$four optim.lr_generator=2e-5")
names=${VARIANTS:-dmd gan four four_gan four_lr}
for name in $names; do [[ -v variants[$name] ]] || { echo "unknown variant '$name' (expected one of ${!variants[*]})"; exit 2; }; done
rows=()
for name in $names; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  $py -m distill fit --config configs/digits.yaml run.dir=$root/$name trainer.seed=$seed logging.wandb=disabled \
      logging.progress_bar=false ${variants[$name]} > $root-$name.log 2>&1 || { tail -20 $root-$name.log; exit 1; }
  fit_s=$(( $(date +%s) - start ))
  $py -m distill fid $root/$name/checkpoints/last.ckpt --ref $ref --no-wandb > /dev/null 2>&1
  fid=$($py -c "import csv,sys; r=[x for x in csv.DictReader(open('$root/$name/checkpoints/fid_results.csv'))]; print(r[-1]['fid'])")
  rows+=("$name $fid $fit_s")
  echo "$name: FID $fid, fit $fit_s s"
done
first=${names%% *}
$py -m distill fid $root/$first/checkpoints/last.ckpt --ref $ref --teacher-steps 50 --no-wandb > /dev/null 2>&1
teacher=$($py -c "import csv; r=[x for x in csv.DictReader(open('$root/$first/checkpoints/fid_results.csv')) if x['teacher_steps']]; print(r[-1]['fid'])")
$py - "$out" "$seed" "$teacher" "${rows[@]}" <<'PY'
import json, subprocess, sys
from pathlib import Path
out, seed, teacher, *rows = sys.argv[1:]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
new = [dict(zip(("variant", "fid", "fit_seconds"), r.split())) for r in rows]
for r in new:
    r["fid"], r["fit_seconds"], r["commit"] = float(r["fid"]), int(r["fit_seconds"]), commit
old = json.loads(Path(out).read_text()) if Path(out).is_file() else {"variants": []}
ran = {r["variant"] for r in new}
table = [dict(r, commit=r.get("commit", old.get("commit"))) for r in old["variants"] if r["variant"] not in ran] + new
result = {"seed": int(seed), "teacher_50step_fid": float(teacher), "variants": table, "commit": commit,
          "protocol": "distill fid on the last checkpoint, digits features, 1000 samples, ref data/digits/ref-digits.npz"}
print("\n| variant | FID (EMA student, with its steps) | fit wall time |\n|---|---|---|")
for r in table:
    print(f"| {r['variant']} | {r['fid']:.2f} | {r['fit_seconds']} s |")
print(f"| teacher, 50 DDIM steps | {float(teacher):.2f} | |")
open(out, "w").write(json.dumps(result, indent=2) + "\n")
print(f"wrote {out}")
PY
