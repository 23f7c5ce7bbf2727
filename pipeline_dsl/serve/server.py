"""uvicorn, as `agp serve` runs it: every connection bounded in time and size, and a drain
that tells the truth.

`agp_protocol(...)` is uvicorn's H11Protocol with a limit in every state of a connection:

| state | limit |
|---|---|
| opened, or a request line and headers arriving | `header_timeout` from the first byte (or the open): closed |
| headers longer than `max_header_bytes` (16 KiB) | 431 at once, closed (nginx refuses 64 KB headers too) |
| bytes that are not HTTP (no Host, a bad Content-Length, both Content-Length and Transfer-Encoding; a first line that is no request line, as soon as it has arrived; a target neither a path nor an absolute http(s) URI, which is served by its path: `origin_form`) | 400 naming what is wrong, closed |
| a chunked body in more than `SMALL_CHUNKS` (4,096) chunks beyond one per `CHUNK_BYTES` (1 KiB) of it | 400, closed: h11 reads each chunk in Python (some 10 µs), and a body of 1-byte chunks held the event loop, and so every other request, for seconds |
| the body arriving | the app's `--body-timeout` and `--body-min-rate` (408); no `--max-connections` slot until it is complete (serve/guard.py) |
| answered with an error, or before the body was all read | `Connection: close`, closed after the answer |
| closed with the client still sending (a refused body, headers too long) | half-closed: what it sends is read and dropped for up to `LINGER_S` (2 s), then closed |
| the answer being written, the client not reading it | `min(1 s, send_timeout / 4)` with none of it taken: the request hears it (`SendWatch`) and pauses its generation; `send_timeout` with none of it taken (below): cut |
| the same at shutdown (after the drain) | cut at once |
| the kernel's buffer of the answer | `SEND_BUFFER` (128 KiB; Linux doubles it), not Linux's autotuned 4 MiB |
| idle between requests (keep-alive) | `keep_alive_timeout` (`KEEP_ALIVE_S`, 75 s, as nginx; not uvicorn's 5 s): closed; the next request's bytes end the idle wait and start its `header_timeout` |
| more connections open than `max_open` (`max_open_connections`: the open-files limit less a quarter of it, 64 to 2,048) | the ones waiting longest for a request (opened or kept alive, no request under way) are closed, `REUSE` at a time |

So no client holds a connection (and its file descriptor) longer than one of these limits by
sending a byte now and then. Nor do connections that wait for a request take the descriptors a
new client needs: past `max_open` connections, each new one closes the `REUSE` that have waited
longest for a request (none of them has one under way: nothing is lost, and a client whose
kept-alive connection is closed opens another), as nginx reuses its waiting and keep-alive
connections once its worker_connections run out. Without it, thousands of connections that
send nothing (each within its `header_timeout`) took every descriptor, and a new client's
connection was accepted by the kernel and closed unanswered (uvloop drops what it cannot
accept). The descriptors kept spare are for the server's own files and for the connections
accepted at once in a burst, before the ones closed for them are gone.

An answered 413 whose client keeps sending is closed, not left half-read for ever. The close is
a lingering one, as nginx's: closing a socket with unread bytes sends a reset, and a reset can
destroy the 413 or 431 before the client has read it (a client still uploading its body sees
"connection reset" or a broken pipe instead of the answer); so the answer and a FIN go first,
and the client's remaining bytes are dropped.

A client that stops reading is seen by its TCP: its receive window closes (a proxy that stopped
reading) or no acknowledgement comes at all (a phone gone to sleep), so the bytes written to it
stay in this kernel, unacknowledged. While an answer's bytes wait for their client, the
connection is looked at `STALL_LOOKS` (4) times per `stall_s` = `min(1 s, send_timeout / 4)`
(Linux's TCP_INFO: the bytes the client has acknowledged, whether more wait, the round trip to
it), so the last look that saw bytes taken is at most a quarter of `stall_s` after the client's
last byte. `stall_s` after it without one more byte taken (or `STALL_RTTS` (4) round trips, where
those are longer: a client far away acknowledges a round trip after the bytes are sent), the
request being answered hears that its client stalls, and again when it takes bytes: the
connection's `SendWatch`, in the ASGI scope's extensions under SEND_WATCH (serve/sse.py hands it
to the stream, which pauses its generation: serve/async_pipeline.py). A client that reads, however
slowly, takes bytes every time it reads (its window opens, what waits is sent and acknowledged):
a pause for it ends at its next read. `send_timeout` without one more byte taken and the
connection is cut (`transport.abort()`: the app hears a disconnect, the request is aborted and
counted as a 499). So a stalled stream is paused about a second, and cut `send_timeout`, after
its client's own receive buffer filled, whether or not the server's buffers (256 KiB in the
kernel, 64 KiB in asyncio, some 1,100 streamed tokens) have filled: a shorter answer
would otherwise be generated to its end for a client that reads none of it. (The stall was once
told two looks of a second each after the look that last saw bytes taken, and the first look
came a second after the answer's first byte: 3 s into a stream whose client read nothing, when a
CPU engine's 600 tokens a second had filled the kernel's buffer a second before.) Where
TCP_INFO is missing (not Linux), the clock runs while asyncio's buffer is over its high-water
mark (the kernel's full) and restarts when it drains.

The kernel's send buffer of a connection is fixed at `SEND_BUFFER`: left to itself Linux grows it
to 4 MiB for a client that reads nothing, which costs 4 MiB of kernel memory per such connection
until it is cut and hides a stalled stream from `--max-unread-tokens` (serve/async_pipeline.py:
tokens queue in the server only once the kernel's and asyncio's buffers are full) for thousands of
tokens.

`AgpServer` on SIGTERM / SIGINT / SIGHUP stops admitting (new requests get 503), waits up to the
drain timeout for the requests in flight, then fails the rest — an SSE error event and `[DONE]`
for a stream, a JSON 503 otherwise — and only then lets uvicorn stop. `cut` is how many were
failed. A second signal ends the wait at once: what is still in flight is failed the same way
(not dropped mid-answer), and the exit status says so; a third while they are being cut stops
at once without that (exit status 1 as well: `exit_status`). One once the drain is over changes
nothing (the server is stopping on its own: a forced exit would skip the app's own end, which
uvicorn then logs as an error with a traceback); a second one then stops at once. SIGHUP
drains too: agp serve has nothing to reload, and a hang-up (a closed terminal, an operator's
`kill -HUP`) must not drop the answers in flight, as its default action would.

An engine that fails (its loop raised: every request in flight was failed with a 503, and every
later one would be) is logged once, with its traceback, and the server stops on its own, exit
status 1: a supervisor (Kubernetes, systemd) restarts it, where a server left up would answer
503 to everything with nothing to restart it but a liveness probe on /health.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import json
import logging
import re
import signal
import socket
import struct
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline_dsl.stopping import heeded

from .logs import endpoint

log = logging.getLogger("agp.serve")

MAX_HEADER_BYTES = 16 << 10    # request line + headers; uvicorn (h11) reads 16 KiB, nginx 8-32 KB
LINGER_S = 2.0                 # a closed connection's unread request bytes are dropped this long (nginx: 5 s)
CLOSE = (b"connection", b"close")
# the kernel's buffer of a connection's unread answer: ~1,000 streamed tokens; 2 MB/s to a client 100 ms away
SEND_BUFFER = 128 << 10
# how long a connection may sit idle between requests: longer than its clients' own idle limit
# (httpx's, the openai client's, is 5 s; load balancers' 60 s), so the client, not the server,
# closes an idle connection; a server that closes first races the request a client sends on it
# (a request on a pooled connection idle for about 5 s fails with "Server disconnected")
KEEP_ALIVE_S = 75.0
TCP_INFO_BYTES = 148            # Linux's struct tcp_info up to tcpi_notsent_bytes (Linux 4.6)
STALL_LOOKS = 4                 # looks at a connection whose answer waits per stall_s (agp_protocol)
STALL_RTTS = 4                  # and a stall lasts at least this many of its round trips
SMALL_CHUNKS = 4096             # chunks a chunked body may have beyond one per CHUNK_BYTES of it
CHUNK_BYTES = 1024
REUSE = 32                      # connections waiting for a request closed at once past max_open (nginx: 32)
REUSE_LOG_S = 10.0              # at most one log line this often about them
# a request line as h11 reads one (RFC 9112 3: method SP request-target SP HTTP-version)
REQUEST_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]")
# an absolute-form request target (RFC 9112 3.2.2): scheme://authority, then the path and query
ABSOLUTE_TARGET = re.compile(rb"([a-zA-Z][a-zA-Z0-9+.-]*)://([^/?#]*)([^#]*)")
HOST = re.compile(rb"(\[[0-9a-fA-F:.]+\]|[-a-zA-Z0-9._~!$&'()*+,;=%]+)(:[0-9]*)?")


def bad_request_line(buffered: bytes) -> str | None:
    """Why the first line of `buffered` (a request's bytes so far) is no request line, once it has
    arrived whole; None while it is one or still arriving. h11 reads a request only once its
    headers have all arrived: an HTTP/0.9 request (`GET /`, no version) or a garbage line waited
    out the header timeout for headers that never come."""
    end = buffered.find(b"\n")
    if end <= 0:                          # not here yet; a leading empty line is h11's to refuse
        return None
    line = buffered[:end].removesuffix(b"\r")
    if REQUEST_LINE.fullmatch(line):
        return None
    shown = line[:100].decode("latin-1")
    if len(line.split()) == 2 and not line.split()[1].upper().startswith(b"HTTP/"):
        return (f"the request line '{shown}' has no HTTP version (HTTP/0.9 is not served: "
                f"send '{shown} HTTP/1.1' and a Host header)")
    return f"illegal request line: '{shown}'"


def origin_form(request: h11.Request) -> h11.Request | str:
    """The request with an absolute-form target (`GET http://host:port/v1/models`, as proxies
    send it; RFC 9112 3.2.2: a server MUST accept it) in origin form: the target's path and query,
    and its host in place of the Host header (which the server MUST ignore then). A target of
    another form than these two (`GET v1/models`, an authority form outside CONNECT) or an absolute
    one that is no http(s) URI with a host: why, for a 400."""
    target = request.target
    if target.startswith(b"/") or (target == b"*" and request.method == b"OPTIONS"):
        return request
    shown = target[:100].decode("latin-1")
    absolute = ABSOLUTE_TARGET.fullmatch(target)
    if absolute is None:
        return (f"the request target '{shown}' is neither a path (/v1/...) nor an absolute "
                "http:// URI")
    scheme, authority, rest = absolute.groups()
    if scheme.lower() not in (b"http", b"https"):
        return f"the request target '{shown}' is no http or https URI (its scheme is {scheme.decode()})"
    if b"@" in authority:                 # RFC 9110 4.2.4: userinfo from an untrusted source is an error
        return f"the request target '{shown}' has a user name in its authority"
    if not HOST.fullmatch(authority):     # RFC 9110 4.2.1: an http URI with no host is invalid
        return f"the request target '{shown}' has no valid host"
    path = rest if rest.startswith(b"/") else b"/" + rest
    headers = [(name, value) for name, value in request.headers if name.lower() != b"host"]
    return h11.Request(method=request.method, target=path, headers=[(b"host", authority), *headers],
                       http_version=request.http_version)


def tcp_progress(sock) -> tuple[int, bool, float] | None:
    """(the bytes a TCP connection's peer has acknowledged, whether more of what was written to
    it wait in this kernel: unacknowledged or not yet sent, its smoothed round-trip time in
    seconds) from Linux's TCP_INFO; None where the platform has none. A client that stops reading
    closes its receive window: what was written to it then waits here and the first number stops
    moving."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, TCP_INFO_BYTES)
    except OSError:
        return None
    if len(info) < TCP_INFO_BYTES:
        return None
    unacked, = struct.unpack_from("=I", info, 24)            # tcpi_unacked: segments in flight
    rtt, = struct.unpack_from("=I", info, 68)                # tcpi_rtt: smoothed RTT, microseconds
    acked, = struct.unpack_from("=Q", info, 120)             # tcpi_bytes_acked
    not_sent, = struct.unpack_from("=I", info, 144)          # tcpi_notsent_bytes
    return acked, bool(unacked or not_sent), rtt / 1e6


class ClosingConnection(h11.Connection):
    """h11's server side that says `Connection: close` on every error answer and on any answer
    sent before the request's body was read in full; h11 then closes after the answer. It keeps
    why the client's bytes were not HTTP (`protocol_error`) for the 400 that says so."""

    protocol_error: str | None = None
    request_id: str | None = None            # the X-Request-Id of the answer being sent (serve/access.py)
    chunked = False                          # the request being read has a chunked body
    chunks = size = 0                        # and so far this many chunks of it begun, of these bytes

    def next_event(self):
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as e:
            # h11 shows the bytes as Python's repr: "illegal request line: bytearray(b'GARBAGE')"
            self.protocol_error = re.sub(r"bytearray\(b?(['\"])(.*?)\1\)", r"'\2'", str(e))[:200]
            raise
        if isinstance(event, h11.Request):
            event = origin_form(event)
            if isinstance(event, str):
                self.protocol_error = event
                raise h11.RemoteProtocolError(event)
            names = {name for name, _ in event.headers}
            self.chunked = b"transfer-encoding" in names          # h11 takes only chunked
            self.chunks = self.size = 0
            if self.chunked and b"content-length" in names:
                # RFC 9112 6.1: a server may refuse it, and must close the connection after it either
                # way; h11 read the body as chunked and kept the connection, so the bytes a proxy
                # that went by the Content-Length took for the next request were answered as one
                self.protocol_error = ("both Transfer-Encoding and Content-Length: the body's length is "
                                       "ambiguous (send one of them)")
                raise h11.RemoteProtocolError(self.protocol_error)
        elif isinstance(event, h11.Data) and self.chunked:
            # h11 gives one chunk as many Data events as the reads it came in: a chunk is one
            # where it starts (a 6 MB chunk read 500 bytes at a time is one chunk, not 12,000)
            self.chunks += event.chunk_start
            self.size += len(event.data)
            if self.chunks > SMALL_CHUNKS + self.size // CHUNK_BYTES:
                self.protocol_error = (f"the chunked request body came in {self.chunks} chunks for its first "
                                       f"{self.size} bytes: more than {SMALL_CHUNKS} beyond one per {CHUNK_BYTES} "
                                       "bytes (send it in larger chunks, or with a Content-Length)")
                raise h11.RemoteProtocolError(self.protocol_error)
        return event

    def send(self, event):
        if isinstance(event, h11.Response):
            self.request_id = next((value.decode("latin-1") for name, value in event.headers
                                    if name.lower() == b"x-request-id"), None)
        if isinstance(event, h11.Response) and (event.status_code >= 400 or self.their_state is h11.SEND_BODY):
            if not any(name.lower() == b"connection" and b"close" in value.lower() for name, value in event.headers):
                event = h11.Response(status_code=event.status_code, reason=event.reason,
                                     headers=[*event.headers, CLOSE], http_version=event.http_version)
        return super().send(event)


class _LingeringTransport:
    """An asyncio transport whose close() lingers while the client may still be sending (see the
    module docstring): everything but close() and is_closing() is the transport's own."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol = transport, protocol
        self.lingering = False
        self._timer = None

    def close(self, linger: bool | None = None) -> None:
        t = self._transport
        if self.lingering or t.is_closing():
            return
        if linger is None:               # unread bytes of a request are possible
            linger = self._protocol.conn.their_state not in (h11.IDLE, h11.DONE, h11.CLOSED, h11.MUST_CLOSE)
        if not linger or not t.can_write_eof():
            t.close()
            return
        self.lingering = True
        t.write_eof()                    # after what is buffered: the answer, then the FIN
        t.resume_reading()
        self._timer = self._protocol.loop.call_later(LINGER_S, t.close)

    def write(self, data) -> None:
        self._transport.write(data)
        self._protocol.watch_sending()

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __getattr__(self, name):
        return getattr(self._transport, name)


SEND_WATCH = "agp.send_watch"   # the scope's extension through which a request hears its client stall
# the attribute of uvicorn's ServerState through which a stopping AgpServer hears a connection close
CLOSED_HOOK = "agp_connection_closed"


class SendWatch:
    """Whether the client of the answer being written has taken nothing of it for `stall_s`
    while some waits (`stalled`: agp_protocol); `listener(stalled)`, when the app sets one, hears each change.
    A request finds it in its ASGI scope's extensions under SEND_WATCH."""

    def __init__(self):
        self.stalled = False
        self.listener = None

    def set(self, stalled: bool) -> None:
        if stalled != self.stalled:
            self.stalled = stalled
            if self.listener is not None:
                self.listener(stalled)


def agp_protocol(header_timeout: float = 10.0, send_timeout: float = 30.0,
                 max_header_bytes: int = MAX_HEADER_BYTES, keep_alive_timeout: float = KEEP_ALIVE_S,
                 max_open: int | None = None):
    """An H11Protocol class with the limits of the module docstring (`keep_alive_timeout` in
    place of the uvicorn.Config's `timeout_keep_alive`; `max_open` connections at most before
    those waiting for a request are closed: None, no bound). One class serves one server."""
    stall_s = min(1.0, send_timeout / 4)  # nothing of its waiting answer taken this long: its client stalls
    look = stall_s / STALL_LOOKS          # how often a connection whose answer waits is checked
    waiting = collections.OrderedDict()   # connections with no request under way, longest waiting first
    reused = [0, None]                    # connections closed to make room since the last log line, and when it was

    class AgpH11(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.conn = ClosingConnection(h11.SERVER, max_incomplete_event_size=max_header_bytes + 1)
            self.timeout_keep_alive = keep_alive_timeout     # uvicorn's idle timer reads it

        def connection_made(self, transport):
            sock = transport.get_extra_info("socket")
            self._tcp = None                      # the socket whose TCP_INFO says what its client took
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                self._tcp = sock if tcp_progress(sock) is not None else None
            self._header_timer = self._send_timer = None
            self._paused, self._drained = False, 0    # asyncio's buffer over its high-water mark; times it drained
            self._shutting = False                     # closed by a stop with bytes of its answer still waiting
            self._taken = self._taken_at = None        # the client's progress at the last check, and when it moved
            self._watch, self._watched = SendWatch(), None   # the request being answered hears a stall
            super().connection_made(_LingeringTransport(transport, self))
            self._arm()
            self._note_waiting()
            if max_open is not None and len(self.connections) > max_open:
                self._make_room()

        # ---- connections waiting for a request: the longest waiting make room for a new one --
        def _note_waiting(self) -> None:
            """Keep `waiting` up to date: this connection has no request under way (opened, kept
            alive, or its request's headers still arriving), in the order they began to wait. Only
            read past max_open: none kept without a bound."""
            if max_open is None:
                return
            if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE \
                    and not self.transport.is_closing():
                waiting.setdefault(self, None)
            else:
                waiting.pop(self, None)

        def _make_room(self) -> None:
            closed = 0
            while closed < REUSE and waiting:
                other = next(iter(waiting))         # the longest waiting; this one, the newest, is last
                if other is self:
                    break
                del waiting[other]
                if not other.transport.is_closing():
                    other._disarm()
                    other.transport.close(linger=False)
                    closed += 1
            reused[0] += closed
            now = self.loop.time()
            if reused[0] and (reused[1] is None or now - reused[1] >= REUSE_LOG_S):
                log.warning("%d connections open, more than the %d the open-files limit leaves room for: closed %d "
                            "that waited longest for a request (no request under way)%s", len(self.connections),
                            max_open, reused[0], "" if reused[1] is None else f" in the last {now - reused[1]:.0f}s")
                reused[:] = [0, now]

        # ---- the request line and headers: in time, and not too long -----------------
        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            if self.transport.lingering:       # the rest of a request already answered: dropped
                return
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm()                       # bytes of a request whose headers are not all here
            else:
                self._disarm()

        def handle_events(self) -> None:
            if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE \
                    and not self.transport.is_closing():
                buffered = self.conn.trailing_data[0]
                if self._headers_too_long(buffered):
                    self._refuse(431, f"the request line and headers are longer than {max_header_bytes} bytes",
                                 "headers_too_large")
                    return
                if (why := bad_request_line(buffered)) is not None:     # at once, not at the header timeout
                    self._refuse(400, f"invalid HTTP request: {why}", "invalid_http_request")
                    return
            super().handle_events()
            self._note_waiting()
            cycle = self.cycle
            if cycle is not None and cycle is not self._watched:      # a new request: its own watch
                self._watched, self._watch = cycle, SendWatch()
                cycle.scope.setdefault("extensions", {})[SEND_WATCH] = self._watch

        def _headers_too_long(self, buffered: bytes) -> bool:
            end = buffered.find(b"\r\n\r\n")
            return (end if end >= 0 else len(buffered)) > max_header_bytes

        def _refuse(self, status: int, message: str, code: str) -> None:
            """An OpenAI error answer written outside the app (the request never reached it), then close."""
            log.info("closing a connection: %d %s", status, message)
            body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                         "code": code}}).encode()
            reason = http.HTTPStatus(status).phrase
            # written as bytes: h11 sends no answer before it has read a request's headers
            self.transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                                 f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
            self._disarm()
            self.transport.close(linger=True)  # the rest of the headers may still be on the way

        def send_400_response(self, msg: str) -> None:
            """Bytes that are not an HTTP request (no Host header, a bad Content-Length, a request
            line that is no request line): an OpenAI error naming what h11 found, as every other
            error answer is one (uvicorn writes a text/plain 'Invalid HTTP request received.')."""
            why = self.conn.protocol_error or msg
            self._refuse(400, f"invalid HTTP request: {why}", "invalid_http_request")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()                        # idle keep-alive: uvicorn's timer of keep_alive_timeout
            self._note_waiting()

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection whose request headers took more than %gs", header_timeout)
                self.transport.close()

        # ---- the answer: a client that takes none of it for send_timeout is cut --------
        def pause_writing(self) -> None:
            super().pause_writing()
            self._paused = True
            self.watch_sending()

        def resume_writing(self) -> None:
            super().resume_writing()
            self._paused = False
            self._drained += 1

        def _progress(self) -> tuple[int, bool, float]:
            """(a mark that moves whenever the client takes bytes of its answer, whether bytes of
            it wait for the client, the round-trip time to it in seconds): its TCP's acknowledged
            bytes, else (no TCP_INFO) how often asyncio's buffer drained and whether it is over
            its high-water mark (round trip 0: unknown)."""
            tcp = tcp_progress(self._tcp) if self._tcp is not None else None
            if tcp is None:
                return self._drained, self._paused, 0.0
            return tcp[0], tcp[1] or self.transport.get_write_buffer_size() > 0, tcp[2]

        def watch_sending(self) -> None:
            """Bytes were written to the client (or writing paused): check that it takes them,
            every `look` while some wait (the module docstring)."""
            if self._send_timer is None and not self.transport.is_closing():
                self._taken, self._taken_at = self._progress()[0], self.loop.time()
                self._send_timer = self.loop.call_later(look, self._check_sending)

        def _check_sending(self) -> None:
            self._send_timer = None
            if self.transport.is_closing() and not self._shutting:
                return
            taken, waiting, rtt = self._progress()
            if self._shutting:
                waiting = waiting or self.transport.get_write_buffer_size() > 0
            if not waiting:                       # all taken: watched again from the next write
                self._watch.set(False)
                if self._shutting:                # a stop's close: all of it gone (TLS would still wait
                    self.transport.abort()        # for the client's close_notify)
                return
            now = self.loop.time()
            if taken != self._taken:              # it took bytes since the last look: its last byte, as
                self._taken, self._taken_at = taken, now    # far as a look can tell
                self._watch.set(False)
            elif now - self._taken_at >= max(stall_s, STALL_RTTS * rtt):
                self._watch.set(True)             # the request may pause its generation (serve/async_pipeline.py)
            # _taken_at moved above when it took bytes; a stop waits for a client that stalls no longer
            if now - self._taken_at >= (limit := stall_s if self._shutting else send_timeout):
                log.info("cutting the connection of %s: it took nothing of its answer (%s) for %gs",
                         self._client(), self._answering(), limit,
                         extra={"client": self._client(), "request_id": self.conn.request_id})
                self.transport.abort()            # connection_lost: the app hears a disconnect
                return
            self._send_timer = self.loop.call_later(look, self._check_sending)

        def _client(self) -> str:
            return endpoint(*self.client[:2]) if self.client else "a client"

        def _answering(self) -> str:
            """The request whose answer is being written, as the access log names it."""
            scope = getattr(self.cycle, "scope", None) or {}
            what = f"{scope.get('method', '?')} {scope.get('path', '?')}"
            return what + (f" id={self.conn.request_id}" if self.conn.request_id else "")

        def shutdown(self) -> None:
            """uvicorn's graceful shutdown waits for the answer being written; one whose client
            reads nothing (the socket's buffer full) would wait out uvicorn's 5 s and then be
            cancelled with an ERROR and a traceback: after the drain it is cut at once."""
            if self._paused and not self.transport.is_closing():
                log.info("shutting down: cutting the connection of %s, which is not reading its answer (%s)",
                         self._client(), self._answering())
                self.transport.abort()
                return
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                if self.transport.get_write_buffer_size() == 0:
                    # idle, nothing of an answer left to write: closed at once. close() would wait
                    # on TLS for the client's close_notify, which an idle keep-alive client (a
                    # pool's connection) never sends: every stop with one open waited out the 5 s
                    # and logged an ERROR. The kernel still sends what it holds.
                    self.transport.abort()
                    return
                # the end of its last answer still waits in asyncio's buffer (under the mark that
                # pauses writing): closed once it has gone, cut once its client has taken none of
                # it for stall_s (close() alone waited for it, so a stop waited out the 5 s)
                self._shutting = True
                self.watch_sending()
            super().shutdown()

        def connection_lost(self, exc) -> None:
            waiting.pop(self, None)
            self._disarm()
            self.transport.stop()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None
            super().connection_lost(exc)
            closed = getattr(self.server_state, CLOSED_HOOK, None)
            if closed is not None:                # a stopping AgpServer waits for this connection
                closed()

    return AgpH11


