"""The pipeline runtime: requests flow through the graph as items, stage by stage.

    rt = PipelineRuntime(graph, overrides={"threads": 2})
    rt.start()                                # one batching loop per engine segment
    key = rt.submit(request_dict, listener)   # listener.on_delta(key, index, out), .on_done(result)
                                              # (and .on_prompt(key, ids, logprobs) if it has one)
    rt.close(drain=True)

An item is a Request or a Generated result (the port types of stages/builtin.py). A stage
receives the items on its in-edges and sends what it makes of them along its out-edges:
every unconditional edge, plus the first conditional edge (in file order) whose condition
holds, else the `otherwise` edge; an edge only carries the item types its destination
takes. Several edges taken means copies (fan-out); each copy is a branch of its request.

- Request-level stages (requests, system_prompt, python, route, join, respond, third-party
  kinds) run per item on a pool of host threads (`plan.items`), off the engines' loops.
- An engine segment (batch -> encode -> kv_lookup -> generate...) takes a Request in at its
  batcher: the item is tokenised on the pool (encode.tokenise), routed among the segment's
  generate stages, copied `n` times, and submitted to the segment's executor, which batches
  it with everything else (continuous batching, paged KV, prefix reuse, stream plan). Each
  finished sequence comes back as a Generated item and goes on from its generate stage.
- A join waits until no item of its request can still reach it, then merges what arrived.
- A loop runs through a python stage with max_turns: after that many calls the item leaves
  the loop along the stage's edges out of it.
- The request is answered once none of its items is left: every Generated item that
  reached a respond stage is one choice. A Reject, an exception in a user function or bad
  input fails that request only.
"""
from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx

from pipeline_dsl import Reject
from pipeline_dsl import conditions as C
from pipeline_dsl.graph import bounded_stages, segments_of
from pipeline_dsl.plan import ITEM_WORKERS, make_plan

REQUEST, GENERATED = C.REQUEST, C.GENERATED
OTHERWISE = ("otherwise",)
ENGINE_KINDS = ("dynamic_batch", "encode", "kv_lookup", "generate")


class PipelineError(Exception):
    """Why one request failed. kind: invalid (its input: HTTP 400), rejected (a Reject: 400),
    queue_full (429), unavailable (503), failed (a user function or the engine failed: 500)."""

    STATUS = {"invalid": 400, "rejected": 400, "queue_full": 429, "unavailable": 503, "failed": 500,
              "aborted": 499}

    def __init__(self, message: str, kind: str = "failed", stage: str | None = None):
        super().__init__(message)
        self.message, self.kind, self.stage = message, kind, stage

    @property
    def status(self) -> int:
        return self.STATUS.get(self.kind, 500)


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str | None
    data: dict                        # the Generated item as it reached respond


@dataclass
class Result:
    """A request's answer: its choices, or the error that failed it."""
    key: str
    id: Any                           # the request's own id
    choices: list[Choice]
    error: PipelineError | None
    usage: dict                       # prompt_tokens, completion_tokens, cached_tokens
    metrics: dict                     # arrival, ttft_s, latency_s

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class StageCounter:
    """Per stage: items in and out, requests it rejected or failed, items waiting, time spent."""
    items_in: int = 0
    items_out: int = 0
    rejected: int = 0
    failed: int = 0
    queued: int = 0
    busy_s: float = 0.0


@dataclass(eq=False)
class _Request:
    key: str
    id: Any
    listener: Any
    arrival: float
    number: int = 0                   # admission order: engines admit what arrives together in it
    pin: str | None = None            # a generate stage the request asked for (agp serve's `model`)
    stream: bool = False
    items: set = field(default_factory=set)
    results: list = field(default_factory=list)
    joins: dict = field(default_factory=dict)          # join stage -> waiting items (arrival order)
    seqs: dict = field(default_factory=dict)           # engine sequence id -> segment
    done: bool = False
    next_index: int = 0
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0,
                                                 "cached_tokens": 0})
    first_token: float | None = None
    timings: dict = field(default_factory=dict)        # its first generation's queue / prefill / decode s


@dataclass(eq=False)
class Item:
    kind: str                          # REQUEST | GENERATED
    data: dict
    req: _Request
    at: str | None = None              # the stage it is at or heading to
    branch: tuple = ()
    turns: dict = field(default_factory=dict)
    label: str | None = None
    index: int | None = None           # its choice index when it streams
    ids: tuple | None = None           # (fingerprint, token ids) cached by prompt_tokens / tokenise
    entry: dict | None = None          # the segment entry it came from (usage of shared prompts)
    submitted: float | None = None     # perf_counter() when its sequence went to an engine (trace)
    logprobs: list | None = None       # per generated token, when the request asked for them

    def fork(self, branch: tuple) -> "Item":
        return Item(self.kind, copy.deepcopy(self.data), self.req, self.at, branch, dict(self.turns),
                    self.label, None, self.ids, self.entry)


