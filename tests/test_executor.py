"""The executor: same answers with and without overlap, under races, cancellation, traces."""
from __future__ import annotations

import json
import random

import networkx as nx
import pytest
import torch

from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
from pipeline_dsl.engine.executor import AHEAD, Executor, _Signals, default_plan, run_requests
from pipeline_dsl.engine.trace import Trace
from pipeline_dsl.plan import make_plan
from tiny_model import tiny_engine

WORDS = "the cat and the world is hello of us at it in an".split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


engine = tiny_engine


def finished(into: dict):
    def on_output(outputs):
        for o in outputs:
            if o.finished:
                assert o.request_id not in into, "a request finished twice"
                into[o.request_id] = (o.text, o.finish_reason, o.completion_tokens)
    return on_output


def stepped(eng: Engine, requests, collector=None) -> dict:
    """The reference: Engine.step() until done, no executor; what `collector` (finished by default)
    gathers of its outputs."""
    for rid, kw in requests:
        eng.add_request(rid, **kw)
    out: dict = {}
    collect = (collector or finished)(out)
    while eng.has_unfinished():
        collect(eng.step())
    return out


def greedy_requests(n=12, **params):
    return [(f"g{i}", dict(prompt=" ".join(WORDS[:2 + i % 9]) * (1 + i % 3),
                           params=SamplingParams(max_tokens=4 + i % 9, **params)))
            for i in range(n)]


def heard(into: dict):
    """on_output collecting each request's (token id, logprob) pairs (its params: logprobs=0)."""
    def on_output(outputs):
        for o in outputs:
            into.setdefault(o.request_id, []).extend((e["token_id"], e["logprob"]) for e in o.logprobs or ())
    return on_output


def stepped_heard(eng: Engine, requests) -> dict:
    """The reference's (token id, logprob) pairs: Engine.step() until done, no executor."""
    return stepped(eng, requests, heard)


def assert_same_answers(got: dict, want: dict, tol: float = 1e-4) -> None:
    """The same token ids for every request, each logprob within tol. On soft_gguf (spread
    distributions) a token read from the wrong place moves the next tokens' logprobs far more
    than another batch's float order does (~1e-6); the tiny model's argmax is the same token
    with logprob 0.0 whatever it reads, so only a model like this one tells them apart."""
    assert got.keys() == want.keys()
    for rid, w in want.items():
        assert [t for t, _ in got[rid]] == [t for t, _ in w], rid
        assert [lp for _, lp in got[rid]] == pytest.approx([lp for _, lp in w], abs=tol), rid


def test_greedy_outputs_are_identical_with_and_without_overlap(soft_gguf):
    """Serial or overlapped, the executor reads each in-flight token from its own sequence's
    sample: the tokens and logprobs of Engine.step()."""
    reqs = greedy_requests(logprobs=0)
    reference = stepped_heard(engine(soft_gguf), reqs)
    for overlap in (False, True):
        got: dict = {}
        run_requests(engine(soft_gguf), reqs, overlap=overlap, on_output=heard(got))
        assert_same_answers(got, reference)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_steps_torch_work_runs_in_inference_mode_and_the_host_work_outside_it(tiny_gguf, overlap):
    """The index tensors and the forward (and sampling) of every step run in inference mode,
    handed over together or one by one; the host's work (admission, emit) does not."""
    eng = engine(tiny_gguf)
    modes: dict = {"prepare": set(), "forward": set(), "accept": set()}

    def seen(name, fn):
        def wrapped(*args, **kwargs):
            modes[name].add(torch.is_inference_mode_enabled())
            return fn(*args, **kwargs)
        return wrapped

    eng.prepare, eng.forward = seen("prepare", eng.prepare), seen("forward", eng.forward)
    eng.accept_token = seen("accept", eng.accept_token)
    reqs = greedy_requests(4)
    got: dict = {}
    run_requests(eng, reqs, overlap=overlap, on_output=finished(got))
    assert got == stepped(engine(tiny_gguf), reqs)
    assert modes == {"prepare": {True}, "forward": {True}, "accept": {False}}


def mixed_requests(n: int, seed: int = 0):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(
            max_tokens=rng.randint(1, 24),
            temperature=rng.choice([0.0, 0.0, 0.7, 1.3]),
            top_k=rng.choice([0, 0, 5]),
            top_p=rng.choice([1.0, 0.9]),
            seed=rng.randint(0, 10**6),
            stop=rng.choice([(), (), ("th",), ("a", "ll")]),
            ignore_eos=rng.random() < 0.3)
        reqs.append((f"m{i}", dict(prompt=" ".join(words), params=params)))
    return reqs


