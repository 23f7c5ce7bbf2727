"""`agp run`'s input, read as a stream: a line is answered while the lines after it are not
written yet (`producer | agp run pipe.agp -`), and memory does not grow with the input's length.

    lines = InputLines(open_input(path))      # FileNotFoundError, IsADirectoryError, OSError
    raw = lines.take(stop)                     # the next line, or None: the end, a read error, `stop`
    lines.count, lines.digest()                # lines taken so far, the sha256 of them (the fingerprint's)
    lines.request_lines                        # the input's lines that are not blank, once known (else None)

A thread of its own reads the lines, at most AHEAD of those taken: a producer that pauses (or a
pipe nobody closes) never holds whoever takes them past a stop signal. Each line is read to at
most MAX_LINE_BYTES (a longer one comes back as TooLong, its head only); a UTF-8 BOM and the
line's end (LF, CRLF) are not part of it. A gzip-compressed input (its first bytes say so) is
read decompressed; one cut short or corrupt is an OSError saying so, as any read that fails.

How many lines the input holds is known once it is read to its end; a plain file's are counted
at once, on another thread and another file handle (the progress bar's total), a stream's
(standard input, a gzip'd file) only at its end.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import queue
import stat
import sys
import threading
import zlib

MAX_LINE_BYTES = 16 << 20      # one request line; a longer one is an error record (serve's bodies: 4 MiB)
MAX_SKIP_BYTES = 256 << 20     # read past a too-long line's limit looking for its end; then stop reading
AHEAD = 256                    # lines read ahead of those taken


class TooLong(bytes):
    """A line past MAX_LINE_BYTES: its first bytes only (the rest was read and dropped); `endless`:
    no end of line came within MAX_SKIP_BYTES, so the input was not read further."""
    endless = False


def open_input(path: str):
    """The input as a binary stream: standard input for '-', else the file (decompressed when
    gzip'd)."""
    if path == "-":
        return _unzipped(_stdin())
    if stat.S_ISDIR(os.stat(path).st_mode):
        raise IsADirectoryError(21, "it is a folder")
    return _unzipped(open(path, "rb"))


def _plain_file(f) -> bool:
    """Whether `f` reads a regular file (not a pipe, a device, standard input)."""
    try:
        return stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    except (OSError, ValueError):
        return False


def _stdin():
    """Standard input, through a reader of its own on a copy of its descriptor: the thread that
    reads it may still wait in a read when the process ends, and must not hold sys.stdin's lock
    then. Where standard input has no descriptor (a caller's stream), that stream."""
    try:
        return open(os.dup(sys.stdin.fileno()), "rb")
    except (OSError, ValueError, AttributeError):        # io.UnsupportedOperation is both of the first two
        return sys.stdin.buffer


def _unzipped(f):
    """`f`, or what it holds when it is gzip-compressed (its first bytes say so, whatever its name)."""
    if not isinstance(f, io.BufferedReader):                 # another stream: read as it is
        return f
    head = f.peek(2)[:2]
    if len(head) == 1:            # a pipe whose first write held one byte: wait for the second (or the end)
        head = f.read(2)
        f = io.BufferedReader(_Prefixed(head, f))
    if head == b"\x1f\x8b":
        return _Gunzipped(fileobj=_Available(f), mode="rb")
    return f


class _Prefixed(io.RawIOBase):
    """The bytes `head`, already read from the buffered stream `f`, then the rest of `f`, each
    read returning what has come."""

    def __init__(self, head: bytes, f) -> None:
        self._head, self._f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data, self._head = (self._head, b"") if self._head else (self._f.read1(len(b)), b"")
        data = data[:len(b)]
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


class _Available:
    """A stream's reads that return what has come (read1), not wait for all that was asked: gzip
    asks for 8 KiB at a time, and a producer's first lines are fewer bytes than that."""

    def __init__(self, f):
        self._f = f

    def read(self, size=-1):
        return self._f.read1(size)

    def __getattr__(self, name):                 # name, mode, close
        return getattr(self._f, name)


class _Gunzipped(gzip.GzipFile):
    """A gzip'd input; one cut short or corrupt is an OSError saying so (`cannot read IN: ...`)."""

    def readline(self, size=-1):
        try:
            return super().readline(size)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise OSError(errno.EIO, f"it is gzip-compressed and cannot be decompressed ({e})") from None


def _lines(f, limit: int):
    """The lines of `f`, each read to at most `limit` bytes (memory stays bounded; -i /dev/zero is
    one endless line)."""
    first = True
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if first and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        first = False
        if len(line) > limit and not line.endswith(b"\n"):
            head, skipped = TooLong(line[:200]), 0
            while line and not line.endswith(b"\n"):      # the rest of the line: read, not kept
                if skipped > MAX_SKIP_BYTES:
                    head.endless = True                    # no end in sight: stop reading the input
                    yield head
                    return
                line = f.readline(1 << 20)
                skipped += len(line)
            yield head
            continue
        yield line.rstrip(b"\r\n") if line.endswith(b"\n") else line


_END = object()


class InputLines:
    """The lines of a binary stream, read on a thread of their own (see the module's doc)."""

    def __init__(self, f) -> None:
        self._f = f
        self._queue: queue.Queue = queue.Queue(AHEAD)
        self._digest = hashlib.sha256()
        self._lock = threading.Lock()
        self.count = 0                     # lines taken, blank ones too (the line numbers)
        self.ended = False                 # the end of the input was taken (or a read error)
        self.error: OSError | None = None  # why the input could not be read to its end
        self._counted: int | None = None   # a plain file's lines that are not blank, counted ahead
        self._taken = 0                    # lines taken that are not blank
        threading.Thread(target=self._read, name="agp-input", daemon=True).start()
        name = getattr(f, "name", None)
        if isinstance(f, io.BufferedReader) and isinstance(name, str) and _plain_file(f):
            threading.Thread(target=self._count, args=(name,), name="agp-input-count", daemon=True).start()

    def _count(self, name: str) -> None:
        try:
            with open(name, "rb") as f:
                n = sum(1 for line in _lines(f, MAX_LINE_BYTES) if line.strip())
        except (OSError, ValueError):        # the file went: the total is known at the end only
            return
        self._counted = n

    @property
    def request_lines(self) -> int | None:
        """How many of the input's lines are not blank: known once the input was read to its end,
        or, for a plain file, once it was counted (a file appended to meanwhile: the larger count)."""
        if self.ended and self.error is None:
            return self._taken
        return None if self._counted is None else max(self._counted, self._taken)

    def _read(self) -> None:
        try:
            for line in _lines(self._f, MAX_LINE_BYTES):
                self._queue.put(line)
        except OSError as e:
            self._queue.put(e)
        except ValueError as e:              # a stream closed under it
            self._queue.put(OSError(errno.EIO, str(e)))
        self._queue.put(_END)

    def take(self, stop: threading.Event | None = None) -> bytes | None:
        """The next line; None at the end of the input, when it cannot be read further (`error`
        says why), or once `stop` is set."""
        while not self.ended:
            try:
                got = self._queue.get(timeout=0.1)
            except queue.Empty:
                if stop is not None and stop.is_set():
                    return None
                continue
            if got is _END or isinstance(got, OSError):
                self.ended = True
                self.error = got if isinstance(got, OSError) else None
                return None
            with self._lock:
                self._digest.update(got + b"\n")
                self.count += 1
                self._taken += bool(got.strip())
            return got
        return None

    def digest(self) -> tuple[str, int]:
        """(the sha256 of the lines taken, as read: a BOM and line ends not counted; how many)."""
        with self._lock:
            return self._digest.hexdigest(), self.count