def max_open_connections(open_files: int | None) -> int | None:
    """The connections a server keeps open under a limit of `open_files` descriptors (agp_protocol's
    `max_open`): the limit less a quarter of it, at least 64 and at most 2,048 (uvicorn's listen
    backlog: the connections accepted in one burst, before those closed to make room for them are
    gone), which also holds the server's own files. None: no limit."""
    if open_files is None:
        return None
    return open_files - max(64, min(2048, open_files // 4))


def header_timeout_protocol(seconds: float):
    """agp_protocol with this header timeout and the other limits' defaults."""
    return agp_protocol(header_timeout=seconds)


OPEN_FILES = 65536              # the soft limit of open files `agp serve` asks for (vLLM's set_ulimit: 65535)


def raise_open_files(want: int = OPEN_FILES) -> int | None:
    """Raise this process's soft limit of open files toward `want` (at most its hard limit), as
    vLLM's server does at start: each connection holds a descriptor, and under a soft limit of
    1024 (a common default) a thousand idle connections, each within its header timeout, leave
    none to accept another client with, whom the kernel then drops unanswered. Returns the
    limit now (None where the platform has none)."""
    try:
        import resource
    except ImportError:                      # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, e)
    return None if soft == resource.RLIM_INFINITY else soft


class AgpServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the pipeline (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, apipe, drain_timeout: float):
        super().__init__(config)
        self.apipe, self.drain_timeout = apipe, drain_timeout
        self.stopped_by: int | None = None
        self.cut = 0
        self.drained = None                  # True: every request finished; False: some were cut
        self.dropped = 0                     # in flight when a third signal stopped the server at once
        self._insisted = False               # a signal came after the drain was over
        self._draining = threading.Event()
        self._hurry = threading.Event()      # a second signal: stop waiting, cut what is in flight
        self.failed: BaseException | None = None   # the engine's failure that stopped the server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick: asyncio.Future | None = None     # main_loop's wait for its next tick (`_wake` ends it)
        self._changed: asyncio.Event | None = None   # shutdown's wait: a connection or task ended, or force_exit

    async def main_loop(self) -> None:
        """uvicorn's: on_tick every 0.1 s until it says to exit; and at once when a drain, a
        signal or the pipeline's failure asks the server to stop (`_stop`), not at the next tick."""
        self._loop = loop = asyncio.get_running_loop()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            self._tick = tick = loop.create_future()
            timer = loop.call_later(0.1, _done, tick)
            await tick
            timer.cancel()
            should_exit = await self.on_tick(counter)

    def _stop(self, force: bool = False) -> None:
        """Ask the server to stop (`force`: at once, no graceful shutdown), from any thread."""
        self.should_exit = True
        if force:
            self.force_exit = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._tick is not None:
            _done(self._tick)
        if self._changed is not None:
            self._changed.set()

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's: stop accepting; close the idle connections and let each other one finish
        the answer it is writing (up to timeout_graceful_shutdown; agp_protocol cuts one whose
        client reads nothing); then the app's lifespan shutdown. It waits on the connections and
        their tasks themselves (agp_protocol's connections say when they close: CLOSED_HOOK):
        uvicorn slept 0.1 s first and then looked every 0.1 s, so every stop, with nothing open,
        waited 0.1 s for nothing."""
        logging.getLogger("uvicorn.error").info("Shutting down")
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        state = self.server_state
        self._changed = asyncio.Event()
        setattr(state, CLOSED_HOOK, self._changed.set)
        for connection in list(state.connections):
            connection.shutdown()
        try:
            await asyncio.wait_for(self._closed(), timeout=self.config.timeout_graceful_shutdown)
        except asyncio.TimeoutError:
            logging.getLogger("uvicorn.error").error(
                "Cancel %s running task(s), timeout graceful shutdown exceeded", len(state.tasks))
            for t in state.tasks:
                t.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _closed(self) -> None:
        """Until every connection has closed and every request's task ended (or force_exit)."""
        state, changed = self.server_state, self._changed
        while (state.connections or state.tasks) and not self.force_exit:
            changed.clear()
            for task in state.tasks:
                task.add_done_callback(lambda _: changed.set())
            await changed.wait()
        for server in self.servers:
            await server.wait_closed()

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's, every 0.1 s: also stops the server once the pipeline has failed."""
        if self.failed is None and (error := self.apipe.error) is not None:
            self.failed = error
            log.error("the pipeline failed: %s: %s; stopping the server (exit status 1) so that it is restarted",
                      type(error).__name__, error, exc_info=error)
            self.should_exit = True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, with SIGHUP among the signals that drain (uvicorn leaves it to kill the
        process), and without uvicorn's re-raising of the signal after the drain: the exit
        status is main()'s. `handle_exit` runs as a callback of the event loop (its
        add_signal_handler), not inside a signal handler: it logs and starts the drain's thread,
        and a handler runs wherever the main thread was, perhaps inside a write to stderr (a
        reentrant write raises there) or holding the lock a thread's start takes (a wait for
        itself). The loop hears a signal the kernel handed to any thread (its wake-up fd)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.getsignal(sig) for sig in heeded()}   # SIGINT, SIGTERM, SIGHUP (nohup's stays ignored)
        loop = asyncio.get_running_loop()
        for sig in old:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig, handler in old.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self._draining.is_set():
            name = signal.Signals(sig).name
            if self.drained is not None and not self._insisted:    # the drain is over: it stops on its own
                self._insisted = True
                log.info("%s again: already stopping (the drain is over; another signal stops at once)", name)
            elif self.drained is not None:          # and again: stop now (its own end may hang)
                self._stop(force=True)
            elif not self._hurry.is_set():          # a second signal: cut now
                log.warning("%s again: cutting the requests still in flight", name)
                self._hurry.set()
            else:                                   # a third while they are being cut: stop now
                log.warning("%s a third time: stopping now; the requests still in flight get no answer", name)
                self.dropped = self.apipe.runtime.in_flight
                self._stop(force=True)
            return
        self.stopped_by = sig
        self._draining.set()
        threading.Thread(target=self._drain, name="agp-drain", daemon=True).start()

    def _drain(self) -> None:
        runtime = self.apipe.runtime
        log.info("draining (%s): no new requests; %d in flight get up to %gs", signal.Signals(self.stopped_by).name,
                 runtime.in_flight, self.drain_timeout)
        runtime.stop_admitting()
        deadline = time.monotonic() + self.drain_timeout
        while not runtime.wait_idle(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self._hurry.is_set() or time.monotonic() >= deadline:
                break
        why = "stopped by a second signal" if self._hurry.is_set() else f"drain timeout {self.drain_timeout:g}s"
        self.drained = runtime.close(drain=False, reason=f"the server shut down before this request finished ({why})")
        self.cut = runtime.cut
        if self.cut:
            log.warning("%s: %d request(s) cut (each got an error)", why, self.cut)
        # the cut answers, as those that finished, are being written: the server's shutdown waits
        # for each (this slept 0.3 s for them, though most were out already)
        self._stop()


def _done(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
