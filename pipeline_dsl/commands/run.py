"""`agp run PIPELINE`: execute a pipeline over a JSONL file of requests.

    agp run examples/chat.agp --input examples/prompts.jsonl --output answers.jsonl --stats s.json

Input: one request a line (`id`, `prompt` or `messages`, optional sampling fields).
Output: one JSON line per input line, in input order: `id`, `text`, `finish_reason`,
`usage`; a bad line gives `{"id", "error": {"line", "message"}}` and every other line
still runs. A progress bar and, at the end, a summary go to stderr.
"""
from __future__ import annotations

import json
import sys
import threading
import time

from pipeline_dsl.commands import add_pipeline_arguments

HELP = "run a pipeline over a JSONL file of requests on a real model"


def add_arguments(p) -> None:
    add_pipeline_arguments(p)
    p.add_argument("--input", "-i", default="-", help="JSONL requests (default: stdin)")
    p.add_argument("--output", "-o", default="-", help="JSONL answers (default: stdout)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16", "int8"], default=None,
                   help="override the pipeline's precision")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--stats", default=None, help="write the run summary as JSON to this file")
    p.add_argument("--no-overlap", action="store_true",
                   help="run the plan's streams serially (A/B against overlap)")
    p.add_argument("--trace", default=None, help="write a Chrome-trace JSON (Perfetto) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def main(args) -> int:
    from pipeline_dsl.requests_io import RequestError, parse_line
    from pipeline_dsl.runner import RunRequest, format_summary, run_pipeline

    try:
        lines = _read_lines(args.input)
    except FileNotFoundError:
        print(f"agp run: error: input file not found: {args.input}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        print(f"agp run: error: {args.input} is not UTF-8 ({e.reason} at byte {e.start})", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"agp run: error: cannot read {args.input}: {e.strerror}", file=sys.stderr)
        return 2
    try:  # before the model loads: a bad output path fails at once
        out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    except OSError as e:
        print(f"agp run: error: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        return 2

    from pipeline_dsl.engine.trace import Trace
    from pipeline_dsl.runtime import build_runtime

    t_load = time.perf_counter()
    trace = Trace() if args.trace else None
    runtime = build_runtime(args.pipeline, args.name, overrides={"dtype": args.dtype, "threads": args.threads},
                            overlap=not args.no_overlap, trace=trace)
    load_s = time.perf_counter() - t_load

    results: list[dict | None] = []
    requests: list[RunRequest] = []
    bad_lines = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        slot = len(results)
        results.append(None)
        try:
            req = parse_line(line, lineno)
        except RequestError as e:
            bad_lines += 1
            results[slot] = {"id": _guess_id(line, lineno), "error": {"line": lineno, "message": str(e),
                                                                      "type": "invalid"}}
            continue
        requests.append(RunRequest(slot=slot, line=lineno, parsed=req))

    next_to_write = 0
    write_lock = threading.Lock()

    def flush() -> None:
        nonlocal next_to_write
        with write_lock:
            while next_to_write < len(results) and results[next_to_write] is not None:
                out.write(json.dumps(results[next_to_write], ensure_ascii=False) + "\n")
                next_to_write += 1
            out.flush()

    def on_done(slot: int, record: dict) -> None:
        results[slot] = record
        flush()

    flush()  # leading bad lines
    try:
        summary = run_pipeline(runtime, requests, on_done=on_done, progress=not args.no_progress)
    finally:
        flush()
        if out is not sys.stdout:
            out.close()
        runtime.shutdown()
    if args.trace:
        runtime.trace.write(args.trace)
        summary["trace"] = args.trace
    summary["model_load_s"] = round(load_s, 3)
    summary["bad_lines"] = bad_lines
    summary["requests"] += bad_lines
    summary["errors"] += bad_lines
    print(format_summary(summary), file=sys.stderr)
    if args.stats:
        with open(args.stats, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    if summary["requests"] and summary["errors"] == summary["requests"]:
        return 1                          # every request failed: the run did not do its job
    return 0


def _guess_id(line: str, lineno: int):
    try:
        obj = json.loads(line)
        if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)):
            return obj["id"]
    except ValueError:
        pass
    return lineno
