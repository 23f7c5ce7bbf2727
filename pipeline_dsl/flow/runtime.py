"""The pipeline runtime: requests flow through the graph as items, stage by stage.

    rt = PipelineRuntime(graph, overrides={"threads": 2})
    rt.start()                                # one batching loop per engine segment
    key = rt.submit(request_dict, listener)   # listener.on_done(result), and if it has them
                                              # .on_delta(key, index, out), .on_prompt(key, ids, logprobs)
                                              # .on_admitted(key) (an engine took it)
    rt.close(drain=True)

An item is a Request or a Generated result (flow/items.py). A stage receives the items on
its in-edges and sends what it makes of them along its out-edges as the router says
(flow/router.py); several edges taken means copies (fan-out), each a branch of its request.
This module is the orchestration of items through stages; its parts are their own
modules: the router, joins (flow/joins.py), bounded loops (flow/loops.py), the request
ledger (flow/ledger.py), the counters (flow/stats.py), where user code runs
(flow/workers.py), result caches (flow/cache.py), stream filters (flow/streams.py,
driven by flow/live.py) and the engines (flow/segment.py, met in flow/engines.py);
flow/driving.py starts, drives and closes it all.

- Built-in request-level stages (requests, system_prompt, route, respond, a join's built-in
  policies) and routing run on a small pool of host threads; they never run user code.
- A stage that runs user code (python, a join's fn, third-party kinds) runs it on its own
  workers (flow/workers.py): a slow or hung function holds up only its own stage's items.
- An engine segment (batch -> encode -> kv_lookup -> generate...) takes a Request in at its
  batcher: tokenised on the host pool (encode) (on the compile threads when its constraint
  is not compiled yet: a large schema's compile holds no host thread; a conversation on the
  render threads: its chat template holds none either), routed among the segment's generate stages,
  copied `n` times and submitted to the segment's executor; the engine steps as soon as the
  first one arrives. Each finished sequence goes on from its generate stage as a Generated
  item; stream stages right after it filter its text while it is generated.
- A join waits until no item of its request can still reach it, then merges what arrived.
- The request is answered once none of its items is left: every Generated item that
  reached a respond stage is one choice. A Reject, any exception in a user function (a
  BaseException too), a timeout or bad input fails that request only.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import networkx as nx

from pipeline_dsl import Reject
from pipeline_dsl.constraints import MAX_GRAMMAR_WORK
from pipeline_dsl.graph import segments_of
from pipeline_dsl.plan import ITEM_WORKERS, make_plan

from .cache import ResultCache, cache_key
from .driving import Driving
from .engines import EngineSide
from .items import (COUNTED, GENERATED, REQUEST, STAGE_UNAVAILABLE_CODE, Item, PipelineError, RequestState, Result,
                    a_type, check_result, tell_result, token_field_problem)
from .joins import FILLED, Joins, same_stage
from .ledger import RequestLedger
from .live import LiveStages
from .loops import Loops
from .router import Router, fields
from .stats import FlowStats
from .streams import StreamPlan, arun_filter, one_chunk, run_filter
from .workers import EventLoop, Skipped, StageStuck, StageTimeout, StageWorkers, Timer, is_transient

ENGINE_KINDS = ("dynamic_batch", "encode", "kv_lookup", "generate")
INLINE = ("requests", "system_prompt", "route", "respond", "join", "dynamic_batch")   # no user code
TRUSTED = ("requests", "system_prompt", "route")      # built-in stages: their dicts stay valid requests
_PART = {"requests": "admit", "system_prompt": "apply", "python": "call", "route": "route"}


COMPILE_THREADS = 4 * MAX_GRAMMAR_WORK  # the compile pool's threads (compiles at once: MAX_GRAMMAR_WORK)
RENDER_THREADS = 16                      # the render pool's threads: conversations rendered at once
_off_pool = threading.local()            # .here: "compile" or "render" on a thread running _go_off


def _refuse_what_needs_a_model(data: dict) -> None:
    """A request to a pipeline without a model (python stages answer it) that asks for what only a
    model's tokens give — logprobs, the prompt's logprobs, an echo of a prompt sent as token ids —
    is refused as its client's error (400, naming the field), not failed as the server's once
    answered (500: no tokenizer to build that part of the answer with)."""
    for name in ("logprobs", "prompt_logprobs"):          # chat's top_logprobs comes as logprobs
        if data.get(name) is not None:
            raise PipelineError(f"this pipeline has no model, so its answers have no {name}: leave '{name}' out",
                                "invalid", param=name)
    if data.get("echo") and data.get("prompt_token_ids") is not None:
        raise PipelineError("this pipeline has no model to read token ids with, so 'echo' cannot repeat a "
                            "prompt given as token ids: send the prompt as text, or leave 'echo' out",
                            "invalid", param="echo")


class PipelineRuntime(EngineSide, LiveStages, Driving):
    def __init__(self, graph: nx.DiGraph, *, overrides: dict | None = None, overlap: bool | None = None,
                 trace=None, workers: int = ITEM_WORKERS, max_queue: int | None = None,
                 served_name: str | None = None, clock: Callable[[], float] = time.monotonic):
        from stages.impl import StageContext, check_item_stage, implementation
        from stages.registry import get_kind

        from pipeline_dsl.engine.errors import KVPoolError
        from pipeline_dsl.engine.models import LoadedModels
        from pipeline_dsl.engine.trace import Trace
        from pipeline_dsl.userfn import callable_shape

        from .segment import DeviceUnavailable, EngineSegment, segment_spec

        self.graph, self.clock = graph, clock
        # agp serve --tool-call-parser: the form every model's tool calls are read in (else each its own)
        self.tool_call_parser = (overrides or {}).get("tool_call_parser") or "auto"
        # agp serve --reasoning-parser: the form a chat answer's thinking is split out in (None: not split)
        self.reasoning_parser = (overrides or {}).get("reasoning_parser")
        self.tool_families: dict[str | None, str] = {}      # generate stage -> its model's form (engines.py)
        self.name = str(graph.graph.get("name") or "pipeline")
        self.served_name = served_name or self.name
        self.trace = trace if trace is not None else Trace(limit=100_000)
        self.plan = make_plan(graph)
        self.kind = {n: graph.nodes[n].get("kind") for n in graph}
        self.params = {n: dict(graph.nodes[n].get("params") or {}) for n in graph}
        self.router = Router.from_graph(graph)
        self.loops = Loops.from_graph(graph, self.router.routes)
        self._unanswered: set[str] = set()     # result keys warned of at respond (no answer carries them)
        self._unanswered_past = False          # more such keys came than are named: nothing more is told
        self.returns = {n: p.get("returns", "same") for n, p in self.params.items() if self.kind[n] == "python"}
        # stages of plug-in kinds (the agp.stages entry points): what they return, how they start
        plugins = {n: kind for n, k in self.kind.items()
                   if (kind := get_kind(k)) is not None and kind.source != "builtin"}
        self.returns.update({n: _returns_of(kind) for n, kind in plugins.items()})
        # a `returns = many` stage -> the join that collects its items (check: one on every path)
        self.collector = {stage: join for stage, join, _ in self.plan.many}
        sources = [n for n, k in self.kind.items() if k == "requests"]
        self.source = sources[0] if sources else None
        self.max_queue = max_queue or (self.params[self.source].get("max_queue", 1024) if self.source else 1024)
        self.impls: dict[str, Any] = {}
        for n, k in self.kind.items():
            if k not in ENGINE_KINDS:
                try:
                    # a user module is looked up beside the file that wrote `fn` (a derived
                    # pipeline's copied stage: its base's file; an override: the derived one's), as
                    # `agp check` finds it
                    node = graph.nodes[n]
                    base = _folder_of((node.get("param_pos") or {}).get("fn") or node.get("pos")
                                      or graph.graph.get("pos"))
                    self.impls[n] = implementation(k)(n, dict(self.params[n]), StageContext(self.name, n, k, base))
                    if n in plugins:
                        check_item_stage(k, self.impls[n])
                except (Exception, SystemExit) as exc:   # noqa: BLE001 - the user's module or a plug-in's
                    # kind, said where (its sys.exit() at import too, which would end `agp run` with no
                    # word); a real Ctrl-C goes on
                    if not self.params[n].get("fn") and n not in plugins:
                        raise                                     # a built-in kind's own failure: agp's
                    raise _load_failed(graph, n, exc) from exc
        # plug-in kinds whose process is an `async def`: awaited on their stage's own loop, as a
        # python stage's coroutine is (and cancelled at its timeout)
        self.async_process = {n for n in plugins if callable_shape(self.impls[n].process) == "coroutine"}
        joins = [n for n, k in self.kind.items() if k == "join"]
        self.joins = Joins(self.router.reach, {j: self.impls[j] for j in joins},
                           {j: self.params[j].get("on_reject") or "fail" for j in joins})

        self.segments: list[EngineSegment] = []
        self.seg_by_batch: dict[str, EngineSegment] = {}
        # segments whose generate stages name the same weights (file, dtype, device, compile) take one
        # loaded copy of them: each keeps its own KV pool, scheduler and sampling defaults
        self.models = LoadedModels()
        for seg, plan in zip(segments_of(graph), self.plan.segments):
            try:
                es = EngineSegment(segment_spec(graph, seg), plan, overrides=overrides, overlap=overlap,
                                   trace=self.trace, models=self.models)
            except DeviceUnavailable as exc:
                raise _device_failed(graph, seg.generates, exc) from exc.error
            except KVPoolError as exc:
                raise _pool_failed(graph, seg.kv, exc, overrides) from exc
            self.segments.append(es)
            self.seg_by_batch[seg.batch] = es
        self.seg_of_gen = {g: es for es in self.segments for g in es.segment.generates}
        self.streaming = {n for n, k in self.kind.items() if k == "python" and self.params[n].get("stream")}
        self.streams = StreamPlan.build(self.seg_of_gen, self.router.routes, self.kind, self.streaming)
        self.prompt_segment = self._prompt_segment()
        self.first_segments = self._first_segments()

        self.flow = FlowStats(graph, self.kind)
        self.ledger = RequestLedger(clock)
        self.timer = Timer()
        self.workers: dict[str, StageWorkers] = {}      # stages that run user code: their own workers
        self.caches: dict[str, ResultCache] = {}
        self._pending: dict[tuple, list] = {}        # (stage, cache key) -> items waiting for that call
        for n, k in self.kind.items():
            if k in ENGINE_KINDS or (k in INLINE and not (k == "join" and self.joins.user_code(n))):
                continue
            p = self.params[n]
            self.workers[n] = StageWorkers(n, workers=self._workers_of(n), timeout=p.get("timeout", 0.0),
                                           retries=p.get("retries", 0), backoff=p.get("backoff", 0.5),
                                           timer=self.timer, loop=EventLoop(),
                                           events=lambda e, s, ok, n=n: self._worker_event(n, e, s, ok))
            if k == "python" and p.get("cache"):
                self.caches[n] = ResultCache(p["cache"], p.get("cache_ttl", 0.0))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agp-items")
        self.pool_size = workers
        # a request whose constraint is not compiled yet enters its batcher here, off the host pool:
        # the compile (seconds for a large schema) holds none of the threads that tokenise the other
        # requests and hand over their answers, and never the engine's loop. Its threads wait there
        # for one of the process's MAX_GRAMMAR_WORK grammar slots or for an equal spec's compile,
        # so it has more of them than slots: requests waiting on one spec's compile leave threads
        # for the other new specs to take the slots
        self.compile_pool = ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="agp-compile")
        # a conversation enters its batcher here, off the host pool, for its chat template (a template
        # runs up to TEMPLATE_SECONDS; thousands of messages or tools take a second): what a request
        # makes the template do never holds the threads that admit and tokenise raw prompts and hand
        # over answers. The template yields the GIL as it runs, so many threads share the CPU among
        # long renders and short ones rather than queue the short behind the long
        self.render_pool = ThreadPoolExecutor(max_workers=RENDER_THREADS, thread_name_prefix="agp-render")
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._closing = False
        self._tasks = 0                               # host-pool tasks queued or running
        self._telling = 0                             # results ended requests still hand over (pool)
        self.cut = 0                                  # requests close() had to fail
        self.error: BaseException | None = None
        self._tracks: dict[int, str] = {}

    def _workers_of(self, stage: str) -> int:
        """A stage's calls at once: its `workers`. A stream stage's call lasts its answer's whole
        generation, so unless the file sets `workers` it gets at least one per sequence that
        its engines run at once: fewer would hold streams back until others end."""
        given = self.params[stage].get("workers", 16)
        if stage not in self.streaming or "workers" in (self.graph.nodes[stage].get("given") or ()):
            return given
        feeding = {id(es): es for g, chain in self.streams.chains.items() if stage in chain
                   for es in (self.seg_of_gen[g],)}
        return max(given, sum(es.config.max_batch_size for es in feeding.values()))

    # ---- requests in -------------------------------------------------------------------
    def submit(self, data: dict, listener, *, pin: str | None = None, stream: bool = False) -> str:
        """Admit one request (its item dict, already validated); returns its key. Raises
        PipelineError(queue_full | unavailable) at once when it cannot be admitted, and
        PipelineError(invalid) first when its prompt is certainly too long (check_prompt_length:
        a bad request is a 400 whether or not the queue has room)."""
        if pin is not None and pin not in self.seg_of_gen:
            raise PipelineError(f"no generate stage named '{pin}'", "invalid")
        if not self.segments:
            _refuse_what_needs_a_model(data)
        self.check_prompt_length(data)
        with self._lock:
            if self.error is not None:
                raise PipelineError(f"the pipeline failed: {self.error}", "unavailable")
            if self._closing:
                raise PipelineError("the pipeline is shutting down", "unavailable")
            if self.full:
                raise PipelineError(f"the queue is full ({self.max_queue} requests waiting; "
                                    "requests.max_queue)", "queue_full")
            req = self.ledger.admit(data, listener, pin, stream)
            item = Item(REQUEST, data, req, at=self.source, queued=True)
            req.items.add(item)
            self.flow.admit(self.source)
        self._task(self._go, [(item, self.source)])
        return req.key

    def model_n(self, req: RequestState, request: dict) -> int:
        """The answers a generate stage gives `request` (its item dict): its `n`, or where it sets
        none that of the stage it pins, or the largest of the generate stages' (stage_n)."""
        n = request.get("n")
        if isinstance(n, int) and not isinstance(n, bool):
            return n
        if req.pin is not None and req.pin in self.seg_of_gen:
            return self.seg_of_gen[req.pin].n.get(req.pin, 1)
        return self.stage_n

    @property
    def stage_n(self) -> int:
        """The n that answers a request that sets none: the largest of the generate stages'."""
        return max((n for es in self.segments for n in es.n.values()), default=1)

    @property
    def max_in_flight(self) -> int:
        return self.max_queue + sum(es.config.max_batch_size for es in self.segments)

    @property
    def full(self) -> bool:
        """Whether `max_queue` requests already wait (in flight and not running on an engine).
        A paused request (pause) waits for its reader, not for an engine, and holds no engine
        resources: paused ones count only beyond `max_queue` of them, so readers that stall do
        not refuse new requests while the engines idle, and their number stays bounded."""
        running = sum(es.num_running for es in self.segments)   # a paused one's, until its park lands
        paused = self.ledger.paused
        return max(0, len(self.ledger) - paused - running) + max(0, paused - self.max_queue) >= self.max_queue

    @property
    def in_flight(self) -> int:
        return len(self.ledger)

    @property
    def accepting(self) -> bool:
        """Whether submit() takes new requests (not closing, not failed)."""
        return not self._closing and self.error is None

    def running(self, key: str) -> bool:
        """Whether the request is still in flight: its answer not yet whole (a stream's tokens may
        still be on their way to its consumer once it is not)."""
        req = self.ledger.get(key)
        return req is not None and not req.done

    def abort(self, key: str, message: str = "aborted by the client") -> None:
        req = self.ledger.get(key)
        if req is not None:
            self._fail(req, PipelineError(message, "aborted"))

    def pause(self, key: str, paused: bool = True) -> bool:
        """Pause a request's generation, for a reader that does not keep up: its engine sequences
        leave their batches (their KV blocks freed, what they had recomputed when they go on) and
        wait, neither running nor queued, until pause(key, False); sequences it starts meanwhile
        start paused. A stream stage waiting for their chunks is not timed meanwhile (its timeout
        bounds its function's own time), and lends its worker to other requests (flow/workers.py:
        its stage runs one more call at once while it is paused); a call of user code that runs
        meanwhile (on another branch) is timed as ever. Once the runtime stops admitting (a drain) nothing is paused:
        what is in flight runs to its end. Returns whether the request is paused now (False: let
        go, refused in a drain, or no longer in flight)."""
        with self._lock:
            req = self.ledger.get(key)
            if req is None or req.done or (paused and self._closing):
                return False
            if req.paused == paused:
                return paused
            self.ledger.set_paused(req, paused)
            seqs = list(req.seqs.items())
            for item in req.items:
                self._lend_paused(item, paused)
        self._park_as_paused(req, seqs, paused)
        return paused

    def _park_as_paused(self, req, seqs: list, parked: bool) -> None:
        """Park (or let go) `seqs` [(sequence id, segment)] as `parked` says, then again as long as
        the request's pause changed meanwhile: a pause(key, ...) on another thread may have set it
        after it was read here, and its own parks, reaching the engines first, would be undone by
        these (a sequence parked for good under a request no longer paused: never answered)."""
        while True:
            for seq_id, es in seqs:
                es.park(seq_id, parked)
            with self._lock:
                if req.done or req.paused == parked:
                    return
                parked = req.paused

    # ---- items through stages ----------------------------------------------------------
    def _go_off(self, pool: str, batch) -> None:
        """_go on a compile thread (its batcher builds the grammar here) or a render thread (its
        batcher renders the conversation here). Also where that pool is shut down and _task runs
        this inline (a late request at a close): marked as such a thread for the call, so it
        enters its batcher rather than asks a pool again."""
        was = getattr(_off_pool, "here", None)
        _off_pool.here = pool
        try:
            self._go(batch)
        finally:
            _off_pool.here = was

    def _go(self, pairs) -> None:
        """Carry items (and what they become) as far as they go on this thread; a stage that
        runs user code takes them off to its own workers."""
        work = deque(pairs)
        while work:
            item, stage = work.popleft()
            if item.req.done or item not in item.req.items:
                continue                           # its request ended, or its branch was dropped
            try:
                work.extend(self._step(item, stage))
            except BaseException as e:              # noqa: BLE001 - a stage's failure fails its request only
                self._fail_item(item, item.at or stage, e)

    def _unanswered_keys(self, stage: str, data: dict) -> None:
        """A result that reaches a respond stage with a key no answer carries (a python stage set
        `metadata` on it, say): a warning, once per key, that the answer leaves it out. At most
        UNANSWERED_NAMED keys are named, then one warning that more are not (a stage that names a key
        per request would log a line per request, and remember every name, for as long as it serves).
        A key need not be a string (a function may set `item[2]`): each is named by its repr. Only
        a warning: nothing here fails the request."""
        with self._lock:
            if self._unanswered_past:
                return                             # as many named as will be, and the last warning given
            new = sorted({_key_name(k) for k in data.keys() - ANSWER_KEYS} - self._unanswered)
            room = UNANSWERED_NAMED - len(self._unanswered)
            new, more = new[:room], len(new) > room
            self._unanswered.update(new)
            self._unanswered_past = more
        for key in new:
            log.warning("respond '%s': a result carries %s, which no answer has a place for, so the answer "
                        "leaves it out (an answer gives its text, finish_reason, usage, and the fields "
                        "docs/language.md lists); to tell the client, put it in the text, and for stages "
                        "after, in the request's metadata (item[\"request\"][\"metadata\"])", stage, key)
        if more:
            log.warning("respond '%s': results carry more keys that no answer has a place for than the %d "
                        "named above; the others are not named (a stage that sets a key named per request, "
                        "item[f\"score_{id}\"], makes a new one each time: keep such values under one key)",
                        stage, UNANSWERED_NAMED)

    def _step(self, item: Item, stage: str) -> list[tuple[Item, str]]:
        kind = self.kind[stage]
        with self._lock:
            if item.queued:
                item.queued = False
                self.flow.taken(stage)
        if kind == "respond":
            t0 = time.perf_counter()
            if item.kind == GENERATED and not item.data.keys() <= ANSWER_KEYS:
                self._unanswered_keys(stage, item.data)
            with self._lock:
                item.req.results.append(item)
                item.req.items.discard(item)
                self._check(item.req)
            self._span(stage, "respond", t0, item)
            return []
        if kind == "join":
            with self._lock:
                fired = self.joins.arrive(item.req, stage, item)
            return [x for j, waiting in fired for x in self._fire(item.req, j, waiting)]
        if kind == "dynamic_batch":
            es = self.seg_by_batch[stage]
            if getattr(_off_pool, "here", None) is None:
                if es.needs_compile(item.data):
                    self._task(self._go_off, "compile", [(item, stage)], pool=self.compile_pool)
                    return []
                if item.data.get("messages") is not None:
                    self._task(self._go_off, "render", [(item, stage)], pool=self.render_pool)
                    return []
            self._enter_segment(item, es)
            return []
        if stage in self.loops and self.loops.leaves(stage, item.turns):
            return self._send(item, stage, only=self.loops.exits[stage])   # max_turns reached: leave
        if item.live is not None and item.live.index(stage) is not None:
            return self._arrive_live(item, stage)
        if stage in self.workers:
            return self._call(item, stage)
        impl = self.impls[stage]
        t0 = time.perf_counter()
        out = impl.process(item.data)
        self._observe(stage, t0, item)
        self._take(item, stage, item.data, out, trusted=kind in TRUSTED)
        return self._send(item, stage)

    def _call(self, item: Item, stage: str) -> list[tuple[Item, str]]:
        """A stage that runs user code: its result cache, else a call on its own workers."""
        view = copy.deepcopy(item.data)            # a user function gets its own copy
        cache = self.caches.get(stage)
        key = cache_key(view) if cache is not None else None
        hit = cache.get(key, view) if cache is not None else None
        if hit is not None:
            with self._lock:
                self.flow.stage[stage].cache_hits += 1
            label, data = hit
            self._take(item, stage, data, label if label is not None else data)
            return self._send(item, stage)
        if key is not None:
            with self._lock:                       # the same content already on its way: wait for it
                waiting = self._pending.get((stage, key))
                if waiting is not None:
                    waiting.append(item)
                    return []
                self._pending[(stage, key)] = []
        tries = _Tries(view, item.data, self.workers[stage].retries)
        fn, is_async = self._callable(stage, tries.take)
        t0 = time.perf_counter()
        self.workers[stage].submit(fn, lambda ok, value: self._task(self._called, item, stage, tries, ok, value,
                                                                   key, t0), is_async,
                                   alive=lambda: not item.req.done and item in item.req.items)
        return []

    def _callable(self, stage: str, take: Callable[[], dict]) -> tuple[Callable, bool]:
        """(the call, whether to await it) for one item at a stage that runs user code; each try
        works on the copy `take()` gives it."""
        impl = self.impls[stage]
        if stage in self.streaming:                # reached without a live stream: filtered whole
            if impl.shape == "async_generator":
                def afilter():
                    view = take()
                    return arun_filter(impl.fn, view, one_chunk(view.get("text") or ""), _ignore)
                return afilter, True

            def sfilter():
                view = take()
                text = view.get("text") or ""
                return run_filter(impl.fn, view, [text] if text else [], _ignore)
            return sfilter, False
        if getattr(impl, "shape", None) == "coroutine":
            return (lambda: impl.fn(take())), True
        if stage in self.async_process:
            return (lambda: impl.process(take())), True
        return (lambda: self._awaited(stage, impl.process(take()))), False

    def _awaited(self, stage: str, value):
        """A sync function (a python stage's, a join's) that returned an awaitable (a decorated
        `async def`): awaited on its stage's own loop, so that it stalls no other stage's, and
        cancelled at the stage's timeout, as a coroutine the stage calls itself is (its thread
        is written off then)."""
        import inspect

        if not inspect.isawaitable(value):
            return value
        w = self.workers[stage]
        return w.loop.wait(value, w.timeout or None,
                           lambda: StageTimeout(f"it took longer than its timeout ({w.timeout:g}s)"))

    def _called(self, item: Item, stage: str, tries: "_Tries", ok: bool, value, key, t0: float) -> None:
        """A call of a stage's user code ended (on the host pool): the item goes on, or fails;
        items that waited for the same content look in the cache again."""
        if not isinstance(value, Skipped):
            self._span(stage, _PART.get(self.kind[stage], "run"), t0, item)
            if not ok:
                value = _after_tries(stage, value, tries.count)
        try:
            self._after_call(item, stage, tries.view, ok, value, key)
        finally:
            if key is not None:
                with self._lock:
                    waited = self._pending.pop((stage, key), [])
                for other in waited:
                    self._task(self._recall, other, stage)

    def _recall(self, item: Item, stage: str) -> None:
        if item.req.done or item not in item.req.items:
            return
        try:
            nxt = self._call(item, stage)
        except BaseException as e:                  # noqa: BLE001
            self._fail_item(item, stage, e)
            return
        self._go(nxt)

    def _after_call(self, item: Item, stage: str, view: dict, ok: bool, value, key) -> None:
        if item.req.done or item not in item.req.items:
            return
        if not ok:
            self._fail_item(item, stage, value)
            return
        try:
            if stage in self.collector:                 # returns = many: a list of requests
                nxt = self._spread(item, stage, value)
            else:
                if stage in self.streaming:
                    item.data["text"], item.label = value
                    item.label = item.label if isinstance(item.label, str) else None
                else:
                    self._take(item, stage, view, value)
                    if key is not None:
                        self.caches[stage].put(key, value if isinstance(value, str) else None, item.data)
                nxt = self._send(item, stage)
        except BaseException as e:                  # noqa: BLE001
            self._fail_item(item, stage, e)
            return
        self._go(nxt)

    def _take(self, item: Item, stage: str, view: dict, out, trusted: bool = False) -> None:
        """What a stage returned: the item's new dict (and type), or a label."""
        item.label = None
        if out is None:
            out = view
        if isinstance(out, str):
            item.label, out = out, view
        if not isinstance(out, dict):
            raise PipelineError(f"stage '{stage}' returned {type(out).__name__}; expected the item's dict, "
                                "a label string or None", "failed", stage)
        if out is not item.data:
            kind = _kind_of(out)
            if kind is None:
                raise PipelineError(f"stage '{stage}' returned a dict that is neither a request (messages, "
                                    "prompt or prompt_token_ids) nor a result (text)", "failed", stage)
            declared = self.returns.get(stage, "same")
            if declared != "any" and kind != {"same": item.kind, "request": REQUEST,
                                              "generated": GENERATED}[declared]:
                if self.kind[stage] != "python":      # a plug-in kind: its output ports say
                    raise PipelineError(f"stage '{stage}' returned a {kind}, but its kind '{self.kind[stage]}' "
                                        f"gives {item.kind if declared == 'same' else declared.capitalize()} "
                                        "items (its outputs)", "failed", stage)
                raise PipelineError(f"stage '{stage}' returned a {kind} but declares returns = {declared} "
                                    f"(it got a {item.kind}); set returns = any if it may do both",
                                    "failed", stage)
            if kind == REQUEST and not trusted:
                out = _valid_request(out, stage)
                ids = out.get("prompt_token_ids")
                if not (item.kind == REQUEST and ids == item.data.get("prompt_token_ids")):
                    self._check_ids(out, stage, item.req.pin)    # the stage's ids, not the client's: failed here
            elif kind == GENERATED:
                out = _completed(out, view, item.kind)
                check_result(out, stage, f"stage '{stage}' returned",
                             item.data if item.kind == GENERATED else None,
                             self.vocab_of(item.req.pin, out.get("generated_by")))
                if item.kind == REQUEST:
                    out = self._answered_here(item, stage, out)
            item.kind, item.data = kind, out

    def _spread(self, item: Item, stage: str, value) -> list[tuple[Item, str]]:
        """What a `returns = many` stage returned: each request of its list goes on as an item of
        its own, a branch of the request numbered by its place in the list (so the join that
        collects them sees them in list order). An empty list leaves a hollow item at that join."""
        base = item.data if item.kind == REQUEST else item.data.get("request")
        elements = self._elements(item, stage, value, base)
        req = item.req
        with self._lock:
            if req.done or item not in req.items:
                return []
            req.items.discard(item)
            join = self.collector[stage]
            if join is not None:                     # what the join's merged result answers
                req.spread_from.setdefault(join, []).append((item.branch, base))
            if not elements:
                hollow = Item(GENERATED, {"id": item.data.get("id", req.id), "request": base, "finish_reason": "stop",
                                          "from_many": stage}, req, join, item.branch, dict(item.turns), hollow=True)
                if join is not None:
                    req.joins.setdefault(join, []).append(hollow)
                self._check(req)
                return []
            forks = []
            for i, data in enumerate(elements):
                it = Item(REQUEST, data, req, stage, item.branch + (i,), dict(item.turns),
                          sampled=item.sampled, split=item.split, copy=item.copy)
                req.items.add(it)
                forks.append(it)
        return [x for it in forks for x in self._send(it, stage)]

    def _elements(self, item: Item, stage: str, value, base) -> list[dict]:
        """A `returns = many` stage's list, checked: at most its max_items requests, each a request
        dict (messages, prompt or prompt_token_ids) that is checked as a request line is. What an
        element leaves out of the settings (its id, metadata, headers, user, sampling settings, n,
        response_format, logprobs) is the request's the stage got (a result's: the request that made
        it), as a fan-out's copies carry it; its prompt is its own, and so is how that prompt is
        rendered (requests_io.PROMPT_SHAPING: none of the request's echo, continue_final_message, …),
        and an element without messages takes none of the chat request's own fields (CHAT_ONLY: tools,
        chat_template_kwargs, …)."""
        from pipeline_dsl.requests_io import CHAT_ONLY, FORMAT_FIELDS, PROMPT_SHAPING, TOOL_GROUP

        if not isinstance(value, (list, tuple)):
            raise PipelineError(f"stage '{stage}' returned {_a(value)}, but it declares returns = many: its "
                                "function returns a list of requests", "failed", stage)
        cap = self.params[stage].get("max_items", 64)
        if len(value) > cap:
            raise PipelineError(f"stage '{stage}' returned a list of {len(value)} requests, more than its "
                                f"max_items = {cap}", "failed", stage)
        base = base if isinstance(base, dict) else {}
        out = []
        for i, element in enumerate(value):
            if not isinstance(element, dict) or _kind_of(element) != REQUEST:
                what = "a result (text), not a request" if isinstance(element, dict) and _kind_of(element) \
                    else "a dict without messages, prompt or prompt_token_ids" if isinstance(element, dict) \
                    else _a(element)
                raise PipelineError(f"stage '{stage}' returned a list whose item [{i}] is {what}; expected a "
                                    "request dict (messages, prompt or prompt_token_ids)", "failed", stage)
            own = {*PROMPT_FORMS, *PROMPT_SHAPING, *(() if "messages" in element else CHAT_ONLY)}
            for group in (FORMAT_FIELDS, TOOL_GROUP):       # one of a group given: the element's group
                if element.keys() & set(group):
                    own.update(group)
            full = {k: copy.deepcopy(v) for k, v in base.items() if k not in element and k not in own}
            full.update(element)
            whose = f"a list whose item [{i}] is "
            request = _valid_request(full, stage, whose)
            self._check_ids(request, stage, item.req.pin, whose)
            out.append(request)
        return out

    def _check_ids(self, request: dict, stage: str, pin: str | None, whose: str = "") -> None:
        """A request a stage returned whose prompt_token_ids are no ids of the vocabulary fails at
        that stage (they are the stage's, not the client's)."""
        ids = request.get("prompt_token_ids")
        if ids is not None and (problem := token_field_problem("prompt_token_ids", ids, self.request_vocab(pin))):
            raise PipelineError(f"stage '{stage}' returned {whose}a request whose {problem}", "failed", stage)

    def _answered_here(self, item: Item, stage: str, out: dict) -> dict:
        """A Request the stage answered itself: the answer's usage, counted in its request's. What
        the result gives of it (a function that asked another service knows its counts); else no
        tokens generated, none cached, and the request's prompt as the pipeline's model tokenises
        it (what `prompt_tokens` conditions read) where no model counted a prompt of the request
        yet; 0 where the pipeline has no model, or the prompt is one it cannot take."""
        given = out.get("usage") or {}
        usage = {k: given.get(k) or 0 for k in COUNTED}
        counted = item.req.usage["prompt_tokens"] > 0
        if given.get("prompt_tokens") is None and self.prompt_segment is not None and not counted:
            try:
                usage["prompt_tokens"] = len(self._ids(item, self.prompt_segment, stage, "prompt_tokens"))
            except PipelineError:
                pass                               # no count the model can give: none reported
        with self._lock:
            for k in COUNTED:
                item.req.usage[k] += usage[k]
        return {**out, "usage": usage}

    def _send(self, item: Item, stage: str, only: list[str] | None = None) -> list[tuple[Item, str]]:
        """Route an item out of `stage`: a copy along every edge the router takes."""
        if only is not None:
            dsts = self.router.leave(only, item.kind)
        else:
            dsts = self.router.choose(stage, item.kind, self._fields(item, stage), item.label, item.req.pin)
        if not dsts:
            raise PipelineError(f"stage '{stage}': no out-edge takes this {item.kind}"
                                + (f" (label {item.label!r})" if item.label else ""), "failed", stage)
        out = []
        with self._lock:
            if item.req.done or item not in item.req.items:
                return []
            for i, dst in enumerate(dsts):
                it = item if i == 0 else item.fork(item.branch + (i,))
                if len(dsts) > 1 and i == 0:
                    it.branch = item.branch + (0,)
                it.at, it.queued, it.label = dst, True, None
                item.req.items.add(it)
                self.flow.edge(stage, dst)
                out.append((it, dst))
        return out

    def _fields(self, item: Item, stage: str) -> Callable[[str], Any]:
        return fields(item.data, item.kind, prompt_tokens=lambda: self._prompt_tokens(item, stage),
                      turn=Loops.turn(item.turns), stream=item.req.stream, served_name=self.served_name)

    # ---- failures ----------------------------------------------------------------------
    def _fail_item(self, item: Item, stage: str, exc: BaseException) -> None:
        """An item failed at `stage`: a Reject drops its branch when the joins ahead say so,
        anything else fails its request."""
        err = _error_of(stage, exc)
        if err.kind == "rejected" and item.branch and self.joins.drops(err.stage or stage):
            self._drop_branch(item, err)
        else:
            self._fail(item.req, err, item)

    def _fail(self, req: RequestState, err: PipelineError, item: Item | None = None) -> None:
        """The request ends with `err`: counted at the stage where the failing item is (where it
        was refused, which the error may name otherwise: a prompt over requests.max_prompt_tokens
        is refused in the source's name once the engine's encode has counted its tokens), every
        other live item dropped where it is, its engine sequences aborted, its listener told."""
        with self._lock:
            if req.done:
                return
            if item is not None:
                req.items.discard(item)
            at = item.at if item is not None and item.at in self.flow.stage else err.stage
            if item is not None and at in self.flow.stage:
                row = self.flow.stage[at]
                if err.kind in ("rejected", "invalid"):
                    row.rejected += 1
                else:
                    row.failed += 1
            self._drop_all(req)
            seqs = self.ledger.close(req, failed=True)
            self._idle.notify_all()
        for seq_id, es in seqs:
            es.abort(seq_id)
        self._abandon()
        tell_result(req, self.ledger.failure(req, err))

    def _abandon(self) -> None:
        """A request failed: the calls still running for it give their workers back (each
        stays counted as stuck until its code returns; flow/workers.py)."""
        for w in self.workers.values():
            w.abandon()

    def _drop_all(self, req: RequestState) -> None:
        """(under the lock) Every live item of a request that ended elsewhere: dropped where it is."""
        for it in req.items:
            row = self.flow.stage.get(it.at)
            if row is not None:
                row.dropped += 1
                if it.queued:
                    row.queued -= 1
            it.queued = False
            if it.live is not None:
                it.live.cancel()
        for it in req.results:                      # answers it had: no longer answers
            self.flow.stage[it.at].dropped += 1
        req.items.clear()
        req.joins.clear()

    def _drop_branch(self, item: Item, err: PipelineError) -> None:
        """on_reject = drop: the rejected branch leaves; the join merges the others."""
        abort = []
        with self._lock:
            req = item.req
            if req.done or item not in req.items:
                return
            req.items.discard(item)
            self.flow.stage[err.stage].rejected += 1
            req.rejection = req.rejection or err
            for j in self.joins.reached_first(err.stage):    # the join that would have got its result
                req.rejected_at.setdefault(j, err)
            for seq_id, es in list(req.seqs.items()):
                if self.ledger.item_of(seq_id) is item:
                    self.ledger.release(seq_id)
                    abort.append((seq_id, es))
            if item.live is not None:
                item.live.cancel()
            self._check(req)
        for seq_id, es in abort:
            es.abort(seq_id)

    # ---- joins ---------------------------------------------------------------------------
    def _fire(self, req: RequestState, stage: str, waiting: list[Item]) -> list[tuple[Item, str]]:
        impl = self.impls[stage]
        inputs = self.joins.inputs(stage, waiting)
        with self._lock:
            rejected = req.rejected_at.pop(stage, None)
            if not inputs and rejected is not None:
                # no results because its branches were refused (on_reject = drop), beside an empty
                # list's none: as a join whose every branch was refused, it merges nothing, and the
                # request fails with the refusal unless another way answers it
                self._check(req)
                return []
        empty = self.joins.empty(stage, waiting)
        if empty is not None:
            raise empty
        t0 = time.perf_counter()
        if self.joins.user_code(stage):               # the user's fn: on the join's own workers
            came = [it.data for it in inputs]
            tries = _Tries(copy.deepcopy(came), came, self.workers[stage].retries)
            call = (lambda: impl.amerge(tries.take())) if impl.is_async else \
                (lambda: impl.merge(tries.take(), awaited=lambda value: self._awaited(stage, value)))

            def done(ok, value):
                self._task(self._merged_later, req, stage, waiting, ok, value, t0, tries.count)
            self.workers[stage].submit(call, done, impl.is_async, alive=lambda: not req.done)
            return []
        merged = impl.merge([it.data for it in inputs])
        self._observe(stage, t0, inputs[0], part="merge")
        return self._merged(req, stage, waiting, merged)

    def _merged_later(self, req: RequestState, stage: str, waiting: list[Item], ok: bool, value, t0,
                      tries: int = 1) -> None:
        if isinstance(value, Skipped):
            return                                  # the request ended before its merge: nothing to do
        self._span(stage, "merge", t0, waiting[0])
        try:
            if not ok:
                raise _after_tries(stage, value, tries, "join")
            nxt = self._merged(req, stage, waiting, value)
        except BaseException as e:                  # noqa: BLE001
            self._fail(req, _error_of(stage, e, "join"), waiting[0])
            return
        self._go(nxt)

    def _merged(self, req: RequestState, stage: str, waiting: list[Item], merged) -> list[tuple[Item, str]]:
        first = min([it for it in waiting if not it.hollow] or waiting, key=lambda it: it.branch)
        data = self.joins.result(stage, waiting, merged, lambda gen: self.vocab_of(req.pin, gen),
                                 self._spread_request(req, stage, waiting, first))
        item = Item(GENERATED, data, req, stage, first.branch[:-1] if first.branch else (), dict(first.turns))
        # the answer is one branch's text (or a fn's): what its generate stage read of it still holds
        item.tool_read = next((it.tool_read for it in waiting
                               if it.tool_read is not None and it.data.get("text") == data.get("text")), None)
        with self._lock:
            if req.done:
                return []
            for it in waiting:
                req.items.discard(it)
            req.items.add(item)
        return self._send(item, stage)

    def _spread_request(self, req: RequestState, stage: str, waiting: list[Item], first: Item) -> dict | None:
        """The request a `returns = many` stage got whose items this join collects (None for a join
        of no such stage): the outermost such stage's on `first`'s path, when many stages nest. The
        records of the items merged here are used up."""
        def under(branch: tuple, it: Item) -> bool:
            return it.branch[:len(branch)] == branch

        with self._lock:
            spread = req.spread_from.get(stage)
            if not spread:
                return None
            mine = [(b, r) for b, r in spread if any(under(b, it) for it in waiting)]
            req.spread_from[stage] = [e for e in spread if e not in mine]
        heads = sorted((b for b, _ in mine if under(b, first)), key=len)
        return next((r for b, r in mine if b == heads[0]), None) if heads else None

    def _check(self, req: RequestState) -> None:
        """(under the lock) An item left: fire the joins nothing else can reach, or finish."""
        if req.done:
            return
        fired = self.joins.ready(req)
        for j, waiting in fired:
            self._task(self._fire_later, req, j, waiting)
        if not req.items and not fired:
            self._finish(req)

    def _fire_later(self, req: RequestState, stage: str, waiting: list[Item]) -> None:
        try:
            nxt = self._fire(req, stage, waiting)
        except BaseException as e:                  # noqa: BLE001
            self._fail(req, _error_of(stage, e, "join"), waiting[0])
            return
        self._go(nxt)

    def _finish(self, req: RequestState) -> None:
        """(under the lock) Every item of the request is done: answer it."""
        result = self.ledger.answer(req, self.model_n)
        self.ledger.close(req, failed=result.error is not None)
        self._telling += 1                  # idle (wait_idle, close) only once it is handed over
        self._task(self._tell_result, req, result)

    def _tell_result(self, req: RequestState, result: Result) -> None:
        try:
            tell_result(req, result)
        finally:
            with self._lock:
                self._telling -= 1
                self._idle.notify_all()

    # ---- measuring and tracing -------------------------------------------------------------
    def _worker_event(self, stage: str, event: str, seconds: float, ok: bool) -> None:
        with self._lock:
            row = self.flow.stage[stage]
            if event == "call":
                row.observe(seconds, ok)
            elif event == "timeout":
                row.timeouts += 1
            elif event == "retry":
                row.retries += 1
            elif event == "stall":
                row.stalls += 1

    def _observe(self, stage: str, t0: float, item: Item, part: str | None = None, span: bool = True) -> None:
        """A built-in stage's work on one item: its time, and a span in the trace."""
        t1 = time.perf_counter()
        with self._lock:
            self.flow.stage[stage].observe(t1 - t0)
        if span:
            self._span(stage, part or _PART.get(self.kind[stage], "run"), t0, item)

    def _span(self, stage: str, part: str, t0: float, item: Item) -> None:
        self.trace.add(self._track(), f"{stage}.{part}", t0, time.perf_counter(), -1,
                       {"request": item.req.key, "id": str(item.req.id)})

    # ---- measuring -----------------------------------------------------------------------
    def stats(self) -> dict:
        """Per stage: items in/out, rejected, failed, dropped, queue depth, seconds, calls and
        their latencies; per edge: items sent along it; per engine: its counters; models: the
        weights its engines loaded (LoadedModels.cache_info: each copy's bytes counted once)."""
        engines = {es.name: es.stats() for es in self.segments}
        with self._lock:
            stages = self.flow.rows()
            edges = self.flow.edge_rows()
            totals = dict(self.ledger.totals, in_flight=len(self.ledger))
        for n, w in self.workers.items():
            stages[n]["stuck"] = w.stuck
            stages[n]["lent"] = w.slots_lent
        for es in self.segments:
            s = engines[es.name]
            seg = es.segment
            work = s.get("work_s", {})
            stages[seg.batch]["queued"] = s.get("waiting", 0)
            stages[seg.batch]["busy_s"] = round(sum(v for k, v in work.items()
                                                    if k.startswith(seg.batch + ".")), 6)
            stages[seg.kv]["busy_s"] = round(sum(v for k, v in work.items() if k.startswith(seg.kv + ".")), 6)
            gen_s = sum(v for k, v in work.items() if k.startswith(seg.name + "."))
            for g in seg.generates:
                stages[g]["busy_s"] = round(gen_s / len(seg.generates), 6)
                stages[g]["queued"] = s.get("running", 0)
        return {"stages": stages, "edges": edges, "engines": engines, "requests": totals,
                "models": self.models.cache_info()}


