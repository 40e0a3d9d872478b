#!/usr/bin/env bash
# The rounds-to-target study of docs/findings.md ("Schemes for fewer rounds"), end to end:
#   experiments/studies/rounds/run-study.sh RUNS_DIR [SWEEP_NAME ...]
# Runs the sweeps one after another, each on a fresh network (network.yaml, own ports;
# fedseg sweep --network; each is resumable: run the same command again after a stop),
# the pooled baselines (fedseg baseline; from a random and from the pretrained seed), takes the network down and writes the report
#   RUNS_DIR/rounds-report/ (fedseg analyze --target-fraction 0.95: rounds to 95% of
#   the pooled run's final Dice; groups of seeds get a 95% t-interval).
# With SWEEP_NAMEs (e.g. fedavg warm) only those sweeps run. ROUNDS_NETWORK=FILE uses
# another network file (other ports) when network.yaml's ports are taken. Needs `fedseg` on PATH
# (the project's virtual environment).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
runs="$(mkdir -p "${1:?usage: run-study.sh RUNS_DIR [SWEEP_NAME ...]}" && cd "$1" && pwd)"
shift
order=(fedavg pooled warm pooled-warm fedavgm keep combo dp-fedavg dp-warm fedprox localnorm
       epochs fedadam fedyogi warm6 localnorm6 epochs6 lrdecay6 lnepochs6 fedavg12)
if [ "$#" -gt 0 ]; then order=("$@"); fi
net="$runs/rounds-network"
down() { if [ -f "$net/network.json" ]; then fedseg network down --root "$net" || true; fi; }
trap down EXIT
for name in "${order[@]}"; do
  if [ "$name" = pooled ]; then
    # One pooled seed: the target is 95% of its final Dice (compute matched, no DP).
    if ! grep -q '"status": "finished"' "$runs/rounds-fedavg-pooled/run.json" 2>/dev/null; then
      fedseg baseline pooled "$here/fedavg.yaml" --runs-dir "$runs" --overwrite
    fi
  elif [ "$name" = pooled-warm ]; then
    # The pooled baseline from the same pretrained seed: the fair bound for warm starts.
    if ! grep -q '"status": "finished"' "$runs/rounds-warm-pooled/run.json" 2>/dev/null; then
      fedseg baseline pooled "$here/warm.yaml" --runs-dir "$runs" --overwrite
    fi
  elif [ -f "$here/sweep-$name.yaml" ]; then
    # A fresh network (and state store) per sweep: fedn 0.33 numbers rounds by the
    # string-largest id in its store (bug 21, patched in the API process too).
    down; rm -rf "$net"; mkdir -p "$net"; cp "${ROUNDS_NETWORK:-$here/network.yaml}" "$net/network.yaml"
    fedseg network up --config "$net/network.yaml"
    fedseg sweep "$here/sweep-$name.yaml" --runs-dir "$runs" --network "$net" || true
    down
  fi
done
fedseg analyze "$runs"/rounds-fedavg-pooled $(ls -d "$runs"/rounds-*/*s[0-9] | grep -v /rounds-dp-) \
  --out "$runs/rounds-report" --target-fraction 0.95
