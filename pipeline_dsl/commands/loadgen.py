"""`agp bench`'s load generator: replay a workload, measure latency and throughput.

A workload is a JSONL file in `agp run`'s request format (`prompt` or `messages`, optional
sampling fields). `run_load` sends its requests with Poisson arrivals at a rate (or all
at once, or as a closed loop of `concurrency` clients) to a target, either the
in-process pipeline driven through `AsyncPipeline` (`EngineTarget`) or any OpenAI-compatible
server over streaming HTTP (`HTTPTarget`), and records per request the send time, each
token's arrival, usage and errors. `summarize` turns the records into a `Report`:
request and token throughput, TTFT, TPOT, inter-token and end-to-end latency (mean,
p50, p90, p99), errors, truncated streams, KV hit rate. `format_table` prints reports
side by side and `plot` draws throughput against rate and latency CDFs.

    report = asyncio.run(bench_one(EngineTarget.from_pipeline("examples/chat.agp"),
                                   load_workload("bench/workloads/short_chat.jsonl"),
                                   rate=4.0, num=64))
"""
from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_dsl.commands import batch_api
from pipeline_dsl.diagnostics import closest
from pipeline_dsl.engine.config import time_per_output_token
from pipeline_dsl.requests_io import ParsedRequest, RequestError, load_json, parse_line_object, spread_json
from stages.fields import check_generation_override


class BenchError(ValueError):
    """Bad benchmark input (workload file, target, option): a clean error, exit 2."""


class Interrupted(Exception):
    """The load was stopped (Ctrl-C) before its end: `records` are the requests that had ended,
    `wall` the seconds until the stop; bench_one sets `report`, their summary."""

    def __init__(self, records: list, wall: float):
        super().__init__("interrupted")
        self.records, self.wall, self.report = records, wall, None


# ---------------------------------------------------------------- workload

def read_input(path: Path, name: str, kind: str) -> bytes:
    """The bytes of a file agp bench reads (a workload, a dataset), a UTF-8 BOM skipped as agp run
    skips it; a BenchError that starts with `name` where it cannot be read (`kind`: what it should
    be, for one that is a folder)."""
    try:
        return path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    except FileNotFoundError:
        raise BenchError(f"{name} file not found: {path}") from None
    except IsADirectoryError:
        raise BenchError(f"{name} {path} is a folder, not {kind}") from None
    except OSError as e:
        raise BenchError(f"{name} {path} cannot be read: {e.strerror or e}") from None


def load_workload(path: str | Path) -> list[ParsedRequest]:
    path = Path(path)
    data = read_input(path, "workload", "a JSONL file")
    items = []
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        spread = spread_json(line) if not items else None      # judged by the first line, as agp run does
        if spread:
            raise BenchError(f"{path} is not JSON Lines: line {lineno} is {spread}")
        try:
            obj = load_json(line, "the line")           # a line that is not UTF-8 is named as agp run names it
            if isinstance(obj, dict) and "conversations" in obj and "messages" not in obj:
                raise BenchError(f"{path}:{lineno}: a ShareGPT conversation, not a request: read the file as "
                                 f"vllm bench serve reads it with --dataset-name sharegpt --dataset-path {path}")
            told = _output_length_told(obj)
            if told:                                    # a benchmark's custom dataset line
                raise BenchError(f"{path}:{lineno}: {told} {path.name}")
            if batch_api.is_batch_line(obj):        # an OpenAI batch-API line, as agp run takes it
                items.append(batch_api.workload_request(obj, lineno))
            else:
                items.append(parse_line_object(obj, lineno))
        except RequestError as e:
            raise BenchError(f"{path}:{lineno}: {e}") from None
    if not items:
        raise BenchError(f"{path} holds no requests")
    return items


def _output_length_told(obj) -> str | None:
    """What to do with a custom benchmark dataset's output length (output_tokens, output_len) on a
    workload line, a jq command before the file's name; None when it has none. agp's length is
    the request's max_tokens: on the line, or in a batch-API line's body."""
    if not isinstance(obj, dict):
        return None
    body = obj.get("body") if batch_api.is_batch_line(obj) and isinstance(obj.get("body"), dict) else None
    found = next(((at, k) for at, fields in (("", obj), (".body", body)) if fields is not None
                  for k in ("output_tokens", "output_len") if k in fields), None)
    if found is None:
        return None
    at, length = found
    src, req = f"{at}.{length}", "the request's body's" if body is not None else "the line's"
    has = next((k for k in ("max_tokens", "max_completion_tokens") if k in (obj if body is None else body)), None)
    if has:
        return (f"'{length}' is a custom benchmark dataset's output length: agp's is the request's max_tokens "
                f"(or max_completion_tokens), and {req} {has} is there: leave '{length}' out: "
                f"jq -c 'del({src})'")
    dest = ".body.max_tokens" if body is not None else ".max_tokens"
    test = f".body | has(\"{length}\")" if at else f"has(\"{length}\")"
    inside = " (in the batch line's body)" if body is not None else ""
    return (f"'{length}' is a custom benchmark dataset's output length: agp's is the request's max_tokens"
            f"{inside} (with --ignore-eos every request "
            f"generates that many): jq -c 'if {test} then {dest} //= {src} | del({src}) else . end'")


def arrival_times(n: int | None, rate: float, *, duration: float | None = None,
                  seed: int = 0, burstiness: float = 1.0) -> list[float]:
    """Send offsets in seconds, as `vllm bench serve` schedules them: the i-th request after the
    sum of i gaps of a Poisson process at `rate` (all 0.0 when rate is inf). With `burstiness`
    other than 1 the gaps are gamma-distributed, of shape `burstiness` and the same mean 1/rate:
    below 1 burstier, above 1 more even, inf evenly spaced. `n` requests are scaled to end at
    n / rate exactly, so that the offered rate is the asked one whatever the seed.

    Stops after `n` arrivals or at `duration` seconds, whichever comes first."""
    if rate <= 0:
        raise BenchError(f"the rate must be positive, not {rate}")
    if not burstiness > 0:
        raise BenchError(f"the burstiness must be positive, not {burstiness}")
    if n is None and duration is None:
        raise BenchError("give a number of requests or a duration")
    if math.isinf(rate):
        if n is None:
            raise BenchError("--rate inf sends everything at once: give --num, "
                             "or --concurrency for a closed loop over --duration")
        return [0.0] * n
    rng = np.random.default_rng(seed)

    def gap() -> float:
        if burstiness == 1.0:
            return float(rng.exponential(1.0 / rate))
        if math.isinf(burstiness):
            return 1.0 / rate
        return float(rng.gamma(burstiness, 1.0 / (rate * burstiness)))

    if n is not None:
        times = np.cumsum([gap() for _ in range(n)])
        if n and times[-1] > 0:
            times *= n / rate / times[-1]
        return [float(t) for t in times if duration is None or t <= duration]
    times, t = [], gap()
    while t <= duration:
        times.append(t)
        t += gap()
    return times


