"""The executor: runs the engine's steps over the plan's streams, overlapped.

    ex = Executor(engine, make_plan(graph), overlap=True, trace=Trace())
    stats = ex.run(on_output=print)          # until every request is done

One contract, two backends. The plan of one engine segment (pipeline_dsl.plan) gives
every piece of its per-step work a stream, a skew (iteration i of a stream runs
micro-batch i - skew) and events on cross-stream edges. The work pieces drive the
engine's phases:

    batch.admit       requests in (add_request with token ids, abort) host
    batch.schedule    Engine.schedule(), then advance optimistically host
    kv.lookup         block tables and token slices of the step      host
    gen.h2d           index tensors of the step onto the device      copy
    gen.forward       model forward + sampling                       compute
    gen.d2h           sampled tokens back to the host                copy
    gen.emit          detokenise, stop checks, finish, on_output     host

Requests arrive already tokenised (the encode stage's work runs per item, off this loop:
pipeline_dsl.flow).

- CPU: one worker thread per stream; a threading.Event per recorded work per micro-batch
  is set after it and waited on across streams. torch releases the GIL in its kernels,
  so step k's forward runs while the host schedules step k+1 and emits step k-1.
- CUDA: one torch.cuda.Stream per copy/compute stream, issued from one host thread in the
  plan's global order (or, issue="threads", one thread per stream as on CPU);
  torch.cuda.Event on cross-stream edges, sampled tokens copied non-blocking into pinned
  memory; the host blocks only where the plan says (emit). The step's index arrays go up in
  one non-blocking copy from a pinned buffer (batch.Uploader) on the copy stream. The
  runner's decode graphs (captured at load, every mode) are replayed; cuda_graphs=False
  runs the same steps eagerly, for A/B.
- overlap=False runs the same plan serially on one worker thread (CUDA: one stream,
  synchronised after every piece), for A/B.

Optimistic scheduling: step k+1 is scheduled before step k's tokens are known. Each
sampled position gets a placeholder; the forward of step k+1 reads the token from step
k's sampled tensor (Engine.fill: one gather on the device, no round trip); emit fills the
placeholder on the host. A sequence
that step k finishes was already scheduled in k+1: its extra token is discarded.
"""
from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import numpy as np
import torch

from pipeline_dsl.plan import Event, Plan, make_plan

from .batch import PLACEHOLDER
from .compute import on_compute
from .cpus import available_cpus
from .trace import Trace

AHEAD = 32                # no stream runs more than this many micro-batches ahead of emit
SCHEDULE_AHEAD = 2        # nor the batcher's schedule more than this many (the plan's own: k+1 beside emit k-1)
GPU_PARTS = ("h2d", "forward", "d2h")
CPU_TORCH_PARTS = ("h2d", "forward")   # CPU: the works that run torch ops, on the compute thread
_GRAPHS: dict[str, Plan] = {}


def default_plan() -> Plan:
    """The engine segment's plan of the seed's pipeline (request -> batch -> encode -> kv -> gen -> out)."""
    if "chat" not in _GRAPHS:
        kinds = [("request", "requests", "host"), ("batch", "dynamic_batch", "host"),
                 ("encode", "encode", "host"), ("kv", "kv_lookup", "copy"),
                 ("gen", "generate", "compute"), ("out", "respond", "host")]
        g = nx.DiGraph(name="chat", settings={})
        for name, kind, res in kinds:
            g.add_node(name, kind=kind, params={}, resource=res, placement=None, pos=None)
        nx.add_path(g, [k[0] for k in kinds])
        _GRAPHS["chat"] = make_plan(g).segments[0]
    return _GRAPHS["chat"]


