"""What a hostile or broken HTTP client gets from `agp serve`, and what the clients beside it see
meanwhile: each probe's answer, and the success and latency of a steady stream of normal requests
(another process, two threads of `max_tokens` 8 completions on pooled connections) while it ran.

    python bench/hostile_transport.py PIPELINE.agp                  # starts agp serve itself
    python bench/hostile_transport.py PIPELINE.agp --only chunk --only NaN
    python bench/hostile_transport.py --url http://127.0.0.1:8000  # a server already running

The server it starts gets short limits (--header-timeout 3, --body-timeout 3, --send-timeout 3:
the slow probes then take seconds, not minutes) unless `--server-args` says otherwise. The probes:
slow headers (slowloris), huge and many headers, a huge URL, a body slower than --body-min-rate,
a Content-Length longer than the body, chunked bodies (a huge chunk size, 1-byte chunks, chunk
extensions, trailers, a bad chunk), Content-Length and Transfer-Encoding together (smuggling),
obfuscated Transfer-Encodings, gzip and deflate bombs, Expect: 100-continue, HTTP/1.0 and 0.9,
pipelined requests, half-closed sockets, an SSE stream never read, invalid UTF-8 in the request
line, headers and body, NaN and Infinity, deeply nested JSON, logit_bias and metadata of 10^5 to
10^6 entries, upgrades, and thousands of connections that send nothing (`--idle`; under a low
open-files limit, `ulimit -n 2048` before starting, they pass it). Each line: the probe, what it
got (the status codes, whether the server closed the connection, how long it took), and the
normal stream meanwhile. The bar: no 5xx, the server alive, and every normal request answered
200 without a stall. A server started here has its tracebacks and ERROR lines counted at the end.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import Server  # noqa: E402
HOST = b"Host: 127.0.0.1\r\n"

LOAD = r"""
import sys, threading, time, httpx
url, out = sys.argv[1], open(sys.argv[2], "a", buffering=1)
def run():
    with httpx.Client(timeout=60) as c:
        while True:
            t = time.time()
            try:
                body = {"prompt": "hi", "max_tokens": 8, "ignore_eos": True}
                what = c.post(url + "/v1/completions", json=body).status_code
            except Exception as e:
                what = type(e).__name__
            out.write(f"{t} {time.time() - t} {what}\n")
            time.sleep(0.05)
for _ in range(2):
    threading.Thread(target=run, daemon=True).start()
