"""Races between the threads of the runtime, each forced with events: whatever thread ends a
request (its client's abort) and whatever thread is telling its listener a delta or handing its
sequences to the engine, the listener hears its result last and nothing after it, the engine
never runs a sequence of a request that already ended, and the usage n streams hear never
goes down whichever of their threads tells first."""
from __future__ import annotations

import threading
import time

import pytest

import flowkit
from flowkit import chain, chat, errors, write
from pipeline_dsl.flow import PipelineRuntime, load_graph

HOOKS = '''
import threading
import flowkit

def marked(item, chunks):
    # each chunk is yielded from a thread the test's clock knows: it holds the first chunk's
    # delta on its way to the client
    flowkit.bump(f"marked/{threading.get_ident()}")
    for text in chunks:
        yield text
    flowkit.gate("filter ended").set()
'''

pytestmark = pytest.mark.usefixtures("fresh_flowkit")


class Told:
    """A listener that records what it heard, in order."""

    def __init__(self):
        self.heard: list[str] = []
        self.done = threading.Event()

    def on_delta(self, key, index, out):
        self.heard.append("delta")

    def on_done(self, result):
        self.heard.append("done:" + (result.error.kind if result.error else "ok"))
        self.done.set()


def held_clock():
    """time.monotonic, except on the stream stage's thread the first time it asks after its
    function started: it says "in the window" and waits for gate "go" (the delta it is about to
    tell the client is then held between the runtime's checks and the listener)."""
    window, go = flowkit.gate("in the window"), flowkit.gate("go")
    if flowkit.COUNTS[f"marked/{threading.get_ident()}"] and not window.is_set():
        window.set()
        go.wait(60)
    return time.monotonic()


def test_a_delta_on_its_way_when_the_request_is_aborted_is_not_heard_after_the_result(tmp_path, tiny_gguf):
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 8 }\n"
            "stage f : python { fn = \"hooks:marked\"  stream = true }\nstage out : respond {}\n"
            "request -> batch\ngen -> f -> out\n" + chain())
    path = write(tmp_path, tiny_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    rt = PipelineRuntime(load_graph(path), overrides={"threads": 1}, clock=held_clock)
    rt.start()
    try:
        told = Told()
        key = rt.submit(chat("a", "hello", max_tokens=8), told, stream=True)
        assert flowkit.gate("in the window").wait(60)   # the first chunk is on its way to the client
        rt.abort(key)                                   # the client goes away meanwhile
        assert told.done.wait(60)
        flowkit.gate("go").set()
        assert flowkit.gate("filter ended").wait(60)    # the held chunk went wherever it goes
        assert told.heard == ["done:aborted"]
    finally:
        flowkit.open_gates()
        rt.close(drain=True, timeout=30)
        rt.shutdown()


def test_a_request_aborted_while_its_sequence_is_handed_to_the_engine_never_runs(tmp_path, tiny_gguf):
    """The request is aborted after its sequence was made and before the engine was handed it:
    the engine never runs it (it used to generate all its tokens for no one)."""
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 40 }\nstage out : respond {}\n"
            "request -> batch\ngen -> out\n" + chain())
    path = write(tmp_path, tiny_gguf, body)
    assert errors(path) == []
    rt = PipelineRuntime(load_graph(path), overrides={"threads": 1})
    es = rt.segments[0]
    handed, go = flowkit.gate("handing over"), flowkit.gate("go")
    submit = es.submit

    def held_submit(*args, **kwargs):
        handed.set()
        go.wait(60)
        submit(*args, **kwargs)
        flowkit.gate("handed over").set()

    es.submit = held_submit
    rt.start()
    try:
        told = Told()
        key = rt.submit(chat("a", "hello", max_tokens=40, ignore_eos=True), told)
        assert handed.wait(60)
        rt.abort(key)
        assert told.done.wait(60) and told.heard == ["done:aborted"]
        go.set()
        assert flowkit.gate("handed over").wait(60)
    finally:
        flowkit.open_gates()
        rt.close(drain=True, timeout=30)
        es.join()
        rt.shutdown()
    assert es.stats()["generated_tokens"] == 0


UPPER = '''
def upper(item, chunks):
    for text in chunks:
        yield text.upper()
'''


def test_the_usage_n_streams_hear_never_goes_down_whichever_thread_tells_first(tmp_path, tiny_gguf):
    """n = 2 through a stream stage: each copy's chunks reach the client from a thread of its
    own. Copy 0's first delta has its usage counted and is held on its way (a tracer pauses that
    thread as it enters items.heard); copy 1's delta, counted later and so counting more, is heard
    meanwhile. Copy 0's delta then comes with no less usage than copy 1's did."""
    from pipeline_dsl.flow import items

    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 6 }\n"
            "stage f : python { fn = \"hooks:upper\"  stream = true }\nstage out : respond {}\n"
            "request -> batch\ngen -> f -> out\n" + chain())
    path = write(tmp_path, tiny_gguf, body, hooks=UPPER)
    assert errors(path) == []
    held, other = flowkit.gate("copy 0 held"), flowkit.gate("copy 1 heard")

    def tracer(frame, event, arg):
        # copy 0's first delta, on its way to the listener: wait until copy 1's was heard
        if event == "call" and frame.f_code is items.heard.__code__ and frame.f_locals["index"] == 0 \
                and not held.is_set():
            held.set()
            other.wait(60)
        return None

    class Heard(Told):
        def __init__(self):
            super().__init__()
            self.usages = []

        def on_delta(self, key, index, out):
            self.usages.append(dict(out.usage))
            if index == 1 and held.is_set():
                other.set()

    rt = PipelineRuntime(load_graph(path), overrides={"threads": 1})
    before = threading.gettrace()
    threading.settrace(tracer)                   # the threads started from here on: the stage's
    try:
        rt.start()
        told = Heard()
        rt.submit(chat("a", "hello", max_tokens=6, ignore_eos=True, n=2, temperature=1.0, seed=1), told, stream=True)
        assert told.done.wait(120)
    finally:
        threading.settrace(before)
        flowkit.open_gates()
        rt.close(drain=True, timeout=30)
        rt.shutdown()
    assert told.heard[-1] == "done:ok" and held.is_set() and other.is_set()
    for before, after in zip(told.usages, told.usages[1:]):
        assert all(after[k] >= before[k] for k in before), told.usages


