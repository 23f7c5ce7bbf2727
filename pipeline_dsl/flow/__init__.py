"""The pipeline runtime: items flow along a checked graph's edges (see runtime.py).

    from pipeline_dsl.flow import PipelineRuntime, build_runtime
    rt = build_runtime("examples/chat.agp", overrides={"threads": 2})
"""
from __future__ import annotations

from .runtime import Choice, PipelineError, PipelineRuntime, Result, StageCounter

__all__ = ["Choice", "PipelineError", "PipelineRuntime", "Result", "StageCounter", "build_runtime"]


def build_runtime(pipeline, name: str | None = None, **kwargs) -> PipelineRuntime:
    """A runtime for a .agp path (raises CheckFailed with diagnostics) or a checked graph."""
    from pipeline_dsl.runtime import load_graph

    return PipelineRuntime(load_graph(pipeline, name), **kwargs)
