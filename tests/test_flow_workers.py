"""The retry rules of a stage that runs user code (docs/language.md, "Python stages": `retries`
with `backoff`), as flow/workers.py implements them: which failures are transient, and how
long a retry waits; and the slots that calls of paused requests lend (StageWorkers.pause)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import threading
import time

import pytest

import pipeline_dsl
from pipeline_dsl.flow.workers import (MAX_BACKOFF_S, EventLoop, StageTimeout, StageWorkers, Timer,
                                       backoff_delay, is_transient)


def with_status(value, path=("status_code",)):
    class HTTPError(Exception):
        pass
    exc = HTTPError("http")
    if len(path) == 1:
        setattr(exc, path[0], value)
    else:
        response = type("Response", (), {})()
        setattr(response, path[1], value)
        setattr(exc, path[0], response)
    return exc


@pytest.mark.parametrize("exc", [
    TimeoutError("slow"), StageTimeout("past its timeout"), ConnectionError("reset"),
    ConnectionResetError("reset"), pipeline_dsl.Retry("busy"),
    with_status(408), with_status(425), with_status(429), with_status(500), with_status(503), with_status(599),
    with_status(502, ("status",)), with_status(429, ("response", "status_code")),
], ids=repr)
def test_transient_failures_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    ValueError("a bug"), pipeline_dsl.Reject("no"), KeyboardInterrupt(), with_status(404), with_status(400),
    # a Reject carries its HTTP status as `status`, but it is the function's answer, never transient
    pipeline_dsl.Reject("over the limit", status=429, retry_after=2), pipeline_dsl.Reject("down", status=503),
    with_status(499), with_status(600), with_status(True), with_status("503"),
    with_status(404, ("response", "status_code")),
], ids=repr)
def test_other_failures_fail_at_once(exc):
    assert not is_transient(exc)


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_a_retry_waits_backoff_doubled_per_try_jittered_into_half_to_whole(attempt):
    rng = random.getstate()
    random.seed(attempt)
    try:
        delays = [backoff_delay(0.2, attempt) for _ in range(400)]
    finally:
        random.setstate(rng)
    full = 0.2 * 2 ** (attempt - 1)          # the first retry waits about `backoff`
    assert all(full / 2 <= d <= full for d in delays)
    assert min(delays) < 0.6 * full and max(delays) > 0.9 * full       # the whole range, not a part


def test_a_retry_waits_at_most_30_seconds():
    assert MAX_BACKOFF_S == 30.0
    rng = random.getstate()
    random.seed(0)
    try:
        delays = [backoff_delay(1.0, 12) for _ in range(200)]      # 2048 s before the cap
    finally:
        random.setstate(rng)
    assert all(15.0 <= d <= 30.0 for d in delays) and max(delays) > 27.0


# ---- slots lent by paused calls (StageWorkers.pause) ------------------------------------------

class Calls:
    """Calls on a StageWorkers that each wait for their own gate; the order of their starts and
    ends, and their results."""

    def __init__(self, workers: int, is_async: bool, name: str = "s", **kw):
        self.timer, self.loop = Timer(), EventLoop()
        self.stage = StageWorkers(name, workers=workers, timer=self.timer, loop=self.loop, **kw)
        self.is_async = is_async
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.ended: dict[str, threading.Event] = {}
        self.order: list[str] = []
        self._lock = threading.Lock()

    def _note(self, what: str) -> None:
        with self._lock:
            self.order.append(what)

    def submit(self, name: str):
        gate = self.gates[name] = threading.Event()
        self.started[name], self.ended[name] = threading.Event(), threading.Event()

        def done(ok, value):
            assert ok and value == name
            self.ended[name].set()

        if self.is_async:
            async def fn():
                self._note(f"{name} starts")
                self.started[name].set()
                while not gate.is_set():
                    await asyncio.sleep(0.005)
                self._note(f"{name} ends")
                return name
        else:
            def fn():
                self._note(f"{name} starts")
                self.started[name].set()
                gate.wait(60)
                self._note(f"{name} ends")
                return name
        return self.stage.submit(fn, done, self.is_async)

    def finish(self, name: str) -> None:
        self.gates[name].set()
        assert self.ended[name].wait(30)

    def close(self) -> None:
        for gate in self.gates.values():
            gate.set()
        self.stage.close()
        self.loop.close()
        self.timer.close()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_paused_call_lends_its_slot_and_takes_it_back_when_let_go(is_async):
    """workers = 1, its call paused: the next call runs (and ends) while the paused one still
    waits (before: it waited for the paused one). Let go, the call has its slot back: a call
    submitted then starts only once it has ended, one call at once again."""
    calls = Calls(1, is_async)
    try:
        a = calls.submit("a")
        assert calls.started["a"].wait(30)
        calls.stage.pause(a, True)
        assert calls.stage.lent == 1
        calls.submit("b")
        calls.finish("b")                         # served while "a" holds its slot, paused
        assert not calls.ended["a"].is_set()
        calls.stage.pause(a, False)
        assert calls.stage.lent == 0
        calls.submit("c")
        calls.finish("a")
        calls.finish("c")
        assert calls.order == ["a starts", "b starts", "b ends", "a ends", "c starts", "c ends"]
    finally:
        calls.close()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_call_paused_before_its_turn_lends_its_slot_once_it_starts(is_async):
    """workers = 1: "b", paused while it waits behind "a", starts when "a" ends and lends its
    slot at once, so "c" runs while "b" waits."""
    calls = Calls(1, is_async)
    try:
        calls.submit("a")
        assert calls.started["a"].wait(30)
        b = calls.submit("b")
        calls.stage.pause(b, True)
        calls.submit("c")
        calls.finish("a")
        calls.finish("c")
        assert not calls.ended["b"].is_set()
        calls.finish("b")
        assert calls.order[:2] == ["a starts", "a ends"] and calls.order.index("c ends") < calls.order.index("b ends")
    finally:
        calls.close()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_at_most_lend_max_paused_calls_lend_their_slots_and_a_warning_says_so(is_async, caplog):
    """lend_max = 1, workers = 1: two calls paused lend one slot between them (a warning names the
    stage and LEND_MAX, once: not again as one of them is let go and paused again); a third call
    waits until one of them ends."""
    calls = Calls(1, is_async, lend_max=1)
    try:
        a = calls.submit("a")
        assert calls.started["a"].wait(30)
        calls.stage.pause(a, True)
        b = calls.submit("b")
        assert calls.started["b"].wait(30)
        with caplog.at_level(logging.WARNING, logger="agp.flow"):
            calls.stage.pause(b, True)
            calls.stage.pause(b, False)
            calls.stage.pause(b, True)
        warnings = [r for r in caplog.records if "LEND_MAX" in r.getMessage()]
        assert len(warnings) == 1 and "stage 's'" in warnings[0].getMessage()
        calls.submit("c")
        calls.finish("a")
        calls.finish("c")
        calls.finish("b")
        assert calls.order.index("a ends") < calls.order.index("c starts")
    finally:
        calls.close()


@pytest.mark.parametrize("lend_max", [1, 2])
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_the_lend_max_warning_comes_again_only_after_half_as_many_calls_lend(is_async, lend_max, caplog):
    """workers = 1: lend_max paused calls all lend, no warning; one more paused keeps its slot: a
    warning. Let go down to more than half of lend_max and paused again: no new warning (the same
    stalled readers); let go down to half of lend_max or fewer and paused past it again: a warning
    again (a new crowd of stalled readers is said, not only the first)."""
    calls = Calls(1, is_async, lend_max=lend_max)
    names = [chr(ord("a") + i) for i in range(lend_max + 1)]

    def warnings() -> int:
        return len([r for r in caplog.records if "LEND_MAX" in r.getMessage()])

    def let_go_and_pause_again(n: int) -> None:
        for job in jobs[:n]:
            calls.stage.pause(job, False)
        assert calls.stage.lent == len(jobs) - n
        for job in jobs[:n]:
            calls.stage.pause(job, True)

    try:
        with caplog.at_level(logging.WARNING, logger="agp.flow"):
            jobs = []
            for name in names:
                jobs.append(calls.submit(name))
                assert calls.started[name].wait(30)
                calls.stage.pause(jobs[-1], True)
                assert warnings() == (0 if name != names[-1] else 1)
            let_go_and_pause_again(len(jobs) - (lend_max // 2 + 1))
            assert warnings() == 1
            let_go_and_pause_again(len(jobs) - lend_max // 2)
            assert warnings() == 2
        for name in names:
            calls.finish(name)
    finally:
        calls.close()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_calls_waiting_when_the_running_one_is_paused_take_its_lent_slot_at_once_one_at_a_time(is_async):
    """workers = 1: "b" and "c" wait behind "a"; "a" paused, "b" starts then (not when some later
    call comes or "a" ends) and "c" still waits: one slot lent, one call more. "b" ended, "c"
    takes the lent slot while "a" still waits."""
    calls = Calls(1, is_async)
    try:
        a = calls.submit("a")
        assert calls.started["a"].wait(30)
        calls.submit("b")
        calls.submit("c")
        assert not calls.started["b"].wait(0.2)          # a slot of one: "b" waits
        calls.stage.pause(a, True)
        assert calls.started["b"].wait(30)
        assert not calls.started["c"].wait(0.2)          # one slot lent: "c" waits for "b"
        calls.finish("b")
        calls.finish("c")
        assert not calls.ended["a"].is_set()
        calls.finish("a")
        assert calls.order == ["a starts", "b starts", "b ends", "c starts", "c ends", "a ends"]
    finally:
        calls.close()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_call_paused_twice_lends_one_slot_and_let_go_twice_takes_it_back_once(is_async):
    """A reader's pause said twice is one pause: the stage runs one call more, not two; its let go
    said twice gives back that one (not a slot the stage never had)."""
    calls = Calls(1, is_async)
    try:
        a = calls.submit("a")
        assert calls.started["a"].wait(30)
        calls.stage.pause(a, True)
        calls.stage.pause(a, True)
        assert calls.stage.lent == 1
        calls.submit("b")
        calls.submit("c")
        assert calls.started["b"].wait(30)
        assert not calls.started["c"].wait(0.2)          # one slot lent: "c" waits for "b"
        calls.stage.pause(a, False)
        calls.stage.pause(a, False)
        assert calls.stage.lent == 0
        calls.finish("b")
        assert not calls.started["c"].wait(0.2)          # "a" has its slot back: "c" waits for it
        calls.finish("a")
        calls.finish("c")
        assert calls.order == ["a starts", "b starts", "b ends", "a ends", "c starts", "c ends"]
    finally:
        calls.close()


def stage_threads(name: str) -> int:
    return sum(t.name == f"agp-stage-{name}" for t in threading.enumerate())


def test_the_thread_a_paused_call_lent_ends_once_it_is_let_go():
    """workers = 1 (sync): "b" ran on the thread "a" lent while paused; "a" let go, that idle
    thread ends: the stage is back to one thread, not one per pause it ever had."""
    calls = Calls(1, False, name="lent-thread")
    try:
        a = calls.submit("a")
        assert calls.started["a"].wait(30)
        calls.stage.pause(a, True)
        calls.submit("b")
        calls.finish("b")
        assert stage_threads("lent-thread") == 2
        calls.stage.pause(a, False)
        for _ in range(3000):
            if stage_threads("lent-thread") == 1:
                break
            threading.Event().wait(0.01)
        assert stage_threads("lent-thread") == 1
        calls.finish("a")
    finally:
        calls.close()


@contextlib.contextmanager
def threads_switch_only_when_they_wait():
    """No thread takes the interpreter from another that runs (a 60 s switch interval): only a
    thread that waits lets the others run. What runs between two waits is one step."""
    was = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:
        yield
    finally:
        sys.setswitchinterval(was)


def test_calls_submitted_before_the_idle_threads_wake_each_start_while_the_stage_has_workers_to_spare():
    """workers = 8 (sync), two threads idle after two calls: six calls submitted at once, before
    a woken thread has taken its call, all run at once. Each submit saw a thread idle (one woken
    counted so until it took its call) and started none: two ran and the other four waited
    behind them for as long as they ran (an `agp run` whose python stage held its calls until a
    condition passed them two at a time, minutes each, with 14 of its 16 workers never started)."""
    calls = Calls(8, False, name="burst")
    try:
        with threads_switch_only_when_they_wait():
            for name in ("a", "b"):                  # two threads, each idle as its call ends
                calls.submit(name)
                assert calls.started[name].wait(30)
            calls.finish("a")
            calls.finish("b")
            burst = [f"c{i}" for i in range(6)]
            for name in burst:                       # at once: no thread runs meanwhile
                calls.submit(name)
        deadline = time.monotonic() + 30
        started = [name for name in burst if calls.started[name].wait(max(0.0, deadline - time.monotonic()))]
        assert started == burst, f"of {burst} only {started} started: the rest waited for a thread"
    finally:
        calls.close()
