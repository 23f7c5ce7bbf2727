"""Stuck calls: Python cannot stop a thread, so a call that timed out or whose request ended
is written off and counted as stuck until its code returns; past its timeout it is hung: a
stage holds at most `workers` hung calls, fails its new calls at once meanwhile, and
recovers on its own. An `async def` that
blocks its event loop stalls only its own stage, and is named in a warning."""
from __future__ import annotations

import logging
import threading

import pytest

import flowkit
from flowkit import Heard, chain, chat, errors, run, runtime, write

HOOKS = '''
import asyncio, time
import flowkit

def hang(item):
    if item.get("metadata", {}).get("hang"):
        flowkit.bump("hung")
        flowkit.gate("hang").wait(60)
    return item

async def blocks(item):
    flowkit.gate("blocks").wait(20)       # a blocking call inside an async def
    return item

from flowkit import ahang
'''


pytestmark = pytest.mark.usefixtures("fresh_flowkit")


def pipeline(tmp_path, model, stages: str, routes: str = "request -> f -> batch\n"):
    body = (f"stage request : requests {{}}\n{stages}\nstage gen : generate {{ max_new_tokens = 3 }}\n"
            f"stage out : respond {{}}\n" + routes + chain() + "gen -> out\n")
    path = write(tmp_path, model, body, hooks=HOOKS)
    assert errors(path) == []
    return path


def stage_threads() -> int:
    return sum(t.name == "agp-stage-f" for t in threading.enumerate())


def test_a_stage_full_of_stuck_calls_fails_new_ones_at_once_and_recovers(tmp_path, soft_gguf):
    """workers = 1: the first hung call times out and stays stuck; the next call fails at once
    with the stage named and the count; once the stuck call returns the stage serves again."""
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:hang"  workers = 1  timeout = 100ms }')
    hung = chat("h1", "hi", metadata={"hang": True})
    rt = runtime(path)
    try:
        (h1,) = rt.run_all([dict(hung)], keep_open=True)
        assert h1.error.kind == "timeout" and h1.error.stage == "f"
        assert rt.stats()["stages"]["f"]["stuck"] == 1
        (h2, ok) = rt.run_all([dict(hung, id="h2"), chat("ok", "hello")], keep_open=True)
        for r in (h2, ok):                       # refused without a call
            assert (r.error.kind, r.error.code, r.error.stage) == ("unavailable", "stage_unavailable", "f")
            assert r.error.message.startswith("stage 'f' is unavailable: 1 of its calls is still stuck")
        assert flowkit.COUNTS["hung"] == 1
        flowkit.gate("hang").set()               # the stuck call returns: the stage recovers
        wait_for(lambda: rt.stats()["stages"]["f"]["stuck"] == 0)
        (again,) = rt.run_all([chat("again", "hello")], keep_open=True)
        assert again.ok
        assert rt.stats()["stages"]["f"]["stuck"] == 0
    finally:
        rt.close(drain=False)
        rt.shutdown()


def test_a_hook_that_always_hangs_keeps_its_threads_bounded(tmp_path, soft_gguf):
    """Twelve hung calls through a stage of two workers: once two are stuck the rest fail at
    once instead of each leaving a new thread behind; the stage never has more than four
    threads (two serving, and the stuck ones: those that ran when the cap was reached)."""
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:hang"  workers = 2  timeout = 100ms }')
    before = stage_threads()
    results, rt = run(path, [chat(f"h{i}", "hi", metadata={"hang": True}) for i in range(12)])
    kinds = sorted(r.error.kind for r in results)
    assert kinds.count("timeout") <= 3 and kinds.count("unavailable") >= 9
    refused = {r.error.message.split(" (")[0] for r in results if r.error.kind == "unavailable"}
    assert refused <= {f"stage 'f' is unavailable: {n} of its calls are still stuck" for n in (2, 3)}
    assert flowkit.COUNTS["hung"] <= 3
    assert stage_threads() - before <= 4
    assert rt.stats()["stages"]["f"]["stuck"] == flowkit.COUNTS["hung"]


def wait_for(cond) -> None:
    for _ in range(400):
        if cond():
            return
        threading.Event().wait(0.05)


def abandon_hung(rt, rid: str) -> None:
    """Submit a request whose call hangs, wait until the call runs, then abort the request."""
    h = Heard()
    before = flowkit.COUNTS["hung"]
    key = rt.submit(chat(rid, "hi", metadata={"hang": True}), h)
    wait_for(lambda: flowkit.COUNTS["hung"] > before)
    rt.abort(key)
    assert h.done.wait(30) and h.result.error.kind == "aborted"


def test_an_aborted_requests_hung_call_gives_its_worker_back(tmp_path, soft_gguf):
    """No timeout, workers = 1: the call of a request its client abandoned is written off when
    the request ends, so the next request gets a thread of its own and is served while that
    call still runs (a slow call whose client left is no fault of the stage: nothing is
    refused). Past 2 x workers threads the next request waits, and is served once one returns."""
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:hang"  workers = 1 }')
    rt = runtime(path)
    rt.start()
    try:
        abandon_hung(rt, "h1")
        assert rt.stats()["stages"]["f"]["stuck"] == 1
        nxt = Heard()
        rt.submit(chat("next", "hello"), nxt)
        assert nxt.done.wait(60), "the next request waited behind the abandoned call"
        assert nxt.result.ok
        abandon_hung(rt, "h2")                   # two threads held: the stage's budget
        assert rt.stats()["stages"]["f"]["stuck"] == 2
        last = Heard()
        rt.submit(chat("last", "hello"), last)
        assert not last.done.wait(0.5)           # waits for a thread, is not refused
        flowkit.gate("hang").set()
        assert last.done.wait(60) and last.result.ok
        wait_for(lambda: rt.stats()["stages"]["f"]["stuck"] == 0)
        assert rt.stats()["stages"]["f"]["stuck"] == 0
    finally:
        rt.close(drain=False)
        rt.shutdown()


