"""Requests as JSON objects: validation into what the engine takes.

One request is `{"id": …, "prompt": "…"}` or `{"id": …, "messages": [{"role", "content"}…]}`
with optional sampling fields. `parse_request` checks every field's type and range and
raises `RequestError` saying which field is wrong and why; nothing malformed reaches
the engine.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline_dsl.constraints import (MAX_GRAMMAR_WORK, NO_PARAMETERS, GrammarError, OnceCache, check_spec,
                                      check_tool_names, check_tools_together, check_whitespace, grammar_slots,
                                      spec_digest, tool_param)
from pipeline_dsl.diagnostics import closest

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 1024            # stop strings a request may give (generate.stop's max_items)
MAX_STOP_LEN = 256         # characters in one stop string (its max_length)
MAX_STOP_CHARS = 4096      # characters of all its stop strings (generate.stop's max_total)
MAX_TOOLS = 128            # tools a request may carry (OpenAI's limit): chat, Responses and agp run's lines


class RequestError(ValueError):
    """A request that cannot be run; the message says which field (`param`) and why. `quoted`: the
    parts of the message that show the request's own content (the start of a value it gave), which
    agp serve's INFO log leaves out (serve/errors.py)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 quoted: tuple[str, ...] = ()):
        super().__init__(message)
        self.param, self.code = param, code      # code: OpenAI's error code, where it has one
        self.quoted = quoted


class ChecksBusy(RequestError):
    """A request whose structured-output spec would need a grammar check while MAX_GRAMMAR_CHECKS
    others run (agp serve: parsed again when its turn comes; a 503 with Retry-After when too many
    wait already)."""
    CODE = "grammar_checks_busy"


@dataclass
class ParsedRequest:
    id: Any
    prompt: str | None = None
    messages: list[dict] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams overrides
    prompt_token_ids: list[int] | None = None               # a prompt given as token ids
    model: str | None = None                                # pins a generate stage / read by conditions
    metadata: dict | None = None                            # free-form; conditions read metadata.KEY
    n: int | None = None                                    # answers wanted (default: the stage's n)
    tools: list | None = None                               # OpenAI tools (chat), with tool_choice
    tool_choice: Any = "none"
    parallel_tool_calls: bool = True
    response_format: dict | None = None                     # json_object / json_schema: constrained output
    extras: dict = field(default_factory=dict)              # the per-request fields of ITEM_FIELDS
    identity: dict = field(default_factory=dict)            # user / safety_identifier, as given (IDENTITY)
    headers: dict = field(default_factory=dict)             # HTTP headers agp serve copied in (a line's own)
    format_field: str = "response_format"                   # the field response_format came in (guided_json, ...)
    max_tokens_field: str = "max_tokens"                    # the field max_tokens came in (max_completion_tokens)
    include_reasoning: bool = True                          # vLLM's: false leaves a split-out thinking out

    def item(self) -> dict:
        """The request as the pipeline's items carry it (what a python stage sees). `echo` with
        `logprobs` asks the engine for the prompt's logprobs too (the echoed tokens' entries),
        as agp serve's completions do: one computation serves both lists."""
        fields = {**self.sampling, **self.extras}
        if fields.get("echo") and fields.get("logprobs") is not None:
            fields["prompt_logprobs"] = max(fields["logprobs"], fields.get("prompt_logprobs") or 0)
        return request_item(self.id, messages=self.messages, prompt_token_ids=self.prompt_token_ids,
                            prompt=self.prompt, fields=fields, model=self.model, n=self.n,
                            metadata=self.metadata, tools=self.tools, tool_choice=self.tool_choice,
                            parallel_tool_calls=self.parallel_tool_calls, response_format=self.response_format,
                            identity=self.identity, headers=self.headers)

    @property
    def format_set_aside(self) -> str | None:
        """Why the line's own format does not hold its answer, or None where it does
        (format_set_aside): its record's `warning` says it, as agp serve's Warning header does."""
        return format_set_aside(self.tools, self.tool_choice, self.response_format, self.format_field)


def format_set_aside(tools, tool_choice, response_format, format_field: str = "response_format") -> str | None:
    """Why a request's own format (its response_format, structured_outputs or guided_* field,
    named as `format_field`) does not hold its answer, or None where it does: a tool_choice that
    forces a call (`required` or a named function) makes the answer that call, whose arguments
    follow the tool's parameters, and no content for a format to hold, as OpenAI answers it;
    vLLM's forced call replaces the request's structured output too (its tool parser's
    adjust_request), without a word. agp says it: agp serve's Warning header
    (serve/generation.warned), an `agp run` record's `warning`."""
    if not tools or tool_choice in ("none", "auto") or response_format is None \
            or response_format.get("type") == "text":
        return None
    return (f"'{format_field}' does not apply to this answer: 'tool_choice' forces a tool call, whose "
            "arguments follow the tool's parameters (the answer has no content for a format to hold)")


def request_item(request_id: str, *, messages, prompt_token_ids, prompt, fields: dict, model=None, n=None,
                 metadata=None, tools=None, tool_choice="none", parallel_tool_calls=True,
                 response_format=None, chat_template_kwargs=None, identity=None, headers=None) -> dict[str, Any]:
    """A request as the pipeline's items carry it, for `agp run` and `agp serve` alike: its id,
    one of messages / prompt_token_ids / prompt, its sampling fields, and what is set of model,
    n, tools (with tool_choice and parallel_tool_calls), response_format, user and
    safety_identifier (`identity`, IDENTITY); metadata and headers (the HTTP headers `agp serve
    --request-headers` names, {lower-case name: value}; empty otherwise) always."""
    out: dict[str, Any] = {"id": request_id}
    if messages is not None:
        out["messages"] = [dict(m) for m in messages]
    elif prompt_token_ids is not None:
        out["prompt_token_ids"] = list(prompt_token_ids)
    else:
        out["prompt"] = prompt
    out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()})
    if model is not None:
        out["model"] = model
    if n is not None:
        out["n"] = n
    out["metadata"] = dict(metadata or {})
    out["headers"] = dict(headers or {})
    if tools:
        out["tools"] = [dict(t) for t in tools]
        out["tool_choice"], out["parallel_tool_calls"] = tool_choice, parallel_tool_calls
    if response_format is not None:
        out["response_format"] = dict(response_format)
    if chat_template_kwargs:
        out["chat_template_kwargs"] = dict(chat_template_kwargs)
    out.update({k: v for k, v in (identity or {}).items() if k in IDENTITY and v is not None})
    return out

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_metadata(value, name: str = "metadata") -> dict:
    """A request's `metadata`: an object of at most METADATA_KEYS keys, each of at most
    METADATA_KEY_CHARS characters, each value at most METADATA_VALUE_CHARS (a string's length, or
    another value's compact JSON text's, without the spaces json.dumps puts after , and : that a
    client need not send); a RequestError naming the key otherwise."""
    _check(name, value, isinstance(value, dict), "an object")
    if len(value) > METADATA_KEYS:
        raise RequestError(f"'{name}' has {len(value)} keys: at most {METADATA_KEYS} are taken (OpenAI's limit)",
                           param=name)
    for key, item in value.items():
        if len(key) > METADATA_KEY_CHARS:
            raise RequestError(f"a key of '{name}' is {len(key)} characters long ({json.dumps(key[:40])}...): at "
                               f"most {METADATA_KEY_CHARS} are taken (OpenAI's limit)", param=name)
        size = len(item) if isinstance(item, str) else len(json.dumps(item, ensure_ascii=False, default=str,
                                                                    separators=(",", ":")))
        if size > METADATA_VALUE_CHARS:
            raise RequestError(f"'{name}.{key}' is {size} characters long"
                               f"{'' if isinstance(item, str) else ' as JSON'}: at most {METADATA_VALUE_CHARS} "
                               "are taken (OpenAI's limit)", param=f"{name}.{key}")
    return value


def check_identifiers(obj: dict, names: tuple[str, ...] | None = None) -> None:
    """A client's identifiers (`names` of IDENTIFIERS) that `obj` gives (null is left out): each a
    string (IGNORED), of at most IDENTIFIER_CHARS characters; a RequestError naming the first that
    is not. Only where a client's body or batch-API line is read: IGNORED alone checks a request
    line's and the request a python stage returns, whose identifiers are stored nowhere."""
    names = IDENTIFIERS if names is None else names
    check_fields(obj, {name: IGNORED[name] for name in names})
    for name in names:
        value = obj.get(name)
        if value is not None and len(value) > IDENTIFIER_CHARS[name]:
            whose = " (OpenAI's limit)" if name in OPENAI_BOUNDED else ""
            raise RequestError(f"'{name}' is {len(value)} characters long: at most {IDENTIFIER_CHARS[name]} are "
                               f"taken{whose}", param=name)


def _check(name: str, value, ok: bool, expected: str):
    if not ok:
        raise RequestError(f"field '{name}' must be {expected}, got {json.dumps(value)[:60]}", param=name,
                           quoted=(json.dumps(value)[:60],))
    return value


# one schema per field: the stage parameters' (and the token-id lists') checks
from stages.fields import (REQUEST_FIELDS, TOKEN_ID_FIELDS, ParamError, check_cache_salt,  # noqa: E402
                           check_field, check_priority, check_token_ids, param_of, whole)
from stages.registry import INT  # noqa: E402

