"""Checked AST -> networkx.DiGraph, and the checks that need the graph.

`build_graph(pipeline)` takes an `ast.Pipeline` (or a `checker.Resolved`) and returns
a DiGraph with graph attributes `name` and `settings` (model, mode, device, threads,
dtype), one node per stage with `kind` (str), `params` (effective values: kind
default -> mode preset -> file; durations in float seconds, sizes in int bytes),
`pos`, `resource` (host|copy|compute, from the kind) and `placement` (from `on …`
or None), and one edge per connected pair with `condition` (None, "full",
"timeout"), `conditions` (all conditions of the parallel edges merged into this
one, e.g. ["full", "timeout"]; `condition` is None when there are several) and `pos`.

`validate(resolved)` reports cycles (the cycle printed), stages unreachable from a
request source, stages with no path to a respond stage, port type mismatches on
edges and pipelines without a request source. `check_program(program)` runs every
check of every pipeline in a loaded program.
"""

from __future__ import annotations

import networkx as nx

from stages.registry import Registry, default_registry

from . import ast
from .checker import Resolved, check_pipeline
from .diagnostics import ERROR, Diagnostic, SourcePos, sort_diagnostics


def _resolve(pipeline, registry: Registry | None = None) -> Resolved:
    if isinstance(pipeline, Resolved):
        return pipeline
    if isinstance(pipeline, ast.Pipeline):
        return check_pipeline(pipeline, registry)[0]
    raise TypeError(f"build_graph takes an ast.Pipeline or a checker.Resolved, not {type(pipeline).__name__}")


def build_graph(pipeline, registry: Registry | None = None) -> nx.DiGraph:
    """The pipeline as a DiGraph (see the module docstring for its attributes)."""
    r = _resolve(pipeline, registry)
    g = nx.DiGraph(name=r.name, settings=dict(r.settings), pos=r.pos)
    for s in r.stages.values():
        g.add_node(s.name, kind=s.kind.name if s.kind else None, params=dict(s.params), pos=s.pos,
                   resource=s.kind.resource if s.kind else None, placement=s.placement)
    for e in r.edges:
        if g.has_edge(e.src, e.dst):
            data = g.edges[e.src, e.dst]
            if e.condition not in data["conditions"]:
                data["conditions"].append(e.condition)
            data["condition"] = data["conditions"][0] if len(data["conditions"]) == 1 else None
        else:
            g.add_edge(e.src, e.dst, condition=e.condition, conditions=[e.condition], pos=e.pos)
    return g


def _err(msg, pos, expected=None, hint=None, notes=()):
    return Diagnostic(ERROR, msg, pos, expected=expected, hint=hint, notes=tuple(notes))


def validate(r: Resolved, registry: Registry | None = None) -> list[Diagnostic]:
    """Graph checks: ports, request source, cycles, reachability, paths to a respond stage."""
    registry = registry or default_registry()
    g = build_graph(r)
    diags = _check_ports(r, registry)
    unknown = {n for n, s in r.stages.items() if s.kind is None}
    sources = [n for n, s in r.stages.items() if s.kind is not None and s.kind.is_source]
    maybe_sources = sources + [n for n in unknown if g.in_degree(n) == 0]
    sinks = [n for n, s in r.stages.items() if s.kind is not None and s.kind.is_sink and s.kind.inputs]
    if not sources and not maybe_sources:
        src_kinds = [k.name for k in registry.kinds() if k.is_source]
        diags.append(_err(f"pipeline '{r.name}' has no request source", r.pos,
                          expected="a stage of kind " + " or ".join(src_kinds) + ", e.g. stage request : requests {}",
                          hint="add a request source and an edge from it to the first stage"))
    diags += _check_cycles(g)
    if not r.complete:                 # an edge was dropped: reachability errors would only echo it
        return diags
    if maybe_sources:
        reach = set()
        for s in maybe_sources:
            reach |= {s} | nx.descendants(g, s)
        for n, s in r.stages.items():
            if n not in reach and not (s.kind is not None and s.kind.is_source):
                src = " or ".join(f"'{x}'" for x in sources) or "a request source"
                diags.append(_err(f"stage '{n}' is unreachable: no path from {src} leads to it", s.pos,
                                  hint=f"add an edge into '{n}', or remove the stage"))
    targets = set(sinks) | unknown
    if not sinks and not unknown and r.stages:
        diags.append(_err(f"pipeline '{r.name}' has no respond stage", r.pos,
                          expected="a stage of kind respond, e.g. stage out : respond {}",
                          hint="add a respond stage and an edge into it"))
    elif targets:
        rev = g.reverse(copy=False)
        can_finish = set()
        for t in targets:
            can_finish |= {t} | nx.descendants(rev, t)
        for n, s in r.stages.items():
            if n not in can_finish and s.kind is not None:
                diags.append(_err(f"stage '{n}' has no path to a respond stage", s.pos,
                                  hint=f"add an edge from '{n}' towards a respond stage, or remove it"))
    return diags


