"""Run a pipeline over a list of requests and measure it (`agp run`).

`run_pipeline` feeds the requests into a `PipelineRuntime` (at most as many in flight as
the pipeline admits), drives the first engine segment on the calling thread until every
request is answered, hands each answer to `on_done` and returns the run summary:
requests and errors, tokens in and out, output tokens/s over generation (model loading
excluded), TTFT and TPOT p50/p99, mean batch size, KV hit rate, peak memory, dtype,
weights and what runs the linears per engine, per stage items in/out, rejects, failures, drops, queue depth, time
spent and call latency, and per edge the items sent along it (they add up: flow/stats.py).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import Callable

from pipeline_dsl.commands.batch_api import BatchLine
from pipeline_dsl.engine.config import percentile
from pipeline_dsl.flow import unbuilt
from pipeline_dsl.reasoning import stage_answer_thinks
from pipeline_dsl.requests_io import ParsedRequest
from pipeline_dsl.serve.answers import Vocabularies, refuse_while_thinking, thinking_tokens, tool_form
from pipeline_dsl.serve.errors import api_error
from pipeline_dsl.serve.protocol import chat_message, completion_logprobs
from pipeline_dsl.serve.token_fields import prompt_logprobs_json

log = logging.getLogger("agp.run")


@dataclass
class RunRequest:
    slot: int                     # position in the output
    line: int                     # input line, for error records
    parsed: ParsedRequest | None
    batch: BatchLine | None = None  # an OpenAI batch-API line instead (answered in that shape)

    def items(self, runtime) -> list[tuple[dict, str | None]]:
        """(the request as the pipeline's items carry it, the generate stage it pins or None):
        one, or one per prompt of a batch-API completions line with several."""
        if self.batch is not None:
            return [(item, self.batch.pin) for item in self.batch.items()]
        return [(self.parsed.item(), _pin(runtime, self.parsed))]

    def result(self, results: list):
        """One result of its items' results: choice i of prompt k numbered k * per + i (those past
        per, a fan-out's, after every prompt's: ChoiceNumbers), usage summed, as agp serve answers a
        completions batch."""
        if self.batch is not None:
            return self.batch.result(results)
        return results[0]

    def answer(self, result, runtime) -> dict:
        """Its output line."""
        if self.batch is not None:
            return self.batch.answer(result, runtime)
        return record(self, result, several=len(runtime.seg_of_gen) > 1, runtime=runtime)


def record(req: RunRequest, result, several: bool = False, runtime=None) -> dict:
    """One output line: the answer (its choices when more than one), or the error. `several`:
    the pipeline has several generate stages (each answer names the one that made it). With
    `echo` the text begins with the prompt; `logprobs` and `prompt_logprobs` come in the shapes
    of agp serve's completions choices (one formatter for both: serve/protocol.py and
    serve/token_fields.py), which need `runtime` for the tokens' text."""
    if result.error is not None:
        # status, param and code as agp serve answers this error (serve/errors.py's one table),
        # so a rerun can tell a 504 worth retrying from a 400 that will fail again
        api = api_error(result.error, "chat" if req.parsed.messages is not None else "completion",
                        max_tokens_field=req.parsed.max_tokens_field, format_field=req.parsed.format_field)
        err = {"line": req.line, "message": api.message, "type": result.error.kind,
               "status": api.status}
        if result.error.stage:
            err["stage"] = result.error.stage
        if getattr(result.error, "retry_after", None) is not None:
            err["retry_after"] = result.error.retry_after
        if result.error.kind == "rejected":     # a Reject's param and code always (param null when it names none)
            err["param"], err["code"] = api.param, api.code
        else:
            err.update({k: v for k, v in (("param", api.param), ("code", api.code)) if v is not None})
        return {"id": req.parsed.id, "error": err}
    first = result.choices[0]
    asked = req.parsed.extras
    vocabs = (Vocabularies(runtime, _pin(runtime, req.parsed), asked, asked.get("prompt_logprobs") is not None)
              if runtime is not None else None)          # one per line: each stage's token text made once
    parts = [_choice_parts(req, c, vocabs) for c in result.choices]
    thinking = _thinking(req.parsed, runtime)
    if thinking is not None:        # an answer no model wrote, or one its stage held to a format, has none
        thinks = [stage_answer_thinks(runtime, c.data.get("generated_by"), c.data.get("request"),
                                      c.data.get("constrained"), thinking) for c in result.choices]
    else:
        thinks = [None] * len(result.choices)
    reasons = [_tool_calls(req.parsed, c, p, runtime, t) for c, p, t in zip(result.choices, parts, thinks)]
    out = {"id": req.parsed.id, "text": parts[0]["text"], "finish_reason": reasons[0],
           "usage": dict(result.usage)}
    if thinking is not None:        # the tokens of the answers' thinking, as agp serve's usage counts them
        out["usage"]["reasoning_tokens"] = thinking_tokens(result.choices, thinks)
    if several and first.data.get("generated_by"):
        out["generated_by"] = first.data["generated_by"]
    if first.data.get("branches"):
        out["branches"] = first.data["branches"]
    out.update({k: v for k, v in parts[0].items() if k not in ("text", "token_ids")})
    ids = (first.data.get("request") or {}).get("return_token_ids")     # vLLM's return_token_ids
    if ids:
        out["prompt_token_ids"], out["token_ids"] = first.data.get("prompt_token_ids"), first.data.get("token_ids")
    if len(result.choices) > 1:       # each choice names its own stage: a cascade may answer them on two
        out["choices"] = [{"index": c.index, "text": p.pop("text"), "finish_reason": reason,
                           **({"generated_by": c.data["generated_by"]}
                              if several and c.data.get("generated_by") else {}),
                           **({"token_ids": c.data.get("token_ids")} if ids else {}), **p}
                          for c, p, reason in zip(result.choices, parts, reasons)]
    why = req.parsed.format_set_aside         # the line's format, set aside by a forced tool call
    if why is not None:                       # said as agp serve's Warning header says it
        out["warning"] = why
    return out


