"""Driving a PipelineRuntime: its host pool, the engines' loops, a whole list of requests
(agp run), draining and closing (agp serve).

A part of PipelineRuntime (flow/runtime.py), in a file of its own: it shares the runtime's
state. `run_all` drives the first engine from the calling thread from the start, so the
engine steps as soon as the first request reaches it; a feeder thread submits the rest.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from .items import PipelineError, Result, no_usage


class Driving:
    """PipelineRuntime's host pool, its loops and its end (mixed into it)."""

    # ---- the host pool ---------------------------------------------------------------
    def _task(self, fn, *args, pool=None) -> None:
        """Run fn(*args) on the host pool (or `pool`: the compile or render threads), counted (see settle())."""
        with self._lock:
            self._tasks += 1

        def run():
            try:
                fn(*args)
            finally:
                with self._lock:
                    self._tasks -= 1
                    if not self._tasks:
                        self._idle.notify_all()
        try:
            (pool or self.pool).submit(run)
        except RuntimeError:                       # the pool is shut down: a late callback ends here
            run()

    def settle(self, timeout: float = 60.0) -> bool:
        """Wait until the host pool has nothing to do."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    def _track(self) -> str:
        ident = threading.get_ident()
        name = self._tracks.get(ident)
        if name is None:
            name = self._tracks.setdefault(ident, f"items/{len(self._tracks)}")
        return name

    # ---- driving -------------------------------------------------------------------------
    def start(self) -> None:
        """Every segment's batching loop on a thread of its own (agp serve)."""
        for es in self.segments:
            es.start(*self._callbacks(es), self._on_segment_failure, self._admissions(es))

    def drive(self) -> None:
        """The first segment's loop driven from this thread, the others from threads of their
        own; returns after close() once the engines are idle."""
        if not self.segments:
            with self._lock:
                while not (self._closing and not len(self.ledger)):
                    self._idle.wait(0.05)
            return
        first, rest = self.segments[0], self.segments[1:]
        for es in rest:
            es.start(*self._callbacks(es), self._on_segment_failure, self._admissions(es))
        try:
            first.drive(*self._callbacks(first), self._admissions(first))
        except BaseException as e:              # noqa: BLE001
            self._on_segment_failure(first, e)
            raise
        for es in rest:
            es.join()

    def run_all(self, requests, on_result: Callable | None = None, keep_open: bool = False,
                stop: threading.Event | None = None, keep_results: bool = True) -> list[Result]:
        """Answer every request (item dicts, or (item, pin) pairs) and close: the first engine is
        driven from this thread from the start (it steps as soon as a request reaches it), a
        feeder keeps the queue at most `max_queue` deep. Returns the results in input order;
        `on_result(i, result)` hears of each as it comes. keep_open: the runtime can run again
        afterwards (a warm-up, then the measured run). stop: once set, no more requests are
        admitted and those in flight are aborted (their results are errors of kind
        "unavailable"; requests never admitted stay None). keep_results=False: each result goes to
        `on_result` only, none is kept (a long batch's memory does not grow with its answers),
        and the list returned is empty; then `requests` may be any iterable, taken
        one at a time as the queue has room (a generator reading its input as the run goes)."""
        if keep_results:
            requests = list(requests)
        results: list[Result | None] = [None] * len(requests) if keep_results else []
        cond = threading.Condition()
        failure: list[BaseException] = []
        stopping = stop if stop is not None else threading.Event()

        class _One:
            def __init__(self, i):
                self.i = i

            def on_done(self, result):
                try:
                    if keep_results:
                        results[self.i] = result
                    if on_result is not None:
                        on_result(self.i, result)
                finally:                             # heard or not (items.deliver logs why), it is over
                    with cond:
                        cond.notify_all()

        def feed():
            try:
                for i, req in enumerate(requests):
                    if keep_results:
                        requests[i] = None           # in flight, the runtime holds it; then none does
                    data, pin = req if isinstance(req, tuple) else (req, None)
                    while not stopping.is_set():
                        with cond:
                            while self.full and not stopping.is_set():
                                cond.wait(0.05)
                        if stopping.is_set():
                            break
                        try:
                            self.submit(data, _One(i), pin=pin)
                        except PipelineError as e:
                            if e.kind == "queue_full":   # filled since the check (a sequence left its
                                continue                 # engine, still in flight): wait, never an answer
                            _One(i).on_done(Result("", data.get("id"), [], e, no_usage(), {}))
                        break
                    if stopping.is_set():
                        break
                while not self.wait_idle(0.1) and not stopping.is_set():
                    pass
            except BaseException as e:           # noqa: BLE001 - raised on the calling thread
                failure.append(e)
            finally:
                self.close(drain=not stopping.is_set(), reason="the run was interrupted")

        feeder = threading.Thread(target=feed, name="agp-feed", daemon=True)
        feeder.start()
        self.drive()
        feeder.join()
        self.settle()                            # results are delivered on the pool
        if keep_open:
            with self._lock:
                self._closing = False
            for es in self.segments:
                es.reopen()
        else:
            self.compile_pool.shutdown(wait=True)
            self.render_pool.shutdown(wait=True)
            self.pool.shutdown(wait=True)
        if failure:
            raise failure[0]
        return results

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is in flight and every result is handed over (True) or the
        timeout passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while len(self.ledger) or self._telling:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(0.05 if left is None else min(left, 0.05))
        return True

    def stop_admitting(self) -> None:
        """New requests are refused (PipelineError unavailable) from now on; those in flight run
        on. close() does it first; a caller that waits for them its own way (agp serve's drain,
        which a second signal cuts short) calls it before waiting. Paused requests go on (pause):
        a drain waits for them to finish, not for their readers."""
        with self._lock:
            self._closing = True
            paused = [req.key for req in self.ledger.live() if req.paused]
        for key in paused:
            self.pause(key, False)

    def close(self, drain: bool = True, timeout: float | None = None,
              reason: str = "the server shut down before this request finished") -> bool:
        """Stop admitting; let what runs finish (drain) or abort it; end the loops. Returns
        whether every request finished (False: some were cut, each failed with `reason`)."""
        self.stop_admitting()
        if drain:
            self.wait_idle(timeout)
        with self._lock:       # finished: none in flight (a result still being handed over is finished)
            finished = not len(self.ledger)
        if not finished:
            with self._lock:
                reqs = self.ledger.live()
            self.cut = len(reqs)
            for req in reqs:
                self._fail(req, PipelineError(reason, "unavailable"))
        # results of requests that ended just before are on their way to their listeners (the
        # host pool): handed over before shutdown() drops what the pool has not started
        self.wait_idle(5.0)
        for es in self.segments:
            es.close()
        return finished

    def shutdown(self) -> None:
        for es in self.segments:
            es.join(5.0)
        for w in self.workers.values():
            w.close()
            w.loop.close()
        self.timer.close()
        self.compile_pool.shutdown(wait=False, cancel_futures=True)
        self.render_pool.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)

