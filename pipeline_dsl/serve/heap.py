"""The loaded heap frozen while a served pipeline runs: no full collection walks the model's objects.

Loading a model leaves ~200k long-lived Python objects (modules, tensors' wrappers, the
tokenizer's tables). A full collection walks every one of them, 0.4-0.6 s on a loaded
machine, and lands in the middle of a request's stream. Once a server's pipeline has loaded
its engines and starts (AsyncPipeline.start: agp serve, agp bench's in-process targets),
`freeze()` collects what the load left behind and moves every live object into the permanent
generation (gc.freeze), which no collection walks; `thaw()` puts them back when it stops, so
a process that starts pipeline after pipeline collects each stopped one's cycles as before
and nothing stays frozen for good. A runtime driven alone (agp run) is not frozen: the
collection at the start would cost more than it saves.

The freeze is the process's, not one pipeline's: `freeze()` first thaws what an earlier
pipeline froze (one never stopped too), so its garbage is collected then; `thaw()` at any
pipeline's stop thaws all, and one still running goes on unfrozen (slower full collections,
the same answers) until the next one starts.
"""
from __future__ import annotations

import gc
import threading

_lock = threading.Lock()


def freeze() -> None:
    """Collect the garbage, then freeze every object alive now (the loaded models with it)."""
    with _lock:
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def thaw() -> None:
    """Everything frozen goes back to the collector's oldest generation."""
    with _lock:
        gc.unfreeze()
