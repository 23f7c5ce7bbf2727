"""POST /v1/responses: OpenAI's Responses API (as vLLM serves it), over the chat path.

A Responses request becomes a chat request: `instructions` a system message, `input` (a string,
or message / function_call / function_call_output items, and item_references to the output items
of stored responses) the conversation, `previous_response_id` the stored conversation before it,
function `tools` and `tool_choice` the chat's, `text.format` the response_format,
`max_output_tokens` max_tokens. The answer is a `response` object whose
`output` holds a message item (`output_text`, with logprobs when `include` asks for
"message.output_text.logprobs") and a `function_call` item per tool call, after a `reasoning` item
of the model's thinking where agp serve --reasoning-parser splits it out; `status` is
"incomplete" when the token budget cut it (`incomplete_details.reason: max_output_tokens`) or a guard
stopped it (its finish_reason `content_filter`: `reason: content_filter`).
Streamed, it is the Responses events (serve/responses_events.py). Answers are kept in memory
(the latest STORED, unless `"store": false`) for `previous_response_id`, GET and DELETE
/v1/responses/{id}. Only function tools exist here; a reasoning item in the input reaches the
assistant turn after it as its `reasoning_content` (where a chat template such as Qwen3's reads it).
"""
from __future__ import annotations

import functools
import json
import logging
import secrets
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import Response

from pipeline_dsl.constraints import json_copy
from pipeline_dsl.diagnostics import closest
from pipeline_dsl.flow import PipelineError
from pipeline_dsl.requests_io import check_identifiers, shown

from . import protocol as P
from .access import request_info
from .answers import Vocabularies, answer_thinks, call_parser, check_reasoning, reasoning_tokens
from .body import read_json
from .errors import api_error, as_responses_wrote
from .extras import bad, parsed_off_loop, request_errors
from .generation import Generations, warned
from .responses_events import ResponseEvents
from .responses_output import (call_item, ending, message_item, output_messages, reasoning_item, response_object,
                               usage)
from .sse import EventStream
from .token_fields import MAX_LOGPROBS

log = logging.getLogger("agp.serve")

STORED = 1024              # responses kept for previous_response_id / GET (the oldest go first)
STORED_BYTES = 64 << 20    # and their JSON (response and conversation) at most, all told
FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
          "parallel_tool_calls", "text", "stream", "store", "metadata", "previous_response_id", "user",
          "truncation", "reasoning", "include", "top_logprobs", "service_tier", "background", "stream_options",
          "prompt_cache_key", "safety_identifier", "max_tool_calls", "image", *P.CACHE_SETTINGS, *P.RESPONSES_LACKING,
          # vLLM's extras on this route
          "request_id", "top_k", "min_p", "repetition_penalty", "seed", "stop", "ignore_eos", "structured_outputs",
          "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_whitespace_pattern", "priority",
          "cache_salt", "chat_template_kwargs"}
PASSED = ("model", "temperature", "top_p", "parallel_tool_calls", "stream", "request_id", "top_k", "min_p",
          "repetition_penalty", "seed", "stop", "ignore_eos", "user", "safety_identifier", "structured_outputs",
          "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_whitespace_pattern", "priority",
          "cache_salt", "chat_template_kwargs")
# POST /v1/responses/input_tokens (OpenAI's input-token count: its SDKs' responses.input_tokens.count,
# which pydantic-ai calls for UsageLimits(count_tokens_before_request=True)): what shapes the prompt
COUNT_FIELDS = {"model", "input", "instructions", "tools", "tool_choice", "previous_response_id", "conversation",
                "reasoning", "text", "truncation", "parallel_tool_calls", "chat_template_kwargs"}
