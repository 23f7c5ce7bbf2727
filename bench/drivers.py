"""The plan's executor against a bench-only main-thread driver, in alternating rounds.

Each round runs every mode once, in turn (the machine's speed drifts, so modes interleave),
each on a fresh runtime of the same pipeline:

  exec      the plan's executor as `agp run` drives it (run_all), overlap as the tree decides
  overlap   the same with overlap=True (the streams on threads of their own)
  serial    the same with overlap=False (`--no-overlap`)
  main      Engine.step() on the main thread, no executor (bench/w32.py's driver)

and measures W32 (32 chat prompts x 64 new tokens, greedy, prefix reuse as configured) and
one request alone (decode tok/s, mean over --single-n prompts, no prefix reuse). Prints
each round (with the steps the runner's contention guard ran on one thread: another
process held a core), the medians and each mode's ratio to `main`.

    .venv/bin/python bench/drivers.py [--rounds 3] [--modes exec,serial,main] [--single-n 2] [--no-w32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def runtime_for(pipeline: Path, mode: str, threads: int, **overrides):
    from pipeline_dsl.flow import build_runtime

    kw = {"overlap": {"overlap": True, "serial": False}[mode]} if mode in ("overlap", "serial") else {}
    return build_runtime(pipeline, overrides={"dtype": "bf16", "threads": threads, **overrides}, **kw)


def solo_steps(rt) -> str:
    """Steps the runner's contention guard ran on one thread (another process held a core)."""
    guard = getattr(rt.segments[0].engine.runner, "guard", None)
    return "-" if guard is None else str(guard.solo_steps)


def w32(pipeline, mode, threads, work) -> tuple[float, str]:
    from w32 import agp_executor, agp_main_thread

    rt = runtime_for(pipeline, mode, threads)
    s = (agp_main_thread if mode == "main" else agp_executor)(rt, work)
    rt.shutdown()
    return s["completion_tokens"] / s["generation_s"], solo_steps(rt)


def single(pipeline, mode, threads, work) -> tuple[float, str]:
    from w32 import agp_executor, agp_main_thread, single_stream

    rt = runtime_for(pipeline, mode, threads, prefix_reuse=False)
    s = single_stream(rt, work, agp_main_thread if mode == "main" else agp_executor)
    rt.shutdown()
    return s["decode_tok_s"], solo_steps(rt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="exec,serial,main")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single-n", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-w32", action="store_true")
    ap.add_argument("--pipeline", default=str(ROOT / "examples" / "chat.agp"))
    ap.add_argument("--workload", default=str(ROOT / "bench" / "w32.jsonl"))
    args = ap.parse_args()

    import torch

    from w32 import load_workload

    torch.set_num_threads(args.threads)
    work = load_workload(Path(args.workload), args.new_tokens)
    pipeline = Path(args.pipeline)
    modes = args.modes.split(",")
    res: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for mode in modes:
            load = os.getloadavg()[0]
            line = f"round {r + 1} {mode:<7} load {load:4.1f}"
            if not args.no_w32:
                v, solo = w32(pipeline, mode, args.threads, work)
                res.setdefault(("w32", mode), []).append(v)
                line += f"  W32 {v:7.1f} tok/s (solo {solo:>4})"
            if args.single_n:
                v, solo = single(pipeline, mode, args.threads, work[: args.single_n])
                res.setdefault(("single", mode), []).append(v)
                line += f"  one request {v:6.1f} decode tok/s (solo {solo:>4})"
            print(line, flush=True)
    print()
    for kind in ("w32", "single"):
        base = statistics.median(res[(kind, "main")]) if (kind, "main") in res else None
        for mode in modes:
            if (kind, mode) not in res:
                continue
            med = statistics.median(res[(kind, mode)])
            ratio = f"  x{med / base:.3f} of main" if base else ""
            print(f"{kind:<6} {mode:<7} median {med:7.1f} tok/s{ratio}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
