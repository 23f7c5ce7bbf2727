"""Connections to `agp serve` are bounded whatever the client does (serve/server.py): an error
answer, or one sent before the body was read, closes its connection (`Connection: close`) even
if the client keeps sending; headers over 16 KiB are a 431; a client that reads none of its
stream is cut after --send-timeout; an idle one is kept --keep-alive-timeout. Probed with raw sockets against an `agp serve` child,
counting the child's open sockets."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path

import h11
import httpx
import pytest
import uvicorn
from uvicorn.server import ServerState

from pipeline_dsl.serve.server import SEND_WATCH, TCP_INFO_BYTES, ClosingConnection, agp_protocol

from test_serve import TINY, start_agp_serve

ROOT = Path(__file__).resolve().parents[1]
HUGE = b"Content-Length: 10737418240\r\n"
# the module's server's --keep-alive-timeout, and how long its probe leaves a connection idle before
# it serves another request: past uvicorn's old 5 s as the server counts it (its idle time starts
# with the answer it sent, before the client read it; the client's next request reaches it after
# it was sent), KEEP_ALIVE_S - IDLE_S short of the timeout, so that a test thread woken late by a
# busy or slow machine (1.4 s seen at load 11) still finds the connection open
KEEP_ALIVE_S, IDLE_S = 8, 5.1


@pytest.fixture(scope="module")
def serving(tiny_gguf, tmp_path_factory):
    """`agp serve` on the tiny model with short limits, and the keep-alive probe begun on it as it
    came up (KeepAliveProbe): (process, url, port, probe)."""
    path = tmp_path_factory.mktemp("conn") / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=4, timeout=1))
    proc, url = start_agp_serve(str(path), "--threads", "1", "--no-access-log", "--header-timeout", "2",
                                "--send-timeout", "1", "--body-timeout", "5", "--keep-alive-timeout", str(KEEP_ALIVE_S))
    try:
        port = int(url.rsplit(":", 1)[1])
        yield proc, url, port, KeepAliveProbe(port)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def serve(serving):
    """`agp serve` on the tiny model with short limits: (process, url, port)."""
    return serving[:3]


def sockets_of(pid: int) -> int:
    """Open sockets of a process (Linux /proc)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def head_of_answer(c: socket.socket) -> bytes:
    """The status line and headers the server sent (and what came with them)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    return data


def closed_within(c: socket.socket, seconds: float) -> bool:
    """Whether the server closes `c` within `seconds` (EOF or a reset), reading what it sends."""
    c.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not c.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.parametrize("request_head, status", [
    (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + HUGE, b"413"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n" + HUGE, b"415"),
    (b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + HUGE, b"404"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + HUGE, b"200"),        # answered before its body
])
def test_an_early_answer_closes_the_connection_though_the_client_keeps_sending(serve, request_head, status):
    _, _, port = serve
    c = socket.create_connection(("127.0.0.1", port))
    try:
        c.sendall(request_head + b"\r\n{")
        head = head_of_answer(c)
        assert head.split(b" ")[1] == status, head
        assert b"connection: close" in head.lower()
        c.sendall(b"x")                                   # one more byte, then silence
        assert closed_within(c, 30)
    finally:
        c.close()


@pytest.mark.parametrize("request_head", [
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + HUGE + b"\r\n{",
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (20 << 10),          # 431, headers unfinished
])
def test_a_client_still_sending_after_an_early_answer_can_read_the_whole_answer(serve, request_head):
    """A lingering close: the server drops what the client goes on sending (the rest of a refused
    body) instead of resetting the connection, which could destroy the answer unread."""
    _, _, port = serve
    c = socket.create_connection(("127.0.0.1", port))
    try:
        c.sendall(request_head)
        data = head_of_answer(c)
        time.sleep(0.3)                                   # the server has answered and closed its side
        for _ in range(4):
            c.sendall(b"x" * (64 << 10))                  # a reset would make these fail
            time.sleep(0.05)
        c.settimeout(30)
        while chunk := c.recv(65536):                     # the rest of the answer, then the FIN
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        assert len(body) == length and json.loads(body)["error"]["code"] in ("body_too_large", "headers_too_large")
    finally:
        c.close()


def test_early_answered_connections_hold_no_descriptors(serve):
    proc, url, port = serve
    before = sockets_of(proc.pid)
    conns = []
    for _ in range(100):
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  + HUGE + b"\r\n{")
        conns.append(c)
    for c in conns:
        head_of_answer(c)
        c.sendall(b"x")
    try:
        assert wait_for(lambda: sockets_of(proc.pid) <= before + 2, 30), sockets_of(proc.pid) - before
        assert httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        for c in conns:
            c.close()


def test_headers_over_16_kib_are_431_and_closed(serve):
    _, url, port = serve
    for pieces in (1, 40):                                  # all at once, or trickled without an end
        c = socket.create_connection(("127.0.0.1", port))
        try:
            head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (20 << 10) + b"\r\n\r\n"
            if pieces > 1:
                head = head[:-4]
            step = len(head) // pieces + 1
            for i in range(0, len(head), step):
                c.sendall(head[i:i + step])
            answer = head_of_answer(c)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
            assert b"connection: close" in answer.lower() and b"headers_too_large" in answer
            assert closed_within(c, 30)
        finally:
            c.close()
    r = httpx.get(url + "/health", headers={"x-fine": "a" * (12 << 10)}, timeout=10)     # 12 KiB: fine
    assert r.status_code == 200


@pytest.mark.parametrize("raw, why", [
    (b"GET /health HTTP/1.1\r\n\r\n", "Missing mandatory Host: header"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", "bad Content-Length"),
    (b"GARBAGE\r\n\r\n", "illegal request line: 'GARBAGE'"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n",
     "Transfer-Encoding: chunked"),
    # a request whose body a proxy going by Content-Length and one going by chunked tell apart
    # (smuggling): read as chunked, and the request after it on the connection answered as well
    (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 4\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n21\r\n" + b'{"prompt": "hi", "max_tokens": 1}' + b"\r\n0\r\n\r\n"
     b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "both Transfer-Encoding and Content-Length"),
    # a first line that is no request line is answered once it has arrived, not at the header
    # timeout (h11 reads a request only once its headers are all here; these never come)
    (b"GET /\r\n", "the request line 'GET /' has no HTTP version (HTTP/0.9 is not served"),
    (b"GARBAGE\r\n", "illegal request line: 'GARBAGE'"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n", "illegal request line"),   # TLS to the plain port
    # a request target that is neither a path nor an absolute http(s) URI with a host
    (b"GET v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "'v1/models' is neither a path (/v1/...) nor"),
    (b"GET http:/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "'http:/v1/models' is neither a path"),
    (b"GET ftp://127.0.0.1/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "no http or https URI (its scheme is ftp)"),
    (b"GET http:///v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "'http:///v1/models' has no valid host"),
    (b"GET http://me@127.0.0.1/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "has a user name in its authority"),
])
def test_bytes_that_are_not_http_get_an_openai_400_saying_why_and_are_closed(serve, raw, why):
    _, url, port = serve
    c = socket.create_connection(("127.0.0.1", port))
    try:
        c.sendall(raw)
        answer = head_of_answer(c)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head.lower(), answer[:300]
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            body += c.recv(65536)
        error = json.loads(body)["error"]
        assert error["code"] == "invalid_http_request" and why in error["message"], error
        assert "bytearray" not in error["message"]
        assert closed_within(c, 30)
    finally:
        c.close()
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def exchange(port: int, raw: bytes) -> tuple[bytes, bytes]:
    """Send `raw` (a request that asks for `Connection: close` or is HTTP/1.0) and read the whole
    answer: (head, body)."""
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(raw)
        c.settimeout(60)
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def test_an_absolute_form_request_target_is_served_by_its_path_and_host(serve):
    """RFC 9112 3.2.2: a server MUST accept an absolute-form target (`GET http://host:port/path`,
    as a client sends it to a proxy, and proxies pass it on); it was a 404 for the path
    '/http://...'. The target's host is the request's host, its Host header ignored, so
    --allowed-hosts judges the target's."""
    _, url, port = serve
    head, body = exchange(port, f"GET http://127.0.0.1:{port}/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                "Connection: close\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 200 "), head + body[:300]
    assert json.loads(body)["data"][0]["id"] == httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    completion = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    for target, host in ((f"HTTP://LOCALHOST:{port}/v1/completions?x=1", b"elsewhere.example"),    # the Host is ignored
                         (f"http://127.0.0.1:{port}/v1/completions", None)):                        # HTTP/1.0, no Host
        raw = (f"POST {target} HTTP/1.{0 if host is None else 1}\r\n".encode()
               + (b"" if host is None else b"Host: " + host + b"\r\n")
               + b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(completion)
               + completion)
        head, body = exchange(port, raw)
        assert head.startswith(b"HTTP/1.1 200 "), (target, head + body[:300])
        assert json.loads(body)["usage"]["completion_tokens"] == 2
    head, body = exchange(port, b"GET http://127.0.0.1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ") and b"GET /: Not Found" in body, head + body   # an empty path is /
    head, body = exchange(port, f"GET http://attacker.example:{port}/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                "Connection: close\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 400 ") and json.loads(body)["error"]["code"] == "invalid_host", head + body


def chunked(body: bytes, size: int) -> bytes:
    """A POST to /v1/completions whose body is sent in chunks of `size` bytes."""
    pieces = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size))
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + pieces + b"0\r\n\r\n")


