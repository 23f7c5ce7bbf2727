"""Reading a request body: bounded in size and time, JSON only.

    raw = await read_body(request, config)     # APIError 413 / 408 / 415
    body = await read_json(request, config)    # and 400 for JSON that is not an object
"""
from __future__ import annotations

import asyncio

from fastapi import Request

from . import protocol as P
from .config import ServeConfig

JSON_TYPES = ("application/json",)


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
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise P.APIError(f"the request body has more than {limit} bytes {why}", status=413,
                                 code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), config.body_timeout_s)
    except asyncio.TimeoutError:
        raise P.APIError(f"the request body did not arrive within {config.body_timeout_s:g} s", status=408,
                         code="body_timeout") from None


async def read_json(request: Request, config: ServeConfig) -> dict:
    """The body as a JSON object (large bodies decoded off the event loop)."""
    raw = await read_body(request, config)
    return P.parse_json(raw) if len(raw) < (64 << 10) else await asyncio.to_thread(P.parse_json, raw)
