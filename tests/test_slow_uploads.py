"""Clients that trickle their request bodies cost the others nothing (serve/guard.py,
serve/body.py): a body still arriving holds no --max-connections slot, the bytes such bodies
hold are bounded all together (--max-body-bytes-arriving: 503 + Retry-After past it), and a
body slower than --body-min-rate after its --body-timeout grace, or one that pauses longer than
--body-timeout, is a 408 — while an upload that is slow but steady arrives whole. Probed with
raw sockets sending partial bodies to an `agp serve` app on the tiny model."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from test_connections import wait_for
from test_serve import LiveServer

BODY = b'{"prompt": "hi", "max_tokens": 1}'
WAIT_S = 60.0          # how long the server may take to notice what the probes sent (the state is asserted)


def body(size: int) -> bytes:
    """A completion request of exactly `size` bytes (trailing spaces are JSON's whitespace)."""
    return BODY + b" " * (size - len(BODY))


def upload(port: int, size: int, first: int) -> socket.socket:
    """A connection that sent its request's headers and the first `first` bytes of a `size`-byte body."""
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % size + body(size)[:first])
    return c


def answer(c: socket.socket) -> tuple[int, dict, bytes]:
    """The status, headers and body of the one answer on `c`."""
    c.settimeout(WAIT_S)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(65536)
        assert chunk, f"closed without an answer: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    while len(rest) < int(headers.get("content-length", 0)):
        chunk = c.recv(65536)
        assert chunk, "closed in the middle of the answer"
        rest += chunk
    return int(lines[0].split()[1]), headers, rest


def arriving(s: LiveServer, bodies: int, nbytes: int | None = None) -> bool:
    return s.metric("agp_http_bodies_arriving") == bodies and \
        (nbytes is None or s.metric("agp_http_body_bytes_arriving") == nbytes)


@pytest.fixture(scope="module")
def patient(tiny_gguf):
    """A server whose request bodies may take 600 s (--body-timeout) and that has 2 connection
    slots (--max-connections), shared by the tests of bodies still arriving; each waits until no
    body of another test's is arriving."""
    s = LiveServer(tiny_gguf, header_timeout=30, max_connections=2, body_timeout_s=600)
    yield s
    s.close()


@pytest.fixture(scope="module")
def strict(tiny_gguf):
    """A server that answers 408 to a body that pauses 0.5 s (--body-timeout) or, that grace
    past, arrives slower than 1000 bytes/s (--body-min-rate), shared by the tests of those."""
    s = LiveServer(tiny_gguf, header_timeout=30, body_timeout_s=0.5, body_min_rate=1000)
    yield s
    s.close()


def test_uploads_still_arriving_hold_no_connection_slot(patient):
    # 12 slow uploaders, 2 slots: each held a slot until its body timed out, and a fast request got 503
    s = patient
    assert wait_for(lambda: arriving(s, 0, 0), WAIT_S)
    slow = []
    try:
        slow = [upload(s.port, 200, 10) for _ in range(12)]
        assert wait_for(lambda: arriving(s, 12), WAIT_S)
        r = httpx.post(s.url + "/v1/completions", content=BODY, headers={"content-type": "application/json"},
                       timeout=WAIT_S)
        assert r.status_code == 200, r.text
        assert httpx.get(s.url + "/health", timeout=WAIT_S).status_code == 200
        for c in slow[:3]:                         # an upload that completes is served as any request
            c.sendall(body(200)[10:])
            status, _, text = answer(c)
            assert status == 200 and json.loads(text)["choices"], text
        assert wait_for(lambda: arriving(s, 9), WAIT_S)
    finally:
        for c in slow:
            c.close()


def test_the_bytes_of_bodies_arriving_are_bounded_all_together(tiny_gguf):
    s = LiveServer(tiny_gguf, header_timeout=30, body_timeout_s=600, max_body_bytes_arriving=4096)
    a = b = None
    try:
        a = upload(s.port, 8000, 3000)
        assert wait_for(lambda: arriving(s, 1, 3000), WAIT_S)
        b = upload(s.port, 8000, 3000)             # 6000 bytes arriving: past the server's 4096
        status, headers, text = answer(b)
        assert status == 503 and headers["retry-after"] == "1", (status, headers)
        err = json.loads(text)["error"]
        assert err["code"] == "overloaded" and "--max-body-bytes-arriving" in err["message"], err
        assert wait_for(lambda: arriving(s, 1, 3000), WAIT_S)     # b's bytes are freed, a's kept
        assert s.metric("agp_http_requests_total", '{handler="/v1/completions",status="503"}') == 1
        assert s.metric("agp_requests_total", '{status="503"}') == 1
        a.sendall(body(8000)[3000:])               # the body within the budget arrives whole
        status, _, text = answer(a)
        assert status == 200, text
        assert wait_for(lambda: arriving(s, 0, 0), WAIT_S)
    finally:
        for c in (a, b):
            if c is not None:
                c.close()
        s.close()