def test_a_chunked_body_in_thousands_of_tiny_chunks_is_a_400_and_in_larger_ones_is_read(serve):
    """h11 reads each chunk in Python: a body of 1-byte chunks (20,000 here) held the event loop,
    and every other request, for seconds, and was answered. Past 4,096 chunks beyond one per KiB
    it is refused; the same body in chunks of 1 KiB is read."""
    _, url, port = serve
    body = (json.dumps({"prompt": "hi", "max_tokens": 1})[:-1] + " " * 20_000 + "}").encode()   # padded with spaces
    answers = []
    for size in (1, 1024):
        c = socket.create_connection(("127.0.0.1", port))
        with c:
            c.sendall(chunked(body, size))
            c.settimeout(60)
            answer = b""
            while chunk := c.recv(65536):
                answer += chunk
        answers.append(answer)
    tiny, larger = answers
    assert tiny.startswith(b"HTTP/1.1 400 "), tiny[:300]
    error = json.loads(tiny.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "invalid_http_request" and "more than 4096 beyond one per 1024 bytes" in error["message"]
    assert larger.startswith(b"HTTP/1.1 200 "), larger[:300]
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_one_large_chunk_that_arrives_in_many_small_reads_is_one_chunk():
    """The chunk limit counts the chunks a client sent, not the reads they arrived in: one 6 MB
    chunk read 500 bytes at a time (12,000 of h11's Data events) is one chunk and is read, where
    it was refused as "came in 8005 chunks"."""
    conn = ClosingConnection(h11.SERVER)
    size = 6_000_000
    conn.receive_data(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + b"%x\r\n" % size)
    assert isinstance(conn.next_event(), h11.Request)
    read = 0
    for _ in range(size // 500):
        conn.receive_data(b"a" * 500)
        while (event := conn.next_event()) is not h11.NEED_DATA:
            read += len(event.data)
    conn.receive_data(b"\r\n0\r\n\r\n")
    while (event := conn.next_event()) is not h11.NEED_DATA and not isinstance(event, h11.EndOfMessage):
        read += len(event.data)
    assert isinstance(event, h11.EndOfMessage) and read == size
    assert conn.chunks == 1 and conn.protocol_error is None


def test_each_request_on_a_kept_alive_connection_has_its_own_chunk_count(serve):
    """Two requests on one connection, each in 3,000 one-byte chunks (under the bound for its
    size): both are read, the second's chunks not counted on top of the first's."""
    _, url, port = serve
    body = (json.dumps({"prompt": "hi", "max_tokens": 1})[:-1] + " " * 2_950 + "}").encode()   # padded with spaces
    one = chunked(body, 1).replace(b"Connection: close\r\n", b"")
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.settimeout(60)
        for _ in range(2):
            c.sendall(one)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += c.recv(65536)
            head, _, rest = answer.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(rest) < length:
                rest += c.recv(65536)
            assert head.startswith(b"HTTP/1.1 200 "), answer[:300]


class _Transport:
    """What a protocol needs of an asyncio transport, recording how it was closed."""

    def __init__(self):
        self.aborted = self.closed = False
        self.buffered = 0                   # bytes written that wait in asyncio's buffer

    def get_extra_info(self, name, default=None):
        return default

    def get_write_buffer_size(self):
        return self.buffered

    def is_closing(self):
        return self.aborted or self.closed

    def abort(self):
        self.aborted = True

    def close(self):
        self.closed = True

    def write(self, data):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


class _Clock:
    """An event loop whose timers (call_later) run on a clock the test moves: a timer fires at
    `advance`, never because the machine was slow; everything else is the real loop's."""

    class Timer:
        def __init__(self, when, fn, args):
            self.when, self.fn, self.args, self.cancelled = when, fn, args, False

        def cancel(self):
            self.cancelled = True

    def __init__(self, loop):
        self.loop, self.now, self.timers = loop, 0.0, []

    def time(self) -> float:
        return self.now

    def call_later(self, delay, fn, *args, context=None):
        self.timers.append(timer := self.Timer(self.now + delay, fn, args))
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = sorted((t for t in self.timers if t.when <= self.now), key=lambda t: t.when)
        self.timers = [t for t in self.timers if t.when > self.now]
        for t in due:
            if not t.cancelled:
                t.fn(*t.args)

    def __getattr__(self, name):
        return getattr(self.loop, name)


def test_a_client_that_reads_none_of_its_answer_is_cut_after_the_send_timeout():
    """Where the transport shows no TCP socket to ask what its client took (TCP_INFO), the
    socket's buffer full (pause_writing) for --send-timeout: the connection is cut, and the app
    hears a disconnect; a client that drains it in time keeps its connection."""
    loop = asyncio.new_event_loop()
    clock = _Clock(loop)
    try:
        config = uvicorn.Config(app=lambda scope, receive, send: None, log_level="warning")
        cls = agp_protocol(header_timeout=10, send_timeout=0.2)
        stalled, slow = _Transport(), _Transport()
        protos = {}
        for t in (stalled, slow):
            protos[t] = cls(config=config, server_state=ServerState(), app_state={}, _loop=clock)
            protos[t].connection_made(t)
            protos[t].pause_writing()
        clock.advance(0.1)
        protos[slow].resume_writing()                     # drained half way through the timeout
        assert not stalled.aborted and not slow.aborted
        clock.advance(0.5)
        assert stalled.aborted and not slow.aborted and not slow.closed
    finally:
        loop.close()



async def _endless_stream(scope, receive, send):
    """An answer far longer than a client's receive buffer and the server's send buffer hold."""
    _endless_stream.watches.append(scope["extensions"][SEND_WATCH])
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b"data: x\n\n" * (1 << 20), "more_body": True})
    while (await receive())["type"] != "http.disconnect":     # the client's going ends it
        pass


