"""Checked AST -> networkx.DiGraph, and the checks that need the graph.

`build_graph(pipeline)` takes an `ast.Pipeline` (or a `checker.Resolved`) and returns
a DiGraph with graph attributes `name`, `base` (the pipeline a derived one copies, else
None), `settings` (model, mode, device, threads,
dtype, kv_budget), `given_settings` (those the file sets) and `setting_pos` (where
it sets them), one node per stage with
`kind` (str), `params` (effective values: kind default -> mode preset -> inherited
pipeline setting -> file; durations in float seconds, sizes in int bytes), `given`
(parameters the file sets), `pos`, `resource` (host|copy|compute, from the kind),
`placement` (from `on …` or None) and `routes` (its out-edges in file order, as
(destination, condition) pairs: what the runtime routes by), and one edge per
connected pair with `condition` (compiled, see pipeline_dsl.conditions: None,
("label", "full"), ("cmp", "prompt_tokens", ">", 512), ...), `conditions` (all
conditions of the parallel edges merged into this one; `condition` is None when
there are several) and `pos`.

`validate(resolved)` reports loops that no stage bounds (the cycle printed), item
types that do not fit an edge, a second request source, conditions that do not
type-check or can leave an item nowhere to go (and, as warnings, a comparison on `turn` that
no loop comes before and a stage that copies items round a loop), broken engine segments, stages
unreachable from the source (once per entry) and stages with no path to a respond stage (once
per dead end, naming the stages it strands), and parts tied to neither (once per part).
`check_program(program)` runs every check of every pipeline in a loaded program.
`segments_of(graph)` lists the engine segments (batch -> encode -> kv -> generate...).
`headers_read(graph)` lists the HTTP headers its conditions compare (agp serve copies them).
"""

from __future__ import annotations

import os
from collections import Counter, deque
from dataclasses import dataclass, replace

import networkx as nx

from stages.registry import Registry, default_registry

from . import ast
from .checker import (EMBEDDED_MODEL, Resolved, check_pipeline, python_stage_labels, python_stage_passes_item_on,
                      python_stage_returned_kinds)
from .diagnostics import ERROR, WARNING, Diagnostic, sort_diagnostics
from .reachability import check_dead_ends, check_islands, check_turn, check_unreachable, reachable


def _resolve(pipeline, registry: Registry | None = None, allowed: tuple[str, ...] | None = None) -> Resolved:
    if isinstance(pipeline, Resolved):
        return pipeline
    if isinstance(pipeline, ast.Pipeline):
        return check_pipeline(pipeline, registry, allowed)[0]
    raise TypeError(f"build_graph takes an ast.Pipeline or a checker.Resolved, not {type(pipeline).__name__}")


def build_graph(pipeline, registry: Registry | None = None, allowed: tuple[str, ...] | None = None) -> nx.DiGraph:
    """The pipeline as a DiGraph (see the module docstring for its attributes). `allowed`: the
    folders its files may name (loader.Program.allowed, as check_program checks it with; default:
    the pipeline file's folder), where its file-valued parameters (a generate stage's lora and
    json_schema) are found and made absolute: a derived pipeline's, copied from a base in another
    folder, are found beside the base's file as `agp check` found them."""
    r = _resolve(pipeline, registry, allowed)
    g = nx.DiGraph(name=r.name, base=r.base, settings=dict(r.settings), pos=r.pos,
                   given_settings=sorted(r.given_settings), setting_pos=dict(r.setting_pos))
    for s in r.stages.values():
        g.add_node(s.name, kind=s.kind.name if s.kind else None, params=dict(s.params), pos=s.pos,
                   resource=s.kind.resource if s.kind else None, placement=s.placement,
                   given=sorted(s.given), param_pos=dict(s.param_pos), routes=[])
    for e in r.edges:
        g.nodes[e.src]["routes"].append((e.dst, e.condition))
        if g.has_edge(e.src, e.dst):
            data = g.edges[e.src, e.dst]
            if e.condition not in data["conditions"]:
                data["conditions"].append(e.condition)
            data["condition"] = data["conditions"][0] if len(data["conditions"]) == 1 else None
        else:
            g.add_edge(e.src, e.dst, condition=e.condition, conditions=[e.condition], pos=e.pos)
    _share_kv_budget(g)
    return g


def headers_read(g: nx.DiGraph) -> list[str]:
    """The HTTP header names (lower-case) the conditions of the graph's edges compare
    (`when headers["x-tenant"] == "gold"`), once each, in file order of the edges."""
    from .conditions import headers_read as of_condition

    return list(dict.fromkeys(h for n in g for _, cond in g.nodes[n].get("routes", ())
                              for h in of_condition(cond)))