@dataclass
class _Launch:
    """One micro-batch: what the host scheduled and what the device made of it."""
    m: int
    so: Any                                   # SchedulerOutput
    sample_pos: list                          # per item: index of its placeholder, or None
    preemptions: list                         # per item: seq.num_released at scheduling
    sample_seqs: list
    batch: Any = None                         # StepBatch (PLACEHOLDER where a token is in flight)
    fill_srcs: list = field(default_factory=list)  # micro-batches whose samples fill it, in order
    step: Any = None                          # the runner's prepared step
    sampled: Any = None                       # [n_sample] long, on the device
    host_tokens: Any = None                   # pinned CPU tensor (CUDA) or list
    tokens: list | None = None
    rows: dict | None = None                  # item index -> prompt_outputs.ChunkRows (prompt outputs)
    verified: dict = field(default_factory=dict)  # sample index -> tokens of an item that verified drafts
    cuda: dict = field(default_factory=dict)  # work -> (start event, end event)
    spans: list = field(default_factory=list)  # (stream, work name, start event, end event): traced at emit


class _Signals:
    """threading.Event per (recorded work, micro-batch); released for all on stop/failure.

    A work records its micro-batches in order, on one thread, so an event far older than
    that work's latest record has been set: it is dropped and reads as set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[tuple[str, int], threading.Event] = {}
        self._dropped_below: dict[str, int] = {}
        self.stop_at: int | None = None
        self.failed = False

    def _get(self, key) -> threading.Event:
        with self._lock:
            ev = self._events.get(key)
            if ev is None:
                ev = threading.Event()
                if key[1] < self._dropped_below.get(key[0], -1):
                    ev.set()
                    return ev
                self._events[key] = ev
                if self.failed or (self.stop_at is not None and key[1] > self.stop_at):
                    ev.set()
            return ev

    def record(self, work: str, m: int) -> None:
        self._get((work, m)).set()
        with self._lock:
            old = m - 2 * AHEAD
            if old > self._dropped_below.get(work, -1):
                self._dropped_below[work] = old
                self._events.pop((work, old - 1), None)

    def wait(self, work: str, m: int) -> None:
        self._get((work, m)).wait()

    def release(self, stop_at: int | None = None, failed: bool = False) -> None:
        with self._lock:
            if stop_at is not None:
                self.stop_at = stop_at
            self.failed = self.failed or failed
            for (_, k), ev in self._events.items():
                if failed or k > self.stop_at:
                    ev.set()


class Executor:
    def __init__(self, engine, plan: Plan | None = None, *, overlap: bool | None = None,
                 trace: Trace | None = None, cuda_graphs: bool | None = None,
                 issue: str | None = None):
        self.engine = engine
        self.plan = plan or default_plan()
        self.overlap = overlap               # None: decided per run (overlap_now)
        self.trace = trace if trace is not None else Trace(limit=100_000)  # bounded when serving
        self.device = engine.device
        self.cuda = self.device.type == "cuda"
        parts = {w.part for w in self.plan.work}
        missing = {"admit", "schedule", "forward", "emit"} - parts
        if missing:
            raise ValueError("the executor needs the plan of an engine segment (dynamic_batch -> encode -> "
                             f"kv_lookup -> generate); missing work: {', '.join(sorted(missing))}")
        self.lock = threading.RLock()        # the engine's host state
        # what can make work schedulable notifies it: a submit, abort, park (or unpark) or close, an
        # emit (tokens accepted, sequences finished and their KV blocks freed) and a stream's failure
        self._wake = threading.Condition(self.lock)
        self._pending: list[tuple] = []      # submitted, not yet admitted: (id, kwargs, order)
        self._submitted = 0
        self._aborts: list[str] = []
        self._parks: list[tuple[str, bool]] = []   # (id, parked) in the order asked
        self._launches: dict[int, _Launch | None] = {}
        self._sampled: dict[int, Any] = {}    # micro-batch -> its sampled tokens, while a step may read them
        # A step's samples are kept until it is emitted (its placeholders filled) and every step whose
        # lookup found one of its tokens in flight has read them: a sequence left out of some steps
        # (chunk budget, preemption) may wait on a token of a step many micro-batches back when the
        # batcher's stream runs ahead of the emit (a placement that puts generate on another stream)
        self._sampled_readers: dict[int, int] = {}   # micro-batch -> steps looked up, not yet forwarded, reading it
        self._emitted: set[int] = set()              # emitted micro-batches whose samples are still kept
        self._samples_lock = threading.Lock()        # the three above (the compute thread takes no other)
        self._n_sample: dict[int, int] = {}   # micro-batch -> tokens it samples
        self._closing = True
        self._close_called = False
        self._on_output: Callable | None = None
        self._on_error: Callable | None = None
        self._on_admitted: Callable | None = None
        self.discarded_tokens = 0
        self.last_prefill = -1          # micro-batch of the last step with prefill tokens
        self.steps = 0
        self._streams: dict[str, Any] = {}
        if self.cuda:
            for s in self.plan.streams:
                self._streams[s.name] = (torch.cuda.Stream(self.device) if overlap is not False and s.resource != "host"
                                         else torch.cuda.current_stream(self.device))
        self._t_base = None
        # CUDA work is issued from one host thread in the plan's global order ("single") or,
        # like the CPU backend, from one thread per stream ("threads"): then the next step's
        # input copies are issued while the compute thread is still launching kernels.
        self.issue = issue or ("single" if self.cuda else "threads")
        if self.issue not in ("threads", "single"):
            raise ValueError(f"issue must be 'threads' or 'single', not {issue!r}")
        # replay the decode graphs the runner captured at load (CUDA, every mode); False: eager, for A/B
        self.graphs = self.cuda if cuda_graphs is None else bool(cuda_graphs)
        self._handlers = {"admit": self._admit, "schedule": self._schedule,
                          "lookup": self._lookup, "h2d": self._h2d, "forward": self._forward,
                          "d2h": self._d2h, "emit": self._emit}
        unknown = sorted({w.part for w in self.plan.work} - set(self._handlers))
        if unknown:
            raise ValueError(f"the executor has no work called {', '.join(unknown)}")
        # A step's lookup reads the block tables of the sequences its schedule chose; admit (aborts),
        # schedule (preemptions) and emit (finished sequences) free them. On one stream (the default
        # plan) nothing frees between a step's schedule and its lookup; where a placement (`on copy`)
        # splits them over streams, the lookup is made with the schedule, under the same lock.
        self._lookup_with_schedule = len({w.stream for w in self.plan.work
                                          if w.part in ("admit", "schedule", "lookup", "emit")}) > 1
        self.work_s: dict[str, float] = {w.name: 0.0 for w in self.plan.work}   # time spent per work
        self.work_n: dict[str, int] = {w.name: 0 for w in self.plan.work}       # runs that did something

    # ---- requests from other threads ---------------------------------------------------
    def submit(self, request_id, order=None, **kwargs) -> None:
        """Queue a request (Engine.add_request's keyword arguments; give prompt_token_ids to keep
        tokenisation off this loop); it is admitted on the host stream. Requests submitted
        together are admitted in `order` (default: as submitted), whichever thread came first."""
        with self.lock:
            self._pending.append((str(request_id), kwargs, self._admit_key(order)))
            self._wake.notify_all()

    def _admit_key(self, order):
        self._submitted += 1
        return (order, self._submitted) if order is not None else ((self._submitted,), self._submitted)

    def abort(self, request_id) -> None:
        """Cancel a request: its KV blocks are freed at the next admit (in flight or not); one
        submitted and not yet admitted is never added (the admit handles aborts before new
        requests, so its abort would come too early)."""
        rid = str(request_id)
        with self.lock:
            self._pending = [p for p in self._pending if p[0] != rid]
            self._aborts.append(rid)
            self._wake.notify_all()

    def park(self, request_id, parked: bool = True) -> None:
        """Pause a request (Engine.park) or let it go on, at the next admit (after the requests
        submitted before this call)."""
        with self.lock:
            self._parks.append((str(request_id), parked))
            self._wake.notify_all()

    def close(self) -> None:
        """Let a run with until_idle=False end once every request is done (also when called
        before that run starts)."""
        with self.lock:
            self._closing = self._close_called = True
            self._wake.notify_all()

    def reopen(self) -> None:
        """After a run that close() ended: let the next run(until_idle=False) serve again."""
        with self.lock:
            self._close_called = False

    # ---- the work pieces ---------------------------------------------------------------
    def _admit(self, m: int) -> bool:
        """batch.admit: aborts, then the submitted requests into the engine's waiting queue."""
        from .errors import InputError

        taken = []
        with self.lock:
            aborts, self._aborts = self._aborts, []
            todo, self._pending = self._pending, []
            parks, self._parks = self._parks, []
            todo.sort(key=lambda t: t[2])
            for rid in aborts:
                self.engine.abort(rid)
            for rid, kwargs, _ in todo:
                try:
                    self.engine.add_request(rid, **kwargs)
                    taken.append(rid)
                except InputError as e:   # this request's fault: the caller hears of it, the run goes on
                    if self._on_error is None:
                        raise
                    self._on_error(rid, e)
            for rid, parked in parks:
                self.engine.park(rid, parked)
        if taken and self._on_admitted is not None:     # off the lock: the caller's own work
            self._on_admitted(taken)
        return bool(aborts or todo or parks)

    def _idle(self) -> bool:
        return not (self.engine.has_unfinished() or self._pending or self._aborts or self._parks)

    def _schedule(self, m: int) -> bool:
        eng = self.engine
        with self.lock:
            if self._idle() and self._closing:
                self._launches[m] = None
                self._stop(m - 1)
                return False
            so = self.engine.schedule()
            if so.empty:
                self._launches[m] = None
                in_flight = any(v is not None for k, v in list(self._launches.items()) if k < m)
                if not in_flight:     # wait for the batch window or new work, lock released
                    deadline = getattr(eng, "next_deadline", lambda: None)()
                    if deadline is not None:
                        self._wake.wait(min(max(deadline - time.monotonic(), 0.0), 0.01))
                    elif not self._signals.failed:
                        # idle, or only requests nothing can schedule now (parked for their
                        # readers, out of KV blocks): no passing time changes that, only what
                        # notifies _wake (__init__). The second's cap is a guard, not a poll: a
                        # notification some future change forgets costs a second, never a hang
                        # (the poll it replaces woke this loop every 2 ms while such requests waited)
                        self._wake.wait(1.0)
                return False
            pre = [it.seq.num_released for it in so.items]
            pos, seqs = [], []
            for it in so.items:       # advance as if the step were done (its token unknown)
                seq = it.seq
                if it.draft:          # verifying drafts: how many tokens it keeps is known at emit
                    seq.state.verifying = True
                    pos.append(None)
                    seqs.append(seq)
                    continue
                seq.num_computed = it.start + it.num_tokens
                if it.sample:
                    ids = seq.token_ids
                    at = len(ids)
                    seq.state.pending[at] = (m, len(seqs))
                    pos.append(at)
                    ids.append(PLACEHOLDER)
                    seqs.append(seq)
                else:
                    pos.append(None)
            self._launches[m] = _Launch(m, so, pos, pre, seqs)
            self._n_sample[m] = len(seqs)
            if self._lookup_with_schedule:
                self._lookup(m)
            self._n_sample.pop(m - 2 * AHEAD, None)
            self.steps += 1
            if so.num_prefill_tokens:
                self.last_prefill = m
        return True

    def _lookup(self, m: int) -> bool:
        """kv.lookup: the step's arrays (tokens, starts, tables as rows of the block manager's
        array) and, for each token still in flight, which earlier step's sample it is."""
        L = self._launches.get(m)
        if L is None or L.batch is not None:
            return False
        with self.lock:
            batch = self.engine.step_batch(L.so)
            rows = (batch.tokens == PLACEHOLDER).nonzero()[0]                # [F]
            if rows.size:
                ends = batch.counts.cumsum()
                item = np.searchsorted(ends, rows, side="right")             # [F] item of each row
                pos = batch.starts[item] + rows - (ends - batch.counts)[item]  # [F] its position
                src = [L.so.items[i].seq.state.pending[p] for i, p in zip(item.tolist(), pos.tolist())]
                L.fill_srcs = sorted({s_m for s_m, _ in src})
                with self._samples_lock:
                    for s_m in L.fill_srcs:
                        self._sampled_readers[s_m] = self._sampled_readers.get(s_m, 0) + 1
                base, at = {}, 0
                for s_m in L.fill_srcs:
                    base[s_m] = at
                    at += self._n_sample[s_m]
                batch.fill_from = np.fromiter((base[s_m] + j for s_m, j in src), np.int64, len(src))
        L.batch = batch
        return True

    def _h2d(self, m: int) -> bool:
        """gen.h2d: the step's index tensors onto the device (CUDA: one non-blocking copy from a
        pinned buffer on the copy stream)."""
        L = self._launches.get(m)
        if L is None:
            return False
        if L.batch is None:
            self._lookup(m)
        L.step = self.engine.prepare(L.batch)          # in inference mode, as every torch work (_run_one)
        return True

    def _forward(self, m: int) -> bool:
        L = self._launches.get(m)
        if L is None:
            return False
        if L.step is None:
            self._h2d(m)
        self.engine.fill(L.step, [self._sampled[s_m] for s_m in L.fill_srcs])   # tokens of earlier steps
        logits = self.engine.forward(L.step, graphs=self.graphs, plan=L.so)  # [n_sample, V] or None
        rows = L.step.rows
        if logits is None:
            L.sampled = torch.empty(0, dtype=torch.long, device=self.device)
        elif L.so.num_draft_tokens:               # speculative decoding: some items verify drafts
            L.sampled, L.verified = self.engine.sample_step(L.so, logits, rows)
        else:
            L.sampled = self._sample(logits, L.sample_seqs)
        if rows:                                      # prompt outputs, reduced per chunk
            L.rows = self.engine.reduce_rows(L.so, rows)
        with self._samples_lock:
            self._sampled[m] = L.sampled
            for s_m in L.fill_srcs:
                self._sampled_readers[s_m] -= 1
                self._drop_sampled(s_m)
        return True

    def _drop_sampled(self, m: int) -> None:
        """Forget micro-batch m's samples once it is emitted and no step still to run reads them."""
        if m in self._emitted and not self._sampled_readers.get(m):
            self._sampled.pop(m, None)
            self._sampled_readers.pop(m, None)
            self._emitted.discard(m)

    def _sample(self, logits, seqs) -> torch.Tensor:
        return self.engine.sample(logits, seqs)                        # [n_sample] on the device

    def _d2h(self, m: int) -> bool:
        L = self._launches.get(m)
        if L is None or L.host_tokens is not None:
            return False
        self._copy_back(L)
        return True

    def _copy_back(self, L: _Launch) -> None:
        """The step's sampled tokens to the host (CUDA: a non-blocking copy into pinned memory on
        the current stream, read only after that stream's work is waited for)."""
        if self.cuda:
            buf = torch.empty(L.sampled.shape, dtype=torch.long, pin_memory=True)
            buf.copy_(L.sampled, non_blocking=True)
            L.host_tokens = buf
        else:
            L.host_tokens = L.sampled.tolist()

    def _emit(self, m: int) -> bool:
        L = self._launches.pop(m, None)
        if L is None:
            return False
        if L.host_tokens is None:     # a plan without gen.d2h: the copy is made here (L has left _launches)
            if self.cuda:
                here = torch.cuda.current_stream(self.device)
                here.wait_stream(self._streams[self._stream_of("forward")])
                self._copy_back(L)
                here.synchronize()   # the copy itself: the events below are the forward's, recorded before it
            else:
                self._copy_back(L)
        if self.cuda:
            ev = L.cuda.get("d2h", L.cuda.get("forward"))
            if ev is not None:
                ev[1].synchronize()                  # the plan's host sync
            else:
                torch.cuda.synchronize(self.device)
            tokens = L.host_tokens.tolist()
            self._trace_cuda(L)
        else:
            tokens = L.host_tokens
        outputs = self._update(L, tokens)
        with self._samples_lock:
            self._emitted.add(m)
            self._drop_sampled(m)
        if outputs and self._on_output is not None:
            self._on_output(outputs)
        return True

    def _trace_cuda(self, L: _Launch) -> None:
        """The micro-batch's GPU spans into the trace, once its d2h has been waited for (its h2d
        and forward came before on the plan's events): their events have all completed, and
        none is kept past emit (under `agp serve` a run never returns)."""
        for stream, name, s, e in L.spans:
            a = self._t_base + self._cuda_base.elapsed_time(s) / 1e3
            b = self._t_base + self._cuda_base.elapsed_time(e) / 1e3
            self.trace.add(stream, name, a, b, L.m)
        L.spans.clear()

    def _update(self, L: _Launch, tokens: list[int]) -> list:
        eng = self.engine
        outputs = []
        with self.lock:
            eng.record_step(L.so, L.verified.values())
            now = eng.clock()
            ti = iter(enumerate(tokens))
            for index, (it, pos, pre) in enumerate(zip(L.so.items, L.sample_pos, L.preemptions)):
                seq = it.seq
                j, tok = next(ti) if it.sample else (None, None)
                if it.draft:
                    seq.state.verifying = False
                if not eng.is_live(seq):                        # finished or aborted meanwhile
                    self.discarded_tokens += len(L.verified[j]) if it.draft else tok is not None
                    continue
                if it.draft:                                    # its accepted drafts, then the model's token
                    got = L.verified[j]
                    if seq.num_released == pre:                 # else preempted meanwhile: recomputed when back
                        eng.scheduler.accept_drafts(seq, it, got)
                    outputs.append(eng.accept_tokens(seq, it, got, now))
                    continue
                if tok is not None:
                    seq.token_ids[pos] = tok
                    seq.state.pending.pop(pos, None)
                if seq.num_released == pre:
                    eng.commit(seq, it.start + it.num_tokens)
                if L.rows and index in L.rows:        # computed before any preemption since: still the prompt's
                    eng.accept_rows(seq, L.rows[index])
                if tok is None:
                    done = (eng.finish_prefilled(seq, it.start + it.num_tokens, now)
                            if seq.num_released == pre else None)
                    if done is not None:
                        outputs.append(done)
                    continue
                tail = seq.token_ids[pos + 1:]                  # placeholders of later steps
                del seq.token_ids[pos + 1:]
                out = eng.accept_token(seq, tok, now)
                if not out.finished:
                    seq.token_ids.extend(tail)
                outputs.append(out)
            # a schedule that found nothing to do (its tokens in flight, its blocks taken) waits
            # for this: on another stream than the emit it saw the step gone before its update
            self._wake.notify_all()
        return outputs

    # ---- driving -------------------------------------------------------------------------
    def _stop(self, last: int) -> None:
        self._signals.release(stop_at=last)

    def _stream_of(self, part: str) -> str:
        return next(w.stream for w in self.plan.work if w.part == part)

    def _run_one(self, work, m: int, stream_name: str, computing: bool = False) -> None:
        """One work of micro-batch m, timed and traced. computing: the caller already runs on the
        compute thread, in inference mode (the serial loop hands a step's torch works over
        together: _run_torch). The torch works (h2d, forward) run in inference mode, entered here
        once a hand-off, not once a work."""
        fn = self._handlers[work.part]
        stop = self._signals.stop_at
        if stop is not None and m > stop:
            return
        if self.cuda and work.part in GPU_PARTS:
            self._run_cuda(fn, work, m)
            return
        if not (self.cuda or computing) and work.part in CPU_TORCH_PARTS:   # on the compute thread (engine/compute.py)
            fn = functools.partial(on_compute, _in_inference_mode, fn)
        t0 = time.perf_counter()
        if fn(m):                                  # traced and timed only when it did something
            t1 = time.perf_counter()
            self.trace.add(stream_name, work.name, t0, t1, m)
            self.work_s[work.name] += t1 - t0
            self.work_n[work.name] += 1

    def _run_cuda(self, fn, work, m: int) -> None:
        L = self._launches.get(m)
        if L is None:
            return
        stream = self._streams[work.stream]
        for e in self._waits[work.name]:          # cross-stream edges between GPU work
            src = self._launches.get(m - e.lag)
            part = e.src_work.rsplit(".", 1)[1]
            if src is not None and part in src.cuda and self._overlap:
                stream.wait_event(src.cuda[part][1])
        with torch.cuda.stream(stream), torch.inference_mode():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn(m)
            end.record(stream)
        L.cuda[work.part] = (start, end)
        L.spans.append((work.stream, work.name, start, end))
        if not self._overlap:
            torch.cuda.synchronize(self.device)

    def run(self, on_output: Callable | None = None, *, on_error: Callable | None = None,
            on_admitted: Callable | None = None, until_idle: bool = True, measure: bool = True) -> dict:
        """Run until every request is done (or, with until_idle=False, until close()).
        `on_admitted(ids)`: the ids of the requests an admit put in the engine's waiting queue (its
        checks passed; their first tokens may be far off), after the admit. The stats'
        measured_overlap is the trace's, over every span it keeps (up to 100,000 by
        default: a walk of them all at the end of each run); measure=False leaves it out, for a
        caller that measures the trace itself once (the pipeline runtime's summary)."""
        self._on_output, self._on_error, self._on_admitted = on_output, on_error, on_admitted
        with self.lock:
            self._closing = until_idle or self._close_called
        self._signals = _Signals()
        self._waits = {w.name: [e for e in self.plan.events if e.dst_work == w.name]
                       for w in self.plan.work}
        sched, emit = (next(w for w in self.plan.work if w.part == p) for p in ("schedule", "emit"))
        self._last_work = emit.name
        if sched.stream != emit.stream:
            # On one stream, the stream's order bounds how far the schedule runs ahead of the emit. On
            # two (a placement), the schedule could run up to AHEAD steps ahead, and each step scheduled
            # before an emit computes the sequences that emit finishes (a stop string), discarding as
            # many tokens: it waits for the emit SCHEDULE_AHEAD steps back (or the plan's skew)
            self._waits[sched.name].append(Event(src=emit.stage, dst=sched.stage, src_work=emit.name,
                                                 dst_work=sched.name, host_sync=True,
                                                 lag=max(SCHEDULE_AHEAD, emit.skew - sched.skew + 1)))
        if self.cuda:
            self._cuda_base = torch.cuda.Event(enable_timing=True)    # on the engine's device, as its spans
            self._cuda_base.record(torch.cuda.current_stream(self.device))
            torch.cuda.synchronize(self.device)
            self._t_base = time.perf_counter()
        overlap = self._overlap = self.overlap_now()
        self._threads = torch.get_num_threads()      # the forward's, whichever thread runs it
        t0 = time.perf_counter()
        if overlap and (not self.cuda or self.issue == "threads"):
            self._run_threads()
        else:   # on a worker thread too, so that A/B differ in overlap only
            self._run_threads(serial=True)
        wall = time.perf_counter() - t0
        if self.cuda:
            torch.cuda.synchronize(self.device)
        stats = {"overlap": overlap, "executor_wall_s": round(wall, 4), "steps": self.steps,
                 "discarded_tokens": self.discarded_tokens, "last_prefill_step": self.last_prefill,
                 "streams": [s.name for s in self.plan.streams]}
        if measure:
            stats["measured_overlap"] = round(self.trace.measured_overlap(), 4)
        return stats

    def _same_threads(self) -> None:
        """A loop thread takes the torch thread count of the thread that called run() (it is per
        thread; the compute thread applies the count of whoever hands it work)."""
        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)

    def overlap_now(self) -> bool:
        """Whether run() overlaps the plan's streams: as asked, or with overlap=None, always on
        CUDA and on CPU only when the forward's threads leave a core for the host work."""
        if self.overlap is not None:
            return bool(self.overlap)
        return self.cuda or cpu_overlap_pays(torch.get_num_threads())

    def _order(self, works):
        index = {w.name: i for i, w in enumerate(self.plan.work)}
        return sorted(works, key=lambda w: index[w.name])

    def _run_serial(self) -> None:
        works = self._order(self.plan.work)
        # CPU: nothing runs beside the forward, so scheduling step k+1 before step k is emitted
        # hides nothing: each micro-batch's works in turn (no skew), and no sequence is computed
        # a step past its end. CUDA keeps the plan's skews (the host issues ahead of the device).
        skew = {w.name: w.skew if self.cuda else 0 for w in works}
        top = max(skew.values())
        groups: list[tuple[bool, list]] = []      # CPU: consecutive torch works, one hand-off a step
        for w in works:
            torch_work = not self.cuda and w.part in CPU_TORCH_PARTS
            if torch_work and groups and groups[-1][0]:
                groups[-1][1].append(w)
            else:
                groups.append((torch_work, [w]))
        j = 0
        while self._signals.stop_at is None or j - top <= self._signals.stop_at:
            for torch_work, group in groups:
                todo = [(w, j - skew[w.name]) for w in group if j - skew[w.name] >= 0]
                if not torch_work:
                    self._run_each(todo)
                elif any(self._launches.get(m) is not None for _, m in todo):
                    on_compute(self._run_torch, todo)
                # else: nothing scheduled (a batch window's wait): no torch work to hand over
            j += 1

    def _run_each(self, todo, computing: bool = False) -> None:
        for w, m in todo:
            self._run_one(w, m, w.stream, computing)

    def _run_torch(self, todo) -> None:
        """A step's torch works, handed to the compute thread together: in one inference mode."""
        with torch.inference_mode():
            self._run_each(todo, True)

    def _run_threads(self, serial: bool = False) -> None:
        errors: list[BaseException] = []

        def one() -> None:
            try:
                self._same_threads()
                self._run_serial()
            except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                errors.append(e)

        if serial:           # --no-overlap: every stream's work in turn, on one worker thread (as above)
            t = threading.Thread(target=one, name="agp-serial", daemon=True)
            t.start()
            t.join()
            if errors:
                raise errors[0]
            return

        def loop(stream) -> None:
            works = self._order([self.plan.work_named(n) for n in stream.work])
            top = max(w.skew for w in works)
            j = 0
            try:
                self._same_threads()
                while self._signals.stop_at is None or j - top <= self._signals.stop_at:
                    for w in works:
                        m = j - w.skew
                        if m < 0:
                            continue
                        for e in self._waits[w.name]:    # the plan's edges, the schedule's on emit (run())
                            if m - e.lag >= 0:
                                self._signals.wait(e.src_work, m - e.lag)
                        if m >= AHEAD:               # back-pressure: bounded look-ahead
                            self._signals.wait(self._last_work, m - AHEAD)
                        if self._signals.failed:
                            return
                        self._run_one(w, m, stream.name)
                        self._signals.record(w.name, m)
                    j += 1
            except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                errors.append(e)
                self._signals.release(failed=True)
                with self.lock:              # a schedule waiting for work: the run is over
                    self._wake.notify_all()

        # every stream on a thread of its own; on CPU the compute stream's thread (and the copy
        # stream's, for h2d) hand their torch work to the compute thread and wait for it
        threads = [threading.Thread(target=loop, args=(s,), name=f"agp-{s.name}", daemon=True)
                   for s in self.plan.streams]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def _in_inference_mode(fn, m: int):
    with torch.inference_mode():
        return fn(m)


