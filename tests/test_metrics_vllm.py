"""The vLLM metrics dashboards and gateways read, scraped with prometheus-client's parser from an
`agp serve` app driven by the `openai` client and httpx: the older KV-usage name, the cache's
configuration, the `engine` label, tokens per engine step, the n and max_tokens parameters,
inference time and time per output token, tool-call finishes counted as tool_calls, the
tokens of aborted requests counted as generated, and every metric the docs name exported with
the type they give it.
"""
from __future__ import annotations

import gzip
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_serve import LiveServer

TOOL = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}}}


@pytest.fixture(scope="module")
def server(long_gguf):                                   # room for the tool prompt
    s = LiveServer(long_gguf, max_batch_size=8, overrides={"kv_budget_bytes": 8 << 20})
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def scrape(server) -> dict:
    text = server.http.get(server.url + "/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, name: str, sample: str, **labels) -> float:
    return sum(s.value for s in fams[name].samples if s.name == sample and labels.items() <= s.labels.items())


def test_cache_gauges_config_info_and_the_engine_label(server, client):
    client.completions.create(model="tiny", prompt="fill the cache a little", max_tokens=4)
    fams = scrape(server)
    assert fams["vllm:gpu_cache_usage_perc"].type == "gauge"
    assert value(fams, "vllm:gpu_cache_usage_perc", "vllm:gpu_cache_usage_perc") == \
        value(fams, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc")
    info = fams["vllm:cache_config_info"].samples
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels["block_size"] == "8" and info[0].labels["enable_prefix_caching"] == "True"
    assert int(info[0].labels["num_gpu_blocks"]) == server.stats()["kv_blocks_total"]
    vllm = [s for name, f in fams.items() if name.startswith("vllm:") for s in f.samples]
    assert vllm and all(s.labels.get("engine") == "0" and s.labels.get("model_name") for s in vllm)


def test_iteration_tokens_count_as_vllm_v1_counts_them(server, client):
    """vLLM v1's tokens of a step: those sampled plus each prompt whose prefill ends in it; a
    6-token prompt with 5 tokens generated is 6 + 1 in its first step and 1 in each of 4 more: 11
    (not the 10 fed through the model: the last token sampled is never fed)."""
    before = scrape(server)
    out = client.completions.create(model="tiny", prompt=[5, 6, 7, 8, 9, 10], max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (6, 5)
    after = scrape(server)
    name = "vllm:iteration_tokens_total"
    assert value(after, name, name + "_sum") - value(before, name, name + "_sum") == 11
    assert value(after, name, name + "_count") - value(before, name, name + "_count") == 5


def test_step_tokens_params_and_request_times_move(server, client):
    before = scrape(server)
    client.completions.create(model="tiny", prompt="hello world", max_tokens=7, n=2, extra_body={"ignore_eos": True})
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"ignore_eos": True, "max_tokens": 5})
    after = scrape(server)

    def grew(name, sample):
        return value(after, name, sample) - value(before, name, sample)

    assert after["vllm:iteration_tokens_total"].type == "histogram"
    steps = grew("vllm:iteration_tokens_total", "vllm:iteration_tokens_total_count")
    assert steps >= 7 and grew("vllm:iteration_tokens_total", "vllm:iteration_tokens_total_sum") >= 7 * 2 + 5
    assert grew("vllm:request_params_n", "vllm:request_params_n_count") == 2
    assert value(after, "vllm:request_params_n", "vllm:request_params_n_bucket", le="1.0") - \
        value(before, "vllm:request_params_n", "vllm:request_params_n_bucket", le="1.0") == 1      # the chat: n = 1
    assert grew("vllm:request_params_n", "vllm:request_params_n_sum") == 2 + 1                # a request without n: 1
    assert grew("vllm:request_params_max_tokens", "vllm:request_params_max_tokens_sum") == 7 * 2 + 5   # a choice's
    assert grew("vllm:request_inference_time_seconds", "vllm:request_inference_time_seconds_count") == 2 + 1
    assert grew("vllm:request_time_per_output_token_seconds",
                "vllm:request_time_per_output_token_seconds_count") == 2 + 1
    assert grew("vllm:request_time_per_output_token_seconds", "vllm:request_time_per_output_token_seconds_sum") > 0


def test_each_of_n_choices_counts_as_a_request_of_vllms_as_vllm_v1s_child_requests_do(server, client):
    """vLLM v1 runs a request of n as n child requests (parallel_sampling.py), each recorded as a
    finished request of its own (loggers.py): its finish reason, latencies and queue / prefill /
    decode / inference times, prompt and generation tokens per request, max_tokens, and its prompt
    in vllm:prompt_tokens_total once prefilled; only the request's n and its longest choice are
    observed once. A dashboard dividing one by another (mean generation length: the histogram's
    sum over its count; requests per second from e2e's count next to request_success) reads the
    same from agp."""
    before = scrape(server)
    r = client.completions.create(model="tiny", prompt="count each choice", max_tokens=5, n=3,
                                  extra_body={"ignore_eos": True})
    prompt = r.usage.prompt_tokens
    assert r.usage.completion_tokens == 15
    after = scrape(server)

    def grew(name, sample, **labels):
        return value(after, name, sample, **labels) - value(before, name, sample, **labels)

    assert grew("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 3
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_time_per_output_token_seconds", "request_prompt_tokens", "request_generation_tokens",
                 "request_params_max_tokens"):
        assert grew(f"vllm:{name}", f"vllm:{name}_count") == 3, name
    assert grew("vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == 15      # 5 each
    assert grew("vllm:request_generation_tokens", "vllm:request_generation_tokens_bucket", le="5.0") == 3
    assert grew("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") == 3 * prompt
    assert grew("vllm:request_params_max_tokens", "vllm:request_params_max_tokens_sum") == 3 * 5
    assert grew("vllm:prompt_tokens", "vllm:prompt_tokens_total") == 3 * prompt
    assert grew("vllm:generation_tokens", "vllm:generation_tokens_total") == 15
    assert grew("vllm:request_params_n", "vllm:request_params_n_count") == 1
    assert grew("vllm:request_params_n", "vllm:request_params_n_sum") == 3
    assert grew("vllm:request_max_num_generation_tokens", "vllm:request_max_num_generation_tokens_count") == 1
    assert grew("vllm:request_max_num_generation_tokens", "vllm:request_max_num_generation_tokens_sum") == 5
    assert grew("agp_prompt_tokens", "agp_prompt_tokens_total") == prompt      # agp's own: the request's usage


def test_max_num_generation_tokens_is_a_requests_longest_choice(server, client):
    """vLLM's dashboard panel "Max Generation Token in Sequence Group" (rate of the histogram's
    _sum): one observation per request, its longest choice's tokens, not all its choices' tokens."""
    name = "vllm:request_max_num_generation_tokens"
    before = scrape(server)
    client.completions.create(model="tiny", prompt="hello world", max_tokens=6, n=3, extra_body={"ignore_eos": True})
    after = scrape(server)
    assert after[name].type == "histogram"
    assert value(after, name, name + "_count") - value(before, name, name + "_count") == 1
    assert value(after, name, name + "_sum") - value(before, name, name + "_sum") == 6
    assert value(after, name, name + "_bucket", le="5.0") == value(before, name, name + "_bucket", le="5.0")
    assert value(after, name, name + "_bucket", le="10.0") - value(before, name, name + "_bucket", le="10.0") == 1
    generated = "vllm:request_generation_tokens"
    assert value(after, generated, generated + "_sum") - value(before, generated, generated + "_sum") == 18


# vLLM's histogram boundaries (vllm/v1/metrics/loggers.py), which its dashboards and alerts select
VLLM_BOUNDS = {
    "vllm:e2e_request_latency_seconds": (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                                         50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
    "vllm:time_to_first_token_seconds": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                                         2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
    "vllm:inter_token_latency_seconds": (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
}
for _name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
              "request_inference_time_seconds"):
    VLLM_BOUNDS[f"vllm:{_name}"] = VLLM_BOUNDS["vllm:e2e_request_latency_seconds"]
VLLM_BOUNDS["vllm:request_time_per_output_token_seconds"] = VLLM_BOUNDS["vllm:inter_token_latency_seconds"]


def test_latency_histograms_have_every_bucket_of_vllms_so_its_alerts_fire():
    """vLLM's example alert rules: p99 E2E latency > 120 s, and
    increase(vllm:e2e_request_latency_seconds_bucket{le="120"}[5m]) < increase(..._count[5m]) for
    a request slower than two minutes. With a top bucket below 120 s the quantile could never pass
    120 and the le="120" series did not exist: neither alert could fire."""
    from prometheus_client import generate_latest

    from pipeline_dsl.serve.metrics import ServerMetrics

    m = ServerMetrics("m", process=False)
    m.e2e.observe(150.0)
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    for name, bounds in VLLM_BOUNDS.items():
        have = {float(s.labels["le"]) for s in fams[name].samples if s.name == name + "_bucket"}
        assert set(bounds) <= have, (name, sorted(set(bounds) - have))
    e2e = "vllm:e2e_request_latency_seconds"
    assert value(fams, e2e, e2e + "_bucket", le="120.0") == 0 and value(fams, e2e, e2e + "_count") == 1
    assert value(fams, e2e, e2e + "_bucket", le="240.0") == 1     # p99 lies in (120, 240]: above 120


def test_a_choices_longest_count_is_observed_when_choices_differ():
    from prometheus_client import generate_latest

    from pipeline_dsl.flow import Choice, Result
    from pipeline_dsl.serve.metrics import ServerMetrics

    m = ServerMetrics("m", process=False)
    choices = [Choice(i, "x", "stop", {"usage": {"completion_tokens": k}}) for i, k in enumerate((3, 9, 4))]
    m.observe_result(Result("r", None, choices, None, {"prompt_tokens": 5, "completion_tokens": 16,
                                                      "cached_tokens": 0}, {}), 0.5, {"n": 3},
                     choice_latency={0: 0.125, 1: 0.5, 2: 0.25})
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    name = "vllm:request_max_num_generation_tokens"
    assert value(fams, name, name + "_sum") == 9 and value(fams, name, name + "_count") == 1
    assert value(fams, "agp_request_max_num_generation_tokens", "agp_request_max_num_generation_tokens_sum") == 9
    name = "vllm:request_generation_tokens"                       # each choice its own, as vLLM's children
    assert value(fams, name, name + "_sum") == 16 and value(fams, name, name + "_count") == 3
    assert value(fams, name, name + "_bucket", le="5.0") == 2
    name = "vllm:e2e_request_latency_seconds"                     # each choice's own end
    assert value(fams, name, name + "_sum") == 0.875 and value(fams, name, name + "_count") == 3


def test_a_scraper_asking_for_openmetrics_gets_text_with_the_names_vllm_documents(server):
    """Prometheus' default Accept prefers OpenMetrics; prometheus-client's OpenMetrics writer would
    turn each vllm: sample into vllm_ (under a `# TYPE vllm:` line), and every dashboard and alert
    written against vLLM's documented names would be empty."""
    accept = ("application/openmetrics-text;version=1.0.0;escaping=underscores,application/openmetrics-text;"
              "version=0.0.1;q=0.75,text/plain;version=1.0.0;escaping=underscores;q=0.5,text/plain;"
              "version=0.0.4;q=0.4,*/*;q=0.1")
    r = server.http.get(server.url + "/metrics", headers={"accept": accept}, timeout=30)
    assert r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert [s.name for s in fams["vllm:prompt_tokens"].samples] == ["vllm:prompt_tokens_total"]
    assert not any(line.startswith("vllm_") for line in r.text.splitlines())


@pytest.mark.parametrize("accept, content_type", [
    (None, "text/plain; version=0.0.4; charset=utf-8"),                          # a plain scrape (curl, a probe)
    ("*/*", "text/plain; version=0.0.4; charset=utf-8"),
    ("text/plain", "text/plain; version=0.0.4; charset=utf-8"),
    ("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
     "text/plain;version=0.0.4;q=0.3,*/*;q=0.2", "text/plain; version=0.0.4; charset=utf-8"),   # Prometheus 2
    ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;"
     "version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,"
     "*/*;q=0.2", "text/plain; version=1.0.0; charset=utf-8; escaping=allow-utf-8"),          # Prometheus 3
])
def test_a_scrape_is_answered_in_the_text_format_version_it_asks_for(server, accept, content_type):
    """The Content-Type names the text format's version the body is in, as prometheus-client
    negotiates it for vLLM: 0.0.4 unless the scraper lists 1.0.0 (a plain scrape got `version=1.0.0`,
    which a scraper that knows only 0.0.4 may refuse); the names keep their colons either way."""
    with httpx.Client(timeout=30) as scraper:
        del scraper.headers["accept"]                                # httpx's own */*
        r = scraper.get(server.url + "/metrics", headers={"accept": accept} if accept is not None else {})
        assert r.request.headers.get("accept") == accept
    assert r.status_code == 200 and r.headers["content-type"] == content_type
    # a cache between scraper and server keeps one answer per Accept (and Accept-Encoding)
    assert {v.strip().lower() for v in r.headers["vary"].split(",")} >= {"accept", "accept-encoding"}
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert [s.name for s in fams["vllm:prompt_tokens"].samples] == ["vllm:prompt_tokens_total"]


@pytest.mark.parametrize("accept_encoding, gzipped", [
    ("gzip", True),                              # what Prometheus sends on every scrape
    ("deflate, gzip;q=0.8, br", True),
    ("identity", False), (None, False),          # curl, a probe
    ("gzip;q=0, identity", False),               # gzip refused
])
def test_a_scrape_is_gzipped_when_the_scraper_takes_gzip_and_plain_otherwise(server, client, accept_encoding,
                                                                               gzipped):
    """A server's hundreds of series (a thousand lines, ~90 KB here) go out gzipped (a tenth of
    that) to a scraper that asks for it, as vLLM's prometheus-client endpoint answers; the text is
    the same either way."""
    client.completions.create(model="tiny", prompt="count me", max_tokens=2)
    with httpx.Client(timeout=30) as scraper:
        del scraper.headers["accept-encoding"]                      # httpx's own gzip, deflate
        headers = {"accept-encoding": accept_encoding} if accept_encoding is not None else {}
        with scraper.stream("GET", server.url + "/metrics", headers=headers) as r:
            raw = b"".join(r.iter_raw())
        assert r.request.headers.get("accept-encoding") == accept_encoding
    assert r.status_code == 200 and "accept-encoding" in r.headers["vary"].lower()
    assert r.headers.get("content-encoding") == ("gzip" if gzipped else None)
    assert int(r.headers["content-length"]) == len(raw)
    text = (gzip.decompress(raw) if gzipped else raw).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert value(fams, "vllm:prompt_tokens", "vllm:prompt_tokens_total") > 0
    if gzipped:
        assert len(raw) * 4 < len(text)


def test_a_tool_call_finish_is_counted_as_tool_calls(server, client):
    def tool_calls():
        return value(scrape(server), "vllm:request_success", "vllm:request_success_total", finished_reason="tool_calls")

    before = tool_calls()
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "add"}], tools=[TOOL],
                                         tool_choice="required", max_tokens=200)
    assert out.choices[0].finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "add"}],
                                                 tools=[TOOL], tool_choice="required", max_tokens=200, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert tool_calls() - before == 2
    stops = value(scrape(server), "vllm:request_success", "vllm:request_success_total", finished_reason="stop")
    assert stops == value(scrape(server), "agp_requests_finished", "agp_requests_finished_total", finished_reason="stop")