SAMPLING_FIELDS = tuple(f for f in REQUEST_FIELDS if f != "n")     # SamplingParams overrides
# per-request fields no stage parameter sets (agp serve puts them on its items; a request line may
# give them too): name -> (is it valid, what it must be)
ITEM_FIELDS = {
    "stop_token_ids": (lambda v: isinstance(v, list) and all(_is_int(t) and t >= 0 for t in v), "an array of token ids"),
    "logprobs": (lambda v: _is_int(v) and 0 <= v <= 20, "an integer from 0 to 20"),
    "prompt_logprobs": (lambda v: _is_int(v) and 0 <= v <= 20, "an integer from 0 to 20"),
    "echo": (lambda v: isinstance(v, bool), "true or false"),
    "return_token_ids": (lambda v: isinstance(v, bool), "true or false"),
    "return_tokens_as_token_ids": (lambda v: isinstance(v, bool), "true or false"),
    "skip_special_tokens": (lambda v: isinstance(v, bool), "true or false"),
    "spaces_between_special_tokens": (lambda v: isinstance(v, bool), "true or false"),
    "include_stop_str_in_output": (lambda v: isinstance(v, bool), "true or false"),
    "chat_template_kwargs": (lambda v: isinstance(v, dict), "an object of template variables"),
    "add_generation_prompt": (lambda v: isinstance(v, bool), "true or false"),
    "continue_final_message": (lambda v: isinstance(v, bool), "true or false"),
    "add_special_tokens": (lambda v: isinstance(v, bool), "true or false"),   # a text prompt's start token
    "truncate_prompt_tokens": (lambda v: _is_int(v) and (v >= 1 or v == -1),
                               "a positive integer (or -1: the context)"),
    "pooling": (lambda v: v == "mean", '"mean"'),
}

# ---------------------------------------------------------------- the fields of agp serve's bodies
# vLLM's request fields (chat and completions) that change nothing agp answers: taken (checked) and
# ignored, as vLLM ignores the last two on its generation routes (its render routes read them). A
# session's id is a router's hint; the chunks a stream groups its tokens in are the server's to choose
VLLM_IGNORED = {"session_id": (lambda v: isinstance(v, str), "a string"),
                "stream_interval": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
                "return_token_offsets": (lambda v: isinstance(v, bool), "true or false"),
                "return_mm_kwargs": (lambda v: isinstance(v, bool), "true or false")}

# One table of the fields agp serve's completions and chat bodies take (serve/protocol.py reads it
# from here): a request line takes every one of them too, with the same meaning where it has one
# in a file, and ignores (after checking its type) what only concerns an HTTP exchange (IGNORED).
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "stream_options", "n", "presence_penalty", "frequency_penalty", "logit_bias",
          "user", "ignore_eos", "stop_token_ids", "logprobs", "min_tokens", "repetition_penalty",
          "min_p", "response_format"}
VLLM = {"skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output", "request_id",
        "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",  # read_constraint
        "structural_tag",
        "guided_whitespace_pattern", "guided_decoding_backend", "truncate_prompt_tokens", "priority", "bad_words",
        "cache_salt", "prompt_logprobs",
        "return_token_ids", "return_tokens_as_token_ids", *TOKEN_ID_FIELDS, *VLLM_IGNORED}
# fields agp serves only at the value that changes nothing (what clients send by default):
# name -> (the values taken, the hint otherwise); a null is always taken
NEUTRAL = {"best_of": ((1,), None), "suffix": (("",), None),
           "use_beam_search": ((False,), None), "length_penalty": ((1.0,), None),
           "vllm_xargs": (({},), None),
           # vLLM's side to truncate a prompt from under truncate_prompt_tokens: agp keeps the last tokens
           "truncation_side": (("left",), None)}
CHAT_NEUTRAL = {"echo": ((False,), None), "add_special_tokens": ((False,), None), "documents": ((), None),
                "functions": ((), "use 'tools'"), "function_call": ((), "use 'tool_choice'")}
# vLLM's request fields (chat and completions) of features agp lacks, as a client that writes out vLLM's
# whole request model sends them: taken at their defaults (null; 0), else an error saying why, as below
VLLM_LACKING = {"logits_processors": ((), "it runs no custom logits processors (use 'logit_bias', "
                                          "'allowed_token_ids' or 'bad_words')"),
                "kv_transfer_params": ((), "it has no disaggregated prefill to transfer KV caches between"),
                "max_repetition_pattern_size": ((0,), "it stops no answer on repeated token patterns"),
                "min_repetition_pattern_size": ((0,), "it stops no answer on repeated token patterns"),
                "repetition_min_count": ((0,), "it stops no answer on repeated token patterns"),
                "repetition_detection": ((), "it stops no answer on repeated token patterns"),
                # -1 is vLLM's "unlimited", its default spelled out
                "thinking_token_budget": ((-1,), "it bounds no model's thinking apart from its answer "
                                                 "('max_tokens' bounds both)"),
                "logprob_token_ids": ((), "it gives the logprobs of the most likely tokens ('logprobs', "
                                          "'top_logprobs'), not of tokens chosen by id"),
                "watermarking": ((False,), "it watermarks no answer"),
                "ec_transfer_params": ((), "it has no disaggregated encoder to transfer caches from"),
                "routed_experts_prompt_start": ((0,), "it returns no routed experts")}
# OpenAI chat fields of features agp's models lack: taken at the value that asks for nothing (null;
# modalities ["text"]; verbosity "medium", OpenAI's default, which clients that write out every setting
# send), else an error saying why, with OpenAI's code for a parameter a model lacks
CHAT_LACKING = {"verbosity": (("medium",), "it does not steer an answer's length (\"medium\", the default, "
                                           "is taken)"),
                "audio": ((), "it serves text only"), "modalities": ((["text"],), "it serves text only"),
                "prediction": ((), "predicted outputs are not served"),
                "web_search_options": ((), "it searches nothing"),
                "moderation": ((), "it runs no moderation model"),
                # vLLM's too refuses a request's own template unless started with --trust-request-chat-template
                "chat_template": ((), "a request brings no chat template of its own (start the server with "
                                      "--chat-template FILE)"),
                "mm_processor_kwargs": (({},), "it serves text only"),
                "media_io_kwargs": (({},), "it serves text only"),
                "return_prompt_text": ((False,), "it does not send the rendered prompt back (POST /tokenize with the "
                                                 "messages and return_token_strs shows it token by token)"),
                **VLLM_LACKING}
# the same for completions: vLLM's prompt_embeds (base64 tensors of the prompt's input embeddings, which
# vLLM takes only under --enable-prompt-embeds); ignoring it would answer the text prompt beside it instead
COMPLETION_LACKING = {"prompt_embeds": ((), "it takes a prompt as text or token ids, not as embeddings"),
                      **VLLM_LACKING}
# the same for the Responses API's fields (serve/responses.py): what OpenAI keeps or runs for a
# response that agp has not; ignoring them would answer another request than the one sent
RESPONSES_LACKING = {"moderation": CHAT_LACKING["moderation"],
                     "conversation": ((), "it keeps no conversations (use 'previous_response_id')"),
                     "prompt": ((), "it stores no prompt templates (send the 'input')"),
                     "context_management": (([],), "it compacts no context"),
                     "access_programs": (({},), "it has no access programs"),
                     "background_options": (({},), "it answers in the foreground")}
# strings that name the end user or a cache group: taken (checked); chat also takes safety_identifier
# (OpenAI's successor of `user`) and prompt_cache_key. The end user's (IDENTITY) reach the request a
# pipeline's stages and conditions see (an A/B split or per-user route by `user`); prompt_cache_key
# changes nothing (agp's prefix cache reuses a prompt's KV blocks by their tokens)
IDENTIFIERS = ("user", "safety_identifier", "prompt_cache_key")
IDENTITY = ("user", "safety_identifier")
# their length where a client's chat, completions or Responses body (or a batch-API line's) is read
# (check_identifiers): a Responses answer is stored with them (and logged, and held by the item); OpenAI's
# safety_identifier takes 64 characters, and user and prompt_cache_key as many as a metadata value
IDENTIFIER_CHARS = {"user": 512, "safety_identifier": 64, "prompt_cache_key": 512}
OPENAI_BOUNDED = ("safety_identifier",)        # the bound OpenAI documents (the others are agp's)
# `metadata` as OpenAI bounds it (chat, responses, batches): 16 keys, each of at most 64 characters,
# each value at most 512 (a Responses answer is stored with its metadata: unbounded, one client's
# megabytes evicted everyone else's stored answers); agp also takes values that are no strings
# (conditions compare metadata.free == true, metadata.a.b), bounded by their JSON text's length
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
# OpenAI's prompt-cache settings (chat and responses): taken (checked) and ignored, as prompt_cache_key
# is: agp's prefix cache reuses a prompt's KV blocks by their tokens and keeps them until it needs the room
CACHE_SETTINGS = {
    "prompt_cache_retention": (lambda v: v in ("in_memory", "24h"), '"in_memory" or "24h"'),
    "prompt_cache_options": (lambda v: isinstance(v, dict) and v.get("mode") in (None, "implicit", "explicit")
                             and (v.get("ttl") is None or isinstance(v["ttl"], str)),
                             'an object {"mode": "implicit" or "explicit", "ttl": a string}'),
}
# a reasoning model's effort (chat's reasoning_effort, the Responses API's reasoning.effort), as vLLM
# and OpenAI take it (the `openai` SDK's ReasoningEffort: "none" and "xhigh" are OpenAI's newer models',
# "max" DeepSeek's, and vLLM takes all seven): checked, and changes nothing (a Qwen3 thinks as its chat
# template's enable_thinking says)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
COMPLETION_FIELDS = COMMON | VLLM | set(NEUTRAL) | set(COMPLETION_LACKING) | {"prompt", "echo", "metadata",
                                                                             "add_special_tokens"}
CHAT_FIELDS = COMMON | VLLM | set(NEUTRAL) | set(CHAT_NEUTRAL) | set(IDENTIFIERS) | set(CACHE_SETTINGS) | {
    *CHAT_LACKING, "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "reasoning_effort",
    "include_reasoning",
    "parallel_tool_calls", "metadata", "store", "service_tier", "chat_template_kwargs", "add_generation_prompt",
    "continue_final_message"}