def _ignore(_chunk) -> None:
    pass


class _Tries:
    """The item's copy each try of one call works on (a join fn's: the list of its results): the
    first try's is `view`; a retry gets a fresh copy of `came`, the item as it came (it stays as it
    is while its stage's call runs), never what a failed try wrote on its own copy (a message it
    appended before its connection broke would be there twice). `view`: the latest try's."""
    __slots__ = ("came", "view", "count")

    def __init__(self, view: "dict | list", came: "dict | list", retries: int):
        self.came = came if retries else None
        self.view, self.count = view, 0

    def take(self) -> "dict | list":
        self.count += 1
        if self.count > 1 and self.came is not None:
            self.view = copy.deepcopy(self.came)
        return self.view


def _after_tries(stage: str, exc: BaseException, count: int, what: str = "stage") -> BaseException:
    """The error a call failed with after `count` tries (its retries spent): a timeout or a
    failure says how many tries it had (`… (0.1s); 3 tries`), so a log or a client tells a stage
    that failed once from one that failed every retry. A Reject's words, or a request error, stay
    as they are."""
    if count < 2:
        return exc
    err = _error_of(stage, exc, what)
    if err.kind not in ("timeout", "failed", "unavailable") or err.status is not None:
        return exc
    return PipelineError(f"{err.message}; {count} tries", err.kind, err.stage, err.code, err.param,
                         err.status, err.retry_after)


