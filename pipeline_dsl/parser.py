"""Text -> AST, with friendly syntax errors.

`parse(text, file) -> (Module | None, list[Diagnostic])`. The grammar lives in
grammar.lark (lark, LALR, every token kept); the parser's callbacks (`_Builder`) build
the frozen dataclasses of ast.py as it reduces, with no parse tree in between. Raw lark
failures become diagnostics that name what was
found and what was expected in words ("a stage name", "'=' and a value"), never
lark's token names.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys
import threading
from collections import deque
from pathlib import Path

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast, units
from .diagnostics import ERROR, Diagnostic, SourcePos, did_you_mean
from .user_cache import one_at_a_time, private, user_cache

# lark terminal names -> words a user understands
_TOKEN_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "DEVICE_ID": "a device such as cuda:1",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "COLON": "':'",
    "EQUAL": "'='",
    "__ANON_0": "'->'",
    "USE": "'use'",
    "PIPELINE": "'pipeline'",
    "STAGE": "'stage'",
    "ON": "'on'",
    "WHEN": "'when'",
    "OTHERWISE": "'otherwise'",
    "AND": "'and'",
    "OR": "'or'",
    "NOT": "'not'",
    "COMPARE": "a comparison (== != < <= > >=)",
    "LPAR": "'('",
    "RPAR": "')'",
    "DOT": "'.'",
    "TRUE": "'true'",
    "FALSE": "'false'",
    "$END": "the end of the file",
}


def cache_file() -> Path | None:
    """Where the built parser is kept between agp processes: a file of the user's cache
    (user_cache.py), the folder made (0700) where missing; None where there is none, or it is
    another user's or writable by others (the file is a pickle: loaded, it runs as code would).
    lark stamps it with a hash of the grammar, the options, lark's version and Python's: a stale or
    broken one is built again and written over."""
    folder = user_cache()
    if folder is None:
        return None
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.stat(folder)
    except OSError:                      # a read-only home, a file in the way
        return None
    if not private(st):
        return None
    return folder / f"parser-py{sys.version_info[0]}.{sys.version_info[1]}.pickle"


@functools.lru_cache(maxsize=None)
def _lark() -> Lark:
    # the basic lexer keeps keywords reserved everywhere (`mode = stage` is an error, not a word);
    # the AST is built as the parser reduces (_BUILDER's callbacks), from every token kept: no
    # parse tree, no positions propagated through one, no second walk (2-3x the time). Building the
    # LALR tables takes 0.05-0.1 s of CPU in every agp process: loaded from cache_file(), ~5 ms
    path = cache_file()
    with one_at_a_time(path.parent, ".parser.lock") if path else contextlib.nullcontext():
        return Lark.open("grammar.lark", rel_to=__file__, parser="lalr", lexer="basic", keep_all_tokens=True,
                         maybe_placeholders=True, transformer=_BUILDER, cache=str(path) if path else False)


@functools.lru_cache(maxsize=None)
def keywords() -> frozenset[str]:
    """The grammar's reserved words (`stage`, `when`, …): never a name in a pipeline."""
    return frozenset(t.pattern.value for t in _lark().terminals
                     if t.pattern.type == "str" and t.pattern.value.isalpha())


def _describe_expected(expected) -> list[str]:
    words = []
    for name in sorted(expected):
        term = _term_word(name)
        if term not in words:
            words.append(term)
    return words


def _term_word(name: str) -> str:
    if name in _TOKEN_WORDS:
        return _TOKEN_WORDS[name]
    try:
        pattern = _lark().get_terminal(name).pattern
        if pattern.type == "str":
            return f"'{pattern.value}'"
    except KeyError:
        pass
    return name.lower()


