"""Edge conditions: the fields they may read, their type check, and their evaluation.

A condition in the file (`when prompt_tokens > 512 and not metadata.free == true`) is
compiled to a small tuple form that the graph carries and the runtime evaluates:

    ("label", "full")                      the item carries this label (batcher, python)
    ("cmp", "prompt_tokens", ">", 512)     a field compared with a literal
    ("and", c1, c2, ...)  ("or", ...)  ("not", c)
    ("otherwise",)                         no conditional edge of the stage held

Routing (docs/language.md): an item leaving a stage goes along every unconditional
out-edge, and along the first conditional out-edge (in file order) whose condition
holds, else along the `otherwise` edge.

Fields: those of a Request item, and, after `generate`, those of its Generated result.
A field the item does not carry (a `metadata` key that is absent, `max_tokens` not
sent) makes `==`, `<`, `<=`, `>`, `>=` false and `!=` true; so does a metadata value
of another type than the literal.
"""
from __future__ import annotations

from typing import Any, Callable

from . import ast

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
        return ("cmp", c.path, c.op, _literal(c.value))
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
        shown = ("true" if v else "false") if isinstance(v, bool) else (
            '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' if isinstance(v, str) else repr(v))
        return f"{ir[1]} {ir[2]} {shown}"
    if tag == "not":
        inner = text(ir[1])
        return "not " + (f"({inner})" if ir[1][0] in ("and", "or") else inner)
    parts = [f"({text(i)})" if i[0] in ("and", "or") and i[0] != tag else text(i) for i in ir[1:]]
    return f" {tag} ".join(parts)


# ---------------------------------------------------------------- type check

def field_type(path: str, item_types) -> str | None:
    """The type of a field on items of `item_types`, ANY for metadata keys, None if unknown."""
    head = path.split(".", 1)[0]
    if head == "metadata":
        return ANY if "." in path else None
    for t in item_types:
        if path in FIELDS.get(t, {}):
            return FIELDS[t][path][0]
    return None


def known_fields(item_types) -> list[str]:
    names = {f for t in item_types for f in FIELDS.get(t, {})}
    return sorted(names) + ["metadata.KEY"]


def _bare_word_hint(word: str, path: str, ftype: str) -> str:
    """How to write the literal meant by a bare word compared with the field `path` of type `ftype`."""
    if word in FIELDS[GENERATED] or word.split(".", 1)[0] == "metadata":
        return f"'{word}' is a field: two fields cannot be compared; compare each with a literal"
    if word.lower() in ("true", "false") and ftype in (BOOLEAN, ANY):
        return f"write {word.lower()}"
    if word.lower() in ("null", "none", "nil"):
        return "there is no null: a field the item does not carry makes ==, <, <=, >, >= false and != true"
    if ftype in (NUMBER, BOOLEAN):
        return f"'{path}' is a {ftype}: compare it with " + ("a number" if ftype == NUMBER else "true or false")
    return f'quote a string: "{word}"'


def check_compare(c: ast.Compare, item_types) -> None:
    """Raise ConditionError when `c` cannot hold on items of these types."""
    path = c.path
    ftype = field_type(path, item_types)
    if ftype is None:
        if path == "metadata":
            raise ConditionError("'metadata' needs a key: metadata.KEY", c.field[0],
                                 hint='e.g. metadata.tier == "gold"')
        if path.split(".", 1)[0] in FIELDS[GENERATED] and path.split(".", 1)[0] not in FIELDS[REQUEST] \
                and GENERATED not in item_types:
            raise ConditionError(f"field '{path}' is only known after generate", c.field[0],
                                 hint="a condition before generate can read the request's fields",
                                 expected="one of " + ", ".join(known_fields(item_types)))
        raise ConditionError(f"unknown field '{path}'", c.field[0],
                             expected="one of " + ", ".join(known_fields(item_types)))
    v = c.value
    if isinstance(v, ast.Word):
        raise ConditionError(f"'{v.value}' is a bare word; a condition compares a field with a literal",
                             v, hint=_bare_word_hint(v.value, path, ftype))
    if isinstance(v, (ast.Quantity, ast.List)):
        raise ConditionError(f"a {'list' if isinstance(v, ast.List) else 'quantity with a unit'} cannot be "
                             "compared", v, expected="a number, a string or true/false")
    lit = {ast.Int: NUMBER, ast.Float: NUMBER, ast.Str: STRING, ast.Bool: BOOLEAN}[type(v)]
    if ftype != ANY and lit != ftype:
        raise ConditionError(f"type mismatch: '{path}' is a {ftype}, not a {lit}", v,
                             expected=f"a {ftype} literal")
    if c.op in ORDERING and lit != NUMBER:
        raise ConditionError(f"'{c.op}' compares numbers; a {lit} can only be compared with == or !=", c)


# ---------------------------------------------------------------- evaluation

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