def _error_of(stage: str, exc: BaseException, what: str = "stage") -> PipelineError:
    """Any exception of a stage (BaseException included) as its request's error."""
    if isinstance(exc, PipelineError):
        return exc if exc.stage else PipelineError(exc.message, exc.kind, stage, exc.code, exc.param,
                                                   exc.status, exc.retry_after)
    if isinstance(exc, Reject):
        try:            # one changed after it was made (r.status = 405), or a subclass's own, is the stage's bug
            exc.check()
        except ValueError as bad:
            return PipelineError(f"{what} '{stage}' failed: ValueError: {bad}", "failed", stage)
        return PipelineError(_said(exc) or "rejected", "rejected", stage, code=getattr(exc, "code", None),
                             param=getattr(exc, "param", None), status=getattr(exc, "status", None),
                             retry_after=getattr(exc, "retry_after", None))
    if isinstance(exc, StageTimeout):
        return PipelineError(f"{what} '{stage}' timed out: {exc}", "timeout", stage)
    if isinstance(exc, StageStuck):
        return PipelineError(f"{what} '{stage}' is unavailable: {exc}", "unavailable", stage,
                             code=STAGE_UNAVAILABLE_CODE)
    said = _said(exc)
    detail = f"{type(exc).__name__}: {said}" if said else type(exc).__name__
    # transient: a service it calls is down or busy (its retries spent), try again later; else a bug
    transient = is_transient(exc)
    err = PipelineError(f"{what} '{stage}' failed: {detail}", "unavailable" if transient else "failed", stage,
                        code=STAGE_UNAVAILABLE_CODE if transient else None)
    err.__cause__ = exc                         # where it was raised: a front end logs its traceback
    return err


