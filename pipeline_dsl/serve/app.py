"""The FastAPI application of `agp serve`: OpenAI-compatible routes over an `AsyncEngine`.

Routes: POST /v1/completions and /v1/chat/completions (server-sent events ending in
`data: [DONE]` when `"stream": true`), GET /v1/models, /health, /metrics (Prometheus)
and /stats (the engine's counters as JSON). Bad requests get a 400 with an OpenAI-style
error body before anything reaches the engine; a full queue a 429 with Retry-After; a
draining or failed engine a 503. A client that goes away mid-request aborts its
sequence, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline_dsl.engine.config import SamplingParams
from pipeline_dsl.engine.errors import InputError, QueueFullError

from . import protocol as P
from .async_engine import AsyncEngine, EngineUnavailable
from .metrics import ServerMetrics


@dataclass(frozen=True)
class ServeConfig:
    model_names: tuple[str, ...]           # the first is reported by /v1/models and in answers
    max_model_len: int                     # context length: max_tokens beyond it is a 400
    defaults: SamplingParams = SamplingParams()  # the pipeline's generate settings
    retry_after_s: int = 1                 # Retry-After of a 429
    drain_timeout_s: float = 60.0          # at shutdown: how long in-flight requests may take


class EventStream(StreamingResponse):
    """Server-sent events; a client gone before the first byte still aborts the sequence."""

    def __init__(self, content, stream, metrics: ServerMetrics):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream, self._metrics = stream, metrics

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not getattr(self._stream, "started", False):   # the generator never ran
                self._stream.abort()
                self._metrics.requests.labels("499").inc()
                self._metrics.in_flight.dec()


def _error(err: P.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(aengine: AsyncEngine, config: ServeConfig, metrics: ServerMetrics | None = None
               ) -> FastAPI:
    metrics = metrics or aengine.metrics or ServerMetrics()
    aengine.metrics = metrics
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        yield
        # uvicorn has stopped accepting and waited for open responses; finish the rest
        await asyncio.to_thread(aengine.stop, drain=True, timeout=config.drain_timeout_s)

    app = FastAPI(title="agp", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.aengine, app.state.metrics, app.state.config = aengine, metrics, config

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(P.APIError(message, status=exc.status_code, type=kind))

    @app.get("/health")
    async def health():
        if aengine.error is not None:
            return JSONResponse({"status": "failed", "error": str(aengine.error)}, 503)
        if not aengine.accepting:
            return JSONResponse({"status": "draining"}, 503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "agp",
             "max_model_len": config.max_model_len} for name in config.model_names]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render(await _engine_stats())
        return Response(body, media_type=content_type)

    @app.get("/stats")
    async def stats():
        """The engine's counters (latency sample lists left out)."""
        return {k: v for k, v in (await _engine_stats()).items() if not isinstance(v, list)}

    async def _engine_stats() -> dict:
        try:
            return await aengine.stats()
        except EngineUnavailable:
            return {}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, P.parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, P.parse_chat)

    async def _generate(request: Request, parse) -> Response:
        try:
            body = P.parse_json(await request.body())
            req = parse(body, defaults=config.defaults, max_model_len=config.max_model_len,
                        served=config.model_names)
        except P.APIError as err:
            metrics.requests.labels(str(err.status)).inc()
            return _error(err)
        prefix = "chatcmpl" if req.kind == "chat" else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        try:
            stream = await aengine.add(rid, params=req.params, **req.engine_inputs())
        except QueueFullError as e:
            err = P.APIError(str(e), status=429, type="rate_limit_error", code="queue_full",
                             headers={"Retry-After": str(config.retry_after_s)})
        except InputError as e:
            err = P.APIError(str(e), param="messages" if req.kind == "chat" else "prompt")
        except EngineUnavailable as e:
            err = P.APIError(str(e), status=503, type="server_error", code="unavailable",
                             headers={"Retry-After": str(config.retry_after_s)})
        else:
            metrics.in_flight.inc()
            if req.stream:
                return EventStream(_sse(stream, req, rid), stream, metrics)
            return await _collect(request, stream, req, rid)
        metrics.requests.labels(str(err.status)).inc()
        return _error(err)

    async def _collect(request: Request, stream, req: P.GenerationRequest, rid: str) -> Response:
        """Non-streaming: wait for the last output, or abort when the client disconnects."""
        async def last_output():
            last = None
            async for out in stream:
                last = out
            return last

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        result = asyncio.ensure_future(last_output())
        watch = asyncio.ensure_future(disconnected())
        status = "200"
        try:
            await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not result.done():
                status = "499"                   # client closed the request
                stream.abort()
                return Response(status_code=499)
            try:
                out = result.result()
            except EngineUnavailable as e:
                status = "503"
                return _error(P.APIError(str(e), status=503, type="server_error"))
            use = P.usage(out.prompt_tokens, out.completion_tokens, out.cached_tokens)
            build = P.chat_response if req.kind == "chat" else P.completion_response
            return JSONResponse(build(rid, req.model, out.text, out.finish_reason, use))
        finally:
            for task in (result, watch):
                task.cancel()
            if not stream.finished:
                stream.abort()
            metrics.requests.labels(status).inc()
            metrics.in_flight.dec()

    async def _sse(stream, req: P.GenerationRequest, rid: str):
        """Streaming: one chunk per step's text, a finishing chunk, usage if asked, [DONE]."""
        now = int(time.time())
        chat = req.kind == "chat"
        status = "499"
        stream.started = True
        try:
            if chat:
                yield P.sse(P.chat_chunk(rid, req.model, now, {"role": "assistant", "content": ""},
                                         None))
            out = None
            try:
                async for out in stream:
                    if out.delta_text:
                        yield P.sse(P.chat_chunk(rid, req.model, now, {"content": out.delta_text},
                                                 None) if chat else
                                    P.completion_chunk(rid, req.model, now, out.delta_text, None))
            except EngineUnavailable as e:
                status = "503"
                yield P.sse(P.APIError(str(e), status=503, type="server_error").body())
                yield P.sse("[DONE]")
                return
            reason = out.finish_reason if out is not None and out.finished else "abort"
            yield P.sse(P.chat_chunk(rid, req.model, now, {}, reason) if chat else
                        P.completion_chunk(rid, req.model, now, "", reason))
            if req.include_usage and out is not None:
                use = P.usage(out.prompt_tokens, out.completion_tokens, out.cached_tokens)
                yield P.sse(P.usage_chunk(rid, req.model, now, req.kind, use))
            yield P.sse("[DONE]")
            status = "200"
        finally:                                 # also on disconnect (cancel / aclose)
            if not stream.finished:
                stream.abort()
            metrics.requests.labels(status).inc()
            metrics.in_flight.dec()

    return app
