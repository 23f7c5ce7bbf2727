"""`agp run --stats`'s printed summary: a stage's timeouts, retries and cache hits appear on its
row, from the counters the runtime keeps, only where they are non-zero."""
import pytest

from pipeline_dsl.commands.runner import format_summary
from pipeline_dsl.flow.stats import StageCounter


def _summary(stages: dict) -> list[str]:
    s = {"requests": 3, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0,
         "output_tokens_per_s": None, "generation_s": 0, "ttft_p50_ms": None, "ttft_p99_ms": None,
         "tpot_p50_ms": None, "tpot_p99_ms": None, "mean_batch_size": None, "kv_hit_rate": None,
         "stages": stages}
    return format_summary(s).splitlines()


def _row(lines: list[str], name: str) -> str:
    return next(x for x in lines if x.strip().startswith(name + " "))


def test_the_run_summary_shows_a_stages_timeouts_retries_and_cache_hits():
    busy = StageCounter(items_in=3, failed=1, timeouts=2, retries=3, cache_hits=4).row("python")
    quiet = StageCounter(items_in=3, items_out=3).row("python")
    lines = _summary({"lookup": busy, "guard": quiet})
    assert _row(lines, "lookup").endswith("timeouts 2  retries 3  cache hits 4")
    row = _row(lines, "guard")
    assert "timeouts" not in row and "retries" not in row and "cache hits" not in row


def test_a_resumed_runs_summary_says_how_many_lines_the_output_already_answered():
    """After --resume the summary counted only this run's requests: 1360 of a 2,000-line file, with
    no word of the 640 kept (the --stats JSON had them as resumed_skipped)."""
    s = {"requests": 3, "errors": 0, "resumed_skipped": 640, "prompt_tokens": 0, "cached_tokens": 0,
         "completion_tokens": 0, "output_tokens_per_s": None, "generation_s": 0, "ttft_p50_ms": None,
         "ttft_p99_ms": None, "tpot_p50_ms": None, "tpot_p99_ms": None, "mean_batch_size": None,
         "kv_hit_rate": None}
    first = format_summary(s).splitlines()[1]
    assert first == "requests        3 (0 failed); 640 more already answered in the output (--resume)"
    assert "resume" not in format_summary({**s, "resumed_skipped": 0}).splitlines()[1]


def test_the_time_per_token_of_a_request_with_n_choices_is_per_choice():
    """n = 2: two choices of 11 tokens generated side by side, 1 s from the first token to the
    last. TPOT divided that second by all 22 tokens' 21 gaps (48 ms: as if each stream ran twice as
    fast as it did); each choice took 100 ms a token, as agp serve's request_time_per_output_token."""
    from types import SimpleNamespace as NS

    from pipeline_dsl.commands.runner import Tally, summarize
    from pipeline_dsl.flow import Choice, Result

    def result(choices, tokens):
        return Result("k", 1, [Choice(i, "", "length", {}) for i in range(choices)], None,
                      {"prompt_tokens": 5, "completion_tokens": tokens, "cached_tokens": 0},
                      {"ttft_s": 0.5, "latency_s": 1.5})

    runtime = NS(stats=lambda: {"engines": {}, "stages": {}, "edges": {}}, trace=NS(measured_overlap=lambda: 0.0),
                 plan=NS(streams=[]), segments=[])
    s = summarize(runtime, Tally.of([result(2, 22), result(1, 11)]), wall=2.0)
    assert s["tpot_p50_ms"] == s["tpot_p99_ms"] == 100.0


def test_a_run_whose_output_failed_says_how_many_answers_came_too_late_to_be_written():
    """A full disk: 1642 lines answered, 1540 written; the summary gave no word of the other 102."""
    s = {"requests": 1642, "errors": 0, "interrupted": 8358, "written": 1540, "unwritten": 102,
         "write_error": "No space left on device", "prompt_tokens": 0, "cached_tokens": 0,
         "completion_tokens": 0, "output_tokens_per_s": None, "generation_s": 0, "ttft_p50_ms": None,
         "ttft_p99_ms": None, "tpot_p50_ms": None, "tpot_p99_ms": None, "mean_batch_size": None,
         "kv_hit_rate": None}
    assert format_summary(s).splitlines()[1] == (
        "requests        1642 (0 failed, 8358 interrupted, not written; 1540 written before the output "
        "failed: No space left on device; 102 answered after it, not written)")