def test_the_tokens_of_an_aborted_request_are_counted_as_generated(server):
    def generated():
        return value(scrape(server), "vllm:generation_tokens", "vllm:generation_tokens_total")

    aborted = server.stats()["requests_aborted"]
    before = generated()
    seen = 0
    body = {"model": "tiny", "prompt": "go on and on", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with server.http.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text":""' not in line:
                seen += 1
                if seen == 5:
                    break                                  # hang up mid-answer
    deadline = time.monotonic() + 30
    while server.stats()["requests_aborted"] == aborted:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)
    assert generated() - before >= seen
    assert value(scrape(server), "vllm:request_success", "vllm:request_success_total", finished_reason="abort") >= 1


@pytest.mark.parametrize("n", [None, 3])
def test_an_aborted_request_counts_one_abort_per_choice(server, n):
    """vLLM v1 runs a request of n as n child requests and finishes each as aborted when the client
    leaves, as it counts every other finish reason once per choice; an abort counted once made
    `abort` a share of requests where `stop` and `length` are shares of choices."""
    def aborts():
        fams = scrape(server)
        return (value(fams, "vllm:request_success", "vllm:request_success_total", finished_reason="abort"),
                value(fams, "agp_requests_finished", "agp_requests_finished_total", finished_reason="abort"))

    before = aborts()
    body = {"model": "tiny", "prompt": "go on and on", "max_tokens": 400, "ignore_eos": True, "stream": True,
            **({"n": n} if n is not None else {})}
    with server.http.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text":""' not in line:
                break                                      # hang up mid-answer
    deadline = time.monotonic() + 30
    while 0 in (counted := [after - was for after, was in zip(aborts(), before)]):   # observed as it ends
        assert time.monotonic() < deadline, "the request's abort was not counted"
        time.sleep(0.05)
    assert counted == [n or 1, n or 1]


