"""The stream planner: a checked stage graph -> a Plan of streams and events (no torch).

    plan = make_plan(build_graph(pipeline))
    plan.streams   # Stream(name, resource, stages, work): one FIFO queue each
    plan.events    # Event(src, dst, ...): recorded after src's work, waited on before dst's
    plan.overlap   # predicted steady-state overlap (time with >= 2 streams busy / wall time)

How (docs/plan.md explains why):
1. Each stage is split into the work its kind implies, each piece on one resource
   class (host | copy | compute): `generate` = H2D input copy + forward + D2H token copy.
   An explicit `on host|copy|compute` in the file puts all of a stage's work there.
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
from dataclasses import asdict, dataclass

import networkx as nx

RESOURCES = ("host", "copy", "compute")

# The work each kind implies: (part, resource, nominal cost in units of one decode forward).
# The costs only feed the prediction; measured traces give the real numbers.
WORK: dict[str, tuple[tuple[str, str, float], ...]] = {
    "requests": (("admit", "host", 0.02),),
    "dynamic_batch": (("schedule", "host", 0.10),),
    "encode": (("tokenise", "host", 0.05),),
    "kv_lookup": (("lookup", "host", 0.04), ("kv_copy", "copy", 0.03)),
    "generate": (("h2d", "copy", 0.02), ("forward", "compute", 1.0), ("d2h", "copy", 0.02)),
    "respond": (("emit", "host", 0.10),),
}


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
    pipeline: str
    streams: tuple[Stream, ...]
    events: tuple[Event, ...]
    work: tuple[Work, ...]
    overlap: float      # predicted steady-state time with >= 2 streams busy / wall time
    speedup: float      # predicted serial time per step / overlapped period
    window: int
    baseline: Baseline

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def work_named(self, name: str) -> Work:
        return next(w for w in self.work if w.name == name)

    def stream_of(self, stage: str) -> str:
        return next(s.name for s in self.streams if stage in s.stages)


class PlanError(ValueError):
    """The graph cannot be planned (a cycle, an unknown resource)."""


def stage_work(graph: nx.DiGraph, costs: dict[str, float] | None = None) -> list[tuple]:
    """(name, stage, part, resource, cost) for every piece of work, in stage order.

    `costs` (by work name, e.g. from a measured trace) replace the nominal ones; with
    `costs`, work it does not name costs nothing (it did not run)."""
    out = []
    for stage in nx.topological_sort(graph):
        data = graph.nodes[stage]
        parts = WORK.get(data.get("kind"), (("run", data.get("resource") or "host", 0.1),))
        placed = data.get("placement")
        for part, resource, cost in parts:
            resource = placed or resource
            if resource not in RESOURCES:
                raise PlanError(f"stage {stage!r}: unknown resource {resource!r}")
            name = f"{stage}.{part}"
            out.append((name, stage, part, resource,
                        cost if costs is None else float(costs.get(name, 0.0))))
    return out


def step_graph(graph: nx.DiGraph, work) -> nx.DiGraph:
    """The work of one micro-batch: each stage's parts in a chain, stage edges between."""
    g = nx.DiGraph()
    by_stage: dict[str, list[str]] = {}
    for name, stage, _, resource, cost in work:
        g.add_node(name, resource=resource, cost=cost)
        by_stage.setdefault(stage, []).append(name)
    for chain in by_stage.values():
        nx.add_path(g, chain)
    for a, b in graph.edges:
        g.add_edge(by_stage[a][-1], by_stage[b][0])
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


def path_cover(dag: nx.DiGraph, same_class: bool) -> list[list]:
    """Minimum path cover of the transitive reduction by bipartite matching (Nimble).

    With `same_class`, only edges inside one resource class may join a chain, and edges
    that keep the same work across micro-batches are preferred (steady-state chains)."""
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