def _found(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "STRING":
        return f"string {tok.value}"
    if tok.type == "NUMBER":
        return f"number '{tok.value}'"
    if tok.type in ("NAME", "DEVICE_ID"):
        return f"name '{tok.value}'"
    return f"'{tok.value}'"


_AFTER_WORD = {
    "pipeline": "a pipeline name",
    "stage": "a stage name",
    "on": "a placement: host, copy or compute",
    "when": "a condition, e.g. full, timeout or prompt_tokens > 512",
    "->": "the name of the next stage",
}


_ASCII_WORD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
_NAME_START = re.compile(r"[A-Za-z_]")


def _previous(text: str, at: int) -> str:
    """The token before offset `at` (comments skipped), roughly: enough to name the context:
    '->', a name, a string on one line, or else its last character. Found from the end of the
    last line that has one, in time linear in that line (a search for the token ending there
    would try every offset of the line, and a long name made that quadratic)."""
    end = _end_of_previous(text, at)
    line = text[text.rfind("\n", 0, end) + 1:end]
    if not line:
        return ""
    n = len(line)
    starts = [n - 1]                                   # any other character: the last one
    if line.endswith("->"):
        starts.append(n - 2)
    word = n - len(line.rstrip(_ASCII_WORD))           # a name: from its first letter or '_'
    first = _NAME_START.search(line, n - word) if word else None
    if first is not None:
        starts.append(first.start())
    quote = line.rfind('"', 0, n - 1) if line.endswith('"') else -1
    if quote >= 0:                                     # a string, from its opening quote
        starts.append(quote)
    return line[min(starts):]


def _line_of_end(text: str, at: int) -> int:
    """The offset of the line where a pattern ending in `$` matches `text[:at]`: the last line,
    or the one before where `text[:at]` ends with a newline. Patterns that match within a line
    search from there, not the whole text before `at` (from every line: quadratic)."""
    return text.rfind("\n", 0, max(0, at - 1)) + 1


def _end_of_previous(text: str, at: int) -> int:
    """The offset just past the last token before `at`, skipping blanks and comments."""
    start = text.rfind("\n", 0, at) + 1
    end = at
    while True:
        line = text[start:end]
        if "#" in line and '"' not in line:
            line = line[:line.index("#")]
        stripped = line.rstrip()
        if stripped or start == 0:
            return start + len(stripped)
        end = start - 1
        start = text.rfind("\n", 0, end) + 1


def _bare_dashed_value(text: str, at: int) -> str | None:
    """`model = smollm2-135m-instruct`, `stop = [end-of-text]`: the bare value (after '=', or in a
    list) that a '-' at `at` continues (`-135m` read as a number, or the '-' an unexpected
    character), whole; None where no such word stands right before it."""
    m = re.search(r"[=\[,][ \t]*([A-Za-z_][\w.]*)$", text[_line_of_end(text, at):at])
    return m.group(1) + re.match(r"[\w.:/-]*", text[at:]).group() if m else None


def _context_hint(expected: set[str], tok: Token, prev: str = "",
                  in_map: bool = False) -> tuple[str | None, str | None]:
    """(what the parser wanted in words, a fix) for the common mistakes."""
    exp = set(expected)
    if exp == {"NAME"} and prev in _AFTER_WORD:
        hint = f"'{tok.value}' is a keyword and cannot be used as a name" if tok.type in _KEYWORD_TOKENS else None
        if tok.type == "STRING" and prev in ("pipeline", "stage"):
            hint = "names are written without quotes"
        return _AFTER_WORD[prev], hint
    if exp == {"NAME"} and prev == ":":
        hint = f"a kind is written without quotes: {tok.value[1:-1]}" if tok.type == "STRING" else None
        return "a stage kind (agp stages lists them)", hint
    if exp == {"EQUAL"}:
        hint = f"a parameter is written '{prev} = value', not '{prev}: value'" if tok.type == "COLON" else None
        return "'=' and a value after a setting or parameter name", hint
    if exp == {"COLON"}:
        return "':' and a stage kind after the stage name (stage NAME : KIND { … })", None
    if "NUMBER" in exp and "STRING" in exp and "LSQB" in exp:
        hint = "the value after '=' is missing" if tok.type in ("STAGE", "RBRACE", "$END", "PIPELINE") else None
        if tok.type == "LBRACE" and "LBRACE" not in exp:      # {k = {a = 1}}, [{…}]: in a map or a list
            hint = ("a map's values and a list's items hold no map: strings, numbers, true/false and lists "
                    "of them; give each setting a key of its own ({retriever_top_k = 3, retriever_min_score "
                    "= 0.5})")
        return ("a value: a number, a quantity such as 1ms or 512MiB, a string, true/false, a word"
                + (", a list or a map {name = value, …}" if "LBRACE" in exp else " or a list")), hint
    if exp >= {"PIPELINE", "USE"}:
        hint = did_you_mean(tok.value, ("pipeline", "use")) if tok.type == "NAME" else None
        if tok.type == "STAGE" or (tok.type == "NAME" and prev in ("", "}")):
            # a file of shared stages, or a setting/edge outside its pipeline
            hint = hint or ("stages, settings and edges go inside `pipeline NAME { … }` (`use` includes "
                            "whole pipelines, not loose stages)")
        return "'pipeline NAME { … }' or 'use \"file.agp\"' at the top level of a file", hint
    if "__ANON_0" in exp and "EQUAL" in exp:
        if tok.type == "COLON":
            return ("'=' (a setting) or '->' (an edge)",
                    f"a setting is written '{prev} = value'; a stage 'stage {prev} : KIND {{ … }}'")
        return "'=' (a setting) or '->' (an edge)", None
    if tok.type == "COMMA" and "__ANON_0" in exp and prev != "]":       # a -> b, c: an edge, not a parameter
        return _join(_describe_expected(exp)), ("an edge goes to one stage: write one edge per stage it leads to "
                                                "(edges without a condition out of one stage each get a copy)")
    if tok.type == "COMMA" and "RBRACE" in exp:
        if in_map:
            return _join(_describe_expected(exp)), "one ',' between a map's entries, none before the first"
        return _join(_describe_expected(exp)), "separate parameters with spaces, not commas"
    if tok.type in ("NUMBER", "STRING", "LSQB", "TRUE", "FALSE", "DEVICE_ID") and "RBRACE" in exp:
        return _join(_describe_expected(exp)), "one value per setting; write a list as [a, b]"
    if tok.type == "NAME" and "STAGE" in exp and tok.value != "stage":
        hint = did_you_mean(tok.value, ("stage",))
        if hint:
            return "a setting (name = value), a stage (stage NAME : KIND { … }) or an edge (a -> b)", hint
    if tok.type in _KEYWORD_TOKENS and "NAME" in exp:
        return _join(_describe_expected(exp)), f"'{tok.value}' is a keyword and cannot be used as a name"
    return None, None


_KEYWORD_TOKENS = ("STAGE", "PIPELINE", "USE", "WHEN", "ON", "TRUE", "FALSE", "OTHERWISE", "AND", "OR", "NOT")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")      # grammar.lark's NAME


def is_name(word: str) -> bool:
    """Whether `word` can be written as a name in a .agp file: a stage's, or a label after `when`
    (letters, digits and '_', not starting with a digit, and no keyword)."""
    return bool(_NAME.fullmatch(word)) and word not in keywords()


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


def _tok_pos(file: str, tok: Token, text: str) -> SourcePos:
    if tok.type == "$END" or getattr(tok, "line", None) is None:
        lines = text.split("\n")
        return SourcePos.point(file, len(lines), len(lines[-1]) + 1)
    end_line = tok.end_line or tok.line
    end_col = tok.end_column or tok.column + max(1, len(tok.value))
    return SourcePos(file, tok.line, tok.column, end_line, end_col)


def _unquoted_fn_ref(text: str, at: int) -> tuple[str, str] | None:
    """(key, "module:function") when the ':' or '.' at `at` is inside a function reference written
    without its quotes (`fn = hooks:redact`, `fn = my.hooks:redact`), else None."""
    before = re.search(r"\b(\w+)[ \t]*=[ \t]*([A-Za-z_][\w.]*)[ \t]*$", text[:at])
    after = re.match(r"[\w.]*:[ \t]*[A-Za-z_]\w*", text[at:])
    if not (before and after):
        return None
    ref = before.group(2) + re.sub(r"[ \t]", "", after.group())
    return (before.group(1), ref) if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", ref) else None


# a statement's text up to its comment: strings ("a#1") whole, then anything but '#'
_STATEMENT = re.compile(r'(?:"(?:[^"\\\n]|\\.)*"?|[^"#\n])*')
# an edge's arrow outside the statement's strings
_ARROW = re.compile(r'"(?:[^"\\\n]|\\.)*"?|(->)')


def _fan_out(text: str, at: int) -> list[str] | None:
    """[source, destinations…, its condition] of an edge written to several stages at once, `kv ->
    a, b` with its ',' at `at`, when the statement reads so on its line; else None. The condition
    is what follows them on the line from `when` or `otherwise` (' when full'), or '', up to a
    comment ('#' outside a string); None when anything else follows them (`kv -> a, b -> c`: a
    chain goes on, which one edge per stage would drop)."""
    line_start = text.rfind("\n", 0, at) + 1
    line_end = text.find("\n", at)
    before = re.search(r"(?:^|\s)([A-Za-z_]\w*)[ \t]*->[ \t]*([A-Za-z_]\w*)[ \t]*$", text[line_start:at])
    after = re.match(r"(?:[ \t]*,[ \t]*[A-Za-z_]\w*)+", text[at:len(text) if line_end < 0 else line_end])
    if before is None or after is None:
        return None
    rest = _STATEMENT.match(text, at + after.end(), len(text) if line_end < 0 else line_end).group().strip()
    if rest and (not re.match(r"(when|otherwise)\b", rest) or any(m.group(1) for m in _ARROW.finditer(rest))):
        return None
    cond = " " + rest if rest else ""
    return [before.group(1), before.group(2), *re.findall(r"[A-Za-z_]\w*", after.group()), cond]


def _missing_body(text: str, at: int, tok: Token, wanted: set[str], file: str) -> Diagnostic | None:
    """`pipeline a : chat` (or `pipeline a`) and then the end of the file or the next statement
    on a later line: the header lacks its `{ … }`. Reported at the header, not where the file
    or the next statement happens to be."""
    if "LBRACE" not in wanted or tok.type == "LBRACE":
        return None
    end = _end_of_previous(text, at)
    if tok.type != "$END" and "\n" not in text[end:at]:      # `pipeline a from chat {`: a slip on the line
        return None
    start = text.rfind("\n", 0, end) + 1
    head = re.search(r"\bpipeline[ \t]+([A-Za-z_]\w*)(?:[ \t]*:[ \t]*([A-Za-z_]\w*))?$", text[start:end])
    if head is None:
        return None
    name, base = head.groups()
    found = "the end of the file" if tok.type == "$END" else _found(tok)
    if base is not None:
        hint = (f"a derived pipeline needs a body, even an empty one: pipeline {name} : {base} {{}} "
                f"(its settings and STAGE.PARAMETER overrides go inside); found {found} instead")
    else:
        hint = f"a pipeline's settings, stages and edges go inside {{ … }}; found {found} instead"
    return Diagnostic(ERROR, f"pipeline '{name}' has no body", _point(file, text, start + head.start(), len(head.group())),
                      expected=f"'{{' after the header: pipeline {name}{f' : {base}' if base else ''} {{ … }}",
                      hint=hint)


def _syntax_diagnostic(err: UnexpectedInput, text: str, file: str) -> Diagnostic:
    if isinstance(err, UnexpectedCharacters):
        ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        pos = SourcePos.point(file, err.line, err.column)
        if ch == '"':
            rest = text[err.pos_in_stream:].split("\n", 1)[0]
            return Diagnostic(ERROR, "unterminated string", SourcePos(file, err.line, err.column, err.line,
                                                                     err.column + len(rest)),
                              expected="a closing '\"' on the same line")
        shown = ch if ch.isprintable() and not ch.isspace() else repr(ch)[1:-1] or "?"
        expected = None
        nxt = text[err.pos_in_stream + 1:err.pos_in_stream + 2]
        hint = {"/": "comments start with '#'", ";": "statements need no ';'",
                "&": "conditions are joined with 'and' (when a and b)",
                "|": "conditions are joined with 'or' (when a or b)"}.get(ch)
        if ch == ">" and _previous(text, err.pos_in_stream) == "=":
            hint = "an edge is written '->'"
        elif ch == "-" and nxt.isspace():
            hint = "an edge is written '->' (no space between '-' and '>')"
        elif ch == "-" and err.pos_in_stream and re.match(r"\w-\w", text[err.pos_in_stream - 1:]):   # my-stage
            word = re.match(r"[\w-]*", text[err.pos_in_stream:]).group()
            name = re.search(r"\w*$", text[:err.pos_in_stream]).group()
            keyed = re.search(r"\b(when|and|or|not|\()[ \t]*([A-Za-z_][\w.]*)\.(\w+)$", text[:err.pos_in_stream])
            if keyed:                    # when headers.x-tenant == "a": a key with '-' goes in brackets
                hint = f"a key that is not a name goes in brackets: {keyed.group(2)}[{quote(keyed.group(3) + word)}]"
            elif value := _bare_dashed_value(text, err.pos_in_stream):    # model = my-model.gguf
                hint = f'a value with \'-\' in it is a string: write "{value}"'
            else:
                hint = f"names are letters, digits and '_', not '-': write {name}{word.replace('-', '_')}"
        elif ch == "!":
            hint = "a condition is negated with 'not' (when not stream == true); '!=' compares"
        elif ch == "'":
            hint = 'strings use double quotes: "…"'
        elif ch in "“”„«»":
            hint = 'strings use straight double quotes: "…", not typographic ones'
        elif ch.isalnum() and not ch.isascii():
            hint = "names are ASCII letters, digits and '_'; other text belongs in a string (\"…\")"

        return Diagnostic(ERROR, f"unexpected character '{shown}'", pos, expected=expected, hint=hint)
    if isinstance(err, UnexpectedEOF):
        tok = Token("$END", "")
        if (body := _missing_body(text, len(text), tok, set(err.expected), file)) is not None:
            return body
        expected_words, hint = _context_hint(set(err.expected), tok, _previous(text, len(text)))
        return Diagnostic(ERROR, "unexpected end of file", _tok_pos(file, tok, text),
                          expected=expected_words or _join(_describe_expected(err.expected)), hint=hint)
    assert isinstance(err, UnexpectedToken)
    tok = err.token
    wanted = set(err.expected)
    try:                                   # what the parser really accepts here, after reductions
        wanted = set(err.interactive_parser.accepts()) or wanted
    except Exception:                      # noqa: BLE001 - fall back to lark's own set
        pass
    at = len(text) if tok.type == "$END" or tok.start_pos is None else tok.start_pos
    if (body := _missing_body(text, at, tok, wanted, file)) is not None:
        return body
    opened = _open_blocks(text[:at]) if tok.type == "COMMA" else None
    expected_words, hint = _context_hint(wanted, tok, _previous(text, at),
                                         bool(opened) and opened[-1][0].startswith("the map "))
    if tok.type == "EQUAL" and "COMPARE" in wanted:            # when prompt_tokens = 5
        nxt = text[at + 1:at + 2]
        hint = f"did you mean '{nxt}='?" if nxt in ("<", ">") else "did you mean '=='?"
    elif tok.type == "COMPARE" and tok.value == ">" and at and text[at - 1] == "=":   # src => batch
        hint = "an edge is written '->'"
    elif tok.type == "EQUAL" and text[at + 1:at + 2] == ">":                           # a -> b => c
        hint = "an edge is written '->'"
    elif tok.type == "COMMA" and "__ANON_0" in wanted and (fan := _fan_out(text, at)):   # kv -> a, b
        edges = [f"`{fan[0]} -> {d}{fan[-1]}`" for d in fan[1:-1]]
        hint = f"an edge goes to one stage: write {', '.join(edges[:-1])} and {edges[-1]}" + (
            "" if fan[-1] else " (edges without a condition out of one stage each get a copy)")
    elif tok.type in ("COLON", "DOT") and (ref := _unquoted_fn_ref(text, at)):        # fn = hooks:redact
        hint = f'"module:function" is a string: write {ref[0]} = "{ref[1]}"'
    elif tok.type == "NUMBER" and tok.value.startswith("-") and (word := _bare_dashed_value(text, at)):
        hint = f'a value with \'-\' in it is a string: write "{word}"'      # model = smollm2-135m-instruct
    elif tok.type == "NUMBER" and tok.value.startswith(".") and re.search(r"[A-Za-z_]\w*$", text[:at]):
        hint = "a key after '.' is a name: letters, digits and '_', not starting with a digit"   # metadata.1
    elif tok.type == "ON" and _previous(text, at) == "}":                            # kv_lookup {} on copy
        place = re.match(r"on[ \t]+(\w+)", text[at:])
        kind = re.search(r":[ \t]*(\w+)[ \t]*\{[^{}]*\}[ \t]*$", text[:at])
        hint = (f"a placement goes before the stage's {{ … }}: {kind.group(1) if kind else 'KIND'} "
                f"on {place.group(1) if place else 'copy'} {{ … }}")
    elif tok.type in ("NUMBER", "STRING") and _previous(text, at) in ("when", "and", "or", "not", "("):
        flip = re.match(r'(\S+)[ \t]*(==|!=|<=|>=|<|>)[ \t]*([A-Za-z_][\w.]*)', text[at:])
        if flip:                                                                    # when 5 < prompt_tokens
            op = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}.get(flip.group(2), flip.group(2))
            hint = f"a comparison starts with its field: {flip.group(3)} {op} {flip.group(1)}"
    head = re.search(r"\bpipeline[ \t]+([A-Za-z_]\w*)[ \t]*(:)?[ \t]*$", text[:at])
    if head and head.group(2) and wanted == {"NAME"}:          # pipeline short : "chat" {
        expected_words = "the name of the base pipeline (pipeline NAME : BASE { … })"
        hint = ("names are written without quotes" if tok.type == "STRING" else
                f"'{tok.value}' is a keyword and cannot be used as a name" if tok.type in _KEYWORD_TOKENS else hint)
    elif head and not head.group(2) and "COLON" in wanted and tok.type == "NAME":   # pipeline short from chat {
        expected_words = "'{', or ':' and a base pipeline to derive from"
        hint = f"a pipeline derived from another is written `pipeline {head.group(1)} : BASE {{ … }}`"
    prev = _previous(text, at)
    if "EQUAL" in wanted and (prev in units.all_units() or units.respelled(1, prev, units.DURATION)
                              or units.respelled(1, prev, units.SIZE)):
        end = _end_of_previous(text, at)
        m = re.search(r"(?<![\w.])([+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?)[ \t]+$", text[:end - len(prev)])
        if m:   # `timeout = 10 ms`: the unit was read as the next parameter's name
            return Diagnostic(ERROR, f"a space between '{m.group(1)}' and its unit '{prev}'",
                              _point(file, text, m.start(), end - m.start()),
                              expected="a quantity written as one word: 10ms, 512MiB",
                              hint=f"write {m.group(1)}{prev}")
    if "EQUAL" in wanted and re.fullmatch(r"_[\d_]*", prev):
        end = _end_of_previous(text, at)
        m = re.search(r"(?<![\w.])\d+$", text[:end - len(prev)])
        if m:   # `max_new_tokens = 1_000`: the digits after the '_' were read as the next parameter's name
            written = m.group() + prev
            return Diagnostic(ERROR, f"digits grouped with '_' in '{written}'",
                              _point(file, text, m.start(), len(written)),
                              expected="a number written without separators", hint=f"write {written.replace('_', '')}")
    if tok.type == "__ANON_0":
        m = re.search(r"(?<!\w)(\w+)[ \t]*->[ \t]*(\w+)[ \t]+when[ \t]+([^\n#]*?)[ \t]*$",
                      text[_line_of_end(text, at):at])
        if m:   # `a -> b when full -> c`: the condition ends the statement
            hint = (f"a condition ends its edge statement: write `{m.group(1)} -> {m.group(2)} when {m.group(3)}`, "
                    f"then `{m.group(2)} -> …` on a line of its own")
    if prev in ("when", "and", "or", "not") and tok.type in ("RBRACE", "$END", "STAGE", "PIPELINE", "USE"):
        w = _end_of_previous(text, at) - len(prev)       # point at the word that lacks its condition
        return Diagnostic(ERROR, f"missing condition after '{prev}'", _point(file, text, w, len(prev)),
                          expected="a condition, e.g. when full or when prompt_tokens > 512",
                          hint=f"found {_found(tok)} instead")
    if tok.type == "__ANON_0":
        m = re.search(r"\b(when|and|or|not)[ \t]*(#[^\n]*)?\n[ \t]*([A-Za-z_]\w*)[ \t]*$", text[:at])
        if m:   # `a -> b when` with the condition forgotten: the next line's first stage was read as a label
            return Diagnostic(ERROR, f"missing condition after '{m.group(1)}'",
                              _point(file, text, m.start(), len(m.group(1))),
                              expected="a condition on the same line, e.g. when full or when prompt_tokens > 512",
                              hint=f"'{m.group(3)}' on the next line starts another edge, not the condition")
    if "EQUAL" in wanted and tok.type in ("STRING", "NUMBER", "LSQB", "NAME", "TRUE", "FALSE"):
        m = re.search(r"\bwhen[ \t]+[^\n#]*?[A-Za-z_][\w.]*[ \t]+([A-Za-z_]\w*)[ \t]*$",
                      text[_line_of_end(text, at):at])
        if m and m.group(1) == prev:   # `when text contains "x"`: the word was read as the next statement's name
            w = _end_of_previous(text, at) - len(prev)
            return Diagnostic(ERROR, f"'{prev}' is not a comparison", _point(file, text, w, len(prev)),
                              expected="a comparison FIELD OP VALUE with == != < <= > >=, joined with and, or, not",
                              hint="for a test no comparison makes, let a python stage return a label and "
                                   "write `when LABEL`")
    bare = re.match(r"[\w./-]+", text[at:]) if prev == "use" and "STRING" in wanted and \
        "\n" not in text[_end_of_previous(text, at):at] else None
    if bare:                                                                  # use common.agp
        hint = f'the path is a string: write use "{bare.group()}"'
    elif tok.type == "NAME" and "USE" in wanted and tok.value in ("include", "import", "require", "load"):
        path = re.match(r'[ \t]*("[^"\n]*")?', text[at + len(tok.value):]).group(1)   # include "common.agp"
        hint = f"a file is included with use: write use {path or chr(34) + 'file.agp' + chr(34)}"
    if tok.type == "OTHERWISE" and prev == "when":      # `a -> b when otherwise`
        m = re.search(r"(\w+)[ \t]*->[ \t]*(\w+)[ \t]+when[ \t]*$", text[_line_of_end(text, at):at])
        hint = ("`otherwise` is written without `when`: "
                + (f"`{m.group(1)} -> {m.group(2)} otherwise`" if m else "`a -> b otherwise`"))
    if "EQUAL" in wanted and "__ANON_0" in wanted and prev in ("else", "default"):
        w = _end_of_previous(text, at) - len(prev)
        m = re.search(r"(\w+)[ \t]*->[ \t]*(\w+)[ \t]+$", text[text.rfind("\n", 0, w) + 1:w])
        if m:   # `a -> b else`: the word was read as the next statement's name
            return Diagnostic(ERROR, f"'{prev}' is not a condition", _point(file, text, w, len(prev)),
                              expected="`when CONDITION` or `otherwise` after an edge",
                              hint=f"the edge taken when no condition holds is written "
                                   f"`{m.group(1)} -> {m.group(2)} otherwise`")
    paren = _open_paren(text, at) if "RPAR" in wanted else None
    if paren is not None and text.count("\n", paren, at):   # `when (a > 1` and the next line read on
        return Diagnostic(ERROR, "'(' is not closed", _point(file, text, paren),
                          expected="a ')' to close it, after the condition",
                          hint=f"found {_found(tok)} on line {text.count(chr(10), 0, at) + 1} instead")
    msg = "unexpected end of file" if tok.type == "$END" else f"unexpected {_found(tok)}"
    expected = expected_words or _join(_describe_expected(wanted))
    if hint == "the value after '=' is missing":
        eq = _end_of_previous(text, at) - 1           # point at the '=' that lacks its value
        return Diagnostic(ERROR, "missing value after '='", _point(file, text, eq),
                          expected=expected, hint=f"found {_found(tok)} instead")
    if tok.type == "$END" and "RBRACE" in wanted:
        hint = hint or _unclosed(text)
    elif "RBRACE" in wanted or tok.type == "__ANON_0":
        unclosed = _unclosed_before(text, at, tok)
        if unclosed is not None:
            expected, hint = unclosed
    return Diagnostic(ERROR, msg, _tok_pos(file, tok, text), expected=expected, hint=hint)


