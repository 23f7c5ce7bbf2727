"""Pausing a request's generation (FlowRuntime.pause, what agp serve does for a client that does
not keep up): its sequences leave the batch and go on when it is let go, and the answer is the one
it would have had unpaused. A pause and a let-go that cross on two threads (the server's loop lets
a request go on while a stage thread hands its sequences to the engine paused) end as the last one
asked: a sequence is never left parked under a request that is no longer paused."""
from __future__ import annotations

import threading
import time

import pytest

import flowkit
from flowkit import chain, errors, runtime, write
from pipeline_dsl.flow import PipelineError

HOOKS = '''
import flowkit

def held(item):
    flowkit.gate("go").wait(60)
    return item


def guard(item, chunks):
    for text in chunks:
        yield text


async def aguard(item, chunks):
    async for text in chunks:
        yield text
'''

pytestmark = pytest.mark.usefixtures("fresh_flowkit")


def pipeline(tmp_path, model, before: str = "", requests: str = "", after: str = ""):
    """request -> generate -> respond; `before`: a python stage f holding each request at the gate
    "go" before the batcher; `after`: the settings of a python stage g between generate and respond."""
    stages = (f"stage request : requests {{{requests}}}\nstage gen : generate {{ max_new_tokens = 24 }}\n"
              "stage out : respond {}\n")
    if before:
        stages += 'stage f : python { fn = "hooks:held" }\nrequest -> f -> batch\n'
    else:
        stages += "request -> batch\n"
    stages += f"stage g : python {{ {after} }}\ngen -> g -> out\n" if after else "gen -> out\n"
    path = write(tmp_path, model, stages + chain(), hooks=HOOKS)
    assert errors(path) == []
    return path


class Listener:
    def __init__(self, on_first=None):
        self.result, self.done, self.first = None, threading.Event(), threading.Event()
        self.on_first = on_first

    def on_delta(self, key, index, out, *rest):
        if not self.first.is_set():
            self.first.set()
            if self.on_first is not None:
                self.on_first(key)

    def on_done(self, result):
        self.result = result
        self.done.set()


def let_go_in_between(rt, key_of):
    """Each segment's park: before a park(True) lands, the request is let go (pause(key, False))
    as another thread would between the pause being read and the engine hearing it."""
    for es in rt.segments:
        real = es.park
        once = []

        def park(seq_id, parked=True, real=real, once=once):
            if parked and not once:
                once.append(seq_id)
                rt.pause(key_of(), False)
            real(seq_id, parked)
        es.park = park


def request(rid: str, **kw) -> dict:
    return {"id": rid, "prompt": "hello there", "max_tokens": 24, "ignore_eos": True, "temperature": 1.0,
            "seed": 11, "n": 2, **kw}


def paused_stream(rt, rid: str) -> tuple:
    """A stream of `rid` submitted to `rt` that its reader pauses at its first token, once paused:
    (its key, its Listener)."""
    first = threading.Event()
    heard = Listener(on_first=lambda key: (rt.pause(key, True), first.set()))
    key = rt.submit(request(rid, n=1), heard, stream=True)
    assert first.wait(30)
    return key, heard


def test_a_request_let_go_while_its_sequences_reach_the_engine_paused_is_answered(tmp_path, soft_gguf):
    """Paused while a python stage holds it, then let go just as its sequences are handed to the
    engine paused: they go on, and the request is answered (before: parked for good, no answer)."""
    rt = runtime(pipeline(tmp_path, soft_gguf, before="f"))
    rt.start()
    keys = []
    let_go_in_between(rt, lambda: keys[0])
    try:
        heard = Listener()
        keys.append(rt.submit(request("a"), heard, stream=True))
        rt.pause(keys[0], True)                    # its reader is behind before it reaches the engine
        flowkit.gate("go").set()
        assert heard.done.wait(30), "the request was never answered: its sequences stayed parked"
        assert heard.result.error is None and len(heard.result.choices) == 2
    finally:
        flowkit.gate("go").set()
        rt.close(drain=False)
        rt.shutdown()


def test_a_pause_crossed_by_a_let_go_ends_let_go(tmp_path, soft_gguf):
    """pause(True) and pause(False) on two threads, the let-go's park reaching the engine before the
    pause's: the request goes on and is answered."""
    rt = runtime(pipeline(tmp_path, soft_gguf))
    rt.start()
    keys = []
    let_go_in_between(rt, lambda: keys[0])
    try:
        heard = Listener(on_first=lambda key: rt.pause(key, True))
        keys.append(rt.submit(request("b"), heard, stream=True))
        assert heard.done.wait(30), "the request was never answered: its sequences stayed parked"
        assert heard.result.error is None and len(heard.result.choices) == 2
    finally:
        rt.close(drain=False)
        rt.shutdown()


