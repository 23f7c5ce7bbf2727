"""A slow, hung or failing python stage costs only its own requests: every exception
(BaseException too) fails its request alone; each stage has its own workers; `async def`
runs on the event loop; timeout, retries and a result cache work as documented; the engine
starts on the first request that reaches it."""
from __future__ import annotations

import threading
import time

import pytest

from pipeline_dsl.serve.errors import api_error

import flowkit
from flowkit import chain, chat, errors, run, write

HOOKS = '''
import asyncio, time
import flowkit
import pipeline_dsl

def raiser(item):
    what = item.get("metadata", {}).get("raise")
    if what == "SystemExit":
        raise SystemExit(3)
    if what == "KeyboardInterrupt":
        raise KeyboardInterrupt()
    if what == "CancelledError":
        raise asyncio.CancelledError()
    if what == "GeneratorExit":
        raise GeneratorExit()
    return item

async def araiser(item):
    await asyncio.sleep(0)
    return raiser(item)

def slow(item):
    with flowkit.running("slow"):
        flowkit.gate("slow").wait(30)
    return item

def fast(item):
    return item

def hang(item):
    flowkit.gate("hang").wait(60)
    return item

async def aslow(item):
    # waits (30 s at most) until `together` calls run at once, or the last of `calls` has come,
    # so the peak does not depend on how fast the requests reach the stage; then 0.2 s more
    meta = item["metadata"]
    with flowkit.running("aslow"):
        flowkit.bump("aslow calls")
        deadline = time.monotonic() + 30
        while (flowkit.RUNNING["aslow"] < meta["together"] and flowkit.COUNTS["aslow calls"] < meta["calls"]
               and time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
    item["metadata"] = {"async": True}
    return item

from flowkit import ahang

def flaky(item):
    n = flowkit.bump("flaky/" + item["id"])
    kind = item.get("metadata", {}).get("fail", "conn")
    if n <= item.get("metadata", {}).get("times", 2):
        if kind == "conn":
            raise ConnectionError("reset by peer")
        if kind == "value":
            raise ValueError("a bug, not a blip")
        if kind == "retry":
            raise pipeline_dsl.Retry("busy")
        if kind == "http":
            class HTTPError(Exception):
                status_code = 503
            raise HTTPError("service unavailable")
        if kind == "reject":
            raise pipeline_dsl.Reject("over the tenant's rate limit", status=429, retry_after=2)
    return item

def counted(item):
    flowkit.bump("counted")
    item["messages"][0]["content"] = item["messages"][0]["content"] + " (seen)"
    return "tagged"
'''


pytestmark = pytest.mark.usefixtures("fresh_flowkit")


def pipeline(tmp_path, model, stage: str, routes: str = "", extra: str = ""):
    body = (f"stage request : requests {{}}\n{stage}\nstage gen : generate {{ max_new_tokens = 3 }}\n"
            f"stage out : respond {{}}\n{extra}" + (routes or "request -> f -> batch\n") + chain() + "gen -> out\n")
    path = write(tmp_path, model, body, hooks=HOOKS)
    assert errors(path) == []
    return path


@pytest.mark.parametrize("fn", ["raiser", "araiser"])
@pytest.mark.parametrize("what", ["SystemExit", "KeyboardInterrupt", "CancelledError", "GeneratorExit"])
def test_a_stage_raising_a_base_exception_fails_only_its_request(tmp_path, soft_gguf, what, fn):
    """A plain function on its thread, or an async one on the event loop (which SystemExit
    and KeyboardInterrupt would stop): either way only its own request fails."""
    path = pipeline(tmp_path, soft_gguf, f'stage f : python {{ fn = "hooks:{fn}" }}')
    (bad, good, again), rt = run(path, [chat("bad", "hi", metadata={"raise": what}), chat("good", "hello"),
                                        chat("again", "hello", metadata={"raise": what})])
    for r in (bad, again):
        assert r.error.kind == "failed" and r.error.stage == "f"
        assert r.error.message.startswith(f"stage 'f' failed: {what}")
    assert good.ok and good.usage["completion_tokens"] == 4
    assert rt.stats()["stages"]["f"]["failed"] == 2


