#!/usr/bin/env bash
# SONICHU's three stages on synthetic data at `:sim` sizes, end to end: the runs behind README's
# "SONICHU on synthetic data" table and docs/ijepa.md's pretraining comparison.
#
#   bash scripts/sonichu_sim_study.sh [ROOT]     (default ROOT: workdirs/sonichu_sim_study)
#
# Steps whose output exists are skipped, so an interrupted study resumes where it stopped. About
# 90 minutes on a 2-core CPU. What it runs:
#   1. I-JEPA pretraining (pretrain_ijepa.py:sim), seeds 0 and 1.
#   2. Keypoint training from random weights (keypoints.py:sim) and from each pretrained encoder
#      (keypoints_from_ijepa.py:sim), two seeds each; seed 42's pretrained model is T0.
#   3. The five teachers of docs/teachers.md (pseudo-labels on an unlabelled synthetic pool).
#   4. The student distilled from the five (distill.py:sim), and the evaluations.
#   5. The frozen-feature probe (python -m sonichu_jax.probe) of each pretrained target encoder and
#      of random encoders of the same seeds.
#   6. What else was tried for pretraining: 4x the steps on 8x the images, and the fine-tune with
#      ViTPose's layer-wise learning-rate decay (0.75).
set -euo pipefail

ROOT=${1:-workdirs/sonichu_sim_study}
PY=${PYTHON:-python}
mkdir -p "$ROOT"

train() {  # train CONFIG WORKDIR ARGS...: one run, skipped when it has finished before.
  local config=$1 workdir=$2
  shift 2
  if [[ -f $workdir/done ]]; then return; fi
  $PY -m launch.train --config="$config" --workdir="$workdir" "$@"
  touch "$workdir/done"
}

label() {  # label OUT ARGS...: one pseudo-label folder (written atomically by the command).
  local out=$1
  shift
  if [[ -d $out ]]; then return; fi
  $PY -m sonichu_jax.pseudo_label --images="$ROOT/pool/train" --out="$out" "$@"
}

# 1. Pretraining.
for seed in 0 1; do
  train configs/sonichu/pretrain_ijepa.py:sim "$ROOT/ijepa_s$seed" --config.seed=$seed
done

# 2. Keypoint models, from random weights and from the pretrained encoders.
for seed in 0 1; do
  train configs/sonichu/keypoints.py:sim "$ROOT/random_s$seed" --config.seed=$((42 + seed))
  train configs/sonichu/keypoints_from_ijepa.py:sim "$ROOT/pretrained_s$seed" \
      --config.seed=$((42 + seed)) --config.init_from.ijepa.workdir="$ROOT/ijepa_s$seed"
done

# 3. The teachers (docs/teachers.md), on pretraining seed 0; T0 is pretrained_s0.
IJEPA=--config.init_from.ijepa.workdir=$ROOT/ijepa_s0
P=$ROOT/pseudo
[[ -d $ROOT/pool ]] || $PY -m sonichu_jax.data.synthetic --out="$ROOT/pool" --num_train=64 \
    --num_val=1 --seed=1
label "$P/round1" --teachers="$ROOT/pretrained_s0"
train configs/sonichu/teacher.py:r1:sim "$ROOT/r1" "$IJEPA" \
    --config.data.pseudo_labels="('$P/round1',)"
label "$P/round2" --teachers="$ROOT/pretrained_s0" --teachers="$ROOT/r1" --max_spread=6
train configs/sonichu/teacher.py:r2:sim "$ROOT/r2" "$IJEPA" \
    --config.data.pseudo_labels="('$P/round2',)"
T=(--teachers="$ROOT/pretrained_s0" --teachers="$ROOT/r1" --teachers="$ROOT/r2")
label "$P/round3" "${T[@]}" --max_spread=6
label "$P/round3_selective" "${T[@]}" --max_spread=4 --cap=FUGC=16
CAPS=()
for task in AOP FUGC FA HC IVC PLAX PSAX A4C fetal_femur; do CAPS+=(--cap=$task=32); done
label "$P/round3_balanced" "${T[@]}" --max_spread=6 "${CAPS[@]}"
train configs/sonichu/teacher.py:r3:sim "$ROOT/r3" "$IJEPA" \
    --config.data.pseudo_labels="('$P/round3',)"
