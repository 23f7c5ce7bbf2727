"""The one thread that runs the engine's torch work on CPU.

    runner = on_compute(load_runner, config)      # the model loads on it
    logits = on_compute(runner.execute, items)    # and every forward and sampling runs on it

Why one thread. torch's CPU kernels and the native ones (native/kernels.cpp) share one
OpenMP runtime, libgomp. libgomp gives each thread that opens a parallel region a pool of
worker threads of its own, kept until that thread exits, and while all pools together hold
more threads than the process has CPUs it stops spinning at barriers: every barrier becomes
a futex sleep and wake-up. A native decode step has ~150 barriers, so when the model was
loaded on one thread (its pool stays) and the forward ran on another, a 6-8 ms step took
~11 ms (measured: ~130 voluntary context switches a token against 0 with a single pool).
Running all of it on one long-lived thread keeps one pool, whichever thread drives the
engine (`agp run`'s main thread, `agp serve`'s segment threads, a test's thread).

The thread is process-wide (every engine of the process hands its work to it): two forwards
at once would each want every core anyway. A call from the compute thread itself runs
directly. Each call carries the caller's torch thread count (`torch.set_num_threads` sets
it per thread) and grad / inference mode, and applies them on the compute thread.
"""
from __future__ import annotations

import _thread
import queue
import threading
from typing import Any, Callable

import torch

_lock = threading.Lock()
_thread_obj: threading.Thread | None = None
_tasks: "queue.SimpleQueue" = queue.SimpleQueue()


class _Call:
    __slots__ = ("fn", "args", "kwargs", "threads", "grad", "inference", "done", "result", "error")

    def __init__(self, fn, args, kwargs):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.threads = torch.get_num_threads()            # the caller's (per-thread) setting
        self.grad = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()
        self.done = _thread.allocate_lock()
        self.done.acquire()                               # released by the compute thread
        self.result: Any = None
        self.error: BaseException | None = None


def _loop() -> None:
    while True:
        call = _tasks.get()
        try:
            if torch.get_num_threads() != call.threads:
                torch.set_num_threads(call.threads)
            if call.grad and not call.inference and torch.is_grad_enabled() and \
                    not torch.is_inference_mode_enabled():
                call.result = call.fn(*call.args, **call.kwargs)   # the modes asked are this thread's
            else:
                with torch.inference_mode(call.inference), torch.set_grad_enabled(call.grad):
                    call.result = call.fn(*call.args, **call.kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            call.error = e
        finally:
            call.done.release()
            call = None


def compute_thread() -> threading.Thread:
    """The compute thread (started on first use)."""
    global _thread_obj
    with _lock:
        if _thread_obj is None or not _thread_obj.is_alive():
            _thread_obj = threading.Thread(target=_loop, name="agp-torch", daemon=True)
            _thread_obj.start()
        return _thread_obj


def on_compute_thread() -> bool:
    """Whether the calling thread is the compute thread."""
    t = _thread_obj
    return t is not None and t.ident == threading.get_ident()


def on_compute(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) on the compute thread; its result, or its exception raised here."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    compute_thread()
    call = _Call(fn, args, kwargs)
    _tasks.put(call)
    call.done.acquire()
    if call.error is not None:
        raise call.error
    return call.result


class Contention:
    """Whether the cores are contended now: the steps left to run on one thread, and the next
    stretch's length. One per process on CPU (`CPU_CONTENTION`), shared by every engine's guard:
    contention is a state of the machine, not of one model. With two engines in one pipeline
    (a small -> big cascade, two generate stages routed side by side) their steps alternate on
    the compute thread; with a guard each, the one that saw a slowed step went to one thread
    while the other kept both threads on barriers that wait for a descheduled thread, and its
    steps took many times longer (a step's first time, taken while the cores were contended, is
    also its best: that engine never saw a step `SLOW` times slower)."""

    __slots__ = ("solo", "period")

    def __init__(self, period: int):
        self.solo = 0                  # steps left to run on one thread
        self.period = period           # the next solo stretch


class ContentionGuard:
    """Runs a step on one thread for a while after a step that another process slowed down.

    With a single OpenMP pool, libgomp spins at barriers (above): the fastest a step gets on a
    quiet machine, and the slowest once another process takes a core, since each of the
    step's barriers (~150 a native step, ~250 parallel regions an eager batch-32 step) then
    waits for a descheduled thread: a 40 ms step took 1-3 s. So every step is timed against
    the fastest seen for its kind and size; one `SLOW` times slower makes the next steps run on
    one thread (no barriers: ~1.6x slower when quiet, many times faster when busy), `SOLO_STEPS`
    of them (`TRIAL_STEPS` the first time, which times the step on one thread), doubling up to
    `MAX_SOLO` while the steps in between stay slow, and slower than the same step's latest time
    on one thread: the native step's barriers sleep rather than spin
    (native/kernels.cpp), and with other processes' threads holding the cores its steps on all
    threads were ~2x faster than on one (they get a share of the cores per thread: 25-56 ms
    against 71-92 ms beside two `yes` hogs on 2 cores, docs/engine_benchmarks.md).

        guard = ContentionGuard()
        out = guard.run(("decode", 32), fn, *args)     # fn(*args) on all threads, or on one

    Each runner keeps its own best times (two models' steps differ); the solo stretch is the
    `contention` state it shares (the runner passes `CPU_CONTENTION`: every engine of the
    process goes to one thread together, and comes back together). Without one, a guard has a
    state of its own.
    """

    SOLO_STEPS = 64
    TRIAL_STEPS = 4                # the first stretch of a step not yet timed on one thread
    MAX_SOLO = 1024
    SLOW = 3.0

    def __init__(self, clock: Callable[[], float] | None = None, contention: Contention | None = None):
        import time

        self.clock = clock or time.perf_counter
        self.best: dict = {}           # key -> fastest step seen with all threads
        self.solo_time: dict = {}      # key -> its latest step on one thread
        self.contention = contention if contention is not None else Contention(self.SOLO_STEPS)
        self.solo_steps = 0            # steps this guard ran on one thread (stats)

    def run(self, key, fn: Callable, *args, solo: bool = True):
        """fn(*args), on one thread while a stretch lasts; solo=False: on every thread anyway (a
        step whose arithmetic would change on one thread), timed as any other."""
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args)
        c = self.contention
        if c.solo > 0 and solo:
            c.solo -= 1
            self.solo_steps += 1
            torch.set_num_threads(1)
            try:
                t = self.clock()
                out = fn(*args)
                self.solo_time[key] = self.clock() - t
                return out
            finally:
                torch.set_num_threads(threads)
        t = self.clock()
        out = fn(*args)
        dt = self.clock() - t
        best = self.best.get(key)
        on_one = self.solo_time.get(key)
        if best is not None and dt > self.SLOW * best and on_one is None:
            c.solo = max(c.solo, min(self.TRIAL_STEPS, c.period))    # a few, to learn its time on one
        elif best is not None and dt > self.SLOW * best and dt > on_one:
            c.solo, c.period = c.period, min(2 * c.period, self.MAX_SOLO)
        elif best is not None:
            c.period = self.SOLO_STEPS
        self.best[key] = dt if best is None else min(dt, best * 1.01)   # contexts grow: let it drift up
        return out


# the process's one: every CPU runner's guard shares it (all their steps run on the compute thread)
CPU_CONTENTION = Contention(ContentionGuard.SOLO_STEPS)
