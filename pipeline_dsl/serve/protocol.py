"""The OpenAI wire format: request validation and response bodies.

`parse_completion` and `parse_chat` turn a decoded JSON body into a `GenerationRequest`
(prompt or messages plus the sampling fields it sets, which override the defaults of the
generate stage it reaches) or raise `APIError`, whose `body()` is the
OpenAI-style error object (`{"error": {"message", "type", "param", "code"}}`). Nothing
that fails here reaches the engine. The `*_response` and `*_chunk` functions build the
bodies of non-streaming answers and of server-sent-event chunks.
"""
from __future__ import annotations

import difflib
import json
import math
import time
from dataclasses import dataclass, replace
from typing import Any

from pipeline_dsl.requests_io import RequestError, load_json, parse_messages
from stages.fields import REQUEST_FIELDS, ParamError, check_value, param_of

class APIError(Exception):
    """An error answered to the client as an OpenAI-style JSON body."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    kind: str                                  # "completion" | "chat"
    model: str                                 # the id the client asked for (answers carry it)
    fields: dict                               # sampling overrides and n, validated
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None
    stream: bool = False
    include_usage: bool = False                # stream_options.include_usage
    pin: str | None = None                     # the generate stage `model` names, if it names one
    metadata: dict | None = None

    def item(self, request_id: str) -> dict[str, Any]:
        """The request as the pipeline's items carry it (what a python stage sees)."""
        out: dict[str, Any] = {"id": request_id}
        if self.messages is not None:
            out["messages"] = [dict(m) for m in self.messages]
        elif self.prompt_token_ids is not None:
            out["prompt_token_ids"] = list(self.prompt_token_ids)
        else:
            out["prompt"] = self.prompt
        out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in self.fields.items()})
        out["model"] = self.model
        out["metadata"] = dict(self.metadata or {})
        return out


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying why not (requests_io.load_json: not
    UTF-8, not JSON, too deep, unreadable numbers, lone surrogates)."""
    try:
        obj = load_json(raw, "the request body")
    except RequestError as e:
        raise APIError(str(e), param=e.param) from None
    if not isinstance(obj, dict):
        raise APIError(f"the request body must be a JSON object, not {_json_type(obj)}")
    return obj


# ---------------------------------------------------------------- field checks

def _json_type(v) -> str:
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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(param: str, expected: str, value) -> APIError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return APIError(f"'{param}' must be {expected}, not {_json_type(value)} ({shown})", param=param)


def _field(obj: dict, name: str, ok, expected: str):
    value = obj.get(name)
    if value is not None and not ok(value):
        raise _bad(name, expected, value)
    return value


COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "stream_options", "n", "presence_penalty", "frequency_penalty", "logit_bias",
          "user", "ignore_eos", "stop_token_ids", "logprobs", "min_tokens", "repetition_penalty"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                        "tools", "tool_choice", "parallel_tool_calls", "metadata", "store",
                        "service_tier"}


def _check_unknown(obj: dict, known: set[str]) -> None:
    for key in obj:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise APIError(f"unrecognized request argument '{key}'{hint}", param=key)


def _check_unsupported(obj: dict) -> None:
    """Fields agp knows but only serves at their neutral value."""
    neutral = {"best_of": (1,), "echo": (False,), "presence_penalty": (0,),
               "frequency_penalty": (0,), "repetition_penalty": (1,), "logprobs": (False, 0),
               "top_logprobs": (0,), "suffix": ("",), "logit_bias": ({},), "min_tokens": (0,),
               "tools": ([],)}
    for name, allowed in neutral.items():
        value = obj.get(name)
        if value is not None and not any(value == a and type(value) is type(a)
                                         or (_is_num(value) and _is_num(a) and value == a)
                                         for a in allowed):
            raise APIError(f"'{name}' = {json.dumps(value)[:40]} is not supported by agp "
                           f"(leave it out or use {json.dumps(allowed[0])})", param=name)
    tool_choice = obj.get("tool_choice")
    if tool_choice not in (None, "none", "auto"):
        raise APIError("'tool_choice' is not supported by agp (tools are not served)",
                       param="tool_choice")
    fmt = obj.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError("'response_format' other than {\"type\": \"text\"} is not supported by agp",
                       param="response_format")


def _sampling(obj: dict, max_model_len: int, max_tokens_field: str = "max_tokens") -> dict:
    """The request's sampling fields, each checked against the generate parameter it sets (one
    schema: stages/fields.py); what it leaves out, its generate stage decides."""
    values: dict[str, Any] = {}
    if max_tokens_field != "max_tokens" and obj.get(max_tokens_field) is None:
        max_tokens_field = "max_tokens"
    for name in REQUEST_FIELDS:
        key = max_tokens_field if name == "max_tokens" else name
        if obj.get(key) is None:
            continue
        try:
            values[name] = check_value(param_of(*REQUEST_FIELDS[name]), obj[key], key)
        except ParamError as e:
            raise APIError(str(e), param=e.field) from None
    if values.get("max_tokens", 0) > max_model_len:
        raise APIError(f"'{max_tokens_field}' = {values['max_tokens']} is beyond the model's context of "
                       f"{max_model_len} tokens; ask for at most {max_model_len}",
                       param=max_tokens_field, code="context_length_exceeded")
    stop_ids = obj.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_int(t) and t >= 0 for t in stop_ids):
            raise _bad("stop_token_ids", "an array of token ids", stop_ids)
        values["stop_token_ids"] = list(stop_ids)
    return values


def _stream_flags(obj: dict) -> tuple[bool, bool]:
    stream = _field(obj, "stream", lambda v: isinstance(v, bool), "true or false") or False
    options = _field(obj, "stream_options", lambda v: isinstance(v, dict), "an object")
    include_usage = False
    if options:
        if not stream:
            raise APIError("'stream_options' is only allowed with \"stream\": true",
                           param="stream_options")
        include_usage = _field(options, "include_usage", lambda v: isinstance(v, bool),
                               "true or false") or False
    return stream, include_usage


def _model(obj: dict, served: tuple[str, ...], stages: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """(the model id of the answer, the generate stage it pins or None)."""
    model = obj.get("model")
    if model is None:
        return served[0], None
    if isinstance(model, str) and model in stages:
        return model, model
    if not isinstance(model, str):
        raise _bad("model", "a string", model)
    if model not in served:
        known = tuple(served) + tuple(stages)
        close = difflib.get_close_matches(model, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; this server has {', '.join(known)}"
        raise APIError(f"the model '{model}' does not exist{hint}", status=404, param="model",
                       code="model_not_found")
    return model, None


# ---------------------------------------------------------------- requests

def parse_completion(obj: dict, *, max_model_len: int, served: tuple[str, ...],
                     stages: tuple[str, ...] = ()) -> GenerationRequest:
    """POST /v1/completions: `prompt` is a string, one-string array or an array of token ids."""
    _check_unknown(obj, COMPLETION_FIELDS)
    model, pin = _model(obj, served, stages)
    _check_unsupported(obj)
    if "prompt" not in obj or obj["prompt"] is None:
        raise APIError("'prompt' is required", param="prompt")
    prompt = obj["prompt"]
    text, token_ids = None, None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                     # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise APIError("'prompt' is empty", param="prompt")
        text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        if len(prompt) > max_model_len:
            raise APIError(f"'prompt' holds {len(prompt)} tokens, beyond the model's context of "
                           f"{max_model_len}", param="prompt", code="context_length_exceeded")
        token_ids = tuple(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise APIError(f"'prompt' holds {len(prompt)} prompts; agp serves one prompt per request",
                       param="prompt")
    elif isinstance(prompt, list) and not prompt:
        raise APIError("'prompt' is empty", param="prompt")
    else:
        raise _bad("prompt", "a string or an array of token ids", prompt)
    stream, include_usage = _stream_flags(obj)
    fields = _sampling(obj, max_model_len)
    return GenerationRequest("completion", model, fields, prompt=text, prompt_token_ids=token_ids,
                             stream=stream, include_usage=include_usage, pin=pin)


def _messages(value) -> tuple[dict, ...]:
    if value is None:
        raise APIError("'messages' is required", param="messages")
    try:
        return tuple(parse_messages(value))   # the one validation of chat messages (agp run's too)
    except RequestError as e:
        raise APIError(str(e), param=e.param) from None


def parse_chat(obj: dict, *, max_model_len: int, served: tuple[str, ...],
               stages: tuple[str, ...] = ()) -> GenerationRequest:
    """POST /v1/chat/completions."""
    _check_unknown(obj, CHAT_FIELDS)
    model, pin = _model(obj, served, stages)
    _check_unsupported(obj)
    messages = _messages(obj.get("messages"))
    stream, include_usage = _stream_flags(obj)
    fields = _sampling(obj, max_model_len, max_tokens_field="max_completion_tokens")
    metadata = _field(obj, "metadata", lambda v: isinstance(v, dict), "an object")
    return GenerationRequest("chat", model, fields, messages=messages, stream=stream,
                             include_usage=include_usage, pin=pin, metadata=metadata)


# ---------------------------------------------------------------- responses

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(rid: str, model: str, choices: list[tuple[int, str, str | None]],
                        use: dict, created: int | None = None) -> dict:
    """choices: (index, text, finish_reason) each."""
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()),
            "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, text, reason in choices],
            "usage": use}


def chat_response(rid: str, model: str, choices: list[tuple[int, str, str | None]],
                  use: dict, created: int | None = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()),
            "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": reason} for i, text, reason in choices],
            "usage": use}


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish_reason: str | None, index: int = 0) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict,
               finish_reason: str | None, index: int = 0) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, kind: str, use: dict) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": use}


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"),
                                                           ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
