"""Chrome-trace JSON of an executor run: one track per stream, one span per stage instance.

    tr = Trace()
    tr.add("copy", "gen.d2h", t0, t1, micro_batch=7)   # a span timed by its caller (or CUDA events)
    tr.measured_overlap()      # time with >= 2 streams busy / wall time
    tr.add("requests", "gen.generate", t0, t1, lane=True, args={"request": key})
    tr.write("run.trace.json") # open in Perfetto (ui.perfetto.dev) or chrome://tracing

Times are seconds from `time.perf_counter()`; the file holds microseconds. Spans whose
args name a `request` are linked, in time order, by flow events (Perfetto draws the arrows
from one stage of a request to the next). Lane spans are lifetimes that overlap (a request's
generation): the file lays them on as many tracks as needed ("requests #1", "#2", ...), and
they count as no stream's work in the overlap and cost figures.
"""
from __future__ import annotations

import json
from collections import deque
from typing import NamedTuple

from pipeline_dsl.plan import busy_overlap


class Span(NamedTuple):                  # a tuple: made in one call, several a step
    stream: str
    name: str
    start: float
    end: float
    micro_batch: int
    args: dict | None = None          # e.g. {"request": "r7"} for per-item work
    lane: bool = False                # a lifetime, not work: packed onto lanes, left out of busy time


class Trace:
    def __init__(self, limit: int | None = None) -> None:
        # limit: keep only the latest spans (0: none). Threads add spans without a lock: a deque's
        # append is atomic, and readers take a snapshot (list() copies a deque in one step)
        self.spans: deque[Span] = deque(maxlen=limit)

    def add(self, stream: str, name: str, start: float, end: float, micro_batch: int = -1,
            args: dict | None = None, lane: bool = False) -> None:
        if self.spans.maxlen != 0:
            self.spans.append(Span(stream, name, start, end, micro_batch, args, lane))

    def work(self) -> list[Span]:
        """The spans of work (lane spans left out)."""
        return [s for s in list(self.spans) if not s.lane]

    def streams(self) -> list[str]:
        return list(dict.fromkeys(s.stream for s in self.work()))

    def by_stream(self, micro_batch_from: int = -1) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for s in self.work():
            if s.micro_batch < micro_batch_from:
                continue
            out.setdefault(s.stream, []).append((s.start, s.end))
        return out

    def bounds(self, spans=None) -> tuple[float, float]:
        spans = self.work() if spans is None else spans
        if not spans:
            return 0.0, 0.0
        return min(s.start for s in spans), max(s.end for s in spans)

    def measured_overlap(self) -> float:
        """Fraction of the traced wall time during which two or more streams were busy."""
        t0, t1 = self.bounds()
        return busy_overlap(self.by_stream(), t0, t1)

    def busy_s(self) -> dict[str, float]:
        """Seconds each stream was busy (overlapping spans on one stream counted once)."""
        t0, t1 = self.bounds()
        return {name: busy_overlap({name: spans, "_all": [(t0, t1)]}, t0, t1) * (t1 - t0)
                for name, spans in self.by_stream().items()}

    def hidden_fraction(self, stream: str, under: str, micro_batch_from: int = -1) -> float | None:
        """Share of `stream`'s busy time during which `under` was busy too (copy under compute),
        over the spans of micro-batches >= micro_batch_from."""
        spans = self.by_stream(micro_batch_from)
        if stream not in spans or under not in spans:
            return None
        t0, t1 = self.bounds()
        mine = busy_overlap({stream: spans[stream], "_all": [(t0, t1)]}, t0, t1) * (t1 - t0)
        if mine <= 0:
            return None
        both = busy_overlap({stream: spans[stream], under: spans[under]}, t0, t1) * (t1 - t0)
        return both / mine

    def costs(self) -> dict[str, float]:
        """Mean seconds per work name: `make_plan(graph, costs=trace.costs())` predicts
        the overlap from what was measured instead of the nominal costs."""
        total: dict[str, list[float]] = {}
        for s in self.work():
            total.setdefault(s.name, []).append(s.end - s.start)
        return {name: sum(v) / len(v) for name, v in total.items()}

    def to_chrome(self) -> dict:
        spans = sorted(list(self.spans), key=lambda s: s.start)
        t0, _ = self.bounds(spans)
        track = _lanes(spans)                            # span -> its track's name
        tids = {name: i + 1 for i, name in enumerate(dict.fromkeys(track[id(s)] for s in spans))}
        events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "agp"}}]
        events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}
                   for name, tid in tids.items()]
        events += [{"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid,
                    "args": {"sort_index": tid}} for tid in tids.values()]

        def us(t: float) -> float:
            return round((t - t0) * 1e6, 3)

        flows: dict[str, list[Span]] = {}
        for s in spans:
            events.append({"name": s.name, "cat": s.stream, "ph": "X", "pid": 1, "tid": tids[track[id(s)]],
                           "ts": us(s.start), "dur": round(max(s.end - s.start, 0.0) * 1e6, 3),
                           "args": ({"micro_batch": s.micro_batch} if s.micro_batch >= 0 else {})
                           | (s.args or {})})
            if s.args and s.args.get("request") is not None:
                flows.setdefault(str(s.args["request"]), []).append(s)
        for n, (request, chain) in enumerate(flows.items(), 1):
            if len(chain) < 2:
                continue
            for i, s in enumerate(chain):                # one arrow from each stage to the next
                ph = "s" if i == 0 else "f" if i == len(chain) - 1 else "t"
                event = {"name": "request", "cat": "request", "ph": ph, "id": n, "pid": 1,
                         "tid": tids[track[id(s)]], "ts": us(s.start), "args": {"request": request}}
                if ph != "s":
                    event["bp"] = "e"
                events.append(event)
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"measured_overlap": round(self.measured_overlap(), 4)}}

    def write(self, path: str) -> None:
        """The Chrome trace (Trace Event Format) as JSON at `path`."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_chrome(), f)


def _lanes(spans: list[Span]) -> dict[int, str]:
    """Each span's track: its stream, or for lane spans the first lane of their stream free at
    their start (interval partitioning, so overlapping lifetimes never share a track)."""
    out: dict[int, str] = {}
    free_at: dict[str, list[float]] = {}
    for s in spans:                                      # sorted by start
        if not s.lane:
            out[id(s)] = s.stream
            continue
        ends = free_at.setdefault(s.stream, [])
        k = next((i for i, end in enumerate(ends) if end <= s.start), len(ends))
        if k == len(ends):
            ends.append(s.end)
        else:
            ends[k] = s.end
        out[id(s)] = f"{s.stream} #{k + 1}"
    return out