LOGPROBS = "message.output_text.logprobs"
# OpenAI's `include` values (its SDKs' ResponseIncludable): the logprobs are served; the others ask for
# what tools, images and reasoning agp has none of would add (nothing to include). Another value is a
# 400, as OpenAI's and vLLM's: a misspelt LOGPROBS would otherwise answer without them, saying nothing
INCLUDABLE = (LOGPROBS, "reasoning.encrypted_content", "file_search_call.results", "web_search_call.results",
              "web_search_call.action.sources", "message.input_image.image_url",
              "computer_call_output.output.image_url", "code_interpreter_call.outputs")
IMAGE_COMPRESSION = ("auto", "enabled", "disabled")      # image.context_compression: taken and ignored
SUMMARIES = ("auto", "concise", "detailed")
# OpenAI's `reasoning` object, one schema per key: taken, checked and ignored (agp's models do not
# reason); `effort` is chat's reasoning_effort, `generate_summary` the deprecated name of `summary`
REASONING = {"effort": P.IGNORED["reasoning_effort"],
             "summary": (lambda v: v in SUMMARIES, '"auto", "concise" or "detailed"'),
             "generate_summary": (lambda v: v in SUMMARIES, '"auto", "concise" or "detailed"'),
             "context": (lambda v: v in ("auto", "current_turn", "all_turns"), '"auto", "current_turn" or "all_turns"'),
             "mode": (lambda v: isinstance(v, str), "a string")}
APIError = P.APIError


@dataclass
class ResponsesCall:
    req: P.GenerationRequest              # the chat request it runs as (kind "responses")
    settings: dict                        # what the response object repeats of the request
    conversation: list                    # the chat messages before the answer (stored with it)
    store: bool


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n and n % (1 << 20) == 0 else f"{n} bytes"


def kept(size: int, max_bytes: int) -> str:
    """What the store keeps, for the 404s of what it does not hold."""
    return f"responses are kept in memory, the latest {size} within {_size(max_bytes)}, unless sent with \"store\": false"


