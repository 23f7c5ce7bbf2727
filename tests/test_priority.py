"""Priority scheduling (vLLM's --scheduling-policy priority): dynamic_batch's scheduling_policy
admits waiting requests by their `priority` (lower first, ties by arrival), preempts the running
sequence of the highest value when blocks run out, and leaves fcfs as it was; a non-zero
priority is refused where the engine schedules fcfs."""
from __future__ import annotations

import pytest

from pipeline_dsl.engine import EngineConfig, InputError, SamplingParams
from pipeline_dsl.engine.kv_cache import BlockManager
from pipeline_dsl.engine.scheduler import Scheduler, Sequence
from test_engine import run_all, toy_engine
from test_scheduler import Clock, run_step


def make(policy="priority", num_blocks=64, block_size=4, **cfg):
    clock = Clock()
    config = EngineConfig(**{"batch_timeout_s": 0.0, "max_batch_size": 4, "scheduling_policy": policy, **cfg})
    return Scheduler(config, BlockManager(num_blocks, block_size), clock), clock


def add(sched, clock, rid, priority=0, n_prompt=5, max_tokens=4):
    base = 1000 * (ord(rid[0]) + len(rid))                     # distinct prompts: no prefix shared
    seq = Sequence(rid, list(range(base, base + n_prompt)), n_prompt, SamplingParams(max_tokens=max_tokens),
                   clock(), priority)
    sched.add(seq)
    clock.t += 0.001                                           # each arrives after the one before
    return seq


def admitted(sched, steps=200) -> list[str]:
    """The ids in the order they were first scheduled, stepping until everything is done."""
    order = []
    for _ in range(steps):
        if not sched.has_unfinished():
            return order
        for it in run_step(sched).items:
            if it.seq.request_id not in order:
                order.append(it.seq.request_id)
    raise AssertionError("no progress")


# ---------------------------------------------------------------- the scheduler

def test_with_the_batch_full_a_later_high_priority_request_is_admitted_before_earlier_low_ones():
    sched, clock = make(max_batch_size=2)
    add(sched, clock, "a", priority=5, max_tokens=3)
    add(sched, clock, "b", priority=5, max_tokens=30)
    run_step(sched)                                            # the batch is full: a and b run
    for rid in ("c", "d"):
        add(sched, clock, rid, priority=5)
    add(sched, clock, "e", priority=-1)                        # later, but more urgent
    assert [s.request_id for s in sched.waiting] == ["e", "c", "d"]
    assert admitted(sched) == ["a", "b", "e", "c", "d"]


def test_fcfs_ignores_priorities_and_keeps_the_order_of_arrival():
    sched, clock = make("fcfs", max_batch_size=2)
    add(sched, clock, "a", priority=5, max_tokens=3)
    add(sched, clock, "b", priority=5, max_tokens=30)
    run_step(sched)
    for rid, priority in (("c", 5), ("d", 5), ("e", -1)):
        add(sched, clock, rid, priority=priority)
    assert admitted(sched) == ["a", "b", "c", "d", "e"]


def test_equal_priorities_schedule_every_step_as_fcfs_does():
    def steps(policy):
        # 7 blocks of 4 tokens: preemption too (three sequences grow to 3 blocks each)
        sched, clock = make(policy, num_blocks=7, max_batch_size=3)
        for rid in "abcde":
            add(sched, clock, rid, priority=3, max_tokens=6)
        out = []
        while sched.has_unfinished():
            so = run_step(sched)
            out.append(([(it.seq.request_id, it.start, it.num_tokens) for it in so.items], so.preempted))
            assert len(out) < 200
        return out

    fcfs = steps("fcfs")
    assert any(preempted for _, preempted in fcfs)
    assert steps("priority") == fcfs


def test_out_of_blocks_the_lowest_priority_running_sequence_is_preempted():
    # 7 blocks of 4 tokens: three sequences of 5 prompt tokens fit, but each grows to 3 blocks
    def first_preempted(policy, priorities):
        sched, clock = make(policy, num_blocks=7)
        seqs = [add(sched, clock, rid, priority=p, max_tokens=6) for rid, p in zip("abc", priorities)]
        preempted = []
        while sched.has_unfinished():
            preempted += run_step(sched).preempted
            sched.blocks.check_invariants()
            assert sched.num_preemptions < 50
        assert all(s.output_ids == [7] * 6 for s in seqs)
        return preempted[0]

    assert first_preempted("fcfs", (0, 9, 1)) == "c"           # the most recently admitted
    assert first_preempted("priority", (0, 9, 1)) == "b"       # the highest value, admitted earlier
    assert first_preempted("priority", (9, 0, 1)) == "a"
    assert first_preempted("priority", (4, 4, 4)) == "c"       # of equals, the latest arrival


