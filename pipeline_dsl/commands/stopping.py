"""Stop signals while a command loads its pipeline (agp serve, agp run).

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
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, ContextManager, TypeVar

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def load_unless_stopped(load: Callable[[], T], poll_s: float = 0.1,
                        around: ContextManager | None = None) -> tuple[T | None, int | None]:
    """load() on a thread of its own: (its result, None), or (None, the signal) as soon as a stop
    signal arrives. An exception of load() is raised here. Once a signal came, the stop signals
    stay ignored (a second SIGTERM must not kill the process while it says why it stops);
    otherwise their handlers are restored. `around` (agp serve's 503 while loading) is entered
    once the handlers are in place: whoever it tells that the load is on may signal at once."""
    stopped: list[int] = []
    old = {sig: signal.signal(sig, lambda sig, frame: stopped.append(sig)) for sig in STOP_SIGNALS}
    done: dict = {}

    def run() -> None:
        try:
            done["result"] = load()
        except BaseException as e:             # raised again on the calling thread below
            done["error"] = e

    with around if around is not None else contextlib.nullcontext():
        loader = threading.Thread(target=run, name="agp-load", daemon=True)
        loader.start()
        while loader.is_alive() and not stopped:
            loader.join(poll_s)
    if stopped:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return None, stopped[0]
    for sig, handler in old.items():
        signal.signal(sig, handler)
    if "error" in done:
        raise done["error"]
    return done["result"], None
