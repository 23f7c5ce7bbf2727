"""Stream stages while their item is generated: the chain of a generate stage starts with
the item's first tokens, each stage on its own workers, and the item goes on from a stage
once it has arrived there and the stage's call has ended (flow/streams.py has the parts).

A part of PipelineRuntime (flow/runtime.py), in a file of its own: it shares the runtime's
state.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

from .items import Item
from .streams import Live, arun_filter, run_filter
from .timing import Stretch


class LiveStages:
    """PipelineRuntime's stream stages while items generate (mixed into it)."""

    # ---- stream stages (flow/streams.py) -------------------------------------------------
    def _go_live(self, item: Item) -> Live:
        """The item's first tokens: start its generate stage's chain of stream stages."""
        gen = item.at
        direct = self.streams.direct[gen] and item.index is not None
        live = Live(self.streams.chains[gen], direct,
                    (lambda out: self._live_delta(item, out, gen)) if direct else None)
        start = self._generated(item, item.data, gen, "", None, 0, 0, 0)
        for i, stage in enumerate(live.chain):
            impl, view = self.impls[stage], copy.deepcopy(start)

            def emit(chunk, i=i):
                live.emit(i, chunk)

            if impl.shape == "async_generator":
                async def call(impl=impl, view=view, i=i, emit=emit):
                    try:
                        return await arun_filter(impl.fn, view, live.feeds[i].chunks(), emit)
                    finally:
                        live.stage_ended(i)
                fn, is_async = call, True
            else:
                def call(impl=impl, view=view, i=i, emit=emit):
                    try:
                        if impl.shape != "generator":
                            raise TypeError(f"{impl.ref} is not a generator function; stream = true needs one")
                        return run_filter(impl.fn, view, live.feeds[i], emit)
                    finally:
                        live.stage_ended(i)
                fn, is_async = call, False
            # the stage's timeout bounds the function's own time per chunk, not the generation
            stretch = live.feeds[i].stretch = Stretch()
            t0 = time.perf_counter()
            live.calls.append(self.workers[stage].submit(
                fn, lambda ok, value, i=i, stage=stage, t0=t0: self._live_ended(item, i, stage, ok, value, t0),
                is_async, alive=lambda: not item.req.done, stretch=stretch))
        with self._lock:                           # a pause from now on finds its calls (_lend_paused)
            item.live = live
            if item.req.paused:
                self._lend_paused(item, True)
        return live

    def _lend_paused(self, item: Item, paused: bool) -> None:
        """(under the lock) The item's request is paused (or let go): its stream stages' calls,
        waiting for chunks that its paused generation does not make, lend their workers to other
        requests meanwhile (flow/workers.py)."""
        if item.live is not None:
            for stage, call in zip(item.live.chain, item.live.calls):
                self.workers[stage].pause(call, paused)

    def _live_delta(self, item: Item, out, gen: str) -> None:
        if out.new_token_ids or out.delta_text:
            self.ledger.first_token(item.req, self.clock())
        if item.req.hears_deltas:
            self._heard(item, out, gen)

    def _live_ended(self, item: Item, i: int, stage: str, ok: bool, value, t0: float) -> None:
        """A stream stage's call for a live item ended (its worker or the event loop)."""
        self._span(stage, "call", t0, item)
        then = item.live.complete(i, ok, value)
        if not ok:
            self._task(self._live_failed, item, stage, value)
        elif then is not None:
            self._task(self._continue, item, stage, then, value)

    def _continue(self, item: Item, stage: str, then: Callable, value) -> None:
        try:
            nxt = then(True, value)
        except BaseException as e:                  # noqa: BLE001
            self._fail_item(item, stage, e)
            return
        self._go(nxt)

    def _arrive_live(self, item: Item, stage: str) -> list[tuple[Item, str]]:
        """The item reached a stream stage that is filtering it live: go on once that ended."""
        end = item.live.arrive(item.live.index(stage), lambda ok, value: self._live_done(item, stage, ok, value))
        return self._live_done(item, stage, *end) if end is not None else []

    def _live_done(self, item: Item, stage: str, ok: bool, value) -> list[tuple[Item, str]]:
        if not ok or item.req.done or item not in item.req.items:
            return []                              # _live_failed fails it
        text, label = value
        if item.live.index(stage) == len(item.live.chain) - 1:
            item.live.finish()                     # the client's last chunk: finish reason, usage
        item.data["text"], item.label = text, label if isinstance(label, str) else None
        return self._send(item, stage)

    def _live_failed(self, item: Item, stage: str, exc: BaseException) -> None:
        """A stream stage refused or failed while the item was still on its way: it is cut there
        (counted along the edges it skipped) and fails as if it had arrived."""
        with self._lock:
            req = item.req
            if req.done or item not in req.items:
                return
            if item.at != stage:
                chain = item.live.chain
                path = [item.at] + chain[(chain.index(item.at) + 1) if item.at in chain else 0:chain.index(stage) + 1]
                if item.queued:
                    self.flow.taken(item.at)
                    item.queued = False
                for u, v in zip(path, path[1:]):
                    self.flow.edge(u, v, queue=False)
                item.at = stage
        self._fail_item(item, stage, exc)

