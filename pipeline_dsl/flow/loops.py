"""Bounded loops: a python stage with `max_turns` counts the calls it made for each item's
request path; past the bound the item leaves the loop along the stage's edges out of it,
without a call (graph.py checks that every cycle passes such a stage and that it has a way
out).

    loops = Loops.from_graph(graph, routes)
    if loops.leaves("tool", item.turns):      # counts the turn, or says it is one too many
        send along loops.exits["tool"]
"""
from __future__ import annotations

import networkx as nx


class Loops:
    def __init__(self, bounds: dict[str, int], exits: dict[str, list[str]]):
        self.bounds = bounds          # stage -> max_turns
        self.exits = exits            # stage -> its destinations outside its loop, in file order

    @classmethod
    def from_graph(cls, graph: nx.DiGraph, routes: dict[str, list]) -> "Loops":
        bounds = {n: d["params"]["max_turns"] for n, d in graph.nodes(data=True)
                  if (d.get("params") or {}).get("max_turns") is not None}
        comps = {n: comp for comp in nx.strongly_connected_components(graph) for n in comp}
        exits = {n: [v for v, _ in routes[n] if v not in comps.get(n, {n})] for n in bounds}
        return cls(bounds, exits)

    def __contains__(self, stage: str) -> bool:
        return stage in self.bounds

    def leaves(self, stage: str, turns: dict) -> bool:
        """True when the item has had max_turns calls here (it leaves); else count this one."""
        count = turns.get(stage, 0)
        if count >= self.bounds[stage]:
            return True
        turns[stage] = count + 1
        return False

    @staticmethod
    def turn(turns: dict) -> int:
        """The `turn` field of conditions: loops taken so far, all bounded stages together."""
        return sum(turns.values())