def test_the_prompt_of_a_request_aborted_after_its_first_token_is_counted(server, client):
    """A client hanging up mid-answer: its generated tokens were counted, its prompt (prefilled)
    was not, so rate(prompt_tokens_total) missed the prefill work of every aborted stream."""
    def prompts():
        fams = scrape(server)
        return (value(fams, "vllm:prompt_tokens", "vllm:prompt_tokens_total"),
                value(fams, "agp_prompt_tokens", "agp_prompt_tokens_total"))

    prompt = "count the stars one by one"
    size = client.completions.create(model="tiny", prompt=prompt, max_tokens=1).usage.prompt_tokens
    aborted = server.stats()["requests_aborted"]
    before = prompts()
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with server.http.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text":""' not in line:
                break                                      # the first token came: hang up
    deadline = time.monotonic() + 30
    while server.stats()["requests_aborted"] == aborted:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)
    deadline = time.monotonic() + 30
    while prompts() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [after - b for after, b in zip(prompts(), before)] == [size, size]


def test_requests_the_pipeline_refuses_leave_nothing_in_flight(server):
    """A request the engine refuses after it was submitted (a prompt beyond the context, streamed
    or not) answers a 400 and leaves agp_requests_in_flight where it was (the gauge counted each
    such request as in flight for good), and its prompt, never prefilled, is no prompt token."""
    def in_flight() -> float:
        return value(scrape(server), "agp_requests_in_flight", "agp_requests_in_flight")

    def prompts() -> tuple:
        fams = scrape(server)
        return (value(fams, "vllm:prompt_tokens", "vllm:prompt_tokens_total"),
                value(fams, "agp_prompt_tokens", "agp_prompt_tokens_total"))

    deadline = time.monotonic() + 30
    while in_flight() != 0:                       # an earlier test's hung-up stream, still ending
        assert time.monotonic() < deadline, in_flight()
        time.sleep(0.05)
    before = prompts()
    long = "a b c d " * server.engine.max_model_len
    for stream in (False, True, False):
        r = server.http.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": long, "max_tokens": 1, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert in_flight() == 0
    assert prompts() == before


