"""Priority scheduling (vLLM's --scheduling-policy priority): dynamic_batch's scheduling_policy
admits waiting requests by their `priority` (lower first, ties by arrival), preempts the running
sequence of the highest value when blocks run out, and leaves fcfs as it was; a request's
priority reaches the engine from `agp run` lines and `agp serve`'s chat, completions and
responses (and embeddings), and a non-zero one is refused where the engine schedules fcfs."""
from __future__ import annotations

import json

import httpx
import pytest

from pipeline_dsl.engine import EngineConfig, InputError, SamplingParams
from pipeline_dsl.engine.kv_cache import BlockManager
from pipeline_dsl.engine.scheduler import Scheduler, Sequence
from pipeline_dsl.requests_io import RequestError, parse_request
from pipeline_dsl.serve import protocol as P
from clikit import agp_in
from test_engine import run_all, toy_engine
from test_scheduler import Clock, run_step



def make(policy="priority", num_blocks=64, block_size=4, **cfg):
    clock = Clock()
    config = EngineConfig(**{"batch_timeout_s": 0.0, "max_batch_size": 4, "scheduling_policy": policy, **cfg})
    return Scheduler(config, BlockManager(num_blocks, block_size), clock), clock


def add(sched, clock, rid, priority=0, n_prompt=5, max_tokens=4):
    base = 1000 * (ord(rid[0]) + len(rid))                     # distinct prompts: no prefix shared
    seq = Sequence(rid, list(range(base, base + n_prompt)), n_prompt, SamplingParams(max_tokens=max_tokens),
                   clock(), priority)
    sched.add(seq)
    clock.t += 0.001                                           # each arrives after the one before
    return seq


def admitted(sched, steps=200) -> list[str]:
    """The ids in the order they were first scheduled, stepping until everything is done."""
    order = []
    for _ in range(steps):
        if not sched.has_unfinished():
            return order
        for it in run_step(sched).items:
            if it.seq.request_id not in order:
                order.append(it.seq.request_id)
    raise AssertionError("no progress")


# ---------------------------------------------------------------- the scheduler

def test_with_the_batch_full_a_later_high_priority_request_is_admitted_before_earlier_low_ones():
    sched, clock = make(max_batch_size=2)
    add(sched, clock, "a", priority=5, max_tokens=3)
    add(sched, clock, "b", priority=5, max_tokens=30)
    run_step(sched)                                            # the batch is full: a and b run
    for rid in ("c", "d"):
        add(sched, clock, rid, priority=5)
    add(sched, clock, "e", priority=-1)                        # later, but more urgent
    assert [s.request_id for s in sched.waiting] == ["e", "c", "d"]
    assert admitted(sched) == ["a", "b", "e", "c", "d"]


def test_fcfs_ignores_priorities_and_keeps_the_order_of_arrival():
    sched, clock = make("fcfs", max_batch_size=2)
    add(sched, clock, "a", priority=5, max_tokens=3)
    add(sched, clock, "b", priority=5, max_tokens=30)
    run_step(sched)
    for rid, priority in (("c", 5), ("d", 5), ("e", -1)):
        add(sched, clock, rid, priority=priority)
    assert admitted(sched) == ["a", "b", "c", "d", "e"]


def test_equal_priorities_schedule_every_step_as_fcfs_does():
    def steps(policy):
        # 7 blocks of 4 tokens: preemption too (three sequences grow to 3 blocks each)
        sched, clock = make(policy, num_blocks=7, max_batch_size=3)
        for rid in "abcde":
            add(sched, clock, rid, priority=3, max_tokens=6)
        out = []
        while sched.has_unfinished():
            so = run_step(sched)
            out.append(([(it.seq.request_id, it.start, it.num_tokens) for it in so.items], so.preempted))
            assert len(out) < 200
        return out

    fcfs = steps("fcfs")
    assert any(preempted for _, preempted in fcfs)
    assert steps("priority") == fcfs


