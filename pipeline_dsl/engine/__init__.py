"""agp's inference engine (torch): model, paged KV cache, scheduler, sampler.

    from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
    engine = Engine(EngineConfig(model="smollm2-135m-instruct"))

See docs/architecture.md ("Engine API") for the contract.
"""

from .config import EngineConfig, RequestOutput, SamplingParams
from .engine import Engine
from .errors import InputError, QueueFullError

__all__ = ["Engine", "EngineConfig", "SamplingParams", "RequestOutput", "InputError",
           "QueueFullError"]
