#!/usr/bin/env bash
# Prepares `python -m launch.benchmark --suite=gpu` for an accelerator machine that cannot reach
# the network, and prints the one line to run there from this repository's root.
#
#   bash scripts/prepare_gpu_suite.sh [--dualtrack=/path/to/DualTrack] [--python-version=3.12]
#
# The machine is expected to hold CUDA builds of jax, flax, optax, orbax-checkpoint, torch, timm,
# einops, h5py, scipy, pandas, matplotlib and pillow (the lent H100/H200 image does). What it
# lacks travels in two folders of this checkout, both ignored by git (.git/info/exclude):
#   .whl/        wheels for its Python (--python-version): this package (its entry points register
#                the models), grain and ml-collections, tensorboardX and nibabel, and the original
#                DualTrack's needs that are missing or too new there (omegaconf, python-dotenv,
#                transformers 4.57.6 with a huggingface-hub and tokenizers it accepts);
#   .originals/  a copy of the original DualTrack checkout (--dualtrack), for its torch sides.
# Without --dualtrack the DualTrack torch sides are reported as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

python_version=3.12
dualtrack=''
for arg in "$@"; do
  case "$arg" in
    --dualtrack=*) dualtrack="${arg#*=}" ;;
    --python-version=*) python_version="${arg#*=}" ;;
    *) echo "prepare_gpu_suite.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

for folder in .whl .originals; do
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
done
rm -rf .whl .originals
mkdir -p .whl

# Pure-Python wheels, or binary ones for the machine's Python on x86-64 Linux.
python3 -m pip wheel --quiet --no-deps --wheel-dir .whl .
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
    --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    grain array-record portpicker ml-collections tensorboardX nibabel \
    'omegaconf==2.3.0' python-dotenv 'transformers==4.57.6' 'huggingface-hub>=0.34,<1.0' \
    'tokenizers>=0.22,<0.23'
# antlr4-python3-runtime 4.9.3 (omegaconf's pin) exists as a source archive only: build its wheel.
python3 -m pip wheel --quiet --no-deps --wheel-dir .whl 'antlr4-python3-runtime==4.9.3'

originals=''
if [ -n "$dualtrack" ]; then
  [ -f "$dualtrack/configs/model/dualtrack.yaml" ] || {
    echo "prepare_gpu_suite.sh: $dualtrack is not a DualTrack checkout" >&2; exit 1; }
  mkdir -p .originals
  cp -r "$dualtrack" .originals/DualTrack
  rm -rf .originals/DualTrack/.git
  originals=' --originals=DualTrack=.originals/DualTrack'
fi

size=$(du -sm .whl .originals 2>/dev/null | awk '{s += $1} END {print s}')
echo "Wheels in .whl ($(ls .whl | wc -l) files) and originals: ${size} MiB to carry (both folders)."
echo 'Run on the accelerator machine, from the repository root:'
echo "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl" \
     "&& PYTHONPATH=/tmp/site python3 -m launch.benchmark --suite=gpu --out=\$OUT/suite${originals}"
