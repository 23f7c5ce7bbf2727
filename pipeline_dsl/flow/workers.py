"""Where user code runs: each stage its own workers, one event loop for `async def`, a
timeout per call, retries with backoff for transient errors.

    workers = StageWorkers("guard", workers=16, timeout=2.0, retries=1, backoff=0.5,
                           timer=Timer(), loop=EventLoop(), events=print)
    workers.submit(lambda: fn(view), done)          # done(ok, value) once, on some thread
    workers.submit(lambda: afn(view), done, is_async=True)

A stage's calls never wait for another stage's: a sync function runs on threads of its
stage (at most `workers` at once, started as needed), a coroutine on the runtime's event
loop under a semaphore of `workers`. A call past `timeout` fails with StageTimeout and
frees its slot at once: a coroutine is cancelled; a thread cannot be stopped, so it is
written off (its result, whenever it comes, is dropped) and a new thread takes its place.
Every exception, BaseException included (SystemExit, KeyboardInterrupt, CancelledError,
GeneratorExit), is the call's result, never the worker's end.

A call whose `alive()` is false when its turn comes (its request ended while it waited for a
worker or for a retry's backoff: a client gone, a deadline) is not made: its result is
`Skipped`, it counts as no call, and the worker serves the next one. Otherwise the calls of
requests nobody waits for any more would hold a slow stage's workers ahead of live ones.

Transient (retried while `retries` last, after backoff * 2**attempt seconds, jittered and at
most 30 s): TimeoutError (StageTimeout included), ConnectionError, pipeline_dsl.Retry, and
an exception carrying an HTTP status 408, 425, 429 or 5xx (`status_code`, `status`, or
`response.status_code`, as httpx, requests and aiohttp errors do). Nothing else is retried.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import threading
import time
from collections import deque
from typing import Any, Callable

import pipeline_dsl

log = logging.getLogger("agp.flow")

MAX_BACKOFF_S = 30.0
TRANSIENT_STATUS = frozenset({408, 425, 429})


class StageTimeout(TimeoutError):
    """A call of a stage ran past the stage's timeout."""


class Skipped(Exception):
    """A call not made: its request had ended before its turn came."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failed call is worth another try (see the module docstring)."""
    if isinstance(exc, (TimeoutError, ConnectionError, pipeline_dsl.Retry)):
        return True
    if not isinstance(exc, Exception):
        return False
    for status in (getattr(exc, "status_code", None), getattr(exc, "status", None),
                   getattr(getattr(exc, "response", None), "status_code", None)):
        if isinstance(status, int) and not isinstance(status, bool) and (
                status in TRANSIENT_STATUS or 500 <= status <= 599):
            return True
    return False


def backoff_delay(backoff: float, attempt: int) -> float:
    """Seconds before retry number `attempt` (1, 2, ...): doubling, jittered into [½, 1]."""
    return min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)