# ---------------------------------------------------------------- records and reports

@dataclass
class RequestRecord:
    sent: float = 0.0                 # seconds since the run started
    first_token: float | None = None  # absolute (same clock as `sent`)
    # choice index -> when each of its chunks that carried tokens arrived (a chunk of several
    # tokens is one arrival, as `vllm bench serve` times a stream's chunks)
    chunk_times: dict[int, list[float]] = field(default_factory=dict)
    done: float | None = None         # the end of its answer ([DONE]), or of the attempt
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # the tokens of its longest choice, where the target counts each choice's own (in process: a
    # vote's other candidates and a draft left out); a server's usage gives only the total
    answer_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    truncated: bool = False           # a stream that ended without its final chunk / [DONE]
    text: str = ""                    # the answer of its first choice (a saved result's generated_texts)

    def chunk(self, now: float, index: int = 0) -> None:
        """A chunk of choice `index` with tokens in it arrived."""
        if self.first_token is None:
            self.first_token = now
        self.chunk_times.setdefault(index, []).append(now)


# the percentiles every report holds (--metric-percentiles shows others beside them)
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


def percentile_key(p: float) -> str:
    """A percentile's name in a report, as vllm bench serve names it: 50 -> 'p50', 99.9 -> 'p99.9',
    99.99999 -> 'p99.99999' (never rounded: two percentiles keep two names)."""
    return f"p{int(p)}" if p == int(p) else f"p{p}"


def _dist(values, percentiles=()) -> dict[str, float | None]:
    """The mean and the percentiles of `values`: 50, 90 and 99 always, and those of `percentiles`."""
    xs = np.asarray(list(values), dtype=np.float64)
    ps = sorted(set(DEFAULT_PERCENTILES) | set(percentiles))
    if xs.size == 0:
        return {"mean": None, **{percentile_key(p): None for p in ps}}
    return {"mean": float(xs.mean()), **{percentile_key(p): float(np.percentile(xs, p)) for p in ps}}


@dataclass
class Report:
    label: str
    rate: float
    requests: int
    completed: int
    errors: int
    truncated: int
    duration_s: float
    request_throughput: float          # completed requests / s
    output_throughput: float           # generated tokens / s
    total_throughput: float            # (prompt + generated) tokens / s
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    kv_hit_rate: float | None          # cached prompt tokens / prompt tokens
    ttft: dict                         # seconds: mean, p50, p90, p99
    tpot: dict                         # (e2e - ttft) / (tokens of its longest choice - 1), per request
    itl: dict                          # every gap between two chunks of a choice's stream
    e2e: dict
    error_samples: list[str] = field(default_factory=list)
    first_error: str | None = None     # the error of the first request that failed (in send order)
    engine: dict = field(default_factory=dict)   # in-process: mean batch size, preemptions, …
    concurrency: int | None = None     # at most this many requests in flight (None: no limit)
    burstiness: float = 1.0            # the shape of the arrivals' gamma gaps (1: Poisson)
    slo: dict = field(default_factory=dict)   # seconds: ttft, tpot, e2e limits of a good request
    goodput: float | None = None       # completed requests within every `slo` / s (None: no slo)
    pipeline: str | None = None        # in process: the name of the pipeline measured
    model: str | None = None           # the model measured: the id sent to a server, a pipeline's model(s)
    percentiles: list = field(default_factory=lambda: list(DEFAULT_PERCENTILES))   # those the table shows
    interrupted: bool = False          # Ctrl-C cut the load: the requests that had ended, not all asked
    ttft_samples: list[float] = field(default_factory=list, repr=False)
    e2e_samples: list[float] = field(default_factory=list, repr=False)
    # the requests measured, in send order, where summarize was asked to keep them (vllm_result's
    # per-request lists and deviations: --save-result); never in to_dict's
    records: list = field(default_factory=list, repr=False, compare=False)

    def to_dict(self, samples: bool = False) -> dict:
        records, self.records = self.records, []
        try:
            d = asdict(self)
        finally:
            self.records = records
        d.pop("records")
        if not samples:
            d.pop("ttft_samples")
            d.pop("e2e_samples")
        for key in ("rate", "burstiness"):     # JSON has no infinity
            d[key] = "inf" if math.isinf(d[key]) else d[key]
        d["units"] = UNITS
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """A report as to_dict wrote it (a --json file of an earlier run); ValueError names a field
        that is missing or not of its kind. A field with a default may be missing (a file written
        before it was)."""
        from dataclasses import MISSING, fields

        defaulted = {f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}
        d = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
        for key in ("rate", "burstiness"):
            if d.get(key) == "inf":
                d[key] = math.inf
        for key, (ok, kind) in _SAVED_FIELDS.items():
            if key not in d:
                if key in defaulted:
                    continue
                raise ValueError(f"it has no '{key}'")
            if not ok(d[key]):
                raise ValueError(f"'{key}' must be {kind}")
        return cls(**d)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_QUANTILES = ("mean", "p50", "p90", "p99")

# the limits --goodput takes (vLLM's names; e2e is agp's for e2el)
SLO_METRICS = ("ttft", "tpot", "e2e")

