"""The pipeline runtime behind an asyncio server: coroutines submit requests and await events.

The runtime (pipeline_dsl.flow) runs each engine segment's batching loop on a thread of
its own and request-level stages on its worker pool; its callbacks reach the asyncio
loop through a LoopMail (`call_soon_threadsafe` once for all that arrive before the loop runs). Concurrent HTTP requests meet in the engines'
batchers exactly as `agp run` requests do.

    stream = await apipe.add(item_dict, pin=None, stream=True)
    async for event in stream:       # ("delta", index, RequestOutput) ..., then ("done", Result)
        ...

A request added with stream=False (an answer sent whole) has one event, ("done", Result): its
tokens are observed for the metrics (TTFT, inter-token latency) as they come, but none is
queued for a consumer that would only pass it over (a copy and a wake-up of the event loop per
token).

A stream whose consumer falls behind (an SSE client that stops reading: the socket's buffer
fills, the writer waits) keeps its events queued here. Its unread tokens are those queued while
its consumer does not wait for an event (it is blocked writing to its client, or does not read):
the tokens that arrive while it waits on an empty queue (`waiting`: a StreamGroup's merge and the
app's hand-over to its answer's writer wait too) are the event loop's lag, not its client's (a
loaded loop runs the consumer only after a LoopMail batch of hundreds of a fast model's tokens),
and are neither counted nor paused nor cut for, however many (the consumer takes them first, the
next time it runs). Past `pause_unread_tokens` unread tokens its request is paused
(FlowRuntime.pause: its engine sequences leave their batches, their KV blocks freed) until the
consumer has taken them all, when it goes on; paused for `pause_limit_s`
without catching up, or past `max_unread_tokens` unread tokens while not paused (pausing off,
or refused in a drain; a paused stream's tokens that were on their way when it paused do not
count against it, nor a whole answer's), its request is aborted, the
deltas it queued dropped, and its last event is the error saying why (what a client reads if it
ever reads again). So a stalled client holds no batch slot and costs the others nothing but the
tokens generated before the pause.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from dataclasses import replace

from pipeline_dsl.flow import Delta, PipelineError, Result

from . import heap

log = logging.getLogger("agp.serve")


class EntryRefused(Exception):
    """AsyncPipeline.add_each's refusal: the entry of the batch (`index`) and why (`error`, a
    PipelineError)."""

    def __init__(self, index: int, error: PipelineError):
        super().__init__(str(error))
        self.index, self.error = index, error


class LoopMail:
    """Calls the runtime's threads hand to one event loop, in the order handed, with one wake-up
    of the loop for all that arrive before it runs them (not one per call: 512 streams make 512
    chunks an engine step, and each call_soon_threadsafe writes to the loop's wake-up pipe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._calls: deque = deque()
        self._lock = threading.Lock()
        self._posted = False                     # a drain is on its way to the loop

    def post(self, fn, arg) -> None:
        with self._lock:
            self._calls.append((fn, arg))
            if self._posted:
                return
            self._posted = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:                     # the loop is closed: nobody hears these
            with self._lock:
                self._posted = False
                self._calls.clear()
            raise

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, deque()
            self._posted = False
        for fn, arg in calls:
            try:
                fn(arg)
            except Exception as e:               # noqa: BLE001 - as the loop treats a failing callback
                self.loop.call_exception_handler({"message": f"exception in {fn!r}", "exception": e})


async def _waiting_for(consumer, work):
    """`await work` with `consumer.waiting` set meanwhile (a RequestStream, or a StreamGroup's
    merge): the tokens that come until it runs again are the event loop's lag, not its client's.
    Then `waiting` is as it was (False, unless the app holds it until its answer's writer begins)."""
    held, consumer.waiting = consumer.waiting, True
    try:
        return await work
    finally:
        consumer.waiting = held


class RequestStream:
    """Async iterator over one request's events: ("delta", index, out) then ("done", result).
    A queued delta's `out.text` (the whole text so far) is dropped: the consumer reads
    `delta_text`, and n queued deltas would otherwise hold n copies of the text, n² characters.
    Past `pause_unread_tokens` unread tokens (queued while its consumer did not wait for an event,
    and not taken) the request is paused, past `max_unread_tokens` (or paused for `pause_limit_s`)
    cut (module docstring)."""

    def __init__(self, owner: "AsyncPipeline", mail: LoopMail, max_unread_tokens: int | None = None,
                 deltas: bool = True, pause_unread_tokens: int | None = None, pause_limit_s: float | None = None):
        self._owner, self._mail = owner, mail
        self.max_unread_tokens = max_unread_tokens
        self.pause_unread_tokens = pause_unread_tokens   # past it, its generation waits for its consumer
        self.pause_limit_s = pause_limit_s               # paused this long without catching up: cut
        self.paused = False
        self.stalled = False                     # its client's TCP takes nothing (client_stalled)
        self.ended = False                       # its result is queued: nothing more to pause or cut
        self._pause_timer = None
        self.deltas = deltas                     # its deltas are queued (a stream); else its result alone
        self.queue: asyncio.Queue = asyncio.Queue()
        self.key: str | None = None
        self.id: str | None = None               # the answer's id (cmpl-..., chatcmpl-...), for the log
        self.client: str | None = None           # who asked (HOST:PORT) and the request's X-Request-Id,
        self.request_id: str | None = None       # for the log
        self._paused_at = 0.0
        self.finished = False
        self.started = False                     # a consumer began reading (the app sets it)
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: dict[int, float] = {}    # choice index -> when its latest tokens came
        self.prompt: tuple | None = None         # (prompt ids, their logprobs or None) when the answer shows them
        self.params: dict | None = None          # the request's n and max_tokens (metrics)
        self.unread = 0                          # tokens queued while its consumer did not wait, not yet taken
        # its consumer waits for an event (on an empty queue, until it runs again; or the app holds
        # it from its first event until its answer's writer begins, serve/sse.py's Relay): the tokens
        # queued meanwhile are the server's lag (`lagged`, the queue's first ones), not its client's
        self.waiting = False
        self.lagged = 0
        self.cut = False                         # aborted for its unread tokens
        # an engine took it, or it has a delta or its result queued (on_admitted): set on the loop
        self.admitted = asyncio.Event()
        # its result where it failed before any delta was queued (an engine refused it, a stage
        # failed or rejected it, it timed out): a StreamGroup's batch fails with it
        self.failed_before_delta: Result | None = None
        self._delta_queued = False
        self.on_queued = None                    # called (on the loop) after each event it queues: its group's

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished and self.queue.empty():
            raise StopAsyncIteration
        event = await _waiting_for(self, self.queue.get()) if self.queue.empty() else self.queue.get_nowait()
        if event[0] == "done":
            self.finished = True
            self._stop_timer()
        else:
            self.took(len(event[2].new_token_ids or ()))
            if self.paused and self.unread <= 0 and not self.stalled:   # its consumer caught up: it goes on
                self._set_paused(False)
        return event

    def took(self, tokens: int) -> None:
        """Its consumer took the next queued event, of `tokens` tokens: the queue's first tokens
        are those that came while it waited (lagged), the others unread."""
        lagged = min(self.lagged, tokens)
        self.lagged -= lagged
        self.unread -= tokens - lagged

    def client_stalled(self, stalled: bool) -> None:
        """Its client took nothing of the bytes written to it for a while (True; the server's
        SendWatch), or takes them again (False): its generation pauses as for unread tokens,
        before the socket's buffers fill, and goes on once the client takes bytes again and every
        queued token is taken. Nothing with pausing off."""
        if not self.pause_unread_tokens:
            return
        self.stalled = stalled
        if stalled and not self.paused:
            self._set_paused(True, "its client's TCP took nothing of its answer for a while")
        elif not stalled and self.paused and self.unread <= 0:
            self._set_paused(False)

    def abort(self) -> None:
        """Cancel the request (client gone): its engine sequences are freed, and its pause's
        timer with it (it would hold the stream, and its queued deltas, until pause_limit_s)."""
        self._stop_timer()
        if not self.finished and self.key is not None:
            self.finished = True
            self._owner.runtime.abort(self.key)

    # ---- called from the runtime's threads --------------------------------------------
    def on_prompt(self, key, ids, logprobs) -> None:
        """The prompt's ids (return_token_ids), then their logprobs once computed (echo,
        prompt_logprobs): heard before any of its tokens is queued."""
        if self.prompt is None or (self.prompt[1] is None and logprobs is not None):
            self.prompt = (ids, logprobs)

    def on_admitted(self, key) -> None:
        """An engine took the request (its checks passed); its first token may be far off."""
        self._mail.post(self._admitted, None)

    def on_delta(self, key, index, out) -> None:
        """A chunk of choice `index`. The inter-token latency is the gap since the same choice's
        last chunk (n choices are streams side by side), once per chunk however many tokens it
        carries, as vLLM observes one per engine step and `vllm bench serve` one per chunk."""
        m = self._owner.metrics
        now = time.monotonic()
        if out.new_token_ids:
            if m is not None:
                if index not in self.last_token_at:     # each choice's first token (vLLM: each child's)
                    m.ttft.observe(now - self.arrival)
                else:
                    m.itl.observe(now - self.last_token_at[index])
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at[index] = now
        if self.deltas:
            self._mail.post(self._queued, ("delta", index, out))

    def on_done(self, result: Result) -> None:
        if self._owner.metrics is not None:
            self._owner.metrics.observe_result(result, time.monotonic() - self.arrival, self.params,
                                               prefilled=self.first_token_at is not None,
                                               choice_latency={i: at - self.arrival
                                                               for i, at in self.last_token_at.items()},
                                               choices_prefilled=len(self.last_token_at))
        self._mail.post(self._ended, ("done", result))

    # ---- on the event loop ------------------------------------------------------------
    def _admitted(self, _) -> None:
        self.admitted.set()

    def _ended(self, event) -> None:
        """The request's result: nothing of it is generated any more (no pause, no cut)."""
        self.ended = True
        self._stop_timer()
        if getattr(event[1], "error", None) is not None and not self._delta_queued:
            self.failed_before_delta = event[1]
        self.queue.put_nowait(event)
        self.admitted.set()
        if self.on_queued is not None:
            self.on_queued()

    def _queued(self, event) -> None:
        """A delta for the consumer (without its whole text); past max_unread_tokens unread
        tokens the request is cut, and the deltas it queued are dropped (those still on their way
        too): what its client may still read of them is the error that says why."""
        if self.cut:
            return
        _, index, out = event
        self._delta_queued = True
        self.admitted.set()
        self.queue.put_nowait(("delta", index, out.without_text() if isinstance(out, Delta) else replace(out, text="")))
        tokens = len(out.new_token_ids or ())
        if self.on_queued is not None:
            self.on_queued()
        if self.waiting:                         # its consumer waits for it: the loop's lag, not its client's
            self.lagged += tokens
            return
        self.unread += tokens
        if self.ended or self.finished or self.key is None:
            return
        if self.paused and not self._owner.runtime.accepting:
            self.paused = False                  # a drain let it go on (FlowRuntime.stop_admitting): cut past the limit
            self._stop_timer()
        if self.pause_unread_tokens and self.unread > self.pause_unread_tokens and not self.paused:
            self._set_paused(True, f"its client left more than {self.pause_unread_tokens} tokens unread")
        # a paused stream is not cut for the tokens generated before its pause took hold (they were
        # on their way while this loop was busy: hundreds on a loaded machine), nor one whose answer
        # is whole (nothing more comes); one still generating unpaused (no pausing, or none in a
        # drain) is
        limit = self.max_unread_tokens
        if limit is not None and self.unread > limit and not self.paused and self._owner.runtime.running(self.key):
            log.info("aborting %s: its client left more than %d tokens of its stream unread", self.id or self.key,
                     limit)
            self._cut(f"the stream was cut: its client left more than {limit} generated tokens unread "
                      f"(--max-unread-tokens)")

    def _cut(self, message: str) -> None:
        """Abort the request for its unread tokens, counted; the deltas it queued are dropped."""
        self.cut = True
        self._stop_timer()
        if self._owner.metrics is not None:
            self._owner.metrics.unread_cuts.inc()
        kept = [e for e in (self.queue.get_nowait() for _ in range(self.queue.qsize())) if e[0] != "delta"]
        for e in kept:                           # its deltas' memory back now, not when its connection ends
            self.queue.put_nowait(e)
        self.unread = self.lagged = 0
        self._owner.runtime.abort(self.key, message)

    def _set_paused(self, paused: bool, why: str = "") -> None:
        """Pause its generation (its sequences out of the batch, their KV blocks freed) while its
        consumer does not take its tokens, for at most pause_limit_s; or let it go on. Logged,
        as a cut is, with its client and request id."""
        if self.cut or self.ended or self.finished:
            return
        # the runtime's word: in a drain it pauses nothing (the stream is neither paused, counted
        # nor timed: its tokens queue on, up to max_unread_tokens)
        was, paused = self.paused, bool(self._owner.runtime.pause(self.key, paused))
        self.paused = paused
        self._stop_timer()
        extra = {"client": self.client or "-", "request_id": self.request_id or self.id or self.key}
        if paused and not was:
            self._paused_at = time.monotonic()
            log.info("pausing %s of %s: %s", self.id or self.key, self.client or "a client", why, extra=extra)
        elif was and not paused:
            log.info("resuming %s of %s: its client took every waiting token, after %.1fs paused",
                     self.id or self.key, self.client or "a client", time.monotonic() - self._paused_at,
                     extra=extra)
        m = self._owner.metrics
        if paused:
            if m is not None:
                m.streams_paused.inc()
            if self.pause_limit_s:
                self._pause_timer = asyncio.get_running_loop().call_later(self.pause_limit_s, self._paused_too_long)

    def _paused_too_long(self) -> None:
        self._pause_timer = None
        if self.paused and not self._owner.runtime.accepting:
            self.paused = False                  # a drain let it go on (FlowRuntime.stop_admitting)
            return
        if self.paused and not (self.cut or self.ended or self.finished):
            log.info("aborting %s: its client had not caught up with its stream, paused %gs for it (%d tokens "
                     "still waiting)", self.id or self.key, self.pause_limit_s, self.unread)
            self._cut(f"the stream was cut: its client had not taken the tokens generated for it "
                      f"{self.pause_limit_s:g}s after its stream paused for it ({self.unread} still waiting; "
                      f"--send-timeout)")

    def _stop_timer(self) -> None:
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None

    def request_of(self, index: int) -> int:
        """One request: every choice answers its prompt."""
        return 0

    def stream_of(self, index: int) -> "RequestStream":
        return self


class ChoiceNumbers:
    """The choice indexes of several requests answered as one (a completions request with a batch
    of prompts): choice i of request k is k * per + i, as vLLM numbers them (`per`: the choices a
    prompt is expected to give, the request's n or its generate stages' largest). A request that
    gives more (a fan-out to several generate stages, each with its own n) numbers its choices
    from `per` on after every request's range, in the order they first come, so no two choices
    of the answer share an index (choice 2 of the first prompt was numbered as choice 0 of the
    second)."""

    def __init__(self, requests: int, per: int):
        self.per = per
        self.next = requests * per
        self.extra: dict[tuple[int, int], int] = {}    # (request, its choice) -> index past the ranges
        self.owner: dict[int, int] = {}                # such an index -> its request

    def index(self, k: int, i: int) -> int:
        """The answer's index of choice i of request k."""
        if i < self.per:
            return k * self.per + i
        got = self.extra.get((k, i))
        if got is None:
            got = self.extra[(k, i)] = self.next
            self.owner[got] = k
            self.next += 1
        return got

    def request_of(self, index: int) -> int:
        """The request (the prompt of the batch) that choice `index` answers."""
        got = self.owner.get(index)
        return index // self.per if got is None else got


class StreamGroup:
    """Several requests (two or more) answered as one (a completions request with a batch of
    prompts): their events merged in the order they were queued, choices numbered by
    ChoiceNumbers (choice i of request k: k * per + i), the usage summed."""

    def __init__(self, streams: list[RequestStream], per: int):
        self.streams, self.per = streams, per
        self.numbers = ChoiceNumbers(len(streams), per)
        self.started = False
        self._waiting = False                    # held by the app (RequestStream.waiting)
        self._arrived: deque = deque()           # the request of each event queued, in the order queued
        self._wake = asyncio.Event()
        for k, s in enumerate(streams):
            self._arrived.extend([k] * s.queue.qsize())
            s.on_queued = lambda k=k: self._queued(k)
        self._events = self._merge()

    def _queued(self, k: int) -> None:
        self._arrived.append(k)
        self._wake.set()

    @property
    def waiting(self) -> bool:
        """Its consumer waits for an event: its requests' tokens that come meanwhile are the
        server's lag, not its client's (RequestStream.waiting); it waits too while its merge does."""
        return self._waiting

    @waiting.setter
    def waiting(self, waiting: bool) -> None:
        self._waiting = waiting
        for s in self.streams:
            s.waiting = waiting

    def request_of(self, index: int) -> int:
        """The request (prompt) whose choice carries `index`."""
        return self.numbers.request_of(index)

    def stream_of(self, index: int) -> "RequestStream":
        """The stream of the request whose choice carries `index`."""
        return self.streams[self.request_of(index)]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.streams)

    def abort(self) -> None:
        for s in self.streams:
            s.abort()

    def client_stalled(self, stalled: bool) -> None:
        for s in self.streams:
            s.client_stalled(stalled)

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._events.__anext__()

    async def _merge(self):
        # the group starts once an engine took each request (or it ended), not once each has its
        # first token: a request refused before an engine takes it (a prompt over the context)
        # refuses the whole batch, as a batch of that prompt alone is, rather than ending a stream
        # of the others' tokens with an error event; a long prompt's prefill holds no other
        # prompt's chunks back (each choice's chunks go out as they come, as vLLM's do)
        waits = [asyncio.ensure_future(s.admitted.wait()) for s in self.streams]
        try:
            for k, s in enumerate(self.streams):
                await _waiting_for(self, waits[k])
                failed = s.failed_before_delta
                if failed is not None:               # naming its prompt
                    yield ("done", replace(failed, error=of_prompt(failed.error, k)))
                    return
        finally:
            for w in waits:
                w.cancel()
        # one event at a time, in the order the requests' events were queued (not a request's
        # turn after another's: each choice's chunks as they came); the rest wait in their own
        # stream, where its unread bound sees them
        results: list = [None] * len(self.streams)
        left = len(self.streams)
        while left:
            self._wake.clear()
            if not self._arrived:
                await _waiting_for(self, self._wake.wait())
                continue
            k = self._arrived.popleft()
            stream = self.streams[k]
            if results[k] is not None or stream.queue.empty():     # a delta its cut dropped
                continue
            event = await stream.__anext__()
            if event[0] == "delta":
                yield ("delta", self.numbers.index(k, event[1]), event[2])
            else:
                results[k] = event[1]
                left -= 1
        yield ("done", combine(results, self.per, self.numbers))


