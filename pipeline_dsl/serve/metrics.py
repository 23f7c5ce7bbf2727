"""Prometheus metrics of `agp serve`, on a registry of their own (one per app).

Every series carries a `model_name` label (the first served model name). Each metric is
exported under agp's name (`agp_…`) and, where vLLM has one, under vLLM's too (`vllm:…`, with
vLLM's `engine` label: the index of the pipeline's engine, "0" for the first), so a Grafana
dashboard or a gateway written for vLLM reads agp unchanged:

    vllm:num_requests_running / _waiting     gauges (waiting: every pipeline queue before generation)
    vllm:kv_cache_usage_perc, gpu_cache_usage_perc   gauges, KV blocks in use / blocks in the pool (0..1)
    vllm:cache_config_info                   gauge 1 with the KV cache's block_size, blocks, prefix caching
    vllm:prompt_tokens_total / generation_tokens_total (each engine's own: a cascade's draft counts
        on the engine that drafted it), num_preemptions_total,
    vllm:prefix_cache_queries_total / _hits_total (tokens), request_success_total{finished_reason}
    vllm:time_to_first_token_seconds, inter_token_latency_seconds, e2e_request_latency_seconds,
    vllm:request_queue_time_seconds, request_prefill_time_seconds, request_decode_time_seconds,
    vllm:request_inference_time_seconds, request_time_per_output_token_seconds,
    vllm:time_per_output_token_seconds (vLLM's older name of inter_token_latency_seconds),
    vllm:request_prompt_tokens, request_generation_tokens, request_max_num_generation_tokens,
    vllm:request_params_n, request_params_max_tokens, iteration_tokens_total     histograms

Every series without labels of its own, and request_success_total for each of vLLM's finish reasons
(stop, length, abort), exists at 0 from the start, on every engine, as vLLM's do: a dashboard's
`label_values(vllm:request_success_total, model_name)` finds the model before the first request
finishes, and rate() counts a series' first increase.

Request-level series are observed as requests finish (finish reasons by the serving layer, which
knows a tool call from a stop); the gauges, the engines' cumulative counters (generated tokens,
aborted requests' too; preemptions; prefix-cache queries and hits; tokens per step) and the
per-stage series (`stage`, `kind` labels) are read from the runtime's `stats()` snapshot at each
scrape. The prefix hit-rate gauge is over the last `window_s` seconds, not the server's lifetime.
No `_created` series are written; process metrics (CPU, memory, open files) are.
"""
from __future__ import annotations

import gzip
import time
from collections import deque

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


prometheus_client.disable_created_metrics()     # a `_created` series would double every counter

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
               0.75, 1.0, 2.0, 5.0)
# vLLM's own boundaries (vllm/v1/metrics/loggers.py), merged into agp's: a selector written for vLLM
# (`_bucket{le="120"}`) finds its bucket, and a quantile above agp's finer top bucket is not cut at it
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
VLLM_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                        120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def merged(*bounds) -> tuple[float, ...]:
    return tuple(sorted({float(b) for bs in bounds for b in bs}))


TTFT_BUCKETS = merged(LATENCY_BUCKETS, VLLM_TTFT_BUCKETS)
STEP_BUCKETS = merged(ITL_BUCKETS, VLLM_ITL_BUCKETS)
REQUEST_BUCKETS = merged(LATENCY_BUCKETS, VLLM_REQUEST_BUCKETS)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)   # vLLM's
N_BUCKETS = (1, 2, 5, 10, 20)
TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))   # 1 .. 500000

FINISH_REASONS = ("stop", "length", "abort")      # vLLM's; agp adds tool_calls when one is parsed
OLDER_NAMES = {"inter_token_latency_seconds": ("time_per_output_token_seconds",)}   # vLLM before 0.11

