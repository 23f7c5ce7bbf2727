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


def test_values_print_back_exactly():
    src = 'pipeline p {\n    x = [1, 2.5, "a\\"b", true, cuda:1, 250us, 1.5GiB, -3, 1e-05]\n}\n'
    out, _ = format_text(src)
    assert out == src
    assert parse(out)[0] == parse(src)[0]


def test_fmt_reports_syntax_errors_instead_of_printing():
    out, diags = format_text("pipeline p { x = }")
    assert out is None and diags[0].message == "missing value after '='"


@pytest.mark.parametrize("value", ['a"b\\c', "\n\t\r\0", "café", "\U0001F600", "\x01\x7f\u2028\x85", "C:\\Users",
                                   "\ud7ff\ue000"])
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
