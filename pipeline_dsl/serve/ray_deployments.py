"""The deployments of `agp serve --ray` (serve/ray.py assembles them from the flags):

- `AgpPipeline`, the replicas: each builds the app `agp serve` builds for the same flags
  (`build(args)`: the same routes, limits and metrics) and runs it in its process, with its
  lifespan: the pipeline starts with the replica and drains when Serve stops it (Serve
  first lets the requests in flight finish, up to --drain-timeout). Every answer carries
  `x-agp-replica`, the id of the replica that served it.
- `AgpIngress`, behind Ray's HTTP proxy: refuses what one process refuses before the app
  (headers past 16 KiB: 431, a body past --max-body-bytes: 413, late: 408 by --body-timeout
  and --body-min-rate, past --max-body-bytes-arriving: 503; docs/scale.md says what Ray's
  proxy bounds and what it does not), reads a request's body, takes its prompt's first
  --affinity-chars characters as a routing key and calls `AgpPipeline` through a deployment
  handle, streaming the replica's ASGI messages back. A request whose replica fails before
  its answer started is sent again (to another replica); a stream already started ends with
  an error event. `x-agp-attempts` says how many times it was sent. GET /metrics it answers
  itself, for every replica (serve/ray_metrics.py). Draining (`drain`, at SIGTERM) it answers
  new requests 503 + Retry-After while those in flight finish; those the drain timeout leaves
  it fails as one process does (`cut`), letting go of their replicas; then the application goes.
- `AgpMetrics` (serve/ray_metrics.py) keeps each replica's latest metrics.

`PrefixAffinityRouter`, the handle's request router, sends a request with a key to the
replica that ranks highest for the key by rendezvous hashing (every ingress replica agrees
without shared state; a replica that comes or goes moves only its own keys), unless that
replica has `imbalance` more requests in flight than the least busy one; then, and for
requests without a key, the better of two random replicas. Replica counts and autoscaling
are Serve's own (`num_replicas`, `autoscaling_config` on the requests in flight per replica).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from . import protocol as P
from .body import BodyClock, decoded
from .config import PROBES, RETRY_AFTER_S, WATCHED, ServeConfig
from .guard import header, shutting_down
from .metrics import exposition
from .server import MAX_HEADER_BYTES
from .ray_metrics import PUSH_S, merged

log = logging.getLogger("agp.serve")
REPLICA_HEADER = b"x-agp-replica"
ATTEMPTS_HEADER = b"x-agp-attempts"
ATTEMPTS = 3                      # sends of a request whose answer has not started
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path",
              "query_string", "headers", "server", "client")


# ---------------------------------------------------------------- routing

def affinity_key(body: bytes, chars: int, encoding: str | None = None, limit: int = ServeConfig.max_body_bytes
                 ) -> str | None:
    """The first `chars` characters of a request's prompt (completions: the first prompt; token
    ids as numbers) or of its messages (chat: each one's role and text, in order); None when
    the body has neither (it is then routed by load alone). `encoding`: the request's
    Content-Encoding (a gzip or deflate body is read as the replica reads it, decoded to at most
    `limit` bytes; one it refuses has no key)."""
    if chars <= 0:
        return None
    try:
        obj = json.loads(decoded(body, encoding, limit))
    except (ValueError, RecursionError, P.APIError):    # nested too deeply too: the replica's 400 says so
        return None
    if not isinstance(obj, dict):
        return None
    obj = P.whole_numbers(obj)                   # token ids 5.0 are 5, as the replica reads them
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]                       # a batch: the first prompt
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list):
        text = " ".join(map(str, prompt))
    elif isinstance(messages, list):
        text = "".join(f"{m.get('role')}\n{_content(m.get('content'))}\n" for m in messages if isinstance(m, dict))
    else:
        return None
    return text[:chars] or None


def _content(content) -> str:
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


def rank(key: str, replica_ids: list[str]) -> list[str]:
    """Replica ids best first for `key` (rendezvous hashing)."""
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return sorted(replica_ids, reverse=True,
                  key=lambda rid: hashlib.blake2b(digest + rid.encode(), digest_size=8).digest())


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: prefix-cache affinity, power of two choices when imbalanced."""

    def initialize_state(self, imbalance: int = 8):
        self.imbalance = imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        spread = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        if pending_request is None:
            return [spread]
        pending_request.routing_context.should_backoff = True   # all full: wait before asking again
        key = pending_request.kwargs.get("affinity")
        if not key or len(candidate_replicas) < 2:
            return [spread]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        best = by_id[rank(key, list(by_id))[0]]
        loads = [self.replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas]
        known = [n for n in loads if n is not None]
        busy = self.replica_queue_len_cache.get(best.replica_id)
        if busy is not None and busy - min(known) > self.imbalance:
            return [spread]
        return [[best], spread]               # the preferred one while it has room, else the two


# ---------------------------------------------------------------- deployments

@serve.deployment(name="AgpPipeline")
class AgpPipeline:
    """One replica: the app of `agp serve` for these flags, in this process; its lifespan (the
    pipeline's start, and its drain) runs with the replica's."""

    async def __init__(self, options: dict, hub=None):
        from .build import build
        from .logs import configure

        args = argparse.Namespace(**options)
        configure(args.log_format, args.log_level, args.access_log)
        self.serving = await asyncio.to_thread(build, args)
        self.replica = serve.get_replica_context().replica_id.unique_id.encode()
        self.actor = ray.get_runtime_context().current_actor     # the hub asks Ray whether it lives
        self.lifespan = self.serving.app.router.lifespan_context(self.serving.app)
        await self.lifespan.__aenter__()
        self.hub = hub
        self.pusher = asyncio.ensure_future(self._push()) if hub is not None else None

    async def _push(self) -> None:
        """This replica's metrics to the AgpMetrics deployment, every PUSH_S seconds."""
        from .routes import pipeline_stats

        known = False                           # whether the hub holds this replica's actor handle
        while True:
            try:
                body, _ = self.serving.metrics.render(await pipeline_stats(self.serving.app.state))
                known = await self.hub.put.remote(self.replica.decode(), body.decode(), None if known else self.actor)
            except Exception as e:              # noqa: BLE001 - the next push tries again
                log.debug("metrics push failed: %s", e)
            await asyncio.sleep(PUSH_S)

    async def __del__(self):
        """Serve stops the replica (after its requests finished, or the drain timeout)."""
        if getattr(self, "pusher", None) is not None:
            self.pusher.cancel()
            # a hub that lives (a scale down) forgets this replica at once; not waited for: when the
            # application goes the hub goes with it, and the call waited for it 2 s of every stop. A
            # hub that misses it forgets the replica at its next scrape (its actor dead: ray_metrics.py)
            try:
                self.hub.drop.remote(self.replica.decode())
            except Exception:                   # noqa: BLE001 - as above
                pass
        if hasattr(self, "lifespan"):
            await self.lifespan.__aexit__(None, None, None)

    async def asgi(self, scope: dict, body: bytes, affinity: str | None = None):
        """Serve one HTTP request whose body is `body`: yields lists of the ASGI messages the app
        sends. Cancelled (the client went away): the app sees a disconnect and aborts.
        `affinity` is the routing key, for the router."""
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        read = False

        async def receive():
            nonlocal read
            if not read:
                read = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER, self.replica)]}
            out.put_nowait(message)

        app = asyncio.ensure_future(self.serving.app(dict(scope), receive, send))
        app.add_done_callback(lambda _: out.put_nowait(None))
        try:
            while True:
                batch = [await out.get()]
                while not out.empty():
                    batch.append(out.get_nowait())
                if batch[-1] is None:
                    if batch[:-1]:
                        yield batch[:-1]
                    break
                yield batch
            app.result()
        finally:
            gone.set()
            if not app.done():
                await asyncio.wait({app}, timeout=5)
                app.cancel()


