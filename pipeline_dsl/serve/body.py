"""Reading a request body: bounded in size and time, JSON only.

    raw = await read_body(request, config)     # APIError 413 / 408 / 415 (499: the client went away)
                                               # (503 from the guard: serve/guard.py)
    body = await read_json(request, config)    # and 400 for JSON that is not an object

A body sent with `Content-Encoding: gzip` or `deflate` is decoded as it arrives, bounded by the
same limit after decoding as before (a small body that inflates past it is a 413, never a
buffer of its inflated size); another coding (br, zstd, ...) is a 415 naming the header, with
`Accept-Encoding` saying what is taken (RFC 7694).
"""
from __future__ import annotations

import asyncio
import zlib

from fastapi import Request
from starlette.requests import ClientDisconnect

from . import protocol as P
from .config import ServeConfig

JSON_TYPES = ("application/json",)
CODINGS = ("gzip", "deflate")              # Content-Encoding a body may have (identity: none)


class Inflater:
    """A gzip or deflate body decoded chunk by chunk, never to more than `limit` bytes (413).
    deflate is the zlib format (RFC 9110), or raw deflate as some clients send it; gzip may hold
    several members, one after another."""

    def __init__(self, coding: str, limit: int, why: str):
        self.coding, self.limit, self.why, self.size = coding, limit, why, 0
        self.head = b""                           # deflate: the first bytes, until its format is known
        self.z = zlib.decompressobj(16 + zlib.MAX_WBITS) if coding == "gzip" else None

    def _bad(self, why: str) -> P.APIError:
        return P.APIError(f"the request body is not {self.coding} data (Content-Encoding: {self.coding}): {why}",
                          code="invalid_content_encoding")

    def feed(self, data: bytes) -> bytes:
        if self.z is None:                        # deflate: zlib's header (RFC 1950), else raw deflate
            self.head += data
            if len(self.head) < 2:
                return b""
            zlib_format = self.head[0] & 0x0F == 8 and (self.head[0] << 8 | self.head[1]) % 31 == 0
            self.z = zlib.decompressobj(zlib.MAX_WBITS if zlib_format else -zlib.MAX_WBITS)
            data, self.head = self.head, b""
        out = []
        while data:
            if self.z.eof:                        # the next gzip member (deflate ends with its stream)
                if self.coding != "gzip":
                    raise self._bad("data after the end of its stream")
                self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                piece = self.z.decompress(data, self.limit - self.size + 1)
            except zlib.error as e:
                raise self._bad(str(e)) from None
            self.size += len(piece)
            if self.size > self.limit:
                raise P.APIError(f"the request body decodes to more than {self.limit} bytes {self.why}", status=413,
                                 code="body_too_large")
            out.append(piece)
            data = self.z.unconsumed_tail or self.z.unused_data
        return b"".join(out)

    def end(self) -> None:
        if self.z is None and self.head or self.z is not None and not self.z.eof:
            raise self._bad("it ends before its stream does")


def content_coding(header: str | None) -> str | None:
    """The coding a Content-Encoding header value names: None (identity), gzip or deflate;
    anything else a 415."""
    value = (header or "").strip().lower()
    if value in ("", "identity"):
        return None
    value = "gzip" if value == "x-gzip" else value
    if value not in CODINGS:
        raise P.APIError(f"the request body's Content-Encoding is {value}; agp decodes {', '.join(CODINGS)} or none "
                         "(send the body as it is, or gzip it)", status=415, code="unsupported_content_encoding",
                         headers={"Accept-Encoding": ", ".join(CODINGS)})
    return value


def decoded(body: bytes, header: str | None, limit: int) -> bytes:
    """A whole body as its Content-Encoding header value (`header`) says, decoded to at most `limit`
    bytes: the APIError read_body answers for a coding it does not take, a corrupt or a cut body
    or one that decodes past the limit."""
    coding = content_coding(header)
    if coding is None:
        return body
    inflater = Inflater(coding, limit, "")
    data = inflater.feed(body)
    inflater.end()
    return data


BODY_POLL_S = 0.25       # how often a body still arriving looks at its clock and whether the server is shutting down


