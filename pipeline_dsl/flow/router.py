"""Where an item goes when it leaves a stage: a pure function of the graph's tables.

No threads, no models, no items: `choose` takes the stage, the item's type, its label and a
field getter, and returns the destinations (tests/test_flow_router.py holds it to a table).

    router = Router.from_graph(graph)
    router.choose("route", "Request", fields(data, "Request", prompt_tokens=count))  # ["batch_l"]

The rule (docs/language.md, "How a pipeline runs"): every unconditional out-edge, plus the
first conditional edge in file order whose condition holds, else the `otherwise` edge
wherever it is listed; only edges whose destination can carry the item's type (`carry`:
it takes the type and can bring it on to a respond stage) count. A request pinned to a
generate stage keeps, of those, the edges that lead to it; where none of them does, it takes the
first edge towards it, conditions aside (a classifier before the one generate stage every branch
reaches still decides the branch).
"""
from __future__ import annotations

from typing import Any, Callable

import networkx as nx

from pipeline_dsl import conditions as C

OTHERWISE = ("otherwise",)
REQUEST, GENERATED = C.REQUEST, C.GENERATED


class Router:
    def __init__(self, routes: dict[str, list], kinds: dict[str, str], carry: dict[str, frozenset],
                 reach: dict[str, set]):
        self.routes = routes          # stage -> [(destination, condition)] in file order
        self.kinds = kinds            # stage -> kind name
        self.carry = carry            # stage -> item types it can carry on to an end
        self.reach = reach            # stage -> every stage reachable from it

    @classmethod
    def from_graph(cls, graph: nx.DiGraph) -> "Router":
        from pipeline_dsl.graph import flow_types

        routes = {n: list(graph.nodes[n].get("routes") or
                          [(v, e.get("condition")) for _, v, e in graph.out_edges(n, data=True)])
                  for n in graph}
        return cls(routes, {n: graph.nodes[n].get("kind") for n in graph}, flow_types(graph)[0],
                   {n: nx.descendants(graph, n) for n in graph})

    def takes(self, stage: str, dst: str, item_kind: str) -> bool:
        """Whether the edge stage -> dst may carry an item of this type (kv_lookup's edges carry
        the request into its generate stages, whatever they give)."""
        return item_kind in self.carry.get(dst, ()) or self.kinds.get(stage) == "kv_lookup"

    def choose(self, stage: str, item_kind: str, get: Callable[[str], Any], label: str | None = None,
               pin: str | None = None) -> list[str]:
        """The destinations of an item leaving `stage` (several: copies; none: nowhere to go)."""
        routes = self.routes[stage]
        chosen = self._by_conditions(routes, stage, item_kind, get, label)
        if pin is not None and pin in self.reach.get(stage, ()):
            toward = [v for v in chosen if v == pin or pin in self.reach.get(v, ())]
            if toward:                   # the conditions chose ways that lead there: theirs is the choice
                return toward
            for v, _ in routes:          # else the path to the pinned generate stage, conditions aside
                if (v == pin or pin in self.reach.get(v, ())) and self.takes(stage, v, item_kind):
                    return [v]
        return chosen

    def _by_conditions(self, routes: list, stage: str, item_kind: str, get: Callable[[str], Any],
                       label: str | None) -> list[str]:
        chosen, held, fallback = [], False, None
        for v, cond in routes:
            if not self.takes(stage, v, item_kind):
                continue
            if cond is None:
                chosen.append(v)
            elif cond == OTHERWISE:
                if fallback is None:
                    fallback = v         # taken only once every conditional edge is looked at
            elif not held and C.evaluate(cond, get, label):
                chosen.append(v)
                held = True
        if not held and fallback is not None:
            chosen.append(fallback)
        return list(dict.fromkeys(chosen))

    def leave(self, exits: list[str], item_kind: str) -> list[str]:
        """A bounded loop's exits that can carry the item (loops.py decides when it leaves)."""
        return [v for v in dict.fromkeys(exits) if item_kind in self.carry.get(v, ())]


def fields(data: dict, item_kind: str, *, prompt_tokens: Callable[[], int], turn: int = 0,
           stream: bool = False, served_name: str = "") -> Callable[[str], Any]:
    """The getter conditions read an item's fields with (conditions.py lists them); the prompt
    is tokenised only when a condition asks for prompt_tokens."""
    req = data.get("request", data) if item_kind == GENERATED else data
    usage = data.get("usage") or {}

    def get(path: str):
        if path == "prompt_tokens":
            if item_kind == GENERATED and "prompt_tokens" in usage:
                return usage["prompt_tokens"]
            return prompt_tokens()
        if path == "turn":
            return turn
        if path == "stream":
            return stream
        if path == "model":
            return req.get("model") or served_name
        if path == "n":
            return req.get("n", 1)
        if path == "id":                 # a string field: agp run's integer ids (a line's number) too
            rid = req.get("id", C.MISSING)
            return str(rid) if isinstance(rid, int) and not isinstance(rid, bool) else rid
        if path in ("completion_tokens", "cached_tokens"):
            return usage.get(path, C.MISSING) if item_kind == GENERATED else C.MISSING
        if path in ("text", "finish_reason"):
            return data.get(path, C.MISSING) if item_kind == GENERATED else C.MISSING
        if isinstance(path, tuple):      # ("metadata", key, ...), ("headers", lower-case name)
            value: Any = req.get(path[0]) or {}
            for part in path[1:]:
                if not isinstance(value, dict) or part not in value:
                    return C.MISSING
                value = value[part]
            return value
        return req.get(path, C.MISSING)
    return get