def test_two_hundred_mixed_requests_through_threads_match_a_serial_run(soft_gguf):
    """Over spread distributions (soft_gguf) a token in flight read from the wrong place changes
    the text drawn after it: the threaded run's answers are the serial run's only if none is."""
    reqs = mixed_requests(200)
    serial: dict = {}
    eng = engine(soft_gguf, max_batch_size=16)
    run_requests(eng, reqs, overlap=False, on_output=finished(serial))
    threaded: dict = {}
    eng2 = engine(soft_gguf, max_batch_size=16)
    stats = run_requests(eng2, reqs, overlap=True, on_output=finished(threaded))
    assert len(serial) == 200 and threaded == serial
    assert {r for _, r, _ in serial.values()} >= {"length", "stop"}
    assert eng2.blocks.num_used == 0 and stats["steps"] > 20
    eng2.blocks.check_invariants()


def test_seeded_sampling_through_the_executor_matches_engine_step(soft_gguf):
    """Seeded sampling over spread distributions (soft_gguf): a token read from the wrong place
    changes what is drawn after it, so the texts are Engine.step()'s only if every in-flight
    token fed its own sequence."""
    reqs = [(rid, kw) for rid, kw in mixed_requests(30, seed=3)]
    reference = stepped(engine(soft_gguf), reqs)
    got: dict = {}
    run_requests(engine(soft_gguf), reqs, overlap=True, on_output=finished(got))
    assert got == reference


def test_cancelling_mid_generation_frees_its_blocks(tiny_gguf):
    eng = engine(tiny_gguf)
    ex = Executor(eng, overlap=True)
    ex.submit("victim", prompt="hello world " * 20, params=SamplingParams(max_tokens=200, ignore_eos=True))
    ex.submit("other", prompt="the cat", params=SamplingParams(max_tokens=30, ignore_eos=True))
    seen: dict = {"victim": 0, "after_abort": 0}
    done: dict = {}

    def on_output(outputs):
        for o in outputs:
            if o.request_id == "victim":
                seen["victim"] += 1
                if seen["victim"] == 3:
                    ex.abort("victim")
                elif seen["victim"] > 3:
                    seen["after_abort"] += 1
            if o.finished:
                done[o.request_id] = o.finish_reason
        if seen["victim"] >= 3 and "victim" not in ex._aborts:
            assert "victim" not in eng.blocks.seqs    # blocks freed once the abort is admitted

    ex.run(on_output=on_output)
    assert done == {"other": "length"}
    assert seen["after_abort"] <= 2                    # at most the steps already in flight
    assert eng.blocks.num_used == 0
    eng.blocks.check_invariants()


def test_a_request_aborted_before_its_admit_is_never_run(tiny_gguf):
    """submit, then abort before the executor admitted it (a client gone at once): the abort is
    not lost to the admit that handles aborts before new requests; the request never runs."""
    eng = engine(tiny_gguf)
    ex = Executor(eng, overlap=True)
    ex.submit("gone", prompt="hello world", params=SamplingParams(max_tokens=50, ignore_eos=True))
    ex.submit("kept", prompt="the cat", params=SamplingParams(max_tokens=5, ignore_eos=True))
    ex.abort("gone")
    heard: list = []
    ex.run(on_output=lambda outputs: heard.extend(o.request_id for o in outputs))
    assert "gone" not in heard and "kept" in heard
    assert eng.stats(latencies=False)["generated_tokens"] == 5
    assert eng.blocks.num_used == 0


def test_requests_submitted_together_are_admitted_in_their_order_not_their_threads(tiny_gguf):
    """Executor.submit's `order`: the requests one admit takes go into the engine's waiting queue
    in that order (a pipeline's items in their request's order), whichever was submitted first."""
    ex = Executor(engine(tiny_gguf), overlap=False)
    for rid, order in (("c", (2,)), ("a", (0,)), ("d", (3,)), ("b", (1,))):
        ex.submit(rid, order=order, prompt="the cat", params=SamplingParams(max_tokens=2))
    admitted, got = [], {}
    ex.run(finished(got), on_admitted=admitted.extend)
    assert admitted == ["a", "b", "c", "d"] and sorted(got) == ["a", "b", "c", "d"]