class _Handle:
    __slots__ = ("cancelled",)

    def __init__(self):
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timer:
    """One thread that runs callbacks at their deadlines (timeouts, retry backoffs)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def later(self, delay: float, fn: Callable[[], Any]) -> _Handle:
        handle = _Handle()
        with self._cv:
            heapq.heappush(self._heap, (self.clock() + max(delay, 0.0), next(self._seq), fn, handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="agp-timer", daemon=True)
                self._thread.start()
            self._cv.notify()
        return handle

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._heap or self._heap[0][0] > self.clock()):
                    self._cv.wait(None if not self._heap else max(self._heap[0][0] - self.clock(), 0.0))
                if self._closed:
                    return
                _, _, fn, handle = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            try:
                fn()
            except Exception:                     # noqa: BLE001 - one callback's bug must not stop the clock
                log.exception("a timer callback failed")

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()


class EventLoop:
    """The runtime's event loop, on a thread of its own, started at first use."""

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="agp-async", daemon=True)
                self._thread.start()
            return self._loop

    def submit(self, coro):
        """Schedule a coroutine; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def wait(self, awaitable) -> Any:
        """Await on the loop from a worker thread (a sync function that returned an awaitable)."""
        async def one():
            return await awaitable
        return self.submit(one()).result()

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)


async def _guarded(fn: Callable[[], Any]) -> tuple[bool, Any]:
    """(ok, value or exception) of awaiting fn(): caught inside the task, because a task that
    raises SystemExit or KeyboardInterrupt would stop the event loop itself."""
    try:
        return True, await fn()
    except BaseException as e:                    # noqa: BLE001 - the call's own, whatever it is
        return False, e


class _Job:
    __slots__ = ("fn", "done", "is_async", "alive", "attempt", "token")

    def __init__(self, fn, done, is_async, alive):
        self.fn, self.done, self.is_async, self.alive = fn, done, is_async, alive
        self.attempt = 0
        self.token: object | None = None          # the run in progress; None: none (or written off)


class StageWorkers:
    """One stage's calls: at most `workers` at once, a timeout each, retries (module docstring).
    `events(name, seconds, ok)` hears each "call" (with its duration), "timeout" and "retry"."""

    def __init__(self, name: str, *, workers: int = 16, timeout: float = 0.0, retries: int = 0,
                 backoff: float = 0.5, timer: Timer, loop: EventLoop,
                 events: Callable[[str, float, bool], None] = lambda *a: None):
        self.name, self.workers, self.timeout = name, max(1, int(workers)), float(timeout or 0.0)
        self.retries, self.backoff = int(retries or 0), float(backoff or 0.0)
        self.timer, self.loop, self.events = timer, loop, events
        self._cv = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._live = 0                            # threads serving this stage (written-off ones excluded)
        self._idle = 0
        self._closed = False
        self._sem: asyncio.Semaphore | None = None

    def submit(self, fn: Callable[[], Any], done: Callable[[bool, Any], None], is_async: bool = False,
               alive: Callable[[], bool] | None = None) -> None:
        """Run fn() (is_async: await fn()) on this stage; done(ok, value or exception) once.
        alive(): whether the call is still wanted when its turn comes (else done(False, Skipped))."""
        self._start(_Job(fn, done, is_async, alive))

    def _skip(self, job: _Job) -> bool:
        """Whether the job is no longer wanted: then it is done with Skipped, as no call."""
        if job.alive is None or job.alive():
            return False
        job.done(False, Skipped("its request ended before the call"))
        return True

    def _start(self, job: _Job) -> None:
        job.attempt += 1
        if job.is_async:
            self.loop.submit(self._arun(job))
            return
        with self._cv:
            self._queue.append(job)
            if self._idle == 0 and self._live < self.workers:
                self._spawn()
            self._cv.notify()

    def _spawn(self) -> None:
        self._live += 1
        threading.Thread(target=self._work, name=f"agp-stage-{self.name}", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._cv:
                self._idle += 1
                while not self._queue and not self._closed:
                    self._cv.wait()
                self._idle -= 1
                if not self._queue:
                    self._live -= 1
                    return
                job = self._queue.popleft()
            if self._skip(job):
                continue
            with self._cv:
                token = job.token = object()
            handle = self.timer.later(self.timeout, lambda: self._expire(job, token)) if self.timeout else None
            t0 = time.perf_counter()
            try:
                value, ok = job.fn(), True
            except BaseException as e:            # noqa: BLE001 - every exception is the call's own
                value, ok = e, False
            if handle is not None:
                handle.cancel()
            with self._cv:
                written_off = job.token is not token
                if not written_off:
                    job.token = None
            if written_off:                       # timed out: the slot went to a new thread
                return
            self._after(job, ok, value, time.perf_counter() - t0)

    def _expire(self, job: _Job, token: object) -> None:
        with self._cv:
            if job.token is not token:
                return
            job.token = None
            self._live -= 1
            if self._queue and self._live < self.workers:
                self._spawn()
        self.events("timeout", 0.0, False)
        self._after(job, False, StageTimeout(f"it took longer than its timeout ({self.timeout:g}s)"),
                    self.timeout)

    async def _arun(self, job: _Job) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.workers)
        async with self._sem:
            if self._skip(job):
                return
            t0 = time.perf_counter()
            try:
                task = asyncio.ensure_future(_guarded(job.fn))
                await asyncio.wait({task}, timeout=self.timeout or None)
                if task.done():
                    ok, value = task.result()
                else:
                    task.cancel()
                    self.events("timeout", 0.0, False)
                    value, ok = StageTimeout(f"it took longer than its timeout ({self.timeout:g}s)"), False
            except BaseException as e:            # noqa: BLE001 - CancelledError from the function included
                value, ok = e, False
        self._after(job, ok, value, time.perf_counter() - t0)

    def _after(self, job: _Job, ok: bool, value: Any, seconds: float) -> None:
        self.events("call", seconds, ok)
        if not ok and job.attempt <= self.retries and not self._closed and is_transient(value):
            self.events("retry", 0.0, False)
            self.timer.later(backoff_delay(self.backoff, job.attempt), lambda: self._start(job))
            return
        job.done(ok, value)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
