"""One engine segment of a pipeline: batch -> encode -> kv_lookup -> generate stage(s).

Its stages configure one `Engine` (model, KV pool, batching) driven by the plan's
`Executor` in its own batching loop; requests arrive tokenised (`tokenise` runs per item
on the pipeline's worker pool) and leave as finished sequences.

    spec = segment_spec(graph, segment, kv_share)     # what its stages ask of the engine
    seg = EngineSegment(spec, plan, overrides={"threads": 2}, trace=trace, models=models)
    ids = seg.tokenise(item_data)                     # encode.tokenise (any thread)
    seg.submit("r1/0", ids, seg.sampling("gen", item_data, len(ids)))
    seg.drive(on_output, on_error)                    # this thread; or seg.start(...) for a thread of its own
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field, fields, replace
from typing import Any

import networkx as nx

from pipeline_dsl.graph import Segment
from stages.fields import REQUEST_FIELDS

# request fields that override a generate stage's sampling defaults: each generate parameter a
# request may set (stages/fields.py), and the per-request ones no stage sets
SAMPLING_FIELDS = tuple(f for f in REQUEST_FIELDS if f != "n") + (
    "stop_token_ids", "logit_bias", "allowed_token_ids", "logprobs", "prompt_logprobs", "skip_special_tokens",
    "spaces_between_special_tokens", "include_stop_str_in_output", "pooling", "cache_salt")
# constraints a request may bring (response_format, or agp serve's mapping of vLLM's guided fields)
CONSTRAINTS = ("json_object", "json_schema", "regex", "choice", "grammar", "structural_tag")


@dataclass
class SegmentSpec:
    """What the stages of one engine segment ask of its engine."""
    segment: Segment
    engine: dict[str, Any] = field(default_factory=dict)          # EngineConfig fields
    sampling: dict[str, dict] = field(default_factory=dict)       # generate stage -> SamplingParams defaults
    given_sampling: dict[str, set] = field(default_factory=dict)  # generate stage -> those its file sets
    n: dict[str, int] = field(default_factory=dict)               # generate stage -> answers per request
    json_schema: dict[str, dict] = field(default_factory=dict)    # generate stage -> schema every answer follows
    loras: dict[str, str] = field(default_factory=dict)           # generate stage -> its LoRA adapter's folder
    chat_template: bool = True                                    # encode: render messages with the template
    add_special_tokens: bool = True                               # encode: BOS on raw prompts


def segment_spec(graph: nx.DiGraph, segment: Segment) -> SegmentSpec:
    """Each stage of the segment contributes its settings (stages.impl); a kv_lookup without
    its own budget already holds its share of the pipeline's (graph.build_graph)."""
    from stages.impl import implementation

    spec = SegmentSpec(segment)
    settings = graph.graph.get("settings", {})
    if settings.get("threads") is not None:
        spec.engine["threads"] = settings["threads"]
    for stage in (segment.batch, segment.encode, segment.kv):
        data = graph.nodes[stage]
        implementation(data["kind"])().configure(dict(data["params"]), spec)
    for gen in segment.generates:
        implementation("generate")().configure(dict(graph.nodes[gen]["params"]), spec, stage=gen,
                                               given=graph.nodes[gen].get("given", ()))
    for node in graph:                         # the request source's prompt limit applies to every engine
        if graph.nodes[node].get("kind") == "requests":
            limit = graph.nodes[node]["params"].get("max_prompt_tokens")
            if limit:
                spec.engine["max_prompt_tokens"] = limit
    if spec.engine.get("model") is None:
        spec.engine.pop("model", None)         # the embedded default
    if spec.engine.get("device") is None:
        spec.engine.pop("device", None)
    return spec


class DeviceUnavailable(Exception):
    """The segment's `device` cannot be had on this machine (the engine's InputError in `error`);
    `from_overrides` when the caller's overrides chose it, not the pipeline file."""

    def __init__(self, error: Exception, device: str, *, from_overrides: bool = False):
        super().__init__(str(error))
        self.error, self.device, self.from_overrides = error, device, from_overrides


