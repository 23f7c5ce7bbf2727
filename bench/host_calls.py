"""The host's Python per decode step, counted (not timed): calls a step makes, by part.

Wall-clock figures on a shared machine are noise; call counts are not. Runs one greedy request
(`--workload`, default bench/one_request.jsonl, ignore_eos) twice in one process, once with
`--short` and once with `--long` new tokens, under cProfile on every thread (the executor's, the
compute thread's, the pipeline's), and divides the difference by the extra tokens: what one
more decode step costs, with the request's admission, prefill and finish cancelled out.

    .venv/bin/python bench/host_calls.py                  # agp run's path: examples/chat.agp
    .venv/bin/python bench/host_calls.py --engine         # the engine alone (Engine.step)
    .venv/bin/python bench/host_calls.py --top 40         # the functions, most calls first
    .venv/bin/python bench/host_calls.py --workload bench/w32.jsonl --batch   # W32: 32 at once

With `--batch` every line of the workload runs at once (W32: a decode step of 32 sequences);
the figure is still per decode step (divide by the batch for per token).

Parts are the module a function lives in (pipeline_dsl.engine.scheduler, ...flow.segment);
torch's and the standard library's calls are counted under `torch` / `stdlib` / `builtins`.
For instruction counts run it under callgrind at two lengths and subtract the totals:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p python bench/host_calls.py --no-profile --long 16
"""
from __future__ import annotations

import argparse
import cProfile
import json
import sys
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class AllThreads:
    """cProfile on every thread started after `start()` and on the calling thread."""

    def __init__(self):
        self.profiles: list[cProfile.Profile] = []

    def _hook(self, frame, event, arg):       # runs once per new thread, then cProfile replaces it
        p = cProfile.Profile()
        self.profiles.append(p)
        p.enable()

    def start(self):
        threading.setprofile(self._hook)
        self._hook(None, None, None)

    def counts(self) -> Counter:
        """Calls so far by code object (or builtin's name), all threads summed; cheap (its own
        calls, counted too, are the same at every snapshot and cancel out)."""
        out: Counter = Counter()
        for p in self.profiles[:]:
            for e in p.getstats():
                out[e.code] += e.callcount
        return out

    def dump(self, path: str):
        """The whole run's profile, every thread merged, for pstats (callers, callees)."""
        import pstats

        stats = pstats.Stats(self.profiles[0])
        for p in self.profiles[1:]:
            if p.getstats():
                stats.add(p)
        stats.dump_stats(path)


def label(code) -> str:
    if isinstance(code, str):                  # a builtin: "<method 'append' of 'list' objects>"
        return "builtins:" + code
    f = code.co_filename
    if "pipeline_dsl" in f:
        mod = "pipeline_dsl" + f.split("pipeline_dsl", 1)[1].removesuffix(".py").replace("/", ".")
    elif "/torch/" in f:
        mod = "torch"
    else:
        mod = "stdlib:" + Path(f).stem
    return f"{mod}:{code.co_qualname}"


def part(name: str) -> str:
    return name.split(":", 1)[0].removeprefix("pipeline_dsl.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pipeline", default=str(ROOT / "examples" / "chat.agp"))
    ap.add_argument("--workload", default=str(ROOT / "bench" / "one_request.jsonl"))
    ap.add_argument("--engine", action="store_true", help="drive the Engine alone, not the pipeline")
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--long", type=int, default=80)
    ap.add_argument("--batch", action="store_true", help="every line of the workload at once, not the first")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-profile", action="store_true", help="run --long only, unprofiled (callgrind)")
    ap.add_argument("--json", help="write the per-step counts here")
    ap.add_argument("--pstats", help="write the whole run's merged profile here (pstats' format)")
    args = ap.parse_args()

    from pipeline_dsl.engine.cpus import passive_waits

    passive_waits()                            # as agp run: before torch loads libgomp
    prof = AllThreads()
    if not args.no_profile:
        prof.start()
    from pipeline_dsl.requests_io import parse_request

    lines = [json.loads(line) for line in Path(args.workload).read_text().splitlines() if line.strip()]
    requests = lines if args.batch else lines[:1]
    if args.engine:
        from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams

        # no batch window: a step that waits for it does nothing, as often as the clock says
        engine = Engine(EngineConfig(threads=args.threads, batch_timeout_s=0.0))

        def run(n: int, rid: str) -> list[int]:
            for i, request in enumerate(requests):
                engine.add_request(f"{rid}{i}", messages=request["messages"],
                                   params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            toks: list[int] = []
            while engine.has_unfinished():
                for o in engine.step():
                    toks.extend(o.new_token_ids or ())
            return toks
    else:
        from pipeline_dsl.flow import build_runtime

        rt = build_runtime(Path(args.pipeline), overrides={"threads": args.threads})

        def run(n: int, rid: str) -> list[str]:
            items = [parse_request(dict(request, id=f"{rid}{i}", max_tokens=n), default_id=0).item()
                     for i, request in enumerate(requests)]
            texts = []
            for out in rt.run_all(items, keep_open=True):
                if out.error is not None:
                    raise SystemExit(f"the request failed: {out.error}")
                texts.append(out.choices[0].text)
            return texts

    run(4, "warm")
    if args.no_profile:
        toks = run(args.long, "long")
        print(json.dumps({"tokens": len(toks)}))
        return 0
    c0 = prof.counts()
    run(args.short, "short")
    c1 = prof.counts()
    toks = run(args.long, "long")
    c2 = prof.counts()
    steps = args.long - args.short
    per: Counter = Counter()
    for k in c2:
        per[label(k)] += ((c2[k] - c1[k]) - (c1[k] - c0[k])) / steps
    per = {k: v for k, v in per.items() if abs(v) >= 0.01}
    by_part: Counter = Counter()
    for k, v in per.items():
        by_part[part(k)] += v
    total = sum(per.values())
    mine = sum(v for k, v in per.items() if k.startswith("pipeline_dsl"))
    out = "tokens" if args.engine else "texts"
    print(f"{'engine alone' if args.engine else 'pipeline ' + Path(args.pipeline).name}: "
          f"{len(requests)} request(s), {len(toks)} {out} out; per decode step: {total:.1f} Python calls "
          f"({mine:.1f} in pipeline_dsl's own functions)")
    print("\nby part (calls a decode step):")
    for k, v in by_part.most_common():
        if v >= 0.5:
            print(f"  {k:40s} {v:8.1f}")
    print(f"\nthe {args.top} functions called most a decode step:")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {v:8.1f}  {k}")
    if args.pstats:
        prof.dump(args.pstats)
    if args.json:
        Path(args.json).write_text(json.dumps({"total": total, "parts": by_part, "functions": per,
                                               "tokens": toks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
