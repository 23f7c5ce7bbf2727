"""`agp fmt`: print a module back in canonical layout, comments kept.

Layout: four-space indents; one statement per line; a stage's parameters on its
line (`{ a = 1  b = 2 }`) unless the line would pass 100 columns or a comment sits
inside, then one per line; `=` of consecutive settings and `:`/`{` of consecutive
stages aligned, as are trailing comments of consecutive lines; at most one blank
line kept between statements, always one between pipelines.

Comments: one ending a statement's line stays after it (`# …` trailing); any other
comment goes on its own line before the next statement of its block (or at the end
of the block). A comment inside a list (or a map) stays in it, beside or before its element: such a
list is printed one element per line. Formatting is idempotent and keeps the AST (see tests).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from . import ast
from .parser import quote

INDENT = "    "
WIDTH = 100


def format_value(v: ast.Value) -> str:
    if isinstance(v, ast.Bool):
        return "true" if v.value else "false"
    if isinstance(v, ast.Int):
        return str(v.value)
    if isinstance(v, ast.Float):
        return repr(float(v.value))
    if isinstance(v, ast.Str):
        return quote(v.value)
    if isinstance(v, ast.Word):
        return v.value
    if isinstance(v, ast.Quantity):
        n = v.number
        return (repr(float(n)) if isinstance(n, float) else str(n)) + v.unit
    if isinstance(v, ast.List):
        return "[" + ", ".join(format_value(i) for i in v.items) + "]"
    if isinstance(v, ast.Map):
        return "{" + ", ".join(f"{e.name.text} = {format_value(e.value)}" for e in v.entries) + "}"
    raise TypeError(f"not a value: {v!r}")


def format_condition(c) -> str:
    """A condition as written (`when` not included; `otherwise` as is); parentheses only
    where precedence needs them (`not` > `and` > `or`)."""
    if isinstance(c, ast.Label):
        return c.name.text
    if isinstance(c, ast.Compare):
        return f"{format_field(c)} {c.op} {format_value(c.value)}"
    if isinstance(c, ast.Not):
        text = format_condition(c.item)
        return "not " + (f"({text})" if isinstance(c.item, ast.BoolOp) else text)
    if isinstance(c, ast.BoolOp):
        parts = []
        for item in c.items:
            text = format_condition(item)
            parts.append(f"({text})" if isinstance(item, ast.BoolOp) and item.op != c.op else text)
        return f" {c.op} ".join(parts)
    if isinstance(c, ast.Otherwise):
        return "otherwise"
    raise TypeError(f"not a condition: {c!r}")


def format_field(c: ast.Compare) -> str:
    """The field a comparison reads, as written: `metadata.tier`, `headers["x-tenant"]`."""
    return "".join(f"[{format_value(k.value)}]" if isinstance(k, ast.Key) else ("." if i else "") + k.text
                   for i, k in enumerate(c.field))


def format_edge_condition(c) -> str:
    """' when …' / ' otherwise' / '' for a chain's condition."""
    if c is None:
        return ""
    if isinstance(c, ast.Otherwise):
        return " otherwise"
    return " when " + format_condition(c)


# ---------------------------------------------------------------- comment attachment

@dataclass
class _Notes:
    leading: dict[int, list[ast.Comment]] = field(default_factory=dict)   # id(node) -> comments
    trailing: dict[int, ast.Comment] = field(default_factory=dict)
    dangling: dict[int, list[ast.Comment]] = field(default_factory=dict)  # id(container) -> comments


def _children(node) -> list:
    if isinstance(node, ast.Module):
        return list(node.items)
    if isinstance(node, ast.Pipeline):
        return list(node.body)
    if isinstance(node, ast.Stage):
        return list(node.params)
    return []


def _start(n):
    return (n.pos.line, n.pos.col)


def _end(n):
    return (n.pos.end_line, n.pos.end_col)