def _thinking(parsed: ParsedRequest, runtime) -> bool | None:
    """Whether a line's chat answers start in their thinking, as `agp run --reasoning-parser` reads
    them (pipeline_dsl.reasoning's thinks); None where no reasoning parser reads them (no flag, or
    a completions line, which vLLM never splits either)."""
    parser = getattr(runtime, "reasoning_parser", None)
    if parser is None or parsed.messages is None:
        return None
    from pipeline_dsl.reasoning import thinks

    return thinks(parser, parsed.extras.get("chat_template_kwargs"))


def check_line_reasoning(parsed: ParsedRequest, runtime) -> None:
    """A chat line whose answer starts in its thinking may not ask for structured output or force a
    tool call: the APIError agp serve answers such a request with (answers.check_reasoning)."""
    if _thinking(parsed, runtime):
        forced = bool(parsed.tools) and parsed.tool_choice not in ("none", "auto")
        refuse_while_thinking(runtime, parsed.response_format, parsed.format_field, forced)


def _tool_calls(parsed: ParsedRequest, choice, parts: dict, runtime, thinking: bool | None = None) -> str | None:
    """A choice's finish reason, its tool calls parsed out of its text into `parts` as agp serve's
    chat answer parses them (serve/protocol.py's chat_message) when the line gave tools and a
    tool_choice other than none: `tool_calls` (id, name, JSON arguments), `text` what is left
    (null when nothing is), `finish_reason` "tool_calls" (a named tool_choice's: the answer's own, "stop",
    as agp serve's); a line without calls its text less the
    family's markers (kept in the decoded answer for the parser). Under --reasoning-parser
    (`thinking` not None: whether this answer starts in its thinking) a chat line's thinking is
    split off first, as agp serve's message splits it: `text` is the content after `</think>`
    (null when nothing is), `reasoning` and `reasoning_content` the thinking (null where the
    answer has none, or the line set include_reasoning false), and the tool calls are read from
    the content alone. Any other line keeps its text."""
    active = bool(parsed.tools) and parsed.tool_choice != "none"
    parser = tool_form(runtime, _pin(runtime, parsed), parsed.tool_choice, active, choice.data.get("generated_by"))
    message, reason = chat_message(parts["text"], choice.finish_reason, active,
                                   None if parsed.parallel_tool_calls else 1, parser, choice.tool_read, thinking,
                                   named=isinstance(parsed.tool_choice, dict))
    if active or thinking is not None:      # the content: a family's markers left out (tools.without_markers)
        parts["text"] = message["content"]
    if thinking is not None:
        thought = message["reasoning"] if parsed.include_reasoning else None
        parts["reasoning"] = parts["reasoning_content"] = thought
    if message.get("tool_calls"):
        parts["tool_calls"] = message["tool_calls"]
    return reason


