"""`agp run PIPELINE`: execute a pipeline over a JSONL file of requests.

    agp run examples/chat.agp --input examples/prompts.jsonl --output answers.jsonl --stats s.json
    agp run examples/chat.agp -i big.jsonl -o answers.jsonl --resume     # after an interruption

Input: one request a line (`id`, `prompt` or `messages`, optional sampling fields).
Output: one JSON line per input line (a blank line gets none; a UTF-8 BOM and CRLF endings are
read), in input order, each written whole and flushed as
soon as the lines before it are: `id`, `text`, `finish_reason`, `usage` (and `stop_reason`, `logprobs`,
`prompt_logprobs`, `choices` where asked, as agp serve's completions choices); a line that
cannot be run gives `{"id", "error": {"line", "message", "type"}}` and every other line
still runs: one longer than MAX_LINE_BYTES (if no end of line follows within MAX_SKIP_BYTES,
as from /dev/zero, the input is read no further), or whose id an earlier line has (a line without
an id takes its line number as id; ids are unique). A file of OpenAI batch-API lines
(`custom_id`, `method`, `url`, `body`) is answered in the Batch API's output shape, one line per
input line, in input order (commands/batch_api.py). A file none of whose lines is JSON (a CSV, a
text file) is refused before the model loads, exit 2. A gzip-compressed input (a file or stdin)
is read decompressed. An existing output file is never
overwritten silently: `--overwrite` replaces it, `--resume` (with `-o` only) keeps it and runs only the lines
it holds no record of yet (counted per id, so a repeated id is answered by its error record);
an output holding a line that is no record of this input (another file's answers, a line that is
not an agp record) is refused before the model loads, exit 2: appending would mix two runs; so
is an output whose fingerprint (OUT.agp-run, written beside it: the input's lines, the pipeline
file, --pipeline, --dtype, --generation-config) says another input or pipeline made it (lines appended to the input
are not another: --resume answers them).
Ctrl-C (SIGINT), SIGTERM or SIGHUP stops admitting, aborts what is in flight (those requests are
not written, so `--resume` runs them again), writes the summary and `--stats`, and exits
130, 143 or 129; while the model loads, one stops the load at once with a line saying so (same
exit status, nothing written). A write that fails (a full disk, a closed pipe, an output file
deleted meanwhile) stops the run the same way at once, says why, writes the summary and exits 1.
Exit 1 when every request failed. A progress bar and the summary go to stderr, and so does
whatever the pipeline's own code prints while the answers go to stdout (commands/stdout.py).
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import os
import signal
import stat
import sys
import threading
import time
import zlib
from collections import Counter

from pipeline_dsl.cliargs import GENERATION_CONFIG_HELP, generation_config, output_file
from pipeline_dsl.commands import add_pipeline_arguments
from pipeline_dsl.commands.stdout import answers_on_stdout

HELP = "run a pipeline over a JSONL file of requests on a real model"
MAX_LINE_BYTES = 16 << 20      # one request line; a longer one is an error record (serve's bodies: 4 MiB)
MAX_SKIP_BYTES = 256 << 20     # read past a too-long line's limit looking for its end; then stop reading


def add_arguments(p) -> None:
    add_pipeline_arguments(p)
    p.add_argument("--input", "-i", default="-",
                   help="JSONL requests, agp's lines or OpenAI batch-API lines (default: stdin)")
    p.add_argument("--output", "-o", default="-", help="JSONL answers (default: stdout)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    how.add_argument("--resume", action="store_true",
                     help="keep the output file and run only the requests whose id it does not hold")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16", "int8"], default=None,
                   help="override the pipeline's precision")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--generation-config", type=generation_config, default="auto", metavar="auto|vllm|FOLDER",
                   help=GENERATION_CONFIG_HELP)
    p.add_argument("--stats", type=output_file, default=None, help="write the run summary as JSON to this file")
    streams = p.add_mutually_exclusive_group()
    streams.add_argument("--no-overlap", action="store_true",
                         help="run the plan's streams serially (A/B against overlap; by default CUDA overlaps "
                              "them, CPU only with a core to spare beside the forward's threads)")
    streams.add_argument("--overlap", action="store_true",
                         help="overlap the plan's streams even on a CPU without a core to spare")
    p.add_argument("--trace", type=output_file, default=None, help="write a Chrome-trace JSON (Perfetto) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _err(message: str) -> int:
    print(f"agp run: error: {message}", file=sys.stderr)
    return 2


class TooLong(bytes):
    """A line past MAX_LINE_BYTES: its first bytes only (the rest was read and dropped); `endless`:
    no end of line came within MAX_SKIP_BYTES, so the input was not read further."""
    endless = False


def _read_lines(path: str, limit: int = MAX_LINE_BYTES) -> list[bytes]:
    """The input's lines, each read to at most `limit` bytes: a longer one comes back as TooLong
    (memory stays bounded by the lines kept; -i /dev/zero is one endless line)."""
    if path == "-":
        return _lines(_unzipped(sys.stdin.buffer), limit)
    if stat.S_ISDIR(os.stat(path).st_mode):
        raise IsADirectoryError(21, "it is a folder")
    with open(path, "rb") as f:
        return _lines(_unzipped(f), limit)


def _unzipped(f):
    """`f`, or what it holds when it is gzip-compressed (its first bytes say so, whatever its name)."""
    if isinstance(f, io.BufferedReader) and f.peek(2)[:2] == b"\x1f\x8b":   # another stream: read as it is
        return _Gunzipped(fileobj=f, mode="rb")
    return f


class _Gunzipped(gzip.GzipFile):
    """A gzip'd input; one cut short or corrupt is an OSError saying so (`cannot read IN: ...`)."""

    def readline(self, size=-1):
        try:
            return super().readline(size)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise OSError(errno.EIO, f"it is gzip-compressed and cannot be decompressed ({e})") from None