def of_prompt(error: PipelineError, k: int) -> PipelineError:
    """`error`, which failed prompt k of a completions request's batch of prompts, naming it
    (`'prompt[1]': prompt of 2088 tokens exceeds ...`) where it is about the prompt: an error of
    its input (a prompt over the context) or a Reject naming it; a client of a batch is told
    which prompt to fix. Any other error (a full queue, a failed stage) is the request's."""
    if not ((error.kind == "invalid" and error.param in (None, "prompt"))
            or (error.kind == "rejected" and error.param == "prompt")):
        return error
    named = PipelineError(f"'prompt[{k}]': {error.message}", error.kind, error.stage, error.code, error.param,
                          error.status, error.retry_after)
    named.__cause__ = error.__cause__
    return named


def combine(results: list[Result], per: int, numbers: ChoiceNumbers | None = None) -> Result:
    """One Result for several (a completions request's batch of prompts): choices renumbered
    (ChoiceNumbers: `numbers`, the ones a stream of them already gave, else new ones) and in the
    order of their index, usage (and each engine's) summed, the first error wins, naming the
    prompt it failed (of_prompt)."""
    error = next((of_prompt(r.error, k) for k, r in enumerate(results) if r.error is not None), None)
    numbers = numbers or ChoiceNumbers(len(results), per)
    choices = sorted((replace(c, index=numbers.index(k, c.index)) for k, r in enumerate(results)
                      for c in r.choices), key=lambda c: c.index)
    usage = {key: sum(r.usage.get(key, 0) for r in results) for key in results[0].usage}
    engines: dict = {}
    for r in results:
        for engine, u in r.engine_usage.items():
            mine = engines.setdefault(engine, {})
            for key, n in u.items():
                mine[key] = mine.get(key, 0) + n
    return Result(results[0].key, results[0].id, [] if error else choices, error, usage, results[0].metrics,
                  engines)