# what only a chat request takes (its tools, its template's variables, how its conversation ends, ...),
# derived from the two tables; the end user's identity (IDENTITY) is any request's
CHAT_ONLY = frozenset(CHAT_FIELDS - COMPLETION_FIELDS - set(IDENTITY) - {"messages"})
# the fields of a request that shape how its own prompt is rendered or what its answer says of that
# prompt: completions' echo and suffix, a conversation's end, a text's start token, the prompt's
# truncation and its logprobs. A request made from another with a prompt of its own (an element of a
# `returns = many` stage's list) takes the other's settings but none of these
PROMPT_SHAPING = ("echo", "suffix", "add_special_tokens", "truncate_prompt_tokens", "add_generation_prompt",
                  "continue_final_message", "prompt_logprobs")
# fields that go together: a request made from another that gives one of a group gives the group
# (its own output format replaces the other's, whichever field names it; its own tools come with
# their own choice)
TOOL_GROUP = ("tools", "tool_choice", "parallel_tool_calls")
# what a request line takes and ignores, checked as agp serve checks it: how an answer travels over
# HTTP (stream, stream_options: a line's answer is one record), OpenAI's own bookkeeping (store,
# prompt_cache_key, ...; user and safety_identifier are checked here and reach the item), vLLM's
# request_id (a line's `id` names its answer) and the one structured-output backend's name
IGNORED = {"stream": (lambda v: isinstance(v, bool), "true or false"),
           "stream_options": (lambda v: isinstance(v, dict), "an object"),
           **{name: (lambda v: isinstance(v, str), "a string") for name in IDENTIFIERS},   # bounded: check_identifiers
           "store": (lambda v: isinstance(v, bool), "true or false"),
           "service_tier": (lambda v: isinstance(v, str), "a string"),
           "request_id": (lambda v: isinstance(v, str) and 0 < len(v) <= 128 and v.isascii() and v.isprintable()
                          and " " not in v, "a string of 1 to 128 printable ASCII characters without spaces"),
           "guided_decoding_backend": (lambda v: isinstance(v, str), "a string"),
           "reasoning_effort": (lambda v: v in REASONING_EFFORTS,
                                ", ".join(f'"{e}"' for e in REASONING_EFFORTS[:-1]) + f' or "{REASONING_EFFORTS[-1]}"'),
           # vLLM's: whether the thinking --reasoning-parser splits off is sent (agp serve and agp run read it)
           "include_reasoning": (lambda v: isinstance(v, bool), "true or false"),
           **CACHE_SETTINGS, **VLLM_IGNORED}
KNOWN = {"id", "prompt", "messages", "prompt_token_ids", "model", "metadata", "headers", "tools", "tool_choice", "logit_bias",
         "max_completion_tokens", "top_logprobs", "parallel_tool_calls", "response_format", "cache_salt", "priority",
         *REQUEST_FIELDS, *ITEM_FIELDS, *TOKEN_ID_FIELDS, *COMPLETION_FIELDS, *CHAT_FIELDS}


# ---------------------------------------------------------------- integer fields
# Every integer-valued field of a request agp reads, on every route of agp serve (chat, completions,
# responses, embeddings, score and rerank, tokenize and detokenize) and in agp run's lines: name ->
# its shape, "int" (one integer), "ids" (an array of integers, or a batch: an array of such arrays
# beside strings) or "keys" (an object keyed by token id: logit_bias). Where a body or a line is
# read, whole_numbers makes each whole float of these an int (stages.fields.whole, vLLM's rule), so
# that the checks, the engine, the answer's echo, logs and metrics all see 4 for a client's 4.0.
INTEGER_FIELDS: dict[str, str] = {
    **{f: "int" for f, (kind, name) in REQUEST_FIELDS.items() if param_of(kind, name).type == INT},
    **{f: "int" for f, (allowed, _) in {**NEUTRAL, **VLLM_LACKING}.items() if any(_is_int(a) for a in allowed)},
    **{f: "int" for f in ("max_completion_tokens", "priority", "logprobs", "top_logprobs", "prompt_logprobs",
                          "truncate_prompt_tokens", "stream_interval",
                          "max_output_tokens", "max_tool_calls",      # /v1/responses
                          "dimensions",                              # /v1/embeddings
                          "top_n", "max_tokens_per_doc",             # /v1/rerank
                          "id")},                                    # agp run's line: a string or an integer
    **{f: "ids" for f in ("prompt_token_ids", "stop_token_ids", *TOKEN_ID_FIELDS, "logprob_token_ids",
                          "prompt",                                  # completions: ids, or a batch of them
                          "input",                                   # /v1/embeddings: the same
                          "tokens")},                                # /detokenize
    "logit_bias": "keys",
}


def _whole_ids(value):
    """An array of token ids (or a batch of them, beside strings) with its whole floats as ints;
    anything else (a string, an object) as it is, and the array itself where nothing changes."""
    if not isinstance(value, list):
        return value
    new = [_whole_ids(v) if isinstance(v, list) else whole(v) for v in value]
    return value if all(a is b for a, b in zip(new, value)) else new


def whole_numbers(obj):
    """A request object as read (an agp serve body, an agp run line, a batch-API line's body, a
    request a python stage hands back) with each INTEGER_FIELDS value given as a float with no
    fractional part made that int: `"max_tokens": 4.0` is 4 from here on, as vLLM's pydantic models
    take it; 4.5, NaN, true and "4" are left for the field's check to refuse in its own words. The
    one place, for every such field; `obj` itself is not changed (a copy where a value is)."""
    if not isinstance(obj, dict):
        return obj
    out = None
    for name, shape in INTEGER_FIELDS.items():
        value = obj.get(name)
        if shape == "int":
            new = whole(value)
        elif shape == "ids":
            new = _whole_ids(value)
        elif isinstance(value, dict) and any(type(k) is float for k in value):
            new = {whole(k): v for k, v in value.items()}   # a python stage's; JSON's keys are strings
        else:
            new = value
        if new is not value:
            out = out if out is not None else dict(obj)
            out[name] = new
    return obj if out is None else out


# the HTTP headers a request carries to its pipeline (agp serve --request-headers; a request line's
# `headers`, as a python stage that returns a request hands them back): {lower-case name: value}
MAX_HEADERS = 32               # headers one request may carry
MAX_HEADER_VALUE = 1024        # characters of one header's value
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]{1,64}")     # an HTTP token, lower-case


def check_headers(value) -> dict[str, str]:
    """A request's `headers`: an object of at most MAX_HEADERS lower-case header names (HTTP
    tokens of up to 64 characters), each a string of at most MAX_HEADER_VALUE characters; a
    RequestError naming the first that is not."""
    if not isinstance(value, dict):
        raise must_be("headers", "an object {lower-case header name: value}", value)
    if len(value) > MAX_HEADERS:
        raise RequestError(f"'headers' has {len(value)} headers; at most {MAX_HEADERS}", param="headers")
    for name, v in value.items():
        if not HEADER_NAME.fullmatch(name):
            # "X-Tenant", as curl and HTTP write it: name the spelling agp keeps (names are case-insensitive)
            fix = (f"; write {json.dumps(name.lower())}, as agp serve hands a header over"
                   if isinstance(name, str) and HEADER_NAME.fullmatch(name.lower()) else "")
            raise RequestError(f"'headers' names {json.dumps(name)[:70]}: a header name is a lower-case HTTP token "
                               f"(letters, digits, '-', at most 64 characters){fix}", param="headers",
                               quoted=(json.dumps(name)[:70], json.dumps(name.lower()) if fix else ""))
        if not isinstance(v, str) or len(v) > MAX_HEADER_VALUE:
            raise must_be(f"headers.{name}", f"a string of at most {MAX_HEADER_VALUE} characters", v)
    return dict(value)


def check_neutral(obj: dict, table: dict) -> None:
    """Fields agp takes only at their neutral value (NEUTRAL, CHAT_NEUTRAL): a RequestError naming
    the first given another value."""
    for name, (allowed, hint) in table.items():
        value = obj.get(name)
        if value is not None and not any(value == a and type(value) is type(a)
                                         or (_is_num(value) and _is_num(a) and value == a)
                                         for a in allowed):
            other = " or ".join(filter(None, [f"use {json.dumps(allowed[0])}" if allowed else None, hint]))
            raise RequestError(f"'{name}' = {json.dumps(value)[:40]} is not supported by agp "
                               f"(leave it out{' or ' + other if other else ''})", param=name,
                               quoted=(json.dumps(value)[:40],))


def check_lacking(obj: dict, table: dict) -> None:
    """Fields of features agp lacks (CHAT_LACKING, RESPONSES_LACKING): null or the value that asks
    for nothing is taken, anything else is a RequestError saying why, with OpenAI's code for it."""
    for name, (allowed, why) in table.items():
        value = obj.get(name)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise RequestError(f"'{name}' = {json.dumps(value)[:40]} is not supported by agp: {why} (leave it out)",
                               param=name, code="unsupported_parameter", quoted=(json.dumps(value)[:40],))


def check_fields(obj: dict, table: dict) -> None:
    """Each field of `table` (name -> (is it valid, what it must be)) that `obj` gives (null is left
    out), checked: a RequestError naming the first that is not valid."""
    for name, (ok, expected) in table.items():
        if obj.get(name) is not None and not ok(obj[name]):
            raise must_be(name, expected, obj[name])


