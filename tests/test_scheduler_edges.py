"""Scheduler bounds at their edges, built as real scenarios through the public contract
(add / schedule / update / remove, the SchedulerOutput items, sequence fields, counters):
max_tokens and the model's max_len, the step's token budget and the prefill chunk used to
the last token, max_batch_size, the watermark of spare blocks, preemption and recompute,
prefix reuse at admission (a request waits for a block another sequence is computing),
the decode-first order, the batch window with an explicit `now`, abort during a step."""

import pytest

from pipeline_dsl.engine import EngineConfig, SamplingParams
from pipeline_dsl.engine.kv_cache import BlockManager
from pipeline_dsl.engine.scheduler import Scheduler, Sequence


class Clock:
    """A fake clock that counts how often it is read."""

    def __init__(self, t=100.0):
        self.t = t
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.t


def make(num_blocks=64, block_size=4, max_len=None, **cfg):
    clock = Clock()
    config = EngineConfig(**{"batch_timeout_s": 0.0, "max_batch_size": 4, **cfg})
    blocks = BlockManager(num_blocks, block_size, config.prefix_reuse)  # as the engine builds it
    return Scheduler(config, blocks, clock, max_len=max_len), clock


def add(sched, clock, rid, prompt, max_tokens=4):
    """prompt: a token list, or a length (distinct tokens per request id)."""
    if isinstance(prompt, int):
        base = 10_000 * (1 + sum(map(ord, rid)))
        prompt = list(range(base, base + prompt))
    seq = Sequence(rid, list(prompt), len(prompt), SamplingParams(max_tokens=max_tokens), clock.t)
    sched.add(seq)
    return seq


def model(out):
    """A fake model whose next token depends only on the position it is sampled at, so a
    sequence recomputed after preemption must still produce the same tokens."""
    return [500 + len(it.seq.token_ids) for it in out.items if it.sample]


def step(sched, clock, finish=True):
    """schedule + the fake model + update; the driver (the engine's part) then finishes the
    sequences that reached max_tokens or the model's length; the clock ticks one second."""
    out = sched.schedule()
    sched.update(out, model(out))
    if finish:
        for seq in list(sched.running):
            if seq.num_output >= seq.params.max_tokens or len(seq.token_ids) >= sched.max_len:
                sched.remove(seq, "length")
    clock.t += 1.0
    return out


def items(out):
    return [(it.seq.request_id, it.start, it.num_tokens, it.sample) for it in out.items]


def expected_output(prompt_len, n):
    return [500 + prompt_len + i for i in range(n)]


# ---- max_tokens and max_len ----------------------------------------------------------------

def test_sequence_is_scheduled_until_exactly_max_tokens_and_not_one_step_later():
    sched, clock = make()
    a = add(sched, clock, "a", 5, max_tokens=3)
    seen = []
    for _ in range(10):               # nobody removes it: the scheduler alone must stop
        out = step(sched, clock, finish=False)
        if out.empty:
            break
        seen.append(items(out))
    assert seen == [[("a", 0, 5, True)], [("a", 5, 1, True)], [("a", 6, 1, True)]]
    assert a.num_output == 3 and a.output_ids == expected_output(5, 3)
    assert a.status == "running"      # it is the driver that finishes it


def test_sequence_is_scheduled_until_exactly_the_models_max_len():
    sched, clock = make(max_len=8)
    a = add(sched, clock, "a", 5, max_tokens=100)
    steps = 0
    for _ in range(10):
        if step(sched, clock, finish=False).empty:
            break
        steps += 1
    assert steps == 3 and len(a.token_ids) == 8 and a.output_ids == expected_output(5, 3)


def test_sequence_one_token_short_of_max_len_is_still_scheduled():
    sched, clock = make(max_len=7)
    a = add(sched, clock, "a", 6, max_tokens=100)
    assert items(step(sched, clock, finish=False)) == [("a", 0, 6, True)]   # 6 -> 7 tokens: done
    assert step(sched, clock, finish=False).empty and len(a.token_ids) == 7


