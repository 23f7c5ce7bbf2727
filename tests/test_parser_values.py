"""What the parser reads and where its errors point: values (a string left open, a hexadecimal,
huge or upper-case-exponent number), comments beside strings that hold '#' or an escaped quote,
the spans of comparisons, and which errors a file of several mistakes reports. Through
`parser.parse` and `pipeline_dsl.loads`, as `agp check` and `agp fmt` see them."""
from __future__ import annotations

import pytest

import pipeline_dsl
from pipeline_dsl import ast, parser
from pipeline_dsl.fmt import format_text


def only_error(text: str):
    module, diags = parser.parse(text, "t.agp")
    assert module is None and len(diags) == 1, [d.render() for d in diags]
    return diags[0]


def span(d) -> tuple[int, int, int, int]:
    return d.pos.line, d.pos.col, d.pos.end_line, d.pos.end_col


def test_an_unterminated_string_is_marked_from_its_quote_to_the_end_of_its_line():
    d = only_error('pipeline p {\n    x = "abc  \n}\n')
    assert d.message == "unterminated string"
    assert span(d) == (2, 9, 2, 15)            # '"abc  ': the quote and all that follows it


@pytest.mark.parametrize("written, value", [("0x10", "16"), ("-0x10", "-16"), ("+0X1f", "31")])
def test_a_hexadecimal_number_is_refused_with_its_decimal_value_sign_kept(written, value):
    d = only_error(f"pipeline p {{\n    x = {written}\n}}\n")
    assert d.message == f"hexadecimal number '{written}' is not taken"
    assert d.hint == f"write {value}" and span(d) == (2, 9, 2, 9 + len(written))


@pytest.mark.parametrize("written", ["1e999", "-1E400", "2e308ms"])
def test_a_number_too_large_for_a_float_is_an_error_not_infinity(written):
    d = only_error(f"pipeline p {{\n    x = {written}\n}}\n")
    assert d.message == f"number '{written}' is too large"
    assert span(d) == (2, 9, 2, 9 + len(written))


def test_a_hash_or_an_escaped_quote_inside_a_string_starts_no_comment():
    text = 'pipeline p {\n    x = "a\\"#b"  # note\n    y = "#"\n}\n'
    module, diags = parser.parse(text, "t.agp")
    assert diags == []
    assert [(c.text, c.pos.line, c.pos.col, c.pos.end_col) for c in module.comments] == [("# note", 2, 18, 24)]
    assert module.items[0].body[0].value.value == 'a"#b'
    assert format_text(text) == (text, [])              # agp fmt writes it back as it was


def test_a_bad_value_in_a_statement_skipped_for_its_syntax_error_is_not_the_one_reported():
    """Recovery skips line 3 for its '='; the hexadecimal number before that '=' goes with it,
    and the first bad value of what is left (line 4) is the one reported."""
    text = 'pipeline p {\n    a = = 1\n    z = [0x10, "\\q" = ]\n    y = "\\d"\n}\n'
    module, diags = parser.parse(text, "t.agp")
    assert module is None
    assert [(d.message.split(";")[0], d.pos.line) for d in diags] == [
        ("unexpected '='", 2), ("unexpected '='", 3), ("unknown escape '\\d' in a string", 4)]


@pytest.mark.parametrize("written, value", [("1E3", 1000.0), ("2.5E-1", 0.25), ("-1E2", -100.0)])
def test_an_upper_case_exponent_is_a_float_like_a_lower_case_one(written, value):
    module, diags = parser.parse(f"pipeline p {{\n    x = {written}\n    y = {written}ms\n}}\n", "t.agp")
    assert diags == []
    x, y = (s.value for s in module.items[0].body)
    assert isinstance(x, ast.Float) and x.value == value
    assert (y.number, y.unit) == (value, "ms")


def test_a_comparison_of_a_dotted_or_keyed_field_is_marked_from_its_first_name():
    text = ("pipeline p {\n    stage request : requests {}\n    stage batch : dynamic_batch {}\n"
            "    stage encode : encode {}\n    stage kv : kv_lookup {}\n    stage gen : generate {}\n"
            "    stage out : respond {}\n"
            "    request -> batch\n"
            '    batch -> encode when metadata.tier == "a"\n'
            '    batch -> encode when headers["x-t"] == "a"\n'
            "    encode -> kv -> gen -> out\n}\n")
    _, diags = pipeline_dsl.loads(text, "t.agp")
    assert [(d.message, span(d)) for d in diags if d.is_error] == [
        ("the batcher 'batch' cannot route by request fields", (9, 26, 9, 46)),
        ("the batcher 'batch' cannot route by request fields", (10, 26, 10, 47))]


