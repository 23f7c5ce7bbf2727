"""Scheduler: the batch window (size and timeout), continuous and static batching,
the per-step token budget, chunked prefill and preemption."""

from pipeline_dsl.engine import EngineConfig, SamplingParams
from pipeline_dsl.engine.kv_cache import BlockManager
from pipeline_dsl.engine.scheduler import Scheduler, Sequence, bucket


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(num_blocks=64, block_size=4, **cfg):
    clock = Clock()
    config = EngineConfig(**{"batch_timeout_s": 0.010, "max_batch_size": 4, **cfg})
    return Scheduler(config, BlockManager(num_blocks, block_size), clock), clock


def add(sched, clock, rid, n_prompt=5, max_tokens=4):
    base = 1000 * (len(sched.waiting) + len(sched.running) + len(rid) + ord(rid[0]))  # distinct prompts
    seq = Sequence(rid, list(range(base, base + n_prompt)), n_prompt, SamplingParams(max_tokens=max_tokens), clock())
    sched.add(seq)
    return seq


def run_step(sched):
    """schedule + a fake model (next token 7) + update; finishes sequences at max_tokens."""
    out = sched.schedule()
    sched.update(out, [7] * out.num_sample)
    for seq in list(sched.running):
        if seq.num_output >= seq.params.max_tokens:
            sched.remove(seq, "length")
    return out


def test_window_holds_requests_until_timeout():
    sched, clock = make()
    add(sched, clock, "a")
    clock.t += 0.004
    add(sched, clock, "b")
    assert sched.schedule().empty
    assert sched.next_deadline() == 100.010   # from the first waiting request
    clock.t = 100.010
    out = sched.schedule()
    assert [it.seq.request_id for it in out.items] == ["a", "b"]
    assert sched.next_deadline() is None


def test_full_batch_dispatches_before_timeout():
    sched, clock = make(max_batch_size=3)
    for rid in "abc":
        add(sched, clock, rid)
    assert sched.next_deadline() is None
    assert len(sched.schedule().items) == 3


def test_zero_timeout_dispatches_at_once():
    sched, clock = make(batch_timeout_s=0.0)
    add(sched, clock, "a")
    assert len(sched.schedule().items) == 1


def test_continuous_batching_lets_waiting_join_between_decode_steps():
    sched, clock = make(batch_timeout_s=0.0)
    add(sched, clock, "a", max_tokens=10)
    run_step(sched)                        # prefill of a
    add(sched, clock, "b", max_tokens=10)
    out = run_step(sched)                  # a decodes, b joins in the same step
    assert [(it.seq.request_id, it.num_tokens) for it in out.items] == [("a", 1), ("b", 5)]


def test_static_batching_runs_batches_to_completion():
    sched, clock = make(batch_timeout_s=0.0, policy="static")
    add(sched, clock, "a", max_tokens=3)
    run_step(sched)
    add(sched, clock, "b", max_tokens=3)
    seen = []
    while sched.has_unfinished():
        seen.append(sorted(it.seq.request_id for it in run_step(sched).items))
    assert seen == [["a"], ["a"], ["b"], ["b"], ["b"]]


def test_static_batch_is_admitted_whole_even_beyond_one_steps_budget():
    sched, clock = make(batch_timeout_s=0.0, policy="static", max_batch_size=4, max_tokens_per_step=8)
    for rid in "abcd":
        add(sched, clock, rid, n_prompt=5, max_tokens=2)
    out = run_step(sched)
    assert len(sched.running) == 4 and not sched.waiting
    assert sum(it.num_tokens for it in out.items) <= 8
    add(sched, clock, "late", max_tokens=2)
    batches = []
    while sched.has_unfinished():
        batches.append({it.seq.request_id for it in run_step(sched).items})
    late = [i for i, b in enumerate(batches) if "late" in b]
    assert all(b <= set("abcd") for b in batches[:late[0]]) and all(b == {"late"} for b in batches[late[0]:])


def test_finished_sequences_leave_and_free_their_blocks():
    sched, clock = make(batch_timeout_s=0.0)
    add(sched, clock, "a", max_tokens=2)
    add(sched, clock, "b", max_tokens=5)
    while sched.has_unfinished():
        run_step(sched)
    assert sched.blocks.num_used == 0 and not sched.running


