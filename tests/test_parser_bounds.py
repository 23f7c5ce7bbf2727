"""A large .agp file of anything parses fast and in bounded memory: nests that can only be
errors (lists past 64 levels, conditions past 256) and files of more than 250,000 tokens are
refused by a scan before lark builds a tree (a 1 MiB file of nested brackets took 9 s and
675 MB). Memory is measured with tracemalloc, never time: on files of 64 KiB of nesting (the
scan is linear, and tracemalloc slows it several times; lark's tree of one would take 44 MB)
and a file of 256 KiB of small tokens (past the token limit), held to 64 bytes a character of
the file."""
from __future__ import annotations

import tracemalloc

import pytest

from pipeline_dsl import parser

SIZE = 256 << 10          # the file of small tokens: more than MAX_TOKENS of them
NEST = 64 << 10           # the files of nesting: thousands of levels past either cap
PER_CHAR = 64             # bytes of peak memory a character of the file: lark's tree took 675
PEAK = PER_CHAR * SIZE    # 16 MiB


def peak_of(fn, *args):
    tracemalloc.start()
    try:
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def sized(head: str, unit: str, tail: str = "", size: int = SIZE) -> str:
    return head + unit * ((size - 100 - len(head)) // len(unit)) + tail


@pytest.mark.parametrize("text, message, col", [
    (sized("pipeline p {\n  stage s : respond { x = ", "[", size=NEST), "values are nested too deeply: ", 27),
    ("pipeline p {\n  stage s : respond { x = " + "[" * 100_000 + "]" * 100_000 + " }\n}\n",
     "values are nested too deeply: 100000 levels", 27),
    (sized("pipeline p {\n  a -> b when ", "not ", size=NEST), "conditions are nested too deeply: ", 15),
    (sized("pipeline p {\n  a -> b when ", "(full and (timeout or ", size=NEST), "conditions are nested too deeply: ", 16),
    (sized("pipeline p {\n  a -> b when ", "not (", size=NEST), "conditions are nested too deeply: ", 15),
])
def test_deep_nesting_is_refused_without_building_a_tree(text, message, col):
    (_, (d,)), peak = peak_of(parser.parse, text)
    assert d.message.startswith(message) and (d.pos.line, d.pos.col) == (2, col), d.message
    assert peak < PER_CHAR * len(text), peak


def test_a_file_of_small_tokens_is_refused_at_the_token_limit():
    text = sized('pipeline p {\n  stage s : generate { stop = [', "[[1]],", "] }\n}\n")
    (_, (d,)), peak = peak_of(parser.parse, text)
    assert d.message == f"the file has more than {parser.MAX_TOKENS:,} tokens" and d.pos.line == 2
    assert peak < PEAK, peak


def test_files_under_the_limits_parse_as_before():
    n = parser.MAX_SCAN_NESTING
    ok = "pipeline p {\n  a -> b when " + "(" * n + "full" + ")" * n + "\n}\n"       # redundant parentheses
    module, diags = parser.parse(ok)
    assert diags == [] and module is not None
    flat = "pipeline p {\n  stage s : respond { x = [" + ", ".join(["[1, [2]]"] * 20_000) + "] }\n}\n"
    module, diags = parser.parse(flat)                   # 220,000 tokens
    assert diags == [] and len(module.items[0].stages[0].params[0].value.items) == 20_000