@pytest.mark.parametrize("line, message, col", [
    ('stage g : generate { stop = ["#"]  timeout = 10 ms }', "a space between '10' and its unit 'ms'", 50),
    ('stage g : generate { stop = ["#"]  max_new_tokens = }', "missing value after '='", 55),
    ('a -> b when model == "#" and', "missing condition after 'and'", 30),
])
def test_a_hash_inside_a_string_earlier_on_the_line_is_no_comment_for_an_error(line, message, col):
    d = only_error(f"pipeline p {{\n    {line}\n}}\n")
    assert (d.message, d.pos.line, d.pos.col) == (message, 2, col)


def test_digits_grouped_with_underscores_are_marked_whole():
    d = only_error("pipeline p {\n    stage g : generate { max_new_tokens = 1_000_000 }\n}\n")
    assert d.message == "digits grouped with '_' in '1_000_000'" and d.hint == "write 1000000"
    assert span(d) == (2, 43, 2, 52)


MAP = 'm = {a = "}", ' + " ".join(f'k{i} = "{{{i}"' for i in range(300))


@pytest.mark.parametrize("text, line, expected, hint", [
    # braces in strings and comments are none; the header of the block on the line before its '{'
    ('pipeline p {\n  stage s : route on host\n  {  x = "{#" # { "\n  y = 1\n  stage t : route\n}\n', 5,
     "'}' to close stage 's' first", "the '{' of stage 's' (line 3) is not closed"),
    (f'pipeline p : base\n\n  # a {{ comment\n{{\n  {MAP}\n  stage t : route\n}}\n', 6,
     "'}' to close the map of 'm' first", "the '{' of the map of 'm' (line 5) is not closed"),
    (f'pipeline p : base\n\n  # a {{ comment\n{{\n  stage s : route {{ {MAP} }} }}\n', 6,
     "a name, '}' or 'stage'", "the '{' of pipeline 'p' (line 4) is not closed"),
])
def test_the_block_left_open_is_named_past_braces_in_strings_and_comments(text, line, expected, hint):
    (d,) = parser.parse(text, "t.agp")[1]
    assert (d.pos.line, d.expected, d.hint) == (line, expected, hint)


MISTAKES = [
    # bad values before and after the statements blanked: the first one reported once the rest parses
    "pipeline p {\n  stage g : generate { max_new_tokens = 0x10 }\n  x = = 1\n  y = \"\\q\"\n  z = = 2\n}\n",
    # an and/or and a list still open at a line's end, so on a kept parser stack
    "pipeline p {\n  a -> b when full or\n    timeout or\n    full\n  x = = 1\n"
    "  stage g : generate { stop = [\"a\",\n    \"b\"] }\n  y = = 2\n  a -> b when not\n    full\n  z = = 3\n}\n",
    # a character the lexer refuses, an error inside a stage's { … }, one after a '{' left open
    "pipeline p {\n  stage g : generate {\n    t = = 1\n    u = 2\n  }\n  x = 1 ; y = 2\n  w = = 3\n"
    "  q = { a = 1\n  stage h : respond\n}\n",
    "use \"a.agp\"\nuse b\npipeline p : q {\n  gen.x = = 1\n  mode = 10 ms\n  a -> b, c\n  d => e\n}\n",
]


@pytest.mark.parametrize("text", MISTAKES)
def test_recovery_resumed_before_each_statement_reports_what_a_parse_from_the_start_does(text, monkeypatch):
    """After a syntax error the parse resumes from a state kept before the statement blanked:
    kept at every line (CHECKPOINT_CHARS 1) or at none (every parse from the start, as before),
    the errors, their positions, words and hints are the same."""
    monkeypatch.setattr(parser, "CHECKPOINT_CHARS", 1)
    resumed = parser.parse(text * 3, "t.agp")[1]
    monkeypatch.setattr(parser, "CHECKPOINT_CHARS", 1 << 40)
    from_start = parser.parse(text * 3, "t.agp")[1]
    assert len(from_start) > 1
    assert [(d.message, d.pos, d.expected, d.hint) for d in resumed] == \
        [(d.message, d.pos, d.expected, d.hint) for d in from_start]


def test_a_file_of_many_mistakes_reports_the_first_ten_of_them():
    """docs/language.md: a file with several syntax errors gets each of them (up to 10)."""
    text = "pipeline p {\n" + "".join(f"    x{i} = = {i}\n" for i in range(13)) + "}\n"
    module, diags = parser.parse(text, "t.agp")
    assert module is None and parser.MAX_SYNTAX_ERRORS == 10
    assert [(d.message, d.pos.line) for d in diags] == [("unexpected '='", line) for line in range(2, 12)]