def test_a_slow_stage_costs_only_its_own_requests(tmp_path, soft_gguf):
    """Six requests held in one stage (more than the host pool's threads) do not delay a fast
    request on another path: it is answered while they still wait."""
    pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:slow" }\n'
                                  'stage g : python { fn = "hooks:fast" }\nstage r : route {}',
             routes="request -> r\nr -> f when metadata.slow == true\nr -> g otherwise\nf -> batch\ng -> batch\n")
    order = []

    def release():
        """Once all six slow calls are in (the fast one may be answered before the last of them
        has reached its stage on a busy machine), they go on."""
        deadline = time.monotonic() + 25          # within their own wait (30 s)
        while flowkit.RUNNING["slow"] < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        flowkit.gate("slow").set()

    def heard(i, result):
        order.append(result.id)
        if result.id == "fast":                   # only now do the slow ones go on
            threading.Thread(target=release, daemon=True).start()

    reqs = [chat(f"slow{i}", "hi", metadata={"slow": True}) for i in range(6)] + [chat("fast", "hello")]
    results, _ = run(tmp_path / "p.agp", reqs, on_result=heard)
    assert order[0] == "fast"
    assert all(r.ok for r in results)
    assert flowkit.PEAKS["slow"] == 6             # its own workers: all six at once


