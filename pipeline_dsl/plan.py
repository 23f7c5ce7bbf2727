"""The stream planner: a checked stage graph -> a plan of streams and events (no torch).

    plan = make_plan(build_graph(pipeline))
    plan.items       # ItemWork: per-request work (admit, python calls, tokenise, join, respond)
    plan.segments    # one Plan per engine segment (batch -> encode -> kv_lookup -> generate...)
    seg = plan.segments[0]
    seg.streams      # Stream(name, resource, stages, work): one FIFO queue each
    seg.events       # Event(src, dst, ...): recorded after src's work, waited on before dst's
    seg.overlap      # predicted steady-state overlap (time with >= 2 streams busy / wall time)

Two kinds of work (docs/plan.md explains why):
- Per request: request-level stages (requests, system_prompt, python, route, join,
  respond) and encode's tokenisation run per item on a pool of host worker threads
  (stages that run user code on workers of their own), off the engine's loop; they are
  listed, not scheduled onto streams.
- Per step of an engine segment: the batcher's admit and schedule, kv_lookup's block
  tables, generate's input copy, forward, token copy and emit. These are planned:
1. Each stage is split into the work its kind implies, each piece on one resource
   class (host | copy | compute): `generate` = H2D input copy + forward + D2H token copy
   + emit. An explicit `on host|copy|compute` in the file puts all of a stage's work there.
2. With networkx, the graph of work instances over a window of micro-batches: (w, k)
   waits for its predecessors in micro-batch k and for (w, k-1).
3. Nimble's method on that graph: transitive reduction, minimum path cover by bipartite
   matching, one stream per chain (kept as the baseline we report). We match only edges
   inside one resource class, so chains are homogeneous, and merge the chains of a class
   into one stream: a fixed number of streams, whatever the window.
4. Modulo schedule: work downstream of the bottleneck stream on another stream is issued
   one micro-batch later (`skew`), so no FIFO queues independent work behind a wait.
5. Events only on cross-stream edges, dropped when stream order and earlier events already
   imply them; the steady-state pattern of one micro-batch is the plan's event list.
6. A small simulation with nominal costs predicts the steady-state overlap.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import networkx as nx

RESOURCES = ("host", "copy", "compute")

# The per-step work of the engine kinds: (part, resource, nominal cost in units of one decode
# forward). The costs only feed the prediction; measured traces give the real numbers.
WORK: dict[str, tuple[tuple[str, str, float], ...]] = {
    "dynamic_batch": (("admit", "host", 0.02), ("schedule", "host", 0.10)),
    "kv_lookup": (("lookup", "host", 0.04),),
    "generate": (("h2d", "copy", 0.02), ("forward", "compute", 1.0), ("d2h", "copy", 0.02),
                 ("emit", "host", 0.10)),
}
# The per-item work of the other kinds (a third-party kind: "run")
ITEM_WORK: dict[str, str] = {
    "requests": "admit", "system_prompt": "apply", "encode": "tokenise", "python": "call",
    "route": "route", "join": "merge", "respond": "respond",
}
ENGINE_KINDS = ("dynamic_batch", "encode", "kv_lookup", "generate")
ITEM_WORKERS = 4          # host threads of the per-item pool


@dataclass(frozen=True)
class ItemWork:
    name: str        # "<stage>.<part>"
    stage: str
    part: str


@dataclass(frozen=True)
class Work:
    name: str        # "<stage>.<part>"
    stage: str
    part: str
    resource: str    # host | copy | compute
    cost: float      # nominal, in units of one decode forward
    skew: int        # issued this many micro-batches after the first work of a step
    stream: str


@dataclass(frozen=True)
class Stream:
    name: str
    resource: str
    stages: tuple[str, ...]   # stages whose main work runs here (each stage on one stream)
    work: tuple[str, ...]     # the FIFO order of one iteration (see Work.skew)

    @property
    def stage_list(self) -> str:
        """Its stages as `agp plan` and `agp render --plan` list them: "none" for a stream that
        only carries other stages' work (a copy stream's h2d and d2h copies)."""
        return ", ".join(self.stages) or "none"


@dataclass(frozen=True)
class Event:
    src: str            # stage whose work records the event
    dst: str            # stage whose work waits on it
    src_work: str
    dst_work: str
    lag: int            # 0: same micro-batch; 1: dst of micro-batch k waits on src of k-1
    host_sync: bool     # the waiter is host work: the host blocks (the plan's only syncs)


@dataclass(frozen=True)
class Baseline:
    method: str
    streams: int
    events_per_step: int
    overlap: float


@dataclass(frozen=True)
class Plan:
    """The step plan of one engine segment."""
    pipeline: str
    streams: tuple[Stream, ...]
    events: tuple[Event, ...]
    work: tuple[Work, ...]
    overlap: float      # predicted steady-state time with >= 2 streams busy / wall time
    speedup: float      # predicted serial time per step / overlapped period
    window: int
    baseline: Baseline
    segment: str = ""                     # the segment's name: its generate stages joined by '+'
    stages: tuple[str, ...] = ()          # batch, encode, kv_lookup, generate stage(s)
    anchor: str = ""                      # the costliest work of a step (the forward)
    beside: tuple[str, ...] = ()          # work of other streams predicted to run while anchor[k]
                                          # does: "batch.schedule[k+1]" is the next step's host work

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def work_named(self, name: str) -> Work:
        return next(w for w in self.work if w.name == name)

    def stream_of(self, stage: str) -> str:
        return next(s.name for s in self.streams if stage in s.stages)


@dataclass(frozen=True)
class PipelinePlan:
    """A pipeline's plan: the per-item work and one step plan per engine segment. With one
    segment, `streams`, `events`, `work`, `overlap` ... are that segment's."""
    pipeline: str
    items: tuple[ItemWork, ...]
    segments: tuple[Plan, ...]
    workers: int = ITEM_WORKERS
    base: str | None = None          # the pipeline a derived one copies (`pipeline short : chat`)
    # segments whose generate stages load the same weights (graph.weights_key), which the runtime
    # loads once for them: (model, dtype, (segment, ...)) for each model two or more segments share
    shared_weights: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    # fan-outs as wide as a list: (python stage with returns = many, the join collecting its items,
    # its max_items) for each such stage
    many: tuple[tuple[str, str | None, int], ...] = ()

    def _one(self) -> Plan | None:
        return self.segments[0] if self.segments else None

    @property
    def streams(self) -> tuple[Stream, ...]:
        return tuple(s for p in self.segments for s in p.streams)

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(e for p in self.segments for e in p.events)

    @property
    def work(self) -> tuple[Work, ...]:
        return tuple(w for p in self.segments for w in p.work)

    @property
    def overlap(self) -> float:
        return self._one().overlap if self.segments else 0.0

    @property
    def speedup(self) -> float:
        return self._one().speedup if self.segments else 1.0

    @property
    def baseline(self) -> Baseline | None:
        return self._one().baseline if self.segments else None

    @property
    def window(self) -> int:
        return self._one().window if self.segments else 0

    @property
    def anchor(self) -> str:
        return self._one().anchor if self.segments else ""

    @property
    def beside(self) -> tuple[str, ...]:
        return self._one().beside if self.segments else ()

    def work_named(self, name: str) -> Work:
        return next(w for w in self.work if w.name == name)

    def stream_of(self, stage: str) -> str:
        return next(s.name for s in self.streams if stage in s.stages)

    def executed(self) -> list[str]:
        """Every piece of work the runtime runs (per item and per step), by name."""
        return [w.name for w in self.items] + [w.name for w in self.work]

    def to_dict(self) -> dict:
        one = self._one()
        out = {"pipeline": self.pipeline, "items": [asdict(w) for w in self.items],
               "workers": self.workers, "segments": [p.to_dict() for p in self.segments]}
        if self.base is not None:
            out["base"] = self.base
        if self.shared_weights:
            out["shared_weights"] = [{"model": m, "dtype": d, "segments": list(segs)}
                                     for m, d, segs in self.shared_weights]
        if self.many:
            out["many"] = [{"stage": st, "join": j, "max_items": cap} for st, j, cap in self.many]
        if one is not None:       # the first segment's plan at the top level, as `agp plan --json` always had
            out.update({k: v for k, v in one.to_dict().items() if k not in ("pipeline",)})
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class PlanError(ValueError):
    """The graph cannot be planned (a cycle, an unknown resource)."""


