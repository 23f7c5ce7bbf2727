"""Where user code runs: each stage its own workers and event loop for `async def`, a timeout
per call, retries with backoff for transient errors, a cap on stuck calls.

    workers = StageWorkers("guard", workers=16, timeout=2.0, retries=1, backoff=0.5,
                           timer=Timer(), loop=EventLoop(), events=print)
    workers.submit(lambda: fn(view), done)          # done(ok, value) once, on some thread
    workers.submit(lambda: afn(view), done, is_async=True)

A stage's calls never wait for another stage's: a sync function runs on threads of its
stage (at most `workers` at once, started as needed: a call waits for a thread only while
`workers` calls run, however many are submitted at once), a coroutine on the stage's event loop
(at most `workers` at once), so an `async def` that blocks its loop stalls its own stage
only; a probe on the timer names it in a warning once the loop has not turned for STALL_S.
Timeouts are armed on the timer thread, so they fire even while a loop is blocked. A call
past `timeout` fails with StageTimeout and frees its slot at once: a coroutine is cancelled;
a thread cannot be stopped, so it is written off (its result, whenever it comes, is dropped)
and a new thread takes its place. `abandon()` writes off the running calls whose request has
ended the same way. A written-off call whose code still runs is stuck; it is hung once it has
run past the stage's timeout (a timed-out call at once, a call whose request ended when its
timeout passes; a coroutine once it has ignored its cancellation for STALL_S). At `workers`
hung calls the stage fails its new and waiting calls at once with StageStuck, until they
return; a stage never has more than 2 × workers threads (stuck ones included; plus one per
slot lent, below): past that its calls wait. Without a timeout nothing is hung: a slow call
whose client left is not a fault
of the stage, and the calls after it wait for a thread as they would behind a busy one. With a `Stretch` (stream stages) the timeout bounds the function's own
time per chunk: its clock stops while the function waits for the next chunk.
Every exception, BaseException included (SystemExit, KeyboardInterrupt, CancelledError,
GeneratorExit), is the call's result, never the worker's end.

`pause(call, True)`: the call's request is paused by its reader (a stream call waiting for
chunks its paused generation does not make), so it lends its slot back: while it runs paused
the stage runs one more call at once (one more thread, or coroutine) than `workers`, so
stalled readers never hold the stage from other requests, as a paused sequence gives its KV
blocks back. At most LEND_MAX calls lend at once (a thread each, for a sync function; a
warning says when that is reached: the next paused ones keep their slots). Let go
(`pause(call, False)`), the call goes on at once and takes its slot back: until as many calls
have ended, the stage runs more than `workers` (its threads end as they come free).

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

import logging
import random
import threading
import time
from collections import deque
from typing import Any, Callable

import pipeline_dsl

from .timing import EventLoop, Handle, Stretch, Timer

__all__ = ["EventLoop", "LEND_MAX", "Skipped", "StageStuck", "StageTimeout", "StageWorkers", "Stretch", "Timer",
           "backoff_delay", "is_transient"]

log = logging.getLogger("agp.flow")

MAX_BACKOFF_S = 30.0
PROBE_S = 0.25                      # how often a stage's event loop is probed while its calls run
STALL_S = 1.0                       # a probe waiting this long: a coroutine blocks the loop
LEND_MAX = 256                      # calls of paused requests a stage runs beyond its workers, at most
TRANSIENT_STATUS = frozenset({408, 425, 429})


class StageTimeout(TimeoutError):
    """A call of a stage ran past the stage's timeout."""


class StageStuck(Exception):
    """A stage has as many stuck calls as it may: its new calls fail at once."""


class Skipped(Exception):
    """A call not made: its request had ended before its turn came."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failed call is worth another try (see the module docstring). A Reject never is,
    whatever its status: it is the function's answer (`Reject("over the limit", status=429)`), and
    another try would run the function, and count against the limit, again."""
    if isinstance(exc, pipeline_dsl.Reject):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, pipeline_dsl.Retry)):
        return True
    if not isinstance(exc, Exception):
        return False
    for path in (("status_code",), ("status",), ("response", "status_code")):
        status = _attribute(exc, path)
        if isinstance(status, int) and not isinstance(status, bool) and (
                status in TRANSIENT_STATUS or 500 <= status <= 599):
            return True
    return False


