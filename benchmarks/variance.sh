#!/usr/bin/env bash
# The CARV variance benchmark on the mixture, digits, and digits with a four-step student (backward simulation, at
# the generator learning rate multi-step training wants): prints the tables, writes benchmarks/results/variance-*.json
# (each with the commit that measured it).
# Usage: bash benchmarks/variance.sh [REPLICATES]   (needs `make data` for the digits shards; about 15 min on 2 cores)
# then `python benchmarks/variance_tables.py` prints the README's tables from the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
R="${1:-64}"
DISTILL="${DISTILL:-.venv/bin/distill}"
"$DISTILL" bench variance --config configs/gmm.yaml --replicates "$R" --warmup-steps 1000 \
    --json benchmarks/results/variance-gmm.json
"$DISTILL" bench variance --config configs/digits.yaml --replicates "$R" --warmup-steps 300 \
    --json benchmarks/results/variance-digits.json
"$DISTILL" bench variance --config configs/digits.yaml --replicates "$R" --warmup-steps 300 \
    'generator.timesteps=[500,375,250,125]' optim.lr_generator=2e-5 \
    --json benchmarks/results/variance-digits-four.json