def _check_cycles(g: nx.DiGraph) -> list[Diagnostic]:
    diags = []
    for comp in nx.strongly_connected_components(g):
        if len(comp) == 1 and not any(g.has_edge(n, n) for n in comp):
            continue
        sub = g.subgraph(comp)
        start = min(comp, key=lambda n: (g.nodes[n]["pos"].line, g.nodes[n]["pos"].col))
        cyc = nx.find_cycle(sub, source=start)
        path = [cyc[0][0]] + [v for _, v in cyc]
        closing = cyc[-1]
        diags.append(_err("cycle: " + " -> ".join(path), g.edges[closing]["pos"],
                          expected="a pipeline without cycles: requests flow one way, from the source to respond",
                          hint=f"remove the edge {closing[0]} -> {closing[1]}",
                          notes=[(f"edge {u} -> {v}", g.edges[u, v]["pos"]) for u, v in cyc[:-1]]))
    return diags


def _check_ports(r: Resolved, registry: Registry) -> list[Diagnostic]:
    diags = []
    for e in r.edges:
        a, b = r.stages[e.src], r.stages[e.dst]
        if a.kind is None or b.kind is None:
            continue
        if not a.kind.outputs:
            diags.append(_err(f"stage '{a.name}' ({a.kind.name}) has no output: no edge can leave it", e.pos,
                              hint=f"{a.kind.name} ends a pipeline; remove the edge {a.name} -> {b.name}"))
            continue
        if not b.kind.inputs:
            diags.append(_err(f"stage '{b.name}' ({b.kind.name}) takes no input: no edge can enter it", e.pos,
                              hint=f"{b.kind.name} starts a pipeline; remove the edge {a.name} -> {b.name}"))
            continue
        gives = a.kind.outputs[0].type
        takes = [p.type for p in b.kind.inputs]
        if gives not in takes:
            between = [k.name for k in registry.kinds()
                       if k.inputs and k.outputs and k.inputs[0].type == gives and k.outputs[0].type in takes]
            hint = f"insert a {between[0]} stage between them" if between else None
            diags.append(_err(f"port type mismatch on edge {a.name} -> {b.name}: '{a.name}' ({a.kind.name}) "
                              f"gives {gives}, '{b.name}' ({b.kind.name}) takes {' | '.join(takes)}", e.pos,
                              expected=f"an edge into a stage that takes {gives}", hint=hint))
    return diags


def check_program(program, registry: Registry | None = None) -> list[Diagnostic]:
    """Every check of every pipeline of a loaded program (see loader.Program)."""
    diags: list[Diagnostic] = []
    for p in program.pipelines:
        resolved, ds = check_pipeline(p, registry)
        diags += ds
        diags += validate(resolved, registry)
    return sort_diagnostics(diags)


def edge_pos(g: nx.DiGraph, u: str, v: str) -> SourcePos:
    return g.edges[u, v]["pos"]