def _choice_parts(req: RunRequest, choice, vocabs: Vocabularies | None) -> dict:
    """A choice's text (the prompt first with `echo`), and its `logprobs` / `prompt_logprobs`
    where the line asked for them, as agp serve's completions choice carries them: its tokens read
    with the tokenizer of the generate stage that wrote it (its `generated_by`)."""
    asked = req.parsed.extras
    echo, k, prompt_k = bool(asked.get("echo")), asked.get("logprobs"), asked.get("prompt_logprobs")
    out, prompt = {"text": choice.text}, None
    if choice.data.get("stop_reason") is not None:        # vLLM's: the stop string or stop token id
        out["stop_reason"] = choice.data["stop_reason"]
    if vocabs is None:
        return out
    gen = choice.data.get("generated_by")
    if echo and req.parsed.messages is None:
        prompt = req.parsed.prompt
        if prompt is None:
            prompt = vocabs.detokenise(req.parsed.prompt_token_ids or (), gen)
        out["text"] = prompt + choice.text
    if k is not None:
        out["logprobs"] = completion_logprobs(choice.data, vocabs.of(gen).name_of, prompt, vocabs.offsets(gen), k=k)
    if prompt_k is not None:
        out["prompt_logprobs"] = prompt_logprobs_json(choice.data.get("prompt_logprobs"), prompt_k,
                                                      vocabs.of(gen).text_of)
    return out


def run_pipeline(runtime, requests: Iterable[RunRequest], *, on_done: Callable[[int, dict], None],
                 progress: bool = True, stop: threading.Event | None = None,
                 on_interrupted: Callable[[int], None] | None = None,
                 total: Callable[[], int | None] | None = None) -> dict:
    """Answer every request through `runtime` (PipelineRuntime.run_all); returns the run summary.
    `requests` is taken as the runtime admits them (an iterator may still be reading its input),
    and a request is forgotten once answered. Once `stop` is set, the requests in flight are
    aborted and those taken but never started are left: `on_interrupted(slot)` hears of each
    instead of `on_done`. `total()`: how many requests the bar counts to, once known (None: not
    yet; a list's length by default)."""
    bar = None
    if total is None and isinstance(requests, Sized):
        n = len(requests)
        total = lambda: n                  # noqa: E731
    if progress:
        from pipeline_dsl.commands.progress import progress_bar

        bar = progress_bar(total() if total is not None else None)
    t0 = time.perf_counter()
    lock = threading.Lock()
    completion = 0

    def known_total() -> None:
        """The bar's total once `total()` knows it (a streamed input's: counted, or read to its end)."""
        if total is not None and (n := total()) is not None and n != bar.total:
            bar.total = n

    interrupted = 0
    taken: dict[int, RunRequest] = {}       # each line taken and not answered yet
    owner: dict[int, tuple[int, int]] = {}   # each pipeline request in flight -> (its line, its place there)
    parts_of: dict[int, list] = {}          # each line's results, by its items' order (None: not in yet)
    left: dict[int, int] = {}
    tally = Tally()                         # what the summary needs of each result, no more

    def items():
        """The pipeline requests of the lines, in order, each line's registered as it is taken."""
        k = 0
        for i, r in enumerate(requests):
            parts = r.items(runtime)
            with lock:
                taken[i] = r
                parts_of[i], left[i] = [None] * len(parts), len(parts)
                for j in range(len(parts)):
                    owner[k + j] = (i, j)
            k += len(parts)
            yield from parts

    def interrupted_by(result) -> bool:
        return stop is not None and stop.is_set() and result.error is not None and result.error.kind == "unavailable"

    def done(k: int, result) -> None:
        nonlocal completion, interrupted
        with lock:                        # a line of several prompts is answered once all are in
            i, j = owner.pop(k)
            parts_of[i][j] = result
            left[i] -= 1
            if left[i]:
                return
            results, req = parts_of.pop(i), taken.pop(i)   # handed on: an answer is not kept after its line
            del left[i]
        if any(interrupted_by(res) for res in results):
            interrupted += 1
            if on_interrupted is not None:
                on_interrupted(req.slot)
            return
        result, line = answered(req, results, runtime)
        tally.add(result)
        on_done(req.slot, line)
        if bar is not None:
            with lock:
                completion += result.usage.get("completion_tokens", 0)
                # shown with the count, at the bar's pace (a refresh per answer filled a log)
                bar.set_postfix_str(f"{completion / max(time.perf_counter() - t0, 1e-9):.0f} tok/s", refresh=False)
                known_total()
                bar.update(1)

    runtime.run_all(items(), on_result=done, stop=stop, keep_results=False)
    wall = time.perf_counter() - t0
    if bar is not None:
        known_total()                      # the input's end may come after the last answer (a line refused there)
        bar.close()
    never = list(taken.values())            # taken, never answered nor cut (a line's prompts not all started)
    for r in never:
        if on_interrupted is not None:
            on_interrupted(r.slot)
    summary = summarize(runtime, tally, wall)
    summary["interrupted"] = interrupted + len(never)
    return summary


