"""`agp fmt`: canonical layout, comments kept, idempotent, the AST unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_dsl.fmt import format_text
from pipeline_dsl.parser import parse

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "examples").glob("*.agp")) + sorted((ROOT / "examples" / "errors").glob("*.agp"))


def _parsable():
    out = []
    for p in SOURCES:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if parse(text, str(p))[0] is not None:
            out.append(p)
    return out


@pytest.mark.parametrize("path", _parsable(), ids=lambda p: p.stem)
def test_fmt_is_idempotent_and_keeps_the_ast_and_comments(path):
    text = path.read_text(encoding="utf-8")
    once, diags = format_text(text)
    assert diags == []
    twice, _ = format_text(once)
    assert twice == once
    before, after = parse(text)[0], parse(once)[0]
    assert after == before
    assert [c.text for c in after.comments] == [c.text for c in before.comments]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.agp")), ids=lambda p: p.stem)
def test_examples_are_already_formatted(path):
    text = path.read_text(encoding="utf-8")
    assert format_text(text)[0] == text


def test_messy_input_gets_the_canonical_layout():
    messy = ('# head\npipeline p{model="m" mode=efficient\nstage a:requests stage b : respond{stream=true}'
             '# tail b\n\n\n\na->b # edge\n}')
    out, _ = format_text(messy)
    assert out == (
        "# head\n"
        "pipeline p {\n"
        '    model = "m"\n'
        "    mode  = efficient\n"
        "    stage a : requests {}\n"
        "    stage b : respond  { stream = true }  # tail b\n"
        "\n"
        "    a -> b  # edge\n"
        "}\n")


def test_comment_inside_a_stage_puts_its_parameters_on_lines():
    out, _ = format_text("pipeline p {\n stage g : generate { # sampling\n top_k = 5 temperature = 0.5 }\n}\n")
    assert out == ("pipeline p {\n"
                   "    stage g : generate {\n"
                   "        # sampling\n"
                   "        top_k       = 5\n"
                   "        temperature = 0.5\n"
                   "    }\n"
                   "}\n")


def test_a_comment_after_the_last_statement_of_a_block_stays_at_its_end():
    """docs/language.md: comments are kept by `agp fmt`; one with no statement after it in its
    block (a stage's braces, a pipeline, the file) stays at the end of that block."""
    src = ("pipeline p {\n"
           "    stage gen : generate {\n"
           "        max_new_tokens = 4\n"
           "        # the rest of gen's settings: later\n"
           "    }\n"
           "    # more stages here\n"
           "}\n"
           "\n"
           "# the end of the file\n")
    assert format_text(src) == (src, [])


def test_conditions_keep_the_parentheses_their_meaning_needs():
    """`not` binds tightest, then `and`, then `or`: fmt writes parentheses where the AST needs them
    and the parser reads `a or b and c` as `a or (b and c)`."""
    from pipeline_dsl import conditions as C

    src = ("pipeline p {\n"
           "    r -> a when not (prompt_tokens > 1 or n > 2)\n"
           "    r -> b when (prompt_tokens > 1 or n > 2) and n < 5\n"
           "    r -> c when prompt_tokens > 1 or (n > 2 and not n > 3)\n"
           "}\n")
    assert format_text(src) == (src, [])
    a, b, c = (C.compile_condition(ch.condition) for ch in parse(src)[0].items[0].body)
    bare = parse(src.replace("(n > 2 and not n > 3)", "n > 2 and not n > 3"))[0].items[0].body[2]
    assert C.compile_condition(bare.condition) == c
    p1, n2 = ("cmp", "prompt_tokens", ">", 1), ("cmp", "n", ">", 2)
    assert a == ("not", ("or", p1, n2))
    assert b == ("and", ("or", p1, n2), ("cmp", "n", "<", 5))
    assert c == ("or", p1, ("and", n2, ("not", ("cmp", "n", ">", 3))))


def test_an_and_inside_an_and_needs_no_parentheses():
    src = "pipeline p {\n    r -> a when (n > 1 and n > 2) and n > 3\n    r -> b when n > 1 or (n > 2 or n > 3)\n}\n"
    assert format_text(src)[0] == ("pipeline p {\n"
                                   "    r -> a when n > 1 and n > 2 and n > 3\n"
                                   "    r -> b when n > 1 or n > 2 or n > 3\n"
                                   "}\n")


def test_a_stage_of_100_columns_stays_on_its_line_and_one_of_101_is_wrapped():
    """docs/language.md: a stage's parameters stay on its line unless that passes 100 columns."""
    line = '    stage g : generate {{ max_new_tokens = 4  stop = ["{}"] }}'
    fits = line.format("x" * (100 - len(line.format(""))))
    assert len(fits) == 100 and format_text(f"pipeline p {{\n{fits}\n}}\n")[0] == f"pipeline p {{\n{fits}\n}}\n"
    wrapped = format_text(f"pipeline p {{\n{fits.replace('xx', 'xxx', 1)}\n}}\n")[0].splitlines()
    assert wrapped[1:4] == ["    stage g : generate {", "        max_new_tokens = 4", '        stop           = ["x' +
                            "x" * (100 - len(line.format(""))) + '"]']


def test_a_comment_right_after_a_statement_gets_no_blank_line_before_it():
    src = 'pipeline p {\n    model = "m"\n    # the stages\n    stage a : requests {}\n}\n'
    assert format_text(src) == (src, [])


def test_the_comments_of_a_lists_one_line_elements_line_up():
    src = 'pipeline p {\n    stage g : generate {\n        stop = [\n "a", # one\n "bbbb", # two\n ]\n    }\n}\n'
    assert format_text(src)[0].splitlines()[3:5] == ['            "a",     # one', '            "bbbb",  # two']


def test_blank_lines_between_parameters_stay_and_pipelines_get_one():
    src = ("pipeline a {\n"
           "    stage gen : generate {\n"
           "        max_new_tokens = 4\n"
           "\n"
           "        # sampling\n"
           "        temperature    = 0.5\n"
           "    }\n"
           "}\n"
           "pipeline b {}\n")
    out, _ = format_text(src)
    assert out == src.replace("}\npipeline b", "}\n\npipeline b")


def test_values_print_back_exactly():
    src = 'pipeline p {\n    x = [1, 2.5, "a\\"b", true, cuda:1, 250us, 1.5GiB, -3, 1e-05]\n}\n'
    out, _ = format_text(src)
    assert out == src
    assert parse(out)[0] == parse(src)[0]


def test_fmt_reports_syntax_errors_instead_of_printing():
    out, diags = format_text("pipeline p { x = }")
    assert out is None and diags[0].message == "missing value after '='"


@pytest.mark.parametrize("value", ['a"b\\c', "\n\t\r\0", "café", "\U0001F600", "\x01\x7f\u2028\x85", "C:\\Users",
                                   "\ud7ff\ue000", "\U000E007F\U0010FFFD"])   # past the BMP: surrogate pairs
def test_fmt_writes_every_string_back_exactly(value):
    from pipeline_dsl.parser import quote

    text = f"pipeline p {{\n    x = {quote(value)}\n}}\n"
    once, diags = format_text(text)
    assert diags == []
    assert parse(once)[0].items[0].body[0].value.value == value
    assert format_text(once)[0] == once and "\n" not in quote(value)


def test_an_unprintable_character_stays_an_escape_a_surrogate_pair_past_the_bmp():
    """A control character, a line separator or an invisible tag character (U+E0001, past the
    BMP: a surrogate pair, as JSON writes it) is written as its escape, never as itself."""
    from pipeline_dsl.parser import quote

    assert quote("\x01\u2028\U000E0001\U0001F600") == '"\\u0001\\u2028\\udb40\\udc01\U0001F600"'
    text = 'pipeline p {\n    x = "tag \\udb40\\udc01"\n}\n'
    assert format_text(text) == (text, [])


def test_fmt_refuses_an_unknown_escape_rather_than_drop_its_backslash():
    once, (d,) = format_text('pipeline p {\n    x = "Use \\d"\n}\n')
    assert once is None and d.message.startswith("unknown escape '\\d'")


@pytest.mark.parametrize("edge", [
    "a -> b when full or\n        timeout  # c",             # a condition continued on the next line
    "a -> b when (full or timeout\n        )  # c",           # its ')' on a line of its own
    "a -> b when not (full\n        )  # c",
])
def test_a_comment_after_a_condition_over_two_lines_stays_at_the_end_of_its_edge(edge):
    out, diags = format_text(f"pipeline p {{\n    {edge}\n    x = 1\n}}\n")
    assert diags == [] and out.splitlines()[1].endswith("  # c") and out.count("# c") == 1


def test_fields_and_quantities_print_back_exactly():
    src = ('pipeline p {\n    timeout = 0.1234567s\n    a -> b when metadata.tier == "gold" and headers["x-t"] == "a"\n'
           "}\n")
    assert format_text(src) == (src, [])
