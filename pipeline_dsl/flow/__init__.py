"""The pipeline runtime: items flow along a checked graph's edges (see runtime.py).

    from pipeline_dsl.flow import PipelineRuntime, build_runtime, load_graph
    rt = build_runtime("examples/chat.agp", overrides={"threads": 2})

The runtime never reads the AST: it takes the graph that `pipeline_dsl.graph` built (nodes
carry `kind`, the effective `params` and their `routes`), builds one engine per engine
segment and runs every other stage per item.
"""
from __future__ import annotations

import os
from pathlib import Path

import networkx as nx

from .items import ANSWER_FAILED_CODE, Choice, Delta, PipelineError, Result, failed_with, unbuilt, unbuilt_error
from .runtime import PipelineRuntime
from .stats import StageCounter

__all__ = ["ANSWER_FAILED_CODE", "Choice", "Delta", "PipelineError", "PipelineRuntime", "Result", "StageCounter",
           "build_runtime", "failed_with", "load_graph", "unbuilt", "unbuilt_error"]


def load_graph(pipeline: str | os.PathLike | nx.DiGraph, name: str | None = None, allow_paths=()) -> nx.DiGraph:
    """A checked graph from a path (raises CheckFailed with diagnostics) or a graph as is;
    `allow_paths`: folders besides the file's own that its includes and schemas may come from."""
    if isinstance(pipeline, nx.DiGraph):
        return pipeline
    from pipeline_dsl import load_pipeline_graph

    return load_pipeline_graph(Path(pipeline), name, allow_paths)


def build_runtime(pipeline, name: str | None = None, *, overrides: dict | None = None, allow_paths=(),
                  **kwargs) -> PipelineRuntime:
    """A PipelineRuntime for a pipeline file or graph; `overrides` are EngineConfig fields set
    from the command line (they win over the file when not None)."""
    return PipelineRuntime(load_graph(pipeline, name, allow_paths), overrides=overrides, **kwargs)