def test_a_seeded_request_paused_and_let_go_answers_as_unpaused_and_counts_its_tokens_once(tmp_path, soft_gguf):
    """Paused after each of its first chunks and let go from another thread: the same choices as an
    unpaused run of the same seeded request (its sequences recompute what they had, they do not
    sample it again), and the same usage and engine counts of prompt and generated tokens."""
    path = pipeline(tmp_path, soft_gguf)

    def answer(pausing: bool):
        rt = runtime(path)
        rt.start()
        try:
            heard = Listener()
            pauses = []

            def on_delta(key, index, out, *rest):
                if pausing and len(pauses) < 6:
                    pauses.append(index)
                    rt.pause(key, True)
                    threading.Timer(0.005, rt.pause, (key, False)).start()
            heard.on_delta = on_delta
            rt.submit(request("c"), heard, stream=True)
            assert heard.done.wait(60)
            rt.close()
            counts = {k: sum(e.get(k, 0) for e in rt.stats()["engines"].values())
                      for k in ("prompt_tokens", "generated_tokens", "prefill_tokens")}
            return heard.result, counts
        finally:
            rt.close(drain=False)
            rt.shutdown()

    plain, plain_counts = answer(False)
    paused, paused_counts = answer(True)
    assert paused.error is None
    assert [c.text for c in paused.choices] == [c.text for c in plain.choices]
    assert paused.usage == plain.usage
    assert paused_counts["prompt_tokens"] == plain_counts["prompt_tokens"]
    assert paused_counts["generated_tokens"] == plain_counts["generated_tokens"] == 48
    assert paused_counts["prefill_tokens"] > plain_counts["prefill_tokens"]    # it did recompute


def test_paused_requests_do_not_fill_the_queue_up_to_max_queue_of_them(tmp_path, soft_gguf):
    """requests.max_queue = 2: streams paused by their readers hold no engine resources and wait
    for their readers, not for an engine, so they do not fill the queue: with two, then three
    of them paused and the engines idle a new request is admitted and answered (before: the
    two paused ones were "waiting", and it got queue_full). Past max_queue paused ones they
    count again: with four paused the next is refused queue_full; each paused one, let go, is
    answered."""
    rt = runtime(pipeline(tmp_path, soft_gguf, requests=" max_queue = 2 "))
    rt.start()
    paused = []
    try:
        for rid in ("p1", "p2"):
            paused.append(paused_stream(rt, rid))
        plain = Listener()
        rt.submit(request("q1", n=1, max_tokens=4), plain, stream=True)
        assert plain.done.wait(30) and plain.result.error is None
        for rid in ("p3", "p4"):
            paused.append(paused_stream(rt, rid))
        with pytest.raises(PipelineError) as refused:
            rt.submit(request("q2", n=1, max_tokens=4), Listener(), stream=True)
        assert refused.value.kind == "queue_full"
        for key, heard in paused:
            assert not heard.done.is_set()
            rt.pause(key, False)
        for key, heard in paused:
            assert heard.done.wait(30) and heard.result.error is None
        more = Listener()
        rt.submit(request("q3", n=1, max_tokens=4), more, stream=True)
        assert more.done.wait(30) and more.result.error is None
    finally:
        rt.close(drain=False)
        rt.shutdown()


def test_requests_aborted_while_paused_leave_no_paused_count_that_fills_the_queue(tmp_path, soft_gguf):
    """requests.max_queue = 2: four streams paused by their readers (past max_queue of them the
    paused count again), then aborted while paused: they are gone, and so is their count: a
    new request is admitted and answered (not refused queue_full by requests no longer there)."""
    rt = runtime(pipeline(tmp_path, soft_gguf, requests=" max_queue = 2 "))
    rt.start()
    try:
        paused = [paused_stream(rt, rid) for rid in ("p1", "p2", "p3", "p4")]
        for key, heard in paused:
            rt.abort(key)
            assert heard.done.wait(30) and heard.result.error.kind == "aborted"
        assert rt.in_flight == 0 and not rt.full
        more = Listener()
        rt.submit(request("q", n=1, max_tokens=4), more, stream=True)
        assert more.done.wait(30) and more.result.error is None
    finally:
        rt.close(drain=False)
        rt.shutdown()


def test_a_drain_lets_a_paused_request_go_on_and_answers_it_whole(tmp_path, soft_gguf):
    """close(drain=True) stops admitting and lets go what its readers paused: the drain waits for
    the paused request to finish, not for its reader (who may never read again), and answers it
    whole; the drain ends with every request finished, none cut."""
    rt = runtime(pipeline(tmp_path, soft_gguf))
    rt.start()
    try:
        paused = threading.Event()
        heard = Listener(on_first=lambda key: (rt.pause(key, True), paused.set()))
        rt.submit(request("p", n=1), heard, stream=True)
        assert paused.wait(30)
        assert rt.close(drain=True, timeout=20) is True
        assert heard.done.is_set() and heard.result.error is None
    finally:
        rt.close(drain=False)
        rt.shutdown()