def _attach(module: ast.Module) -> _Notes:
    """Give each comment its statement: trailing (it ends the statement's line), else leading
    (the next statement of the innermost block holding it), else dangling (the block's end).
    A comment inside a list belongs to the list's elements the same way, so it stays in the
    list rather than beside whatever statement shares its line once the list is on one line.
    Indexed by line and by position, so many comments among many statements stay linear."""
    notes = _Notes()
    by_end_line: dict[int, list] = {}    # statements (every level, in walk order) by their last line
    kids: dict[int, tuple[list, list]] = {}   # id(container) -> (children, their starts)
    lists: list = []                      # outermost lists of settings and params, in source order

    def walk(node):
        children = _children(node)
        kids[id(node)] = (children, [_start(c) for c in children])
        for c in children:
            by_end_line.setdefault(c.pos.end_line, []).append(c)
            if isinstance(c, (ast.Setting, ast.Param, ast.Override)) and isinstance(c.value, (ast.List, ast.Map)):
                lists.append(c.value)
            walk(c)
    walk(module)
    list_starts = [_start(v) for v in lists]
    for c in module.comments:
        cpos = (c.pos.line, c.pos.col)
        i = bisect.bisect_left(list_starts, cpos) - 1
        if i >= 0 and cpos < _end(lists[i]):
            _attach_in_list(lists[i], c, cpos, notes)
            continue
        ends_here = [a for a in by_end_line.get(c.pos.line, ()) if _end(a) <= cpos]
        if ends_here:
            best = max(ends_here, key=lambda a: (_end(a), tuple(-x for x in _start(a))))
            if id(best) not in notes.trailing:
                notes.trailing[id(best)] = c
                continue
        # innermost container holding the comment (siblings do not overlap: only the last one
        # starting before the comment can hold it), then the next statement in it
        container = module
        while True:
            children, starts = kids[id(container)]
            i = bisect.bisect_left(starts, cpos) - 1
            ch = children[i] if i >= 0 else None
            if not (isinstance(ch, (ast.Pipeline, ast.Stage)) and cpos < _end(ch)):
                break
            container = ch
        children, starts = kids[id(container)]
        i = bisect.bisect_right(starts, cpos)
        if i < len(children):
            notes.leading.setdefault(id(children[i]), []).append(c)
        else:
            notes.dangling.setdefault(id(container), []).append(c)
    return notes


def _elements(v) -> tuple:
    """A list's items, a map's entries."""
    return v.entries if isinstance(v, ast.Map) else v.items


def _attach_in_list(v: ast.List | ast.Map, c: ast.Comment, cpos, notes: _Notes) -> None:
    """A comment inside list (or map) `v`: trailing of the element that ends its line, else leading
    of the next element, else dangling before the `]` — in the innermost list holding it (a map's
    entry holds a list in its value)."""
    while True:
        items = _elements(v)
        i = bisect.bisect_left([_start(x) for x in items], cpos) - 1
        inner = items[i] if i >= 0 else None
        held = inner.value if isinstance(inner, ast.Param) else inner
        if not (isinstance(held, ast.List) and cpos < _end(held)):
            break
        v = held
    if inner is not None and inner.pos.end_line == c.pos.line and id(inner) not in notes.trailing:
        notes.trailing[id(inner)] = c
    elif i + 1 < len(items):
        notes.leading.setdefault(id(items[i + 1]), []).append(c)
    else:
        notes.dangling.setdefault(id(v), []).append(c)


# ---------------------------------------------------------------- printing

def _has_comments(v, notes: _Notes) -> bool:
    """Whether list or map `v` (or a list inside it) holds a comment, so it is printed over several lines."""
    if not isinstance(v, (ast.List, ast.Map)):
        return False
    return bool(notes.dangling.get(id(v))) or any(
        id(x) in notes.leading or id(x) in notes.trailing
        or _has_comments(x.value if isinstance(x, ast.Param) else x, notes) for x in _elements(v))


