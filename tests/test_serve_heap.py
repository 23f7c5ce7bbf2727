"""The loaded heap is frozen while a server's pipeline runs (no full collection walks the
model's objects in the middle of a stream) and thawed when it stops: a process that builds
pipeline after pipeline keeps no stopped one's model alive, and a runtime driven alone (agp
run, the flow tests) pays no collection at its start."""
from __future__ import annotations

import gc
import weakref

from flowkit import chain, chat, errors, runtime, write

from pipeline_dsl.serve.async_pipeline import AsyncPipeline

BODY = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 2 }\n"
        "stage out : respond {}\nrequest -> batch\ngen -> out\n" + chain())


def _pipeline(tmp_path, model):
    path = write(tmp_path, model, BODY)
    assert errors(path) == []
    return path


def _collected(obj) -> bool:
    """Whether the collector walks obj: a frozen object is in no generation."""
    return any(o is obj for o in gc.get_objects())


def test_a_started_pipeline_freezes_its_loaded_model_and_its_stop_frees_it(tmp_path, tiny_gguf):
    pipe = AsyncPipeline(runtime(_pipeline(tmp_path, tiny_gguf)))
    model = pipe.runtime.segments[0].engine.runner.model
    assert _collected(model)                         # loaded, not yet started
    pipe.start()
    try:
        assert gc.get_freeze_count() > 0 and not _collected(model)
    finally:
        pipe.stop()
    assert gc.get_freeze_count() == 0 and _collected(model)
    gone = weakref.ref(model)
    del pipe, model
    gc.collect()
    assert gone() is None, "the stopped pipeline's model is kept alive"


def test_a_runtime_driven_alone_freezes_nothing_and_a_next_pipeline_collects_a_forgotten_one(tmp_path, tiny_gguf):
    """run_all (agp run) neither freezes nor collects; a started pipeline never stopped stays
    frozen only until the next one starts, which collects it."""
    path = _pipeline(tmp_path, tiny_gguf)
    rt = runtime(path)
    results = rt.run_all([chat("a", "hi")])
    assert results[0].error is None and gc.get_freeze_count() == 0
    rt.shutdown()

    pipe = AsyncPipeline(runtime(path))
    pipe.start()
    assert gc.get_freeze_count() > 0
    gone = weakref.ref(pipe.runtime.segments[0].engine.runner.model)
    pipe.runtime.close()
    pipe.runtime.shutdown()
    del pipe                                         # dropped without stop()
    other = AsyncPipeline(runtime(path))
    other.start()
    try:
        assert gone() is None, "a pipeline never stopped stays frozen for good"
        assert not _collected(other.runtime.segments[0].engine.runner.model)
    finally:
        other.stop()


def test_a_pipeline_driven_from_loop_after_loop_keeps_no_closed_loop_alive(tmp_path, tiny_gguf):
    """A library user may drive one pipeline with asyncio.run per call, a new event loop each
    time: the pipeline keeps what it needs of the loop it is called from while the loop is open,
    and lets a closed one go once a new loop calls, however many calls come."""
    import asyncio

    pipe = AsyncPipeline(runtime(_pipeline(tmp_path, tiny_gguf)))
    pipe.start()
    loops = []

    async def ask(k):
        loops.append(weakref.ref(asyncio.get_running_loop()))
        stream = await pipe.add(chat(f"r{k}", "hi"))
        async for event in stream:
            if event[0] == "done":
                return event[1]

    try:
        for k in range(4):
            assert asyncio.run(ask(k)).error is None
        gc.collect()
        assert [loop() is None for loop in loops[:-1]] == [True] * 3, "closed event loops are kept alive"
    finally:
        pipe.stop()