class HeldDone(Told):
    """Told, whose on_done says it started and waits for gate "hand over" before it records."""

    def on_done(self, result):
        flowkit.gate("handing over").set()
        flowkit.gate("hand over").wait(60)
        super().on_done(result)


def _ending_with_a_held_hand_over(tmp_path, tiny_gguf) -> PipelineRuntime:
    """A started runtime of a short answer (4 tokens), for a HeldDone listener."""
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 4 }\nstage out : respond {}\n"
            "request -> batch\ngen -> out\n" + chain())
    path = write(tmp_path, tiny_gguf, body)
    assert errors(path) == []
    rt = PipelineRuntime(load_graph(path), overrides={"threads": 1})
    rt.start()
    return rt


def test_close_returns_once_every_ended_requests_result_is_handed_over(tmp_path, tiny_gguf):
    """A request ends and its result is on its way to the listener (on the host pool) when the
    server closes: close() waits for it, so shutdown() — which drops the pool's queued work — never
    loses an answer whose request is no longer in flight (close used to return at once)."""
    rt = _ending_with_a_held_hand_over(tmp_path, tiny_gguf)
    closed = threading.Event()
    try:
        told = HeldDone()
        rt.submit(chat("a", "hello", max_tokens=4), told)
        assert flowkit.gate("handing over").wait(60)      # ended: its result is being handed over
        closing = threading.Thread(target=lambda: (rt.close(drain=True, timeout=30), closed.set()))
        closing.start()
        closing.join(0.5)
        assert not closed.is_set()                        # still handing over: close waits
        flowkit.gate("hand over").set()
        closing.join(60)
        assert closed.is_set() and told.heard[-1] == "done:ok"
    finally:
        flowkit.open_gates()
        rt.close(drain=True, timeout=30)
        rt.shutdown()


def test_close_says_every_request_finished_while_a_result_is_still_being_handed_over(tmp_path, tiny_gguf):
    """close(drain=True, timeout) returns whether every request finished: a request that ended and
    whose listener is still taking its result (a slow on_done) is finished, not cut — close says
    True and cuts none, whatever the timeout left for the hand-over."""
    rt = _ending_with_a_held_hand_over(tmp_path, tiny_gguf)
    said = []
    try:
        told = HeldDone()
        rt.submit(chat("a", "hello", max_tokens=4), told)
        assert flowkit.gate("handing over").wait(60)      # ended: its result is being handed over
        closing = threading.Thread(target=lambda: said.append(rt.close(drain=True, timeout=0.1)))
        closing.start()
        closing.join(1.0)                                 # its drain timeout passes meanwhile
        flowkit.gate("hand over").set()
        closing.join(60)
        assert said == [True] and rt.cut == 0 and told.heard[-1] == "done:ok"
    finally:
        flowkit.open_gates()
        rt.close(drain=True, timeout=30)
        rt.shutdown()


def test_a_conversation_after_the_render_pool_closed_is_answered(tmp_path, tiny_gguf):
    """A conversation enters its batcher on the render pool; once that pool is shut down (a late
    request at a close) it enters on the caller's thread and is answered."""
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 4 }\nstage out : respond {}\n"
            "request -> batch\ngen -> out\n" + chain())
    rt = PipelineRuntime(load_graph(write(tmp_path, tiny_gguf, body)), overrides={"threads": 1})
    rt.start()
    try:
        rt.render_pool.shutdown(wait=True)
        told = Told()
        rt.submit(chat("c", "hello"), told)
        assert told.done.wait(60)
        assert told.heard[-1] == "done:ok", told.heard
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()


def test_a_request_needing_a_compile_after_the_compile_pool_closed_is_answered(tmp_path, tiny_gguf):
    """A request whose grammar is not compiled yet enters its batcher on the compile pool; once
    that pool is shut down (a late request at a close) it enters on the caller's thread and is
    answered, where it used to ask the closed pool again and again (a RecursionError)."""
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 4 }\nstage out : respond {}\n"
            "request -> batch\ngen -> out\n" + chain())
    path = write(tmp_path, tiny_gguf, body)
    rt = PipelineRuntime(load_graph(path), overrides={"threads": 1})
    rt.start()
    try:
        rt.compile_pool.shutdown(wait=True)
        told = Told()
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        rt.submit(chat("c", "hello", response_format={"type": "json_schema",
                                                       "json_schema": {"name": "n", "schema": schema}}), told)
        assert told.done.wait(60)
        assert told.heard[-1] == "done:ok", told.heard
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()
