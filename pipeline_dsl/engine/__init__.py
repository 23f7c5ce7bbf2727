"""agp's inference engine (torch): model, paged KV cache, scheduler, sampler.

    from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
    engine = Engine(EngineConfig(model="smollm2-135m-instruct"))

See docs/architecture.md ("Engine API") for the contract.
"""

from .config import EngineConfig, RequestOutput, SamplingParams
from .errors import InputError, QueueFullError

__all__ = ["Engine", "EngineConfig", "SamplingParams", "RequestOutput", "InputError",
           "QueueFullError"]


def __getattr__(name):
    # Engine (and torch) on first use: `agp check` imports engine.constrain to check a
    # json_schema and must not import torch
    if name == "Engine":
        from .engine import Engine
        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