def test_requests_submitted_while_running_are_all_answered(tiny_gguf):
    import threading
    import time

    eng = engine(tiny_gguf)
    ex = Executor(eng, overlap=True)
    done: dict = {}
    runner = threading.Thread(target=ex.run, kwargs=dict(on_output=finished(done), until_idle=False))
    runner.start()
    reqs = greedy_requests(10)
    for rid, kw in reqs:
        ex.submit(rid, **kw)
        time.sleep(0.01)
    deadline = time.monotonic() + 60
    while len(done) < len(reqs) and time.monotonic() < deadline:
        time.sleep(0.01)
    ex.close()
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert done == stepped(engine(tiny_gguf), reqs)
    assert eng.blocks.num_used == 0


def test_an_idle_executor_sleeps_until_a_request_comes_and_then_answers_it(tiny_gguf):
    """A server with nothing to do looked for work every 5 ms (a tenth of a core, always: every
    idle `agp serve`); every way work reaches the executor notifies it, so idle it waits for that.
    Counted through the engine's schedule calls in one idle second: a busy machine makes fewer."""
    import threading
    import time

    eng = engine(tiny_gguf)
    calls = []
    schedule = eng.schedule
    eng.schedule = lambda *a, **kw: calls.append(1) or schedule(*a, **kw)
    ex = Executor(eng, overlap=True)
    done: dict = {}
    runner = threading.Thread(target=ex.run, kwargs=dict(on_output=finished(done), until_idle=False))
    runner.start()
    try:
        time.sleep(0.2)
        before = len(calls)
        time.sleep(1.0)
        assert len(calls) - before <= 5, f"{len(calls) - before} schedules in an idle second"
        reqs = greedy_requests(2)
        for rid, kw in reqs:
            ex.submit(rid, **kw)
        deadline = time.monotonic() + 60
        while len(done) < len(reqs) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        ex.close()
        runner.join(timeout=60)
    assert not runner.is_alive()
    assert done == stepped(engine(tiny_gguf), reqs)


@pytest.mark.parametrize("overlap", [False, True])
def test_an_executor_holding_only_a_parked_request_sleeps_until_it_goes_on_and_then_finishes_it(tiny_gguf, overlap):
    """A request parked for its reader (agp serve pauses a stream whose client reads nothing) can
    be scheduled again only once it is let go: the loop waits for that. It woke every second to
    schedule nothing (and every 2 ms while requests waited that nothing could schedule); now the
    engine's schedule runs for the steps the park found in flight, then at most once a second
    (the wait's guard against a forgotten notification) until the request goes on, and the
    request resumes and finishes with the answer it had unparked. Counted through the engine's
    schedule calls over a second parked (a 2 ms poll makes ~500; the guard one or two)."""
    import threading
    import time

    eng = engine(tiny_gguf)
    calls = []
    schedule = eng.schedule
    eng.schedule = lambda *a, **kw: calls.append(1) or schedule(*a, **kw)
    ex = Executor(eng, overlap=overlap)
    parked_at: list[int] = []
    done: dict = {}
    collect = finished(done)

    def on_output(outputs):
        collect(outputs)
        if not parked_at and any(o.request_id == "p" for o in outputs):
            ex.park("p")                                  # after its first token: its reader reads nothing
            parked_at.append(len(calls))

    runner = threading.Thread(target=ex.run, kwargs=dict(on_output=on_output, until_idle=False))
    runner.start()
    try:
        req = ("p", dict(prompt="hello world the cat", params=SamplingParams(max_tokens=24, ignore_eos=True)))
        ex.submit(req[0], **req[1])
        deadline = time.monotonic() + 60
        while not parked_at and time.monotonic() < deadline:
            time.sleep(0.01)
        assert parked_at, "no token came"
        time.sleep(1.0)
        during = len(calls) - parked_at[0]
        assert during <= 2 + 2, f"{during} schedules while only a parked request was held"
        assert not done and eng.blocks.num_used == 0     # parked: out of the batch, its blocks freed
        ex.park("p", False)                                # its reader reads
        while not done and time.monotonic() < deadline + 60:
            time.sleep(0.01)
    finally:
        ex.close()
        runner.join(timeout=60)
    assert not runner.is_alive()
    assert done == stepped(engine(tiny_gguf), [req])


def test_a_request_the_engine_refuses_is_reported_and_the_rest_run(tiny_gguf):
    eng = engine(tiny_gguf)
    ex = Executor(eng, overlap=True)
    ex.submit("bad", prompt="", params=SamplingParams(max_tokens=3))
    ex.submit("good", prompt="hello", params=SamplingParams(max_tokens=3))
    errors, done = {}, {}
    ex.run(on_output=finished(done), on_error=lambda rid, e: errors.setdefault(rid, str(e)))
    assert list(done) == ["good"] and "empty" in errors["bad"]