class EngineSegment:
    """An Engine and its Executor for one segment; thread-safe submit / abort / tokenise."""

    def __init__(self, spec: SegmentSpec, plan, *, overrides: dict | None = None, overlap: bool | None = None,
                 trace=None, engine=None, models=None):
        from pipeline_dsl.engine import Engine, EngineConfig, InputError, SamplingParams
        from pipeline_dsl.engine.engine import resolve_device
        from pipeline_dsl.engine.executor import Executor

        self.spec, self.segment = spec, spec.segment
        self.name = spec.segment.name
        known = {f.name for f in fields(EngineConfig)}
        values = {k: v for k, v in spec.engine.items() if k in known}
        values.update({k: v for k, v in (overrides or {}).items() if v is not None and k in known})
        try:
            values["device"] = resolve_device(str(values.get("device") or "auto"))
        except InputError as exc:              # the runtime says where the pipeline asks for it
            raise DeviceUnavailable(exc, str(values.get("device")),
                                    from_overrides=bool((overrides or {}).get("device"))) from exc
        values["max_queue"] = 1 << 20            # the pipeline bounds admission (requests.max_queue)
        self.config = EngineConfig(**values)
        # models (engine.models.LoadedModels): the runtime's, so that segments on the same weights load them once
        self.engine = engine if engine is not None else Engine(self.config, models=models)
        self._add_loras(spec, InputError)
        self.executor = Executor(self.engine, plan, overlap=overlap, trace=trace)
        # a stage's sampling defaults: what its file sets, over the model's generation config (vLLM's
        # --generation-config auto), over the stage parameters' own defaults
        model = getattr(self.engine, "generation_defaults", None) or {}
        self.defaults = {g: SamplingParams(**{**spec.sampling.get(g, {}), **{
            k: v for k, v in model.items() if k not in spec.given_sampling.get(g, ())}})
            for g in spec.segment.generates}
        self.n = dict(spec.n)
        self._compiler = None                    # constrain.ConstraintCompiler, built at first use
        self._compiler_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.run_stats: dict = {}

    def _add_loras(self, spec: SegmentSpec, InputError) -> None:
        """Load each generate stage's own LoRA adapter (its `lora`) into the engine; InputError
        naming the stage, the file and the key of one that does not fit the model."""
        from pipeline_dsl.engine.lora import LoraError, read_adapter
        from stages.impl import lora_name

        self.own_loras = frozenset(lora_name(gen) for gen in spec.loras)   # not a request's to name
        for gen, folder in spec.loras.items():
            try:
                self.add_lora(read_adapter(folder, lora_name(gen)))
            except LoraError as e:
                raise InputError(f"generate stage '{gen}': lora: {e}") from None

    def add_lora(self, adapter) -> None:
        """Serve a LoRA adapter (engine.lora.read_adapter's) on this segment's engine; lora.LoraError
        where its matrices don't fit the model."""
        self.engine.add_lora(adapter)

    @property
    def loras(self) -> tuple[str, ...]:
        """The names of the LoRA adapters this segment's engine serves (its stages' own among them)."""
        return self.engine.loras

    # ---- the engine's public facts (the runtime asks these, never the engine) ----------
    @property
    def model_ref(self) -> str | None:
        """The model its stages name (None: the embedded default)."""
        return self.spec.engine.get("model")

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @functools.cached_property
    def thinking_reader(self) -> tuple:
        """(id -> the token's bytes, cached; the id of `</think>` where it is one token, else None):
        what counting an answer's thinking tokens reads (reasoning.count_token_ids)."""
        from pipeline_dsl.reasoning import END, END_BYTES

        tok = self.tokenizer
        bytes_of = functools.lru_cache(maxsize=1 << 16)(tok.token_bytes)
        to_id = getattr(tok, "token_to_id", None)
        end_id = to_id(END) if to_id is not None else None
        return bytes_of, end_id if end_id is not None and bytes_of(end_id) == END_BYTES else None

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_prompt_chars(self) -> int | None:
        return self.engine.max_prompt_chars

    @property
    def model_info(self) -> dict:
        return dict(self.engine.model_info)

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    def check_prompt_length(self, data: dict) -> None:
        """Refuse at once (InputError) a prompt too long for any tokenisation."""
        self.engine.check_prompt_length(data.get("prompt"), data.get("messages"), data.get("prompt_token_ids"))

    def prompt_ids(self, request: dict) -> list[int]:
        """A prompt or a conversation as the engine sees it by default (agp serve's /tokenize)."""
        if request.get("messages") is not None:
            return self.engine.prompt_ids(messages=request["messages"], tools=request.get("tools"),
                                          tool_choice=request.get("tool_choice", "auto"),
                                          template_kwargs=request.get("chat_template_kwargs"),
                                          **render_options(request), **prompt_options(request))
        return self.engine.prompt_ids(prompt=request["prompt"],
                                      add_special_tokens=request.get("add_special_tokens", True),
                                      allow_empty=True, **prompt_options(request))

    # ---- per item (any thread) -------------------------------------------------------
    def tokenise(self, data: dict) -> list[int]:
        """encode.tokenise: the request's prompt as ids (raises InputError for bad input)."""
        if data.get("messages") is not None:
            return self.engine.prompt_ids(messages=data["messages"], chat_template=self.spec.chat_template,
                                          add_special_tokens=self.spec.add_special_tokens,
                                          tools=data.get("tools"), tool_choice=data.get("tool_choice", "auto"),
                                          template_kwargs=data.get("chat_template_kwargs"), **render_options(data),
                                          **prompt_options(data))
        if data.get("prompt_token_ids") is not None:
            return self.engine.prompt_ids(prompt_token_ids=data["prompt_token_ids"], **prompt_options(data))
        return self.engine.prompt_ids(prompt=data.get("prompt"),
                                      add_special_tokens=data.get("add_special_tokens", self.spec.add_special_tokens),
                                      **prompt_options(data))

    def prompt_tokens_at_most(self, data: dict) -> int | None:
        """At most how many ids tokenise(data) gives, counted without tokenising it: a text
        prompt's UTF-8 bytes and the special tokens the engine adds, a conversation's as its
        chat template renders it, with the tools and markers the template writes
        (Engine.prompt_tokens_at_most); None for ids, an empty prompt (refused as it is
        tokenised), truncate_prompt_tokens, or a tokenizer that cannot bound it."""
        if data.get("prompt_token_ids") is not None or data.get("truncate_prompt_tokens"):
            return None
        bound = getattr(self.engine, "prompt_tokens_at_most", None)
        if bound is None:
            return None
        if data.get("messages") is not None:
            return bound(messages=data["messages"], chat_template=self.spec.chat_template,
                         add_special_tokens=self.spec.add_special_tokens, tools=data.get("tools"),
                         tool_choice=data.get("tool_choice", "auto"), template_kwargs=data.get("chat_template_kwargs"),
                         **render_options(data))
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return None
        return bound(prompt=prompt, add_special_tokens=data.get("add_special_tokens", self.spec.add_special_tokens))

    def sampling(self, gen: str, data: dict, prompt_len: int, copy: int = 0, keep_special: bool = False):
        """A request's SamplingParams at generate stage `gen`: the stage's defaults, the request's
        own fields over them; without its own max_tokens, at most what the context leaves; copy i
        of n gets seed + i. keep_special: special tokens' text stays in the answer unless the
        request sets skip_special_tokens itself (the runtime's keeps_markers: a tool-call marker)."""
        given = {k: data[k] for k in SAMPLING_FIELDS if data.get(k) is not None}
        if keep_special:
            given.setdefault("skip_special_tokens", False)
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        if "bad_words" in given:
            given["bad_words"] = self._bad_words(gen, given["bad_words"])
        constraint = self.constraint_spec(gen, data)
        if constraint is not None:
            given["constraint"] = self.compile(constraint)
        model = data.get("model")                # a LoRA adapter this engine serves (agp serve --lora-modules)
        if isinstance(model, str) and model in self.loras and model not in self.own_loras:
            given["lora"] = model
        params = replace(self.defaults[gen], **given)
        if "max_tokens" not in given:
            params = replace(params, max_tokens=self.default_max_tokens(params.max_tokens, prompt_len))
        if copy and params.seed is not None:
            params = replace(params, seed=(params.seed + copy) & ((1 << 63) - 1))
        params.check()
        return params

    def _bad_words(self, gen: str, own):
        """A request's bad_words added to its generate stage's, which stay banned (a request's `[]`,
        vLLM clients' default, adds none); InputError when together they are more than the
        parameter allows."""
        from pipeline_dsl.engine.errors import InputError
        from stages.fields import param_of

        if not isinstance(own, (str, list, tuple)):
            return own                           # SamplingParams.check names it
        stage = self.defaults[gen].bad_words
        words = tuple(dict.fromkeys((*stage, *([own] if isinstance(own, str) else own))))
        most = param_of("generate", "bad_words").max_items
        if stage and len(words) > most:
            raise InputError(f"'bad_words' adds {len(words) - len(stage)} words to the {len(stage)} generate stage "
                             f"'{gen}' bans: at most {most} in all", param="bad_words")
        return words

    def constraint_spec(self, gen: str, data: dict) -> dict | None:
        """What the request's answer must follow: a forced tool call (tool_choice "required" or
        a named function), the request's response_format, else the stage's json_schema; None
        when the answer is free text (a request's `{"type": "text"}` too, over the stage's schema)."""
        from pipeline_dsl.tools import tool_call_spec

        if data.get("tools") and data.get("tool_choice") not in (None, "auto", "none"):
            spec = tool_call_spec(data["tools"], data["tool_choice"])
            if spec is not None:
                return {**spec, "parallel": bool(data.get("parallel_tool_calls", True))}
        fmt = data.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") in CONSTRAINTS:
            return fmt
        if isinstance(fmt, dict) and fmt.get("type") == "text":     # the request's own: free text
            return None
        if gen in self.spec.json_schema:
            return {"type": "json_schema", "schema": self.spec.json_schema[gen]}
        return None

    def needs_compile(self, data: dict) -> bool:
        """Whether entering the request builds a grammar (its forced tool call's, its
        response_format's or a generate stage's json_schema, not compiled before: seconds of CPU
        for a large spec), which the runtime does on its compile threads, not the host pool's."""
        specs = [spec for gen in self.segment.generates if (spec := self.constraint_spec(gen, data)) is not None]
        if not specs:
            return False
        compiler = self._compiler             # not under its lock, which its first build holds for a while
        return compiler is None or not all(compiler.cached(spec) for spec in specs)

    def compile(self, spec: dict):
        """A compiled constraint (cached by the compiler); InputError when it cannot compile."""
        from pipeline_dsl.engine.constrain import ConstraintCompiler, GrammarError
        from pipeline_dsl.engine.errors import InputError
        from pipeline_dsl.requests_io import INVALID_PARAMETERS

        with self._compiler_lock:
            if self._compiler is None:
                try:
                    self._compiler = ConstraintCompiler(self.engine.tokenizer, self.engine.vocab_size,
                                                        eos_token_ids=self.engine.eos_token_ids)
                except (GrammarError, ValueError) as e:
                    raise InputError(f"constrained output is not available with this model: {e}") from None
        try:
            return self._compiler.compile(spec)
        except GrammarError as e:      # a forced call's tool names its parameters (tools[i].function.parameters),
            # with OpenAI's code for a tool's parameters it refuses, as the request's own check gives it
            what = e.param or ("tool_choice" if spec.get("type") == "tool_call" else "response_format")
            raise InputError(f"'{what}' cannot be enforced: {e}", param=what,
                             code=INVALID_PARAMETERS if e.param else None) from None

    def check_fits(self, prompt_len: int, data: dict) -> None:
        """InputError for a request whose prompt of `prompt_len` tokens no generate stage of this
        segment can run, with the max_tokens it asks for (without one, each stage's default fits
        what the context leaves: sampling): what the engine's admission refuses it for. A request
        answered without the engine (max_tokens 0, an echo) only has the prompt limit."""
        own = data.get("max_tokens")
        if own is not None and (not isinstance(own, int) or isinstance(own, bool)):
            return                               # SamplingParams.check names it at admission
        if own is None:
            own = self.default_max_tokens(min((p.max_tokens for p in self.defaults.values()), default=1),
                                          prompt_len)
        elif own == 0 and data.get("pooling") is None and data.get("prompt_logprobs") is None:
            if self.engine.config.max_prompt_tokens and prompt_len > self.engine.prompt_limit:
                self.engine.check_fits(prompt_len, 0)    # a prompt limit set, alone: the echo needs no context
            return
        self.engine.check_fits(prompt_len, own)

    def default_max_tokens(self, wanted: int, prompt_len: int) -> int:
        """The max_tokens of a request that sets none: its stage's `wanted`, at most what the
        context leaves after its prompt of `prompt_len` tokens (where it leaves any)."""
        room = self.engine.max_model_len - prompt_len
        return room if 0 < room < wanted else wanted

    def copies(self, gen: str, data: dict) -> int:
        n = data.get("n")
        return int(n) if n is not None else self.n.get(gen, 1)

    def check_priority(self, priority) -> None:
        """InputError for a request's priority this segment's batcher cannot honour."""
        self.engine.check_priority(priority)

    def submit(self, seq_id: str, ids: list[int], params, order=None, priority: int = 0) -> None:
        self.executor.submit(seq_id, order=order, prompt_token_ids=ids, params=params, priority=priority)

    def abort(self, seq_id: str) -> None:
        self.executor.abort(seq_id)

    def park(self, seq_id: str, parked: bool = True) -> None:
        self.executor.park(seq_id, parked)

    # ---- driving -----------------------------------------------------------------------
    def drive(self, on_output, on_error, on_admitted=None) -> dict:
        """Run the executor on this thread until close() and idle (`on_admitted(seq_ids)`: the
        sequences the engine took, Executor.run's). The trace's overlap is left to whoever reads the
        trace (the runtime's summary, once): not walked at the end of every run."""
        try:
            self.run_stats = self.executor.run(on_output=on_output, on_error=on_error, on_admitted=on_admitted,
                                               until_idle=False, measure=False)
            return self.run_stats
        except BaseException as e:              # noqa: BLE001 - the runtime reports it to every waiter
            self.error = e
            raise

    def start(self, on_output, on_error, on_failure, on_admitted=None) -> None:
        def run():
            try:
                self.drive(on_output, on_error, on_admitted)
            except BaseException as e:          # noqa: BLE001
                on_failure(self, e)
        self._thread = threading.Thread(target=run, name=f"agp-engine-{self.name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Let the batching loop end once this engine is idle."""
        self.executor.close()

    def reopen(self) -> None:
        """Take work again after close() (a warm-up run, then the measured one)."""
        self.executor.reopen()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stats(self) -> dict:
        with self.executor.lock:
            s = self.engine.stats(latencies=False)
        s["work_s"] = dict(self.executor.work_s)
        s["work_n"] = dict(self.executor.work_n)
        return s


def render_options(data: dict) -> dict:
    """How a conversation's end is rendered (the request's add_generation_prompt and
    continue_final_message; vLLM's defaults when absent)."""
    return {"add_generation_prompt": data.get("add_generation_prompt", not data.get("continue_final_message")),
            "continue_final_message": bool(data.get("continue_final_message"))}


def prompt_options(data: dict) -> dict:
    """What the request asks of its prompt's tokens: its last truncate_prompt_tokens alone."""
    return {"keep_last": data.get("truncate_prompt_tokens")}
