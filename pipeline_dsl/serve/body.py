"""Reading a request body: bounded in size and time, JSON only.

    raw = await read_body(request, config)     # APIError 413 / 408 / 415 (499: the client went away)
    body = await read_json(request, config)    # and 400 for JSON that is not an object
"""
from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.requests import ClientDisconnect

from . import protocol as P
from .config import ServeConfig

JSON_TYPES = ("application/json",)
BODY_POLL_S = 0.25       # how often a body still arriving looks whether the server is shutting down


async def read_body(request: Request, config: ServeConfig) -> bytes:
    """The request body, at most max_body_bytes (413), received within body_timeout_s (408), of
    type application/json (415: browsers send cross-site "simple" POSTs as text/plain)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise P.APIError(f"the request body must be application/json, not {ctype or 'unspecified'}",
                         status=415, code="unsupported_media_type")
    limit, why = config.max_body_bytes, "(--max-body-bytes)"
    if config.max_prompt_chars is not None:     # a body this large holds a prompt no engine can take
        need = 8 * config.max_prompt_chars + (256 << 10)
        if need < limit:
            limit, why = need, "(more than the longest prompt this pipeline takes can need)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise P.APIError(f"the request body has {int(declared)} bytes; at most {limit} are accepted {why}",
                         status=413, code="body_too_large")

    async def collect() -> bytes:
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise P.APIError(f"the request body has more than {limit} bytes {why}", status=413,
                                     code="body_too_large")
                chunks.append(chunk)
        except ClientDisconnect:          # the client's doing: a 499 as any client gone, not a 500
            raise P.APIError("the client went away before the request's body had arrived", status=499,
                             code="aborted") from None
        return b"".join(chunks)

    # the body in time; a server that begins to shut down meanwhile refuses it at once (it would
    # refuse the request once read; waiting on the body instead held the connection until uvicorn
    # cancelled the handler, 5 s into the shutdown, with a text/plain 500 and a traceback)
    apipe = getattr(request.app.state, "apipe", None)
    task = asyncio.ensure_future(collect())
    deadline = asyncio.get_running_loop().time() + config.body_timeout_s
    try:
        while True:
            left = deadline - asyncio.get_running_loop().time()
            done, _ = await asyncio.wait({task}, timeout=max(0.0, min(BODY_POLL_S, left)))
            if done:
                return task.result()
            if apipe is not None and not apipe.accepting:
                raise P.APIError("the server is shutting down; this request's body was still arriving",
                                 status=503, type="server_error", code="unavailable", headers={"Retry-After": "1"})
            if left <= 0:
                raise P.APIError(f"the request body did not arrive within {config.body_timeout_s:g} s", status=408,
                                 code="body_timeout")
    finally:
        task.cancel()


async def read_json(request: Request, config: ServeConfig) -> dict:
    """The body as a JSON object (large bodies decoded off the event loop)."""
    raw = await read_body(request, config)
    return P.parse_json(raw) if len(raw) < (64 << 10) else await asyncio.to_thread(P.parse_json, raw)