def _said(exc: BaseException) -> str:
    """An exception's message; one whose __str__ itself raises is said to be unreadable (its
    request must still fail, not hang with the error that its message raised)."""
    try:
        return str(exc)
    except BaseException as e:                   # noqa: BLE001 - the user's __str__, whatever it raises
        return f"(its message cannot be read: str() raised {type(e).__name__})"


def _returns_of(kind) -> str:
    """What a plug-in kind's process may return, in a python stage's `returns` words: what its
    output ports give (a passthrough kind: the type it got)."""
    emits = kind.emits & {REQUEST, GENERATED}
    if kind.passthrough or not emits:
        return "same"
    return "any" if len(emits) == 2 else "request" if REQUEST in emits else "generated"


def _kind_of(d: dict) -> str | None:
    if "messages" in d or "prompt" in d:
        return REQUEST
    if "text" in d:
        return GENERATED
    if "prompt_token_ids" in d:       # a request line's third prompt form (a result may carry it too)
        return REQUEST
    return None


def _valid_request(d: dict, stage: str, whose: str = "") -> dict:
    """A request dict a stage returned, checked as a request line would be (a lone surrogate
    too, and where). `whose`: "a list whose item [i] is " for an element of returns = many."""
    from pipeline_dsl.requests_io import RequestError, check_unicode, parse_request

    try:
        item = parse_request(d).item()
        check_unicode(item)
        return item
    except RequestError as e:
        raise PipelineError(f"stage '{stage}' returned {whose}an invalid request: {e}", "failed", stage) from None