def place_events(inst: nx.DiGraph, stream_of, key) -> list[tuple]:
    """Cross-stream edges of the reduction, minus those implied by stream order + events."""
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

    Returns (overlap, period) measured over the middle of the window."""
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
    return busy_overlap(spans, t0, t1), (t1 - t0) / (b - a)


def make_plan(graph: nx.DiGraph, window: int = 12, costs: dict[str, float] | None = None) -> Plan:
    """Plan a checked stage graph onto streams (see the module docstring).

    `costs`: measured seconds (or any unit) per work name, for the prediction."""
    if not nx.is_directed_acyclic_graph(graph):
        raise PlanError("the stage graph has a cycle")
    if window < 4:
        raise PlanError("the window needs at least 4 micro-batches")
    work = stage_work(graph, costs)
    step = step_graph(graph, work)
    inst = instance_graph(step, window)

    # ours: homogeneous chains, merged per resource class
    chains = path_cover(inst, same_class=True)
    stream = {}
    for chain in chains:
        for n in chain:
            stream.setdefault(n[0], inst.nodes[n]["resource"])
    skew = skews(step, stream)
    key = _order(step, skew)
    of = lambda n: stream[n[0]]                       # noqa: E731
    overlap, period = simulate(inst, of, key, window)
    kept = place_events(inst, of, key)
    last = window - 1
    events = tuple(Event(src=u[0].rsplit(".", 1)[0], dst=v[0].rsplit(".", 1)[0],
                         src_work=u[0], dst_work=v[0], lag=v[1] - u[1],
                         host_sync=stream[v[0]] == "host")
                   for u, v in kept if v[1] == last)

    # Nimble as published: any maximum matching, one stream per chain, no skew
    nchains = path_cover(inst, same_class=False)
    nstream = {n: i for i, c in enumerate(nchains) for n in c}
    nof = lambda n: nstream[n]                        # noqa: E731
    nkey = _order(step, {w: 0 for w in step})
    noverlap, _ = simulate(inst, nof, nkey, window)
    nevents = place_events(inst, nof, nkey) if len(nchains) > 1 else []
    nimble = Baseline("nimble", len(nchains), sum(1 for _, v in nevents if v[1] == last),
                      round(noverlap, 4))

    works = tuple(Work(name, stage, part, res, cost, skew[name], stream[name])
                  for name, stage, part, res, cost in work)
    streams = []
    order = sorted(step, key=lambda w: key((w, 0)))
    for res in RESOURCES:
        mine = [w for w in order if stream[w] == res]
        if not mine:
            continue
        main = [s for s in dict.fromkeys(w.stage for w in works)
                if _main_work(graph, s, works).stream == res]
        streams.append(Stream(res, res, tuple(main), tuple(mine)))
    serial = sum(w.cost for w in works)
    return Plan(pipeline=str(graph.graph.get("name", "")), streams=tuple(streams), events=events,
                work=works, overlap=round(overlap, 4), speedup=round(serial / period, 4),
                window=window, baseline=nimble)


def _main_work(graph: nx.DiGraph, stage: str, works) -> Work:
    """The stage's work on its kind's own resource (the first piece otherwise)."""
    mine = [w for w in works if w.stage == stage]
    want = graph.nodes[stage].get("placement") or graph.nodes[stage].get("resource")
    return next((w for w in mine if w.resource == want), mine[0])


def format_plan(plan: Plan) -> str:
    """The human-readable `agp plan` report."""
    lines = [f"pipeline {plan.pipeline}: {len(plan.streams)} streams, "
             f"{len(plan.events)} events per micro-batch"]
    for s in plan.streams:
        lines.append(f"\nstream {s.name} ({s.resource}): stages {', '.join(s.stages) or '-'}")
        for name in s.work:
            w = plan.work_named(name)
            lag = f"   (micro-batch k-{w.skew})" if w.skew else ""
            lines.append(f"  {name:<22} cost {w.cost:<5g}{lag}".rstrip())
    lines.append("\nevents (recorded after -> waited on before):")
    for e in plan.events:
        k = "k-1" if e.lag else "k"
        how = "host waits" if e.host_sync else "stream waits"
        lines.append(f"  {e.src_work}[{k}] -> {e.dst_work}[k]   ({how})")
    if not plan.events:
        lines.append("  (none)")
    b = plan.baseline
    lines += [
        "",
        f"predicted steady-state overlap {plan.overlap:.2f} of wall time with >= 2 streams busy;"
        f" speedup {plan.speedup:.2f}x over serial",
        f"Nimble's plan of the same window: {b.streams} streams, {b.events_per_step} events per"
        f" micro-batch, overlap {b.overlap:.2f}",
    ]
    return "\n".join(lines)