def test_the_trace_has_one_track_per_stream_and_reports_overlap(tiny_gguf, tmp_path):
    path = tmp_path / "run.json"
    stats = run_requests(engine(tiny_gguf), greedy_requests(16), overlap=True, trace_path=str(path))
    data = json.loads(path.read_text())
    names = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"host", "copy", "compute"}
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert {"gen.forward", "batch.schedule", "batch.admit", "gen.emit", "gen.h2d", "gen.d2h"} <= {e["name"] for e in spans}
    assert 0.0 <= stats["measured_overlap"] <= 1.0
    assert data["otherData"]["measured_overlap"] == stats["measured_overlap"]


def test_host_schedules_the_next_step_while_the_current_one_computes(tiny_gguf):
    trace = Trace()
    eng = engine(tiny_gguf)
    for rid, kw in greedy_requests(8):
        eng.add_request(rid, **kw)
    Executor(eng, overlap=True, trace=trace).run()
    fwd = {s.micro_batch: s for s in trace.spans if s.name == "gen.forward"}
    sched = {s.micro_batch: s for s in trace.spans if s.name == "batch.schedule"}
    ahead = [k for k in fwd if k + 1 in sched and sched[k + 1].start < fwd[k].end]
    assert ahead, "no step was scheduled while the previous one computed"
    assert trace.measured_overlap() > 0


def test_a_serial_run_never_overlaps_and_its_costs_feed_the_planner(tiny_gguf):
    trace = Trace()
    eng = engine(tiny_gguf)
    for rid, kw in greedy_requests(6):
        eng.add_request(rid, **kw)
    stats = Executor(eng, overlap=False, trace=trace).run()
    assert stats["measured_overlap"] == 0.0 and trace.spans
    costs = trace.costs()
    assert costs["gen.forward"] > 0 and set(costs) <= {w.name for w in default_plan().work}
    g = nx.DiGraph(name="chat", settings={})
    for stage, kind in (("request", "requests"), ("batch", "dynamic_batch"), ("encode", "encode"),
                        ("kv", "kv_lookup"), ("gen", "generate"), ("out", "respond")):
        g.add_node(stage, kind=kind, params={}, resource="host", placement=None, pos=None)
    nx.add_path(g, ["request", "batch", "encode", "kv", "gen", "out"])
    predicted = make_plan(g, costs=costs)
    assert predicted.work_named("gen.forward").cost == costs["gen.forward"]
    assert predicted.work_named("batch.admit").cost == 0.0       # added directly: nothing to admit, no span
    assert predicted.speedup >= 1.0


def test_a_serial_cpu_run_hands_each_steps_torch_work_to_the_compute_thread_in_one_call(tiny_gguf, monkeypatch):
    # the step's index tensors and its forward go over together; inside that call they run as
    # they are (no second hand-off apiece, each finding it is on the compute thread already)
    import pipeline_dsl.engine.executor as executor

    calls = []
    real = executor.on_compute
    monkeypatch.setattr(executor, "on_compute", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    eng = engine(tiny_gguf)
    reqs = greedy_requests(3)
    got: dict = {}
    for rid, kw in reqs:
        eng.add_request(rid, **kw)
    trace = Trace()
    ex = Executor(eng, overlap=False, trace=trace)
    ex.run(on_output=finished(got))
    assert got == stepped(engine(tiny_gguf), reqs)
    assert ex.steps > 3 and len(calls) == ex.steps
    forwards = [s for s in trace.spans if s.name == "gen.forward"]
    assert len(forwards) == ex.steps                      # every forward still timed and traced


def test_spans_added_from_several_threads_while_the_trace_is_read_are_all_kept():
    # threads add spans without a lock (a deque's append is atomic); readers take snapshots
    import threading

    trace = Trace()
    done = threading.Event()
    failures = []                              # a reader's error fails the test (a thread's is only a warning)

    def add(k):
        for i in range(2000):
            trace.add(f"s{k}", "gen.forward", i, i + 0.5, i)

    def read():
        try:
            while not done.is_set():
                trace.work()
                trace.to_chrome()
        except Exception as e:                 # noqa: BLE001 - the assert below reports it
            failures.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=add, args=(k,)) for k in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    assert failures == []
    assert len(trace.work()) == 8000 and sorted(trace.streams()) == ["s0", "s1", "s2", "s3"]
    assert trace.busy_s() == {f"s{k}": pytest.approx(1000.0) for k in range(4)}


