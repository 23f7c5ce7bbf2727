"""The runtime's timer thread: cancelled deadlines do not pile up in its heap, and the live
ones still fire, in deadline order. A stage's event loop, closed at shutdown, cancels the calls
still on it."""
import asyncio
import gc
import logging
import threading

from pipeline_dsl.flow.timing import EventLoop, Timer


def test_cancelled_long_timers_do_not_pile_up_in_the_heap():
    # 60 s timeouts at a high call rate, each cancelled when its call returns: without
    # compaction the heap would hold all 100,000 of them until their deadline.
    timer = Timer()
    try:
        kept = [timer.later(60.0, lambda: None) for _ in range(500)]
        most = 0
        for _ in range(100_000):
            timer.later(60.0, lambda: None).cancel()
            most = max(most, timer.pending())
        live = len(kept)
        assert most <= 2 * live + 128          # O(live timers), not O(cancelled ones)
        assert timer.pending() <= 2 * live + 128
    finally:
        timer.close()


def test_live_timers_fire_in_order_among_cancelled_ones():
    now = [0.0]                                # held still while arming, then moved past all
    timer = Timer(clock=lambda: now[0])
    fired, done = [], threading.Event()
    try:
        for i in reversed(range(20)):          # armed latest first: order comes from the heap
            delay = 0.05 + 0.01 * i
            timer.later(delay, lambda i=i: (fired.append(i), i == 19 and done.set()))
            for _ in range(1000):              # compactions happen among the live ones
                timer.later(delay / 2, lambda: fired.append("cancelled")).cancel()
                timer.later(60.0, lambda: fired.append("cancelled")).cancel()
        now[0] = 30.0
        timer.later(0.0, lambda: None)         # wakes the timer thread to read the clock
        assert done.wait(10)
        assert fired == list(range(20))
    finally:
        timer.close()


def test_cancel_after_firing_or_twice_is_harmless():
    timer = Timer()
    done = threading.Event()
    try:
        handle = timer.later(0.0, done.set)
        assert done.wait(5)
        handle.cancel()
        handle.cancel()
        other = timer.later(60.0, lambda: None)
        other.cancel()
        other.cancel()
        assert timer.pending() == 1            # the cancelled entry waits for a compaction
    finally:
        timer.close()


def test_closing_a_stages_event_loop_cancels_its_calls_and_leaves_no_pending_task(caplog):
    """An async python stage's call still running at shutdown (one the drain cut) was left pending
    on a loop that was stopped, not closed: "Task was destroyed but it is pending!" once the loop
    was collected, at agp serve's exit in some runs. close() cancels it, lets it end, closes the loop."""
    loop = EventLoop()
    running, cancelled = threading.Event(), threading.Event()

    async def slow():
        running.set()
        try:
            await asyncio.sleep(300)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    future = loop.submit(slow())
    assert running.wait(30)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.close()
        assert cancelled.is_set() and future.cancelled()
        del future
        gc.collect()
    assert "Task was destroyed but it is pending" not in caplog.text
