#!/bin/sh
# bench/gpu_suite.py on a bare GPU machine in one command (docs/gpu.md): installs the wheels the
# image lacks (.whl/gpu, from bench/gpu_prepare.sh), runs every row, starting none after BUDGET
# seconds (a device command runs at most 600 s), writes the rows to $OUT/gpu.json after each one
# and prints the figures' table and issue 17's "done when" table at the end.
#     sh bench/gpu_device.sh                 # BUDGET=480 by default; ONLY="batch sweep" for some rows
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/agp-gpu}
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gpu/*.whl || echo "wheels: install failed"
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" || true
python3 bench/gpu_suite.py --tokenizer bench/tok --json "$OUT/gpu.json" --budget "${BUDGET:-480}" \
    ${ONLY:+--only "$ONLY"} 2>"$OUT/gpu.stderr"
rc=$?
tail -n 20 "$OUT/gpu.stderr"
exit $rc
