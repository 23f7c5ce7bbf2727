"""`agp render`: draw a pipeline graph with graphviz, left to right.

One box per stage: its name, kind, placement and key settings; fill colour by the
resource it mostly uses (host, copy, compute) or, with a plan, by its stream;
conditional edges labelled (`when full`, numbered where a stage tries several in order),
`otherwise` edges dashed, routes, joins and python stages in shapes of their own, plan
events drawn dashed.

    dot_source(graph, plan=None) -> str           # DOT text, no `dot` needed
    render_file(graph, "out.svg", plan=None)      # svg | png | pdf | dot, via `dot`
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import unicodedata

from stages.registry import default_registry

from . import units
from .conditions import text as cond_text
from .graph import spreads

FORMATS = ("svg", "png", "pdf", "dot")
RESOURCE_COLOURS = {"host": "#dbeafe", "copy": "#fef3c7", "compute": "#fde2e2", None: "#eeeeee"}
STREAM_COLOURS = ("#dbeafe", "#fef3c7", "#fde2e2", "#dcfce7", "#ede9fe", "#fce7f3", "#e0f2fe", "#f5f5f4")

# the settings worth seeing at a glance, per built-in kind (others: those changed from the default)
KEY_PARAMS = {
    "requests": ("max_queue",),
    "dynamic_batch": ("max_batch_size", "timeout", "padding", "policy"),
    "encode": ("chat_template",),
    "kv_lookup": ("reuse", "block_size", "budget"),
    "generate": ("max_new_tokens", "temperature", "dtype", "compile", "n"),
    "respond": (),
    "python": ("fn", "max_turns"),
    "join": ("policy", "fn"),
}
# a shape per kind that decides where items go (the rest: rounded boxes)
SHAPES = {"route": "hexagon", "join": "invtrapezium", "python": "component"}


class DotMissing(RuntimeError):
    """graphviz's `dot` program is not installed."""


DOT_MISSING = ("graphviz's 'dot' program is not installed; install the 'graphviz' package "
               "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz), "
               "or write DOT text with -o FILE.dot")