def _segments(graph: nx.DiGraph) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(batch, encode, kv, generates) of every engine segment, from the graph's structure."""
    kind = {n: graph.nodes[n].get("kind") for n in graph}
    out = []
    for kv in graph:
        if kind[kv] != "kv_lookup":
            continue
        gens = tuple(v for v in graph.successors(kv) if kind[v] == "generate")
        encs = [u for u in graph.predecessors(kv) if kind[u] == "encode"]
        bats = [u for u in graph.predecessors(encs[0]) if kind[u] == "dynamic_batch"] if len(encs) == 1 else []
        if not gens or len(encs) != 1 or len(bats) != 1:
            raise PlanError(f"kv_lookup {kv!r} is not in one batch -> encode -> kv_lookup -> generate chain")
        out.append((bats[0], encs[0], kv, gens))
    return out


def stage_work(graph: nx.DiGraph, segment: tuple, costs: dict[str, float] | None = None) -> list[tuple]:
    """(name, stage, part, resource, cost) of every piece of a segment's per-step work, in order.

    The generate pieces are named after the segment's generate stages joined by '+' (one
    forward serves them all). `costs` (by work name, e.g. from a measured trace) replace the
    nominal ones; with `costs`, work it does not name costs nothing (it did not run)."""
    batch, _, kv, gens = segment
    out = []
    for stage, kind, node in ((batch, "dynamic_batch", batch), (kv, "kv_lookup", kv),
                              ("+".join(gens), "generate", gens[0])):
        placed = graph.nodes[node].get("placement")
        for part, resource, cost in WORK[kind]:
            resource = placed or resource
            if resource not in RESOURCES:
                raise PlanError(f"stage {node!r}: unknown resource {resource!r}")
            name = f"{stage}.{part}"
            out.append((name, stage, part, resource,
                        cost if costs is None else float(costs.get(name, 0.0))))
    return out


