"""Configuration and result dataclasses of the engine (the Engine API of docs/architecture.md).

`EngineConfig` is one run's settings (model, precision, KV budget, batching policy),
`SamplingParams` one request's decoding settings, `RequestOutput` what a step reports
for one request. `SamplingParams.check()` turns bad values into `InputError`.

The OpenAI/vLLM sampling features (penalties, logit_bias, allowed_token_ids, min_tokens, min_p,
logprobs, a grammar constraint) are applied by engine/processors.py; a request that uses none of
them takes the same path, at the same cost, as before they existed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from .cpus import available_cpus
from .errors import InputError

DTYPES = ("auto", "fp32", "bf16", "fp16", "int8")
MAX_THREADS = 1024                         # torch starts them all at once: 100000 crashed the process
MAX_LOGPROBS = 20                          # alternatives per token at most (OpenAI's top_logprobs)


@dataclass
class EngineConfig:
    model: str = "smollm2-135m-instruct"   # name of the embedded model, a .gguf path or an HF folder (str or Path)
    device: str = "cpu"                    # cpu | cuda | cuda:N | auto
    dtype: str = "auto"                    # auto|fp32|bf16|fp16 ; int8 = weight-only int8 with bf16/fp32 compute
    threads: int | None = None             # torch intra-op threads; None leaves torch's default
    block_size: int = 16                   # tokens per KV block
    kv_budget_bytes: int = 256 << 20       # the KV pool is preallocated to this many bytes
    prefix_reuse: bool = True              # share full blocks between requests with the same prefix
    max_batch_size: int = 32               # max running sequences
    batch_timeout_s: float = 0.001         # dynamic batcher window
    padding: bool = True                   # pad the decode batch to a bucket size (static shapes)
    policy: str = "continuous"             # continuous | static
    scheduling_policy: str = "fcfs"        # fcfs | priority: which waiting request goes first (vLLM's)
    max_tokens_per_step: int = 512         # token budget of one step (decodes + prefill chunks)
    prefill_chunk: int = 256               # longest prefill piece of one sequence in one step
    itl_target_s: float = 0.5              # while others decode, prefill per step cut to this long (measured)
    long_prefill_threshold: int = 1024     # a prompt with more left to prefill (cache hit off) takes at most half a step's prefill while shorter ones wait (0 = off)
    max_queue: int = 1024                  # waiting requests beyond this are refused (QueueFullError)
    compile: bool = False                  # torch.compile the model's forward
    max_model_len: int | None = None       # default: the model's context length, at most the KV pool's tokens
    max_model_len_by: str = "max_model_len"  # what set max_model_len, as its refusal at load names it
    max_prompt_tokens: int = 0             # longest prompt accepted (0 = the model's context)
    prompt_limit_by: str = "requests.max_prompt_tokens"  # what set max_prompt_tokens, as refusals name it
    seed: int | None = None                # seeds the generator of requests without a seed of their own
    chat_template: str | None = None       # a Jinja chat template used instead of the model's
    # vLLM's --generation-config: "auto" (an HF folder's generation_config.json gives the sampling
    # defaults of requests and stages that set none), "vllm" (it does not), or a folder holding one
    generation_config: str = "auto"
    # vLLM's --override-generation-config: generation_config.json keys set over those defaults
    override_generation_config: dict | None = None
    # speculative decoding (speculate.py): "off" or "ngram" (prompt lookup, vLLM's method = ngram);
    # drafts of at most speculative_tokens, from a suffix of prompt_lookup_min..prompt_lookup_max tokens
    speculate: str = "off"
    speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    def __post_init__(self) -> None:
        from stages.fields import ENGINE_FIELDS, ParamError, check_engine_field

        for name in ENGINE_FIELDS:           # each through its stage parameter's schema
            try:
                setattr(self, name, check_engine_field(name, getattr(self, name)))
            except ParamError as e:
                raise InputError(str(e)) from None
        if self.threads is not None and not 1 <= int(self.threads) <= MAX_THREADS:
            raise InputError(f"threads must be between 1 and {MAX_THREADS} (this process may use "
                             f"{available_cpus()} CPUs), not {self.threads!r}")
        if self.max_model_len is not None and int(self.max_model_len) < 1:
            raise InputError(f"{self.max_model_len_by} must be at least 1, not {self.max_model_len!r}")
        if not isinstance(self.generation_config, str) or not (
                self.generation_config in ("auto", "vllm") or os.path.isdir(self.generation_config)):
            raise InputError(f"generation_config must be auto, vllm or a folder holding generation_config.json, "
                             f"not {self.generation_config!r}")
        if self.override_generation_config is not None:
            from stages.fields import check_generation_override

            try:
                self.override_generation_config = check_generation_override(self.override_generation_config)
            except ValueError as e:
                raise InputError(f"override_generation_config: {e}") from None
        from stages.fields import ParamError, check_prompt_lookup

        try:
            check_prompt_lookup(self.prompt_lookup_min, self.prompt_lookup_max)
        except ParamError as e:
            raise InputError(str(e)) from None
        if self.batch_timeout_s < 0:
            raise InputError(f"batch_timeout_s must be >= 0, not {self.batch_timeout_s!r}")
        if self.max_tokens_per_step < self.max_batch_size:
            # every running sequence must be able to decode in one step
            self.max_tokens_per_step = self.max_batch_size


# SamplingParams' integer fields (the token-id lists besides), whose whole floats __post_init__ makes ints
INTEGER_PARAMS = ("max_tokens", "top_k", "seed", "min_tokens", "logprobs", "prompt_logprobs")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0               # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                         # 0 = no top-k cut
    seed: int | None = None                # per-request generator: same seed, same text
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False               # keep generating past end-of-sequence (benchmarks)
    presence_penalty: float = 0.0          # -2..2 (OpenAI): subtracted once from each token already in the output
    frequency_penalty: float = 0.0         # -2..2: subtracted per occurrence in the output so far
    repetition_penalty: float = 1.0        # (0, 2] (vLLM/HF): prompt + output tokens: logit > 0: / r, else * r
    min_p: float = 0.0                     # 0..1: drop tokens less likely than min_p * the likeliest
    min_tokens: int = 0                    # EOS, stop_token_ids masked, stop strings unmatched until this many
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, -100..100) added to the logits
    allowed_token_ids: tuple[int, ...] | None = None  # (vLLM) only these may be sampled; None: every token
    bad_words: tuple[str, ...] = ()        # (vLLM) words never generated (the engine bans their token sequences)
    cache_salt: str | None = None          # (vLLM) prefix-cache blocks are shared only with the same salt
    lora: str | None = None                # the LoRA adapter that answers (Engine.add_lora); None: the base model
    logprobs: int | None = None            # 0..20: the sampled token's logprob + this many alternatives
    prompt_logprobs: int | None = None     # 0..20: each prompt token's logprob + alternatives (prompt_outputs.py)
    pooling: str | None = None             # "mean": the mean of the prompt's final normed hidden states
    skip_special_tokens: bool = True       # special tokens' text left out of the answer
    spaces_between_special_tokens: bool = True   # False: added tokens joined to their neighbours as written
    include_stop_str_in_output: bool = False     # the stop string (or stop token's text) ends the answer
    constraint: Any = field(default=None, compare=False, hash=False)  # a constrain.Grammar (compiled)

    def __post_init__(self) -> None:
        from stages.fields import whole

        # an integer field's whole float is that int (4.0 -> 4), as a request's is where it is read
        # (requests_io.whole_numbers); 4.5 stays for check() to refuse
        for name in INTEGER_PARAMS:
            object.__setattr__(self, name, whole(getattr(self, name)))
        if isinstance(self.allowed_token_ids, (list, tuple)):
            object.__setattr__(self, "allowed_token_ids", tuple(whole(t) for t in self.allowed_token_ids))
        # accept lists (JSON) and a bare string for `stop`; store tuples (hashable, frozen)
        for name in ("stop", "stop_token_ids", "bad_words"):
            value = getattr(self, name)
            if isinstance(value, str) and name != "stop_token_ids":
                value = (value,)
            elif isinstance(value, (list, tuple)) or value is None:
                value = tuple(whole(v) for v in value or ())
            object.__setattr__(self, name, value)   # anything else: check() names it
        bias = self.logit_bias
        if isinstance(bias, dict) or (isinstance(bias, (list, tuple)) and all(
                isinstance(e, (list, tuple)) and len(e) == 2 for e in bias)) or bias is None:
            pairs = bias.items() if isinstance(bias, dict) else (bias or ())
            merged = {}                       # {token: bias}; JSON object keys arrive as strings
            for tok, b in pairs:
                if isinstance(tok, str) and tok.strip().isdigit():
                    tok = int(tok)
                merged[whole(tok)] = b
            try:
                bias = tuple(sorted(merged.items()))
            except TypeError:                # mixed key types: check() names them
                bias = tuple(merged.items())
            object.__setattr__(self, "logit_bias", bias)

    @property
    def prefix_key(self) -> tuple[str | None, str | None]:
        """What the prefix cache keys a sequence's blocks by (kv_cache.root_key's salt, adapter): its
        cache salt and its LoRA adapter (an adapter's K/V differ from the base model's)."""
        return self.cache_salt, self.lora

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def plain(self) -> bool:
        """Uses none of the per-sequence features (penalties, logit_bias, allowed_token_ids,
        bad_words, min_tokens, logprobs, a constraint): such a request takes the sampler's fast path. min_p is
        a plain sampler setting (it never changes the argmax)."""
        return (self.presence_penalty == 0.0 and self.frequency_penalty == 0.0
                and self.repetition_penalty == 1.0 and not self.logit_bias and self.allowed_token_ids is None
                and not self.bad_words and self.min_tokens == 0 and self.logprobs is None and self.constraint is None)

    def check(self) -> None:
        """Raise InputError naming the first bad value."""
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        from stages.fields import ParamError, check_cache_salt, check_field, check_token_ids

        prompt_only = self.max_tokens == 0 and (self.prompt_logprobs is not None or self.pooling is not None)
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "min_p", "min_tokens"):
            if name == "max_tokens" and prompt_only:
                continue                      # 0: the prompt's outputs alone, nothing generated
            try:                              # each through generate's parameter schema
                check_field(name, getattr(self, name))
            except ParamError as e:
                raise InputError(str(e)) from None
        for name in ("stop", "bad_words"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(s, str) for s in value):
                raise InputError(f"{name} must be a list of strings, not {value!r}", param=name)
            if value:
                try:
                    check_field(name, list(value))
                except ParamError as e:
                    raise InputError(str(e), param=e.field) from None
        if self.lora is not None and not isinstance(self.lora, str):
            raise InputError(f"lora must be the name of a LoRA adapter, not {self.lora!r}", param="model")
        if self.cache_salt is not None:
            try:
                check_cache_salt(self.cache_salt)
            except ParamError as e:
                raise InputError(str(e), param=e.field) from None
        if not isinstance(self.stop_token_ids, tuple) or not all(
                is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise InputError(f"stop_token_ids must be a list of token ids, not {self.stop_token_ids!r}")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if not isinstance(self.logit_bias, tuple) or not all(
                isinstance(e, tuple) and len(e) == 2 and is_int(e[0]) and e[0] >= 0 and is_num(e[1])
                and -100 <= e[1] <= 100 for e in self.logit_bias):
            raise InputError("logit_bias must map token ids to numbers from -100 to 100, not "
                             f"{str(self.logit_bias)[:60]}")
        if self.allowed_token_ids is not None:
            try:
                check_token_ids("allowed_token_ids", self.allowed_token_ids)
            except ParamError as e:
                raise InputError(str(e), param=e.field) from None
        if self.logprobs is not None and not (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InputError(f"logprobs must be an integer from 0 to {MAX_LOGPROBS} (or none), "
                             f"not {self.logprobs!r}")
        if self.prompt_logprobs is not None and not (
                is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise InputError(f"prompt_logprobs must be an integer from 0 to {MAX_LOGPROBS} (or none), "
                             f"not {self.prompt_logprobs!r}")
        if self.pooling not in (None, "mean"):
            raise InputError(f"pooling must be 'mean' (or none), not {self.pooling!r}")
        if self.constraint is not None and not callable(getattr(self.constraint, "matcher", None)):
            raise InputError("constraint must be a compiled grammar (constrain.Grammar), "
                             f"not {type(self.constraint).__name__}")


@dataclass(frozen=True)
class RequestOutput:                       # one per request touched by a step
    request_id: str
    new_token_ids: list[int]
    delta_text: str                        # text added by this step (stop strings held back)
    text: str                              # all text so far
    finished: bool
    finish_reason: str | None              # "stop" | "length" | "abort" | "error" | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int                     # prompt tokens served from the prefix cache
    # once finished: ttft_s, ...; "error": why, "error_param": the request field at fault when not the grammar
    metrics: dict = field(default_factory=dict, compare=False)
    # per new token (params.logprobs set): {"token_id", "logprob", "top": [(id, logprob), ...]},
    # logprobs of the model's raw distribution (log_softmax of the logits before temperature,
    # penalties, bias and masks: vLLM's default), top most likely first
    logprobs: list | None = None
    # with the sequence's first output, once its prompt is prefilled (SamplingParams.prompt_logprobs):
    # None for the first prompt token, then {"token_id", "logprob", "top"} per prompt token
    prompt_logprobs: list | None = None
    pooled: list | None = None             # SamplingParams.pooling = "mean": the prompt's mean hidden state
    stop_reason: int | str | None = None   # finished by a stop string (it) or a stop_token_ids id (it); vLLM's


def percentile(values, q: float) -> float | None:
    """q-th percentile (0..100) by linear interpolation; None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def time_per_output_token(decode_s: float, completion_tokens: int, choices: int = 1) -> float | None:
    """vLLM's TPOT of one request: its seconds from first token to last over the tokens after the
    first, the tokens of one choice (n choices are generated side by side: all their tokens would
    give 1/n of each stream's time per token). None for a choice of at most one token."""
    per_choice = completion_tokens / max(choices, 1)
    return decode_s / (per_choice - 1) if per_choice > 1 else None