def _attribute(obj, path: tuple[str, ...]):
    """obj.a.b, or None: the user's exception may compute an attribute that raises (a property
    of a response not yet set), and its call must still fail as its own error."""
    for name in path:
        try:
            obj = getattr(obj, name, None)
        except Exception:                          # noqa: BLE001 - the user's property: no status there
            return None
    return obj


def backoff_delay(backoff: float, attempt: int) -> float:
    """Seconds before retry number `attempt` (1, 2, ...): doubling, jittered into [½, 1]."""
    return min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)


async def _guarded(fn: Callable[[], Any]) -> tuple[bool, Any]:
    """(ok, value or exception) of awaiting fn(): caught inside the task, because a task that
    raises SystemExit or KeyboardInterrupt would stop the event loop itself."""
    try:
        return True, await fn()
    except BaseException as e:                    # noqa: BLE001 - the call's own, whatever it is
        return False, e


class _Job:
    __slots__ = ("fn", "done", "is_async", "alive", "stretch", "attempt", "token", "future", "timeout",
                 "paused")

    def __init__(self, fn, done, is_async, alive, stretch):
        self.fn, self.done, self.is_async, self.alive, self.stretch = fn, done, is_async, alive, stretch
        self.attempt = 0
        self.token: object | None = None          # the run in progress; None: none (or written off)
        self.future = None                        # an async run's concurrent.futures.Future
        self.timeout: Handle | None = None       # the run's timeout on the timer
        self.paused = False                       # its request is paused: while it runs, its slot is lent


