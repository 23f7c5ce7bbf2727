"""Load time and memory of a vote of generate stages on one model: N engine segments against one.

A pipeline whose engine segments name the same weights (a vote of three generate stages, a
cascade on one model, a draft and a refine) loads them once: what a user expects is that the
vote starts about as fast as one segment and holds about one model's memory, plus its KV pools.
Each round builds, in a fresh process each (so nothing stays loaded between them), the runtime of

  one    one segment on the model (the baseline)
  vote   N segments on it, a request fanned out to all and their answers joined by majority

and prints each one's seconds to build the runtime (loading the model), its resident memory
grown by the build (RSS after less RSS before, MiB) and its peak RSS, and the vote's ratios to
the baseline. `--root DIR` runs the builds on another agp tree (a checkout before a change).

    .venv/bin/python bench/shared_weights.py [--rounds 3] [--stages 3] [--model smollm2-135m-instruct]
    .venv/bin/python bench/shared_weights.py --root /path/to/other/checkout
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KV = "    stage b{i} : dynamic_batch {{ max_batch_size = 8  timeout = 1ms }}\n" \
     "    stage e{i} : encode {{}}\n    stage k{i} : kv_lookup {{ budget = 16MiB }}\n" \
     "    stage g{i} : generate {{ max_new_tokens = 8  temperature = 0.7  seed = {i} }}\n"


def pipeline(model: str, stages: int) -> str:
    body = "".join(KV.format(i=i) for i in range(stages))
    edges = "".join(f"    request -> b{i} -> e{i} -> k{i} -> g{i} -> {'vote' if stages > 1 else 'out'}\n"
                    for i in range(stages))
    vote = "    stage vote : join { policy = majority }\n    vote -> out\n" if stages > 1 else ""
    return (f'pipeline p {{\n    model = "{model}"\n    stage request : requests {{}}\n{body}{vote}'
            f"    stage out : respond {{}}\n{edges}}}\n")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(path: str) -> dict:
    """Build the runtime of the pipeline at `path` here, and answer one request with it."""
    import torch  # noqa: F401 - imported before the first RSS reading: torch's own memory is no model's

    from pipeline_dsl.flow import PipelineRuntime, load_graph

    graph = load_graph(path)
    before = rss_bytes()
    t0 = time.perf_counter()
    rt = PipelineRuntime(graph)
    load_s = time.perf_counter() - t0
    grown = rss_bytes() - before
    results = rt.run_all([{"id": "a", "prompt": "Name a colour."}])
    rt.shutdown()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"load_s": load_s, "rss_grown": grown, "peak_rss": peak, "engines": len(rt.segments),
            "answered": results[0].error is None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stages", type=int, default=3, help="generate stages of the vote (engine segments)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a GGUF file or an embedded model's name")
    ap.add_argument("--root", default=str(ROOT), help="the agp tree that builds the runtimes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.root, os.environ.get("PYTHONPATH")]))}
    rows: dict[str, list[dict]] = {"one": [], "vote": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, n in (("one", 1), ("vote", args.stages)):
            files[name] = Path(tmp) / f"{name}.agp"
            files[name].write_text(pipeline(args.model, n), encoding="utf-8")
        for r in range(args.rounds):
            for name, path in files.items():
                out = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env, cwd=args.root,
                                     capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows[name].append(row)
                print(f"round {r + 1} {name:<4} ({row['engines']} engine{'s' * (row['engines'] != 1)}): "
                      f"load {row['load_s']:.2f} s, RSS +{row['rss_grown'] / 2**20:.0f} MiB, peak "
                      f"{row['peak_rss'] / 2**20:.0f} MiB, answered {row['answered']}", flush=True)
    med = {name: {k: statistics.median(row[k] for row in rs) for k in ("load_s", "rss_grown", "peak_rss")}
           for name, rs in rows.items()}
    one, vote = med["one"], med["vote"]
    print(f"{args.model}, {args.stages} stages, tree {args.root}: median load {one['load_s']:.2f} s -> "
          f"{vote['load_s']:.2f} s ({vote['load_s'] / one['load_s']:.2f}x), RSS grown "
          f"{one['rss_grown'] / 2**20:.0f} -> {vote['rss_grown'] / 2**20:.0f} MiB "
          f"({vote['rss_grown'] / one['rss_grown']:.2f}x), peak {one['peak_rss'] / 2**20:.0f} -> "
          f"{vote['peak_rss'] / 2**20:.0f} MiB ({vote['peak_rss'] / one['peak_rss']:.2f}x)")


if __name__ == "__main__":
    main()
