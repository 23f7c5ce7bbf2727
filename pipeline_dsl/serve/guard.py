"""ASGI middleware in front of every route: who may come in.

`Guard` answers before any route runs: 401 without a valid API key (`Authorization: Bearer KEY`,
or Azure's `api-key: KEY`; whatever the request accepts, a stream included), 400 for a Host
header the server does not answer for (DNS rebinding), 503 + Retry-After from the drain's start
on (a signal: every new request but the probes, which say "draining" themselves, and /metrics and
/stats, through which the drain is watched; as under --ray) and beyond --max-connections requests
served at once. A refused generation request (POST to one of COUNTED_PATHS, or an Azure route of
theirs: config.counted) is counted in the metrics by its status, as the routes count theirs: a
client with a wrong key shows as 401s on the dashboard.

A request holds one of the --max-connections slots only once its body is complete (a request
without a body: at once), as nginx's limit_conn counts a request only once it is read: a client
trickling its body is bounded by the body's own limits instead (serve/body.py: --body-timeout
and --body-min-rate), so a thousand slow uploaders cannot take the slots a fast request needs.
The bytes bodies still arriving hold, all together, are bounded by --max-body-bytes-arriving:
the request whose next piece would pass it gets a 503 with Retry-After (the bytes it held are
freed at once), so memory stays bounded however many clients trickle. A body that completes
when every slot is taken gets the same 503 as a request refused on arrival.
"""
from __future__ import annotations

import hmac

from . import protocol as P
from .config import OPEN_PATHS, PROBES, WATCHED, ServeConfig, counted
from .errors import current_request, send_error


def header(scope, name: bytes) -> str:
    """A request header's value ('' when absent)."""
    return next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == name), "")


