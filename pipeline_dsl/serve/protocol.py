"""The OpenAI wire format: request validation and response bodies.

`parse_completion` and `parse_chat` turn a decoded JSON body into a `GenerationRequest`
(prompt or messages plus the sampling fields it sets, which override the defaults of the
generate stage it reaches) or raise `APIError`, whose `body()` is the
OpenAI-style error object (`{"error": {"message", "type", "param", "code"}}`). Nothing
that fails here reaches the engine. The `*_response` and `*_chunk` functions build the
bodies of non-streaming answers and of server-sent-event chunks.
"""
from __future__ import annotations

import codecs
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from pipeline_dsl.diagnostics import closest
from pipeline_dsl.requests_io import (CACHE_SETTINGS, CHAT_FIELDS, CHAT_LACKING, CHAT_NEUTRAL,  # noqa: F401
                                      COMPLETION_FIELDS, COMPLETION_LACKING, IDENTIFIERS, IDENTITY, IGNORED,
                                      ITEM_FIELDS, MAX_HEADER_VALUE, NEUTRAL, REASONING_EFFORTS, RESPONSES_LACKING,
                                      VLLM_IGNORED,
                                      check_fields, check_identifiers, check_metadata, check_min_tokens,
                                      check_neutral, foreign_hint, format_set_aside, json_type, load_json,
                                      logprobs_of_chat, max_tokens_field, must_be, parse_logit_bias, parse_messages,
                                      parse_tools, priority, request_item, whole_numbers)
from pipeline_dsl.requests_io import check_lacking as request_check_lacking
from stages.fields import REQUEST_FIELDS, ParamError, check_value, param_of

from .api_error import APIError
from .extras import check_tools, parse_extras, refused, request_errors
from .token_fields import MAX_LOGPROBS, parse_token_fields

log = logging.getLogger("agp.serve")