def must_be(param: str, expected: str, value) -> RequestError:
    """The error of a field whose value is not what it must be: "'top_logprobs' must be an integer
    from 0 to 20, not 21" (a number shown as itself, anything else by its JSON type and text)."""
    text = shown(value)
    what = text if json_type(value) == "a number" else f"{json_type(value)} ({text})"
    return RequestError(f"'{param}' must be {expected}, not {what}", param=param, quoted=(text,))


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_messages(value) -> list[dict]:
    """OpenAI chat messages: roles checked, text content parts joined by newlines (as vLLM joins
    them); RequestError names the field."""
    if not isinstance(value, list):
        raise bad("messages", "an array of {role, content} objects", value)
    if not value:
        raise RequestError("'messages' is empty: give at least one message", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "an object with 'role' and 'content'", m)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RequestError(f"'{where}.role' must be one of {', '.join(ROLES)}, "
                               f"not {json.dumps(role)[:40]}", param=f"{where}.role", quoted=(json.dumps(role)[:40],))
        if isinstance(content, list):          # content parts: only text is served
            texts = []
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "refusal":     # OpenAI's assistant part
                    if role != "assistant" or not isinstance(part.get("refusal"), str):
                        raise RequestError(f"'{where}.content[{j}]' is a refusal part: an assistant message's, "
                                           "{\"type\": \"refusal\", \"refusal\": \"...\"}",
                                           param=f"{where}.content")
                    texts.append(part["refusal"])
                    continue
                if isinstance(part, str):        # a bare string is a text part, as vLLM reads it
                    texts.append(part)
                    continue
                # the Responses API's text parts, which vLLM's chat reads as text parts too (clients that
                # carry a Responses conversation over to chat send them)
                if not (isinstance(part, dict) and part.get("type") in TEXT_PARTS
                        and isinstance(part.get("text"), str)):
                    raise RequestError(f"'{where}.content[{j}]' must be a text part "
                                       "({\"type\": \"text\", \"text\": ...}); agp serves text only",
                                       param=f"{where}.content")
                texts.append(part["text"])
            content = "\n".join(texts)           # vLLM's join: a part is a paragraph
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content", "a string or an array of text parts", content)
        msg = {"role": role, "content": content}
        if m.get("name") is not None:
            msg["name"] = _check(f"{where}.name", m["name"], isinstance(m["name"], str), "a string")
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise RequestError(f"'{where}.tool_calls' belongs to an assistant message", param=f"{where}.tool_calls")
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "assistant":     # an earlier answer's thinking, for a template that renders it (Qwen3's):
            # vLLM's `reasoning`, or the older `reasoning_content` its answers also carry, as both
            name = "reasoning" if m.get("reasoning") is not None else "reasoning_content"
            thought = m.get(name)
            if thought is not None:
                _check(f"{where}.{name}", thought, isinstance(thought, str), "a string")
                msg["reasoning"] = msg["reasoning_content"] = thought
        if role == "tool":
            tid = m.get("tool_call_id")
            if tid is not None:
                msg["tool_call_id"] = _check(f"{where}.tool_call_id", tid, isinstance(tid, str), "a string")
        out.append(msg)
    if not any(m["content"].strip() or m.get("tool_calls") for m in out):
        raise RequestError("every message in 'messages' is empty", param="messages")
    return out


# the content parts whose "text" a message's content is made of (with a bare string, and an assistant's refusal)
TEXT_PARTS = ("text", "input_text", "output_text")