def test_sequence_whose_last_token_is_in_flight_is_skipped_not_the_ones_after_it():
    sched, clock = make()
    a = add(sched, clock, "a", 2, max_tokens=1)
    b = add(sched, clock, "b", 2, max_tokens=3)
    step(sched, clock, finish=False)            # both prefilled; a holds its last token
    assert a.num_output == 1 and sched.running == [a, b]
    out = step(sched, clock, finish=False)
    assert items(out) == [("b", 2, 1, True)]    # a is skipped, b behind it still decodes
    assert out.num_decodes == 1


# ---- token budget, prefill chunk, batch size -------------------------------------------------

def test_token_budget_is_used_to_the_last_token_and_not_beyond():
    # two tokens a step: the long prompt takes them all, then its last token and the other
    # request's first token share a step, then a decode and a one-token prefill chunk do
    sched, clock = make(max_batch_size=2, max_tokens_per_step=2, prefill_chunk=8)
    p = add(sched, clock, "p", 5, max_tokens=3)
    d = add(sched, clock, "d", 3, max_tokens=3)
    outs = [step(sched, clock) for _ in range(5)]
    assert [items(o) for o in outs] == [
        [("p", 0, 2, False)],
        [("p", 2, 2, False)],                       # budget 2 caps the chunk (prefill_chunk is 8)
        [("p", 4, 1, True), ("d", 0, 1, False)],    # d admitted on the step's last token
        [("p", 5, 1, True), ("d", 1, 1, False)],    # d's chunk gets the last token of the budget
        [("p", 6, 1, True), ("d", 2, 1, True)],
    ]
    assert all(sum(it.num_tokens for it in o.items) <= 2 for o in outs)
    # a one-token chunk that does not reach the end of the prompt is prefill, not a decode
    assert (outs[3].num_decodes, outs[3].num_prefill_tokens) == (1, 1)
    assert p.output_ids == expected_output(5, 3) and d.num_output == 1


def test_a_token_budget_below_max_batch_size_still_decodes_every_running_sequence_each_step():
    sched, clock = make(max_batch_size=4, max_tokens_per_step=2)
    assert sched.config.max_tokens_per_step == 4           # raised to one decode per sequence
    for rid in "abcd":
        add(sched, clock, rid, 1, max_tokens=3)
    decodes = []
    while sched.running or sched.waiting:
        decodes.append(step(sched, clock).num_decodes)
    assert decodes == [0, 4, 4]                             # 1-token prompts in one step, then all decode


def test_prefill_chunk_caps_a_prompt_to_exactly_its_size_per_step():
    sched, clock = make(prefill_chunk=3, max_tokens_per_step=64)
    add(sched, clock, "a", 7, max_tokens=1)
    assert [items(step(sched, clock)) for _ in range(3)] == [
        [("a", 0, 3, False)], [("a", 3, 3, False)], [("a", 6, 1, True)]]


def test_static_batch_beyond_the_budget_gets_no_empty_items_and_counts_only_real_decodes():
    sched, clock = make(policy="static", max_batch_size=4, max_tokens_per_step=8)
    for rid in "abcd":
        add(sched, clock, rid, 5, max_tokens=3)
    first = step(sched, clock)
    assert len(sched.running) == 4                       # the whole batch is admitted...
    assert items(first) == [("a", 0, 5, True), ("b", 0, 3, False)]   # ...but c, d get no item yet
    assert (first.num_decodes, first.num_prefill_tokens) == (0, 8)
    second = step(sched, clock)
    # a decodes; b's last chunk (2 tokens, it samples) is prefill, not a decode; c takes the
    # budget's last 5 tokens; d, with nothing left, is not listed at all
    assert items(second) == [("a", 5, 1, True), ("b", 3, 2, True), ("c", 0, 5, True)]
    assert (second.num_decodes, second.num_prefill_tokens, second.pad_to) == (1, 7, None)
    third = step(sched, clock)
    assert items(third) == [("a", 6, 1, True), ("b", 5, 1, True), ("c", 5, 1, True), ("d", 0, 5, True)]
    assert (third.num_decodes, third.num_prefill_tokens) == (3, 5)
    fourth = step(sched, clock)                          # a finished: three pure decodes
    assert [i[0] for i in items(fourth)] == ["b", "c", "d"]
    assert (fourth.num_decodes, fourth.num_prefill_tokens, fourth.pad_to) == (3, 0, 4)


