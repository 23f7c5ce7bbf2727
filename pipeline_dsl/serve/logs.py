"""Logging of `agp serve`: timestamped lines, as text or one JSON object per line.

    configure("json", "info")        # before uvicorn starts; returns uvicorn's log_config

Every logger (agp's, uvicorn's server and access loggers, and at WARNING and above any
other library's) writes to stderr through one formatter, and so do Python warnings (one record
each, logger `py.warnings`): a collector reading `--log-format json` gets one JSON object a
line, never a library's bare line. Text lines read `2026-11-30T13:00:00.123Z INFO agp.serve:
message` (the message's control characters, C0 and C1, and U+2028/U+2029 escaped, `\\n`,
`\\x1b`, `\\x85`, `\\u2028`: a line is a record; a traceback under a record keeps its own lines,
and what its exceptions say, their notes included, is escaped the same way: a note is one line); JSON lines
carry `ts`, `level`, `logger`, `message` and the record's structured fields (an access
line: `client`, `method`, `path`, `status`, `latency_ms`, `request_id`; an error answer's: `status`,
`reason`, `param`, `code`, `request_id`; a stats line: its numbers). The access lines are agp's
own (logger `agp.access`, serve/access.py).
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Sequence

# the fields a record may carry (logger.info(..., extra={...})) that JSON lines keep
STRUCTURED = ("client", "method", "path", "status", "latency_ms", "reason", "param", "code", "request_id", "stats")


def endpoint(host: str, port: int) -> str:
    """HOST:PORT as the logs and URLs write it: an IPv6 address in brackets ([::1]:8000), whose
    own colons would hide the port."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


# a message's control characters, escaped in text lines: a request's own text in an error's reason
# (a model name with a newline) would otherwise start a forged line of its own. C1 controls too
# (U+0085 ends a line for str.splitlines, U+009B starts an escape sequence as ESC [ does) and
# Unicode's line and paragraph separators, which line readers split at as well
ESCAPED = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0)) if c != 0x09} \
    | {0x0a: "\\n", 0x0d: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def _traceback_lines(te: traceback.TracebackException) -> list[str]:
    """The lines of an exception's traceback as Python writes them (the exceptions it was raised
    from or during first, a group's exceptions after it), each escaped as a message is: what an
    exception says (a request's content in a python stage's ValueError) stays on its own line."""
    chain = [te]
    while True:
        last = chain[-1]
        if last.__cause__ is not None:
            chain += [_CAUSE, last.__cause__]
        elif last.__context__ is not None and not last.__suppress_context__:
            chain += [_CONTEXT, last.__context__]
        else:
            break
    lines: list[str] = []
    for node in reversed(chain):
        if isinstance(node, str):
            lines += ["", node, ""]
            continue
        if node.stack:
            lines.append("Traceback (most recent call last):")
            lines += [line.translate(ESCAPED) for frame in node.stack.format()
                      for line in frame.removesuffix("\n").split("\n")]
        lines += _exception_only(node)
        for i, sub in enumerate(getattr(node, "exceptions", None) or (), 1):    # an ExceptionGroup's
            lines.append(f"+---------------- {i} ----------------")
            lines += ["| " + line for line in _traceback_lines(sub)]
    return lines


def _exception_only(te: traceback.TracebackException) -> list[str]:
    """What an exception says, as Python writes it under its traceback, escaped: its message, then
    each of its notes (e.add_note) on one line of its own, whose newlines are escaped as a
    message's are (Python splits a note at them, and a note quoting a request would forge a line)."""
    notes = getattr(te, "__notes__", None)        # Python 3.10 has none (3.11 added notes)
    if notes is not None:
        te = copy.copy(te)
        te.__notes__ = None
    lines = [part.removesuffix("\n").translate(ESCAPED) for part in te.format_exception_only()]
    if isinstance(notes, Sequence) and not isinstance(notes, str):
        lines += [_text(note, "note", str).translate(ESCAPED) for note in notes]
    elif notes is not None:                      # not a list of notes: Python writes its repr
        lines.append(_text(notes, "__notes__", repr).translate(ESCAPED))
    return lines


def _text(value, what: str, show) -> str:
    """`value` as a traceback writes it: `show(value)`, or what Python writes where that fails."""
    try:
        return show(value)
    except Exception:                            # noqa: BLE001 - a note whose str() raises
        return f"<{what} {show.__name__}() failed>"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage().translate(ESCAPED)}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def formatException(self, ei) -> str:
        return "\n".join(_traceback_lines(traceback.TracebackException(type(ei[1]), ei[1], ei[2])))


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        for key in STRUCTURED:
            if key in record.__dict__:
                value = record.__dict__[key]
                if isinstance(value, dict):
                    out.update(value)
                else:
                    out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (like logging's last-resort
    handler), not the stream it was at configure time: a host that swaps stderr (a test
    runner, a supervisor) and closes the old one loses no line and prints no "Logging error"."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def formatter(log_format: str) -> logging.Formatter:
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {log_format!r}")
    return JSONFormatter() if log_format == "json" else TextFormatter()


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning: a warning as one record (logger py.warnings, as logging.captureWarnings
    names it), its category and its text on one line; Python's own shows the file, the line and
    the source line on two or three lines of bare stderr."""
    text = " ".join(str(message).split())
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, text)


_FORMAT = ["text"]                 # the format configure() chose (fatal() writes in it)


def fatal(text: str) -> None:
    """What stops `agp serve` (`agp serve: error: …`, a pipeline's check errors): bare on stderr,
    as the CLI's other errors, or one JSON record at ERROR (logger agp.serve) when the logs are
    JSON, so a collector parsing JSON lines reads why the server did not start. Written whatever
    --log-level says (`critical` too), as the bare line is."""
    if _FORMAT[0] == "json":
        log = logging.getLogger("agp.serve")
        log.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, text.rstrip("\n"), None, None))
    else:
        sys.stderr.write(text if text.endswith("\n") else text + "\n")


def configure(log_format: str = "text", level: str = "info", access_log: bool = True) -> dict:
    """Route agp's and uvicorn's loggers to stderr in `log_format`; returns the log_config to
    give uvicorn (so it keeps these handlers instead of installing its own). The access log is
    agp's (`agp.access`, serve/access.py): uvicorn's own is never written."""
    fmt = formatter(log_format)
    _FORMAT[0] = log_format
    handler = StderrHandler()
    handler.setFormatter(fmt)
    lvl = getattr(logging, level.upper())
    for name in ("agp", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler] if name in ("agp", "uvicorn") else []
        logger.setLevel(lvl)
        logger.propagate = name == "uvicorn.error"
    # the rest (torch, transformers, a python stage's library) through the root logger, and warnings
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, StderrHandler)] + [handler]
    root.setLevel(max(lvl, logging.WARNING))
    warnings.showwarning = _log_warning
    logging.getLogger("agp.access").setLevel(logging.INFO if access_log else logging.WARNING)
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers[:] = []
    uvicorn_access.propagate = False
    return {"version": 1, "disable_existing_loggers": False}
