"""The FastAPI application of `agp serve`: OpenAI-compatible routes over an `AsyncPipeline`.

Routes: POST /v1/completions and /v1/chat/completions (server-sent events ending in
`data: [DONE]` when `"stream": true`), GET /v1/models, /health, /metrics (Prometheus)
and /stats (counters as JSON, per stage and per engine). Bad requests get a 400 with an
OpenAI-style error body before anything reaches the pipeline; a request the pipeline
refuses (a python stage's Reject, input its engine cannot serve) a 400; a full queue a
429 with Retry-After; a draining or failed pipeline a 503. A stream starts only when the
request's first token (or its answer) is there, so these stay HTTP errors for streams too.
A client that goes away mid-request aborts it, which frees its KV blocks.

The request's `model` field may name the pipeline (its generate stages are reached as the
graph routes) or one of its generate stages (the request goes the way that leads there).
"""
from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline_dsl.flow import PipelineError

from . import openapi as OA
from . import protocol as P
from .async_pipeline import AsyncPipeline, RequestStream, StreamGroup
from .metrics import ServerMetrics, StatsLine

log = logging.getLogger("agp.serve")
# "METHOD /path" of the request being served, for the log line of an error answer
_current = contextvars.ContextVar("agp_request", default="")
OPEN_PATHS = ("/health", "/metrics", "/version", "/openapi.json")   # answered without an API key


@dataclass(frozen=True)
class ServeConfig:
    model_names: tuple[str, ...]           # the first is reported by /v1/models and in answers
    max_model_len: int                     # context length: max_tokens beyond it is a 400
    stages: tuple[tuple[str, str], ...] = ()   # (generate stage, its model) a request may name
    retry_after_s: int = 1                 # Retry-After of a 429 / 503
    drain_timeout_s: float = 60.0          # at shutdown: how long in-flight requests may take
    max_body_bytes: int = 4 << 20          # a longer request body is a 413
    max_prompt_chars: int | None = None    # the longest prompt any engine can take, in characters
    body_timeout_s: float = 30.0           # a body not fully received by then is a 408
    max_connections: int = 1024            # requests served at once; more get a 503
    allowed_hosts: tuple[str, ...] = ("*",)  # Host header values accepted (a 400 otherwise); "*": any
    max_stage_n: int = 1                   # the largest n of the pipeline's generate stages
    lenient: bool = False                  # unknown request fields: logged and ignored, not a 400
    api_keys: tuple[str, ...] = ()         # when given, every route but OPEN_PATHS wants one (401)
    allowed_origins: tuple[str, ...] = ()  # CORS: origins browsers may call from ("*": any)
    stats_interval_s: float = 10.0         # a stats log line this often while busy (0: none)
    trace_path: str | None = None          # the Chrome trace is written here (flush, shutdown)


JSON_TYPES = ("application/json",)


class Guard:
    """ASGI middleware in front of every route: the Host header (DNS rebinding), and a bound on
    the requests served at once (503 + Retry-After beyond it)."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config
        self.active = 0
        hosts = [h.lower() for h in config.allowed_hosts]
        self.any_host = "*" in hosts
        self.hosts = set(hosts)

    def host_ok(self, scope) -> bool:
        if self.any_host:
            return True
        host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
        name = host.lower()
        if name.startswith("["):                       # [::1]:8000
            name = name[:name.find("]") + 1]
        elif name.count(":") == 1:
            name = name.rsplit(":", 1)[0]
        return name in self.hosts or name.strip("[]") in self.hosts

    def key_ok(self, scope) -> bool:
        if not self.config.api_keys:
            return True
        path = _route_path(scope)
        if path in OPEN_PATHS or scope.get("method") == "OPTIONS":
            return True
        auth = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), "")
        scheme, _, token = auth.partition(" ")
        token = token.strip().encode()
        return scheme.lower() == "bearer" and any(hmac.compare_digest(token, key.encode())
                                                   for key in self.config.api_keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        _current.set(f"{scope.get('method', '')} {_route_path(scope)}")
        if not self.key_ok(scope):
            return await _send_error(send, P.APIError(
                "a valid API key is required: send it as 'Authorization: Bearer KEY'", status=401,
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        if not self.host_ok(scope):
            return await _send_error(send, P.APIError("the Host header names a host this server does not "
                                                      "answer for (see --allowed-hosts)", status=400,
                                                      code="invalid_host"))
        if self.active >= self.config.max_connections:
            return await _send_error(send, P.APIError(
                f"the server is serving {self.active} requests, its limit (--max-connections); retry later",
                status=503, type="server_error", code="overloaded",
                headers={"Retry-After": str(self.config.retry_after_s)}))
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def _route_path(scope) -> str:
    """The request's path below --root-path."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def log_error(err: P.APIError) -> None:
    """An error answer, with its reason: 4xx at INFO (the client's doing), 5xx at WARNING."""
    level = logging.INFO if err.status < 500 else logging.WARNING
    log.log(level, "%s -> %d %s", _current.get() or "-", err.status, err.message,
            extra={"status": err.status, "reason": err.message})


