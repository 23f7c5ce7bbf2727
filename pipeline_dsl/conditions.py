"""Edge conditions: the fields they may read, their type check, and their evaluation.

A condition in the file (`when prompt_tokens > 512 and not metadata.free == true`) is
compiled to a small tuple form that the graph carries and the runtime evaluates:

    ("label", "full")                      the item carries this label (batcher, python)
    ("cmp", "prompt_tokens", ">", 512)     a field compared with a literal
    ("cmp", ("metadata", "tier"), "==", "gold")     a key of a keyed field: the path
    ("cmp", ("headers", "x-tenant"), "==", "a")     (field, key, ...), written `.KEY` or `["KEY"]`
    ("and", c1, c2, ...)  ("or", ...)  ("not", c)
    ("otherwise",)                         no conditional edge of the stage held

Routing (docs/language.md): an item leaving a stage goes along every unconditional
out-edge, and along the first conditional out-edge (in file order) whose condition
holds, else along the `otherwise` edge.

Fields: those of a Request item, and, after `generate`, those of its Generated result.
Keyed fields: `metadata` (any key path of the request's metadata object: metadata.tier,
metadata["team id"], metadata.a.b) and `headers` (one HTTP header the request carries,
headers["x-tenant"], its name case-blind: compiled lower-case, as the item carries them).

A field the item does not carry (a `metadata` key or a header that is absent, `max_tokens`
not sent) makes `==`, `<`, `<=`, `>`, `>=` false and `!=` true; so does a metadata value
of another type than the literal.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

from . import ast
from .diagnostics import did_you_mean
from .fmt import format_field, format_value
from .parser import is_name, quote
from .requests_io import HEADER_NAME

NUMBER, STRING, BOOLEAN, ANY = "number", "string", "boolean", "any"

REQUEST, GENERATED = "Request", "Generated"

# field -> (type, doc); `metadata.KEY` is any key of the request's `metadata` object
REQUEST_FIELDS: dict[str, tuple[str, str]] = {
    "prompt_tokens": (NUMBER, "tokens of the prompt, chat template applied (the pipeline's model)"),
    "max_tokens": (NUMBER, "the request's max_tokens, when it gives one"),
    "model": (STRING, "the request's model field (agp serve: the id the client asked for)"),
    "temperature": (NUMBER, "the request's temperature, when it gives one"),
    "top_p": (NUMBER, "the request's top_p, when it gives one"),
    "top_k": (NUMBER, "the request's top_k, when it gives one"),
    "n": (NUMBER, "answers the request asks for"),
    "turn": (NUMBER, "loops taken so far through stages with max_turns"),
    "stream": (BOOLEAN, "the client asked for a stream (agp serve)"),
    "id": (STRING, "the request's id"),
    "user": (STRING, "the request's user (OpenAI's end-user id), when it gives one"),
    "safety_identifier": (STRING, "the request's safety_identifier, when it gives one"),
}
GENERATED_FIELDS: dict[str, tuple[str, str]] = {
    **REQUEST_FIELDS,
    "completion_tokens": (NUMBER, "tokens generated"),
    "cached_tokens": (NUMBER, "prompt tokens served from the prefix cache"),
    "finish_reason": (STRING, "stop | length"),
    "text": (STRING, "the generated text"),
}
FIELDS = {REQUEST: REQUEST_FIELDS, GENERATED: GENERATED_FIELDS}


class Keyed(NamedTuple):
    """A field read by a key (on both item types): the type of what a key gives, the keys it
    takes ("any": a path of them, "one"), the field as written with its key a placeholder, a
    comparison that reads it (the messages' example), and its doc."""
    type: str
    keys: str
    form: str
    example: str
    doc: str


METADATA, HEADERS = "metadata", "headers"
KEYED: dict[str, Keyed] = {
    METADATA: Keyed(ANY, "any", "metadata.KEY", 'metadata.tier == "gold"',
                    "a key of the request's metadata object (metadata.a.b: a key of an object in it)"),
    HEADERS: Keyed(STRING, "one", 'headers["NAME"]', 'headers["x-tenant"] == "gold"',
                   "an HTTP header the request carries (agp serve copies those conditions read), its name case-blind"),
}
ORDERING = ("<", "<=", ">", ">=")
MISSING = object()


class ConditionError(ValueError):
    """A condition that does not type-check; `node` is the AST node to point at."""

    def __init__(self, message: str, node, hint: str | None = None, expected: str | None = None):
        super().__init__(message)
        self.node, self.hint, self.expected = node, hint, expected


# ---------------------------------------------------------------- compile

def compile_condition(c) -> tuple:
    """AST condition -> tuple form (see the module docstring)."""
    if isinstance(c, ast.Label):
        return ("label", c.name.text)
    if isinstance(c, ast.Compare):
        return ("cmp", field_path(c), c.op, _literal(c.value))
    if isinstance(c, ast.BoolOp):
        return (c.op, *(compile_condition(i) for i in c.items))
    if isinstance(c, ast.Not):
        return ("not", compile_condition(c.item))
    if isinstance(c, ast.Otherwise):
        return ("otherwise",)
    raise TypeError(f"not a condition: {c!r}")


def _literal(v):
    if isinstance(v, (ast.Int, ast.Float, ast.Bool, ast.Str)):
        return v.value
    return None                      # rejected by check_condition


def field_path(c: ast.Compare):
    """The path a comparison reads: its field's name (`prompt_tokens`), or for a field read by
    a key the tuple (field, key, ...): metadata.tier and metadata["tier"] both read
    ("metadata", "tier"); headers["X-Tenant"] reads ("headers", "x-tenant") (HTTP's header names
    are case-blind, and the item carries them lower-case)."""
    head, *rest = c.field
    if not rest:
        return head.text
    keys = [k.text if isinstance(k, ast.Name) else _key_text(k.value) for k in rest]
    return (head.text, *(k.lower() for k in keys)) if head.text == HEADERS else (head.text, *keys)


def _key_text(v) -> str:
    """The key a `[…]` gives: a string's value; any other value, refused by check_compare, as written."""
    if isinstance(v, (ast.Str, ast.Word)):
        return v.value
    return "[…]" if isinstance(v, ast.List) else format_value(v)


def path_text(path) -> str:
    """A field path (field_path) as the file would write it: a header's name in brackets, a
    metadata key that is a name after a dot, any other (a reserved word too: metadata["not"])
    in brackets (`metadata.tier`, `metadata["team id"]`, `headers["x-tenant"]`)."""
    if isinstance(path, str):
        return path
    head, *keys = path
    return head + "".join("." + k if is_name(k) and head != HEADERS
                          else f"[{quote(k)}]" for k in keys)


def headers_read(ir) -> list[str]:
    """The HTTP header names (lower-case) a compiled condition compares, once each, in order."""
    out: list[str] = []
    stack = [ir]
    while stack:
        c = stack.pop()
        if c is None:
            continue
        if c[0] == "cmp" and isinstance(c[1], tuple) and c[1][0] == HEADERS and len(c[1]) == 2:
            out.append(c[1][1])
        elif c[0] in ("and", "or", "not"):
            stack.extend(reversed(c[1:]))
    return list(dict.fromkeys(out))


def labels(c) -> list:
    """The Label nodes of an AST condition."""
    if isinstance(c, ast.Label):
        return [c]
    if isinstance(c, ast.BoolOp):
        return [x for i in c.items for x in labels(i)]
    if isinstance(c, ast.Not):
        return labels(c.item)
    return []


def compares(c) -> list:
    """The Compare nodes of an AST condition."""
    if isinstance(c, ast.Compare):
        return [c]
    if isinstance(c, ast.BoolOp):
        return [x for i in c.items for x in compares(i)]
    if isinstance(c, ast.Not):
        return compares(c.item)
    return []


def text(ir) -> str:
    """The tuple form as the file would write it (for drawings and messages)."""
    if ir is None:
        return ""
    tag = ir[0]
    if tag == "label":
        return ir[1]
    if tag == "otherwise":
        return "otherwise"
    if tag == "cmp":
        v = ir[3]
        shown = ("true" if v else "false") if isinstance(v, bool) else quote(v) if isinstance(v, str) else repr(v)
        return f"{path_text(ir[1])} {ir[2]} {shown}"
    if tag == "not":
        inner = text(ir[1])
        return "not " + (f"({inner})" if ir[1][0] in ("and", "or") else inner)
    parts = [f"({text(i)})" if i[0] in ("and", "or") and i[0] != tag else text(i) for i in ir[1:]]
    return f" {tag} ".join(parts)


# ---------------------------------------------------------------- type check

def field_type(path, item_types) -> str | None:
    """The type of a field (a name or a field_path tuple) on items of `item_types`: ANY for
    metadata keys, STRING for a header; None if unknown (a keyed field without its key too)."""
    if isinstance(path, tuple):
        if path[0] not in KEYED:
            return None
        keyed = KEYED[path[0]]
        return keyed.type if keyed.keys == "any" or len(path) == 2 else None
    if path in KEYED:
        return None
    for t in item_types:
        if path in FIELDS.get(t, {}):
            return FIELDS[t][path][0]
    return None


def known_fields(item_types) -> list[str]:
    names = {f for t in item_types for f in FIELDS.get(t, {})}
    return sorted(names) + [k.form for k in KEYED.values()]


def _bare_word_hint(word: str, path: str, ftype: str) -> str:
    """How to write the literal meant by a bare word compared with the field `path` of type `ftype`."""
    if word in FIELDS[GENERATED] or word.split(".", 1)[0] in KEYED:
        return f"'{word}' is a field: two fields cannot be compared; compare each with a literal"
    if word.lower() in ("true", "false") and ftype in (BOOLEAN, ANY):
        return f"write {word.lower()}"
    if word.lower() in ("null", "none", "nil"):
        return "there is no null: a field the item does not carry makes ==, <, <=, >, >= false and != true"
    if ftype in (NUMBER, BOOLEAN):
        return f"'{path}' is a {ftype}: compare it with " + ("a number" if ftype == NUMBER else "true or false")
    return f'quote a string: "{word}"'


_VALUE_WORDS = {ast.Int: "a number", ast.Float: "a number", ast.Bool: "true/false", ast.Word: "a bare word",
                ast.Quantity: "a quantity", ast.List: "a list"}


def _check_keys(c: ast.Compare) -> None:
    """A field's keys: strings in brackets, on a field read by a key (metadata: any number of
    them; headers: one, an HTTP header name); a ConditionError at the first key that is not."""
    head, *keys = c.field
    name = head.text
    for k in keys:
        if isinstance(k, ast.Key) and not isinstance(k.value, ast.Str):
            raise ConditionError(f"a key in brackets is a quoted string, not {_VALUE_WORDS[type(k.value)]}",
                                 k.value, expected='a string: metadata["team id"], headers["x-tenant"]',
                                 hint=None if isinstance(k.value, ast.List)
                                 else f"write {name}[{quote(_key_text(k.value))}]")
    if name not in KEYED:
        if keys and field_type(name, [REQUEST, GENERATED]) is not None:
            raise ConditionError(f"'{name}' is a {field_type(name, [REQUEST, GENERATED])}: it has no keys",
                                 keys[0], expected=f"{name} alone, or a field read by a key: "
                                                   + ", ".join(k.form for k in KEYED.values()))
        return
    if not keys:
        what = "a key" if name == METADATA else "a header name"
        raise ConditionError(f"'{name}' needs {what}: {KEYED[name].form}", head, hint=f"e.g. {KEYED[name].example}")
    if name == HEADERS:
        header = field_path(c)[1]
        if len(keys) > 1:
            raise ConditionError(f"a header's value is a string: {path_text((HEADERS, header))} has no keys",
                                 keys[1], expected=f"{path_text((HEADERS, header))} == \"…\"")
        if not HEADER_NAME.fullmatch(header):
            fixed = re.sub(r"[^!#$%&'*+.^_`|~0-9a-z-]+", "-", header).strip("-")[:64]
            raise ConditionError(f"{quote(header)} is not an HTTP header name", keys[0],
                                 expected="a header name: letters, digits and '-' (an HTTP token of at most "
                                          "64 characters), case-blind",
                                 hint=f"write headers[{quote(fixed)}]" if fixed and fixed != header else None)


def _inner_field_hint(path) -> str | None:
    """`usage.completion_tokens`, `request.metadata.tier`: a field written under a prefix the
    item's dict has, where the condition reads it by its own name."""
    if not isinstance(path, tuple):
        return None
    for i in range(1, len(path)):
        tail = path[i] if i == len(path) - 1 else path[i:]
        if field_type(tail, [REQUEST, GENERATED]) is not None:
            return f"a condition reads the field by its own name: write {path_text(tail)}"
    return None


def check_compare(c: ast.Compare, item_types) -> None:
    """Raise ConditionError when `c` cannot hold on items of these types."""
    _check_keys(c)
    path = field_path(c)
    shown = path_text(path)
    ftype = field_type(path, item_types)
    if ftype is None:
        name = c.field[0].text
        if name in FIELDS[GENERATED] and name not in FIELDS[REQUEST] and GENERATED not in item_types:
            raise ConditionError(f"field '{format_field(c)}' is only known after generate", c.field[0],
                                 hint="a condition before generate can read the request's fields",
                                 expected="one of " + ", ".join(known_fields(item_types)))
        raise ConditionError(f"unknown field '{format_field(c)}'", c.field[0],
                             expected="one of " + ", ".join(known_fields(item_types)),
                             hint=_inner_field_hint(path) or did_you_mean(name, [*FIELDS[GENERATED], *KEYED]))
    v = c.value
    if isinstance(v, ast.Word):
        raise ConditionError(f"'{v.value}' is a bare word; a condition compares a field with a literal",
                             v, hint=_bare_word_hint(v.value, shown, ftype))
    if isinstance(v, (ast.Quantity, ast.List)):
        raise ConditionError(f"a {'list' if isinstance(v, ast.List) else 'quantity with a unit'} cannot be "
                             "compared", v, expected="a number, a string or true/false")
    lit = {ast.Int: NUMBER, ast.Float: NUMBER, ast.Str: STRING, ast.Bool: BOOLEAN}[type(v)]
    if ftype != ANY and lit != ftype:
        raise ConditionError(f"type mismatch: '{shown}' is a {ftype}, not a {lit}", v,
                             expected=f"a {ftype} literal")
    if c.op in ORDERING and lit != NUMBER:
        raise ConditionError(f"'{c.op}' compares numbers; a {lit} can only be compared with == or !=", c)


# ---------------------------------------------------------------- evaluation

def identity(ir):
    """A compiled condition as a key that is equal for two conditions only when they hold for
    the same items: a literal's kind kept beside it, as a comparison tells true from 1 and false
    from 0 (which Python's == and hash do not); 1 and 1.0 stay one number."""
    if ir is None:
        return None
    tag = ir[0]
    if tag == "cmp":
        v = ir[3]
        return ("cmp", ir[1], ir[2], isinstance(v, bool), v)
    if tag in ("and", "or", "not"):
        return (tag, *(identity(i) for i in ir[1:]))
    return ir


def evaluate(ir, get: Callable[[str], Any], label: str | None = None) -> bool:
    """Whether condition `ir` holds for an item: `get(path)` gives a field's value or MISSING,
    `label` is the label the item carries (None: none)."""
    tag = ir[0]
    if tag == "label":
        return label == ir[1]
    if tag == "cmp":
        return _compare(get(ir[1]), ir[2], ir[3])
    if tag == "and":
        return all(evaluate(i, get, label) for i in ir[1:])
    if tag == "or":
        return any(evaluate(i, get, label) for i in ir[1:])
    if tag == "not":
        return not evaluate(ir[1], get, label)
    if tag == "otherwise":
        return True
    raise ValueError(f"not a condition: {ir!r}")


def holds_for_label(ir, label: str) -> bool | None:
    """Whether condition `ir` holds for every item carrying `label`, whatever its fields: True
    (always), False (never) or None (it depends on the fields)."""
    tag = ir[0]
    if tag == "label":
        return label == ir[1]
    if tag in ("and", "or"):
        parts = [holds_for_label(i, label) for i in ir[1:]]
        decisive = tag == "or"          # one True decides an `or`, one False an `and`
        if decisive in parts:
            return decisive
        return None if None in parts else not decisive
    if tag == "not":
        inner = holds_for_label(ir[1], label)
        return None if inner is None else not inner
    return None                         # a comparison reads the item's fields


def _same_kind(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return True
    return isinstance(a, str) and isinstance(b, str)


def _compare(value, op: str, literal) -> bool:
    if value is MISSING or value is None or not _same_kind(value, literal):
        return op == "!="
    if op == "==":
        return value == literal
    if op == "!=":
        return value != literal
    if op == "<":
        return value < literal
    if op == "<=":
        return value <= literal
    if op == ">":
        return value > literal
    return value >= literal