class StageWorkers:
    """One stage's calls: at most `workers` at once, a timeout each, retries, at most `workers`
    stuck calls, slots lent by paused calls (module docstring). `events(name, seconds, ok)` hears each "call" (with its
    duration), "timeout", "retry" and "stall" (its event loop was blocked)."""

    def __init__(self, name: str, *, workers: int = 16, timeout: float = 0.0, retries: int = 0,
                 backoff: float = 0.5, timer: Timer, loop: EventLoop,
                 events: Callable[[str, float, bool], None] = lambda *a: None, lend_max: int = LEND_MAX):
        self.name, self.workers, self.timeout = name, max(1, int(workers)), float(timeout or 0.0)
        self.lend_max = max(0, int(lend_max))
        self.retries, self.backoff = int(retries or 0), float(backoff or 0.0)
        self.timer, self.loop, self.events = timer, loop, events
        self.max_stuck = self.workers             # stuck calls before new ones fail fast
        self._cv = threading.Condition()
        self._queue: deque[_Job] = deque()        # sync calls waiting for a thread
        self._aqueue: deque[_Job] = deque()       # async calls waiting for a slot
        self._live = 0                            # threads serving this stage (written-off ones excluded)
        self._idle = 0
        self._abusy = 0                           # async calls running (written-off ones excluded)
        self._lent = {False: 0, True: 0}          # running calls that lend their slot (paused), sync / async
        self._warned = False                      # the lend_max warning given, until half as many lend
        self._running: dict[object, _Job] = {}    # token -> the call it runs
        self._off: set[object] = set()            # stuck: written-off runs whose code still runs
        self._overdue: set[object] = set()        # hung: those of them past their timeout (the cap)
        self._cancelling: set[object] = set()     # cancelled coroutines still running, not yet stuck
        self._closed = False
        self._probing = False
        self._ping: float | None = None           # when the loop's probe was posted; None: it ran

    @property
    def lent(self) -> int:
        """Running calls whose request is paused, that lend their slot back (at most lend_max count)."""
        return self._lent[False] + self._lent[True]

    @property
    def slots_lent(self) -> int:
        """Worker slots lent now by paused calls: the calls beyond `workers` the stage may run
        (of `lent`, at most lend_max for its threads and lend_max for its event loop)."""
        with self._cv:
            return self._lends(False) + self._lends(True)

    def _lends(self, is_async: bool) -> int:
        """(under the lock) Slots lent by the paused calls of one kind: at most lend_max."""
        return min(self._lent[is_async], self.lend_max)

    def _cap(self, is_async: bool) -> int:
        """(under the lock) Calls at once: `workers`, plus one for each running paused call."""
        return self.workers + self._lends(is_async)

    @property
    def stuck(self) -> int:
        """Calls written off (timed out, or their request ended) whose code is still running."""
        return len(self._off)

    def submit(self, fn: Callable[[], Any], done: Callable[[bool, Any], None], is_async: bool = False,
               alive: Callable[[], bool] | None = None, stretch: Stretch | None = None) -> object:
        """Run fn() (is_async: await fn()) on this stage; done(ok, value or exception) once.
        alive(): whether the call is still wanted (before its turn: else done(False, Skipped); while
        it runs: else it is written off). stretch: the timeout counts only its running time.
        Returns the call, for pause()."""
        job = _Job(fn, done, is_async, alive, stretch)
        self._start(job)
        return job

    def pause(self, call: object, paused: bool) -> None:
        """The call's request is paused by its reader (True) or let go (False): while it runs
        paused its slot is lent to the calls waiting (module docstring). Its retries and a run
        that starts later lend as well, until it is let go."""
        job = call
        assert isinstance(job, _Job)
        with self._cv:
            if job.paused == paused:
                return
            job.paused = paused
            if job.token is None:                 # not running: counted when it starts
                return
            self._lend(job, 1 if paused else -1)
            self._cv.notify_all()                 # idle threads beyond the stage's calls end
        if job.is_async and paused:
            self._take_async()

    def _lend(self, job: _Job, n: int) -> None:
        """(under the lock) A running call starts (n = 1) or stops (-1) lending its slot; a sync
        call's lent slot goes to a new thread when calls wait and no thread is idle."""
        self._lent[job.is_async] += n
        if n > 0:
            self._spawn_if_waiting(job)
        if self.lent > self.lend_max and not self._warned:
            self._warned = True                   # once, until half as many lend: not at each crossing
            log.warning("stage '%s': %d of its calls are paused by their readers; at most %d lend their "
                        "worker to other requests (LEND_MAX): the stage's new calls wait for the rest",
                        self.name, self.lent, self.lend_max)
        elif self.lent <= self.lend_max // 2:
            self._warned = False

    def _spawn_if_waiting(self, job: _Job) -> None:
        """(under the lock) A sync stage's calls wait, more of them than idle threads: a new thread takes one."""
        if not job.is_async and self._more_waiting():
            self._spawn()

    def _more_waiting(self) -> bool:
        """(under the lock) More calls wait than the idle threads take: each takes one as it
        wakes, and a thread woken but not yet running counts as idle still, so calls submitted
        at once beyond them need threads of their own (else they wait behind the running calls,
        for as long as those block, while the stage has workers to spare)."""
        return len(self._queue) > self._idle

    def _take_async(self) -> None:
        """Async slots lent: the calls waiting take them."""
        while True:
            with self._cv:
                if not self._aqueue or self._abusy >= self._cap(True):
                    return
                job = self._aqueue.popleft()
                self._abusy += 1
            self._launch(job)

    def _skip(self, job: _Job) -> bool:
        """Whether the job is no longer wanted: then it is done with Skipped, as no call."""
        if job.alive is None or job.alive():
            return False
        job.done(False, Skipped("its request ended before the call"))
        return True

    def _refuse(self, job: _Job) -> bool:
        """Whether the stage has as many hung calls as it may: then the job fails at once."""
        n = len(self._overdue)
        if n < self.max_stuck:
            return False
        calls = ("calls is still stuck (past its timeout, its" if n == 1 else
                 "calls are still stuck (past their timeout, their")
        job.done(False, StageStuck(f"{n} of its {calls} code still running; at most {self.max_stuck}, its workers); "
                                   "it takes calls again as they return"))
        return True

    def _start(self, job: _Job) -> None:
        job.attempt += 1
        if job.is_async:
            with self._cv:
                if self._abusy >= self._cap(True):
                    self._aqueue.append(job)
                    return
                self._abusy += 1
            self._launch(job)
            return
        if self._refuse(job):
            return
        with self._cv:
            self._queue.append(job)
            if self._more_waiting():
                self._spawn()
            self._cv.notify()

    def _spawn(self) -> None:
        """(under the lock) One more thread, while the stage has fewer than `workers` serving and
        fewer than 2 × workers in all (the stuck ones included), each plus the slots lent."""
        cap = self._cap(False)
        if self._live >= cap or self._live + len(self._off) >= cap + self.workers:
            return
        self._live += 1
        threading.Thread(target=self._work, name=f"agp-stage-{self.name}", daemon=True).start()

    def _begin(self, job: _Job) -> object:
        """(under the lock) The job's run starts: its token, and its timeout armed."""
        token = job.token = object()
        self._running[token] = job
        if job.paused:
            self._lend(job, 1)
        if job.stretch is not None:
            job.stretch.run()
        if self.timeout:
            job.timeout = self.timer.later(self.timeout, lambda: self._expire(job, token))
        return token

    def _end(self, job: _Job, token: object) -> bool:
        """(under the lock) The job's run returned: whether it had been written off meanwhile."""
        if job.token is not token:
            self._cancelling.discard(token)
            self._off.discard(token)
            self._overdue.discard(token)
            self._spawn_if_waiting(job)           # calls that waited for the thread budget
            return True
        if job.paused:
            self._lend(job, -1)
        job.token = None
        del self._running[token]
        if job.timeout is not None:
            job.timeout.cancel()
        return False

    def _work(self) -> None:
        while True:
            with self._cv:
                self._idle += 1
                while not self._queue and not self._closed and self._live <= self._cap(False):
                    self._cv.wait()
                self._idle -= 1
                if not self._queue or self._live > self._cap(False):    # closed, or its slot lent no more
                    self._live -= 1
                    if self._queue:
                        self._cv.notify()         # the next thread takes the call
                    return
                job = self._queue.popleft()
            if self._skip(job) or self._refuse(job):
                continue
            with self._cv:
                token = self._begin(job)
            t0 = time.perf_counter()
            try:
                value, ok = job.fn(), True
            except BaseException as e:            # noqa: BLE001 - every exception is the call's own
                value, ok = e, False
            with self._cv:
                written_off = self._end(job, token)
            if written_off:                       # its slot went to a new thread
                return
            self._after(job, ok, value, time.perf_counter() - t0)

    def _launch(self, job: _Job) -> None:
        """An async job has a slot: run it on the stage's loop (or pass the slot on)."""
        if self._skip(job) or self._refuse(job):
            self._release()
            return
        self._run_async(job)

    def _run_async(self, job: _Job) -> None:
        with self._cv:
            token = self._begin(job)
            job.future = self.loop.submit(self._arun(job, token))
        self._watch()
        if job.paused:                            # it started paused: its slot is lent
            self._take_async()

    def _release(self) -> None:
        """An async slot is free: the next waiting job that is still wanted takes it (unless the
        slot was lent and is lent no more)."""
        while True:
            with self._cv:
                if not self._aqueue or self._abusy > self._cap(True):
                    self._abusy -= 1
                    return
                job = self._aqueue.popleft()
            if not (self._skip(job) or self._refuse(job)):
                self._run_async(job)
                return

    async def _arun(self, job: _Job, token: object) -> None:
        t0 = time.perf_counter()
        ok, value = await _guarded(job.fn)
        with self._cv:
            written_off = self._end(job, token)
        if written_off:
            return
        self._release()
        self._after(job, ok, value, time.perf_counter() - t0)

    def _write_off(self, job: _Job, token: object, overdue: bool) -> bool:
        """(under the lock) Give up a running call: its slot is free at once; its code, if it
        goes on running, counts as stuck until it returns (a thread cannot be stopped; a
        coroutine is cancelled, and counts once it has ignored that for STALL_S). `overdue`:
        it ran past its timeout (else its request ended; its timeout, still armed, may make it
        overdue later)."""
        if job.token is not token:
            return False
        if job.paused:
            self._lend(job, -1)
        job.token = None
        del self._running[token]
        if job.is_async:
            job.future.cancel()
            self._cancelling.add(token)
            self.timer.later(STALL_S, lambda: self._late(token))
        else:
            self._off.add(token)
            if overdue:
                self._overdue.add(token)
            self._live -= 1
            if self._queue:
                self._spawn()
        return True

    def _refuse_waiting(self) -> None:
        """The stage is full of hung calls: the calls waiting for it fail now, not when a
        worker frees (none may, while their code hangs)."""
        while len(self._overdue) >= self.max_stuck:
            with self._cv:
                if not (self._queue or self._aqueue):
                    return
                job = (self._queue or self._aqueue).popleft()
            if not self._skip(job):
                self._refuse(job)

    def _late(self, token: object) -> None:
        """A cancelled coroutine still runs STALL_S later: it counts as stuck."""
        with self._cv:
            if token in self._cancelling:         # it ignored its cancellation: stuck, and hung
                self._cancelling.discard(token)
                self._off.add(token)
                self._overdue.add(token)

    def _expire(self, job: _Job, token: object) -> None:
        with self._cv:
            if job.token is not token:            # written off meanwhile (its request ended)
                late = token in self._off and token not in self._overdue
                if late:                          # ... and its code still runs past its timeout: hung
                    self._overdue.add(token)
            else:
                late = None
        if late is not None:
            if late:
                self._refuse_waiting()
            return
        with self._cv:
            if job.token is not token:
                return
            left = job.stretch.left(self.timeout) if job.stretch is not None else 0.0
            if left is None or left > 0:          # a stream function waiting for chunks, or not due
                job.timeout = self.timer.later(self.timeout if left is None else left,
                                               lambda: self._expire(job, token))
                return
            self._write_off(job, token, overdue=True)
        if job.is_async:
            self._release()
        self._refuse_waiting()
        self.events("timeout", 0.0, False)
        self._after(job, False, StageTimeout(f"it took longer than its timeout ({self.timeout:g}s)"),
                    self.timeout)

    def abandon(self) -> int:
        """Write off the running calls whose request has ended (alive() false): they are done
        with Skipped and their slots serve the next calls. Returns how many."""
        with self._cv:
            gone = [(job, token) for token, job in self._running.items()
                    if job.alive is not None and not job.alive()]
            gone = [(job, token) for job, token in gone if self._write_off(job, token, overdue=False)]
        for job, _ in gone:
            if job.is_async:
                self._release()
            job.done(False, Skipped("its request ended during the call"))
        self._refuse_waiting()
        return len(gone)

    def _watch(self) -> None:
        """Probe the stage's event loop while its calls run: a coroutine that blocks it (a
        time.sleep in an `async def`) is named in a warning, as asyncio's debug mode would."""
        with self._cv:
            if self._probing:
                return
            self._probing = True
        self.timer.later(PROBE_S, self._probe)

    def _probe(self) -> None:
        now = self.timer.clock()
        with self._cv:
            if self._closed:                      # its loop may be closed: asking for it would start one
                self._probing = False
                return
            ping, warn = self._ping, False
            if ping is None:
                self._ping = now
            elif now - ping >= STALL_S and ping > 0:
                warn, self._ping = True, -1.0     # warned for this stall; the pong clears it
            again = (self._abusy > 0 or self._ping is not None) and not self._closed
            self._probing = again
        if ping is None:
            try:
                self.loop.loop.call_soon_threadsafe(self._pong)
            except RuntimeError:                  # the loop is closed
                with self._cv:
                    self._probing = False
                return
        if warn:
            log.warning("stage '%s': an async call blocked its event loop for %.1fs or more (a blocking "
                        "call such as time.sleep in an `async def`?); the stage's other async calls "
                        "waited meanwhile", self.name, now - ping)
            self.events("stall", now - ping, False)
        if again:
            self.timer.later(PROBE_S, self._probe)

    def _pong(self) -> None:
        with self._cv:
            self._ping = None

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
