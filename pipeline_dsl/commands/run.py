"""`agp run PIPELINE`: execute a pipeline over a JSONL file of requests.

    agp run examples/chat.agp --input examples/prompts.jsonl --output answers.jsonl --stats s.json
    agp run examples/chat.agp -i big.jsonl -o answers.jsonl --resume     # after an interruption
    producer | agp run examples/chat.agp -i - -o answers.jsonl           # answered as the lines come

Input: one request a line (`id`, `prompt` or `messages`, optional sampling fields), read as a
stream (commands/run_input.py): a line is answered while the lines after it are not written yet,
and a line is not kept once its request is made (memory does not grow with the input's length
but for the ids, which stay known, about 140 bytes a line: ids are unique).
Output: one JSON line per input line (a blank line gets none; a UTF-8 BOM and CRLF endings are
read), in input order, each written whole and flushed as
soon as the lines before it are: `id`, `text`, `finish_reason`, `usage` (and `stop_reason`, `logprobs`,
`prompt_logprobs`, `choices` where asked, as agp serve's completions choices; `warning` where a
forced tool call sets the line's format aside, as agp serve's Warning header says it, and once on
stderr after the summary); a line that
cannot be run gives `{"id", "error": {"line", "message", "type"}}` and every other line
still runs: one longer than MAX_LINE_BYTES (if no end of line follows within MAX_SKIP_BYTES,
as from /dev/zero, the input is read no further), or whose id an earlier line has (a line without
an id takes its line number as id; ids are unique, but a line that cannot run takes no id from a
later one). A file of OpenAI batch-API lines
(`custom_id`, `method`, `url`, `body`) is answered in the Batch API's output shape, one line per
input line, in input order (commands/batch_api.py); the first line that is a JSON object says
which shape the input is, and a line of the other shape is an error record. A file none of whose
lines is JSON (a CSV, a text file) is refused before the model loads, exit 2 (the model loads
once a line to run has come). A gzip-compressed input (a file or stdin) is read decompressed; an
input that cannot be read to its end (a gzip'd one cut short) has the lines before answered,
then the run says after which line it failed, exit 2. An existing output file is never
overwritten silently: `--overwrite` replaces it, `--resume` (with `-o` only) keeps it and runs only the lines
it holds no record of yet (counted per id, so a repeated id is answered by its error record);
an output holding a line that is no record of this input (another file's answers, a line that is
not an agp record) is refused before the model loads, exit 2: appending would mix two runs; so
is an output whose fingerprint (OUT.agp-run, written beside it: the input's lines read, how many,
the pipeline file and its includes, the json_schema files it reads, --pipeline, --dtype, the
sampling defaults --generation-config and --override-generation-config give) says another input or
pipeline made it (lines appended to the input are not another: --resume answers them). The
fingerprint is the lines' as they stream past: before an answer to a line it does not cover is
written, it is written anew, so it covers every answer in OUT however the run ends; --resume reads
the lines it covers and those OUT answers before the model loads, and checks them. A file the run
writes (the output, --stats, --trace) that is one it reads (the input, also on stdin; the
pipeline) or another it writes is refused before it starts, exit 2; so is a run whose output file
another agp run is writing (a lock on it, held while a run lasts).
Ctrl-C (SIGINT), SIGTERM or SIGHUP stops admitting and reading, aborts what is in flight (those
requests are not written, so `--resume` runs them again, after the answers kept: a resumed output is
in input order but for those), writes the summary and `--stats`, and exits
130, 143 or 129; while the model loads, or while the run waits for the input's first lines (a
pipe that has sent nothing yet), one stops it at once with a line saying so (same exit status,
nothing written). A write that fails (a full disk, a closed pipe, an output file
deleted meanwhile) stops the run the same way at once, says why, writes the summary and exits 1;
the output file keeps whole lines (a line a full disk cut midway is taken back). A pipe whose reader
has gone (`agp run P -i in.jsonl | head -1`) stops it the same way, with no error, exit 141
(128 + SIGPIPE, as a tool the signal ends: `yes | head -1`).
The summary counts the lines read (`lines_read`: requests, interrupted and resumed_skipped) and
says when the input was not read to its end. Exit 1 when every request failed. A progress bar and
the summary go to stderr, and so does
whatever the pipeline's own code prints while the answers go to stdout (commands/stdout.py).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import sys
import threading
import time
from collections import Counter, deque
from typing import Callable

from pipeline_dsl.cliargs import (CLOSED_PIPE, GENERATION_CONFIG_HELP, OVERRIDE_GENERATION_CONFIG_HELP,
                                  add_dtype_argument, generation_config, output_file,
                                  override_generation_config, reasoning_parser)
from pipeline_dsl.commands import add_pipeline_arguments
from pipeline_dsl.commands.run_input import MAX_LINE_BYTES, MAX_SKIP_BYTES, InputLines, TooLong, open_input
from pipeline_dsl.commands.stdout import answers_on_stdout
from pipeline_dsl.diagnostics import CheckFailed

HELP = "run a pipeline over a JSONL file of requests on a real model"


def add_arguments(p) -> None:
    add_pipeline_arguments(p)
    p.add_argument("--input", "-i", default="-",
                   help="JSONL requests, agp's lines or OpenAI batch-API lines (default: stdin)")
    p.add_argument("--output", "-o", default="-", help="JSONL answers (default: stdout)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    how.add_argument("--resume", action="store_true",
                     help="keep the output file and run only the requests whose id it does not hold")
    add_dtype_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--generation-config", type=generation_config, default="auto", metavar="auto|vllm|FOLDER",
                   help=GENERATION_CONFIG_HELP)
    p.add_argument("--override-generation-config", type=override_generation_config, default=None, metavar="JSON",
                   help=OVERRIDE_GENERATION_CONFIG_HELP)
    p.add_argument("--reasoning-parser", type=reasoning_parser, default=None, metavar="NAME",
                   help="split a reasoning model's thinking out of chat lines' answers, as agp serve's flag: qwen3 or "
                        "deepseek_r1 (<think>...</think>): what comes before </think> is the record's reasoning "
                        "and reasoning_content, what follows it its text (default: none, the thinking stays in "
                        "the text)")
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


def answered_ids(path: str, input_ids: Counter | None = None) -> tuple[Counter, int, list[int]]:
    """What --resume keeps of an output file: how many records of each id it holds (ids as JSON
    keys), the byte length of its whole lines (a last line cut short by a kill is not a record),
    and the numbers of the lines that are no record of this input: not a JSON object with an
    `id` and a `text`, `choices` or `error` (or a batch-API output line's `custom_id` and
    `response`), or, given `input_ids` (how many input lines have each id), an id that no input
    line has (or more records of an id than input lines have it)."""
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
            if not ok or (input_ids is not None and ids[key] >= input_ids[key]):
                foreign.append(lineno)
                continue
            ids[key] += 1
    return ids, keep, foreign


class LineNumber(int):
    """The id of a line that cannot run and has no id of its own to give (not JSON, not UTF-8,
    too long, an object without one): its line number, written as that integer. Unlike a
    request's id it claims nothing: a later line whose id is that number still runs (with ids
    0, 1, 2, … on lines 1, 2, 3, … one broken line took the next line's id and failed it too)."""


