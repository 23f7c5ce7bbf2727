"""Requests as JSON objects: validation into what the engine takes.

One request is `{"id": …, "prompt": "…"}` or `{"id": …, "messages": [{"role", "content"}…]}`
with optional sampling fields. `parse_request` checks every field's type and range and
raises `RequestError` saying which field is wrong and why; nothing malformed reaches
the engine.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 16              # stop strings a request may give
MAX_STOP_LEN = 256         # characters in one stop string


class RequestError(ValueError):
    """A request that cannot be run; the message says which field (`param`) and why."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class ParsedRequest:
    id: Any
    prompt: str | None = None
    messages: list[dict] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams overrides
    model: str | None = None                                # pins a generate stage / read by conditions
    metadata: dict | None = None                            # free-form; conditions read metadata.KEY
    n: int | None = None                                    # answers wanted (default: the stage's n)

    def item(self) -> dict:
        """The request as the pipeline's items carry it (what a python stage sees)."""
        out: dict[str, Any] = {"id": self.id}
        if self.messages is not None:
            out["messages"] = [dict(m) for m in self.messages]
        else:
            out["prompt"] = self.prompt
        out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in self.sampling.items()})
        for name in ("model", "n"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["metadata"] = dict(self.metadata or {})
        return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(name: str, value, ok: bool, expected: str):
    if not ok:
        raise RequestError(f"field '{name}' must be {expected}, got {json.dumps(value)[:60]}")
    return value


SAMPLING_FIELDS = {
    "max_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= -1, "-1 or 0 (no cut) or a positive integer"),
    "seed": (lambda v: _is_int(v), "an integer"),
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false"),
}
KNOWN = {"id", "prompt", "messages", "stop", "model", "metadata", "n", *SAMPLING_FIELDS}
MAX_N = 64


def parse_messages(value) -> list[dict]:
    """OpenAI chat messages: roles checked, text content parts joined; RequestError names the field."""
    if not isinstance(value, list):
        raise RequestError(f"'messages' must be an array of {{role, content}} objects, not {_shown(value)}",
                           param="messages")
    if not value:
        raise RequestError("'messages' is empty: give at least one message", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"'{where}' must be an object with 'role' and 'content', not {_shown(m)}",
                               param=where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RequestError(f"'{where}.role' must be one of {', '.join(ROLES)}, "
                               f"not {json.dumps(role)[:40]}", param=f"{where}.role")
        if isinstance(content, list):          # content parts: only text is served
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise RequestError(f"'{where}.content[{j}]' must be a text part "
                                       "({\"type\": \"text\", \"text\": ...}); agp serves text only",
                                       param=f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise RequestError(f"'{where}.content' must be a string or an array of text parts, "
                               f"not {_shown(content)}", param=f"{where}.content")
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise RequestError("every message in 'messages' is empty", param="messages")
    return out


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_stop(stop) -> list[str]:
    """`stop`: a string or a list of at most MAX_STOP non-empty strings."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"'stop' must be a string or an array of strings, not {_shown(stop)}", param="stop")
    if any(s == "" for s in stops):
        raise RequestError("'stop' strings must not be empty", param="stop")
    if len(stops) > MAX_STOP:
        raise RequestError(f"'stop' holds {len(stops)} strings; at most {MAX_STOP} are allowed", param="stop")
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_LEN:
        raise RequestError(f"a 'stop' string has {longest} characters; at most {MAX_STOP_LEN} are allowed",
                           param="stop")
    return stops


def parse_request(obj, default_id=None) -> ParsedRequest:
    """Validate one request object (already decoded from JSON)."""
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in KNOWN:
            close = difflib.get_close_matches(key, sorted(KNOWN), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RequestError(f"unknown field '{key}'{hint}")
    req = ParsedRequest(id=obj.get("id", default_id))
    if ("prompt" in obj) == ("messages" in obj):
        raise RequestError("give exactly one of 'prompt' (text) or 'messages' (chat)")
    if "prompt" in obj:
        req.prompt = _check("prompt", obj["prompt"], isinstance(obj["prompt"], str), "a string")
        if not req.prompt:
            raise RequestError("field 'prompt' is empty")
    else:
        req.messages = parse_messages(obj["messages"])
    for name, (ok, expected) in SAMPLING_FIELDS.items():
        if obj.get(name) is not None:
            req.sampling[name] = _check(name, obj[name], ok(obj[name]), expected)
    if req.sampling.get("top_k") == -1:
        req.sampling["top_k"] = 0                  # OpenAI-style "no cut"
    if obj.get("stop") is not None:
        req.sampling["stop"] = parse_stop(obj["stop"])
    if obj.get("model") is not None:
        req.model = _check("model", obj["model"], isinstance(obj["model"], str), "a string")
    if obj.get("metadata") is not None:
        req.metadata = _check("metadata", obj["metadata"], isinstance(obj["metadata"], dict), "an object")
    if obj.get("n") is not None:
        req.n = _check("n", obj["n"], _is_int(obj["n"]) and 1 <= obj["n"] <= MAX_N, f"an integer from 1 to {MAX_N}")
    return req


MAX_DEPTH = 64            # JSON nesting a request may have (messages sit at depth 3)


def load_json(text: str | bytes, what: str = "the request") -> Any:
    """JSON text -> a Python value, or RequestError saying why not: not UTF-8, not JSON, nested
    too deeply, a number too long to convert, a string holding a lone UTF-16 surrogate
    (\\ud800): nothing that would fail later inside the engine gets through."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"{what} is not UTF-8 text (byte {e.start})") from None
    if _too_deep(text):
        raise RequestError(f"{what} is nested more than {MAX_DEPTH} levels deep")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"{what} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise RequestError(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:               # e.g. an integer of more than 4300 digits
        raise RequestError(f"{what} holds a number that cannot be read: {str(e).split(';')[0]}") from None
    bad = _surrogate_path(obj)
    if bad is not None:
        param = bad.strip("'") if bad.startswith("'") else None
        raise RequestError(f"{what} holds a lone UTF-16 surrogate (invalid Unicode) in {bad}", param=param)
    return obj


def _too_deep(text: str) -> bool:
    """A cheap bound before parsing: more than MAX_DEPTH unbalanced brackets in a row."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    depth = 0
    in_string = escaped = False
    for ch in text:                        # only reached for texts with many brackets
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _surrogate_path(obj, path: str = "the body") -> str | None:
    """Where the first string with a lone surrogate sits (a key or a value), or None."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return None                        # the common case: one pass in C
    except UnicodeEncodeError:
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
    """One JSONL line; the id defaults to the line number."""
    return parse_request(load_json(line, "the line"), default_id=lineno)
