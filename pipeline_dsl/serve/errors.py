"""Error answers: the one table from why the pipeline refused or failed a request to what the
client gets (HTTP status, OpenAI error type and code, Retry-After), and how an error is
logged and sent.

    err = api_error(pipeline_error, "chat", retry_after_s=1)   # -> protocol.APIError
    return error_response(err)                                  # JSONResponse, logged
"""
from __future__ import annotations

import contextvars
import json
import logging
import math
import re
from typing import TYPE_CHECKING

from pipeline_dsl.flow import ANSWER_FAILED_CODE, PipelineError, unbuilt_error

from .api_error import APIError
from .config import RETRY_AFTER_S

if TYPE_CHECKING:
    from fastapi.responses import JSONResponse

log = logging.getLogger("agp.serve")
# "METHOD /path" of the request being served, for the log line of an error answer
current_request = contextvars.ContextVar("agp_request", default="")
# the request being served (serve/access.py's RequestInfo): its `.id` ends the line of an error
# answer, as it ends the access line, read when the line is written (a body's request_id may
# have become the id by then)
current_info = contextvars.ContextVar("agp_request_info", default=None)

# the Responses API's names of the chat request's fields a Responses request runs as
RESPONSES_NAMES = {"max_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input",
                   "logprobs": "include"}


def responses_name(param: str | None) -> str | None:
    """The field a Responses request wrote for the chat field `param` (tools[1].function.parameters:
    tools[1].parameters, its function's keys being the tool's own there), or None when it is the same."""
    if param in RESPONSES_NAMES:
        return RESPONSES_NAMES[param]
    return param.replace(".function.", ".", 1) if (param or "").startswith("tools[") else None


def as_responses_wrote(message: str, param: str | None) -> tuple[str, str | None]:
    """(message, param) of an error about the chat field `param`, naming instead the field a
    Responses request wrote for it (responses_name), where the two differ."""
    named = responses_name(param)
    return (message.replace(f"'{param}'", f"'{named}'"), named) if named else (message, param)


# PipelineError.kind -> (HTTP status, OpenAI error type, code, Retry-After sent)
FAILURES: dict[str, tuple[int, str, str | None, bool]] = {
    "invalid": (400, "invalid_request_error", None, False),           # its input (param: the prompt)
    "rejected": (400, "invalid_request_error", "rejected", False),    # a python stage's Reject
    "queue_full": (429, "rate_limit_error", "queue_full", True),
    # draining, the engine failed, or a stage's call failed for a transient reason (its code: stage_unavailable)
    "unavailable": (503, "server_error", "unavailable", True),
    "aborted": (499, "invalid_request_error", "aborted", False),      # the client went away
    "timeout": (504, "server_error", "stage_timeout", False),         # a stage's own timeout passed
    "failed": (500, "server_error", "stage_failed", False),           # a user function or the engine
}
# the OpenAI error type of a Reject's own 4xx status (other 4xx: invalid_request_error; 5xx: server_error)
REJECT_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}


def api_error(e: PipelineError, kind: str, retry_after_s: int = RETRY_AFTER_S, max_tokens_field: str = "max_tokens",
              format_field: str = "response_format") -> APIError:
    """The HTTP answer to a request the pipeline refused or failed; `kind` is the request's
    ("chat": its input is `messages`, "detokenize": `tokens`, else `prompt`). An error that carries a code of its own
    (context_length_exceeded) keeps it. The engine says max_tokens; the answer names the field the
    client sent (`max_tokens_field`: max_completion_tokens, max_output_tokens). The engine names
    the request's constraint response_format; the answer names the field the client wrote it in
    (`format_field`: guided_json, structured_outputs.json, ..., as the request's own check names it)."""
    status, type_, code, retry = FAILURES.get(e.kind, FAILURES["failed"])
    message = e.message
    if e.kind == "invalid" and max_tokens_field != "max_tokens":
        message = re.sub(r"\bmax_tokens\b", max_tokens_field, message)
    if e.kind == "invalid":             # the field at fault, else the prompt
        param = getattr(e, "param", None) or (
            "messages" if kind == "chat" else "input" if kind in ("responses", "embeddings")
            else "tokens" if kind == "detokenize" else "prompt")
        if param == "response_format" and format_field != param:
            message, param = message.replace(f"'{param}'", f"'{format_field}'"), format_field
        if kind == "responses":         # the engine names the chat field it runs as: the client's own
            message, param = as_responses_wrote(message, param)
    elif e.kind == "rejected":          # the field the Reject names (null when none): as the client wrote it
        param = getattr(e, "param", None)
        if param == "max_tokens" and max_tokens_field != "max_tokens":
            param = max_tokens_field
        elif kind == "responses":
            param = responses_name(param) or param
    else:                               # a failure or a stage's timeout is no field's fault: its stage says where
        param = None
    headers = {"Retry-After": str(retry_after_s)} if retry else None
    stage = e.stage if e.kind in ("failed", "timeout", "unavailable") else None
    if e.kind == "rejected":            # a Reject may name its status and a Retry-After of its own
        status = getattr(e, "status", None) or status
        type_ = "server_error" if status >= 500 else REJECT_TYPES.get(status, type_)
        wait = getattr(e, "retry_after", None)
        if wait is not None:
            headers = {"Retry-After": str(math.ceil(wait))}
        if status == 401:               # HTTP's 401 names its scheme, as the --api-key guard's does
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        stage = e.stage                 # the stage that refused it: the body's `stage`
    err = APIError(message, status=status, type=type_, code=getattr(e, "code", None) or code, param=param,
                   headers=headers, stage=stage)
    err.__cause__ = e.__cause__         # a stage's own exception: its traceback is logged with the answer
    return err