def _lines(f, limit: int) -> list[bytes]:
    out: list[bytes] = []
    first = True
    while True:
        line = f.readline(limit + 1)
        if not line:
            return out
        if first and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        first = False
        if len(line) > limit and not line.endswith(b"\n"):
            head, skipped = TooLong(line[:200]), 0
            while line and not line.endswith(b"\n"):      # the rest of the line: read, not kept
                if skipped > MAX_SKIP_BYTES:
                    head.endless = True                    # no end in sight: stop reading the input
                    out.append(head)
                    return out
                line = f.readline(1 << 20)
                skipped += len(line)
            out.append(head)
            continue
        out.append(line.rstrip(b"\r\n") if line.endswith(b"\n") else line)


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


def answered_ids(path: str, input_ids: Counter) -> tuple[Counter, int, list[int]]:
    """What --resume keeps of an output file: how many records of each id it holds (ids as JSON
    keys), the byte length of its whole lines (a last line cut short by a kill is not a record),
    and the numbers of the lines that are no record of this input: not a JSON object with an
    `id` and a `text`, `choices` or `error` (or a batch-API output line's `custom_id` and
    `response`), or an id that no input line has (or more records of an id than input lines
    have it)."""
    ids: Counter = Counter()
    keep, lineno, foreign = 0, 0, []
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            keep += len(raw)
            lineno += 1
            if not raw.strip():
                continue                      # a blank line holds nothing to mix up
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError):
                rec = None
            batch = isinstance(rec, dict) and "custom_id" in rec and "response" in rec     # a batch-API line's
            ok = batch or (isinstance(rec, dict) and "id" in rec
                           and any(k in rec for k in ("text", "choices", "error")))
            key = _key(rec["custom_id"] if batch else rec["id"]) if ok else None
            if not ok or ids[key] >= input_ids[key]:
                foreign.append(lineno)
                continue
            ids[key] += 1
    return ids, keep, foreign