def route_path(scope) -> str:
    """The request's path below the root path (serve/access.py sets it from --root-path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def shutting_down(retry_after_s: int) -> P.APIError:
    """The 503 of a request that arrives while the server drains (here and under --ray)."""
    return P.APIError("the server is shutting down; retry on another", status=503, type="server_error",
                      code="unavailable", headers={"Retry-After": str(retry_after_s)})


class Guard:
    def __init__(self, app, config: ServeConfig, metrics=None, apipe=None):
        self.app, self.config, self.metrics, self.apipe = app, config, metrics, apipe
        self.active = 0                  # requests served (their body complete): --max-connections
        self.arriving = 0                # requests whose body is still arriving
        self.arriving_bytes = 0          # the bytes those bodies hold so far: --max-body-bytes-arriving
        hosts = [h.lower() for h in config.allowed_hosts]
        self.any_host = "*" in hosts
        self.hosts = set(hosts)

    def host_ok(self, scope) -> bool:
        """Whether the Host header names this server. A request without one (HTTP/1.0 lets a
        client leave it out: HAProxy's default health check, old probes; HTTP/1.1 requires it and
        h11 refuses a request without it) is no DNS-rebinding attempt: a browser always names the
        host it thinks it talks to."""
        if self.any_host:
            return True
        name = header(scope, b"host").lower()
        if not name:
            return True
        if name.startswith("["):                       # [::1]:8000
            name = name[:name.find("]") + 1]
        elif name.count(":") == 1:
            name = name.rsplit(":", 1)[0]
        return name in self.hosts or name.strip("[]") in self.hosts

    def key_ok(self, scope) -> bool:
        if not self.config.api_keys:
            return True
        if route_path(scope) in OPEN_PATHS or scope.get("method") == "OPTIONS":
            return True
        scheme, _, token = header(scope, b"authorization").partition(" ")
        # the key as OpenAI's clients send it (Authorization: Bearer KEY), or as Azure OpenAI's do
        # (api-key: KEY, openai.AzureOpenAI's header): either one valid lets the request in
        given = [token.strip()] if scheme.lower() == "bearer" else []
        given += [azure.strip()] if (azure := header(scope, b"api-key")) else []
        return any(hmac.compare_digest(one.encode(), key.encode()) for one in given for key in self.config.api_keys)

    def draining(self) -> bool:
        """Whether the pipeline stopped admitting for the drain (not because it failed: a failed
        server still answers its other routes, /metrics and /stats among them)."""
        return self.apipe is not None and not self.apipe.accepting and self.apipe.error is None

    def overloaded(self) -> P.APIError | None:
        """The 503 of a request beyond --max-connections, or None."""
        if self.active < self.config.max_connections:
            return None
        return P.APIError(f"the server is serving {self.active} requests, its limit (--max-connections); "
                          "retry later", status=503, type="server_error", code="overloaded",
                          headers={"Retry-After": str(self.config.retry_after_s)})

    def refusal(self, scope, body: bool = False) -> P.APIError | None:
        """Why this request may not come in, or None (a request with a `body` is counted against
        --max-connections once the body is complete, not now)."""
        if not self.key_ok(scope):
            return P.APIError("a valid API key is required: send it as 'Authorization: Bearer KEY' (or 'api-key: KEY', "
                              "as Azure OpenAI's clients do)", status=401,
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not self.host_ok(scope):
            return P.APIError("the Host header names a host this server does not answer for (see --allowed-hosts)",
                              status=400, code="invalid_host")
        if self.draining() and route_path(scope) not in PROBES + WATCHED:
            return shutting_down(self.config.retry_after_s)
        return None if body else self.overloaded()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        current_request.set(f"{scope.get('method', '')} {route_path(scope)}")
        body = has_body(scope)
        refusal = self.refusal(scope, body)
        if refusal is not None:
            if self.metrics is not None and scope.get("method") == "POST" and counted(route_path(scope)):
                self.metrics.requests.labels(str(refusal.status)).inc()
            return await send_error(send, refusal)
        if not body:
            self.active += 1
            try:
                return await self.app(scope, receive, send)
            finally:
                self.active -= 1
        arrival = Arrival(self, receive)
        try:
            await self.app(scope, arrival.receive, send)
        finally:
            arrival.end()

    def show(self) -> None:
        if self.metrics is not None:
            self.metrics.bodies_arriving.set(self.arriving)
            self.metrics.body_bytes_arriving.set(self.arriving_bytes)


def has_body(scope) -> bool:
    """Whether the request says a body follows (a Content-Length above 0, or chunked)."""
    length = header(scope, b"content-length").strip()
    return bool(header(scope, b"transfer-encoding")) or length not in ("", "0")


class Arrival:
    """One request with a body, from its headers on: its body's bytes count in the guard's
    arriving total until the last piece comes; then it takes a --max-connections slot (or is
    refused a 503, raised from `receive` to the route reading the body), held until it ends."""

    def __init__(self, guard: Guard, receive):
        self.guard, self.inner = guard, receive
        self.held, self.state = 0, "arriving"          # arriving -> served (a slot held) -> done; or -> done
        guard.arriving += 1
        guard.show()

    def _leave(self, state: str) -> None:
        g = self.guard
        g.arriving -= 1
        g.arriving_bytes -= self.held
        self.held, self.state = 0, state
        g.show()

    async def receive(self):
        message = await self.inner()
        if self.state != "arriving" or message["type"] != "http.request":
            return message
        g = self.guard
        if message.get("more_body", False):
            n = len(message.get("body", b""))
            self.held += n
            g.arriving_bytes += n
            if g.arriving_bytes > g.config.max_body_bytes_arriving:
                self._leave("done")
                raise P.APIError(f"the request bodies still arriving hold {g.config.max_body_bytes_arriving} bytes, "
                                 "the server's limit (--max-body-bytes-arriving); retry later", status=503,
                                 type="server_error", code="overloaded",
                                 headers={"Retry-After": str(g.config.retry_after_s)})
            g.show()
            return message
        self._leave("done")                            # complete: it needs a slot now
        refusal = g.overloaded()
        if refusal is not None:
            raise refusal
        g.active += 1
        self.state = "served"
        return message

    def end(self) -> None:
        if self.state == "arriving":
            self._leave("done")
        elif self.state == "served":
            self.guard.active -= 1
            self.state = "done"