def test_token_budget_and_chunked_prefill_keep_decoders_going():
    sched, clock = make(batch_timeout_s=0.0, max_tokens_per_step=8, prefill_chunk=6, num_blocks=64)
    add(sched, clock, "short", n_prompt=3, max_tokens=20)
    run_step(sched)
    add(sched, clock, "long", n_prompt=40, max_tokens=2)
    chunks = []
    while any(s.request_id == "long" for s in sched.waiting) or any(
            s.request_id == "long" and s.num_computed < 40 for s in sched.running):
        out = run_step(sched)
        assert sum(it.num_tokens for it in out.items) <= 8
        ids = {it.seq.request_id: it for it in out.items}
        assert ids["short"].num_tokens == 1         # the decoder advances every step
        chunks.append(ids["long"].num_tokens)
    assert sum(chunks) == 40 and max(chunks) <= 6
    assert len(chunks) == 7                        # 6 x 6 tokens + 4


def test_max_batch_size_caps_running_sequences():
    sched, clock = make(batch_timeout_s=0.0, max_batch_size=2)
    for rid in "abcd":
        add(sched, clock, rid, max_tokens=50)
    run_step(sched)
    assert len(sched.running) == 2 and len(sched.waiting) == 2


def test_out_of_blocks_preempts_the_most_recent_and_recomputes_it():
    # 7 blocks of 4 tokens: three sequences of 5 prompt tokens fit (2 blocks each), but each
    # grows to 11 tokens (3 blocks), 9 in all
    sched, clock = make(num_blocks=7, block_size=4, batch_timeout_s=0.0)
    seqs = [add(sched, clock, rid, n_prompt=5, max_tokens=6) for rid in "abc"]
    preempted = []
    steps = 0
    while sched.has_unfinished():
        preempted += run_step(sched).preempted
        sched.blocks.check_invariants()
        steps += 1
        assert steps < 100, "no progress"
    assert preempted and preempted[0] == "c"
    assert all(s.num_output == 6 and s.output_ids == [7] * 6 for s in seqs)
    assert seqs[2].num_preemptions >= 1
    assert sched.num_preemptions == len(preempted)
    assert sched.blocks.num_used == 0


def test_shared_prompt_prefix_is_not_prefilled_again():
    sched, clock = make(batch_timeout_s=0.0)
    a = Sequence("a", list(range(10)), 10, SamplingParams(max_tokens=2), clock())
    sched.add(a)
    while sched.has_unfinished():
        run_step(sched)
    b = Sequence("b", list(range(10)) + [99], 11, SamplingParams(max_tokens=2), clock())
    sched.add(b)
    out = run_step(sched)
    assert b.cached_tokens == 8 and out.items[0].start == 8 and out.items[0].num_tokens == 3


def test_padding_buckets_pure_decode_steps():
    sched, clock = make(batch_timeout_s=0.0, max_batch_size=8)
    for rid in "abc":
        add(sched, clock, rid, max_tokens=5)
    assert run_step(sched).pad_to is None          # prefill step: not padded
    assert run_step(sched).pad_to == 4             # 3 decodes -> bucket 4
    assert bucket(5, 8) == 8 and bucket(9, 8) == 9 and bucket(1, 32) == 1


def test_decodes_go_before_an_earlier_admitted_long_prefill():
    # the long prompt is admitted first (it is first in the running list), the short one after
    # it in the same step; from then on the short one decodes while the long one still prefills
    sched, clock = make(batch_timeout_s=0.0, max_tokens_per_step=6, prefill_chunk=4, num_blocks=64)
    long_ = add(sched, clock, "long", n_prompt=30, max_tokens=2)
    short = add(sched, clock, "short", n_prompt=2, max_tokens=30)
    first = run_step(sched)
    assert [(it.seq.request_id, it.num_tokens) for it in first.items] == [("long", 4), ("short", 2)]
    assert sched.running == [long_, short]               # admission order: the prefill comes first
    for _ in range(5):
        out = run_step(sched)
        got = [(it.seq.request_id, it.num_tokens) for it in out.items]
        assert got == [("short", 1), ("long", 4)], got   # the decode is listed, and served, first
        assert out.num_decodes == 1 and out.num_prefill_tokens == 4


