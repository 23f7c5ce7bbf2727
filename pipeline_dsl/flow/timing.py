"""The clocks user code is run against: one timer thread for every deadline (timeouts, retry
backoffs, event-loop probes), an event loop on a thread of its own (one per stage that runs
`async def`), and a stream call's `Stretch` (its own time, not its wait for chunks).

    timer = Timer()
    handle = timer.later(2.0, lambda: print("due"))    # handle.cancel() before it is due
    loop = EventLoop()                                  # started at first use
    future = loop.submit(coro)                          # a concurrent.futures.Future
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("agp.flow")


class Handle:
    __slots__ = ("cancelled", "_timer")

    def __init__(self, timer: "Timer | None" = None):
        self.cancelled = False
        self._timer = timer                      # while its entry is in the timer's heap

    def cancel(self) -> None:
        timer = self._timer
        if timer is None:                         # not (or no longer) in a heap
            self.cancelled = True
        else:
            timer._cancel(self)


# A cancelled entry stays in the heap until the heap is compacted (or it comes due): with a
# 60 s timeout on thousands of calls a second, each cancelled when its call returns, the heap
# would otherwise hold rate × timeout dead entries. Compact once the dead outnumber the live
# (as asyncio's loop does with its _timer_cancelled_count), so the heap stays O(live timers)
# and each compaction's O(n) is paid for by the n/2 cancels before it.
_COMPACT_MIN = 64


class Timer:
    """One thread that runs callbacks at their deadlines (timeouts, retry backoffs)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._dead = 0                            # cancelled entries still in the heap

    def later(self, delay: float, fn: Callable[[], Any]) -> Handle:
        handle = Handle(self)
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
                handle._timer = None
                if handle.cancelled:
                    self._dead -= 1
            if handle.cancelled:
                continue
            try:
                fn()
            except Exception:                     # noqa: BLE001 - one callback's bug must not stop the clock
                log.exception("a timer callback failed")

    def _cancel(self, handle: Handle) -> None:
        # Under the lock, so the count of dead entries agrees with the heap's pops.
        with self._cv:
            if handle.cancelled:
                return
            handle.cancelled = True
            if handle._timer is not self:         # already popped: not in the heap any more
                return
            self._dead += 1
            if self._dead > _COMPACT_MIN and 2 * self._dead > len(self._heap):
                for entry in self._heap:
                    if entry[3].cancelled:
                        entry[3]._timer = None
                self._heap = [entry for entry in self._heap if not entry[3].cancelled]
                heapq.heapify(self._heap)
                self._dead = 0
                self._cv.notify()                 # the earliest deadline may have changed

    def pending(self) -> int:
        """Entries in the heap, cancelled ones not yet compacted away included."""
        with self._cv:
            return len(self._heap)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()


class EventLoop:
    """A stage's event loop, on a thread of its own, started at first use."""

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

    def wait(self, awaitable, timeout: float | None = None, late: Callable[[], BaseException] | None = None) -> Any:
        """Await on the loop from a worker thread (a sync function that returned an awaitable);
        past `timeout` seconds the awaitable is cancelled and `late()` raised."""
        import concurrent.futures

        async def one():
            return await awaitable
        future = self.submit(one())
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise (late() if late is not None else TimeoutError(f"not done in {timeout:g}s")) from None

    def close(self, timeout: float = 1.0) -> None:
        """Cancel what still runs on the loop and let it end (up to `timeout` seconds), then stop
        and close the loop. Stopping it alone left a call in flight (one cut at shutdown) pending
        on a dropped loop: "Task was destroyed but it is pending!" once collected. A coroutine that
        ignores its cancellation, or blocks the loop, past `timeout` is left as it is."""
        with self._lock:
            loop, thread, self._loop = self._loop, self._thread, None
        if loop is None:
            return

        async def finish() -> None:
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)
            await loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):       # a loop blocked past the timeout: stopped all the same
            asyncio.run_coroutine_threadsafe(finish(), loop).result(timeout + 1)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()


class Stretch:
    """The user code's own time in a stream call: it runs from each chunk the function is handed
    (or the call's start) and stops while the function waits for the next chunk, so a stage's
    timeout bounds the function's work per chunk, never the wait for the engine's tokens."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.since = clock()
        self.waiting = False

    def wait(self) -> None:
        self.waiting = True

    def run(self) -> None:
        self.since, self.waiting = self.clock(), False

    def left(self, timeout: float) -> float | None:
        """Seconds of the timeout left now; None while the function waits for a chunk."""
        return None if self.waiting else self.since + timeout - self.clock()