# the keys of a result that an answer is made of, or that the runtime keeps on it (a hollow item's
# from_many, an embedding's pooled vector): another key a stage sets reaches no client
ANSWER_KEYS = frozenset({"id", "text", "finish_reason", "usage", "generated_by", "request", "constrained",
                         "stop_reason", "branches", "tool_calls", "logprobs", "prompt_logprobs", "token_ids",
                         "prompt_token_ids", "pooled", "from_many"})
log = logging.getLogger("agp.flow")
UNANSWERED_NAMED = 64       # result keys no answer carries that a run names at most (one warning each)


def _key_name(key) -> str:
    """A result's key as a warning names it: its repr ('metadata', 2, ('a', 1)), or its type's
    name where the repr fails."""
    try:
        return repr(key)
    except Exception:                              # noqa: BLE001 - a user's key; the name is only for a warning
        return f"<{type(key).__name__}>"


def _completed(out: dict, got: dict, got_kind: str) -> dict:
    """A result dict a stage returned: what it leaves out (or sets to None) of finish_reason, usage,
    generated_by, constrained, request and id comes from the item it got, as a join's new dict gets
    them from its first branch, so `return {"text": "…"}` is a whole answer and the stages after it
    still find `request`. A Request the stage answered itself gives its id and itself as `request`, and
    the answer finished normally ("stop"). A copy when something is filled: the function may hand
    back one dict of its own (a canned answer) for every request."""
    if got_kind == GENERATED:
        fill = {k: got.get(k) for k in FILLED if k != "constrained" or same_stage(out, got)}
    else:
        fill = {"id": got.get("id"), "request": got, "finish_reason": "stop"}
        # the request's own `logprobs: 2` / `prompt_logprobs: 1` (how many alternatives) in a request
        # dict answered in place are its settings, still in `request`: no answer's logprobs
        kept = {k: out[k] for k in REQUEST_LOGPROBS if k in out and out[k] == got.get(k)}
        if kept:
            out = {k: v for k, v in out.items() if k not in kept}
    missing = {k: v for k, v in fill.items() if out.get(k) is None and v is not None}
    return {**out, **missing} if missing else out


