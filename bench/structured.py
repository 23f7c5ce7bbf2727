"""W32 with structured output: half the requests ask for a JSON Schema, against the same W32
unconstrained, in one run.

The 32 chat prompts of bench/w32.jsonl (64 new tokens, greedy) go through examples/chat.agp
as `agp run` sends them (the plan's executor, one runtime kept warm). In the constrained
workload every other request carries `response_format: json_schema` (SCHEMA below): its
tokens are masked by llguidance each step, and it may end before 64 tokens (the grammar's
end is a stop even with ignore_eos). Rounds alternate A (unconstrained), B (half constrained)
so that the machine's drift hits both; the figure is output tokens per second, with the
medians and their ratio B/A, and how many constrained answers validated.

    .venv/bin/python bench/structured.py [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 160},
                   "topic": {"enum": ["science", "code", "writing", "other"]},
                   "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["answer", "topic", "confidence"],
}


def constrained(work: list[dict]) -> list[dict]:
    out = []
    for i, w in enumerate(work):
        w = dict(w)
        if i % 2 == 0:
            w["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
        out.append(w)
    return out


def run(runtime, work: list[dict]) -> tuple[float, int, list]:
    from pipeline_dsl.requests_io import parse_request

    items = [parse_request(obj, default_id=i).item() for i, obj in enumerate(work)]
    t0 = time.perf_counter()
    results = runtime.run_all(items, keep_open=True)
    wall = time.perf_counter() - t0
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed: {errors[0]}")
    tokens = sum(r.usage["completion_tokens"] for r in results)
    return tokens / wall, tokens, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pipeline", default=str(ROOT / "examples" / "chat.agp"))
    ap.add_argument("--workload", default=str(ROOT / "bench" / "w32.jsonl"))
    args = ap.parse_args()

    import jsonschema

    from w32 import agp_runtime, load_workload

    work = load_workload(Path(args.workload))
    half = constrained(work)
    runtime = agp_runtime(Path(args.pipeline), "bf16", args.threads)
    run(runtime, work[:2])                                   # warm-up (and the grammar compiler)
    run(runtime, half[:2])
    a, b, valid, cut = [], [], 0, 0
    for r in range(args.rounds):
        tps_a, n_a, _ = run(runtime, work)
        tps_b, n_b, results = run(runtime, half)
        a.append(tps_a)
        b.append(tps_b)
        for i, res in enumerate(results):
            if i % 2 == 0:
                choice = res.choices[0]
                if choice.finish_reason == "length":
                    cut += 1
                    continue
                jsonschema.validate(json.loads(choice.text), SCHEMA)
                valid += 1
        print(f"  round {r + 1}: unconstrained {tps_a:7.1f} tok/s ({n_a} tokens)   half json_schema "
              f"{tps_b:7.1f} tok/s ({n_b} tokens)", file=sys.stderr, flush=True)
    runtime.shutdown()
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"\nW32 ({len(work)} chat prompts, 64 new tokens, greedy, {args.threads} threads), {args.rounds} rounds "
          f"alternating, examples/chat.agp bf16")
    print("| workload | output tok/s (median) | vs unconstrained |")
    print("|---|---|---|")
    print(f"| W32 unconstrained | {ma:.1f} | 1.00x |")
    print(f"| W32, 16 of 32 with json_schema | {mb:.1f} | {mb / ma:.2f}x |")
    print(f"\nconstrained answers: {valid} validated against the schema, {cut} cut by max_tokens, 0 invalid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