def answered(req: RunRequest, results: list, runtime) -> tuple:
    """(the result of a line's items' results, its output line). Whatever fails in making them, the
    line's one result (combining its parts, building an embeddings body) as its output line, fails
    this line alone: the line is the error that says so, with the status agp serve answers it
    (500 answer_failed), and the other lines go on."""
    result = None
    try:
        result = req.result(results)
        return result, req.answer(result, runtime)
    except Exception as e:            # noqa: BLE001 - its line says so; the other lines go on
        log.exception("line %d: its answer could not be built; an error is written for it", req.line)
        result = unbuilt(results[0] if result is None else result, e)
        return result, req.answer(result, runtime)


def _pin(runtime, parsed: ParsedRequest) -> str | None:
    """A request line's `model` naming a generate stage pins it there."""
    return parsed.model if parsed.model in runtime.seg_of_gen else None


class Tally:
    """What the run summary needs of the answered requests' results, taken as each comes (the
    results themselves are not kept: a run's memory does not grow with its answers)."""

    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        # the answered requests' tokens, as their output lines' usage adds up (a failed line has no usage)
        self.tokens = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}

    @classmethod
    def of(cls, results) -> "Tally":
        tally = cls()
        for r in results:
            tally.add(r)
        return tally

    def add(self, r) -> None:
        self.requests += 1
        if r.error is not None:
            self.errors += 1
            return
        for k in self.tokens:
            self.tokens[k] += r.usage.get(k, 0)
        if r.metrics.get("ttft_s") is None:
            return
        self.ttft.append(r.metrics["ttft_s"])
        t = r.time_per_output_token(r.metrics["latency_s"] - r.metrics["ttft_s"])
        if t is not None:
            self.tpot.append(t)