def test_out_of_blocks_the_lowest_priority_running_sequence_is_preempted():
    # 7 blocks of 4 tokens: three sequences of 5 prompt tokens fit, but each grows to 3 blocks
    def first_preempted(policy, priorities):
        sched, clock = make(policy, num_blocks=7)
        seqs = [add(sched, clock, rid, priority=p, max_tokens=6) for rid, p in zip("abc", priorities)]
        preempted = []
        while sched.has_unfinished():
            preempted += run_step(sched).preempted
            sched.blocks.check_invariants()
            assert sched.num_preemptions < 50
        assert all(s.output_ids == [7] * 6 for s in seqs)
        return preempted[0]

    assert first_preempted("fcfs", (0, 9, 1)) == "c"           # the most recently admitted
    assert first_preempted("priority", (0, 9, 1)) == "b"       # the highest value, admitted earlier
    assert first_preempted("priority", (9, 0, 1)) == "a"
    assert first_preempted("priority", (4, 4, 4)) == "c"       # of equals, the latest arrival


def test_requests_of_the_same_priority_arriving_at_the_same_instant_keep_their_order():
    # a clock too coarse to tell them apart: equal ranks, so the queue and the choice of victim
    # fall back on the order of arrival and of admission
    sched, clock = make(num_blocks=7)
    seqs = [Sequence(rid, list(range(1000 * i, 1000 * i + 5)), 5, SamplingParams(max_tokens=6), clock.t, 4)
            for i, rid in enumerate("abc", 1)]
    for seq in seqs:
        sched.add(seq)
    assert [s.request_id for s in sched.waiting] == ["a", "b", "c"]
    preempted = []
    while not preempted:
        preempted = list(run_step(sched).preempted)
    assert preempted == ["c"]                                  # of equals, the most recently admitted


def test_a_preempted_sequence_waits_in_its_rank_not_at_the_head():
    sched, clock = make(num_blocks=7, max_batch_size=3)
    seqs = {rid: add(sched, clock, rid, priority=p, max_tokens=6) for rid, p in zip("abc", (0, 9, 1))}
    while not any(s.num_preemptions for s in seqs.values()):
        run_step(sched)
    add(sched, clock, "d", priority=2)                         # waits before b (9), though later
    assert [s.request_id for s in sched.waiting] == ["d", "b"]


def test_running_sequences_take_the_steps_budget_in_priority_order():
    def chunks(policy):
        sched, clock = make(policy, max_tokens_per_step=12, prefill_chunk=8)
        add(sched, clock, "low", priority=5, n_prompt=40)
        run_step(sched)                                        # low: 8 of its 40 prompt tokens
        add(sched, clock, "high", priority=0, n_prompt=40)
        run_step(sched)                                        # low 8 more; high joins with the 4 left
        return [(it.seq.request_id, it.num_tokens) for it in run_step(sched).items]

    assert chunks("fcfs") == [("low", 8), ("high", 4)]
    assert chunks("priority") == [("high", 8), ("low", 4)]


def test_the_batch_window_opens_from_the_first_arrival_whatever_its_priority():
    sched, clock = make(batch_timeout_s=0.010)
    add(sched, clock, "a", priority=5)                         # arrives at 100.000
    add(sched, clock, "b", priority=0)                         # 100.001, first in the queue
    assert sched.schedule().empty
    assert sched.next_deadline() == pytest.approx(100.010)
    clock.t = 100.010
    assert [it.seq.request_id for it in sched.schedule().items] == ["b", "a"]


# ---------------------------------------------------------------- the engine

PROMPTS = ["the cat sat", "hello world, hello", "a", "the cat sat on the mat and looked around",
           "0123456789" * 4, "the cat sat on", "x y z", "zz top"]


def test_greedy_answers_are_the_same_whatever_the_priorities():
    def answers(policy, priorities):
        # a small pool and batch: requests wait, and sequences are preempted
        engine = toy_engine(num_blocks=24, max_batch_size=3, scheduling_policy=policy)
        for i, (prompt, p) in enumerate(zip(PROMPTS, priorities)):
            engine.add_request(str(i), prompt=prompt, params=SamplingParams(max_tokens=12, ignore_eos=True),
                               priority=p)
        finals, deltas = run_all(engine)
        return {k: (v.new_token_ids, deltas[k]) for k, v in finals.items()}, engine.stats()["preemptions"]

    fcfs, _ = answers("fcfs", [0] * len(PROMPTS))
    mixed, preemptions = answers("priority", [3, -2, 7, 0, 7, 1, -2, 5])
    assert preemptions and mixed == fcfs


