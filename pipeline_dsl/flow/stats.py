"""What each stage did, counted so that the numbers add up along every edge.

An item sent along an edge u -> v counts once on the edge, once in u's `items_out` and
once in v's `items_in` (the request source also counts each admitted request in). An item
that arrived ends, at its stage, in exactly one of: sent on (its copies count in
`items_out`), answered (respond), merged (join), `rejected`, `failed`, or `dropped` (its
request ended elsewhere first: another branch failed, the client left, shutdown; at a
respond stage, an answer whose request then failed);
`queued` is what arrived and was not yet taken up. tests/test_flow_property.py checks the
sums on random graphs.

Each stage that runs user code also keeps its calls' latencies (a histogram with fixed
buckets for /metrics, and recent samples for percentiles), timeouts, retries, cache hits,
`stalls` (an async call blocked its event loop), `stuck` (its calls written off, timed out
or abandoned, whose code still runs) and `lent` (the worker slots its calls of paused requests
lend to other requests: a stream stage's); the last two filled in by the runtime from its workers.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
SAMPLES = 1024                      # recent latencies kept per stage (p50 / p99 in --stats)


@dataclass
class StageCounter:
    items_in: int = 0
    items_out: int = 0
    rejected: int = 0
    failed: int = 0
    dropped: int = 0
    queued: int = 0
    busy_s: float = 0.0
    calls: int = 0                   # calls of its work (each attempt of a retried call counts)
    errors: int = 0                  # calls that raised (a Reject included) or timed out
    timeouts: int = 0
    retries: int = 0
    cache_hits: int = 0
    stalls: int = 0                  # times an async call blocked the stage's event loop
    buckets: list = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    samples: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))

    def observe(self, seconds: float, ok: bool = True) -> None:
        """One call of the stage's work took `seconds`."""
        self.calls += 1
        self.errors += not ok
        self.busy_s += seconds
        self.samples.append(seconds)
        i = 0
        while i < len(LATENCY_BUCKETS) and seconds > LATENCY_BUCKETS[i]:
            i += 1
        self.buckets[i] += 1

    def row(self, kind: str | None) -> dict:
        xs = sorted(self.samples)

        def pct(q):
            return round(xs[min(len(xs) - 1, int(q * len(xs)))], 6) if xs else None
        return {"kind": kind, "items_in": self.items_in, "items_out": self.items_out,
                "rejected": self.rejected, "failed": self.failed, "dropped": self.dropped,
                "queued": max(self.queued, 0), "busy_s": round(self.busy_s, 6), "calls": self.calls,
                "errors": self.errors, "timeouts": self.timeouts, "retries": self.retries,
                "cache_hits": self.cache_hits, "stalls": self.stalls, "stuck": 0, "lent": 0,
                "latency_p50_s": pct(0.5), "latency_p99_s": pct(0.99),
                "latency": {"buckets": [[le, n] for le, n in zip(LATENCY_BUCKETS + ("+Inf",),
                                                                  _cumulative(self.buckets))],
                            "sum_s": round(self.busy_s, 6), "count": self.calls}}


def _cumulative(counts: list[int]) -> list[int]:
    out, total = [], 0
    for c in counts:
        total += c
        out.append(total)
    return out


class FlowStats:
    """The counters of every stage and every edge (updated under the runtime's lock)."""

    def __init__(self, stages, kinds: dict[str, str | None]):
        self.stage = {n: StageCounter() for n in stages}
        self.kinds = kinds
        self.edges: Counter = Counter()

    def admit(self, source: str) -> None:
        c = self.stage[source]
        c.items_in += 1
        c.queued += 1

    def edge(self, src: str, dst: str, n: int = 1, queue: bool = True) -> None:
        """n items sent along src -> dst."""
        self.edges[(src, dst)] += n
        self.stage[src].items_out += n
        self.stage[dst].items_in += n
        if queue:
            self.stage[dst].queued += n

    def taken(self, stage: str) -> None:
        self.stage[stage].queued -= 1

    def rows(self) -> dict:
        return {n: c.row(self.kinds.get(n)) for n, c in self.stage.items()}

    def edge_rows(self) -> list[dict]:
        return [{"from": u, "to": v, "items": n} for (u, v), n in self.edges.items()]