@dataclass(frozen=True)
class GenerationRequest:
    kind: str                                  # "completion" | "chat" | "responses" (a chat it answers)
    model: str                                 # the id the client asked for (answers carry it)
    fields: dict                               # sampling overrides and n, validated
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None
    stream: bool = False
    include_usage: bool = False                # stream_options.include_usage
    continuous_usage: bool = False             # stream_options.continuous_usage_stats: usage on every chunk
    pin: str | None = None                     # the generate stage `model` names, if it names one
    metadata: dict | None = None
    tools: tuple | None = None                 # OpenAI tools (chat)
    tool_choice: Any = "none"                  # none | auto | required | {"type": "function", ...}
    parallel_tool_calls: bool = True
    response_format: dict | None = None        # {"type": "json_object" | "json_schema", ...}
    more_prompts: tuple = ()                   # completions: the rest of a batch of prompts
    request_id: str | None = None              # the client's id of the request (vLLM's request_id)
    chat_template_kwargs: dict | None = None   # extra variables of the chat template (chat)
    prompt_logprobs: int | None = None         # vLLM's prompt_logprobs: alternatives the answer lists
    max_tokens_field: str = "max_tokens"       # what the client called it (max_completion_tokens, ...)
    format_field: str = "response_format"      # the field response_format came in (guided_json, ...)
    identity: dict | None = None               # user / safety_identifier, as the client sent them
    include_reasoning: bool = True             # vLLM's: false leaves a split-out thinking out of the answer
    stage_n: int = 1                           # the n that answers a request that sets none (its stages')

    def split(self) -> list["GenerationRequest"]:
        """One request per prompt of a batched completions request (choice indexes: i * n + j)."""
        if not self.more_prompts:
            return [self]
        out = [replace(self, more_prompts=())]
        for p in self.more_prompts:
            out.append(replace(self, more_prompts=(), prompt=p if isinstance(p, str) else None,
                               prompt_token_ids=tuple(p) if not isinstance(p, str) else None))
        return out

    @property
    def choices_per_prompt(self) -> int:
        """The choice numbers each prompt takes (choice i of prompt k is k * this + i): its n, or the
        generate stages' where it sets none (a sent n replaces every stage's, as vLLM's does; a
        fan-out's choices past it are numbered after every prompt's: ChoiceNumbers)."""
        n = self.fields.get("n")
        return int(n) if n else self.stage_n

    @property
    def tools_active(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def format_set_aside(self) -> str | None:
        """Why the request's own format (its response_format, structured_outputs or guided_* field)
        does not hold its answer, or None where it does (requests_io.format_set_aside: a forced
        tool call). The answer's Warning header says it (generation.warned)."""
        return format_set_aside(self.tools, self.tool_choice, self.response_format, self.format_field)

    @property
    def call_limit(self) -> int | None:
        """Tool calls an answer may carry: one with parallel_tool_calls false, else any."""
        return None if self.parallel_tool_calls else 1

    def item(self, request_id: str, exclude_tools_when_none: bool = False,
             headers: dict | None = None) -> dict[str, Any]:
        """The request as the pipeline's items carry it (what a python stage sees). Its tools reach
        the prompt whatever tool_choice says, as in vLLM (tool_choice "none" only leaves the answer
        unparsed); `exclude_tools_when_none` (vLLM's --exclude-tools-when-tool-choice-none) leaves
        them out of a request whose tool_choice is "none". `headers`: the HTTP headers
        --request-headers copies in (request_headers)."""
        drop = exclude_tools_when_none and self.tool_choice == "none"
        return request_item(request_id, messages=self.messages, prompt_token_ids=self.prompt_token_ids,
                            prompt=self.prompt, fields=self.fields, model=self.model, metadata=self.metadata,
                            tools=None if drop else self.tools, tool_choice=self.tool_choice,
                            parallel_tool_calls=self.parallel_tool_calls, response_format=self.response_format,
                            chat_template_kwargs=self.chat_template_kwargs, identity=self.identity,
                            headers=headers)


def request_headers(raw, names) -> dict[str, str]:
    """The HTTP headers agp serve copies (those `--request-headers` names and those the pipeline's
    conditions compare: ServeConfig.request_headers), as the request item carries them:
    {lower-case name: value} (a header sent twice: its values joined by ", "), from the request's
    raw (name, value) byte pairs. Only the named ones: Authorization or a cookie reaches a
    pipeline only when named. A value over MAX_HEADER_VALUE characters is a 400 naming it."""
    out: dict[str, str] = {}
    if not names:
        return out
    for key, value in raw:
        name = key.decode("latin-1").lower()
        if name in names:
            text = value.decode("latin-1")
            out[name] = f"{out[name]}, {text}" if name in out else text
    for name, text in out.items():
        if len(text) > MAX_HEADER_VALUE:
            raise APIError(f"the '{name}' header has {len(text)} characters; the pipeline takes at most "
                           f"{MAX_HEADER_VALUE} (agp serve copies it into the request)")
    return out


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying why not (requests_io.load_json: not
    UTF-8, not JSON, too deep, unreadable numbers, lone surrogates), its integer fields' whole floats
    made ints (requests_io.whole_numbers). A UTF-8 byte order mark before
    the JSON is skipped, as vLLM's server skips it (Python's json.loads of the body's bytes): an
    editor on Windows starts a file it saves with one, and `curl -d @request.json` sends it."""
    with request_errors:
        obj = load_json(raw.removeprefix(b"\xef\xbb\xbf"), "the request body")
    if not isinstance(obj, dict):
        raise APIError(f"the request body must be a JSON object, not {json_type(obj)}")
    return whole_numbers(obj)          # "max_tokens": 4.0 is 4 from here on, on every route


# ---------------------------------------------------------------- field checks

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bad(param: str, expected: str, value) -> APIError:
    return refused(must_be(param, expected, value))


def _field(obj: dict, name: str, ok, expected: str):
    value = obj.get(name)
    if value is not None and not ok(value):
        raise _bad(name, expected, value)
    return value


def check_unknown(obj: dict, known: set[str], lenient: bool = False, where: str = "") -> dict:
    """The body (or the object of the body at `where`, "stream_options.") without unknown fields: a
    400 naming the first, or with `lenient` (vLLM's behaviour) a log line and the field ignored."""
    unknown = [key for key in obj if key not in known]
    # another server's name for a field (llama.cpp's n_predict, Ollama's options): what this route
    # calls it, naming only fields in `known` (requests_io.foreign_hint)
    foreign = {} if where else {k: hint for k in unknown if (hint := foreign_hint(k, known))}
    if unknown and lenient:
        log.info("ignoring unrecognized request arguments: %s", ", ".join(
            repr(where + k) + (f" ({foreign[k]})" if k in foreign else "") for k in unknown))
        return {k: v for k, v in obj.items() if k in known}
    for key in unknown:
        # only a close name is offered: a typo (0.8 and up), not another field that shares letters (0.65)
        close = closest(key, known, cutoff=0.75)
        hint = f" ({foreign[key]})" if key in foreign else f"; did you mean '{where}{close}'?" if close else ""
        raise APIError(f"unrecognized request argument {json.dumps(where + key)}{hint}", param=where + key,
                       code="unknown_parameter")         # OpenAI's code for it
    return obj


_CHAT_NEUTRAL = NEUTRAL | CHAT_NEUTRAL
_COMPLETION_CHECKED = {name: IGNORED[name] for name in ("guided_decoding_backend", *VLLM_IGNORED)}
_CHAT_CHECKED = _COMPLETION_CHECKED | {name: IGNORED[name]
                                       for name in ("reasoning_effort", "include_reasoning", "store", "service_tier")}


def _check_unsupported(obj: dict, chat: bool = False) -> None:
    """Fields agp knows but only serves at their neutral value (NEUTRAL), those of features it
    lacks (CHAT_LACKING, COMPLETION_LACKING), and the ones only checked here (IGNORED:
    guided_decoding_backend, as one backend, llguidance, serves every structured output; vLLM's
    VLLM_IGNORED; chat's
    reasoning_effort, include_reasoning, store and service_tier)."""
    with request_errors:
        check_neutral(obj, _CHAT_NEUTRAL if chat else NEUTRAL)
        check_fields(obj, _CHAT_CHECKED if chat else _COMPLETION_CHECKED)
        request_check_lacking(obj, CHAT_LACKING if chat else COMPLETION_LACKING)


def check_lacking(obj: dict, table: dict) -> None:
    """Fields of features agp lacks (CHAT_LACKING, RESPONSES_LACKING), as a 400 (requests_io.check_lacking)."""
    with request_errors:
        request_check_lacking(obj, table)


def _metadata(obj: dict) -> dict | None:
    """The request's `metadata`, bounded as OpenAI bounds it (requests_io.check_metadata)."""
    metadata = _field(obj, "metadata", lambda v: isinstance(v, dict), "an object")
    if metadata is None:
        return None
    with request_errors:
        return check_metadata(metadata)


def _check_identifiers(obj: dict) -> dict:
    """The request's identifiers checked (strings, bounded: requests_io.check_identifiers); the end
    user's (IDENTITY: user, safety_identifier) returned, for the item a pipeline's stages and
    conditions see."""
    with request_errors:
        check_identifiers(obj)
    return {k: obj[k] for k in IDENTITY if obj.get(k) is not None} or None


def check_cache_settings(obj: dict) -> None:
    """OpenAI's prompt-cache settings of a chat or responses request, checked (CACHE_SETTINGS)."""
    with request_errors:
        check_fields(obj, CACHE_SETTINGS)


def truncation(obj: dict, max_model_len: int) -> dict:
    """vLLM's truncate_prompt_tokens: keep the prompt's last k tokens (-1: the context), on
    completions, chat and embeddings."""
    k = _field(obj, "truncate_prompt_tokens", *ITEM_FIELDS["truncate_prompt_tokens"])
    if k is None:
        return {}
    if k > max_model_len:
        raise APIError(f"'truncate_prompt_tokens' = {k} is beyond the context of {max_model_len} tokens",
                       param="truncate_prompt_tokens", code="context_length_exceeded")
    return {"truncate_prompt_tokens": max_model_len if k == -1 else k}



def add_special_tokens(obj: dict) -> dict:
    """vLLM's add_special_tokens of a completions or embeddings request: a text prompt's start token
    (default true: the encode stage's); {} when left out or null."""
    special = _field(obj, "add_special_tokens", *ITEM_FIELDS["add_special_tokens"])
    return {} if special is None else {"add_special_tokens": special}


def priority_field(obj: dict) -> dict:
    """vLLM's priority (lower first) of a generation or embeddings request: checked here for its type
    and range; whether the engine schedules by priority, the batcher it reaches says (a 400 when it
    schedules fcfs). Null is refused, as vLLM's `int` field refuses it (requests_io.NOT_NULL)."""
    if "priority" not in obj:
        return {}
    with request_errors:
        return {"priority": priority(obj["priority"])}


# where agp serve MODEL's completions max_tokens comes from when a request sets none, as its errors say
COMPLETIONS_DEFAULT = "the completions default where a request sets none"


def _sampling(obj: dict, max_model_len: int, limit: str = "max_tokens",
              default_max_tokens: int | None = None) -> dict:
    """The request's sampling fields, each checked against the generate parameter it sets (one
    schema: stages/fields.py), max_tokens read from `limit` (chat's: max_tokens_field); what it leaves
    out, its generate stage decides, but for `default_max_tokens`: the max_tokens of a request that sets
    none, as if sent (agp serve MODEL's completions: vLLM's 16), so that min_tokens is checked against it."""
    values: dict[str, Any] = {}
    for name in REQUEST_FIELDS:
        key = limit if name == "max_tokens" else name
        if obj.get(key) is None:
            continue
        try:
            values[name] = check_value(param_of(*REQUEST_FIELDS[name]), obj[key], key)
        except ParamError as e:
            raise APIError(str(e), param=e.field, quoted=e.quoted) from None
    if values.get("max_tokens", 0) > max_model_len:
        raise APIError(f"'{limit}' = {values['max_tokens']} is beyond the context of "
                       f"{max_model_len} tokens, which the prompt shares; ask for at most {max_model_len} "
                       "less the prompt's tokens",
                       param=limit, code="context_length_exceeded")
    default = None
    if default_max_tokens is not None and "max_tokens" not in values:
        values["max_tokens"], default = default_max_tokens, COMPLETIONS_DEFAULT
    with request_errors:
        check_min_tokens(values, limit, default)
    stop_ids = obj.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_int(t) and t >= 0 for t in stop_ids):
            raise _bad_ids("stop_token_ids", stop_ids) or _bad("stop_token_ids", "an array of token ids", stop_ids)
        values["stop_token_ids"] = list(stop_ids)
    if obj.get("logit_bias") is not None:
        with request_errors:
            values["logit_bias"] = parse_logit_bias(obj["logit_bias"])
    return values




# stream_options' keys: include_obfuscation (OpenAI's) is taken and changes nothing, as agp's chunks
# carry no obfuscation field; an unknown key is refused as an unknown top-level field is
STREAM_OPTIONS = ("include_usage", "continuous_usage_stats", "include_obfuscation")
RESPONSES_STREAM_OPTIONS = ("include_obfuscation",)


def stream_options(obj: dict, keys: tuple[str, ...], lenient: bool = False) -> dict | None:
    """The request's stream_options: an object of `keys`, each true, false or null."""
    options = _field(obj, "stream_options", lambda v: isinstance(v, dict), "an object")
    if options is None:
        return None
    options = check_unknown(options, set(keys), lenient, where="stream_options.")
    for key in keys:
        if options.get(key) is not None and not isinstance(options[key], bool):
            raise _bad(f"stream_options.{key}", "true or false", options[key])
    return options


def _stream_flags(obj: dict, lenient: bool = False) -> dict:
    """stream, and stream_options' include_usage and continuous_usage_stats (vLLM's: every chunk
    carries the usage so far; with include_usage, as vLLM takes it, whose StreamOptions default
    include_usage to true: continuous_usage_stats alone asks for both)."""
    stream = _field(obj, "stream", lambda v: isinstance(v, bool), "true or false") or False
    options = stream_options(obj, STREAM_OPTIONS, lenient)
    flags = {"stream": stream, "include_usage": False, "continuous_usage": False}
    if options:
        if not stream:
            raise APIError("'stream_options' is only allowed with \"stream\": true",
                           param="stream_options")
        usage = options.get("include_usage")
        if "include_usage" not in options and options.get("continuous_usage_stats"):
            usage = True           # vLLM's field, vLLM's meaning: a usage stream is asked for (null asks for none)
        flags["include_usage"] = bool(usage)
        flags["continuous_usage"] = bool(options.get("continuous_usage_stats") and flags["include_usage"])
    return flags


def model_of(obj: dict, served: tuple[str, ...], stages: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """(the model id of the answer, the generate stage it pins or None)."""
    model = obj.get("model")
    if model is None:
        return served[0], None
    if isinstance(model, str) and model in stages:
        return model, model
    if not isinstance(model, str):
        raise _bad("model", "a string", model)
    if model not in served:
        raise unknown_model(model, tuple(served) + tuple(stages))
    return model, None


def unknown_model(model: str, known: tuple, type: str = "invalid_request_error") -> APIError:
    """The 404 for a model name the server does not answer to: the closest name it does, or all of
    them (a request's `model`, `GET /v1/models/{id}`)."""
    close = closest(model, known)
    hint = f"; did you mean '{close}'?" if close else f"; the pipeline answers to {', '.join(known)}"
    shown = model if len(model) <= 64 else model[:61] + "..."          # not megabytes back, nor in the log
    return APIError(f"the model '{shown}' does not exist{hint}", status=404, type=type, param="model",
                    code="model_not_found")


# ---------------------------------------------------------------- requests


def parse_completion(obj: dict, *, max_model_len: int, served: tuple[str, ...],
                     stages: tuple[str, ...] = (), lenient: bool = False,
                     default_max_tokens: int | None = None, stage_n: int = 1) -> GenerationRequest:
    """POST /v1/completions: `prompt` is a string, an array of token ids, or a batch of those.
    `default_max_tokens`: the max_tokens of a request that sets none (agp serve MODEL's: vLLM's 16,
    which its request model sets as if sent); a prompt scored (max_tokens 0) takes none. `stage_n`:
    the n that answers a request that sets none (the largest of the pipeline's generate stages'),
    which bounds its answers (check_choices) as a sent n does."""
    obj = check_unknown(obj, COMPLETION_FIELDS, lenient)
    model, pin = model_of(obj, served, stages)
    _check_unsupported(obj)
    identity = _check_identifiers(obj)
    truncated = truncation(obj, max_model_len)
    if "prompt" not in obj or obj["prompt"] is None:
        raise APIError("'prompt' is required", param="prompt")
    prompts = _prompts(obj["prompt"], max_model_len, truncated.get("truncate_prompt_tokens"))
    flags = _stream_flags(obj, lenient)
    echo = _field(obj, "echo", lambda v: isinstance(v, bool), "true or false") or False
    metadata = _metadata(obj)
    # max_tokens 0 (an integer, 0.0 made one where the body was read: false is no more a token count
    # here than anywhere) scores the prompt without generating; only echo returns what it scored
    zero = _is_int(obj.get("max_tokens")) and obj["max_tokens"] == 0
    if zero and not echo:
        raise APIError("'max_tokens' = 0 generates nothing, so it is taken only with \"echo\": true (the prompt "
                       "scored, with \"logprobs\": lm-eval's loglikelihood); give 1 or more to generate",
                       param="max_tokens")
    scoring = echo and zero
    fields = _sampling({k: v for k, v in obj.items() if not (scoring and k == "max_tokens")}, max_model_len,
                       default_max_tokens=None if scoring else default_max_tokens)
    top = _field(obj, "logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
                 f"an integer from 0 to {MAX_LOGPROBS}")
    tokens = parse_token_fields(obj, stream=flags["stream"])
    fields.update(tokens.fields)
    if top is not None:
        fields["logprobs"] = top
        if echo:                # the echoed prompt's logprobs: one computation serves both lists
            fields["prompt_logprobs"] = max(top, tokens.prompt_logprobs or 0)
    if scoring:
        fields["max_tokens"] = 0
    if echo:
        fields["echo"] = True
    fields.update(add_special_tokens(obj))
    extras = parse_extras(obj, chat=False)
    fields.update(extras.fields)
    fields.update(truncated)
    fields.update(priority_field(obj))
    check_choices(len(prompts), int(fields.get("n") or stage_n))
    first, rest = prompts[0], prompts[1:]
    return GenerationRequest("completion", model, fields, prompt=first if isinstance(first, str) else None,
                             prompt_token_ids=tuple(first) if not isinstance(first, str) else None,
                             **flags, pin=pin, more_prompts=tuple(rest), metadata=metadata,
                             response_format=extras.constraint, request_id=extras.request_id,
                             prompt_logprobs=tokens.prompt_logprobs, identity=identity,
                             format_field=extras.format_field, stage_n=stage_n)


MAX_PROMPTS = 256          # prompts one completions request may batch
MAX_CHOICES = 256          # answers one request may ask for: prompts x n


def check_choices(prompts: int, n: int) -> None:
    """A request's answers (its prompts times n each) bounded: 256 prompts x n = 64 would hold
    16,384 sequences of one client."""
    if prompts * n > MAX_CHOICES:
        raise APIError(f"{prompts} prompts x n = {n} asks for {prompts * n} answers; at most {MAX_CHOICES} a "
                       "request (send fewer prompts or a smaller n)", param="n" if prompts == 1 else "prompt")


def check_queue_room(requests: int, max_queue: int, param: str) -> None:
    """A request answered as `requests` requests of the pipeline (a completions batch's prompts,
    an embeddings request's inputs), all admitted at once or none: more than the queue ever holds
    could never be admitted, so it is a 400 naming the limit, not a 429 a client retries forever."""
    if requests > max_queue:
        raise APIError(f"'{param}' has {requests} entries, each a request of its own in the pipeline's queue, "
                       f"which holds at most {max_queue} (requests.max_queue, or --max-queue): this request "
                       f"could never be admitted; send at most {max_queue} a request", param=param)


def _bad_ids(name: str, value) -> APIError | None:
    """The first element that is no token id in an array of ids (or a batch of such arrays and
    strings), named by its place: a prompt of thousands of ids shown cut at 40 characters would
    not show it. None when `value` is not shaped as ids at all."""
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(p, (list, str)) for p in value):              # a batch: look into its arrays
        return next((e for i, p in enumerate(value) if isinstance(p, list)
                     for e in [_bad_ids(f"{name}[{i}]", p)] if e is not None), None)
    for i, t in enumerate(value):
        if not (_is_int(t) and t >= 0):
            return APIError(f"'{name}[{i}]' = {json.dumps(t)[:40]} is not a token id (an integer from 0)",
                            param=name.split("[")[0], quoted=(json.dumps(t)[:40],))
    return None


def _prompts(prompt, max_model_len: int, keep: int | None = None) -> list:
    """`prompt`: a string, an array of token ids, or a batch: an array of strings or of token-id
    arrays. Each prompt a string or a list of ids (its last `keep` ids when truncated)."""
    def ids_ok(p) -> bool:
        return isinstance(p, list) and bool(p) and all(_is_int(t) and t >= 0 for t in p)

    if isinstance(prompt, str):
        batch = [prompt]
    elif ids_ok(prompt):
        batch = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids_ok(p) for p in prompt):
        batch = list(prompt)
    elif isinstance(prompt, list) and not prompt:
        raise APIError("'prompt' is empty", param="prompt")
    else:
        raise _bad_ids("prompt", prompt) or _bad("prompt", "a string, an array of token ids, or an array of those",
                                                 prompt)
    return bounded_batch(batch, "prompt", "prompts", MAX_PROMPTS, max_model_len, keep)