def _line_id(raw: bytes, lineno: int):
    """(request, error, id, batch) of one input line, its JSON decoded once: the RequestError that
    says why it cannot run (its `param`: the field at fault), the id its record carries, answered
    or not; `batch`: an OpenAI batch-API line (its request a BatchLine, its id the custom_id),
    False for any other JSON object, None for a line that is no JSON object."""
    from pipeline_dsl.commands import batch_api
    from pipeline_dsl.requests_io import RequestError, is_id, load_json, parse_line_object

    if isinstance(raw, TooLong):
        error = f"the line is longer than {MAX_LINE_BYTES >> 20} MiB"
        if raw.endless:
            error += f" (no end of line in {MAX_SKIP_BYTES >> 20} MiB more: the input is not read further)"
        return None, RequestError(error), LineNumber(lineno), None
    obj = None
    try:
        obj = load_json(raw, "the line")               # not UTF-8, not JSON: a RequestError saying so
        if batch_api.is_batch_line(obj):
            return batch_api.read_line(obj, lineno), None, obj["custom_id"], True
        req = parse_line_object(obj, lineno)
        return req, None, req.id, False
    except RequestError as e:
        error = e
    if obj is None:
        return None, error, _guess_id(raw, lineno), None
    batch = batch_api.is_batch_line(obj) if isinstance(obj, dict) else None
    rid = obj.get("custom_id" if batch else "id") if isinstance(obj, dict) else None
    return None, error, rid if is_id(rid) else LineNumber(lineno), batch


