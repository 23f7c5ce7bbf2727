"""`agp bench`: arrivals, statistics, workloads, and runs against the in-process engine and
a live server on loopback, both with the tiny GGUF model."""

import asyncio
import http.server
import json
import math
import re
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline_dsl.commands import loadgen as B
from pipeline_dsl.cli import main as agp
from pipeline_dsl.requests_io import parse_line

from clikit import ctrl_c_default
from test_serve import LiveServer, _free_port, _pipeline_file

ROOT = Path(__file__).resolve().parents[1]


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate():
    a = B.arrival_times(4000, 20.0, seed=1)
    assert a == B.arrival_times(4000, 20.0, seed=1) and a != B.arrival_times(4000, 20.0, seed=2)
    gaps = np.diff(a)
    assert all(g > 0 for g in gaps)
    assert abs(gaps.mean() - 1 / 20) < 0.05 / 20 * 2          # mean gap 50 ms, within 5 %
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1             # exponential: std = mean


def test_poisson_arrivals_are_scheduled_as_vllm_bench_serve_schedules_them():
    """`vllm bench serve` sends the i-th request after i gaps, scaled so that n requests end at
    n / rate: the offered rate is the asked one whatever the seed. agp sent the first at once and
    the rest after n - 1 unscaled gaps: at --rate 1 with 10 requests the sending took from 5.1 s
    (seed 2) to 12.2 s (seed 4) instead of vLLM's 10 s, and the request throughput moved with the
    seed."""
    for seed in range(5):
        a = B.arrival_times(10, 1.0, seed=seed)
        assert len(a) == 10 and a[0] > 0.0 and all(g > 0 for g in np.diff(a))
        assert a[-1] == pytest.approx(10.0)
    assert B.arrival_times(4, 2.0, burstiness=math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert B.arrival_times(None, 2.0, duration=5.0, seed=3)[0] > 0.0


def test_arrivals_all_at_once_and_cut_at_the_duration():
    assert B.arrival_times(5, math.inf) == [0.0] * 5
    cut = B.arrival_times(None, 10.0, duration=3.0, seed=0)
    assert cut and max(cut) <= 3.0 and 15 <= len(cut) <= 45
    # --burstiness inf over --duration: evenly spaced at 1 / rate (no count to scale the gaps to)
    assert B.arrival_times(None, 2.0, duration=5.0, burstiness=math.inf) == pytest.approx([0.5 * k for k in range(1, 11)])
    with pytest.raises(B.BenchError, match="give --num"):
        B.arrival_times(None, math.inf, duration=3.0)


def _record(sent, tokens, prompt=10, cached=0, **kw):
    r = B.RequestRecord(sent=sent, prompt_tokens=prompt, completion_tokens=len(tokens), cached_tokens=cached,
                        finish_reason="length", **kw)
    for t in tokens:
        r.chunk(t)
    r.done = tokens[-1] if tokens else sent
    return r


def test_summary_statistics_are_computed_from_the_records():
    records = [_record(0.0, [0.1, 0.2, 0.3]), _record(1.0, [1.3, 1.4, 1.7], cached=5),
               B.RequestRecord(sent=0.5, done=0.6, error="HTTP 429: queue full"),
               B.RequestRecord(sent=0.5, done=0.9, truncated=True)]
    r = B.summarize("x", 2.0, records, duration=2.0)
    assert (r.requests, r.completed, r.errors, r.truncated) == (4, 2, 1, 1)
    # a failed request counts in errors alone, though its stream also ended early
    both = B.summarize("x", 2.0, records + [B.RequestRecord(sent=0.5, done=0.9, error="timeout", truncated=True)],
                       duration=2.0)
    assert (both.requests, both.errors, both.truncated) == (5, 2, 1)
    # a measurement that sent no request (a --duration over before the first) failed no request
    assert B.failure(B.summarize("x", 2.0, [], duration=2.0)) is None
    assert "none of its 1 requests succeeded" in B.failure(B.summarize("x", 2.0, records[2:3], duration=2.0))
    assert r.ttft["mean"] == pytest.approx(0.2) and r.ttft["p50"] == pytest.approx(0.2)
    assert r.e2e["mean"] == pytest.approx((0.3 + 0.7) / 2)
    assert r.tpot["mean"] == pytest.approx((0.1 + 0.2) / 2)       # (e2e - ttft) / (n - 1)
    assert r.itl["p50"] == pytest.approx(0.1) and r.itl["mean"] == pytest.approx(0.15)
    assert r.output_throughput == pytest.approx(6 / 2.0)
    assert r.total_throughput == pytest.approx((6 + 20) / 2.0)
    assert r.kv_hit_rate == pytest.approx(5 / 20)
    assert r.error_samples == ["HTTP 429: queue full"]
    table = B.format_table([r])
    assert "errors (samples):" in table and re.search(r"TTFT p50 \(ms\)\s+200\.0", table)
    md = B.format_markdown([r])
    assert md.splitlines()[0] == "| metric | x |" and "| truncated streams | 1 |" in md


def test_tpot_and_itl_of_a_request_with_several_choices_are_per_stream():
    """n = 2: two streams of 5 tokens, each a token every 100 ms. Their chunks interleaved in one
    list gave ITL gaps of 0 and 100 ms (mean 55 ms) and TPOT over all 10 tokens, 400 / 9 = 44 ms,
    while each stream (and agp serve's own request_time_per_output_token) took 100 ms a token."""
    r = B.RequestRecord(sent=0.0, prompt_tokens=10, completion_tokens=10, finish_reason="length")
    for k in range(5):
        for index in (0, 1):
            r.chunk(0.1 + 0.1 * k + 0.001 * index, index)
    r.done = 0.501
    s = B.summarize("x", 1.0, [r], duration=1.0)
    assert s.ttft["mean"] == pytest.approx(0.1)
    assert s.tpot["mean"] == pytest.approx(0.401 / 4)
    assert s.itl["mean"] == pytest.approx(0.1) and s.itl["p50"] == pytest.approx(0.1)


class _Stream:
    """What AsyncPipeline.add returns: the events of one request, then finished."""

    def __init__(self, events):
        self.events, self.finished = list(events), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.events:
            self.finished = True
            raise StopAsyncIteration
        return self.events.pop(0)


def test_an_in_process_chunk_of_several_tokens_is_one_arrival_as_over_http():
    """A pipeline whose stream stage hands the client 3 tokens per chunk: the in-process target
    recorded each chunk as 3 tokens arriving at once (ITL gaps of 0 ms between them), the HTTP
    target and `vllm bench serve` as one arrival; ITL is the gap between chunks for both."""
    from types import SimpleNamespace as NS

    from pipeline_dsl.flow import Choice, Result

    ticks = iter([0.2, 0.3, 0.4])
    done = Result("k", 1, [Choice(0, "abcdefghi", "length", {})], None,
                  {"prompt_tokens": 4, "completion_tokens": 9, "cached_tokens": 0}, {})
    events = [("delta", 0, NS(new_token_ids=[1, 2, 3])) for _ in range(3)] + [("done", done)]

    async def add(data, stream):
        return _Stream(events)

    target = B.EngineTarget.__new__(B.EngineTarget)
    target.apipe, target._n = NS(add=add), 0
    rec = B.RequestRecord(sent=0.0)
    asyncio.run(target.send(parse_line(json.dumps({"prompt": "hi"}), 1), rec, lambda: next(ticks)))
    rec.done = 0.4
    s = B.summarize("x", 1.0, [rec], duration=1.0)
    assert rec.completion_tokens == 9 and s.itl["mean"] == pytest.approx(0.1) and s.itl["p50"] == pytest.approx(0.1)
    assert s.tpot["mean"] == pytest.approx(0.2 / 8)


class _Counting:
    """A target whose engine counts decode steps: its first request (the warm-up) decodes alone
    for 10 steps, each later one adds 2 steps of batch 4."""
    label = "counting"

    def __init__(self):
        self.sent, self.steps, self.seqs, self.preemptions = 0, 0, 0, 0

    async def start(self):
        pass

    async def close(self):
        pass

    async def stats(self):
        return {"decode_steps": self.steps, "mean_batch_size": self.seqs / self.steps if self.steps else 0.0,
                "preemptions": self.preemptions}

    async def send(self, item, rec, clock):
        self.sent += 1
        steps, batch = (10, 1) if self.sent == 1 else (2, 4)
        self.steps, self.seqs, self.preemptions = self.steps + steps, self.seqs + steps * batch, self.preemptions + 1
        rec.chunk(clock())
        rec.prompt_tokens, rec.completion_tokens = 3, 1


def test_the_engine_numbers_leave_the_warm_up_out():
    """The warm-up request decoded alone before the load, and the report's mean batch size counted
    its steps: with `--warmup 2` (two requests of 96 tokens) 8 requests sent at once reported 3.3, not 4.6."""
    items = [parse_line(json.dumps({"prompt": "hi"}), 1)]
    r = asyncio.run(B.bench_one(_Counting(), items, rate=math.inf, num=5, progress=False, warmup=1))
    assert r.engine["mean_batch_size"] == pytest.approx(4.0) and r.engine["preemptions"] == 5


def test_the_mean_batch_size_of_several_engines_is_over_all_their_steps():
    from pipeline_dsl.serve.metrics import engine_totals

    totals = engine_totals({"engines": {"a": {"decode_steps": 30, "mean_batch_size": 2.0},
                                        "b": {"decode_steps": 10, "mean_batch_size": 6.0}}})
    assert totals["mean_batch_size"] == pytest.approx((30 * 2 + 10 * 6) / 40)       # not 2 + 6


def test_the_peak_memory_of_several_engines_is_the_process_s_not_their_sum():
    """Each engine reports its process's peak memory: agp bench's 'peak memory' of a pipeline with
    two engines said twice the process's."""
    from pipeline_dsl.serve.metrics import engine_totals

    totals = engine_totals({"engines": {"a": {"peak_memory_bytes": 300 << 20, "preemptions": 1},
                                        "b": {"peak_memory_bytes": 300 << 20, "preemptions": 2}}})
    assert totals["peak_memory_bytes"] == 300 << 20 and totals["preemptions"] == 3


def test_a_reports_json_says_its_latencies_are_in_seconds():
    """The table shows TTFT in ms and the --json file held the same TTFT in seconds under a bare
    'ttft' key: 0.2 read as 0.2 ms by a script comparing the two."""
    r = B.summarize("x", 2.0, [_record(0.0, [0.2, 0.3])], duration=1.0)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["ttft"]["p50"] == pytest.approx(0.2) and d["units"]["ttft"] == "s"
    assert {d["units"][k] for k in ("tpot", "itl", "e2e", "duration_s")} == {"s"}
    assert d["units"]["output_throughput"] == "tokens/s" and d["units"]["rate"] == "requests/s"


@pytest.mark.parametrize("line", [
    {"prompt": "hi", "n": 3, "max_tokens": 4, "temperature": 0.7, "seed": 1},
    {"prompt_token_ids": [1, 2, 3], "max_tokens": 2},
    {"prompt": "hi", "logprobs": 2, "echo": True, "stop_token_ids": [5], "max_tokens": 2},
    {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3, "max_tokens": 2},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
     "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}},
    {"prompt": "pick", "response_format": {"type": "choice", "choices": ["yes", "no"]}},
])
def test_a_servers_request_asks_for_what_the_in_process_target_runs(line):
    """Over HTTP only the sampling fields were sent: n = 3 became one answer, a prompt of token
    ids a null prompt, logprobs and structured output were dropped, so --url measured less work
    than the pipeline beside it. agp serve's parse of the body gives the item the pipeline runs."""
    from pipeline_dsl.requests_io import parse_request
    from pipeline_dsl.serve import protocol as P

    item = parse_request(dict(line), default_id=1)
    route, body = B.HTTPTarget("http://127.0.0.1:1", model="m").body(item)
    for key in ("stream", "stream_options"):
        body.pop(key)
    parse = P.parse_chat if route == "/chat/completions" else P.parse_completion
    served = parse(body, max_model_len=4096, served=("m",)).item(1)
    local = item.item()
    for d in (served, local):
        d.pop("model", None)
    assert served == local


def test_workload_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(B.BenchError, match="workload file not found"):
        B.load_workload(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"prompt": "x", "max_tokens": "many"}\n')
    with pytest.raises(B.BenchError, match=r"bad\.jsonl:3: 'max_tokens' must be an integer"):
        B.load_workload(bad)
    latin = tmp_path / "latin.jsonl"        # said "latin.jsonl is not UTF-8 (… at byte 32)": which line?
    latin.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(B.BenchError, match=r"latin\.jsonl:2: the line is not UTF-8 text \(byte 15\)"):
        B.load_workload(latin)


def test_a_pretty_printed_json_workload_is_refused_with_the_jq_that_flattens_it_as_agp_run_refuses_it(tmp_path):
    """json.dump(requests, indent=2) is no JSONL file: bench said its line 1 ('[') was not valid
    JSON, with no word of the file being one JSON document over several lines."""
    reqs = [{"prompt": "hi"}, {"prompt": "there"}]
    for name, text, said in (("array.json", json.dumps(reqs, indent=2), r"line 1 is a lone '\['.*jq -c '\.\[\]' FILE"),
                             ("objects.json", "\n" + "\n".join(json.dumps(r, indent=2) for r in reqs),
                              r"line 2 is a lone '\{'.*jq -c \. FILE")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(B.BenchError, match=rf"{name} is not JSON Lines: {said}"):
            B.load_workload(path)
    flat = tmp_path / "flat.jsonl"
    flat.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    assert [r.prompt for r in B.load_workload(flat)] == ["hi", "there"]


def test_a_workload_with_a_byte_order_mark_loads_as_agp_run_reads_it(tmp_path):
    """Editors on Windows start a UTF-8 file with a BOM; agp run skips it, bench said the first
    line was not JSON."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "hi"}\r\n{"prompt": "there"}\r\n')
    assert [r.prompt for r in B.load_workload(path)] == ["hi", "there"]


def test_a_batch_api_file_is_a_workload_as_agp_run_takes_it(tmp_path):
    """`--workload` takes "agp run's format"; agp run answers OpenAI batch-API files, so bench
    reads them too: each body's prompt or messages and sampling settings, its custom_id the id."""
    path = tmp_path / "batch.jsonl"
    lines = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                       "max_completion_tokens": 5, "temperature": 0.5}},
             {"custom_id": "b", "method": "POST", "url": "/v1/completions",
              "body": {"model": "gpt-4o-mini", "prompt": "once", "max_tokens": 3, "stream": True}}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    chat, comp = B.load_workload(path)
    assert (chat.id, chat.messages, chat.sampling) == ("a", [{"role": "user", "content": "hi"}],
                                                       {"max_tokens": 5, "temperature": 0.5})
    assert (comp.id, comp.prompt, comp.sampling) == ("b", "once", {"max_tokens": 3})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**lines[1], "url": "/v1/embeddings"}) + "\n")
    with pytest.raises(B.BenchError, match=r"bad\.jsonl:1: an /v1/embeddings line generates nothing"):
        B.load_workload(bad)                    # agp run answers it; a workload measures generation
    bad.write_text(json.dumps({**lines[1], "url": "/v1/responses"}) + "\n")
    with pytest.raises(B.BenchError, match=r"bad\.jsonl:1: 'url' must be /v1/chat/completions, /v1/completions or"):
        B.load_workload(bad)


