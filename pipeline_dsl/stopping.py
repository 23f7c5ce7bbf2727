"""Stop signals while a command loads its pipeline (agp serve, agp run), and while it runs.

    loaded, sig = load_unless_stopped(lambda: build(args))
    if sig is not None:            # SIGTERM, SIGINT or SIGHUP came first
        ...say so, then os._exit(...)

Loading a model takes seconds to minutes, and nothing is in flight meanwhile, so a stop signal
should end the process at once, with a line saying why. Their default actions kill it without a
word (SIGTERM, SIGHUP) or raise KeyboardInterrupt somewhere inside the load (SIGINT), and an
exception a handler raises into the load can be swallowed by a finaliser, leaving it loading on.
So the load runs on a daemon thread and the main thread only waits: it hears the signal
wherever the load is (an import that blocks, a long C call). The caller then exits with
os._exit: the load thread cannot be stopped, and an interpreter shutdown would wait on it or
tear it down mid-call. `agp run` waits for its input's first lines the same way (a pipe that
has sent nothing yet blocks a read as a load does).

    summary = heard(lambda: run(...))     # the handlers in place: agp run's Interrupt

Once loaded, `agp run` runs its requests on a thread the same way (`heard`): Python runs a
handler only on the main thread, and the kernel may hand the signal to another thread, so a
main thread blocked in an untimed wait would not hear it until that wait ended.

    report = asyncio.run(ticking(bench_one(...)))   # agp bench: asyncio.run's Ctrl-C handler

An event loop on the main thread waits in a select() whose timeout is its next timer: a signal
handed to another thread (an engine's, the loop's executor's) wakes nothing, and asyncio.run's
handler would wait for the next answer or timer (a request held up to its timeout). `ticking`
wakes the loop every `poll_s`, as uvicorn's tick wakes `agp serve`'s.

    stopped = listening()            # agp serve --ray, from its deploy on
    ...deploy, looking at `stopped` between polls...
    sig = wait_for_stop(stopped)     # once deployed

A handler runs on the main thread between two of its bytecodes, wherever that thread is: one
that takes a lock the main thread may hold there (threading.Event.set while the main thread is
in Event.wait, holding the Event's lock; a write to sys.stderr while it writes there) would wait
for itself for good, or raise. So a handler here only appends to a list, and the main thread
looks at the list between short sleeps.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Awaitable, Callable, ContextManager, Iterable, TypeVar

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def heeded(signals: Iterable[int] = STOP_SIGNALS) -> tuple[int, ...]:
    """Those of `signals` this process does not ignore: one ignored when agp started (`nohup agp
    serve …` ignores SIGHUP, so that closing the terminal leaves it serving; a shell starts a
    background job with SIGINT ignored) stays ignored, as the one who started it asked, and no
    handler of agp's is set for it. Read when the handlers are set: agp restores each it set."""
    return tuple(sig for sig in signals if signal.getsignal(sig) != signal.SIG_IGN)


def load_unless_stopped(load: Callable[[], T], poll_s: float = 0.1,
                        around: ContextManager | None = None) -> tuple[T | None, int | None]:
    """load() on a thread of its own: (its result, None), or (None, the signal) as soon as a stop
    signal arrives. An exception of load() is raised here. Once a signal came, the stop signals
    stay ignored (a second SIGTERM must not kill the process while it says why it stops);
    otherwise their handlers are restored. `around` (agp serve's 503 while loading) is entered
    once the handlers are in place: whoever it tells that the load is on may signal at once."""
    old = {sig: signal.getsignal(sig) for sig in heeded()}
    stopped = listening(old)
    with around if around is not None else contextlib.nullcontext():
        loader = _Work(load, "agp-load")
        loader.wait(poll_s, until=lambda: bool(stopped))
    if stopped:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return None, stopped[0]
    for sig, handler in old.items():
        signal.signal(sig, handler)
    return loader.outcome(), None


def heard(work: Callable[[], T], name: str = "agp-work", poll_s: float = 0.1) -> T:
    """work() on a thread of its own while this thread, the main one, waits for it in joins of
    `poll_s`: its result, or its exception raised here. Python runs a signal's handler on the
    main thread only, once that thread is back in Python code, and the kernel may hand a signal
    sent to the process to any of its threads (one whose main thread has a signal pending
    already, for one). A main thread blocked in an untimed join or lock meanwhile (the engine
    joining its stream threads) would never run the handler: Ctrl-C ignored for good. Waiting
    here, it runs it within `poll_s` whichever thread the signal came to."""
    worker = _Work(work, name)
    worker.wait(poll_s)
    return worker.outcome()


async def ticking(work: Awaitable[T], poll_s: float = 0.1) -> T:
    """await work, the event loop woken every `poll_s` meanwhile: on the main thread, a signal's
    Python handler (asyncio.run's Ctrl-C, which cancels the main task) then runs within `poll_s`
    whichever thread the kernel handed the signal to, not once the loop next has something to do."""
    import asyncio

    async def tick() -> None:
        while True:
            await asyncio.sleep(poll_s)

    ticker = asyncio.ensure_future(tick())
    try:
        return await work
    finally:
        ticker.cancel()


def listening(signals: Iterable[int] = STOP_SIGNALS) -> list[int]:
    """Handlers for `signals` (those `heeded`) that only append each one that comes to the list returned (they
    take no lock: a handler runs wherever the main thread was, maybe inside a lock of its own).
    They stay in place: a later signal, while the caller stops, is noted and changes nothing."""
    stopped: list[int] = []
    for sig in heeded(signals):
        signal.signal(sig, lambda sig, frame: stopped.append(sig))
    return stopped


def wait_for_stop(stopped: list[int], poll_s: float = 0.1) -> int:
    """Until a signal `listening` set handlers for has come: the first that came. This thread
    looks at the list between sleeps of `poll_s` (within which it hears a signal the kernel
    handed to another thread)."""
    while not stopped:
        time.sleep(poll_s)
    return stopped[0]


class _Work:
    """fn() started on a daemon thread (a stop may os._exit while it is blocked); its outcome."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._done: dict = {}

        def run() -> None:
            try:
                self._done["result"] = fn()
            except BaseException as e:         # noqa: BLE001 - raised again on the waiting thread
                self._done["error"] = e

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def wait(self, poll_s: float, until: Callable[[], bool] = lambda: False) -> None:
        """Until fn() returns or until(), in joins of poll_s (a signal handler runs between them)."""
        while self._thread.is_alive() and not until():
            self._thread.join(poll_s)

    def outcome(self) -> T:
        if "error" in self._done:
            raise self._done["error"]
        return self._done["result"]