time.sleep(1e9)
"""


class Load:
    """Normal requests from another process (so that building a probe's payload here stalls none
    of them): (start, latency, status or error) a line in a file."""

    def __init__(self, url: str, path: Path):
        self.path = path
        path.write_text("")
        self.proc = subprocess.Popen([sys.executable, "-c", LOAD, url, str(path)])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()

    def window(self, t0: float, t1: float) -> str:
        rows = []
        for line in self.path.read_text().splitlines():
            t, latency, what = line.split()
            if t0 <= float(t) <= t1:
                rows.append((float(latency), what))
        ok = [latency for latency, what in rows if what == "200"]
        bad = [what for _, what in rows if what != "200"]
        if not ok:
            return f"0/{len(rows)} ok" + (f", {bad[:5]}" if bad else "")
        return (f"{len(ok)}/{len(rows)} ok, p50 {statistics.median(ok) * 1e3:.0f} ms, max {max(ok) * 1e3:.0f} ms"
                + (f", {bad[:5]}" if bad else ""))


class Probes:
    def __init__(self, url: str, header_timeout: float, send_timeout: float):
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.header_timeout, self.send_timeout = header_timeout, send_timeout

    # ---- raw sockets ----------------------------------------------------------------------
    def conn(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port))

    @staticmethod
    def read_all(c: socket.socket, wait: float) -> tuple[bytes, str]:
        """(what the server sent within `wait`, 'closed', 'reset' or 'open')."""
        c.settimeout(wait)
        data, deadline = b"", time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                chunk = c.recv(65536)
                if not chunk:
                    return data, "closed"
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            return data, "reset"
        except socket.timeout:
            pass
        return data, "open"

    def raw(self, data: bytes, wait: float = 10.0, after=None) -> str:
        """Send `data` (then `after(socket)`); the status codes answered, how the connection ended,
        how long it took and the start of the last answer's body."""
        c = self.conn()
        t = time.perf_counter()
        try:
            c.sendall(data)
            if after:
                after(c)
            got, how = self.read_all(c, wait)
        except OSError as e:
            return f"send failed: {type(e).__name__}"
        finally:
            c.close()
        codes = [m.decode() for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", got)]
        body = got.rpartition(b"\r\n\r\n")[2][:100]
        return f"{','.join(codes) or 'nothing'} {how} {time.perf_counter() - t:.1f}s {body!r}"

    @staticmethod
    def post(body: bytes, extra: bytes = b"", ctype: bytes = b"application/json") -> bytes:
        return (b"POST /v1/completions HTTP/1.1\r\n" + HOST + b"Content-Type: " + ctype + b"\r\n" + extra
                + b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    @staticmethod
    def chunked_head(extra: bytes = b"") -> bytes:
        return (b"POST /v1/completions HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n" + extra
                + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")

    def api(self, route: str, body) -> str:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            r = httpx.post(self.url + route, content=data, headers={"content-type": "application/json"}, timeout=120)
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"
        return f"{r.status_code} {len(r.content)} B {r.text[:100]}"

    # ---- probes that take more than one call --------------------------------------------
    def slowloris(self, n: int = 200, every: float = 2.0) -> str:
        socks = []
        for _ in range(n):
            c = self.conn()
            c.sendall(b"GET /health HTTP/1.1\r\n")
            socks.append(c)
        t, closed = time.perf_counter(), 0
        while socks and time.perf_counter() - t < 4 * self.header_timeout + 10:
            time.sleep(every)
            for c in list(socks):
                try:
                    c.sendall(b"X")
                except OSError:
                    closed += 1
                    socks.remove(c)
                    c.close()
        for c in socks:
            c.close()
        return f"{closed}/{n} closed by the server within {time.perf_counter() - t:.0f}s"

    def slow_body(self) -> str:
        body = json.dumps({"prompt": "hi there " * 20, "max_tokens": 2}).encode()
        c = self.conn()
        c.sendall(self.post(body)[:-len(body)])
        t, got = time.perf_counter(), b""
        c.settimeout(1.5)
        for byte in body:                         # a byte every 1.5 s
            try:
                c.sendall(bytes([byte]))
                got = c.recv(4096)
                break
            except socket.timeout:
                continue
            except OSError:
                break
        c.close()
        codes = re.findall(rb"HTTP/1\.[01] (\d{3}) ", got)
        return f"{b','.join(codes).decode() or 'nothing'} after {time.perf_counter() - t:.0f}s"

    def short_body_then_close(self) -> str:
        c = self.conn()
        c.sendall(b"POST /v1/completions HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\"")
        time.sleep(0.2)
        c.close()
        return "sent 10 of 100 bytes, closed"

    def expect_100(self, length: int | None = None) -> str:
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        c = self.conn()
        c.sendall(b"POST /v1/completions HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nConnection: close\r\nContent-Length: "
                  + str(length or len(body)).encode() + b"\r\n\r\n")
        c.settimeout(3)
        try:
            first, how = c.recv(4096), "open"         # 100 Continue, or the refusal
        except socket.timeout:
            first, how = b"", "open"
        if length is None:
            c.sendall(body)
        rest, how = self.read_all(c, 10)
        first += rest
        c.close()
        codes = [m.decode() for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", first)]
        return f"{','.join(codes) or 'nothing'} {how}"

    def tiny_chunks(self, n: int) -> str:
        body = (json.dumps({"prompt": "hi", "max_tokens": 1})[:-1] + " " * n + "}").encode()   # padded with spaces
        wire = b"".join(b"1\r\n" + body[i:i + 1] + b"\r\n" for i in range(len(body))) + b"0\r\n\r\n"
        return self.raw(self.chunked_head() + wire, wait=120)

    def chunked_stream(self, megabytes: int) -> str:
        def send(c):
            try:
                for _ in range(megabytes * 16):
                    c.sendall(b"x" * (64 << 10))
            except OSError:
                pass
        return self.raw(self.chunked_head() + b"7fffffffffffffff\r\n", after=send)

    def half_closed(self, data: bytes) -> str:
        return self.raw(data, after=lambda c: c.shutdown(socket.SHUT_WR))

    def sse_never_read(self) -> str:
        c = self.conn()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.sendall(self.post(json.dumps({"prompt": "hi", "max_tokens": 100_000, "ignore_eos": True,
                                        "stream": True}).encode()))
        t = time.perf_counter()
        time.sleep(3 * self.send_timeout + 3)
        _, how = self.read_all(c, 2)
        c.close()
        return f"{how} after {time.perf_counter() - t:.0f}s unread"

    def idle(self, n: int) -> str:
        socks, error = [], ""
        for _ in range(n):
            try:
                socks.append(self.conn())
            except OSError as e:
                error = f" ({type(e).__name__} after {len(socks)})"
                break
        try:
            normal = httpx.get(self.url + "/health", timeout=10).status_code
        except httpx.HTTPError as e:
            normal = type(e).__name__
        time.sleep(self.header_timeout + 2)
        closed = 0
        for c in socks:
            c.setblocking(False)
            try:
                closed += c.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
            c.close()
        return f"{len(socks)} opened{error}; a new client meanwhile: {normal}; {closed} closed by the server"

    # ---- the list -------------------------------------------------------------------------
    def all(self, idle: list[int]) -> dict:
        post, chunked, raw, api = self.post, self.chunked_head, self.raw, self.api
        small = b'{"prompt": "hi", "max_tokens": 2}'
        nested = json.loads("[" * 900 + "]" * 900)
        probes = {
            "slowloris, 200 connections": self.slowloris,
            "64 KiB header": lambda: raw(b"GET /health HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * (64 << 10)
                                         + b"\r\n\r\n"),
            "3,000 headers (< 16 KiB)": lambda: raw(b"GET /health HTTP/1.1\r\n" + HOST + b"a:b\r\n" * 3000
                                                    + b"Connection: close\r\n\r\n"),
            "1 MiB URL": lambda: raw(b"GET /health?" + b"a" * (1 << 20) + b" HTTP/1.1\r\n" + HOST + b"\r\n"),
            "10 KB method": lambda: raw(b"G" * 10_000 + b" /health HTTP/1.1\r\n" + HOST + b"\r\n"),
            "body at 1 byte / 1.5 s": self.slow_body,
            "Content-Length > body, close": self.short_body_then_close,
            "chunk size 2^63, stalls": lambda: raw(chunked() + b"fffffffffffffff\r\n" + b"{" * 1000),
            "chunk size 2^63, 5 MiB sent": lambda: self.chunked_stream(5),
            "chunk size of 200 digits": lambda: raw(chunked() + b"f" * 200 + b"\r\n"),
            "1-byte chunks, 400 KB": lambda: self.tiny_chunks(400_000),
            "1-byte chunks, 4 MB": lambda: self.tiny_chunks(4_000_000),
            "chunk extension 100 KB": lambda: raw(chunked() + b"1;" + b"a" * 100_000 + b"\r\n{\r\n0\r\n\r\n"),
            "trailer 1 MB": lambda: raw(chunked() + b"2\r\n{}\r\n0\r\nX-T: " + b"a" * 1_000_000 + b"\r\n\r\n"),
            "bad chunk mid-body": lambda: raw(chunked() + b"2\r\n{}\r\nzz\r\n"),
            "CL + TE (smuggling)": lambda: raw(chunked(b"Content-Length: 4\r\n").replace(b"Connection: close\r\n", b"")
                                                + b"21\r\n" + small + b"\r\n0\r\n\r\n"
                                                + b"GET /smuggled HTTP/1.1\r\n" + HOST + b"\r\n"),
            "two Content-Lengths": lambda: raw(b"POST /v1/completions HTTP/1.1\r\n" + HOST + b"Content-Type: "
                                               b"application/json\r\nContent-Length: 2\r\nContent-Length: 33\r\n\r\n"
                                               + small),
            "Content-Length: +33": lambda: raw(post(small).replace(b"Content-Length: 33", b"Content-Length: +33")),
            "Transfer-Encoding: xchunked": lambda: raw(chunked().replace(b"chunked", b"xchunked") + b"0\r\n\r\n"),
            "Transfer-Encoding : chunked": lambda: raw(chunked().replace(b"Encoding:", b"Encoding :")
                                                       + b"0\r\n\r\n"),
            "Transfer-Encoding: gzip, chunked": lambda: raw(chunked().replace(b"chunked", b"gzip, chunked")
                                                            + b"0\r\n\r\n"),
            "gzip bomb, 200 MiB": lambda: raw(post(gzip.compress(b"[" + b" " * (200 << 20) + b"]"),
                                                   b"Content-Encoding: gzip\r\n")),
            "deflate bomb, 200 MiB": lambda: raw(post(zlib.compress(b" " * (200 << 20)),
                                                      b"Content-Encoding: deflate\r\n")),
            "Expect: 100-continue": self.expect_100,
            "Expect: 100-continue, 10 GB": lambda: self.expect_100(10 << 30),
            "HTTP/1.0, no Host": lambda: raw(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                                             b"Content-Length: 33\r\n\r\n" + small),
            "HTTP/0.9": lambda: raw(b"GET /health\r\n"),
            "HTTP/2 preface": lambda: raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            "4 pipelined on one connection": lambda: raw(post(small).replace(b"Connection: close\r\n", b"") * 3
                                                         + post(small)),
            "half-closed after a GET": lambda: self.half_closed(b"GET /health HTTP/1.1\r\n" + HOST + b"\r\n"),
            "half-closed after a POST": lambda: self.half_closed(post(small)),
            "SSE stream never read": self.sse_never_read,
            "obs-fold header": lambda: raw(b"GET /health HTTP/1.1\r\n" + HOST + b"X-A: b\r\n c\r\n"
                                           b"Connection: close\r\n\r\n"),
            "NUL in a header": lambda: raw(b"GET /health HTTP/1.1\r\n" + HOST + b"X-A: a\x00b\r\n\r\n"),
            "bare LF line ends": lambda: raw(b"GET /health HTTP/1.1\n" + HOST.replace(b"\r", b"")
                                             + b"Connection: close\n\n"),
            "absolute-form target": lambda: raw(b"GET http://elsewhere.example/health HTTP/1.1\r\n" + HOST
                                                + b"Connection: close\r\n\r\n"),
            "CONNECT": lambda: raw(b"CONNECT elsewhere.example:443 HTTP/1.1\r\n" + HOST + b"\r\n"),
            "Upgrade: websocket": lambda: raw(b"GET /v1/completions HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\n"
                                              b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                                              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"),
            "invalid UTF-8 in the path": lambda: raw(b"GET /v1/\xff\xfe HTTP/1.1\r\n" + HOST + b"\r\n"),
            "invalid UTF-8, %-escaped path": lambda: raw(b"GET /v1/%ff%fe HTTP/1.1\r\n" + HOST + b"\r\n"),
            "invalid UTF-8 in a header": lambda: raw(b"GET /health HTTP/1.1\r\n" + HOST + b"X-Tenant: \xff\xfe\r\n"
                                                     b"Connection: close\r\n\r\n"),
            "invalid UTF-8 in the JSON": lambda: raw(post(b'{"prompt": "\xff\xfe", "max_tokens": 2}')),
            "duplicate keys": lambda: api("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "max_tokens": 1e9}'),
            "NaN temperature": lambda: api("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}'),
            "1e999 max_tokens": lambda: api("/v1/completions", b'{"prompt": "hi", "max_tokens": 1e999}'),
            "Responses, NaN in metadata": lambda: api("/v1/responses", b'{"input": "hi", "max_output_tokens": 2, '
                                                                       b'"metadata": {"a": NaN}}'),
            "Responses, Infinity in tools": lambda: api("/v1/responses", b'{"input": "hi", "max_output_tokens": 2, '
                                                                         b'"tools": [{"type": "function", "name": "f", '
                                                                         b'"parameters": {"maximum": Infinity}}]}'),
            "content nested 900 deep": lambda: api("/v1/chat/completions", {
                "messages": [{"role": "user", "content": nested}], "max_tokens": 2}),
            "content nested 60 deep": lambda: api("/v1/chat/completions", {
                "messages": [{"role": "user", "content": json.loads("[" * 60 + "]" * 60)}], "max_tokens": 2}),
            "stop nested 60 deep": lambda: api("/v1/completions", {"prompt": "hi", "max_tokens": 2,
                                                                   "stop": json.loads("[" * 60 + "]" * 60)}),
            "logit_bias, 10^6 keys": lambda: api("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {
                str(i): 1 for i in range(1_000_000)}}),
            "logit_bias, 300,000 keys": lambda: api("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {
                str(i): 1 for i in range(300_000)}}),
            "metadata, 3 MB string": lambda: api("/v1/chat/completions", {
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "metadata": {"a": "x" * (3 << 20)}}),
            "Responses metadata, 200,000 keys": lambda: api("/v1/responses", {
                "input": "hi", "max_output_tokens": 2, "metadata": {f"k{i}": "v" for i in range(200_000)}}),
        }
        for n in idle:
            probes[f"{n} idle connections"] = lambda n=n: self.idle(n)
        return probes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline", nargs="?", help="the .agp file (or model) to serve; not with --url")
    ap.add_argument("--url", help="a server already running (its limits: --header-timeout, --send-timeout)")
    ap.add_argument("--server-args", default="--header-timeout 3 --body-timeout 3 --send-timeout 3",
                    help="flags of the agp serve started here")
    ap.add_argument("--header-timeout", type=float, default=None, help="the server's (default: from --server-args)")
    ap.add_argument("--send-timeout", type=float, default=None, help="the server's (default: from --server-args)")
    ap.add_argument("--idle", type=int, action="append", default=None,
                    help="also open this many connections that send nothing (repeat it for several)")
    ap.add_argument("--only", action="append", default=None,
                    help="run only the probes whose name holds this text (repeat it for several)")
    args = ap.parse_args()
    if bool(args.pipeline) == bool(args.url):
        ap.error("give a pipeline to serve, or --url")

    def flag(name: str, default: float) -> float:
        words = args.server_args.split() if not args.url else []
        return float(words[words.index(name) + 1]) if name in words else default
    header_timeout = args.header_timeout or flag("--header-timeout", 10.0)
    send_timeout = args.send_timeout or flag("--send-timeout", 30.0)
    tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
    server = None
    url = args.url
    if not url:
        try:
            server = Server(args.pipeline, "--no-access-log", *args.server_args.split())
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        url = server.url
    load = Load(url, tmp / "load.txt")
    bad = 0
    try:
        time.sleep(5)
        now = time.time()
        print(f"{'(normal requests alone)':<34} {'':<70} {load.window(now - 5, now)}", flush=True)
        for name, probe in Probes(url, header_timeout, send_timeout).all(args.idle or []).items():
            if args.only and not any(text in name for text in args.only):
                continue
            t0 = time.time()
            try:
                got = str(probe())
            except Exception as e:                    # noqa: BLE001 - a probe's own failure is a result
                got = f"the probe raised {type(e).__name__}: {e}"
            time.sleep(0.5)
            normal = load.window(t0, time.time())
            died = server is not None and server.proc.poll() is not None
            bad += died or bool(re.match(r"(\S*,)?5\d\d\b", got))
            print(f"{name:<34} {got[:70]:<70} {normal}{'  SERVER DIED' if died else ''}", flush=True)
            if died:
                break
    finally:
        load.stop()
        if server is not None:
            server.terminate(60)
    if server is not None:
        log = server.output(whole=True)
        print(f"server log: {log.count('Traceback')} tracebacks, {log.count(' ERROR ')} ERROR lines")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
