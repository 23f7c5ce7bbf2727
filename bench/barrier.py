"""The native decode step under each barrier, with N CPU hogs beside it (a busy machine).

One runner of the embedded model (bf16, `--batch` sequences of 100 prompt tokens, its contention
guard off: every step on the threads asked for), its steps timed in alternation under each setting:

  -2   one thread (no barriers)
  -1   libgomp's barrier (spins for milliseconds before it sleeps)
  N    agp's barrier: spin at most N microseconds, then sleep on a futex (kernels.cpp: Barrier)

The hogs are `yes > /dev/null` processes started after the model loads and killed (by their pid)
at the end. Prints each setting's median ms a step (min-max of the rounds).

    .venv/bin/python bench/barrier.py [--hogs 2] [--settings=-2,-1,0,50] [--steps 20] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline_dsl.engine.compute import on_compute  # noqa: E402
from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem  # noqa: E402
from pipeline_dsl.engine.models import load_weights, resolve_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--settings", default="-2,-1,0,50")
    ap.add_argument("--steps", type=int, default=20, help="decode steps a round")
    ap.add_argument("--reps", type=int, default=3, help="rounds of each setting")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    settings = [int(x) for x in args.settings.split(",")]
    B = args.batch

    def build():
        config, weights, _ = load_weights(resolve_model(None))
        runner = ModelRunner(LlamaModel(config, weights, dtype="bf16"), num_blocks=64 * B, block_size=16)
        if runner.native is None:
            sys.exit("the native kernels are not available here")
        runner.guard = None
        tables = [list(range(i * 64, (i + 1) * 64)) for i in range(B)]
        for t in tables:
            runner.execute([SeqBatchItem(list(range(200, 300)), 0, t, True)])
        return runner, tables

    runner, tables = on_compute(build)
    lens = [100] * B

    def run(n: int) -> None:
        for _ in range(n):
            runner.execute([SeqBatchItem([500], lens[i], tables[i], True) for i in range(B)])
            for i in range(B):
                lens[i] = lens[i] + 1 if lens[i] < 900 else 100

    times: dict[int, list[float]] = {s: [] for s in settings}
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.hogs)]
    try:
        for _ in range(args.reps):
            for s in settings:                    # alternate: the machine's speed drifts
                runner.native.spin_us = max(s, -1)
                torch.set_num_threads(1 if s == -2 else args.threads)
                t = time.perf_counter()
                on_compute(run, args.steps)
                times[s].append((time.perf_counter() - t) / args.steps * 1000)
    finally:
        for p in hogs:
            p.kill()
            p.wait()
    names = {-2: "1 thread", -1: "libgomp"}
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  hogs {args.hogs}  batch {B}  "
          f"threads {args.threads}  load {os.getloadavg()[0]:.1f}")
    for s, v in times.items():
        print(f"  {names.get(s, f'spin {s} us'):>12}: {statistics.median(v):8.2f} ms a step "
              f"({min(v):.2f}-{max(v):.2f})")


if __name__ == "__main__":
    main()