def bounded_batch(batch: list, field: str, noun: str, most: int, max_model_len: int, keep: int | None) -> list:
    """The texts a request's `field` holds (a completions prompt, an embeddings input), each a
    string or a list of token ids: at most `most` (`noun`: what each is called), each list its
    last `keep` ids when truncated (truncate_prompt_tokens), none empty, none of more ids than
    the context (a string's tokens are counted once encoded)."""
    if len(batch) > most:
        raise APIError(f"'{field}' holds {len(batch)} {noun}; at most {most} a request", param=field)
    if keep:
        batch = [p[-keep:] if isinstance(p, list) else p for p in batch]
    for i, p in enumerate(batch):
        where = f"'{field}'" if len(batch) == 1 else f"'{field}[{i}]'"
        if isinstance(p, str) and not p:
            raise APIError(f"{where} is empty", param=field)
        if isinstance(p, list) and len(p) > max_model_len:
            raise APIError(f"{where} holds {len(p)} tokens, beyond the context of {max_model_len} tokens",
                           param=field, code="context_length_exceeded")
    return batch


def _messages(value) -> tuple[dict, ...]:
    if value is None:
        raise APIError("'messages' is required", param="messages")
    with request_errors:
        return tuple(parse_messages(value))   # the one validation of chat messages (agp run's too)


