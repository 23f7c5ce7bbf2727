"""`agp serve`'s inter-token latency with the loaded heap frozen (serve/heap.py) or not, in
alternating rounds, and the full collections the server ran meanwhile.

    python bench/gc_pause.py                                   # 3 rounds, 16 streams, 200 x 64 tokens
    python bench/gc_pause.py --rounds 1 --num 32 --concurrency 4   # a smoke run

Each round starts `agp serve PIPELINE` twice in a subprocess on 127.0.0.1, once as it is
("frozen") and once with heap.freeze made a no-op ("thawed"), order alternating by round;
the server notes each generation-2 collection (when, how long, the objects frozen then) with
gc.callbacks and writes them at exit; those during the measured load are counted. The load: bench/workloads/short_chat.jsonl cycled, every request `max_tokens`
long (ignore_eos), `--concurrency` streams at once. Prints each run and the medians over rounds
of the p50 / p99 / max gap between two streamed chunks, and their ratios frozen / thawed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import Server  # noqa: E402

from pipeline_dsl.commands import loadgen as B  # noqa: E402

# run in the server's process: count full collections, optionally leave the heap unfrozen
SERVER = """
import atexit, gc, json, os, sys, time
runs, t = [], [0.0]
def on_gc(phase, info):
    if info["generation"] != 2:
        return
    if phase == "start":
        t[0] = time.perf_counter()
    else:
        runs.append((time.time(), time.perf_counter() - t[0], gc.get_freeze_count()))
gc.callbacks.append(on_gc)
if os.environ["AGP_GC_VARIANT"] == "thawed":
    import pipeline_dsl.serve.heap as heap
    heap.freeze = lambda: None
def report():
    with open(os.environ["AGP_GC_OUT"], "w") as f:
        json.dump(runs, f)
atexit.register(report)
from pipeline_dsl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def one(args, variant: str) -> dict:
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    os.environ.update(AGP_GC_VARIANT=variant, AGP_GC_OUT=out)
    items = B.load_workload(ROOT / "bench" / "workloads" / "short_chat.jsonl")
    for item in items:
        item.sampling.update(max_tokens=args.tokens, ignore_eos=True)
    span = [0.0, 0.0]
    server = Server(args.pipeline, python=["-c", SERVER])
    try:
        target = B.HTTPTarget(server.url)

        async def go():
            await target.start()
            try:
                await B.run_load(target, items[:1], num=1, progress=False)       # warm-up
                span[0] = time.time()
                got = await B.run_load(target, items, num=args.num, concurrency=args.concurrency,
                                        progress=False)
                span[1] = time.time()
                return got
            finally:
                await target.close()
        records, wall = asyncio.run(go())
    finally:
        server.terminate()
    during = [(d, frozen) for at, d, frozen in json.loads(Path(out).read_text()) if span[0] <= at <= span[1]]
    os.unlink(out)
    gaps = np.array([b - a for r in records for ts in r.chunk_times.values() for a, b in zip(ts, ts[1:])])
    return {"variant": variant, "errors": sum(r.error is not None for r in records), "wall_s": wall,
            "itl_p50_ms": 1e3 * float(np.percentile(gaps, 50)), "itl_p99_ms": 1e3 * float(np.percentile(gaps, 99)),
            "itl_max_ms": 1e3 * float(gaps.max()), "load": os.getloadavg()[0],
            "full_collections": len(during), "full_collection_s": sum(d for d, _ in during),
            "frozen_objects": max((f for _, f in during), default=None)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="examples/chat.agp")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    runs = []
    for k in range(args.rounds):
        for variant in (("thawed", "frozen") if k % 2 == 0 else ("frozen", "thawed")):
            runs.append(one(args, variant))
            print(json.dumps(runs[-1]), flush=True)
    med = {v: {key: statistics.median(r[key] for r in runs if r["variant"] == v)
               for key in ("itl_p50_ms", "itl_p99_ms", "itl_max_ms", "full_collections", "full_collection_s")}
           for v in ("thawed", "frozen")}
    print(json.dumps({"medians": med, "frozen/thawed": {
        key: med["frozen"][key] / med["thawed"][key] if med["thawed"][key] else math.nan
        for key in ("itl_p50_ms", "itl_p99_ms", "itl_max_ms")}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