def _stalls_told(reads_until: float, seconds: float, step: float = 0.05) -> tuple[float | None, list[float]]:
    """A GET answered by `_endless_stream` through agp_protocol (send_timeout 30: a client that
    takes nothing for a second stalls) on a real loopback TCP connection, whose timers run on a
    clock moved `step` at a time; its client reads 256 KiB (what its receive buffer holds, and
    what more comes as it reads) every half second until `reads_until`, then nothing. (Its buffer
    is Linux's default: one under 64 KiB has no window scaling, and loopback's MSS of 64 KiB rounds
    its window down to 0 even once read, until the server's next zero-window probe; nor does a
    read of less than 64 KiB open a window on loopback.) (when the request first heard its client stall, when the
    client read)."""
    loop = asyncio.new_event_loop()
    clock = _Clock(loop)
    config = uvicorn.Config(app=_endless_stream, log_level="warning")
    config.load()
    _endless_stream.watches = []
    cls = agp_protocol(header_timeout=10, send_timeout=30)
    server = loop.run_until_complete(loop.create_server(
        lambda: cls(config=config, server_state=ServerState(), app_state={}, _loop=clock), "127.0.0.1", 0))
    c = socket.socket()
    try:
        c.connect(server.sockets[0].getsockname())
        c.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        c.setblocking(False)
        loop.run_until_complete(asyncio.sleep(0.3))       # the answer fills the client's buffer and the server's
        watch, = _endless_stream.watches
        stalled_at, reads = None, []
        for i in range(1, round(seconds / step) + 1):
            if i * step <= reads_until and i % round(0.5 / step) == 0:
                got = 0
                with contextlib.suppress(BlockingIOError):
                    while got < 256 << 10:
                        got += len(c.recv((256 << 10) - got))
                assert got > 0
                reads.append(clock.now)
                loop.run_until_complete(asyncio.sleep(0.02))   # its window opens: more is sent, and taken
            clock.advance(step)
            if watch.stalled and stalled_at is None:
                stalled_at = clock.now
        return stalled_at, reads
    finally:
        c.close()                                         # the answer's end (_endless_stream)
        loop.run_until_complete(asyncio.sleep(0.1))
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


