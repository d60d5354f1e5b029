#!/usr/bin/env bash
# One GPU run: install the wheels placed beside the checkout (for a GPU image without diffusers), then the h100
# preset of eval/speed.py within its time budget. Usage: bash eval/gpu_run.sh
set -o pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 420 python3 eval/speed.py --preset h100 --out "$OUT" 2>&1 | tee "$OUT/log.txt"