def test_the_chrome_trace_holds_microseconds_lanes_and_one_flow_per_request():
    """Trace Event Format: times in microseconds from the first span, a span's micro-batch (0
    included) in its args, a request's spans joined by one flow (s … f, each later one bound to
    its enclosing slice), and lifetimes packed on as few lanes as never overlap (a lane free
    again the moment its last lifetime ends)."""
    trace = Trace()
    trace.add("compute", "gen.forward", 1.0, 1.5, 0)
    trace.add("host", "batch.schedule", 1.25, 1.375, 1, args={"request": "r1"})
    trace.add("host", "gen.emit", 1.625, 1.75, 0, args={"request": "r1"})
    trace.add("host", "out.respond", 1.8, 1.9, args={"request": "r1"})
    trace.add("host", "out.respond", 1.95, 2.0, args={"request": "r2"})       # alone: no flow
    for start, end in ((2.0, 2.5), (1.0, 2.0), (1.5, 2.25)):                  # added out of time order
        trace.add("requests", "gen.generate", start, end, lane=True)
    data = trace.to_chrome()
    events = data["traceEvents"]
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    forward = next(e for e in spans if e["name"] == "gen.forward")
    assert (forward["ts"], forward["dur"], forward["args"]) == (0.0, 500000.0, {"micro_batch": 0})
    emit = next(e for e in spans if e["name"] == "gen.emit")
    assert (emit["ts"], emit["dur"]) == (625000.0, 125000.0)
    lanes = sorted((tracks[e["tid"]], e["ts"]) for e in spans if e["name"] == "gen.generate")
    assert lanes == [("requests #1", 0.0), ("requests #1", 1000000.0), ("requests #2", 500000.0)]
    flow = [e for e in events if e["ph"] in "stf"]
    assert [(e["ph"], e["ts"], e.get("bp")) for e in flow] == [("s", 250000.0, None), ("t", 625000.0, "e"),
                                                               ("f", 800000.0, "e")]
    assert {e["args"]["request"] for e in flow} == {"r1"}


def test_a_traces_costs_are_the_mean_of_each_works_spans_and_its_busy_time_counts_overlaps_once():
    trace = Trace()
    for start, end in ((0.0, 0.5), (1.0, 1.25)):
        trace.add("compute", "gen.forward", start, end)
    trace.add("host", "gen.emit", 0.25, 0.75)
    trace.add("host", "batch.schedule", 0.5, 1.0)             # overlaps the emit on the host stream
    trace.add("requests", "gen.generate", 0.0, 5.0, lane=True)  # a lifetime: no stream's work
    assert trace.costs() == {"gen.forward": 0.375, "gen.emit": 0.5, "batch.schedule": 0.5}
    assert trace.busy_s() == {"compute": pytest.approx(0.75), "host": pytest.approx(0.75)}
    assert trace.hidden_fraction("host", "compute") == pytest.approx(0.25 / 0.75)


def test_a_span_added_at_any_point_of_a_read_of_the_trace_neither_breaks_it_nor_is_lost():
    # the interleaving the threads above may or may not hit, forced: a span is added (as another
    # thread could) between any two lines the trace's readers run; each reads a snapshot
    import sys

    from pipeline_dsl.engine import trace as trace_module

    trace = Trace()
    for i in range(50):
        trace.add("s0", "gen.forward", i, i + 0.5, i)
    added = []

    def between_lines(frame, event, arg):
        if event == "line" and len(added) < 500:
            added.append(len(added))
            trace.add("s1", "gen.forward", len(added), len(added) + 0.5, len(added))
        return between_lines

    before = sys.gettrace()
    sys.settrace(lambda frame, event, arg: between_lines if frame.f_code.co_filename == trace_module.__file__
                 else None)
    try:
        trace.work()
        trace.streams()
        trace.busy_s()
        trace.to_chrome()
    finally:
        sys.settrace(before)
    assert added                               # spans did arrive while the readers ran
    assert len(trace.work()) == 50 + len(added) and trace.streams() == ["s0", "s1"]


def placed_plan(**placement):
    """The seed pipeline's plan with `on <resource>` placements, e.g. placed_plan(gen="copy")."""
    g = nx.DiGraph(name="placed", settings={})
    stages = [("request", "requests"), ("batch", "dynamic_batch"), ("encode", "encode"),
              ("kv", "kv_lookup"), ("gen", "generate"), ("out", "respond")]
    for name, kind in stages:
        g.add_node(name, kind=kind, params={}, resource=None, placement=placement.get(name), pos=None)
    nx.add_path(g, [s for s, _ in stages])
    return make_plan(g)