def parse_chat(obj: dict, *, max_model_len: int, served: tuple[str, ...],
               stages: tuple[str, ...] = (), lenient: bool = False, stage_n: int = 1) -> GenerationRequest:
    """POST /v1/chat/completions (`stage_n`: as parse_completion's)."""
    obj = check_unknown(obj, CHAT_FIELDS, lenient)
    model, pin = model_of(obj, served, stages)
    _check_unsupported(obj, chat=True)
    identity = _check_identifiers(obj)
    check_cache_settings(obj)
    truncated = truncation(obj, max_model_len)
    messages = _messages(obj.get("messages"))
    flags = _stream_flags(obj, lenient)
    limit = max_tokens_field(obj)
    fields = _sampling(obj, max_model_len, limit)
    want = _field(obj, "logprobs", lambda v: isinstance(v, bool), "true or false")
    top = _field(obj, "top_logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
                 f"an integer from 0 to {MAX_LOGPROBS}")
    with request_errors:
        k = logprobs_of_chat(want, top)
    if k is not None:
        fields["logprobs"] = k
    tokens = parse_token_fields(obj, stream=flags["stream"])
    fields.update(tokens.fields)
    metadata = _metadata(obj)
    with request_errors:
        tools, choice, parallel = parse_tools(obj)
    check_tools(tools, choice)
    extras = parse_extras(obj, chat=True)
    fields.update(extras.fields)
    fields.update(_render_flags(obj))
    fields.update(truncated)
    fields.update(priority_field(obj))
    check_choices(1, int(fields.get("n") or stage_n))
    return GenerationRequest("chat", model, fields, messages=messages, **flags, pin=pin, metadata=metadata,
                             tools=tuple(tools) if tools else None, tool_choice=choice,
                             parallel_tool_calls=parallel, response_format=extras.constraint,
                             format_field=extras.format_field,
                             request_id=extras.request_id, chat_template_kwargs=extras.template_kwargs,
                             prompt_logprobs=tokens.prompt_logprobs, identity=identity,
                             max_tokens_field=limit, include_reasoning=obj.get("include_reasoning") is not False,
                             stage_n=stage_n)