def summarize(runtime, tally: Tally, wall: float) -> dict:
    ttft, tpot = tally.ttft, tally.tpot
    prompt, completion, cached = (tally.tokens[k] for k in ("prompt_tokens", "completion_tokens", "cached_tokens"))
    stats = runtime.stats()
    engines = list(stats["engines"].values())
    first = engines[0] if engines else {}
    steps = sum(e.get("decode_steps", 0) for e in engines)
    queried = sum(e.get("kv_queried_tokens", 0) for e in engines)
    summary = {
        "requests": tally.requests,
        "errors": tally.errors,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
        "generation_s": round(wall, 4),
        "output_tokens_per_s": round(completion / wall, 2) if wall > 0 else None,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "tpot_p50_ms": _ms(percentile(tpot, 50)),
        "tpot_p99_ms": _ms(percentile(tpot, 99)),
        "mean_batch_size": _round(sum(e.get("mean_batch_size", 0) * e.get("decode_steps", 0)
                                      for e in engines) / steps) if steps else None,
        "kv_hit_rate": _round(sum(e.get("kv_hit_tokens", 0) for e in engines) / queried) if queried else None,
        "peak_memory_bytes": first.get("peak_memory_bytes"),
        # the engines' weights, each loaded copy once (engines on the same weights share one)
        "weight_bytes": (stats.get("models") or {}).get("weight_bytes"),
        "weight_copies": (stats.get("models") or {}).get("models"),
        "dtype": {name: e.get("dtype") for name, e in stats["engines"].items()},       # per engine: two
        "weights": {name: e.get("weights") for name, e in stats["engines"].items()},   # may differ
        "linears": {name: e.get("linears") for name, e in stats["engines"].items()},   # what runs them
        "measured_overlap": round(runtime.trace.measured_overlap(), 4),
        "streams": [s.name for s in runtime.plan.streams],
        "stages": stats["stages"],
        "edges": stats["edges"],
        "engines": {name: {k: v for k, v in e.items() if not isinstance(v, (list, dict))}
                    for name, e in stats["engines"].items()},
    }
    for es in runtime.segments:
        if getattr(es, "run_stats", None):
            summary["discarded_tokens"] = summary.get("discarded_tokens", 0) + es.run_stats.get("discarded_tokens", 0)
            summary["steps"] = summary.get("steps", 0) + es.run_stats.get("steps", 0)
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
        f"requests        {s['requests']} ({s.get('errors', 0)} failed"
        + (f", {s['interrupted']} interrupted, not written" if s.get("interrupted") else "")
        + (f"; {s['written']} written before the output failed: {s['write_error']}" if s.get("write_error")
           else "")
        + (f"; {s['unwritten']} answered after it, not written" if s.get("unwritten") else "") + ")"
        + (f"; {s['resumed_skipped']} more already answered in the output (--resume)" if s.get("resumed_skipped")
           else "")
        + (f"; the input was read to line {s['input_lines']}, not to its end" if s.get("input_ended") is False
           else ""),
        f"tokens          {s['prompt_tokens']} in ({s['cached_tokens']} cached), {s['completion_tokens']} out",
        f"throughput      {f(s['output_tokens_per_s'])} output tok/s over {s['generation_s']} s "
        f"(model load {f(s.get('model_load_s'), ' s')})",
        f"TTFT            p50 {f(s['ttft_p50_ms'], ' ms')}  p99 {f(s['ttft_p99_ms'], ' ms')}",
        f"per token       p50 {f(s['tpot_p50_ms'], ' ms')}  p99 {f(s['tpot_p99_ms'], ' ms')}",
        f"batch size      mean {f(s['mean_batch_size'])}",
        f"KV hit rate     {f(s['kv_hit_rate'])}",
        f"peak memory     {mem / 2**20:.0f} MiB" if mem else "peak memory     -",
    ]
    copies, engines = s.get("weight_copies"), len(s.get("engines") or {})
    if copies and s.get("weight_bytes"):
        lines.append(f"weights         {s['weight_bytes'] / 2**20:.1f} MiB: {copies} loaded "
                     f"cop{'y' if copies == 1 else 'ies'} for {engines} engine{'s' * (engines != 1)}")
    cpu = {name: e for name, e in (s.get("engines") or {}).items() if e.get("threads")}
    if cpu:
        from pipeline_dsl.engine.cpus import cpus_text

        cpus = max(e.get("cpus") or 0 for e in cpu.values())     # the process's: the same for each
        wait = next(iter(cpu.values())).get("omp_wait_policy")               # the process's
        lines.append("threads         " + ", ".join(f"{name} {e['threads']}" for name, e in cpu.items())
                     + f" (of the {cpus_text(cpus)} this process may use)"
                     + (f"; OpenMP waits {wait}" if wait and wait != "default" else ""))
    for name, e in (s.get("engines") or {}).items():
        if e.get("compile_fallbacks"):
            lines.append(f"compile         {name}: {e['compile_fallbacks']} piece(s) fell back to eager: "
                         f"{e.get('compile_fallback', '')}")
    if s.get("measured_overlap") is not None:
        lines.append(f"overlap         {s['measured_overlap']:.3f} of wall time with ≥2 streams busy")
    stages = s.get("stages") or {}
    if stages:
        lines.append("stages          in → out   rejected failed dropped queued  busy     p50")
        w = max(len(n) for n in stages)
        for name, row in stages.items():
            p50 = row.get("latency_p50_s")
            lines.append(f"  {name:<{w}}  {row['items_in']:>5} → {row['items_out']:<5} {row['rejected']:>6} "
                         f"{row['failed']:>6} {row.get('dropped', 0):>7} {row['queued']:>6}  "
                         f"{row['busy_s']:.3f} s" + (f"  {p50 * 1000:.2f} ms" if p50 is not None else "")
                         + _counts(row))
    return "\n".join(lines)


# A stage's rarer counts, each shown only where non-zero so the common row stays short.
_COUNTS = (("timeouts", "timeouts"), ("retries", "retries"), ("cache_hits", "cache hits"),
           ("stuck", "stuck"),                    # written off, still running
           ("stalls", "stalls"))                  # an async call blocked its event loop


def _counts(row: dict) -> str:
    return "".join(f"  {label} {row[key]}" for key, label in _COUNTS if row.get(key))
