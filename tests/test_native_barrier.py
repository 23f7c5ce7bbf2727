"""The barrier between the phases of a native decode step (kernels.cpp: Barrier).

libgomp's barrier spins for milliseconds before it sleeps: while another process holds a core,
the thread that arrived first spins through the time the descheduled one needs to arrive, at
each of a step's ~150 barriers. agp's spins at most `spin_us` and then sleeps on a futex; the
step's tokens do not depend on which barrier runs.
"""
from __future__ import annotations

import ctypes
import random

import pytest
import torch

from pipeline_dsl.engine import native
from pipeline_dsl.engine.gguf_loader import load_gguf
from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem
from pipeline_dsl.engine.native.step import BARRIER_SPIN_US

pytestmark = pytest.mark.skipif(native.load() is None, reason="native kernels unavailable here")


def check(threads: int, rounds: int, spin_us: int, hold_us: int) -> tuple[int, float]:
    cpu = ctypes.c_double()
    bad = native.load().agp_barrier_check(threads, rounds, spin_us, hold_us, ctypes.byref(cpu))
    return bad, cpu.value


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("spin_us", [0, 5, BARRIER_SPIN_US])
def test_no_thread_passes_the_barrier_before_every_thread_reached_it(threads, spin_us):
    # 4 threads on a 2-core machine: many waits sleep, and each wake-up must see every write
    assert check(threads, 5000, spin_us, 0)[0] == 0
    assert check(threads, 40, spin_us, 200)[0] == 0          # one thread late each round


def test_a_thread_waiting_for_a_held_off_one_sleeps_instead_of_spinning():
    """One thread of two is held 5 ms before each of 20 barriers (as a thread that another process
    keeps off its core): the other waits 50 ms in all, and sleeps through it. libgomp's barrier
    (spin_us < 0) spun through all of it here (~50 ms of CPU), taking the core the held thread needs."""
    bad, cpu_s = check(2, 20, BARRIER_SPIN_US, 5000)
    assert bad == 0
    assert cpu_s < 0.25 * 0.050


@pytest.fixture(scope="module")
def f32(tiny_gguf):
    return load_gguf(tiny_gguf)


@pytest.mark.parametrize("threads", [2, 4])
def test_the_step_s_logits_are_the_same_whichever_barrier_runs(f32, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = LlamaModel(f32.config, f32.weights, "fp32")
        runner = ModelRunner(model, num_blocks=64, block_size=4)
        assert runner.native is not None
        runner.guard = None                  # every step on all the threads, however slow the machine
        rng = random.Random(threads)
        blocks = rng.sample(range(64), 36)                          # scattered, none shared
        tables = [blocks[i * 12:(i + 1) * 12] for i in range(3)]
        for i, table in enumerate(tables):
            runner.execute([SeqBatchItem([rng.randrange(3, 250) for _ in range(9 + i)], 0, table, False)])
        for p in range(12, 30):
            # the same step (the same K/V written at the same slots) under each barrier
            items = [SeqBatchItem([100 + p], p + i - 3, table, True) for i, table in enumerate(tables)]
            outs = []
            for spin_us in (-1, 0, BARRIER_SPIN_US):
                runner.native.spin_us = spin_us
                outs.append(runner.execute(items))
            assert all(torch.equal(outs[0], o) for o in outs[1:]), p
    finally:
        torch.set_num_threads(before)