def test_the_engine_refuses_a_priority_it_cannot_honour():
    fcfs = toy_engine()
    fcfs.add_request("zero", prompt="hi", priority=0)          # 0 changes nothing: taken
    with pytest.raises(InputError, match=r"'priority' = 3 needs priority scheduling, and this engine schedules "
                                         r"fcfs .*scheduling_policy = priority") as e:
        fcfs.add_request("a", prompt="hi", priority=3)
    assert e.value.param == "priority"
    by_priority = toy_engine(scheduling_policy="priority")
    for bad in ("high", True, 1.5, 1 << 63):
        with pytest.raises(InputError, match="'priority' must be an integer from") as e:
            by_priority.add_request("b", prompt="hi", priority=bad)
        assert e.value.param == "priority"
    by_priority.add_request("c", prompt="hi", priority=-(1 << 63))


def test_scheduling_policy_is_checked_by_its_stage_parameter():
    with pytest.raises(InputError, match="'scheduling_policy' must be one of fcfs, priority, not \"static\""):
        EngineConfig(scheduling_policy="static")


# ---------------------------------------------------------------- request lines and serve's fields

def test_a_request_line_carries_its_priority_checked():
    assert parse_request({"prompt": "hi", "priority": -4}).item()["priority"] == -4
    with pytest.raises(RequestError, match="'priority' must be an integer from"):
        parse_request({"prompt": "hi", "priority": "urgent"})


def test_a_priority_given_as_a_whole_float_is_that_integer_as_vllm_takes_it():
    # JSON clients often send 0.0; vLLM's pydantic int field takes a number with no fractional part
    item = parse_request({"prompt": "hi", "priority": 0.0}).item()
    assert item["priority"] == 0 and type(item["priority"]) is int
    assert parse_request({"prompt": "hi", "priority": -3.0}).item()["priority"] == -3
    for bad in (0.5, float(1 << 63), float("inf")):
        with pytest.raises(RequestError, match="'priority' must be an integer from") as e:
            parse_request({"prompt": "hi", "priority": bad})
        assert e.value.param == "priority"
    for parse, body in ((P.parse_chat, {"messages": [{"role": "user", "content": "hi"}]}),
                        (P.parse_completion, {"prompt": "hi"})):
        fields = parse({**body, "priority": 0.0}, max_model_len=64, served=("tiny",)).item("r")
        assert fields["priority"] == 0 and type(fields["priority"]) is int


@pytest.mark.parametrize("parse, body", [
    (P.parse_chat, {"messages": [{"role": "user", "content": "hi"}]}),
    (P.parse_completion, {"prompt": "hi"}),
])
def test_serve_takes_priority_as_a_field_of_the_request(parse, body):
    req = parse({**body, "priority": 2}, max_model_len=64, served=("tiny",))
    assert req.item("r")["priority"] == 2
    with pytest.raises(P.APIError, match="'priority' must be an integer from") as e:
        parse({**body, "priority": 0.5}, max_model_len=64, served=("tiny",))
    assert e.value.param == "priority" and e.value.status == 400


def test_a_null_priority_is_refused_as_vllm_refuses_it():
    """vLLM's priority is `int = 0`, not Optional: its pydantic model refuses null (a 400). agp took
    null as 0, in a request line and on every route; the description (/openapi.json) says not null."""
    from pipeline_dsl.serve.responses import parse_responses

    with pytest.raises(RequestError, match="^'priority' must be an integer from .*, not null$") as e:
        parse_request({"prompt": "hi", "priority": None})
    assert e.value.param == "priority"
    for parse, body in ((P.parse_chat, {"messages": [{"role": "user", "content": "hi"}]}),
                        (P.parse_completion, {"prompt": "hi"}), (parse_responses, {"input": "hi"})):
        with pytest.raises(P.APIError, match="^'priority' must be an integer from .*, not null$") as e:
            parse({**body, "priority": None}, max_model_len=64, served=("tiny",))
        assert e.value.param == "priority" and e.value.status == 400
    with pytest.raises(P.APIError, match="not null$"):              # the embeddings route's check
        P.priority_field({"input": "hi", "priority": None})
    assert P.priority_field({"input": "hi"}) == {}