train configs/sonichu/teacher.py:selective:sim "$ROOT/selective" "$IJEPA" \
    --config.data.pseudo_labels="('$P/round3_selective',)"
train configs/sonichu/teacher.py:balanced:sim "$ROOT/balanced" "$IJEPA" \
    --config.data.pseudo_labels="('$P/round3_balanced',)"

# 4. The student, and every model evaluated on the synthetic validation set.
TEACHERS="('$ROOT/r1','$ROOT/r2','$ROOT/r3','$ROOT/selective','$ROOT/balanced')"
train configs/sonichu/distill.py:sim "$ROOT/student" "$IJEPA" \
    --config.data.pseudo_labels="('$P/round3',)" --config.teachers.workdirs="$TEACHERS"
[[ -f $ROOT/ensemble/ensemble.json ]] || $PY -m launch.evaluate --ensemble --out="$ROOT/ensemble" \
    --workdir="$ROOT/r1" --workdir="$ROOT/r2" --workdir="$ROOT/r3" \
    --workdir="$ROOT/selective" --workdir="$ROOT/balanced"
[[ -f $ROOT/comparison/comparison.json ]] || $PY -m launch.evaluate --out="$ROOT/comparison" \
    --workdir="$ROOT/random_s0" --workdir="$ROOT/random_s1" --workdir="$ROOT/pretrained_s0" \
    --workdir="$ROOT/pretrained_s1" --workdir="$ROOT/student"
# 5. Probes: ridge regression of the keypoints from frozen patch features.
KEYPOINTS=configs/sonichu/keypoints.py:sim
for seed in 0 1; do
  [[ -f $ROOT/probe_ijepa_s$seed.json ]] || $PY -m sonichu_jax.probe --config="$KEYPOINTS" \
      --encoder="$ROOT/ijepa_s$seed" --out="$ROOT/probe_ijepa_s$seed.json"
  [[ -f $ROOT/probe_random_s$seed.json ]] || $PY -m sonichu_jax.probe --config="$KEYPOINTS" \
      --random_seed=$seed --out="$ROOT/probe_random_s$seed.json"
done

# 6. A longer pretraining (1280 steps on 2048 images) and fine-tunes with layer decay.
for seed in 0 1; do
  train configs/sonichu/pretrain_ijepa.py:sim "$ROOT/ijepa_long_s$seed" --config.seed=$seed \
      --config.data.synthetic.num_train=2048 --config.num_epochs=10
  [[ -f $ROOT/probe_ijepa_long_s$seed.json ]] || $PY -m sonichu_jax.probe --config="$KEYPOINTS" \
      --encoder="$ROOT/ijepa_long_s$seed" --out="$ROOT/probe_ijepa_long_s$seed.json"
done
for seed in 0 1; do
  train configs/sonichu/keypoints_from_ijepa.py:sim "$ROOT/pretrained_long_s$seed" \
      --config.seed=$((42 + seed)) --config.init_from.ijepa.workdir="$ROOT/ijepa_long_s0"
  train configs/sonichu/keypoints_from_ijepa.py:sim "$ROOT/pretrained_decay_s$seed" \
      --config.seed=$((42 + seed)) --config.init_from.ijepa.workdir="$ROOT/ijepa_s$seed" \
      --config.optim.layer_decay=0.75
  # The control: layer decay from random weights.
  train configs/sonichu/keypoints.py:sim "$ROOT/random_decay_s$seed" --config.seed=$((42 + seed)) \
      --config.optim.layer_decay=0.75
done

echo "done: $ROOT/ensemble/ensemble.md, $ROOT/comparison/comparison.md, $ROOT/probe_*.json"
