"""Runtime implementations of the built-in stage kinds.

Two families (docs/architecture.md, "Stage implementations"):

- Request-level kinds process one item at a time on the pipeline's host worker pool:
  `Kind(name, params, context)` once per pipeline, then `process(item) -> result` per item,
  where `item` is the item's plain dict (a Request: id, messages or prompt, sampling
  fields, metadata; a Generated result: id, text, finish_reason, usage, request) and the
  result is the dict (the same, changed in place, or a new one), None (the dict as it is
  now), or a label string that `when LABEL` edges match. Raising `pipeline_dsl.Reject`
  refuses the request with its message; any other exception fails the request (and only it)
  with the stage's name. `join` merges instead: `merge(items) -> dict`.
- The engine kinds (dynamic_batch, encode, kv_lookup, generate) configure one engine
  segment: `configure(params, segment_spec)` contributes EngineConfig fields, the encode
  switches and each generate stage's sampling defaults (pipeline_dsl.flow.segment).

A third-party kind names its class in its registry entry (`impl = "package.module:Class"`)
and implements `process` like the request-level kinds here.
"""
from __future__ import annotations

import importlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class StageContext:
    """What a stage implementation may know about its place in the pipeline."""
    pipeline: str
    stage: str
    kind: str
    base_dir: str | None          # the .agp file's folder: user modules are looked up here first


class ItemStage(Protocol):
    def process(self, item: dict) -> dict | str | None: ...


def _copy(params: dict, target: dict, mapping: dict[str, str]) -> None:
    for src, dst in mapping.items():
        if params.get(src) is not None:
            target[dst] = params[src]


# ---------------------------------------------------------------- request-level kinds

class Requests:
    """The request source: admission (the queue bound is the runtime's) and nothing else."""

    def __init__(self, name: str, params: dict, context: StageContext):
        self.params = params

    def process(self, item: dict) -> dict:
        return item


class SystemPrompt:
    """Puts one shared system message first in every chat request (prefix reuse serves it)."""

    def __init__(self, name: str, params: dict, context: StageContext):
        self.text = params["text"]
        self.override = bool(params.get("override", False))

    def process(self, item: dict) -> dict:
        messages = item.get("messages")
        if messages is None:
            return item
        if messages and messages[0].get("role") == "system":
            if not self.override:
                return item
            messages = messages[1:]
        item["messages"] = [{"role": "system", "content": self.text}, *messages]
        return item


class Route:
    """Routing happens on its out-edges' conditions; the item passes unchanged."""

    def __init__(self, name: str, params: dict, context: StageContext):
        pass

    def process(self, item: dict) -> dict:
        return item


class Python:
    """Calls the user's function `fn` on each item (its dict, a copy of the item's own). The
    runtime runs it as its shape says (pipeline_dsl.flow.workers): a plain function on the
    stage's threads, an `async def` on the event loop, a generator as a stream filter."""

    def __init__(self, name: str, params: dict, context: StageContext):
        from pipeline_dsl.userfn import callable_shape, load_function

        self.ref = params["fn"]
        self.fn = load_function(self.ref, context.base_dir)
        self.shape = callable_shape(self.fn)          # function | coroutine | generator | async_generator
        self.stream = bool(params.get("stream"))
        args = params.get("args") or {}
        takes_call(self.fn, "fn(item, chunks)" if self.stream else "fn(item)", args)
        if self.stream and self.shape in ("function", "coroutine"):
            # a decorated generator (functools.wraps): check read the def, a generator, and the
            # wrapper hands back what the def makes, so it runs as the def's shape
            import inspect

            inner = callable_shape(inspect.unwrap(self.fn))
            if inner in ("generator", "async_generator"):
                self.shape = inner
        self.fn = with_args(self.fn, args)
        self.max_turns = params.get("max_turns")

    @property
    def is_async(self) -> bool:
        return self.shape in ("coroutine", "async_generator")

    def process(self, item: dict):
        if self.shape in ("generator", "async_generator") and not self.stream:
            raise TypeError(f"{self.ref} is a generator function; a python stage whose function yields "
                            "needs stream = true")
        return self.fn(item)


def with_args(fn, args: dict):
    """`fn` called with the stage's `args` as keywords after its positional arguments:
    fn(item, **args). Each call gets its own copy of them, so a function that changes a list it
    was given changes no other call's."""
    if not args:
        return fn
    import copy

    def call(*positional):
        return fn(*positional, **copy.deepcopy(args))
    return call


