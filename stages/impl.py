"""Runtime implementations of the built-in stage kinds.

Each kind is a thin adapter between the pipeline graph and the engine: it reads its
checked parameters and contributes them to the `RuntimeSpec` that the runtime turns
into one `EngineConfig` (batching, KV cache, precision, compilation) and the default
`SamplingParams`. The engine then runs the stages' work: `requests` admission and
queue bound, `dynamic_batch` windowing and continuous batching, `encode`
tokenisation, `kv_lookup` prefix reuse in the block pool, `generate` the model and
sampler, `respond` detokenisation and output.

A third-party kind names its implementation in its registry entry (`impl =
"package.module:attr"`); the object needs a `configure(params, spec)` method.
"""
from __future__ import annotations

import importlib
from typing import Any, Protocol


class StageImpl(Protocol):
    def configure(self, params: dict[str, Any], spec) -> None: ...


def _copy(params: dict, target: dict, mapping: dict[str, str]) -> None:
    for src, dst in mapping.items():
        if params.get(src) is not None:
            target[dst] = params[src]


class Requests:
    """Request source: bounds the waiting queue and the prompt length."""

    def configure(self, params, spec):
        _copy(params, spec.engine, {"max_queue": "max_queue", "max_prompt_tokens": "max_prompt_tokens"})


class SystemPrompt:
    """Puts one shared system message first in every chat request (prefix reuse serves it)."""

    def configure(self, params, spec):
        spec.system_prompt = params["text"]
        spec.system_override = bool(params.get("override", False))


class DynamicBatch:
    """The seed's batcher: dispatch at `max_batch_size` or after `timeout`."""

    def configure(self, params, spec):
        _copy(params, spec.engine, {
            "max_batch_size": "max_batch_size",
            "timeout": "batch_timeout_s",        # normalised to seconds by the checker
            "padding": "padding",
            "policy": "policy",
            "max_tokens_per_step": "max_tokens_per_step",
        })


class Encode:
    """Tokenisation: chat template for `messages`, special tokens for raw prompts."""

    def configure(self, params, spec):
        if params.get("chat_template") is not None:
            spec.chat_template = bool(params["chat_template"])
        if params.get("add_special_tokens") is not None:
            spec.add_special_tokens = bool(params["add_special_tokens"])


class KVLookup:
    """Paged KV cache: block size, byte budget and prefix reuse."""

    def configure(self, params, spec):
        _copy(params, spec.engine, {"block_size": "block_size", "budget": "kv_budget_bytes"})
        if params.get("reuse") is not None:
            spec.engine["prefix_reuse"] = params["reuse"] == "prefix"


class Generate:
    """The model and the sampler: precision, compilation, chunked prefill, sampling defaults."""

    def configure(self, params, spec):
        precision = params.get("precision")
        # the pipeline's own `dtype` (when not auto) wins over the stage's precision, which
        # is usually the mode's preset (int8 in efficient); "auto" leaves the dtype as it is
        if precision not in (None, "auto") and spec.engine.get("dtype", "auto") == "auto":
            spec.engine["dtype"] = precision
        _copy(params, spec.engine, {"compile": "compile", "prefill_chunk": "prefill_chunk"})
        _copy(params, spec.sampling, {
            "max_new_tokens": "max_tokens",
            "temperature": "temperature",
            "top_p": "top_p",
            "top_k": "top_k",
            "seed": "seed",
            "ignore_eos": "ignore_eos",
        })
        if params.get("stop"):
            spec.sampling["stop"] = list(params["stop"])


class Respond:
    """Output: detokenised text, finish reason and usage; streamed or whole."""

    def configure(self, params, spec):
        if params.get("stream") is not None:
            spec.stream = bool(params["stream"])




class NoImplementation(LookupError):
    pass


def implementation(kind: str) -> StageImpl:
    """The runtime implementation of a stage kind: the registry entry's `impl`."""
    from stages.registry import get_kind  # registry: schemas, entry points

    entry = get_kind(kind)
    target = getattr(entry, "impl", None) if entry is not None else None
    if not target:
        raise NoImplementation(f"stage kind '{kind}' has no runtime implementation")
    module, _, attr = str(target).partition(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj() if isinstance(obj, type) else obj