def _open_paren(text: str, at: int) -> int | None:
    """The offset of the last '(' before `at` that no ')' closes (strings and comments aside)."""
    opened: list[int] = []
    for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|[()]', text[:at]):
        if m.group() == "(":
            opened.append(m.start())
        elif m.group() == ")" and opened:
            opened.pop()
    return opened[-1] if opened else None


# what the lexer skips whole: a string, a comment (neither spans lines)
_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*')
_BRACE = re.compile(_STRING_OR_COMMENT.pattern + "|[{}]")


def _open_blocks(text: str) -> list[tuple[str, int]] | None:
    """The '{' still open at the end of `text`, outermost first, as (what, line): ("stage 'gen'",
    3). None when the text does not lex. `text` is one the parser read (up to an error): its
    braces are found by a scan that skips strings and comments as the lexer does, and only the
    few tokens before each '{' left open are lexed (lexing a 1 MiB text took seconds)."""
    starts: list[int] = []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            starts.append(m.start())
        elif m.group() == "}" and starts:
            starts.pop()
    opened: list[tuple[str, int]] = []
    for at in starts:
        words = _words_before(text, at, 6)
        if words is None:
            return None
        what = (f"pipeline '{words[-1]}'" if len(words) >= 2 and words[-2] == "pipeline"
                else f"stage '{words[-1]}'" if words else "block")
        if len(words) >= 2 and words[-1] == "=":                      # args = {
            what = f"the map of '{words[-2]}'"
        elif len(words) >= 4 and words[-4] == "pipeline" and words[-2] == ":":   # pipeline a : b {
            what = f"pipeline '{words[-3]}'"
        elif len(words) >= 4 and words[-4] == "stage":
            what = f"stage '{words[-3]}'"
        elif len(words) >= 6 and words[-6] == "stage" and words[-2] == "on":
            what = f"stage '{words[-5]}'"
        opened.append((what, text.count("\n", 0, at) + 1))
    return opened


