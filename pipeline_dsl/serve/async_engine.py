"""The engine behind an asyncio server: a background driver steps it, coroutines await tokens.

`Engine` is not thread-safe, so one driver owns its stepping, in one of two ways:

- step loop (default): one thread applies the adds and aborts that coroutines submit
  (a command list under a condition variable), runs `step()` while anything is
  unfinished, sleeps until the dynamic batcher's window closes (`next_deadline()`) or a
  command arrives, and sleeps when idle.
- executor: the plan's `Executor` (pipeline_dsl.engine.executor) runs in server mode
  (`run(until_idle=False)`), overlapping host work with compute on its stream threads;
  adds go straight to the engine under the executor's lock, aborts through it.

Either way each step's outputs reach the asyncio loop in one `call_soon_threadsafe`
callback that feeds the per-request queues, and concurrent HTTP requests meet in the
engine's own batcher and continuous batching, exactly as `agp run` requests do.

    stream = await aengine.add("r1", prompt="Hello", params=SamplingParams())
    async for out in stream:          # RequestOutput, the last one has finished=True
        ...
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from pipeline_dsl.engine.config import RequestOutput, SamplingParams

log = logging.getLogger("agp.serve")


def make_executor(engine, *, overlap: bool = True, plan=None):
    """The pipeline plan's executor over `engine`, as `agp run` uses it."""
    from pipeline_dsl.engine.executor import Executor

    return Executor(engine, plan, overlap=overlap)


class EngineUnavailable(RuntimeError):
    """The engine is draining for shutdown or has failed: HTTP 503."""


@dataclass
class _State:
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished: bool = False


class RequestStream:
    """Async iterator over one request's `RequestOutput`s."""

    def __init__(self, owner: "AsyncEngine", state: _State):
        self._owner, self._state = owner, state
        self.started = False                     # a consumer began reading (the app sets it)

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def finished(self) -> bool:
        return self._state.finished

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._state.finished and self._state.queue.empty():
            raise StopAsyncIteration
        item = await self._state.queue.get()
        if isinstance(item, BaseException):
            self._state.finished = True
            raise item
        return item

    def abort(self) -> None:
        """Cancel the sequence (client gone): the engine frees its KV blocks."""
        if not self._state.finished:
            self._state.finished = True
            self._owner.abort(self._state.request_id)