PROMPT_FORMS = ("messages", "prompt", "prompt_token_ids")   # a request's prompt: a many element's own


def _a(value) -> str:
    """'a dict', 'an int', 'None': what a function returned, in a sentence."""
    return "None" if value is None else a_type(value)


REQUEST_LOGPROBS = ("logprobs", "prompt_logprobs")      # a request's settings, an answer's tokens' logprobs


def _device_failed(graph: nx.DiGraph, generates, exc) -> BaseException:
    """A device the machine lacks (device = cuda without CUDA), as a CheckFailed at the `device`
    setting that asked for it: a generate stage's own, else the pipeline's. check does not probe
    the hardware, so this is only found here. The engine's error as it is when no setting of the
    file chose the device (the caller's overrides did, or the default did)."""
    from pipeline_dsl.diagnostics import ERROR, Diagnostic

    if exc.from_overrides:
        return exc.error
    asking = [g for g in generates if str(graph.nodes[g]["params"].get("device")) == exc.device]
    pos = next((graph.nodes[g]["param_pos"].get("device") for g in asking
                if "device" in graph.nodes[g].get("given", ())), None)
    if pos is None and "device" in graph.graph.get("given_settings", ()):
        pos = (graph.graph.get("setting_pos") or {}).get("device")
    if pos is None:
        return exc.error
    diag = Diagnostic(ERROR, str(exc.error), pos, expected="a device this machine has: cpu, or auto")
    return _check_failed(diag, pos)


