#!/usr/bin/env bash
# The CARV variance benchmark on both configs: prints the tables, writes benchmarks/results/variance-*.json.
# Usage: bash benchmarks/variance.sh [REPLICATES]   (needs `make data` for the digits shards)
set -euo pipefail
cd "$(dirname "$0")/.."
R="${1:-32}"
DISTILL="${DISTILL:-.venv/bin/distill}"
"$DISTILL" bench variance --config configs/gmm.yaml --replicates "$R" --warmup-steps 1000 \
    --json benchmarks/results/variance-gmm.json
"$DISTILL" bench variance --config configs/digits.yaml --replicates "$R" --warmup-steps 300 \
    --json benchmarks/results/variance-digits.json
