"""Where one request's decode step goes: the model's forward, the host work around it, the waits.

Runs one greedy request (`--workload`, default bench/one_request.jsonl: W32's first prompt,
128 tokens, ignore_eos) through examples/chat.agp as `agp run` drives it (the plan's executor,
OpenMP waits chosen as `agp run` chooses them), `--rounds` times in one process after a
warm-up, and splits each decode step from the executor's trace and the engine's counters:

  model         the runner's forward (on CPU the native step): the engine's busy time
  sampling etc  the rest of the gen.forward work: filling in-flight tokens, sampling
  host works    admit, schedule, lookup, h2d (the step's index tensors), d2h, emit (detokenise,
                stop checks, the pipeline's callbacks): the executor's timed works
  waits         the step's wall time outside every work: hand-offs between the executor's thread
                and the compute thread (engine/compute.py), and whatever else held the cores

Each part is a mean over the decode steps (the engine sums its forwards' time, so the parts
add up to the step's period), printed per round with the per-token wall time, then the medians
over the rounds with each part's share of the period. Times are wall clock: on a shared machine read the shares, not the
milliseconds (docs/engine_benchmarks.md).

    .venv/bin/python bench/step_split.py [--rounds 5] [--threads 2] [--workload bench/one_request.jsonl]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST_WORKS = ("admit", "schedule", "lookup", "h2d", "d2h", "emit")   # the works' parts (executor.py)


def split(spans, t0: float) -> tuple[dict[str, list[float]], float]:
    """Per decode step (a micro-batch whose forward came after the first): seconds of each work
    (by its part), and the step's period (from its first span's start to the next step's); and
    the first forward's seconds (the prefill)."""
    steps: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    first: dict[int, float] = {}
    for s in spans:
        if s.start < t0 or s.micro_batch < 0:
            continue
        steps[s.micro_batch][s.name.rsplit(".", 1)[-1]] += s.end - s.start
        first[s.micro_batch] = min(first.get(s.micro_batch, s.start), s.start)
    order = sorted(m for m in steps if "forward" in steps[m])
    out: dict[str, list[float]] = defaultdict(list)
    for m, nxt in zip(order[1:], order[2:]):
        period = first[nxt] - first[m]
        out["period"].append(period)
        out["forward"].append(steps[m]["forward"])
        for w in HOST_WORKS:
            out[w].append(steps[m].get(w, 0.0))
        out["waits"].append(period - sum(steps[m].values()))
    return out, steps[order[0]]["forward"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pipeline", default=str(ROOT / "examples" / "chat.agp"))
    ap.add_argument("--workload", default=str(ROOT / "bench" / "one_request.jsonl"))
    args = ap.parse_args()

    from pipeline_dsl.engine.cpus import passive_waits

    passive_waits()                          # as agp run: before torch loads libgomp
    from pipeline_dsl.flow import build_runtime
    from pipeline_dsl.requests_io import parse_request

    request = json.loads(Path(args.workload).read_text().splitlines()[0])
    rt = build_runtime(Path(args.pipeline), overrides={"threads": args.threads})
    engine = rt.segments[0].engine
    rt.run_all([{"id": "warm", "prompt": "Hello", "max_tokens": 4}], keep_open=True)
    rows: dict[str, list[float]] = defaultdict(list)
    for r in range(args.rounds):
        before = engine.stats(latencies=False)
        t0 = time.perf_counter()
        out = rt.run_all([parse_request(dict(request, id=f"r{r}"), default_id=0).item()], keep_open=True)[0]
        after = engine.stats(latencies=False)
        if out.error is not None:
            raise SystemExit(f"the request failed: {out.error}")
        m, n = out.metrics, out.usage["completion_tokens"]
        per, prefill = split(rt.trace.work(), t0)
        steps = after["steps"] - before["steps"]
        # the engine sums its forwards' time: the decode steps' mean, the prefill's forward taken out
        model = (after["busy_s"] - before["busy_s"] - prefill) / (steps - 1)
        row = {"per token": (m["latency_s"] - m["ttft_s"]) / (n - 1),
               "step period": statistics.mean(per["period"]), "model": model,
               "sampling etc": statistics.mean(per["forward"]) - model,
               **{w: statistics.mean(per[w]) for w in HOST_WORKS},
               "waits": statistics.mean(per["waits"])}
        solo = after.get("one_thread_steps", 0) - before.get("one_thread_steps", 0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in row.items())
              + f" ms; steps on one thread {solo} of {steps}", flush=True)
        for k, v in row.items():
            rows[k].append(v)
    rt.shutdown()
    period = statistics.median(rows["step period"])
    print(f"\nmedians of {args.rounds} rounds (ms a decode step, share of the step's period):")
    for k, v in rows.items():
        med = statistics.median(v)
        print(f"  {k:14s} {med * 1e3:8.3f}" + ("" if k in ("per token", "step period") else f"  {med / period:6.1%}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