def _pool_failed(graph: nx.DiGraph, kv: str, exc: BaseException, overrides: dict | None) -> BaseException:
    """A KV pool the machine cannot hold (a budget past its memory), as a CheckFailed at what set the
    budget: the kv_lookup stage's own `budget`, else the pipeline's `kv_budget`, else the stage (the
    mode's budget). check does not probe the memory, so this is only found here. The engine's error
    as it is when the caller's overrides set the budget."""
    from pipeline_dsl.diagnostics import ERROR, Diagnostic

    if (overrides or {}).get("kv_budget_bytes") is not None:
        return exc
    node = graph.nodes[kv]
    if "budget" in node.get("given", ()):
        pos, what = node["param_pos"].get("budget"), f"a smaller budget for '{kv}'"
    elif "kv_budget" in graph.graph.get("given_settings", ()):
        pos, what = (graph.graph.get("setting_pos") or {}).get("kv_budget"), "a smaller kv_budget"
    else:
        pos, what = None, f"a budget for '{kv}' (budget = …) or the pipeline (kv_budget = …)"
    pos = pos or node.get("pos")
    diag = Diagnostic(ERROR, str(exc), pos, expected=f"{what} that this machine's memory holds")
    return _check_failed(diag, pos)


def _folder_of(pos) -> str | None:
    """The folder of the file at `pos`; None for text that came from no file."""
    if pos is None or not pos.file or pos.file.startswith("<"):
        return None
    return os.path.dirname(os.path.abspath(pos.file))


