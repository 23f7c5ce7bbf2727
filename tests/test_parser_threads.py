"""The parser builds the AST as lark reduces, with one set of callbacks for every parse: parses
in several threads at once give each its own file's AST and diagnostics; a syntax error and
the first bad value of the rest of the file are both reported."""
from __future__ import annotations

import sys
import threading

import pytest

from pipeline_dsl import parser

GOOD = 'pipeline p{i} {{\n' + 20 * (
    '    stage s : generate {{ max_new_tokens = {i}  stop = ["a", [1, 2]] }}\n'
    '    a -> s when (prompt_tokens > {i} or full) and not metadata["k"] == "v"\n') + '}}\n'
BAD = 'pipeline q{i} {{\n' + 20 * '    y = [1, [2, "b"]]\n' + '    x = 0x{i:x}\n}}\n'


@pytest.fixture
def switch_often():
    was = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)          # threads take turns mid-parse
    yield
    sys.setswitchinterval(was)


def test_parses_in_threads_at_once_each_get_their_own_result(switch_often):
    texts = [(GOOD if i % 2 else BAD).format(i=i) for i in range(24)]
    alone = [parser.parse(t, f"f{i}.agp") for i, t in enumerate(texts)]
    got: dict[int, tuple] = {}
    barrier = threading.Barrier(8)

    def work(k: int) -> None:
        barrier.wait()
        for _ in range(2):
            for i in range(k, len(texts), 8):
                got.setdefault(i, parser.parse(texts[i], f"f{i}.agp"))
                assert parser.parse(texts[i], f"f{i}.agp") == alone[i]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(texts))] == alone
    assert all(m is None and "hexadecimal" in d[0].message for m, d in alone[0::2])
    assert all(m is not None and m.items[0].name.text == f"p{i}" and d == [] for i, (m, d) in enumerate(alone)
               if i % 2)


def test_a_syntax_error_and_the_first_bad_value_of_the_rest_are_both_reported():
    """A syntax error no longer hides the values after (or before) it: once the statements with
    syntax errors are blanked and the rest parses, its first bad value is reported too, in file
    order; a file with no syntax error reports its first bad value alone, as before."""
    module, diags = parser.parse('pipeline p {\n    x = 0x10\n    y = "a\\q"\n    stage = 3\n}\n', "f.agp")
    assert module is None and [(d.message.split(";")[0], d.pos.line) for d in diags] == [
        ("hexadecimal number '0x10' is not taken", 2), ("unexpected '='", 4)]
    module, diags = parser.parse('pipeline p {\n    x = = 1\n    y = 0x10\n}\n', "f.agp")
    assert [(d.message, d.pos.line) for d in diags] == [("unexpected '='", 2),
                                                         ("hexadecimal number '0x10' is not taken", 3)]
    module, diags = parser.parse('pipeline p {\n    x = 0x10\n    y = "a\\q"\n}\n', "f.agp")
    assert [(d.message.split(";")[0], d.pos.line) for d in diags] == [("hexadecimal number '0x10' is not taken", 2)]