# the fields of a saved report Report.from_dict checks: (whether a value is of the kind, the kind)
_SAVED_FIELDS = {
    "label": (lambda v: isinstance(v, str), "a string"),
    **{k: (_number, "a number") for k in ("rate", "burstiness", "duration_s", "request_throughput",
                                          "output_throughput", "total_throughput")},
    **{k: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
       for k in ("requests", "completed", "errors", "truncated", "prompt_tokens", "completion_tokens",
                 "cached_tokens")},
    **{k: (lambda v: v is None or _number(v), "a number or null") for k in ("kv_hit_rate", "goodput", "concurrency")},
    **{k: (lambda v: v is None or isinstance(v, str), "a string or null") for k in ("pipeline", "model")},
    **{k: (lambda v: isinstance(v, dict) and all(q in v for q in _QUANTILES)
                     and all(x is None or _number(x) for x in v.values()),
           f"an object of {', '.join(_QUANTILES)}") for k in ("ttft", "tpot", "itl", "e2e")},
    "percentiles": (lambda v: isinstance(v, list) and all(_number(x) and 0 <= x <= 100 for x in v),
                    "a list of numbers from 0 to 100"),
    # the table and the plot read these too (an edited one was an internal error there)
    "first_error": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "error_samples": (lambda v: isinstance(v, list) and all(isinstance(e, str) for e in v), "a list of strings"),
    "engine": (lambda v: isinstance(v, dict) and (v.get("mean_batch_size") is None or _number(v["mean_batch_size"])),
               "an object of the engines' counters (mean_batch_size a number or null)"),
    "slo": (lambda v: isinstance(v, dict) and all(k in SLO_METRICS and _number(x) for k, x in v.items()),
            f"an object of {', '.join(SLO_METRICS)} limits in seconds"),
    **{k: (lambda v: isinstance(v, list) and all(_number(x) for x in v), "a list of numbers")
       for k in ("ttft_samples", "e2e_samples")},
}