def test_the_time_per_token_of_a_vote_is_per_token_of_its_answer():
    """A vote of 3 candidates of 24 tokens generated side by side: usage counts 72 tokens, the
    answer (the winning candidate) holds 24; TPOT divided the decode second by 71 (14 ms) instead
    of 23 (43 ms), in agp run and in agp serve's request_time_per_output_token."""
    from types import SimpleNamespace as NS

    from pipeline_dsl.commands.runner import Tally, summarize
    from pipeline_dsl.flow import Choice, Result
    from pipeline_dsl.serve.metrics import ServerMetrics

    voted = Result("k", 1, [Choice(0, "yes", "length", {"usage": {"prompt_tokens": 5, "completion_tokens": 24}})],
                   None, {"prompt_tokens": 5, "completion_tokens": 72, "cached_tokens": 0},
                   {"ttft_s": 0.5, "latency_s": 1.5, "decode_s": 1.0})
    runtime = NS(stats=lambda: {"engines": {}, "stages": {}, "edges": {}}, trace=NS(measured_overlap=lambda: 0.0),
                 plan=NS(streams=[]), segments=[])
    s = summarize(runtime, Tally.of([voted]), wall=2.0)
    assert s["tpot_p50_ms"] == pytest.approx(1000 / 23, abs=0.1)
    metrics = ServerMetrics(process=False)
    metrics.observe_result(voted, 1.5)
    observed = {s.name: s.value for m in metrics.registry.collect() for s in m.samples
                if s.name.startswith("vllm:request_time_per_output_token_seconds")}
    assert observed["vllm:request_time_per_output_token_seconds_sum"] == pytest.approx(1 / 23)


def test_a_line_taken_but_never_started_counts_as_interrupted_and_is_not_written():
    """A stop while the runtime has taken two lines and answered one: the other is handed to
    on_interrupted (not written, so --resume runs it) and the summary counts it as interrupted,
    as the run's 'N interrupted, not written' says."""
    import itertools
    import threading
    from types import SimpleNamespace as NS

    from pipeline_dsl.commands.runner import RunRequest, run_pipeline
    from pipeline_dsl.flow import Choice, Result
    from pipeline_dsl.requests_io import parse_line

    stop = threading.Event()

    def run_all(items, on_result, stop, keep_results):
        taken = [item for item, _pin in itertools.islice(items, 2)]
        stop.set()                                  # the second line never starts
        on_result(0, Result("k", taken[0]["id"], [Choice(0, "hi", "length", {})], None,
                            {"prompt_tokens": 2, "completion_tokens": 1, "cached_tokens": 0}, {}))

    runtime = NS(run_all=run_all, seg_of_gen={}, stats=lambda: {"engines": {}, "stages": {}, "edges": {}},
                 trace=NS(measured_overlap=lambda: 0.0), plan=NS(streams=[]), segments=[])
    requests = [RunRequest(slot=i, line=i + 1, parsed=parse_line(f'{{"prompt": "p{i}"}}', i + 1)) for i in range(3)]
    done, cut = [], []
    summary = run_pipeline(runtime, requests, on_done=lambda slot, rec: done.append(slot), progress=False,
                           stop=stop, on_interrupted=cut.append)
    assert (done, cut) == ([0], [1])
    assert (summary["requests"], summary["interrupted"]) == (1, 1)