def test_a_plan_with_everything_on_one_stream_gives_the_same_answers(soft_gguf):
    plan = placed_plan(**dict.fromkeys(("request", "batch", "encode", "kv", "gen", "out"), "host"))
    assert len(plan.streams) == 1
    reqs = greedy_requests(6, logprobs=0)
    got: dict = {}
    run_requests(engine(soft_gguf), reqs, plan=plan, overlap=True, on_output=heard(got))
    assert_same_answers(got, stepped_heard(engine(soft_gguf), reqs))


def test_a_plan_without_generate_is_refused(tiny_gguf):
    g = nx.DiGraph(name="nogen", settings={})
    g.add_node("request", kind="requests", params={}, resource="host", placement=None, pos=None)
    g.add_node("out", kind="respond", params={}, resource="host", placement=None, pos=None)
    g.add_edge("request", "out")
    with pytest.raises(ValueError, match="generate"):
        Executor(engine(tiny_gguf), make_plan(g))


def test_signals_drop_old_events_and_stop_releases_later_waiters():
    s = _Signals()
    for m in range(3 * AHEAD):
        s.record("gen.forward", m)
    assert len(s._events) <= 2 * AHEAD + 1                 # old events are dropped ...
    assert s._get(("gen.forward", 1)).is_set()              # ... and read as set
    assert not s._get(("gen.d2h", 5)).is_set()
    s.release(stop_at=3)
    assert s._get(("gen.d2h", 5)).is_set() and s._get(("gen.d2h", 9)).is_set()
    assert not s._get(("gen.d2h", 2)).is_set()


def test_default_plan_is_the_seed_pipeline():
    plan = default_plan()
    assert [s.name for s in plan.streams] == ["host", "copy", "compute"]
    assert plan.stream_of("gen") == "compute"


@pytest.mark.slow
def test_the_embedded_model_answers_the_same_with_and_without_overlap():
    base = Engine(EngineConfig(dtype="fp32"))             # the worker's torch threads (one)
    chats = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain recursion in one sentence.", "List three colours."]
    reqs = [(f"c{i}", dict(messages=[{"role": "user", "content": c}],
                           params=SamplingParams(max_tokens=12)))   # c0 stops at its 8th token, the rest run on
            for i, c in enumerate(chats)]

    def fresh():
        return Engine(base.config, runner=base.runner, tokenizer=base.tokenizer)

    reference = stepped(fresh(), reqs)
    for overlap in (True, False):
        got: dict = {}
        run_requests(fresh(), reqs, overlap=overlap, on_output=finished(got))
        assert got == reference
    assert "Paris" in reference["c0"][0]


@pytest.mark.parametrize("overlap", [True, False])
def test_the_engines_busy_time_counts_the_forwards_an_executor_runs(tiny_gguf, overlap):
    """An engine's busy_s (/stats' engines, agp run --stats) is its model's time whoever steps it:
    it stayed 0 when an executor drove the forwards. It never exceeds the run's forward spans."""
    trace = Trace()
    eng = engine(tiny_gguf)
    for rid, kw in greedy_requests(6):
        eng.add_request(rid, **kw)
    Executor(eng, overlap=overlap, trace=trace).run()
    forward = sum(s.end - s.start for s in trace.spans if s.name == "gen.forward")
    assert 0 < eng.stats()["busy_s"] <= forward


def test_a_refusal_sampled_ahead_ends_the_answer_at_the_refused_token_not_before(tiny_gguf):
    """The forward of step k+1 may sample (and find its token refused: bad_words leave none of
    allowed_token_ids) before step k's token is emitted. Step k's token is still the answer's:
    the error ends the answer at the refused token, as a plain step loop does. The emit of the
    token before it is held until the refusal is sampled, so the order is the racy one."""
    import threading

    eng = engine(tiny_gguf)
    t = eng.tokenizer.encode("c", add_special_tokens=False)[0]
    word = eng.tokenizer.decode([t] * 4)                   # the 4th t in a row is banned: nothing left
    params = SamplingParams(max_tokens=8, allowed_token_ids=[t], bad_words=[word], ignore_eos=True)
    reference = stepped(engine(tiny_gguf), [("r", dict(prompt="hello", params=params))])
    assert reference["r"][1:] == ("error", 4)

    refused = threading.Event()
    sample, accept = eng.sample, eng.accept_token

    def sample_then_say(logits, seqs):
        tokens = sample(logits, seqs)
        if any(s.state.error_at is not None for s in seqs):
            refused.set()
        return tokens

    def accept_after_refusal(seq, token, now):
        if seq.num_output == 3:                            # the token before the refused one
            assert refused.wait(60), "the next step was not sampled while this one waited to be emitted"
        return accept(seq, token, now)

    eng.sample, eng.accept_token = sample_then_say, accept_after_refusal
    got: dict = {}
    run_requests(eng, [("r", dict(prompt="hello", params=params))], overlap=True, on_output=finished(got))
    assert refused.is_set() and got == reference