class PipelineRuntime:
    def __init__(self, graph: nx.DiGraph, *, overrides: dict | None = None, overlap: bool | None = None,
                 trace=None, workers: int = ITEM_WORKERS, max_queue: int | None = None,
                 served_name: str | None = None, clock: Callable[[], float] = time.monotonic):
        from stages.impl import StageContext, implementation

        from pipeline_dsl.engine.trace import Trace

        from .segment import EngineSegment, segment_spec

        self.graph, self.clock = graph, clock
        self.name = str(graph.graph.get("name") or "pipeline")
        self.served_name = served_name or self.name
        self.trace = trace if trace is not None else Trace(limit=100_000)
        self.plan = make_plan(graph)
        self.kind = {n: graph.nodes[n].get("kind") for n in graph}
        self.routes = {n: list(graph.nodes[n].get("routes") or
                               [(v, e.get("condition")) for _, v, e in graph.out_edges(n, data=True)])
                       for n in graph}
        self.reach = {n: nx.descendants(graph, n) for n in graph}
        from pipeline_dsl.graph import flow_types
        self.carry, _ = flow_types(graph)          # where each item type can go on to an end
        self.returns = {n: (graph.nodes[n]["params"] or {}).get("returns", "same") for n in graph
                        if self.kind[n] == "python"}
        self.bounded = {n: graph.nodes[n]["params"]["max_turns"] for n in bounded_stages_of(graph)}
        self.exits = {n: [v for v, _ in self.routes[n] if v not in _scc(graph, n)] for n in self.bounded}
        sources = [n for n, k in self.kind.items() if k == "requests"]
        self.source = sources[0] if sources else None
        self.max_queue = max_queue or (graph.nodes[self.source]["params"].get("max_queue", 1024)
                                       if self.source else 1024)
        pos = graph.graph.get("pos")
        base = None
        if pos is not None and pos.file and not pos.file.startswith("<"):
            import os
            base = os.path.dirname(os.path.abspath(pos.file))
        self.impls: dict[str, Any] = {}
        for n, k in self.kind.items():
            if k in ENGINE_KINDS:
                continue
            cls = implementation(k)
            self.impls[n] = cls(n, dict(graph.nodes[n]["params"]), StageContext(self.name, n, k, base))

        segs = segments_of(graph)
        self.segments: list[EngineSegment] = []
        self.seg_by_batch: dict[str, EngineSegment] = {}
        for seg, plan in zip(segs, self.plan.segments):
            es = EngineSegment(segment_spec(graph, seg), plan, overrides=overrides,
                               overlap=overlap, trace=self.trace)
            self.segments.append(es)
            self.seg_by_batch[seg.batch] = es
        self.seg_of_gen = {g: es for es in self.segments for g in es.segment.generates}
        # a generate stage streams its tokens when its results go straight to a respond stage
        self.direct = {g: bool(self.routes[g]) and all(c is None and self.kind[v] == "respond"
                                                        for v, c in self.routes[g])
                       and len(self.routes[g]) == 1 for g in self.seg_of_gen}
        self.prompt_segment = self._prompt_segment()
        self.counters = {n: StageCounter() for n in graph}
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agp-items")
        self.workers = workers
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._requests: dict[str, _Request] = {}
        self._owner: dict[str, Item] = {}            # engine sequence id -> its item
        self._keys = itertools.count(1)
        self._seq_ids = itertools.count(1)
        self._closing = False
        self._tasks = 0                               # item-pool tasks queued or running
        self.cut = 0                                  # requests close() had to fail
        self.error: BaseException | None = None
        self.totals = {"requests": 0, "answered": 0, "failed": 0}
        self._tracks: dict[int, str] = {}

    # ---- set-up helpers ----------------------------------------------------------------
    def _prompt_segment(self):
        """The engine whose tokenizer counts `prompt_tokens`: the first whose model is the pipeline's."""
        if not self.segments:
            return None
        model = self.graph.graph.get("settings", {}).get("model")
        for es in self.segments:
            if es.spec.engine.get("model") == model:
                return es
        return self.segments[0]

    def _segment_for(self, pin: str | None):
        es = self.seg_of_gen.get(pin) if pin else self.prompt_segment
        if es is None:
            raise PipelineError("this pipeline has no model to tokenise with", "invalid")
        return es

    def tokenise(self, request: dict, pin: str | None = None) -> list[int]:
        """A prompt or a conversation as the engine would see it (agp serve's /tokenize)."""
        from pipeline_dsl.engine.errors import InputError

        es = self._segment_for(pin or request.get("pin"))
        try:
            if request.get("messages") is not None:
                return es.engine.prompt_ids(messages=request["messages"], tools=request.get("tools"),
                                            tool_choice=request.get("tool_choice", "auto"))
            return es.engine.prompt_ids(prompt=request["prompt"],
                                        add_special_tokens=request.get("add_special_tokens", True))
        except InputError as e:
            raise PipelineError(str(e), "invalid") from None

    def token_text(self, pin: str | None = None) -> Callable[[int], str]:
        """id -> the text of that one token (for logprobs), cached."""
        import functools

        tok = self._segment_for(pin).engine.tokenizer
        return functools.lru_cache(maxsize=1 << 16)(lambda t: tok.decode([t], skip_special_tokens=False))

    def detokenise(self, ids: list[int], pin: str | None = None) -> str:
        es = self._segment_for(pin)
        vocab = es.engine.vocab_size
        bad = [t for t in ids if vocab and t >= vocab]
        if bad:
            raise PipelineError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "invalid")
        return es.engine.tokenizer.decode(ids, skip_special_tokens=False)

    def tokenizer_info(self, pin: str | None = None) -> dict:
        """The tokenizer's configuration (agp serve's /tokenizer_info, vLLM's shape): its special
        tokens, whether it adds the bos token, the context length and the chat template."""
        es = self._segment_for(pin)
        tok = es.engine.tokenizer
        return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "add_bos_token": bool(getattr(tok, "add_bos", False)), "model_max_length": es.engine.max_model_len,
                "chat_template": tok.chat_template}

    def model_names(self) -> list[str]:
        """The generate stages a request may pin (agp serve's `model` field)."""
        return list(self.seg_of_gen)

    # ---- requests in -------------------------------------------------------------------
    def submit(self, data: dict, listener, *, pin: str | None = None, stream: bool = False) -> str:
        """Admit one request (its item dict, already validated); returns its key. Raises
        PipelineError(queue_full | unavailable) at once when it cannot be admitted."""
        if pin is not None and pin not in self.seg_of_gen:
            raise PipelineError(f"no generate stage named '{pin}'", "invalid")
        with self._lock:
            if self.error is not None:
                raise PipelineError(f"the pipeline failed: {self.error}", "unavailable")
            if self._closing:
                raise PipelineError("the pipeline is shutting down", "unavailable")
            if self.full:
                raise PipelineError(f"the queue is full ({self.max_queue} requests waiting; "
                                    "requests.max_queue)", "queue_full")
            number = next(self._keys)
            key = f"r{number}"
            req = _Request(key, data.get("id"), listener, self.clock(), number=number, pin=pin, stream=stream)
            self._requests[key] = req
            self.totals["requests"] += 1
            item = Item(REQUEST, data, req, at=self.source)
            req.items.add(item)
            self.counters[self.source].queued += 1
        self._spawn(item, self.source)
        return key

    @property
    def max_in_flight(self) -> int:
        return self.max_queue + sum(es.config.max_batch_size for es in self.segments)

    @property
    def full(self) -> bool:
        """Whether `max_queue` requests already wait (in flight and not running on an engine)."""
        running = sum(es.engine.num_running for es in self.segments)
        return len(self._requests) - running >= self.max_queue

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    @property
    def accepting(self) -> bool:
        """Whether submit() takes new requests (not closing, not failed)."""
        return not self._closing and self.error is None

    def abort(self, key: str, message: str = "aborted by the client") -> None:
        req = self._requests.get(key)
        if req is not None:
            self._fail(req, PipelineError(message, "aborted"))

    # ---- items through stages (pool threads) ---------------------------------------------
    def _spawn(self, item: Item, stage: str) -> None:
        self._task(self._run, item, stage)

    def _task(self, fn, *args) -> None:
        """Run fn(*args) on the item pool, counted (see settle())."""
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
        self.pool.submit(run)

    def settle(self, timeout: float = 60.0) -> bool:
        """Wait until the item pool has nothing to do (every submitted request has reached an
        engine's queue, an answer or an error)."""
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

    def _run(self, item: Item, stage: str) -> None:
        """Carry one item (and what it becomes) as far as it goes on this thread."""
        work = deque([(item, stage)])
        while work:
            item, stage = work.popleft()
            req = item.req
            if req.done:
                continue
            with self._lock:
                self.counters[stage].queued -= 1
            try:
                work.extend(self._process(item, stage))
            except PipelineError as e:
                self._fail(req, e if e.stage else PipelineError(e.message, e.kind, stage))
            except Reject as e:
                self._fail(req, PipelineError(str(e) or "rejected", "rejected", stage))
            except Exception as e:              # noqa: BLE001 - a stage's failure fails its request only
                self._fail(req, PipelineError(f"stage '{stage}' failed: {type(e).__name__}: {e}", "failed",
                                              stage))

    def _process(self, item: Item, stage: str) -> list[tuple[Item, str]]:
        kind = self.kind[stage]
        counter = self.counters[stage]
        counter.items_in += 1
        if kind == "respond":
            self._traced(stage, "respond", item, lambda: None)
            counter.items_out += 1
            with self._lock:
                item.req.results.append(item)
                self._gone(item)
            return []
        if kind == "join":
            return self._arrive_join(item, stage)
        if kind == "dynamic_batch":
            self._enter_segment(item, self.seg_by_batch[stage])
            return []
        if stage in self.bounded:
            count = item.turns.get(stage, 0)
            if count >= self.bounded[stage]:     # the loop has run max_turns times: leave it
                counter.items_out += 1
                return self._send(item, stage, only=self.exits[stage])
            item.turns[stage] = count + 1
        impl = self.impls[stage]
        trusted = kind in TRUSTED
        t0 = time.perf_counter()
        view = item.data if trusted else copy.deepcopy(item.data)   # a user function gets its own copy
        out = impl.process(view)
        self._span(stage, _PART.get(kind, "run"), t0, item)
        counter.busy_s += time.perf_counter() - t0
        self._take(item, stage, view, out, trusted)
        counter.items_out += 1
        return self._send(item, stage)

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
                raise PipelineError(f"stage '{stage}' returned a dict that is neither a request (messages or "
                                    "prompt) nor a result (text)", "failed", stage)
            declared = self.returns.get(stage, "same")
            if declared != "any" and kind != {"same": item.kind, "request": REQUEST,
                                              "generated": GENERATED}[declared]:
                raise PipelineError(f"stage '{stage}' returned a {kind} but declares returns = {declared} "
                                    f"(it got a {item.kind}); set returns = any if it may do both",
                                    "failed", stage)
            if kind == REQUEST and not trusted:
                out = _valid_request(out, stage)
            elif not isinstance(out.get("text"), str):
                raise PipelineError(f"stage '{stage}' returned a result whose text is not a string",
                                    "failed", stage)
            item.kind, item.data = kind, out

    def _send(self, item: Item, stage: str, only: list[str] | None = None) -> list[tuple[Item, str]]:
        """Route an item out of `stage`: copies to every edge taken (see the module docstring)."""
        dsts = self._choose(item, stage, only)
        if not dsts:
            raise PipelineError(f"stage '{stage}': no out-edge takes this {item.kind} "
                                f"(label {item.label!r})" if item.label else
                                f"stage '{stage}': no out-edge takes this {item.kind}", "failed", stage)
        out = []
        base = item.branch
        with self._lock:
            if item.req.done:
                return []
            for i, dst in enumerate(dsts):
                it = item if i == 0 else item.fork(base + (i,))
                if len(dsts) > 1 and i == 0:
                    it.branch = base + (0,)
                it.at = dst
                if it is not item:
                    item.req.items.add(it)
                self.counters[dst].queued += 1
                out.append((it, dst))
        for it, _ in out:
            it.label = item.label if self.kind[stage] == "dynamic_batch" else None
        return out

    def _choose(self, item: Item, stage: str, only=None) -> list[str]:
        routes = self.routes[stage]
        if only is not None:
            return [v for v in dict.fromkeys(only) if item.kind in self.carry[v]]
        pin = item.req.pin
        if pin is not None and (pin in self.reach[stage]):
            for v, _ in routes:                  # the path to the pinned generate stage, conditions aside
                if (v == pin or pin in self.reach[v]) and (item.kind in self.carry[v]
                                                           or self.kind[stage] == "kv_lookup"):
                    return [v]
        chosen, held, other = [], False, None
        get = self._getter(item)
        for v, cond in routes:
            if item.kind not in self.carry[v] and self.kind[stage] != "kv_lookup":
                continue
            if cond is None:
                chosen.append(v)
            elif cond == OTHERWISE:
                other = other or v
            elif not held and C.evaluate(cond, get, item.label):
                chosen.append(v)
                held = True
        if not held and other is not None:
            chosen.append(other)
        return list(dict.fromkeys(chosen))

    def _getter(self, item: Item) -> Callable[[str], Any]:
        d = item.data
        req = d.get("request", d) if item.kind == GENERATED else d
        usage = d.get("usage") or {}

        def get(path: str):
            if path == "prompt_tokens":
                if item.kind == GENERATED and "prompt_tokens" in usage:
                    return usage["prompt_tokens"]
                return self._prompt_tokens(item)
            if path == "turn":
                return sum(item.turns.values())
            if path == "stream":
                return item.req.stream
            if path == "model":
                return req.get("model") or self.served_name
            if path == "n":
                return req.get("n", 1)
            if path in ("completion_tokens", "cached_tokens"):
                return usage.get(path, C.MISSING) if item.kind == GENERATED else C.MISSING
            if path in ("text", "finish_reason"):
                return d.get(path, C.MISSING) if item.kind == GENERATED else C.MISSING
            if path.startswith("metadata."):
                value: Any = req.get("metadata") or {}
                for part in path.split(".")[1:]:
                    if not isinstance(value, dict) or part not in value:
                        return C.MISSING
                    value = value[part]
                return value
            return req.get(path, C.MISSING)
        return get

    def _prompt_tokens(self, item: Item) -> int:
        es = self.prompt_segment
        if es is None:
            text = item.data.get("prompt") or " ".join(m.get("content", "") for m in item.data.get("messages", []))
            return len(text.split())          # no model in this pipeline: words
        return len(self._ids(item, es))

    def _ids(self, item: Item, es) -> list[int]:
        """The item's prompt ids under segment `es` (cached while the prompt is unchanged)."""
        from pipeline_dsl.engine.errors import InputError

        d = item.data
        try:                                   # a prompt too long for any tokenisation: refused at once
            es.engine.check_prompt_length(d.get("prompt"), d.get("messages"), d.get("prompt_token_ids"))
        except InputError as e:
            raise PipelineError(str(e), "invalid", es.segment.encode) from None
        fingerprint = (id(es), repr(d.get("messages") if d.get("messages") is not None
                                    else d.get("prompt_token_ids") if d.get("prompt_token_ids") is not None
                                    else d.get("prompt")), repr(d.get("tools")), repr(d.get("tool_choice")))
        if item.ids is not None and item.ids[0] == fingerprint:
            return item.ids[1]
        t0 = time.perf_counter()
        try:
            ids = es.tokenise(item.data)
        except InputError as e:               # the engine's word for bad input (tokenizer, template, length)
            raise PipelineError(f"cannot tokenise the request: {e}", "invalid", es.segment.encode) from None
        dt = time.perf_counter() - t0
        self._span(es.segment.encode, "tokenise", t0, item)
        c = self.counters[es.segment.encode]
        c.items_in += 1
        c.items_out += 1
        c.busy_s += dt
        item.ids = (fingerprint, ids)
        return ids

    # ---- engine segments -----------------------------------------------------------------
    def _enter_segment(self, item: Item, es) -> None:
        """A Request reaches a batcher: tokenise, pick generate stage(s), copy n times, submit."""
        from pipeline_dsl.engine.errors import InputError

        seg = es.segment
        req = item.req
        ids = self._ids(item, es)
        targets = self._choose(item, seg.kv)
        if not targets:
            raise PipelineError(f"stage '{seg.kv}': no generate stage takes this request", "failed", seg.kv)
        entry = {"prompt_tokens": len(ids), "cached_tokens": None}
        if item.data.get("prompt_logprobs") is not None:    # echo with logprobs: the engine scores the
            entry["prompt_token_ids"] = list(ids)           # prompt chunk by chunk (_on_outputs hears it)
        elif item.data.get("max_tokens") == 0:              # echo only: nothing to compute
            self._answer_without_engine(item, es, targets, ids, entry)
            return
        submits = []
        with self._lock:
            if req.done:
                return
            req.usage["prompt_tokens"] += len(ids)
            for g_i, gen in enumerate(targets):
                n = es.copies(gen, item.data)
                for i in range(n):
                    branch = item.branch + ((g_i,) if len(targets) > 1 else ()) + ((i,) if n > 1 else ())
                    child = Item(REQUEST, item.data if (g_i, i) == (0, 0) else copy.deepcopy(item.data),
                                 req, gen, branch, dict(item.turns), None, None, item.ids, entry)
                    try:
                        params = es.sampling(gen, child.data, len(ids), copy=i)
                    except InputError as e:
                        raise PipelineError(str(e), "invalid", gen) from None
                    if self.direct[gen]:
                        child.index = req.next_index
                        req.next_index += 1
                    seq_id = f"{req.key}/{next(self._seq_ids)}"
                    child.submitted = time.perf_counter()
                    self._owner[seq_id] = child
                    req.seqs[seq_id] = es
                    req.items.add(child)
                    submits.append((seq_id, params, (req.number, len(submits))))
                    self.counters[gen].items_in += 1
            self.counters[seg.batch].items_out += 1
            self.counters[seg.kv].items_in += 1
            self.counters[seg.kv].items_out += len(submits)
            req.items.discard(item)
        for seq_id, params, order in submits:
            es.submit(seq_id, ids, params, order)

    def _heard_prompt(self, item: Item, logprobs: list) -> None:
        """A sequence's prompt logprobs (echo), with its first output: kept for the answer, and a
        stream echoes them before its tokens (once per request, whichever copy came first)."""
        entry = item.entry
        if entry is None or "prompt_logprobs" in entry:
            return
        entry["prompt_logprobs"] = logprobs
        heard = getattr(item.req.listener, "on_prompt", None)
        if heard is not None:
            heard(item.req.key, entry["prompt_token_ids"], logprobs)

    def _answer_without_engine(self, item: Item, es, targets: list, ids: list, entry: dict) -> None:
        """max_tokens = 0 (an echo of the prompt, e.g. to score it): each target answers at once."""
        req = item.req
        made = []
        with self._lock:
            if req.done:
                return
            req.usage["prompt_tokens"] += len(ids)
            entry["cached_tokens"] = 0
            for g_i, gen in enumerate(targets):
                child = Item(GENERATED, {}, req, gen, item.branch + ((g_i,) if len(targets) > 1 else ()),
                             dict(item.turns), None, None, item.ids, entry)
                child.data = self._generated(child, item.data, gen, "", "length", len(ids), 0, 0)
                req.items.add(child)
                made.append(child)
                self.counters[gen].items_in += 1
                self.counters[gen].items_out += 1
            req.items.discard(item)
        for child in made:
            self._task(self._leave_generate, child)

    def _generated(self, item: Item, request: dict, gen: str, text: str, reason, prompt_tokens: int,
                   completion_tokens: int, cached_tokens: int) -> dict:
        """A Generated item's dict (what later stages and the answer see)."""
        data = {"id": item.req.id, "text": text, "finish_reason": reason,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "cached_tokens": cached_tokens},
                "generated_by": gen, "request": request}
        if item.logprobs is not None:
            data["logprobs"] = item.logprobs
        if item.entry is not None and "prompt_logprobs" in item.entry:
            data["prompt_logprobs"] = item.entry["prompt_logprobs"]
            data["prompt_token_ids"] = item.entry["prompt_token_ids"]
        return data

    def _on_outputs(self, es, outputs) -> None:
        """An engine step's outputs (the executor's emit thread): deltas, then finished sequences."""
        now = self.clock()
        finished, unenforceable = [], []
        for out in outputs:
            item = self._owner.get(out.request_id)
            if item is None:
                continue
            req = item.req
            if req.done:
                continue
            if out.finished and out.finish_reason == "error":   # the grammar gave up mid-answer: no
                unenforceable.append((item, out))               # answer that parses, and no "error"
                continue                                        # finish reason (not OpenAI's)
            if out.new_token_ids and req.first_token is None:
                req.first_token = now
            if getattr(out, "prompt_logprobs", None) is not None:
                self._heard_prompt(item, out.prompt_logprobs)
            step_logprobs = getattr(out, "logprobs", None)
            if step_logprobs:
                if item.logprobs is None:
                    item.logprobs = []
                item.logprobs.extend(step_logprobs)
            if item.index is not None and (out.delta_text or out.finished or step_logprobs):
                try:
                    req.listener.on_delta(req.key, item.index, out)
                except Exception:              # noqa: BLE001 - a listener's failure is its own
                    pass
            if out.finished:
                finished.append((item, out))
        for item, out in unenforceable:
            why = (out.metrics or {}).get("error") or "the grammar refused a token"
            self._fail(item.req, PipelineError(f"the answer's constraint cannot be enforced: {why}", "invalid",
                                               item.at))
        if not finished:
            return
        with self._lock:
            for item, out in finished:
                req = item.req
                self._owner.pop(out.request_id, None)
                req.seqs.pop(out.request_id, None)
                if req.done:
                    continue
                gen = item.at
                self.counters[gen].items_out += 1
                if item.submitted is not None:          # the sequence's life in the engine, on a lane
                    self.trace.add("requests", f"{gen}.generate", item.submitted, time.perf_counter(), -1,
                                   {"request": req.key, "id": str(req.id), "tokens": out.completion_tokens,
                                    "finish": out.finish_reason}, lane=True)
                for key in ("queue_s", "prefill_s", "decode_s"):
                    if key in (out.metrics or {}) and key not in req.timings:
                        req.timings[key] = out.metrics[key]
                req.usage["completion_tokens"] += out.completion_tokens
                if item.entry is not None and item.entry["cached_tokens"] is None:
                    item.entry["cached_tokens"] = out.cached_tokens
                    req.usage["cached_tokens"] += out.cached_tokens
                item.kind = GENERATED
                item.data = self._generated(item, item.data, gen, out.text, out.finish_reason, out.prompt_tokens,
                                            out.completion_tokens, out.cached_tokens)
        for item, out in finished:
            if not item.req.done:
                self._task(self._leave_generate, item)

    def _leave_generate(self, item: Item) -> None:
        stage = item.at
        try:
            nxt = self._send(item, stage)
        except PipelineError as e:
            self._fail(item.req, e)
            return
        except Exception as e:                   # noqa: BLE001 - fails this request only
            self._fail(item.req, PipelineError(f"stage '{stage}' failed: {type(e).__name__}: {e}",
                                               "failed", stage))
            return
        if nxt:
            it0, st0 = nxt[0]
            for it, st in nxt[1:]:
                self._task(self._run, it, st)
            self._run(it0, st0)

    def _on_seq_error(self, es, seq_id: str, exc: BaseException) -> None:
        item = self._owner.get(seq_id)
        if item is not None:
            self._fail(item.req, PipelineError(str(exc), "invalid", es.segment.batch))

    def _on_segment_failure(self, es, exc: BaseException) -> None:
        """A segment's loop died: fail everything, refuse what comes."""
        with self._lock:
            self.error = exc
            reqs = list(self._requests.values())
        for req in reqs:
            self._fail(req, PipelineError(f"the engine of '{es.name}' failed: {type(exc).__name__}: {exc}",
                                          "unavailable"))

    # ---- joins ---------------------------------------------------------------------------
    def _arrive_join(self, item: Item, stage: str) -> list[tuple[Item, str]]:
        with self._lock:
            item.req.joins.setdefault(stage, []).append(item)
            item.at = stage
            fired = self._ready_joins(item.req)
        return [x for f in fired for x in self._fire(*f)]

    def _ready_joins(self, req: _Request) -> list[tuple]:
        """(request, join, items) for every join of `req` that nothing else can reach any more."""
        fired = []
        for j, waiting in list(req.joins.items()):
            if not waiting:
                continue
            here = set(map(id, waiting))
            blocked = any(id(it) not in here and (it.at == j or j in self.reach.get(it.at, ()))
                          for it in req.items)
            if not blocked:
                del req.joins[j]
                fired.append((req, j, waiting))
        return fired

    def _fire(self, req: _Request, stage: str, waiting: list[Item]) -> list[tuple[Item, str]]:
        t0 = time.perf_counter()
        ordered = sorted(waiting, key=lambda it: it.branch)
        impl = self.impls[stage]
        # `first` is the first to arrive; the other policies see the branches in order (ties: the earliest)
        merged_data = impl.merge([it.data for it in (waiting if impl.policy == "first" else ordered)])
        if not isinstance(merged_data, dict) or not isinstance(merged_data.get("text"), str):
            raise PipelineError(f"join '{stage}' produced no result", "failed", stage)
        if merged_data in [it.data for it in waiting]:
            merged_data = dict(merged_data)
        merged_data["branches"] = [{"text": it.data.get("text"), "finish_reason": it.data.get("finish_reason")}
                                   for it in ordered]
        first = ordered[0]
        merged = Item(GENERATED, merged_data, req, stage, first.branch[:-1] if first.branch else (),
                      dict(first.turns))
        self._span(stage, "merge", t0, merged)
        c = self.counters[stage]
        c.items_in += len(waiting) - 1          # the first was counted by _process
        c.items_out += 1
        c.busy_s += time.perf_counter() - t0
        with self._lock:
            for it in waiting:
                req.items.discard(it)
            req.items.add(merged)
        return self._send(merged, stage)

    # ---- endings -------------------------------------------------------------------------
    def _gone(self, item: Item) -> None:
        """(under the lock) An item left the pipeline (answered): fire joins, finish the request."""
        req = item.req
        req.items.discard(item)
        self._check(req)

    def _check(self, req: _Request) -> None:
        if req.done:
            return
        fired = self._ready_joins(req)
        for f in fired:
            self._task(self._fire_later, f)
        if not req.items and not fired:
            self._finish(req)

    def _fire_later(self, f) -> None:
        req = f[0]
        try:
            for it, st in self._fire(*f):
                self._run(it, st)
        except PipelineError as e:
            self._fail(req, e)
        except Exception as e:                   # noqa: BLE001
            self._fail(req, PipelineError(f"join '{f[1]}' failed: {type(e).__name__}: {e}", "failed", f[1]))

    def _finish(self, req: _Request) -> None:
        """(under the lock) Every item of the request is done: answer it."""
        req.done = True
        self._requests.pop(req.key, None)
        streamed = sorted((it for it in req.results if it.index is not None), key=lambda it: it.index)
        rest = sorted((it for it in req.results if it.index is None), key=lambda it: it.branch)
        choices = [Choice(it.index, it.data.get("text", ""), it.data.get("finish_reason"), it.data)
                   for it in streamed]
        taken = {c.index for c in choices}
        nxt = 0
        for it in rest:
            while nxt in taken:
                nxt += 1
            choices.append(Choice(nxt, it.data.get("text", ""), it.data.get("finish_reason"), it.data))
            taken.add(nxt)
        choices.sort(key=lambda c: c.index)
        error = None if choices else PipelineError("no answer: none of the request's items reached a "
                                                   "respond stage", "failed")
        self.totals["answered" if error is None else "failed"] += 1
        result = Result(req.key, req.id, choices, error, dict(req.usage), self._metrics(req))
        self._idle.notify_all()
        self._task(_deliver, req.listener, result)

    def _fail(self, req: _Request, err: PipelineError) -> None:
        with self._lock:
            if req.done:
                return
            req.done = True
            self._requests.pop(req.key, None)
            seqs = list(req.seqs.items())
            for seq_id, _ in seqs:
                self._owner.pop(seq_id, None)
            req.seqs.clear()
            req.items.clear()
            req.joins.clear()
            if err.stage in self.counters:
                if err.kind in ("rejected", "invalid"):
                    self.counters[err.stage].rejected += 1
                else:
                    self.counters[err.stage].failed += 1
            self.totals["failed"] += 1
            self._idle.notify_all()
        for seq_id, es in seqs:
            es.abort(seq_id)
        _deliver(req.listener, Result(req.key, req.id, [], err, dict(req.usage), self._metrics(req)))

    def _metrics(self, req: _Request) -> dict:
        now = self.clock()
        return {"arrival": req.arrival, "latency_s": now - req.arrival,
                "ttft_s": None if req.first_token is None else req.first_token - req.arrival, **req.timings}

    # ---- tracing -------------------------------------------------------------------------
    def _span(self, stage: str, part: str, t0: float, item: Item) -> None:
        self.trace.add(self._track(), f"{stage}.{part}", t0, time.perf_counter(), -1,
                       {"request": item.req.key, "id": str(item.req.id)})

    def _traced(self, stage: str, part: str, item: Item, fn):
        t0 = time.perf_counter()
        out = fn()
        self._span(stage, part, t0, item)
        return out

    # ---- driving -------------------------------------------------------------------------
    def start(self) -> None:
        """Every segment's batching loop on a thread of its own (agp serve)."""
        for es in self.segments:
            es.start(lambda outs, es=es: self._on_outputs(es, outs),
                     lambda rid, exc, es=es: self._on_seq_error(es, rid, exc),
                     self._on_segment_failure)

    def drive(self) -> None:
        """The first segment's loop driven from this thread, the others from threads of their
        own; returns after close() once the engines are idle."""
        if not self.segments:
            with self._lock:
                while not (self._closing and not self._requests):
                    self._idle.wait(0.05)
            return
        first, rest = self.segments[0], self.segments[1:]
        for es in rest:
            es.start(lambda outs, es=es: self._on_outputs(es, outs),
                     lambda rid, exc, es=es: self._on_seq_error(es, rid, exc),
                     self._on_segment_failure)
        try:
            first.drive(lambda outs: self._on_outputs(first, outs),
                        lambda rid, exc: self._on_seq_error(first, rid, exc))
        except BaseException as e:              # noqa: BLE001
            self._on_segment_failure(first, e)
            raise
        for es in rest:
            es.join()

    def run_all(self, requests, on_result: Callable | None = None, keep_open: bool = False,
                stop: threading.Event | None = None) -> list[Result]:
        """Answer every request (item dicts, or (item, pin) pairs) and close: the first engine is
        driven from this thread, a feeder keeps the queue at most `max_queue` deep. Returns the
        results in input order; `on_result(i, result)` hears of each as it comes. keep_open: the
        runtime can run again afterwards (a warm-up, then the measured run). stop: once set, no
        more requests are admitted and those in flight are aborted (their results are errors of
        kind "unavailable"; requests never admitted stay None)."""
        requests = list(requests)
        results: list[Result | None] = [None] * len(requests)
        cond = threading.Condition()
        failure: list[BaseException] = []

        class _One:
            def __init__(self, i):
                self.i = i

            def on_delta(self, key, index, out):
                pass

            def on_done(self, result):
                results[self.i] = result
                if on_result is not None:
                    on_result(self.i, result)
                with cond:
                    cond.notify_all()

        started = threading.Event()

        stopping = stop if stop is not None else threading.Event()

        def feed():
            try:
                for i, req in enumerate(requests):
                    if self.full and not started.is_set():
                        self.settle()               # the head of the file reaches the batchers together
                        started.set()
                    data, pin = req if isinstance(req, tuple) else (req, None)
                    with cond:
                        while self.full and not stopping.is_set():
                            cond.wait(0.05)
                    if stopping.is_set():
                        break
                    try:
                        self.submit(data, _One(i), pin=pin)
                    except PipelineError as e:
                        _One(i).on_done(Result("", data.get("id"), [], e,
                                               {"prompt_tokens": 0, "completion_tokens": 0,
                                                "cached_tokens": 0}, {}))
                if not started.is_set():
                    self.settle()
                    started.set()
                while not self.wait_idle(0.1) and not stopping.is_set():
                    pass
            except BaseException as e:           # noqa: BLE001 - raised on the calling thread
                failure.append(e)
            finally:
                started.set()
                self.close(drain=not stopping.is_set(), reason="the run was interrupted")

        feeder = threading.Thread(target=feed, name="agp-feed", daemon=True)
        feeder.start()
        started.wait()                           # like a file read whole: the engines start on a full queue
        self.drive()
        feeder.join()
        self.settle()                            # results are delivered on the pool
        if keep_open:
            with self._lock:
                self._closing = False
            for es in self.segments:
                es.executor.reopen()
        else:
            self.pool.shutdown(wait=True)
        if failure:
            raise failure[0]
        return results

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is in flight (True) or the timeout passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._requests:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(0.05 if left is None else min(left, 0.05))
        return True

    def close(self, drain: bool = True, timeout: float | None = None,
              reason: str = "the server shut down before this request finished") -> bool:
        """Stop admitting; let what runs finish (drain) or abort it; end the loops. Returns
        whether every request finished (False: some were cut, each failed with `reason`)."""
        with self._lock:
            self._closing = True
        finished = self.wait_idle(timeout) if drain else not self._requests
        if not finished:
            with self._lock:
                reqs = list(self._requests.values())
            self.cut = len(reqs)
            for req in reqs:
                self._fail(req, PipelineError(reason, "unavailable"))
        for es in self.segments:
            es.close()
        return finished

    def shutdown(self) -> None:
        for es in self.segments:
            es.join(5.0)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- measuring -----------------------------------------------------------------------
    def stats(self) -> dict:
        """Per stage: items in/out, rejected, failed, queue depth, seconds; per engine: its counters."""
        engines = {es.name: es.stats() for es in self.segments}
        stages = {}
        for n, c in self.counters.items():
            row = {"kind": self.kind[n], "items_in": c.items_in, "items_out": c.items_out,
                   "rejected": c.rejected, "failed": c.failed, "queued": max(c.queued, 0),
                   "busy_s": round(c.busy_s, 6)}
            stages[n] = row
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
        with self._lock:
            totals = dict(self.totals, in_flight=len(self._requests))
        return {"stages": stages, "engines": engines, "requests": totals}


_PART = {"requests": "admit", "system_prompt": "apply", "python": "call", "route": "route"}
TRUSTED = ("requests", "system_prompt", "route")      # built-in stages: their dicts stay valid requests


def _deliver(listener, result: Result) -> None:
    try:
        listener.on_done(result)
    except Exception:                            # noqa: BLE001 - a listener's failure is its own
        pass


def _kind_of(d: dict) -> str | None:
    if "messages" in d or "prompt" in d:
        return REQUEST
    if "text" in d:
        return GENERATED
    return None


def _valid_request(d: dict, stage: str) -> dict:
    """A request dict a stage returned, checked as a request line would be."""
    from pipeline_dsl.requests_io import RequestError, parse_request

    try:
        return parse_request(d).item()
    except RequestError as e:
        raise PipelineError(f"stage '{stage}' returned an invalid request: {e}", "failed", stage) from None


def bounded_stages_of(graph: nx.DiGraph) -> list[str]:
    return [n for n, d in graph.nodes(data=True) if (d.get("params") or {}).get("max_turns") is not None]


def _scc(graph: nx.DiGraph, node: str) -> set:
    for comp in nx.strongly_connected_components(graph):
        if node in comp:
            return comp
    return {node}