def test_decode_is_served_before_a_prefill_with_exactly_two_tokens_left():
    sched, clock = make(max_batch_size=2, max_tokens_per_step=3, prefill_chunk=2)
    add(sched, clock, "p", 6, max_tokens=2)
    add(sched, clock, "d", 1, max_tokens=10)
    outs = [items(step(sched, clock)) for _ in range(3)]
    assert outs == [
        [("p", 0, 2, False), ("d", 0, 1, True)],
        [("d", 1, 1, True), ("p", 2, 2, False)],
        [("d", 2, 1, True), ("p", 4, 2, True)],   # p has 2 tokens left: still a prefill, after d
    ]


def test_batch_of_exactly_max_batch_size_dispatches_and_the_next_request_waits_for_a_slot():
    sched, clock = make(max_batch_size=3, batch_timeout_s=10.0)
    a = add(sched, clock, "a", 3, max_tokens=2)
    add(sched, clock, "b", 3, max_tokens=5)
    assert step(sched, clock).empty                   # 2 of 3: the window is still open
    add(sched, clock, "c", 3, max_tokens=5)
    assert [i[0] for i in items(step(sched, clock))] == ["a", "b", "c"]   # exactly full
    d = add(sched, clock, "d", 3, max_tokens=5)
    out = step(sched, clock)                          # 3 running: d waits; a finishes here
    assert "d" not in [i[0] for i in items(out)] and a.status == "finished"
    assert d in sched.waiting
    out = step(sched, clock)                          # a's slot: d joins
    assert items(out)[-1] == ("d", 0, 3, True) and len(sched.running) == 3


# ---- the batch window ----------------------------------------------------------------------

def test_window_open_judges_the_timeout_at_the_given_now_without_reading_the_clock():
    sched, clock = make(batch_timeout_s=0.010)
    add(sched, clock, "a", 3)                         # arrives at 100.0
    clock.calls = 0
    clock.t = 100.0                                   # the clock says: not yet
    assert sched.window_open(now=100.010) is True
    clock.t = 200.0                                   # the clock says: long past
    assert sched.window_open(now=100.009) is False
    assert clock.calls == 0
    assert sched.window_open() is True                # no `now`: the clock decides
    assert clock.calls == 1


def test_window_is_closed_when_nothing_waits():
    sched, clock = make()
    assert sched.window_open() is False and sched.window_open(now=1e9) is False
    add(sched, clock, "a", 3, max_tokens=5)
    step(sched, clock)
    assert sched.running and not sched.waiting
    assert sched.window_open() is False and sched.window_open(now=1e9) is False


# ---- spare blocks (watermark) ----------------------------------------------------------------

@pytest.mark.parametrize("num_blocks, watermark", [(250, 2), (300, 3)])   # max(1, num_blocks // 100)
@pytest.mark.parametrize("extra", [0, 1])
def test_admission_beside_running_sequences_keeps_the_watermark_of_free_blocks(num_blocks, watermark, extra):
    # one-token blocks: a 10-token prompt runs (11 blocks after its decode step); a new prompt
    # that would leave exactly `watermark` blocks free joins, one block more waits
    sched, clock = make(num_blocks=num_blocks, block_size=1, prefill_chunk=1024, max_tokens_per_step=1024)
    a = add(sched, clock, "a", 10, max_tokens=50)
    step(sched, clock)
    n = num_blocks - 11 - watermark + extra
    b = add(sched, clock, "b", n, max_tokens=5)
    out = step(sched, clock)
    if extra == 0:
        assert items(out) == [("a", 10, 1, True), ("b", 0, n, True)]
        assert sched.blocks.num_free == watermark and b.status == "running"
    else:
        assert items(out) == [("a", 10, 1, True)]
        assert b.status == "waiting" and sched.blocks.num_free == num_blocks - 11
    assert a.status == "running"