def test_shipped_workloads_load():
    for name, n in (("short_chat", 200), ("shared_prefix", 150), ("long_prompts", 40)):
        items = B.load_workload(ROOT / "bench" / "workloads" / f"{name}.jsonl")
        assert len(items) == n
    shared = B.load_workload(ROOT / "bench" / "workloads" / "shared_prefix.jsonl")
    assert len({item.messages[0]["content"] for item in shared}) == 1         # one system prompt
    assert len({item.messages[1]["content"] for item in shared}) > 50         # many questions


def test_target_settings_are_typed_and_checked(tmp_path):
    agp_file = tmp_path / "p.agp"
    agp_file.write_text("pipeline p {}")
    path, settings = B.parse_target(f"{agp_file},prefix_reuse=false,max_batch_size=8,batch_timeout_s=0.002")
    assert path == str(agp_file)
    assert settings == {"prefix_reuse": False, "max_batch_size": 8, "batch_timeout_s": 0.002}
    assert B.target_label(f"{agp_file},prefix_reuse=false") == "p (prefix_reuse=false)"
    with pytest.raises(B.BenchError, match="did you mean 'prefix_reuse'"):
        B.parse_target(f"{agp_file},prefix_reuse_=false")
    with pytest.raises(B.BenchError, match="pipeline file not found"):
        B.parse_target(str(tmp_path / "missing.agp"))


@pytest.mark.parametrize("pair, expected", [("prefix_reuse=flase", "true or false"),
                                            ("max_batch_size=8.5", "an integer"),
                                            ("batch_timeout_s=soon", "a number"),
                                            ("threads=many", "an integer or none")])
def test_a_setting_of_the_wrong_type_is_an_error_not_a_label_that_lies(tmp_path, pair, expected):
    """`prefix_reuse=flase` ran with prefix reuse on (a non-empty string) under the label
    'p (prefix_reuse=flase)'."""
    agp_file = tmp_path / "p.agp"
    agp_file.write_text("pipeline p {}")
    key, _, value = pair.partition("=")
    with pytest.raises(B.BenchError, match=f"engine setting '{key}' in .* must be {expected}, not '{value}'"):
        B.parse_target(f"{agp_file},{pair}")
    assert B.parse_target(f"{agp_file},policy=static,model=7,seed=none,batch_timeout_s=1")[1] == {
        "policy": "static", "model": "7", "seed": None, "batch_timeout_s": 1}



def test_an_object_setting_is_a_json_object_commas_and_all(tmp_path):
    """override_generation_config, an EngineConfig field listed among the known settings, could not
    be given: the spec was split at every comma and any value was refused as 'dict or none'."""
    agp_file = tmp_path / "p.agp"
    agp_file.write_text("pipeline p {}")
    spec = f'{agp_file},override_generation_config={{"temperature": 0.5, "top_p": 0.9}},prefix_reuse=false'
    assert B.parse_target(spec)[1] == {"override_generation_config": {"temperature": 0.5, "top_p": 0.9},
                                       "prefix_reuse": False}
    assert B.target_label(spec) == 'p (override_generation_config={"temperature": 0.5, "top_p": 0.9}, prefix_reuse=false)'
    with pytest.raises(B.BenchError, match="'override_generation_config' in .*: unknown key 'temp'"):
        B.parse_target(f'{agp_file},override_generation_config={{"temp": 0.5}}')      # before any model loads
    with pytest.raises(B.BenchError, match="'override_generation_config' in .* is not JSON"):
        B.parse_target(f"{agp_file},override_generation_config={{temperature}}")
    with pytest.raises(B.BenchError, match="must be a JSON object or none, not '5'"):
        B.parse_target(f"{agp_file},override_generation_config=5")


# ---------------------------------------------------------------- against the tiny model

