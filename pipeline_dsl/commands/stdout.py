"""`agp run`'s answers on standard output, kept apart from whatever else writes there.

`agp run` without `-o` writes its answers as JSON lines on standard output. A python stage's
function that prints (a debug line, a library's banner, a subprocess it starts) would put its
text among them, and whoever reads the JSONL (`agp run … | jq`) would break on it, or read a
line it printed as an answer. So while the pipeline loads and runs, the answers go to a private
copy of standard output, and standard output itself — file descriptor 1, which C code and child
processes write to, and `sys.stdout` — goes to standard error, as the logs and the summary do.
Both are put back when it ends.

    with answers_on_stdout() as out:      # a text stream (UTF-8) for the answers alone
        out.write(line); out.flush()
"""
from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def answers_on_stdout():
    """The stream for the answers, while everything else bound for standard output goes to
    standard error. Where standard output is no file (a caller's capture), only Python's own
    `sys.stdout` can be sent aside: the answers go to it as it was."""
    stdout, stderr = sys.stdout, sys.stderr
    try:
        stdout.flush()
        stderr.flush()
        fd, err_fd = stdout.fileno(), stderr.fileno()
        saved, private = os.dup(fd), os.dup(fd)
    except (OSError, ValueError, AttributeError):    # io.UnsupportedOperation is both of the first two
        sys.stdout = stderr
        try:
            yield _Borrowed(stdout)
        finally:
            sys.stdout = stdout
        return
    out = open(private, "w", encoding="utf-8", closefd=True)   # JSONL is UTF-8 whatever the locale
    os.dup2(err_fd, fd)
    sys.stdout = stderr
    try:
        yield out
    finally:
        sys.stdout = stdout
        with contextlib.suppress(OSError, ValueError):
            stderr.flush()
        with contextlib.suppress(OSError, ValueError):
            out.close()                                 # the caller closes it first, to hear a failed write
        os.dup2(saved, fd)
        os.close(saved)


class _Borrowed:
    """The caller's own stream (no file behind it: a capture), lent for the answers: closing it
    only flushes it, as it is not ours to close."""

    def __init__(self, stream):
        self._stream = stream

    def close(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):                 # write, flush, encoding
        return getattr(self._stream, name)