class BodyClock:
    """When a body still arriving is late (408), as Apache's mod_reqtimeout (body=T,MinRate=R)
    and nginx's client_body_timeout (T between two reads) bound it: `timeout_s` of grace from
    the headers on, plus 1/`min_rate` s for each byte received (a steady upload of any size at
    `min_rate` bytes/s or faster is never late), and never `timeout_s` without a byte (a client
    that sent half its body fast and stops is not kept for the time its bytes bought). min_rate
    0: `timeout_s` for the whole body."""

    def __init__(self, timeout_s: float, min_rate: float, now: float):
        self.timeout_s, self.min_rate = timeout_s, min_rate
        self.start = self.last = now
        self.got = 0

    def received(self, n: int, now: float) -> None:
        if n:
            self.got, self.last = self.got + n, now

    def deadline(self) -> float:
        bought = self.got / self.min_rate if self.min_rate > 0 else 0.0
        return min(self.start + self.timeout_s + bought, self.last + self.timeout_s)

    def late(self, now: float) -> str | None:
        """Why the body is late at `now` (the 408's message), or None."""
        if now < self.deadline():
            return None
        if self.min_rate <= 0:
            return f"the request body did not arrive within {self.timeout_s:g} s (--body-timeout)"
        if now >= self.last + self.timeout_s:
            return (f"no byte of the request body arrived for {self.timeout_s:g} s (--body-timeout; "
                    f"{self.got} bytes had)")
        return (f"the request body arrived slower than {self.min_rate:g} bytes/s (--body-min-rate) after its "
                f"first {self.timeout_s:g} s (--body-timeout): {self.got} bytes in {now - self.start:.1f} s")


async def read_body(request: Request, config: ServeConfig) -> bytes:
    """The request body, at most max_body_bytes (413), arriving in time (408: BodyClock), of
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
    coding = content_coding(request.headers.get("content-encoding"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise P.APIError(f"the request body has {int(declared)} bytes; at most {limit} are accepted {why}",
                         status=413, code="body_too_large")
    loop = asyncio.get_running_loop()
    clock = BodyClock(config.body_timeout_s, config.body_min_rate, loop.time())

    async def collect() -> bytes:
        # a compressed body is held as it came while it arrives (the bytes --max-body-bytes-arriving
        # counts), its decoded size checked piece by piece (413 at once) and the pieces dropped;
        # it is decoded whole once complete
        chunks, size = [], 0
        inflater = Inflater(coding, limit, why) if coding else None
        try:
            async for chunk in request.stream():
                size += len(chunk)
                clock.received(len(chunk), loop.time())
                if size > limit:
                    raise P.APIError(f"the request body has more than {limit} bytes {why}", status=413,
                                     code="body_too_large")
                if inflater:
                    inflater.feed(chunk)
                chunks.append(chunk)
        except ClientDisconnect:          # the client's doing: a 499 as any client gone, not a 500
            raise P.APIError("the client went away before the request's body had arrived", status=499,
                             code="aborted") from None
        if inflater:
            inflater.end()
            return Inflater(coding, limit, why).feed(b"".join(chunks))
        return b"".join(chunks)

    # the body in time; a server that begins to shut down meanwhile refuses it at once (it would
    # refuse the request once read; waiting on the body instead held the connection until uvicorn
    # cancelled the handler, 5 s into the shutdown, with a text/plain 500 and a traceback)
    apipe = getattr(request.app.state, "apipe", None)
    task = asyncio.ensure_future(collect())
    try:
        while True:
            left = clock.deadline() - loop.time()
            done, _ = await asyncio.wait({task}, timeout=max(0.0, min(BODY_POLL_S, left)))
            if done:
                return task.result()
            if apipe is not None and not apipe.accepting:
                raise P.APIError("the server is shutting down; this request's body was still arriving",
                                 status=503, type="server_error", code="unavailable",
                                 headers={"Retry-After": str(config.retry_after_s)})
            late = clock.late(loop.time())
            if late:
                raise P.APIError(late, status=408, code="body_timeout")
    finally:
        task.cancel()


async def read_json(request: Request, config: ServeConfig) -> dict:
    """The body as a JSON object (large bodies decoded off the event loop)."""
    raw = await read_body(request, config)
    return P.parse_json(raw) if len(raw) < (64 << 10) else await asyncio.to_thread(P.parse_json, raw)
