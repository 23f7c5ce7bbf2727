"""Reachability checks of a pipeline graph, each reporting a missing edge once.

A stage nothing leads to is reported at the entry of its part (the first stage no other
unreachable stage feeds), a stage with no way to `respond` at the dead end it leads to (the
last stage of a chain, or a loop with no edge out), naming the stages each strands; stages
tied to neither the request source nor a respond stage are one error per part; a comparison on
`turn` on an edge that no loop comes before is a warning (turn is always 0 there). graph.validate
calls these with the graph it built; `r` is a checker.Resolved.
"""

from __future__ import annotations

import networkx as nx

from .conditions import compares, compile_condition, evaluate, field_path, text
from .diagnostics import ERROR, WARNING, Diagnostic

STRANDED_LISTED = 8        # a note names this many stranded stages, then counts the rest
DEAD_ENDS_EXPLAINED = 64   # dead ends (entries) whose stranded stages are looked for: a walk each


def _err(msg, pos, hint=None, notes=()):
    return Diagnostic(ERROR, msg, pos, hint=hint, notes=tuple(notes))


def _listed(names: list[str]) -> str:
    """'a', 'b', … and N more: the first STRANDED_LISTED names, then a count."""
    shown = ", ".join(f"'{n}'" for n in names[:STRANDED_LISTED])
    more = len(names) - STRANDED_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _parts(sub: nx.DiGraph, order: dict, no_edge: str) -> list[list[str]]:
    """The strongly connected parts of `sub` that no edge enters (no_edge="in") or leaves
    ("out"): each its stages in file order, the parts in the order of their first stage."""
    cond = nx.condensation(sub)
    degree = cond.in_degree if no_edge == "in" else cond.out_degree
    return sorted((sorted(cond.nodes[c]["members"], key=order.get) for c in cond if degree(c) == 0),
                  key=lambda m: order[m[0]])


def reachable(step, starts) -> set:
    """`starts` and every node reached from them by `step` (successors or predecessors): one
    walk for all of them, not one per start."""
    seen = set(starts)
    todo = list(seen)
    while todo:
        for v in step(todo.pop()):
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return seen


def check_unreachable(r, g: nx.DiGraph, lost: list[str], sources: list[str]) -> list[Diagnostic]:
    """Stages no path from the request source leads to, reported once per missing way in: at
    each entry (a stage, or a loop, that no unreachable stage feeds), with a note naming the
    stages after it that are unreachable only for want of that edge."""
    if not lost:
        return []
    src = " or ".join(f"'{x}'" for x in sources) or "a request source"
    order = {n: i for i, n in enumerate(r.stages)}
    sub = g.subgraph(lost)
    # every predecessor of an unreachable stage is unreachable: the entries are the components
    # of `sub` that no edge enters
    entries = _parts(sub, order, "in")
    diags = []
    for i, members in enumerate(entries):
        where = members[0]
        notes = []
        if i < DEAD_ENDS_EXPLAINED:
            after = sorted(reachable(sub.successors, members) - {where}, key=order.get)
            if after:
                many = f"the {len(after)} stages after it are" if len(after) > 1 else "the stage after it is"
                notes.append((f"{many} unreachable too: {_listed(after)}", None))
        diags.append(_err(f"stage '{where}' is unreachable: no path from {src} leads to it", r.stages[where].pos,
                          hint=f"add an edge into '{where}', or remove the stage", notes=notes))
    return diags


def check_islands(r, g: nx.DiGraph, unknown: set) -> tuple[set, list[Diagnostic]]:
    """Stages that no edge ties to the rest of the pipeline (a part with neither a request
    source nor a respond stage in it): one error per part, at its first stage, instead of one
    "unreachable" and one "no path to a respond stage" per stage of it."""
    islands, diags = set(), []
    order = {n: i for i, n in enumerate(r.stages)}
    for part in nx.weakly_connected_components(g):
        kinds = [r.stages[n].kind for n in part]
        if part & unknown or any(k.is_source or k.is_sink for k in kinds):
            continue
        names = sorted(part, key=order.get)
        first = r.stages[names[0]]
        islands |= part
        if len(names) == 1:
            msg = f"stage '{names[0]}' is not connected: no edge enters or leaves it"
            hint = f"add an edge into '{names[0]}' and one out of it, or remove the stage"
        else:
            msg = f"stages {_listed(names)} are connected only to each other: no edge ties them to the pipeline"
            hint = "add an edge from the request side into them and one from them towards a respond stage, " \
                   "or remove them"
        diags.append(_err(msg, first.pos, hint=hint))
    return islands, diags