class AsyncPipeline:
    def __init__(self, runtime, *, metrics=None, max_unread_tokens: int | None = None,
                 pause_unread_tokens: int | None = None, pause_limit_s: float | None = None):
        self.runtime = runtime
        self.metrics = metrics
        self.max_unread_tokens = max_unread_tokens   # a stream's tokens its client has not taken: past it, cut
        self.pause_unread_tokens = pause_unread_tokens   # past it, the stream's generation waits (paused)
        self.pause_limit_s = pause_limit_s               # the longest a stream waits so, its client taking nothing
        self._started = False
        self._mails: dict[asyncio.AbstractEventLoop, LoopMail] = {}   # one per open event loop requests come from
        self._mails_lock = threading.Lock()

    def start(self) -> None:
        """The runtime's loops started, and the loaded heap frozen until stop() (serve/heap.py):
        a long-lived server's full collections no longer walk the model's objects mid-stream."""
        if not self._started:
            self._started = True
            self.runtime.start()
            heap.freeze()

    @property
    def error(self) -> BaseException | None:
        return self.runtime.error

    @property
    def accepting(self) -> bool:
        return self.runtime.accepting

    @property
    def in_flight(self) -> int:
        return self.runtime.in_flight

    async def add(self, data: dict, *, pin: str | None = None, stream: bool = False,
                  params: dict | None = None, client: str | None = None,
                  request_id: str | None = None) -> RequestStream:
        """Submit a request; raises PipelineError (queue_full, unavailable, invalid) at once: one
        the queue has no room for is tokenised (off the loop) and refused as invalid where it
        could never run (never_runs), as it would be once admitted.
        `params` (its n and max_tokens) go to the metrics when it finishes; `client` (HOST:PORT)
        and `request_id` (its X-Request-Id) name it in the log. Not a stream: its only event is
        the result."""
        try:
            return (await self.add_each([data], pin=pin, stream=stream, params=params, client=client,
                                        request_id=request_id))[0]
        except EntryRefused as r:
            raise r.error from None

    async def add_each(self, items: list[dict], *, pin: str | None = None, stream: bool = False,
                       params: dict | None = None, client: str | None = None,
                       request_id: str | None = None) -> list[RequestStream]:
        """Submit each of `items` (a batch's requests, as add); their streams, in order. Where one
        is refused, the ones submitted are aborted and EntryRefused names the entry and why: where
        the queue is full, the first of the rest that could never run (never_runs) with its 400
        (a 429 its client would retry forever), else the one the queue refused."""
        loop = asyncio.get_running_loop()
        mail = self._mails.get(loop)
        if mail is None:
            # a new loop: the closed ones go (a caller that runs each call in asyncio.run makes a
            # loop a call; their requests' streams keep the mail they need)
            with self._mails_lock:
                for closed in [other for other in self._mails if other.is_closed()]:
                    del self._mails[closed]
                mail = self._mails.setdefault(loop, LoopMail(loop))
        streams: list[RequestStream] = []
        for k, data in enumerate(items):
            rs = RequestStream(self, mail, self.max_unread_tokens, deltas=stream,
                               pause_unread_tokens=self.pause_unread_tokens, pause_limit_s=self.pause_limit_s)
            rs.params, rs.id, rs.client, rs.request_id = params, data.get("id"), client, request_id
            try:
                rs.key = self.runtime.submit(data, rs, pin=pin, stream=stream)
            except PipelineError as e:
                for st in streams:
                    st.abort()
                if e.kind == "queue_full":   # one that could never run is a 400, not a 429 retried forever
                    never = await self.never_runs(items[k:])
                    if never is not None:
                        k, e = k + never[0], never[1]
                raise EntryRefused(k, e) from None
            streams.append(rs)
        return streams

    async def never_runs(self, items: list[dict]) -> tuple[int, PipelineError] | None:
        """(its place, why) for the first of `items` (item dicts) that could never run
        (runtime.check_fits: its prompt tokenised, off the loop), else None: for requests the
        queue has no room for, whose answer is then that 400, not a 429."""
        def scan():
            for k, data in enumerate(items):
                try:
                    self.runtime.check_fits(data)
                except PipelineError as e:
                    return k, e
            return None

        return await asyncio.to_thread(scan)

    async def stats(self) -> dict:
        """The runtime's counters, with file paths cut to their names (no answer shows where the
        server keeps its files)."""
        return _no_paths(await asyncio.to_thread(self.runtime.stats))

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting; finish (or cut at the timeout) what runs; end the loops. Returns
        whether every request finished."""
        finished = self.runtime.close(drain=drain, timeout=timeout)
        self.runtime.shutdown()
        if self._started:
            heap.thaw()
        return finished


def _no_paths(value):
    if isinstance(value, dict):
        return {k: _no_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.basename(value)
    return value


__all__ = ["AsyncPipeline", "ChoiceNumbers", "PipelineError", "RequestStream", "StreamGroup", "combine"]