async def _send_error(send, err: P.APIError) -> None:
    import json as _json

    log_error(err)
    body = _json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(request: Request, config: ServeConfig) -> bytes:
    """The request body, at most max_body_bytes (413), received within body_timeout_s (408), of
    type application/json (415: browsers send cross-site "simple" POSTs as text/plain)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise P.APIError(f"the request body must be application/json, not {ctype or 'unspecified'}",
                         status=415, code="unsupported_media_type")
    limit, why = config.max_body_bytes, "(--max-body-bytes)"
    if config.max_prompt_chars is not None:     # a body this large holds a prompt no engine can take
        need = 8 * config.max_prompt_chars + (256 << 10)
        if need < limit:
            limit, why = need, "(more than the longest prompt this pipeline takes can need)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise P.APIError(f"the request body has {int(declared)} bytes; at most {limit} are accepted {why}",
                         status=413, code="body_too_large")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise P.APIError(f"the request body has more than {limit} bytes {why}", status=413,
                                 code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), config.body_timeout_s)
    except asyncio.TimeoutError:
        raise P.APIError(f"the request body did not arrive within {config.body_timeout_s:g} s", status=408,
                         code="body_timeout") from None


class EventStream(StreamingResponse):
    """Server-sent events; a client gone before the first byte still aborts the request."""

    def __init__(self, content, stream: RequestStream, metrics: ServerMetrics):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream, self._metrics = stream, metrics

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._stream.started:      # the generator never ran
                self._stream.abort()
                self._metrics.requests.labels("499").inc()
                self._metrics.in_flight.dec()


def _error(err: P.APIError) -> JSONResponse:
    log_error(err)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def api_error(e: PipelineError, kind: str, retry_after_s: int = 1) -> P.APIError:
    """The HTTP answer to a request the pipeline refused or failed."""
    if e.kind == "queue_full":
        return P.APIError(e.message, status=429, type="rate_limit_error", code="queue_full",
                          headers={"Retry-After": str(retry_after_s)})
    if e.kind == "unavailable":
        return P.APIError(e.message, status=503, type="server_error", code="unavailable",
                          headers={"Retry-After": str(retry_after_s)})
    if e.kind == "rejected":
        return P.APIError(e.message, status=400, code="rejected", param=e.stage)
    if e.kind == "invalid":
        return P.APIError(e.message, status=400, param="messages" if kind == "chat" else "prompt")
    if e.kind == "aborted":
        return P.APIError(e.message, status=499, code="aborted")
    return P.APIError(e.message, status=500, type="server_error", code="stage_failed", param=e.stage)


def create_app(apipe: AsyncPipeline, config: ServeConfig, metrics: ServerMetrics | None = None
               ) -> FastAPI:
    metrics = metrics or apipe.metrics or ServerMetrics()
    apipe.metrics = metrics
    created = int(time.time())
    stage_names = tuple(name for name, _ in config.stages)

    async def stats_lines():
        line = StatsLine()
        line(await _stats())                       # the baseline: the first line counts from here
        while True:
            await asyncio.sleep(config.stats_interval_s)
            stats = await _stats()
            metrics.update_engine(stats)          # the hit-rate window fills even when nobody scrapes
            numbers = line(stats)
            if numbers is not None:
                log.info("stats: " + " ".join(f"{k}={v}" for k, v in numbers.items()), extra={"stats": numbers})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        apipe.start()
        ticker = asyncio.ensure_future(stats_lines()) if config.stats_interval_s > 0 else None
        try:
            yield
        finally:
            if ticker is not None:
                ticker.cancel()
            # uvicorn has stopped accepting and waited for open responses; finish the rest
            app.state.drained = await asyncio.to_thread(apipe.stop, drain=True, timeout=config.drain_timeout_s)
            if config.trace_path:
                write_trace(apipe, config.trace_path)

    app = FastAPI(title="agp", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.apipe, app.state.metrics, app.state.config = apipe, metrics, config
    app.state.drained = None

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(P.APIError(message, status=exc.status_code, type=kind, headers=dict(exc.headers or {})))

    @app.get("/health", openapi_extra=OA.HEALTH)
    async def health():
        if apipe.error is not None:
            return JSONResponse({"status": "failed", "error": str(apipe.error)}, 503)
        if not apipe.accepting:
            return JSONResponse({"status": "draining"}, 503)
        return {"status": "ok"}

    @app.get("/v1/models", openapi_extra=OA.MODELS)
    async def models():
        data = [{"id": name, "object": "model", "created": created, "owned_by": "agp",
                 "max_model_len": config.max_model_len} for name in config.model_names]
        data += [{"id": stage, "object": "model", "created": created, "owned_by": "agp",
                  "root": model, "parent": config.model_names[0], "max_model_len": config.max_model_len}
                 for stage, model in config.stages if stage not in config.model_names]
        return {"object": "list", "data": data}

    def _model_entry(name: str) -> dict | None:
        if name in config.model_names:
            return {"id": name, "object": "model", "created": created, "owned_by": "agp",
                    "max_model_len": config.max_model_len}
        for stage, model in config.stages:
            if stage == name:
                return {"id": stage, "object": "model", "created": created, "owned_by": "agp", "root": model,
                        "parent": config.model_names[0], "max_model_len": config.max_model_len}
        return None

    @app.get("/v1/models/{model_id:path}", openapi_extra=OA.MODEL)
    async def model(model_id: str):
        entry = _model_entry(model_id)
        if entry is None:
            return _error(P.APIError(f"the model '{model_id}' does not exist", status=404, type="not_found_error",
                                     param="model", code="model_not_found"))
        return entry

    @app.get("/version", openapi_extra=OA.VERSION)
    async def version():
        from pipeline_dsl import __version__

        return {"version": __version__}

    @app.post("/tokenize", openapi_extra=OA.TOKENIZE)
    async def tokenize(request: Request):
        try:
            body = P.parse_json(await read_body(request, config))
            tok = P.parse_tokenize(body, served=config.model_names, stages=stage_names)
            ids = await asyncio.to_thread(apipe.runtime.tokenise, tok, None)
        except P.APIError as err:
            return _error(err)
        except PipelineError as e:
            return _error(api_error(e, "chat" if "messages" in body else "completion"))
        return {"count": len(ids), "max_model_len": config.max_model_len, "tokens": ids}

    @app.get("/tokenizer_info", openapi_extra=OA.TOKENIZER_INFO)
    async def tokenizer_info():
        """The tokenizer's special tokens and chat template (lm-eval's remote tokenizer reads them)."""
        try:
            return await asyncio.to_thread(apipe.runtime.tokenizer_info, None)
        except PipelineError as e:
            return _error(api_error(e, "completion"))

    @app.post("/detokenize", openapi_extra=OA.DETOKENIZE)
    async def detokenize(request: Request):
        try:
            body = P.parse_json(await read_body(request, config))
            ids, model = P.parse_detokenize(body, served=config.model_names, stages=stage_names,
                                            max_model_len=config.max_model_len)
            text = await asyncio.to_thread(apipe.runtime.detokenise, ids, model)
        except P.APIError as err:
            return _error(err)
        except PipelineError as e:
            return _error(api_error(e, "completion"))
        return {"prompt": text}

    @app.get("/metrics", openapi_extra=OA.METRICS)
    async def prometheus():
        body, content_type = metrics.render(await _stats())
        return Response(body, media_type=content_type)

    @app.post("/trace/flush", openapi_extra=OA.TRACE_FLUSH)
    async def trace_flush():
        if not config.trace_path:
            return _error(P.APIError("tracing is off: start the server with --trace FILE", status=404,
                                     type="not_found_error", code="tracing_off"))
        spans = await asyncio.to_thread(write_trace, apipe, config.trace_path)
        return {"trace": os.path.basename(config.trace_path), "spans": spans}

    @app.get("/stats", openapi_extra=OA.STATS)
    async def stats():
        """Counters of the pipeline: per stage, per engine, requests."""
        return await _stats()

    async def _stats() -> dict:
        try:
            return await apipe.stats()
        except Exception:                       # noqa: BLE001 - a failed pipeline still answers
            return {}

    @app.post("/v1/completions", openapi_extra=OA.generation(OA.COMPLETION_REQUEST, OA.COMPLETION_RESPONSE,
                                                             "OpenAI completions"))
    async def completions(request: Request):
        return await _generate(request, P.parse_completion)

    @app.post("/v1/chat/completions", openapi_extra=OA.generation(OA.CHAT_REQUEST, OA.CHAT_RESPONSE,
                                                                  "OpenAI chat completions"))
    async def chat_completions(request: Request):
        return await _generate(request, P.parse_chat)

    async def _generate(request: Request, parse) -> Response:
        try:
            raw = await read_body(request, config)
            body = P.parse_json(raw) if len(raw) < (64 << 10) else await asyncio.to_thread(P.parse_json, raw)
            req = parse(body, max_model_len=config.max_model_len, served=config.model_names,
                        stages=stage_names, lenient=config.lenient)
            if "n" not in req.fields:           # the generate stage's n answers each prompt
                P.check_choices(1 + len(req.more_prompts), config.max_stage_n)
        except P.APIError as err:
            metrics.requests.labels(str(err.status)).inc()
            return _error(err)
        prefix = "chatcmpl" if req.kind == "chat" else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        parts = req.split()                   # a completions batch: one pipeline request per prompt
        streams: list[RequestStream] = []
        try:
            for k, part in enumerate(parts):
                streams.append(await apipe.add(part.item(rid if k == 0 else f"{rid}-{k}"), pin=req.pin,
                                               stream=req.stream))
        except PipelineError as e:
            for st in streams:
                st.abort()
            err = api_error(e, req.kind, config.retry_after_s)
            metrics.requests.labels(str(err.status)).inc()
            return _error(err)
        stream = streams[0] if len(streams) == 1 else StreamGroup(streams, max(req.choices_per_prompt,
                                                                              config.max_stage_n))
        metrics.in_flight.inc()
        first = await _first_event(request, stream)
        if first is None:                        # the client went away while it waited
            metrics.requests.labels("499").inc()
            metrics.in_flight.dec()
            return Response(status_code=499)
        if first[0] == "done" and first[1].error is not None:
            err = api_error(first[1].error, req.kind, config.retry_after_s)
            metrics.requests.labels(str(err.status)).inc()
            metrics.in_flight.dec()
            return _error(err)
        if req.stream:
            return EventStream(_sse(stream, first, req, rid), stream, metrics)
        return await _collect(request, stream, first, req, rid)

    def _prompt_text(data: dict, req: P.GenerationRequest) -> str:
        """The prompt of an answer, for echo: as sent, or decoded from the ids it was sent as."""
        request = data.get("request") or {}
        if isinstance(request.get("prompt"), str):
            return request["prompt"]
        ids = request.get("prompt_token_ids") or data.get("prompt_token_ids") or []
        return apipe.runtime.detokenise(list(ids), req.pin) if ids else ""

    async def _first_event(request: Request, stream: RequestStream):
        """The request's first event, or None when the client disconnects first (then aborted)."""
        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        nxt = asyncio.ensure_future(stream.__anext__())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({nxt, watch}, return_when=asyncio.FIRST_COMPLETED)
            if nxt.done():
                return nxt.result()
            stream.abort()
            return None
        finally:
            for task in (nxt, watch):
                if not task.done():
                    task.cancel()

    async def _collect(request: Request, stream: RequestStream, first, req: P.GenerationRequest,
                       rid: str) -> Response:
        """Non-streaming: wait for the answer, or abort when the client disconnects."""
        async def answer():
            event = first
            while event[0] != "done":
                event = await stream.__anext__()
            return event[1]

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        result = asyncio.ensure_future(answer())
        watch = asyncio.ensure_future(disconnected())
        status = "200"
        try:
            await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not result.done():
                status = "499"                   # client closed the request
                stream.abort()
                return Response(status_code=499)
            res = result.result()
            if res.error is not None:
                err = api_error(res.error, req.kind, config.retry_after_s)
                status = str(err.status)
                return _error(err)
            use = P.usage(res.usage["prompt_tokens"], res.usage["completion_tokens"], res.usage["cached_tokens"])
            want = req.fields.get("logprobs") is not None
            text_of = apipe.runtime.token_text(req.pin) if want else None
            if req.kind == "chat":
                choices = [(c.index, c.text, c.finish_reason,
                            P.chat_logprobs(c.data.get("logprobs") or [], text_of) if want else None)
                           for c in res.choices]
                return JSONResponse(P.chat_response(rid, req.model, choices, use, tools_active=req.tools_active))
            echo = bool(req.fields.get("echo"))
            choices = []
            for c in res.choices:
                prompt = _prompt_text(c.data, req) if echo else ""
                choices.append((c.index, prompt + c.text, c.finish_reason,
                                P.completion_logprobs(c.data, text_of, echo) if want else None))
            return JSONResponse(P.completion_response(rid, req.model, choices, use))
        finally:
            for task in (result, watch):
                task.cancel()
            if not stream.finished:
                stream.abort()
            metrics.requests.labels(status).inc()
            metrics.in_flight.dec()

    async def _sse(stream: RequestStream, first, req: P.GenerationRequest, rid: str):
        """Streaming: chunks as tokens come (per choice index), a finishing chunk per choice,
        usage if asked, [DONE]. Choices whose results went through later stages arrive whole."""
        now = int(time.time())
        chat = req.kind == "chat"
        status = "499"
        stream.started = True
        opened: set[int] = set()
        closed: set[int] = set()
        tool_streams: dict[int, object] = {}            # index -> ToolStream, when the request gave tools
        called: set[int] = set()
        want_lp = req.fields.get("logprobs") is not None
        text_of = apipe.runtime.token_text(req.pin) if want_lp else None
        echo = not chat and bool(req.fields.get("echo"))
        parts = req.split() if echo else []
        per = getattr(stream, "per", 1)
        offset: dict[int, int] = {}                     # per choice: text_offset of its next token

        def listed(index: int, lp: dict) -> dict:
            if lp["tokens"]:
                offset[index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            return lp

        def echoed(index: int, data: dict | None) -> tuple[str, dict | None]:
            """The prompt of choice `index` and its logprobs: from its answer when that came whole,
            else from its request (vLLM streams the echo first)."""
            if data is not None:
                text, ids, lps = _prompt_text(data, req), data.get("prompt_token_ids"), data.get("prompt_logprobs")
            else:
                part = parts[min(index // per, len(parts) - 1)]
                sub = stream.streams[index // per] if isinstance(stream, StreamGroup) else stream
                text = part.prompt if part.prompt is not None else \
                    apipe.runtime.detokenise(list(part.prompt_token_ids), req.pin)
                ids, lps = sub.prompt or (None, None)
            lp = (P.completion_logprobs({"prompt_logprobs": lps, "prompt_token_ids": ids}, text_of, True)
                  if want_lp and lps else None)
            return text, lp

        def content(index: int, text: str, step_lp: list | None = None, data: dict | None = None) -> list[bytes]:
            out = []
            if chat and index not in opened:
                out.append(P.sse(P.chat_chunk(rid, req.model, now, {"role": "assistant", "content": ""},
                                              None, index)))
            if echo and index not in opened:
                prompt, lp = echoed(index, data)
                offset[index] = len(prompt)
                out.append(P.sse(P.completion_chunk(rid, req.model, now, prompt, None, index,
                                                    lp and listed(index, lp))))
            opened.add(index)
            calls = []
            if chat and req.tools_active:
                from pipeline_dsl.tools import ToolStream

                text, calls = tool_streams.setdefault(index, ToolStream()).feed(text)
            lp = None
            if want_lp and step_lp:                     # these tokens' logprobs, with their text
                lp = (P.chat_logprobs(step_lp, text_of) if chat else listed(index, P.completion_logprobs(
                    {"logprobs": step_lp}, text_of, False, offset.get(index, 0))))
            if text or lp is not None:
                out.append(P.sse(P.chat_chunk(rid, req.model, now, {"content": text}, None, index, lp) if chat
                                 else P.completion_chunk(rid, req.model, now, text, None, index, lp)))
            if calls:
                called.add(index)
                out.append(P.sse(P.chat_chunk(rid, req.model, now, {"tool_calls": calls}, None, index)))
            return out

        def finish(index: int, reason: str | None) -> list[bytes]:
            closed.add(index)
            out = []
            if index in tool_streams:
                rest, _ = tool_streams[index].finish()
                if rest:
                    out.append(P.sse(P.chat_chunk(rid, req.model, now, {"content": rest}, None, index)))
            if index in called:
                reason = "tool_calls"
            out.append(P.sse(P.chat_chunk(rid, req.model, now, {}, reason, index) if chat
                             else P.completion_chunk(rid, req.model, now, "", reason, index)))
            return out

        try:
            event = first
            while True:
                if event[0] == "delta":
                    _, index, out = event
                    for chunk in content(index, out.delta_text, getattr(out, "logprobs", None)):
                        yield chunk
                    if out.finished and index not in closed:
                        for chunk in finish(index, out.finish_reason):
                            yield chunk
                else:
                    result = event[1]
                    if result.error is not None:
                        err = api_error(result.error, req.kind, config.retry_after_s)
                        status = str(err.status)
                        log_error(err)
                        yield P.sse(err.body())
                        yield P.sse("[DONE]")
                        return
                    for c in result.choices:
                        if c.index not in closed:
                            whole = c.index not in opened         # it came whole (no deltas)
                            for chunk in content(c.index, c.text if whole else "",
                                                 c.data.get("logprobs") if whole else None, c.data):
                                yield chunk
                            for chunk in finish(c.index, c.finish_reason):
                                yield chunk
                    if req.include_usage:
                        use = P.usage(result.usage["prompt_tokens"], result.usage["completion_tokens"],
                                      result.usage["cached_tokens"])
                        yield P.sse(P.usage_chunk(rid, req.model, now, req.kind, use))
                    yield P.sse("[DONE]")
                    status = "200"
                    return
                event = await stream.__anext__()
        finally:                                 # also on disconnect (cancel / aclose)
            if not stream.finished:
                stream.abort()
            metrics.requests.labels(status).inc()
            metrics.in_flight.dec()

    app.add_middleware(Guard, config=config)
    if config.allowed_origins:                  # outside the guard: preflights need no API key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in config.allowed_origins)
    return app


def write_trace(apipe: AsyncPipeline, path: str) -> int:
    """The runtime's trace so far as a Chrome trace file (written whole, then renamed into place);
    returns the number of spans."""
    trace = apipe.runtime.trace
    tmp = f"{path}.tmp{os.getpid()}"
    trace.write(tmp)
    os.replace(tmp, path)
    return len(trace.spans)
