#!/usr/bin/env bash
# The multi-process tests under load: run the SLURM tests and the DDP tests N times in a row while another process
# keeps both cores busy, and count the failures (a teardown abort fails a job or a worker). Needs the local
# cluster (bash slurm/local-cluster.sh start, as root). Prints one line per round and writes JSON.
#
#   bash benchmarks/stress.sh 10 benchmarks/results/stress.json
set -uo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-10}
out=${2:-benchmarks/results/stress.json}
py=${PYTHON:-.venv/bin/python}
cores=$(nproc)
burners=()
for _ in $(seq "$cores"); do  # one busy loop per core, at normal priority
  "$py" -c "while True: pass" & burners+=($!)
done
trap 'kill "${burners[@]}" 2>/dev/null' EXIT
fails=0
log=$(mktemp)
for i in $(seq "$rounds"); do
  start=$(date +%s)
  if "$py" -m pytest -q -p no:cacheprovider tests/test_slurm.py tests/test_ddp.py -m "slurm or not slurm" >"$log" 2>&1; then
    status=passed
  else
    status=failed; fails=$((fails + 1)); cp "$log" "benchmarks/results/stress-round-$i.log"
  fi
  echo "round $i/$rounds: $status in $(( $(date +%s) - start )) s: $(tail -n 1 "$log")"
done
printf '{"rounds": %d, "failed_rounds": %d, "busy_processes": %d, "tests": "tests/test_slurm.py tests/test_ddp.py", "commit": "%s"}\n' \
  "$rounds" "$fails" "$cores" "$(git rev-parse --short HEAD)" > "$out"
echo "$fails of $rounds rounds failed (both cores kept busy by $cores other processes); wrote $out"