def test_sequence_needing_every_block_is_admitted_when_nothing_runs_and_finishes():
    # 8 blocks of 4: a 31-token prompt and its 2 tokens fill the pool to the last slot;
    # with nothing running no block is kept spare
    sched, clock = make(num_blocks=8, block_size=4)
    a = add(sched, clock, "a", 31, max_tokens=2)
    out = step(sched, clock)
    assert items(out) == [("a", 0, 31, True)] and sched.blocks.num_free == 0
    assert items(step(sched, clock)) == [("a", 31, 1, True)]
    assert a.status == "finished" and a.output_ids == expected_output(31, 2)
    assert sched.blocks.num_used == 0 and sched.num_preemptions == 0


# ---- preemption ------------------------------------------------------------------------------

def test_preempted_sequences_restart_from_zero_are_counted_once_each_and_finish_with_their_tokens():
    # 6 blocks of 2 tokens for three growing sequences: c (admitted last) is preempted twice,
    # b once; every preemption is counted exactly once, and all finish with the right tokens
    sched, clock = make(num_blocks=6, block_size=2, max_batch_size=3, max_tokens_per_step=5, prefill_chunk=2)
    a = add(sched, clock, "a", 6, max_tokens=2)
    b = add(sched, clock, "b", 6, max_tokens=5)
    c = add(sched, clock, "c", 2, max_tokens=6)
    step(sched, clock)
    step(sched, clock)
    assert (c.num_computed, c.num_output) == (2, 1)

    out = step(sched, clock)   # a needs a block: c (admitted last, already scheduled) is preempted
    assert out.preempted == ("c",)
    assert c.status == "waiting" and sched.waiting[0] is c and c not in sched.running
    assert c.num_computed == 0 and c.num_output == 1             # recomputed from scratch, tokens kept
    assert (c.num_preemptions, sched.num_preemptions) == (1, 1)
    # c's decode was dropped and its token went back to the budget: b still gets its full chunk
    assert items(out) == [("a", 4, 2, True), ("b", 4, 2, True)]

    out = step(sched, clock)   # b is preempted in turn
    assert out.preempted == ("b",) and b.status == "waiting" and b.num_computed == 0
    assert (b.num_preemptions, c.num_preemptions, sched.num_preemptions) == (1, 1, 2)
    assert list(sched.waiting) == [b, c]

    preempted = ["c", "b"]
    for _ in range(30):
        if not sched.has_unfinished():
            break
        out = step(sched, clock)
        preempted += out.preempted
        sched.blocks.check_invariants()
    assert not sched.has_unfinished()
    assert preempted == ["c", "b", "c"]
    assert (a.num_preemptions, b.num_preemptions, c.num_preemptions) == (0, 1, 2)
    assert sched.num_preemptions == 3
    assert a.output_ids == expected_output(6, 2)
    assert b.output_ids == expected_output(6, 5)
    assert c.output_ids == expected_output(2, 6)
    assert sched.blocks.num_used == 0


def test_a_preempted_sequence_comes_back_once_all_its_tokens_fit_not_on_one_chunks_room():
    # 8 blocks of 2 tokens; a decodes 12 tokens while b prefills 12, 2 a step: b runs out of
    # blocks at its 5th chunk and is preempted; it waits while a grows (a block or more free,
    # but not the 6 its 12 tokens need) and is admitted again when a finishes: one preemption,
    # not three (back on one chunk's room it was preempted twice more, recomputing each time)
    sched, clock = make(num_blocks=8, block_size=2, prefill_chunk=2, max_tokens_per_step=64, prefix_reuse=False)
    a = add(sched, clock, "a", 2, max_tokens=12)
    b = add(sched, clock, "b", 12, max_tokens=2)
    for _ in range(5):
        step(sched, clock)
    assert step(sched, clock).preempted == ("b",)
    for _ in range(6):
        assert items(step(sched, clock))[0][0] == "a" and b.status == "waiting"
    assert sched.blocks.num_free == 8 and a.status == "finished"
    while sched.has_unfinished():
        step(sched, clock)
    assert sched.num_preemptions == 1 and b.num_preemptions == 1
    assert a.output_ids == expected_output(2, 12) and b.output_ids == expected_output(12, 2)