def _share_kv_budget(g: nx.DiGraph) -> None:
    """kv_lookup stages without their own budget share the pipeline's: its `kv_budget` (else
    the mode's budget of one engine) less the budgets set explicitly, split evenly."""
    kvs = [n for n, d in g.nodes(data=True) if d.get("kind") == "kv_lookup" and "budget" in d["params"]]
    implicit = [n for n in kvs if "budget" not in g.nodes[n]["given"]]
    given = set(g.graph.get("given_settings", ()))
    if not implicit or (len(kvs) == 1 and "kv_budget" not in given):
        return
    total = g.graph["settings"].get("kv_budget") if "kv_budget" in given else None
    total = int(total if total else g.nodes[implicit[0]]["params"]["budget"])
    explicit = sum(int(g.nodes[n]["params"]["budget"]) for n in kvs if n not in implicit)
    share = max(1 << 16, (total - explicit) // len(implicit))
    for n in implicit:
        g.nodes[n]["params"]["budget"] = share


def _err(msg, pos, expected=None, hint=None, notes=()):
    return Diagnostic(ERROR, msg, pos, expected=expected, hint=hint, notes=tuple(notes))


def _warn(msg, pos, expected=None, hint=None, notes=()):
    return Diagnostic(WARNING, msg, pos, expected=expected, hint=hint, notes=tuple(notes))


ITEM_TYPES = frozenset({"Request", "Generated"})


def outputs(kind, params: dict, received: frozenset) -> frozenset:
    """The item types a stage of `kind` sends on, given the types it receives."""
    if kind is None:
        return frozenset()
    if kind.passthrough:
        return received & kind.accepts
    if kind.name == "python":
        returns = params.get("returns") or "same"
        out = {"same": received, "request": frozenset({"Request"}), "generated": frozenset({"Generated"}),
               "any": ITEM_TYPES, "many": frozenset({"Request"})}[returns] & ITEM_TYPES
        if params.get("max_turns") is not None:   # past its bound an item leaves the loop as it came
            out |= received & ITEM_TYPES
        return out
    return kind.emits


def flow_types(graph: nx.DiGraph, registry: Registry | None = None) -> tuple[dict, dict]:
    """(carry, receives): which item types each stage can carry on to an end (its kind takes
    them, and what it then sends has an out-edge that carries it: a greatest fixed point over
    loops), and which types actually reach it from the request source (the least fixed point,
    each edge carrying only what its destination can carry). The runtime routes by `carry`."""
    registry = registry or default_registry()
    kinds = {n: registry.get(graph.nodes[n].get("kind")) if graph.nodes[n].get("kind") else None
             for n in graph}
    params = {n: graph.nodes[n].get("params") or {} for n in graph}
    carry = {n: set(k.accepts) if k is not None else set() for n, k in kinds.items()}
    # worklists, not sweeps over every stage until nothing changes: a stage is looked at again
    # only when what it depends on changed, and a type set changes at most a few times (linear)
    onward = {n: Counter() for n in graph}   # type -> how many successors carry it
    for n in graph:
        for v in graph.successors(n):
            onward[n].update(carry[v])
    todo, queued = deque(graph), set(graph)
    while todo:
        n = todo.popleft()
        queued.discard(n)
        k = kinds[n]
        if k is None or k.is_sink or not carry[n]:
            continue
        there = {t for t, c in onward[n].items() if c}
        if k.name in ("dynamic_batch", "encode", "kv_lookup", "generate"):
            ok = {t for t in carry[n] if outputs(k, params[n], frozenset({t})) <= there}
        else:
            ok = {t for t in carry[n] if outputs(k, params[n], frozenset({t})) & ITEM_TYPES <= there}
        if ok != carry[n]:
            lost, carry[n] = carry[n] - ok, ok
            for u in graph.predecessors(n):
                onward[u].subtract(lost)
                if u not in queued:
                    todo.append(u)
                    queued.add(u)
    receives = {n: set() for n in graph}
    todo, queued = deque(graph), set(graph)
    while todo:
        n = todo.popleft()
        queued.discard(n)
        k = kinds[n]
        if k is None:
            continue
        sent = outputs(k, params[n], frozenset(receives[n])) if not k.is_source else k.emits
        for v in graph.successors(n):
            got = set(sent) & carry[v]
            if not got <= receives[v]:
                receives[v] |= got
                if v not in queued:
                    todo.append(v)
                    queued.add(v)
    return ({n: frozenset(c) for n, c in carry.items()}, {n: frozenset(r) for n, r in receives.items()})


def item_types(r: Resolved, g: nx.DiGraph, registry: Registry | None = None) -> dict[str, frozenset]:
    """The item types each stage may send on (given what reaches it)."""
    return _sent(r, flow_types(g, registry)[1])


def _sent(r: Resolved, receives: dict) -> dict[str, frozenset]:
    """item_types() from flow_types()' `receives`."""
    return {n: outputs(s.kind, s.params, receives[n]) if s.kind is not None and not s.kind.is_source
            else (s.kind.emits if s.kind is not None else frozenset()) for n, s in r.stages.items()}


def bounded_stages(r: Resolved) -> set[str]:
    """Stages that bound a loop through them (a python stage with max_turns)."""
    return {n for n, s in r.stages.items() if s.kind is not None and s.params.get("max_turns") is not None}


def validate(r: Resolved, registry: Registry | None = None) -> list[Diagnostic]:
    """Graph checks: ports and item types, one request source, loops (only through a stage
    with max_turns), conditions and where items go, engine segments, reachability, paths to a
    respond stage."""
    registry = registry or default_registry()
    g = build_graph(r)
    carry, receives = flow_types(g, registry)        # once: the checks below share it
    emits = _sent(r, receives)
    diags = _check_ports(r, registry, g, carry, receives)
    unknown = {n for n, s in r.stages.items() if s.kind is None}
    sources = [n for n, s in r.stages.items() if s.kind is not None and s.kind.is_source]
    maybe_sources = sources + [n for n in unknown if g.in_degree(n) == 0]
    sinks = [n for n, s in r.stages.items() if s.kind is not None and s.kind.is_sink and s.kind.inputs]
    if not sources and not maybe_sources:
        src_kinds = [k.name for k in registry.kinds() if k.is_source]
        diags.append(_err(f"pipeline '{r.name}' has no request source", r.pos,
                          expected="a stage of kind " + " or ".join(src_kinds) + ", e.g. stage request : requests {}",
                          hint="add a request source and an edge from it to the first stage"))
    for extra in sources[1:]:
        diags.append(_err(f"pipeline '{r.name}' has a second request source '{extra}'", r.stages[extra].pos,
                          expected="one request source per pipeline",
                          hint=f"remove '{extra}' or route from '{sources[0]}' instead",
                          notes=[(f"the first is '{sources[0]}'", r.stages[sources[0]].pos)]))
    diags += _check_cycles(g, r)
    diags += _check_routes(r, g, emits, carry)
    diags += check_turn(r, g, bounded_stages(r))
    diags += _check_type_routes(r, carry, emits)
    diags += _check_streams(r, receives)
    diags += _check_twice_answered(r, emits, carry)
    diags += _check_fan_beside_condition(r, g, emits, carry)
    diags += _check_returned_kinds(r, g, receives, carry)
    diags += _check_loop_exits(r, g, carry, receives)
    diags += _check_join_fan_out(r, g, reachable(g.successors, maybe_sources))
    diags += _check_many(r, g)
    diags += _check_loop_fan_out(r, g, carry, emits)
    budget_diags = _check_kv_budget(r)
    diags += budget_diags
    if not budget_diags:
        diags += _check_kv_blocks(r, g)
    diags += _check_prompt_limit(r, g)
    diags += check_segments(r, g)[1]
    if not r.complete:                 # an edge was dropped: reachability errors would only echo it
        return diags
    islands, diags_islands = check_islands(r, g, unknown) if (sources and sinks) else (set(), [])
    diags += diags_islands
    if maybe_sources:
        reach = reachable(g.successors, maybe_sources)
        lost = [n for n, s in r.stages.items()
                if n not in reach and n not in islands and not (s.kind is not None and s.kind.is_source)]
        diags += check_unreachable(r, g, lost, sources)
    targets = set(sinks) | unknown
    if not sinks and not unknown and r.stages:
        diags.append(_err(f"pipeline '{r.name}' has no respond stage", r.pos,
                          expected="a stage of kind respond, e.g. stage out : respond {}",
                          hint="add a respond stage and an edge into it"))
    elif targets:
        sends = {n: outputs(s.kind, s.params, s.kind.accepts) & ITEM_TYPES for n, s in r.stages.items()
                 if s.kind is not None}
        diags += check_dead_ends(r, g, reachable(g.predecessors, targets) | islands, sinks,
                                 bounded_stages(r), sends)
    if not unknown and not any(d.is_error for d in diags):
        diags += _check_sources(r, g, carry, sources)
    return diags


def _check_join_fan_out(r: Resolved, g: nx.DiGraph, reached: set) -> list[Diagnostic]:
    """A warning at a join that can only ever get one item per request: walking back from it,
    no generate stage (n answers) and no stage with two ways on (a fan-out) comes before another
    join's merged result or the request source. A join no request reaches (`reached`: what the
    sources lead to) gets none: it gets no item at all, which its unreachable or not-connected
    error says."""
    diags = []
    for n, s in r.stages.items():
        if s.kind is None or s.kind.name != "join" or n not in reached:
            continue
        seen, todo, barriers = {n}, list(g.predecessors(n)), set()
        fans = False
        while todo and not fans:
            u = todo.pop()
            if u in seen:
                continue
            seen.add(u)
            k = r.stages[u].kind
            if k is None or k.name == "generate" or g.out_degree(u) > 1 or spreads(r.stages[u].params, k.name):
                fans = True            # an unknown kind may fan out: no warning
            elif k.name == "join":
                barriers.add(u)        # one merged result per request leaves it
            else:
                todo.extend(g.predecessors(u))
        if not fans:
            after = f"what reaches it has passed {', '.join(f'join {b!r}' for b in sorted(barriers))}" if barriers \
                else "no generate stage or fan-out comes before it"
            diags.append(_warn(f"join '{n}' gets one item per request, so it merges nothing: {after}", s.pos,
                               hint=f"remove '{n}', or fan out before it (several edges out of a stage, or "
                                    "a generate stage: its n answers)"))
    return diags


def spreads(params: dict, kind: str | None) -> bool:
    """Whether a stage is a python stage with `returns = many`: each call's list of requests goes on
    as that many items (a fan-out as wide as the list)."""
    return kind == "python" and params.get("returns") == "many"


def collecting_joins(graph: nx.DiGraph, stage: str) -> tuple[list[str], list[str] | None]:
    """What the items a `returns = many` stage sends reach first: (the joins, in file order, that
    some path out of `stage` reaches before any other join; a path from `stage` to a respond stage
    that passes no join, or None). The items are collected where one join is on every path and
    no path reaches a respond stage without one (check's `returns = many` rule)."""
    kind = {n: graph.nodes[n].get("kind") for n in graph}
    joins, seen, parent, todo = [], {stage}, {}, deque([stage])    # the stage itself: a python stage
    unjoined = None
    while todo:
        v = todo.popleft()
        if kind[v] == "join":
            joins.append(v)
            continue
        if kind[v] == "respond" and unjoined is None:
            path = [v]
            while path[-1] != stage:
                path.append(parent[path[-1]])
            unjoined = path[::-1]
        for w in graph.successors(v):
            if w not in seen:
                seen.add(w)
                parent[w] = v
                todo.append(w)
    order = list(graph)
    return sorted(joins, key=order.index), unjoined


def _check_many(r: Resolved, g: nx.DiGraph) -> list[Diagnostic]:
    """A `returns = many` stage's items are collected by one join: every path out of it reaches
    that join before a respond stage (else the answer would be as many choices as the list is
    long, and an empty list would answer nothing), and no path reaches another join first (an
    empty list is that one join's to answer)."""
    diags = []
    for n, s in r.stages.items():
        if s.kind is None or not spreads(s.params, s.kind.name):
            continue
        if any(r.stages[v].kind is None for v in nx.descendants(g, n)):
            continue                   # an unknown kind may be anything: its own error says so
        joins, unjoined = collecting_joins(g, n)
        returns = ("returns = many here", s.param_pos.get("returns") or s.pos)
        if unjoined is not None:
            diags.append(_err(f"stage '{n}' returns many items, but a path from it reaches respond stage "
                              f"'{unjoined[-1]}' without a join: {' -> '.join(unjoined)}", s.pos,
                              expected=f"a join on every path from '{n}' to a respond stage, which collects "
                                       "its items into one answer",
                              hint=f"add `stage collect : join {{ policy = fn  fn = \"module:function\" }}` "
                                   f"between '{unjoined[-2]}' and '{unjoined[-1]}' (its fn gets the results "
                                   "in list order)",
                              notes=[returns]))
        elif len(joins) > 1:
            diags.append(_err(f"stage '{n}' returns many items, but they reach {len(joins)} joins first "
                              f"({', '.join(repr(j) for j in joins)}); one join collects them", s.pos,
                              expected=f"one join that every path from '{n}' reaches first",
                              hint=f"route every path from '{n}' through one join",
                              notes=[returns] + [(f"join '{j}'", r.stages[j].pos) for j in joins]))
    return diags


def _loop_copies(r: Resolved, n: str, out: list, comp: set, carry: dict, emits: dict) -> list:
    """The out-edges of `n` inside its loop `comp` that one item can take together, as the router
    chooses them: every unconditional edge whose destination takes the item's type, and one
    conditional (or `otherwise`) edge; the most for any type `n` sends (one: no copies)."""
    kind = r.stages[n].kind
    best: list = []
    for t in sorted(emits.get(n, ())):
        plain, cond = {}, None
        for e in out:
            if e.dst not in comp or not (t in carry.get(e.dst, ()) or kind.name == "kv_lookup"):
                continue
            if e.condition is None:
                plain.setdefault(e.dst, e)
            elif cond is None:
                cond = e
        taken = list(plain.values()) + ([cond] if cond is not None and cond.dst not in plain else [])
        if len(taken) > len(best):
            best = taken
    return best


def _many_in_loop(r: Resolved, g: nx.DiGraph, comp: set, bounds: list) -> list[Diagnostic]:
    """A warning at a `returns = many` stage inside a bounded loop (no join can be in one): every
    item of its list that comes back round is split again, so a request's items grow as
    max_items^(turns + 1)."""
    turns = sum(r.stages[b].params["max_turns"] for b in bounds)
    turned = " and ".join(f"max_turns = {r.stages[b].params['max_turns']} on '{b}'" for b in bounds)
    diags = []
    for n in sorted(comp, key=lambda n: (r.stages[n].pos.line, r.stages[n].pos.col)):
        if r.stages[n].params.get("returns") != "many":
            continue
        k = r.stages[n].params.get("max_items", 64)
        back = next(s for s in g.successors(n) if s in comp)        # in a loop: one edge stays in it
        path = " -> ".join([n] + nx.shortest_path(g.subgraph(comp), back, n))
        diags.append(_warn(
            f"items can multiply round the loop {path}: '{n}' returns = many splits again every item "
            "that comes back round",
            r.stages[n].pos,
            hint=f"each item that enters the loop can become up to {k}^{turns + 1} items (max_items = {k}; "
                 f"{turned}); split before the loop, or let the loop's items leave it before they reach "
                 f"'{n}' again"))
    return diags


def _check_loop_fan_out(r: Resolved, g: nx.DiGraph, carry: dict, emits: dict) -> list[Diagnostic]:
    """A warning at a stage inside a loop that sends one item along several edges that stay in the
    loop (a fan-out): each copy goes round again and is copied again, so the items of a request
    grow geometrically with the turns (k^(turns + 1) where max_turns bounds the loop). Only
    loops a stage bounds: an unbounded one is a cycle error already. A generate stage's `n`
    copies multiply nothing (a Request that comes back continues its own branch)."""
    diags = []
    bounded = bounded_stages(r)
    by_src = _edges_by_source(r)
    for comp in nx.strongly_connected_components(g):
        if len(comp) == 1 and not any(g.has_edge(n, n) for n in comp):
            continue
        bounds = sorted(comp & bounded)
        free = g.subgraph(n for n in comp if n not in bounded)
        if not bounds or not nx.is_directed_acyclic_graph(free):
            continue
        diags += _many_in_loop(r, g, comp, bounds)
        fans = {n: taken for n in sorted(comp, key=lambda n: (r.stages[n].pos.line, r.stages[n].pos.col))
                if r.stages[n].kind is not None
                and len(taken := _loop_copies(r, n, by_src.get(n, []), comp, carry, emits)) > 1}
        if not fans:
            continue
        # a copy goes round through a bounding stage each time: a stage sends copies at most
        # turns + 1 times along one item's way (a bounding stage: once per call, max_turns)
        turns = sum(r.stages[b].params["max_turns"] for b in bounds)
        times = {n: r.stages[n].params["max_turns"] if n in bounded else turns + 1 for n in fans}
        powers = [(len(taken), times[n]) for n, taken in fans.items()]
        power = " x ".join(f"{k}^{e}" for k, e in powers)
        if sum(e * k.bit_length() for k, e in powers) <= 64:
            total = 1
            for k, e in powers:
                total *= k ** e
            power = f"{total:,} ({power})"
        turned = " and ".join(f"max_turns = {r.stages[b].params['max_turns']} on '{b}'" for b in bounds)
        sub = g.subgraph(comp)
        for n, taken in fans.items():
            path = " -> ".join([n] + nx.shortest_path(sub, taken[0].dst, n))
            edges = ", ".join(f"{n} -> {e.dst}" for e in taken)
            diags.append(_warn(
                f"items can multiply round the loop {path}: '{n}' sends each item along {len(taken)} edges "
                f"that stay in the loop ({edges}), and every copy goes round again",
                r.stages[n].pos,
                hint=f"each item that enters the loop can become up to {power} items ({turned}); to keep "
                     f"one, put a condition (`when …` or `otherwise`) on all but one of {edges}, or send the "
                     "other copies out of the loop",
                notes=[(f"edge {n} -> {e.dst}", e.pos) for e in taken]
                      + [(f"the loop's bound: max_turns = {r.stages[b].params['max_turns']}",
                          r.stages[b].param_pos.get("max_turns") or r.stages[b].pos) for b in bounds]))
    return diags


def _check_sources(r: Resolved, g: nx.DiGraph, carry: dict, sources: list[str]) -> list[Diagnostic]:
    """What a request source sends can reach an end (checked last: another graph error usually
    explains a source whose requests go nowhere, and says it better)."""
    diags = []
    for n in sources:
        s = r.stages[n]
        onward = set().union(*(carry[v] for v in g.successors(n)))
        for t in sorted((s.kind.emits & ITEM_TYPES) - onward):
            diags.append(_err(f"the {t} items of '{n}' can reach no respond stage: every path from '{n}' "
                              f"leads through a stage that cannot carry them", s.pos,
                              hint=f"add a path from '{n}' that takes {t} items to a respond stage "
                                   + ("through dynamic_batch -> encode -> kv_lookup -> generate stages (or a "
                                      "python stage that says returns = generated)" if t == "Request" else
                                      "(e.g. through generate)")))
    return diags


def _check_kv_budget(r: Resolved) -> list[Diagnostic]:
    """The kv_lookup budgets set explicitly fit the pipeline's kv_budget (when it sets one)."""
    if "kv_budget" not in r.given_settings or not r.settings.get("kv_budget"):
        return []
    from . import units

    total = int(r.settings["kv_budget"])
    kvs = [s for s in r.stages.values() if s.kind is not None and s.kind.name == "kv_lookup"]
    explicit = [s for s in kvs if "budget" in s.given]
    if any(s.params.get("budget") is None for s in explicit):
        return []                     # a budget that did not check has its own error already
    used = sum(int(s.params["budget"]) for s in explicit)
    left = len(kvs) - len(explicit)
    if used > total or (left and total - used < (1 << 16) * left):
        last = explicit[-1] if explicit else kvs[0]
        return [_err(f"the kv_lookup budgets ({units.format_size(used)}) leave "
                     f"{'nothing' if used >= total else units.format_size(total - used)} of kv_budget = "
                     f"{units.format_size(total)}" + (f" for {left} other KV pool{'s' if left > 1 else ''}"
                                                     if left else ""),
                     last.param_pos.get("budget") or last.pos,
                     hint="raise kv_budget or lower the budgets of the kv_lookup stages")]
    return []


# bytes of one KV element per dtype; auto and int8 keep the pool in bf16 where the device has fast
# bf16 (or runs the model's 4-bit weights natively), else in fp32
_KV_ELEMENT = {"fp32": (4, 4), "bf16": (2, 2), "fp16": (2, 2), "auto": (2, 4), "int8": (2, 4)}


def _generate_model(g: nx.DiGraph, params: dict) -> str:
    """The model a generate stage runs: its own `model`, else the pipeline's, else the embedded one."""
    return str(params.get("model") or g.graph["settings"].get("model") or EMBEDDED_MODEL)


def _engine_value(g: nx.DiGraph, params: dict, name: str):
    """What a generate stage's engine setting comes to: a stage that leaves `model` or `device`
    out runs the pipeline's (else the embedded model, `auto`), the same engine as one that
    spells that value out."""
    if name == "model":
        return _generate_model(g, params)
    if name == "device" and params.get(name) is None:
        return str(g.graph["settings"].get("device") or "auto")
    return params.get(name)




def weights_key(g: nx.DiGraph, gen: str) -> tuple:
    """What decides the weights generate stage `gen` loads: its model file (the embedded model's
    name and its file's path are one file), dtype as written, device and compile. Engines whose
    stages have equal keys share one loaded copy (engine.models.LoadedModels); `agp plan` says so."""
    from .model_files import model_file
    from .model_files import weights_key as key

    params = g.nodes[gen]["params"]
    model = _generate_model(g, params)
    path = model_file(model)                  # as the loader finds it: `~` expanded
    dtype, device, compile = params.get("dtype") or "auto", _engine_value(g, params, "device"), params.get("compile")
    if path is None:                          # the embedded model's package is not installed: its name
        return model, str(dtype), str(device), bool(compile)
    return key(path, dtype, device, compile)


def _spelled(value, quoted: bool = False) -> str:
    """A setting's value as the .agp file writes it (a string setting quoted, an enum word bare)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (quoted or not value.replace(":", "").isalnum()):
        return f'"{value}"'
    return str(value)


def _check_kv_blocks(r: Resolved, g: nx.DiGraph) -> list[Diagnostic]:
    """Each KV pool holds at least one block of its engine's model (2 x layers x block_size x
    KV heads x head size x element bytes, read from the model's header): a smaller budget is an
    error here, where run would refuse it without a position. Where the element size depends on
    the device (dtype auto or int8: bf16 or fp32), one that holds a block only at bf16 is a warning."""
    from . import units
    from .model_files import kv_shape

    diags = []
    for n, data in g.nodes(data=True):
        if data.get("kind") != "kv_lookup" or n not in r.stages:
            continue
        budget, block = data["params"].get("budget"), data["params"].get("block_size")
        if not budget or not block:
            continue
        s = r.stages[n]
        if "budget" in s.given:
            pos, whose = s.param_pos.get("budget") or s.pos, f"budget = {units.format_size(int(budget))}"
        elif "kv_budget" in r.given_settings:
            pos = r.setting_pos.get("kv_budget") or s.pos
            whose = f"its share of kv_budget ({units.format_size(int(budget))})"
        else:
            pos, whose = s.pos, f"the mode's budget ({units.format_size(int(budget))})"
        seen = set()
        for v, _ in data["routes"]:
            gen = g.nodes[v]
            if gen.get("kind") != "generate":
                continue
            model, dtype = _generate_model(g, gen["params"]), gen["params"].get("dtype") or "auto"
            if (model, dtype) in seen:
                continue
            seen.add((model, dtype))
            shape = kv_shape(model)
            if shape is None:
                continue
            layers, heads, head_dim = shape
            least, most = (2 * layers * int(block) * heads * head_dim * e for e in _KV_ELEMENT.get(dtype, (4, 4)))
            cost = (f"one block of {block} tokens of {os.path.basename(str(model))} ({layers} layers x {heads} "
                    f"KV heads x head size {head_dim}, K and V)")
            if budget < least:
                diags.append(_err(f"KV pool of '{n}': {whose} is less than {cost}: "
                                  f"{units.format_size(least)}" + (" at bf16" if least != most else ""), pos,
                                  expected=f"a budget of at least {units.format_size(least)}" +
                                  (f" ({units.format_size(most)} where dtype = {dtype} keeps the pool in fp32)"
                                   if least != most else ""),
                                  hint="raise the budget, or lower block_size"))
            elif budget < most:
                diags.append(_warn(f"KV pool of '{n}': {whose} holds {cost} only where dtype = {dtype} keeps "
                                   f"the pool in bf16; in fp32 a block takes {units.format_size(most)}", pos,
                                   expected=f"a budget of at least {units.format_size(most)}",
                                   hint="raise the budget, or set dtype = bf16"))
    return diags


def _check_prompt_limit(r: Resolved, g: nx.DiGraph) -> list[Diagnostic]:
    """A request source's max_prompt_tokens past a generating model's context (read from its
    header) is a warning: every engine takes the limit, and the context caps it there. So is one
    in a pipeline without a generate stage, where no engine takes it."""
    from .model_files import context_length

    diags = []
    models = sorted({_generate_model(g, g.nodes[n]["params"]) for n in g if g.nodes[n].get("kind") == "generate"})
    for n, s in r.stages.items():
        limit = s.params.get("max_prompt_tokens")
        if s.kind is None or s.kind.name != "requests" or "max_prompt_tokens" not in s.given or not limit:
            continue
        if not models:                  # no engine takes the limit: nothing counts a prompt's tokens
            diags.append(_warn(f"max_prompt_tokens = {limit} bounds nothing: the pipeline has no generate stage, "
                               "so no model reads its prompts", s.param_pos.get("max_prompt_tokens") or s.pos,
                               hint="remove max_prompt_tokens, or refuse a long prompt in a python stage "
                                    "(raise pipeline_dsl.Reject)"))
        for model in models:
            ctx = context_length(model)
            if ctx is not None and limit > ctx:
                diags.append(_warn(f"max_prompt_tokens = {limit} is more than the context of "
                                   f"{os.path.basename(model)} ({ctx} tokens): the context caps it",
                                   s.param_pos.get("max_prompt_tokens") or s.pos,
                                   expected=f"max_prompt_tokens of at most {ctx}",
                                   hint=f"lower max_prompt_tokens to {ctx} or less, or leave it 0 "
                                        "(the model's context)"))
    return diags


def _check_cycles(g: nx.DiGraph, r: Resolved) -> list[Diagnostic]:
    """A loop must pass through a stage that bounds it (max_turns), which needs a way out of
    the loop; no join inside a loop. max_turns on a stage in no loop bounds nothing (a warning)."""
    diags = []
    bounded = bounded_stages(r)
    in_loop = {n for comp in nx.strongly_connected_components(g) for n in comp
               if len(comp) > 1 or g.has_edge(n, n)}
    for n in sorted(bounded - in_loop):
        s = r.stages[n]
        if s.params.get("stream"):
            continue                   # the stream check already refuses max_turns there
        diags.append(_warn(f"'max_turns' only applies to a stage in a loop; stage '{n}' is in none",
                           s.param_pos.get("max_turns") or s.pos,
                           expected="an edge back from a later stage to one before it, through "
                                    f"'{n}' (it would run at most max_turns times per request)",
                           hint="remove max_turns, or add the edge that closes the loop"))
    free = g.subgraph([n for n in g if n not in bounded]) if bounded else g
    # hops from the request source: the cycle is walked from its stage nearest the source, so the
    # edge that closes it is the one going back (`out -> gen`), not a forward edge of the chain
    sources = [n for n in g if g.nodes[n].get("kind") == "requests"]
    hops: dict = {}
    for src in sources:
        for n, d in nx.single_source_shortest_path_length(g, src).items():
            hops[n] = min(d, hops.get(n, d))
    for comp in nx.strongly_connected_components(free):
        if len(comp) == 1 and not any(free.has_edge(n, n) for n in comp):
            continue
        sub = free.subgraph(comp)
        start = min(comp, key=lambda n: (hops.get(n, len(g)), g.nodes[n]["pos"].line, g.nodes[n]["pos"].col))
        cyc = nx.find_cycle(sub, source=start)
        path = [cyc[0][0]] + [v for _, v in cyc]
        closing = cyc[-1]
        # a python stage already on the loop only lacks its bound: say so, by name
        pys = [n for n in path[:-1] if r.stages[n].kind is not None and r.stages[n].kind.name == "python"
               and not r.stages[n].params.get("stream")]
        bound = (f"give '{pys[0]}' (python) max_turns = N to bound the loop" if pys
                 else "bound the loop (a python stage with max_turns = N on it)")
        diags.append(_err("cycle: " + " -> ".join(path), g.edges[closing]["pos"],
                          expected="requests flow one way, from the source to respond; a loop must pass "
                                   "through a python stage that bounds it with max_turns",
                          hint=f"remove the edge {closing[0]} -> {closing[1]}, or {bound}",
                          notes=[(f"edge {u} -> {v}", g.edges[u, v]["pos"]) for u, v in cyc[:-1]]))
    for comp in nx.strongly_connected_components(g):
        if len(comp) == 1 and not any(g.has_edge(n, n) for n in comp):
            continue
        for n in sorted(comp & bounded):
            if all(v in comp for v in g.successors(n)):
                diags.append(_err(f"stage '{n}' bounds a loop (max_turns = {r.stages[n].params['max_turns']}) "
                                  "but has no edge out of it", r.stages[n].pos,
                                  expected="an edge from the bounding stage to a stage outside the loop",
                                  hint=f"add an edge from '{n}' towards a respond stage: items take it "
                                       "once the loop has run max_turns times"))
        for n in sorted(comp):
            s = r.stages[n]
            if s.kind is not None and s.kind.name == "join":
                diags.append(_err(f"join '{n}' is inside a loop", s.pos,
                                  hint="join the branches before or after the loop"))
    return diags


def _route_hint(r: Resolved, src: str, dst: str, between: list[str]) -> str | None:
    """How to bridge the edge src -> dst with the stage kinds `between`: through the stages of
    those kinds the pipeline already has (one of a kind: named), else by inserting new ones."""
    if not between:
        return None
    have = {k: sorted(n for n, s in r.stages.items() if s.kind is not None and s.kind.name == k
                      and n not in (src, dst)) for k in between}
    if all(len(have[k]) == 1 for k in between):
        via = " -> ".join(have[k][0] for k in between)
        what = (f"'{via}' ({between[0]}), which the pipeline already has" if len(between) == 1
                else "the stages the pipeline already has")
        return f"route the edge through {what}: {src} -> {via} -> {dst}"
    if len(between) == 1 and have[between[0]]:
        return (f"route the edge through one of the {between[0]} stages the pipeline already has: "
                + ", ".join(repr(n) for n in have[between[0]]))
    new = f"a {between[0]} stage" if len(between) == 1 else f"{' -> '.join(between)} stages"
    named = [f"{k} {', '.join(repr(n) for n in have[k])}" for k in between if have[k]]
    return f"insert {new} between them" + (f" (the pipeline already has {'; '.join(named)})" if named else "")


def _check_ports(r: Resolved, registry: Registry, g: nx.DiGraph, carry: dict, receives: dict) -> list[Diagnostic]:
    """Each edge can carry something, and carries on some of what its source sends; whatever a
    stage sends has an out-edge that carries it (`carry`, `receives`: flow_types' result)."""
    diags = []
    mismatched = set()                 # stages with a reported bad edge: their dead ends are that
    reported = set()                   # the edges of a port type mismatch
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
        gives = a.kind.emits
        if a.kind.passthrough or a.kind.name == "python":   # what really reaches it, else what it could take
            gives = outputs(a.kind, a.params, receives[a.name] or a.kind.accepts)
        takes = b.kind.accepts
        if not gives & takes:
            shown = " | ".join(sorted(gives))
            between = _kinds_between(registry, gives, takes)
            hint = _route_hint(r, a.name, b.name, between)
            if between and between[-1] == "generate" and "Request" in gives and not any(
                    s.kind is not None and s.kind.name == "generate" for s in r.stages.values()):
                hint += " (or answer each request with a python stage that says returns = generated)"
            if a.kind.name == "python" and "returns" not in a.given and takes & ITEM_TYPES:
                # another out-edge that takes what it gives (a guard's `g -> batch` beside `g -> out`):
                # returns = request | generated would refuse that edge, so the stage gives both
                kept = sorted(v for v in g.successors(a.name) if v != b.name and r.stages[v].kind is not None
                              and gives & r.stages[v].kind.accepts)
                if kept:
                    hint = f"if '{a.name}' turns some of its items into {' or '.join(sorted(takes & ITEM_TYPES))} " \
                           f"and passes the rest on to '{kept[0]}', say so: returns = any"
                else:
                    hint = f"if '{a.name}' turns its items into {' or '.join(sorted(takes & ITEM_TYPES))}, say so: " \
                           f"returns = {'request' if 'Request' in takes else 'generated'} (or any)"
            diags.append(_err(f"port type mismatch on edge {a.name} -> {b.name}: '{a.name}' ({a.kind.name}) "
                              f"gives {shown}, '{b.name}' ({b.kind.name}) takes {' | '.join(sorted(takes))}",
                              e.pos, expected=f"an edge into a stage that takes {shown}", hint=hint))
            mismatched.add(a.name)
            reported.add(e)
    for e in r.edges:                  # b takes what a sends, but carries none of it on (b -> batcher only)
        a, b = r.stages[e.src], r.stages[e.dst]
        if a.kind is None or b.kind is None or a.kind.is_source or not receives[a.name] or e in reported \
                or b.name in mismatched or not a.kind.outputs or not b.kind.inputs:
            continue                   # a source's own check, or the edge that brings nothing to a, says it
        sent = outputs(a.kind, a.params, receives[a.name]) & ITEM_TYPES
        onward = carry[b.name] & ITEM_TYPES
        if sent and onward and not sent & onward:
            shown, kept = " | ".join(sorted(sent)), " | ".join(sorted(onward))
            hint = f"remove the edge, or give '{b.name}' an edge towards a respond stage that takes {shown}"
            if a.kind.name == "python" and "returns" not in a.given:
                hint = f"if '{a.name}' turns its items into {kept}, say so: " \
                       f"returns = {'request' if 'Request' in onward else 'generated'} (or any); else {hint}"
            diags.append(_err(f"edge {a.name} -> {b.name} never carries an item: '{a.name}' ({a.kind.name}) gives "
                              f"{shown}, and '{b.name}' ({b.kind.name}) leads only {kept} items on to a respond "
                              "stage", e.pos, expected=f"an edge into a stage that carries {shown} on", hint=hint))
            mismatched.add(a.name)
    with_edges = {e.src for e in r.edges if r.stages[e.src].kind is not None}  # only stages with edges out
    # the stages before a mismatched edge: their items stop there, which is said already, not at them
    # (one walk back from all the mismatched stages: a walk forward from each stage was quadratic)
    before_mismatch, todo = set(), [m for m in mismatched if m in g]
    while todo:
        for p in g.predecessors(todo.pop()):
            if p not in before_mismatch:
                before_mismatch.add(p)
                todo.append(p)
    for n, s in r.stages.items():
        if s.kind is None or s.kind.is_sink or s.kind.is_source or n not in with_edges or n in mismatched:
            continue
        if n in before_mismatch:
            continue                   # its items stop at an edge further on that is said already, not here
        sent = outputs(s.kind, s.params, receives[n]) & ITEM_TYPES
        onward = set().union(*(carry[v] for v in g.successors(n)))
        for t in sorted(sent - onward):
            hint = None
            if s.kind.name == "python" and s.params.get("returns") == "any":
                other = "generated" if t == "Request" else "request"
                hint = f"if '{n}' never returns a {t}, say returns = {other}"
            elif (turner := _turner_after(r, g, carry, n, t)) is not None:
                other = "Generated" if t == "Request" else "Request"
                hint = f"if '{turner}' turns its items into {other}, say so: returns = {other.lower()} (or any)"
            diags.append(_err(f"stage '{n}' ({s.kind.name}) may send {t} items, but none of its out-edges "
                              f"leads to a stage that takes them", s.pos,
                              hint=hint or f"add an edge from '{n}' towards a stage that takes {t} items"))
    return diags


def _turner_after(r: Resolved, g: nx.DiGraph, carry: dict, n: str, t: str) -> str | None:
    """The first python stage without `returns` that `n`'s `t` items reach (through stages that take
    them) and after which only the other item type goes on: `gen -> again -> batch2`, where
    `again` makes a Request of a result but does not say so. None when there is none."""
    other = ("Generated" if t == "Request" else "Request")
    seen, queue = {n}, deque(g.successors(n))
    while queue:
        v = queue.popleft()
        if v in seen:
            continue
        seen.add(v)
        kind = r.stages[v].kind
        if kind is None or t not in kind.accepts:
            continue
        if kind.name == "python" and "returns" not in r.stages[v].given:
            onward = set().union(*(carry[w] for w in g.successors(v)))
            if other in onward and t not in onward:
                return v
        if kind.passthrough or kind.name in ("python", "join"):
            queue.extend(g.successors(v))
    return None


def _kinds_between(registry: Registry, gives: frozenset, takes: frozenset, most: int = 4) -> list[str]:
    """The shortest chain of kinds that turns `gives` into something `takes` accepts (request ->
    generate: dynamic_batch, encode, kv_lookup; request -> respond: those and generate), at most
    `most` long; [] when there is none."""
    steps = [k for k in registry.kinds() if k.inputs and k.outputs and not k.passthrough
             and k.name != "python" and len(k.emits) == 1]
    paths = deque([(frozenset(gives), [])])
    while paths:
        have, path = paths.popleft()
        for k in steps:
            if have & k.accepts and k.name not in path:
                if k.emits <= takes:
                    return path + [k.name]
                # longer chains lead into an engine, or along one (batch -> gen), never out of it
                if len(path) + 1 < most and (gives & ITEM_TYPES or not takes & ITEM_TYPES):
                    paths.append((k.emits, path + [k.name]))
    return []


def _route_types(kind, emits_n: frozenset) -> list[str]:
    """The item types whose fields a condition on an edge from this kind reads."""
    from .conditions import GENERATED, REQUEST

    if kind.name == "kv_lookup":
        return [REQUEST]
    got = [t for t in (REQUEST, GENERATED) if t in emits_n]
    return got or [REQUEST]


def _check_routes(r: Resolved, g: nx.DiGraph, emits: dict, carry: dict) -> list[Diagnostic]:
    """Comparisons type-check; a stage whose conditional edges may all fail needs `otherwise`
    (or an unconditional edge), unless it is a python stage whose function returns a label on
    every path and each such label has an edge for each item type it sends; at most one
    `otherwise` per stage."""
    from stages.registry import ANY_LABEL

    from .conditions import ConditionError, check_compare, compares, holds_for_label

    diags = []
    for n, out in _edges_by_source(r).items():
        s = r.stages[n]
        if s.kind is None:
            continue
        types = _route_types(s.kind, emits[n])
        refused = False
        for e in out:
            for cmp in compares(e.cond) if e.cond is not None else ():
                try:
                    check_compare(cmp, types)
                except ConditionError as err:
                    refused = True
                    diags.append(_err(str(err), err.node.pos if hasattr(err.node, "pos") else e.pos,
                                      expected=err.expected, hint=err.hint))
        otherwise = [e for e in out if e.condition == ("otherwise",)]
        conditional = [e for e in out if e.condition is not None and e.condition != ("otherwise",)]
        plain = [e for e in out if e.condition is None]
        for extra in otherwise[1:]:
            diags.append(_err(f"stage '{n}' has a second `otherwise` edge", extra.pos,
                              hint="an item takes one otherwise edge; keep one",
                              notes=[("the first is here", otherwise[0].pos)]))
        if otherwise and not conditional and n not in r.refused_conditions:   # not when an error dropped it
            diags.append(_warn(f"`otherwise` on {n} -> {otherwise[0].dst}: '{n}' has no conditional edge, so it "
                               "always holds", otherwise[0].pos, hint="write the edge without a condition"))
        # not when an error refused one of its conditions: that edge was meant to cover the rest
        if conditional and not otherwise and not plain and not refused and n not in r.refused_conditions:
            fixed = [c for c in s.kind.conditions if c != ANY_LABEL]
            # a label is covered when some edge's condition holds for every item carrying it
            # (`when timeout`, `when not full`, `when full or prompt_tokens > 9`)
            used = {c for c in fixed if any(holds_for_label(e.condition, c) is True for e in conditional)}
            if fixed and set(fixed) <= used:
                continue               # the batcher's full + timeout cover every batch
            if not fixed and _labels_covered(s, n, conditional, emits, carry):
                continue               # `return "b" if h < 50 else "a"` with `when a` and `when b` edges
            dst = conditional[0].dst
            if fixed:
                missing = [c for c in fixed if c not in used]
                msg = (f"{' and '.join(missing)} items of '{n}' have nowhere to go: no edge `when "
                       f"{missing[0]}`, no unconditional edge and no `otherwise`")
                # a batcher's labels are its contract (full and timeout): name the edge it lacks
                hint = "add " + " and ".join(f"`{n} -> {dst} when {c}`" for c in missing)
            else:
                msg = (f"an item of '{n}' that matches none of its conditions has nowhere to go "
                       "(no unconditional edge and no `otherwise`)")
                hint = f"add `{n} -> {dst} otherwise` (or to another stage)"
            diags.append(_err(msg, conditional[0].pos, hint=hint))
    return diags


def _labels_covered(s, n: str, conditional: list, emits: dict, carry: dict) -> bool:
    """Whether a python stage's every item takes one of its conditional edges: its function
    returns a label on every path (checker.python_stage_labels), and for each label and each item
    type the stage sends, an edge whose condition holds for that label leads to a stage taking it."""
    from .conditions import holds_for_label

    labels = python_stage_labels(s)
    if not labels:
        return False
    types = emits.get(n, set()) & ITEM_TYPES
    return bool(types) and all(any(holds_for_label(e.condition, lab) is True and t in carry.get(e.dst, ())
                                   for e in conditional)
               for lab in labels for t in types)


ENGINE_INSIDE = ("dynamic_batch", "encode", "kv_lookup")   # their edges carry Batch, Tokens, CachedTokens


def _edges_by_source(r: Resolved) -> dict[str, list]:
    """{stage: its out-edges, in file order}."""
    by_src: dict[str, list] = {}
    for e in r.edges:
        by_src.setdefault(e.src, []).append(e)
    return by_src


def _check_type_routes(r: Resolved, carry: dict, emits: dict) -> list[Diagnostic]:
    """Per item type, the edges that can carry it must leave it somewhere to go: the runtime
    routes an item only along edges whose destination takes its type, so an `otherwise` edge
    (or an unconditional one) that cannot take Generated results is no fallback for them."""
    diags = []
    for n, out in _edges_by_source(r).items():
        s = r.stages[n]
        if s.kind is None or s.kind.name in ENGINE_INSIDE:
            continue
        if not any(e.condition == ("otherwise",) or e.condition is None for e in out):
            continue                   # _check_routes reports conditional edges with no fallback at all
        for t in sorted(emits[n] & ITEM_TYPES):
            takes = [e for e in out if t in carry.get(e.dst, ())]
            conditional = [e for e in takes if e.condition is not None and e.condition != ("otherwise",)]
            if not conditional or any(e.condition is None or e.condition == ("otherwise",) for e in takes):
                continue               # no edge takes it (reported by _check_ports), or it has a fallback
            fallback = next((e for e in out if e.condition == ("otherwise",)), None) or \
                next(e for e in out if e.condition is None)
            how = "its `otherwise` edge" if fallback.condition == ("otherwise",) else "its unconditional edge"
            diags.append(_err(f"{t} items of '{n}' that match none of its conditions have nowhere to go: "
                              f"{how} leads to '{fallback.dst}', which cannot take {t} items", fallback.pos,
                              expected=f"an unconditional or `otherwise` edge from '{n}' that takes {t} items",
                              hint=f"send the fallback to a stage that takes {t} items too (a route stage "
                                   f"in front of both), or say returns = "
                                   f"{'request' if t == 'Generated' else 'generated'} if '{n}' never "
                                   f"gives {t} items" if s.kind.name == "python" else
                              f"send the fallback to a stage that takes {t} items too",
                              notes=[(f"{t} items may take {conditional[0].src} -> {conditional[0].dst}",
                                      conditional[0].pos)]))
    return diags


def _check_returned_kinds(r: Resolved, g: nx.DiGraph, receives: dict, carry: dict) -> list[Diagnostic]:
    """A python stage's function that returns, by its source, the other item type than the stage
    says it gives (`return item["request"]` in a stage that gets Generated results and says returns
    = same, as by default): the runtime holds the stage to `returns`, so every request that reaches
    that return fails there. At the `fn` value, naming the line: an error where every call reaches
    that return (a statement of the body before any other return or raise), a warning that it may
    where the return is behind a condition (`if retry and …`: a function shared with a looping
    pipeline, whose args may never take that path here); not where `returns` is any or many, nor
    where both types reach a `returns = same` stage."""
    diags = []
    for n, s in r.stages.items():
        if s.kind is None or s.kind.name != "python" or s.params.get("stream"):
            continue
        declared = s.params.get("returns") or "same"
        got = receives[n] & ITEM_TYPES
        if declared in ("any", "many") or not got:
            continue
        gives = {"request": "Request", "generated": "Generated"}.get(declared) or \
            (next(iter(got)) if len(got) == 1 else None)
        if gives is None:
            continue
        wrong = [w for w in python_stage_returned_kinds(s) if w[1] != gives]
        if not wrong:
            continue
        surely = [w for w in wrong if w[3]]
        line, kind, text, _ = (surely or wrong)[0]
        more = f" (and {len(wrong) - 1} more return{'s' if len(wrong) > 2 else ''} like it)" if len(wrong) > 1 else ""
        says = (f"says returns = {declared}" if "returns" in s.given else
                "gives the type it gets (returns = same, the default)")
        onward = set().union(*(carry[v] for v in g.successors(n))) & ITEM_TYPES
        word = "request" if kind == "Request" else "generated"
        # a function that also gives back the item it got (`return item` past a guard's answer) gives
        # both types: returns = any, for `returns = request | generated` would fail the item it passes on
        both = declared == "same" and python_stage_passes_item_on(s)
        if kind in onward and both:
            hint = f"say so: returns = any (it also passes the {gives} items it gets on)"
        elif kind in onward:
            hint = f"say so: returns = {word} (or any, where it also gives {gives} items back)"
        elif kind == "Request":
            hint = (f"a Request cannot go on from '{n}' (its edges lead only to stages that take "
                    f"{' | '.join(sorted(onward)) or 'nothing'}): to answer, return a result (the item, or "
                    "{\"text\": …}); to ask the model again, say returns = any and add an edge from "
                    f"'{n}' back to a batcher (with max_turns to bound the loop)")
        elif both:
            hint = (f"to answer the request here, say returns = any (it also passes the requests it gets on) and "
                    f"add an edge from '{n}' to a respond stage")
        else:
            hint = (f"to answer the request here, say returns = any (or generated) and add an edge from '{n}' "
                    "to a respond stage")
        diags.append((_err if surely else _warn)(
            f"stage '{n}': {s.params['fn']} {'returns' if surely else 'may return'} a {kind} at line {line} "
            f"(return {text}){more}, but the stage gets {' | '.join(sorted(got))} items and {says}: "
            f"{'each' if surely else 'a'} request that reaches that return fails there", s.param_pos.get("fn") or s.pos,
            expected=f"a function that returns {gives} items (or a label, or None), as the stage says", hint=hint))
    return diags


def _check_twice_answered(r: Resolved, emits: dict, carry: dict) -> list[Diagnostic]:
    """A warning at a stage whose edges without a condition lead straight into two respond stages:
    each takes a copy of every item (a fan-out), so every answer reaches the client twice, as two
    identical choices of one request (`gen -> out` and `gen -> out2`)."""
    diags = []
    for n, out in _edges_by_source(r).items():
        sent = emits.get(n, frozenset()) & ITEM_TYPES
        into = [e for e in out if e.condition is None and r.stages[e.dst].kind is not None
                and r.stages[e.dst].kind.name == "respond" and sent & carry.get(e.dst, frozenset())]
        if len(into) < 2:
            continue
        names = " and ".join(f"'{e.dst}'" for e in into)
        diags.append(_warn(f"stage '{n}' sends every item to {len(into)} respond stages, {names}, along edges "
                           "without a condition: each request gets every answer "
                           f"{'twice' if len(into) == 2 else f'{len(into)} times'}, as identical choices",
                           into[1].pos, notes=[(f"{n} -> {e.dst} is here", e.pos) for e in into[:1] + into[2:]],
                           hint="keep one of these edges (one respond stage answers every request), or put a "
                                "condition on them so that each item takes one"))
    return diags


def _check_fan_beside_condition(r: Resolved, g: nx.DiGraph, emits: dict, carry: dict) -> list[Diagnostic]:
    """A warning at an edge without a condition out of a stage whose other edges have conditions (or
    `otherwise`) and lead elsewhere: every item takes it, and an item also takes the first conditional
    edge that holds, or the `otherwise` edge (a fan-out: two branches of one request, two answers),
    where `otherwise` (the items no condition takes) was the likely meaning (`r -> big when
    prompt_tokens > 500` beside `r -> small`), or, beside an `otherwise` edge, a condition. Not where
    the item types part them (a Request along one, a result along the other), nor where both
    branches go on into one join (a fan-out it merges, on purpose)."""
    from . import conditions as C

    diags = []
    for n, out in _edges_by_source(r).items():
        s = r.stages[n]
        if s.kind is None or s.kind.name in ENGINE_INSIDE:
            continue
        sent = emits.get(n, frozenset()) & ITEM_TYPES
        conditional = [e for e in out if e.condition is not None]
        fallback = any(e.condition == ("otherwise",) for e in out)
        for e in out:
            if e.condition is not None:
                continue
            both = [c for c in conditional if c.dst != e.dst and sent & carry.get(e.dst, frozenset())
                    & carry.get(c.dst, frozenset())]
            if not both:
                continue
            joins = {v for v in nx.descendants(g, e.dst) | {e.dst}
                     if r.stages[v].kind is not None and r.stages[v].kind.name == "join"}
            if all(joins & (nx.descendants(g, c.dst) | {c.dst}) for c in both):
                continue
            c = both[0]
            if c.condition == ("otherwise",):
                which = f"the `otherwise` edge {n} -> {c.dst}: every item goes to '{e.dst}', and one no condition " \
                        f"holds for to '{c.dst}' as well"
            else:
                which = f"the conditional edge {n} -> {c.dst} when {C.text(c.condition)}: every item goes to " \
                        f"'{e.dst}', and one the condition holds for goes to '{c.dst}' as well"
            hint = (f"give {n} -> {e.dst} a condition (or remove it)" if fallback else
                    f"write `{n} -> {e.dst} otherwise` if '{e.dst}' is for the items no condition takes")
            diags.append(_warn(f"edge {n} -> {e.dst} has no condition beside {which} (a fan-out: two branches of "
                               "one request, two answers)", e.pos, notes=[(f"{n} -> {c.dst} is here", c.pos)],
                               hint=hint + "; for a copy on purpose, merge the branches in a join"))
            break
    return diags

def _check_loop_exits(r: Resolved, g: nx.DiGraph, carry: dict, receives: dict) -> list[Diagnostic]:
    """An item that reaches a loop's bounding stage after max_turns leaves the loop as it came:
    some edge out of the loop must take its type."""
    diags = []
    bounded = bounded_stages(r)
    if not bounded:
        return diags
    comp_of = {n: comp for comp in nx.strongly_connected_components(g) for n in comp}
    for n in sorted(bounded):
        comp = comp_of[n]
        exits = [v for v in g.successors(n) if v not in comp]
        if not exits or (len(comp) == 1 and not g.has_edge(n, n)):
            continue                   # no loop, or no way out (_check_cycles says so)
        s = r.stages[n]
        for t in sorted(receives[n] & ITEM_TYPES):
            if not any(t in carry[v] for v in exits):
                diags.append(_err(f"{t} items that reach '{n}' after max_turns = {s.params['max_turns']} have "
                                  f"no way out of the loop: no edge out of it ({', '.join(exits)}) takes {t} items",
                                  s.param_pos.get("max_turns") or s.pos,
                                  expected=f"an edge from '{n}' out of the loop that takes {t} items",
                                  hint=f"add an edge from '{n}' towards a stage outside the loop that takes {t} "
                                       "items, or keep them from reaching it"))
    return diags


def _check_streams(r: Resolved, receives: dict) -> list[Diagnostic]:
    """A stream stage filters generated text: only Generated results may reach it."""
    diags = []
    for n, s in r.stages.items():
        if s.kind is None or s.kind.name != "python" or not s.params.get("stream"):
            continue
        wrong = sorted(receives[n] - {"Generated"})
        if wrong:
            diags.append(_err(f"stage '{n}' has stream = true, but {' and '.join(wrong)} items reach it; a "
                              "stream stage filters generated text", s.param_pos.get("stream") or s.pos,
                              expected="a stream stage after generate (Generated items only)",
                              hint=f"move '{n}' after a generate stage, or remove stream = true"))
    return diags


# ---------------------------------------------------------------- engine segments

ENGINE_KINDS = ("dynamic_batch", "encode", "kv_lookup", "generate")
# generate parameters that configure the engine (the same for every generate stage of one engine)
ENGINE_PARAMS = ("model", "device", "dtype", "compile", "prefill_chunk", "speculate", "speculative_tokens",
                 "prompt_lookup_max", "prompt_lookup_min")


@dataclass(frozen=True)
class Segment:
    """One engine: a batcher, an encode stage, a kv_lookup stage and the generate stages it feeds."""

    batch: str
    encode: str
    kv: str
    generates: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(self.generates)

    @property
    def stages(self) -> tuple[str, ...]:
        return (self.batch, self.encode, self.kv, *self.generates)


def check_segments(r: Resolved, g: nx.DiGraph) -> tuple[list[Segment], list[Diagnostic]]:
    """The engine segments (batch -> encode -> kv_lookup -> generate...) and what breaks them:
    one engine per chain, so no two batchers into one encode stage, no encode stage into two
    kv_lookup stages, and every generate stage of one kv_lookup on the same model."""
    diags: list[Diagnostic] = []
    kind = {n: (s.kind.name if s.kind else None) for n, s in r.stages.items()}

    order = {n: i for i, n in enumerate(r.stages)}

    def of(names, k):                  # in the order the file defines the stages
        return sorted((x for x in names if kind.get(x) == k), key=order.get)

    def listing(names):
        return ", ".join(f"'{x}'" for x in names)

    segments = []
    inner = {"Batch", "Tokens", "CachedTokens"}
    for n, s in r.stages.items():
        if s.kind is not None and kind[n] not in ENGINE_KINDS and (s.kind.accepts | s.kind.emits) & inner:
            ports = " | ".join(sorted((s.kind.accepts | s.kind.emits) & inner))
            diags.append(_err(f"stage '{n}' ({kind[n]}) works on {ports}, inside an engine segment, which "
                              "runs as one engine (batch -> encode -> kv_lookup -> generate)", s.pos,
                              expected="a kind that takes and gives Request or Generated items",
                              hint="put it before the batcher (on Requests) or after generate (on Generated "
                                   "results)"))
            continue
        if kind[n] == "dynamic_batch":
            encs = of(g.successors(n), "encode")
            if len(encs) > 1:
                diags.append(_err(f"batcher '{n}' feeds {len(encs)} encode stages ({listing(encs)})", s.pos,
                                  expected="one encode stage after each batcher: one engine per chain",
                                  hint="give each chain its own batcher"))
        elif kind[n] == "encode":
            bats = of(g.predecessors(n), "dynamic_batch")
            kvs = of(g.successors(n), "kv_lookup")
            if len(bats) > 1:
                diags.append(_err(f"{len(bats)} batchers feed one encode stage '{n}' ({listing(bats)})", s.pos,
                                  expected="one batcher before each encode stage: one engine per chain",
                                  hint="route requests to one batcher, or give each batcher its own "
                                       "encode -> kv_lookup -> generate chain"))
            if len(kvs) > 1:
                diags.append(_err(f"encode '{n}' feeds {len(kvs)} kv_lookup stages ({listing(kvs)})", s.pos,
                                  expected="one kv_lookup after each encode stage",
                                  hint="several generate stages may share one kv_lookup"))
        elif kind[n] == "kv_lookup":
            encs = of(g.predecessors(n), "encode")
            if len(encs) > 1:
                diags.append(_err(f"{len(encs)} encode stages feed one kv_lookup '{n}' ({listing(encs)})", s.pos,
                                  expected="one encode stage before each kv_lookup"))
            gens = of(g.successors(n), "generate")
            first = None
            for gen in gens:
                gp = r.stages[gen].params
                if first is None:
                    first = gen
                    continue
                fp = r.stages[first].params
                differ = [p for p in ENGINE_PARAMS if _engine_value(g, gp, p) != _engine_value(g, fp, p)]
                if differ:
                    p = differ[0]
                    diags.append(_err(f"generate stages '{first}' and '{gen}' share kv_lookup '{n}' (one engine) "
                                      f"but differ in {', '.join(differ)}",
                                      r.stages[gen].param_pos.get(p) or r.stages[gen].pos,
                                      expected=f"{p} = {_spelled(_engine_value(g, fp, p), p == 'model')} as in '{first}'",
                                      hint=f"give '{gen}' its own batch -> encode -> kv_lookup chain"))
            if len(encs) == 1 and gens:
                bats = of(g.predecessors(encs[0]), "dynamic_batch")
                if len(bats) == 1:
                    segments.append(Segment(bats[0], encs[0], n, tuple(gens)))
        elif kind[n] == "generate":
            kvs = of(g.predecessors(n), "kv_lookup")
            if len(kvs) > 1:
                diags.append(_err(f"{len(kvs)} kv_lookup stages feed generate '{n}' ({listing(kvs)})", s.pos,
                                  expected="one kv_lookup (one engine) before each generate stage"))
    return segments, diags


def segments_of(graph: nx.DiGraph) -> list[Segment]:
    """The engine segments of a checked graph, in file order of their kv_lookup stages."""
    out = []
    for n, data in graph.nodes(data=True):
        if data.get("kind") != "kv_lookup":
            continue
        gens = tuple(v for v, _ in data["routes"] if graph.nodes[v].get("kind") == "generate")
        gens = tuple(dict.fromkeys(gens))
        enc = next(u for u in graph.predecessors(n) if graph.nodes[u].get("kind") == "encode")
        bat = next(u for u in graph.predecessors(enc) if graph.nodes[u].get("kind") == "dynamic_batch")
        out.append(Segment(bat, enc, n, gens))
    return out


def check_program(program, registry: Registry | None = None) -> list[Diagnostic]:
    """Every check of every pipeline of a loaded program (see loader.Program). A derived
    pipeline's diagnostics that its base has too (a fault in the copied text) are said once, for
    the base; one only the derived pipeline has, in text it copied (an override that breaks a
    base's stage), gets a note at the derivation."""
    found: dict[str, list[Diagnostic]] = {}
    for p in program.pipelines:
        resolved, ds = check_pipeline(p, registry, getattr(program, "allowed", None) or None)
        found[p.name.text] = ds + validate(resolved, registry)
    diags: list[Diagnostic] = []
    for p in program.pipelines:
        ds = found[p.name.text]
        if p.base is not None:
            said = {_key(d) for d in found.get(p.base.text, ())}
            note = (f"in pipeline '{p.name.text}', which copies it from '{p.base.text}' here", p.base.pos)
            ds = [d if _within(d.pos, p.pos) else replace(d, notes=d.notes + (note,))
                  for d in ds if _key(d) not in said]
        diags += ds
    return sort_diagnostics(diags)


def _key(d: Diagnostic) -> tuple:
    return d.severity, d.message, d.pos


def _within(pos, span) -> bool:
    """Whether `pos` lies inside `span` (same file)."""
    return (pos is not None and span is not None and pos.file == span.file
            and (span.line, span.col) <= (pos.line, pos.col) <= (span.end_line, span.end_col))