def item_work(graph: nx.DiGraph) -> tuple[ItemWork, ...]:
    """The per-item work of every stage that runs per request, in topological-ish file order."""
    out = []
    for stage, data in graph.nodes(data=True):
        kind = data.get("kind")
        if kind in ENGINE_KINDS and kind != "encode":
            continue
        part = ITEM_WORK.get(kind, "run")
        out.append(ItemWork(f"{stage}.{part}", stage, part))
    return tuple(out)


def step_graph(graph: nx.DiGraph, work) -> nx.DiGraph:
    """The work of one micro-batch of a segment: its pieces in a chain."""
    g = nx.DiGraph()
    for name, stage, _, resource, cost in work:
        g.add_node(name, resource=resource, cost=cost)
    nx.add_path(g, [w[0] for w in work])
    return g


def instance_graph(step: nx.DiGraph, window: int) -> nx.DiGraph:
    """(w, k) waits for its predecessors in micro-batch k and for (w, k-1)."""
    g = nx.DiGraph()
    for k in range(window):
        for w, data in step.nodes(data=True):
            g.add_node((w, k), **data)
            if k:
                g.add_edge((w, k - 1), (w, k))
        g.add_edges_from(((u, k), (v, k)) for u, v in step.edges)
    return g


def path_cover(dag: nx.DiGraph, same_class: bool, tr: nx.DiGraph | None = None) -> list[list]:
    """Minimum path cover of the transitive reduction by bipartite matching (Nimble).

    With `same_class`, only edges inside one resource class may join a chain, and edges
    that keep the same work across micro-batches are preferred (steady-state chains).
    `tr`: dag's transitive reduction, when the caller has it already (both covers of one plan)."""
    if tr is None:
        tr = nx.transitive_reduction(dag)
    b = nx.Graph()
    left = [("out", n) for n in dag]
    b.add_nodes_from(left, bipartite=0)
    b.add_nodes_from((("in", n) for n in dag), bipartite=1)
    for u, v in tr.edges:
        if same_class and dag.nodes[u]["resource"] != dag.nodes[v]["resource"]:
            continue
        b.add_edge(("out", u), ("in", v), weight=2 if u[0] == v[0] else 1)
    if same_class:
        pairs = nx.max_weight_matching(b, maxcardinality=True)
        match = {}
        for x, y in pairs:
            x, y = (x, y) if x[0] == "out" else (y, x)
            match[x[1]] = y[1]
    else:
        m = nx.bipartite.hopcroft_karp_matching(b, top_nodes=left)
        match = {x[1]: y[1] for x, y in m.items() if x[0] == "out"}
    starts = set(dag) - set(match.values())
    chains = []
    for n in sorted(starts, key=lambda n: (n[1], str(n[0]))):
        chain = [n]
        while chain[-1] in match:
            chain.append(match[chain[-1]])
        chains.append(chain)
    return chains