def _tool_calls(value, where: str) -> list[dict]:
    """An assistant message's earlier tool calls, in OpenAI's shape."""
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be an array of tool calls", param=where)
    out = []
    for j, c in enumerate(value):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"'{where}[{j}]' must be {{\"id\", \"type\": \"function\", \"function\": "
                               "{\"name\", \"arguments\"}}", param=where)
        args = fn.get("arguments", "{}")
        if not isinstance(args, (str, dict)):
            raise RequestError(f"'{where}[{j}].function.arguments' must be a JSON string", param=where)
        out.append({"id": str(c.get("id") or f"call_{j}"), "type": "function",
                    "function": {"name": fn["name"],
                                 "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return out


TOOL_CHOICES = 'none, auto, required or {"type": "function", "function": {"name"}}'


def parse_tools(obj: dict) -> tuple[list | None, Any, bool]:
    """(tools, tool_choice, parallel_tool_calls) of a request, checked; tools None when none."""
    tools = obj.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools", "an array of tools", tools)
        if len(tools) > MAX_TOOLS:
            raise RequestError(f"'tools' holds {len(tools):,} tools; at most {MAX_TOOLS} a request", param="tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not (isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(fn, dict)
                    and isinstance(fn.get("name"), str) and fn["name"]):
                raise RequestError(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\", "
                                   "\"description\", \"parameters\"}}}}", param="tools")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise RequestError(f"'{tool_param(i)}' must be a JSON Schema object", param=tool_param(i),
                                   code=INVALID_PARAMETERS)
        if not tools:               # as OpenAI and vLLM refuse it: a client means none, and says so by leaving it out
            raise RequestError("'tools' is an empty array: give at least one tool, or leave 'tools' out",
                               param="tools")
    choice = obj.get("tool_choice")
    names = [t["function"]["name"] for t in tools or []]
    if choice is None:
        choice = "auto" if tools else "none"
    elif isinstance(choice, dict):
        kind, fn = choice.get("type", "function"), choice.get("function")
        if kind != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            # another shape (OpenAI's allowed_tools, the Responses API's {"type", "name"}, a bare name
            # as `function`) is named as such, not as a tool called null
            hint = (" (for OpenAI's allowed_tools, give the allowed tools as 'tools' and its mode as 'tool_choice')"
                    if kind == "allowed_tools" else "")
            raise bad("tool_choice", TOOL_CHOICES, choice, hint)
    elif choice not in ("none", "auto", "required"):
        raise bad("tool_choice", TOOL_CHOICES, choice)
    if choice != "none" and not tools:
        # a choice among no tools: refused, as vLLM refuses it ("When using `tool_choice`, `tools` must
        # be set."), "auto" too (it was taken and changed nothing)
        named = isinstance(choice, dict)
        value = json.dumps(choice["function"]["name"] if named else choice)[:40]
        raise RequestError(f"'tool_choice' {'names' if named else 'is'} {value} but no 'tools' are given: give the "
                           "tools it chooses among, or leave 'tool_choice' out", param="tool_choice", quoted=(value,))
    if isinstance(choice, dict) and choice["function"]["name"] not in names:
        name = json.dumps(choice["function"]["name"])
        raise RequestError(f"'tool_choice' names {name}, which is not among the tools ({', '.join(names)})",
                           param="tool_choice", quoted=(name,))
    parallel = obj.get("parallel_tool_calls")
    if parallel is None:                       # left out or null (what clients send by default): true
        parallel = True
    if not isinstance(parallel, bool):
        raise RequestError("'parallel_tool_calls' must be true or false", param="parallel_tool_calls")
    return tools, choice, parallel


INVALID_PARAMETERS = "invalid_function_parameters"     # OpenAI's code for a tool's parameters it refuses


def check_tool_parameters(tools: list | None, choice, *, wait: bool = True) -> None:
    """A call the request forces (tool_choice "required" or a named function) is written by its
    tools' parameters schemas, which the engine enforces: each tool's parameters checked as a
    response_format's schema is (spec_problem: cached, at most MAX_GRAMMAR_CHECKS at once, `wait`
    as there), so one that cannot be enforced is a RequestError naming `tools[i].function.parameters`
    when the request is read, not when it reaches the engine. With tool_choice auto or none the
    parameters only describe the tools in the prompt: not checked. The name of a tool the call may
    write is written whole: longer than MAX_LITERAL_LENGTH, a RequestError naming `tools[i].function.name`.
    The tools it may write are one schema in its grammar: past that schema's size bounds together
    (check_tools_together, a walk of each, before any is compiled), a RequestError naming `tools`."""
    if not tools or choice in ("none", "auto"):
        return
    forced = None if choice == "required" else choice["function"]["name"]
    try:
        check_tool_names([t["function"]["name"] for t in tools], lambda name: forced in (None, name))
    except GrammarError as e:
        raise RequestError(f"'{e.param}' cannot be enforced: {e}", param=e.param) from None
    try:        # the call's grammar holds them all: counted together (a walk) before any is compiled
        check_tools_together([(i, t["function"]["name"], t["function"].get("parameters") or NO_PARAMETERS)
                              for i, t in enumerate(tools) if forced in (None, t["function"]["name"])])
    except GrammarError as e:                # the tools together, or one alone (its name quoted)
        names = {tool_param(i): repr(t["function"]["name"]) for i, t in enumerate(tools)}
        raise RequestError(f"'{e.param}' cannot be enforced: {e}", param=e.param, code=INVALID_PARAMETERS,
                           quoted=(names[e.param],) if e.param in names else ()) from None
    for i, t in enumerate(tools):
        fn = t["function"]
        if fn.get("parameters"):
            problem = spec_problem({"type": "json_schema", "schema": fn["parameters"]}, wait=wait, where=tool_param(i))
            if problem:
                raise RequestError(f"'{tool_param(i)}' cannot be enforced: tool {fn['name']!r}: {problem}",
                                   param=tool_param(i), code=INVALID_PARAMETERS, quoted=(repr(fn['name']),))


def shown(value) -> str:
    """A value a client sent, as an error message quotes it: its JSON, cut to 40 characters (a
    refusal names the value, it does not repeat a megabyte of it); pass it as the error's `quoted`."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def through_schema(check, *args):
    """`check(*args)`, one of the fields' schemas (stages/fields.py); its ParamError is a
    RequestError naming the field."""
    try:
        return check(*args)
    except ParamError as e:
        raise RequestError(str(e), param=e.field, quoted=e.quoted) from None


def checked(name: str, value, given_as: str | None = None):
    """A sampling field through the schema of the stage parameter it sets (stages/fields.py)."""
    return through_schema(check_field, name, value, given_as)


def max_tokens_field(obj: dict) -> str:
    """The field a request's max_tokens is read from: chat's newer name, max_completion_tokens, as
    OpenAI's chat clients send it, where given (it wins over max_tokens; null is not given), else
    max_tokens. Its errors name that field (agp serve's bodies and agp run's lines alike)."""
    return "max_completion_tokens" if obj.get("max_completion_tokens") is not None else "max_tokens"


def check_min_tokens(sampling: dict, max_tokens_field: str = "max_tokens", default: str | None = None) -> None:
    """min_tokens above max_tokens asks for an answer no limit allows: a RequestError naming
    min_tokens, as vLLM refuses it (a max_tokens the request leaves out is its stage's to cut).
    `default`: where the max_tokens in `sampling` comes from when the request set none (agp serve
    MODEL's completions default), which the error names; the request then gives max_tokens."""
    low, high = sampling.get("min_tokens"), sampling.get("max_tokens")
    if low is not None and high is not None and low > high:
        source = f", {default}" if default else ""
        fix = f"{max_tokens_field} >= min_tokens" if default else f"min_tokens <= {max_tokens_field}"
        raise RequestError(f"'min_tokens' = {low} is above '{max_tokens_field}' = {high}{source}: an answer cannot "
                           f"be longer than {max_tokens_field} allows (give {fix})", param="min_tokens")


def token_ids(name: str, value) -> tuple[int, ...]:
    """A request's list of token ids (allowed_token_ids), through its one schema (stages/fields.py)."""
    return through_schema(check_token_ids, name, value)


def is_id(value) -> bool:
    """Whether `value` can be a request's id (or a batch line's custom_id): a string or an
    integer, not a bool."""
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def json_type(v) -> str:
    """What a decoded JSON value is, in JSON's words ("null", "a string"), for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def cache_salt(value) -> str:
    """A request's cache_salt (vLLM's), through its one schema (stages/fields.py)."""
    return through_schema(check_cache_salt, value)


# a request's optional fields take null as left out (as vLLM's Optional fields do), except these,
# which vLLM declares as a plain type with a default and so refuses null: priority (`int = 0`; a
# null priority is no scheduling order)
NOT_NULL = ("priority",)


def priority(value) -> int:
    """A request's priority (vLLM's: lower is admitted first when the engine schedules by priority; a
    non-zero value is refused by one that schedules fcfs), through its one schema (stages/fields.py);
    null is refused (NOT_NULL)."""
    return through_schema(check_priority, value)


# a line's fields served only at their neutral value: chat's too, but for those a line takes (ITEM_FIELDS)
LINE_NEUTRAL = NEUTRAL | {k: v for k, v in CHAT_NEUTRAL.items() if k not in ITEM_FIELDS}


# other servers' request shapes (SGLang's /generate and offline batches, Triton's generate
# endpoint and KServe's v2 inputs, TGI's): what a line writes for each
_PROMPT_IS = "a request's prompt is 'prompt' (text) or 'messages' (chat)"
_SAMPLING_ARE = ("a request's sampling fields stand beside its prompt, not in an object: max_tokens, temperature, "
                 "top_p, stop, ...")
# llama.cpp's server fields (/completion and its OpenAI routes) and Ollama's (/api/generate, /api/chat):
# agp takes OpenAI's and vLLM's names, and says which of its own a client of those servers meant
_NO_SAMPLER = "agp has no such sampler: it samples by temperature, top_k, top_p, min_p and the penalties"
_NO_SHIFT = ("agp never shifts the context: the prompt and 'max_tokens' must fit it",
             "agp never shifts the context: the input and 'max_output_tokens' must fit it")
_NO_REASONING = ("agp serve --reasoning-parser qwen3|deepseek_r1 splits a reasoning model's thinking out of its "
                 "answer (reasoning_content, or a reasoning item on /v1/responses), as vLLM's does; under qwen3, "
                 "chat_template_kwargs {\"enable_thinking\": false} turns the thinking off")
LLAMA_CPP_FIELDS = {
    "n_predict": ("llama.cpp's name; agp's is 'max_tokens'", "llama.cpp's name; agp's is 'max_output_tokens'"),
    "content": ("llama.cpp's name for the text; agp's is 'input'", "llama.cpp's name for the text; agp's is 'prompt'",
                "llama.cpp's name for the text; agp's is 'messages'"),
    "cache_prompt": "llama.cpp's; agp reuses a prompt's cached prefix by itself (kv_lookup's reuse = prefix): "
                    "leave it out",
    "grammar": "llama.cpp's; agp takes GBNF (or Lark) text as 'guided_grammar' or 'structured_outputs': "
               "{\"grammar\": ...}",
    "json_schema": ("llama.cpp's; agp's is 'response_format': {\"type\": \"json_schema\", \"json_schema\": "
                    "{\"name\": ..., \"schema\": ...}}, or 'guided_json': the schema",
                    "llama.cpp's; agp's is 'text': {\"format\": {\"type\": \"json_schema\", \"name\": ..., "
                    "\"schema\": ...}}, or 'guided_json': the schema"),
    "n_probs": ("llama.cpp's; agp's is 'logprobs': true, with 'top_logprobs' the number of alternatives",
                "llama.cpp's; agp's is 'logprobs': the number of alternatives",
                "llama.cpp's; agp's is 'top_logprobs': the number of alternatives"),
    "repeat_penalty": "llama.cpp's and Ollama's name; agp's is 'repetition_penalty' (over the whole prompt and answer)",
    "repeat_last_n": "agp's 'repetition_penalty' covers the whole prompt and answer, with no window to set",
    "penalize_nl": "agp's penalties treat every token alike",
    "mirostat": "agp has no Mirostat sampler: it samples by temperature, top_k, top_p, min_p and the penalties",
    "mirostat_tau": _NO_SAMPLER, "mirostat_eta": _NO_SAMPLER, "typical_p": _NO_SAMPLER, "tfs_z": _NO_SAMPLER,
    "top_n_sigma": _NO_SAMPLER, "xtc_probability": _NO_SAMPLER, "xtc_threshold": _NO_SAMPLER,
    "dry_multiplier": _NO_SAMPLER, "dry_base": _NO_SAMPLER, "dry_allowed_length": _NO_SAMPLER,
    "dry_penalty_last_n": _NO_SAMPLER, "dry_sequence_breakers": _NO_SAMPLER, "dynatemp_range": _NO_SAMPLER,
    "dynatemp_exponent": _NO_SAMPLER,
    "samplers": "agp's samplers run in one fixed order",
    "n_keep": _NO_SHIFT,
    "id_slot": "agp has no slots to pin a request to: a prompt's cached prefix is found by its tokens",
    "slot_id": "agp has no slots to pin a request to: a prompt's cached prefix is found by its tokens",
    "t_max_predict_ms": ("agp bounds an answer by 'max_tokens'", "agp bounds an answer by 'max_output_tokens'"),
    "timings_per_token": "agp's answers carry no timings (GET /metrics has them)",
    "post_sampling_probs": "agp's logprobs are the model's, before any sampling mask (docs/openai.md)",
    "return_tokens": ("llama.cpp's; agp's is 'return_token_ids'",
                      "llama.cpp's; agp gives each id's text with 'return_token_strs': true"),
    "reasoning_format": _NO_REASONING,
    "with_pieces": "llama.cpp's; agp's /tokenize gives each id's text with 'return_token_strs': true",
    "add_special": "llama.cpp's; agp's is 'add_special_tokens'",
}
OLLAMA_FIELDS = {
    "options": tuple(f"Ollama's; agp takes its sampling fields at the top level: '{most}' (num_predict), "
                     "'temperature', 'top_k', 'top_p', 'min_p', 'seed', 'stop', 'repetition_penalty' (repeat_penalty); "
                     "num_ctx is the server's --max-model-len" for most in ("max_tokens", "max_output_tokens")),
    "num_predict": ("Ollama's name; agp's is 'max_tokens'", "Ollama's name; agp's is 'max_output_tokens'"),
    "format": ("Ollama's; agp's is 'response_format': {\"type\": \"json_object\"} for \"json\", "
               "{\"type\": \"json_schema\", ...} for a schema",
               "Ollama's; agp's is 'text': {\"format\": {\"type\": \"json_object\"}} for \"json\", "
               "{\"format\": {\"type\": \"json_schema\", ...}} for a schema"),
    "keep_alive": "Ollama's; agp keeps its model loaded while it serves: leave it out",
    "think": _NO_REASONING,
    "system": ("Ollama's; agp takes a system prompt as the first of 'messages', {\"role\": \"system\", ...}",
               "Ollama's; agp takes a system prompt as 'instructions' (or an item of 'input', {\"role\": "
               "\"system\", ...})"),
    "images": "agp serves text only",
}
# the servers' own fields (agp serve's bodies say these; a line also those of the shapes above, which
# name a line's fields: on /v1/embeddings TEI's "inputs" is a typo of "input", no prompt). A field's
# hints are one text or several, one per set of agp's fields (each quoted): a route is told the
# first whose fields it all takes (foreign_hint), so /v1/responses hears of 'max_output_tokens'
# and /tokenize of 'return_token_strs', never of a field the route refuses.
SERVER_FIELDS = {**LLAMA_CPP_FIELDS, **OLLAMA_FIELDS}
FOREIGN_FIELDS = {"text": _PROMPT_IS, "text_input": _PROMPT_IS, "inputs": _PROMPT_IS,
                  "sampling_params": _SAMPLING_ARE, "parameters": _SAMPLING_ARE, **SERVER_FIELDS}
_QUOTED = re.compile(r"'([a-z_]+)'")


def foreign_hint(key: str, known, table: dict = SERVER_FIELDS) -> str | None:
    """What another server's field `key` is called where `known` are the fields taken (a route's
    body, a request line): the first of its hints (`table`) that names only fields in `known`, else
    None. A typo of a known field (difflib's ratio 0.9 and up: 'images' at /v1/responses' 'image')
    is none: its did-you-mean says more."""
    hints = table.get(key)
    if hints is None or closest(key, known, cutoff=0.9):
        return None
    return next((text for text in ((hints,) if isinstance(hints, str) else hints)
                 if set(_QUOTED.findall(text)) <= set(known)), None)


def parse_request(obj, default_id=None) -> ParsedRequest:
    """Validate one request object (already decoded from JSON)."""
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a JSON object, not {json_type(obj)}")
    obj = whole_numbers(obj)                   # "max_tokens": 4.0 is 4 from here on
    for key in obj:
        if key not in KNOWN:
            close, foreign = closest(key, KNOWN), foreign_hint(key, KNOWN, FOREIGN_FIELDS)
            hint = f" ({foreign})" if foreign else f" (did you mean '{close}'?)" if close else ""
            raise RequestError(f"unknown field '{key}'{hint}", param=key)
    check_fields(obj, IGNORED)                 # agp serve's fields a line takes and ignores
    check_neutral(obj, LINE_NEUTRAL)
    check_lacking(obj, CHAT_LACKING)
    check_lacking(obj, COMPLETION_LACKING)
    rid = obj.get("id")
    if rid is None:                            # "id": null is no id: the line number stands in
        rid = default_id
    elif not is_id(rid):
        raise RequestError(f"field 'id' must be a string or an integer, got {json.dumps(rid)[:60]} (the answer's "
                           "id, unique in the file; leave it out for the line number)", param="id",
                           quoted=(json.dumps(rid)[:60],))
    req = ParsedRequest(id=rid)
    given = [k for k in ("prompt", "messages", "prompt_token_ids") if k in obj]
    if len(given) != 1:
        had = (f"it gives {' and '.join(repr(k) for k in given)}" if given else "it gives none of them")
        raise RequestError(f"give exactly one of 'prompt' (text), 'messages' (chat) or 'prompt_token_ids': {had}",
                           param="prompt")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, list):           # OpenAI's completions take ids or a batch there: say where they go
            raise RequestError(f"field 'prompt' must be a string, got {json.dumps(prompt)[:60]}: a line is one "
                               "request; token ids go in 'prompt_token_ids', several prompts on lines of their own",
                               quoted=(json.dumps(prompt)[:60],))
        req.prompt = _check("prompt", prompt, isinstance(prompt, str), "a string")
        if not req.prompt:
            raise RequestError("field 'prompt' is empty")
    elif "messages" in obj:
        req.messages = parse_messages(obj["messages"])
    else:
        ids = obj["prompt_token_ids"]
        req.prompt_token_ids = _check("prompt_token_ids", ids, isinstance(ids, list) and bool(ids) and all(
            _is_int(t) and t >= 0 for t in ids), "a non-empty array of token ids")
    # echo with max_tokens 0 scores the prompt without generating (lm-eval's loglikelihood), as
    # agp serve's completions take it; pooling with max_tokens 0 is an embeddings request's item
    # (agp serve's /v1/embeddings), which a python stage hands back
    scoring = ((obj.get("echo") is True or obj.get("pooling") is not None)
               and _is_int(obj.get("max_tokens")) and obj["max_tokens"] == 0)
    limit = max_tokens_field(obj)
    for name in SAMPLING_FIELDS:
        key = limit if name == "max_tokens" else name
        if obj.get(key) is not None and not (scoring and name == "max_tokens"):
            req.sampling[name] = checked(name, obj[key], key)
    if scoring:
        req.sampling["max_tokens"] = 0
    check_min_tokens(req.sampling, limit)
    req.max_tokens_field = limit             # an error the engine words with max_tokens names it
    if obj.get("model") is not None:
        req.model = _check("model", obj["model"], isinstance(obj["model"], str), "a string")
    if obj.get("metadata") is not None:
        req.metadata = _check("metadata", obj["metadata"], isinstance(obj["metadata"], dict), "an object")
    req.identity = {k: obj[k] for k in IDENTITY if obj.get(k) is not None}    # strings (IGNORED checked them)
    req.include_reasoning = obj.get("include_reasoning") is not False        # a bool (IGNORED checked it)
    if obj.get("headers") is not None:
        req.headers = check_headers(obj["headers"])
    if obj.get("n") is not None:
        req.n = checked("n", obj["n"])
    if obj.get("tools") is not None or obj.get("tool_choice") is not None:
        if req.messages is None:
            raise RequestError("'tools' need 'messages' (a chat request)", param="tools")
        req.tools, req.tool_choice, req.parallel_tool_calls = parse_tools(obj)
        check_tool_parameters(req.tools, req.tool_choice)
    if isinstance(obj.get("response_format"), dict) and obj["response_format"].get("type") in CONSTRAINTS:
        # a constraint agp serve made (guided_*): a python stage that sets another field beside it
        # is told, as a request with two is (it was dropped without a word)
        given = _format_fields(obj)
        if len(given) > 1:
            raise _formats_clash(given)
        req.response_format = dict(obj["response_format"])
    else:                                    # response_format, structured_outputs or guided_*, as agp serve's
        req.response_format, req.format_field = read_constraint(obj)
    if obj.get("logit_bias") is not None:
        req.sampling["logit_bias"] = parse_logit_bias(obj["logit_bias"])
    for name in TOKEN_ID_FIELDS:
        if obj.get(name) is not None:
            req.sampling[name] = list(token_ids(name, obj[name]))
    for name, (ok, wanted) in ITEM_FIELDS.items():
        if obj.get(name) is not None and not (name == "logprobs" and isinstance(obj[name], bool)):
            req.extras[name] = _check(name, obj[name], ok(obj[name]), wanted)
    if isinstance(obj.get("logprobs"), bool) or obj.get("top_logprobs") is not None:   # a line in chat's spelling
        top = obj.get("top_logprobs")
        if top is not None:
            _check("top_logprobs", top, ITEM_FIELDS["logprobs"][0](top), ITEM_FIELDS["logprobs"][1])
        if (k := logprobs_of_chat(obj.get("logprobs"), top)) is not None:
            req.extras["logprobs"] = k
    if "priority" in obj:                                       # null too: NOT_NULL
        req.extras["priority"] = priority(obj["priority"])
    if obj.get("cache_salt") is not None:
        req.extras["cache_salt"] = cache_salt(obj["cache_salt"])
    if req.extras.get("add_special_tokens") and req.messages is not None:     # as agp serve's chat refuses it
        raise RequestError("'add_special_tokens' puts the start token before a 'prompt'; a 'messages' line's chat "
                           "template writes its own (leave it out or use false)", param="add_special_tokens")
    if req.extras.get("echo") and req.messages is not None:       # as agp serve's chat refuses it
        raise RequestError("'echo' repeats a 'prompt' before its answer; a 'messages' line has no prompt "
                           "to repeat (leave 'echo' out)", param="echo")
    return req


def logprobs_of_chat(want, top) -> int | None:
    """Chat's spelling of logprobs (each value checked by its caller), as agp serve's chat bodies
    and `agp run`'s lines take it: `"logprobs": true` with `top_logprobs` alternatives a token (0
    when left out) asks for them, `false` or nothing for none (None); `top_logprobs` above 0 needs
    `"logprobs": true` (0, the default vLLM's request model writes out, asks for nothing, as there)."""
    if top and want is not True:
        raise RequestError("'top_logprobs' needs \"logprobs\": true", param="top_logprobs")
    return (top or 0) if want is True else None


CONSTRAINTS = ("regex", "choice", "grammar")    # constraint specs beyond OpenAI's response_format types

MAX_LOGIT_BIAS = 1024      # tokens one request may bias


def parse_logit_bias(bias) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias from -100 to 100} (ids beyond the vocabulary are
    the engine's to refuse)."""
    if not isinstance(bias, dict):
        pairs = isinstance(bias, list) and bias and all(isinstance(p, list) and len(p) == 2 for p in bias)
        raise bad("logit_bias", 'an object {"token id": bias}', bias,
                  " (llama.cpp's [[id, bias], ...] pairs are {\"id\": bias, ...} here; its false, a token "
                  "banned, is -100)" if pairs else "")
    if len(bias) > MAX_LOGIT_BIAS:
        raise RequestError(f"'logit_bias' has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are accepted",
                           param="logit_bias")
    out = {}
    for key, value in bias.items():
        if _is_int(key) and 0 <= key < 10 ** 9:   # an item's own (already parsed) bias: ids as numbers
            key = str(key)
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10):
            raise RequestError(f"'logit_bias' keys must be token ids, not {shown(key)}", param="logit_bias",
                               quoted=(shown(key),))
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and -100 <= value <= 100):
            raise RequestError(f"'logit_bias.{key}' must be a number from -100 to 100, not {shown(value)}",
                               param="logit_bias", quoted=(shown(value),))
        out[int(key)] = float(value)
    return out