def test_a_stages_workers_bound_its_calls_at_once(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:aslow"  workers = 2 }')
    results, _ = run(path, [chat(f"r{i}", "hi", metadata={"together": 2, "calls": 5}) for i in range(5)])
    assert all(r.ok for r in results)
    assert flowkit.PEAKS["aslow"] == 2


def test_an_async_function_runs_on_the_event_loop(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:aslow" }')
    results, _ = run(path, [chat(f"r{i}", "hi", metadata={"together": 4, "calls": 4}) for i in range(4)])
    assert all(r.ok for r in results)
    assert all(r.choices[0].data["request"]["metadata"] == {"async": True} for r in results)
    assert flowkit.PEAKS["aslow"] == 4            # awaited together, not one after another


@pytest.mark.parametrize("fn, workers", [("hang", 2), ("ahang", 1)])
def test_a_call_past_its_timeout_fails_its_request_and_frees_its_slot(tmp_path, soft_gguf, fn, workers):
    """ahang, workers = 1: if a cancelled coroutine kept its slot, the second request would wait
    forever. A hung thread stays stuck, and one stage holds at most `workers` stuck calls
    (tests/test_flow_stuck.py), so hang runs its two at once."""
    path = pipeline(tmp_path, soft_gguf, f'stage f : python {{ fn = "hooks:{fn}"  workers = {workers}  timeout = 200ms }}',
                    routes="request -> r\nr -> f when metadata.hang == true\nr -> batch otherwise\nf -> batch\n",
                    extra="stage r : route {}\n")
    reqs = [chat("h1", "hi", metadata={"hang": True}), chat("h2", "hi", metadata={"hang": True}),
            chat("ok", "hello")]
    (h1, h2, ok), rt = run(path, reqs)
    for r in (h1, h2):
        assert r.error.kind == "timeout" and r.error.stage == "f"
        assert api_error(r.error, "chat").status == 504          # what agp serve answers for it
        assert r.error.message == "stage 'f' timed out: it took longer than its timeout (0.2s)"
    assert ok.ok
    assert not flowkit.gate("hang").is_set()      # the hung threads are still blocked, written off
    row = rt.stats()["stages"]["f"]
    assert row["timeouts"] == 2 and row["failed"] == 2
    if fn == "ahang":                             # a coroutine past its timeout is cancelled, on its stage's
        deadline = time.monotonic() + 60          # own loop: it may hear so after its request has failed
        while flowkit.COUNTS["cancelled"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flowkit.COUNTS["cancelled"] == 2


@pytest.mark.parametrize("fail, retries, ok, calls", [
    ("conn", 2, True, 3),        # ConnectionError is transient
    ("retry", 2, True, 3),       # so is pipeline_dsl.Retry
    ("http", 2, True, 3),        # and an HTTP 503
    ("conn", 1, False, 2),       # retries run out
    ("retry", 0, False, 1),      # none to run out: transient all the same
    ("value", 2, False, 1),      # a ValueError is a bug: never retried
])
def test_retries_try_transient_failures_again(tmp_path, soft_gguf, fail, retries, ok, calls):
    path = pipeline(tmp_path, soft_gguf, f'stage f : python {{ fn = "hooks:flaky"  retries = {retries}  '
                                         'backoff = 1ms }')
    (res,), rt = run(path, [chat("a", "hi", metadata={"fail": fail, "times": 2})])
    assert res.ok is ok
    assert flowkit.COUNTS["flaky/a"] == calls
    row = rt.stats()["stages"]["f"]
    assert row["retries"] == calls - 1 and row["calls"] == calls
    assert row["errors"] == (calls - 1 if ok else calls)          # every call that raised, retried or not
    if not ok:
        assert res.error.stage == "f" and "stage 'f' failed" in res.error.message
        # a failure after its retries says how many tries it had; one never retried says nothing of tries
        assert res.error.message.endswith(f"; {calls} tries") is (calls > 1), res.error.message
        # what agp serve answers: a transient failure is a 503 to try again later, a bug a 500
        answer = api_error(res.error, "chat")
        transient = fail != "value"
        assert (res.error.kind, answer.status, answer.code) == (
            ("unavailable", 503, "stage_unavailable") if transient else ("failed", 500, "stage_failed"))
        assert (answer.headers or {}).get("Retry-After") == ("1" if transient else None)
        assert answer.stage == "f"


@pytest.mark.parametrize("retries", [0, 2])
def test_a_reject_with_a_transient_status_is_the_functions_answer_never_retried(tmp_path, soft_gguf, retries):
    """docs/language.md, `retries`: a Reject fails at once. One that carries a 429 (a rate limit,
    examples/hooks.py rate_limit) has the `status` attribute that marks an HTTP error transient,
    and was tried `retries` times more: the function ran again, counting the request against the
    limit again, before the request failed with the Reject all the same."""
    path = pipeline(tmp_path, soft_gguf, f'stage f : python {{ fn = "hooks:flaky"  retries = {retries}  '
                                         'backoff = 1ms }')
    (res,), rt = run(path, [chat("a", "hi", metadata={"fail": "reject", "times": 5})])
    assert not res.ok and flowkit.COUNTS["flaky/a"] == 1
    assert (res.error.kind, res.error.message, res.error.retry_after) == ("rejected", "over the tenant's rate limit", 2)
    row = rt.stats()["stages"]["f"]
    assert row["retries"] == 0 and row["calls"] == 1


def test_the_cache_serves_the_same_content_once_whatever_the_request_id(tmp_path, soft_gguf):
    """A hit is what the call made: the item's dict, and its label, which routes it (b goes
    along `when tagged` as a did, not along `otherwise`)."""
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:counted"  cache = 8 }\n'
                                         'stage g : python { fn = "hooks:fast" }',
                    routes="request -> f\nf -> batch when tagged\nf -> g otherwise\ng -> batch\n")
    reqs = [chat("a", "same words"), chat("b", "same words"), chat("c", "other words")]
    (a, b, c), rt = run(path, reqs)
    assert flowkit.COUNTS["counted"] == 2          # a and c called it; b was served from the cache
    assert rt.stats()["stages"]["f"]["cache_hits"] == 1
    assert rt.stats()["stages"]["g"]["items_in"] == 0
    assert [r.id for r in (a, b, c)] == ["a", "b", "c"]
    assert b.choices[0].data["request"]["id"] == "b"                     # its own id, not a's
    assert b.choices[0].data["request"]["messages"][0]["content"] == "same words (seen)"
    assert a.usage["prompt_tokens"] == b.usage["prompt_tokens"]


def test_the_engine_starts_on_the_first_request_that_reaches_it(tmp_path, soft_gguf):
    """A request held before the model does not hold back the others: they are answered
    while it waits (the engine did not wait for every request of the run to arrive)."""
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:slow" }\nstage r : route {}',
                    routes="request -> r\nr -> f when metadata.slow == true\nr -> batch otherwise\nf -> batch\n")
    order = []

    def heard(i, result):
        order.append(result.id)
        if len(order) == 4:
            flowkit.gate("slow").set()

    reqs = [chat("slow", "hi", metadata={"slow": True})] + [chat(f"fast{i}", "hello") for i in range(4)]
    results, _ = run(path, reqs, on_result=heard)
    assert all(r.ok for r in results)
    assert order[-1] == "slow" and sorted(order[:4]) == [f"fast{i}" for i in range(4)]


def test_a_system_message_an_overriding_system_prompt_replaces_is_not_held_against_the_request(tmp_path, soft_gguf):
    """system_prompt override = true replaces a chat's own system message: one too long for the
    context by its characters does not refuse the request before it is admitted: the engine sees
    the short one, and answers it."""
    path = write(tmp_path, soft_gguf, "stage request : requests {}\n"
                 'stage sys : system_prompt { text = "be brief"  override = true }\n'
                 "stage gen : generate { max_new_tokens = 2 }\n"
                 "stage out : respond {}\nrequest -> sys -> batch\n" + chain() + "gen -> out\n")
    assert errors(path) == []
    rt = flowkit.runtime(path)
    long = "word " * (rt.segments[0].max_prompt_chars // 5 + 1)
    rt.shutdown()
    replaced = {"id": "s", "max_tokens": 2, "messages": [{"role": "system", "content": long},
                                                         {"role": "user", "content": "hi"}]}
    (res,), _ = run(path, [replaced])
    assert res.ok, res.error


def test_a_prompt_too_long_for_every_engine_is_refused_as_invalid_before_a_full_queue(tmp_path, soft_gguf):
    """A prompt whose characters alone are more than any tokenisation fits in the context (more
    than its tokens times the most characters a token stands for) is a bad request whether or not
    the queue has room: with the queue full it is refused as invalid (agp serve's 400,
    context_length_exceeded), not queue_full (a 429 that a client retries), without tokenising it;
    a prompt that fits is refused queue_full. Where a python stage lies before the engine (it may
    shorten the prompt) nothing is certain: the full queue answers first."""
    from pipeline_dsl.flow import PipelineError

    def refusal(rt, request) -> PipelineError:
        with pytest.raises(PipelineError) as e:
            rt.submit(request, flowkit.Heard())
        return e.value

    held_after = write(tmp_path, soft_gguf, "stage request : requests { max_queue = 1 }\n"
                       "stage gen : generate { max_new_tokens = 2 }\nstage f : python { fn = \"flowkit:hold\" }\n"
                       "stage out : respond {}\nrequest -> batch\n" + chain() + "gen -> f -> out\n")
    assert errors(held_after) == []
    rt = flowkit.runtime(held_after)
    rt.start()
    try:
        es = rt.segments[0]
        long = "word " * (es.max_prompt_chars // 5 + 1)                   # past the bound by characters alone
        first = flowkit.Heard()
        rt.submit(chat("a", "hi"), first)
        deadline = time.monotonic() + 60                                  # answered, then held: the queue is full
        while flowkit.COUNTS["hold"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert refusal(rt, chat("b", "hi")).kind == "queue_full"
        for request in (chat("c", long), {"id": "d", "prompt": long, "max_tokens": 2},
                        {"id": "e", "prompt_token_ids": [1] * (es.max_model_len + 1), "max_tokens": 2}):
            err = refusal(rt, request)
            assert (err.kind, err.code) == ("invalid", "context_length_exceeded"), err
            assert "exceeds the model's context" in err.message
        assert refusal(rt, chat("f", long, truncate_prompt_tokens=8)).kind == "queue_full"   # it may fit cut
        flowkit.gate("hold").set()
        assert first.done.wait(60) and first.result.ok
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()
    flowkit.gate("hold").clear()
    held_before = write(tmp_path, soft_gguf, "stage request : requests { max_queue = 1 }\n"
                        "stage f : python { fn = \"flowkit:hold\" }\nstage gen : generate { max_new_tokens = 2 }\n"
                        "stage out : respond {}\nrequest -> f -> batch\n" + chain() + "gen -> out\n")
    rt = flowkit.runtime(held_before)
    rt.start()
    try:
        rt.submit(chat("a", "hi"), flowkit.Heard())
        assert refusal(rt, chat("c", long)).kind == "queue_full"
    finally:
        flowkit.gate("hold").set()
        rt.close(drain=True, timeout=30)
        rt.shutdown()


def test_the_request_source_admits_max_queue_requests_and_refuses_the_next(tmp_path, soft_gguf):
    """requests.max_queue = 2: two requests held before the engine fill the queue; a third is
    refused at once (queue_full), and once they are answered a new one is admitted."""
    from pipeline_dsl.flow import PipelineError

    path = write(tmp_path, soft_gguf, "stage request : requests { max_queue = 2 }\n"
                 "stage f : python { fn = \"flowkit:hold\" }\nstage gen : generate { max_new_tokens = 3 }\n"
                 "stage out : respond {}\nrequest -> f -> batch\n" + chain() + "gen -> out\n")
    assert errors(path) == []
    rt = flowkit.runtime(path)
    rt.start()
    try:
        heard = {rid: flowkit.Heard() for rid in ("a", "b", "c", "d")}
        for rid in ("a", "b"):
            rt.submit(chat(rid, "hi"), heard[rid])
        with pytest.raises(PipelineError) as refused:
            rt.submit(chat("c", "hi"), heard["c"])
        assert refused.value.kind == "queue_full" and "requests.max_queue" in refused.value.message
        flowkit.gate("hold").set()
        assert heard["a"].done.wait(60) and heard["b"].done.wait(60)
        assert heard["a"].result.ok and heard["b"].result.ok
        rt.submit(chat("d", "hi"), heard["d"])
        assert heard["d"].done.wait(60) and heard["d"].result.ok
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()