@pytest.mark.parametrize("placed", ["batch on copy", "batch on compute", "kv on copy", "encode on compute"])
def test_a_placement_that_splits_a_step_over_streams_gives_the_same_answers(tmp_path, tiny_gguf, placed):
    """`on copy` on the batcher put its schedule on another stream than kv_lookup's lookup and
    generate's emit: a sequence that a stop string finished in emit between its next step's
    schedule and lookup had its blocks freed, and the lookup failed the engine (KeyError: every
    request in flight failed). Any placement answers as the planner's own does."""
    from flowkit import chain, run, write

    stop_first = {"id": "s", "prompt": "a cat", "stop": ["a"], "max_tokens": 4}
    reqs = [stop_first] + [{"id": f"r{i}", "prompt": " ".join(WORDS[i:i + 3]), "max_tokens": 4, "ignore_eos": True}
                           for i in range(6)]
    kinds = {"batch": "dynamic_batch", "kv": "kv_lookup", "encode": "encode"}
    answers = {}
    for where in ("", placed):
        segment = chain()
        if where:
            stage, on = where.split(" on ")
            segment = segment.replace(f"stage {stage} : {kinds[stage]} ", f"stage {stage} : {kinds[stage]} on {on} ")
            assert f" on {on} " in segment
        path = write(tmp_path, tiny_gguf, "stage request : requests {}\nstage gen : generate { max_new_tokens = 4 }\n"
                     "stage out : respond {}\nrequest -> batch\n" + segment + "gen -> out\n")
        results, _ = run(path, reqs)
        for r in results:
            assert r.ok, (where, r.id, r.error and r.error.message)
        answers[where] = [(r.id, r.choices[0].text, r.choices[0].finish_reason) for r in results]
    assert answers[placed] == answers[""]
    assert answers[""][0][2] == "stop"


@pytest.mark.parametrize("placement", [{"gen": "copy"}, {"gen": "compute"}, {"batch": "compute", "gen": "host"},
                                       {"kv": "compute"}])
def test_generate_placed_apart_from_the_batcher_gives_the_same_answers_under_preemption(soft_gguf, placement):
    """`generate on copy` (or compute, or the batcher on compute) puts emit on another stream
    than the batcher's schedule, which could run up to AHEAD micro-batches ahead. A sequence left
    out of several steps (chunked prefills take the token budget, a small KV pool preempts) waits on
    a token sampled many steps back: the forward found that step's samples already dropped
    (KeyError, every request in flight failed). With `kv_lookup on compute` emit shares the
    schedule's stream two steps behind it: a schedule waiting for that emit never ran (a hang).
    Any placement answers as Engine.step() does: each sequence reads its own tokens, the ones
    sampled several steps back too (their tokens and logprobs are Engine.step()'s)."""
    plan = placed_plan(**placement)
    assert len({plan.work_named(w).stream for w in ("batch.schedule", "kv.lookup", "gen.emit")}) > 1
    cfg = dict(kv_budget_bytes=1 << 18, max_tokens_per_step=64, prefill_chunk=32, max_batch_size=6)
    reqs = [(f"p{i}", dict(prompt=" ".join(WORDS[i % 5:]) * (1 + 4 * (i % 3)),
                           params=SamplingParams(max_tokens=6 + i % 13, ignore_eos=True, stop=("a",) * (i % 2),
                                                 logprobs=0)))
            for i in range(24)]
    reference, reference_lp = {}, {}
    ref = engine(soft_gguf, **cfg)
    for rid, kw in reqs:
        ref.add_request(rid, **kw)
    while ref.has_unfinished():
        outputs = ref.step()
        finished(reference)(outputs)
        heard(reference_lp)(outputs)
    eng = engine(soft_gguf, **cfg)
    got, got_lp = {}, {}
    run_requests(eng, reqs, plan=plan, overlap=True,
                 on_output=lambda outputs: (finished(got)(outputs), heard(got_lp)(outputs)))
    assert got == reference
    assert_same_answers(got_lp, reference_lp)
    assert eng.blocks.num_used == 0
    eng.blocks.check_invariants()