class AsyncEngine:
    def __init__(self, engine, *, metrics=None, idle_s: float = 0.05,
                 prepare=None, executor=None):
        self.engine = engine
        self.executor = executor                     # None: the step loop drives the engine
        self.prepare = prepare or (lambda inputs: inputs)  # the pipeline's stages shape each request
        self.metrics = metrics
        self.idle_s = idle_s
        self._cond = threading.Condition()
        self._commands: list[tuple] = []             # step loop: adds, aborts, stats
        self._states: dict[str, _State] = {}         # admitted, unfinished (under _lock)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._abort_all = False
        self.error: BaseException | None = None     # set if the driver failed

    # ---- asyncio side ----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            target = self._run_executor if self.executor is not None else self._run
            self._thread = threading.Thread(target=target, name="agp-engine", daemon=True)
            self._thread.start()

    @property
    def accepting(self) -> bool:
        return not self._stopping and self.error is None

    @property
    def in_flight(self) -> int:
        return len(self._states)

    async def add(self, request_id: str, *, params: SamplingParams, **inputs) -> RequestStream:
        """Admit a request; raises InputError / QueueFullError / EngineUnavailable at once."""
        if not self.accepting:
            raise EngineUnavailable("the server is shutting down" if self.error is None
                                    else f"the engine failed: {self.error}")
        loop = asyncio.get_running_loop()
        state = _State(request_id, loop)
        try:
            if self.executor is not None:
                await asyncio.to_thread(self._add_now, state, inputs, params)
            else:
                admitted = loop.create_future()
                self._submit(("add", state, inputs, params, admitted))
                await admitted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return RequestStream(self, state)

    def abort(self, request_id: str) -> None:
        if self.executor is None:
            self._submit(("abort", request_id))
            return
        with self._lock:
            state = self._states.pop(request_id, None)
        if state is not None:
            self.executor.abort(request_id)
            self._aborted(state)

    async def stats(self) -> dict:
        """engine.stats() taken between two steps, plus `in_flight` (admitted, unfinished)."""
        if self._thread is None or not self._thread.is_alive():
            return self._stats()
        if self.executor is not None:
            return await asyncio.to_thread(self._stats_locked)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._submit(("stats", loop, done))
        return await done

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting; finish (or abort) what runs; join the driver. True if it ended."""
        with self._cond:
            self._stopping = True
            self._abort_all = self._abort_all or not drain
            self._cond.notify()
        if self._thread is None:
            return True
        if self.executor is not None:
            if not drain:
                with self._lock:
                    rids = list(self._states)
                for rid in rids:
                    self.abort(rid)
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._states and self.error is None and (
                    deadline is None or time.monotonic() < deadline):
                time.sleep(0.02)
            self.executor.close()                    # the run ends once the engine is idle
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _submit(self, command: tuple) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # ---- the executor driver ---------------------------------------------------------
    def _add_now(self, state: _State, inputs: dict, params: SamplingParams) -> None:
        with self.executor.lock:                     # the engine's host state
            self.engine.add_request(state.request_id, params=params, **self.prepare(inputs))
            with self._lock:
                self._states[state.request_id] = state

    def _stats_locked(self) -> dict:
        with self.executor.lock:
            return self._stats()

    def _run_executor(self) -> None:
        try:
            self.executor.run(on_output=self._dispatch, on_error=self._on_error,
                              until_idle=False)
        except BaseException as e:               # noqa: BLE001 - reported to every waiter
            log.exception("the executor failed")
            self.error = e
            self._fail_all(e)

    def _on_error(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            state = self._states.pop(str(request_id), None)
        if state is not None:
            state.loop.call_soon_threadsafe(state.queue.put_nowait, exc)

    # ---- the step-loop driver --------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        deadline_of = getattr(engine, "next_deadline", None)
        try:
            while True:
                with self._cond:
                    commands, self._commands = self._commands, []
                    if self._abort_all:
                        commands += [("abort", rid) for rid in self._states]
                        self._abort_all = False
                if commands:
                    self._apply(commands)
                    continue                     # more may have come in meanwhile
                if not engine.has_unfinished():
                    with self._cond:
                        if self._stopping and not self._commands:
                            return
                        if not self._commands:
                            self._cond.wait(self.idle_s)
                    continue
                deadline = deadline_of() if deadline_of else None
                wait = deadline - time.monotonic() if deadline is not None else 0.0
                if wait > 0:                     # the batch window is still open
                    with self._cond:
                        if not self._commands:
                            self._cond.wait(wait)
                    continue
                outputs = engine.step()
                if outputs:
                    self._dispatch(outputs)
        except BaseException as e:               # noqa: BLE001 - reported to every waiter
            log.exception("engine step failed")
            self.error = e
            self._fail_all(e)

    def _apply(self, commands: list[tuple]) -> None:
        for command in commands:
            if command[0] == "add":
                _, state, inputs, params, admitted = command
                if self._stopping and self._abort_all:
                    exc = EngineUnavailable("the server is shutting down")
                    state.loop.call_soon_threadsafe(_reject, admitted, exc)
                    continue
                try:
                    self.engine.add_request(state.request_id, params=params, **self.prepare(inputs))
                except Exception as e:          # InputError, QueueFullError: the caller's answer
                    state.loop.call_soon_threadsafe(_reject, admitted, e)
                    continue
                with self._lock:
                    self._states[state.request_id] = state
                state.loop.call_soon_threadsafe(_accept, admitted)
            elif command[0] == "stats":
                _, loop, done = command
                try:
                    loop.call_soon_threadsafe(_accept, done, self._stats())
                except Exception as e:          # noqa: BLE001 - the caller reports it
                    loop.call_soon_threadsafe(_reject, done, e)
            else:
                with self._lock:
                    state = self._states.pop(command[1], None)
                if state is not None:
                    self.engine.abort(state.request_id)
                    self._aborted(state)

    # ---- shared ----------------------------------------------------------------------
    def _aborted(self, state: _State) -> None:
        if self.metrics is not None:
            self.metrics.finished.labels("abort").inc()
        state.loop.call_soon_threadsafe(_close, state)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs: metrics, then one callback per event loop (any thread)."""
        now = time.monotonic()
        m = self.metrics
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        stepped = 0
        for out in outputs:
            with self._lock:
                state = self._states.get(out.request_id)
                if state is not None and out.finished:
                    del self._states[out.request_id]
            if state is None:
                continue                          # aborted meanwhile
            n_new = len(out.new_token_ids)
            if n_new:
                stepped += 1
                if state.first_token_at is None:
                    state.first_token_at = now
                    if m is not None:
                        m.ttft.observe(now - state.arrival)
                        m.observe_prompt(out.prompt_tokens, out.cached_tokens)
                elif m is not None:
                    m.itl.observe((now - state.last_token_at) / n_new)
                state.last_token_at = now
                if m is not None:
                    m.generation_tokens.inc(n_new)
            if out.finished and m is not None:
                m.e2e.observe(now - state.arrival)
                m.finished.labels(out.finish_reason or "stop").inc()
            batches.setdefault(state.loop, []).append((state, out))
        if m is not None and stepped:
            m.batch_size.observe(stepped)
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            states, self._states = list(self._states.values()), {}
        for state in states:
            state.loop.call_soon_threadsafe(state.queue.put_nowait, EngineUnavailable(
                f"the engine failed: {exc}"))
        with self._cond:
            commands, self._commands = self._commands, []
        for command in commands:
            if command[0] == "add":
                state, admitted = command[1], command[4]
                state.loop.call_soon_threadsafe(_reject, admitted, EngineUnavailable(
                    f"the engine failed: {exc}"))
            elif command[0] == "stats":
                command[1].call_soon_threadsafe(_reject, command[2], EngineUnavailable(
                    f"the engine failed: {exc}"))

    def _stats(self) -> dict:
        stats = dict(self.engine.stats(latencies=False))
        stats["in_flight"] = len(self._states)
        return stats


# ---- callbacks run on the asyncio loop ---------------------------------------------------
def _accept(fut: asyncio.Future, value=None) -> None:
    if not fut.done():
        fut.set_result(value)


def _reject(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _deliver(items: list) -> None:
    for state, out in items:
        state.queue.put_nowait(out)
        if out.finished:
            state.finished = True


def _close(state: _State) -> None:
    state.finished = True
    state.queue.put_nowait(StopAsyncIteration())