def _words_before(text: str, at: int, n: int) -> list[str] | None:
    """The last `n` tokens (fewer at the start of the text) before offset `at`, where a token
    starts, as text: lexed from an offset a little before `at` where a token starts too, further
    back each time while fewer than `n` come. None when that does not lex."""
    width = 64
    while True:
        start = _token_start_before(text, at - width)
        try:
            words = [str(tok) for tok in _lark().lex(text[start:at])]
        except Exception:                  # noqa: BLE001 - only a hint
            return None
        if len(words) >= n or start == 0:
            return words[-n:]
        width *= 4


def _token_start_before(text: str, at: int) -> int:
    """An offset at or before `at` where the lexer starts a token (or skips blanks): just after
    the last blank before `at` outside strings and comments on its line, else the line's start
    (0 where `at` <= 0)."""
    if at <= 0:
        return 0
    line = text.rfind("\n", 0, at) + 1
    end = text.find("\n", at)
    best, outside = line, line
    for m in _STRING_OR_COMMENT.finditer(text, line, len(text) if end < 0 else end):
        if m.start() >= at:
            break
        best = max(best, _after_last_blank(text, outside, m.start()))
        outside = m.end()
    if outside < at:
        best = max(best, _after_last_blank(text, outside, at))
    return best


def _after_last_blank(text: str, start: int, end: int) -> int:
    """Just past the last blank of text[start:end]; `start` where there is none."""
    return max(start - 1, *(text.rfind(c, start, end) for c in " \t\f\r")) + 1