def _line_id(raw: bytes, lineno: int):
    """(request, error, id, batch) of one input line, its JSON decoded once: the id its record
    carries, answered or not; `batch`: an OpenAI batch-API line (its request a BatchLine, its id
    the custom_id)."""
    from pipeline_dsl.commands import batch_api
    from pipeline_dsl.requests_io import RequestError, is_id, load_json, parse_line_object

    if isinstance(raw, TooLong):
        error = f"the line is longer than {MAX_LINE_BYTES >> 20} MiB"
        if raw.endless:
            error += f" (no end of line in {MAX_SKIP_BYTES >> 20} MiB more: the input is not read further)"
        return None, error, lineno, False
    obj = None
    try:
        obj = load_json(raw, "the line")               # not UTF-8, not JSON: a RequestError saying so
        if batch_api.is_batch_line(obj):
            return batch_api.read_line(obj, lineno), None, obj["custom_id"], True
        req = parse_line_object(obj, lineno)
        return req, None, req.id, False
    except RequestError as e:
        error = str(e)
    if obj is None:
        return None, error, _guess_id(raw, lineno), False
    batch = batch_api.is_batch_line(obj)
    rid = obj.get("custom_id" if batch else "id") if isinstance(obj, dict) else None
    return None, error, rid if is_id(rid) else lineno, batch