class ResponseStore:
    """The latest responses: their object and their conversation, for previous_response_id. At
    most `size` of them, and at most `max_bytes` of their JSON all told (the oldest go first; one
    larger than that alone is not kept): a response with top_logprobs holds hundreds of bytes a
    token, and a count alone would let a long-running server keep gigabytes. Each is kept as its
    JSON text, several times smaller than its Python objects, and read back as a fresh copy.
    The conversations previous_response_id continues are kept parsed too, once read (a long one
    was parsed again on every request continuing it): those of kept responses only, at most
    `max_bytes` of Python objects all told, the least recently read going first."""

    def __init__(self, size: int = STORED, max_bytes: int = STORED_BYTES):
        self.size, self.max_bytes, self.items = size, max_bytes, OrderedDict()
        self.bytes = 0                                  # the JSON of the responses kept
        self.starts: dict[str, int] = {}                # a kept response's id -> where its conversation's JSON starts
        self.parsed: OrderedDict[str, tuple[list, int]] = OrderedDict()   # id -> (its conversation, its bytes)
        self.parsed_bytes = 0                           # the Python objects of the conversations in `parsed`
        self.too_large: OrderedDict[str, int] = OrderedDict()   # the latest ids not kept: their bytes
        self.owner: dict[str, str] = {}                 # an output item's id -> the kept response holding it
        self.owned: dict[str, list[str]] = {}           # a kept response's id -> its output items' ids
        self.issued: OrderedDict[str, None] = OrderedDict()   # the latest ids given to responses (`unique`)
        self.lock = threading.Lock()

    def unique(self, rid: str) -> str:
        """`rid` (resp_ and the request's id: its X-Request-Id or body request_id, as vLLM names a
        response), or, where a response this server gave lately has it, or one it keeps, `rid` with
        a suffix of its own: two requests sent with one X-Request-Id are two responses, and neither
        replaces the other's stored conversation under a previous_response_id that means the first."""
        with self.lock:
            if rid in self.issued or rid in self.items or rid in self.too_large:
                given, rid = rid, f"{rid}-{secrets.token_hex(6)}"
                log.info("response id %s: %s was given to another response; its request id repeats one", rid, given)
            self.issued[rid] = None
            while len(self.issued) > 4 * self.size:
                self.issued.popitem(last=False)
        return rid

    def put(self, rid: str, response: dict, conversation: list) -> bool:
        """Keep this response; False when it alone is over `max_bytes` (it is not kept)."""
        head = json.dumps(response, ensure_ascii=False, separators=(",", ":")).encode()
        text = b"[" + head + b"," + json.dumps(conversation, ensure_ascii=False, separators=(",", ":")).encode() + b"]"
        with self.lock:
            self._forget(rid)
            self.too_large.pop(rid, None)
            if len(text) > self.max_bytes:
                self.too_large[rid] = len(text)
                while len(self.too_large) > self.size:
                    self.too_large.popitem(last=False)
                return False
            self.items[rid] = text
            self.starts[rid] = len(head) + 2
            self.bytes += len(text)
            self.owned[rid] = [item["id"] for item in response.get("output") or ()
                               if isinstance(item, dict) and isinstance(item.get("id"), str)]
            self.owner.update(dict.fromkeys(self.owned[rid], rid))
            while len(self.items) > self.size or self.bytes > self.max_bytes:
                self._forget(next(iter(self.items)))
        return True

    def get(self, rid: str):
        with self.lock:
            text = self.items.get(rid)
        return None if text is None else tuple(json.loads(text))

    def conversation(self, rid: str) -> list | None:
        """The conversation kept with response `rid` (what a previous_response_id continues: the
        messages before its answer, and the answer's), a fresh copy; None where none is kept."""
        with self.lock:
            found = self.parsed.get(rid)
            if found is not None:
                self.parsed.move_to_end(rid)
            else:
                text, start = self.items.get(rid), self.starts.get(rid)
        if found is None:
            if text is None:
                return None
            messages = json.loads(text[start:-1])
            found = (messages, _python_bytes(messages))
            with self.lock:
                if self.items.get(rid) is text and rid not in self.parsed and found[1] <= self.max_bytes:
                    self.parsed[rid] = found
                    self.parsed_bytes += found[1]
                    while self.parsed_bytes > self.max_bytes:
                        self.parsed_bytes -= self.parsed.popitem(last=False)[1][1]
        return json_copy(found[0])      # its own objects and arrays: what a reader changes, the store keeps

    def item(self, item_id: str, read: dict | None = None) -> dict | None:
        """The output item of a kept response with this id (what an `item_reference` names).
        `read` keeps the output of each response read for it (by the response's id), so a request
        naming many items of one response reads its JSON once, not once an item."""
        read = {} if read is None else read
        with self.lock:
            rid = self.owner.get(item_id)
            text = None if rid in read else self.items.get(rid)
        if rid not in read:
            if text is None:
                return None
            read[rid] = json.loads(text)[0].get("output") or ()
        return next((i for i in read[rid] if i.get("id") == item_id), None)

    def delete(self, rid: str) -> bool:
        with self.lock:
            return self._forget(rid)

    def missing(self, rid: str) -> str:
        """Why `rid` has no stored response, for its 404."""
        with self.lock:
            size = self.too_large.get(rid)
        if size is not None:
            return (f"the response '{rid}' was not stored: its {size} bytes are over the store's "
                    f"{_size(self.max_bytes)} (it was answered with \"store\": false)")
        return f"no stored response has the id {shown(rid)} ({kept(self.size, self.max_bytes)})"

    def _forget(self, rid: str) -> bool:
        text = self.items.pop(rid, None)
        self.starts.pop(rid, None)
        parsed = self.parsed.pop(rid, None)
        if parsed is not None:
            self.parsed_bytes -= parsed[1]
        if text is not None:
            self.bytes -= len(text)
            for item_id in self.owned.pop(rid, ()):
                if self.owner.get(item_id) == rid:
                    del self.owner[item_id]
        return text is not None


