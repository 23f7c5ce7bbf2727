"""A request that ends while its items still wait costs nothing more: a call of user code that
had not started when its request was aborted (a client gone, a deadline) never runs, a retry
waiting for its backoff is not tried again, and the stage's worker goes to the requests that
still wait."""
from __future__ import annotations

import time

import pytest

import flowkit
from flowkit import Heard, chain, chat, errors, runtime, write

HOOKS = '''
import asyncio
import flowkit
import pipeline_dsl

def held(item):
    flowkit.bump("call/" + item["id"])
    if item["id"] == "first":
        flowkit.gate("first").wait(30)
    return item

async def aheld(item):
    flowkit.bump("call/" + item["id"])
    while item["id"] == "first" and not flowkit.gate("first").is_set():
        await asyncio.sleep(0.01)
    return item

def flaky(item):
    flowkit.bump("call/" + item["id"])
    raise ConnectionError("reset by peer")

def pick(results):
    rid = results[0]["request"]["id"]
    flowkit.bump("merge/" + rid)
    if rid.startswith("first"):
        flowkit.gate("first").wait(30)
    return 0
'''


pytestmark = pytest.mark.usefixtures("fresh_flowkit")


def pipeline(tmp_path, model, stage: str, edges: str = "request -> f -> batch\ngen -> out\n", extra: str = ""):
    body = (f"stage request : requests {{}}\n{stage}\nstage gen : generate {{ max_new_tokens = 3 }}\n"
            f"stage out : respond {{}}\n{extra}" + edges + chain())
    path = write(tmp_path, model, body, hooks=HOOKS)
    assert errors(path) == []
    return path


def until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def serve(rt, ids):
    heard = {}
    for rid in ids:
        heard[rid] = Heard()
        heard[rid].key = rt.submit(chat(rid, "hi"), heard[rid])
    return heard


@pytest.mark.parametrize("fn", ["held", "aheld"])
def test_an_aborted_request_waiting_for_a_worker_is_never_called(tmp_path, soft_gguf, fn):
    """workers = 1 and the first call held: 'gone' waits behind it and its client goes away;
    once the worker is free it serves 'next', and `gone`'s function never runs."""
    path = pipeline(tmp_path, soft_gguf, f'stage f : python {{ fn = "hooks:{fn}"  workers = 1 }}')
    rt = runtime(path)
    rt.start()
    try:
        heard = serve(rt, ["first"])
        until(lambda: flowkit.COUNTS["call/first"] == 1)
        heard.update(serve(rt, ["gone", "next"]))
        until(lambda: rt.stats()["stages"]["f"]["items_in"] == 3)
        rt.abort(heard["gone"].key)
        assert heard["gone"].done.wait(30) and heard["gone"].result.error.kind == "aborted"
        flowkit.gate("first").set()
        assert heard["first"].done.wait(60) and heard["next"].done.wait(60)
        assert heard["first"].result.ok and heard["next"].result.ok
        assert flowkit.COUNTS["call/gone"] == 0
        row = rt.stats()["stages"]["f"]
        assert row["calls"] == 2 and row["dropped"] == 1
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()


def test_an_aborted_request_is_not_retried(tmp_path, soft_gguf):
    """A transient failure waits its backoff; the request is aborted meanwhile: no next try."""
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:flaky"  retries = 3  backoff = 300ms }')
    rt = runtime(path)
    rt.start()
    try:
        heard = serve(rt, ["gone"])
        until(lambda: flowkit.COUNTS["call/gone"] == 1)
        rt.abort(heard["gone"].key)
        assert heard["gone"].done.wait(30)
        time.sleep(1.5)                            # past every backoff the retries would have waited
        assert flowkit.COUNTS["call/gone"] == 1
        assert rt.stats()["stages"]["f"]["calls"] == 1
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()


def test_a_join_fn_of_an_aborted_request_is_never_called(tmp_path, soft_gguf):
    """A join's fn has 16 workers, all held by merges of earlier requests; the next request's
    merge waits for one and the request is aborted meanwhile: its merge never runs."""
    path = pipeline(tmp_path, soft_gguf,
                    'stage g : generate { max_new_tokens = 2 }\n'
                    'stage j : join { policy = fn  fn = "hooks:pick" }',
                    edges="request -> batch\nkv -> g\ngen -> j\ng -> j\nj -> out\n")
    rt = runtime(path)
    rt.start()
    try:
        held = [f"first{i}" for i in range(16)]
        heard = serve(rt, held)
        until(lambda: sum(flowkit.COUNTS[f"merge/{rid}"] for rid in held) == 16)
        heard.update(serve(rt, ["gone"]))
        until(lambda: rt.stats()["stages"]["j"]["items_in"] == 34)
        rt.abort(heard["gone"].key)
        assert heard["gone"].done.wait(30) and heard["gone"].result.error.kind == "aborted"
        flowkit.gate("first").set()
        assert all(heard[rid].done.wait(60) and heard[rid].result.ok for rid in held)
        assert flowkit.COUNTS["merge/gone"] == 0
        assert rt.stats()["stages"]["j"]["calls"] == 16
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()