def test_no_running_decode_ever_waits_behind_a_prefill():
    """Random workloads (both policies, tight budgets, few blocks): in every step that schedules
    prefill tokens, every sequence that is decoding is scheduled too."""
    import random

    for seed in range(400):
        rng = random.Random(seed)
        mb = rng.choice([2, 3, 4, 8])
        sched, clock = make(batch_timeout_s=0.0, policy=rng.choice(["static", "continuous"]), max_batch_size=mb,
                            max_tokens_per_step=rng.choice([mb, mb + 1, 2 * mb, 16]),
                            prefill_chunk=rng.choice([1, 2, 4, 8]), num_blocks=rng.choice([6, 12, 64]),
                            block_size=rng.choice([1, 2, 4]), long_prefill_threshold=rng.choice([0, 3, 12, 1024]))
        for step in range(60):
            for _ in range(rng.choice([0, 0, 1, 2])):
                add(sched, clock, f"r{seed}-{step}-{rng.random()}", n_prompt=rng.randint(1, 25),
                    max_tokens=rng.randint(1, 10))
            out = sched.schedule()
            decoding = [s for s in sched.running if s.num_output >= 1 and len(s.token_ids) - s.num_computed == 1
                        and s.num_output < s.params.max_tokens]
            if out.num_prefill_tokens:
                assert set(decoding) <= {it.seq for it in out.items}, (seed, step)
            sched.update(out, [7] * out.num_sample)
            for seq in list(sched.running):
                if seq.num_output >= seq.params.max_tokens:
                    sched.remove(seq, "length")


# ---- long prefills leave room for short prompts (long_prefill_threshold) ----------------------

def finish_all(sched, steps=200):
    """Steps until nothing is left (the fake model of run_step); returns the steps taken."""
    for n in range(steps):
        if not sched.has_unfinished():
            return n
        run_step(sched)
    raise AssertionError(f"still unfinished after {steps} steps")


def test_short_request_joins_beside_a_long_prefill_that_takes_the_whole_step_budget():
    """A long prompt whose chunk fills the step's token budget no longer keeps a short request
    waiting until it is prefilled: the short one joins in the next step, gets its first token
    while the long one is still prefilling, and the long one finishes too."""
    sched, clock = make(batch_timeout_s=0.0, max_tokens_per_step=16, prefill_chunk=16, itl_target_s=0.0,
                        long_prefill_threshold=32)
    long = add(sched, clock, "long", n_prompt=120, max_tokens=2)
    run_step(sched)
    short = add(sched, clock, "short", n_prompt=6, max_tokens=2)
    out = run_step(sched)
    assert {it.seq.request_id: it.num_tokens for it in out.items} == {"long": 8, "short": 6}
    assert short.num_output == 1 and long.num_computed < long.num_prompt
    finish_all(sched)
    assert long.finish_reason == "length" and long.output_ids == [7, 7]
    assert short.finish_reason == "length" and short.output_ids == [7, 7]


def test_short_request_gets_its_first_token_beside_a_long_prefill_cut_to_the_itl_target():
    """While a sequence decodes, the step's prefill is cut to what fits in itl_target; a long
    prompt prefilling took all of it, so a short request waited for the whole long prompt. Now
    the short one is admitted in the next step and has its first token before the long prompt
    is prefilled; the decoder keeps decoding every step and the long one still finishes."""
    sched, clock = make(num_blocks=128, batch_timeout_s=0.0, itl_target_s=0.5, long_prefill_threshold=32)
    dec = add(sched, clock, "dec", n_prompt=5, max_tokens=60)
    run_step(sched)
    sched.observe(0, 0.1)                  # a step of decodes alone: 0.1 s
    sched.observe(8, 0.5)                  # 0.05 s per prefill token: 8 fit in itl_target
    assert sched.prefill_cap() == 8
    long = add(sched, clock, "long", n_prompt=200, max_tokens=2)
    run_step(sched)
    assert long.num_computed == 8
    short = add(sched, clock, "short", n_prompt=6, max_tokens=2)
    out = run_step(sched)
    assert short.status == "running" and {it.seq.request_id for it in out.items} == {"dec", "long", "short"}
    while short.num_output == 0:
        out = run_step(sched)
        assert dec in {it.seq for it in out.items}
        assert out.num_prefill_tokens <= 8
    assert long.num_computed < long.num_prompt
    finish_all(sched)
    assert long.output_ids == [7, 7] and short.output_ids == [7, 7] and dec.num_output == 60