def test_inter_token_latency_is_per_choice_and_once_per_chunk(monkeypatch):
    """n = 2: the two choices' chunks come interleaved, each choice a chunk every 100 ms. One clock
    for the request observed gaps of 1 ms and 99 ms (mean 50 ms, half of what either stream
    saw); a chunk of 3 tokens after 300 ms was observed as one gap of 100 ms."""
    from types import SimpleNamespace as NS

    from pipeline_dsl.serve import async_pipeline

    seen = []
    metrics = NS(ttft=NS(observe=lambda v: None), itl=NS(observe=seen.append))
    now = [0.0]
    monkeypatch.setattr(async_pipeline.time, "monotonic", lambda: now[0])
    loop = NS(call_soon_threadsafe=lambda *a: None)
    stream = async_pipeline.RequestStream(NS(metrics=metrics), async_pipeline.LoopMail(loop))
    for t, index, tokens in ((0.100, 0, 1), (0.101, 1, 1), (0.200, 0, 1), (0.201, 1, 1),
                             (0.500, 0, 3), (0.501, 1, 1)):
        now[0] = t
        stream.on_delta("k", index, NS(new_token_ids=[7] * tokens))
    assert seen == pytest.approx([0.1, 0.1, 0.3, 0.3])


def test_every_unlabelled_series_exists_at_zero_before_the_first_request():
    """As vLLM's: a dashboard's rate() or a gateway's scrape finds each counter and histogram
    from the start, not only after the first request of its kind."""
    from prometheus_client import generate_latest

    from pipeline_dsl.serve.metrics import ServerMetrics

    fams = {f.name: f for f in text_string_to_metric_families(
        generate_latest(ServerMetrics("m", process=False).registry).decode())}
    for name in ("agp_prompt_tokens", "vllm:prompt_tokens", "agp_prompt_tokens_cached",
                 "vllm:time_to_first_token_seconds", "agp_requests_in_flight"):
        samples = fams[name].samples
        assert samples and all(s.value == 0 and s.labels["model_name"] == "m" for s in samples), name
    assert {s.labels["engine"] for s in fams["vllm:prompt_tokens"].samples} == {"0"}


