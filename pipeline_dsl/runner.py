"""Drive an engine over a list of requests and measure it.

`run_requests` submits every request, steps the engine through the plan's executor
(overlapped, or serially with `overlap=False`) until all are done, hands each finished
answer to `on_done`, and returns the run summary: requests, tokens in and out,
output tokens/s over generation (model loading excluded), TTFT and per-token latency
p50/p99, mean batch size, KV hit rate and peak memory.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline_dsl.engine.engine import percentile
from pipeline_dsl.engine.executor import drive  # the plan's threaded / CUDA-stream executor
from pipeline_dsl.requests_io import ParsedRequest


@dataclass
class RunRequest:
    slot: int                     # position in the output
    line: int                     # input line, for error records
    parsed: ParsedRequest
    params: Any                   # SamplingParams
    # measured
    t_first: float | None = None
    t_last: float | None = None
    token_gaps: list[float] = field(default_factory=list)


def _record(req: RunRequest, out) -> dict:
    return {
        "id": req.parsed.id,
        "text": out.text,
        "finish_reason": out.finish_reason,
        "usage": {
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens,
        },
    }


def run_requests(engine, spec, requests: list[RunRequest], *, on_done: Callable[[int, dict], None],
                 overlap: bool = True, trace_path: str | None = None, progress: bool = True) -> dict:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), unit="req", file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5)
    by_id: dict[str, RunRequest] = {}
    t0 = time.perf_counter()
    errors = 0
    for req in requests:
        rid = f"r{req.slot}"
        try:
            inputs = {"prompt": req.parsed.prompt} if req.parsed.messages is None \
                else {"messages": req.parsed.messages}
            engine.add_request(rid, params=req.params, **spec.engine_inputs(inputs))
        except ValueError as e:                  # InputError, QueueFullError: this request only
            errors += 1
            on_done(req.slot, {"id": req.parsed.id, "error": {"line": req.line, "message": str(e)}})
            if bar:
                bar.update(1)
            continue
        by_id[rid] = req

    prompt_tokens = completion_tokens = cached_tokens = 0

    def handle(outputs) -> None:
        nonlocal prompt_tokens, completion_tokens, cached_tokens
        now = time.perf_counter()
        for out in outputs:
            req = by_id.get(out.request_id)
            if req is None:
                continue
            if out.new_token_ids:
                if req.t_first is None:
                    req.t_first = now
                elif req.t_last is not None:
                    gap = (now - req.t_last) / len(out.new_token_ids)
                    req.token_gaps.extend([gap] * len(out.new_token_ids))
                req.t_last = now
            if out.finished:
                prompt_tokens += out.prompt_tokens
                completion_tokens += out.completion_tokens
                cached_tokens += out.cached_tokens
                on_done(req.slot, _record(req, out))
                if bar:
                    bar.update(1)
                    elapsed = now - t0
                    bar.set_postfix_str(f"{completion_tokens / max(elapsed, 1e-9):.0f} tok/s")

    executor_stats = drive(engine, handle, overlap=overlap, trace_path=trace_path, plan=spec.plan) or {}
    wall = time.perf_counter() - t0
    if bar:
        bar.close()

    ttft = [r.t_first - t0 for r in by_id.values() if r.t_first is not None]
    gaps = [g for r in by_id.values() for g in r.token_gaps]
    stats = engine.stats(latencies=False)
    summary = {
        "requests": len(requests),
        "errors": errors,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
        "generation_s": round(wall, 4),
        "output_tokens_per_s": round(completion_tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "tpot_p50_ms": _ms(percentile(gaps, 50)),
        "tpot_p99_ms": _ms(percentile(gaps, 99)),
        "mean_batch_size": _round(stats.get("mean_batch_size")),
        "kv_hit_rate": _round(stats.get("hit_rate")),
        "peak_memory_bytes": stats.get("peak_memory_bytes"),
        "dtype": stats.get("dtype"),
        "weights": stats.get("weights"),
    }
    summary.update(executor_stats)
    return summary


def _ms(v):
    return None if v is None else round(v * 1000, 3)


def _round(v, n=4):
    return None if v is None else round(float(v), n)


def format_summary(s: dict) -> str:
    def f(v, unit=""):
        return "-" if v is None else f"{v}{unit}"

    mem = s.get("peak_memory_bytes")
    lines = [
        "── run summary ──",
        f"requests        {s['requests']} ({s.get('errors', 0) + s.get('bad_lines', 0)} errors)",
        f"tokens          {s['prompt_tokens']} in ({s['cached_tokens']} cached), {s['completion_tokens']} out",
        f"throughput      {f(s['output_tokens_per_s'])} output tok/s over {s['generation_s']} s "
        f"(model load {f(s.get('model_load_s'), ' s')})",
        f"TTFT            p50 {f(s['ttft_p50_ms'], ' ms')}  p99 {f(s['ttft_p99_ms'], ' ms')}",
        f"per token       p50 {f(s['tpot_p50_ms'], ' ms')}  p99 {f(s['tpot_p99_ms'], ' ms')}",
        f"batch size      mean {f(s['mean_batch_size'])}",
        f"KV hit rate     {f(s['kv_hit_rate'])}",
        f"peak memory     {mem / 2**20:.0f} MiB" if mem else "peak memory     -",
    ]
    if s.get("measured_overlap") is not None:
        lines.append(f"overlap         {s['measured_overlap']:.3f} of wall time with ≥2 streams busy")
    return "\n".join(lines)