def _render_flags(obj: dict) -> dict:
    """add_generation_prompt / continue_final_message (vLLM's): how the conversation's end is
    rendered; both true is a 400."""
    flags = {name: _field(obj, name, lambda v: isinstance(v, bool), "true or false")
             for name in ("add_generation_prompt", "continue_final_message")}
    if flags["continue_final_message"] and flags["add_generation_prompt"]:
        raise APIError("'continue_final_message' and 'add_generation_prompt' cannot both be true: the answer either "
                       "goes on with the last message or starts a new turn", param="continue_final_message")
    return {k: v for k, v in flags.items() if v is not None}


def conversation(obj: dict) -> tuple[tuple[dict, ...], dict, dict | None]:
    """A conversation to render as chat does, outside a chat request (vLLM's chat-form embeddings):
    its messages, its rendering flags (add_generation_prompt, continue_final_message; both true is
    a 400) and its chat_template_kwargs."""
    return _messages(obj.get("messages")), _render_flags(obj), parse_extras(obj, chat=True).template_kwargs


# ---------------------------------------------------------------- logprobs (OpenAI's two shapes)

class TextOffsets:
    """OpenAI's `text_offset`: where each token's text begins in the answer's text, in characters.

    A token holding part of a UTF-8 character (a byte-level BPE splits most non-Latin characters)
    reads U+FFFD alone, so adding up the lengths of the tokens' texts runs past the text by a
    character or more at each split. The offsets count instead the characters the tokens' bytes
    have completed so far: a token that begins inside a character points at that character.
    A token of `special` the text leaves out takes no characters: a generated one when
    `skip_special_tokens` (the request's flag) drops it from the answer, a prompt's one that is
    not in the echoed prompt (the start token the tokenizer put first). A prompt's token whose
    text begins with a space the echoed prompt does not hold there (a SentencePiece prompt's
    first word: its "▁" is a space inside a text, none at its start) begins after that space.
    One instance follows one choice's tokens in order (a stream's chunks too)."""

    def __init__(self, bytes_of, start: int = 0, special=frozenset(), skip_special_tokens: bool = True,
                 decoder=None):
        self.bytes_of = bytes_of                 # token id -> its own bytes (part of a character too)
        self.pos = start
        self.special, self.skip = special, skip_special_tokens
        # the tokens' bytes read as the tokenizer's text reads them (a SentencePiece text makes each
        # stray byte one U+FFFD, Python's "replace" one of a cut character's bytes): its bytes_decoder()
        if decoder is None:
            from pipeline_dsl.engine.tokenizer import replacing_decoder
            decoder = replacing_decoder()
        self._decoder = decoder

    def next(self, token_id: int, shown_in: str | None = None) -> int:
        """The offset of this token, then move past it; `shown_in`: the prompt text it is echoed in
        (a prompt's token), else it is a generated one."""
        data = self.bytes_of(token_id)
        if token_id in self.special:
            piece = data.decode("utf-8", "replace")
            if not (shown_in.startswith(piece, self.pos) if shown_in is not None else not self.skip):
                return self.pos
        waiting = self._decoder.getstate()[0]
        if waiting and data and not _continues(waiting, data):
            # the bytes of a character that never came: their U+FFFD stand before this token
            self.pos += len(self._decoder.decode(b"", final=True))
        at = self.pos
        if shown_in is not None and data.startswith(b" ") and not shown_in.startswith(" ", at):
            data = data[1:]
        self.pos += len(self._decoder.decode(data))
        return at


