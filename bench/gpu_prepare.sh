#!/bin/sh
# What a bare GPU machine lacks for bench/gpu_suite.py, made here (a machine with network and the
# embedded model): the real tokenizer folder and the wheels of ../shared/GPU-NOTES.md, pinned to
# the versions this checkout's tests run with (pydantic and pydantic-core must match each other).
# typing_extensions too: the image has one (torch needs it), but pydantic-core imports names
# (Sentinel) that only recent versions have, and without them fastapi, so `agp serve`, fails.
#     sh bench/gpu_prepare.sh [python]     # writes bench/tok and .whl/gpu; both travel with the tree
set -eu
cd "$(dirname "$0")/.."
PY=${1:-python3}
PKGS="lark graphviz gguf fastapi starlette pydantic pydantic_core annotated-types typing-inspection annotated-doc
      opentelemetry-api uvicorn typing_extensions"
[ -f bench/tok/tokenizer.json ] || PYTHONPATH=$PWD "$PY" bench/gpu_suite.py --make-tokenizer bench/tok
pins=""
for p in $PKGS; do
    v=$("$PY" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
    pins="$pins $p${v:+==$v}"
done
mkdir -p .whl/gpu
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform any -d .whl/gpu $pins
v=$("$PY" -m pip show llguidance 2>/dev/null | sed -n 's/^Version: //p')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_31_x86_64 \
    -d .whl/gpu "llguidance${v:+==$v}" || echo "llguidance: not downloaded (structured output rows only)"
du -sh bench/tok .whl/gpu                     # together under 64 MiB
