"""Stream stages: python stages with `stream = true` filter generated text as it is made.

A stream stage's function is a generator, `def fn(item, chunks)` (or `async def` with
`async for`): it gets the Generated item's dict (its text empty, its request filled) and
an iterator over the text's chunks, and yields the text it lets through; a sync generator
may `return "label"` for `when LABEL` edges. Raising pipeline_dsl.Reject refuses the
request at once (what was already sent stays sent).

The stream stages that follow a generate stage through single unconditional edges form its
chain (`StreamPlan`); while the engine generates, each item of that generate stage runs its
chain live (`Live`): the engine's text deltas feed the first stage, each stage's chunks
feed the next, and the last one's reach the client when the chain ends at a respond stage
(`direct`). An item that reaches a stream stage any other way (after a join, say) is
filtered whole, as one chunk.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import replace
from typing import Any, Callable

from .items import unicode_problem


class StreamPlan:
    def __init__(self, chains: dict[str, list[str]], direct: dict[str, bool]):
        self.chains = chains          # generate stage -> its stream stages, in order
        self.direct = direct          # generate stage -> its (filtered) tokens go straight to the client

    @classmethod
    def build(cls, generates, routes: dict[str, list], kinds: dict[str, str], streaming: set) -> "StreamPlan":
        chains, direct = {}, {}
        for g in generates:
            chain, at = [], g
            while len(routes[at]) == 1 and routes[at][0][1] is None and routes[at][0][0] in streaming \
                    and routes[at][0][0] not in chain:
                at = routes[at][0][0]
                chain.append(at)
            chains[g] = chain
            direct[g] = len(routes[at]) == 1 and routes[at][0][1] is None and kinds[routes[at][0][0]] == "respond"
        return cls(chains, direct)


class Feed:
    """The chunks into one stream stage: put / close from any thread; read by a sync
    generator (blocking iteration) or an async one (`async for` on the event loop)."""

    def __init__(self):
        self._chunks: deque[str] = deque()
        self._closed = False
        self._cv = threading.Condition()
        self._waiter: asyncio.Future | None = None
        self.stretch = None           # the reader's Stretch (flow/timing.py): stopped while it waits

    def put(self, chunk: str) -> None:
        self._push(chunk)

    def close(self) -> None:
        self._push(None)

    def _push(self, chunk: str | None) -> None:
        with self._cv:
            if self._closed:
                return
            if chunk is None:
                self._closed = True
            else:
                self._chunks.append(chunk)
            self._cv.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    def __iter__(self):
        while True:
            self._waiting(True)
            with self._cv:
                while not self._chunks and not self._closed:
                    self._cv.wait()
                chunk = self._chunks.popleft() if self._chunks else None
            self._waiting(False)
            if chunk is None:
                return
            yield chunk

    async def chunks(self):
        loop = asyncio.get_running_loop()
        while True:
            self._waiting(True)
            with self._cv:
                if self._chunks:
                    chunk = self._chunks.popleft()
                elif self._closed:
                    chunk, waiter = None, None
                else:
                    chunk, self._waiter = None, loop.create_future()
                    waiter = self._waiter
            if chunk is None and waiter is not None:
                await waiter
                continue
            self._waiting(False)
            if chunk is None:
                return
            yield chunk

    def _waiting(self, waiting: bool) -> None:
        """The reader's own time stops while it waits for a chunk and restarts with each one."""
        if self.stretch is not None:
            self.stretch.wait() if waiting else self.stretch.run()


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def run_filter(fn: Callable, view: dict, chunks, emit: Callable[[str], None]) -> tuple[str, Any]:
    """Drive a sync generator over `chunks`; every chunk it yields goes to emit. Returns the
    text it let through and the label it returned."""
    out: list[str] = []
    gen = fn(view, iter(chunks))
    while True:
        try:
            chunk = next(gen)
        except StopIteration as stop:
            return "".join(out), stop.value
        out.append(_text(chunk))
        emit(out[-1])


