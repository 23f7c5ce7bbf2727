"""`agp serve --lora-modules`: LoRA adapters served beside the pipeline's model (engine/lora.py).

    adapters = read_modules(args.lora_modules)           # SetupError (exit 2): a bad spec or folder
    served = attach(runtime, adapters, names)            # each onto the engines whose model it fits

Each adapter is read before the model loads (a folder agp can't apply stops the start at once,
naming the file and the key), then given to every engine of the pipeline whose model its
matrices fit: a request whose `model` is the adapter's name goes through the pipeline as one
for the pipeline's name does, and each generate stage on such an engine answers it with the
adapter; a stage on another model answers with its own weights. An adapter that fits no engine
stops the start.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .options import SetupError, parse_specs


@dataclass(frozen=True)
class Served:
    """An adapter as /v1/models shows it: `root` its folder's name, `parent` the base model's name."""
    name: str
    root: str
    parent: str


def read_modules(specs) -> list:
    """The adapters of --lora-modules, read and checked (engine.lora.LoraAdapter each)."""
    from pipeline_dsl.engine.lora import LoraError, read_adapter

    out = []
    for name, path, base in parse_specs(specs):
        try:
            out.append(read_adapter(path, name, base))
        except LoraError as e:
            raise SetupError(f"--lora-modules {name}: {e}") from None
    return out


def attach(runtime, adapters: list, names: tuple[str, ...], stages=()) -> tuple[Served, ...]:
    """Give each adapter to the engines whose model it fits; SetupError for one that fits none, or
    whose name is already one of the server's model names or generate stages."""
    from pipeline_dsl.engine.lora import LoraError

    served = []
    for adapter in adapters:
        if adapter.name in names or adapter.name in stages or any(adapter.name in es.loras
                                                                  for es in runtime.segments):
            raise SetupError(f"--lora-modules {adapter.name}: the name is already the server's (a served "
                             "model name, the pipeline's, a generate stage's or its adapter's): give the adapter "
                             "another")
        fits, why = 0, None
        for es in runtime.segments:
            try:
                es.add_lora(adapter)
                fits += 1
            except LoraError as e:
                why = why or e
        if not fits:
            raise SetupError(f"--lora-modules {adapter.name}: {why}")
        served.append(Served(adapter.name, Path(adapter.path).name, adapter.base_model_name or names[0]))
    return tuple(served)