class RunLines:
    """The input's lines as the run takes them, each parsed once: those --resume finds answered
    in the output are counted and passed over (the first ones of each id), the others are held
    until the run takes them (`entries`). Ids stay known (ids are unique); a line does not."""

    def __init__(self, source: InputLines, done: Counter, mark: int | None = None) -> None:
        self.source = source
        # --resume: the output's records of each id that no input line taken has matched yet; an id
        # leaves it once its records are matched (a million answered lines' ids are not kept twice)
        self.done = done
        self.unmatched = sum(done.values())        # records no input line taken has yet
        self.first_line: dict[str, int] = {}       # id -> the line that has it
        self.held: deque = deque()                 # (lineno, raw, request, error, id, batch), to run
        self.batch_file: bool | None = None        # the shape of the first JSON object line: None before it
        self.shape_line = 0
        self.requests = self.skipped = self.bad_lines = 0    # lines not blank; answered (--resume); bad
        self.mark = mark                           # the line count whose digest --resume compares
        self.marked = source.digest()[0] if mark == 0 else None

    def take(self, stop: threading.Event | None = None) -> bool:
        """Take the next line; False at the end of the input (or once `stop` is set)."""
        raw = self.source.take(stop)
        if raw is None:
            if self.source.ended and self.mark is None:
                self.marked = self.source.digest()[0]
            return False
        lineno = self.source.count
        if lineno == self.mark:
            self.marked = self.source.digest()[0]
        if not raw.strip():
            return True
        self.requests += 1
        req, error, rid, batch = _line_id(raw, lineno)
        if self.batch_file is None and batch is not None:
            self.batch_file, self.shape_line = batch, lineno
        key = _key(rid)
        if self.done.get(key):                     # --resume: this line's record is in the output
            self.done[key] -= 1
            if not self.done[key]:
                del self.done[key]
            self.unmatched -= 1
            self.skipped += 1
            self._claim(key, rid, lineno)
            return True
        # the raw line is kept only while the input's shape is not known (_not_json_lines reads it)
        self.held.append((lineno, raw if self.batch_file is None else b"", req, error, rid, batch))
        return True

    def _claim(self, key: str, rid, lineno: int) -> None:
        """The id is taken: a later line with it is refused (ids are unique); a LineNumber is not."""
        if not isinstance(rid, LineNumber):
            self.first_line.setdefault(key, lineno)

    def read_ahead(self, lines: float = 0) -> None:
        """Take lines until one is to run and the input's shape is known, at least `lines` are
        taken, and each of the output's records (--resume) has its input line; or the input ends."""
        while not (self.held and self.batch_file is not None and self.source.count >= lines
                   and not self.unmatched):
            if not self.take():
                return

    def entries(self, stop: threading.Event):
        """The lines to run, those held first, then each as it is read, until the input ends or
        `stop` is set."""
        while True:
            while self.held and not stop.is_set():
                yield self.held.popleft()
            if stop.is_set() or not self.take(stop):
                return

    def runnable(self, entry, check: Callable):
        """(the request, whether a batch-API line's, None) of a held line, or (None, _, its error
        record) when it cannot run; `check(request)` checks a batch line's body, or a plain
        line's `model`, as agp serve would (APIError)."""
        from pipeline_dsl.commands import batch_api
        from pipeline_dsl.requests_io import RequestError
        from pipeline_dsl.serve.api_error import APIError

        lineno, _, req, error, rid, is_batch = entry
        key = _key(rid)
        if key in self.first_line and req is not None:
            what = "custom_id" if is_batch else "id"
            req, error = None, RequestError(
                f"{what} {json.dumps(rid)[:60]} is also the {what} of line {self.first_line[key]}: {what}s must be "
                "unique" + ("" if is_batch else " (a line without an id takes its line number)"), param=what)
        elif self.batch_file and req is not None and not is_batch:
            req, error = None, RequestError("not a batch request line ({\"custom_id\", \"method\", \"url\", \"body\"}) "
                                            f"while the input's first request (line {self.shape_line}) is one: "
                                            "give every line that shape")
        elif not self.batch_file and req is not None and is_batch:
            req, error = None, RequestError(f"a batch request line (with a custom_id) while the input's first "
                                            f"request (line {self.shape_line}) is an agp request line: give every "
                                            "line one shape")
        self._claim(key, rid, lineno)
        if req is not None:
            try:                               # as agp serve checks it (the model's context known now)
                check(req)
            except APIError as e:
                self.bad_lines += 1
                return None, is_batch, (batch_api.error_record(rid, lineno, e) if is_batch else
                                        _bad_line_record(rid, lineno, e))
        if req is None:
            self.bad_lines += 1
            api = APIError(str(error), param=error.param, code=error.code)
            return None, is_batch, (batch_api.error_record(rid, lineno, api) if self.batch_file else
                                    _bad_line_record(rid, lineno, api))
        return req, is_batch, None


def _bad_line_record(rid, lineno: int, err) -> dict:
    """The output line of a plain line that cannot run: its error with the HTTP status agp serve
    answers it with (400; 404 for a `model` that names nothing served), and its `param` and `code`
    where it has them, as a failed request's record carries them (runner.record)."""
    error = {"line": lineno, "message": err.message, "type": "invalid", "status": err.status}
    error.update({k: v for k, v in (("param", err.param), ("code", err.code)) if v is not None})
    return {"id": rid, "error": error}