def skews(step: nx.DiGraph, stream: dict[str, str]) -> dict[str, int]:
    """Issue lag per work: +1 on edges that leave the bottleneck stream for another."""
    load: dict[str, float] = {}
    for w, data in step.nodes(data=True):
        load[stream[w]] = load.get(stream[w], 0.0) + data["cost"]
    bottleneck = max(load, key=lambda s: (load[s], s == "compute"))
    skew: dict[str, int] = {}
    for w in nx.topological_sort(step):
        skew[w] = max((skew[u] + (stream[u] == bottleneck != stream[w])
                       for u in step.predecessors(w)), default=0)
    return skew


def _order(step: nx.DiGraph, skew: dict[str, int]):
    topo = {w: i for i, w in enumerate(nx.topological_sort(step))}
    return lambda inst: (inst[1] + skew[inst[0]], topo[inst[0]])   # one global issue order


def place_events(inst: nx.DiGraph, stream_of, key, tr: nx.DiGraph | None = None) -> list[tuple]:
    """Cross-stream edges of the reduction, minus those implied by stream order + events.
    `tr`: inst's transitive reduction, when the caller has it already (both event sets of one plan)."""
    if tr is None:
        tr = nx.transitive_reduction(inst)
    sync = nx.DiGraph()
    sync.add_nodes_from(inst)
    fifo: dict[str, list] = {}
    for n in sorted(inst, key=key):
        fifo.setdefault(stream_of(n), []).append(n)
    for queue in fifo.values():
        nx.add_path(sync, queue)
    cross = [(u, v) for u, v in tr.edges if stream_of(u) != stream_of(v)]
    kept = []
    for u, v in sorted(cross, key=lambda e: (key(e[1]), [-x for x in key(e[0])])):
        if not nx.has_path(sync, u, v):
            sync.add_edge(u, v)
            kept.append((u, v))
    return kept


def busy_overlap(spans: dict[str, list[tuple[float, float]]], t0: float, t1: float) -> float:
    """Fraction of [t0, t1] during which two or more streams are busy."""
    if t1 <= t0:
        return 0.0
    edges = []
    for intervals in spans.values():
        merged: list[list[float]] = []
        for a, b in sorted((max(a, t0), min(b, t1)) for a, b in intervals):
            if b <= a:
                continue
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        for a, b in merged:
            edges += [(a, 1), (b, -1)]
    busy, last, both = 0, t0, 0.0
    for t, d in sorted(edges):
        if busy >= 2:
            both += t - last
        busy, last = busy + d, t
    return both / (t1 - t0)


def simulate(inst: nx.DiGraph, stream_of, key, window: int):
    """Run the streams' FIFOs with nominal costs, one resource of each class at a time.

    Returns (overlap, period) measured over the middle of the window, and each work
    instance's simulated (start, end)."""
    fifo: dict[str, list] = {}
    for n in sorted(inst, key=key):
        fifo.setdefault(stream_of(n), []).append(n)
    done: dict = {}
    start: dict = {}
    free = {r: 0.0 for r in RESOURCES}
    pos = {s: 0 for s in fifo}
    stream_free = {s: 0.0 for s in fifo}
    while len(done) < len(inst):
        best = None
        for s, q in fifo.items():
            if pos[s] == len(q):
                continue
            n = q[pos[s]]
            if any(p not in done for p in inst.predecessors(n)):
                continue
            r = inst.nodes[n]["resource"]
            t = max([stream_free[s], free[r]] + [done[p] for p in inst.predecessors(n)])
            if best is None or (t, key(n)) < (best[0], key(best[2])):
                best = (t, s, n)
        if best is None:
            raise PlanError("the plan's stream order deadlocks")
        t, s, n = best
        start[n] = t
        done[n] = stream_free[s] = free[inst.nodes[n]["resource"]] = t + inst.nodes[n]["cost"]
        pos[s] += 1
    anchor = max(inst.nodes, key=lambda n: (inst.nodes[n]["cost"], n[1] == 0))[0]
    a, b = window // 4, window - window // 4
    t0, t1 = start[(anchor, a)], start[(anchor, b)]
    spans: dict[str, list] = {}
    for n, t in start.items():
        spans.setdefault(stream_of(n), []).append((t, done[n]))
    return busy_overlap(spans, t0, t1), (t1 - t0) / (b - a), {n: (start[n], done[n]) for n in start}