def test_a_waiting_long_prompt_does_not_take_the_room_left_for_a_short_one_behind_it():
    """Two long prompts and a short one behind them: the second long one waits while the first
    prefills, and the short one joins at once instead of waiting for both."""
    sched, clock = make(batch_timeout_s=0.0, max_tokens_per_step=16, prefill_chunk=16, itl_target_s=0.0,
                        long_prefill_threshold=32)
    first = add(sched, clock, "first", n_prompt=100, max_tokens=1)
    run_step(sched)
    second = add(sched, clock, "second", n_prompt=100, max_tokens=1)
    short = add(sched, clock, "short", n_prompt=6, max_tokens=1)
    out = run_step(sched)
    assert {it.seq.request_id: it.num_tokens for it in out.items} == {"first": 8, "short": 6}
    assert second.status == "waiting" and short.num_output == 1
    finish_all(sched)
    assert first.output_ids == second.output_ids == [7]


def test_long_prefill_threshold_0_lets_a_long_prefill_take_the_whole_step():
    sched, clock = make(batch_timeout_s=0.0, max_tokens_per_step=16, prefill_chunk=16, itl_target_s=0.0,
                        long_prefill_threshold=0)
    long = add(sched, clock, "long", n_prompt=120, max_tokens=1)
    run_step(sched)
    short = add(sched, clock, "short", n_prompt=6, max_tokens=1)
    out = run_step(sched)
    assert [(it.seq.request_id, it.num_tokens) for it in out.items] == [("long", 16)]
    assert short.status == "waiting" and long.num_computed == 32


def test_long_prompts_alone_take_the_whole_step():
    """Nothing short waits: two long prompts prefill at the full budget, as before."""
    sched, clock = make(batch_timeout_s=0.0, max_tokens_per_step=16, prefill_chunk=8, itl_target_s=0.0,
                        long_prefill_threshold=32)
    add(sched, clock, "a", n_prompt=100, max_tokens=1)
    add(sched, clock, "b", n_prompt=100, max_tokens=1)
    out = run_step(sched)
    assert [(it.seq.request_id, it.num_tokens) for it in out.items] == [("a", 8), ("b", 8)]


def test_every_request_finishes_with_its_tokens_when_long_prefills_leave_room_for_short_ones():
    """Random workloads of long and short prompts under a small long_prefill_threshold: every
    request, long or short, finishes with all its tokens (the long ones are never starved)."""
    import random

    for seed in range(150):
        rng = random.Random(seed)
        sched, clock = make(batch_timeout_s=0.0, max_batch_size=rng.choice([2, 4]), num_blocks=rng.choice([24, 64]),
                            max_tokens_per_step=rng.choice([4, 8, 16]), prefill_chunk=rng.choice([2, 8, 16]),
                            itl_target_s=0.0, long_prefill_threshold=rng.choice([1, 4, 10]),
                            scheduling_policy=rng.choice(["fcfs", "priority"]))
        seqs = []
        for step in range(30):
            if rng.random() < 0.4:
                seqs.append(add(sched, clock, f"r{seed}-{step}", n_prompt=rng.choice([2, 5, 30, 60]),
                                max_tokens=rng.randint(1, 5)))
            run_step(sched)
        finish_all(sched, steps=2000)
        assert all(s.finish_reason == "length" and s.output_ids == [7] * s.params.max_tokens for s in seqs), seed


def test_a_long_prompt_whose_prefix_is_cached_joins_beside_a_long_prefill_as_a_short_one():
    """long_prefill_threshold counts the tokens left to prefill: a 100-token prompt whose first 96
    the prefix cache holds has 4 to compute, so it is short. Sent while a long prompt prefills at
    the whole step budget, it joins at once beside it and has its first token (before: judged by
    its length, it was long, the long one kept the whole step and it waited for its prefill)."""
    sched, clock = make(num_blocks=128, batch_timeout_s=0.0, max_tokens_per_step=16, prefill_chunk=16,
                        itl_target_s=0.0, long_prefill_threshold=32)
    warm = add(sched, clock, "warm", n_prompt=100, max_tokens=1)
    finish_all(sched)
    assert warm.finish_reason == "length"
    long = add(sched, clock, "long", n_prompt=120, max_tokens=2)
    run_step(sched)
    again = Sequence("again", warm.token_ids[:96] + [1, 2, 3, 4], 100, SamplingParams(max_tokens=2), clock())
    sched.add(again)
    out = run_step(sched)
    assert {it.seq.request_id: it.num_tokens for it in out.items} == {"long": 8, "again": 4}
    assert again.cached_tokens == 96 and again.num_output == 1 and long.num_computed < long.num_prompt
    finish_all(sched)
    assert long.output_ids == again.output_ids == [7, 7]