def test_a_step_that_preempts_admits_no_waiting_request():
    # priority scheduling, 4 blocks of 4: a (priority 0) and b (5) hold 1 + 2 blocks; z
    # (priority 0, one block) arrives. Next step a takes the last free block and b, needing
    # one, preempts itself: its 2 blocks are free, enough for z and the watermark, but as in
    # vLLM's v1 scheduler nothing is admitted in a step that preempted (the blocks were
    # freed for the running sequences); z is admitted the step after
    sched, clock = make(num_blocks=4, block_size=4, scheduling_policy="priority", prefix_reuse=False)
    seqs = {}
    for rid, n, priority in (("a", 4, 0), ("b", 8, 5)):
        seqs[rid] = Sequence(rid, list(range(100 * n, 101 * n)), n, SamplingParams(max_tokens=8), clock.t, priority)
        sched.add(seqs[rid])
    assert [it[0] for it in items(step(sched, clock))] == ["a", "b"] and sched.blocks.num_free == 1
    z = Sequence("z", [7, 8, 9], 3, SamplingParams(max_tokens=2), clock.t, 0)
    sched.add(z)
    out = step(sched, clock)
    assert out.preempted == ("b",) and sched.blocks.num_free == 2
    assert items(out) == [("a", 4, 1, True)] and z.status == "waiting"
    out = step(sched, clock)
    assert ("z", 0, 3, True) in items(out) and not out.preempted
    while sched.has_unfinished():
        step(sched, clock)
    assert seqs["a"].output_ids == expected_output(4, 8) and z.output_ids == expected_output(3, 2)


def test_readmission_after_preemption_keeps_first_admission_facts():
    # b is re-admitted on its own cached blocks; its cached_tokens, admission time and the
    # cache's query statistics still describe its first admission only
    sched, clock = make(num_blocks=6, block_size=2, max_batch_size=3, max_tokens_per_step=5, prefill_chunk=2)
    a = add(sched, clock, "a", 6, max_tokens=2)
    b = add(sched, clock, "b", 6, max_tokens=5)
    c = add(sched, clock, "c", 2, max_tokens=6)
    step(sched, clock)                                # all three admitted at t=100
    assert a.scheduled == b.scheduled == c.scheduled == 100.0
    for _ in range(3):
        step(sched, clock)                            # c, then b preempted
    assert b.status == "waiting" and b.num_preemptions == 1
    out = step(sched, clock)                          # t=104: b comes back on its own prefix
    assert ("b", 4, 2, False) in items(out)
    assert b.cached_tokens == 0 and b.scheduled == 100.0
    assert sched.blocks.stats()["kv_queried_tokens"] == 6 + 6 + 2   # each prompt counted once


def test_decode_that_preempts_itself_does_not_stop_the_prefill_after_it():
    # b (admitted last) decodes and needs a block, none is free: b preempts itself; a's last
    # prefill chunk, which needs no new block, is still scheduled
    sched, clock = make(num_blocks=4, block_size=2, max_batch_size=3, max_tokens_per_step=6, prefill_chunk=2)
    a = add(sched, clock, "a", 6, max_tokens=1)
    b = add(sched, clock, "b", 4, max_tokens=4)
    step(sched, clock)
    step(sched, clock)
    out = step(sched, clock)
    assert out.preempted == ("b",) and items(out) == [("a", 4, 2, True)]
    assert a.status == "finished" and a.output_ids == expected_output(6, 1)
    for _ in range(10):
        if not sched.has_unfinished():
            break
        step(sched, clock)
    assert b.output_ids == expected_output(4, 4) and b.num_preemptions == 1


# ---- prefix reuse at admission -------------------------------------------------------------

def test_fully_cached_prompt_still_computes_its_last_token_to_sample():
    sched, clock = make(block_size=4)
    add(sched, clock, "z", list(range(9)), max_tokens=1)
    step(sched, clock)
    a = add(sched, clock, "a", list(range(9)), max_tokens=1)          # 9 = 2 full blocks + 1
    assert items(step(sched, clock)) == [("a", 8, 1, True)]           # num_prompt - 1 cached
    b = add(sched, clock, "b", list(range(8)), max_tokens=1)          # 8 = 2 full blocks
    assert items(step(sched, clock)) == [("b", 4, 4, True)]           # the last block is recomputed
    assert (a.cached_tokens, b.cached_tokens) == (8, 4)
    assert a.output_ids == expected_output(9, 1) and b.output_ids == expected_output(8, 1)