def beside(inst: nx.DiGraph, stream_of, times: dict, window: int) -> tuple[str, tuple[str, ...]]:
    """The costliest work (the forward) of a micro-batch k in mid-window, and the work of other
    streams that the simulation runs while it does, as "work[k+1]" (stream order, then time)."""
    anchor = max(inst.nodes, key=lambda n: (inst.nodes[n]["cost"], n[1] == 0))[0]
    k = window // 2
    a0, a1 = times[(anchor, k)]
    mine = stream_of((anchor, k))
    hits = [(t0, n) for n, (t0, t1) in times.items()
            if stream_of(n) != mine and min(t1, a1) > max(t0, a0)]
    rel = lambda m: "k" if m == k else f"k{m - k:+d}"                  # noqa: E731
    return anchor, tuple(f"{n[0]}[{rel(n[1])}]" for _, n in sorted(hits))


def make_plan(graph: nx.DiGraph, window: int = 12, costs: dict[str, float] | None = None) -> PipelinePlan:
    """Plan a checked stage graph (see the module docstring).

    `costs`: measured seconds (or any unit) per work name, for the prediction."""
    if window < 4:
        raise PlanError("the window needs at least 4 micro-batches")
    segments = _segments(graph)
    plans = []
    for seg in segments:
        prefix = f"{'+'.join(seg[3])}/" if len(segments) > 1 else ""
        plans.append(_plan_segment(graph, seg, window, costs, prefix))
    return PipelinePlan(str(graph.graph.get("name", "")), item_work(graph), tuple(plans),
                        base=graph.graph.get("base"), shared_weights=shared_weights(graph, segments),
                        many=fan_outs_at_run_time(graph))


def fan_outs_at_run_time(graph: nx.DiGraph) -> tuple[tuple[str, str | None, int], ...]:
    """(stage, the join that collects its items, max_items) of each python stage with returns = many."""
    from .graph import collecting_joins, spreads

    out = []
    for n, data in graph.nodes(data=True):
        params = data.get("params") or {}
        if spreads(params, data.get("kind")):
            joins = collecting_joins(graph, n)[0]
            out.append((n, joins[0] if joins else None, int(params.get("max_items", 64))))
    return tuple(out)