class Interrupt:
    """SIGINT / SIGTERM / SIGHUP: the first stops the run cleanly, a second one ends the process
    (SIGHUP's default, a closed terminal, would kill it without the summary or --stats)."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event if event is not None else threading.Event()
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
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
    with contextlib.ExitStack() as cleanup:      # standard output back as it was, however the run ends
        return _run(args, cleanup)


def _run(args, cleanup: contextlib.ExitStack) -> int:
    from pipeline_dsl.commands import batch_api
    from pipeline_dsl.commands.runner import RunRequest, format_summary, run_pipeline
    from pipeline_dsl.serve.api_error import APIError

    if args.resume and args.output == "-":
        return _err("--resume continues an output file: give it with --output FILE (the answers go to "
                    "standard output, which holds no earlier answers to keep)")
    if args.input != "-" and args.output != "-" and _same_file(args.input, args.output):
        return _err(f"the output {args.output} is the input file: its answers would replace the requests "
                    "(give another --output)")
    try:
        lines = _read_lines(args.input)
    except FileNotFoundError:
        return _err(f"input file not found: {args.input}")
    except OSError as e:
        return _err(f"cannot read {args.input}: {e.strerror}")
    # each line's request (or why it cannot run) and id, before anything loads: --resume needs the ids
    parsed = [(lineno, raw, *_line_id(raw, lineno))
              for lineno, raw in enumerate(lines, 1) if raw.strip()]
    not_jsonl = _not_json_lines(parsed)
    if not_jsonl:
        return _err(f"{'stdin' if args.input == '-' else args.input} is not JSON Lines: {not_jsonl}")
    batch_file = any(p[5] for p in parsed)      # OpenAI batch-API lines: every line answered in that shape
    done_ids: Counter = Counter()
    to_file = args.output != "-"
    if to_file and os.path.isdir(args.output):
        return _err(f"cannot write {args.output}: it is a folder")
    # a device or a pipe (/dev/null, a FIFO a reader drains) is written as a stream
    fingerprint = _fingerprint(args, lines) if to_file else None      # what the answers are made from
    if to_file and os.path.isfile(args.output) and os.path.getsize(args.output) > 0:
        if args.resume:
            done_ids, whole, foreign = answered_ids(args.output, Counter(_key(p[4]) for p in parsed))
            if foreign:
                n = len(foreign)
                source = "stdin" if args.input == "-" else args.input
                return _err(f"{args.output} is not the output of {source}: {n} line{'s' if n > 1 else ''} "
                            f"{'are' if n > 1 else 'is'} no answer to its lines (the first: line {foreign[0]}), "
                            "another input's answers or not agp records; --resume would append to them. "
                            "Pass --overwrite to start afresh")
            changed = _changed_since(args.output, fingerprint, lines)
            if changed:
                return _err(f"{args.output} was made from another {changed} than this run's: --resume would "
                            f"append answers of this {changed} to those of the other. Pass --overwrite to start "
                            f"afresh (or run the {changed} it was made from)")
            if whole < os.path.getsize(args.output):
                print(f"agp run: {args.output}: dropping an incomplete last line", file=sys.stderr)
                os.truncate(args.output, whole)
        elif not args.overwrite:
            return _err(f"{args.output} exists: pass --resume to run only the requests it does not "
                        "answer yet, or --overwrite to replace it")
    try:  # before the model loads: a bad output path fails at once
        if to_file:
            out = open(args.output, "a" if args.resume else "w", encoding="utf-8")
        elif sys.stdout is None:
            return _err("cannot write the answers: standard output is closed (give --output FILE)")
        else:   # the answers alone: what the pipeline's code prints goes to stderr (commands/stdout.py)
            out = cleanup.enter_context(answers_on_stdout())
            if (getattr(out, "encoding", None) or "utf-8").lower().replace("-", "") != "utf8" and \
                    hasattr(out, "reconfigure"):
                out.reconfigure(encoding="utf-8")      # JSONL is UTF-8, as -o FILE writes it, whatever the locale
        if to_file and os.path.isfile(args.output):
            _write_fingerprint(args.output, fingerprint)   # what a later --resume checks it continues: this run's
                                                     # input (checked above to be the one the answers come
                                                     # from, or it with lines appended), pipeline and dtype
    except OSError as e:
        return _err(f"cannot write {args.output}: {e.strerror}")

    source = "stdin" if args.input == "-" else args.input
    if not parsed or sum(done_ids.values()) >= len(parsed):
        # nothing to answer: the pipeline is checked (a broken one still exits 2), no model loads
        from pipeline_dsl.flow import load_graph

        load_graph(args.pipeline, args.name, args.allow_path)
        out.close()
        print(f"agp run: nothing to run: {source} has no requests" if not parsed else
              f"agp run: nothing to run: {args.output} answers every line of {source} already", file=sys.stderr)
        return 0

    from pipeline_dsl.commands.stopping import load_unless_stopped

    t_load = time.perf_counter()
    runtime, sig = load_unless_stopped(lambda: _load(args))     # torch's import counts as loading
    if sig is not None:                        # nothing ran, nothing was written: the same command runs it all
        print(f"agp run: {signal.Signals(sig).name} while loading the pipeline: stopped before running "
              "any request", file=sys.stderr, flush=True)
        try:
            out.flush()
        except OSError:
            pass
        os._exit(128 + sig)                    # the load thread may be anywhere (an import, a C call)
    load_s = time.perf_counter() - t_load

    results: list[dict | None] = []
    requests: list[RunRequest] = []
    bad_lines = skipped = 0
    first_line: dict[str, int] = {}        # id -> the line that has it (ids are unique)
    stages = tuple(runtime.seg_of_gen)
    max_model_len = int(min((es.max_model_len for es in runtime.segments), default=1 << 20))
    max_stage_n = max((n for es in runtime.segments for n in es.n.values()), default=1)
    for lineno, raw, req, error, rid, is_batch in parsed:
        key = _key(rid)
        if done_ids[key] > 0:                  # --resume: this line's record is in the output
            done_ids[key] -= 1
            first_line.setdefault(key, lineno)
            skipped += 1
            continue
        if key in first_line and req is not None:
            what = "custom_id" if is_batch else "id"
            req, error = None, (f"{what} {json.dumps(rid)[:60]} is also the {what} of line {first_line[key]}: "
                                f"{what}s must be unique" + ("" if is_batch else
                                                             " (a line without an id takes its line number)"))
        elif batch_file and req is not None and not is_batch:
            req, error = None, ("not a batch request line ({\"custom_id\", \"method\", \"url\", \"body\"}) "
                                "while the file's other lines are: give every line that shape")
        first_line.setdefault(key, lineno)
        slot = len(results)
        results.append(None)
        if req is not None and is_batch:
            try:                               # the body, as agp serve checks it (the model's context known now)
                req.parse(max_model_len, stages, runtime.name, max_stage_n)
            except APIError as e:
                bad_lines += 1
                results[slot] = batch_api.error_record(rid, lineno, e)
                continue
        if req is None:
            bad_lines += 1
            results[slot] = (batch_api.error_record(rid, lineno, APIError(error)) if batch_file else
                             {"id": rid, "error": {"line": lineno, "message": error, "type": "invalid"}})
            continue
        requests.append(RunRequest(slot=slot, line=lineno, parsed=None if is_batch else req,
                                   batch=req if is_batch else None))
    del lines, parsed                          # the requests hold what runs: the raw lines are not kept

    next_to_write = 0
    write_lock = threading.Lock()
    write_error: list[OSError] = []
    stop = threading.Event()

    written = 0

    def flush() -> None:
        nonlocal next_to_write, written
        with write_lock:
            while not write_error and next_to_write < len(results) and results[next_to_write] is not None:
                if results[next_to_write] is not False:         # False: written, or interrupted (not written)
                    try:
                        out.write(dump(results[next_to_write]) + "\n")
                        out.flush()
                        written += 1
                        if to_file and os.fstat(out.fileno()).st_nlink == 0:
                            raise OSError(errno.ENOENT, "the file (or its folder) was deleted while the run "
                                                        f"wrote it: the {written} answer(s) written are lost")
                    except OSError as e:      # a full disk, a closed pipe: stop at the first failed write
                        write_error.append(e)
                        stop.set()
                        return
                results[next_to_write] = False          # written: the record is not kept
                next_to_write += 1

    def on_done(slot: int, record: dict) -> None:
        results[slot] = record
        flush()

    def on_interrupted(slot: int) -> None:
        results[slot] = False
        flush()

    flush()  # leading bad lines
    with Interrupt(stop) as interrupt:
        try:
            summary = run_pipeline(runtime, requests if not write_error else [], on_done=on_done,
                                   progress=not args.no_progress, stop=stop, on_interrupted=on_interrupted)
        finally:
            flush()
            try:
                out.close()                   # a file, or the answers' own stdout (commands/stdout.py)
            except OSError as e:              # what the last flush could not write
                write_error.append(e)
            runtime.shutdown()
    trace_error = None
    if args.trace:
        try:
            runtime.trace.write(args.trace)
            summary["trace"] = args.trace
        except OSError as e:                  # said after the summary; the answers are written
            trace_error = f"cannot write the trace to {args.trace}: {e.strerror or e}"
    summary["model_load_s"] = round(load_s, 3)
    summary["bad_lines"] = bad_lines
    summary["resumed_skipped"] = skipped
    summary["requests"] += bad_lines
    summary["errors"] += bad_lines
    summary["written"] = written
    if write_error:
        e = write_error[0]
        summary["write_error"] = f"{e.strerror or e}"
        summary["unwritten"] = summary["requests"] - written      # answered after the failed write: lost
        _err(f"cannot write {args.output if to_file else 'the output'}: {e.strerror or e}; the run stopped there "
             "(the requests in flight were aborted; --resume runs them)")
    print(format_summary(summary), file=sys.stderr)
    if args.stats:
        try:
            with open(args.stats, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        except OSError as e:                  # the answers are written: say what is missing, exit 1
            _err(f"cannot write the summary to {args.stats}: {e.strerror or e}")
            return 1
    if trace_error:
        _err(trace_error)
        return 1
    if write_error:
        return 1
    if interrupt.signum is not None:
        return 128 + interrupt.signum                 # 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP
    if summary["requests"] and summary["errors"] == summary["requests"]:
        # the run did not do its job: say so, or exit 1 after an ordinary summary reads as a crash
        n = summary["requests"]
        print(f"agp run: every request failed ({n} of {n}; each line's error is in the output): exit 1",
              file=sys.stderr)
        return 1
    return 0


def _load(args):
    """The pipeline's runtime, as the flags ask (imports torch: seconds)."""
    from pipeline_dsl.engine.trace import Trace
    from pipeline_dsl.flow import build_runtime

    return build_runtime(args.pipeline, args.name, overrides={"dtype": args.dtype, "threads": args.threads,
                                                               "generation_config": args.generation_config},
                         allow_paths=args.allow_path,
                         overlap=True if args.overlap else False if args.no_overlap else None,
                         trace=Trace() if args.trace else None)