def test_a_preempted_sequence_waits_in_its_rank_not_at_the_head():
    sched, clock = make(num_blocks=7, max_batch_size=3)
    seqs = {rid: add(sched, clock, rid, priority=p, max_tokens=6) for rid, p in zip("abc", (0, 9, 1))}
    while not any(s.num_preemptions for s in seqs.values()):
        run_step(sched)
    add(sched, clock, "d", priority=2)                         # waits before b (9), though later
    assert [s.request_id for s in sched.waiting] == ["d", "b"]


def test_running_sequences_take_the_steps_budget_in_priority_order():
    def chunks(policy):
        sched, clock = make(policy, max_tokens_per_step=12, prefill_chunk=8)
        add(sched, clock, "low", priority=5, n_prompt=40)
        run_step(sched)                                        # low: 8 of its 40 prompt tokens
        add(sched, clock, "high", priority=0, n_prompt=40)
        run_step(sched)                                        # low 8 more; high joins with the 4 left
        return [(it.seq.request_id, it.num_tokens) for it in run_step(sched).items]

    assert chunks("fcfs") == [("low", 8), ("high", 4)]
    assert chunks("priority") == [("high", 8), ("low", 4)]


def test_the_batch_window_opens_from_the_first_arrival_whatever_its_priority():
    sched, clock = make(batch_timeout_s=0.010)
    add(sched, clock, "a", priority=5)                         # arrives at 100.000
    add(sched, clock, "b", priority=0)                         # 100.001, first in the queue
    assert sched.schedule().empty
    assert sched.next_deadline() == pytest.approx(100.010)
    clock.t = 100.010
    assert [it.seq.request_id for it in sched.schedule().items] == ["b", "a"]


# ---------------------------------------------------------------- the engine

PROMPTS = ["the cat sat", "hello world, hello", "a", "the cat sat on the mat and looked around",
           "0123456789" * 4, "the cat sat on", "x y z", "zz top"]


def test_greedy_answers_are_the_same_whatever_the_priorities():
    def answers(policy, priorities):
        # a small pool and batch: requests wait, and sequences are preempted
        engine = toy_engine(num_blocks=24, max_batch_size=3, scheduling_policy=policy)
        for i, (prompt, p) in enumerate(zip(PROMPTS, priorities)):
            engine.add_request(str(i), prompt=prompt, params=SamplingParams(max_tokens=12, ignore_eos=True),
                               priority=p)
        finals, deltas = run_all(engine)
        return {k: (v.new_token_ids, deltas[k]) for k, v in finals.items()}, engine.stats()["preemptions"]

    fcfs, _ = answers("fcfs", [0] * len(PROMPTS))
    mixed, preemptions = answers("priority", [3, -2, 7, 0, 7, 1, -2, 5])
    assert preemptions and mixed == fcfs


def test_the_engine_refuses_a_priority_it_cannot_honour():
    fcfs = toy_engine()
    fcfs.add_request("zero", prompt="hi", priority=0)          # 0 changes nothing: taken
    with pytest.raises(InputError, match=r"'priority' = 3 needs priority scheduling, and this engine schedules "
                                         r"fcfs .*scheduling_policy = priority") as e:
        fcfs.add_request("a", prompt="hi", priority=3)
    assert e.value.param == "priority"
    by_priority = toy_engine(scheduling_policy="priority")
    for bad in ("high", True, 1.5, 1 << 63):
        with pytest.raises(InputError, match="'priority' must be an integer from") as e:
            by_priority.add_request("b", prompt="hi", priority=bad)
        assert e.value.param == "priority"
    by_priority.add_request("c", prompt="hi", priority=-(1 << 63))


def test_scheduling_policy_is_checked_by_its_stage_parameter():
    with pytest.raises(InputError, match="'scheduling_policy' must be one of fcfs, priority, not \"static\""):
        EngineConfig(scheduling_policy="static")