def test_an_aborted_requests_call_is_hung_once_it_runs_past_the_timeout(tmp_path, soft_gguf):
    """timeout = 2s, workers = 1: a call written off when its request ended does not fill the
    stage's cap (the next request is served); once it has run past the timeout it is hung, and
    the stage refuses new calls until it returns."""
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:hang"  workers = 1  timeout = 2s }')
    rt = runtime(path)
    rt.start()
    try:
        abandon_hung(rt, "h1")
        nxt = Heard()
        rt.submit(chat("next", "hello"), nxt)
        assert nxt.done.wait(60) and nxt.result.ok
        threading.Event().wait(2.5)              # the written-off call is now past its timeout
        late = Heard()
        rt.submit(chat("late", "hello"), late)
        assert late.done.wait(30)
        assert late.result.error.kind == "unavailable" and late.result.error.stage == "f"
        flowkit.gate("hang").set()
        wait_for(lambda: rt.stats()["stages"]["f"]["stuck"] == 0)
        again = Heard()
        rt.submit(chat("again", "hello"), again)
        assert again.done.wait(60) and again.result.ok
    finally:
        rt.close(drain=False)
        rt.shutdown()


def test_an_aborted_requests_coroutine_is_cancelled(tmp_path, soft_gguf):
    """No timeout: an `async def` call of a request its client abandoned is cancelled, and
    does not count as stuck once the cancellation ended it."""
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:ahang"  workers = 1 }')
    rt = runtime(path)
    rt.start()
    try:
        h = Heard()
        key = rt.submit(chat("h", "hi"), h)
        wait_for(lambda: flowkit.COUNTS["ahung"])
        rt.abort(key)
        assert h.done.wait(30) and h.result.error.kind == "aborted"
        wait_for(lambda: flowkit.COUNTS["cancelled"])
        assert flowkit.COUNTS["cancelled"] == 1 and rt.stats()["stages"]["f"]["stuck"] == 0
    finally:
        rt.close(drain=False)
        rt.shutdown()


def test_an_async_hook_that_blocks_its_loop_stalls_only_its_own_stage(tmp_path, soft_gguf):
    """`blocks` waits on a threading gate inside an async def, blocking its stage's event loop;
    `g`'s hung coroutine still times out meanwhile (each async stage has a loop of its own), and
    the stall is logged with the stage's name (which, once g has timed out, lets `blocks` go on)."""
    path = pipeline(tmp_path, soft_gguf,
                    'stage f : python { fn = "hooks:blocks" }\nstage g : python { fn = "hooks:ahang"  timeout = 200ms }\n'
                    "stage r : route {}",
                    routes="request -> r\nr -> f when metadata.block == true\nr -> g otherwise\nf -> batch\ng -> batch\n")
    order, warned = [], []

    def release():                                # f goes on once its stall is logged and g has
        if warned and "g" in order:               # timed out, however late g reached its stage
            flowkit.gate("blocks").set()

    class Stall(logging.Handler):
        def emit(self, record):
            if "stage 'f'" in record.getMessage() and "blocked its event loop" in record.getMessage():
                warned.append(record)
                release()

    def heard(i, r):
        order.append(r.id)
        release()

    handler = Stall(logging.WARNING)
    logging.getLogger("agp.flow").addHandler(handler)
    try:
        (f, g), rt = run(path, [chat("f", "hi", metadata={"block": True}), chat("g", "hi")], on_result=heard)
    finally:
        logging.getLogger("agp.flow").removeHandler(handler)
    assert order == ["g", "f"]                    # g timed out while f still blocked its own loop
    assert g.error.kind == "timeout" and f.ok
    assert warned and rt.stats()["stages"]["f"]["stalls"] >= 1


def test_the_run_summary_shows_a_stages_stuck_calls():
    from pipeline_dsl.commands.runner import format_summary

    row = {"items_in": 3, "items_out": 0, "rejected": 0, "failed": 3, "dropped": 0, "queued": 0,
           "busy_s": 0.1, "latency_p50_s": None, "stuck": 2, "stalls": 0}
    s = {"requests": 3, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0,
         "output_tokens_per_s": None, "generation_s": 0, "ttft_p50_ms": None, "ttft_p99_ms": None,
         "tpot_p50_ms": None, "tpot_p99_ms": None, "mean_batch_size": None, "kv_hit_rate": None,
         "stages": {"f": row, "g": dict(row, stuck=0)}}
    lines = format_summary(s).splitlines()
    assert next(x for x in lines if x.strip().startswith("f ")).endswith("stuck 2")
    assert "stuck" not in next(x for x in lines if x.strip().startswith("g "))
