"""Runner-only decode benchmark: B sequences of ~100 random prompt tokens, then decode steps.

    .venv/bin/python bench/runner_decode.py --batch 32 --steps 16 --reps 5
    .venv/bin/python bench/runner_decode.py --batch 1 --baseline /tmp/old   # A/B in one process

Measures `ModelRunner.execute` alone (no scheduler, no sampling) on the embedded model.
With `--baseline DIR` (a folder holding an older model.py) the old and the current runner
are built side by side from the same weights (the old one without the file's 4-bit
blocks, unless --baseline-int4) and timed in alternation, `--reps` rounds of `--steps` steps each, so that a busy
machine slows both alike; the medians are printed. Without it only the current runner runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem
from pipeline_dsl.engine.models import load_weights, resolve_model


def load_module(folder: str):
    """model.py from `folder`, as a module of pipeline_dsl.engine (its relative imports work)."""
    path = Path(folder) / "model.py"
    if not path.is_file():
        sys.exit(f"--baseline: no model.py in {folder}")
    spec = importlib.util.spec_from_file_location("pipeline_dsl.engine._baseline_model", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class Variant:
    """A runner with B sequences prefilled; `run(n)` times n decode steps."""

    def __init__(self, name, model_cls, runner_cls, item_cls, config, weights, args):
        self.name = name
        self.item_cls = item_cls
        model = model_cls(config, weights, dtype=args.dtype)
        nblk = (args.prompt + 20 + args.steps * (args.reps + 1) + args.block_size) // args.block_size + 1
        self.runner = runner_cls(model, num_blocks=args.batch * nblk, block_size=args.block_size)
        self.rng = np.random.default_rng(args.seed)
        self.tables = [list(range(i * nblk, (i + 1) * nblk)) for i in range(args.batch)]
        self.lens = [int(self.rng.integers(args.prompt - 10, args.prompt + 11)) for _ in range(args.batch)]
        for table, n in zip(self.tables, self.lens):
            ids = self.rng.integers(100, config.vocab_size - 100, n).tolist()
            self.runner.execute([item_cls(ids, 0, table, True)])
        self.times: list[float] = []
        self.run(2)  # warm-up

    def step(self):
        items = [self.item_cls([int(self.rng.integers(100, 40000))], n, t, True)
                 for n, t in zip(self.lens, self.tables)]
        out = self.runner.execute(items)
        self.lens = [n + 1 for n in self.lens]
        return out

    def run(self, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        dt = (time.perf_counter() - t) / n
        self.times.append(dt)
        return dt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16", help="auto|fp32|bf16|int8 (default bf16)")
    ap.add_argument("--batch", type=int, default=32, help="concurrent sequences (default 32)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timed round (default 16)")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per variant (default 5)")
    ap.add_argument("--prompt", type=int, default=100, help="mean prompt length (default 100)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", help="folder with an older model.py to compare against")
    ap.add_argument("--baseline-int4", action="store_true",
                    help="give the baseline the file's 4-bit blocks too (when its code can use them)")
    ap.add_argument("--profile", action="store_true", help="print a torch profile of the current runner")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    config, weights, _ = load_weights(resolve_model(None))
    variants = []
    if args.baseline:
        old = load_module(args.baseline)
        base_weights = weights if args.baseline_int4 else dict(weights)  # a plain dict: no 4-bit blocks
        variants.append(Variant("baseline", old.LlamaModel, old.ModelRunner, old.SeqBatchItem,
                                config, base_weights, args))
    variants.append(Variant("current", LlamaModel, ModelRunner, SeqBatchItem, config, weights, args))
    if len(variants) == 2:  # same inputs, same KV state: the first step's logits must agree
        a, b = (v.step() for v in variants)
        print(f"first-step logits, max |current - baseline| = {(a - b).abs().max():.3f} "
              f"(max |logit| {b.abs().max():.1f}); argmax agree {(a.argmax(-1) == b.argmax(-1)).float().mean():.2f}")
    for _ in range(args.reps):
        for v in variants:
            v.run(args.steps)
    print(f"dtype={args.dtype} batch={args.batch} threads={args.threads} prompt~{args.prompt} "
          f"steps={args.steps}x{args.reps}")
    for v in variants:
        ms = statistics.median(v.times[1:]) * 1000
        print(f"  {v.name:9s} median {ms:7.1f} ms/step  {args.batch / ms * 1000:7.0f} tok/s   "
              f"(rounds: {', '.join(f'{t * 1000:.1f}' for t in v.times[1:])})")
    if args.profile:
        from torch.profiler import profile
        with profile() as p:
            variants[-1].run(args.steps)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