@serve.deployment(name="AgpIngress", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class AgpIngress:
    """Behind Ray's HTTP proxy: every request to an `AgpPipeline` replica, with its routing key."""

    def __init__(self, pipeline, affinity_chars: int, max_body_bytes: int, body_timeout_s: float, hub=None,
                 root_path: str = "", retry_after_s: int = RETRY_AFTER_S, body_min_rate: float = 0.0,
                 max_body_bytes_arriving: int | None = None):
        self.pipeline = pipeline.options(stream=True)
        self.chars, self.limit, self.body_timeout_s = affinity_chars, max_body_bytes, body_timeout_s
        self.body_min_rate = body_min_rate
        self.arriving_limit = max_body_bytes_arriving
        self.hub, self.root, self.retry_after_s = hub, root_path.rstrip("/"), retry_after_s
        self.draining = False
        self.active = 0                          # requests being forwarded now
        # each forward (`cut` cancels it) -> the task of its request (which answers the cut)
        self.forwarding: dict[asyncio.Task, asyncio.Task] = {}
        self.cut_by: str | None = None           # why the forwards were cut (`cut`)
        self.arriving = 0                        # the bytes of the bodies still arriving, all together

    def drain(self) -> None:
        """Stop taking requests (503 + Retry-After, /health 503) while those in flight finish."""
        self.draining = True

    def in_flight(self) -> int:
        return self.active

    async def cut(self, reason: str) -> int:
        """Fail the requests still in flight, as one process fails them at its drain timeout (a
        stream ends with an error event and `[DONE]`, an answer not started is a 503 saying
        `reason`), and let go of their replicas' calls (the replica hears a disconnect and aborts
        the request): deleting the application then finds nothing left to wait for. Returns how
        many were cut, once their answers are sent."""
        self.cut_by = reason
        forwards = dict(self.forwarding)
        for task in forwards:
            task.cancel()
        if forwards:
            await asyncio.wait(list(forwards.values()), timeout=5.0)
        return len(forwards)

    def _path(self, scope) -> str:
        path = scope.get("path", "")
        if self.root and (path == self.root or path.startswith(self.root + "/")):
            return path[len(self.root):] or "/"
        return path

    def __serve_build_asgi_app__(self):
        async def app(scope, receive, send):       # a function: uvicorn takes it for ASGI 3
            await self.forward(scope, receive, send)
        return app

    async def forward(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        if head_bytes(scope) > MAX_HEADER_BYTES:         # Ray's proxy reads headers of any length
            return await _answer(send, P.APIError(f"the request line and headers are longer than {MAX_HEADER_BYTES} "
                                                  "bytes", status=431, code="headers_too_large"))
        path = self._path(scope)
        if self.draining and path not in WATCHED:
            if path in PROBES:
                return await _json(send, 503, {"status": "draining"}, {"Retry-After": str(self.retry_after_s)})
            return await _answer(send, shutting_down(self.retry_after_s))
        if path == "/metrics" and scope.get("method") == "GET" and self.hub is not None:
            texts = await self.hub.collect.remote()
            body, content_type, headers = exposition(merged(texts), header(scope, b"accept"),
                                                     header(scope, b"accept-encoding"))   # as `agp serve` answers
            return await _raw(send, 200, body, content_type, headers)
        self.active += 1
        sent = {"started": False, "event_stream": False}
        task = asyncio.ensure_future(self._forward(scope, receive, send, sent))
        self.forwarding[task] = asyncio.current_task()
        try:
            try:
                await asyncio.wait({task})       # `cut` cancels the forward alone, the client gone this task
            except asyncio.CancelledError:
                task.cancel()
                await asyncio.wait({task})
                raise
            if not task.cancelled():
                return task.result()
            await self._cut(send, sent)
        finally:
            self.forwarding.pop(task, None)
            self.active -= 1

    async def _cut(self, send, sent: dict) -> None:
        """The answer of a request `cut` failed, as one process's drain timeout fails it."""
        err = P.APIError(self.cut_by, status=503, type="server_error", code="unavailable",
                         headers={"Retry-After": str(self.retry_after_s)})
        if not sent["started"]:
            return await _answer(send, err)
        if sent["event_stream"]:
            await send({"type": "http.response.body", "body": P.sse(err.body()) + P.sse("[DONE]"), "more_body": False})
        # else part of a body is out: the connection ends without the rest, as a cut one

    async def _forward(self, scope, receive, send, sent: dict | None = None):
        declared = header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.limit:      # refused before it is read, as in one process
            return await _answer(send, self._too_large(f"has {int(declared)} bytes; at most {self.limit} are accepted"))
        body = await self._body(receive)
        if body is False:                        # the client went away
            return
        if isinstance(body, P.APIError):         # late (408), too large (413), or past the bytes arriving (503)
            return await _answer(send, body)
        key = affinity_key(body, self.chars, header(scope, b"content-encoding"), self.limit)
        request = {k: scope[k] for k in SCOPE_KEYS if k in scope}
        failure = None
        for attempt in range(1, ATTEMPTS + 1):
            started, event_stream, done = False, False, False
            response = self.pipeline.asgi.remote(request, body, affinity=key)
            try:
                async for batch in response:
                    for message in batch:
                        if message["type"] == "http.response.start":
                            headers = [*message.get("headers", ()), (ATTEMPTS_HEADER, str(attempt).encode())]
                            message = {**message, "headers": headers}
                            event_stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                               for k, v in headers)
                            started = True
                            if sent is not None:
                                sent.update(started=True, event_stream=event_stream)
                        await send(message)
                done = True
                return
            except RayActorError as e:
                if started:                  # part of the answer is out: it cannot be sent again
                    log.warning("replica failed mid-answer: %s", e)
                    if not event_stream:
                        raise
                    err = P.APIError("the replica serving this request failed; send it again", status=503,
                                     type="server_error", code="replica_failed")
                    await send({"type": "http.response.body", "body": P.sse(err.body()) + P.sse("[DONE]"),
                                "more_body": False})
                    return
                failure = e
                log.warning("replica failed before answering (attempt %d of %d): %s", attempt, ATTEMPTS, e)
                await asyncio.sleep(0.2 * attempt)
            finally:
                if not done:
                    response.cancel()
        await _answer(send, P.APIError(f"no replica could answer: {failure}", status=503, type="server_error",
                                       code="unavailable", headers={"Retry-After": str(self.retry_after_s)}))

    def _too_large(self, what: str) -> P.APIError:
        return P.APIError(f"the request body {what} (--max-body-bytes)", status=413, code="body_too_large")

    async def _body(self, receive) -> bytes | bool | P.APIError:
        """The body, as one process reads it (serve/body.py): at most --max-body-bytes (413),
        in time by --body-timeout and --body-min-rate (408: BodyClock), the bytes of every body
        still arriving at most --max-body-bytes-arriving (503 to the one that would pass it);
        False when the client goes away first."""
        chunks, size, counted = [], 0, 0
        loop = asyncio.get_running_loop()
        clock = BodyClock(self.body_timeout_s, self.body_min_rate, loop.time())

        async def collect() -> bytes | bool | P.APIError:
            nonlocal size, counted
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                chunk = message.get("body", b"")
                more = message.get("more_body", False)
                size += len(chunk)
                clock.received(len(chunk), loop.time())
                if size > self.limit:
                    return self._too_large(f"has more than {self.limit} bytes")
                if more:                         # its last piece (or a body in one) never counts, as in one process
                    self.arriving += len(chunk)
                    counted += len(chunk)
                    if self.arriving_limit is not None and self.arriving > self.arriving_limit:
                        return P.APIError(f"the request bodies still arriving hold {self.arriving_limit} bytes, the "
                                          "server's limit (--max-body-bytes-arriving); retry later", status=503,
                                          type="server_error", code="overloaded",
                                          headers={"Retry-After": str(self.retry_after_s)})
                chunks.append(chunk)
                if not more:
                    return b"".join(chunks)

        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=max(0.0, clock.deadline() - loop.time()))
                if done:
                    return task.result()
                late = clock.late(loop.time())
                if late:
                    return P.APIError(late, status=408, code="body_timeout")
        finally:
            task.cancel()
            self.arriving -= counted             # complete, refused or abandoned: it arrives no more


def head_bytes(scope) -> int:
    """About the bytes of a request's line and headers, as they came (the proxy's uvicorn parsed them)."""
    line = len(scope.get("method", "")) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
    return line + sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))


async def _raw(send, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
    head = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def _json(send, status: int, obj: dict, headers: dict | None = None) -> None:
    await _raw(send, status, json.dumps(obj).encode(), "application/json", headers)


async def _answer(send, err: P.APIError) -> None:
    await _json(send, err.status, err.body(), err.headers)