def test_same_prompt_waits_while_its_blocks_are_prefilled_then_shares_them():
    # r prefills a 16-token prompt 4 tokens a step; w (r's first 13 tokens) arrives after the
    # first chunk: it waits while r computes the blocks it could share, then takes all 3;
    # x, a different prompt queued behind w, is not held up
    sched, clock = make(block_size=4, prefill_chunk=4, max_tokens_per_step=64)
    r = add(sched, clock, "r", list(range(16)), max_tokens=2)
    assert items(step(sched, clock)) == [("r", 0, 4, False)]
    w = add(sched, clock, "w", list(range(13)), max_tokens=2)
    x = add(sched, clock, "x", 3, max_tokens=5)
    assert items(step(sched, clock)) == [("r", 4, 4, False), ("x", 0, 3, True)]
    assert w.status == "waiting"
    assert items(step(sched, clock)) == [("x", 3, 1, True), ("r", 8, 4, False)]
    assert w.status == "waiting"
    assert items(step(sched, clock)) == [("x", 4, 1, True), ("r", 12, 4, True), ("w", 12, 1, True)]
    assert (w.cached_tokens, x.cached_tokens, r.cached_tokens) == (12, 0, 0)
    assert w.output_ids == expected_output(13, 1)


def test_same_prompt_waits_for_the_blocks_of_a_last_chunk_scheduled_ahead_of_its_result():
    # the executor schedules step k+1 before step k is done, advancing num_computed as soon as a
    # chunk is scheduled (executor.py): r's last prompt chunk is in flight, its blocks not yet
    # computed; w (r's first 13 tokens) arrives then: it waits for them rather than computing
    # them again, and takes all 3 once r's step is done
    sched, clock = make(block_size=4, prefill_chunk=8, max_tokens_per_step=64)
    r = add(sched, clock, "r", list(range(16)), max_tokens=2)
    step(sched, clock)                                           # r: tokens 0..7
    out = sched.schedule()
    assert items(out) == [("r", 8, 8, True)]
    r.num_computed = 16                                          # as the executor advances it
    w = add(sched, clock, "w", list(range(13)), max_tokens=2)
    assert items(sched.schedule()) == [] and w.status == "waiting"
    sched.update(out, model(out))                                # r's chunk is done
    assert items(step(sched, clock)) == [("r", 16, 1, True), ("w", 12, 1, True)]
    assert w.cached_tokens == 12


def test_prompt_whose_last_block_holds_its_last_token_joins_at_once_beside_the_prefill():
    # w = r's first 8 tokens: its second block holds its last token, which it computes itself
    # anyway, so it does not wait for r's second block
    sched, clock = make(block_size=4, prefill_chunk=4, max_tokens_per_step=64)
    add(sched, clock, "r", list(range(16)), max_tokens=2)
    step(sched, clock)
    w = add(sched, clock, "w", list(range(8)), max_tokens=2)
    assert items(step(sched, clock)) == [("r", 4, 4, False), ("w", 4, 4, True)]
    assert w.cached_tokens == 4


def test_request_waits_for_the_block_a_running_prefill_computes_next():
    # one-token blocks: r has computed 3 of 5 tokens (num_prompt - 2); w shares r's first 4
    # tokens and waits one step for the 4th instead of computing it again
    sched, clock = make(block_size=1, prefill_chunk=3, max_tokens_per_step=64)
    r = add(sched, clock, "r", [1, 2, 3, 4, 5], max_tokens=2)
    step(sched, clock)
    assert r.num_computed == 3
    w = add(sched, clock, "w", [1, 2, 3, 4, 6], max_tokens=2)
    assert items(step(sched, clock)) == [("r", 3, 2, True)]
    assert items(step(sched, clock)) == [("r", 5, 1, True), ("w", 4, 1, True)]
    assert w.cached_tokens == 4


