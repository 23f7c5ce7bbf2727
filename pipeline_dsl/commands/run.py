"""`agp run PIPELINE`: execute a pipeline over a JSONL file of requests.

    agp run examples/chat.agp --input examples/prompts.jsonl --output answers.jsonl --stats s.json
    agp run examples/chat.agp -i big.jsonl -o answers.jsonl --resume     # after an interruption

Input: one request a line (`id`, `prompt` or `messages`, optional sampling fields).
Output: one JSON line per input line, in input order, each written whole and flushed as
soon as the lines before it are: `id`, `text`, `finish_reason`, `usage`; a line that
cannot be run gives `{"id", "error": {"line", "message", "type"}}` and every other line
still runs. An existing output file is never overwritten silently: `--overwrite` replaces
it, `--resume` keeps it and runs only the requests whose id it does not hold yet.
Ctrl-C (SIGINT) or SIGTERM stops admitting, aborts what is in flight (those requests are
not written, so `--resume` runs them again), writes the summary and `--stats`, and exits
130 or 143. Exit 1 when every request failed. A progress bar and the summary go to stderr.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from pipeline_dsl.commands import add_pipeline_arguments

HELP = "run a pipeline over a JSONL file of requests on a real model"


def add_arguments(p) -> None:
    add_pipeline_arguments(p)
    p.add_argument("--input", "-i", default="-", help="JSONL requests (default: stdin)")
    p.add_argument("--output", "-o", default="-", help="JSONL answers (default: stdout)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    how.add_argument("--resume", action="store_true",
                     help="keep the output file and run only the requests whose id it does not hold")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16", "int8"], default=None,
                   help="override the pipeline's precision")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--stats", default=None, help="write the run summary as JSON to this file")
    streams = p.add_mutually_exclusive_group()
    streams.add_argument("--no-overlap", action="store_true",
                         help="run the plan's streams serially (A/B against overlap; by default CUDA overlaps "
                              "them, CPU only with a core to spare beside the forward's threads)")
    streams.add_argument("--overlap", action="store_true",
                         help="overlap the plan's streams even on a CPU without a core to spare")
    p.add_argument("--trace", default=None, help="write a Chrome-trace JSON (Perfetto) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _err(message: str) -> int:
    print(f"agp run: error: {message}", file=sys.stderr)
    return 2


def _read_lines(path: str) -> list[bytes]:
    data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.splitlines()


def dump(record: dict) -> str:
    """One output line; text that is not valid Unicode is written escaped rather than failing."""
    try:
        line = json.dumps(record, ensure_ascii=False)
        line.encode("utf-8")
        return line
    except UnicodeEncodeError:
        return json.dumps(record, ensure_ascii=True)


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True)


def answered_ids(path: str) -> tuple[set[str], int]:
    """Ids already in an output file (as JSON keys), and the byte length of its whole lines: a
    last line cut short by a kill is not a record."""
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    ids = set()
    for raw in data[:keep].splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            ids.add(_key(rec["id"]))
    return ids, keep


class Interrupt:
    """SIGINT / SIGTERM: the first stops the run cleanly, a second one ends the process."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.event.is_set():
            print("\nagp run: interrupted again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        self.event.set()
        print(f"\nagp run: {signal.Signals(signum).name}: stopping (in-flight requests are aborted and "
              "not written; --resume runs them)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def main(args) -> int:
    from pipeline_dsl.requests_io import RequestError, load_json, parse_line
    from pipeline_dsl.runner import RunRequest, format_summary, run_pipeline

    try:
        lines = _read_lines(args.input)
    except FileNotFoundError:
        return _err(f"input file not found: {args.input}")
    except OSError as e:
        return _err(f"cannot read {args.input}: {e.strerror}")
    done_ids: set[str] = set()
    to_file = args.output != "-"
    if to_file and os.path.isdir(args.output):
        return _err(f"cannot write {args.output}: it is a folder")
    # a device or a pipe (/dev/null, a FIFO a reader drains) is written as a stream
    if to_file and os.path.isfile(args.output) and os.path.getsize(args.output) > 0:
        if args.resume:
            done_ids, whole = answered_ids(args.output)
            if whole < os.path.getsize(args.output):
                print(f"agp run: {args.output}: dropping an incomplete last line", file=sys.stderr)
                os.truncate(args.output, whole)
        elif not args.overwrite:
            return _err(f"{args.output} exists: pass --resume to run only the requests it does not "
                        "answer yet, or --overwrite to replace it")
    try:  # before the model loads: a bad output path fails at once
        if to_file:
            out = open(args.output, "a" if args.resume else "w", encoding="utf-8")
        else:
            out = sys.stdout
    except OSError as e:
        return _err(f"cannot write {args.output}: {e.strerror}")

    from pipeline_dsl.engine.trace import Trace
    from pipeline_dsl.runtime import build_runtime

    t_load = time.perf_counter()
    trace = Trace() if args.trace else None
    runtime = build_runtime(args.pipeline, args.name, overrides={"dtype": args.dtype, "threads": args.threads},
                            overlap=True if args.overlap else False if args.no_overlap else None, trace=trace)
    load_s = time.perf_counter() - t_load

    results: list[dict | None] = []
    requests: list[RunRequest] = []
    bad_lines = skipped = 0
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            req = parse_line(raw.decode("utf-8"), lineno)
        except UnicodeDecodeError as e:
            req, error = None, f"the line is not UTF-8 text (byte {e.start})"
        except RequestError as e:
            req, error = None, str(e)
        rid = req.id if req is not None else _guess_id(raw, lineno, load_json)
        if _key(rid) in done_ids:
            skipped += 1
            continue
        slot = len(results)
        results.append(None)
        if req is None:
            bad_lines += 1
            results[slot] = {"id": rid, "error": {"line": lineno, "message": error, "type": "invalid"}}
            continue
        requests.append(RunRequest(slot=slot, line=lineno, parsed=req))

    next_to_write = 0
    write_lock = threading.Lock()

    def flush() -> None:
        nonlocal next_to_write
        with write_lock:
            while next_to_write < len(results) and results[next_to_write] is not None:
                if results[next_to_write] is not False:         # False: interrupted, not written
                    out.write(dump(results[next_to_write]) + "\n")
                    out.flush()
                next_to_write += 1

    def on_done(slot: int, record: dict) -> None:
        results[slot] = record
        flush()

    def on_interrupted(slot: int) -> None:
        results[slot] = False
        flush()

    flush()  # leading bad lines
    with Interrupt() as interrupt:
        try:
            summary = run_pipeline(runtime, requests, on_done=on_done, progress=not args.no_progress,
                                   stop=interrupt.event, on_interrupted=on_interrupted)
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
    summary["resumed_skipped"] = skipped
    summary["requests"] += bad_lines
    summary["errors"] += bad_lines
    print(format_summary(summary), file=sys.stderr)
    if args.stats:
        with open(args.stats, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    if interrupt.signum is not None:
        return 128 + interrupt.signum                 # 130 for SIGINT, 143 for SIGTERM
    if summary["requests"] and summary["errors"] == summary["requests"]:
        return 1                          # every request failed: the run did not do its job
    return 0


def _guess_id(raw: bytes, lineno: int, load_json=None):
    """The id of a line that cannot run, when it has a readable one; else its line number."""
    try:
        obj = json.loads(raw.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return lineno
    if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)) and not isinstance(obj.get("id"), bool):
        return obj["id"]
    return lineno
