"""ASGI middleware in front of every route: who may come in.

`Guard` answers before any route runs: 401 without a valid API key (whatever the request
accepts, a stream included), 400 for a Host header the server does not answer for (DNS
rebinding), 503 + Retry-After from the drain's start on (a signal: every new request but the
probes, which say "draining" themselves, and /metrics and /stats, through which the drain is
watched; as under --ray) and beyond --max-connections requests served at once. A refused
generation request (POST to one of COUNTED_PATHS) is counted in the metrics by its status, as
the routes count theirs: a client with a wrong key shows as 401s on the dashboard.
"""
from __future__ import annotations

import hmac

from . import protocol as P
from .config import COUNTED_PATHS, OPEN_PATHS, PROBES, WATCHED, ServeConfig
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
        self.active = 0
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
        token = token.strip().encode()
        return scheme.lower() == "bearer" and any(hmac.compare_digest(token, key.encode())
                                                   for key in self.config.api_keys)

    def draining(self) -> bool:
        """Whether the pipeline stopped admitting for the drain (not because it failed: a failed
        server still answers its other routes, /metrics and /stats among them)."""
        return self.apipe is not None and not self.apipe.accepting and self.apipe.error is None

    def refusal(self, scope) -> P.APIError | None:
        """Why this request may not come in, or None."""
        if not self.key_ok(scope):
            return P.APIError("a valid API key is required: send it as 'Authorization: Bearer KEY'", status=401,
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not self.host_ok(scope):
            return P.APIError("the Host header names a host this server does not answer for (see --allowed-hosts)",
                              status=400, code="invalid_host")
        if self.draining() and route_path(scope) not in PROBES + WATCHED:
            return shutting_down(self.config.retry_after_s)
        if self.active >= self.config.max_connections:
            return P.APIError(f"the server is serving {self.active} requests, its limit (--max-connections); "
                              "retry later", status=503, type="server_error", code="overloaded",
                              headers={"Retry-After": str(self.config.retry_after_s)})
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        current_request.set(f"{scope.get('method', '')} {route_path(scope)}")
        refusal = self.refusal(scope)
        if refusal is not None:
            if self.metrics is not None and scope.get("method") == "POST" and route_path(scope) in COUNTED_PATHS:
                self.metrics.requests.labels(str(refusal.status)).inc()
            return await send_error(send, refusal)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
