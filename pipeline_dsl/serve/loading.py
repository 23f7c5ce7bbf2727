"""What `agp serve` answers while its model loads: 503, not silence.

    with Loading(sock):          # sock: bound and listening (pipeline_dsl.commands.serve)
        serving = build(args)    # seconds to minutes
    server.run(sockets=[sock])   # uvicorn takes the same socket

The port is held from the start; without an answer, a probe made during the load waits until
its own timeout. `Loading` answers every request on the socket, as llama.cpp's server does:
`/health` (and `/ping`) `503 {"status": "loading"}`, anything else an OpenAI error object
(`code: loading`); each with `Retry-After`, `Connection: close` and `X-Request-Id` (the client's
own, as serve/access.py keeps it, else a new one). It serves a duplicate of
the socket on its own thread and event loop, so closing it leaves the socket listening and the
connections not yet accepted waiting for uvicorn.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import uuid

from .config import CLIENT_ID, PROBES     # light modules: the port answers before the app's imports
from .logs import endpoint

log = logging.getLogger("agp.serve")

HEAD_LIMIT = 16 << 10          # request line and headers (as serve/server.py's limit)
READ_TIMEOUT_S = 5.0           # a client that sends no request line is closed after this


def request_id(head: bytes) -> str:
    """The request's X-Request-Id when the client sends a usable one, else a new id."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-request-id":
            given = value.strip().decode("latin-1")
            return given if CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
    return uuid.uuid4().hex


LOADING_RETRY_AFTER_S = 5     # the Retry-After while the model loads, unless --retry-after-s says


def answer(head: bytes, retry_after_s: int) -> bytes:
    """The 503 for one request's line and headers (`GET /health HTTP/1.1\r\nHost: …`)."""
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
    if path.rstrip("/") in PROBES:
        body = {"status": "loading"}
    else:
        body = {"error": {"message": "the server is loading its model; retry later", "type": "server_error",
                          "param": None, "code": "loading"}}
    data = json.dumps(body).encode()
    start = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
             f"content-length: {len(data)}\r\nretry-after: {retry_after_s}\r\nconnection: close\r\n"
             f"x-request-id: {request_id(head)}\r\n\r\n")
    return start.encode() + (b"" if method == "HEAD" else data)


class Loading:
    """Answers 503 on `sock` while in use (see the module docstring)."""

    def __init__(self, sock: socket.socket, retry_after_s: int = LOADING_RETRY_AFTER_S):
        self.sock, self.retry_after_s = sock, retry_after_s
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="agp-loading", daemon=True)
        self.server = None
        self.answered = 0

    def __enter__(self) -> "Loading":
        self.thread.start()
        self.ready.wait()
        host, port = self.sock.getsockname()[:2]
        log.info("listening on %s; loading the pipeline (requests get 503 until it is up)", endpoint(host, port))
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self._stop)
        self.thread.join()
        self.loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        # a duplicate: the server closes it when it stops, the listening socket stays
        dup = self.sock.dup()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, sock=dup, limit=HEAD_LIMIT))
        self.ready.set()
        self.loop.run_forever()
        # until none is left: a connection accepted as the server closed starts its task while the
        # others are cancelled (left pending, asyncio logs "Task was destroyed but it is pending")
        while tasks := asyncio.all_tasks(self.loop):
            for t in tasks:
                t.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

    def _stop(self) -> None:
        self.server.close()
        self.loop.stop()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            self.answered += 1                     # before the write: its client may read it at once
            writer.write(answer(head, self.retry_after_s))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass                                   # a client that sent no whole request: closed
        except asyncio.CancelledError:             # still reading its head when the app took over: closed
            pass                                   # (ended, not cancelled: asyncio's stream callback logs a
                                                   # cancelled client task's CancelledError as a traceback)
        finally:
            writer.close()