async def arun_filter(fn: Callable, view: dict, chunks, emit: Callable[[str], None]) -> tuple[str, Any]:
    """run_filter for an async generator (`chunks`: an async iterator); no label."""
    out: list[str] = []
    async for chunk in fn(view, chunks):
        out.append(_text(chunk))
        emit(out[-1])
    return "".join(out), None


async def one_chunk(text: str):
    if text:
        yield text


def _text(chunk) -> str:
    if not isinstance(chunk, str):
        raise TypeError(f"a stream function yields text; it yielded {type(chunk).__name__}")
    problem = unicode_problem(chunk)
    if problem is not None:
        raise ValueError(f"a stream function yields text; it yielded text that is not valid Unicode ({problem})")
    return chunk


class Live:
    """One item's chain running while its sequence generates: a feed per stage, each stage's
    end (`complete`) met with the item's arrival there (`arrive`) before it goes on."""

    def __init__(self, chain: list[str], direct: bool, deliver: Callable[[Any], None] | None):
        self.chain = chain
        self.feeds = [Feed() for _ in chain]
        self.calls: list = []         # each stage's call on its workers (StageWorkers.submit's), in order
        self.deliver = deliver        # the client's on_delta for the last stage's chunks (direct)
        self.text = ""                # what the last stage let through so far
        self.tokens: list[int] = []   # engine tokens not yet reported with a chunk
        self.logprobs: list = []
        self.last = None              # the engine's latest RequestOutput
        self.final = None             # its finished one
        self.cancelled = False
        self._lock = threading.Lock()
        self._ends: dict[int, tuple] = {}           # stage index -> (ok, value)
        self._arrivals: dict[int, Callable] = {}    # stage index -> what to do once it ended
        self.sent_any = False

    def index(self, stage: str) -> int | None:
        return self.chain.index(stage) if stage in self.chain else None

    def engine_output(self, out) -> None:
        """An engine step's output for the item: its text feeds the first stage."""
        with self._lock:
            self.last = out
            self.tokens.extend(out.new_token_ids)
            if getattr(out, "logprobs", None):
                self.logprobs.extend(out.logprobs)
            if out.finished:
                self.final = out
        if out.delta_text:
            self.feeds[0].put(out.delta_text)
        if out.finished:
            self.feeds[0].close()

    def emit(self, i: int, chunk: str) -> None:
        """Stage i yielded a chunk: on to the next stage, or (the last) to the client."""
        if self.cancelled or not chunk:
            return
        if i + 1 < len(self.chain):
            self.feeds[i + 1].put(chunk)
            return
        with self._lock:
            self.text += chunk
            out = self._output(chunk, finished=False)
        if self.deliver is not None:
            self.sent_any = True
            self.deliver(out)

    def stage_ended(self, i: int) -> None:
        if i + 1 < len(self.chain):
            self.feeds[i + 1].close()

    def finish(self) -> None:
        """The chain's end reached the client: the finished output (finish reason, last tokens)."""
        if self.deliver is None or self.cancelled:
            return
        with self._lock:
            out = self._output("", finished=True)
        self.deliver(out)

    def _output(self, chunk: str, finished: bool):
        base = self.final if finished and self.final is not None else self.last
        tokens, self.tokens = self.tokens, []
        logprobs, self.logprobs = self.logprobs, []
        return replace(base, new_token_ids=tokens, delta_text=chunk, text=self.text, finished=finished,
                       finish_reason=base.finish_reason if finished else None, logprobs=logprobs or None)

    def complete(self, i: int, ok: bool, value: Any) -> Callable | None:
        """Stage i's call ended; returns the continuation if the item already arrived there."""
        with self._lock:
            self._ends[i] = (ok, value)
            return self._arrivals.pop(i, None)

    def arrive(self, i: int, then: Callable) -> tuple | None:
        """The item reached stage i; returns its end if the call is over, else keeps `then`."""
        with self._lock:
            if i in self._ends:
                return self._ends.pop(i)
            self._arrivals[i] = then
            return None

    def cancel(self) -> None:
        self.cancelled = True
        for f in self.feeds:
            f.close()
