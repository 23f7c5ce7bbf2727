"""The progress bar of `agp run` and `agp bench`, on standard error, that a closed stream cannot hang.

tqdm takes its lock, writes, then releases it, without a `finally`: a write that raises (stderr
piped into a reader that has gone, `agp run … 2>&1 | head`) leaves the lock held, and the next
update on any thread waits for it forever, the run with it. So the bar writes through
`Quiet`, which turns silent at the first failed write instead of raising.

On a terminal the bar is redrawn in place (carriage returns). Anywhere else (a container's log,
a file, a CI job) that made one ever-growing line of redraws, which a log collector keeps as one
record (or splits at its limit): there the bar is written through `Lines` instead, one line
per update at most every LOG_INTERVAL seconds, and the final count.

    bar = progress_bar(total)          # tqdm on Quiet(sys.stderr) or Lines(sys.stderr)
"""
from __future__ import annotations

import sys

LOG_INTERVAL = 30.0             # seconds between two progress lines when standard error is no terminal


class Quiet:
    """A text stream that passes writes on until one fails, then drops them all."""

    def __init__(self, stream):
        self.stream, self.broken = stream, False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except (OSError, ValueError):          # a closed pipe, a closed file
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.broken = True

    def __getattr__(self, name):                   # isatty, encoding, fileno: tqdm's questions
        return getattr(self.stream, name)


class Lines(Quiet):
    """A Quiet stream for a bar that is not on a terminal: each redraw (`\\r` and the bar) is
    written as a line of its own, a repeated or empty one left out."""

    def __init__(self, stream):
        super().__init__(stream)
        self.last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:
            self.last = line
            super().write(line + "\n")
        return len(text)


def progress_bar(total: int, **kw):
    """A tqdm bar of `total` requests on standard error."""
    from tqdm import tqdm

    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):            # a replaced or closed stream
        terminal = False
    shown = {"file": Quiet(sys.stderr), "dynamic_ncols": True, "mininterval": 0.5} if terminal else \
        {"file": Lines(sys.stderr), "ncols": 80, "ascii": True, "mininterval": LOG_INTERVAL, "maxinterval": LOG_INTERVAL}
    if not terminal:
        # a log keeps its lines: a bar not left (agp bench's, cleared for the table on a terminal)
        # ended the log at its first line, '0/40', as if the load had stalled there
        kw = {**kw, "leave": True}
    return tqdm(total=total, **{"unit": "req", **shown, **kw})