def _check_failed(diag, pos):
    """A CheckFailed of one diagnostic, with the source of its file to show the line."""
    from pipeline_dsl.diagnostics import CheckFailed

    sources = {}
    if pos is not None and pos.file and not pos.file.startswith("<"):
        try:
            with open(pos.file, encoding="utf-8") as f:
                sources[pos.file] = f.read()
        except (OSError, UnicodeDecodeError):
            pass                                  # the message and position still say it
    return CheckFailed([diag], sources)


def _raised_at(exc: BaseException) -> str:
    """' at FILE:LINE': where an import raised, the innermost frame outside the import machinery
    and agp (the user's module, or what it imported), so the user knows which line to fix."""
    import traceback

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<") and not os.path.abspath(f.filename).startswith(here + os.sep)]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _load_failed(graph: nx.DiGraph, stage: str, exc: BaseException):
    """A stage whose `fn` could not be loaded (not callable, its module failing on import), or whose
    plug-in kind could not start (its `impl` not found, its module or `__init__` raising), as a
    CheckFailed at the `fn` setting or the stage: check reads the source and imports nothing, so
    some of this is only found here, and it is the pipeline's error (exit 2), not an internal one."""
    from pipeline_dsl.diagnostics import ERROR, Diagnostic
    from pipeline_dsl.userfn import ArgsRefused, FunctionNotFound
    from stages.impl import NoImplementation

    node = graph.nodes[stage]
    ref = node["params"].get("fn") if node.get("kind") in ("python", "join") else None   # a plug-in's fn: its own
    said = _said(exc)
    raised = f"{_raised_at(exc)}: {type(exc).__name__}" + (f": {said}" if said else "")
    if ref is None:                                   # a plug-in kind
        why = str(exc) if isinstance(exc, NoImplementation) else \
            f"stage kind '{node.get('kind')}' failed to start{raised}"
        diag = Diagnostic(ERROR, f"stage '{stage}': {why}", node.get("pos"),
                          expected="a kind whose impl names a class that its parameters can start",
                          hint="see docs/architecture.md, 'Stage implementations'")
        return _check_failed(diag, node.get("pos"))
    pos = (node.get("param_pos") or {}).get("args" if isinstance(exc, ArgsRefused) else "fn") or node.get("pos")
    why = str(exc) if isinstance(exc, FunctionNotFound) else f"importing its module failed{raised}"
    what = "join" if node.get("kind") == "join" else "stage"
    diag = Diagnostic(ERROR, f"{what} '{stage}': cannot load fn \"{ref}\": {why}", pos,
                      expected='"module:function" naming a function (def or async def)')
    return _check_failed(diag, pos)
