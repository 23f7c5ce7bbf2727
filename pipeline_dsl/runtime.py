"""From a checked pipeline graph to a running engine.

The runtime never reads the AST: it walks the graph that `pipeline_dsl.graph` built
(nodes carry `kind` and the effective `params`, the mode preset already applied), asks
each stage kind's implementation (`stages.impl`) to contribute its settings, and builds
one `EngineConfig` plus the pipeline's default `SamplingParams`.

    engine, defaults = build_engine("examples/chat.agp", dtype="bf16", threads=2)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import networkx as nx


@dataclass
class RuntimeSpec:
    """What the stages of one pipeline ask of the runtime."""

    engine: dict[str, Any] = field(default_factory=dict)    # EngineConfig fields
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams defaults
    chat_template: bool = True       # encode: render `messages` with the model's template
    add_special_tokens: bool = True  # encode: add BOS etc. to raw prompts
    stream: bool = False             # respond: emit tokens as they come
    system_prompt: str | None = None # system_prompt: put first in chat requests
    system_override: bool = False    # system_prompt: replace a request's own system message
    plan: Any = None                 # the pipeline's stream plan (pipeline_dsl.plan.Plan)

    def engine_inputs(self, inputs: dict) -> dict:
        """One request's `Engine.add_request` inputs (`prompt` or `messages`) as the
        pipeline's stages shape them: the system prompt put first, the encode switches."""
        out = dict(inputs, chat_template=self.chat_template, add_special_tokens=self.add_special_tokens)
        messages = inputs.get("messages")
        if messages is not None and self.system_prompt is not None:
            if messages and messages[0].get("role") == "system":
                messages = messages[1:] if self.system_override else None
            if messages is not None:
                out["messages"] = [{"role": "system", "content": self.system_prompt}, *messages]
        return out


def load_graph(pipeline: str | os.PathLike | nx.DiGraph, name: str | None = None) -> nx.DiGraph:
    """A checked graph from a path (raises CheckFailed with diagnostics) or a graph as is."""
    if isinstance(pipeline, nx.DiGraph):
        return pipeline
    from pipeline_dsl import load_pipeline_graph

    return load_pipeline_graph(Path(pipeline), name)


def runtime_spec(graph: nx.DiGraph) -> RuntimeSpec:
    """Every stage's implementation contributes its part, in topological order."""
    from pipeline_dsl.plan import make_plan
    from stages.impl import implementation

    spec = RuntimeSpec(plan=make_plan(graph))
    settings = dict(graph.graph.get("settings", {}))
    for key in ("model", "device", "threads", "dtype"):
        if settings.get(key) is not None:
            spec.engine[key] = settings[key]
    for node in nx.topological_sort(graph):
        data = graph.nodes[node]
        implementation(data["kind"]).configure(dict(data.get("params", {})), spec)
    return spec


def engine_config(spec: RuntimeSpec, **overrides):
    """EngineConfig from a spec; `overrides` (CLI flags) win when not None."""
    from pipeline_dsl.engine import EngineConfig
    from pipeline_dsl.engine.engine import resolve_device

    known = {f.name for f in fields(EngineConfig)}
    values = {k: v for k, v in spec.engine.items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    values["device"] = resolve_device(str(values.get("device") or "auto"))
    return EngineConfig(**values)


def default_sampling(spec: RuntimeSpec):
    from pipeline_dsl.engine import SamplingParams

    known = {f.name for f in fields(SamplingParams)}
    return SamplingParams(**{k: v for k, v in spec.sampling.items() if k in known})


def build_engine(pipeline, name: str | None = None, **overrides):
    """(Engine, RuntimeSpec) for a pipeline file or graph; overrides are EngineConfig fields."""
    from pipeline_dsl.engine import Engine

    spec = runtime_spec(load_graph(pipeline, name))
    config = engine_config(spec, **overrides)
    return Engine(config), spec


def sampling_with(defaults, **request_values):
    """The pipeline's defaults, overridden by one request's own fields."""
    return replace(defaults, **{k: v for k, v in request_values.items() if v is not None})
