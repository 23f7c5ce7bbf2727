"""Prometheus metrics of `agp serve`, on a registry of their own (one per app).

Request counts by HTTP status, token counters, TTFT / inter-token / end-to-end latency
histograms and the batch-size histogram are observed as requests flow; the gauges
(queue length, running sequences, KV blocks used and cached, prefix hit rate, summed over
the pipeline's engines) and the per-stage series (items in and out, rejected, failed,
queue depth, seconds busy; label `stage`) are read from the runtime's `stats()` snapshot
each time /metrics is scraped.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
               0.75, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)

# engine.stats() key -> gauge name; the first key present wins
GAUGES = {
    "queue_length": ("Requests waiting to be scheduled", ("waiting", "num_waiting", "queue_length")),
    "running_sequences": ("Sequences being prefilled or decoded",
                          ("running", "num_running", "running_sequences")),
    "kv_blocks_used": ("KV blocks referenced by live sequences",
                       ("kv_blocks_used", "blocks_used", "used_blocks")),
    "kv_blocks_cached": ("Unreferenced KV blocks kept for prefix reuse",
                         ("kv_blocks_cached", "blocks_cached", "cached_blocks")),
    "kv_blocks_total": ("KV blocks in the pool", ("kv_blocks_total", "num_blocks", "blocks_total")),
}


STAGE_SERIES = (  # (stats key, metric name, type, help)
    ("items_in", "stage_items_in", "counter", "Items that reached the stage"),
    ("items_out", "stage_items_out", "counter", "Items the stage sent on"),
    ("rejected", "stage_rejected", "counter", "Requests the stage refused (bad input, Reject)"),
    ("failed", "stage_failed", "counter", "Requests that failed in the stage"),
    ("queued", "stage_queue_depth", "gauge", "Items waiting for the stage"),
    ("busy_s", "stage_busy_seconds", "counter", "Seconds the stage spent working"),
)


class _Snapshot:
    """A collector over the latest stats snapshot: per-stage series."""

    def __init__(self, namespace: str):
        self.ns = namespace
        self.stats: dict = {}

    def collect(self):
        stages = self.stats.get("stages") or {}
        for key, name, kind, doc in STAGE_SERIES:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                f"{self.ns}_{name}", doc, labels=["stage", "kind"])
            for stage, row in stages.items():
                family.add_metric([stage, str(row.get("kind"))], float(row.get(key, 0) or 0))
            yield family


def engine_totals(stats: dict) -> dict:
    """One flat dict of the engines' counters (summed; the hit rate over all their prompts)."""
    engines = list((stats.get("engines") or {}).values())
    if not engines:
        return {k: v for k, v in stats.items() if not isinstance(v, dict)}
    out: dict = {}
    for e in engines:
        for k, v in e.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    queried = out.get("kv_queried_tokens", 0)
    out["kv_hit_rate"] = out.get("kv_hit_tokens", 0) / queried if queried else 0.0
    return out


def stat(stats: dict, keys: tuple[str, ...], default=None):
    for key in keys:
        if stats.get(key) is not None:
            return stats[key]
    return default


class ServerMetrics:
    def __init__(self, namespace: str = "agp"):
        self.registry = CollectorRegistry()
        r, ns = self.registry, namespace
        self.requests = Counter("requests", "HTTP generation requests by status code",
                                ["status"], namespace=ns, registry=r)
        self.finished = Counter("requests_finished", "Finished sequences by finish reason",
                                ["reason"], namespace=ns, registry=r)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of admitted requests",
                                     namespace=ns, registry=r)
        self.cached_tokens = Counter("prompt_tokens_cached",
                                     "Prompt tokens served from the prefix cache",
                                     namespace=ns, registry=r)
        self.generation_tokens = Counter("generation_tokens", "Generated tokens",
                                         namespace=ns, registry=r)
        self.ttft = Histogram("time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.itl = Histogram("inter_token_latency_seconds", "Time between generated tokens",
                             buckets=ITL_BUCKETS, namespace=ns, registry=r)
        self.e2e = Histogram("e2e_request_latency_seconds", "Request arrival to last token",
                             buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.batch_size = Histogram("batch_size", "Sequences that produced output in one step",
                                    buckets=BATCH_BUCKETS, namespace=ns, registry=r)
        self.gauges = {name: Gauge(name, doc, namespace=ns, registry=r)
                       for name, (doc, _) in GAUGES.items()}
        self.hit_rate = Gauge("prefix_cache_hit_rate",
                              "Share of prompt tokens served from the prefix cache",
                              namespace=ns, registry=r)
        self.in_flight = Gauge("requests_in_flight", "HTTP generation requests being served",
                               namespace=ns, registry=r)
        self.prompt_total = 0                  # plain mirrors of the counters for the hit rate
        self.cached_total = 0
        self.snapshot = _Snapshot(ns)
        r.register(self.snapshot)

    def observe_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A request's prompt was scheduled; `cached_tokens` of it came from the prefix cache."""
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.prompt_total += prompt_tokens
        self.cached_total += cached_tokens

    def update_engine(self, stats: dict) -> None:
        self.snapshot.stats = stats
        stats = engine_totals(stats)
        for name, (_, keys) in GAUGES.items():
            value = stat(stats, keys)
            if value is not None:
                self.gauges[name].set(value)
        rate = stat(stats, ("kv_hit_rate", "prefix_hit_rate", "prefix_cache_hit_rate"))
        if rate is None:
            rate = self.cached_total / self.prompt_total if self.prompt_total else 0.0
        self.hit_rate.set(rate)

    def render(self, stats: dict) -> tuple[bytes, str]:
        self.update_engine(stats)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
