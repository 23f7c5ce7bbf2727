"""Property: mutated examples never make `check` raise, and every error has a position.

Mutations of the example files: truncation, deleted / duplicated / swapped tokens
and lines, inserted random bytes and unicode. 1,500 text cases + 600 byte cases.
When a mutant parses, `fmt` must also keep its AST and be idempotent.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline_dsl
from pipeline_dsl.diagnostics import render_all
from pipeline_dsl.fmt import format_text
from pipeline_dsl.parser import parse

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [p.read_bytes() for p in sorted((ROOT / "examples").glob("*.agp"))
         + sorted((ROOT / "examples" / "errors").glob("*.agp"))]
TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|->|[{}\[\]=,:]|#[^\n]*|[^\s{}\[\]=,:"#]+|\s+')

FUZZ = settings(max_examples=1500, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


@st.composite
def mutated_text(draw) -> str:
    text = SEEDS[draw(st.integers(0, len(SEEDS) - 1))].decode("utf-8", "replace")
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "del_tok", "dup_tok", "swap_tok", "del_line", "dup_line",
                                   "swap_line", "insert_unicode", "replace_tok"]))
        toks = _tokens(text)
        lines = text.split("\n")
        if op == "truncate":
            text = text[:draw(st.integers(0, len(text)))]
        elif op in ("del_tok", "dup_tok", "replace_tok") and toks:
            i = draw(st.integers(0, len(toks) - 1))
            if op == "del_tok":
                del toks[i]
            elif op == "dup_tok":
                toks.insert(i, toks[i])
            else:
                toks[i] = draw(st.sampled_from(["{", "}", "=", "->", "when", "stage", "on", "[", "]", ",",
                                                '"', "1ms", "5MiB", "-1", "1e999", "0.5", "true", "x", ":",
                                                "pipeline", "use", "#", "\\", "9" * 30]))
            text = "".join(toks)
        elif op == "swap_tok" and len(toks) > 1:
            i, j = draw(st.integers(0, len(toks) - 1)), draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
            text = "".join(toks)
        elif op in ("del_line", "dup_line", "swap_line") and lines:
            i = draw(st.integers(0, len(lines) - 1))
            if op == "del_line":
                del lines[i]
            elif op == "dup_line":
                lines.insert(i, lines[i])
            else:
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif op == "insert_unicode":
            i = draw(st.integers(0, len(text)))
            text = text[:i] + draw(st.text(min_size=1, max_size=4)) + text[i:]
    return text


def _check_never_raises(data: bytes, path: str) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
    program, diags = pipeline_dsl.load(path)       # must not raise
    for d in diags:
        assert d.pos is not None, d
        assert d.pos.line >= 1 and d.pos.col >= 1, d
    render_all(diags, program.sources)              # rendering must not raise either


_DIR = tempfile.mkdtemp(prefix="agp-fuzz-")
_FILE = os.path.join(_DIR, "mutant.agp")


@FUZZ
@given(mutated_text())
def test_mutated_text_never_raises_and_errors_have_positions(text):
    _check_never_raises(text.encode("utf-8", "surrogatepass"), _FILE)
    module, _ = parse(text, "m.agp")
    if module is not None:
        once, _ = format_text(text)
        assert parse(once)[0] == module
        assert format_text(once)[0] == once


@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, len(SEEDS) - 1), st.integers(0, 10_000), st.binary(min_size=1, max_size=8))
def test_random_bytes_never_raise(seed, at, junk):
    data = SEEDS[seed]
    at = at % (len(data) + 1)
    _check_never_raises(data[:at] + junk + data[at:], _FILE)