def test_tokens_in_flight_from_several_earlier_steps_each_feed_their_own_sequence(soft_gguf):
    """With `kv_lookup on compute` a step's inputs can wait on tokens sampled by two or more
    earlier steps still in flight (a sequence left out of a step by a chunked prefill or a
    preemption): each placeholder is filled from its own step's samples, one after the other,
    so every sequence reads its own token and its logprobs are Engine.step()'s. A model with
    spread distributions (soft_gguf): the tiny one's argmax is the same token whatever it reads."""
    cfg = dict(kv_budget_bytes=1 << 18, max_tokens_per_step=64, prefill_chunk=32, max_batch_size=6)
    reqs = [(f"p{i}", dict(prompt=" ".join(WORDS[i % 5:]) * (1 + 4 * (i % 3)),
                           params=SamplingParams(max_tokens=6 + i % 13, ignore_eos=True, logprobs=0)))
            for i in range(24)]

    def heard(into: dict):
        def on_output(outputs):
            for o in outputs:
                into.setdefault(o.request_id, []).extend((e["token_id"], e["logprob"]) for e in o.logprobs or ())
        return on_output

    reference: dict = {}
    eng = engine(soft_gguf, **cfg)
    for rid, kw in reqs:
        eng.add_request(rid, **kw)
    while eng.has_unfinished():
        heard(reference)(eng.step())
    got: dict = {}
    run_requests(engine(soft_gguf, **cfg), reqs, plan=placed_plan(kv="compute"), overlap=True, on_output=heard(got))
    assert got.keys() == reference.keys()
    for rid, want in reference.items():
        assert [t for t, _ in got[rid]] == [t for t, _ in want], rid
        assert [lp for _, lp in got[rid]] == pytest.approx([lp for _, lp in want], abs=1e-3), rid


@pytest.mark.parametrize("placement", [{"gen": "copy"}, {"batch": "compute", "gen": "host"}])
def test_a_placed_batcher_schedules_at_most_two_steps_past_a_stop(tiny_gguf, placement):
    """With the batcher's schedule on another stream than generate's emit, the schedule ran up to
    AHEAD micro-batches ahead of the emit: a sequence a stop string finished was computed in as
    many further steps, its tokens discarded. The schedule waits for the emit two steps back, so
    a finished sequence is computed in at most two more steps, as docs/plan.md says."""
    reqs = [(f"s{i}", dict(prompt=" ".join(WORDS[i % 7:]) * (1 + i % 3),
                           params=SamplingParams(max_tokens=30, stop=("a", "e", "t"), ignore_eos=True)))
            for i in range(16)]
    eng = engine(tiny_gguf, max_batch_size=4)
    got: dict = {}
    stats = run_requests(eng, reqs, plan=placed_plan(**placement), overlap=True, on_output=finished(got))
    stopped = sum(reason == "stop" for _, reason, _ in got.values())
    assert stopped >= 8
    assert stats["discarded_tokens"] <= 2 * stopped
    assert got == stepped(engine(tiny_gguf, max_batch_size=4), reqs)


def without_d2h(plan):
    """`plan` with no gen.d2h work: the emit copies the step's tokens itself, after the forward."""
    import dataclasses

    from pipeline_dsl.plan import Event

    work = tuple(w for w in plan.work if w.part != "d2h")
    streams = tuple(dataclasses.replace(s, work=tuple(n for n in s.work if n != "gen.d2h")) for s in plan.streams)
    events = tuple(e for e in plan.events if "gen.d2h" not in (e.src_work, e.dst_work))
    events += (Event(src="gen", dst="gen", src_work="gen.forward", dst_work="gen.emit", lag=0, host_sync=True),)
    return dataclasses.replace(plan, work=work, streams=streams, events=events)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_plan_without_a_copy_back_gives_the_same_answers(soft_gguf, overlap):
    plan = without_d2h(default_plan())
    assert "d2h" not in {w.part for w in plan.work}
    reqs = greedy_requests(8, logprobs=0)
    got: dict = {}
    run_requests(engine(soft_gguf), reqs, plan=plan, overlap=overlap, on_output=heard(got))
    assert_same_answers(got, stepped_heard(engine(soft_gguf), reqs))