def _value_lines(v, notes: _Notes) -> list[str]:
    """A value's text: one line, or for a list (or map) holding comments one element per line (each
    line after the first indented relative to the first, the caller's indent not included)."""
    if not _has_comments(v, notes):
        return [format_value(v)]
    items = _elements(v)
    bodies = [_value_lines(x, notes) if not isinstance(x, ast.Param) else
              _assignment(x.name.text, x.value, notes, "") for x in items]
    tw = max((len(b[0]) + 1 for x, b in zip(items, bodies) if len(b) == 1 and id(x) in notes.trailing),
             default=0)
    lines = ["{" if isinstance(v, ast.Map) else "["]
    for x, body in zip(items, bodies):
        lines += [INDENT + c.text for c in notes.leading.get(id(x), [])]
        body = _trail(body[:-1] + [body[-1] + ","], notes.trailing.get(id(x)), tw)
        lines += [INDENT + line for line in body]
    lines += [INDENT + c.text for c in notes.dangling.get(id(v), [])]
    return lines + ["}" if isinstance(v, ast.Map) else "]"]


def _trail(body: list[str], comment, width: int) -> list[str]:
    """`body` with a trailing `comment` after its last line, aligned at `width` when the body is
    one line (a run of one-line items lines their comments up)."""
    if comment is None:
        return body
    last = body[-1]
    return body[:-1] + [f"{last:<{width if len(body) == 1 else len(last)}}  {comment.text}"]


def _assignment(name: str, value, notes: _Notes, indent: str) -> list[str]:
    """`name = value` at `indent` (`name` padded by the caller), over several lines for a list
    that holds comments."""
    first, *rest = _value_lines(value, notes)
    return [f"{indent}{name} = {first}"] + [indent + line for line in rest]


def format_module(module: ast.Module) -> str:
    """The canonical text of a parsed module."""
    notes = _attach(module)
    lines = _block(module.items, module, notes, "", top=True)
    text = "\n".join(lines).rstrip("\n")
    return text + "\n" if text else ""


def _first_line(node, notes: _Notes) -> int:
    lead = notes.leading.get(id(node))
    return lead[0].pos.line if lead else node.pos.line


def _last_line(node, notes: _Notes) -> int:
    t = notes.trailing.get(id(node))
    return max(node.pos.end_line, t.pos.line if t else 0)


def _block(items, container, notes: _Notes, indent: str, top: bool = False) -> list[str]:
    """Lines of a block's statements, grouped for alignment, with blank lines kept."""
    out: list[str] = []
    groups: list[list] = []
    prev = None
    for it in items:
        gap = prev is not None and _first_line(it, notes) > _last_line(prev, notes) + 1
        new_group = (prev is None or gap or type(it) is not type(prev) or isinstance(it, ast.Pipeline)
                     or isinstance(prev, ast.Pipeline))
        if new_group:
            groups.append([])
        groups[-1].append((it, gap or (top and prev is not None and
                                        (isinstance(it, ast.Pipeline) or isinstance(prev, ast.Pipeline)))))
        prev = it
    for group in groups:
        rendered = _group(group, notes, indent)
        out += rendered
    dangling = notes.dangling.get(id(container), [])
    if dangling:
        last = items[-1] if items else None
        if last is not None and dangling[0].pos.line > _last_line(last, notes) + 1:
            out.append("")
        out += [indent + c.text for c in dangling]
    return out


def _group(group, notes: _Notes, indent: str) -> list[str]:
    items = [it for it, _ in group]
    heads = _aligned_heads(items, notes, indent)
    bodies = heads
    width = max((len(b[0]) for it, b in zip(items, bodies) if len(b) == 1 and id(it) in notes.trailing),
                default=0)
    out: list[str] = []
    for (it, blank), body in zip(group, bodies):
        if blank:
            out.append("")
        out += [indent + c.text for c in notes.leading.get(id(it), [])]
        out += _trail(body, notes.trailing.get(id(it)), width)
    return out