def _braces_balance(text: str) -> bool:
    """Whether every '{' of `text` (strings and comments aside) has its '}', counted without
    lexing, so a file with another error still counts."""
    bare = _STRING_OR_COMMENT.sub("", text)
    return bare.count("{") == bare.count("}")


def _unclosed(text: str) -> str:
    """Which '{' is still open at the end of the file, in words."""
    opened = _open_blocks(text)
    if not opened:
        return "a '{' is not closed"
    what, line = opened[-1]
    return f"the '{{' of {what} (line {line}) is not closed"


def _unclosed_before(text: str, at: int, tok: Token) -> tuple[str, str] | None:
    """(expected, hint) when `tok` starts a statement that cannot stand where it is because a
    '{' before it was left open: `stage` (or `->` after a name) inside a stage's { … },
    `pipeline` or `use` inside any block. Where every '{' of the file is closed, the block's '}'
    comes later: the statement stands in the wrong place instead. None otherwise."""
    if tok.type not in ("STAGE", "PIPELINE", "USE", "__ANON_0"):
        return None
    opened = _open_blocks(text[:at])
    if not opened:
        return None
    what, line = opened[-1]
    if what.startswith("the map "):     # `args = {a = 1` and the next stage, edge or pipeline
        if _braces_balance(text):       # closed later: a keyword as a key (`{stage = 1}`), said as such
            return None
        return f"'}}' to close {what} first", f"the '{{' of {what} (line {line}) is not closed"
    misplaced = what.startswith("stage ") or tok.type in ("PIPELINE", "USE")
    if misplaced and _braces_balance(text):
        # every '{' of the file is closed: the statement stands inside a block, not after it
        inside = f"a parameter of {what} (name = value)" if what.startswith("stage ") \
            else f"a stage, setting or edge of {what}"
        return inside, {"USE": f"`use` goes at the top level of a file, outside pipelines: move it before {what}",
                        "PIPELINE": f"pipelines do not nest: close {what} with '}}' before this one starts",
                        "STAGE": f"stages do not nest: declare this one after the '}}' of {what}"}.get(
            tok.type, f"an edge goes in the pipeline, after the '}}' of {what}")
    if misplaced:
        return f"'}}' to close {what} first", f"the '{{' of {what} (line {line}) is not closed"
    return None


class _ValueError(Exception):
    def __init__(self, diag: Diagnostic):
        self.diag = diag


# lists inside lists, and conditions inside conditions (not, parentheses mixing and/or), may
# nest this deep: the checker, fmt and the runtime walk them recursively
MAX_NESTING = 64
# before lark sees a text, a scan refuses nests that could only be errors: lists deeper than
# MAX_NESTING (exact: brackets are lists), conditions whose parentheses and `not`s go deeper than
# this (an upper bound of their depth). Parsing them would build a lark tree of that depth: a
# 1 MiB file of brackets took 9 s and 675 MB; the scan takes milliseconds.
MAX_SCAN_NESTING = 4 * MAX_NESTING
# tokens of one file (a 20,000-stage chain has about 140,000): lark takes some 10 us and 700 bytes a
# token, so a 1 MiB file of one-character tokens would take ten seconds and most of a gigabyte
MAX_TOKENS = 250_000

# the scan's tokens: strings and comments (skipped), runs of [ ] ( ), `not`, any other token
_SCAN = re.compile(r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"?|#[^\n]*|(\[+)|(\]+)|(\(+)|(\)+)|(not(?![A-Za-z0-9_]))'
                   r'|([A-Za-z0-9_.+\-]+|\S)')


def _prescan(text: str, file: str) -> Diagnostic | None:
    """What the text must not be before lark parses it, found in one pass without parsing: more
    than MAX_TOKENS tokens, the deepest list nest past MAX_NESTING, a condition nest past
    MAX_SCAN_NESTING (None: none of these). A condition's depth here counts each open '(' and
    each `not` still waiting for its operand. A nesting error wins over the token count."""
    tokens, too_many = 0, None
    lists, list_max, list_at, worst = 0, 0, 0, None      # list depth now; this nest's deepest; its '['
    parens, nots, overflow, pending = 0, [0], 0, 0      # open '('; per level: nots waiting; levels not kept
    first_not = first_inside = 0                        # where the outermost not / '(' of a nest starts
    cond = None                                         # (depth, offset) of a condition nest past the bound
    for m in _SCAN.finditer(text):
        kind = m.lastindex
        if kind is None:
            continue                                     # a string or a comment
        run = m.end() - m.start()
        tokens += run if kind < 5 else 1
        if tokens > MAX_TOKENS and too_many is None:
            too_many = m.start()
        if kind == 1:                                    # '[' * run
            if lists == 0:
                list_max, list_at = 0, m.start()
            lists += run
            list_max = max(list_max, lists)
        elif kind == 2:                                  # ']' * run
            lists = max(0, lists - run)
            if lists == 0 and list_max > MAX_NESTING and (worst is None or list_max > worst[0]):
                worst = (list_max, list_at)
        elif kind == 3:                                  # '(' * run
            if parens == 0 and nots[0] == 0:
                first_inside = m.start() + 1
            keep = max(0, min(run, MAX_SCAN_NESTING + 1 - len(nots)))
            nots.extend([0] * keep)
            overflow += run - keep
            parens += run
        elif kind == 4:                                  # ')' * run: the groups are their nots' operands
            run = min(run, parens)
            parens -= run
            gone = min(run, overflow)
            overflow -= gone
            for _ in range(run - gone):
                pending -= nots.pop()
            pending -= nots[-1]
            nots[-1] = 0
        elif kind == 5:                                  # `not`
            if parens == 0 and nots[0] == 0:
                first_not = m.start()
            nots[-1] += 1
            pending += 1
        else:                                            # an operand: the nots before it are done
            pending -= nots[-1]
            nots[-1] = 0
        depth = parens + pending
        if depth > MAX_SCAN_NESTING and (cond is None or depth > cond[0]):
            cond = (depth, cond[1] if cond is not None else first_not if nots[0] else first_inside)
    if lists > 0 and list_max > MAX_NESTING and (worst is None or list_max > worst[0]):
        worst = (list_max, list_at)                      # a nest never closed
    if worst is not None:
        return _too_deep(worst[0], "values", _point(file, text, worst[1]))
    if cond is not None:
        return _too_deep(cond[0], "conditions", _point(file, text, _SKIP_BLANKS.match(text, cond[1]).end()))
    if too_many is not None:
        return Diagnostic(ERROR, f"the file has more than {MAX_TOKENS:,} tokens", _point(file, text, too_many),
                          expected=f"a file of at most {MAX_TOKENS:,} tokens (names, numbers, strings, brackets, "
                                   "operators)", hint='split it into several files joined with use "…"')
    return None