def shared_weights(graph: nx.DiGraph, segments: list) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(model, dtype, segment names) of each set of two or more segments whose generate stages
    load the same weights: the runtime loads them once for all of them."""
    from .graph import weights_key

    by: dict[tuple, list[str]] = {}
    for seg in segments:
        by.setdefault(weights_key(graph, seg[3][0]), []).append("+".join(seg[3]))
    return tuple((key[0], key[1], tuple(names)) for key, names in by.items() if len(names) > 1)


def _plan_segment(graph: nx.DiGraph, seg: tuple, window: int, costs, prefix: str) -> Plan:
    work = stage_work(graph, seg, costs)
    step = step_graph(graph, work)
    inst = instance_graph(step, window)

    # ours: homogeneous chains, merged per resource class. A path cover holds every work
    # instance, and the chains of one class merge into that class's stream: each work's stream
    # is its resource class, whichever chains a matching (path_cover(same_class=True), a
    # weighted matching: most of a plan's time) would pick
    reduced = nx.transitive_reduction(inst)           # once, for the cover and both event sets
    stream = {w: data["resource"] for w, data in step.nodes(data=True)}
    skew = skews(step, stream)
    key = _order(step, skew)
    of = lambda n: stream[n[0]]                       # noqa: E731
    overlap, period, times = simulate(inst, of, key, window)
    anchor, during = beside(inst, of, times, window)
    kept = place_events(inst, of, key, tr=reduced)
    last = window - 1
    names = {res: prefix + res for res in RESOURCES}
    events = tuple(Event(src=u[0].rsplit(".", 1)[0], dst=v[0].rsplit(".", 1)[0],
                         src_work=u[0], dst_work=v[0], lag=v[1] - u[1],
                         host_sync=stream[v[0]] == "host")
                   for u, v in kept if v[1] == last)

    # Nimble as published: any maximum matching, one stream per chain, no skew
    nchains = path_cover(inst, same_class=False, tr=reduced)
    nstream = {n: i for i, c in enumerate(nchains) for n in c}
    nof = lambda n: nstream[n]                        # noqa: E731
    nkey = _order(step, {w: 0 for w in step})
    noverlap, _, _ = simulate(inst, nof, nkey, window)
    nevents = place_events(inst, nof, nkey, tr=reduced) if len(nchains) > 1 else []
    nimble = Baseline("nimble", len(nchains), sum(1 for _, v in nevents if v[1] == last),
                      round(noverlap, 4))

    works = tuple(Work(name, stage, part, res, cost, skew[name], names[stream[name]])
                  for name, stage, part, res, cost in work)
    streams = []
    order = sorted(step, key=lambda w: key((w, 0)))
    batch, encode, kv, gens = seg
    for res in RESOURCES:
        mine = [w for w in order if stream[w] == res]
        if not mine:
            continue
        main = [st for st in dict.fromkeys(w.stage for w in works)
                if _main_work(graph, st, works).stream == names[res]]
        if batch in main:          # the encode stage's per-step part rides with its batcher
            main.insert(main.index(batch) + 1, encode)
        main = [g for st in main for g in (st.split("+") if "+" in st else [st])]
        streams.append(Stream(names[res], res, tuple(main), tuple(mine)))
    serial = sum(w.cost for w in works)
    # measured costs of nothing (a trace without an engine step): no time to overlap, no speedup
    speedup = round(serial / period, 4) if period > 0 else 1.0
    return Plan(pipeline=str(graph.graph.get("name", "")), streams=tuple(streams), events=events,
                work=works, overlap=round(overlap, 4), speedup=speedup,
                window=window, baseline=nimble, segment="+".join(gens), stages=(batch, encode, kv, *gens),
                anchor=anchor, beside=during)


def _main_work(graph: nx.DiGraph, stage: str, works) -> Work:
    """The stage's work on its kind's own resource (the first piece otherwise)."""
    mine = [w for w in works if w.stage == stage]
    node = graph.nodes[stage.split("+")[0]]
    want = node.get("placement") or node.get("resource")
    return next((w for w in mine if w.resource == want), mine[0])


def format_plan(plan: PipelinePlan) -> str:
    """The human-readable `agp plan` report."""
    segs = plan.segments
    derived = f" (derived from {plan.base})" if plan.base else ""
    lines = [f"pipeline {plan.pipeline}{derived}: {len(segs)} engine segment{'' if len(segs) == 1 else 's'}, "
             f"{len(plan.streams)} streams, {len(plan.events)} events per micro-batch"]
    lines.append(f"\nper request, on {plan.workers} host worker threads (off the engine loop; python stages on "
                 "workers of their own):")
    lines.append("  " + "  ".join(w.name for w in plan.items) if plan.items else "  (none)")
    for stage, join, cap in plan.many:
        lines.append(f"fan-out at run time: {stage} (returns = many, at most {cap}) -> join '{join}'")
    for model, dtype, names in plan.shared_weights:
        lines.append(f"\nweights: engine segments {', '.join(names)} share one loaded copy of "
                     f"{os.path.basename(model)} (dtype {dtype}); each keeps its own KV pool and batcher")
    for seg in segs:
        lines.append(f"\nengine segment {seg.segment} ({' -> '.join(seg.stages)}), per step:")
        for s in seg.streams:
            lines.append(f"stream {s.name} ({s.resource}): stages {s.stage_list}")
            for name in s.work:
                w = seg.work_named(name)
                lag = f"   (micro-batch k-{w.skew})" if w.skew else ""
                lines.append(f"  {name:<22} cost {w.cost:<5g}{lag}".rstrip())
        lines.append("events (recorded after -> waited on before):")
        for e in seg.events:
            k = "k-1" if e.lag else "k"
            how = "host waits" if e.host_sync else "stream waits"
            lines.append(f"  {e.src_work}[{k}] -> {e.dst_work}[k]   ({how})")
        if not seg.events:
            lines.append("  (none)")
        if seg.beside:
            by: dict[str, list[str]] = {}
            for w in seg.beside:
                by.setdefault(seg.work_named(w.split("[")[0]).stream, []).append(w)
            lines.append(f"while {seg.anchor}[k] computes (k+1: the next step, k-1: the previous one):")
            lines += [f"  {name:<8} {', '.join(ws)}" for name, ws in by.items()]
        b = seg.baseline
        lines += [
            f"predicted steady-state overlap {seg.overlap:.2f} of wall time with >= 2 streams busy;"
            f" speedup {seg.speedup:.2f}x over serial",
            f"Nimble's plan of the same window: {b.streams} streams, {b.events_per_step} events per"
            f" micro-batch, overlap {b.overlap:.2f}",
        ]
    return "\n".join(lines)
