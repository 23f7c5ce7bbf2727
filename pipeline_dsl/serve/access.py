"""ASGI middleware around every request: its root path, its id and its access-log line.

- The root path (--root-path /llm): a request to /llm/v1/models and one to /v1/models reach
  the same route (a proxy may pass the prefix on or strip it); the path is logged as the client
  sent it.
- The request id: the client's `X-Request-Id` header, else (a generation request) the body's
  `request_id`, else a new one; every answer carries it back as `X-Request-Id`, and the ids of
  generation answers end with it (`chatcmpl-<id>`), as vLLM's do.
- Every request counted by route (`agp_http_requests_total{handler,method,status}` and its
  duration histogram): the handler is the path template of the route that answered
  (`/v1/responses/{response_id}`), "none" where no route did, so a scan of random paths adds
  no series.
- One access-log line per request once its answer is sent (logger `agp.access`; uvicorn's own
  access log is off): client, method, path, status, latency and request id; a stream whose
  client went before its end is logged 499 (as the metrics count it), not the 200 it began with.
  Paths given to --disable-access-log-for-endpoints (vLLM's flag: /health,/metrics,/ping polled
  by probes and scrapers every few seconds) write no line when answered below 400; a failing
  probe (a 503 while draining) is still logged.
"""
from __future__ import annotations

import logging
import time
import uuid

from starlette.routing import Match

from .config import CLIENT_ID
from .errors import current_info
from .guard import header
from .logs import endpoint

access_log = logging.getLogger("agp.access")
# the methods the metrics name; any other word a client sends is counted as "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestInfo:
    """What the routes may learn or set about the request being served (scope["agp.request"])."""

    __slots__ = ("id", "given", "started", "cut")

    def __init__(self, given: str | None):
        self.given = given is not None                 # the client named it (X-Request-Id)
        self.id = given or uuid.uuid4().hex
        self.started = time.perf_counter()
        self.cut = False                               # the client went before the answer's end (logged 499)

    def adopt(self, request_id: str | None) -> str:
        """The body's request_id becomes the id unless the header already named one."""
        if request_id and not self.given:
            self.id = request_id
        return self.id


def request_info(scope) -> RequestInfo:
    info = scope.get("agp.request")
    if info is None:                                   # an app run without Access in front (tests)
        info = scope["agp.request"] = RequestInfo(None)
    return info


def client_of(scope) -> str:
    """The client as the logs name it: HOST:PORT ([::1]:50412 for an IPv6 client), or "-"."""
    client = scope.get("client")
    return endpoint(*client[:2]) if client else "-"


class Access:
    def __init__(self, app, root_path: str = "", quiet: tuple[str, ...] = (), metrics=None, routes=()):
        self.app, self.root = app, root_path.rstrip("/")
        self.quiet = frozenset(p.rstrip("/") or "/" for p in quiet)
        self.metrics, self.routes = metrics, routes

    def handler(self, scope, path: str) -> str:
        """The path template of the route the request reached (its method aside), or "none":
        the router notes the route it matched in the scope; a 405 (path matched, method not)
        is found among the routes, matched on `path` (the root path taken off)."""
        route = scope.get("route")
        if getattr(route, "path", None):
            return route.path
        scope = {**scope, "path": path}
        for route in self.routes:
            if getattr(route, "path", None) and route.matches(scope)[0] != Match.NONE:
                return route.path
        return "none"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = self.root if self.root and (path == self.root or path.startswith(self.root + "/")) else ""
        given = header(scope, b"x-request-id")
        info = RequestInfo(given if CLIENT_ID.fullmatch(given) else None)
        scope = {**scope, "root_path": root, "agp.request": info}
        current_info.set(info)
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", info.id.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            code = 499 if info.cut else status[0]
            if self.metrics is not None:
                method = scope.get("method", "")
                self.metrics.observe_http(self.handler(scope, path[len(root):] or "/"),
                                          method if method in METHODS else "other", code,
                                          time.perf_counter() - info.started)
            if code >= 400 or not self.quiet or (path[len(root):] or "/") not in self.quiet:
                self._log(scope, code, info)

    @staticmethod
    def _log(scope, status: int, info: RequestInfo) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        who = client_of(scope)
        raw = scope.get("raw_path") or scope.get("path", "").encode()
        path = raw.decode("latin-1") + (f"?{scope['query_string'].decode('latin-1')}"
                                        if scope.get("query_string") else "")
        method, version = scope.get("method", ""), scope.get("http_version", "1.1")
        ms = round((time.perf_counter() - info.started) * 1000, 1)
        access_log.info('%s "%s %s HTTP/%s" %d %.1fms id=%s', who, method, path, version, status, ms, info.id,
                        extra={"client": who, "method": method, "path": path, "status": status,
                               "latency_ms": ms, "request_id": info.id})