HISTOGRAMS = (  # (attribute, name, help, buckets)
    ("ttft", "time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS),
    ("itl", "inter_token_latency_seconds", "Time between generated tokens", STEP_BUCKETS),
    ("e2e", "e2e_request_latency_seconds", "Request arrival to its answer", REQUEST_BUCKETS),
    ("queue_time", "request_queue_time_seconds", "Arrival at the engine to first scheduled", REQUEST_BUCKETS),
    ("prefill_time", "request_prefill_time_seconds", "First scheduled to first token", REQUEST_BUCKETS),
    ("decode_time", "request_decode_time_seconds", "First token to last token", REQUEST_BUCKETS),
    ("inference_time", "request_inference_time_seconds", "First scheduled to last token (running)",
     REQUEST_BUCKETS),
    ("tpot", "request_time_per_output_token_seconds", "A request's decode time per token after its first",
     STEP_BUCKETS),
    ("request_prompt", "request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS),
    ("request_generation", "request_generation_tokens", "Generated tokens per request", TOKEN_BUCKETS),
    ("max_generation", "request_max_num_generation_tokens",
     "The tokens of a request's longest choice (of its n; with one choice its generated tokens)", TOKEN_BUCKETS),
    ("params_n", "request_params_n", "The n request parameter", N_BUCKETS),
    ("params_max_tokens", "request_params_max_tokens", "The max_tokens request parameter (when given)",
     TOKEN_BUCKETS),
)

# engine.stats() key -> gauge name; the first key present wins
GAUGES = {
    "queue_length": ("Requests waiting to be scheduled", ("waiting", "num_waiting", "queue_length")),
    "running_sequences": ("Sequences being prefilled or decoded",
                          ("running", "num_running", "running_sequences")),
    "kv_blocks_used": ("KV blocks referenced by live sequences",
                       ("kv_blocks_used", "blocks_used", "used_blocks")),
    "kv_blocks_cached": ("Unreferenced KV blocks kept for prefix reuse",
                         ("kv_blocks_cached", "blocks_cached", "cached_blocks")),
    "kv_pool_blocks": ("KV blocks in the pool", ("kv_blocks_total", "num_blocks", "blocks_total")),
}

STAGE_SERIES = (  # (stats key, metric name, type, help)
    ("items_in", "stage_items_in", "counter", "Items that reached the stage"),
    ("items_out", "stage_items_out", "counter", "Items the stage sent on"),
    ("rejected", "stage_rejected", "counter", "Requests the stage refused (bad input, Reject)"),
    ("failed", "stage_failed", "counter", "Requests that failed in the stage"),
    ("dropped", "stage_dropped", "counter", "Items dropped because their request ended elsewhere first"),
    ("timeouts", "stage_timeouts", "counter", "Calls past the stage's timeout"),
    ("retries", "stage_retries", "counter", "Calls tried again after a transient error"),
    ("cache_hits", "stage_cache_hits", "counter", "Calls answered from the stage's cache"),
    ("stalls", "stage_stalls", "counter", "Times an async function blocked its stage's event loop for a second or more"),
    ("queued", "stage_queue_depth", "gauge", "Items waiting for the stage"),
    ("busy_s", "stage_busy_seconds", "counter", "Seconds the stage spent working"),
    ("stuck", "stage_stuck_calls", "gauge", "Calls written off (timed out, request ended) whose code still runs"),
    ("lent", "stage_lent_slots", "gauge", "Worker slots lent to other requests by calls whose request is paused "
                                          "(stream stages)"),
)


def engine_totals(stats: dict) -> dict:
    """One flat dict of the engines' counters (summed; the hit rate over all their prompts, the
    mean batch size over all their decode steps, the peak memory the process's: each engine
    reports the same; the weights' bytes each loaded copy's once)."""
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
    steps = out.get("decode_steps", 0)
    if "mean_batch_size" in out:          # over all their decode steps, not the sum of each one's mean
        out["mean_batch_size"] = sum((e.get("mean_batch_size") or 0) * e.get("decode_steps", 0)
                                     for e in engines) / steps if steps else 0.0
    if "peak_memory_bytes" in out:        # the process's (or its device's), not one per engine
        out["peak_memory_bytes"] = max(e.get("peak_memory_bytes") or 0 for e in engines)
    if "weight_bytes" in out and stats.get("models"):   # each loaded copy once: engines on the same
        out["weight_bytes"] = stats["models"]["weight_bytes"]   # weights share one (LoadedModels)
    return out


def waiting(stats: dict) -> int:
    """Requests not yet generating: the engines' waiting queues and every request-level stage's."""
    stages = stats.get("stages") or {}
    if not stages:
        return int(stat(engine_totals(stats), GAUGES["queue_length"][1], 0))
    return int(sum(row.get("queued", 0) or 0 for row in stages.values() if row.get("kind") != "generate"))


def stat(stats: dict, keys: tuple[str, ...], default=None):
    for key in keys:
        if stats.get(key) is not None:
            return stats[key]
    return default


class Window:
    """Cumulative counters sampled over time; `delta(key)` is their growth over the last
    `horizon_s` seconds (from the oldest sample still inside it)."""

    def __init__(self, horizon_s: float, clock=time.monotonic):
        self.horizon_s, self.clock = horizon_s, clock
        self.samples: deque[tuple[float, dict]] = deque()

    def add(self, totals: dict) -> None:
        now = self.clock()
        self.samples.append((now, totals))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.horizon_s:
            self.samples.popleft()

    def delta(self, key: str) -> float:
        if len(self.samples) < 2:
            return 0.0
        return float(self.samples[-1][1].get(key, 0) or 0) - float(self.samples[0][1].get(key, 0) or 0)

    def seconds(self) -> float:
        return self.samples[-1][0] - self.samples[0][0] if len(self.samples) >= 2 else 0.0

    def hit_rate(self) -> float:
        """Share of the prompt tokens looked up in the window that the prefix cache served."""
        queried = self.delta("kv_queried_tokens")
        return self.delta("kv_hit_tokens") / queried if queried > 0 else 0.0


def counts_histogram(name: str, doc: str, counts: dict, bounds, labels: dict) -> HistogramMetricFamily:
    """A histogram family from exact {value: count} (cumulative since start)."""
    counts = {int(k): int(n) for k, n in counts.items()}
    buckets = [(str(b), sum(n for s, n in counts.items() if s <= b)) for b in bounds]
    buckets.append(("+Inf", sum(counts.values())))
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    fam.add_metric(list(labels.values()), buckets, sum_value=float(sum(s * n for s, n in counts.items())))
    return fam


def batch_histogram(stats: dict, model: str) -> HistogramMetricFamily:
    """agp_batch_size from the engines' step counts by batch size (cumulative since start)."""
    counts: dict[int, int] = {}
    for e in (stats.get("engines") or {}).values():
        for size, n in (e.get("batch_size_hist") or {}).items():
            counts[int(size)] = counts.get(int(size), 0) + int(n)
    return counts_histogram("agp_batch_size", "Sequences in one engine step", counts, BATCH_BUCKETS,
                            {"model_name": model})


def stage_latency(stats: dict, model: str) -> HistogramMetricFamily:
    """agp_stage_latency_seconds{stage, kind}: each stage's calls (built-in work and user
    functions, each attempt of a retried call) from the runtime's per-stage histograms; the
    errors by stage are agp_stage_failed and agp_stage_rejected (a timeout fails its request)."""
    fam = HistogramMetricFamily("agp_stage_latency_seconds", "Seconds one call of a stage's work took",
                                labels=["model_name", "stage", "kind"])
    for stage, row in (stats.get("stages") or {}).items():
        lat = row.get("latency")
        if lat:
            fam.add_metric([model, stage, str(row.get("kind"))], [(str(le), n) for le, n in lat["buckets"]],
                           sum_value=float(lat["sum_s"]))
    return fam


class _Metric:
    """One metric under agp's name and (when given) vLLM's, every series labelled model_name; the
    vLLM series also `engine` (the index of the engine it is about, "0" by default)."""

    def __init__(self, kind, registry, model_name: str, agp: str, vllm: str | None, doc: str,
                 labels: tuple[str, ...] = (), older: tuple[str, ...] = (), engines: tuple[str, ...] = ("0",),
                 **kw):
        self.agp = kind(f"agp_{agp}", doc, ["model_name", *labels], registry=registry, **kw)
        self.vllm = [kind(f"vllm:{name}", doc, ["model_name", "engine", *labels], registry=registry, **kw)
                     for name in ((vllm, *older) if vllm else ())]       # vLLM's name, then its older ones
        self.model_name = model_name
        if not labels:       # its series exist from the start, at 0 (as vLLM's): rate() works from the first scrape
            for engine in engines:
                self.labels(engine=engine)
        # a metric without labels keeps engine 0's series, not looked up again per observation
        # (per streamed token)
        self.plain = self.labels() if not labels else None

    def labels(self, *values, engine: str = "0") -> "_Children":
        values = tuple(map(str, values))
        return _Children([self.agp.labels(self.model_name, *values),
                          *(m.labels(self.model_name, engine, *values) for m in self.vllm)])

    def inc_by_engine(self, total: float, shares: dict[str, float]) -> None:
        """agp's series by `total` (the request's), vLLM's by each engine's share ({index: amount})."""
        self.agp.labels(self.model_name).inc(total)
        for m in self.vllm:
            for engine, n in shares.items():
                m.labels(self.model_name, engine).inc(n)

    def __getattr__(self, name):                 # inc / observe / set / dec without extra labels
        plain = self.__dict__.get("plain")
        return getattr(plain if plain is not None else self.labels(), name)


class _Children:
    def __init__(self, children):
        self.children = children

    def inc(self, amount: float = 1) -> None:
        for c in self.children:
            c.inc(amount)

    def dec(self, amount: float = 1) -> None:
        for c in self.children:
            c.dec(amount)

    def set(self, value: float) -> None:
        for c in self.children:
            c.set(value)

    def observe(self, value: float) -> None:
        for c in self.children:
            c.observe(value)


class _Snapshot:
    """Series read from the latest stats snapshot: engine state, cumulative engine counters, stages."""

    def __init__(self, owner: "ServerMetrics"):
        self.owner = owner
        self.stats: dict = {}

    def collect(self):
        stats, model = self.stats, self.owner.model_name
        totals = engine_totals(stats)
        used, total = stat(totals, GAUGES["kv_blocks_used"][1], 0), stat(totals, GAUGES["kv_pool_blocks"][1], 0)

        def family(kind, name, doc, value, extra_labels=()):
            fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, doc, labels=["model_name", *(k for k, _ in extra_labels)])
            fam.add_metric([model, *(v for _, v in extra_labels)], float(value))
            return fam

        for name, (doc, keys) in GAUGES.items():
            yield family("gauge", f"agp_{name}", doc, stat(totals, keys, 0) or 0)
        for kind, name, doc, value in self.series(totals, waiting(stats), used / total if total else 0.0):
            yield family(kind, f"agp_{name}", doc, value)
        yield from self.per_engine(stats)
        yield family("gauge", "agp_prefix_cache_hit_rate",
                     f"Share of prompt tokens served from the prefix cache over the last "
                     f"{self.owner.window.horizon_s:g} s", self.owner.window.hit_rate())
        yield batch_histogram(stats, model)
        yield stage_latency(stats, model)
        stages = stats.get("stages") or {}
        for key, name, kind, doc in STAGE_SERIES:
            fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                f"agp_{name}", doc, labels=["model_name", "stage", "kind"])
            for stage, row in stages.items():
                fam.add_metric([model, stage, str(row.get("kind"))], float(row.get(key, 0) or 0))
            yield fam
        edges = CounterMetricFamily("agp_edge_items", "Items sent along an edge of the pipeline",
                                    labels=["model_name", "from", "to"])
        for edge in stats.get("edges") or ():
            edges.add_metric([model, str(edge.get("from")), str(edge.get("to"))], float(edge.get("items", 0) or 0))
        yield edges

    @staticmethod
    def series(e: dict, waiting_now: int, usage: float):
        """(type, name, help, value) of the engine series agp and vLLM both name, for one engine's
        counters (or all engines' summed)."""
        return (
            ("gauge", "num_requests_running", "Requests being prefilled or decoded",
             stat(e, GAUGES["running_sequences"][1], 0)),
            ("gauge", "num_requests_waiting", "Requests waiting in a queue of the pipeline", waiting_now),
            ("gauge", "kv_cache_usage_perc", "KV-cache usage: blocks in use / blocks in the pool (1 = full)", usage),
            ("counter", "num_preemptions", "Sequences preempted for KV blocks", e.get("preemptions", 0)),
            ("counter", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
             e.get("kv_queried_tokens", 0)),
            ("counter", "prefix_cache_hits", "Prompt tokens the prefix cache served", e.get("kv_hit_tokens", 0)),
            ("counter", "generation_tokens", "Generated tokens (aborted requests' too)", e.get("generated_tokens", 0)),
            ("counter", "spec_decode_num_drafts", "Steps of a sequence that verified drafted tokens "
             "(speculative decoding)", e.get("spec_drafts", 0)),
            ("counter", "spec_decode_num_draft_tokens", "Drafted tokens verified", e.get("spec_draft_tokens", 0)),
            ("counter", "spec_decode_num_accepted_tokens", "Drafted tokens accepted",
             e.get("spec_accepted_tokens", 0)),
        )

    def per_engine(self, stats: dict):
        """vLLM's names, one series per engine (label `engine`: its index); the pipeline's queues
        before its engines count as the first engine's waiting requests."""
        model = self.owner.model_name
        engines = list((stats.get("engines") or {}).values())
        ahead = waiting(stats) - sum(int(stat(e, GAUGES["queue_length"][1], 0)) for e in engines)
        fams: dict[str, object] = {}
        for i, e in enumerate(engines):
            used, total = stat(e, GAUGES["kv_blocks_used"][1], 0), stat(e, GAUGES["kv_pool_blocks"][1], 0)
            usage = used / total if total else 0.0
            queue = int(stat(e, GAUGES["queue_length"][1], 0)) + (ahead if i == 0 else 0)
            labels = [model, str(i)]
            for kind, name, doc, value in (*self.series(e, queue, usage),
                                           ("gauge", "gpu_cache_usage_perc", "KV-cache usage (vLLM's older name "
                                            "of kv_cache_usage_perc)", usage)):
                if name not in fams:
                    fams[name] = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                        f"vllm:{name}", doc, labels=["model_name", "engine"])
                fams[name].add_metric(labels, float(value))
            info = {"model_name": model, "engine": str(i), "block_size": str(e.get("kv_block_size", "")),
                    "num_gpu_blocks": str(e.get("kv_blocks_total", "")), "num_cpu_blocks": "0",
                    "enable_prefix_caching": str(bool(e.get("kv_prefix_reuse", True))),
                    "cache_dtype": str(e.get("dtype", "auto"))}
            name = "cache_config_info"
            if name not in fams:
                fams[name] = GaugeMetricFamily("vllm:cache_config_info", "The KV cache's configuration (value 1)",
                                               labels=list(info))
            fams[name].add_metric(list(info.values()), 1.0)
            name = "lora_requests_info"         # vLLM's: the adapters of running and waiting requests (value: now)
            if name not in fams:
                fams[name] = GaugeMetricFamily(
                    "vllm:lora_requests_info", "Running stats on LoRA requests (value: the time of the scrape)",
                    labels=["model_name", "engine", "max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            fams[name].add_metric([model, str(i), str(len(e.get("lora_adapters") or ())),
                                   ",".join(e.get("lora_waiting") or ()), ",".join(e.get("lora_running") or ())],
                                  time.time())
            yield counts_histogram("vllm:iteration_tokens_total", "Number of tokens per engine_step (prompt tokens of prefills that end in it + tokens generated)",
                                   e.get("iteration_tokens_hist") or {}, STEP_TOKEN_BUCKETS,
                                   {"model_name": model, "engine": str(i)})
        yield from fams.values()