def _continues(waiting: bytes, data: bytes) -> bool:
    """Whether `data`'s first byte goes on with the start of a UTF-8 character `waiting`."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(waiting + data[:1], final=False)
        return True
    except UnicodeDecodeError:
        return False


def completion_logprobs(data: dict, text_of, echo: str | None, offsets: TextOffsets, k: int | None = None) -> dict:
    """The legacy completions `logprobs` of one answer: tokens, token_logprobs, top_logprobs,
    text_offset; the prompt's tokens first when echoed (`echo`: the prompt's text as echoed; its
    first token has no logprob); `k` alternatives a token at most (the prompt's may have been
    computed with more, for prompt_logprobs); `offsets` places each token in the text
    (TextOffsets, carried across a stream's chunks)."""
    entries = list(data.get("prompt_logprobs") or []) if echo is not None else []
    prompt = len(entries)
    if entries:
        entries[0] = {"token_id": data["prompt_token_ids"][0], "logprob": None, "top": None}
    entries += data.get("logprobs") or []
    tokens, lps, tops, at = [], [], [], []
    for i, e in enumerate(entries):
        tokens.append(text_of(e["token_id"]))
        lps.append(e["logprob"])
        # OpenAI's legacy shape: the sampled token is always listed (up to logprobs + 1 entries)
        tops.append(None if e.get("top") is None else _top_dict([*e["top"][:k], (e["token_id"], e["logprob"])],
                                                                text_of))
        at.append(offsets.next(e["token_id"], echo if i < prompt else None))
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": at}


def _top_dict(top: list, text_of) -> dict:
    """{text: logprob} of alternatives listed most likely first; tokens whose text coincides
    (byte pieces of one character) keep the most likely one's logprob, so the order holds."""
    out: dict = {}
    for t, lp in top:
        out.setdefault(text_of(t), lp)
    return out


def chat_logprobs(entries: list, text_of, bytes_of=None) -> dict:
    """The chat `logprobs` of an answer (or of one chunk's tokens). `bytes` are each token's own
    (`bytes_of`): a token that is part of a character shows U+FFFD as its text, and a client
    joins the bytes of consecutive tokens to get the character, as OpenAI's field is meant for."""
    def one(token_id, logprob):
        piece = text_of(token_id)
        raw = bytes_of(token_id) if bytes_of else piece.encode("utf-8", "replace")
        return {"token": piece, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(e["token_id"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries]}


# ---------------------------------------------------------------- /tokenize, /detokenize (vLLM's shapes)

# what only a conversation's rendering takes: a 400 beside a 'prompt' on /tokenize
TOKENIZE_RENDERING = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools")
# vLLM's /tokenize fields of features agp lacks (its TokenizeChatRequest's), as chat takes them: null (or
# {}), as a client that writes out vLLM's whole request model sends them, else a 400 saying why
TOKENIZE_LACKING = {name: CHAT_LACKING[name] for name in ("chat_template", "mm_processor_kwargs", "media_io_kwargs")}


def parse_tokenize(obj: dict, *, served: tuple[str, ...], stages: tuple[str, ...] = ()) -> dict:
    """POST /tokenize: {"prompt": str, "add_special_tokens": true} or {"messages": [...],
    "add_generation_prompt": true, "continue_final_message": false}; `model` may name a generate
    stage (its tokenizer); "return_token_strs": true asks for each id's vocabulary string too."""
    obj = check_unknown(obj, {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                               "continue_final_message", "tools", "return_token_strs", "chat_template_kwargs",
                               *TOKENIZE_LACKING})
    check_lacking(obj, TOKENIZE_LACKING)
    _, pin = model_of(obj, served, stages)
    special = _field(obj, "add_special_tokens", lambda v: isinstance(v, bool), "true or false")
    strs = bool(_field(obj, "return_token_strs", lambda v: isinstance(v, bool), "true or false"))
    if "prompt" in obj and "messages" in obj:      # the one given null is left out, as a client sends it
        obj = {k: v for k, v in obj.items() if v is not None or k not in ("prompt", "messages")}
    if ("prompt" in obj) == ("messages" in obj):
        raise APIError("give exactly one of 'prompt' or 'messages'", param="prompt")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):       # "" is counted (vLLM: none, or the start token)
            raise _bad("prompt", "a string", obj["prompt"])
        rendering = [k for k in TOKENIZE_RENDERING if obj.get(k) is not None]
        if rendering:                                # as /v1/embeddings refuses them beside an 'input'
            raise APIError(f"'{rendering[0]}' renders 'messages', and this request tokenizes a 'prompt'",
                           param=rendering[0])
        return {"prompt": obj["prompt"], "add_special_tokens": True if special is None else special, "pin": pin,
                "return_token_strs": strs}
    if special:                                      # as chat and /v1/embeddings refuse it beside 'messages'
        raise APIError("'add_special_tokens' = true is not supported with 'messages': the chat template writes "
                       "the special tokens (leave it out or use false)", param="add_special_tokens")
    out = {"messages": list(_messages(obj["messages"])), "pin": pin, "return_token_strs": strs,
           "chat_template_kwargs": parse_extras(obj, chat=True).template_kwargs, **_render_flags(obj)}
    if obj.get("tools") is not None:
        with request_errors:
            out["tools"], out["tool_choice"], _ = parse_tools(obj)
    return out


def parse_detokenize(obj: dict, *, served: tuple[str, ...], stages: tuple[str, ...] = (),
                     max_model_len: int | None = None) -> tuple[list, str | None]:
    """POST /detokenize: {"tokens": [ids]}, at most the model's context of them."""
    obj = check_unknown(obj, {"model", "tokens"})
    _, pin = model_of(obj, served, stages)
    tokens = obj.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) and t >= 0 for t in tokens):
        raise _bad_ids("tokens", tokens) or _bad("tokens", "an array of token ids", tokens)
    if max_model_len is not None and len(tokens) > max_model_len:
        raise APIError(f"'tokens' holds {len(tokens)} ids; at most {max_model_len} (the context)",
                       param="tokens", code="context_length_exceeded")
    return tokens, pin