def cpu_overlap_pays(threads: int, cores: int | None = None) -> bool:
    """Whether overlapping the streams can pay on CPU: only with a core left beside the forward's
    `threads`. Without one, the host threads' Python takes a core from the forward, whose
    barriers then wait for the descheduled thread, and the compute thread waits for the GIL
    after each kernel: on 2 cores with a 2-thread forward the overlapped run was slower than
    the serial one (docs/engine_benchmarks.md). The cores are those the process may use: its
    affinity mask's, at most its cgroup CPU quota (cpus.available_cpus)."""
    return (available_cpus() if cores is None else cores) > threads


def drive(engine, handle: Callable, *, overlap: bool | None = None, trace_path: str | None = None,
          plan: Plan | None = None, submit=()) -> dict:
    """Step `engine` to completion through the plan's executor; `handle(outputs)` per step.
    `submit`: (id, Engine.add_request keyword arguments) pairs admitted through batch.admit."""
    trace = Trace()
    ex = Executor(engine, plan, overlap=overlap, trace=trace)
    for rid, kwargs in submit:
        ex.submit(rid, **kwargs)
    stats = ex.run(on_output=handle)
    if trace_path:
        trace.write(trace_path)
        stats["trace"] = trace_path
    return stats


def run_requests(engine, requests, *, plan: Plan | None = None, overlap: bool | None = None,
                 trace_path: str | None = None, on_output: Callable | None = None) -> dict:
    """Submit `requests` ((id, kwargs for Engine.add_request) pairs) and run them to the end;
    an input error of one request raises (the pipeline runtime reports it per request instead)."""
    return drive(engine, on_output or (lambda outputs: None), overlap=overlap,
                 trace_path=trace_path, plan=plan, submit=requests)