PIPELINE = """pipeline tiny {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests {{}}
    stage batch   : dynamic_batch {{ max_batch_size = 2  timeout = 1ms {extra} }}
    stage encode  : encode {{}}
    stage kv      : kv_lookup {{ block_size = 8  budget = 1MiB }}
    stage gen     : generate {{ max_new_tokens = 6 }}
    stage out     : respond {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


def agp_run(tmp_path, model, extra, lines, text=PIPELINE):
    pipeline, inp, out = tmp_path / "p.agp", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    pipeline.write_text(text.format(model=model, extra=extra))
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = agp_in("run", pipeline, "-i", inp, "-o", out, "--overwrite", "--no-progress", "--threads", "1")
    return r, {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}


def test_agp_run_answers_lines_by_priority_with_the_same_greedy_text(tmp_path, tiny_gguf):
    lines = [{"id": i, "prompt": f"tell me about {w}", "priority": p}
             for i, (w, p) in enumerate(zip(["cats", "dogs", "tea", "rain", "maps", "jazz"], [4, 0, 9, -3, 1, 4]))]
    r, by_priority = agp_run(tmp_path, tiny_gguf, "scheduling_policy = priority", lines)
    assert r.returncode == 0, r.stderr
    r, fcfs = agp_run(tmp_path, tiny_gguf, "", [{k: v for k, v in line.items() if k != "priority"}
                                               for line in lines])
    assert r.returncode == 0, r.stderr
    assert {i: rec["text"] for i, rec in by_priority.items()} == {i: rec["text"] for i, rec in fcfs.items()}
    # where the batcher schedules fcfs, a line's non-zero priority is that line's error, named
    r, got = agp_run(tmp_path, tiny_gguf, "", [{"id": "a", "prompt": "hi", "priority": 2},
                                               {"id": "b", "prompt": "hi", "priority": 0}])
    assert r.returncode == 0, r.stderr
    err = got["a"]["error"]
    assert "'priority' = 2 needs priority scheduling" in err["message"] and err["stage"] == "batch"
    assert "text" in got["b"]


def test_a_python_stage_before_the_batcher_may_set_a_requests_priority(tmp_path, tiny_gguf):
    (tmp_path / "tiers.py").write_text('def tier(request):\n'
                                       '    request["priority"] = 0 if request["metadata"].get("tier") == "gold" '
                                       'else 10\n    return request\n')
    text = PIPELINE.replace("stage batch ", 'stage rank    : python {{ fn = "tiers:tier" }}\n    stage batch ') \
                   .replace("request -> batch", "request -> rank -> batch")
    lines = [{"id": "bulk", "prompt": "hi", "metadata": {"tier": "bulk"}},
             {"id": "gold", "prompt": "hi", "metadata": {"tier": "gold"}}]
    r, got = agp_run(tmp_path, tiny_gguf, "scheduling_policy = priority", lines, text)
    assert r.returncode == 0, r.stderr
    assert "text" in got["bulk"] and "text" in got["gold"]
    r, got = agp_run(tmp_path, tiny_gguf, "", lines, text)             # fcfs: the stage's 10 reaches the batcher
    assert "'priority' = 10 needs priority scheduling" in got["bulk"]["error"]["message"]
    assert "text" in got["gold"]


# ---------------------------------------------------------------- agp serve

@pytest.fixture(scope="module")
def servers(tiny_gguf):
    from test_serve import LiveServer

    fcfs = LiveServer(tiny_gguf, max_batch_size=2)
    by_priority = LiveServer(tiny_gguf, max_batch_size=2, overrides={"scheduling_policy": "priority"})
    yield fcfs, by_priority
    fcfs.close()
    by_priority.close()


USER = [{"role": "user", "content": "hello"}]


def test_serve_answers_prioritised_chat_completions_and_responses_alike(servers):
    fcfs, by_priority = servers
    chat = dict(model="tiny", messages=USER, max_tokens=6, temperature=0)
    want = fcfs.client.chat.completions.create(**chat).choices[0].message.content
    for p in (-5, 0, 7):
        got = by_priority.client.chat.completions.create(**chat, extra_body={"priority": p})
        assert got.choices[0].message.content == want
    text = fcfs.client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0).choices[0].text
    got = by_priority.client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0,
                                                extra_body={"priority": 3})
    assert got.choices[0].text == text
    body = {"model": "tiny", "input": "hello", "max_output_tokens": 6, "temperature": 0}
    plain = httpx.post(fcfs.url + "/v1/responses", json=body, timeout=60)
    r = httpx.post(by_priority.url + "/v1/responses", json={**body, "priority": 3}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"] == plain.json()["output"][0]["content"]


def test_serve_takes_priority_on_embeddings_as_vllm_does(servers):
    """vLLM's embeddings requests carry `priority` too: a batch job's embeddings wait behind chat."""
    fcfs, by_priority = servers
    body = {"model": "tiny", "input": ["hello", "the cat sat"]}
    plain = httpx.post(fcfs.url + "/v1/embeddings", json=body, timeout=60)
    assert plain.status_code == 200, plain.text
    for p in (-5, 0, 7):
        r = httpx.post(by_priority.url + "/v1/embeddings", json={**body, "priority": p}, timeout=60)
        assert r.status_code == 200, r.text
        for got, want in zip(r.json()["data"], plain.json()["data"], strict=True):
            assert got["embedding"] == pytest.approx(want["embedding"], abs=1e-5)
    r = httpx.post(fcfs.url + "/v1/embeddings", json={**body, "priority": 0}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(by_priority.url + "/v1/embeddings", json={**body, "priority": "high"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": USER}), ("/v1/chat/completions", {"messages": USER, "stream": True}),
    ("/v1/completions", {"prompt": "hello"}), ("/v1/completions", {"prompt": "hello", "stream": True}),
    ("/v1/responses", {"input": "hello"}), ("/v1/responses", {"input": "hello", "stream": True}),
    ("/v1/embeddings", {"input": "hello"}),                        # not streamed
])
def test_serve_refuses_a_non_zero_priority_when_it_schedules_fcfs(servers, path, body):
    fcfs, _ = servers
    r = httpx.post(fcfs.url + path, json={"model": "tiny", **body, "priority": 1}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "priority" and "'priority' = 1 needs priority scheduling" in error["message"]
    assert "--scheduling-policy priority" in error["message"]


def test_the_serve_flag_sets_the_scheduling_policy_over_the_pipelines(tmp_path, tiny_gguf):
    import argparse

    from pipeline_dsl.commands.serve import banner
    from pipeline_dsl.serve.build import build
    from pipeline_dsl.serve.options import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    path = tmp_path / "p.agp"
    path.write_text(PIPELINE.format(model=tiny_gguf, extra=""))
    assert p.parse_args([str(path)]).scheduling_policy is None            # the pipeline's, else fcfs
    with pytest.raises(SystemExit):
        p.parse_args([str(path), "--scheduling-policy", "static"])
    args = p.parse_args([str(path), "--threads", "1", "--scheduling-policy", "priority"])
    serving = build(args)
    assert serving.runtime.segments[0].config.scheduling_policy == "priority"
    assert "; priority scheduling" in banner(serving, "http://x/v1", args)[1]     # what the server runs with
    path.write_text(PIPELINE.format(model=tiny_gguf, extra="scheduling_policy = priority"))
    args = p.parse_args([str(path), "--threads", "1", "--scheduling-policy", "fcfs"])
    serving = build(args)
    assert serving.runtime.segments[0].config.scheduling_policy == "fcfs"
    assert "scheduling" not in banner(serving, "http://x/v1", args)[1]            # the default goes unsaid


# ---------------------------------------------------------------- agp check

@pytest.mark.parametrize("given, hint", [
    ("policy = priority", "'priority' is a value of scheduling_policy: write scheduling_policy = priority"),
    ("scheduling_policy = static", "'static' is a value of policy: write policy = static"),
])
def test_a_value_of_the_other_batching_parameter_is_named_with_where_it_goes(given, hint):
    import pipeline_dsl
    from test_dsl_checker import pipeline

    _, diags = pipeline_dsl.loads(pipeline(batch=given).removeprefix("\n"), "t.agp")
    (d,) = [d for d in diags if d.is_error]
    assert d.message.startswith(f"'{given.split()[-1]}' is not a valid value for") and d.hint == hint
    _, diags = pipeline_dsl.loads(pipeline(batch="policy = lifo").removeprefix("\n"), "t.agp")
    assert [d.hint for d in diags if d.is_error] == [None]              # a value of no parameter: no hint
