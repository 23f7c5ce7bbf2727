"""Diagnostics: source positions, errors and warnings, caret rendering, did-you-mean.

Every user-facing problem in a `.agp` file is a `Diagnostic` carrying a
`SourcePos` (file, line, column, end line, end column; 1-based, end exclusive).
`render()` prints it the way compilers do:

    examples/errors/unknown_kind.agp:7:17: error: unknown stage kind 'genrate'
        7 |     stage gen   : genrate     {}
          |                   ^^^^^^^
      = expected: a stage kind: dynamic_batch, encode, generate, kv_lookup, requests, respond
      = help: did you mean 'generate'?

Checks collect every diagnostic of a file and report them sorted by position.
"""

from __future__ import annotations

import difflib
import functools
import json
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True, order=True)
class SourcePos:
    """A span in a source file: 1-based line and column, end exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    @staticmethod
    def point(file: str, line: int, col: int, width: int = 1) -> "SourcePos":
        return SourcePos(file, line, col, line, col + width)


@dataclass(frozen=True)
class Diagnostic:
    """One error or warning at a position, with what was expected and a likely fix."""

    severity: str                      # "error" | "warning"
    message: str
    pos: SourcePos | None
    expected: str | None = None        # "a duration (us, ms, s)"
    hint: str | None = None            # "did you mean 'generate'?"
    notes: tuple[tuple[str, SourcePos | None], ...] = field(default=())  # related places

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR

    def sort_key(self):
        p = self.pos
        return (p.file, p.line, p.col, self.message) if p else ("", 0, 0, self.message)

    def to_json(self) -> dict:
        p = self.pos
        return {
            "severity": self.severity,
            "message": self.message,
            "file": p.file if p else None,
            "line": p.line if p else None,
            "col": p.col if p else None,
            "end_line": p.end_line if p else None,
            "end_col": p.end_col if p else None,
            "expected": self.expected,
            "hint": self.hint,
            "notes": [{"message": m, "file": q.file if q else None, "line": q.line if q else None,
                       "col": q.col if q else None} for m, q in self.notes],
        }

    def render(self, sources: Mapping[str, str] | None = None) -> str:
        """`file:line:col: severity: message`, the source line, a caret, expected, help."""
        head = f"{self.pos}: " if self.pos else ""
        lines = [f"{head}{self.severity}: {_clip(self.message)}"]
        if self.pos and sources is not None and self.pos.file in sources:
            lines += _excerpt(sources[self.pos.file], self.pos)
        if self.expected:
            lines.append(f"  = expected: {_clip(self.expected)}")
        for msg, q in self.notes:
            lines.append(f"  = note: {_clip(msg)}" + (f" ({q})" if q else ""))
        if self.hint:
            lines.append(f"  = help: {_clip(self.hint)}")
        return "\n".join(_printable(ln) for ln in lines)


TEXT_MAX = 1000                        # a rendered message quoting a 1 MB string is cut here


def _printable(text: str) -> str:
    """`text` with its control characters escaped (an ESC as \\x1b, a NUL as \\x00): a file's
    strings and lines reach the terminal as text, never as escape sequences that clear it or
    hide what follows."""
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in text)


def _clip(text: str) -> str:
    return text if len(text) <= TEXT_MAX else text[:TEXT_MAX] + f"… ({len(text) - TEXT_MAX} more characters)"


# a source line longer than this is shown as a window of EXCERPT_WINDOW columns around the caret
EXCERPT_MAX = 200
EXCERPT_WINDOW = 160


@functools.lru_cache(maxsize=8)
def _lines(text: str) -> tuple[str, ...]:
    """The lines of a source, split once however many diagnostics point into it: at "\\n" alone,
    as the parser counts them (str.splitlines also splits at a form feed, U+2028, …)."""
    return tuple(text.removesuffix("\n").split("\n")) if text else ()


def _excerpt(text: str, pos: SourcePos) -> list[str]:
    src_lines = _lines(text)
    if not 1 <= pos.line <= len(src_lines):
        if pos.line == len(src_lines) + 1 or not src_lines:
            src_lines = src_lines + ("",)     # end of file: point past the last line
        else:
            return []
    full = src_lines[pos.line - 1]
    width = max(1, (pos.end_col - pos.col) if pos.end_line == pos.line else len(full) - pos.col + 1)
    col, line = pos.col, full
    if len(full) > EXCERPT_MAX:               # a long line: a window around the caret, '…' at the cuts
        start = max(0, min(pos.col - 1 - EXCERPT_WINDOW // 4, len(full) - EXCERPT_WINDOW))
        end = start + EXCERPT_WINDOW
        line = ("…" if start else "") + full[start:end] + ("…" if end < len(full) else "")
        col = pos.col - start + (1 if start else 0)
        width = max(1, min(width, EXCERPT_WINDOW - (col - 1 - (1 if start else 0))))
    line = line.replace("\t", " ")
    gutter = f"{pos.line:>5}"
    # the caret goes under the characters as a terminal shows them: wide ones (CJK) take two columns,
    # a control character the four of its escape (render prints it escaped)
    before, under = _printable(line[:col - 1]), _printable(line[col - 1:col - 1 + width])
    caret = " " * _width(before) + "^" * max(1, _width(under) or width)
    return [f"{gutter} | {line}".rstrip(), f"{' ' * len(gutter)} | {caret}"]


def _width(text: str) -> int:
    """Columns `text` takes in a terminal: East Asian wide and fullwidth characters two,
    combining marks none, the rest one."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