def takes_call(fn, call: str, keywords: dict | None = None) -> None:
    """Refuse, as the module is loaded, a callable whose signature cannot take `call`'s positional
    arguments (`fn(item)`: one) and the stage's `args` as keywords — what check could not read in
    the source (a lambda, a function a factory made, a decorated def) and that would otherwise fail
    every request alike (a keyword it refuses: userfn.ArgsRefused, at the stage's `args`). A decorator's
    wrapper is judged by its own signature, which may supply arguments itself; a wrapper that only
    passes its arguments on (`(*args, **kwargs)`) says nothing, and the function it wraps
    (`__wrapped__`, which functools.wraps sets) is judged instead. A bare pass-through wrapper
    without `__wrapped__` takes any call. A bound method's wrapped function is judged with the
    method's instance (or class) as its first argument, as the method passes it."""
    import functools
    import inspect

    from pipeline_dsl.userfn import ArgsRefused, FunctionNotFound

    def passes_on(f) -> bool:                 # (*args) or (*args, **kwargs)
        kinds = {p.kind for p in inspect.signature(f, follow_wrapped=False).parameters.values()}
        return inspect.Parameter.VAR_POSITIONAL in kinds and kinds <= {inspect.Parameter.VAR_POSITIONAL,
                                                                       inspect.Parameter.VAR_KEYWORD}

    bound = inspect.ismethod(fn)              # its __wrapped__ is the plain function, which takes self too
    try:
        target = inspect.unwrap(fn.__func__ if bound else fn, stop=lambda f: not passes_on(f))
        signature = inspect.signature(functools.partial(target, fn.__self__) if bound else target,
                                      follow_wrapped=False)
    except (TypeError, ValueError):           # a builtin without one (its calls say), a cycle of __wrapped__
        return
    positional = range(call.count(",") + 1)
    try:
        signature.bind(*positional)
    except TypeError as e:
        if not keywords:
            raise FunctionNotFound(f"it is called as {call}, but its signature {signature} cannot take "
                                   f"that: {e}") from None
    else:
        if not keywords:
            return
    try:
        signature.bind(*positional, **keywords)
    except TypeError as e:
        with_keywords = call[:-1] + ", " + ", ".join(f"{k}=…" for k in keywords) + ")"
        raise ArgsRefused(f"with its args it is called as {with_keywords}, but its signature {signature} "
                          f"cannot take that: {e}") from None


class Respond:
    """The end of a path: the runtime collects what arrives as the request's answers."""

    def __init__(self, name: str, params: dict, context: StageContext):
        pass

    def process(self, item: dict) -> dict:
        return item


_SPACES = re.compile(r"\s+")
_TRAILING = ".!?,;:。！？"


def normalise_answer(text: str) -> str:
    """The text a majority vote compares: lower case, spaces collapsed, trailing punctuation gone."""
    return _SPACES.sub(" ", text).strip().lower().rstrip(_TRAILING).strip()


class Join:
    """Merges the branches of one request: first | majority | longest | fn."""

    def __init__(self, name: str, params: dict, context: StageContext):
        self.policy = params.get("policy") or "first"
        self.on_reject = params.get("on_reject") or "fail"
        self.fn = None
        self.is_async = False
        if params.get("fn"):
            from pipeline_dsl.userfn import callable_shape, load_function
            self.fn = load_function(params["fn"], context.base_dir)
            args = params.get("args") or {}
            takes_call(self.fn, "fn(results)", args)
            self.is_async = callable_shape(self.fn) == "coroutine"
            self.fn = with_args(self.fn, args)
            self.policy = "fn"

    def merge(self, items: list[dict], awaited=None) -> dict:
        """`items`: in arrival order for `first`, else in branch order; returns the merged result.
        `awaited(value)`: what a plain fn returned, awaited where it is an awaitable (a decorated
        `async def`'s coroutine), as the runtime awaits a python stage's."""
        if self.policy == "fn":
            out = self.fn([dict(i) for i in items])
            return self._picked(items, awaited(out) if awaited is not None else out)
        if self.policy == "longest":
            return max(items, key=lambda i: len(i.get("text") or ""))      # ties: the earliest branch
        if self.policy == "majority":
            votes = Counter(normalise_answer(i.get("text") or "") for i in items)
            best = max(votes.values())
            return next(i for i in items if votes[normalise_answer(i.get("text") or "")] == best)
        return items[0]

    async def amerge(self, items: list[dict]) -> dict:
        """merge() with an `async def` fn."""
        return self._picked(items, await self.fn([dict(i) for i in items]))

    @staticmethod
    def _picked(items: list[dict], out) -> dict:
        """What the user's fn returned: a dict, or the index of one of the results."""
        if isinstance(out, int) and not isinstance(out, bool):
            if not 0 <= out < len(items):
                raise IndexError(f"the join function returned index {out}, but there are {len(items)} "
                                 f"results (0..{len(items) - 1})")
            out = items[out]
        if not isinstance(out, dict):
            raise TypeError(f"the join function returned {type(out).__name__}; expected one of the "
                            "result dicts (or its index)")
        return out