def _workload(tmp_path, n=6) -> Path:
    path = tmp_path / "w.jsonl"
    rows = [{"prompt": f"hello world {i}", "max_tokens": 5 + i, "ignore_eos": True} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def server(tiny_gguf):
    """A live server of the tiny model that the HTTP targets below measure (none changes it)."""
    s = LiveServer(tiny_gguf)
    yield s
    s.close()


def test_in_process_and_http_targets_measure_the_same_work(tmp_path, tiny_gguf, server):
    items = B.load_workload(_workload(tmp_path))
    local = asyncio.run(B.bench_one(B.EngineTarget.from_pipeline(str(_pipeline_file(tmp_path, tiny_gguf))),
                                    items, rate=math.inf, num=6, progress=False))
    remote = asyncio.run(B.bench_one(B.HTTPTarget(server.url), items, rate=50.0, num=6, progress=False))
    for r in (local, remote):
        assert (r.completed, r.errors, r.truncated) == (6, 0, 0)
        assert r.completion_tokens == sum(5 + i for i in range(6))
        assert r.ttft["p99"] > 0 and r.e2e["p50"] >= r.ttft["p50"]
    assert remote.label == server.url and remote.prompt_tokens == local.prompt_tokens
    assert local.engine["mean_batch_size"] > 1                 # all at once: batched


def test_closed_loop_keeps_the_asked_number_of_clients_busy_for_the_duration(tmp_path, server):
    """Four clients for the duration: more than two rounds of requests, four in flight at most.
    The duration is 1.5 s where the server answers more than eight requests in it, and doubled
    until it does (24 s at most) on a machine too loaded for that (one gave five in 1.5 s)."""
    items = B.load_workload(_workload(tmp_path))

    async def go(duration):
        target = B.HTTPTarget(server.url)
        await target.start()
        try:
            return await B.run_load(target, items, rate=math.inf, duration=duration, concurrency=4,
                                    progress=True)
        finally:
            await target.close()

    duration, records = 0.75, []
    while len(records) <= 8 and duration < 24:
        duration *= 2
        records, wall = asyncio.run(go(duration))
        assert all(r.error is None and not r.truncated for r in records)
    assert len(records) > 8
    assert max(r.sent for r in records) - min(r.sent for r in records) <= duration <= wall
    events = sorted([(r.sent, 1) for r in records] + [(r.done, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    level, peak = 0, 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 4                                            # four clients, never more


def test_http_target_counts_refused_requests_as_errors(server):
    target = B.HTTPTarget(server.url, model="tiny")
    items = [parse_line(json.dumps({"prompt": "the cat " * 300, "max_tokens": 4}), 1)]
    r = asyncio.run(B.bench_one(target, items, rate=math.inf, num=2, progress=False, warmup=0))
    assert r.errors == 2 and r.completed == 0
    assert r.error_samples[0].startswith("HTTP 400:") and "context" in r.error_samples[0]


def test_bench_command_compares_targets_and_writes_a_plot(tmp_path, tiny_gguf, capsys):
    pipeline = _pipeline_file(tmp_path, tiny_gguf)
    png, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    code = agp(["bench", str(pipeline), f"{pipeline},prefix_reuse=false", "--workload",
                str(_workload(tmp_path)), "--rate", "40,inf", "--num", "6", "--compare",
                "--plot", str(png), "--json", str(js), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    header = out.splitlines()[0]
    assert header.count("tiny (prefix_reuse=false)") == 2 and header.count("tiny ") >= 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reports = json.loads(js.read_text())
    assert [r["rate"] for r in reports] == [40.0, "inf", 40.0, "inf"]
    assert all(r["completed"] == 6 and r["errors"] == 0 for r in reports)


@pytest.mark.parametrize("argv, message", [
    (["--workload", "w.jsonl"], "give at least one PIPELINE or --url"),
    (["x.agp", "--workload", "missing.jsonl"], "workload file not found"),
    (["x.agp", "--workload", "{w}", "--rate", "fast"], "'fast' is not a number"),
    (["{p},max_batch=4", "--workload", "{w}"], "did you mean 'max_batch_size'"),
    (["{p}", "--workload", "{w}", "--duration", "5"], "needs --concurrency"),
    (["{p}", "--workload", "{w}", "--rate", "2,0"], "--rate: 0 must be positive"),
    (["{p}", "--workload", "{d}"], "is a folder, not a JSONL file"),
    # the arrivals are drawn before the first request: 1e300 s drew until memory ran out, in silence
    (["{p}", "--workload", "{w}", "--duration", "1e300", "--rate", "1"],
     "--duration 1e+300 at rate 1 is about 1e+300 requests, and a measurement sends at most 10,000,000"),
    (["{p}", "--workload", "{w}", "--duration", "20000", "--rate", "2,1000"], "at rate 1000 is about 2e+07 requests"),
    # no arrival within the duration: it measured nothing ('requests ok/sent 0/0') and exited 0
    (["{p}", "--workload", "{w}", "--duration", "1", "--rate", "0.1", "--burstiness", "inf"],
     "--duration 1 at rate 0.1 sends no request"),
])
def test_bench_command_rejects_bad_input_with_exit_2(tmp_path, tiny_gguf, capsys, argv, message):
    w, p = _workload(tmp_path), _pipeline_file(tmp_path, tiny_gguf)
    code = agp(["bench"] + [a.format(w=w, p=p, d=tmp_path) for a in argv])
    assert code == 2
    assert message in capsys.readouterr().err


class _Refusing(http.server.BaseHTTPRequestHandler):
    """An OpenAI-style server that lists a model and refuses every `refuse`-th completion with a 503
    (every one when refuse == 1); the others stream one token."""
    refuse, seen = 1, 0

    def log_message(self, *args):
        pass

    def _send(self, status, body: bytes, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, json.dumps({"data": [{"id": "m"}]}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        cls = type(self)
        cls.seen += 1
        if cls.seen % cls.refuse == 0:
            return self._send(503, json.dumps({"error": {"message": "the queue is full"}}).encode())
        chunk = {"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        self._send(200, f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode(), "text/event-stream")


class _Calling(_Refusing):
    """Answers every chat with a tool call streamed as agp serve and vLLM stream one: no content."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                  {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 9}}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        self._send(200, body.encode(), "text/event-stream")


def _bench_against(handler, line: dict):
    """Two requests of `line` at once against a local server of `handler`: the bench result."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # polled every 10 ms: shutdown() waits a poll (0.5 s by default)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    try:
        return asyncio.run(B.bench_one(B.HTTPTarget(f"http://127.0.0.1:{server.server_address[1]}"),
                                       [parse_line(json.dumps(line), 1)], rate=math.inf, num=2, progress=False,
                                       warmup=0))
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_of_tool_calls_has_a_time_to_first_token_over_http():
    """Only a chunk with content counted as an arrival: a tool-calling workload measured over HTTP
    had its E2E but no TTFT, TPOT nor ITL (the in-process target beside it had them)."""
    r = _bench_against(_Calling, {"messages": [{"role": "user", "content": "add"}], "max_tokens": 9})
    assert (r.completed, r.completion_tokens) == (2, 18)
    assert r.ttft["p50"] is not None and r.ttft["p50"] <= r.e2e["p50"]
    assert r.tpot["p50"] is None            # the call came in one chunk: no token after the first seen


class _Thinking(_Refusing):
    """Answers every chat with thinking alone (cut by max_tokens), streamed as vLLM's reasoning
    parsers stream it: deltas of `reasoning`, without its older name `reasoning_content`."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                  {"choices": [{"index": 0, "delta": {"reasoning": "add"}}]},
                  {"choices": [{"index": 0, "delta": {"reasoning": " them"}}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 2}}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        self._send(200, body.encode(), "text/event-stream")


def test_a_thinking_answer_streamed_under_vllms_reasoning_field_has_a_time_to_first_token():
    """A delta of vLLM's `reasoning` (its older `reasoning_content` left out) is a token of
    the answer: an answer all thinking had no TTFT nor TPOT over HTTP."""
    r = _bench_against(_Thinking, {"messages": [{"role": "user", "content": "add"}], "max_tokens": 2})
    assert (r.completed, r.completion_tokens) == (2, 4)
    assert r.ttft["p50"] is not None and r.tpot["p50"] is not None


@pytest.mark.parametrize("refuse, code", [(1, 1), (2, 0)])
def test_bench_exits_1_only_when_no_request_of_a_target_succeeded(tmp_path, capsys, refuse, code):
    handler = type("Handler", (_Refusing,), {"refuse": refuse, "seen": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # polled every 10 ms: shutdown() waits a poll (0.5 s by default)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        got = agp(["bench", "--url", url, "--workload", str(_workload(tmp_path)), "--warmup", "0",
                   "--no-progress"])
    finally:
        server.shutdown()
        server.server_close()
    captured = capsys.readouterr()
    assert got == code
    assert "requests" in captured.out                       # the measurement is reported either way
    why = f"agp bench: error: {url} at rate inf: none of its 6 requests succeeded; the first error: HTTP 503: the queue is full"
    assert (why in captured.err) == (code == 1)


@pytest.mark.parametrize("url, message", [
    ("notaurl", "'notaurl' is not an http(s) URL: it has no scheme"),
    ("localhost:8000", "it has no scheme"),
    ("ftp://host", "its scheme is 'ftp'"),
    ("http://", "names no host"),
    ("http://host:70000", "is not a valid URL"),
    # vLLM's --base-url beside --endpoint: the endpoint in the URL was sent /v1/models after it
    ("http://127.0.0.1:8000/v1/chat/completions", "is an endpoint, not a server's base URL"),
    ("http://127.0.0.1:8000/v1/completions/", "is an endpoint, not a server's base URL"),
    ("http://127.0.0.1:8000/v1/embeddings", "is an endpoint, not a server's base URL"),
    ("http://127.0.0.1:8000/v1/responses", "is an endpoint, not a server's base URL"),
    ("http://127.0.0.1:0", "port 0 cannot be connected to"),
    ("http://127.0.0.1:8000/v1#top", "a server's base URL has no ?query or #fragment"),
])
def test_bench_url_is_checked_before_anything_is_measured(tmp_path, tiny_gguf, capsys, url, message):
    code = -1
    try:
        code = agp(["bench", str(_pipeline_file(tmp_path, tiny_gguf)), "--url", url,
                    "--workload", str(_workload(tmp_path)), "--no-progress"])
    except SystemExit as e:                 # argparse refuses it while parsing
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err and captured.out == ""    # no pipeline was measured


def test_a_plot_file_of_a_format_it_cannot_have_is_refused_before_measuring(tmp_path, tiny_gguf, capsys):
    """--plot out.txt ran the whole measurement, then ended on an internal error (exit 1) from
    matplotlib, which takes the format from the extension."""
    code = -1
    try:
        code = agp(["bench", str(_pipeline_file(tmp_path, tiny_gguf)), "--workload", str(_workload(tmp_path)),
                    "--plot", str(tmp_path / "plot.txt"), "--no-progress"])
    except SystemExit as e:                 # argparse refuses it while parsing
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "plot.txt' must end in .png, .svg or .pdf" in captured.err


def test_a_plot_files_format_is_read_from_its_extension_in_any_case(tmp_path):
    from pipeline_dsl.cli import build_parser

    out = str(tmp_path / "plot.PNG")
    assert build_parser(["bench"]).parse_args(["bench", "--url", "http://h:1", "-w", "w.jsonl",
                                               "--plot", out]).plot == out


def test_the_throughput_plot_starts_at_zero(tmp_path, monkeypatch):
    """Two targets 477.36 and 477.51 output tokens/s apart: autoscaled, the axis ran from 477.36 to
    477.51 and the one looked far above the other; from 0 they are level, as they are."""
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    a = B.summarize("a", 30.0, [_record(0.0, [0.2, 0.3])], duration=1.0)
    b = B.summarize("b", 30.0, [_record(0.0, [0.2, 0.3])], duration=1.0)
    a.output_throughput, b.output_throughput = 477.36, 477.51
    B.plot([a, b], tmp_path / "p.png")
    low, high = figures[0].axes[0].get_ylim()
    assert low == 0 and high >= 477.51


def test_a_target_that_cannot_be_measured_loses_none_of_the_others(tmp_path, tiny_gguf, capsys):
    """--compare with a server that is down: the pipeline beside it is still measured, tabled and
    written to --json; the exit code says a target failed (before, nothing was printed)."""
    import socket

    with socket.socket() as s:                      # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    js = tmp_path / "cmp.json"
    code = agp(["bench", str(_pipeline_file(tmp_path, tiny_gguf)), "--url", f"http://127.0.0.1:{port}",
                "--workload", str(_workload(tmp_path)), "--num", "3", "--compare", "--json", str(js),
                "--plot", str(tmp_path / "cmp.png"), "--no-progress", "--ready-timeout", "0"])
    captured = capsys.readouterr()       # (--ready-timeout 0: not waited for, as vLLM's 0; else 600 s)
    assert code == 1
    assert f"127.0.0.1:{port}" in captured.err and "tiny" in captured.out.splitlines()[0]
    (report,) = json.loads(js.read_text())
    assert report["completed"] == 3 and report["errors"] == 0


def _in_process(events, ticks):
    """Run EngineTarget.send over a stream of `events` with a clock reading `ticks`; the record."""
    from types import SimpleNamespace as NS

    async def add(data, stream):
        return _Stream(events)

    target = B.EngineTarget.__new__(B.EngineTarget)
    target.apipe, target._n = NS(add=add), 0
    rec = B.RequestRecord(sent=0.0)
    clock = iter(ticks)
    asyncio.run(target.send(parse_line(json.dumps({"prompt": "hi"}), 1), rec, lambda: next(clock)))
    return rec


def test_an_answer_handed_over_whole_has_a_ttft_in_process_as_over_http_and_no_tpot():
    """A vote pipeline answers after its join: no delta carries tokens, the text comes with the
    result. In process the report had no TTFT, TPOT nor ITL at all; over HTTP the same answer
    arrives in one chunk, TTFT = E2E, and TPOT came out 0.0 ms (the microseconds before [DONE]
    over 23 tokens). Now both have TTFT and neither a TPOT: the client saw no token after the first."""
    from pipeline_dsl.flow import Choice, Result

    done = Result("k", 1, [Choice(0, "the answer", "length", {"usage": {"completion_tokens": 8}})], None,
                  {"prompt_tokens": 4, "completion_tokens": 24, "cached_tokens": 0}, {})
    rec = _in_process([("done", done)], [1.5])
    rec.done = 1.5
    over_http = _record(0.0, [1.5])                         # one chunk of 24 tokens, as agp serve streams it
    over_http.completion_tokens, over_http.done = 24, 1.5001
    for r in (rec, over_http):
        s = B.summarize("x", 1.0, [r], duration=2.0)
        assert s.ttft["p50"] == pytest.approx(1.5) and s.tpot["p50"] is None and s.itl["p50"] is None
        assert s.completion_tokens == 24                    # output tok/s: every token generated


def test_tpot_is_per_token_of_the_answer_not_of_every_generation():
    """A pipeline that drafts 10 tokens with one generate stage and streams a 5-token answer from a
    second: usage counts all 15, and TPOT divided the answer's 0.4 s by 14 gaps (29 ms) instead of
    its 4 (100 ms a token, as the client saw)."""
    from types import SimpleNamespace as NS

    from pipeline_dsl.flow import Choice, Result

    done = Result("k", 1, [Choice(0, "abcde", "stop", {"usage": {"completion_tokens": 5}})], None,
                  {"prompt_tokens": 4, "completion_tokens": 15, "cached_tokens": 0}, {})
    events = [("delta", 0, NS(new_token_ids=[7])) for _ in range(5)] + [("done", done)]
    rec = _in_process(events, [0.2, 0.3, 0.4, 0.5, 0.6])
    rec.done = 0.6
    s = B.summarize("x", 1.0, [rec], duration=1.0)
    assert rec.answer_tokens == 5 and s.completion_tokens == 15
    assert s.tpot["p50"] == pytest.approx(0.1) and s.itl["p50"] == pytest.approx(0.1)


@pytest.mark.parametrize("burstiness, cv", [(0.25, 2.0), (4.0, 0.5)])
def test_bursty_arrivals_are_gamma_gaps_of_the_asked_rate(burstiness, cv):
    """`vllm bench serve --burstiness`: gaps of shape b and mean 1/rate (coefficient of variation
    1/sqrt(b)); 1 stays the seeded Poisson process, inf is evenly spaced."""
    a = B.arrival_times(8000, 20.0, seed=1, burstiness=burstiness)
    gaps = np.diff(a)
    assert a[0] > 0.0 and abs(gaps.mean() - 1 / 20) < 0.05 / 20 * 2
    assert abs(gaps.std() / gaps.mean() - cv) < 0.1 * cv
    assert B.arrival_times(50, 20.0, seed=1, burstiness=1.0) == B.arrival_times(50, 20.0, seed=1)
    assert np.allclose(np.diff(B.arrival_times(5, 4.0, burstiness=math.inf)), 0.25)
    with pytest.raises(B.BenchError, match="burstiness must be positive"):
        B.arrival_times(5, 4.0, burstiness=0.0)


def test_goodput_counts_the_completed_requests_within_every_slo():
    """vLLM's request goodput: completed requests whose TTFT, TPOT and E2E are all within the
    limits, over the duration; a request without a TPOT (one chunk) counts 0 for it."""
    records = [_record(0.0, [0.1, 0.2, 0.3]),                 # TTFT 100 ms, TPOT 100 ms, E2E 300 ms
               _record(0.0, [0.4, 0.5, 0.6]),                 # TTFT 400 ms
               _record(0.0, [0.1, 0.4, 0.7]),                 # TPOT 300 ms
               _record(0.0, [0.2]),                           # one chunk: no TPOT
               B.RequestRecord(sent=0.0, done=0.1, error="HTTP 503: busy")]
    slo = {"ttft": 0.25, "tpot": 0.15}
    r = B.summarize("x", 1.0, records, duration=2.0, slo=slo, concurrency=4, burstiness=0.5)
    assert r.goodput == pytest.approx(2 / 2.0) and r.request_throughput == pytest.approx(4 / 2.0)
    assert B.summarize("x", 1.0, records, duration=2.0, slo={"e2e": 0.35}).goodput == pytest.approx(2 / 2.0)
    assert B.summarize("x", 1.0, records, duration=2.0).goodput is None
    d = json.loads(json.dumps(r.to_dict()))
    assert (d["slo"], d["goodput"], d["concurrency"], d["burstiness"]) == (slo, 1.0, 4, 0.5)
    assert d["units"]["goodput"] == "requests/s" and d["units"]["slo"] == "s"
    table = B.format_table([r])
    assert re.search(r"goodput \(req/s\)\s+1\.00", table) and re.search(r"max concurrency\s+4", table)
    assert re.search(r"burstiness\s+0\.5", table)
    assert B.summarize("x", 1.0, records, duration=2.0, burstiness=math.inf).to_dict()["burstiness"] == "inf"
    at_limit = [_record(0.0, [0.25, 0.5])]                  # TTFT 250 ms: within a 250 ms limit
    assert B.summarize("x", 1.0, at_limit, duration=1.0, slo={"ttft": 0.25}).goodput == pytest.approx(1.0)
    # docs/benchmarks.md: a request that never streamed a token waited its whole E2E for its first one
    silent = [B.RequestRecord(sent=0.0, done=0.5, finish_reason="stop")]
    assert B.summarize("x", 1.0, silent, duration=1.0, slo={"ttft": 0.25}).goodput == 0.0
    assert B.summarize("x", 1.0, silent, duration=1.0, slo={"ttft": 0.5}).goodput == pytest.approx(1.0)


@pytest.mark.parametrize("argv, message", [
    (["--goodput", "ttfb:500"], "'ttfb:500' is not METRIC:MS with a metric of ttft, tpot, e2el"),
    (["--goodput", "ttft:soon"], "'soon' is not a number of milliseconds"),
    (["--goodput", "tpot:-5"], "the limit must be a positive number of milliseconds, not -5"),
    (["--burstiness", "0"], "must be positive (1 = Poisson), not 0"),
    (["--duration", "inf", "--concurrency", "2"], "must be a positive number of seconds, not inf"),
    (["--request-timeout", "nan"], "must be a positive number of seconds, not nan"),
    (["--seed", "-1"], "argument --seed: must be between 0 and"),     # numpy's ValueError, an internal error
])
def test_bad_goodput_and_burstiness_are_refused_while_parsing(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        agp(["bench", "--url", "http://127.0.0.1:1", "--workload", str(_workload(tmp_path))] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_goodput_limits_of_two_flags_are_all_kept_and_a_metric_limited_twice_is_refused(tmp_path, capsys):
    """`--goodput ttft:500 --goodput tpot:50`: the second flag replaced the first's list, goodput was
    counted against TPOT alone; `--goodput e2e:100 e2el:5` kept the last limit, in silence."""
    from pipeline_dsl.cli import build_parser

    args = build_parser(["bench"]).parse_args(["bench", "--url", "http://h:1", "-w", "w.jsonl",
                                               "--goodput", "ttft:500", "--goodput", "tpot:50"])
    assert dict(args.goodput) == {"ttft": 0.5, "tpot": 0.05}
    for argv, said in ((["--goodput", "e2e:100", "e2el:5"], "--goodput gives e2el (or e2e) 2 limits (100, 5 ms)"),
                       (["--goodput", "ttft:1", "--goodput", "ttft:2"], "--goodput gives ttft 2 limits (1, 2 ms)")):
        code = agp(["bench", "--url", "http://127.0.0.1:1", "--ready-timeout", "0", "--workload",
                    str(_workload(tmp_path))] + argv)
        assert code == 2 and said in capsys.readouterr().err


def test_metadata_pairs_of_two_flags_are_all_written_and_a_key_given_two_values_is_refused(tmp_path, capsys):
    """`--metadata a=1 --metadata b=2`: the second flag replaced the first's pairs, and the saved
    result held b alone; `--metadata a=1 a=3` kept the last, in silence."""
    from pipeline_dsl.cli import build_parser

    args = build_parser(["bench"]).parse_args(["bench", "--url", "http://h:1", "-w", "w.jsonl",
                                               "--metadata", "a=1", "--metadata", "b=2", "a=1"])
    assert dict(args.metadata) == {"a": "1", "b": "2"}
    code = agp(["bench", "--url", "http://127.0.0.1:1", "--ready-timeout", "0", "--workload",
                str(_workload(tmp_path)), "--metadata", "a=1", "--metadata", "a=3"])
    assert code == 2 and "--metadata gives a 2 values ('1', '3'): give it one" in capsys.readouterr().err


def test_vllm_bench_serve_option_names_are_taken(tmp_path):
    """`--request-rate`, `--num-prompts`, `--max-concurrency` and `--goodput ttft:… e2el:…` as a
    `vllm bench serve` command line writes them."""
    from pipeline_dsl.cli import build_parser

    args = build_parser(["bench"]).parse_args(["bench", "--url", "http://h:1", "-w", "w.jsonl", "--request-rate", "4",
                                      "--num-prompts", "9", "--max-concurrency", "2",
                                      "--goodput", "ttft:500", "e2el:2000", "--burstiness", "inf"])
    assert (args.rate, args.num, args.concurrency) == ("4", 9, 2)
    assert dict(args.goodput) == {"ttft": 0.5, "e2e": 2.0} and math.isinf(args.burstiness)


def test_a_sharegpt_line_is_named_as_such(tmp_path):
    """vLLM's ShareGPT records as lines: the error was "unknown field 'conversations'"."""
    path = tmp_path / "sharegpt.jsonl"
    path.write_text(json.dumps({"id": "x", "conversations": [{"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": "hello"}]}) + "\n")
    with pytest.raises(B.BenchError, match=r"sharegpt\.jsonl:1: a ShareGPT conversation, not a request: "
                                           r"read the file as vllm bench serve reads it with --dataset-name "
                                           r"sharegpt --dataset-path .*sharegpt\.jsonl$"):
        B.load_workload(path)


class _Garbling(_Refusing):
    """Streams a chunk, then an event that is not JSON (a proxy's page, a cut write), then [DONE]."""
    event = b"<html>502 Bad Gateway</html>"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunk = {"choices": [{"index": 0, "text": "hi", "finish_reason": None}]}
        body = f"data: {json.dumps(chunk)}\n\n".encode() + b"data: " + self.event + b"\n\ndata: [DONE]\n\n"
        self._send(200, body, "text/event-stream")


@pytest.mark.parametrize("event, message", [
    (b"<html>502 Bad Gateway</html>", "an event of the stream is not JSON: '<html>502 Bad Gateway</html>'"),
    (b"[1, 2]", "an event of the stream is not a JSON object: '[1, 2]'"),
    (b'{"error": "the engine is overloaded"}', "the engine is overloaded"),    # was "AttributeError: 'str' …"
    (b'{"error": {"message": "the engine died", "code": 500}}', "the engine died"),
])
def test_a_stream_event_that_is_not_json_is_a_failed_request_that_says_so(event, message):
    """Said "JSONDecodeError: Expecting value: line 1 column 1 (char 0)" (and "AttributeError: 'list'
    object has no attribute 'get'" for a JSON array): which event, of what?"""
    handler = type("Handler", (_Garbling,), {"event": event})
    r = _bench_against(handler, {"prompt": "hi", "max_tokens": 4})
    assert (r.errors, r.completed) == (2, 0) and r.error_samples == [message]


def test_the_progress_bar_counts_the_tokens_and_errors_of_the_ended_requests(monkeypatch):
    class Bar:
        def __init__(self):
            self.n, self.postfix = 0, []

        def update(self, k):
            self.n += k

        def set_postfix_str(self, text, refresh=True):
            self.postfix.append(text)

        def close(self):
            pass

    class Target:
        sent = 0

        async def send(self, item, rec, clock):
            Target.sent += 1
            if Target.sent % 3 == 0:
                raise ConnectionError("reset")
            rec.chunk(clock())
            rec.completion_tokens = 5

    bar = Bar()
    monkeypatch.setattr(B, "_progress", lambda total, enabled: bar)
    items = [parse_line(json.dumps({"prompt": "hi"}), 1)]
    records, _ = asyncio.run(B.run_load(Target(), items, rate=math.inf, num=6))
    assert bar.n == 6 and re.fullmatch(r"\d+ tok/s 2 err", bar.postfix[-1])
    assert sum(r.completion_tokens for r in records) == 20


def test_an_earlier_runs_reports_are_shown_beside_this_ones(tmp_path, capsys):
    """Comparing two runs (before and after a change) took both targets in one invocation: a run
    saved with --json could not be set beside another. --baseline reads it back, labelled with
    its file's name."""
    before = B.summarize("chat", math.inf, [_record(0.0, [0.2, 0.3, 0.4])], duration=1.0, concurrency=4,
                         slo={"ttft": 0.5}, burstiness=math.inf)
    after = B.summarize("chat", 2.0, [_record(0.0, [0.1, 0.15, 0.2])], duration=1.0)
    for name, r in (("before.json", before), ("after.json", after)):
        (tmp_path / name).write_text(json.dumps([r.to_dict()]))
    back = B.load_reports(tmp_path / "before.json")[0]
    assert (back.rate, back.burstiness, back.concurrency, back.slo, back.ttft) == \
        (math.inf, math.inf, 4, {"ttft": 0.5}, before.ttft)
    code = agp(["bench", "--baseline", str(tmp_path / "before.json"), "--baseline", str(tmp_path / "after.json")])
    out = capsys.readouterr().out
    assert code == 0
    header = out.splitlines()[0]
    assert "chat (before.json)" in header and "chat (after.json)" in header
    assert re.search(r"TTFT p50 \(ms\)\s+200\.0\s+100\.0", out) and re.search(r"goodput \(req/s\)\s+1\.00\s+-", out)


def test_only_measurements_of_one_label_at_one_rate_are_numbered_apart(tmp_path, capsys):
    """One target at two rates (--rate 2,4) is one label with a rate row each; the same label at
    the same rate twice (two saved runs) gets #2 so the columns can be told apart."""
    runs = [B.summarize("chat", rate, [_record(0.0, [0.2, 0.3])], duration=1.0) for rate in (2.0, 4.0, 2.0)]
    (tmp_path / "runs.json").write_text(json.dumps([r.to_dict() for r in runs]))
    assert agp(["bench", "--baseline", str(tmp_path / "runs.json")]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header.count("#2") == 1 and "#3" not in header


def test_rate_inf_for_a_duration_runs_a_closed_loop_of_clients(tmp_path, capsys):
    """docs/benchmarks.md: --rate inf --concurrency N --duration S keeps N clients busy for S seconds."""
    handler = type("Handler", (_Refusing,), {"refuse": 1 << 30, "seen": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # polled every 10 ms: shutdown() waits a poll (0.5 s by default)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    try:
        code = agp(["bench", "--url", f"http://127.0.0.1:{server.server_address[1]}", "--workload",
                    str(_workload(tmp_path)), "--rate", "inf", "--concurrency", "2", "--duration", "0.3",
                    "--warmup", "0", "--no-progress"])
    finally:
        server.shutdown()
        server.server_close()
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert handler.seen >= 2 and "requests" in captured.out


_SAVED = B.summarize("x", 2.0, [_record(0.0, [0.2, 0.3])], duration=1.0).to_dict()


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read the reports of"),
    ('[1, 2]', "is not a report file of agp bench --json"),
    ('[{"label": "x"}]', "report 1 is not one agp bench --json writes: it has no 'rate'"),
    # an edited file: an internal error (KeyError: 'mean', TypeError: must be real number) once measured
    (json.dumps([_SAVED, {**_SAVED, "ttft": {}}]), "report 2 is not one agp bench --json writes: 'ttft' must be "
                                                  "an object of mean, p50, p90, p99"),
    (json.dumps([{**_SAVED, "rate": "fast"}]), "'rate' must be a number"),
    (json.dumps([{**_SAVED, "completed": "six"}]), "'completed' must be an integer"),
    # fields the table and the plot read: an internal error there (AttributeError, a TypeError)
    (json.dumps([{**_SAVED, "engine": None}]), "'engine' must be an object of the engines' counters"),
    (json.dumps([{**_SAVED, "engine": {"mean_batch_size": "4"}}]), "'engine' must be an object"),
    (json.dumps([{**_SAVED, "error_samples": "oops"}]), "'error_samples' must be a list of strings"),
    (json.dumps([{**_SAVED, "slo": {"ttft": "fast"}}]), "'slo' must be an object of ttft, tpot, e2e limits"),
    (json.dumps([{**_SAVED, "ttft_samples": ["a"]}]), "'ttft_samples' must be a list of numbers"),
])
def test_a_baseline_that_is_no_report_file_is_refused_before_measuring(tmp_path, capsys, text, message):
    path = tmp_path / "old.json"
    path.write_text(text)
    code = agp(["bench", "--url", "http://127.0.0.1:1", "--workload", str(_workload(tmp_path)),
                "--baseline", str(path)])
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err and captured.out == ""
    assert agp(["bench", "--url", "http://127.0.0.1:1"]) == 2
    assert "the following arguments are required: --workload/-w" in capsys.readouterr().err


class _Stalling(_Refusing):
    """Answers the first `answered` completions with one token; the later ones never finish."""
    answered, seen = 2, 0

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        cls = type(self)
        cls.seen += 1
        if cls.seen > cls.answered:
            time.sleep(60)
            return
        chunk = {"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        self._send(200, f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode(), "text/event-stream")


def _stalling_server():
    handler = type("Handler", (_Stalling,), {"seen": 0})
    server = type("Server", (http.server.ThreadingHTTPServer,), {"daemon_threads": True, "block_on_close": False})(
        ("127.0.0.1", 0), handler)
    # polled every 10 ms: shutdown() waits a poll (0.5 s by default)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    return server, handler


def test_a_stopped_load_reports_the_requests_that_had_ended():
    """Ctrl-C (asyncio.run cancels the load): the requests that ended are the result, those cut are
    not counted; before, nothing was reported."""
    server, handler = _stalling_server()
    target = B.HTTPTarget(f"http://127.0.0.1:{server.server_address[1]}", model="m")
    items = [parse_line(json.dumps({"prompt": "hi", "max_tokens": 1}), 1)]

    async def go():
        await target.start()
        load = asyncio.create_task(B.run_load(target, items, rate=math.inf, num=5, concurrency=3, progress=False))
        while handler.seen < 5:
            await asyncio.sleep(0.01)
        load.cancel()
        try:
            await load
        finally:
            await target.close()

    try:
        with pytest.raises(B.Interrupted) as stop:
            asyncio.run(go())
    finally:
        server.shutdown()
        server.server_close()
    assert len(stop.value.records) == 2 and all(r.error is None and r.done for r in stop.value.records)
    r = B.summarize("x", math.inf, stop.value.records, stop.value.wall)
    assert (r.requests, r.completed, r.errors) == (2, 2, 0)


@pytest.mark.parametrize("to_thread", [False, True])
def test_ctrl_c_prints_and_writes_what_was_measured_and_exits_130(tmp_path, to_thread):
    """agp bench exited 130 in silence on Ctrl-C, every measurement lost, a long --duration run's too.
    to_thread: the kernel may hand a signal sent to the process to any of its threads; Python runs
    its handler on the main thread, there asyncio.run's event loop, once that loop wakes. With the
    server holding the one request in flight, nothing woke it before the request timed out
    (--request-timeout, 600 s): Ctrl-C went unheard. Now heard, as Ctrl-C to the main thread is."""
    import os
    import signal
    import subprocess
    import sys

    from test_hostile import to_another_thread

    server, handler = _stalling_server()
    js = tmp_path / "r.json"
    # to another thread: a host name, not an address: asyncio resolves it on its executor's thread,
    # which stays (with an address the process has no thread but the main one, where a signal can only go)
    host = "localhost" if to_thread else "127.0.0.1"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline_dsl.cli", "bench", "--url",
                             f"http://{host}:{server.server_address[1]}", "-w", str(_workload(tmp_path)),
                             "--warmup", "0", "--no-progress", "--json", str(js), "--concurrency", "1",
                             "--save-result", "--result-dir", str(tmp_path / "saved")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_default)
    try:
        # one client: the third request is sent once the second's answer was read, so the two
        # answered requests have ended in agp bench when the server sees the third (the first
        # that stalls); with every request sent at once, the signal could come before it read them
        deadline = time.monotonic() + 120
        threads = lambda: len(os.listdir(f"/proc/{proc.pid}/task"))      # noqa: E731
        while (handler.seen < 3 or (to_thread and threads() < 2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handler.seen >= 3 and (not to_thread or threads() >= 2), handler.seen
        if to_thread:
            to_another_thread(proc, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        server.shutdown()
        server.server_close()
    assert proc.returncode == 130, err
    assert re.search(r"requests ok/sent\s+2/2", out)
    assert f"agp bench: interrupted while measuring http://{host}:" in err
    assert "its report holds the 2 requests that had ended" in err
    (report,) = json.loads(js.read_text())
    assert (report["requests"], report["completed"]) == (2, 2)
    # the files say the load was cut: a saved result of 2 completed and 0 failed out of the
    # workload's 6 read as a whole run otherwise
    (saved,) = [json.loads(p.read_text()) for p in (tmp_path / "saved").glob("*.json")]
    assert report["interrupted"] is True and saved["agp"]["interrupted"] is True
    assert (saved["num_prompts"], saved["completed"], saved["failed"]) == (6, 2, 0)


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_and_sighup_stop_a_measurement_as_ctrl_c_does(tmp_path, signame, code):
    """`timeout 600 agp bench …` or a CI job's cancel (SIGTERM), a closed terminal (SIGHUP): agp bench
    died at once, printing nothing and writing no --json, every measurement lost (agp run stops on
    all three). Now as on Ctrl-C: the cut measurement reported and written, exit 128 + the signal."""
    import signal
    import subprocess
    import sys

    server, handler = _stalling_server()
    js = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline_dsl.cli", "bench", "--url",
                             f"http://127.0.0.1:{server.server_address[1]}", "-w", str(_workload(tmp_path)),
                             "--warmup", "0", "--no-progress", "--json", str(js), "--concurrency", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_default)
    try:
        deadline = time.monotonic() + 120
        while handler.seen < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handler.seen >= 3, handler.seen
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        server.shutdown()
        server.server_close()
    assert proc.returncode == code, err
    assert re.search(r"requests ok/sent\s+2/2", out) and "agp bench: interrupted while measuring" in err
    (report,) = json.loads(js.read_text())
    assert (report["requests"], report["completed"], report["interrupted"]) == (2, 2, True)


def test_a_report_saved_before_the_newer_fields_is_read_with_their_defaults(tmp_path):
    """A --json file written before reports held burstiness, concurrency, slo and goodput."""
    old = {k: v for k, v in _SAVED.items() if k not in ("burstiness", "concurrency", "slo", "goodput")}
    (tmp_path / "old.json").write_text(json.dumps([old]))
    (r,) = B.load_reports(tmp_path / "old.json")
    assert (r.burstiness, r.concurrency, r.slo, r.goodput, r.label) == (1.0, None, {}, None, "x (old.json)")


def test_ignore_eos_makes_every_request_run_to_its_max_tokens(tmp_path, monkeypatch):
    """vllm bench serve's --ignore-eos: each workload line asks for ignore_eos, over HTTP as in process."""
    seen = []

    async def fake_bench_one(target, items, **kw):
        seen.append([B.HTTPTarget("http://h:1", model="m").body(item)[1] for item in items])
        return B.summarize("x", math.inf, [_record(0.0, [0.1])], duration=1.0)

    monkeypatch.setattr(B, "bench_one", fake_bench_one)
    w = tmp_path / "w.jsonl"
    w.write_text('{"prompt": "a", "max_tokens": 4}\n{"prompt": "b", "max_tokens": 4, "ignore_eos": false}\n')
    assert agp(["bench", "--url", "http://127.0.0.1:1", "-w", str(w), "--ignore-eos", "--no-progress"]) == 0
    assert [body["ignore_eos"] for body in seen[0]] == [True, True]


def test_a_target_names_which_pipeline_of_its_file_to_measure(tmp_path, tiny_gguf, capsys):
    """`FILE,pipeline=NAME` measures that pipeline of a file of several (examples/compare.agp's);
    without it, the file's first, as `agp run` and `agp serve` take it."""
    one = _pipeline_file(tmp_path, tiny_gguf).read_text()
    text = (re.sub(r"max_new_tokens = \d+", "max_new_tokens = 5  ignore_eos = true", one)
            + re.sub(r"max_new_tokens = \d+", "max_new_tokens = 2  ignore_eos = true", one).replace(
                "pipeline chat {", "pipeline short {"))
    path = tmp_path / "two.agp"
    path.write_text(text)
    work = tmp_path / "w.jsonl"
    work.write_text('{"prompt": "hello"}\n{"prompt": "world"}\n')
    js = tmp_path / "r.json"
    code = agp(["bench", str(path), f"{path},pipeline=short", "--workload", str(work), "--compare",
                "--plot", str(tmp_path / "r.png"), "--json", str(js), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    reports = json.loads(js.read_text())
    assert [(r["label"], r["completion_tokens"]) for r in reports] == [("two", 10), ("two (pipeline=short)", 4)]
    code = agp(["bench", f"{path},pipeline=shrt", "--workload", str(work), "--no-progress"])
    assert code == 2 and "no pipeline named 'shrt'" in capsys.readouterr().err


def test_a_server_with_an_api_key_is_measured_with_the_key_and_without_it_the_error_says_how(
        tmp_path, tiny_gguf, capsys, monkeypatch):
    """`agp serve --api-key` answers 401 to a request without the key: `agp bench --url` sends it
    from --api-key or OPENAI_API_KEY (as vllm bench serve reads it), and without it says so."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = LiveServer(tiny_gguf, api_keys=("sekrit",))
    argv = ["bench", "--url", server.url, "--workload", str(_workload(tmp_path, n=2)), "--warmup", "0",
            "--no-progress", "--json", str(tmp_path / "r.json")]
    try:
        assert agp(argv) == 1
        err = capsys.readouterr().err
        assert "wants an API key (none was given): give it with --api-key KEY" in err, err
        assert agp(argv + ["--api-key", "wrong"]) == 1
        assert "the one given was refused" in capsys.readouterr().err
        assert agp(argv + ["--api-key", "sekrit"]) == 0
        assert json.loads((tmp_path / "r.json").read_text())[0]["completed"] == 2
        monkeypatch.setenv("OPENAI_API_KEY", "sekrit")
        assert agp(argv) == 0
    finally:
        server.close()


def _vllm_figures(raw, duration, slo):
    """vLLM's benchmark_serving figures of raw requests (send time, each token's arrival, input
    tokens, or an error), computed here from the timestamps alone: TTFT = first token - send,
    E2E = last event - send, TPOT = (E2E - TTFT) / (output tokens - 1) for more than one token,
    ITL = the gaps between successive tokens, throughputs over the whole run, percentiles by
    numpy's linear interpolation, goodput = completed requests within every limit / duration."""
    ok = [q for q in raw if q["error"] is None]
    ttft = [q["tokens"][0] - q["sent"] for q in ok]
    e2e = [q["done"] - q["sent"] for q in ok]
    tpot = [(q["done"] - q["tokens"][0]) / (len(q["tokens"]) - 1) for q in ok if len(q["tokens"]) > 1]
    itl = [b - a for q in ok for a, b in zip(q["tokens"], q["tokens"][1:])]
    good = 0
    for q in ok:
        seen = {"ttft": q["tokens"][0] - q["sent"], "e2e": q["done"] - q["sent"],
                "tpot": (q["done"] - q["tokens"][0]) / (len(q["tokens"]) - 1) if len(q["tokens"]) > 1 else 0.0}
        good += all(seen[k] <= limit for k, limit in slo.items())
    out_tokens = sum(len(q["tokens"]) for q in ok)
    dist = {name: {"mean": float(np.mean(xs)), **{f"p{p}": float(np.percentile(xs, p)) for p in (50, 90, 99)}}
            for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e))}
    return dict(dist, completed=len(ok), request_throughput=len(ok) / duration,
                output_throughput=out_tokens / duration,
                total_throughput=(sum(q["prompt"] for q in ok) + out_tokens) / duration, goodput=good / duration)


def test_every_figure_is_vllm_benchmark_serving_s_of_the_same_timestamps():
    """Users set agp bench's table beside `vllm bench serve`'s: every latency quantile, throughput
    and the goodput of a seeded mix of requests (one token to many, some failed, uneven gaps, an
    odd count so that no percentile falls on a sample) match vLLM's definitions computed here from
    the raw timestamps, not a hand-picked figure a wrong index or interval can also give."""
    rng = np.random.default_rng(7)
    raw = []
    for i in range(37):
        sent = float(rng.uniform(0.0, 5.0))
        if i % 9 == 4:
            raw.append({"sent": sent, "done": sent + 0.05, "error": "HTTP 503: busy", "tokens": [], "prompt": 0})
            continue
        n = 1 if i % 7 == 3 else int(rng.integers(2, 30))
        tokens = list(sent + float(rng.uniform(0.02, 0.4)) + np.cumsum(rng.exponential(0.03, n) * (1 + (i % 3))))
        raw.append({"sent": sent, "tokens": tokens, "done": tokens[-1] + float(rng.uniform(0.0, 0.002)),
                    "error": None, "prompt": int(rng.integers(5, 50))})
    records = []
    for q in raw:
        r = B.RequestRecord(sent=q["sent"], prompt_tokens=q["prompt"], completion_tokens=len(q["tokens"]),
                            error=q["error"], finish_reason=None if q["error"] else "length")
        for t in q["tokens"]:
            r.chunk(t)
        r.done = q["done"]
        records.append(r)
    duration = max(q["done"] for q in raw) + 0.01
    slo = {"ttft": 0.25, "tpot": 0.05, "e2e": 1.0}
    want = _vllm_figures(raw, duration, slo)
    got = B.summarize("x", 8.0, records, duration=duration, slo=slo)
    assert got.completed == want["completed"] and got.errors == len(raw) - want["completed"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        for q in ("mean", "p50", "p90", "p99"):
            assert getattr(got, name)[q] == pytest.approx(want[name][q], rel=1e-9), (name, q)
    for key in ("request_throughput", "output_throughput", "total_throughput", "goodput"):
        assert getattr(got, key) == pytest.approx(want[key], rel=1e-9), key
    assert 0 < got.goodput < got.request_throughput           # the limits tell requests apart
    # the table shows the same figures, in ms and per second
    table = B.format_table([got])
    for name in ("ttft", "tpot", "itl", "e2e"):
        for q in ("mean", "p50", "p90", "p99"):
            assert re.search(rf"^{name.upper()} {q} \(ms\)\s+{want[name][q] * 1000:.1f}$", table, re.M), (name, q)
    assert re.search(rf"^requests/s\s+{want['request_throughput']:.2f}$", table, re.M)
    assert re.search(rf"^output tok/s\s+{want['output_throughput']:.1f}$", table, re.M)
    assert re.search(rf"^total tok/s\s+{want['total_throughput']:.1f}$", table, re.M)
    assert re.search(rf"^goodput \(req/s\)\s+{want['goodput']:.2f}$", table, re.M)


class _Streaming(_Refusing):
    """Streams `chunks` (each a chunk's JSON object) then [DONE]: a server's answer as written."""
    chunks: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in self.chunks) + "data: [DONE]\n\n"
        self._send(200, body.encode(), "text/event-stream")


def _streamed(chunks, line=None):
    """The record of one request sent over HTTP to a server streaming `chunks`."""
    handler = type("Handler", (_Streaming,), {"chunks": chunks})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = B.HTTPTarget(f"http://127.0.0.1:{server.server_address[1]}", model="m")
    rec = B.RequestRecord(sent=0.0)

    async def go():
        await target.start()
        try:
            await target.send(parse_line(json.dumps(line or {"prompt": "hi", "max_tokens": 3}), 1), rec,
                              time.perf_counter)
        finally:
            await target.close()

    try:
        asyncio.run(go())
    finally:
        server.shutdown()
        server.server_close()
    return rec


def _text(index, text, finish=None):
    return {"choices": [{"index": index, "text": text, "finish_reason": finish}]}


def test_a_servers_choices_are_timed_as_streams_of_their_own():
    """n = 2 over HTTP: each choice's chunks are its own stream (ITL and TPOT per choice, as the
    in-process target counts them), not one stream of both choices' chunks interleaved."""
    chunks = [_text(i, "a") for _ in range(3) for i in (0, 1)] + [_text(0, "", "length"), _text(1, "", "length")]
    chunks[-1]["usage"] = {"prompt_tokens": 2, "completion_tokens": 6}
    rec = _streamed(chunks, {"prompt": "hi", "max_tokens": 3, "n": 2})
    assert sorted(rec.chunk_times) == [0, 1] and [len(t) for t in rec.chunk_times.values()] == [3, 3]
    assert not rec.truncated and rec.error is None


def test_a_server_without_usage_has_its_output_counted_over_every_choice():
    """A server that sends no usage chunk: the output tokens are the chunks of every choice that
    carried text (each chunk a token), so output tok/s counts both choices of n = 2."""
    chunks = [_text(i, "a") for _ in range(3) for i in (0, 1)] + [_text(0, "", "length"), _text(1, "", "length")]
    rec = _streamed(chunks, {"prompt": "hi", "max_tokens": 3, "n": 2})
    assert rec.completion_tokens == 6


def test_the_cached_prompt_tokens_a_server_reports_make_the_kv_hit_rate():
    """vLLM and agp serve report a prompt's cached tokens in usage.prompt_tokens_details: --url's KV
    hit rate is theirs over the prompt tokens."""
    chunks = [_text(0, "a"), _text(0, "b", "length")]
    chunks[-1]["usage"] = {"prompt_tokens": 40, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 30}}
    rec = _streamed(chunks)
    assert (rec.prompt_tokens, rec.cached_tokens) == (40, 30)
    rec.done = max(rec.chunk_times[0])
    assert B.summarize("x", 1.0, [rec], duration=1.0).kv_hit_rate == pytest.approx(0.75)


def test_a_stream_that_ends_without_a_finish_reason_is_truncated():
    """[DONE] after chunks of text but no finish_reason (a proxy that cut the answer, a server that
    died mid-way and closed politely): the answer is not whole, so it is no completed request."""
    rec = _streamed([_text(0, "a"), _text(0, "b")])
    assert rec.truncated and rec.error is None
    rec.done = 1.0
    s = B.summarize("x", 1.0, [rec], duration=1.0)
    assert (s.completed, s.truncated) == (0, 1)


def test_the_first_error_is_the_first_sent_requests():
    """The exit message of a measurement where nothing succeeded names the error of the first
    request sent, whatever came after it."""
    records = [B.RequestRecord(sent=0.1 * i, done=1.0, error=f"HTTP 50{i}: down") for i in range(3)]
    why = B.failure(B.summarize("x", 1.0, records, duration=1.0))
    assert why == "none of its 3 requests succeeded; the first error: HTTP 500: down"


def test_the_markdown_table_has_a_cell_per_report_in_every_row():
    """format_markdown's rows, its alignment row included, have a cell per report: GitHub renders a
    table whose delimiter row is short as plain text."""
    reports = [B.summarize(label, 1.0, [_record(0.0, [0.1, 0.2])], duration=1.0) for label in ("a", "b", "c")]
    lines = B.format_markdown(reports).splitlines()
    assert lines[1] == "|---|---:|---:|---:|"
    assert {line.count("|") for line in lines} == {5}


class _Instant:
    """A target that answers each request with two tokens at once (`gap` seconds before each)."""
    label, gap = "instant", 0.0

    async def start(self):
        pass

    async def close(self):
        pass

    async def stats(self):
        return {}

    async def send(self, item, rec, clock):
        for _ in range(2):
            if self.gap:
                await asyncio.sleep(self.gap)
            rec.chunk(clock())
        rec.prompt_tokens, rec.completion_tokens, rec.finish_reason = 3, 2, "length"


def test_the_throughput_is_over_the_whole_load_from_its_start():
    """vLLM's benchmark duration runs from the start of the load (before the first arrival's gap)
    to the last answer: 3 requests evenly spaced at 10/s are sent at 0.1, 0.2 and 0.3 s, so the
    duration is at least 0.3 s and the request throughput at most 10/s, not 3 over the 0.2 s from
    the first send to the last answer."""
    items = [parse_line(json.dumps({"prompt": "hi"}), 1)]
    r = asyncio.run(B.bench_one(_Instant(), items, rate=10.0, num=3, progress=False, warmup=0,
                                burstiness=math.inf))
    assert r.completed == 3 and r.duration_s >= 0.3
    assert r.request_throughput == pytest.approx(3 / r.duration_s) and r.request_throughput <= 10.0


def test_bench_defaults_are_the_documented_ones():
    """`agp bench --help` says: all at once (--rate inf), one warm-up request, seed 0, 600 s a request."""
    from pipeline_dsl.cli import build_parser

    args = build_parser(["bench"]).parse_args(["bench", "--url", "http://h:1", "-w", "w.jsonl"])
    assert (args.rate, args.warmup, args.seed, args.request_timeout, args.burstiness) == ("inf", 1, 0, 600.0, 1.0)
    assert (args.num, args.duration, args.concurrency, args.goodput) == (None, None, None, None)


def test_a_reports_json_holds_its_figures_not_every_requests_samples():
    """--json writes each report's figures; the per-request TTFT and E2E samples (the plot's CDFs)
    stay out unless asked for: a long run's file held two numbers per request."""
    r = B.summarize("x", 2.0, [_record(0.0, [0.2, 0.3]), _record(0.5, [0.6, 0.9])], duration=1.0)
    d = json.loads(json.dumps(r.to_dict()))
    assert "ttft_samples" not in d and "e2e_samples" not in d
    assert {"ttft", "tpot", "itl", "e2e", "request_throughput", "output_throughput", "units"} <= set(d)
    assert r.to_dict(samples=True)["ttft_samples"] == pytest.approx([0.2, 0.1])


def test_a_targets_true_false_and_none_are_read_in_any_case(tmp_path):
    """`,prefix_reuse=False` (Python's spelling) and `,seed=None` are the booleans and none that
    their lower-case spellings are, not an error."""
    agp_file = tmp_path / "p.agp"
    agp_file.write_text("pipeline p {}")
    assert B.parse_target(f"{agp_file},prefix_reuse=False,compile=TRUE,seed=None")[1] == {
        "prefix_reuse": False, "compile": True, "seed": None}


def test_a_baseline_file_of_one_report_object_is_read_as_a_list_of_one(tmp_path):
    """A report taken out of a --json file's list (one object, not a list) is still a baseline."""
    (tmp_path / "one.json").write_text(json.dumps(_SAVED))
    (r,) = B.load_reports(tmp_path / "one.json")
    assert (r.label, r.completed) == ("x (one.json)", _SAVED["completed"])


def test_a_save_result_file_is_a_baseline_as_its_report_under_agp(tmp_path):
    """A user of vllm bench serve keeps --save-result's files: --baseline refused agp's own ("report 1
    is not one agp bench --json writes: it has no 'rate'"), though it holds the report under 'agp'.
    A result without it (vLLM's own) is refused naming what --baseline reads."""
    report = B.summarize("x", 2.0, [_record(0.0, [0.2, 0.3])], duration=1.0, keep_records=True)
    saved = B.vllm_result(report, date="20260101-000000", backend="agp", tokenizer_id="t", num_prompts=1)
    (tmp_path / "r.json").write_text(json.dumps(saved))
    (r,) = B.load_reports(tmp_path / "r.json")
    assert (r.label, r.completed, r.rate, r.ttft) == ("x (r.json)", 1, 2.0, report.ttft)
    report.interrupted = True                # a measurement Ctrl-C cut says so beside the others
    (tmp_path / "cut.json").write_text(json.dumps([report.to_dict()]))
    assert [r.label for r in B.load_reports(tmp_path / "cut.json")] == ["x (cut.json, interrupted)"]
    (tmp_path / "vllm.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "agp"}))
    with pytest.raises(B.BenchError, match="a vllm bench serve result without agp's report"):
        B.load_reports(tmp_path / "vllm.json")


class _TwoModels(_Refusing):
    """Lists two models and answers every completion (one token)."""
    refuse = 10 ** 9

    def do_GET(self):
        self._send(200, json.dumps({"data": [{"id": "first"}, {"id": "second"}]}).encode())


def test_the_table_says_which_pipeline_and_model_were_measured_and_under_which_limits(tmp_path, tiny_gguf):
    """A column was headed by the file's stem or the URL alone: which of a file's pipelines ran, which
    model a server measured without --model (its first), and the limits a goodput figure counted
    against were in no row of the table nor in the --json report."""
    items = B.load_workload(_workload(tmp_path, n=1))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TwoModels)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = asyncio.run(B.bench_one(B.HTTPTarget(f"http://127.0.0.1:{server.server_address[1]}"), items,
                                         rate=math.inf, num=2, progress=False, warmup=0,
                                         slo={"ttft": 0.5, "e2e": 2.0}))
    finally:
        server.shutdown()
        server.server_close()
    local = asyncio.run(B.bench_one(B.EngineTarget.from_pipeline(str(_pipeline_file(tmp_path, tiny_gguf))),
                                    items, rate=math.inf, num=1, progress=False, warmup=0))
    assert (remote.pipeline, remote.model, remote.completed) == (None, "first", 2)
    assert (local.pipeline, local.model) == ("chat", "tiny.gguf")
    table = B.format_table([local, remote])
    assert re.search(r"^pipeline\s+chat\s+-$", table, re.M), table
    assert re.search(r"^model\s+tiny\.gguf\s+first$", table, re.M), table
    assert re.search(r"^goodput limits \(ms\)\s+-\s+ttft 500, e2e 2000$", table, re.M), table
    (tmp_path / "r.json").write_text(json.dumps([local.to_dict(), remote.to_dict()]))
    saved = B.load_reports(tmp_path / "r.json")
    assert [(r.pipeline, r.model) for r in saved] == [("chat", "tiny.gguf"), (None, "first")]


def test_percentiles_interpolate_between_the_nearest_samples_as_vllm_bench_serve():
    """np.percentile's linear interpolation (vLLM's): TTFTs of 100, 200, 300, 400 and 1000 ms have
    p50 300 ms, p90 400 + 0.6 * 600 = 760 ms and p99 400 + 0.96 * 600 = 976 ms, not the nearest sample."""
    records = [_record(0.0, [t, t + 0.1]) for t in (0.3, 0.1, 1.0, 0.4, 0.2)]
    r = B.summarize("x", 1.0, records, duration=2.0)
    assert r.ttft == pytest.approx({"mean": 0.4, "p50": 0.3, "p90": 0.76, "p99": 0.976}, abs=1e-12)
    assert re.search(r"^TTFT p90 \(ms\)\s+760\.0$", B.format_table([r]), re.M)


class _Slow(_Instant):
    """A target that answers each request with two tokens, 20 ms apart."""
    label, gap = "slow", 0.02


def test_a_request_waiting_for_a_client_slot_is_sent_when_the_slot_frees():
    """--max-concurrency 1, all at once: as in vllm bench serve, a request's TTFT and E2E run from
    when it went out (a slot of the client free), not from its arrival: each is sent after the one
    before it ended, so its TTFT is its own wait for the server, not the queue in the client."""
    items = [parse_line(json.dumps({"prompt": "hi"}), 1)]
    records, _ = asyncio.run(B.run_load(_Slow(), items, rate=math.inf, num=3, concurrency=1, progress=False))
    records.sort(key=lambda r: r.sent)
    assert all(b.sent >= a.done for a, b in zip(records, records[1:]))


class _KeepAlive(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.1 server that streams each answer in a chunked body, as uvicorn streams agp serve's
    and vLLM's, counting the connections it was opened; after [DONE] it ends the body `hold`
    seconds later (at `ended`, perf_counter's clock)."""
    protocol_version = "HTTP/1.1"
    connections, hold, ended = 0, 0.0, []

    def setup(self):
        type(self).connections += 1
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def do_GET(self):                   # /v1/models, asked first on the same connection
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunks = [_text(0, "a"), dict(_text(0, "b", "length"), usage={"prompt_tokens": 2, "completion_tokens": 2})]
        for body in [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
            self.wfile.flush()
        type(self).ended.append(time.perf_counter() + type(self).hold)
        time.sleep(type(self).hold)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _keep_alive_records(hold: float, num: int):
    handler = type("Handler", (_KeepAlive,), {"hold": hold, "ended": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    items = [parse_line(json.dumps({"prompt": "hi"}), 1)]

    async def go():
        target = B.HTTPTarget(f"http://127.0.0.1:{server.server_address[1]}", model="m")
        await target.start()
        try:
            return await B.run_load(target, items, rate=math.inf, num=num, concurrency=1, progress=False)
        finally:
            await target.close()

    try:
        records, _ = asyncio.run(go())
    finally:
        server.shutdown()
        server.server_close()
    return records, handler


def test_requests_one_after_another_reuse_one_connection_as_vllm_bench_serves_client_does():
    """agp bench stopped reading a response at its [DONE], before the end of its chunked body, and
    httpx closed such a connection: every request opened a new one (20 requests to agp serve left
    20 closed connections), a TCP and, to an https server, a TLS handshake inside each TTFT, where
    vllm bench serve reads each response to its end and keeps its connections open."""
    records, handler = _keep_alive_records(hold=0.0, num=5)
    assert [(r.error, r.truncated, r.completion_tokens) for r in records] == [(None, False, 2)] * 5
    assert handler.connections == 1


def test_a_server_that_keeps_the_stream_open_after_done_is_not_waited_for():
    """The rest of a response after [DONE] is read for a while only: a server that holds its body
    open after [DONE] still gives a whole answer, whose end-to-end latency ends at [DONE], not when
    the server lets the response go."""
    records, handler = _keep_alive_records(hold=2.0, num=1)
    (r,) = records
    assert (r.error, r.truncated, r.finish_reason) == (None, False, "length")
    assert r.done < handler.ended[0]


def test_a_table_of_poisson_and_bursty_reports_shows_each_ones_burstiness():
    """Side by side, a bursty measurement beside a Poisson one (a --baseline): the burstiness row
    is shown as soon as one report is not Poisson, with 1 for the Poisson one."""
    records = [_record(0.0, [0.1, 0.2, 0.3])]
    poisson = B.summarize("a", 1.0, records, duration=1.0)
    bursty = B.summarize("b", 1.0, records, duration=1.0, burstiness=0.5)
    assert re.search(r"^burstiness\s+1\s+0\.5$", B.format_table([poisson, bursty]), re.M)
    assert "burstiness" not in B.format_table([poisson, poisson])


def test_the_engine_counters_of_a_measurement_leave_out_the_warm_ups_evictions_too():
    before = {"decode_steps": 4, "mean_batch_size": 1.0, "preemptions": 1, "kv_evictions": 2}
    after = {"decode_steps": 10, "mean_batch_size": 2.2, "preemptions": 3, "kv_evictions": 7, "peak_memory_bytes": 9}
    assert B.during(before, after) == {"decode_steps": 6, "mean_batch_size": pytest.approx(3.0), "preemptions": 2,
                                       "kv_evictions": 5, "peak_memory_bytes": 9}


def test_a_report_keeps_five_error_samples_and_shows_a_kv_hit_rate_of_nothing_as_0_percent():
    records = [_record(0.0, [0.1, 0.2])] + [B.RequestRecord(sent=0.0, done=0.1, error=f"HTTP 50{i}: busy")
                                          for i in (6, 5, 4, 3, 2, 1, 0)]
    r = B.summarize("x", 1.0, records, duration=1.0)
    assert r.error_samples == [f"HTTP 50{i}: busy" for i in range(5)] and r.first_error == "HTTP 506: busy"
    assert r.kv_hit_rate == 0.0 and re.search(r"^KV hit rate\s+0\.0%$", B.format_table([r]), re.M)


@pytest.mark.parametrize("argv, said", [
    # the value of a flag agp has not was read as a PIPELINE ('train' left out of the message)
    (["--hf-subset", "x", "--hf-split", "train"],
     "unrecognized arguments: --hf-subset x --hf-split train; --hf-subset and --hf-split "
     "are vllm bench serve's: agp bench's datasets are --dataset-name jsonl (--workload FILE"),
    (["--random-batch-size", "4", "--input-len", "128"],
     "--random-batch-size and --input-len are vllm bench serve's: agp bench's synthetic dataset is "
     "--dataset-name random"),
    (["--append-result"], "--append-result is vllm bench serve's: agp's --save-result writes a new file per measurement"),
    (["--percentile-metrics", "ttft,tpot", "--bogus"], "unrecognized arguments: --percentile-metrics ttft,tpot --bogus"),
    (["--label", "a", "--backend", "openai-chat"], "unrecognized arguments: --label a --backend openai-chat"),
    (["--tokenizer-mode", "slow"], "--tokenizer-mode is vllm bench serve's: agp bench's --tokenizer reads"),
])
def test_vllm_bench_serve_flags_agp_has_not_exit_2_naming_agps_way(tmp_path, capsys, argv, said):
    """Were an argparse wall: "unrecognized arguments: --hf-subset --hf-split train" (the split's name
    taken for a PIPELINE), with no word of agp's datasets or --save-result."""
    with pytest.raises(SystemExit) as e:
        agp(["bench", "--url", "http://127.0.0.1:1", "-w", str(_workload(tmp_path))] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err, err


def test_vllm_bench_serve_names_of_agps_options_are_taken(tmp_path):
    """--base-url, --num-warmups and --disable-tqdm mean what agp's --url, --warmup and --no-progress do."""
    from pipeline_dsl.cli import build_parser

    args = build_parser(["bench"]).parse_args(["bench", "--base-url", "http://h:1", "-w", "w.jsonl",
                                               "--num-warmups", "3", "--disable-tqdm"])
    assert (args.url, args.warmup, args.no_progress) == (["http://h:1"], 3, True)


def test_metric_percentiles_are_shown_and_saved_as_vllm_bench_serve_names_them(tmp_path, capsys):
    """p95 (vllm bench serve --metric-percentiles 50,95,99) was not to be had: the percentiles were
    50, 90 and 99 only. Hand-computed: TTFTs 100, 200, 300, 400, 1000 ms: p95 = 400 + 0.8 * 600."""
    records = [_record(0.0, [t, t + 0.1]) for t in (0.1, 0.2, 0.3, 0.4, 1.0)]
    r = B.summarize("x", 1.0, records, duration=2.0, percentiles=[95, 99.9])
    assert r.ttft["p95"] == pytest.approx(0.88) and r.ttft["p50"] == pytest.approx(0.3)   # the defaults kept
    rows = B.format_table([r]).splitlines()
    assert [row.split()[1] for row in rows if row.startswith("TTFT")] == ["mean", "p95", "p99.9"]
    assert "880.0" in next(row for row in rows if row.startswith("TTFT p95"))
    saved = tmp_path / "r.json"
    saved.write_text(json.dumps([r.to_dict()]))
    again = B.load_reports(saved)[0]
    assert again.ttft["p95"] == pytest.approx(0.88) and again.percentiles == [95, 99.9]

    handler = type("Handler", (_Refusing,), {"refuse": 2, "seen": 0})      # every other request streams a token
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    out = tmp_path / "bench.json"
    try:
        code = agp(["bench", "--url", f"http://127.0.0.1:{server.server_address[1]}", "-w", str(_workload(tmp_path)),
                    "--warmup", "0", "--no-progress", "--metric-percentiles", "50,95,99", "--json", str(out)])
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0
    table = capsys.readouterr().out
    assert "E2E p95 (ms)" in table and "E2E p90 (ms)" not in table
    e2e = json.loads(out.read_text())[0]["e2e"]
    assert {"mean", "p50", "p90", "p95", "p99"} <= set(e2e) and e2e["p50"] <= e2e["p95"] <= e2e["p99"]


def test_metric_percentiles_are_named_unrounded_as_vllm_bench_serve_names_them(tmp_path, capsys):
    """99.99999 was named p100 (format 'g' keeps 6 digits): a second p100 row beside 100's, one
    value written over the other in the report."""
    records = [_record(0.0, [t, t + 0.1]) for t in (0.1, 0.2, 0.3, 0.4, 1.0)]
    r = B.summarize("x", 1.0, records, duration=2.0, percentiles=[99.99999, 100, 99.5])
    assert r.ttft["p100"] == pytest.approx(1.0) and r.ttft["p99.99999"] < r.ttft["p100"]
    assert "p99.5" in r.ttft and "p99.5" in r.e2e
    rows = B.format_table([r]).splitlines()
    assert [row.split()[1] for row in rows if row.startswith("TTFT")] == ["mean", "p99.5", "p99.99999", "p100"]


def test_metric_percentiles_are_shown_for_baseline_reports_shown_alone(tmp_path, capsys):
    """`agp bench --baseline r.json --metric-percentiles 50,95` showed p50, p90 and p99: the
    option was read only for a new measurement. The file's p90 and p99 are left out, p95 (not in
    it) shown as '-'."""
    records = [_record(0.0, [t, t + 0.1]) for t in (0.1, 0.2, 0.3, 0.4, 1.0)]
    saved = tmp_path / "r.json"
    saved.write_text(json.dumps([B.summarize("x", 1.0, records, duration=2.0).to_dict()]))
    assert agp(["bench", "--baseline", str(saved), "--metric-percentiles", "50,95"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[1] for row in rows if row.startswith("TTFT")] == ["mean", "p50", "p95"]
    assert next(row for row in rows if row.startswith("TTFT p95")).split()[-1] == "-"
    assert next(row for row in rows if row.startswith("TTFT p50")).split()[-1] == "300.0"


@pytest.mark.parametrize("value, message", [("50,abc", "'abc' is not a number"), ("101", "101 is not a percentile"),
                                            ("-1", "not a percentile from 0 to 100")])
def test_bad_metric_percentiles_are_refused_while_parsing(tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as e:
        agp(["bench", "--url", "http://127.0.0.1:1", "-w", str(_workload(tmp_path)), f"--metric-percentiles={value}"])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("key", ["output_tokens", "output_len"])
def test_a_custom_dataset_line_with_its_output_length_is_told_agps_max_tokens(tmp_path, key):
    """Was "unknown field 'output_tokens' (did you mean 'stop_token_ids'?)"."""
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"prompt": "hi", key: 16}) + "\n")
    with pytest.raises(B.BenchError, match=rf"custom\.jsonl:1: '{key}' is a custom benchmark dataset's output "
                                           rf"length: agp's is the request's max_tokens"):
        B.load_workload(path)


_BATCH = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}
_CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("line, told", [
    # the line has its length already: 'unknown field (did you mean stop_token_ids?)', or told to rename
    # output_tokens to max_tokens beside max_completion_tokens
    ({"prompt": "hi", "max_tokens": 4, "output_tokens": 4},
     "and the line's max_tokens is there: leave 'output_tokens' out: jq -c 'del(.output_tokens)' custom.jsonl"),
    ({"prompt": "hi", "max_completion_tokens": 4, "output_tokens": 4},
     "and the line's max_completion_tokens is there: leave 'output_tokens' out: jq -c 'del(.output_tokens)'"),
    ({**_BATCH, "body": {**_CHAT, "max_tokens": 4}, "output_len": 4},
     "and the request's body's max_tokens is there: leave 'output_len' out: jq -c 'del(.output_len)'"),
    # a batch line's length goes in its body, not beside it
    ({**_BATCH, "body": _CHAT, "output_len": 4},
     "max_tokens (in the batch line's body) (with --ignore-eos every request generates that many): jq -c "
     "'if has(\"output_len\") then .body.max_tokens //= .output_len | del(.output_len) else . end' custom.jsonl"),
    ({**_BATCH, "body": {**_CHAT, "output_tokens": 4}},
     "jq -c 'if .body | has(\"output_tokens\") then .body.max_tokens //= .body.output_tokens | "
     "del(.body.output_tokens) else . end'"),
    ({"prompt": "hi", "output_len": 4},
     "jq -c 'if has(\"output_len\") then .max_tokens //= .output_len | del(.output_len) else . end'"),
])
def test_a_custom_dataset_output_length_is_told_where_the_lines_length_goes(tmp_path, line, told):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(B.BenchError) as e:
        B.load_workload(path)
    assert "custom.jsonl:1: '" in str(e.value)
    assert "is a custom benchmark dataset's output length" in str(e.value) and told in str(e.value), str(e.value)


class _Loading(_Refusing):
    """A server still loading its model for its first `loading` GETs: 503 with Retry-After, as
    agp serve and vLLM answer then; then up, every completion streaming a token."""
    loading, gets, refuse = 2, 0, 10**9

    def _loading(self) -> bool:
        if type(self).gets > type(self).loading:
            return False
        body = json.dumps({"error": {"message": "the server is loading its model; retry later",
                                     "code": "loading"}}).encode()
        self.send_response(503)
        self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return True

    def do_GET(self):
        type(self).gets += 1
        if not self._loading():
            super().do_GET()

    def do_POST(self):
        if self._loading():
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        else:
            super().do_POST()


@pytest.mark.parametrize("loading, argv, code", [(2, [], 0), (2, ["--model", "m"], 0),
                                                 (10**9, ["--ready-check-timeout-sec", "0.3"], 1)])
def test_a_server_still_loading_its_model_is_waited_for_up_to_the_ready_timeout(tmp_path, capsys, loading, argv, code):
    """`agp serve MODEL & agp bench --url …` stopped at once on the 503 of a server loading its
    model: "cannot list the models of …: Server error '503 Service Unavailable' for url … For more
    information check: https://developer.mozilla.org/…". vllm bench serve waits for a server to be
    ready (--ready-check-timeout-sec)."""
    handler = type("Handler", (_Loading,), {"loading": loading, "gets": 0, "seen": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        got = agp(["bench", "--url", url, "-w", str(_workload(tmp_path)), "--warmup", "0", "--no-progress"] + argv)
    finally:
        server.shutdown()
        server.server_close()
    captured = capsys.readouterr()
    assert got == code
    assert "answers HTTP 503 (the server is loading its model; retry later); waiting up to" in captured.err
    if code == 0:
        assert re.search(r"requests ok/sent\s+6/6", captured.out)
    else:                                   # still loading at the deadline: said as the server says it, once
        assert (f"agp bench: error: cannot list the models of {url}/v1: HTTP 503: the server is loading its model; "
                "retry later; still answering 503 after 0.3 s (--ready-timeout)" in captured.err)
        assert captured.err.count("cannot list the models") == 1 and "mozilla" not in captured.err


@pytest.mark.parametrize("argv", [[], ["--model", "m"]])
def test_a_server_not_listening_yet_is_waited_for_up_to_the_ready_timeout(tmp_path, capsys, monkeypatch, argv):
    """A port refusing connections (vLLM's server opens it only once its model is loaded; a container
    still starting) failed `agp bench --url` at once: only a 503 was waited for. vllm bench serve's
    ready check retries a refused connection until --ready-check-timeout-sec."""
    port = _free_port()                         # a free port, nothing listening on it yet
    url = f"http://127.0.0.1:{port}"
    handler = type("Handler", (_Refusing,), {"refuse": 10**9, "seen": 0})
    servers, refused = [], threading.Event()

    class Said:                                 # standard error, as captured; refused is set once the
        def __init__(self, stream):             # bench has said its first connection was refused
            self.stream = stream

        def write(self, text):
            if "not answering" in text:
                refused.set()
            return self.stream.write(text)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    monkeypatch.setattr(sys, "stderr", Said(sys.stderr))

    def start_later():                          # once refused (a second at most: as the bench begins)
        refused.wait(1.5)
        servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), handler))
        servers[0].serve_forever(0.01)

    threading.Thread(target=start_later, daemon=True).start()
    try:
        got = agp(["bench", "--url", url, "-w", str(_workload(tmp_path)), "--warmup", "0", "--no-progress"] + argv)
    finally:
        while not servers:
            time.sleep(0.05)
        servers[0].shutdown()
        servers[0].server_close()
    captured = capsys.readouterr()
    assert got == 0, captured.err
    assert f"agp bench: {url}/v1 not answering: " in captured.err and "waiting up to 600 s" in captured.err
    assert re.search(r"requests ok/sent\s+6/6", captured.out)


def test_a_server_never_listening_is_said_at_the_ready_timeout(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert agp(["bench", "--url", url, "-w", str(_workload(tmp_path)), "--warmup", "0", "--no-progress",
                "--ready-timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert f"agp bench: error: cannot list the models of {url}/v1: " in err
    assert "still not answering after 0.5 s (--ready-timeout)" in err and err.count("cannot list") == 1


class _Dropping(_Refusing):
    """A server that begins every completion's stream, then resets the connection mid-answer
    (a crashed worker, a proxy cutting it)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = {"choices": [{"index": 0, "text": "hi"}]}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        time.sleep(0.3)                          # the client has the answer's start before the reset
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()                  # linger 0: a reset, as a killed process's socket


def test_a_connection_dropped_mid_answer_is_named_with_the_url_in_the_error_samples(tmp_path, capsys):
    """The error sample of a request whose connection the server cut was `ReadError: ` (httpx's
    message is empty): it names what happened and the URL it happened on."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Dropping)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        agp(["bench", "--url", url, "-w", str(_workload(tmp_path, 2)), "--warmup", "0", "--no-progress",
             "--json", str(tmp_path / "r.json")])
    finally:
        server.shutdown()
        server.server_close()
    report = json.loads((tmp_path / "r.json").read_text())[0]
    assert report["errors"] == 2
    assert report["error_samples"] == [f"ReadError: connection closed by the server mid-answer ({url}/v1/completions)"]
    assert f"ReadError: connection closed by the server mid-answer ({url}/v1/completions)" in capsys.readouterr().out


def test_a_ready_timeout_of_0_skips_the_ready_check_as_vllms_does(tmp_path, capsys):
    """vllm bench serve's --ready-check-timeout-sec 0 skips the check; agp bench refused 0 as not
    positive. With the model named nothing is asked before the load; without it, the one GET that
    finds the model is not waited on: a server still loading fails the run at once."""
    handler = type("Handler", (_Loading,), {"loading": -1, "gets": 0, "seen": 0})   # up
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    argv = ["bench", "--url", url, "-w", str(_workload(tmp_path)), "--warmup", "0", "--no-progress"]
    try:
        assert agp(argv + ["--model", "m", "--ready-timeout", "0"]) == 0
        assert handler.gets == 0                 # not one GET /v1/models
        handler.loading = 10**9                  # from now on: loading
        assert agp(argv + ["--ready-check-timeout-sec", "0"]) == 1
        captured = capsys.readouterr()
        assert f"cannot list the models of {url}/v1: HTTP 503: the server is loading its model" in captured.err
        assert "waiting up to" not in captured.err
        with pytest.raises(SystemExit) as exit_:
            agp(argv + ["--ready-timeout", "-1"])
        assert exit_.value.code == 2
        assert "--ready-timeout" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