def load_reports(path: str | Path) -> list[Report]:
    """The reports of an earlier run's `--json` file, or the one report of a `--save-result` file
    (under its "agp"), labelled with the file's name."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchError(f"report file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BenchError(f"cannot read the reports of {path}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("agp"), dict):
        data = data["agp"]                   # a --save-result file: vLLM's keys, agp's report under "agp"
    elif isinstance(data, dict) and "rate" not in data and ("request_throughput" in data or "mean_ttft_ms" in data):
        raise BenchError(f"{path} is a vllm bench serve result without agp's report: --baseline reads the files "
                         f"agp bench --json or --save-result wrote (the latter's report under 'agp')")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise BenchError(f"{path} is not a report file of agp bench --json (a list of reports, each with "
                         f"its label, rate, counts and latencies)")
    reports = []
    for i, d in enumerate(data, 1):
        try:
            reports.append(Report.from_dict(d))
        except (ValueError, TypeError) as e:
            raise BenchError(f"{path}: report {i} is not one agp bench --json writes: {e}") from None
    for r in reports:                        # a measurement Ctrl-C cut holds only the requests that had ended
        r.label = f"{r.label} ({path.name}{', interrupted' if r.interrupted else ''})"
    return reports


# what the numbers of a report's JSON are in (the printed table shows latencies in ms)
UNITS = {"rate": "requests/s", "duration_s": "s", "request_throughput": "requests/s",
         "output_throughput": "tokens/s", "total_throughput": "tokens/s", "ttft": "s", "tpot": "s", "itl": "s",
         "e2e": "s", "kv_hit_rate": "fraction", "peak_memory_bytes": "bytes", "slo": "s", "goodput": "requests/s"}


def _tpot(r: RequestRecord) -> float | None:
    """vLLM's TPOT of one request: (E2E - TTFT) / (its output tokens - 1), the tokens of its
    longest choice (n choices decode side by side), or the usage shared by the choices that
    streamed when the target reports only the total. None for an answer of at most one token, and
    for one whose every choice arrived in a single chunk (an answer handed over after a join or a
    vote): its client saw no token after the first, and the microseconds before [DONE] over its
    tokens gave a TPOT of 0.0 ms."""
    if r.first_token is None or max(map(len, r.chunk_times.values())) < 2:
        return None
    if r.answer_tokens is not None:
        return time_per_output_token(r.done - r.first_token, r.answer_tokens)
    return time_per_output_token(r.done - r.first_token, r.completion_tokens, len(r.chunk_times))


def _good(r: RequestRecord, tpot: float | None, slo: dict) -> bool:
    """Whether a completed request (its TPOT `tpot`, _tpot's) meets every limit of `slo`, as
    `vllm bench serve`'s goodput judges it: a request without a TPOT (one token, one chunk) counts
    0 for it; one without a first token waited its whole E2E for it."""
    e2e = r.done - r.sent
    seen = {"ttft": e2e if r.first_token is None else r.first_token - r.sent, "tpot": tpot or 0.0, "e2e": e2e}
    return all(seen[key] <= limit for key, limit in slo.items())


def summarize(label: str, rate: float, records: list[RequestRecord], duration: float,
              engine_stats: dict | None = None, *, concurrency: int | None = None,
              burstiness: float = 1.0, slo: dict | None = None, pipeline: str | None = None,
              model: str | None = None, percentiles=DEFAULT_PERCENTILES, keep_records: bool = False) -> Report:
    """The figures of a measurement; latencies of the completed requests, their mean and
    `percentiles` (50, 90 and 99 are always computed, the table shows `percentiles`).
    `keep_records`: the report holds the records too (a long run's are many: only when asked)."""
    ok = _completed(records)
    slo = dict(slo or {})
    tpots = [_tpot(r) for r in ok]
    samples = latency_samples(records)
    ttft, tpot, itl, e2e = (samples[k] for k in ("ttft", "tpot", "itl", "e2e"))
    prompt = sum(r.prompt_tokens for r in ok)
    out = sum(r.completion_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    errors = [r.error for r in records if r.error is not None]
    duration = max(duration, 1e-9)
    stats = engine_stats or {}
    engine = {k: stats[k] for k in ("mean_batch_size", "preemptions", "kv_evictions",
                                    "peak_memory_bytes") if stats.get(k) is not None}
    return Report(
        label=label, rate=rate, requests=len(records), completed=len(ok),
        errors=len(errors), truncated=sum(r.truncated and r.error is None for r in records),
        duration_s=duration, request_throughput=len(ok) / duration,
        output_throughput=out / duration, total_throughput=(prompt + out) / duration,
        prompt_tokens=prompt, completion_tokens=out, cached_tokens=cached,
        kv_hit_rate=cached / prompt if prompt else None,
        ttft=_dist(ttft, percentiles), tpot=_dist(tpot, percentiles), itl=_dist(itl, percentiles),
        e2e=_dist(e2e, percentiles), percentiles=sorted(set(percentiles)),
        error_samples=sorted(set(errors))[:5], first_error=errors[0] if errors else None, engine=engine,
        concurrency=concurrency, burstiness=burstiness, slo=slo,
        goodput=sum(_good(r, t, slo) for r, t in zip(ok, tpots)) / duration if slo else None,
        pipeline=pipeline, model=model,
        ttft_samples=ttft, e2e_samples=e2e, records=list(records) if keep_records else [])


def _completed(records: list[RequestRecord]) -> list[RequestRecord]:
    """The requests that count in the throughputs and latencies: answered whole, without error."""
    return [r for r in records if r.error is None and not r.truncated and r.done is not None]


def latency_samples(records: list[RequestRecord]) -> dict[str, list[float]]:
    """The seconds each latency's mean and percentiles are over (summarize's): TTFT of the
    completed requests that streamed a token, TPOT of those of two chunks or more, every ITL gap
    of their choices' streams, E2E of each."""
    ok = _completed(records)
    return {"ttft": [r.first_token - r.sent for r in ok if r.first_token is not None],
            "tpot": [t for t in map(_tpot, ok) if t is not None],
            "itl": [b - a for r in ok for times in r.chunk_times.values() for a, b in zip(times, times[1:])],
            "e2e": [r.done - r.sent for r in ok]}


# a saved result's keys that are vllm bench serve's (--metadata may not take them), besides the latencies'
VLLM_RESULT_KEYS = ("date", "backend", "label", "model_id", "tokenizer_id", "num_prompts", "request_rate",
                    "burstiness", "max_concurrency", "duration", "completed", "failed", "total_input_tokens",
                    "total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
                    "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls", "generated_texts",
                    "errors", "agp")
# vLLM's name of each latency -> the report's
VLLM_LATENCIES = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2el": "e2e"}


def vllm_result(report: Report, *, date: str, backend: str, tokenizer_id: str | None, num_prompts: int,
                metadata: dict | None = None, detailed: bool = False) -> dict:
    """A measurement as `vllm bench serve --save-result` writes it: its settings, the
    `--metadata` pairs, its counts and throughputs, and each latency's mean, median, standard
    deviation and percentiles in ms (`mean_ttft_ms`, `p99_e2el_ms`; null where it has none);
    `detailed` (--save-detailed) adds the per-request lists in send order (input_lens,
    output_lens, ttfts and itls in seconds, generated_texts, errors: "" for a request that did
    not fail). The report itself, as --json writes it, is under "agp"."""
    def ms(v):
        return None if v is None else v * 1000

    out = {"date": date, "backend": backend, "label": report.label, "model_id": report.model,
           "tokenizer_id": tokenizer_id, "num_prompts": num_prompts, **(metadata or {}),
           "request_rate": "inf" if math.isinf(report.rate) else report.rate,
           "burstiness": "inf" if math.isinf(report.burstiness) else report.burstiness,
           "max_concurrency": report.concurrency,
           "duration": report.duration_s, "completed": report.completed,
           "failed": report.errors + report.truncated,
           "total_input_tokens": report.prompt_tokens, "total_output_tokens": report.completion_tokens,
           "request_throughput": report.request_throughput, "request_goodput": report.goodput,
           "output_throughput": report.output_throughput, "total_token_throughput": report.total_throughput}
    samples = latency_samples(report.records)
    for name, ours in VLLM_LATENCIES.items():
        dist = getattr(report, ours)
        out[f"mean_{name}_ms"] = ms(dist.get("mean"))
        out[f"median_{name}_ms"] = ms(dist.get("p50"))
        xs = samples[ours]
        out[f"std_{name}_ms"] = float(np.std(xs)) * 1000 if xs else None
        for p in report.percentiles:
            out[f"{percentile_key(p)}_{name}_ms"] = ms(dist.get(percentile_key(p)))
    if detailed:
        records, done = report.records, {id(r) for r in _completed(report.records)}
        out.update(
            input_lens=[r.prompt_tokens for r in records],
            output_lens=[r.completion_tokens if id(r) in done else 0 for r in records],
            ttfts=[r.first_token - r.sent if r.first_token is not None and r.error is None else 0.0
                   for r in records],
            itls=[[b - a for a, b in zip(r.chunk_times.get(0, []), r.chunk_times.get(0, [])[1:])] for r in records],
            generated_texts=[r.text for r in records],
            errors=[r.error or ("the stream ended before its last chunk" if r.truncated else "") for r in records])
    out["agp"] = report.to_dict()
    return out


def failure(report: Report) -> str | None:
    """Why a measurement measured nothing: no request it sent succeeded (a server refusing
    everything, a wrong model name); None when one did. Some failures under load are a result
    (the errors row), not a failed benchmark."""
    if not report.requests or report.completed:
        return None
    if report.first_error is not None:
        return f"none of its {report.requests} requests succeeded; the first error: {report.first_error}"
    return f"none of its {report.requests} requests succeeded: every stream ended before its last chunk"


# ---------------------------------------------------------------- targets

class EngineTarget:
    """The pipeline in this process (its runtime driven as `agp serve` drives it)."""

    def __init__(self, label: str, runtime):
        from pipeline_dsl.serve.async_pipeline import AsyncPipeline

        self.label, self.runtime = label, runtime
        self.apipe = AsyncPipeline(runtime)
        # what the report names as measured: the pipeline and its engines' models (a file's name,
        # not its folder)
        self.pipeline = runtime.name
        self.model = ", ".join(dict.fromkeys(Path(str(es.config.model)).name for es in runtime.segments
                                             if es.config.model)) or None
        self._n = 0

    @classmethod
    def from_pipeline(cls, spec: str, *, overlap: bool | None = None, allow_paths=(), **overrides) -> "EngineTarget":
        """Build the pipeline (its engines, driven by the plan's executors) as `agp serve` does."""
        from pipeline_dsl.flow import build_runtime

        path, settings = parse_target(spec)
        name = settings.pop("pipeline", None)
        runtime = build_runtime(path, name, overlap=overlap, allow_paths=allow_paths,
                                overrides={**settings, **{k: v for k, v in overrides.items() if v is not None}})
        return cls(target_label(spec), runtime)

    async def start(self) -> None:
        self.apipe.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.apipe.stop, drain=False, timeout=30)

    async def stats(self) -> dict:
        from pipeline_dsl.serve.metrics import engine_totals

        return engine_totals(await self.apipe.stats())

    async def send(self, item: ParsedRequest, rec: RequestRecord, clock) -> None:
        from pipeline_dsl.flow import PipelineError

        self._n += 1
        data = item.item()
        data["id"] = f"bench-{self._n}"
        try:
            stream = await self.apipe.add(data, stream=True)
        except PipelineError as e:
            rec.error = e.message
            return
        result = None
        try:
            async for event in stream:
                if event[0] == "delta":
                    if event[2].new_token_ids:
                        rec.chunk(clock(), event[1])
                else:
                    result = event[1]
        finally:
            if not stream.finished:
                stream.abort()
        if result is None:
            rec.truncated = True
            return
        if result.error is not None:
            rec.error = result.error.message
            return
        whole = [c.index for c in result.choices if c.text and c.index not in rec.chunk_times]
        if whole:                     # an answer handed over whole (after a join, a vote): one arrival
            now = clock()             # for each choice, as a server streams it
            for index in whole:
                rec.chunk(now, index)
        rec.prompt_tokens = result.usage["prompt_tokens"]
        rec.completion_tokens = result.usage["completion_tokens"]
        rec.cached_tokens = result.usage["cached_tokens"]
        rec.answer_tokens = result.longest_choice_tokens()
        rec.text = next((c.text or "" for c in result.choices if c.index == 0), "")
        rec.finish_reason = result.choices[0].finish_reason if result.choices else None


def _error_message(r) -> str:
    """The message of a server's error answer (OpenAI's {"error": {"message": ...}}), or its text."""
    text = r.text
    try:
        text = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return str(text)[:200]


class HTTPTarget:
    """Any OpenAI-compatible server: streaming POSTs with httpx, usage from the last chunk."""

    def __init__(self, url: str, model: str | None = None, timeout: float = 600.0, api_key: str | None = None,
                 ready_timeout: float = 600.0):
        self.label = url
        self.ready_timeout = ready_timeout      # how long a server answering 503 (loading) is waited for
        self.pipeline = None
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.model, self.timeout = model, timeout
        self.client = None

    async def start(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=10.0),
                                        limits=httpx.Limits(max_connections=None,
                                                            max_keepalive_connections=256),
                                        headers=self.headers)
        if self.model is None:
            try:
                r = await self._ready()
                refused = r.status_code == 401
                if not refused:
                    if r.status_code >= 400:
                        still = (f"; still answering 503 after {self.ready_timeout:g} s (--ready-timeout)"
                                 if r.status_code == 503 and self.ready_timeout > 0 else "")
                        raise BenchError(f"cannot list the models of {self.base}: HTTP {r.status_code}: "
                                         f"{_error_message(r)}{still}")
                    self.model = r.json()["data"][0]["id"]
            except BenchError:                  # a ValueError: caught before the others, said once
                await self.client.aclose()
                raise
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                await self.client.aclose()
                raise BenchError(f"cannot list the models of {self.base}: {e}") from None
            if refused:
                await self.client.aclose()
                given = "the one given was refused" if self.headers else "none was given"
                raise BenchError(f"{self.base} wants an API key ({given}): give it with --api-key KEY "
                                 "or the environment variable OPENAI_API_KEY")
        elif self.ready_timeout > 0:  # the model named: waited for all the same (--ready-timeout 0: not);
            try:                    # a server without /models, or one down, is told by the requests' errors
                await self._ready()
            except httpx.HTTPError:
                pass

    async def _ready(self):
        """GET /models until the server listens and answers other than 503, at most `ready_timeout`
        seconds: a port refusing connections (vLLM's server opens it only once its model is loaded;
        a container still starting) is asked again each second, a 503 (`agp serve` loading its
        model) at its Retry-After (at most 5 s). The answer then; at the deadline the last answer
        or connection error. A server started beside `agp bench` is measured once it is up, as
        vllm bench serve waits for it (--ready-check-timeout-sec)."""
        import httpx

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        said = False
        while True:
            try:
                r = await self.client.get(f"{self.base}/models")
            except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
                left = deadline - loop.time()
                if left <= 0:
                    if self.ready_timeout > 0:
                        raise type(e)(f"{str(e) or type(e).__name__}; still not answering after "
                                      f"{self.ready_timeout:g} s (--ready-timeout)") from None
                    raise
                why, wait = f"not answering: {str(e) or type(e).__name__}", 1.0
            else:
                left = deadline - loop.time()
                if r.status_code != 503 or left <= 0:
                    return r
                why = f"answers HTTP 503 ({_error_message(r)})"
                try:
                    wait = min(max(float(r.headers.get("retry-after", 1)), 0.1), 5.0)
                except ValueError:
                    wait = 1.0
            if not said:
                print(f"agp bench: {self.base} {why}; waiting up to {self.ready_timeout:g} s for it "
                      "(--ready-timeout)", file=sys.stderr, flush=True)
                said = True
            await asyncio.sleep(min(wait, left))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def stats(self) -> dict:
        return {}

    def body(self, item: ParsedRequest) -> tuple[str, dict]:
        """(route, body) of a workload request: every field the in-process target runs (n, a prompt
        of token ids, the per-request extras, tools, structured output), so a server and a pipeline
        measured side by side do the same work."""
        chat = item.messages is not None
        body: dict[str, Any] = {"model": self.model, "stream": True,
                                "stream_options": {"include_usage": True}}
        body.update(item.sampling)
        extras = dict(item.extras)
        if chat and extras.get("logprobs") is not None:          # chat's shape of the same ask
            body["logprobs"], body["top_logprobs"] = True, extras.pop("logprobs")
        body.update(extras)
        if item.n is not None:
            body["n"] = item.n
        if item.tools:
            body.update(tools=item.tools, tool_choice=item.tool_choice, parallel_tool_calls=item.parallel_tool_calls)
        if item.response_format is not None:
            body.update(_wire_format(item.response_format))
        if chat:
            body["messages"] = item.messages
            return "/chat/completions", body
        body["prompt"] = item.prompt if item.prompt is not None else list(item.prompt_token_ids or ())
        return "/completions", body

    async def send(self, item: ParsedRequest, rec: RequestRecord, clock) -> None:
        import httpx

        route, body = self.body(item)
        answering = []                  # not empty once the server's answer began (its status line)
        try:
            await self._send(route, body, rec, clock, answering)
        except httpx.TransportError as e:
            rec.error = transport_error(e, self.base + route, bool(answering), self.timeout)

    async def _send(self, route: str, body: dict, rec: RequestRecord, clock, answering: list) -> None:
        chat = route.startswith("/chat")
        finished = done = False
        async with self.client.stream("POST", self.base + route, json=body) as r:
            answering.append(True)
            if r.status_code != 200:
                await r.aread()
                rec.error = f"HTTP {r.status_code}: {_error_message(r)}"
                return
            lines = r.aiter_lines()
            async for line in lines:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done, rec.done = True, clock()
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    rec.error = f"an event of the stream is not JSON: {data[:80]!r}"
                    return
                if not isinstance(chunk, dict):
                    rec.error = f"an event of the stream is not a JSON object: {data[:80]!r}"
                    return
                if "error" in chunk:
                    error = chunk["error"]
                    rec.error = str(error.get("message", error) if isinstance(error, dict) else error)[:200]
                    return
                for choice in chunk.get("choices") or ():
                    if _carries_tokens(choice, chat):
                        rec.chunk(clock(), choice.get("index", 0))
                        if choice.get("index", 0) == 0:
                            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                            rec.text += text if isinstance(text, str) else ""
                    if choice.get("finish_reason"):
                        finished, rec.finish_reason = True, choice["finish_reason"]
                use = chunk.get("usage")
                if use:
                    rec.prompt_tokens = int(use.get("prompt_tokens") or 0)
                    rec.completion_tokens = int(use.get("completion_tokens") or 0)
                    details = use.get("prompt_tokens_details") or {}
                    rec.cached_tokens = int(details.get("cached_tokens") or 0)
            if done:
                await _read_to_the_end(lines)
        if not (done and finished):
            rec.truncated = True
        elif rec.completion_tokens == 0:
            rec.completion_tokens = sum(map(len, rec.chunk_times.values()))   # a server without usage


def transport_error(e, url: str, answering: bool, timeout: float) -> str:
    """A request's error sample for an httpx transport failure, naming what happened and where:
    httpx's own message is often empty (a connection the server reset is `ReadError: `)."""
    import httpx

    name, detail = type(e).__name__, str(e).strip()
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        what = "cannot connect to the server"
    elif isinstance(e, httpx.TimeoutException):
        what = f"nothing from the server for {timeout:g} s (--request-timeout)"
    elif isinstance(e, (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)):
        what = ("connection closed by the server mid-answer" if answering
                else "connection closed by the server before it answered")
    else:
        what = "the request failed on the wire"
    return f"{name}: {what} ({url})" + (f": {detail}" if detail else "")


# how long the rest of a response after its [DONE] may take to come (the end of its chunked body)
_AFTER_DONE_S = 1.0


async def _read_to_the_end(lines) -> None:
    """Read what a response sends after its [DONE], so that its connection goes back to the pool
    for the next request, as vllm bench serve's client reads each response to its end. A response
    left unread there closed its connection: every request opened a new one (a TCP and TLS
    handshake inside its TTFT). A server that keeps the stream open after [DONE] is not waited
    for beyond _AFTER_DONE_S: the answer is whole, only its connection is closed."""
    import httpx

    async def rest():
        async for _ in lines:
            pass

    try:
        await asyncio.wait_for(rest(), _AFTER_DONE_S)
    except (asyncio.TimeoutError, httpx.HTTPError):   # the answer was whole: only the connection is lost
        pass


def _carries_tokens(choice: dict, chat: bool) -> bool:
    """Whether a streamed choice brings some of the answer: text, or in a chat a tool call (an
    answer of tool calls alone had no TTFT, TPOT nor ITL over HTTP) or a reasoning model's
    thinking (vLLM's `reasoning`, or `reasoning_content`, its older name, which agp serve sends too
    and a newer vLLM server may leave out); not the opening role chunk nor the closing finish reason."""
    if not chat:
        return bool(choice.get("text"))
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("tool_calls") or delta.get("reasoning")
                or delta.get("reasoning_content"))


