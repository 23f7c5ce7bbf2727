"""Two engines in one pipeline: each engine's work alone against the same work beside the other.

A pipeline with two generate stages has two engines (a small -> big cascade, or two stages
routed side by side); every CPU forward of the process runs on the one compute thread
(engine/compute.py), so the two engines' steps alternate there. What a user expects: the
pipeline costs the sum of both engines' work, each engine's busy time about what it is alone.
Each round runs, on fresh runtimes of the embedded model:

  alone     one engine over the N requests (the baseline)
  cascade   g1 -> python stage (the answer sent on as the same request) -> g2: N requests each
  side      a route stage sends half of 2N requests to g1, half to g2: N each, at once

and prints per engine its busy seconds (the generate stage's `busy_s` in the run's stats), its
steps and the steps its contention guard ran on one thread (another process held a core), and
the ratio of the pipeline's wall time to twice the alone one's (1.0: the sum of both engines).

    .venv/bin/python bench/engines_share.py [--rounds 3] [--num 8] [--tokens 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOOKS = '''def to_request(item):
    """The first engine's answer sent on to the second engine as the same request."""
    return dict(item["request"])
'''

ENGINE = """    stage b{i} : dynamic_batch {{ max_batch_size = 32  timeout = 1ms }}
    stage e{i} : encode {{}}
    stage k{i} : kv_lookup {{}}
    stage g{i} : generate {{ max_new_tokens = {tokens} }}
"""

PIPELINES = {
    "alone": """pipeline alone {{
    stage request : requests {{}}
{e1}    stage out : respond {{}}
    request -> b1 -> e1 -> k1 -> g1 -> out
}}
""",
    "cascade": """pipeline cascade {{
    stage request : requests {{}}
{e1}    stage hand : python {{ fn = "share_hooks:to_request"  returns = request }}
{e2}    stage out : respond {{}}
    request -> b1 -> e1 -> k1 -> g1 -> hand -> b2 -> e2 -> k2 -> g2 -> out
}}
""",
    "side": """pipeline side {{
    stage request : requests {{}}
    stage route : route {{}}
{e1}{e2}    stage out : respond {{}}
    request -> route
    route -> b2 when metadata.engine == "two"
    route -> b1 otherwise
    b1 -> e1 -> k1 -> g1 -> out
    b2 -> e2 -> k2 -> g2 -> out
}}
""",
}

PROMPTS = ["Hello! Who are you?", "What is the capital of France?", "Write a haiku about the sea.",
           "Explain gravity briefly.", "Name three colours.", "What is 2+2?", "Tell me a joke.",
           "Describe a cat."]


def write_files(folder: Path, tokens: int) -> None:
    (folder / "share_hooks.py").write_text(HOOKS)
    e1, e2 = (ENGINE.format(i=i, tokens=tokens) for i in (1, 2))
    for name, text in PIPELINES.items():
        (folder / f"{name}.agp").write_text(text.format(e1=e1, e2=e2))


def requests(num: int, tokens: int, side: bool):
    from pipeline_dsl.commands.runner import RunRequest
    from pipeline_dsl.requests_io import parse_line

    lines = []
    for i in range(num):
        for engine in (("one", "two") if side else ("one",)):
            lines.append(json.dumps({"id": f"r{i}{engine}", "max_tokens": tokens, "ignore_eos": True,
                                     "metadata": {"engine": engine},
                                     "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}))
    return [RunRequest(slot, slot + 1, parse_line(line, slot + 1)) for slot, line in enumerate(lines)]


def run(folder: Path, name: str, num: int, tokens: int, threads: int) -> dict:
    from pipeline_dsl.commands.runner import run_pipeline
    from pipeline_dsl.flow import build_runtime

    rt = build_runtime(folder / f"{name}.agp", overrides={"threads": threads})
    summary = run_pipeline(rt, requests(num, tokens, name == "side"), on_done=lambda slot, rec: None,
                           progress=False)
    stats = rt.stats()
    out = {"wall_s": summary["generation_s"], "tokens": summary["completion_tokens"], "engines": {}}
    for seg in rt.segments:
        g = seg.segment.generates[0]
        guard = getattr(seg.engine.runner, "guard", None)      # bench-only: the runner's guard
        out["engines"][g] = {"busy_s": stats["stages"][g]["busy_s"], "steps": stats["engines"][seg.name]["steps"],
                             "one_thread_steps": None if guard is None else guard.solo_steps}
    rt.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num", type=int, default=8, help="requests per engine")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request (ignore_eos)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="alone,cascade,side")
    args = ap.parse_args()
    modes = args.modes.split(",")
    folder = Path(tempfile.mkdtemp(prefix="agp-share-"))
    write_files(folder, args.tokens)
    sys.path.insert(0, str(folder))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  load {os.getloadavg()[0]:.2f}  "
          f"{args.num} requests x {args.tokens} tokens per engine, {args.threads} threads")
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:                       # modes interleave: the machine's speed drifts
            res = run(folder, mode, args.num, args.tokens, args.threads)
            rows[mode].append(res)
            eng = "  ".join(f"{g} busy {e['busy_s']:.2f} s, {e['steps']} steps ({e['one_thread_steps']} on one thread)"
                            for g, e in res["engines"].items())
            print(f"round {r + 1} {mode:<8} wall {res['wall_s']:7.2f} s  {eng}  load {os.getloadavg()[0]:.2f}",
                  flush=True)
    if "alone" not in rows:
        return
    alone_wall = statistics.median(x["wall_s"] for x in rows["alone"])
    alone_busy = statistics.median(x["engines"]["g1"]["busy_s"] for x in rows["alone"])
    print(f"\nmedians over {args.rounds} rounds (alone: wall {alone_wall:.2f} s, g1 busy {alone_busy:.2f} s)")
    print("| pipeline | wall s | wall / (2 x alone) | g1 busy / alone | g2 busy / alone |")
    print("|---|---:|---:|---:|---:|")
    for mode in modes:
        if mode == "alone":
            continue
        wall = statistics.median(x["wall_s"] for x in rows[mode])
        ratios = [statistics.median(x["engines"][g]["busy_s"] for x in rows[mode]) / alone_busy
                  for g in ("g1", "g2")]
        print(f"| {mode} | {wall:.2f} | {wall / (2 * alone_wall):.2f}x | {ratios[0]:.2f}x | {ratios[1]:.2f}x |")


if __name__ == "__main__":
    main()
