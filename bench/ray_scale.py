"""`agp serve` on one process against replicas on Ray Serve, measured (docs/scale.md).

    python bench/ray_scale.py                          # the embedded model (a few minutes)
    python bench/ray_scale.py --pipeline my.agp --num 16

Each run starts a server on 127.0.0.1 and sends it `--num` requests at once with `agp bench`'s
HTTP client, then stops it with SIGTERM:

1. bench/workloads/short_chat.jsonl: `agp serve` (one process, all cores), `--ray --replicas 1`
   (all cores), `--ray --replicas 2` (half the cores each).
2. Eight long system prompts (bench/workloads/shared_prefix.jsonl's, told apart by their first
   line) with four questions each, on two replicas: prefix affinity on, and off
   (`--affinity-chars 0`: load alone routes).

Needs Ray Serve (`pip install -e '.[ray]'`). Prints markdown tables.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline_dsl.commands import loadgen as B  # noqa: E402
from pipeline_dsl.requests_io import parse_line  # noqa: E402
from serve_load import WORKLOADS, Server, loadavg  # noqa: E402


def measure(pipeline: str, flags: list[str], items, num: int, label: str) -> B.Report:
    server = Server(pipeline, *flags)
    try:
        report = asyncio.run(B.bench_one(B.HTTPTarget(server.url), items, rate=math.inf, num=num, warmup=1,
                                         progress=False))
    finally:
        server.terminate()
    report.label = label
    print(f"  {label}: {report.output_throughput:.1f} output tok/s, {report.completed}/{report.requests} ok",
          file=sys.stderr)
    return report


def prefix_items(n: int):
    lines = [json.loads(line) for line in (WORKLOADS / "shared_prefix.jsonl").read_text().splitlines()]
    system = lines[0]["messages"][0]["content"]
    items = []
    for i in range(n):
        store, line = i % 8, lines[i // 8]
        body = {"messages": [{"role": "system", "content": f"Store number {store}.\n{system}"},
                             line["messages"][-1]], "max_tokens": line.get("max_tokens", 32)}
        items.append(parse_line(json.dumps(body), i + 1))
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default=str(ROOT / "examples" / "chat.agp"))
    p.add_argument("--num", type=int, default=32, help="requests per run (default: 32)")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 2
    half = str(max(1, cores // 2))
    short = B.load_workload(WORKLOADS / "short_chat.jsonl")
    print(f"load average before: {loadavg()}", file=sys.stderr)
    scale = [measure(args.pipeline, ["--threads", str(cores)], short, args.num, "agp serve"),
             measure(args.pipeline, ["--ray", "--replicas", "1", "--threads", str(cores)], short, args.num,
                     "ray, 1 replica"),
             measure(args.pipeline, ["--ray", "--replicas", "2", "--threads", half], short, args.num,
                     "ray, 2 replicas")]
    shared = prefix_items(args.num)
    two = ["--ray", "--replicas", "2", "--threads", half]
    affinity = [measure(args.pipeline, two, shared, args.num, "affinity on"),
                measure(args.pipeline, [*two, "--affinity-chars", "0"], shared, args.num, "affinity off")]
    print(f"load average after: {loadavg()}; {cores} cores", file=sys.stderr)
    print(B.format_markdown(scale))
    print()
    print(B.format_markdown(affinity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