_SKIP_BLANKS = re.compile(r"\s*")


def _point(file: str, text: str, offset: int, width: int = 1) -> SourcePos:
    """The position of `width` characters at `offset` of `text`."""
    line = text.count("\n", 0, offset) + 1
    return SourcePos.point(file, line, offset - (text.rfind("\n", 0, offset) + 1) + 1, width)


class _Flat:
    """An and/or being flattened (see _Builder._boolop); made an ast.BoolOp when used."""

    __slots__ = ("op", "items", "inner", "pos")

    def __init__(self, op: str, items: deque, inner: int):
        self.op, self.items, self.inner, self.pos = op, items, inner, None   # inner: deepest item

    def merge(self, right: "_Flat") -> "_Flat":
        if len(self.items) >= len(right.items):
            self.items.extend(right.items)
            big = self
        else:
            right.items.extendleft(reversed(self.items))
            big = right
        big.inner = max(self.inner, right.inner)
        return big


class _Span:
    """A condition with the text around it that its own position leaves out: its parentheses,
    or the `when` before it (a node's span runs from its first child's to its last child's)."""

    __slots__ = ("inner", "start", "end")

    def __init__(self, inner, start: tuple[int, int], end: tuple[int, int]):
        self.inner, self.start, self.end = inner, start, end


def _bare(c):
    while isinstance(c, _Span):
        c = c.inner
    return c


def _start(c) -> tuple[int, int]:
    if isinstance(c, Token):
        return c.line, c.column
    if isinstance(c, _Span):
        return c.start
    if isinstance(c, tuple):                   # a field: its names and keys
        return _start(c[0])
    return c.pos.line, c.pos.col


def _end(c) -> tuple[int, int]:
    if isinstance(c, Token):
        return c.end_line, c.end_column
    if isinstance(c, _Span):
        return c.end
    if isinstance(c, tuple):
        return _end(c[-1])
    return c.pos.end_line, c.pos.end_col


class _Params(list):
    """A stage's parameters, with the span of their { … }."""

    __slots__ = ("pos",)


class _Builder(threading.local):
    """The callbacks lark's LALR parser calls at each reduction (lark tree -> ast dataclasses,
    frozen, each with its SourcePos), so no parse tree is built and walked again. Bottom-up, in
    a loop: a chain of 20,000 `or`s or a list nested 100,000 deep is no RecursionError. The
    grammar's tokens are all kept (keep_all_tokens), so a node spans its keywords and brackets.
    One object for every parse, its state per thread (threading.local), reset by `begin`."""

    def __init__(self):
        self.begin("<string>")

    def begin(self, file: str) -> None:
        self.file = file
        self._depth: dict[int, tuple[int, object]] = {}     # id(node) -> (nesting, node kept alive)
        self.too_deep: tuple[int, str, SourcePos] | None = None   # the deepest nest past MAX_NESTING
        self.value_error: Diagnostic | None = None   # the first bad value (a parse goes on past it:
        # a syntax error later in the file is the one reported, as when values were read after)

    def _bad_value(self, err: "_ValueError") -> None:
        if self.value_error is None:
            self.value_error = err.diag

    def _depth_of(self, node) -> int:
        return self._depth[id(node)][0] if id(node) in self._depth else 0

    def _deep(self, depth: int, what: str, pos: SourcePos) -> None:
        if depth > MAX_NESTING and (self.too_deep is None or depth > self.too_deep[0]):
            self.too_deep = (depth, what, pos)

    def _nest(self, node, children):
        """Record how deep `node` (a List or Not) nests; remember the deepest nest."""
        depth = 1 + max((self._depth_of(c) for c in children), default=0)
        self._depth[id(node)] = (depth, node)
        self._deep(depth, "values" if isinstance(node, ast.List) else "conditions", node.pos)
        return node

    def _done(self, c):
        """A condition, with an and/or still being flattened made its BoolOp."""
        c = _bare(c)
        if not isinstance(c, _Flat):
            return c
        node = ast.BoolOp(c.op, tuple(c.items), c.pos)
        self._depth[id(node)] = (c.inner + 1, node)
        return node

    def _pos(self, children) -> SourcePos:
        """From the start of the first child to the end of the last (placeholders aside)."""
        first = next(c for c in children if c is not None)
        last = next(c for c in reversed(children) if c is not None)
        return SourcePos(self.file, *_start(first), *_end(last))

    def _tpos(self, tok: Token) -> SourcePos:
        return SourcePos(self.file, tok.line, tok.column, tok.end_line, tok.end_column)

    def _name(self, tok: Token) -> ast.Name:
        return ast.Name(str(tok), self._tpos(tok))

    def start(self, items):
        return tuple(items)

    def use(self, children):
        _, tok = children
        try:
            text = _unquote(tok, self.file)
        except _ValueError as err:
            self._bad_value(err)
            text = ""
        return ast.Use(ast.Str(text, self._tpos(tok)), self._pos(children))

    def pipeline(self, children):
        name, base = children[1], children[3]          # pipeline NAME [: NAME] { … }
        return ast.Pipeline(self._name(name), tuple(children[5:-1]), self._pos(children),
                            self._name(base) if base is not None else None)

    def setting(self, children):
        name, _, value = children
        return ast.Setting(self._name(name), value, self._pos(children))

    def override(self, children):
        stage, _, name, _, value = children
        return ast.Override(self._name(stage), self._name(name), value, self._pos(children))

    def param(self, children):
        name, _, value = children
        return ast.Param(self._name(name), value, self._pos(children))

    def stage(self, children):
        _, name, _, kind, placement, params = children
        return ast.Stage(self._name(name), self._name(kind), placement,
                         tuple(params) if params is not None else (), self._pos(children))

    def placement(self, children):
        return self._name(children[1])         # on NAME: the stage's span ends where NAME does

    def params(self, children):
        out = _Params(children[1:-1])
        out.pos = self._pos(children)
        return out

    def chain(self, children):
        *names, cond = children
        return ast.Chain(tuple(self._name(n) for n in names if n.type == "NAME"),
                         _bare(cond) if cond is not None else None, self._pos(children))

    # edge conditions
    def when(self, children):
        return _Span(self._done(children[1]), _start(children[0]), _end(children[1]))

    def otherwise(self, children):
        return ast.Otherwise(self._pos(children))

    def cond_or(self, children):
        return self._boolop("or", children)

    def cond_and(self, children):
        return self._boolop("and", children)

    def cond_atom(self, children):                    # ( cond )
        return _Span(children[1], _start(children[0]), _end(children[2]))

    def _boolop(self, op, children):
        """Flatten a or b or c into one node. `a or b or c` parses as ((a or b) or c): the
        nodes in between stay _Flat (items in a deque, the smaller side merged into the larger)
        so 20,000 `or`s cost linear time, not a copy of the items per `or`."""
        acc = None
        for c in (children[0], children[2]):
            c = _bare(c)
            if not (isinstance(c, _Flat) and c.op == op):
                c = self._done(c)
                c = _Flat(op, deque([c]), self._depth_of(c))
            acc = c if acc is None else acc.merge(c)
        acc.pos = self._pos(children)
        self._deep(acc.inner + 1, "conditions", acc.pos)
        return acc

    def cond_not(self, children):
        item = self._done(children[1])
        return self._nest(ast.Not(item, self._pos(children)), [item])

    def compare(self, children):
        field, op, value = children
        return ast.Compare(field, str(op), value, self._pos(children))

    def label(self, children):
        return ast.Label(self._name(children[0]), self._pos(children))

    def field(self, children):
        return tuple(c if isinstance(c, ast.Key) else self._name(c) for c in children
                     if not (isinstance(c, Token) and c.type == "DOT"))

    def key(self, children):
        return ast.Key(children[1], self._pos(children))

    # values
    def number(self, children):
        (tok,) = children
        try:
            return _number(tok, self._tpos(tok))
        except _ValueError as err:
            self._bad_value(err)
            return ast.Int(0, self._tpos(tok))

    def string(self, children):
        (tok,) = children
        try:
            return ast.Str(_unquote(tok, self.file), self._tpos(tok))
        except _ValueError as err:
            self._bad_value(err)
            return ast.Str("", self._tpos(tok))

    def true(self, children):
        return ast.Bool(True, self._pos(children))

    def false(self, children):
        return ast.Bool(False, self._pos(children))

    def word(self, children):
        (tok,) = children
        return ast.Word(str(tok), self._tpos(tok))

    def list(self, children):
        items = tuple(c for c in children[1:-1] if c is not None and not isinstance(c, Token))
        return self._nest(ast.List(items, self._pos(children)), items)

    def map_entry(self, children):
        name, _, value = children
        return ast.Param(self._name(name), value, self._pos(children))

    def map(self, children):
        return ast.Map(tuple(c for c in children if isinstance(c, ast.Param)), self._pos(children))