def _python_bytes(value) -> int:
    """The memory a parsed JSON value holds (sys.getsizeof of it and of all it holds)."""
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        return size + sum(sys.getsizeof(k) + _python_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return size + sum(_python_bytes(v) for v in value)
    return size


# ---------------------------------------------------------------- the request

def _text(content, where: str, kinds=("input_text", "output_text", "text"), role: str | None = None) -> str:
    """A message's content: a string, or text parts joined (an assistant's refusal parts too)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{where}.content", "a string or an array of input_text parts", content)
    texts = []
    for j, part in enumerate(content):
        if role == "assistant" and isinstance(part, dict) and part.get("type") == "refusal" \
                and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
            continue
        if not (isinstance(part, dict) and part.get("type") in kinds and isinstance(part.get("text"), str)):
            raise APIError(f"'{where}.content[{j}]' must be a text part ({{\"type\": \"input_text\", \"text\": "
                           "...}); agp serves text only", param=f"{where}.content")
        texts.append(part["text"])
    return "".join(texts)


def _referenced(item: dict, where: str, store: ResponseStore | None, read: dict) -> dict:
    """The kept output item an `item_reference` names (a message or a function_call of an earlier
    response), as the client would have sent it; a 404 naming its id when none is kept. `read`:
    the outputs of the responses this request has read already."""
    item_id = item.get("id")
    if not isinstance(item_id, str):
        raise bad(f"{where}.id", "the id of an output item of a stored response", item_id)
    found = store.item(item_id, read) if store is not None else None
    if found is None:
        sizes = (store.size, store.max_bytes) if store is not None else (STORED, STORED_BYTES)
        raise APIError(f"'{where}' is an item_reference to {shown(item_id)}, which is no output item of a stored "
                       f"response ({kept(*sizes)}): send the item itself", status=404, type="not_found_error",
                       param=f"{where}.id", code="item_not_found", quoted=(shown(item_id),))
    return found


def _reasoning_text(item: dict, where: str) -> str:
    """The text of a reasoning input item: its `reasoning_text` parts (an item with only a summary,
    or encrypted content agp cannot read, has none)."""
    content = item.get("content")
    if content is None:
        return ""
    if not isinstance(content, list) or not all(isinstance(p, dict) and p.get("type") == "reasoning_text"
                                                and isinstance(p.get("text"), str) for p in content):
        raise bad(f"{where}.content", 'an array of {"type": "reasoning_text", "text": ...} parts', content)
    return "".join(p["text"] for p in content)


def conversation(value, store: ResponseStore | None = None, max_referenced: int | None = None,
                 before: list[dict] = ()) -> list[dict]:
    """`input` as chat messages; an `item_reference` reads the item it names from `store`. The
    items the references bring hold at most `max_referenced` characters of text all told (the
    server's largest body): a reference is a few bytes, and thousands of them to a long answer
    would otherwise make a prompt of gigabytes from a small body. A function_call_output answers
    a function_call of the input before it or of the conversation it continues (`before`), as
    OpenAI requires ("No tool call found for function call output with call_id …": a 400)."""
    if isinstance(value, str):
        if not value:
            raise APIError("'input' is empty", param="input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("input", "a string or a non-empty array of input items", value)
    out: list[dict] = []
    read: dict = {}                       # the outputs of the kept responses read, by their ids
    referenced = 0                        # the characters the references brought
    thought: list[str] = []               # reasoning items' text, for the assistant turn after them
    called = {c.get("id") for m in before for c in m.get("tool_calls") or () if isinstance(c, dict)}
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(where, "an input item object", item)
        kind = item.get("type")
        if kind is None:       # OpenAI's type is optional on both: a reference is an id alone (an item
            # with other keys beside its id is a message, checked as one: a missing role is named)
            kind = "item_reference" if "id" in item and set(item) <= {"id", "type"} else "message"
        reference = kind == "item_reference"
        if reference:
            item = _referenced(item, where, store, read)
            kind = item["type"]
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad(f"{where}.role", "one of user, system, developer, assistant", role)
            out.append({"role": role, "content": _text(item.get("content"), where, role=role)})
            brought = len(out[-1]["content"])
            if thought and role == "assistant":
                out[-1]["reasoning_content"] = "".join(thought)
            thought = []
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise bad(f"{where}.{key}", "a string", item.get(key))
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)        # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
                if thought:
                    out[-1]["reasoning_content"] = "".join(thought)
            thought = []
            called.add(item["call_id"])
            brought = len(item["call_id"]) + len(item["name"]) + len(item["arguments"])
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad(f"{where}.call_id", "a string", item.get("call_id"))
            if item["call_id"] not in called:
                raise APIError(f"No tool call found for function call output with call_id {shown(item['call_id'])}: "
                               f"'{where}' answers no function_call of the input before it nor of the "
                               "previous_response_id's conversation", param=f"{where}.call_id",
                               quoted=(shown(item["call_id"]),))
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item.get("output"), where)})
            brought = 0
        elif kind == "reasoning":         # an earlier answer's thinking: the assistant turn after it carries it
            thought.append(_reasoning_text(item, where))     # as reasoning_content, as its template reads it
            brought = len(thought[-1])
        else:
            raise APIError(f"'{where}.type' {kind!r} is not supported (message, function_call, "
                           "function_call_output, reasoning, item_reference)", param=f"{where}.type")
        if reference:
            referenced += brought
            if max_referenced is not None and referenced > max_referenced:
                raise APIError(f"'{where}' brings the text of the input's item_references past {max_referenced} "
                               "characters, the most a request body may hold (--max-body-bytes): reference "
                               "fewer items, or send them whole", param=where)
    return out


def _tools(obj: dict) -> tuple[list | None, object]:
    """Responses function tools and tool_choice in the chat shape."""
    tools = obj.get("tools")
    chat_tools = None
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools", "an array of function tools", tools)
        chat_tools = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("name"), str):
                kind = t.get("type") if isinstance(t, dict) else None
                raise APIError(f"'tools[{i}]' must be a function tool ({{\"type\": \"function\", \"name\", "
                               f"\"parameters\"}}); {kind!r} tools are not served here", param=f"tools[{i}]")
            fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
            chat_tools.append({"type": "function", "function": fn})
    choice = obj.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise bad("tool_choice", "none, auto, required or {\"type\": \"function\", \"name\"}", choice)
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if not chat_tools and choice == "auto":
        # the Responses API's own default (OpenAI echoes "auto" on an answer without tools): taken,
        # where chat refuses a tool_choice without tools
        choice = None
    return chat_tools or None, choice


def _format(obj: dict, lenient: bool = False):
    """`text.format` as a response_format (None: free text). `text`'s other keys as the body's own:
    an unknown one refused (or ignored with `lenient`), `verbosity` as chat's (null or "medium")."""
    text = obj.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad("text", "an object {\"format\": ...}", text)
    text = P.check_unknown(text, {"format", "verbosity"}, lenient, where="text.")
    P.check_lacking({"text.verbosity": text.get("verbosity")}, {"text.verbosity": P.CHAT_LACKING["verbosity"]})
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("text.format", "{\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}", fmt)
    if fmt["type"] in ("text", "json_object"):
        return {"type": fmt["type"]}
    return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema", {}),
                                                   "strict": fmt.get("strict")}}