class ServerMetrics:
    def __init__(self, model_name: str = "agp", window_s: float = 60.0, process: bool = True,
                 engine_of: dict[str, str] | None = None):
        self.model_name = model_name
        self.engine_of = dict(engine_of or {})    # generate stage or engine name -> the index of its engine
        self.registry = r = CollectorRegistry()
        engines = tuple(sorted({"0", *self.engine_of.values()}, key=lambda e: (len(e), e)))

        def metric(kind, agp, vllm, doc, labels=(), **kw):
            return _Metric(kind, r, model_name, agp, vllm, doc, labels, engines=engines, **kw)

        self.requests = metric(Counter, "requests", None, "HTTP generation requests by status code", ("status",))
        self.finished = metric(Counter, "requests_finished", "request_success",
                               "Finished requests by finish reason", ("finished_reason",))
        for engine in engines:                  # vLLM's finish reasons, at 0 from the start
            for reason in FINISH_REASONS:
                self.finished.labels(reason, engine=engine)
        self.prompt_tokens = metric(Counter, "prompt_tokens", "prompt_tokens",
                                    "Prompt tokens of finished requests and of prefilled ones that failed or were aborted")
        self.cached_tokens = metric(Counter, "prompt_tokens_cached", None,
                                    "Prompt tokens served from the prefix cache")
        for attr, name, doc, buckets in HISTOGRAMS:       # each under agp's and vLLM's (same) name
            setattr(self, attr, metric(Histogram, name, name, doc, buckets=buckets, older=OLDER_NAMES.get(name, ())))
        self.in_flight = metric(Gauge, "requests_in_flight", None, "HTTP generation requests being served")
        self.bodies_arriving = metric(Gauge, "http_bodies_arriving", None,
                                      "HTTP requests whose body is still arriving (they hold no --max-connections slot)")
        self.body_bytes_arriving = metric(Gauge, "http_body_bytes_arriving", None,
                                          "Bytes held by request bodies still arriving (--max-body-bytes-arriving)")
        self.unread_cuts = metric(Counter, "streams_cut_unread", None,
                                  "Streams aborted because their client left more than --max-unread-tokens unread, "
                                  "or had not taken them --send-timeout after its stream paused for it")
        self.streams_paused = metric(Counter, "streams_paused", None,
                                     "Times a stream's generation was paused because its client took nothing or left more "
                                     "than --pause-unread-tokens unread (its sequences out of the batch, KV freed)")
        # every HTTP request by route, as prometheus-fastapi-instrumentator's series (vLLM's
        # http_requests_total): `handler` is the route's path template, "none" for no route
        self.http = metric(Counter, "http_requests", None, "HTTP requests by route, method and status",
                           ("handler", "method", "status"))
        self.http_latency = metric(Histogram, "http_request_duration_seconds", None,
                                   "HTTP request duration by route and method (a stream: to its last byte)",
                                   ("handler", "method"), buckets=LATENCY_BUCKETS)
        self.window = Window(window_s)
        self.snapshot = _Snapshot(self)
        r.register(self.snapshot)
        if process:
            ProcessCollector(registry=r)

    def observe_http(self, handler: str, method: str, status: int, seconds: float) -> None:
        self.http.labels(handler, method, status).inc()
        self.http_latency.labels(handler, method).observe(seconds)

    def engine(self, result) -> str:
        """The index of the engine that answered the request (its first choice's generate stage;
        the first engine's where that names none: a stage after generate may write any JSON value
        as `generated_by`)."""
        gen = next((c.data.get("generated_by") for c in result.choices if isinstance(c.data, dict)), None)
        return self.engine_of.get(gen, "0") if isinstance(gen, str) else "0"

    def engine_shares(self, result, key: str) -> dict[str, int]:
        """{engine index: its tokens of kind `key`} of the request (Result.engine_usage): a
        cascade's draft on the engine that drafted it, its answer on the one that answered."""
        shares: dict[str, int] = {}
        for name, usage in result.engine_usage.items():
            index = self.engine_of.get(name, "0")
            shares[index] = shares.get(index, 0) + usage.get(key, 0)
        return shares

    # ---- observed as requests run (any thread) ----------------------------------------
    def observe_result(self, result, latency_s: float, params: dict | None = None,
                       prefilled: bool = False, choice_latency: dict | None = None,
                       choices_prefilled: int = 1) -> None:
        """A request finished: tokens, latencies, its engine's queue / prefill / decode times, and
        its n and max_tokens parameters (`params`). Its finish reasons are the serving layer's to
        count (count_finished), but for a request aborted on the way. The prompt tokens of one
        that failed or was aborted count when it was `prefilled` (its first token came), as vLLM
        counts a prompt once prefilled and as its generated tokens count: agp_prompt_tokens the
        request's, vllm:prompt_tokens{engine} each engine's (a cascade's draft prompt on the engine
        that drafted; a prompt a python stage answered without an engine on none).

        Each of its n choices is one request to vLLM's metrics, as vLLM v1 runs a request of n as n
        child requests (vllm/v1/engine/parallel_sampling.py): an aborted one counts n aborts (vLLM
        finishes each child as aborted), vllm:prompt_tokens counts the prompt
        once a choice (`choices_prefilled` of a failed one), and the per-request histograms (latency,
        queue / prefill / decode / inference times, time per output token, prompt and generation
        tokens, max_tokens) take one observation a choice, the end-to-end latency the choice's own
        (`choice_latency`: {the index its deltas carried: seconds to its last token}), its generation tokens its
        own; the request's n and its longest choice are observed once, as vLLM observes them on the
        parent request."""
        usage, timings, engine = result.usage, result.metrics or {}, self.engine(result)
        choices = len(result.choices) if result.error is None else choices_prefilled
        choices = max(choices, 1)
        if result.error is None or prefilled:      # vLLM's per engine: what each engine took of it
            self.prompt_tokens.inc_by_engine(usage.get("prompt_tokens", 0),
                                             {e: n * choices for e, n in
                                              self.engine_shares(result, "prompt_tokens").items()})
            self.cached_tokens.labels(engine=engine).inc(usage.get("cached_tokens", 0))
        params = params or {}
        if result.error is not None:
            if result.error.kind == "aborted":      # each of its n choices, as vLLM aborts each child
                self.finished.labels("abort", engine=engine).inc(int(params.get("n") or 1))
            return
        longest = result.longest_choice_tokens()
        if longest is None:                   # choices that do not count their own: their shared usage
            longest = -(-usage.get("completion_tokens", 0) // max(len(result.choices), 1))
        generated = [usage.get("completion_tokens", 0)]   # one choice: all the request generated
        if len(result.choices) > 1:
            own = [(c.data.get("usage") or {}).get("completion_tokens") if isinstance(c.data, dict) else None
                   for c in result.choices]
            generated = own if None not in own else [longest] * len(own)
        ends = [(choice_latency or {}).get(c.index if c.delta_index is None else c.delta_index, latency_s)
                for c in result.choices] or [latency_s]
        tpot = (result.time_per_output_token(max(timings["decode_s"], 0.0))
                if timings.get("decode_s") is not None else None)
        for k in range(choices):
            self.e2e.labels(engine=engine).observe(ends[k] if k < len(ends) else latency_s)
            self.request_prompt.labels(engine=engine).observe(usage.get("prompt_tokens", 0))
            self.request_generation.labels(engine=engine).observe(generated[k] if k < len(generated) else longest)
            for key, hist in (("queue_s", self.queue_time), ("prefill_s", self.prefill_time),
                              ("decode_s", self.decode_time)):
                if timings.get(key) is not None:
                    hist.labels(engine=engine).observe(max(float(timings[key]), 0.0))
            if timings.get("prefill_s") is not None and timings.get("decode_s") is not None:
                self.inference_time.labels(engine=engine).observe(max(timings["prefill_s"] + timings["decode_s"],
                                                                      0.0))
            if tpot is not None:
                self.tpot.labels(engine=engine).observe(tpot)
            if params.get("max_tokens") is not None:
                self.params_max_tokens.labels(engine=engine).observe(int(params["max_tokens"]))
        self.max_generation.labels(engine=engine).observe(longest)
        self.params_n.labels(engine=engine).observe(int(params.get("n") or 1))

    def count_finished(self, reasons, engine: str = "0") -> None:
        """Finished choices by the finish reason their answer gave (stop, length, tool_calls)."""
        for reason in reasons:
            self.finished.labels(reason or "stop", engine=engine).inc()

    # ---- read at each scrape ----------------------------------------------------------
    def update_engine(self, stats: dict) -> None:
        self.snapshot.stats = stats
        self.window.add(engine_totals(stats))

    def render(self, stats: dict, accept: str = "") -> tuple[bytes, str]:
        """(the scrape's body, its Content-Type) for a scraper whose Accept header is `accept`,
        never compressed (a replica's push to the ingress)."""
        body, content_type, _ = self.scrape(stats, accept)
        return body, content_type

    def scrape(self, stats: dict, accept: str = "", accept_encoding: str = "") -> tuple[bytes, str, dict[str, str]]:
        """The answer to a GET /metrics (`exposition`) whose Accept and Accept-Encoding headers are these."""
        self.update_engine(stats)
        return exposition(self.registry, accept, accept_encoding)


def exposition(registry, accept: str = "", accept_encoding: str = "") -> tuple[bytes, str, dict[str, str]]:
    """(body, Content-Type, other headers) of a GET /metrics answering `registry` to a scraper whose
    Accept and Accept-Encoding headers are `accept` and `accept_encoding`: the text format in the
    version Accept asks for (`text_exposition`), gzipped when Accept-Encoding takes gzip
    (`gzip_wanted`: Prometheus asks for it on every scrape), with `Vary: Accept, Accept-Encoding`.
    `agp serve`'s /metrics and the ingress of `agp serve --ray` (its replicas merged) both answer so."""
    encode, content_type = text_exposition(accept)
    body, headers = encode(registry), {"Vary": "Accept, Accept-Encoding"}
    if gzip_wanted(accept_encoding):
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    return body, content_type, headers


def text_exposition(accept: str) -> tuple:
    """(encoder, Content-Type) of Prometheus' text format in the version a scraper's Accept header
    asks for, by prometheus-client's own negotiation: 0.0.4 (`text/plain; version=0.0.4;
    charset=utf-8`, what a plain scrape gets, as vLLM's) unless it names text/plain version 1.0.0
    (Prometheus 3 does, after OpenMetrics). Never OpenMetrics, whatever it prefers: prometheus-client
    writes each sample of a `vllm:` metric there as `vllm_…` (docs/serve.md)."""
    text = [a for a in (accept or "").split(",") if a.split(";")[0].strip().lower() != "application/openmetrics-text"]
    return choose_encoder(",".join(text))


def gzip_wanted(accept_encoding: str) -> bool:
    """Whether a scrape's Accept-Encoding takes gzip, as prometheus-client's exposition decides it
    (vLLM's /metrics answers gzip then; Prometheus asks for it on every scrape), save that
    `gzip;q=0` refuses it (RFC 9110)."""
    if not gzip_accepted(accept_encoding):
        return False
    for coding in accept_encoding.split(","):
        name, *params = (part.strip().lower() for part in coding.split(";"))
        if name == "gzip":
            q = next((p[2:].strip() for p in params if p.startswith("q=")), "1")
            try:
                return float(q) > 0
            except ValueError:
                return True
    return True


class StatsLine:
    """The periodic log line: what the server did since the previous line."""

    def __init__(self, clock=time.monotonic):
        self.window = Window(float("inf"), clock)

    def __call__(self, stats: dict) -> dict | None:
        """The line's numbers, or None when nothing ran or waited since the last line."""
        totals = engine_totals(stats)
        self.window.add(totals)
        running, queued = stat(totals, GAUGES["running_sequences"][1], 0), waiting(stats)
        w = self.window
        seconds = w.seconds()
        gen, pre = w.delta("generated_tokens"), w.delta("prefill_tokens")
        used, total = totals.get("kv_blocks_used", 0), totals.get("kv_blocks_total", 0)
        line = {"running": int(running), "waiting": int(queued),
                "prompt_tok_s": round(pre / seconds, 1) if seconds else 0.0,
                "gen_tok_s": round(gen / seconds, 1) if seconds else 0.0,
                "kv_usage": round(used / total, 3) if total else 0.0,
                "prefix_hit_rate": round(w.hit_rate(), 3)}
        while len(w.samples) > 1:              # the next line covers the time from now on
            w.samples.popleft()
        if not (running or queued or gen or pre):
            return None
        return line
