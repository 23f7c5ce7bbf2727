"""How long `agp serve` takes to read a large JSON body (serve/protocol.parse_json: UTF-8, the
depth bound, json.loads, the NaN and surrogate check), in this process, by shape, and how much
of it is one C call that holds the GIL throughout (json.loads; the check's json.dumps): what
another request's stream may wait while it runs (the parse runs on a thread; a Python loop lets
go of the GIL every 5 ms, a C call does not).

    python bench/body_parse.py                   # every shape, best of 3
    python bench/body_parse.py --repeat 5

Shapes of about 3.8 MB (what the chat example's model takes; --max-body-bytes is 4 MiB):
9,500 chat messages, 470,000 token ids, one string, 200,000 metadata keys (refused after the
parse, as more than 16 keys). Prints one line per shape: MB, parse_json ms, json.loads ms,
json.dumps ms (the check's pass).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline_dsl.serve import protocol as P  # noqa: E402

SHAPES = {
    "9,500 messages": {"messages": [{"role": "user", "content": "x" * 380} for _ in range(9_500)], "max_tokens": 1},
    "470,000 token ids": {"prompt": list(range(1000, 471_000)), "max_tokens": 1},
    "one string": {"prompt": "hello world " * 315_000, "max_tokens": 1},
    "200,000 metadata keys": {"prompt": "hi", "max_tokens": 1, "metadata": {f"k{i}": i for i in range(200_000)}},
}


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'shape':<24} {'MB':>5} {'parse_json':>11} {'json.loads':>11} {'json.dumps':>11}")
    for name, body in SHAPES.items():
        raw = json.dumps(body).encode()
        obj = json.loads(raw)
        parse = best(lambda: P.parse_json(raw), args.repeat)
        loads = best(lambda: json.loads(raw), args.repeat)
        dumps = best(lambda: json.dumps(obj, ensure_ascii=False, allow_nan=False).encode(), args.repeat)
        print(f"{name:<24} {len(raw) / 1e6:5.1f} {parse:8.0f} ms {loads:8.0f} ms {dumps:8.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
