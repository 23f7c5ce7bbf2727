"""Which sequences run in the next step, and with how many tokens.

The dynamic batcher of the seed and iteration-level continuous batching, over the
`BlockManager`:

- Window: while nothing runs, waiting requests are held until `max_batch_size` of them
  wait ("full") or `batch_timeout_s` has passed since the first one arrived
  ("timeout"); `next_deadline()` says when the window closes so a driver can sleep.
- `continuous`: every step, running sequences decode one token each, then those still
  prefilling take their next chunk, then waiting ones join while there is room —
  `max_batch_size` sequences, `max_tokens_per_step` tokens, free KV blocks (a few kept
  spare so running sequences can grow). A prompt is prefilled in chunks of at most
  `prefill_chunk` tokens, so one long prompt does not stall the decoders; while any
  sequence decodes, a step's prefill tokens together are also cut to what the engine measured
  it computes within `itl_target_s` (`observe()`: on a slow CPU a chunk of 256 tokens can take
  seconds, every one of them a gap in the decoders' streams). Waiting sequences hold no
  blocks; a prefix-cache hit is taken at admission.
- Long prefills leave room for short prompts (vLLM's long_prefill_token_threshold): a prompt
  with more than `long_prefill_threshold` tokens left to prefill is long (a waiting one's
  prefix-cache hit counted: a long prompt whose prefix is cached is short); while a request whose
  prompt is not long waits (and may join) or is prefilling, the long ones together take at most
  half of the step's prefill room (the budget left after the decodes, cut as above), and a long
  waiting request finding that share spent stays waiting while shorter ones behind it join. A
  short request sent while a long prompt prefills is admitted beside it at once instead of
  waiting for the whole long prompt; the long one still advances every step.
- `static`: a batch is admitted only when nothing runs and runs to completion.
- Out of blocks mid-generation: the most recently admitted sequence is preempted (its
  blocks freed, itself put back at the head of the queue to be recomputed), never a
  deadlock; it is admitted again once all its tokens fit (as vLLM's can_allocate asks), not
  on one chunk's room only to be preempted again.
- `scheduling_policy` (vLLM's): `fcfs` admits waiting sequences in order of arrival, as above;
  `priority` keeps them ordered by (`priority`, arrival), lower first, so a later request of a
  lower value is admitted before earlier ones of a higher; a preempted sequence goes back in
  that order, not at the head; running sequences take the step's budget in that order (decodes
  still first); and out of blocks the running sequence of the highest value (the latest
  arrival among those) is preempted, which may be the one that asked. As in vLLM's v1
  scheduler, a waiting request never preempts a running one: it waits for a free slot.

One step is `schedule() -> SchedulerOutput`, then the engine executes it, then
`update(output, sampled)` advances the sequences.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .config import EngineConfig, SamplingParams
from .kv_cache import BlockManager, root_key
from .speculate import MAX_BATCH as SPECULATE_MAX_BATCH, ngram_draft
from .state import DecodeState

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress (mutable; owned by the scheduler)."""
    request_id: str
    token_ids: list[int]                  # prompt, then generated tokens
    num_prompt: int
    params: SamplingParams
    arrival: float
    priority: int = 0                     # scheduling_policy = priority: lower is admitted first
    status: str = WAITING
    num_computed: int = 0                 # leading tokens whose K/V are in the cache
    cached_tokens: int = 0                # prompt tokens the prefix cache served (first admission)
    admitted: bool = False
    num_preemptions: int = 0              # times preempted for want of KV blocks
    num_pauses: int = 0                   # times parked by whoever reads its output (park)
    num_released: int = 0                 # times out of the batch, either way: its blocks freed
    scheduled: float | None = None        # when it was first admitted to run (queue time ends)
    finish_reason: str | None = None
    prompt_out: Any = None                # prompt_outputs.PromptOutputs: every prompt row's outputs wanted
    state: DecodeState = field(default_factory=DecodeState)  # the engine's per-request decode state

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    def samples_after(self, start: int, n: int) -> bool:
        """Whether a chunk [start, start + n) reaches the last known token, so that the next one is
        sampled after it (never for max_tokens = 0: the prompt's outputs alone)."""
        return start + n == len(self.token_ids) and self.params.max_tokens > 0


