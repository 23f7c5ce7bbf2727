"""The loaded heap is frozen while a runtime runs (no full collection walks the model's
objects in the middle of a stream) and thawed at its end: a process that builds runtime
after runtime keeps no closed runtime's model alive."""
from __future__ import annotations

import gc
import weakref

from flowkit import chain, chat, errors, runtime, write

BODY = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 2 }\n"
        "stage out : respond {}\nrequest -> batch\ngen -> out\n" + chain())


def _pipeline(tmp_path, model):
    path = write(tmp_path, model, BODY)
    assert errors(path) == []
    return path


def _collected(obj) -> bool:
    """Whether the collector walks obj: a frozen object is in no generation."""
    return any(o is obj for o in gc.get_objects())


def test_a_started_runtime_freezes_its_loaded_model_and_its_end_frees_it(tmp_path, tiny_gguf):
    rt = runtime(_pipeline(tmp_path, tiny_gguf))
    model = rt.segments[0].engine.runner.model
    assert _collected(model)                         # loaded, not yet started
    rt.start()
    try:
        assert gc.get_freeze_count() > 0 and not _collected(model)
    finally:
        rt.close()
        rt.shutdown()
    assert gc.get_freeze_count() == 0 and _collected(model)
    gone = weakref.ref(model)
    del rt, model
    gc.collect()
    assert gone() is None, "the closed runtime's model is kept alive"


def test_agp_runs_run_all_thaws_at_its_end_and_a_next_runtime_collects_a_forgotten_one(tmp_path, tiny_gguf):
    """run_all (agp run, agp bench's in-process targets) freezes after the load and thaws when it
    closes; one kept open (a warm-up) and never shut down stays frozen only until the next
    runtime starts, which collects it."""
    path = _pipeline(tmp_path, tiny_gguf)
    rt = runtime(path)
    results = rt.run_all([chat("a", "hi")])
    assert results[0].error is None and gc.get_freeze_count() == 0
    rt.shutdown()

    rt = runtime(path)
    results = rt.run_all([chat("b", "hi")], keep_open=True)
    assert results[0].error is None and gc.get_freeze_count() > 0
    gone = weakref.ref(rt.segments[0].engine.runner.model)
    del rt, results                                  # dropped without a shutdown
    other = runtime(path)
    other.start()
    try:
        assert gone() is None, "a runtime never shut down stays frozen for good"
        assert not _collected(other.segments[0].engine.runner.model)
    finally:
        other.close()
        other.shutdown()