def _checked(obj: dict) -> None:
    for name, ok, expected in (
            ("instructions", lambda v: isinstance(v, str), "a string"),
            ("store", lambda v: isinstance(v, bool), "true or false"),
            ("background", lambda v: v is False, "false (agp answers in the foreground)"),
            ("include", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "an array of strings"),
            ("truncation", lambda v: v in ("disabled", "auto"), "disabled or auto"),
            ("previous_response_id", lambda v: isinstance(v, str), "a string"),
            ("metadata", lambda v: isinstance(v, dict), "an object"),
            ("service_tier", *P.IGNORED["service_tier"]),          # chat's check: a string
            ("top_logprobs", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LOGPROBS,
             f"an integer from 0 to {MAX_LOGPROBS}"),
            ("max_tool_calls", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
             "a positive integer"),
            ("reasoning", lambda v: isinstance(v, dict), 'an object {"effort", "summary"}'),    # keys: _reasoning
            # image options: moot, as an image in the input is a 400 (text only)
            ("image", lambda v: isinstance(v, dict) and set(v) <= {"context_compression"}
             and v.get("context_compression") in (None, *IMAGE_COMPRESSION),
             'an object {"context_compression": "auto", "enabled" or "disabled"}')):
        if obj.get(name) is not None and not ok(obj[name]):
            raise bad(name, expected, obj[name])
    with request_errors:            # stored with the answer: bounded
        check_identifiers(obj)


