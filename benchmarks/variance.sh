#!/usr/bin/env bash
# The CARV variance benchmark: prints the tables and writes benchmarks/results/variance-*.json, each with the commit
# that measured it.
#   mixture   configs/gmm.yaml after a 1,000-step warm-up, at 4x the replicates (256 at the default 64: its
#             estimates take milliseconds, and at 64 its auto-vs-best interval was too wide to read)
#   digits    configs/digits.yaml after a 300-step warm-up, one-step student
#   four      the same with a four-step student (backward simulation, at the generator learning rate multi-step
#             training wants)
#   states    one-step digits at the checkpoints of a 1,500-step baseline run (steps 500, 1000, 1500): where in
#             training CARV pays and where it cannot (the run is made first, in a temporary directory)
#   t2i       configs/t2i-digits.yaml after a 300-step warm-up (text-to-image digits teacher)
# Usage: bash benchmarks/variance.sh [REPLICATES]   (needs `make data`; about 30 min on 2 cores for all parts)
#        PARTS="digits four" bash benchmarks/variance.sh 64   to run some parts
# then `python benchmarks/variance_tables.py` prints the README's tables from the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
R="${1:-64}"
PARTS="${PARTS:-mixture digits four states t2i}"
DISTILL="${DISTILL:-.venv/bin/distill}"
OUT=benchmarks/results
has() { [[ " $PARTS " == *" $1 "* ]]; }

has mixture && "$DISTILL" bench variance --config configs/gmm.yaml --replicates "$((4 * R))" --warmup-steps 1000 \
    --json "$OUT/variance-gmm.json"
has digits && "$DISTILL" bench variance --config configs/digits.yaml --replicates "$R" --warmup-steps 300 \
    --json "$OUT/variance-digits.json"
has four && "$DISTILL" bench variance --config configs/digits.yaml --replicates "$R" --warmup-steps 300 \
    'generator.timesteps=[500,375,250,125]' optim.lr_generator=2e-5 \
    --json "$OUT/variance-digits-four.json"
if has states; then
    RUN="$(mktemp -d)/run"
    "$DISTILL" fit --config configs/digits.yaml run.dir="$RUN" logging.wandb=disabled eval.fid_every_steps=0 \
        logging.progress_bar=false trainer.checkpoint_every_steps=500 trainer.keep_checkpoints=3
    for step in 0000500 0001000 0001500; do
        "$DISTILL" bench variance --config configs/digits.yaml --replicates "$R" \
            --ckpt "$RUN/checkpoints/step=$step.ckpt" --json "$OUT/variance-digits-step${step#000}.json"
    done
fi
has t2i && "$DISTILL" bench variance --config configs/t2i-digits.yaml --replicates "$R" --warmup-steps 300 \
    eval.fid_every_steps=0 --json "$OUT/variance-t2i-digits.json"
exit 0