# ---------------------------------------------------------------- responses

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int | None = None) -> dict:
    """OpenAI's usage; `reasoning_tokens` (answers.reasoning_tokens: None where no reasoning parser
    reads the answer) as its completion_tokens_details, as vLLM gives them."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


def completion_response(rid: str, model: str, choices: list[tuple], use: dict,
                        created: int | None = None, fingerprint: str | None = None) -> dict:
    """choices: (index, text, finish_reason[, logprobs[, what else the choice carries]]) each;
    `fingerprint`: OpenAI's system_fingerprint (serve/build.py), on every answer and chunk."""
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()),
            "model": model, "system_fingerprint": fingerprint,
            "choices": [{"index": c[0], "text": c[1], "logprobs": c[3] if len(c) > 3 else None,
                         "finish_reason": c[2], **(c[4] if len(c) > 4 else {})} for c in choices],
            "usage": use}


def chat_message(text: str, finish_reason: str | None, tools_active: bool,
                 call_limit: int | None = None, parser: str = "hermes", read=None,
                 thinking: bool | None = None, named: bool = False) -> tuple[dict, str | None]:
    """(the assistant message, the finish reason) of one answer: tool calls parsed out of the
    text when the request gave tools (then finish_reason is "tool_calls", unless `named`: a
    tool_choice naming a function forced the call, and the answer's own reason stays, "stop"
    where it ended, as OpenAI's and vLLM's answers give it), `call_limit` at most,
    read in the form `parser` names (pipeline_dsl/tools.py's PARSERS: the model's family);
    `read`: what its generate stage read (Choice.tool_read), taken where it read the same.
    `thinking`: None where no reasoning parser reads the answer (agp serve --reasoning-parser;
    chat_response gives such a message NO_REASONING); else whether the answer starts in its
    thinking (pipeline_dsl.reasoning.thinks): the reasoning is split off first
    (`reasoning`, and vLLM's older `reasoning_content`), and the tool calls are read from
    the content after it alone."""
    reasoning = None
    content: str | None = text
    if thinking is not None:
        from pipeline_dsl.reasoning import split

        reasoning, content = split(text, thinking)
    message: dict = {"role": "assistant", "content": content}
    if thinking is not None:
        message["reasoning"] = message["reasoning_content"] = reasoning
    if tools_active and content is not None:
        from pipeline_dsl.tools import read_tool_calls

        read = read_tool_calls(content, call_limit, parser, read)
        message["content"] = read.content       # a family's markers left out
        if read.calls:
            message["tool_calls"] = read.calls
            return message, finish_reason if named else "tool_calls"
    return message, finish_reason