def _wire_format(spec: dict) -> dict:
    """A parsed structured-output spec back as request fields: OpenAI's response_format for JSON,
    vLLM's guided_* fields (which agp serve takes too) for a regex, a choice or a grammar."""
    kind = spec["type"]
    if kind in ("text", "json_object"):
        return {"response_format": {"type": kind}}
    if kind == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": spec.get("name") or "schema", "schema": spec.get("schema", {})}}}
    field, key = {"regex": ("guided_regex", "pattern"), "choice": ("guided_choice", "choices"),
                  "grammar": ("guided_grammar", "grammar")}[kind]
    return {field: spec[key]}


def parse_target(spec: str) -> tuple[str, dict]:
    """`path.agp[,pipeline=NAME][,key=value...]` -> (path, settings): EngineConfig overrides,
    values typed, and `pipeline`, which of the file's pipelines to build (as `--pipeline` picks
    one for agp run and serve; without it, the file's first)."""
    from dataclasses import fields

    from pipeline_dsl.engine.config import EngineConfig

    path, *pairs = _spec_parts(spec)
    types = {f.name: str(f.type) for f in fields(EngineConfig)}
    known = set(types) | {"pipeline"}
    settings = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise BenchError(f"'{pair}' in '{spec}' is not key=value")
        if key == "pipeline":
            settings[key] = value
            continue
        if key not in known:
            close = closest(key, known)
            hint = f" (did you mean '{close}'?)" if close else ""
            raise BenchError(f"unknown engine setting '{key}' in '{spec}'{hint}; "
                             f"known: {', '.join(sorted(known))}")
        settings[key] = _of_type(key, value, types[key], spec)
    if not Path(path).is_file():
        raise BenchError(f"pipeline file not found: {path}")
    return path, settings


