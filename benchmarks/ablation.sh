#!/usr/bin/env bash
# DMD2's parts: DMD only / + GAN / four steps / four steps + GAN (and four steps at a fifth of the generator's
# learning rate), each scored like the demo (`distill fid` on the last checkpoint against
# data/digits/ref-digits.npz, digits features, 1,000 samples; prompt accuracy too for the text-to-image teacher),
# beside the teacher (50 DDIM steps for digits, 25 for text-to-image digits, as its demo). Prints a table and writes
# JSON (one seed per call; run it per seed, then `python benchmarks/ablation_summary.py [--config t2i-digits]`
# for the means and their intervals over seeds). VARIANTS picks some of the variants; rows of an existing OUT.json
# for the others are kept. CONFIG picks the teacher: digits (the pixel teacher, configs/digits.yaml, 1,500 steps)
# or t2i-digits (the latent text-to-image teacher, configs/t2i-digits.yaml, 1,000 steps, in-loop FID off; its GAN
# reads latents of the real digits, made once by benchmarks/t2i_real_data.py).
#
#   bash benchmarks/ablation.sh SEED [OUT.json]                  (after `make data`; about 30 min on 2 CPU cores)
#   CONFIG=t2i-digits bash benchmarks/ablation.sh SEED           (about 30 min)
#   VARIANTS="four_lr" bash benchmarks/ablation.sh 0             (one variant, added to the seed's JSON)
#   EXTRA="trainer.max_steps=4" bash benchmarks/ablation.sh 0 /tmp/x.json   (more overrides for every fit: a smoke run)
set -euo pipefail
seed=${1:-0}
config=${CONFIG:-digits}
py=.venv/bin/python
ref=data/digits/ref-digits.npz
case $config in
  digits)
    gan="gan.weight_generator=3e-3 gan.weight_discriminator=1e-2"   # DMD2's ImageNet-64 weights
    four="generator.timesteps=[500,375,250,125]"                     # four steps from the digits config's t_init 500
    extra=""; teacher_steps=50 ;;
  t2i-digits)
    latents=data/latents/t2i-digits
    [[ -f $latents/meta.json ]] || $py benchmarks/t2i_real_data.py --out $latents
    gan="gan.weight_generator=1e-3 gan.weight_discriminator=1e-2 gan.data=$latents"   # DMD2's SD 1.5 weights
    four="generator.timesteps=[999,749,499,249]"                                     # DMD2's four-step SDXL list
    extra="eval.fid_every_steps=0"; teacher_steps=25 ;;
  *) echo "unknown CONFIG '$config' (expected digits or t2i-digits)"; exit 2 ;;
esac
out=${2:-benchmarks/results/ablation-$config-seed$seed.json}
mkdir -p runs
root=runs/ablation-$config-seed$seed
[[ $config == digits ]] && root=runs/ablation-seed$seed   # where the digits runs always were
# four_lr: the four-step student at a fifth of the generator's learning rate (multi-step training is sensitive to it)
declare -A variants=([dmd]="" [gan]="$gan" [four]="$four" [four_gan]="$four $gan"
                     [four_lr]="$four optim.lr_generator=2e-5")
names=${VARIANTS:-dmd gan four four_gan four_lr}
for name in $names; do [[ -v variants[$name] ]] || { echo "unknown variant '$name' (expected one of ${!variants[*]})"; exit 2; }; done
# FID and prompt accuracy ("-" where the run has none) of the newest row of a fid_results.csv: the student's rows
# (teacher_steps empty) or the teacher's at $2 steps
last_row() {
  $py -c "import csv,sys; r=[x for x in csv.DictReader(open(sys.argv[1])) if x['teacher_steps'] == sys.argv[2]][-1]; print(r['fid'], r.get('prompt_accuracy') or '-')" "$1" "$2"
}
rows=()
for name in $names; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  $py -m distill fit --config configs/$config.yaml run.dir=$root/$name trainer.seed=$seed logging.wandb=disabled \
      logging.progress_bar=false $extra ${EXTRA:-} ${variants[$name]} > $root-$name.log 2>&1 || { tail -20 $root-$name.log; exit 1; }
  fit_s=$(( $(date +%s) - start ))
  $py -m distill fid $root/$name/checkpoints/last.ckpt --ref $ref --no-wandb > /dev/null 2>&1
  read -r fid acc < <(last_row "$root/$name/checkpoints/fid_results.csv" "")
  rows+=("$name $fid $fit_s $acc")
  echo "$name: FID $fid, prompt accuracy $acc, fit $fit_s s"
done
first=${names%% *}
$py -m distill fid $root/$first/checkpoints/last.ckpt --ref $ref --teacher-steps $teacher_steps --no-wandb > /dev/null 2>&1
read -r teacher teacher_acc < <(last_row "$root/$first/checkpoints/fid_results.csv" "$teacher_steps")
$py - "$out" "$seed" "$teacher" "$teacher_acc" "$teacher_steps" "$config" "${rows[@]}" <<'PY'
import json, subprocess, sys
from pathlib import Path
out, seed, teacher, teacher_acc, teacher_steps, config, *rows = sys.argv[1:]
number = lambda s: float(s) if s not in ("", "-") else None  # noqa: E731
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
new = [dict(zip(("variant", "fid", "fit_seconds", "prompt_accuracy"), r.split())) for r in rows]
for r in new:
    r["fid"], r["fit_seconds"], r["commit"] = float(r["fid"]), int(r["fit_seconds"]), commit
    r["prompt_accuracy"] = number(r.get("prompt_accuracy", ""))
old = json.loads(Path(out).read_text()) if Path(out).is_file() else {"variants": []}
ran = {r["variant"] for r in new}
table = [dict(r, commit=r.get("commit", old.get("commit"))) for r in old["variants"] if r["variant"] not in ran] + new
result = {"seed": int(seed), "config": config, "teacher_steps": int(teacher_steps), "teacher_fid": float(teacher),
          "teacher_prompt_accuracy": number(teacher_acc), "variants": table, "commit": commit,
          "protocol": "distill fid on the last checkpoint, digits features, 1000 samples, ref data/digits/ref-digits.npz"}
print("\n| variant | FID (EMA student, with its steps) | prompt accuracy | fit wall time |\n|---|---|---|---|")
for r in table:
    print(f"| {r['variant']} | {r['fid']:.2f} | {r.get('prompt_accuracy') or ''} | {r['fit_seconds']} s |")
print(f"| teacher, {teacher_steps} DDIM steps | {float(teacher):.2f} | {number(teacher_acc) or ''} | |")
open(out, "w").write(json.dumps(result, indent=2) + "\n")
print(f"wrote {out}")
PY