_BUILDER = _Builder()


_HEX = re.compile(r"[+-]?0[xX][0-9A-Fa-f]+")


def _number(tok: Token, pos: SourcePos):
    text = str(tok)
    if _HEX.fullmatch(text):
        value = int(text, 16)
        raise _ValueError(Diagnostic(ERROR, f"hexadecimal number '{text}' is not taken", pos,
                                     expected="a decimal number such as 32, 0.7 or 1e-3", hint=f"write {value}"))
    i = len(text)
    while i > 0 and text[i - 1].isalpha():
        i -= 1
    digits, unit = text[:i], text[i:]        # '1e3ms' -> '1e3', 'ms' (the regex took the exponent)
    is_float = any(c in digits for c in ".eE")
    try:
        value = float(digits) if is_float else int(digits)
    except ValueError:
        raise _ValueError(Diagnostic(ERROR, f"malformed number '{text}'", pos,
                                     expected="a number such as 32, 0.7 or 1e-3"))
    if is_float and not math.isfinite(value):
        raise _ValueError(Diagnostic(ERROR, f"number '{text}' is too large", pos,
                                     expected="a finite number"))
    if unit:
        return ast.Quantity(value, unit, pos)
    return ast.Float(value, pos) if is_float else ast.Int(value, pos)


# the one list of a string's escapes (docs/language.md, Values, says the same); \uXXXX besides
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r", "0": "\0"}
ESCAPES_TEXT = " ".join("\\" + k for k in _ESCAPES) + " \\uXXXX"
_HEX4 = re.compile(r"[0-9A-Fa-f]{4}")


def _unquote(tok: Token, file: str = "<string>") -> str:
    """A string token's value. An unknown escape (`\\d`) is an error at it, not a dropped
    backslash: `"C:\\Users"` must not silently become `C:Users`."""
    body = str(tok)[1:-1]
    if "\\" not in body:
        return body
    out, i = [], 0

    def bad(j: int, width: int, message: str, expected: str | None, hint: str | None = None):
        col = tok.column + 1 + j                 # the token is one line: '"' then the body
        raise _ValueError(Diagnostic(ERROR, message, SourcePos(file, tok.line, col, tok.line, col + width),
                                     expected=expected, hint=hint))

    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1]                          # the grammar ends no string on a lone backslash
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
            continue
        if e == "u":
            digits = body[i + 2:i + 6]
            if not _HEX4.fullmatch(digits):
                bad(i, 2 + len(digits), f"malformed escape '\\u{digits}' in a string",
                    "\\u and four hex digits, e.g. \\u00e9")
            code = int(digits, 16)
            i += 6
            if 0xD800 <= code < 0xDC00 and body[i:i + 2] == "\\u" and _HEX4.fullmatch(body[i + 2:i + 6]) \
                    and 0xDC00 <= int(body[i + 2:i + 6], 16) < 0xE000:       # a surrogate pair, as JSON
                code = 0x10000 + ((code - 0xD800) << 10) + (int(body[i + 2:i + 6], 16) - 0xDC00)
                i += 6
            elif 0xD800 <= code < 0xE000:
                bad(i - 6, 6, f"lone surrogate '\\u{digits}' in a string",
                    "a character: a high surrogate \\uD800-\\uDBFF followed by a low one \\uDC00-\\uDFFF",
                    "write the character itself")
            out.append(chr(code))
            continue
        shown = e if e.isprintable() else repr(e)[1:-1]
        hint = "write a backslash as \\\\" if e.isalnum() or e in ":/." else None
        bad(i, 2, f"unknown escape '\\{shown}' in a string; the escapes are {ESCAPES_TEXT}", None, hint)
    return "".join(out)


_QUOTE = {v: k for k, v in _ESCAPES.items()}


def quote(s: str) -> str:
    """The inverse of _unquote: a string literal for `s` (other unprintable characters as \\uXXXX,
    so that `agp fmt` writes back exactly what it read, on one line)."""
    out = []
    for c in s:
        if c in _QUOTE:
            out.append("\\" + _QUOTE[c])
        elif c.isprintable() or c == " ":
            out.append(c)
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:                                    # past the BMP: a surrogate pair, as JSON writes it
            v = ord(c) - 0x10000
            out.append(f"\\u{0xD800 + (v >> 10):04x}\\u{0xDC00 + (v & 0x3FF):04x}")
    return '"' + "".join(out) + '"'