def test_the_run_summarys_figures_are_vllms_of_the_requests_times():
    """agp run's TTFT and per-token p50 / p99, output tok/s and counts, against vLLM's definitions
    computed here from each request's times: TTFT its first token's, TPOT (latency - TTFT) /
    (tokens - 1), percentiles by linear interpolation (numpy's), output tokens over the run's
    generation time; a failed request counts as a request and an error, none of its figures."""
    from types import SimpleNamespace as NS

    import numpy as np

    from pipeline_dsl.commands.runner import Tally, summarize
    from pipeline_dsl.flow import Choice, PipelineError, Result

    rng = np.random.default_rng(3)
    raw = [(float(rng.uniform(0.05, 0.9)), int(rng.integers(2, 40)), int(rng.integers(3, 30))) for _ in range(23)]
    raw = [(ttft, ttft + float(rng.uniform(0.1, 3.0)), tokens, prompt) for ttft, tokens, prompt in raw]
    results = [Result(f"k{i}", i, [Choice(0, "", "length", {})], None,
                      {"prompt_tokens": prompt, "completion_tokens": tokens, "cached_tokens": 0},
                      {"ttft_s": ttft, "latency_s": latency})
               for i, (ttft, latency, tokens, prompt) in enumerate(raw)]
    failed = Result("bad", 99, [], PipelineError("no prompt", kind="invalid"), {}, {})
    runtime = NS(stats=lambda: {"engines": {}, "stages": {}, "edges": {}}, trace=NS(measured_overlap=lambda: 0.0),
                 plan=NS(streams=[]), segments=[])
    s = summarize(runtime, Tally.of(results[:11] + [failed] + results[11:]), wall=7.5)
    ttft = [r[0] for r in raw]
    tpot = [(latency - t) / (tokens - 1) for t, latency, tokens, _ in raw]
    assert (s["requests"], s["errors"]) == (24, 1)
    assert s["completion_tokens"] == sum(r[2] for r in raw) and s["prompt_tokens"] == sum(r[3] for r in raw)
    assert s["output_tokens_per_s"] == pytest.approx(sum(r[2] for r in raw) / 7.5, abs=0.01)
    for key, xs in (("ttft", ttft), ("tpot", tpot)):
        for q in (50, 99):
            assert s[f"{key}_p{q}_ms"] == pytest.approx(np.percentile(xs, q) * 1000, abs=1e-3), (key, q)


def test_the_summarys_token_counts_are_the_answered_requests_usage_each_its_own():
    """The summary's prompt_tokens, completion_tokens and cached_tokens add up the usage of the
    answered requests' output lines, each figure its own (cached_tokens the prompt tokens the KV
    cache held, not the prompt tokens); a failed request adds nothing."""
    from pipeline_dsl.commands.runner import Tally, summarize
    from pipeline_dsl.flow import Choice, PipelineError, Result

    usages = [(30, 5, 16), (12, 7, 0), (50, 2, 48)]
    results = [Result(f"k{i}", i, [Choice(0, "", "length", {})], None,
                      {"prompt_tokens": p, "completion_tokens": c, "cached_tokens": cached},
                      {"ttft_s": 0.1, "latency_s": 0.5}) for i, (p, c, cached) in enumerate(usages)]
    failed = Result("bad", 9, [], PipelineError("no prompt", kind="invalid"), {}, {})
    s = summarize(_runtime({}), Tally.of(results + [failed]), wall=2.0)
    assert (s["prompt_tokens"], s["completion_tokens"], s["cached_tokens"]) == (92, 14, 64)


def test_the_summarys_failed_count_is_every_request_that_failed():
    """'requests N (M failed)': M is every failed request, those the pipeline failed as well as the
    bad lines (the summary's errors, which count both), not the bad lines alone."""
    s = {"requests": 5, "errors": 3, "bad_lines": 1, "prompt_tokens": 0, "cached_tokens": 0,
         "completion_tokens": 0, "output_tokens_per_s": None, "generation_s": 0, "ttft_p50_ms": None,
         "ttft_p99_ms": None, "tpot_p50_ms": None, "tpot_p99_ms": None, "mean_batch_size": None,
         "kv_hit_rate": None}
    assert format_summary(s).splitlines()[1] == "requests        5 (3 failed)"


