"""From `agp serve` flags to what serves them: the pipeline runtime, its asyncio face, the
metrics and the FastAPI app (`build(args) -> Serving`). The command builds it once; each Ray
Serve replica builds its own from the same flags (serve/ray.py).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .options import ENGINE_VARIABLES, SetupError, check_args, given_as, model_named, template_text

# The pipeline `agp serve MODEL` serves a model with (vLLM's `vllm serve MODEL`): the stages of
# examples/chat.agp, each with its defaults but generate's sampling (VLLM_SAMPLING), the model as FILE
# names it
MODEL_PIPELINE = """pipeline {name} {{
    model = {model}
    stage request : requests      {{}}
    stage batch   : dynamic_batch {{}}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{}}
    stage gen     : generate      {{{sampling}}}
    stage out     : respond       {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""
MODEL_PIPELINE_NAME = "model"
# vLLM's sampling defaults where the model's generation config sets none (its SamplingParams'):
# temperature 1, and max_tokens all the context leaves (the generate stage cuts max_new_tokens to it)
VLLM_SAMPLING = {"temperature": ("temperature", 1.0), "max_tokens": ("max_new_tokens", 1 << 20)}
# ... but a /v1/completions request that sets no max_tokens gets 16, as vLLM's CompletionRequest (and
# OpenAI's completions API) defaults it, or the generation config's max_new_tokens where that is fewer
VLLM_COMPLETION_MAX_TOKENS = 16


def pipeline_graph(args):
    """What `agp serve` loads for FILE (`args.pipeline`): the path of a pipeline file, or, when FILE
    names a model (model_named), the checked graph of MODEL_PIPELINE around it."""
    import json

    from pipeline_dsl import load_pipeline_graph

    model = model_named(args.pipeline)
    if model is None:
        return args.pipeline
    from pipeline_dsl.engine.errors import InputError
    from pipeline_dsl.engine.models import generation_defaults, resolve_model

    try:                    # what the model's generation config (and --override-generation-config) sets
        recommended = generation_defaults(resolve_model(model), args.generation_config,
                                          override=args.override_generation_config)
    except InputError:      # the engine says what is wrong with it, as for a pipeline file
        recommended = {}
    sampling = "".join(f" {param} = {value}" for field, (param, value) in VLLM_SAMPLING.items()
                       if field not in recommended)
    text = MODEL_PIPELINE.format(name=MODEL_PIPELINE_NAME, model=json.dumps(model, ensure_ascii=False),
                                 sampling=sampling + " " if sampling else "")
    return load_pipeline_graph(args.pipeline, text=text)


def served_names(args) -> list[str] | None:
    """--served-model-name; left out, FILE as given when it names a model (vLLM's default: the
    model as `vllm serve` was given it, which its clients send as `model`)."""
    if args.served_model_name or model_named(args.pipeline) is None:
        return args.served_model_name
    return [args.pipeline]


def model_names(runtime, served: list[str] | None) -> tuple[str, ...]:
    """The ids /v1/models lists and requests may name: the served names first, then the
    pipeline's name and its model's (a model file's name and stem, never its path: no answer
    shows where the server's files are)."""
    names = list(served or [])
    names.append(runtime.name)
    for es in runtime.segments[:1]:
        model = Path(str(es.config.model))
        names += [model.name, model.stem]
    return tuple(dict.fromkeys(n for n in names if n))


def served_context(runtime) -> int:
    """The context a request is bounded by (its max_tokens, its prompt's tokens): the least of the
    pipeline's engines', or 1 << 20 where it has none (no generate stage: its stages bound it)."""
    return int(min((es.max_model_len for es in runtime.segments), default=1 << 20))


def allowed_hosts(host: str, given: str | None) -> tuple[str, ...]:
    """The Host header values the server answers for (DNS rebinding protection)."""
    if given:
        return tuple(h.strip().lower() for h in given.split(",") if h.strip())
    if host in ("0.0.0.0", "::", ""):
        return ("*",)                     # listening everywhere: the public name is not known here
    return tuple(dict.fromkeys([host.lower(), "localhost", "127.0.0.1", "::1"]))


def request_headers(named: list[str] | None, graph) -> tuple[str, ...]:
    """The HTTP headers each request copies into its item: those --request-headers names, then
    those the pipeline's conditions compare (`when headers["x-tenant"] == "gold"` routes by the
    header without the flag); a SetupError when they are more than a request may carry."""
    from pipeline_dsl.graph import headers_read
    from pipeline_dsl.requests_io import MAX_HEADERS

    read = headers_read(graph)
    copied = tuple(dict.fromkeys([*(named or ()), *read]))
    if len(copied) > MAX_HEADERS:
        raise SetupError(f"{len(copied)} request headers ({len(named or ())} from --request-headers, "
                         f"{len(read)} that the pipeline's conditions compare): a request carries at most "
                         f"{MAX_HEADERS}")
    return copied


MODEL_KEYS = ("weights", "dtype", "attention", "vocab_size", "context_length")


def system_fingerprint(runtime, chat_template: str | None = None) -> str:
    """OpenAI's system_fingerprint: a digest of what decides the answers besides the request (agp's
    version, the engine variables, and each engine's settings, model file, weights and compute
    dtype, device, its generate stages' defaults, the chat template), so a client reading seeded
    answers sees when the server behind them changed. Paths go into the digest, never the answer."""
    from pipeline_dsl import __version__

    parts = [__version__, runtime.name, chat_template or "",
             *(f"{v}={os.environ.get(v, '')}" for v in ENGINE_VARIABLES)]
    for es in runtime.segments:
        model = Path(str(es.config.model))
        size = model.stat().st_size if model.is_file() else 0
        info = es.engine.model_info                # what was loaded, not how long it took
        parts += [es.name, repr(es.config), str(size), repr([info.get(k) for k in MODEL_KEYS]),
                  str(es.engine.device), repr(sorted(es.defaults.items()))]
    return "fp_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


@dataclass
class Serving:
    """What `agp serve` runs: the pipeline, its asyncio face and the FastAPI app over it."""
    runtime: object
    apipe: object
    app: object
    config: object
    metrics: object


def build(args, *, host: str | None = None) -> Serving:
    """The app for these flags (checked; raises SetupError or CheckFailed): also what each Ray
    Serve replica builds (pipeline_dsl.serve.ray)."""
    from pipeline_dsl.engine.errors import InputError
    from pipeline_dsl.engine.tokenizer import compile_chat_template
    from pipeline_dsl.engine.trace import Trace
    from pipeline_dsl.flow import build_runtime

    from .app import create_app
    from .async_pipeline import AsyncPipeline
    from .config import ServeConfig
    from .lora import attach, read_modules
    from .metrics import ServerMetrics

    check_args(args)
    template = None
    if args.chat_template:
        try:                                   # before the model loads: a template that does not parse stops the start
            inline = template_text(args.chat_template)
            template = args.chat_template if inline else Path(args.chat_template).read_text(encoding="utf-8")
            compile_chat_template(template, "the template")
        except (OSError, UnicodeDecodeError, InputError) as e:
            shown = "(the template given inline)" if inline else args.chat_template
            raise SetupError(f"--chat-template {shown}: {e}") from None
    served = served_names(args)
    adapters = read_modules(getattr(args, "lora_modules", None))    # before the model loads: a bad folder stops at once
    try:
        runtime = build_runtime(pipeline_graph(args), args.name, overlap=False if args.no_overlap else None, max_queue=args.max_queue,
                                allow_paths=getattr(args, "allow_path", ()),
                                served_name=(served or [None])[0],
                                trace=Trace(limit=1_000_000 if args.trace else 0),   # spans only for --trace
                                overrides={"dtype": args.dtype, "threads": args.threads,
                                           "max_prompt_tokens": args.max_input_tokens,
                                           "prompt_limit_by": given_as(args, "max_input_tokens")
                                           if args.max_input_tokens else None,
                                           "max_model_len": args.max_model_len,
                                           "max_model_len_by": given_as(args, "max_model_len"),
                                           "max_batch_size": args.max_num_seqs,
                                           "scheduling_policy": args.scheduling_policy,
                                           "seed": args.seed, "chat_template": template,
                                           "tool_call_parser": getattr(args, "tool_call_parser", "auto"),
                                           "reasoning_parser": getattr(args, "reasoning_parser", None),
                                           "generation_config": args.generation_config,
                                           "override_generation_config": args.override_generation_config,
                                           "prefix_reuse": False if args.no_prefix_reuse else None,
                                           **(getattr(args, "speculative_config", None) or {})})
    except InputError as e:
        raise SetupError(str(e)) from None
    names = model_names(runtime, served)
    try:
        loras = attach(runtime, adapters, names, tuple(runtime.seg_of_gen))
    except SetupError:
        runtime.close()                       # loaded already: its engines' threads go with it
        raise
    names += tuple(a.name for a in loras)     # a request may name an adapter as it names the model
    copied = request_headers(args.request_headers, runtime.graph)
    completion_max_tokens = None
    if model_named(args.pipeline) is not None:      # vLLM's defaults (MODEL_PIPELINE has one generate stage)
        completion_max_tokens = min([VLLM_COMPLETION_MAX_TOKENS, *(params.max_tokens for es in runtime.segments
                                                                    for params in es.defaults.values())])
    config = ServeConfig(model_names=names, max_model_len=served_context(runtime),
                         stages=tuple((g, Path(str(es.config.model)).name) for g, es in runtime.seg_of_gen.items()),
                         loras=loras,
                         stage_loras=tuple((g, Path(str(es.spec.loras[g])).name) for g, es in runtime.seg_of_gen.items()
                                           if g in es.spec.loras),
                         drain_timeout_s=args.drain_timeout, max_body_bytes=args.max_body_bytes,
                         retry_after_s=args.retry_after_s,
                         body_timeout_s=args.body_timeout, body_min_rate=args.body_min_rate,
                         max_connections=args.max_connections, max_body_bytes_arriving=args.max_body_bytes_arriving,
                         allowed_hosts=allowed_hosts(host or args.host, args.allowed_hosts),
                         max_prompt_chars=max((es.max_prompt_chars or 0 for es in runtime.segments),
                                              default=0) or None,
                         max_stage_n=runtime.stage_n,
                         completion_max_tokens=completion_max_tokens,
                         lenient=args.lenient, api_keys=tuple(args.api_key or ()),
                         allowed_origins=tuple(args.allowed_origins or ()),
                         stats_interval_s=args.stats_interval, trace_path=args.trace,
                         root_path=args.root_path, system_fingerprint=system_fingerprint(runtime, template),
                         quiet_paths=tuple(args.disable_access_log_for_endpoints or ()),
                         request_headers=copied,
                         exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
                         return_tokens_as_token_ids=args.return_tokens_as_token_ids)
    metrics = ServerMetrics(model_name=names[0], engine_of={g: str(i) for i, es in enumerate(runtime.segments)
                                                            for g in (es.name, *es.segment.generates)})
    apipe = AsyncPipeline(runtime, metrics=metrics, max_unread_tokens=args.max_unread_tokens,
                          pause_unread_tokens=args.pause_unread_tokens, pause_limit_s=args.send_timeout)
    return Serving(runtime, apipe, create_app(apipe, config, metrics), config, metrics)