def test_a_client_that_stops_reading_is_told_stalled_a_second_after_its_last_read():
    """The request hears that its client stalls (SEND_WATCH) a second after the client took its
    last byte, the time of that byte known to a quarter of a second: the server's buffers are
    still filling then (a CPU engine writes some 600 tokens of 150 bytes a second). (Before: the
    connection was looked at once a second and the stall told two looks after the look that last
    saw bytes taken, the first look a second after the answer began: 3 s into a stream whose
    client read once, at 0.5 s; a 2,000-token stream was generated to its end for a client that
    read none of it.)"""
    stalled_at, reads = _stalls_told(reads_until=0.5, seconds=5)
    assert reads == [pytest.approx(0.45)]
    assert stalled_at is not None and reads[-1] + 1.0 <= stalled_at <= reads[-1] + 1.0 + 2 * 0.25 + 0.05


def test_a_client_that_reads_slowly_but_steadily_is_never_told_stalled():
    """A client that reads every half second, however little its buffer holds, takes bytes at each
    read: in 6 s it is never told stalled; once it stops reading it is."""
    stalled_at, reads = _stalls_told(reads_until=6, seconds=8)
    assert len(reads) == 12
    assert stalled_at is not None and reads[-1] < stalled_at <= reads[-1] + 1.0 + 2 * 0.25 + 0.05