def _include(obj: dict) -> list[str]:
    """`include`, each value one of OpenAI's (INCLUDABLE); another is a 400 naming its place."""
    include = obj.get("include") or []
    for i, value in enumerate(include):
        if value not in INCLUDABLE:
            close = closest(value, INCLUDABLE, cutoff=0.75)
            hint = f"did you mean {close!r}?" if close else "OpenAI's values are " + ", ".join(INCLUDABLE)
            raise APIError(f"'include[{i}]' = {shown(value)} is not a value 'include' takes; {hint}",
                           param=f"include[{i}]", quoted=(shown(value),))
    return include


def _reasoning(obj: dict, lenient: bool) -> dict | None:
    """`reasoning` with each key checked against its schema (REASONING): an unknown key refused (or
    dropped with `lenient`), as `text`'s are."""
    reasoning = obj.get("reasoning")
    if reasoning is None:
        return None
    reasoning = P.check_unknown(reasoning, set(REASONING), lenient, where="reasoning.")
    with P.request_errors:
        P.check_fields({f"reasoning.{k}": v for k, v in reasoning.items()},
                       {f"reasoning.{k}": rule for k, rule in REASONING.items()})
    return reasoning


def parse_responses(obj: dict, *, max_model_len: int, served: tuple, stages: tuple = (), lenient: bool = False,
                    store: ResponseStore | None = None, max_referenced: int | None = None,
                    counting: bool = False) -> ResponsesCall:
    """POST /v1/responses: the chat request it runs as, and what its answer repeats; the items of
    `input`'s item_references hold at most `max_referenced` characters (conversation()). `counting`
    (POST /v1/responses/input_tokens): `input` may be left out where previous_response_id is given,
    as OpenAI's count takes it (the stored conversation alone is counted)."""
    obj = P.check_unknown(obj, FIELDS, lenient)
    _checked(obj)
    reasoning = _reasoning(obj, lenient)
    P.check_lacking(obj, P.RESPONSES_LACKING)
    P.stream_options(obj, P.RESPONSES_STREAM_OPTIONS, lenient)
    P.check_cache_settings(obj)
    P.priority_field(obj)                      # a null priority too, which the chat request below would not see
    given = obj.get("input") is not None
    if not given and not (counting and obj.get("previous_response_id") is not None):
        raise APIError("'input' is required" + (" (or 'previous_response_id', whose conversation is counted)"
                                                if counting else ""), param="input")
    before: list[dict] = []
    prev = obj.get("previous_response_id")
    if prev is not None:
        found = store.conversation(prev) if store is not None else None
        if found is None:
            raise APIError(store.missing(prev) if store is not None else f"no stored response has the id {shown(prev)}",
                           status=404, type="not_found_error", param="previous_response_id", code="response_not_found",
                           quoted=(shown(prev),))
        before = found
    turn = conversation(obj["input"], store, max_referenced, before) if given else []
    messages = ([{"role": "system", "content": obj["instructions"]}] if obj.get("instructions") else []) \
        + before + turn
    tools, choice = _tools(obj)
    include = _include(obj)
    chat = {k: obj[k] for k in PASSED if obj.get(k) is not None}
    chat.update(messages=messages, tools=tools, tool_choice=choice, response_format=_format(obj, lenient),
                max_tokens=obj.get("max_output_tokens"))
    if obj.get("metadata"):
        chat["metadata"] = obj["metadata"]
    # logprobs when `include` asks for them, `top_logprobs` their alternatives (as OpenAI and vLLM:
    # top_logprobs alone returns none; it is still checked)
    if LOGPROBS in include:
        chat.update(logprobs=True, top_logprobs=obj.get("top_logprobs"))
    try:
        req = P.parse_chat({k: v for k, v in chat.items() if v is not None}, max_model_len=max_model_len,
                           served=served, stages=stages)
    except APIError as e:                       # name the field as the client wrote it
        e.message, e.param = as_responses_wrote(e.message, e.param)
        raise
    settings = {"instructions": obj.get("instructions"), "max_output_tokens": obj.get("max_output_tokens"),
                "temperature": obj.get("temperature"), "top_p": obj.get("top_p"),
                "tools": obj.get("tools") or [], "tool_choice": obj.get("tool_choice") or "auto",
                "parallel_tool_calls": obj.get("parallel_tool_calls", True) is not False,
                "text": obj.get("text") or {"format": {"type": "text"}}, "metadata": obj.get("metadata") or {},
                "previous_response_id": prev, "store": obj.get("store", True) is not False,
                "truncation": obj.get("truncation") or "disabled", "reasoning": reasoning,
                "user": obj.get("user"), "background": False, "top_logprobs": obj.get("top_logprobs"),
                "service_tier": "default", "prompt_cache_key": obj.get("prompt_cache_key"),
                "safety_identifier": obj.get("safety_identifier"), "max_tool_calls": obj.get("max_tool_calls"),
                **{name: obj.get(name) for name in P.CACHE_SETTINGS}}
    return ResponsesCall(replace(req, kind="responses", max_tokens_field="max_output_tokens"), settings,
                         before + turn, settings["store"])