def target_label(spec: str) -> str:
    path, *pairs = _spec_parts(spec)
    stem = Path(path).stem
    return f"{stem} ({', '.join(pairs)})" if pairs else stem


def _spec_parts(spec: str) -> list[str]:
    """`path.agp,key=value,...` split at its commas, but not at those inside a JSON object or list
    (`override_generation_config={"temperature": 0.5, "top_p": 0.9}`)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    return parts + [spec[start:]]


_EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
             "None": "none", "dict": "a JSON object"}
# the object settings' checks (the engine's own, before any model loads)
_OBJECT_CHECKS = {"override_generation_config": check_generation_override}


def _of_type(key: str, value: str, annotation: str, spec: str):
    """A setting's value typed and checked against its EngineConfig field (`bool`, `int | None`…):
    `prefix_reuse=flase` is an error, not a string that reads as true while the label says false."""
    kinds = [t.strip() for t in annotation.split("|")]
    if "dict" in kinds and value.lstrip().startswith("{"):
        return _json_setting(key, value, spec)
    typed = _typed(value)
    if typed is None:
        ok = "None" in kinds
    elif isinstance(typed, bool):
        ok = "bool" in kinds
    elif isinstance(typed, int):
        ok = "int" in kinds or "float" in kinds
    elif isinstance(typed, float):
        ok = "float" in kinds
    else:
        ok = False
    if ok:
        return typed
    if "str" in kinds:                         # a string field takes the text as written (a model path)
        return value
    expected = " or ".join(_EXPECTED.get(k, k) for k in kinds)
    raise BenchError(f"engine setting '{key}' in '{spec}' must be {expected}, not '{value}'")


def _json_setting(key: str, value: str, spec: str) -> dict:
    """A setting whose field is an object (override_generation_config): a JSON object, checked
    as the engine checks it."""
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise BenchError(f"engine setting '{key}' in '{spec}' is not JSON ({e})") from None
    check = _OBJECT_CHECKS.get(key)
    try:
        return check(obj) if check is not None else obj
    except ValueError as e:
        raise BenchError(f"engine setting '{key}' in '{spec}': {e}") from None


def _typed(value: str):
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# ---------------------------------------------------------------- the load loop

async def run_load(target, items: list[ParsedRequest], *, rate: float = math.inf,
                   num: int | None = None, duration: float | None = None,
                   concurrency: int | None = None, seed: int = 0, progress: bool = True,
                   request_timeout: float = 600.0, burstiness: float = 1.0) -> tuple[list[RequestRecord], float]:
    """Send the workload (cycled) and wait for every answer; returns (records, wall seconds).

    Open loop: arrivals at `rate` (Poisson) or all at once (inf). With `concurrency`, at
    most that many requests are in flight; `rate` inf with `concurrency` and `duration`
    is a closed loop of that many clients."""
    if concurrency is not None and math.isinf(rate) and num is None:
        offsets = None                      # closed loop until `duration`
    else:
        offsets = arrival_times(num, rate, duration=duration, seed=seed, burstiness=burstiness)
    bar = _progress(len(offsets) if offsets is not None else None, progress)
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    records: list[RequestRecord] = []
    ended = {"tokens": 0, "errors": 0}     # the bar's figures, added to as requests end (summed over
    clock = time.perf_counter              # every record at each end, they cost the loop n² / 2 steps)
    t0 = clock()

    cut: set[int] = set()                  # the records of requests a stop left unanswered

    async def one(i: int, sent: float) -> None:
        rec = RequestRecord(sent=sent)             # when the load sent it, not when the task ran
        records.append(rec)
        try:
            await asyncio.wait_for(target.send(items[i % len(items)], rec, clock),
                                   request_timeout)
        except asyncio.CancelledError:
            cut.add(id(rec))
            raise
        except asyncio.TimeoutError:
            rec.error = f"timed out after {request_timeout:g} s"
        except Exception as e:               # noqa: BLE001 - one failed request, counted
            rec.error = f"{type(e).__name__}: {e}"[:200]
        finally:
            if rec.done is None:             # a target may time the end itself (HTTP: at [DONE])
                rec.done = clock()
            if limit:
                limit.release()
            if bar is not None:
                ended["tokens"] += rec.completion_tokens
                ended["errors"] += rec.error is not None
                bar.update(1)
                bar.set_postfix_str(f"{ended['tokens'] / (clock() - t0):.0f} tok/s {ended['errors']} err",
                                    refresh=False)

    tasks = []
    i = 0
    try:
        while True:
            if offsets is not None:
                if i >= len(offsets):
                    break
                delay = t0 + offsets[i] - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif clock() - t0 >= duration:
                break
            if limit:
                await limit.acquire()
                if offsets is None and clock() - t0 >= duration:
                    limit.release()
                    break
            tasks.append(asyncio.create_task(one(i, clock())))
            i += 1
        if tasks:
            await asyncio.gather(*tasks)
    except asyncio.CancelledError:         # Ctrl-C (asyncio.run cancels the load): what ended is the result
        wall = clock() - t0
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise Interrupted([r for r in records if id(r) not in cut], wall) from None
    finally:
        if bar is not None:
            bar.close()
    return records, clock() - t0


def during(before: dict, after: dict) -> dict:
    """The engines' counters over the measured load alone: the warm-up's steps (a request decoding
    by itself, batch size 1) and preemptions left out. The peak memory stays the process's."""
    out = dict(after)
    steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
    if after.get("mean_batch_size") is not None:
        seqs = (after["mean_batch_size"] * after.get("decode_steps", 0)
                - (before.get("mean_batch_size") or 0) * before.get("decode_steps", 0))
        out["mean_batch_size"] = seqs / steps if steps > 0 else None
    for key in ("decode_steps", "preemptions", "kv_evictions"):
        if after.get(key) is not None:
            out[key] = after[key] - (before.get(key) or 0)
    return out