FREE_TEXT = {"type": "text"}     # a response_format that asks for no constraint


def parse_response_format(value) -> dict | None:
    """OpenAI's response_format: text (`{"type": "text"}`: free text, which a generate stage's
    json_schema gives way to as to any format the request asks for), json_object, or json_schema;
    or vLLM's structural_tag (structural_tag_spec)."""
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema",
                                                                 "structural_tag"):
        raise RequestError("'response_format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\" | "
                           "\"structural_tag\"}", param="response_format")
    if value["type"] == "text":
        return {"type": "text"}
    if value["type"] == "json_object":
        schema = value.get("schema")
        if schema is None:
            return {"type": "json_object", **spec_options(value)}
        # llama.cpp's form of a schema (its README's): a JSON object that follows it, as json_schema asks
        if not isinstance(schema, (dict, bool)):
            raise bad("response_format.schema", "a JSON schema (an object)", schema)
        return {"type": "json_schema", "schema": schema, "name": None, **spec_options(value)}
    if value["type"] == "structural_tag":
        return structural_tag_spec(value, "response_format")
    spec = value.get("json_schema")
    if spec is None and "schema" in value:     # the form a request item carries it in, handed back by a python stage
        spec = value
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
        raise RequestError("'response_format.json_schema' must be {\"name\", \"schema\": {...}, \"strict\"}",
                           param="response_format")
    return {"type": "json_schema", "schema": spec.get("schema", {}), "name": spec.get("name"), **spec_options(value)}