def sort_diagnostics(diags: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Sorted by position, duplicates removed."""
    seen, out = set(), []
    for d in sorted(diags, key=Diagnostic.sort_key):
        key = (d.severity, d.message, d.pos)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def has_errors(diags: Iterable[Diagnostic]) -> bool:
    return any(d.is_error for d in diags)


def render_all(diags: Sequence[Diagnostic], sources: Mapping[str, str]) -> str:
    """All diagnostics, then a summary line (`2 errors, 1 warning`)."""
    diags = sort_diagnostics(diags)
    if not diags:
        return ""
    parts = [d.render(sources) for d in diags]
    n_err = sum(d.is_error for d in diags)
    n_warn = len(diags) - n_err
    summary = ", ".join(s for s in (_plural(n_err, "error"), _plural(n_warn, "warning")) if s)
    return "\n\n".join(parts) + "\n\n" + summary + "\n"


def to_json(diags: Sequence[Diagnostic]) -> str:
    return json.dumps([d.to_json() for d in sort_diagnostics(diags)], indent=2)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}" if n else ""


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """'did you mean 'generate'?' when a candidate is close to `name`, else None."""
    return Suggestions(candidates).hint(name)


class Suggestions:
    """did_you_mean over one list of names, asked many times (the stages of a pipeline, for
    each undefined name): sorted once, and difflib's work bounded. Each fuzzy look-up compares
    `name` with every candidate; once `budget` comparisons are spent only a case-insensitive
    match is suggested, so thousands of undefined names among thousands of stages stay linear."""

    BUDGET = 500_000                   # candidate comparisons per list (a few seconds at most)

    def __init__(self, candidates: Iterable[str], budget: int | None = None):
        self.cands = sorted(set(candidates))
        self.lower = {c.lower(): c for c in self.cands}
        self.budget = self.BUDGET if budget is None else budget   # read at each list, not at import

    def hint(self, name: str) -> str | None:
        close = self.closest(name)
        return f"did you mean '{close}'?" if close is not None else None

    def closest(self, name: str) -> str | None:
        """The candidate `hint` suggests, or None."""
        same = self.lower.get(name.lower())
        if same is not None and same != name:
            return same
        if len(self.cands) > self.budget:
            return None
        self.budget -= len(self.cands)
        return closest(name, self.cands)


def closest(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to `name` (difflib's ratio at least `cutoff`), else one that is
    `name` with two of its letters swapped ('tyni' for 'tiny', 'ab' for 'ba': difflib's ratio of
    a swap in a short name falls under any useful cutoff), else None. Every did-you-mean asks this."""
    cands = candidates if isinstance(candidates, list) else sorted(set(candidates))
    # difflib's ratio is at most 2 * min(len) / (sum of lens): a name too long for any candidate to
    # reach `cutoff` is not indexed (the work grows with its length: ~0.6 s for a client's 4 MB model name)
    reach = [c for c in cands if 2 * min(len(c), len(name)) >= cutoff * (len(c) + len(name))]
    close = difflib.get_close_matches(name, reach, n=1, cutoff=cutoff) if reach else []
    if close:
        return close[0]
    return next((c for c in cands if _swapped(name.lower(), c.lower())), None)


def _swapped(a: str, b: str) -> bool:
    """Whether `b` is `a` with two different characters exchanged (neighbours or not)."""
    if len(a) != len(b) or len(a) < 2:
        return False
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return len(diff) == 2 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]


ONE_OF_MAX = 40                        # names listed in an `expected:` line; the rest counted


def one_of(names: Iterable[str]) -> str:
    names = sorted(set(names))
    if len(names) > ONE_OF_MAX:
        return ", ".join(names[:ONE_OF_MAX]) + f", … ({len(names) - ONE_OF_MAX} more)"
    return ", ".join(names) if names else "(none)"


class CheckFailed(Exception):
    """Raised by the loading helpers when a file has errors; carries the diagnostics."""

    def __init__(self, diagnostics: Sequence[Diagnostic], sources: Mapping[str, str] | None = None):
        self.diagnostics = sort_diagnostics(diagnostics)
        self.sources = dict(sources or {})
        errors = [d for d in self.diagnostics if d.is_error]
        super().__init__(errors[0].render() if errors else "check failed")

    def render(self) -> str:
        return render_all(self.diagnostics, self.sources)