def _progress(total, enabled: bool):
    if not enabled:
        return None
    from pipeline_dsl.commands.progress import progress_bar

    return progress_bar(total, leave=False)


async def bench_one(target, items, *, rate: float, num=None, duration=None, concurrency=None,
                    seed: int = 0, progress: bool = True, warmup: int = 1,
                    request_timeout: float = 600.0, burstiness: float = 1.0, slo: dict | None = None,
                    percentiles=DEFAULT_PERCENTILES, keep_records: bool = False) -> Report:
    """Start the target, warm it up, run the load, summarise (`keep_records`: summarize's)."""
    await target.start()
    stopped = None
    try:
        if warmup:
            try:
                await run_load(target, items[:1] * warmup, rate=math.inf, num=warmup, progress=False,
                               request_timeout=request_timeout)
            except Interrupted:
                raise KeyboardInterrupt from None          # nothing measured yet
        before = await target.stats()
        try:
            records, wall = await run_load(target, items, rate=rate, num=num, duration=duration,
                                           concurrency=concurrency, seed=seed, progress=progress,
                                           request_timeout=request_timeout, burstiness=burstiness)
        except Interrupted as e:
            stopped, records, wall = e, e.records, e.wall
        stats = during(before, await target.stats())
    finally:
        await target.close()
    report = summarize(target.label, rate, records, wall, stats, concurrency=concurrency,
                       burstiness=burstiness, slo=slo, pipeline=getattr(target, "pipeline", None),
                       model=getattr(target, "model", None), percentiles=percentiles,
                       keep_records=keep_records)
    if stopped is not None:
        report.interrupted = True
        stopped.report = report
        raise stopped
    return report