def spec_options(value: dict) -> dict:
    """A JSON spec's own options (constraints.py: "compact", "close_objects", "whitespace"), which
    structured_outputs' disable_any_whitespace, disable_additional_properties and whitespace_pattern
    set and a request item handed back by a python stage carries: kept where they are true or false
    (a string: "whitespace")."""
    return {k: value[k] for k in ("compact", "close_objects", "whitespace")
            if isinstance(value.get(k), str if k == "whitespace" else bool)}


MAX_DEPTH = 64            # JSON nesting a request may have (messages sit at depth 3)


def spread_json(first_line: bytes) -> str | None:
    """Why a file whose first line is `first_line` is one JSON document, not one request a line:
    that line is a lone `[` or `{` (json.dump with an indent, jq's default output: read as lines,
    only the elements that happen to fit on one line would run) or a whole JSON array
    (json.dump(requests) without one), which no request line is. None for any other line."""
    first = first_line.removeprefix(b"\xef\xbb\xbf").strip()
    if first == b"[":
        return ("a lone '[': the file is a JSON array written over several lines, not one JSON request a line "
                "(jq -c '.[]' FILE writes the array's requests one a line)")
    if first.startswith(b"[") and first.endswith(b"]"):         # json.dump(requests) without an indent
        try:
            whole = isinstance(json.loads(first), list)
        except (ValueError, RecursionError):
            whole = False
        if whole:
            return ("a JSON array: the file is one JSON array of requests, not one JSON request a line "
                    "(jq -c '.[]' FILE writes the array's requests one a line)")
    if first == b"{":
        return ("a lone '{': the file holds JSON objects written over several lines, not one JSON request a line "
                "(jq -c . FILE writes each object on one line)")
    return None


def load_json(text: str | bytes, what: str = "the request") -> Any:
    """JSON text -> a Python value, or RequestError saying why not: not UTF-8, not JSON, nested
    too deeply, a number too long to convert, a string holding a lone UTF-16 surrogate
    (\\ud800), NaN or an infinity (check_finite): nothing that would fail later inside the engine
    or in the answer gets through."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"{what} is not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(text)            # nested past the recursion limit: a RecursionError, at once
    except json.JSONDecodeError as e:
        raise RequestError(f"{what} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise RequestError(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:               # e.g. an integer of more than 4300 digits
        raise RequestError(f"{what} holds a number that cannot be read: {str(e).split(';')[0]}") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _too_deep(obj):
        raise RequestError(f"{what} is nested more than {MAX_DEPTH} levels deep")
    try:
        json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")   # the common case: one pass in C
    except (UnicodeEncodeError, ValueError):
        check_unicode(obj, what)
        check_finite(obj, what)
    return obj


def check_finite(obj, what: str = "the request") -> None:
    """RequestError naming where `obj` (at any depth) holds NaN or an infinity. JSON has neither
    (RFC 8259), but Python's json reads the literals NaN, Infinity and -Infinity, and a number
    past a double's range (1e999) as an infinity: let through, such a value fails every answer
    that carries it back (a Responses answer echoes its metadata and tools) as a server error."""
    stack = [(obj, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            shown = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
            raise RequestError(f"{what} holds {shown} in '{where or 'the body'}', which JSON has no value for "
                               "(RFC 8259: no NaN or Infinity; a number beyond 1.8e308 reads as Infinity)",
                               param=where or None)
        if isinstance(value, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))


def check_unicode(obj, what: str = "the request") -> None:
    """RequestError naming where a string of `obj` (a key or a value, at any depth) holds a lone
    UTF-16 surrogate (\\ud800), which no answer or tokenizer can take."""
    bad = _surrogate_path(obj)
    if bad is not None:
        param = bad.strip("'") if bad.startswith("'") else None
        raise RequestError(f"{what} holds a lone UTF-16 surrogate (invalid Unicode) in {bad}", param=param)


def _too_deep(obj) -> bool:
    """Whether parsed JSON nests arrays and objects more than MAX_DEPTH deep. Walked over its
    arrays and objects, not over the text's characters: a body of 10,000 chat messages (3.9 MB,
    40,000 brackets) took 0.2 s of Python character by character, and takes milliseconds."""
    stack = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)
                     if isinstance(v, (dict, list)))
    return False


def _surrogate_path(obj, path: str = "the body") -> str | None:
    """Where the first string with a lone surrogate sits (a key or a value), or None."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return None                        # the common case: one pass in C
    except (UnicodeEncodeError, TypeError, ValueError):   # TypeError: a value JSON cannot hold: walk
        pass
    stack = [(obj, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not _utf8_ok(value):
                return f"'{where or 'the body'}'"
        elif isinstance(value, dict):
            for k, v in value.items():
                key = str(k) if _utf8_ok(str(k)) else json.dumps(str(k))
                if not _utf8_ok(str(k)):
                    return f"the key {key}" + (f" of '{where}'" if where else "")
                stack.append((v, f"{where}.{key}" if where else key))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
    return None


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_line(line: str, lineno: int) -> ParsedRequest:
    """One JSONL line; the id defaults to the line number (parse_line_object)."""
    return parse_line_object(load_json(line, "the line"), lineno)


def parse_line_object(obj, lineno: int) -> ParsedRequest:
    """One JSONL line already decoded (load_json), for a reader that looked at it first (a batch-API
    line?); the id defaults to the line number. A line that is a JSON array (most often a whole
    file written as one `[{...}, {...}]`) is told the format it needs. Its metadata and identifiers
    are not bounded as agp serve's bodies are (check_metadata, check_identifiers: a stored Responses
    answer keeps them; a line's answer is written out and kept by nobody); a batch-API line's body,
    parsed as agp serve parses it (commands/batch_api.py), is."""
    if isinstance(obj, list):
        raise RequestError("a request must be a JSON object, got an array: the input is JSON Lines, one request "
                           "object per line, not a JSON array (jq -c '.[]' FILE turns an array into lines)")
    return parse_request(obj, default_id=lineno)

# ---------------------------------------------------------------- structured output
# `response_format` (OpenAI), `structured_outputs` (vLLM >= 0.11: one of `json`, `regex`, `choice`,
# `grammar`, `json_object`, `structural_tag`) and the older `guided_json`, `guided_regex`, `guided_choice`,
# `guided_grammar`, `structural_tag` all become one spec of the constraint compiler (engine/constrain.py), for agp
# serve's bodies and agp run's lines alike; a request gives at most one of them (two that ask for the same
# spec are one: a client for vLLM old and new sends structured_outputs and guided_* alike).
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structural_tag")  # the last: vLLM < 0.11's
FORMAT_FIELDS = ("response_format", "structured_outputs", *GUIDED)   # every field that names an output format
STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                   "json_object": "json_object", "structural_tag": "structural_tag"}
# vLLM's options beside them, when true: (the key it sets on a JSON spec, its value); disable_fallback
# only keeps vLLM from trying a second backend, and agp has one
STRUCTURED_OPTIONS = {"disable_any_whitespace": ("compact", True),
                      "disable_additional_properties": ("close_objects", False),
                      "disable_fallback": (None, None)}
# vLLM's whitespace_pattern (structured_outputs') and guided_whitespace_pattern: the regex of the whitespace
# between a JSON answer's tokens (the spec's "whitespace"), for the specs that write JSON
WHITESPACE_PATTERN = "whitespace_pattern"
JSON_SPECS = ("json_schema", "json_object", "structural_tag")


def bad(param: str, expected: str, value, hint: str = "") -> RequestError:
    """"'PARAM' must be EXPECTED, not VALUE" (the value as JSON, cut at 40 characters), then `hint`."""
    text = shown(value)
    return RequestError(f"'{param}' must be {expected}, not {text}{hint}", param=param, quoted=(text,))


def _json_text(text: str, param: str):
    """A field's value given as JSON text (a guided_json schema, a structural tag), read as the
    request itself is (load_json): nested at most MAX_DEPTH deep, no lone surrogate; RequestError
    naming the field."""
    try:
        return load_json(text, f"'{param}'")
    except RequestError as e:
        raise RequestError(str(e), param=param, quoted=e.quoted) from None


def _schema(value, param: str):
    """A JSON Schema given as an object or as JSON text (vLLM takes both)."""
    if isinstance(value, str):
        value = _json_text(value, param)
    if not isinstance(value, (dict, bool)):
        raise bad(param, "a JSON Schema object", value)
    return value


def _spec(kind: str, value, param: str) -> dict:
    """One constraint spec of the compiler from a guided field's value."""
    if kind == "json_schema":
        return {"type": "json_schema", "schema": _schema(value, param)}
    if kind == "json_object":
        if value is not True:
            raise bad(param, "true", value)
        return {"type": "json_object"}
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise bad(param, "a regular expression", value)
        return {"type": "regex", "pattern": value}
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad(param, "a non-empty array of non-empty strings", value)
        return {"type": "choice", "choices": list(value)}
    if kind == "structural_tag":
        return structural_tag_spec(value, param)
    if not isinstance(value, str) or not value.strip():
        raise bad(param, "a grammar (Lark, or GBNF with a root rule)", value)
    return {"type": "grammar", "grammar": value}


def structural_tag_spec(value, param: str) -> dict:
    """vLLM's structural tag, {"structures": [{"begin", "schema", "end"}], "triggers": [...]} (its
    response_format of "type": "structural_tag", or structured_outputs.structural_tag, an object or
    its JSON text, "type" there or not): the constraint spec (constraints.py checks the rest). The
    form of xgrammar's newer structural tags, {"type": "structural_tag", "format": {...}}, is
    refused: it needs xgrammar, and agp's one backend is llguidance."""
    if isinstance(value, str):
        value = _json_text(value, param)
    if not isinstance(value, dict) or value.get("type", "structural_tag") != "structural_tag":
        raise bad(param, 'a structural tag {"structures": [...], "triggers": [...]}', value)
    if value.get("format") is not None:
        raise RequestError(f"'{param}.format' (xgrammar's structural tag format) is not supported by agp: give "
                           "\"structures\": [{\"begin\", \"schema\", \"end\"}] and \"triggers\"",
                           param=f"{param}.format", code="unsupported_parameter")
    options = spec_options(value)               # an item handed back by a python stage carries them
    extra = sorted(set(value) - {"type", "structures", "triggers", "format", *options})
    if extra:
        raise RequestError(f"'{param}.{extra[0]}' is not a field of a structural tag (structures, triggers)",
                           param=f"{param}.{extra[0]}")
    return {"type": "structural_tag", "structures": value.get("structures"), "triggers": value.get("triggers"),
            **options}


def _given_constraint(obj: dict) -> tuple[dict | None, str | None]:
    """(the spec, the field it came from) of the request's structured-output field, if any. Two
    fields are taken where they ask for the same spec (a client written for vLLM 0.11 and later
    sends `structured_outputs` and the older `guided_*` field beside it with the same value, as
    guidance's vLLM model does): the first of them in the order response_format,
    structured_outputs, guided_* names it. Fields that ask for different specs are a 400; a field
    that does not read is its own 400, as where it is given alone."""
    given = _format_fields(obj)
    fmt = parse_response_format(obj["response_format"]) if obj.get("response_format") is not None else None
    if fmt == FREE_TEXT and len(given) > 1:      # {"type": "text"} gives way to a guided_* field
        given.remove("response_format")
    if not given:
        if obj.get("guided_whitespace_pattern") is not None:
            raise RequestError("'guided_whitespace_pattern' sets the whitespace of a JSON answer: give it with "
                               "guided_json, structured_outputs or a JSON response_format",
                               param="guided_whitespace_pattern")
        return None, None
    if len(given) > 1:
        specs = [_field_constraint(obj, name, fmt) for name in given]    # a broken field: its own 400
        if any(spec != specs[0][0] for spec, _ in specs[1:]):
            raise _formats_clash(given, " (they may be given together only where they ask for the same one)")
        return specs[0]
    return _field_constraint(obj, given[0], fmt)


def _format_fields(obj: dict) -> list[str]:
    """The structured-output fields the request gives, in the order that names a spec."""
    return [k for k in FORMAT_FIELDS if obj.get(k) is not None]


def _formats_clash(given: list[str], more: str = "") -> RequestError:
    return RequestError(f"give at most one of {', '.join(repr(g) for g in given)}: each sets the answer's format{more}",
                        param=given[1])


def _field_constraint(obj: dict, name: str, fmt: dict | None) -> tuple[dict, str]:
    """(the spec, the field's place) of one structured-output field the request gives (`fmt`:
    its response_format, read), with the whitespace pattern the request gives (_whitespace)."""
    spec, where = _field_spec(obj, name, fmt)
    return _whitespace(obj, name, spec), where


def _whitespace(obj: dict, name: str, spec: dict) -> dict:
    """`spec` with the whitespace pattern the request gives for it: structured_outputs.whitespace_pattern
    (where `name` is structured_outputs) or guided_whitespace_pattern, as vLLM takes them (JSON's
    whitespace between tokens: constraints.check_whitespace); a RequestError naming the field where
    it cannot apply (a spec that writes no JSON; beside disable_any_whitespace), where the two differ,
    or where the pattern is not one a JSON answer can follow."""
    own = obj[name].get(WHITESPACE_PATTERN) if name == "structured_outputs" else None
    guided = obj.get("guided_whitespace_pattern")
    if own is not None and guided is not None and own != guided:
        raise RequestError("'structured_outputs.whitespace_pattern' and 'guided_whitespace_pattern' differ: give one",
                           param="guided_whitespace_pattern")
    param, pattern = (f"{name}.{WHITESPACE_PATTERN}", own) if own is not None else ("guided_whitespace_pattern", guided)
    if pattern is None:
        return spec
    if spec["type"] not in JSON_SPECS:
        raise RequestError(f"'{param}' sets the whitespace between JSON tokens, and a {spec['type']} answer is not "
                           "JSON: give it with a JSON Schema, json_object or a structural tag", param=param)
    if spec.get("compact"):
        raise RequestError(f"give '{param}' or disable_any_whitespace, not both", param=param)
    try:
        check_whitespace(pattern, f"'{param}' =")
    except GrammarError as e:
        raise RequestError(str(e), param=param) from None
    return {**spec, "whitespace": pattern}


def _field_spec(obj: dict, name: str, fmt: dict | None) -> tuple[dict, str]:
    """(the spec, the field's place) of one structured-output field as it is written."""
    if name == "response_format":
        return fmt, name
    if name == "structured_outputs":
        so = obj[name]
        if not isinstance(so, dict):
            raise bad(name, "an object", so)
        keys = [k for k in so if so[k] is not None and k in STRUCTURED_KEYS]
        unknown = [k for k in so if k not in STRUCTURED_KEYS and k not in STRUCTURED_OPTIONS
                   and k != WHITESPACE_PATTERN and so[k] is not None]
        if unknown:
            options = ", ".join([*STRUCTURED_OPTIONS, WHITESPACE_PATTERN])
            raise RequestError(f"'structured_outputs.{unknown[0]}' is not supported: give one of "
                               f"{', '.join(STRUCTURED_KEYS)} (and {options})",
                               param=f"structured_outputs.{unknown[0]}")
        if len(keys) != 1:
            raise RequestError(f"'structured_outputs' must set exactly one of {', '.join(STRUCTURED_KEYS)}",
                               param=name)
        spec = _spec(STRUCTURED_KEYS[keys[0]], so[keys[0]], f"{name}.{keys[0]}")
        for option, (key, value) in STRUCTURED_OPTIONS.items():
            if so.get(option) is not None:
                if not isinstance(so[option], bool):
                    raise bad(f"{name}.{option}", "true or false", so[option])
                if so[option] and spec["type"] in ("json_schema", "json_object", "structural_tag") and key:
                    spec[key] = value
        return spec, f"{name}.{keys[0]}"
    kind = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
            "guided_grammar": "grammar", "structural_tag": "structural_tag"}[name]
    return _spec(kind, obj[name], name), name


