"""Which thread runs the engine's torch work on CPU (pipeline_dsl/engine/compute.py).

One thread loads the model and runs every forward and sampling, whichever thread drives
the engine (the executor's loops, serial or overlapped, a server's segment thread,
Engine.step() on the caller's): libgomp keeps a pool of workers per thread that opened a
parallel region, and a second pool turns every barrier of the forward into a sleep and a
wake-up. The forward runs with the torch thread count of the thread that drives it.
"""
from __future__ import annotations

import threading

import pytest
import torch

from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
from pipeline_dsl.engine import engine as engine_module
from pipeline_dsl.engine.compute import Contention, ContentionGuard, compute_thread, on_compute, on_compute_thread
from pipeline_dsl.engine.executor import Executor, cpu_overlap_pays, run_requests
from pipeline_dsl.engine.model import ModelRunner


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # each test sets its own threads from 1; put back after


class Seen:
    """Records (thread, torch threads) of every forward and every sampling call."""

    def __init__(self, monkeypatch, eng: Engine):
        self.forward: list[tuple[int, int]] = []
        self.sample: list[tuple[int, int]] = []
        forward = ModelRunner.run

        def recorded_forward(runner, *args, **kwargs):
            self.forward.append((threading.get_ident(), torch.get_num_threads()))
            return forward(runner, *args, **kwargs)

        monkeypatch.setattr(ModelRunner, "run", recorded_forward)
        sample = eng.sampler.sample_tensor                  # the draw the engine calls (on the device)

        def recorded_sample(*args, **kwargs):
            self.sample.append((threading.get_ident(), torch.get_num_threads()))
            return sample(*args, **kwargs)

        eng.sampler.sample_tensor = recorded_sample

    def threads(self) -> set[int]:
        return {t for t, _ in self.forward + self.sample}

    def counts(self) -> set[int]:
        return {n for _, n in self.forward + self.sample}

    def clear(self) -> None:
        self.forward.clear()
        self.sample.clear()


def make_engine(path) -> Engine:
    return Engine(EngineConfig(model=str(path), dtype="fp32", kv_budget_bytes=4 << 20, max_batch_size=8))


def sampled_requests(tag: str, n: int = 4):
    """Temperature > 0: the executor samples through engine.sampler (greedy takes an argmax)."""
    return [(f"{tag}{i}", dict(prompt="the cat and the world " * (1 + i),
                               params=SamplingParams(max_tokens=5, temperature=0.8, seed=i)))
            for i in range(n)]


def test_the_model_loads_on_the_compute_thread(tiny_gguf, monkeypatch):
    where = []
    load = engine_module.load_runner

    def recorded(config, models=None):
        where.append(threading.get_ident())
        return load(config, models)

    monkeypatch.setattr(engine_module, "load_runner", recorded)
    make_engine(tiny_gguf)
    assert where == [compute_thread().ident] and where[0] != threading.get_ident()


def test_forward_and_sampling_run_on_the_compute_thread_whoever_drives(tiny_gguf, monkeypatch):
    eng = make_engine(tiny_gguf)
    seen = Seen(monkeypatch, eng)
    compute = compute_thread().ident

    run_requests(eng, sampled_requests("serial"), overlap=False)            # agp-serial loop thread
    run_requests(eng, sampled_requests("overlap"), overlap=True)            # a thread per stream
    assert seen.forward and seen.sample
    assert seen.threads() == {compute}

    seen.clear()
    ex = Executor(eng, overlap=True)                                        # driven from another thread,
    for rid, kw in sampled_requests("served"):                              # as agp serve's segment loop
        ex.submit(rid, **kw)
    server = threading.Thread(target=ex.run)
    server.start()
    server.join(timeout=120)
    assert not server.is_alive()

    for rid, kw in sampled_requests("stepped"):                             # Engine.step() on this thread
        eng.add_request(rid, **kw)
    while eng.has_unfinished():
        eng.step()
    assert seen.forward and seen.sample
    assert seen.threads() == {compute} and compute != threading.get_ident()


def test_the_forward_uses_the_torch_thread_count_of_the_thread_that_drives_it(tiny_gguf, monkeypatch):
    eng = make_engine(tiny_gguf)
    seen = Seen(monkeypatch, eng)
    for n in (2, 1):
        torch.set_num_threads(n)
        run_requests(eng, sampled_requests(f"t{n}-", 2), overlap=False)
        assert seen.counts() == {n}
        seen.clear()
        for rid, kw in sampled_requests(f"s{n}-", 2):
            eng.add_request(rid, **kw)
        while eng.has_unfinished():
            eng.step()
        assert seen.counts() == {n}
        seen.clear()