def _show(kind_name: str | None, name: str, value) -> str:
    schema = default_registry().get(kind_name) if kind_name else None
    p = schema.param(name) if schema else None
    if value is None:
        return "none"
    if p is not None and p.type == "duration":
        return units.format_duration(float(value))
    if p is not None and p.type == "size":
        return units.format_size(int(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(repr(v) if isinstance(v, str) else str(v) for v in value) + "]"
    if isinstance(value, dict):                   # a map (a python stage's args), as the file writes it
        return "{" + ", ".join(f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in value.items()) + "}"
    return str(value)


def key_settings(node: dict) -> list[tuple[str, str]]:
    kind = node.get("kind")
    params = node.get("params") or {}
    schema = default_registry().get(kind) if kind else None
    keys = list(KEY_PARAMS.get(kind, ()))
    if schema is not None:
        for p in schema.params:
            if p.name not in keys and p.name in params and params[p.name] != p.default \
                    and not (p.default == () and params[p.name] == []):
                keys.append(p.name)
    # a key setting left unset (None: a python stage's max_turns, a join's fn under another policy,
    # the model's own chat template) says nothing: not drawn as "none"
    return [(k, _show(kind, k, params[k])) for k in keys if params.get(k) is not None]


_ESCAPES = {"\0": "\\0", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _visible(text: str) -> str:
    """`text` as a drawing shows it: a control character (a NUL, an ESC, a backspace …) or a
    noncharacter U+FFFE / U+FFFF spelt as the file spells it (\\0, \\t, \\u0001, \\uffff), since
    neither DOT nor the XML of a label can hold one (`dot` would fail on the file's string)."""
    if text.isprintable():
        return text
    return "".join(_ESCAPES.get(c, f"\\u{ord(c):04x}")
                   if unicodedata.category(c) in ("Cc", "Cs") or c in "\ufffe\uffff" else c for c in text)


def _label(name: str, node: dict, streams: list[str]) -> str:
    def e(text: str) -> str:
        return html.escape(_visible(text))

    kind = node.get("kind") or "?"
    where = f" on {node['placement']}" if node.get("placement") else ""
    rows = [f'<B>{e(name)}</B>', f'<FONT POINT-SIZE="10">{e(kind)}{e(where)}</FONT>']
    settings = key_settings(node)
    if settings:
        rows.append('<FONT POINT-SIZE="9">' + "<BR/>".join(f"{e(k)} = {e(v)}" for k, v in settings) + "</FONT>")
    if streams:
        rows.append(f'<FONT POINT-SIZE="9"><I>stream {e(", ".join(streams))}</I></FONT>')
    return "<" + "<BR/>".join(rows) + ">"


def _q(s: str) -> str:
    return '"' + _visible(str(s)).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot_source(graph, plan=None) -> str:
    """The DOT text of a pipeline graph (and, optionally, its plan's streams and events)."""
    name = graph.graph.get("name", "pipeline")
    settings = graph.graph.get("settings", {})
    title = f"pipeline {name}" + (f" : {graph.graph['base']}" if graph.graph.get("base") else "")
    extra = [f"{k} = {settings[k]}" for k in ("model", "mode", "device") if settings.get(k) is not None]
    lines = ["digraph agp {",
             "  rankdir=LR;",
             f"  label={_q(title + '  (' + ', '.join(extra) + ')' if extra else title)};",
             '  labelloc=t; fontname="Helvetica"; fontsize=14; nodesep=0.4; ranksep=0.5;',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", margin="0.15,0.08"];',
             '  edge [fontname="Helvetica", fontsize=10, color="#555555"];']
    stream_of: dict[str, list[str]] = {}
    colour_of: dict[str, str] = {}
    if plan is not None:
        for i, s in enumerate(plan.streams):
            colour_of[s.name] = STREAM_COLOURS[i % len(STREAM_COLOURS)]
            for st in s.stages:
                stream_of.setdefault(st, []).append(s.name)
    for n, data in graph.nodes(data=True):
        if plan is not None:
            streams = stream_of.get(n, [])
            fill = colour_of.get(streams[0], "#eeeeee") if streams else "#eeeeee"
        else:
            streams = []
            fill = RESOURCE_COLOURS.get(data.get("placement") or data.get("resource"), "#eeeeee")
        shape = SHAPES.get(data.get("kind"))
        extra = f", shape={shape}, style=filled" if shape else ""
        lines.append(f"  {_q(n)} [label={_label(n, data, streams)}, fillcolor={_q(fill)}{extra}];")
    for u, data in graph.nodes(data=True):
        routes = data.get("routes")
        if routes is None:               # a graph built without routes: one edge per pair
            routes = [(v, c) for _, v, e in graph.out_edges(u, data=True)
                      for c in (e.get("conditions") or [e.get("condition")])]
        first = sum(1 for _, c in routes if c is not None and c != ("otherwise",)) > 1
        # returns = many: each request of the list goes along these edges, drawn bold and labelled
        each, bold = ("each ", ", style=bold, penwidth=2") if spreads(data.get("params") or {}, data.get("kind")) \
            else ("", "")
        k = 0
        for v, c in routes:
            if c is None:
                lines.append(f'  {_q(u)} -> {_q(v)} [label="each"{bold}];' if each else f"  {_q(u)} -> {_q(v)};")
            elif c == ("otherwise",):
                wide = ", penwidth=2" if each else ""
                lines.append(f'  {_q(u)} -> {_q(v)} [label="{each}otherwise", style=dashed{wide}];')
            else:
                k += 1
                order = f"{k}. " if first and graph.nodes[u].get("kind") != "dynamic_batch" else ""
                lines.append(f"  {_q(u)} -> {_q(v)} [label={_q(each + order + 'when ' + cond_text(c))}{bold}];")
    if plan is not None:
        seen = set()
        for ev in plan.events:
            key = (ev.src, ev.dst)
            if ev.src == ev.dst or key in seen or ev.src not in graph or ev.dst not in graph:
                continue
            seen.add(key)
            lines.append(f'  {_q(ev.src)} -> {_q(ev.dst)} [style=dashed, color="#b45309", '
                         f'fontcolor="#b45309", label="event", constraint=false];')
        legend = " | ".join(f"{s.name}: {s.stage_list}" for s in plan.streams)
        lines.append(f"  label={_q(title + '  —  streams: ' + legend)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def output_format(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return ext if ext in FORMATS else None


def render_file(graph, out: str, plan=None) -> None:
    """Write the drawing to `out`; the format follows its extension. Raises DotMissing."""
    fmt = output_format(out)
    if fmt is None:
        raise ValueError(f"unknown output format '{os.path.splitext(out)[1] or out}'")
    src = dot_source(graph, plan)
    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if fmt == "dot":
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(src)
        return
    dot = shutil.which("dot")
    if dot is None:
        raise DotMissing(DOT_MISSING)
    proc = subprocess.run([dot, f"-T{fmt}", "-o", out], input=src.encode("utf-8"), capture_output=True,
                          timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"dot failed: {proc.stderr.decode('utf-8', 'replace').strip()}")
