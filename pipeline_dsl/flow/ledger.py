"""The request ledger: every admitted request, its engine sequences, its usage and its end.

Routing decides where items go; the ledger only keeps account (like vLLM v1's output
processor and its RequestState): which requests are in flight, which engine sequence
belongs to which item, the tokens each request used, its first token and timings, and —
once nothing of it is left — its Result (choices in index order) or its error. Methods run
under the runtime's lock; `close` returns the engine sequences the caller must abort.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

from .items import Choice, Item, PipelineError, RequestState, Result, no_usage


class RequestLedger:
    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.requests: dict[str, RequestState] = {}
        self.owner: dict[str, Item] = {}             # engine sequence id -> its item
        self.paused = 0                              # requests in flight paused by their readers
        self.totals = {"requests": 0, "answered": 0, "failed": 0}
        self._numbers = itertools.count(1)
        self._seq_ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self.requests)

    def admit(self, data: dict, listener: Any, pin: str | None, stream: bool) -> RequestState:
        number = next(self._numbers)
        req = RequestState(f"r{number}", data.get("id"), listener, self.clock(), number=number, pin=pin,
                           stream=stream, hears_deltas=getattr(listener, "on_delta", None) is not None)
        self.requests[req.key] = req
        self.totals["requests"] += 1
        return req

    def get(self, key: str) -> RequestState | None:
        return self.requests.get(key)

    def live(self) -> list[RequestState]:
        return list(self.requests.values())

    def set_paused(self, req: RequestState, paused: bool) -> None:
        """Its reader paused it (True) or let it go on; counted while it is in flight (the caller
        has checked it is in flight and changes)."""
        req.paused = paused
        self.paused += 1 if paused else -1

    # ---- engine sequences ----------------------------------------------------------------
    def bind(self, item: Item, segment: Any) -> str:
        """A new engine sequence for `item` on `segment`; returns its id."""
        seq_id = f"{item.req.key}/{next(self._seq_ids)}"
        self.owner[seq_id] = item
        item.req.seqs[seq_id] = segment
        return seq_id

    def item_of(self, seq_id: str) -> Item | None:
        return self.owner.get(seq_id)

    def release(self, seq_id: str) -> None:
        item = self.owner.pop(seq_id, None)
        if item is not None:
            item.req.seqs.pop(seq_id, None)

    # ---- usage ---------------------------------------------------------------------------
    def first_token(self, req: RequestState, now: float) -> None:
        if req.first_token is None:
            req.first_token = now

    @staticmethod
    def count(req: RequestState, engine: str, key: str, n: int) -> None:
        """`n` tokens of kind `key` (prompt_tokens, completion_tokens, cached_tokens) that engine
        `engine` computed for `req`: in its usage and in that engine's share of it."""
        req.usage[key] += n
        req.engine_usage.setdefault(engine, no_usage())[key] += n

    def finished_sequence(self, item: Item, out, engine: str) -> None:
        """A sequence of `item` finished on `engine`: its tokens and (the request's first) timings."""
        req = item.req
        for key in ("queue_s", "prefill_s", "decode_s"):
            if key in (out.metrics or {}) and key not in req.timings:
                req.timings[key] = out.metrics[key]
        self.count(req, engine, "completion_tokens", out.completion_tokens)
        entry = item.entry
        if entry is not None and entry["cached_tokens"] is None:
            # a prompt shared by n copies counts once, with the cached tokens of the copy heard of
            # first (the copies' differ: one admitted after another's prefill hits its blocks), as
            # a stream already told them
            cached = entry.setdefault("cached_first", out.cached_tokens)
            entry["cached_tokens"] = cached
            self.count(req, engine, "cached_tokens", cached)
        if item.index is not None:
            req.streaming[item.index] = None                      # counted above from now on

    def usage_so_far(self, item: Item, out) -> dict:
        """The usage of `item`'s request as a delta of its streamed choice (`out`) is heard: every
        prompt its sequences took, the tokens of those that ended, and of each streamed choice
        still generating those heard so far (this one's now). Never less than before, and the
        request's usage once every sequence ended."""
        req = item.req
        if req.streaming.get(item.index, ()) is not None:
            req.streaming[item.index] = (out.completion_tokens, item.entry, out.cached_tokens)
            if item.entry is not None:
                item.entry.setdefault("cached_first", out.cached_tokens)
        usage = dict(req.usage)
        entries = {}
        for running in req.streaming.values():
            if running is not None:
                usage["completion_tokens"] += running[0]
                if running[1] is None:
                    entries[id(running)] = running[2]
                elif running[1]["cached_tokens"] is None:           # a prompt shared by n copies counts
                    entries[id(running[1])] = running[1]["cached_first"]   # once, as its first copy heard
        usage["cached_tokens"] += sum(entries.values())
        return usage

    # ---- endings -------------------------------------------------------------------------
    def close(self, req: RequestState, failed: bool) -> list[tuple[str, Any]]:
        """The request ends: out of the ledger; its engine sequences (to abort) returned."""
        if req.paused:
            self.paused -= 1
        req.done = True
        self.requests.pop(req.key, None)
        seqs = list(req.seqs.items())
        for seq_id, _ in seqs:
            self.owner.pop(seq_id, None)
        req.seqs.clear()
        self.totals["failed" if failed else "answered"] += 1
        return seqs

    def answer(self, req: RequestState, model_n: Callable[[RequestState, dict], int] = lambda req, request: 1
               ) -> Result:
        """Its Result from what reached respond. A streamed request's choices streamed straight
        from a generate stage keep the index their chunks carried (numbered as they started
        there), the others fill the gaps in branch order; an answer sent whole is numbered in
        branch order throughout, so choice i is branch i's however the branches' timings fell
        (a seeded request answers the same choices in the same order). No answer at all is an
        error. `model_n(req, request)`: the answers a generate stage would have given the request
        (its item dict), which a python stage's own answer is copied into (answered_without_model)."""
        def choice(index: int, it) -> Choice:
            return Choice(index, it.data.get("text", ""), it.data.get("finish_reason"), it.data,
                          it.index if it.index != index else None, it.tool_read)

        n = answered_without_model(req, model_n)
        if n > 1:          # a python stage's one answer is each of the n choices the request asked for
            return Result(req.key, req.id, [choice(k, req.results[0]) for k in range(n)], None, dict(req.usage),
                          self.metrics(req), self.engine_usage(req))
        if not req.stream:
            choices = [choice(k, it) for k, it in enumerate(sorted(req.results, key=lambda it: it.branch))]
        else:
            streamed = sorted((it for it in req.results if it.index is not None), key=lambda it: it.index)
            rest = sorted((it for it in req.results if it.index is None), key=lambda it: it.branch)
            choices = [choice(it.index, it) for it in streamed]
            taken = {c.index for c in choices}
            nxt = 0
            for it in rest:
                while nxt in taken:
                    nxt += 1
                choices.append(choice(nxt, it))
                taken.add(nxt)
            choices.sort(key=lambda c: c.index)
        error = None
        if not choices:
            error = req.rejection or PipelineError("no answer: none of the request's items reached a respond "
                                                   "stage", "failed")
        return Result(req.key, req.id, choices, error, dict(req.usage), self.metrics(req),
                      self.engine_usage(req))

    def failure(self, req: RequestState, err: PipelineError) -> Result:
        return Result(req.key, req.id, [], err, dict(req.usage), self.metrics(req),
                      self.engine_usage(req))

    @staticmethod
    def engine_usage(req: RequestState) -> dict:
        return {engine: dict(u) for engine, u in req.engine_usage.items()}

    def metrics(self, req: RequestState) -> dict:
        now = self.clock()
        return {"arrival": req.arrival, "latency_s": now - req.arrival,
                "ttft_s": None if req.first_token is None else req.first_token - req.arrival, **req.timings}


def answered_without_model(req: RequestState, model_n: Callable[[RequestState, dict], int]) -> int:
    """The `n` of a request a python stage answered itself (a guard's canned answer, a cache, a tool
    that answers): no generate stage took the request at all (RequestState.generated, set where one
    does: a join's merged answer, a fan-out's, a loop's or a cascade's all had one) and its one answer
    is the only result. The stage runs once and its answer is each of the n choices the model would
    have given (`model_n`: the request's n, or its generate stage's), as a model asked for n answers
    at temperature 0 gives n alike; 1 otherwise (a generate stage's answers are choices of their own,
    merged or not)."""
    if req.generated or len(req.results) != 1:
        return 1
    n = model_n(req, req.results[0].data.get("request") or {})
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
