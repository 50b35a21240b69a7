#!/usr/bin/env bash
# GPU check: one short run on one GPU (under 8 minutes on an H200):
# installs the project, then times full-width VGG19-BN train steps with mixed_float16 + XLA
# on random data, dense vs prune_low_magnitude vs prune_low_std, and prints JSON + a table
# with step-time ratios and images/s.  Usage: bash benchmarks/gpu_check.sh [batch_size]
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${1:-256}
python3 -m venv /tmp/gpu_venv
. /tmp/gpu_venv/bin/activate
pip install -q --upgrade pip
pip install -q "tensorflow[and-cuda]>=2.16,<2.22" -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python - <<'PY'
import tensorflow as tf
print("GPUs:", tf.config.list_physical_devices("GPU"))
PY
python benchmarks/overhead.py --width=1.0 --batch_size="$BATCH" --steps=20 --rounds=5 \
  --jit_compile --mixed_precision