# ---------------------------------------------------------------- engine kinds

class DynamicBatch:
    """The seed's batcher: dispatch at `max_batch_size` or after `timeout`."""

    def configure(self, params, spec):
        _copy(params, spec.engine, {
            "max_batch_size": "max_batch_size",
            "timeout": "batch_timeout_s",        # normalised to seconds by the checker
            "padding": "padding",
            "policy": "policy",
            "scheduling_policy": "scheduling_policy",
            "max_tokens_per_step": "max_tokens_per_step",
            "itl_target": "itl_target_s",          # seconds, as timeout
            "long_prefill_threshold": "long_prefill_threshold",
        })


class Encode:
    """Tokenisation (per item, off the engine loop): chat template, special tokens."""

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
    """The model and the sampler: model, device, dtype, compilation, chunked prefill (the
    engine's, the same for every generate stage of one segment); sampling defaults and n (its own)."""

    # stage parameter -> the SamplingParams field it sets (stop and bad_words: below, as tuples)
    SAMPLING = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                "seed": "seed", "ignore_eos": "ignore_eos", "presence_penalty": "presence_penalty",
                "frequency_penalty": "frequency_penalty", "repetition_penalty": "repetition_penalty",
                "min_p": "min_p", "min_tokens": "min_tokens"}

    def configure(self, params, spec, stage: str | None = None, given=()):
        """`given`: the parameters the file sets (the model's generation config fills the others'
        sampling defaults, flow/segment.py)."""
        _copy(params, spec.engine, {"model": "model", "device": "device", "dtype": "dtype",
                                    "compile": "compile", "prefill_chunk": "prefill_chunk",
                                    "speculate": "speculate", "speculative_tokens": "speculative_tokens",
                                    "prompt_lookup_max": "prompt_lookup_max",
                                    "prompt_lookup_min": "prompt_lookup_min"})
        sampling: dict[str, Any] = {}
        _copy(params, sampling, self.SAMPLING)
        for name in ("stop", "bad_words"):
            if params.get(name):
                sampling[name] = tuple(params[name])
        if params.get("json_schema"):           # checked and made absolute by agp check
            import json
            from pathlib import Path

            spec.json_schema[stage or "generate"] = json.loads(Path(params["json_schema"]).read_text("utf-8"))
        if params.get("lora"):                  # checked and made absolute by agp check
            spec.loras[stage or "generate"] = params["lora"]
            sampling["lora"] = lora_name(stage or "generate")
        spec.sampling[stage or "generate"] = sampling
        spec.given_sampling[stage or "generate"] = {self.SAMPLING[p] for p in given if p in self.SAMPLING}
        spec.n[stage or "generate"] = int(params.get("n") or 1)


def lora_name(stage: str) -> str:
    """The name a generate stage's own LoRA adapter (its `lora`) is loaded under in its engine: the
    stage's, unique in the pipeline and what a user knows it by (vllm:lora_requests_info's
    running_lora_adapters and waiting_lora_adapters show it)."""
    return stage


class NoImplementation(LookupError):
    pass


def check_item_stage(kind: str, stage) -> None:
    """Refuse, as a plug-in kind's stage starts, an instance that could only fail every item: one
    without a `process` method, with a generator `process` (it hands back a generator, never the
    item), or with one whose signature cannot take process(item)."""
    import inspect

    from pipeline_dsl.userfn import FunctionNotFound

    what = f"stage kind '{kind}': its implementation {type(stage).__name__}"
    process = getattr(stage, "process", None)
    if not callable(process):
        raise NoImplementation(f"{what} has no process(item) method")
    if inspect.isgeneratorfunction(process) or inspect.isasyncgenfunction(process):
        raise NoImplementation(f"{what} has a process that yields; it must return the item's dict, a "
                               "label string or None")
    try:
        takes_call(process, "process(item)")
    except FunctionNotFound as e:
        raise NoImplementation(f"{what}: {e}") from None


def implementation(kind: str):
    """The runtime implementation of a stage kind (the registry entry's `impl`): a class or object."""
    from stages.registry import get_kind  # registry: schemas, entry points

    entry = get_kind(kind)
    target = getattr(entry, "impl", None) if entry is not None else None
    if not target:
        raise NoImplementation(f"stage kind '{kind}' has no runtime implementation")
    module, _, attr = str(target).partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise NoImplementation(f"stage kind '{kind}' ({entry.source}) cannot load its implementation "
                               f"{target!r}: {e}") from None
