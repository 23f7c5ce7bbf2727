"""`agp serve PIPELINE --ray`: the same server as replicas on Ray Serve (docs/scale.md).

    agp serve examples/chat.agp --ray --replicas 2
    agp serve examples/chat.agp --ray --max-replicas 4 --target-ongoing-requests 8
    serve run pipeline_dsl.serve.ray:app_builder pipeline=/abs/path/chat.agp replicas=2

Two deployments make the application `agp`:

- `AgpPipeline`, the replicas: each builds the app `agp serve` builds for the same flags
  (`build(args)`: the same routes, limits and metrics) and runs it in its process, with its
  lifespan: the pipeline starts with the replica and drains when Serve stops it (Serve
  first lets the requests in flight finish, up to --drain-timeout). Every answer carries
  `x-agp-replica`, the id of the replica that served it.
- `AgpIngress`, behind Ray's HTTP proxy: reads a request's body, takes its prompt's first
  --affinity-chars characters as a routing key and calls `AgpPipeline` through a deployment
  handle, streaming the replica's ASGI messages back. A request whose replica fails before
  its answer started is sent again (to another replica); a stream already started ends with
  an error event. `x-agp-attempts` says how many times it was sent.

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
import signal
import socket
import sys
import threading
from pathlib import Path

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from . import protocol as P

log = logging.getLogger("agp.serve")
APP = "agp"
REPLICA_HEADER = b"x-agp-replica"
ATTEMPTS_HEADER = b"x-agp-attempts"
ATTEMPTS = 3                      # sends of a request whose answer has not started
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path",
              "query_string", "headers", "server", "client")
DEFAULT_TARGET = 8.0              # --target-ongoing-requests


# ---------------------------------------------------------------- routing

def affinity_key(body: bytes, chars: int) -> str | None:
    """The first `chars` characters of a request's prompt (completions: the first prompt; token
    ids as numbers) or of its messages (chat: each one's role and text, in order); None when
    the body has neither (it is then routed by load alone)."""
    if chars <= 0:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
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
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
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

    async def __init__(self, options: dict):
        from pipeline_dsl.commands.serve import build
        from pipeline_dsl.serve.logs import configure

        args = argparse.Namespace(**options)
        configure(args.log_format, args.log_level, args.access_log)
        self.serving = await asyncio.to_thread(build, args)
        self.replica = serve.get_replica_context().replica_id.unique_id.encode()
        self.lifespan = self.serving.app.router.lifespan_context(self.serving.app)
        await self.lifespan.__aenter__()

    async def __del__(self):
        """Serve stops the replica (after its requests finished, or the drain timeout)."""
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

    def __init__(self, pipeline, affinity_chars: int, max_body_bytes: int, body_timeout_s: float):
        self.pipeline = pipeline.options(stream=True)
        self.chars, self.limit, self.body_timeout_s = affinity_chars, max_body_bytes, body_timeout_s

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
        body = await self._body(receive)
        if body is False:                        # the client went away
            return
        if body is None:
            return await _answer(send, P.APIError(f"the request body did not arrive within "
                                                  f"{self.body_timeout_s:g} s", status=408, code="body_timeout"))
        key = affinity_key(body, self.chars)
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
                                       code="unavailable", headers={"Retry-After": "1"}))

    async def _body(self, receive) -> bytes | bool | None:
        """The body, cut at one byte more than the replicas accept (they answer 413); None when it
        does not arrive within the body timeout, False when the client goes away first."""
        chunks, size = [], 0

        async def collect() -> bool:
            nonlocal size
            while size <= self.limit:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if not message.get("more_body"):
                    break
            return True

        try:
            if not await asyncio.wait_for(collect(), self.body_timeout_s):
                return False
        except asyncio.TimeoutError:
            return None
        return b"".join(chunks)[:self.limit + 1]


async def _answer(send, err: P.APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- the application

def pipeline_options(args, gpus: float = 0) -> dict:
    """Serve options of the AgpPipeline deployment for these flags."""
    opts = {"max_ongoing_requests": args.max_ongoing_requests,
            "graceful_shutdown_timeout_s": args.drain_timeout,
            "ray_actor_options": {"num_cpus": args.threads or 1, "num_gpus": gpus},
            "request_router_config": RequestRouterConfig(request_router_class=PrefixAffinityRouter)}
    if args.max_replicas is None:
        opts["num_replicas"] = args.replicas or 1
    else:
        low = 1 if args.min_replicas is None else args.min_replicas
        opts["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": args.max_replicas,
            "initial_replicas": args.replicas if args.replicas is not None else max(low, 1),
            "target_ongoing_requests": args.target_ongoing_requests or DEFAULT_TARGET}
    return opts


def build_app(args, gpus: float = 0):
    """The Serve application for checked `agp serve` flags (files made absolute: every node
    reads them at the same path)."""
    options = dict(vars(args))
    for name in ("pipeline", "chat_template"):
        if options.get(name):
            options[name] = str(Path(options[name]).resolve())
    options.pop("func", None)
    pipeline = AgpPipeline.options(**pipeline_options(args, gpus)).bind(options)
    return AgpIngress.bind(pipeline, args.affinity_chars, args.max_body_bytes, args.body_timeout)


def pipeline_device(args) -> str:
    """The pipeline's `device` setting (raises CheckFailed for a file that does not check)."""
    from pipeline_dsl.flow import load_graph

    return str(load_graph(args.pipeline, args.name).graph["settings"].get("device") or "auto")


def replica_gpus(device: str) -> float:
    """1 when the pipeline runs on CUDA (device cuda…, or auto on a cluster with GPUs), else 0:
    Ray shows an actor only the GPUs it reserved."""
    if device.startswith("cuda"):
        return 1
    return 1 if device == "auto" and ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0


def parse(argv: list[str]) -> argparse.Namespace:
    """`agp serve` flags (with --ray) from an argument list."""
    from pipeline_dsl.commands.serve import add_arguments

    p = argparse.ArgumentParser(prog="agp serve")
    add_arguments(p)
    return p.parse_args([*argv, "--ray"])


def app_builder(config: dict):
    """For Ray's own CLI: `serve run pipeline_dsl.serve.ray:app_builder pipeline=FILE replicas=2
    max_replicas=4 ...`; every other key is an `agp serve` flag (dashes or underscores; true for
    a switch)."""
    from pipeline_dsl.commands.serve import SetupError, check_args

    config = dict(config)
    if "pipeline" not in config:
        raise ValueError("app_builder needs pipeline=FILE")
    argv = [str(config.pop("pipeline"))]
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if str(value).lower() == "true":
            argv.append(flag)
        elif str(value).lower() != "false":
            argv += [flag, str(value)]
    args = parse(argv)
    try:
        check_args(args)
    except SetupError as e:
        raise ValueError(str(e)) from None
    return build_app(args, replica_gpus(pipeline_device(args)))


def start_failure(e: Exception, app: str = APP) -> tuple[int, str]:
    """Exit status and message when the replicas did not start: what a replica's constructor
    raised, from Serve's status (a SetupError is a flag the pipeline cannot run with: 2)."""
    try:
        detail = serve.status().applications[app].deployments["AgpPipeline"].message.strip()
    except Exception:                           # noqa: BLE001 - no status: Serve's own message
        detail = ""
    if "SetupError: " in detail:
        return 2, detail.rsplit("SetupError: ", 1)[1]
    return 1, detail.splitlines()[-1] if detail else str(e)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main(args) -> int:
    """`agp serve … --ray`: deploy, serve until SIGINT / SIGTERM, then drain and stop."""
    from pipeline_dsl.commands.serve import _err
    from pipeline_dsl.diagnostics import CheckFailed

    try:
        device = pipeline_device(args)
    except CheckFailed as e:
        sys.stderr.write(e.render())
        return 2
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(logging_level=logging.WARNING, include_dashboard=False)
    gpus = replica_gpus(device)
    port = args.port or _free_port(args.host)
    serve.start(proxy_location="EveryNode",
                http_options={"host": args.host, "port": port, "ssl_keyfile": args.ssl_keyfile,
                              "ssl_certfile": args.ssl_certfile})
    try:
        serve.run(build_app(args, gpus), name=APP, route_prefix=args.root_path or "/")
    except Exception as e:                      # noqa: BLE001 - Serve says why the replicas did not start
        code, why = start_failure(e)
        _err(why if code == 2 else f"the application did not start: {why}")
        serve.delete(APP)
        if started_here:
            ray.shutdown()
        return code
    scheme = "https" if args.ssl_certfile else "http"
    shown = f"[{args.host}]" if ":" in args.host else args.host
    count = (f"{args.replicas or 1} replica(s)" if args.max_replicas is None else
             f"{1 if args.min_replicas is None else args.min_replicas}-{args.max_replicas} replicas "
             f"(autoscaling towards {args.target_ongoing_requests or DEFAULT_TARGET:g} requests in flight each)")
    log.info("agp serving pipeline %s on Ray Serve as %s at %s://%s:%d%s/v1; prefix affinity %s",
             Path(args.pipeline).name, count, scheme, shown, port, args.root_path,
             f"on the first {args.affinity_chars} characters" if args.affinity_chars else "off")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    log.info("stopping: replicas finish their requests (up to %gs)", args.drain_timeout)
    serve.delete(APP)
    if started_here:
        ray.shutdown()
    log.info("stopped")
    return 0