class Responses:
    """The serving object of /v1/responses, on the Generations of the chat path."""

    def __init__(self, generations: Generations, store: ResponseStore | None = None):
        self.g, self.store = generations, store or ResponseStore()

    async def create(self, request: Request) -> Response:
        g = self.g
        try:       # off the event loop, as chat's: checking a large text.format schema takes seconds
            call = await parsed_off_loop(functools.partial(
                parse_responses, await read_json(request, g.config), max_model_len=g.config.max_model_len,
                served=g.config.model_names, stages=g.stage_names, lenient=g.config.lenient, store=self.store,
                max_referenced=g.config.max_body_bytes))
            try:
                check_reasoning(g.apipe.runtime, call.req)
            except APIError as e:               # it names the chat field: the client wrote text.format
                e.message, e.param = as_responses_wrote(e.message, e.param)
                raise
        except APIError as err:
            return g.refused(err)
        call = replace(call, req=g.token_names(call.req, {}))     # the route has no field of its own for it
        # the response repeats the sampling it runs with, as OpenAI's does: what the client left
        # out comes from the generate stage (unknown, null, when several could answer it)
        used = g.apipe.runtime.sampling_defaults(call.req.pin) or {}
        for k, v in used.items():
            if call.settings.get(k) is None:
                call.settings[k] = v
        rid = self.store.unique(f"resp_{request_info(request.scope).adopt(call.req.request_id)}")
        started = await g.start(request, call.req, rid)
        if isinstance(started, Response):
            return started
        stream, first = started
        why = call.req.format_set_aside                 # naming text.format, as the client wrote it
        why = as_responses_wrote(why, "response_format")[0] if why is not None else None
        if call.req.stream:
            events = ResponseEvents(self, call, stream, first, rid, g.ended)
            return warned(EventStream(events.events(), stream, g.gone), why)
        return warned(await g.collect(request, stream, first, call.req, lambda res: self.answer(call, res, rid)), why)

    async def count(self, request: Request, rendered) -> Response | dict:
        """POST /v1/responses/input_tokens: the tokens of the prompt a response to this body would
        have (its instructions, the stored conversation of previous_response_id, its input and its
        tools, rendered as /tokenize renders it with the model of the stage `model` names, else the
        pipeline's, before any stage runs; `rendered(runtime, item)` makes the ids), as OpenAI's
        {"object": "response.input_tokens", "input_tokens": N}. The body takes the fields that shape
        the prompt (COUNT_FIELDS); nothing runs, nothing is stored, and no answer is counted in
        agp_requests_total (it is not a generation request)."""
        g = self.g
        try:
            obj = await read_json(request, g.config)
            if isinstance(obj, dict):
                obj = P.check_unknown(obj, COUNT_FIELDS, g.config.lenient)
            call = await parsed_off_loop(functools.partial(
                parse_responses, obj, max_model_len=g.config.max_model_len, served=g.config.model_names,
                stages=g.stage_names, lenient=g.config.lenient, store=self.store,
                max_referenced=g.config.max_body_bytes, counting=True))
            item = call.req.item("count", exclude_tools_when_none=g.config.exclude_tools_when_tool_choice_none)
            ids = await rendered(g.apipe.runtime, {**item, "pin": call.req.pin})
        except APIError as err:                  # not a generation request: never in agp_requests_total
            return g.error(err)
        except PipelineError as e:
            return g.error(api_error(e, "responses"))
        return {"object": "response.input_tokens", "input_tokens": len(ids)}

    def vocabs(self, call: ResponsesCall) -> Vocabularies:
        """The tokenizers the call's answer is read with (the model's of the generate stage that
        wrote it): its logprobs' tokens, their text or "token_id:N" (--return-tokens-as-token-ids)
        and their bytes."""
        return Vocabularies(self.g.apipe.runtime, call.req.pin, call.req.fields)

    def answer(self, call: ResponsesCall, res, rid: str) -> tuple[dict, dict]:
        """The response object of a finished request (its first choice), and its finish reason."""
        choice = res.choices[0]
        vocabs = self.vocabs(call)
        vocab = vocabs.of(choice.data.get("generated_by"))
        lps = (P.chat_logprobs(choice.data.get("logprobs") or [], vocab.name_of, vocab.bytes_of)["content"]
               if vocabs.want_lp else None)
        parser = call_parser(self.g.apipe.runtime, call.req, choice.data.get("generated_by"))
        message, reason = P.chat_message(choice.text, choice.finish_reason, call.req.tools_active,
                                         call.req.call_limit, parser, choice.tool_read,
                                         answer_thinks(self.g.apipe.runtime, call.req, choice.data.get("generated_by"),
                                                       choice.data.get("request"), choice.data.get("constrained")))
        status, incomplete = ending(choice.finish_reason)
        output = []
        if message.get("reasoning") is not None:        # its thinking, as a reasoning item before the message
            output.append(reasoning_item(message["reasoning"]))
        if message.get("content") or not message.get("tool_calls"):
            output.append(message_item(message.get("content") or "", status, lps))
        output += [call_item(c) for c in message.get("tool_calls") or []]
        use = usage(res.usage, reasoning_tokens(self.g.apipe.runtime, call.req, res.choices))
        body = response_object(rid, call, int(time.time()), status, output, use, incomplete=incomplete)
        self.keep(call, body)
        return body, {0: reason}

    def keep(self, call: ResponsesCall, body: dict) -> None:
        """Store a finished response (`"store": true`); one too large for the store answers with
        `"store": false`, as it was not stored, rather than leave a GET of its id to a bare 404."""
        if call.store and not self.store.put(body["id"], body, call.conversation + output_messages(body["output"])):
            body["store"] = False
            log.info("%s", self.store.missing(body["id"]))
