"""vLLM's request fields beyond OpenAI's, with the meaning vLLM gives them.

    extras = parse_extras(body, chat=True)     # APIError (400) naming the field
    extras.fields        # skip_special_tokens, spaces_between_special_tokens, include_stop_str_in_output,
                         # cache_salt (prefix-cache blocks shared only among requests of one salt)
    extras.constraint    # structured_outputs / guided_* / response_format as one constraint spec
    extras.format_field  # the field it came in ("guided_json", "structured_outputs.json", ...): an error names it
    extras.template_kwargs, extras.request_id

    with request_errors:                       # a requests_io check's RequestError -> its APIError (400)
        check_min_tokens(values, "max_tokens")

Structured output: `response_format` (OpenAI), `structured_outputs` (vLLM ≥ 0.11: one of `json`,
`regex`, `choice`, `grammar`, `json_object`, `structural_tag`) and the older `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` all become one spec of the constraint compiler
(engine/constrain.py), checked here so a spec it cannot enforce is a 400 naming the field the
client wrote (requests_io.read_constraint, which `agp run`'s lines share; the engine's own 400 about
the spec names that field too). A request gives at most
one of them. A spec not checked before is checked as one of at most MAX_GRAMMAR_CHECKS at once (a
large schema takes seconds): `parsed_off_loop` parses a request on a request thread, where a
check whose turn has not come is not waited for; such a request is parsed again on the grammar
threads (MAX_GRAMMAR_CHECKS of them), in its turn, while every other request is parsed on the
request threads. A spec equal to one being checked waits for that check's result there too (one
check for any number of equal specs). Past GRAMMAR_WAITING requests waiting their turn, one more is a 503 with
Retry-After (code grammar_checks_busy).
"""
from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline_dsl.requests_io import (IGNORED, MAX_GRAMMAR_CHECKS, ChecksBusy, RequestError, cache_salt,
                                      check_tool_parameters, read_constraint)
from pipeline_dsl.requests_io import bad as request_bad

from .api_error import APIError

FLAGS = ("skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output")
# variables the template gets from agp itself: a request may not set them through chat_template_kwargs
TEMPLATE_OWN = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


def refused(e: RequestError) -> APIError:
    """A request's RequestError (requests_io) as the 400 answering it: its message, param and code;
    ChecksBusy (its spec's grammar check would wait behind MAX_GRAMMAR_CHECKS others: parsed_off_loop
    waits its turn, unless GRAMMAR_WAITING others wait) as a 503 with Retry-After, whose value
    the server's retry_after_s sets (Generations.error)."""
    if isinstance(e, ChecksBusy):
        return APIError(str(e), status=503, type="server_error", param=e.param, code=e.code,
                        headers={"Retry-After": "1"})
    return APIError(str(e), param=e.param, code=e.code, quoted=e.quoted)


class _RequestErrorsAnswered:
    """`with request_errors:` turns a RequestError raised inside (a requests_io check) into the
    APIError answering it (refused: its message, param and code); any other exception passes
    unchanged. It keeps no state: one instance serves every request, on any thread."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, e, tb) -> bool:
        if isinstance(e, RequestError):
            raise refused(e) from None
        return False


request_errors = _RequestErrorsAnswered()


def bad(param: str, expected: str, value) -> APIError:
    return refused(request_bad(param, expected, value))


@dataclass
class Extras:
    fields: dict = field(default_factory=dict)
    constraint: dict | None = None
    format_field: str = "response_format"
    template_kwargs: dict | None = None
    request_id: str | None = None


def parse_extras(obj: dict, *, chat: bool) -> Extras:
    out = Extras()
    for name in FLAGS:
        value = obj.get(name)
        if value is not None:
            if not isinstance(value, bool):
                raise bad(name, "true or false", value)
            out.fields[name] = value
    if obj.get("cache_salt") is not None:
        with request_errors:
            out.fields["cache_salt"] = cache_salt(obj["cache_salt"])
    rid = obj.get("request_id")
    if rid is not None:
        ok, expected = IGNORED["request_id"]
        if not ok(rid):
            raise bad("request_id", expected, rid)
        out.request_id = rid
    kwargs = obj.get("chat_template_kwargs") if chat else None
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad("chat_template_kwargs", "an object of template variables", kwargs)
        own = [k for k in kwargs if k in TEMPLATE_OWN]
        if own:
            raise APIError(f"'chat_template_kwargs.{own[0]}' is set by agp itself; send it as its own field",
                           param="chat_template_kwargs")
        out.template_kwargs = dict(kwargs)
    with request_errors:             # a request thread never waits for a check's turn; a grammar thread does
        out.constraint, out.format_field = read_constraint(obj, wait=getattr(_grammar_thread, "waits", False))
    return out


def check_tools(tools, choice) -> None:
    """A forced call's tools' parameters checked (requests_io.check_tool_parameters) as
    parse_extras checks a response_format: on a request thread, a check whose turn has not come is
    ChecksBusy (parsed_off_loop parses the request again on the grammar threads); an APIError (400)
    naming tools[i].function.parameters."""
    with request_errors:
        check_tool_parameters(tools, choice, wait=getattr(_grammar_thread, "waits", False))


GRAMMAR_WAITING = 256                # requests waiting for a grammar check's turn; one more is a 503
_grammar_thread = threading.local()
_grammar_pool: ThreadPoolExecutor | None = None
_waiting = 0
_waiting_lock = threading.Lock()


def _waits() -> None:
    _grammar_thread.waits = True


async def parsed_off_loop(parse):
    """parse() (a request's parsing: a large schema's check takes seconds of CPU) off the event
    loop, on a request thread; if it needed a grammar check while MAX_GRAMMAR_CHECKS others run,
    again on the grammar threads, where it waits for its turn without holding a request thread
    (a plain request is never parsed behind it). Past GRAMMAR_WAITING waiting, its 503."""
    global _grammar_pool, _waiting
    try:
        return await asyncio.to_thread(parse)
    except APIError as err:
        if err.code != ChecksBusy.CODE:
            raise
        busy = err
    with _waiting_lock:
        if _waiting >= GRAMMAR_WAITING:
            raise busy
        _waiting += 1
        if _grammar_pool is None:
            _grammar_pool = ThreadPoolExecutor(MAX_GRAMMAR_CHECKS, thread_name_prefix="agp-grammar",
                                               initializer=_waits)
    try:
        return await asyncio.get_running_loop().run_in_executor(_grammar_pool, contextvars.copy_context().run, parse)
    finally:
        with _waiting_lock:
            _waiting -= 1