def newlines(text: str) -> str:
    """`text` with every line break a "\\n": CRLF and a lone CR (old Mac files) become "\\n", as an
    editor shows them. Lines are counted at "\\n" alone everywhere (the lexer, the excerpts of
    diagnostics), so a form feed or U+2028 inside a comment starts no line."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse(text: str, file: str = "<string>") -> tuple[ast.Module | None, list[Diagnostic]]:
    """Parse one file's text. Returns (module, []) or (None, [its syntax errors, up to
    MAX_SYNTAX_ERRORS])."""
    comments: list[ast.Comment] = []

    def on_comment(tok: Token):
        comments.append(ast.Comment(str(tok), SourcePos(file, tok.line, tok.column, tok.end_line, tok.end_column)))
        return tok

    text = newlines(text)
    refused = _prescan(text, file)
    if refused is not None:
        return None, [refused]
    _BUILDER.begin(file)
    checkpoints: list[tuple] = []
    try:
        items = _run(text, checkpoints)
    except UnexpectedInput as err:
        return None, _syntax_errors(err, text, file, checkpoints)
    finally:
        value_error, too_deep = _BUILDER.value_error, _BUILDER.too_deep
        _BUILDER.begin(file)            # keep no nodes alive
    if value_error is not None:
        return None, [value_error]
    if too_deep is not None:
        return None, [_too_deep(*too_deep)]
    _collect_comments(text, on_comment)
    return ast.Module(file, items, tuple(comments)), []


# a file with several mistakes reports up to this many syntax errors at once, and looks for those
# after the first in at most this many characters, counted as a parse of the whole text each (one
# resumes before the statement blanked and reads at most the rest of the text: a 1 MiB file of
# mistakes reports its first two or three)
MAX_SYNTAX_ERRORS = 10
RECOVERY_CHARS = 2 * 1024 * 1024
# a parse keeps its state at the first token of a line at least this many characters past the last
# one kept: recovery resumes from the last kept before the statement it blanks, so it re-reads at
# most this much of the text before that statement (a 1 MiB file keeps some 1,000 states)
CHECKPOINT_CHARS = 1024


def _run(text: str, checkpoints: list[tuple], resume: tuple | None = None):
    """lark's LALR parse of `text` (what `_lark().parse(text)` does, the same errors raised),
    from its start, or from `resume`: a checkpoint of a parse of a text that is the same as
    this one up to the checkpoint's offset. Appends the checkpoints it passes to `checkpoints`,
    each (offset, line, column, last token, state stack, value stack, the builder's value_error
    and too_deep) at the end of the last token before a line's first one, where the parser has
    shifted every token before that offset and read none after it. An LALR parser's state there
    is a function of those tokens alone, so a parse resumed from it takes the steps a parse
    from the start would. The values on a kept stack are the nodes of that parse, some of them
    (the lists lark extends in place, an and/or being flattened) grown by it after the
    checkpoint: a resumed parse is for its errors and its first bad value, not its tree."""
    ip = _lark().parse_interactive(text)
    state, lexer = ip.parser_state, ip.lexer_thread
    token, line, mark = None, 1, 0
    if resume is not None:
        at, line, column, token, states, values, _BUILDER.value_error, _BUILDER.too_deep = resume
        counter = lexer.state.line_ctr
        counter.char_pos, counter.line, counter.column = at, line, column
        counter.line_start_pos = at - column + 1
        lexer.state.last_token = token
        state.state_stack[:], state.value_stack[:] = states, values
        mark = at
    feed = state.feed_token
    prev = token
    try:
        for token in lexer.lex(state):
            if token.line != line:
                line = token.line
                if prev is not None and prev.end_pos - mark >= CHECKPOINT_CHARS:
                    mark = prev.end_pos
                    checkpoints.append(_checkpoint(state, prev))
            feed(token)
            prev = token
        end = Token.new_borrow_pos("$END", "", token) if token else Token("$END", "", 0, 1, 1)
        return feed(end, True)
    except UnexpectedInput as err:
        if isinstance(err, UnexpectedCharacters) and prev is not None and prev.end_pos > mark:
            checkpoints.append(_checkpoint(state, prev))   # no token read past `prev`: its state
        err.interactive_parser = ip
        raise


def _checkpoint(state, prev: Token) -> tuple:
    return (prev.end_pos, prev.end_line, prev.end_column, prev, state.state_stack[:], state.value_stack[:],
            _BUILDER.value_error, _BUILDER.too_deep)


def _syntax_errors(err: UnexpectedInput, text: str, file: str, checkpoints: list[tuple]) -> list[Diagnostic]:
    """The syntax error `err` and those after it: the statement holding each error is blanked
    (spaces, so every position stays) and the text parsed again, as a compiler reports a file's
    mistakes in one pass; once the rest parses, its first bad value (a hex number, an unknown
    escape) too, in file order. Each parse resumes from the last of `checkpoints` (those of the
    parses before, see _run) before the statement blanked: the text before it is unchanged.
    Recovery stops where a blank could invent errors: at the end of the file, at a '{' left
    open, or when the next error is not past the statement blanked; and when another parse,
    counted as one of the whole text, would pass RECOVERY_CHARS."""
    diags = [_syntax_diagnostic(err, text, file)]
    reparsed = 0
    while len(diags) < MAX_SYNTAX_ERRORS and reparsed + len(text) <= RECOVERY_CHARS:
        reparsed += len(text)
        if isinstance(err, UnexpectedEOF) or isinstance(err, UnexpectedToken) and err.token.type == "$END" \
                or "is not closed" in (diags[-1].hint or ""):
            break
        span = _statement_around(text, min(diags[-1].pos.line, err.line))
        if span is None:
            break
        start, end = span
        text = text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]
        while checkpoints and checkpoints[-1][0] > start:
            checkpoints.pop()
        if not checkpoints:
            _BUILDER.begin(file)
        try:
            _run(text, checkpoints, checkpoints[-1] if checkpoints else None)
            if _BUILDER.value_error is not None and len(diags) < MAX_SYNTAX_ERRORS:
                diags.append(_BUILDER.value_error)      # the rest parses: its first bad value too
                diags.sort(key=lambda d: (d.pos.line, d.pos.col))
            break
        except UnexpectedInput as nxt:
            diag = _syntax_diagnostic(nxt, text, file)
            end_line = text.count("\n", 0, end) + 1
            if isinstance(nxt, UnexpectedEOF) or diag.pos.line <= end_line and _offset(text, diag.pos) < end:
                break
            diags.append(diag)
            err = nxt
    return diags


def _offset(text: str, pos: SourcePos) -> int:
    """The text offset of a 1-based (line, column)."""
    start = 0
    for _ in range(pos.line - 1):
        start = text.index("\n", start) + 1
    return start + pos.col - 1


def _statement_around(text: str, line: int) -> tuple[int, int] | None:
    """(start, end) of the lines holding the statement of an error found at `line` (1-based):
    that line, and on through the line that closes a '{', '[' or '(' it opens (a '}' closes the
    '[' and '(' left open inside its block: `stop = ["a" }` is one line). None where the lines
    close more than they open (the error is a block's: blanking it would unbalance the file)."""
    start = 0
    for _ in range(line - 1):
        start = text.index("\n", start) + 1
    opened: list[str] = []
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] not in '"\n':
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if c == "#":
            nl = text.find("\n", i)
            i = n if nl < 0 else nl
            continue
        if c in "{[(":
            opened.append(c)
        elif c in "])":
            if opened and opened[-1] == {"]": "[", ")": "("}[c]:
                opened.pop()
        elif c == "}":
            while opened and opened[-1] != "{":
                opened.pop()
            if not opened:
                return None
            opened.pop()
        elif c == "\n" and not opened:
            return start, i
        i += 1
    return (start, n) if not opened else None


def _too_deep(depth: int, what: str, pos: SourcePos) -> Diagnostic:
    """The error for a nest past MAX_NESTING, at its outermost '[' or condition."""
    inner = "lists inside lists" if what == "values" else "conditions inside conditions (not, parentheses)"
    return Diagnostic(ERROR, f"{what} are nested too deeply: {depth} levels", pos,
                      expected=f"{inner} at most {MAX_NESTING} levels deep",
                      hint="flatten the list" if what == "values" else "simplify the condition")


def _collect_comments(text: str, on_comment) -> None:
    """Find `#` comments outside strings, with their positions."""
    line, i, n = 1, 0, len(text)
    line_start = 0
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            line_start = i + 1
            i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] not in '"\n':
                j += 2 if text[j] == "\\" else 1
            i = j + 1 if j < n and text[j] == '"' else j
        elif c == "#":
            j = text.find("\n", i)
            j = n if j < 0 else j
            tok = Token("COMMENT", text[i:j], i, line, i - line_start + 1, line, j - line_start + 1, j)
            on_comment(tok)
            i = j
        else:
            i += 1