def test_each_finish_reason_of_vllm_exists_at_zero_on_every_engine_before_the_first_request():
    """As vLLM's request_success_total: a dashboard's model variable
    (label_values(vllm:request_success_total, model_name)) has the model before a request
    finishes, and increase() counts the first request of each finish reason."""
    from prometheus_client import generate_latest

    from pipeline_dsl.serve.metrics import ServerMetrics

    m = ServerMetrics("m", process=False, engine_of={"draft": "0", "answer": "1"})
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    done = [s for s in fams["vllm:request_success"].samples if s.name == "vllm:request_success_total"]
    assert {(s.labels["finished_reason"], s.labels["engine"]) for s in done} == \
        {(r, e) for r in ("stop", "length", "abort") for e in ("0", "1")}
    assert all(s.value == 0 and s.labels["model_name"] == "m" for s in done)
    assert {s.labels["finished_reason"] for s in fams["agp_requests_finished"].samples} == {"stop", "length", "abort"}
    assert {s.labels["engine"] for s in fams["vllm:prompt_tokens"].samples} == {"0", "1"}


def test_every_http_request_is_counted_by_its_route_template_method_and_status(server, client):
    """Per-route series an operator alerts on (a rising 4xx rate of one route): handler is the
    route's template, so random paths (a scanner) fall into "none" and add no series."""
    before = scrape(server)
    key = dict(handler="/v1/completions", method="POST")
    client.completions.create(model="tiny", prompt="hello", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hello", max_tokens=2, temperature=-1)
    server.http.get(server.url + "/health", timeout=30)
    for i in range(3):
        server.http.get(server.url + f"/scan/{i}.php", timeout=30)
    server.http.get(server.url + "/v1/responses/resp_nothing_here", timeout=30)
    httpx.request("PROPFIND", server.url + "/health", timeout=30)        # a method no route takes
    after = scrape(server)

    def grew(sample, **labels):
        return value(after, "agp_http_requests", sample, **labels) - value(before, "agp_http_requests", sample, **labels)
    assert grew("agp_http_requests_total", status="200", **key) == 1
    assert grew("agp_http_requests_total", status="400", **key) == 1
    assert grew("agp_http_requests_total", handler="/health", method="GET", status="200") == 1
    assert grew("agp_http_requests_total", handler="none", method="GET", status="404") == 3
    assert grew("agp_http_requests_total", handler="/health", method="other", status="405") == 1
    handlers = {s.labels["handler"] for s in after["agp_http_requests"].samples}
    assert not any("scan" in h or "resp_nothing" in h for h in handlers)
    assert any(h.startswith("/v1/responses/{") for h in handlers)
    lat = "agp_http_request_duration_seconds"
    assert value(after, lat, lat + "_count", **key) - value(before, lat, lat + "_count", **key) == 2


def documented_metrics() -> list[tuple[str, str, str | None]]:
    """(page, name, type or None) of each metric the pages that describe agp name (not the test
    and benchmark pages): the rows of docs/serve.md's metrics table with their type column (a
    `_suffix` cell entry stands for the cell's first name with as many last words replaced), and
    every other `agp_…`, `vllm:…` or `process_…` name in backquotes, labels (`{reason}`) cut."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *(p for p in sorted((root / "docs").glob("*.md"))
                                   if p.name not in ("testing.md", "benchmarks.md", "engine_benchmarks.md"))]
    found = []
    for page in pages:
        text = page.read_text()
        for row in (ln for ln in text.splitlines() if ln.startswith("| `agp_") or ln.startswith("| — | `vllm:")):
            cells = [c.strip() for c in row.split("|")[1:-1]]
            kind = cells[2].split()[0]
            for cell in cells[:2]:
                names = re.findall(r"`([\w:]+)(?:\{\w+\})?`", cell)
                for name in names:
                    if name.startswith("_"):
                        words = names[0].split("_")
                        name = "_".join(words[:len(words) - len(name.strip("_").split("_"))]) + name
                    found.append((page.name, name, kind))
        found += [(page.name, name, None) for name in
                  re.findall(r"`((?:agp_|vllm:|process_)[a-z_:]*[a-z])(?:\{[^}`]*\})?`(?!\()", text)]
    return found


def test_every_metric_the_docs_name_is_exported_with_its_type(server, client):
    # docs/serve.md, "Metrics": a dashboard or an alert written from the page's names finds them
    client.completions.create(model="tiny", prompt="a metric of every kind", max_tokens=2)
    fams = scrape(server)
    documented = documented_metrics()
    assert len({n for _, n, k in documented if k}) > 40
    bad = []
    for page, name, kind in documented:
        family = fams.get(name) or fams.get(name.removesuffix("_total"))
        if family is None:
            bad.append(f"{page}: {name} is not in /metrics")
        elif kind and family.type != kind:
            bad.append(f"{page}: {name} is a {family.type}, the page says {kind}")
    assert not bad, "\n".join(bad)


def test_each_engine_of_a_cascade_counts_the_tokens_it_computed(tmp_path, tiny_gguf):
    """A cascade (a draft generate stage, a python stage asking again, a second generate stage
    on an engine of its own): vllm:prompt_tokens_total{engine} put both engines' prompts on the
    engine that answered (engine 0: 0, engine 1: twice the prompt); each engine now counts the
    prompt it took and the tokens it generated, and agp_prompt_tokens stays the request's (two
    prompts in one request: each engine's share of both)."""
    import argparse

    from starlette.testclient import TestClient

    from pipeline_dsl.serve.build import build
    from pipeline_dsl.serve.options import add_arguments
    from flowkit import CASCADE

    path = tmp_path / "cascade.agp"
    path.write_text(CASCADE.format(model=tiny_gguf, budget2="1MiB"))
    p = argparse.ArgumentParser()
    add_arguments(p)
    serving = build(p.parse_args([str(path), "--threads", "1"]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as client:
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["the world is"] * 2, "max_tokens": 5,
                                                     "ignore_eos": True})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    finally:
        serving.runtime.close()
    prompt = usage["prompt_tokens"] // 2                  # the drafts' prompts, then the same asked again
    assert usage["prompt_tokens"] == 2 * prompt > 0 and usage["completion_tokens"] == 2 * 2 * 5
    for name in ("prompt_tokens", "generation_tokens"):
        per_engine = {e: value(fams, f"vllm:{name}", f"vllm:{name}_total", engine=e) for e in ("0", "1")}
        assert per_engine == ({"0": prompt, "1": prompt} if name == "prompt_tokens" else {"0": 10, "1": 10}), name
    assert value(fams, "agp_prompt_tokens", "agp_prompt_tokens_total") == usage["prompt_tokens"]
    assert value(fams, "agp_generation_tokens", "agp_generation_tokens_total") == usage["completion_tokens"]


def test_a_result_of_several_prompts_adds_up_each_engines_share():
    from pipeline_dsl.flow import Result
    from pipeline_dsl.serve.async_pipeline import combine

    def one(draft, answer):
        return Result("r", None, [], None, {"prompt_tokens": draft + answer, "completion_tokens": 2,
                                            "cached_tokens": 0}, {},
                      {"draft": {"prompt_tokens": draft, "completion_tokens": 1, "cached_tokens": 0},
                       "gen": {"prompt_tokens": answer, "completion_tokens": 1, "cached_tokens": 0}})

    both = combine([one(3, 3), one(5, 5)], 1)
    assert both.usage["prompt_tokens"] == 16
    assert both.engine_usage == {"draft": {"prompt_tokens": 8, "completion_tokens": 2, "cached_tokens": 0},
                                 "gen": {"prompt_tokens": 8, "completion_tokens": 2, "cached_tokens": 0}}


TWO_ENGINES = """pipeline tiny {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request    : requests {{}}
    stage route      : route {{}}
    stage batch_fast : dynamic_batch {{ max_batch_size = 8  timeout = 1ms }}
    stage enc_fast   : encode {{}}
    stage kv_fast    : kv_lookup {{ block_size = 8  budget = 1MiB }}
    stage fast       : generate {{}}
    stage batch_slow : dynamic_batch {{ max_batch_size = 1  timeout = 1ms }}
    stage enc_slow   : encode {{}}
    stage kv_slow    : kv_lookup {{ block_size = 8  budget = 8MiB }}
    stage slow       : generate {{}}
    stage out        : respond {{}}
    request -> route
    route -> batch_slow when prompt_tokens > 8
    route -> batch_fast otherwise
    batch_fast -> enc_fast when full
    batch_fast -> enc_fast when timeout
    enc_fast -> kv_fast -> fast -> out
    batch_slow -> enc_slow when full
    batch_slow -> enc_slow when timeout
    enc_slow -> kv_slow -> slow -> out
}}
"""


def test_a_backlog_waits_on_the_engine_it_waits_for(long_gguf):
    """Two engines, one of them a sequence at a time: three long requests routed to it, one runs
    and the others wait. vllm:num_requests_waiting counts them on that engine alone (0 on the
    other, which has nothing to do), as many as agp_num_requests_waiting says in all."""
    import threading

    s = LiveServer(long_gguf, text=TWO_ENGINES.format(model=long_gguf))
    stop, started = threading.Event(), []
    body = {"model": "tiny", "prompt": "a long prompt for the slow engine to take its time over",
            "max_tokens": 1900, "ignore_eos": True, "stream": True}

    def hold():
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
            started.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    break                                 # hang up: the request is aborted

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        engines = list(s.http.get(s.url + "/stats", timeout=10).json()["engines"])
        slow, fast = str(engines.index("slow")), str(engines.index("fast"))
        deadline = time.monotonic() + 60
        while True:
            st = s.http.get(s.url + "/stats", timeout=10).json()["engines"]["slow"]
            if (st["running"], st["waiting"]) == (1, 2):
                break
            assert time.monotonic() < deadline and all(code == 200 for code in started), (st, started)
            time.sleep(0.02)
        fams = scrape(s)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        s.close()
    assert started == [200] * 3
    # one snapshot: the first request may have ended since the wait above (then one waits, not two)
    waiting = {e: value(fams, "vllm:num_requests_waiting", "vllm:num_requests_waiting", engine=e) for e in (slow, fast)}
    assert waiting[fast] == 0 and waiting[slow] in (1, 2), waiting
    assert value(fams, "agp_num_requests_waiting", "agp_num_requests_waiting") == waiting[slow]
    running = {e: value(fams, "vllm:num_requests_running", "vllm:num_requests_running", engine=e) for e in (slow, fast)}
    assert running == {slow: 1, fast: 0}


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _engine_stats(**counters) -> dict:
    return {"engines": {"gen": counters}}


def test_each_stats_line_counts_the_tokens_since_the_line_before_it():
    """The periodic line's throughputs are over the time since the previous line, prompt and
    generated tokens each their own; a quiet period writes no line, one with requests only
    waiting writes one."""
    from pipeline_dsl.serve.metrics import StatsLine

    clock = _Clock()
    line = StatsLine(clock)
    assert line(_engine_stats(prefill_tokens=0, generated_tokens=0)) is None      # the baseline
    clock.now = 2.0
    first = line(_engine_stats(running=1, prefill_tokens=100, generated_tokens=40,
                               kv_blocks_used=3, kv_blocks_total=8))
    assert first == {"running": 1, "waiting": 0, "prompt_tok_s": 50.0, "gen_tok_s": 20.0,
                     "kv_usage": 0.375, "prefix_hit_rate": 0.0}
    clock.now = 12.0                                        # the next line: the last 10 s alone
    second = line(_engine_stats(running=1, prefill_tokens=100, generated_tokens=140))
    assert (second["prompt_tok_s"], second["gen_tok_s"]) == (0.0, 10.0)
    clock.now = 14.0
    assert line(_engine_stats(prefill_tokens=100, generated_tokens=140)) is None  # nothing ran
    clock.now = 16.0
    waiting = line(_engine_stats(waiting=2, prefill_tokens=100, generated_tokens=140))
    assert waiting is not None and (waiting["waiting"], waiting["gen_tok_s"]) == (2, 0.0)


def test_the_prefix_hit_rate_gauge_is_over_its_window_not_the_servers_lifetime():
    """agp_prefix_cache_hit_rate: the share of the prompt tokens looked up in the last window_s
    seconds that the cache served; lookups older than the window no longer count."""
    from pipeline_dsl.serve.metrics import Window

    clock = _Clock()
    w = Window(60.0, clock)
    for t, queried, hits in ((0, 0, 0), (30, 100, 0), (70, 200, 100), (100, 300, 190)):
        clock.now = t
        w.add({"kv_queried_tokens": queried, "kv_hit_tokens": hits})
    # the window reaches back to the sample at 30 s (the newest at least 60 s old): 190 of 200 since
    assert w.hit_rate() == 0.95 and w.seconds() == 70.0
    clock.now = 200
    w.add({"kv_queried_tokens": 300, "kv_hit_tokens": 190})      # no lookup in the last 100 s
    assert w.hit_rate() == 0.0
    clock.now = 210
    w.add({"kv_queried_tokens": 301, "kv_hit_tokens": 191})      # one token looked up, and served
    assert w.hit_rate() == 1.0


def test_a_histogram_of_exact_counts_puts_a_value_on_a_bound_in_that_bucket():
    """vllm:iteration_tokens_total and agp_batch_size, from exact {value: count}: a bucket `le`
    counts the values up to and with it (a step of 8 tokens is in le="8"), the sum is of the values."""
    from pipeline_dsl.serve.metrics import counts_histogram

    fam = counts_histogram("h", "doc", {1: 2, 8: 1, 9: 1}, (1, 8, 16), {"model_name": "m"})
    samples = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert [samples[("h_bucket", le)] for le in ("1", "8", "16", "+Inf")] == [2, 3, 4, 4]
    assert (samples[("h_count", None)], samples[("h_sum", None)]) == (4, 19.0)


def test_the_requests_queued_before_the_engines_wait_on_the_first_engine_alone():
    """vllm:num_requests_waiting{engine}: each engine's own queue, and the requests still in the
    pipeline's queues before generation (at its batchers, not yet at an engine) on engine 0 only;
    agp_num_requests_waiting counts them all once."""
    from prometheus_client import generate_latest

    from pipeline_dsl.serve.metrics import ServerMetrics

    stats = {"engines": {"g1": {"waiting": 1, "running": 1}, "g2": {"waiting": 2, "running": 0}},
             "stages": {"request": {"kind": "requests", "queued": 3}, "b1": {"kind": "dynamic_batch", "queued": 2},
                        "g1": {"kind": "generate", "queued": 9}}}
    m = ServerMetrics("m", process=False, engine_of={"g1": "0", "g2": "1"})
    m.update_engine(stats)
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    name = "vllm:num_requests_waiting"
    assert {e: value(fams, name, name, engine=e) for e in ("0", "1")} == {"0": 3, "1": 2}
    assert value(fams, "agp_num_requests_waiting", "agp_num_requests_waiting") == 5


def test_a_requests_figures_when_its_choices_share_one_usage():
    """Choices that do not count their own tokens (a python stage's text) share the request's:
    each choice generated its share and the longest is the share rounded up; the request's n is
    the n it asked for (one answer for n=4 still asked for four); inference is prefill + decode."""
    from prometheus_client import generate_latest

    from pipeline_dsl.flow import Choice, Result
    from pipeline_dsl.serve.metrics import ServerMetrics

    m = ServerMetrics("m", process=False)
    choices = [Choice(i, "x", "stop", {}) for i in range(2)]
    m.observe_result(Result("r", None, choices, None, {"prompt_tokens": 5, "completion_tokens": 9, "cached_tokens": 0},
                            {"prefill_s": 0.25, "decode_s": 0.5}), 1.0, {"n": 4})
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}

    def sums(name):
        return value(fams, name, name + "_sum"), value(fams, name, name + "_count")

    assert sums("vllm:request_generation_tokens") == (10, 2)            # 5 each, the longest's share
    assert sums("vllm:request_max_num_generation_tokens") == (5, 1)
    assert sums("vllm:request_params_n") == (4, 1)
    assert sums("vllm:request_inference_time_seconds") == (1.5, 2)      # 0.75 s a choice


def test_a_finish_without_a_reason_counts_as_stop_and_a_stages_latency_sum_is_its_seconds():
    from prometheus_client import generate_latest

    from pipeline_dsl.serve.metrics import ServerMetrics

    m = ServerMetrics("m", process=False)
    m.count_finished([None, "length"])
    m.update_engine({"engines": {}, "stages": {"up": {"kind": "python", "latency": {
        "buckets": [(0.1, 2), (1.0, 3), ("+Inf", 3)], "sum_s": 0.75}}}})
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    name = "vllm:request_success"
    assert {r: value(fams, name, name + "_total", finished_reason=r) for r in ("stop", "length")} == \
        {"stop": 1, "length": 1}
    name = "agp_stage_latency_seconds"
    assert value(fams, name, name + "_sum", stage="up") == 0.75 and value(fams, name, name + "_count", stage="up") == 3