def read_constraint(obj: dict, *, wait: bool = True) -> tuple[dict | None, str]:
    """The one constraint spec a request's response_format, structured_outputs or guided_* field
    asks for (None when none does), checked so a spec the compiler cannot enforce is a
    RequestError naming the field the request wrote; and that field: "guided_json",
    "structured_outputs.json", "response_format" (also when none is given), as this check's 400
    names it; the engine's 400 about the spec (its compile with the model's tokenizer refuses
    what this check takes) names that field too (serve/errors.api_error's `format_field`).
    The check (seconds of CPU for a large schema) runs only when the spec is not in the check
    cache, and then as one of at most MAX_GRAMMAR_CHECKS at once in the process: `wait` (agp
    run's lines) waits for its turn, otherwise (agp serve, whose request threads parse every
    other request too) ChecksBusy."""
    spec, where = _given_constraint(obj)
    if spec is not None and spec.get("type") not in ("json_object", "text"):
        problem = spec_problem(spec, wait=wait, where=where)
        if problem:
            raise RequestError(f"'{where}' cannot be enforced: {problem}", param=where)
    return spec, where or FORMAT_FIELD


FORMAT_FIELD = "response_format"    # the field the engine names a request's constraint by


MAX_GRAMMAR_CHECKS = MAX_GRAMMAR_WORK   # grammar checks running at once (slots shared with the engine's compiles)
CHECK_CACHE_ENTRIES = 4096      # specs whose check is remembered, keyed by a digest of their canonical
CHECK_CACHE_BYTES = 4 << 20     # JSON text: an entry holds the digest and the problem (at most ~400 characters)
ENTRY_BYTES = 128               # what one entry costs beside its problem's text (digest, dict slot, links)
_checked = OnceCache(CHECK_CACHE_ENTRIES, CHECK_CACHE_BYTES, size=lambda problem: ENTRY_BYTES + len(problem or ""))


def spec_problem(spec: dict, *, wait: bool = True, where: str = "response_format") -> str | None:
    """Why the constraint spec cannot compile (check_spec), or None. Remembered by the spec's digest
    (clients repeat their schemas), at most CHECK_CACHE_ENTRIES and CHECK_CACHE_BYTES (least recently
    used first out): what the cache holds does not grow with the specs' size. A spec not remembered
    is checked as one of at most MAX_GRAMMAR_CHECKS at once: `wait` False raises ChecksBusy when
    that many run. Equal specs arriving together are checked once: while one's check runs, the
    others wait for its result (`wait` False: ChecksBusy, as for a turn)."""

    def check() -> str | None:
        if not grammar_slots.acquire(blocking=wait):
            raise _busy(where, f"{MAX_GRAMMAR_CHECKS} are running")   # those waiting on it check themselves
        try:
            check_spec(spec)
            return None
        except GrammarError as e:
            return str(e)
        finally:
            grammar_slots.release()

    try:
        digest = spec_digest(spec)
    except TypeError as e:
        return f"the constraint is not JSON: {e}"
    except ValueError as e:                     # a spec a python stage handed back, nested past what JSON writes:
        try:                                    # its schemas' depth walk (no recursion) names where, uncached
            problem = check()
        except RecursionError:                  # deep outside any schema: nothing names a place
            problem = None
        return problem or f"the constraint is not JSON: {e}"
    return _checked.get(digest, check, wait=wait,
                        busy=lambda: _busy(where, "the check of an equal spec is running"))


def _busy(where: str, why: str) -> ChecksBusy:
    return ChecksBusy(f"'{where}' needs a grammar check and {why}: try again shortly",
                      param=where, code=ChecksBusy.CODE)


def check_cache_info() -> dict:
    """What the check cache holds: {"entries": n, "bytes": b} (b: its own accounting, ENTRY_BYTES an entry
    and its problem's text), and its bounds ("max_entries", "max_bytes")."""
    return _checked.info()
