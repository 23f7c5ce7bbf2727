#!/bin/sh
# bench/gpu_suite.py on a bare GPU machine in one command (docs/gpu.md): installs the wheels the
# image lacks (.whl/gpu, from bench/gpu_prepare.sh), runs every row, starting none after BUDGET
# seconds, and ends with the figures' table and issue 17's "done when" table.
#     sh bench/gpu_device.sh                 # BUDGET=480 by default; ONLY="batch sweep" for some rows
# A device command runs at most 600 s and returns the last 12,000 characters of its output, so
# the suite's own lines go to $OUT/gpu.log, everything on stderr (torch warnings, TORCH_LOGS)
# to $OUT/gpu.stderr, and stdout is a few lines of setup and then the two tables, printed from
# $OUT/gpu.json (rewritten after every row) even when the suite was stopped at LIMIT seconds.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/agp-gpu}
LIMIT=${LIMIT:-575}                          # seconds from this script's start; the device stops it at 600
STEP=${STEP:-60}                             # seconds each step around the suite may take: none hangs it
TABLE_S=${TABLE_S:-60}                       # seconds the tables may take (a python start, a JSON file read)
start=$(date +%s)
mkdir -p "$OUT" /tmp/site
timeout -k 5 "$STEP" python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gpu/*.whl \
    >"$OUT/pip.log" 2>&1 || echo "wheels: install failed ($OUT/pip.log)"
export PYTHONPATH=/tmp/site:$PWD
timeout -k 5 "$STEP" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 2
timeout -k 5 "$STEP" python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    2>&1 | tail -n 1
left=$((LIMIT - ($(date +%s) - start) - 15))  # 15 s for the tables after it
[ "$left" -lt 30 ] && left=30
budget=$((left - 70))                        # a row may end a minute past the budget: 10 s before the cut
[ "$budget" -gt "${BUDGET:-480}" ] && budget=${BUDGET:-480}   # (less when the steps above were slow)
rm -f "$OUT/gpu.json"                        # only this run's rows make the tables
timeout -s INT -k 10 "$left" python3 bench/gpu_suite.py --tokenizer bench/tok --json "$OUT/gpu.json" \
    --budget "$budget" ${ONLY:+--only "$ONLY"} >"$OUT/gpu.log" 2>"$OUT/gpu.stderr"
rc=$?
[ $rc -eq 124 ] && echo "suite stopped at $left s: the rows it finished are below"
grep -m 3 -E "^preflight|Error|Traceback" "$OUT/gpu.stderr" "$OUT/gpu.log" | cut -c1-200
echo "suite exit $rc; rows as they ran: $OUT/gpu.log; stderr: $OUT/gpu.stderr"
if [ -s "$OUT/gpu.json" ]; then
    timeout -k 5 "$TABLE_S" python3 bench/gpu_suite.py --table "$OUT/gpu.json" 2>>"$OUT/gpu.stderr" \
        || tail -n 40 "$OUT/gpu.log"
else
    tail -n 20 "$OUT/gpu.log"; tail -n 5 "$OUT/gpu.stderr" | cut -c1-300
fi
exit $rc