def _aligned_heads(items, notes: _Notes, indent: str) -> list[list[str]]:
    if items and isinstance(items[0], ast.Setting):
        w = max(len(s.name.text) for s in items)
        return [_assignment(f"{s.name.text:<{w}}", s.value, notes, indent) for s in items]
    if items and isinstance(items[0], ast.Override):
        heads = [f"{o.stage.text}.{o.name.text}" for o in items]
        w = max(len(h) for h in heads)
        return [_assignment(f"{h:<{w}}", o.value, notes, indent) for h, o in zip(heads, items)]
    if items and isinstance(items[0], ast.Stage):
        # align runs of one-line stages; a stage on several lines stands alone
        out, run = [], []

        def flush():
            wn = max((len(s.name.text) for s in run), default=0)
            wk = max((len(_kind_text(s)) for s in run), default=0)
            out.extend(_stage(s, notes, indent, wn, wk) for s in run)
            run.clear()
        for s in items:
            if _stage_multiline(s, notes, indent):
                flush()
                out.append(_stage(s, notes, indent, 0, 0))
            else:
                run.append(s)
        flush()
        return out
    return [_statement(it, notes, indent) for it in items]


def _kind_text(s: ast.Stage) -> str:
    return s.kind.text + (f" on {s.placement.text}" if s.placement else "")


def _stage_multiline(s: ast.Stage, notes: _Notes, indent: str) -> bool:
    params = [f"{p.name.text} = {format_value(p.value)}" for p in s.params]
    plain = f"stage {s.name.text} : {_kind_text(s)} " + ("{ " + "  ".join(params) + " }" if params else "{}")
    has_comments = bool(notes.dangling.get(id(s))) or any(
        id(p) in notes.leading or id(p) in notes.trailing or _has_comments(p.value, notes)
        for p in s.params)
    return has_comments or len(indent) + len(plain) > WIDTH


def _stage(s: ast.Stage, notes: _Notes, indent: str, wn: int, wk: int) -> list[str]:
    params = [f"{p.name.text} = {format_value(p.value)}" for p in s.params]
    head = f"{indent}stage {s.name.text:<{wn}} : {_kind_text(s):<{wk}} "
    if not _stage_multiline(s, notes, indent):
        return [head + ("{ " + "  ".join(params) + " }" if params else "{}")]
    inner = indent + INDENT
    w = max((len(p.name.text) for p in s.params), default=0)
    lines = [head + "{"]
    prev = None
    bodies = [_assignment(f"{p.name.text:<{w}}", p.value, notes, inner) for p in s.params]
    tw = max((len(b[0]) for p, b in zip(s.params, bodies) if len(b) == 1 and id(p) in notes.trailing),
             default=0)
    for p, body in zip(s.params, bodies):
        if prev is not None and _first_line(p, notes) > _last_line(prev, notes) + 1:
            lines.append("")
        lines += [inner + c.text for c in notes.leading.get(id(p), [])]
        lines += _trail(body, notes.trailing.get(id(p)), tw)
        prev = p
    lines += [inner + c.text for c in notes.dangling.get(id(s), [])]
    lines.append(indent + "}")
    return lines


def _statement(it, notes: _Notes, indent: str) -> list[str]:
    if isinstance(it, ast.Use):
        return [f"{indent}use {quote(it.path.value)}"]
    if isinstance(it, ast.Chain):
        return [indent + " -> ".join(n.text for n in it.stages) + format_edge_condition(it.condition)]
    if isinstance(it, ast.Pipeline):
        body = _block(it.body, it, notes, indent + INDENT)
        head = f"{indent}pipeline {it.name.text}" + (f" : {it.base.text}" if it.base is not None else "")
        if not body:
            return [f"{head} {{}}"]
        return [f"{head} {{"] + body + [indent + "}"]
    if isinstance(it, ast.Setting):
        return _assignment(it.name.text, it.value, notes, indent)
    raise TypeError(f"not a statement: {it!r}")


def format_text(text: str, file: str = "<string>") -> tuple[str | None, list]:
    """(canonical text, []) or (None, [syntax error])."""
    from .parser import parse
    module, diags = parse(text, file)
    if module is None:
        return None, diags
    return format_module(module), []