class _Answers:
    """The output lines in input order, each written whole and flushed as soon as those before it
    are, then forgotten. To a file, the fingerprint beside it (`fingerprint()`: what the lines
    taken so far are) is written anew before an answer to a line it does not cover yet: whenever
    the run ends, a kill included, it covers every answer in the file."""

    def __init__(self, out, path: str | None, stop: threading.Event, fingerprint: Callable | None) -> None:
        self.out, self.path, self.stop = out, path, stop
        self.fingerprint = fingerprint
        self.covered = self.write_fingerprint() if fingerprint is not None else 0
        self.written = 0
        self.errors: list[OSError] = []
        self.fd = _fd_of(out)                      # None: a caller's capture, written through its stream
        self.regular = self._length() is not None   # a regular file: a write cut midway is taken back
        self._pending: dict[int, list] = {}        # slot -> [its line, its record: None (running), False (not written)]
        self._slots = self._next = 0
        self._lock = threading.Lock()
        self.warned = 0                            # answers whose record carries a `warning`
        self.first_warning: tuple[int, str] | None = None     # (its line, the warning) of the first

    def write_fingerprint(self) -> int:
        """Write the fingerprint; the lines it covers."""
        now = self.fingerprint()
        part = _fingerprint_path(self.path) + ".part"
        with open(part, "w", encoding="utf-8") as f:
            json.dump(now, f)
        os.replace(part, _fingerprint_path(self.path))     # whole, or the earlier one
        return now["input_lines"]

    def _length(self) -> int | None:
        """The output's length when it is a regular file (None for a pipe, a device, a capture)."""
        try:
            st = os.fstat(self.fd) if self.fd is not None else None
        except OSError:
            return None
        return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None

    def _write(self, text: str) -> None:
        """Write one line whole, straight to the descriptor (no buffer holds a piece of it to be
        written later, as a close would); when a write fails midway (a full disk), a regular file
        is cut back to its length before the line: what was written stays whole lines. That length
        is the file's as the write begins, not a count of the answers' bytes: standard output may be
        a file that standard error writes too (`agp run … > log 2>&1`)."""
        if self.fd is None:
            self.out.write(text)
            self.out.flush()
            return
        data = memoryview(text.encode("utf-8"))
        whole = self._length() if self.regular else None
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            if whole is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, whole)
            raise

    def slot(self, line: int, record: dict | None = None) -> int:
        """The next place in the output, for `line`; with its record when it is one already."""
        with self._lock:
            slot = self._slots
            self._slots += 1
            self._pending[slot] = [line, record]
        if record is not None:
            self.flush()
        return slot

    def put(self, slot: int, record: dict | bool) -> None:
        """A slot's record; False: it is not written (an interrupted request)."""
        with self._lock:
            self._pending[slot][1] = record
            if isinstance(record, dict) and record.get("warning"):
                self.warned += 1
                line = self._pending[slot][0]
                if self.first_warning is None or line < self.first_warning[0]:
                    self.first_warning = (line, record["warning"])
        self.flush()

    def flush(self) -> None:
        with self._lock:
            while not self.errors and self._next in self._pending and self._pending[self._next][1] is not None:
                line, record = self._pending.pop(self._next)
                self._next += 1
                if record is False:
                    continue
                try:
                    if self.fingerprint is not None and line > self.covered:
                        self.covered = self.write_fingerprint()
                    self._write(dump(record) + "\n")
                    self.written += 1
                    if self.path is not None and os.fstat(self.fd).st_nlink == 0:
                        raise OSError(errno.ENOENT, "the file (or its folder) was deleted while the run "
                                                    f"wrote it: the {self.written} answer(s) written are lost")
                except OSError as e:          # a full disk, a closed pipe: stop at the first failed write
                    self.errors.append(e)
                    self.stop.set()
                    return


