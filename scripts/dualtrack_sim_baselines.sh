#!/usr/bin/env bash
# DualTrack's local stage 1 and the four baselines on simulated sweeps, each `:sim` config as it
# is, evaluated side by side on the held-out sweeps: the runs behind README's baselines table.
#
#   bash scripts/dualtrack_sim_baselines.sh [ROOT]   (default: workdirs/dualtrack_sim_baselines)
#
# Runs whose folder holds `done` are skipped, so an interrupted study resumes. About 15 minutes on
# a quiet 2-core CPU. The comparison (ROOT/comparison/comparison.md) has a column per run; the
# mean-motion and no-motion predictors are every run's `baseline/*` rows.
set -euo pipefail

ROOT=${1:-workdirs/dualtrack_sim_baselines}
PY=${PYTHON:-python}
mkdir -p "$ROOT"
RUNS=(local_stage1:sim baseline_two_frame:sim baseline_monet:sim baseline_dclnet:sim
      baseline_hybrid:sim)
WORKDIRS=()
NAMES=()
for run in "${RUNS[@]}"; do
  config=${run%%:*} variant=${run#*:}
  workdir=$ROOT/${config}_$variant
  if [[ ! -f $workdir/done ]]; then
    $PY -m launch.train --config="configs/dualtrack/$config.py:$variant" --workdir="$workdir"
    touch "$workdir/done"
  fi
  WORKDIRS+=(--workdir="$workdir")
  NAMES+=(--name="$config:$variant")
done
$PY -m launch.evaluate --out="$ROOT/comparison" "${WORKDIRS[@]}" "${NAMES[@]}"
echo "done: $ROOT/comparison/comparison.md"