def _digest(lines: list[bytes]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for line in lines:
        digest.update(line + b"\n")
    return digest.hexdigest()


def _fingerprint(args, lines: list[bytes]) -> dict:
    """What an output file's answers were made from: the input's lines (as read: a BOM and CRLF
    endings do not count) and how many, the pipeline file, the pipeline chosen in it, --dtype and
    --generation-config (when not the default auto: a fingerprint written before the flag stays
    the same run's)."""
    import hashlib

    try:
        with open(args.pipeline, "rb") as f:
            pipeline = hashlib.sha256(f.read()).hexdigest()
    except OSError:                 # no pipeline to read: its load says so, in check's words (exit 2)
        pipeline = None
    sampling = [args.generation_config] if args.generation_config != "auto" else []
    return {"input": _digest(lines), "input_lines": len(lines),
            "pipeline": [pipeline, args.name, args.dtype, *sampling]}


def _fingerprint_path(output: str) -> str:
    return output + ".agp-run"


def _write_fingerprint(output: str, fingerprint: dict) -> None:
    """Beside the output file: what --resume checks it continues."""
    with open(_fingerprint_path(output), "w", encoding="utf-8") as f:
        json.dump(fingerprint, f)


def _changed_since(output: str, now: dict, lines: list[bytes]) -> str | None:
    """'input' or 'pipeline' when the output file's answers were made from another one than this
    run's (`now`, its fingerprint of `lines`); None when the same (an input with lines appended after those it was made from is the
    same: --resume answers the new lines), or when the output has no fingerprint beside it (it
    was not written by agp run -o)."""
    try:
        with open(_fingerprint_path(output), encoding="utf-8") as f:
            was = json.load(f)
    except (OSError, ValueError):
        return None
    n = was.get("input_lines")
    grown = isinstance(n, int) and 0 < n < len(lines) and was.get("input") == _digest(lines[:n])
    if was.get("input") != now["input"] and not grown:   # lines appended to it: the same input, more of it
        return "input"
    return "pipeline" if was.get("pipeline") != now["pipeline"] else None


def _same_file(a: str, b: str) -> bool:
    """Both paths name one file (the same path, a link to it)."""
    try:
        return os.path.samefile(a, b)
    except OSError:                           # one of them does not exist (yet): not the same
        return False


def _not_json_lines(parsed: list) -> str | None:
    """Why the input is no JSON Lines file at all (a CSV or a text file given by mistake): none of
    its lines holds JSON. None when one does: a file of JSON lines with some bad ones runs, each
    bad line answered by its error record."""
    if not parsed or any(p[2] is not None for p in parsed):
        return None
    for _, raw, *_ in parsed:
        if isinstance(raw, TooLong):          # only its head was kept: it says nothing of the format
            return None
        try:
            json.loads(raw.decode("utf-8"))
            return None
        except (ValueError, RecursionError):
            continue
    first = parsed[0][1][:60].decode("utf-8", "replace")
    n = len(parsed)
    hint = (" (a CSV file? turn each row into a JSON line, e.g. with "
            "python -c 'import csv,json,sys; [print(json.dumps(r)) for r in csv.DictReader(sys.stdin)]')"
            if "," in first or "\t" in first else
            " (a text file of prompts? jq -R -c '{prompt: .}' FILE turns each line into a request)")
    return (f"none of its {n} line{'s' if n > 1 else ''} is JSON (line {parsed[0][0]}: {first!r}); agp run reads one "
            f"JSON request a line, such as {{\"prompt\": \"Hello\"}} or {{\"messages\": [...]}}{hint}")


def _guess_id(raw: bytes, lineno: int):
    """The id of a line that is not JSON as it stands (not UTF-8: read with U+FFFD in its place),
    when it has a readable one; else its line number."""
    from pipeline_dsl.requests_io import is_id

    try:
        obj = json.loads(raw.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return lineno
    return obj["id"] if isinstance(obj, dict) and is_id(obj.get("id")) else lineno