def test_the_kv_hit_rate_is_the_engines_hit_tokens_over_the_tokens_they_looked_up():
    """The KV hit rate is over the prompt tokens the engines looked up in the cache (a cascade's
    second engine looks the prompt up again), not over the requests' prompt tokens."""
    from types import SimpleNamespace as NS

    from pipeline_dsl.commands.runner import Tally, summarize
    from pipeline_dsl.flow import Choice, Result

    engines = {"draft": {"kv_queried_tokens": 120, "kv_hit_tokens": 30}, "main": {"kv_queried_tokens": 80,
                                                                                 "kv_hit_tokens": 50}}
    runtime = NS(stats=lambda: {"engines": engines, "stages": {}, "edges": {}},
                 trace=NS(measured_overlap=lambda: 0.0), plan=NS(streams=[]), segments=[])
    result = Result("k", 1, [Choice(0, "", "length", {})], None,
                    {"prompt_tokens": 100, "completion_tokens": 4, "cached_tokens": 40}, {"ttft_s": 0.1, "latency_s": 0.4})
    assert summarize(runtime, Tally.of([result]), wall=1.0)["kv_hit_rate"] == pytest.approx(80 / 200)


def _runtime(engines: dict, models: dict | None = None):
    from types import SimpleNamespace as NS

    return NS(stats=lambda: {"engines": engines, "stages": {}, "edges": {}, "models": models},
              trace=NS(measured_overlap=lambda: 0.0), plan=NS(streams=[]), segments=[])


def test_a_run_whose_engines_looked_nothing_up_has_no_kv_hit_rate_and_one_peak_memory():
    """No prompt token looked up (a pipeline a python stage answers): the hit rate is none, not
    0 %; the peak memory is the process's, which every engine reports alike, not their sum."""
    from pipeline_dsl.commands.runner import Tally, summarize

    s = summarize(_runtime({"a": {"kv_queried_tokens": 0, "peak_memory_bytes": 3 << 20},
                            "b": {"peak_memory_bytes": 3 << 20}}), Tally(), wall=1.0)
    assert s["kv_hit_rate"] is None and s["peak_memory_bytes"] == 3 << 20
    lines = format_summary(s).splitlines()
    assert "KV hit rate     -" in lines and "peak memory     3 MiB" in lines


def test_the_summary_says_how_many_copies_of_the_weights_its_engines_loaded():
    s = {"requests": 3, "prompt_tokens": 0, "cached_tokens": 0,
         "completion_tokens": 0, "output_tokens_per_s": None, "generation_s": 0, "ttft_p50_ms": None,
         "ttft_p99_ms": None, "tpot_p50_ms": None, "tpot_p99_ms": None, "mean_batch_size": None,
         "kv_hit_rate": None, "weight_bytes": 3 << 20}
    assert not any(x.startswith("weights ") for x in format_summary(s).splitlines())   # no copy counted
    one = format_summary({**s, "weight_copies": 1, "engines": {"g1": {}, "g2": {}, "g3": {}}}).splitlines()
    assert "weights         3.0 MiB: 1 loaded copy for 3 engines" in one
    two = format_summary({**s, "weight_copies": 2, "engines": {"g1": {}, "g2": {}}}).splitlines()
    assert "weights         3.0 MiB: 2 loaded copies for 2 engines" in two
    alone = format_summary({**s, "weight_copies": 1, "engines": {"g1": {}}}).splitlines()
    assert "weights         3.0 MiB: 1 loaded copy for 1 engine" in alone


def test_a_stages_row_shows_its_median_call_in_milliseconds():
    row = {**StageCounter(items_in=3, items_out=3).row("python"), "latency_p50_s": 0.0125}
    assert _row(_summary({"lookup": row}), "lookup").endswith("  12.50 ms")


def test_a_stages_latency_buckets_count_a_call_at_a_bound_in_that_bucket():
    """The latency histogram of a stage's row (`--stats`, /stats) is cumulative with Prometheus's
    `le` (less than or equal): a call of exactly 5 ms is in the 0.005 bucket, one just over it in
    the next, and the +Inf bucket holds every call."""
    c = StageCounter()
    for seconds in (0.005, 0.0050001, 0.25, 1e9):
        c.observe(seconds)
    buckets = dict((le, n) for le, n in c.row("python")["latency"]["buckets"])
    assert (buckets[0.0025], buckets[0.005], buckets[0.01], buckets[0.25], buckets["+Inf"]) == (0, 1, 2, 3, 4)