def test_on_compute_returns_raises_and_nests():
    def where():
        return threading.get_ident(), on_compute_thread()

    ident, inside = on_compute(where)
    assert ident == compute_thread().ident and inside and not on_compute_thread()
    assert on_compute(lambda: on_compute(where)) == (ident, True)         # a nested call runs in place
    with pytest.raises(KeyError, match="boom"):
        on_compute(lambda: {}["boom"])
    with torch.inference_mode():
        assert on_compute(torch.is_inference_mode_enabled)
    assert not on_compute(torch.is_inference_mode_enabled)


def test_a_call_that_leaves_a_mode_changed_on_the_compute_thread_does_not_pass_it_on():
    """Each call runs in its caller's grad and inference modes, whatever a call before it left
    set on the compute thread (torch.set_grad_enabled(False) called as a function)."""
    assert on_compute(torch.is_grad_enabled)
    on_compute(torch.set_grad_enabled, False)
    try:
        assert on_compute(torch.is_grad_enabled) and not on_compute(torch.is_inference_mode_enabled)
        with torch.no_grad():
            assert not on_compute(torch.is_grad_enabled)
        assert on_compute(torch.is_grad_enabled)
    finally:
        on_compute(torch.set_grad_enabled, True)


def test_cpu_overlaps_the_streams_only_with_a_core_to_spare(tiny_gguf):
    assert not cpu_overlap_pays(2, cores=2) and not cpu_overlap_pays(4, cores=2)
    assert cpu_overlap_pays(1, cores=2) and cpu_overlap_pays(2, cores=4)
    eng = make_engine(tiny_gguf)
    for n in (1, 2):
        torch.set_num_threads(n)
        assert Executor(eng).overlap_now() == cpu_overlap_pays(n)
        assert Executor(eng, overlap=True).overlap_now() and not Executor(eng, overlap=False).overlap_now()
    torch.set_num_threads(1)
    stats = run_requests(eng, sampled_requests("auto", 2))
    assert stats["overlap"] == cpu_overlap_pays(1)


def test_a_slowed_step_sends_the_next_ones_to_one_thread_then_all_are_tried_again():
    from pipeline_dsl.engine.compute import ContentionGuard

    now = [0.0]
    guard = ContentionGuard(clock=lambda: now[0])
    guard.SOLO_STEPS, guard.MAX_SOLO = 2, 4
    guard.contention.period = 2
    torch.set_num_threads(2)
    ran = []

    def step(seconds):
        ran.append(torch.get_num_threads())
        now[0] += seconds

    guard.TRIAL_STEPS = 1
    for seconds in (0.010, 0.011, 0.050):           # the third: 5x the best
        guard.run("decode", step, seconds)
    assert ran == [2, 2, 2] and guard.contention.solo == 1     # one step to time it on one thread
    guard.run("decode", step, 0.030)                # on one thread: faster than 0.050 on all
    assert ran[3:] == [1] and torch.get_num_threads() == 2 and guard.solo_steps == 1
    guard.run("decode", step, 0.050)                # tried on all threads again: still slow
    assert guard.contention.solo == 2 and guard.contention.period == 4     # a stretch on one thread
    for _ in range(2):
        guard.run("decode", step, 0.030)
    guard.run("decode", step, 0.050)                # still slow: a longer stretch
    assert guard.contention.solo == 4
    for _ in range(4):
        guard.run("decode", step, 0.030)
    guard.run("decode", step, 0.010)                # fast again: stays on all threads
    guard.run("decode", step, 0.010)
    assert ran[-2:] == [2, 2] and guard.contention.solo == 0 and guard.contention.period == 2
    guard.run("prefill", step, 0.9)                 # a key of its own: its first step sets its best
    assert guard.contention.solo == 0
    torch.set_num_threads(1)
    guard.run("decode", step, 0.5)                  # one thread anyway: nothing to guard
    assert guard.contention.solo == 0 and ran[-1] == 1


def test_a_slowed_step_stays_on_all_threads_when_one_thread_was_slower_still():
    """Beside other processes' busy threads each of the step's threads gets a share of the cores:
    with barriers that sleep (the native step), the step on two threads was ~2x faster than on
    one. A stretch on one thread that turns out slower than the slowed steps on all threads is
    not repeated: the guard runs the step however it was faster."""
    now = [0.0]
    guard = ContentionGuard(clock=lambda: now[0], contention=Contention(2))
    torch.set_num_threads(2)
    ran = []

    def step(seconds_on_all, seconds_on_one):
        n = torch.get_num_threads()
        ran.append(n)
        now[0] += seconds_on_all if n > 1 else seconds_on_one

    guard.SOLO_STEPS, guard.MAX_SOLO = 64, 1024
    guard.contention.period = 64
    guard.run("decode", step, 0.010, 0.016)
    guard.run("decode", step, 0.040, 0.090)         # 4x the best: tried on one thread, a few steps
    assert guard.contention.solo == guard.TRIAL_STEPS < 64
    for _ in range(guard.TRIAL_STEPS):
        guard.run("decode", step, 0.040, 0.090)     # one thread: slower still
    for _ in range(3):
        guard.run("decode", step, 0.040, 0.090)     # so the steps stay on all threads
    assert ran == [2, 2] + [1] * guard.TRIAL_STEPS + [2, 2, 2] and guard.contention.solo == 0
    guard.run("decode", step, 0.200, 0.090)         # slower than one thread now: one thread again
    assert guard.contention.solo > 0