# vLLM's answer to a model without a reasoning parser: its message's reasoning fields, null. Clients
# of vLLM read them without a guard (`message.reasoning_content`: an AttributeError in the openai SDK
# where the key is missing); `reasoning` is vLLM's name, `reasoning_content` its older one, still answered
NO_REASONING = {"reasoning": None, "reasoning_content": None}


def chat_response(rid: str, model: str, choices: list[tuple], use: dict, created: int | None = None,
                  tools_active: bool = False, top: dict | None = None, call_limit: int | None = None,
                  fingerprint: str | None = None, parsers: list | None = None, reads: list | None = None,
                  thinking: bool | list | None = None, include_reasoning: bool = True, named: bool = False) -> dict:
    """choices: (index, text, finish_reason[, logprobs[, what else the choice carries]]) each;
    `top`: what the answer carries beside its choices (vLLM's prompt_logprobs, prompt_token_ids);
    `parsers`: the form each choice's calls are read in (chat_message's `parser`; hermes where
    not given), `reads`: the tool calls each choice's generate stage read (its `read`), in order;
    `thinking`: chat_message's (None: no reasoning parser, each message's reasoning fields null), or
    a list of them, one a choice (an answer its stage constrained holds no thinking);
    `include_reasoning` false (vLLM's field): the thinking split off and left out (the fields null);
    `named`: chat_message's (a tool_choice that names a function)."""
    out = []
    for k, c in enumerate(choices):
        thinks = thinking[k] if isinstance(thinking, list) else thinking
        message, reason = chat_message(c[1], c[2], tools_active, call_limit, parsers[k] if parsers else "hermes",
                                       reads[k] if reads else None, thinks, named)
        if thinks is None or not include_reasoning:
            message.update(NO_REASONING)
        out.append({"index": c[0], "message": message, "logprobs": c[3] if len(c) > 3 else None,
                    "finish_reason": reason, **(c[4] if len(c) > 4 else {})})
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()),
            "model": model, "system_fingerprint": fingerprint, "choices": out, "usage": use, **(top or {})}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None, index: int = 0,
                     logprobs: dict | None = None, extra: dict | None = None, fingerprint: str | None = None) -> dict:
    """`extra`: what else the choice carries (vLLM's prompt_token_ids, token_ids, prompt_logprobs)."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": finish_reason, **(extra or {})}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None, index: int = 0,
               logprobs: dict | None = None, extra: dict | None = None, top: dict | None = None,
               fingerprint: str | None = None) -> dict:
    """`extra`: what else the choice carries (token_ids); `top`: the chunk (prompt_token_ids)."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason, **(extra or {})}], **(top or {})}


def usage_chunk(rid: str, model: str, created: int, kind: str, use: dict, fingerprint: str | None = None) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": fingerprint,
            "choices": [],
            "usage": use}


# Characters that JSON leaves as they are and that clients splitting an event stream with Python's
# str.splitlines (httpx's iter_lines/aiter_lines, and so SDKs built on them) take for line breaks,
# cutting an event's JSON in two: escaped (\u2028), which every JSON reader reads back the same.
_LINE_BREAKS = "\x85\u2028\u2029"
_ESCAPED_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in _LINE_BREAKS})


def one_line(json_text: str) -> str:
    """JSON text (ensure_ascii=False) with the line breaks str.splitlines knows beyond JSON's own
    escaped: safe for a `data:` line whatever splits it."""
    if "\x85" in json_text or "\u2028" in json_text or "\u2029" in json_text:
        return json_text.translate(_ESCAPED_BREAKS)
    return json_text


def sse_json(data) -> str:
    """`data` as the JSON of one `data:` line (compact, UTF-8 kept, one_line)."""
    return one_line(json.dumps(data, separators=(",", ":"), ensure_ascii=False))


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else sse_json(data)
    return f"data: {payload}\n\n".encode()