def test_a_slow_but_steady_upload_outlasts_the_body_timeout(tiny_gguf):
    # 1,000 bytes/s, ten times --body-min-rate, for one and a half --body-timeout: a 408 at 1 s before
    s = LiveServer(tiny_gguf, header_timeout=30, body_timeout_s=1.0, body_min_rate=100)
    c = None
    try:
        size, step = 1500, 100
        c = upload(s.port, size, 0)
        data = body(size)
        for i in range(0, size, step):
            time.sleep(0.1)
            c.sendall(data[i:i + step])
        status, _, text = answer(c)
        assert status == 200, text
    finally:
        if c is not None:
            c.close()
        s.close()


def trickle(c: socket.socket, piece: bytes, pause_s: float) -> tuple[int, dict, bytes]:
    """Send `piece` every `pause_s` until the server answers; the answer."""
    c.settimeout(pause_s)
    while True:
        try:
            c.sendall(piece)
        except OSError:                            # closed after its answer: read it
            break
        try:
            if c.recv(1, socket.MSG_PEEK):
                break
        except socket.timeout:
            continue
    return answer(c)


def test_a_body_slower_than_the_minimum_rate_is_a_408_and_counted(strict):
    s = strict
    c = None
    try:
        http_408 = s.metric("agp_http_requests_total", '{handler="/v1/completions",status="408"}', default=0.0)
        requests_408 = s.metric("agp_requests_total", '{status="408"}', default=0.0)
        c = upload(s.port, 100000, 10)
        status, _, text = trickle(c, b" ", 0.05)   # ~20 bytes/s
        err = json.loads(text)["error"]
        assert status == 408 and err["code"] == "body_timeout", text
        assert "slower than 1000 bytes/s (--body-min-rate)" in err["message"], err
        assert s.metric("agp_http_requests_total", '{handler="/v1/completions",status="408"}') == http_408 + 1
        assert s.metric("agp_requests_total", '{status="408"}') == requests_408 + 1
        assert httpx.post(s.url + "/v1/completions", content=BODY, headers={"content-type": "application/json"},
                          timeout=WAIT_S).status_code == 200
    finally:
        if c is not None:
            c.close()


def test_a_body_that_pauses_longer_than_the_body_timeout_is_a_408(strict):
    # 5,000 bytes at 1,000 bytes/s buy 5 s, ten times --body-timeout; the pause after them is
    # bounded by --body-timeout still
    s = strict
    c = None
    try:
        c = upload(s.port, 10000, 5000)
        status, _, text = answer(c)
        err = json.loads(text)["error"]
        assert status == 408 and "no byte of the request body arrived for 0.5 s" in err["message"], err
    finally:
        if c is not None:
            c.close()


def test_a_compressed_body_still_arriving_holds_its_bytes_as_sent_not_decoded(patient):
    # each body inflated piece by piece as it came: 3 KB sent held 3 MiB decoded per upload,
    # outside --max-body-bytes-arriving (10 uploads: 30 MiB, which the budget counted as 30 KB;
    # twice the 16 MiB bound, as few bytes sent as held fall far under it)
    import gzip
    import tracemalloc

    s = patient
    assert wait_for(lambda: arriving(s, 0, 0), WAIT_S)
    socks = []
    data = gzip.compress(BODY + b" " * (3 << 20))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            c = socket.create_connection(("127.0.0.1", s.port))
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(data) + data[:-8])
            socks.append(c)
        assert wait_for(lambda: arriving(s, 10, 10 * (len(data) - 8)), WAIT_S)
        held = tracemalloc.get_traced_memory()[0] - before
        assert held < 16 << 20, f"{held >> 20} MiB held by 10 bodies of {len(data)} bytes still arriving"
        socks[0].sendall(data[-8:])                # a body complete is decoded whole
        status, _, text = answer(socks[0])
        assert status == 200, text
    finally:
        tracemalloc.stop()
        for c in socks:
            c.close()