class _FarSocket:
    """A TCP socket whose TCP_INFO says: a round trip of `rtt` seconds, bytes waiting, none of
    them acknowledged since the connection opened."""
    family = socket.AF_INET

    def __init__(self, rtt: float):
        self.rtt = rtt

    def setsockopt(self, *args):
        pass

    def getsockname(self):
        return ("127.0.0.1", 8000)

    def getpeername(self):
        return ("10.0.0.2", 50000)

    def getsockopt(self, level, option, size):
        info = bytearray(TCP_INFO_BYTES)
        struct.pack_into("=I", info, 24, 3)                        # tcpi_unacked
        struct.pack_into("=I", info, 68, round(self.rtt * 1e6))    # tcpi_rtt
        return bytes(info)


class _FarTransport(_Transport):
    def __init__(self, rtt: float):
        super().__init__()
        self.sock = _FarSocket(rtt)

    def get_extra_info(self, name, default=None):
        return self.sock if name == "socket" else default

    def get_write_buffer_size(self):
        return 0

    def can_write_eof(self):
        return True


@pytest.mark.parametrize("rtt", [0.0001, 0.5])
def test_a_client_far_away_is_given_four_round_trips_before_it_is_told_stalled(rtt):
    """What is written to a client a round trip away is acknowledged a round trip later at best:
    a stall is told after a second without a byte taken, or after four round trips where those
    are longer (a client 500 ms away: 2 s)."""
    loop = asyncio.new_event_loop()
    clock = _Clock(loop)
    try:
        config = uvicorn.Config(app=_endless_stream, log_level="warning")
        config.load()
        _endless_stream.watches = []
        proto = agp_protocol(header_timeout=10, send_timeout=30)(
            config=config, server_state=ServerState(), app_state={}, _loop=clock)
        proto.connection_made(_FarTransport(rtt))
        proto.data_received(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        loop.run_until_complete(asyncio.sleep(0.05))        # the app writes its answer
        watch, = _endless_stream.watches
        stalled_at = None
        for _ in range(60):
            clock.advance(0.05)
            if watch.stalled and stalled_at is None:
                stalled_at = clock.now
        want = max(1.0, 4 * rtt)
        assert stalled_at is not None and want <= stalled_at <= want + 0.25 + 0.05
    finally:
        if "proto" in locals():
            proto.connection_lost(None)                   # the answer's end (_endless_stream)
            loop.run_until_complete(asyncio.sleep(0.05))
        loop.close()


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _answered_connection(clock, keep_alive_timeout, header_timeout=10):
    """A connection of agp_protocol on the clock that has answered one request and now sits idle:
    (protocol, transport, served) where served() counts the requests answered on it."""
    config = uvicorn.Config(app=_ok, log_level="warning")
    config.load()
    state = ServerState()
    t = _Transport()
    proto = agp_protocol(header_timeout=header_timeout, keep_alive_timeout=keep_alive_timeout)(
        config=config, server_state=state, app_state={}, _loop=clock)
    proto.connection_made(t)

    def serve_one():
        before = state.total_requests
        proto.data_received(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        clock.loop.run_until_complete(asyncio.sleep(0.05))     # the app answers (real loop)
        assert state.total_requests == before + 1 and not t.is_closing()
    serve_one()
    return proto, t, serve_one


@pytest.mark.parametrize("drains", [False, True])
def test_a_stop_closes_an_idle_connection_at_once_and_one_whose_answer_waits_once_sent_or_its_client_stalls(drains):
    """A stop (uvicorn's shutdown) closes an idle connection with nothing left to write at once
    (abort: close() waits on TLS for a close_notify an idle client never sends); one whose last
    answer's end still waits in asyncio's buffer, under the mark that pauses writing, is closed to
    go once sent, and cut once its client has taken none of it for a second (close() alone waited
    on a client that reads nothing: the stop waited out uvicorn's 5 s, with an ERROR)."""
    loop = asyncio.new_event_loop()
    clock = _Clock(loop)
    try:
        proto, t, _ = _answered_connection(clock, 75.0)
        proto.shutdown()
        assert t.aborted                                    # idle: at once
        proto, t, _ = _answered_connection(clock, 75.0)
        t.buffered = 1000
        proto.shutdown()
        assert t.closed and not t.aborted                   # its bytes may still go
        clock.advance(0.5)
        if drains:
            t.buffered = 0                                  # the client read them: asyncio closes it
            proto.connection_lost(None)
        clock.advance(1.0)
        assert t.aborted is not drains
        if not drains:
            return
        proto, t, _ = _answered_connection(clock, 75.0)     # over TLS, the close waits on the client
        t.buffered = 1000
        proto.shutdown()
        clock.advance(0.5)
        t.buffered = 0                                      # all sent, but no connection_lost
        clock.advance(0.5)
        assert t.aborted
    finally:
        loop.close()


@pytest.mark.parametrize("keep_alive", [75.0, 8.0])
def test_an_idle_connection_stays_open_for_the_keep_alive_timeout_then_is_closed(keep_alive):
    """uvicorn closed a connection idle for 5 s, as long as httpx (the openai client) keeps one
    pooled: a request sent on it as the server closed it failed ("Server disconnected"). Idle
    past the old 5 s, short of --keep-alive-timeout, it still serves a request; idle for the
    whole timeout, it is closed."""
    loop = asyncio.new_event_loop()
    clock = _Clock(loop)
    try:
        proto, t, serve_one = _answered_connection(clock, keep_alive)
        clock.advance(keep_alive - 1)                      # past the old 5 s
        assert not t.is_closing()
        serve_one()                                        # the same connection, reused
        clock.advance(keep_alive - 0.5)                    # its idle time starts again at each answer
        assert not t.is_closing()
        clock.advance(1)
        assert t.closed
    finally:
        loop.close()


def test_the_next_request_on_a_kept_connection_has_the_header_timeout():
    """A client idle for a while that then sends part of a request's headers and stops is closed
    after --header-timeout from its first byte, not left until --keep-alive-timeout."""
    loop = asyncio.new_event_loop()
    clock = _Clock(loop)
    try:
        proto, t, _ = _answered_connection(clock, keep_alive_timeout=75, header_timeout=2)
        clock.advance(30)
        proto.data_received(b"GET /health HTTP/1.1\r\nHo")    # and no more
        clock.advance(1.5)
        assert not t.is_closing()
        clock.advance(1)
        assert t.closed
    finally:
        loop.close()


def served_on(c: socket.socket) -> None:
    """GET /health on the kept-alive connection `c`: a 200 that keeps it, read whole (the next
    answer starts clean)."""
    c.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, _, body = head_of_answer(c).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in head.lower(), head
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += c.recv(65536)


class KeepAliveProbe:
    """Two connections to the module's `agp serve --keep-alive-timeout 8` side by side, each
    answered once as the server came up; then, on a thread of their own (so that their seconds
    of waiting pass while the module's other tests run), one serves its second request after
    5.1 s idle (IDLE_S), and the other, idle since its first answer, is then closed. `check` waits for
    the thread and raises what failed."""

    def __init__(self, port: int):
        self.error: BaseException | None = None
        self.left_closed = False
        self.reused, self.left = (socket.create_connection(("127.0.0.1", port)) for _ in range(2))
        self.thread = threading.Thread(target=self._idle, daemon=True)
        try:
            served_on(self.left)
            served_on(self.reused)
        except Exception as e:                                 # told by the test of keep-alive
            self.error = e
            self._close()
        else:
            self.thread.start()

    def _idle(self) -> None:
        try:
            time.sleep(IDLE_S)                                 # past the old 5 s, within --keep-alive-timeout
            served_on(self.reused)
            self.left_closed = closed_within(self.left, 30)   # idle since its answer: closed at 8 s
        except Exception as e:
            self.error = e
        finally:
            self._close()

    def _close(self) -> None:
        self.reused.close()
        self.left.close()

    def check(self) -> None:
        if self.thread.is_alive():
            self.thread.join(60)
        if self.error is not None:
            raise self.error
        assert self.left_closed, "the connection left idle was not closed"


def test_agp_serve_keeps_an_idle_connection_for_its_keep_alive_timeout(serving):
    """Through `agp serve --keep-alive-timeout 8` (the fixture): a connection idle past uvicorn's
    5 s serves the next request (uvicorn had closed it: the request found the connection closed);
    left idle, the server closes it. Two connections side by side, so that one wait shows both:
    one serves its second request after 5.1 s idle, and the other, idle since its first answer,
    is then closed (the idle time counted again from each answer: the test on the protocol above).
    The probe began as the module's server came up, its wait passing while the other tests ran."""
    serving[3].check()