def test_a_contention_stretch_keeps_a_lone_sequences_eager_step_on_every_thread(tiny_gguf, monkeypatch):
    """torch's GEMMs split a row's sum by the thread count for some shapes, so during a stretch
    on one thread the eager step of one sequence (a lone request's prefill) keeps every thread:
    a lone request's answer never follows the load. The native step (the same bits on any
    number of threads) and a step of several sequences go to one thread."""
    from pipeline_dsl.engine.compute import CPU_CONTENTION
    from pipeline_dsl.engine.model import SeqBatchItem

    runner = make_engine(tiny_gguf).runner
    ran = []
    forward = runner._forward_step

    def recorded(step, want_logits):
        ran.append((step.native, torch.get_num_threads()))
        return forward(step, want_logits)

    monkeypatch.setattr(runner, "_forward_step", recorded)
    torch.set_num_threads(2)                 # one_torch_thread puts the count back
    try:
        CPU_CONTENTION.solo = 10
        runner.execute([SeqBatchItem([5, 6, 7, 8], 0, [0], True)])                          # a lone prefill
        runner.execute([SeqBatchItem([5, 6, 7], 0, [1], True), SeqBatchItem([9, 4], 0, [2], True)])
        runner.execute([SeqBatchItem([9], 4, [0], True)])                                   # a lone decode
        native = ran[2][0]
        assert ran == [(False, 2), (False, 1), (native, 1 if native else 2)]
        assert CPU_CONTENTION.solo == 10 - 1 - native
    finally:
        CPU_CONTENTION.solo, CPU_CONTENTION.period = 0, ContentionGuard.SOLO_STEPS


def test_a_serial_cpu_run_computes_no_step_past_a_sequence_end(tiny_gguf):
    """Serial on CPU, each micro-batch is emitted before the next is scheduled: a sequence that
    a stop string ends is not computed once more (overlapped, its extra token is discarded)."""
    def requests():
        return [(f"s{i}", dict(prompt=" ".join(["the cat and the world"] * (1 + i % 3)),
                               params=SamplingParams(max_tokens=24, stop=(" world" * (2 + i % 4),), ignore_eos=True)))
                for i in range(12)]

    got = {}
    for overlap in (True, False):
        done: dict = {}

        def on_output(outputs, done=done):
            done.update({o.request_id: (o.text, o.finish_reason) for o in outputs if o.finished})

        stats = run_requests(make_engine(tiny_gguf), requests(), overlap=overlap, on_output=on_output)
        got[overlap] = (done, stats["discarded_tokens"])
    assert got[True][0] == got[False][0] and any(r == "stop" for _, r in got[False][0].values())
    assert got[True][1] > 0 and got[False][1] == 0


def test_a_step_slowed_in_one_engine_sends_every_engines_steps_to_one_thread(tiny_gguf):
    """Two engines of one process (a small -> big cascade) share the cores and the compute thread:
    when one sees a step slowed by another process, the other's steps go to one thread too (with
    a guard each, the second kept both threads on stalled barriers: many times slower)."""
    from pipeline_dsl.engine.compute import CPU_CONTENTION

    small, big = make_engine(tiny_gguf).runner.guard, make_engine(tiny_gguf).runner.guard
    assert small.contention is big.contention is CPU_CONTENTION
    now = [0.0]
    ran: list[tuple[str, int]] = []

    def step(name, seconds):
        ran.append((name, torch.get_num_threads()))
        now[0] += seconds

    try:
        CPU_CONTENTION.solo, CPU_CONTENTION.period = 0, 2
        small.clock = big.clock = lambda: now[0]
        small.SOLO_STEPS = big.SOLO_STEPS = 2
        torch.set_num_threads(2)
        small.run("decode", step, "small", 0.010)
        big.run("decode", step, "big", 0.040)            # each engine its own best: its own model
        big.run("decode", step, "big", 0.041)            # not slow for the big one
        assert CPU_CONTENTION.solo == 0
        small.run("decode", step, "small", 0.050)        # 5x the small one's best: contended
        big.run("decode", step, "big", 0.040)
        small.run("decode", step, "small", 0.010)
        assert ran[-2:] == [("big", 1), ("small", 1)] and torch.get_num_threads() == 2
        assert (big.solo_steps, small.solo_steps) == (1, 1) and CPU_CONTENTION.solo == 0
        big.run("decode", step, "big", 0.040)            # the stretch over: all threads again
        assert ran[-1] == ("big", 2)
    finally:
        CPU_CONTENTION.solo, CPU_CONTENTION.period = 0, ContentionGuard.SOLO_STEPS