@dataclass(frozen=True)
class ScheduledItem:
    seq: Sequence
    start: int          # = seq.num_computed when scheduled
    num_tokens: int     # prefill chunk length, or 1 for a decode (1 + its drafts when it has any)
    sample: bool        # this chunk reaches the last known token: sample the next
    draft: tuple = ()   # speculative decoding: tokens drafted after the last one, verified by this step


@dataclass(frozen=True)
class SchedulerOutput:
    items: tuple[ScheduledItem, ...]
    num_decodes: int                      # items feeding one already-sampled token
    num_prefill_tokens: int
    pad_to: int | None                    # bucket for the decode batch (padding=True)
    preempted: tuple[str, ...] = ()
    num_draft_tokens: int = 0             # drafted tokens the decodes verify (speculate.py)

    @property
    def empty(self) -> bool:
        return not self.items

    @property
    def num_sample(self) -> int:
        return sum(1 for it in self.items if it.sample)


_CAP_UNKNOWN = object()                       # a step's prefill room, not worked out yet
# how many recent measured steps the time-sized rules read (their median): plain decode steps,
# prefill cost per token, and verifying steps' gains
TIMING_WINDOW = 8


def _median(values) -> float | None:
    v = sorted(tuple(values))                 # a snapshot: an executor's compute thread appends
    return v[len(v) // 2] if v else None


def bucket(n: int, cap: int) -> int:
    """Smallest power of two >= n, at most cap (and at least n)."""
    b = 1
    while b < n:
        b *= 2
    return max(n, min(b, cap))


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, clock=time.monotonic,
                 max_len: int | None = None, step_timer=time.perf_counter):
        self.config = config
        self.blocks = blocks
        self.clock = clock
        # what the engine times its forwards with (observe(), verified()): a test's fake one
        # makes the time-sized rules follow the times it gives, not a busy machine's
        self.step_timer = step_timer
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.max_len = max_len or (1 << 62)  # the model's context: a sequence this long is done
        self.num_preemptions = 0
        # admission keeps a few blocks spare so running sequences can grow without preemption
        self.watermark = max(1, blocks.num_blocks // 100)
        self._prompt_keys_of: dict[Sequence, list] = {}   # the prompt's block keys, per running sequence
        # sequences paused by whoever reads their output (park): neither waiting nor running, no blocks
        self.parked: dict[str, Sequence] = {}
        # recent forwards' seconds: steps without prefill, and per prefill token beyond those
        self._fixed_s: deque[float] = deque(maxlen=TIMING_WINDOW)
        self._per_token_s: deque[float] = deque(maxlen=TIMING_WINDOW)
        # this step's prefill tokens still allowed (None: no cut; _CAP_UNKNOWN: not worked out yet, _room_left)
        self._prefill_left: int | None | object = None
        # this step's tokens still allowed to long prefills (None: no cut; _CAP_UNKNOWN: not worked out yet)
        self._long_left: int | None | object = None
        # speculative decoding (speculate.py): on when the config asks and the engine's runner can
        # return every row's logits (the engine sets `verify`)
        self.verify = config.speculate == "ngram"
        # measured (CPU): per verifying step, its tokens per decoding sequence times a plain decode
        # step's time over its own time (> 1: it paid); while their median is below 1 drafting
        # pauses, tried again after `_spec_wait` steps (doubling while it keeps losing)
        self._spec_gain: deque[float] = deque(maxlen=TIMING_WINDOW)
        self._spec_wait, self._spec_skip = 0, 0

    # ---- queue -------------------------------------------------------------------------
    @property
    def by_priority(self) -> bool:
        return self.config.scheduling_policy == "priority"

    @staticmethod
    def _rank(seq: Sequence) -> tuple:
        """A sequence's place under scheduling_policy = priority: lower value, then earlier arrival."""
        return seq.priority, seq.arrival

    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        if self.by_priority:                  # after those of its rank: ties keep their order
            self.waiting.insert(bisect.bisect_right(self.waiting, self._rank(seq), key=self._rank), seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def park(self, seq: Sequence) -> None:
        """Take a sequence out of the batch until unpark(): a running one is preempted (its blocks
        freed, recomputed when it comes back, its full blocks meanwhile in the prefix cache), a
        waiting one leaves the queue. Counted as a pause, not as a preemption for want of blocks."""
        if seq.request_id in self.parked or seq.status == FINISHED:
            return
        seq.num_pauses += 1
        if seq.status == RUNNING:
            self._release(seq)
            self._prompt_keys_of.pop(seq, None)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = WAITING
        self.parked[seq.request_id] = seq

    def unpark(self, seq: Sequence) -> None:
        """A parked sequence back in the waiting queue (at its head, as a preempted one: by
        priority, in its rank)."""
        if self.parked.pop(seq.request_id, None) is not None:
            self._requeue(seq)

    def remove(self, seq: Sequence, reason: str) -> None:
        """Finish or abort a sequence: leave the queues, release its blocks."""
        if self.parked.pop(seq.request_id, None) is not None:
            pass
        elif seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status, seq.finish_reason = FINISHED, reason
        self._prompt_keys_of.pop(seq, None)
        self.blocks.free_seq(seq.request_id)

    def done_pending(self, seq: Sequence) -> bool:
        """Whether a running sequence already holds its last token: it finishes for certain once
        that token is known (an executor that schedules ahead keeps it in flight meanwhile)."""
        if seq.params.max_tokens == 0:        # prompt outputs only: done once the prompt is computed
            return seq.num_computed >= seq.num_prompt
        n = len(seq.token_ids)
        return n - seq.num_prompt >= seq.params.max_tokens or n >= self.max_len

    def window_open(self, now: float | None = None) -> bool:
        """May waiting requests be admitted now?"""
        if not self.waiting:
            return False
        if self.running:
            return self.config.policy == "continuous"
        if len(self.waiting) >= self.config.max_batch_size:
            return True  # "full"
        now = self.clock() if now is None else now
        return now - self._first_arrival() >= self.config.batch_timeout_s  # "timeout"

    def next_deadline(self) -> float | None:
        """Clock time at which the batch window closes; None if a step can run now (or never)."""
        if self.running or not self.waiting or len(self.waiting) >= self.config.max_batch_size:
            return None
        return self._first_arrival() + self.config.batch_timeout_s

    def _first_arrival(self) -> float:
        """When the window opened: the first waiting request's arrival (in priority order the
        queue's head may have come later)."""
        if self.by_priority:
            return min(s.arrival for s in self.waiting)
        return self.waiting[0].arrival

    # ---- prefill sized by time ------------------------------------------------------------
    def observe(self, prefill_tokens: int, seconds: float) -> None:
        """A step's forward took `seconds` with `prefill_tokens` prompt rows in it (the engine
        measures its forwards on CPU). A step's time is taken as a fixed part (the median of
        recent steps without prefill) plus a cost per prefill token."""
        if prefill_tokens <= 0:
            self._fixed_s.append(seconds)
        elif prefill_tokens >= self.blocks.block_size:     # a few rows alone say little per token
            fixed = _median(self._fixed_s) or 0.0
            self._per_token_s.append(max(seconds - fixed, 0.0) / prefill_tokens)

    def prefill_cap(self) -> int | None:
        """How many prefill tokens a step may hold while sequences decode: what fits in
        itl_target_s beside the step's fixed part, by recent measurements (their median, or the
        latest when higher), and at least a block. Steps measured but no prefill yet: four
        blocks, until the first piece is
        measured (a whole chunk beside the decoders would be the stall this prevents). None (no
        cut) when the target is 0 or nothing was measured (a device whose steps are not timed)."""
        target = self.config.itl_target_s
        if target <= 0 or not (self._per_token_s or self._fixed_s):
            return None
        if not self._per_token_s:
            return 4 * self.blocks.block_size
        # the median, or the latest when higher: a long prompt's later pieces attend to more
        # context and cost more per token, and the median of the last eight lags behind them
        per_token = max(_median(self._per_token_s), self._per_token_s[-1])
        room = target - (_median(self._fixed_s) or 0.0)
        if per_token <= 0:
            return None
        return max(self.blocks.block_size, int(room / per_token))

    def _prefill_room(self, n: int) -> int:
        """A prefill piece of n tokens cut to this step's room left (decodes are never cut)."""
        if n <= 1 or self._room_left() is None:
            return n
        n = min(n, self._prefill_left)
        self._prefill_left -= n
        return n

    def _room_left(self) -> int | None:
        """This step's prefill tokens still allowed (None: no cut). The cap is worked out (the
        medians of recent steps) the first time a step asks: a step of decodes alone never does."""
        if self._prefill_left is _CAP_UNKNOWN:
            self._prefill_left = self.prefill_cap()
        return self._prefill_left

    def _long_room(self, left: int, n: int, budget: int) -> int:
        """A prefill piece of n tokens of a prompt with `left` tokens still to compute, cut to the
        long prompts' share of this step when it is long and a short prompt waits or prefills."""
        threshold = self.config.long_prefill_threshold
        if n <= 1 or threshold <= 0 or left <= threshold:
            return n
        if self._long_left is _CAP_UNKNOWN:   # worked out when the step's first long piece asks
            self._long_left = None
            if self._short_pending():
                room = self._room_left()
                room = budget if room is None else min(budget, room)
                self._long_left = max(1, room // 2)      # the long prompts always advance
        if self._long_left is None:
            return n
        n = min(n, self._long_left)
        self._long_left -= n
        return n

    def _short_pending(self) -> bool:
        """Whether a request whose prompt is not long is prefilling, or waits with a free slot to
        join (continuous batching: a static batch runs as it was admitted)."""
        cfg = self.config
        if cfg.policy != "continuous":
            return False
        threshold = cfg.long_prefill_threshold
        if any(1 < len(s.token_ids) - s.num_computed <= threshold for s in self.running):
            return True
        return (len(self.running) < cfg.max_batch_size and self.window_open()
                and any(self._short_waiting(s) for s in self.waiting))

    def _short_waiting(self, seq: Sequence) -> bool:
        """Whether a waiting sequence's prompt is not long: at most long_prefill_threshold tokens
        left to prefill once its admission takes the prefix cache's hit (a long prompt whose
        prefix is cached has few). Its keys are worked out once; only as many of its first blocks
        as would make it short are looked for, and an uncached prompt stops at the first."""
        threshold = self.config.long_prefill_threshold
        left = len(seq.token_ids)
        if left <= threshold:
            return True
        if seq.prompt_out is not None or not self.blocks.prefix_reuse:
            return False                          # every prompt row computed, or no cache to read
        need = -(-(left - threshold) // self.blocks.block_size)   # blocks the cache must serve
        keys = self._prompt_keys(seq)
        return len(keys) >= need and self.blocks.holds(keys[:need])

    # ---- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget = cfg.max_tokens_per_step
        preempted: list[str] = []
        decoding = any(len(s.token_ids) - s.num_computed == 1 for s in self.running)
        self._prefill_left = _CAP_UNKNOWN if decoding else None   # worked out when a prefill piece asks
        speculating = self.verify and self._speculating()
        self._long_left = _CAP_UNKNOWN

        # decodes first (one token each), then prefill chunks: a long prompt never delays them
        scheduled: dict[Sequence, ScheduledItem] = {}
        if self.by_priority:                  # then the budget goes to the lower values first
            order = sorted(self.running, key=lambda s: (len(s.token_ids) - s.num_computed > 1, *self._rank(s)))
        else:
            order = sorted(self.running, key=lambda s: len(s.token_ids) - s.num_computed > 1)
        for seq in order:
            if budget <= 0:
                break
            if seq.status != RUNNING or self.done_pending(seq) or seq.state.verifying:
                continue  # preempted earlier in this loop, or its last token is in flight
            left = len(seq.token_ids) - seq.num_computed
            draft = ()
            if left == 1 and speculating and self._may_draft(seq):
                if seq.state.pending:
                    continue          # its last token is in flight: wait for it, and draft from it next step
                draft = self._draft(seq, budget)
            n = self._prefill_room(self._long_room(left, min(left, budget, cfg.prefill_chunk), budget))
            if n <= 0:
                continue                          # this step's prefill room is spent
            if draft:                             # the drafts' blocks when free ones hold them; else no drafts
                if self.blocks.allocate(seq.request_id, seq.num_computed + 1 + len(draft)):
                    n = 1 + len(draft)
                else:
                    draft = ()
            while not self.blocks.allocate(seq.request_id, seq.num_computed + n):
                victim = self._victim()
                self._preempt(victim)
                preempted.append(victim.request_id)
                dropped = scheduled.pop(victim, None)
                if dropped is not None:
                    budget += dropped.num_tokens
                if victim is seq:
                    break
            if seq.status != RUNNING:
                continue
            if draft:
                scheduled[seq] = ScheduledItem(seq, seq.num_computed, n, True, draft)
            else:
                scheduled[seq] = ScheduledItem(seq, seq.num_computed, n, seq.samples_after(seq.num_computed, n))
            budget -= n
        items = list(scheduled.values())
        drafts = sum([len(it.draft) for it in items])
        decodes = len([it for it in items if it.num_tokens - len(it.draft) == 1 and it.sample])   # lists: no call an item

        # a step that preempted admits nobody (vLLM's v1 scheduler): the blocks it freed are the
        # running sequences', and a request admitted on them would only cause the next preemption
        if not preempted and self.window_open():
            budget = self._admit(items, budget)

        prefill_tokens = sum([it.num_tokens for it in items]) - decodes - drafts
        pad_to = None
        if cfg.padding and items and decodes == len(items) and not drafts:
            pad_to = bucket(decodes, cfg.max_batch_size)
        return SchedulerOutput(tuple(items), decodes, prefill_tokens, pad_to, tuple(preempted), drafts)

    # ---- speculative decoding (speculate.py) ------------------------------------------------
    def verified(self, decodes: int, tokens: int, seconds: float | None) -> None:
        """A verifying step gave `tokens` to its `decodes` decoding sequences in `seconds` (its
        forward's, as the engine timed it on CPU; None: not timed): its gain against plain decode
        steps (their recent median time, one token each)."""
        plain = _median(self._fixed_s)
        if seconds is None or plain is None or decodes <= 0 or seconds <= 0:
            return
        gain = tokens / decodes * plain / seconds
        self._spec_gain.append(gain)
        # the recent steps' median (the first step alone, or after a pause the one trial step)
        if _median(self._spec_gain) < 1.0:
            # losing: pause, longer each time, and long enough that a trial costs at most an eighth
            # of the plain steps between two (a step of gain g costs about 1 / g plain ones)
            self._spec_wait = min(max(2 * self._spec_wait, 16, math.ceil(8 / max(gain, 1e-3))), 1024)
            self._spec_skip = self._spec_wait
            self._spec_gain.clear()
        elif gain >= 1.0 and self._spec_wait and len(self._spec_gain) == 1:
            self._spec_wait = 0                                          # the trial paid: go on

    def _speculating(self) -> bool:
        """Whether this step drafts: while at most speculate.MAX_BATCH running sequences decode
        (beyond that a step is bound by its arithmetic, and drafts cost what they save), and
        unless measured verifying steps gave fewer tokens a second than plain ones (a CPU whose
        GEMM of a few rows costs several times one row's, drafts that are seldom accepted): then
        it pauses for a number of steps, and tries again (verified())."""
        if sum(1 for s in self.running if len(s.token_ids) - s.num_computed <= 1) > SPECULATE_MAX_BATCH:
            return False
        if self._spec_skip > 0:
            self._spec_skip -= 1
            return False
        return True

    @staticmethod
    def _may_draft(seq: Sequence) -> bool:
        """Whether a decoding sequence may be verified several tokens at once: not under a grammar
        (its matcher is advanced one token at a time, where a mask of the tokens so far is exact)."""
        return seq.params.constraint is None

    def _draft(self, seq: Sequence, budget: int) -> tuple[int, ...]:
        """The sequence's drafts for this step, as many as its max_tokens, the context and the step's
        token budget leave room for beyond the one token it makes anyway."""
        cfg = self.config
        ids = seq.token_ids
        k = min(cfg.speculative_tokens, seq.params.max_tokens - seq.num_output - 1,
                self.max_len - len(ids), budget - 1)
        if k <= 0:
            return ()
        return tuple(ngram_draft(ids, cfg.prompt_lookup_min, cfg.prompt_lookup_max, k))

    def _admit(self, items: list[ScheduledItem], budget: int) -> int:
        """Move waiting sequences to running (in queue order: FIFO, or by priority) while there is
        room; returns the budget left.

        static: the whole batch is admitted at once (its prefill spreads over the next steps'
        budgets); continuous: admission stops when this step's budget is spent. Waiting
        sequences hold no blocks: the prefix cache is looked up here. In continuous mode a
        request whose next prompt block is being computed right now by a prefilling sequence
        (the same system prompt, say) waits a step and then shares it instead of computing it
        again.
        """
        cfg, bm = self.config, self.blocks
        static = cfg.policy == "static"
        in_flight = set()
        if cfg.prefix_reuse and not static:
            for seq in self.running:
                if self._prefilling(seq):
                    in_flight.update(self._prompt_keys(seq))
        for seq in list(self.waiting):
            if not (budget > 0 or static) or len(self.running) >= cfg.max_batch_size:
                break
            if not static and (left := self._room_left()) is not None and left <= 0:
                break                             # the prefill room of this step is spent
            if seq.state.verifying:
                continue          # preempted while a step verifies its drafts: back once that step is done
            fresh = seq.prompt_out is not None   # every prompt row computed: no prefix cache read
            salt, adapter = seq.params.prefix_key
            hit = [] if fresh else bm.lookup(seq.token_ids, salt, adapter)
            if in_flight and not fresh:
                keys = self._prompt_keys(seq)
                if len(hit) < len(keys) and keys[len(hit)] in in_flight:
                    continue  # share it next step
            cached = len(hit) * bm.block_size
            n = min(len(seq.token_ids) - cached, budget, cfg.prefill_chunk)
            if not static:
                wanted = n
                n = self._long_room(len(seq.token_ids) - cached, n, budget)
                if n <= 0 < wanted:
                    continue                      # long, and the long prompts' share is spent: shorter ones join
                n = self._prefill_room(n)
            spare = self.watermark if self.running else 0
            # preempted for want of blocks, a sequence comes back once all it holds fits again:
            # back on one chunk's room it would be preempted again and again, recomputing each
            # time what the cache no longer holds (all of it, for a prompt whose rows are wanted)
            need = len(seq.token_ids) if seq.num_released else cached + n
            if bm.admission_cost(hit, need) + spare > bm.num_free:
                break  # wait for running sequences to finish and free blocks
            seq.num_computed = 0 if fresh else bm.match_prefix(seq.request_id, seq.token_ids,
                                                               count=not seq.admitted, salt=salt, adapter=adapter)
            if not seq.admitted:
                seq.cached_tokens, seq.admitted = seq.num_computed, True
                seq.scheduled = self.clock()
            if not bm.allocate(seq.request_id, seq.num_computed + n, salt, adapter):
                raise AssertionError("admission check and allocation disagree")
            self.waiting.remove(seq)
            seq.status = RUNNING
            self.running.append(seq)
            if n > 0:
                items.append(ScheduledItem(seq, seq.num_computed, n, seq.samples_after(seq.num_computed, n)))
                budget -= n
            if cfg.prefix_reuse and not static and self._prefilling(seq):
                in_flight.update(self._prompt_keys(seq))
        return budget

    def _prefilling(self, seq: Sequence) -> bool:
        """Whether some of the sequence's shareable prompt blocks are not computed yet. Read from
        the blocks committed, not num_computed: an executor that schedules ahead advances that as
        soon as a chunk is scheduled, while the chunk's blocks are still being computed."""
        return self.blocks.num_computed_blocks(seq.request_id) < (seq.num_prompt - 1) // self.blocks.block_size

    def _prompt_keys(self, seq: Sequence) -> list:
        """Keys of the prompt's full blocks before its last token (computed once per sequence)."""
        keys = self._prompt_keys_of.get(seq)
        if keys is None:
            usable = (seq.num_prompt - 1) // self.blocks.block_size * self.blocks.block_size
            keys = self._prompt_keys_of[seq] = self.blocks.block_keys(seq.token_ids[:usable],
                                                                      root_key(*seq.params.prefix_key))
        return keys

    def _victim(self) -> Sequence:
        """The running sequence to preempt for want of blocks: the most recently admitted, or
        under scheduling_policy = priority the one of the highest value, the latest arrival
        among those (vLLM's choice); of equals, the most recently admitted."""
        if self.by_priority:
            return max(reversed(self.running), key=self._rank)
        return self.running[-1]

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        self.num_preemptions += 1
        seq.num_preemptions += 1
        self._requeue(seq)

    def _release(self, seq: Sequence) -> None:
        """A running sequence out of the batch, its blocks freed, to be recomputed when it comes
        back (a step in flight for it sees by num_released that its work is stale)."""
        self.running.remove(seq)
        self.blocks.free_seq(seq.request_id)
        seq.num_computed = 0                  # its prompt outputs stay (prompt_outputs.py)
        seq.status = WAITING
        seq.num_released += 1

    def _requeue(self, seq: Sequence) -> None:
        """A sequence taken out of the batch back in the waiting queue, at its head (by priority:
        in its rank; vLLM: a priority queue has no head)."""
        if self.by_priority:
            self.add(seq)
        else:
            self.waiting.appendleft(seq)

    def update(self, output: SchedulerOutput, sampled: list) -> list[tuple[Sequence, Any]]:
        """Advance the scheduled sequences; returns (seq, new token or None) per item still running.
        An item with drafts samples a list of tokens (the drafts it accepted, then the model's own):
        their K/V is kept (accept_drafts), and it returns the list, which the engine appends
        (Engine.accept_tokens)."""
        it = iter(sampled)
        touched = []
        for item in output.items:
            seq = item.seq
            token = next(it) if item.sample else None
            if seq.status != RUNNING:
                continue  # aborted while the step ran
            if item.draft:
                self.accept_drafts(seq, item, token)
                touched.append((seq, token))
                continue
            seq.num_computed = item.start + item.num_tokens
            if token is not None:
                seq.token_ids.append(token)
            self.blocks.commit(seq.request_id, seq.token_ids, seq.num_computed)
            touched.append((seq, token))
        return touched

    def accept_drafts(self, seq: Sequence, item: ScheduledItem, tokens: list[int]) -> None:
        """A verifying step's tokens' K/V and blocks: the K/V of its last token and of the
        accepted drafts are kept (len(tokens) - 1 of them), those of the rejected ones dropped,
        with the blocks only they held; the prefix cache publishes accepted tokens only. The
        tokens themselves go onto the sequence's ids in the engine (Engine.accept_tokens), one by
        one up to the first that finishes it."""
        seq.num_computed = item.start + len(tokens)
        ids = seq.token_ids + list(tokens)
        self.blocks.trim(seq.request_id, len(ids))
        self.blocks.commit(seq.request_id, ids, seq.num_computed)
