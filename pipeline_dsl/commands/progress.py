"""The progress bar of `agp run` and `agp bench`, on standard error, that a closed stream cannot hang.

tqdm takes its lock, writes, then releases it, without a `finally`: a write that raises (stderr
piped into a reader that has gone, `agp run … 2>&1 | head`) leaves the lock held, and the next
update on any thread waits for it forever, the run with it. So the bar writes through
`Quiet`, which turns silent at the first failed write instead of raising.

    bar = progress_bar(total)          # tqdm on Quiet(sys.stderr)
"""
from __future__ import annotations

import sys


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


def progress_bar(total: int, **kw):
    """A tqdm bar of `total` requests on standard error."""
    from tqdm import tqdm

    return tqdm(total=total, **{"unit": "req", "file": Quiet(sys.stderr), "dynamic_ncols": True,
                                "mininterval": 0.5, **kw})