def check_dead_ends(r, g: nx.DiGraph, can_finish: set, sinks: list[str], bounded: set,
                    sends: dict) -> list[Diagnostic]:
    """Stages with no path to a respond stage, reported once per missing way out: at each dead
    end (a stage with no out-edge, or a loop with none out of it), with a note naming the
    stages upstream that lead only there. One missing edge `gen -> out` is one error at 'gen',
    not one per stage of the chain before it. A loop whose bounding stage has no way out is
    already reported at that stage (_check_cycles)."""
    stuck = [n for n, s in r.stages.items() if n not in can_finish and s.kind is not None]
    if not stuck:
        return []
    order = {n: i for i, n in enumerate(r.stages)}
    sub = g.subgraph(stuck)
    # every successor of a stuck stage is stuck, so the dead ends are the components of `sub`
    # that no edge leaves: a stage without out-edges, or a loop with no edge out of it
    ends = _parts(sub, order, "out")
    respond = sinks[0] if sinks else None
    diags = []
    for i, members in enumerate(ends):
        if len(members) > 1 or sub.has_edge(members[0], members[0]):
            if bounded & set(members):
                continue               # "bounds a loop but has no edge out of it" says so
            where, what = members[0], "the loop " + " -> ".join(_loop_path(sub, members)) + " has"
        else:
            where, what = members[0], f"stage '{members[0]}' has"
        s = r.stages[where]
        notes = []
        if i < DEAD_ENDS_EXPLAINED:
            upstream = sorted(reachable(sub.predecessors, members) - set(members), key=order.get)
            if upstream:
                many = f"the {len(upstream)} stages before it reach" if len(upstream) > 1 else "the stage before it reaches"
                notes.append((f"{many} no respond stage either: {_listed(upstream)}", None))
        edge = None
        if respond is not None and sends.get(where) and sends[where] <= r.stages[respond].kind.accepts:
            edge = f"{where} -> {respond}"
        if edge:
            hint = f"add an edge `{edge}` (or towards another respond stage), or remove '{where}'"
        elif len(members) > 1:
            hint = "add an edge from one of the loop's stages towards a respond stage"
        else:
            hint = f"add an edge from '{where}' towards a respond stage, or remove it"
        diags.append(_err(f"{what} no path to a respond stage", s.pos, hint=hint, notes=notes))
    return diags


def _loop_path(sub: nx.DiGraph, members: list[str]) -> list[str]:
    """A cycle through the first of `members`, printed a -> b -> a."""
    cyc = nx.find_cycle(sub.subgraph(members), source=members[0])
    return [cyc[0][0]] + [v for _, v in cyc]


def check_turn(r, g: nx.DiGraph, bounded: set[str]) -> list[Diagnostic]:
    """A comparison on `turn` where no loop comes before the edge: turn counts an item's calls of
    stages with max_turns (flow/loops.py), so on an edge that no such stage reaches it is always
    0 and the comparison is settled before any item arrives."""
    looped = reachable(g.successors, bounded)      # the bounding stages themselves too
    diags = []
    for e in r.edges:
        if e.cond is None or e.src in looped:
            continue
        for cmp in compares(e.cond):
            if field_path(cmp) != "turn":
                continue
            ir = compile_condition(cmp)
            holds = evaluate(ir, lambda path: 0)
            msg = (f"no loop comes before {e.src} -> {e.dst}, so `turn` is always 0 there and "
                   f"`{text(ir)}` {'always' if holds else 'never'} holds")
            diags.append(Diagnostic(WARNING, msg, cmp.pos,
                                    expected="a condition on turn on an edge inside or after a loop "
                                             "(a cycle through a python stage with max_turns)",
                                    hint="drop the comparison on turn" + ("" if holds else
                                         ", or move the edge into the loop it was meant for")))
    return diags