class Interrupt:
    """SIGINT / SIGTERM / SIGHUP: the first stops the run cleanly, a second one ends the process
    (SIGHUP's default, a closed terminal, would kill it without the summary or --stats)."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event if event is not None else threading.Event()
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        from pipeline_dsl.stopping import heeded

        for sig in heeded():                  # one ignored when agp started (nohup's SIGHUP) stays so
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # it takes the Event's lock and standard error's: the main thread meanwhile only joins the
        # run's thread (stopping.heard), holding neither (pipeline_dsl/stopping.py)
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
    from pipeline_dsl.commands.runner import RunRequest, check_line_reasoning, format_summary, run_pipeline
    from pipeline_dsl.serve.answers import check_reasoning
    from pipeline_dsl.serve.build import model_names, served_context
    from pipeline_dsl.serve.protocol import model_of

    if args.resume and args.output == "-":
        return _err("--resume continues an output file: give it with --output FILE (the answers go to "
                    "standard output, which holds no earlier answers to keep)")
    clash = _clashing_files(args)
    if clash:
        return _err(clash)
    to_file = args.output != "-"
    if to_file and os.path.isdir(args.output):
        return _err(f"cannot write {args.output}: it is a folder")
    # another agp run writing OUT: refused before OUT is read or changed (a file that exists now;
    # one that does not is locked as it is created, below)
    locked = False
    if to_file and os.path.isfile(args.output):
        with contextlib.suppress(OSError):           # not writable: the open below says what it can
            fd = os.open(args.output, os.O_RDWR)        # for writing: NFS locks no file open read-only
            cleanup.callback(os.close, fd)
            if not _lock_output(fd):
                return _err(_BUSY.format(output=args.output))
            locked = True
    # a device or a pipe (/dev/null, a FIFO a reader drains) is written as a stream
    kept = to_file and os.path.isfile(args.output) and os.path.getsize(args.output) > 0   # an earlier run's
    if kept and not args.resume and not args.overwrite:
        return _err(f"{args.output} exists: pass --resume to run only the requests it does not "
                    "answer yet, or --overwrite to replace it")
    resuming = kept and args.resume
    done_ids, whole, not_records, was = Counter(), 0, [], None
    if resuming:       # the records it holds; each is matched to its input line as the lines are read
        done_ids, whole, not_records = answered_ids(args.output)
        was = _read_fingerprint(args.output)
    n = was.get("input_lines") if was is not None else 0
    covered = n if isinstance(n, int) and n >= 0 else None    # the lines OUT's fingerprint covers; None: all

    def first_lines():
        """The input opened and read before anything loads: the first line to run and the input's
        shape, and for --resume the lines its fingerprint covers and those its records answer (the
        rest is read as the run goes). A pipe (stdin) may hold it waiting for its first line."""
        read = RunLines(InputLines(open_input(args.input)), done_ids, mark=covered)
        read.read_ahead(float("inf") if covered is None else covered)
        return read

    from pipeline_dsl.stopping import heard, load_unless_stopped

    try:               # a stop signal ends the wait at once, as it ends the load (pipeline_dsl/stopping.py)
        lines, sig = load_unless_stopped(first_lines)
    except FileNotFoundError:
        return _err(f"input file not found: {args.input}")
    except OSError as e:
        return _err(f"cannot read {args.input}: {e.strerror}")
    if sig is not None:                        # nothing ran, nothing was written
        print(f"agp run: {signal.Signals(sig).name} while waiting for the input's first lines: stopped before "
              "running any request", file=sys.stderr, flush=True)
        os._exit(128 + sig)                    # the reading thread may be blocked in a read
    source = lines.source
    source_name = "stdin" if args.input == "-" else args.input
    if source.error is not None:
        return _err(f"cannot read {args.input}: {source.error.strerror or source.error}")
    spread = _spread_json(lines.held)
    if spread:
        return _err(f"{source_name} is not JSON Lines: {spread}")
    if lines.batch_file is None and source.ended:
        not_jsonl = _not_json_lines(list(lines.held))
        if not_jsonl:
            return _err(f"{source_name} is not JSON Lines: {not_jsonl}")
    graph = _checked_graph(args)            # parsed and checked once: the fingerprint and the run both take it
    pipeline = _pipeline_fingerprint(args, graph) if to_file else None       # what the answers are made from
    if resuming:
        if not_records or lines.unmatched:
            matched = answered_ids(args.output)[0] - lines.done      # each id's records an input line has
            _, _, foreign = answered_ids(args.output, matched)
            k = len(foreign)
            return _err(f"{args.output} is not the output of {source_name}: {k} line{'s' if k > 1 else ''} "
                        f"{'are' if k > 1 else 'is'} no answer to its lines (the first: line {foreign[0]}), "
                        "another input's answers or not agp records; --resume would append to them. "
                        "Pass --overwrite to start afresh")
        changed = _changed_since(was, lines.marked, pipeline)
        if changed:
            return _err(f"{args.output} was made from another {changed} than this run's: --resume would "
                        f"append answers of this {changed} to those of the other. Pass --overwrite to start "
                        f"afresh (or run the {changed} it was made from)")
        if whole < os.path.getsize(args.output):
            print(f"agp run: {args.output}: dropping an incomplete last line", file=sys.stderr)
            os.truncate(args.output, whole)
    stop = threading.Event()
    try:  # before the model loads: a bad output path fails at once
        if to_file:
            if locked or (os.path.exists(args.output) and not os.path.isfile(args.output)):
                out = open(args.output, "a" if args.resume else "w", encoding="utf-8")   # or a device, a pipe
            else:           # created now (or by a run started meanwhile): locked before anything is written
                fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if args.resume else 0), 0o666)
                out = open(fd, "a" if args.resume else "w", encoding="utf-8")
                if not _lock_output(fd):
                    out.close()
                    return _err(_BUSY.format(output=args.output))
                if os.fstat(fd).st_size and not args.overwrite:     # a run started meanwhile wrote it
                    out.close()
                    return _err(f"{args.output} was written by another run while this one started: run this one "
                                "again (--resume continues it, --overwrite replaces it)")
                if not args.resume:
                    os.ftruncate(fd, 0)
        elif sys.stdout is None:
            return _err("cannot write the answers: standard output is closed (give --output FILE)")
        else:   # the answers alone: what the pipeline's code prints goes to stderr (commands/stdout.py)
            out = cleanup.enter_context(answers_on_stdout())
            if (getattr(out, "encoding", None) or "utf-8").lower().replace("-", "") != "utf8" and \
                    hasattr(out, "reconfigure"):
                out.reconfigure(encoding="utf-8")      # JSONL is UTF-8, as -o FILE writes it, whatever the locale
        # what a later --resume checks it continues (the input, checked above to be the one the
        # answers come from, or it with lines appended; the pipeline and dtype): a file's only
        fingerprint = (lambda: _fingerprint(source, pipeline)) if to_file and os.path.isfile(args.output) else None
        answers = _Answers(out, args.output if to_file else None, stop, fingerprint)
    except OSError as e:
        return _err(f"cannot write {args.output}: {e.strerror}")

    if source.ended and not lines.held:
        # nothing to answer: the pipeline is checked (a broken one still exits 2), no model loads
        if isinstance(graph, CheckFailed):
            raise graph
        out.close()
        print(f"agp run: nothing to run: {source_name} has no requests" if not lines.requests else
              f"agp run: nothing to run: {args.output} answers every line of {source_name} already",
              file=sys.stderr)
        return 0

    t_load = time.perf_counter()
    runtime, sig = load_unless_stopped(lambda: _load(args, graph))     # torch's import counts as loading
    if sig is not None:                        # nothing ran, nothing was written: the same command runs it all
        print(f"agp run: {signal.Signals(sig).name} while loading the pipeline: stopped before running "
              "any request", file=sys.stderr, flush=True)
        try:
            out.flush()
        except OSError:
            pass
        os._exit(128 + sig)                    # the load thread may be anywhere (an import, a C call)
    load_s = time.perf_counter() - t_load

    stages = tuple(runtime.seg_of_gen)
    max_model_len, max_stage_n = served_context(runtime), runtime.stage_n    # as agp serve bounds its bodies

    served = model_names(runtime, None)

    def check(req) -> None:
        """A batch line's body as agp serve checks it; a plain line's `model` as agp serve takes
        it (a name it serves, or a generate stage's: else the same 404 message)."""
        if isinstance(req, batch_api.BatchLine):
            req.parse(max_model_len, stages, runtime.name, max_stage_n)
            if req.call is not None:             # an embeddings body has no answer to split
                check_reasoning(runtime, req.call)
        else:
            if req.model is not None:
                model_of({"model": req.model}, served, stages)
            check_line_reasoning(req, runtime)

    def requests():
        """The lines to run as the run takes them; a line that cannot run has its record at once."""
        for entry in lines.entries(stop):
            req, is_batch, record = lines.runnable(entry, check)
            slot = answers.slot(entry[0], record)
            if req is not None:
                yield RunRequest(slot=slot, line=entry[0], parsed=None if is_batch else req,
                                 batch=req if is_batch else None)

    def total() -> int | None:
        """The lines to answer, once the input's are known: those not blank, less those --resume
        found answered and those answered by an error record."""
        n = source.request_lines
        return None if n is None else max(n - lines.skipped - lines.bad_lines, 0)

    def work() -> dict:
        try:
            return run_pipeline(runtime, requests(), on_done=answers.put, progress=not args.no_progress,
                                stop=stop, on_interrupted=lambda slot: answers.put(slot, False), total=total)
        finally:
            answers.flush()
            if fingerprint is not None and not answers.errors:
                with contextlib.suppress(OSError):       # it covers every answer already; now every line read
                    answers.write_fingerprint()
            try:
                out.close()                   # a file, or the answers' own stdout (commands/stdout.py)
            except OSError as e:              # what the last flush could not write
                answers.errors.append(e)
            runtime.shutdown()

    with Interrupt(stop) as interrupt:        # the run on a thread: a stop signal is heard wherever it lands
        summary = heard(work, "agp-run")
    trace_error = None
    if args.trace:
        try:
            runtime.trace.write(args.trace)
            summary["trace"] = args.trace
        except OSError as e:                  # said after the summary; the answers are written
            trace_error = f"cannot write the trace to {args.trace}: {e.strerror or e}"
    summary["model_load_s"] = round(load_s, 3)
    summary["bad_lines"] = lines.bad_lines
    summary["resumed_skipped"] = lines.skipped
    summary["interrupted"] += len(lines.held)         # read, never taken by the run
    # the lines read (not blank) are requests, interrupted or resumed_skipped; those after them unread
    summary["lines_read"] = lines.requests
    summary["input_lines"], summary["input_ended"] = source.count, source.ended
    summary["requests"] += lines.bad_lines
    summary["errors"] += lines.bad_lines
    summary["written"] = answers.written
    summary["warnings"] = answers.warned              # answers whose record carries a `warning`
    write_error = answers.errors
    read_error = source.error if not write_error and interrupt.signum is None else None
    if write_error:
        e = write_error[0]
        summary["write_error"] = f"{e.strerror or e}"
        summary["unwritten"] = summary["requests"] - answers.written      # answered after the failed write: lost
        if e.errno == errno.EPIPE:    # `agp run … | head -1`: the reader took what it wanted; no error
            print(f"agp run: {args.output if to_file else 'standard output'}: the reader closed the pipe (Broken pipe): stopped after {answers.written} "
                  "answer(s)", file=sys.stderr)
        else:
            _err(f"cannot write {args.output if to_file else 'the output'}: {e.strerror or e}; the run stopped "
                 "there (the requests in flight were aborted" + ("; --resume runs them)" if to_file else ")"))
    if read_error is not None:
        summary["read_error"] = f"{read_error.strerror or read_error}"
    print(format_summary(summary), file=sys.stderr)
    if answers.warned:                                # once, however many lines: each record says it
        line, why = answers.first_warning
        more = f" (and {answers.warned - 1} more line(s))" if answers.warned > 1 else ""
        print(f"agp run: warning: line {line}{more}: {why}; each such record's \"warning\" says so",
              file=sys.stderr)
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
    if write_error:                                   # a closed pipe as tools killed by SIGPIPE: 141
        return CLOSED_PIPE if write_error[0].errno == errno.EPIPE else 1
    if interrupt.signum is not None:
        return 128 + interrupt.signum                 # 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP
    if read_error is not None:                        # the lines before it are answered; the rest unread
        return _err(f"cannot read {args.input} after line {source.count}: {read_error.strerror or read_error}; "
                    f"the {source.count} line(s) before it are answered"
                    + (" (mend the input and --resume the rest)" if to_file else ""))
    if summary["requests"] and summary["errors"] == summary["requests"]:
        # the run did not do its job: say so, or exit 1 after an ordinary summary reads as a crash
        n = summary["requests"]
        print(f"agp run: every request failed ({n} of {n}; each line's error is in the output): exit 1",
              file=sys.stderr)
        return 1
    return 0


def _checked_graph(args):
    """The pipeline's checked graph, or the CheckFailed its load raised (raised where the run
    loads its pipeline, so that the input's and the output's errors still come first)."""
    from pipeline_dsl.flow import load_graph

    try:
        return load_graph(args.pipeline, args.name, args.allow_path)
    except CheckFailed as exc:
        return exc


def _load(args, graph):
    """The pipeline's runtime, as the flags ask (imports torch: seconds), from its checked graph
    (or the CheckFailed of its load, raised)."""
    from pipeline_dsl.engine.trace import Trace
    from pipeline_dsl.flow import build_runtime

    if isinstance(graph, CheckFailed):
        raise graph
    return build_runtime(graph, args.name, overrides={"dtype": args.dtype, "threads": args.threads,
                                                               "generation_config": args.generation_config,
                                                               "override_generation_config":
                                                                   args.override_generation_config,
                                                      "reasoning_parser": args.reasoning_parser},
                         allow_paths=args.allow_path,
                         overlap=True if args.overlap else False if args.no_overlap else None,
                         trace=Trace() if args.trace else None)


def _pipeline_fingerprint(args, graph) -> list:
    """The pipeline an output's answers are made from (`graph`: its checked graph, or the
    CheckFailed of its load): its file and the files it includes, the json_schema files its
    generate stages read, the pipeline chosen in it, --dtype and the sampling defaults --generation-config and
    --override-generation-config give, by what they are, not by the folder's path: a changed
    generation_config.json is another pipeline, the same content elsewhere the same one. Under the default auto (the model's own file, which the pipeline
    names) only the override counts, so a fingerprint written before these flags stays the same run's;
    vllm and a folder of no sampling defaults are "vllm". The json_schema digests come last, and
    only when a stage names a file, so one written before they counted is this less them
    (_changed_since takes it)."""
    import hashlib

    from pipeline_dsl.engine.errors import InputError
    from pipeline_dsl.engine.models import generation_defaults

    from pipeline_dsl.loader import program_root

    sources = graph.sources if isinstance(graph, CheckFailed) else graph.graph["sources"]
    try:
        with open(args.pipeline, "rb") as f:
            digest = hashlib.sha256(f.read())
        root = program_root(args.pipeline)
        for name, text in sorted(sources.items()):     # the files it includes: a pipeline may live there
            if name != root:
                digest.update(f"\0{name}\0{text}".encode("utf-8", "surrogatepass"))
        pipeline = digest.hexdigest()
    except OSError:                 # no pipeline to read: its load says so, in check's words (exit 2)
        pipeline = None
    schemas = _schema_digests(graph)
    override = args.override_generation_config
    if args.generation_config == "auto":
        sampling = [{"override_generation_config": override}] if override else []
    else:
        try:                        # the folder's file read as the engine reads it (no model needed)
            defaults = generation_defaults(None, args.generation_config, override=override)
        except InputError:          # a broken file: the load says so (exit 2)
            defaults = None
        sampling = [{"generation_config": defaults} if defaults != {} else "vllm"]
    thinking = [{"reasoning_parser": args.reasoning_parser}] if args.reasoning_parser else []
    return [pipeline, args.name, args.dtype, *sampling, *([{"json_schema": schemas}] if schemas else []), *thinking]


def _schema_digests(graph) -> dict:
    """{stage: digest of its json_schema file} of the generate stages that name one: what every
    answer of theirs must follow, so an edited schema (the pipeline's text the same) makes other
    answers. A file that cannot be read is None (the load says why)."""
    import hashlib

    if isinstance(graph, CheckFailed):
        return {}
    out: dict = {}
    for name, node in sorted(graph.nodes(data=True)):
        path = node.get("params", {}).get("json_schema") if node.get("kind") == "generate" else None
        if path:
            try:
                with open(path, "rb") as f:
                    out[name] = hashlib.sha256(f.read()).hexdigest()
            except OSError:
                out[name] = None
    return out


def _fingerprint(source: InputLines, pipeline: list) -> dict:
    """What an output file's answers are made from: the input's lines taken so far (as read: a BOM
    and CRLF endings do not count) and how many, and the pipeline."""
    digest, count = source.digest()
    return {"input": digest, "input_lines": count, "pipeline": pipeline}


def _fingerprint_path(output: str) -> str:
    return output + ".agp-run"


def _read_fingerprint(output: str) -> dict | None:
    """The fingerprint beside an output file; None when it has none (it was not written by agp run -o)."""
    try:
        with open(_fingerprint_path(output), encoding="utf-8") as f:
            was = json.load(f)
    except (OSError, ValueError):
        return None
    return was if isinstance(was, dict) else None


def _changed_since(was: dict | None, input_digest: str | None, pipeline: list) -> str | None:
    """'input' or 'pipeline' when an output file's answers (`was`: its fingerprint) were made from
    another one than this run's: `input_digest` is the digest of as many of this input's lines as
    the fingerprint covers (None: the input has fewer), so an input with lines appended after
    those is the same (--resume answers the new lines). None when the same (a fingerprint an
    earlier agp wrote, without the json_schema files' digests, the same as this one less them), or
    when the output has no fingerprint."""
    if was is None:
        return None
    if was.get("input") != input_digest:
        return "input"
    stored = was.get("pipeline")
    if stored == pipeline:
        return None
    # written by an agp before the json_schema files counted: the same pipeline less their digests
    # (an upgrade leaves an output it began resumable; a schema edited meanwhile it cannot tell)
    schemas = bool(pipeline) and isinstance(pipeline[-1], dict) and "json_schema" in pipeline[-1]
    return None if schemas and stored == pipeline[:-1] else "pipeline"


_BUSY = ("{output} is being written by another agp run (it holds the file's lock): wait for that run to "
         "end, or give another --output")


def _lock_output(fd: int) -> bool:
    """Take the exclusive lock on the output file open at `fd`, held while `fd` stays open (the
    run's length): two agp runs writing one OUT at once cut and interleaved each other's answers
    and fingerprints. False when another process holds it. `fd` is open for writing: NFS (and
    CIFS) take flock as a lock of the whole file that needs it, and refused one open read-only
    (EBADF), which left the file unguarded there. A file system without locks leaves it unguarded."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:                          # no locks here (some network file systems)
        pass
    return True


def _file_key(where: str | int | None):
    """What identifies the file a path (or a descriptor: standard input or output) names: its
    device and inode when it exists, else its resolved path; None for no file, and for what is no
    regular file (a pipe, a terminal, /dev/null: writing it twice replaces nothing)."""
    if where is None:
        return None
    try:
        st = os.fstat(where) if isinstance(where, int) else os.stat(where)
    except FileNotFoundError:
        return None if isinstance(where, int) else ("path", os.path.realpath(where))
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _fd_of(stream) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):   # no descriptor behind it (a caller's capture)
        return None


def _clashing_files(args) -> str | None:
    """Why the run cannot go on when two of the files it reads and writes are one (by any path or
    link, standard input and output included): its answers, --stats or --trace would replace the
    requests, the pipeline or one another (`-i a.jsonl --stats a.jsonl` wrote the summary over
    the requests; `agp run P -o a.jsonl --overwrite < a.jsonl` emptied the input it was reading,
    answered what it had read ahead and exited 0). None when they are apart."""
    stdin, stdout = "the input file (standard input)", "standard output"
    reads = [("the input file", args.input, _fd_of(sys.stdin) if args.input == "-" else args.input),
             ("the pipeline file", args.pipeline, args.pipeline)]
    writes = [("the output", args.output, _fd_of(sys.stdout) if args.output == "-" else args.output),
              ("the --stats file", args.stats, args.stats), ("the --trace file", args.trace, args.trace)]
    seen = [(what, key) for what, _, where in reads if (key := _file_key(where)) is not None]
    for what, name, where in writes:
        key = _file_key(where)
        if key is None:
            continue
        for other, other_key in seen:
            if key == other_key:
                if other == "the input file" and args.input == "-":
                    other = stdin
                if name == "-":
                    return (f"{stdout} is {other}: the answers would be written into it (give another "
                            "--output, or another redirection)")
                return (f"{what} {name} is {other}: writing it would replace what it holds (give another "
                        f"{'--output' if what == 'the output' else 'file'})")
        seen.append((what.replace("the output", "the output file"), key))
    return None


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


def _spread_json(parsed) -> str | None:
    """Why the input is one JSON document written over several lines (requests_io.spread_json),
    judged by its first line held; None otherwise."""
    from pipeline_dsl.requests_io import spread_json

    if not parsed or not isinstance(parsed[0][1], bytes):
        return None
    why = spread_json(parsed[0][1])
    return f"line {parsed[0][0]} is {why}" if why else None


def _guess_id(raw: bytes, lineno: int):
    """The id of a line that is not JSON as it stands (not UTF-8: read with U+FFFD in its place),
    when it has a readable one; else its line number."""
    from pipeline_dsl.requests_io import is_id

    try:
        obj = json.loads(raw.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return LineNumber(lineno)
    return obj["id"] if isinstance(obj, dict) and is_id(obj.get("id")) else LineNumber(lineno)