def test_request_waits_for_the_block_a_sequence_admitted_in_the_same_step_computes():
    # a is admitted with 3 of its 5 tokens cached (num_prompt - 2) and computes the 4th this
    # step; w, behind it, shares the first 4 tokens: it waits a step and takes all 4
    sched, clock = make(block_size=1, max_tokens_per_step=64)
    add(sched, clock, "z", [1, 2, 3, 9, 9], max_tokens=1)
    step(sched, clock)
    a = add(sched, clock, "a", [1, 2, 3, 4, 5], max_tokens=2)
    w = add(sched, clock, "w", [1, 2, 3, 4, 6], max_tokens=2)
    assert items(step(sched, clock)) == [("a", 3, 2, True)]
    assert w.status == "waiting"
    assert items(step(sched, clock)) == [("a", 5, 1, True), ("w", 4, 1, True)]
    assert (a.cached_tokens, w.cached_tokens) == (3, 4)


def test_request_is_not_held_for_a_block_whose_prefill_is_already_done():
    # s = [1, 2] has no shareable prompt block (its only block holds its last token), so r,
    # admitted beside it, computes the same block [1, 2] too; s's copy is the one cached and
    # s finishes. w (r's prompt but the last token) first waits while r computes [3, 4].
    # Then r has computed num_prompt - 1 tokens, and its growth evicts the LRU cached block,
    # s's cached copy of [1, 2]: no prompt block of r is being prefilled any more, so w has
    # nothing to wait for and is admitted at once, from scratch
    sched, clock = make(num_blocks=5, block_size=2, prefill_chunk=1, max_tokens_per_step=4)
    add(sched, clock, "s", [1, 2], max_tokens=1)
    r = add(sched, clock, "r", [1, 2, 3, 4, 5], max_tokens=3)
    add(sched, clock, "f", 1, max_tokens=4)
    for _ in range(3):
        step(sched, clock)
    w = add(sched, clock, "w", [1, 2, 3, 4, 6], max_tokens=2)
    step(sched, clock)
    assert w.status == "waiting"                           # r is computing [3, 4]
    assert r.num_computed == r.num_prompt - 1
    assert items(step(sched, clock)) == [("r", 4, 1, True), ("w", 0, 1, False)]
    assert w.cached_tokens == 0 and sched.blocks.lookup([1, 2, 9]) == []   # [1, 2] was evicted


def test_without_prefix_reuse_identical_prompts_never_wait_for_each_other():
    sched, clock = make(block_size=4, prefill_chunk=4, max_tokens_per_step=64, prefix_reuse=False)
    add(sched, clock, "r", list(range(16)), max_tokens=2)
    step(sched, clock)
    w1 = add(sched, clock, "w1", list(range(16)), max_tokens=2)
    w2 = add(sched, clock, "w2", list(range(16)), max_tokens=2)
    assert items(step(sched, clock)) == [("r", 4, 4, False), ("w1", 0, 4, False), ("w2", 0, 4, False)]
    assert w1.cached_tokens == w2.cached_tokens == 0


def test_static_batch_admits_identical_prompts_together_on_a_cached_prefix():
    # static batching still takes cached blocks at admission, but never holds a request back
    # to share a block its batch-mate is computing: the batch is admitted whole
    sched, clock = make(policy="static", block_size=4)
    add(sched, clock, "z", list(range(9)), max_tokens=1)
    step(sched, clock)
    prompt = list(range(9)) + [50, 51, 52, 53]
    a = add(sched, clock, "a", prompt, max_tokens=2)
    w = add(sched, clock, "w", prompt, max_tokens=2)
    assert items(step(sched, clock)) == [("a", 8, 5, True), ("w", 8, 5, True)]
    assert a.cached_tokens == w.cached_tokens == 8


# ---- abort while a step is in flight -----------------------------------------------------

def test_abort_during_a_step_skips_that_item_and_still_updates_the_rest():
    sched, clock = make()
    a = add(sched, clock, "a", 3, max_tokens=5)
    b = add(sched, clock, "b", 3, max_tokens=5)
    out = sched.schedule()
    assert items(out) == [("a", 0, 3, True), ("b", 0, 3, True)]
    sched.remove(a, "abort")                   # the client went away while the step ran
    touched = sched.update(out, [11, 22])
    assert touched == [(b, 22)]                # a's token is consumed, not given to b
    assert a.status == "finished" and a.finish_reason == "abort" and len(a.token_ids) == 3
    assert b.token_ids[-1] == 22 and b.num_computed == 3
    assert items(sched.schedule()) == [("b", 3, 1, True)]
