"""How fast `.agp` text parses: milliseconds per MiB of `pipeline_dsl.parser.parse` (text -> AST,
no checks) on generated pipelines near the 1 MiB file cap.

    python bench/parse_speed.py                  # every shape, best of 3
    python bench/parse_speed.py --shapes chain --repeat 5

Shapes: chain (20,000 stages and one `a -> b -> …` statement), edges (the same, one edge a
line), params (6,000 stages with five parameters, a list and a condition each), conds (edges
with long and/or/not conditions in parentheses). Prints one line per shape: MiB, ms, ms/MiB.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from check_scaling import make  # noqa: E402
from pipeline_dsl import parser  # noqa: E402


def text(shape: str) -> str:
    if shape in ("chain", "edges"):
        return make(shape, 20_000)
    if shape == "params":
        return "pipeline p {\n" + "".join(
            f'    stage s{i} : generate {{ max_new_tokens = {i}  temperature = 0.7  stop = ["a", "b"]  '
            f'timeout = 5ms  name = "x{i}" }}\n'
            f"    s{i} -> t{i} when prompt_tokens > 512 and not metadata.free == true\n" for i in range(6000)) + "}\n"
    if shape == "conds":
        return "pipeline p {\n" + "".join(
            f'    r -> s{i} when (prompt_tokens > {i} or metadata["team id"] == "a") and not (turn < 2 or '
            f"headers[\"x-t\"] != \"b\") or full\n" for i in range(8000)) + "}\n"
    raise SystemExit(f"unknown shape {shape}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["chain", "edges", "params", "conds"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    parser.parse("pipeline p {}")                       # the grammar, compiled once
    for shape in args.shapes:
        t = text(shape)
        mib = len(t.encode()) / 2**20
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            _, diags = parser.parse(t, f"{shape}.agp")
            best = min(best, time.perf_counter() - t0)
            assert not diags, diags[0].render()
        print(f"{shape:7s} {mib:5.2f} MiB  {best * 1000:8.0f} ms  {best * 1000 / mib:8.0f} ms/MiB", flush=True)


if __name__ == "__main__":
    main()