@pytest.mark.parametrize("fn", ["guard", "aguard"])
def test_a_pause_longer_than_a_stream_stages_timeout_is_not_its_timeout(tmp_path, soft_gguf, fn):
    """A stream stage with `timeout = 200ms` between generate and respond: the request paused by
    its reader for five times that is answered whole, the stage not timed out. The pause is the
    reader's: the stage's clock runs only while its function works on a chunk, not while it
    waits for the next, which a paused generation does not make."""
    rt = runtime(pipeline(tmp_path, soft_gguf, after=f'fn = "hooks:{fn}"  stream = true  timeout = 200ms'))
    rt.start()
    try:
        paused = threading.Event()
        heard = Listener(on_first=lambda key: (rt.pause(key, True), paused.set()))
        key = rt.submit(request("s", n=1), heard, stream=True)
        assert paused.wait(30)
        assert not heard.done.wait(1.0)            # five timeouts' worth, paused
        rt.pause(key, False)
        assert heard.done.wait(30)
        assert heard.result.error is None and len(heard.result.choices) == 1
        assert heard.result.usage["completion_tokens"] == 24
    finally:
        rt.close(drain=False)
        rt.shutdown()


@pytest.mark.parametrize("fn", ["guard", "aguard"])
@pytest.mark.parametrize("given", [True, False], ids=["workers=2", "workers-sized"])
def test_requests_paused_in_a_stream_stage_do_not_hold_its_workers_from_a_new_one(tmp_path, soft_gguf, fn, given):
    """A stream stage's workers all taken by streams their readers paused (two for `workers = 2`;
    without `workers`, as many as it has: 16): a new request is answered while they stay paused
    (before: its stage call waited for a worker, and it was answered only once they were let
    go). Let go, each paused one is answered whole."""
    workers = " workers = 2" if given else ""
    rt = runtime(pipeline(tmp_path, soft_gguf, after=f'fn = "hooks:{fn}"  stream = true{workers}'))
    rt.start()
    try:
        k = rt.workers["g"].workers
        assert k == (2 if given else 16)
        paused = [paused_stream(rt, f"p{i}") for i in range(k)]
        new = Listener()
        rt.submit(request("new", n=1, max_tokens=4), new, stream=True)
        assert new.done.wait(30), "a new request waited for the stream stage's workers held by paused ones"
        assert new.result.error is None and new.result.usage["completion_tokens"] == 4
        assert not any(heard.done.is_set() for _, heard in paused)
        for key, _ in paused:
            rt.pause(key, False)
        for _, heard in paused:
            assert heard.done.wait(30) and heard.result.error is None
            assert heard.result.usage["completion_tokens"] == 24
    finally:
        rt.close(drain=False)
        rt.shutdown()


def lent_slots_on_metrics(rt, stage: str) -> float:
    """agp_stage_lent_slots{stage} as GET /metrics answers it, from the runtime's stats."""
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline_dsl.serve.metrics import ServerMetrics

    text = ServerMetrics(process=False).render(rt.stats())[0].decode()
    return next(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "agp_stage_lent_slots" and s.labels["stage"] == stage)


@pytest.mark.parametrize("fn", ["guard", "aguard"])
def test_the_worker_slots_paused_streams_lend_are_on_metrics_until_they_are_let_go_or_aborted(tmp_path, soft_gguf,
                                                                                             fn):
    """Each request paused in a stream stage lends its worker slot: `agp_stage_lent_slots{stage}`
    (and the stage's `lent` in the stats) counts them, and goes back to 0 as they are let go or
    aborted (before: the slots lent were nowhere to be seen). Aborted while paused, a request
    leaves no thread of the stage behind."""
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 24 }\n"
            f'stage g : python {{ fn = "hooks:{fn}"  stream = true  workers = 2 }}\n'
            "stage out : respond {}\nrequest -> batch\ngen -> g -> out\n" + chain())
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    rt = runtime(path)
    rt.start()

    def stage_threads():
        return sum(t.name == "agp-stage-g" for t in threading.enumerate())
    try:
        assert lent_slots_on_metrics(rt, "g") == 0
        paused = [paused_stream(rt, f"p{i}") for i in range(6)]
        assert rt.stats()["stages"]["g"]["lent"] == 6 and lent_slots_on_metrics(rt, "g") == 6
        for key, heard in paused[:2]:                  # two let go: answered, their slots back
            rt.pause(key, False)
            assert heard.done.wait(30) and heard.result.error is None
        assert lent_slots_on_metrics(rt, "g") == 4
        for key, heard in paused[2:]:                  # the rest aborted while paused
            rt.abort(key)
            assert heard.done.wait(30) and heard.result.error.kind == "aborted"
        assert lent_slots_on_metrics(rt, "g") == 0
        if fn == "guard":                              # a thread a slot lent, none left once they are gone
            deadline = time.monotonic() + 30
            while stage_threads() > rt.workers["g"].workers:
                assert time.monotonic() < deadline, f"{stage_threads()} threads of the stage left"
                time.sleep(0.02)
    finally:
        rt.close(drain=False)
        rt.shutdown()