# ---------------------------------------------------------------- output

def _ms(v) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def rate_text(rate: float) -> str:
    """A request rate as the table and the messages show it: `inf`, or 2, 0.5."""
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _rows(reports: list[Report]) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = [
        (name, [getattr(r, name) or "-" for r in reports]) for name in ("pipeline", "model")
        if any(getattr(r, name) for r in reports)
    ]
    rows += [
        ("rate (req/s)", [rate_text(r.rate) for r in reports]),
        ("max concurrency", [str(r.concurrency) if r.concurrency else "-" for r in reports]),
    ]
    if any(r.burstiness != 1.0 for r in reports):
        rows.append(("burstiness", [f"{r.burstiness:g}" for r in reports]))
    rows += [
        ("requests ok/sent", [f"{r.completed}/{r.requests}" for r in reports]),
        ("errors", [str(r.errors) for r in reports]),
        ("truncated streams", [str(r.truncated) for r in reports]),
        ("duration (s)", [f"{r.duration_s:.1f}" for r in reports]),
        ("requests/s", [f"{r.request_throughput:.2f}" for r in reports]),
    ]
    if any(r.slo for r in reports):
        rows.append(("goodput (req/s)", ["-" if r.goodput is None else f"{r.goodput:.2f}" for r in reports]))
        rows.append(("goodput limits (ms)", [", ".join(f"{k} {v * 1000:g}" for k, v in r.slo.items()) or "-"
                                             for r in reports]))
    rows += [
        ("output tok/s", [f"{r.output_throughput:.1f}" for r in reports]),
        ("total tok/s", [f"{r.total_throughput:.1f}" for r in reports]),
        ("KV hit rate", ["-" if r.kv_hit_rate is None else f"{r.kv_hit_rate:.1%}" for r in reports]),
    ]
    shown = ["mean"] + [percentile_key(p) for p in sorted({p for r in reports for p in r.percentiles})]
    for name in ("ttft", "tpot", "itl", "e2e"):
        for q in shown:
            rows.append((f"{name.upper()} {q} (ms)", [_ms(getattr(r, name).get(q)) for r in reports]))
    if any(r.engine.get("mean_batch_size") is not None for r in reports):
        rows.append(("mean batch size", [f"{r.engine['mean_batch_size']:.1f}"
                                         if r.engine.get("mean_batch_size") is not None else "-"
                                         for r in reports]))
    return rows


def format_table(reports: list[Report]) -> str:
    """Reports side by side, one column each, and a few error messages if any."""
    header = [""] + [r.label for r in reports]
    body = [[name] + cells for name, cells in _rows(reports)]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in [header] + body]
    errs = [f"  {r.label}: {e}" for r in reports for e in r.error_samples]
    if errs:
        lines += ["errors (samples):"] + errs
    return "\n".join(lines)


def format_markdown(reports: list[Report]) -> str:
    """The same table as GitHub markdown (docs/benchmarks.md)."""
    out = ["| metric | " + " | ".join(r.label for r in reports) + " |",
           "|---|" + "---:|" * len(reports)]
    out += ["| " + " | ".join([name] + cells) + " |" for name, cells in _rows(reports)]
    return "\n".join(out)


def plot(reports: list[Report], path: str | Path) -> None:
    """Throughput against request rate (one line per target) and TTFT / E2E CDFs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.label for r in reports))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    finite = [r.rate for r in reports if not math.isinf(r.rate)]
    inf_x = max(finite) * 2 if finite else 1.0
    for label in labels:
        mine = sorted((r for r in reports if r.label == label),
                      key=lambda r: inf_x if math.isinf(r.rate) else r.rate)
        xs = [inf_x if math.isinf(r.rate) else r.rate for r in mine]
        ax1.plot(xs, [r.output_throughput for r in mine], marker="o", label=label)
        last = mine[-1]                       # the highest rate: the most loaded run
        for ax, samples in ((ax2, last.ttft_samples), (ax3, last.e2e_samples)):
            if samples:
                xs_ = np.sort(np.asarray(samples)) * 1000
                ax.plot(xs_, np.arange(1, len(xs_) + 1) / len(xs_), label=label)
    ax1.set(xlabel="request rate (req/s; rightmost = all at once)" if any(
        math.isinf(r.rate) for r in reports) else "request rate (req/s)",
        ylabel="output tokens/s", title="throughput against rate")
    # from 0: autoscaled, two targets 0.1 tokens/s apart filled the axis as if one had far more
    ax1.set_ylim(bottom=0, top=max([r.output_throughput for r in reports] + [0.0]) * 1.08 or 1.0)
    ax2.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF (highest rate)")
    ax3.set(xlabel="end-to-end latency (ms)", ylabel="fraction of requests",
            title="E2E latency CDF (highest rate)")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
