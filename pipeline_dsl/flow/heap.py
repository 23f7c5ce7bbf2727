"""The loaded heap frozen while a runtime runs: no full collection walks the model's objects.

Loading a model leaves ~200k long-lived Python objects (modules, tensors' wrappers, the
tokenizer's tables). A full collection walks every one of them, 0.4-0.6 s on a loaded
machine, and lands in the middle of a request's stream. Once a runtime has loaded its
engines and starts, `freeze()` collects what the load left behind and moves every live
object into the permanent generation (gc.freeze), which no collection walks; `thaw()`
puts them back when the runtime ends, so a process that builds runtime after runtime
(`agp bench` comparing pipelines, a test suite) collects each closed runtime's cycles as
before and nothing stays frozen for good.

The freeze is the process's, not one runtime's: `freeze()` first thaws what an earlier
runtime froze (one never shut down too), so its garbage is collected then; `thaw()` at
any runtime's end thaws all, and a runtime still running goes on unfrozen (slower full
collections, the same answers) until the next one starts.
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