def as_pipeline_error(err: APIError) -> PipelineError:
    """The PipelineError that api_error answers as `err`, a 400 of the request's own (found as its
    answer was made: a `dimensions` the model cannot give), for a front end that answers from a
    request's result (agp run's output lines, its summary's errors); anything else is a failure."""
    return PipelineError(err.message, "invalid" if err.status == 400 else "failed", code=err.code, param=err.param)


QUOTED = "<value>"       # what the log writes for the request's own content an error message quotes


def logged_message(err: APIError) -> str:
    """The error's message as the INFO log writes it: each part that quotes the request's own
    content (APIError.quoted: the start of a malformed value, say) written QUOTED, as the
    operator did not ask to see what clients send (--log-level debug shows it)."""
    message = err.message
    for part in err.quoted:
        message = message.replace(part, QUOTED)
    return message


def answer_failed(e: Exception) -> APIError:
    """The 500 of a request whose answer (or the stream's chunk) could not be built of its result
    (`e`: a bug, or a value no stage checked): as the runtime answers a result its listener could
    not take (flow's unbuilt), logged at ERROR with `e`'s traceback (log_error)."""
    err = APIError(unbuilt_error(e).message, status=500, type="server_error", code=ANSWER_FAILED_CODE)
    err.__cause__ = e
    return err


def log_error(err: APIError) -> None:
    """An error answer, with its reason: 4xx at INFO (the client's doing), 5xx at WARNING (an
    answer that could not be built, answer_failed, at ERROR), with the traceback of the exception
    that failed it (a python stage's, agp's own) when there is one.
    The record carries the field at fault and the error's code (`param`, `code`); what the message
    quotes of the request's content is left out (logged_message), and written at DEBUG on a line
    of its own."""
    info = current_info.get()
    rid = info.id if info is not None else "-"
    cause = err.__cause__ if err.status >= 500 else None
    # an answer agp could not build is its own failure (answer_failed): ERROR, with its traceback
    level = (logging.INFO if err.status < 500 else
             logging.ERROR if err.code == ANSWER_FAILED_CODE and cause is not None else logging.WARNING)
    request, message = current_request.get() or "-", logged_message(err)
    extra = {"status": err.status, "reason": message, "request_id": rid, "param": err.param, "code": err.code}
    log.log(level, "%s -> %d %s id=%s", request, err.status, message, rid,
            exc_info=(type(cause), cause, cause.__traceback__) if cause is not None else None, extra=extra)
    if message != err.message and log.isEnabledFor(logging.DEBUG):
        log.debug("%s -> %d %s id=%s", request, err.status, err.message, rid,
                  extra={**extra, "reason": err.message})


def error_response(err: APIError) -> JSONResponse:
    from fastapi.responses import JSONResponse      # here: `agp run` reads this module's table without fastapi

    log_error(err)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def send_error(send, err: APIError, log_it: bool = True) -> None:
    """An error answer sent straight on an ASGI connection (from a middleware)."""
    if log_it:
        log_error(err)
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
