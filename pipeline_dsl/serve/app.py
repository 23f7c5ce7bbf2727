"""The FastAPI application of `agp serve`: OpenAI-compatible routes over an `AsyncPipeline`.

`create_app` puts what the routes need on `app.state` (the pipeline, the config, the metrics,
the serving objects), includes the module-level router (serve/routes.py) and wraps it in the
middleware: the request id, root path and access log (serve/access.py), the guard (serve/guard.py)
and CORS. Its lifespan starts the pipeline, logs a stats line every --stats-interval seconds
while busy, and at shutdown drains the pipeline and writes the trace.

Bad requests get a 400 with an OpenAI-style error body before anything reaches the pipeline; a
request the pipeline refuses or fails gets the status of serve/errors.py. The request's `model`
field may name the pipeline (its generate stages are reached as the graph routes) or one of its
generate stages (the request goes the way that leads there).
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .access import Access
from .async_pipeline import AsyncPipeline
from .config import ServeConfig
from .embeddings import Embeddings
from .errors import error_response
from .generation import Generations
from .guard import Guard, route_path
from .metrics import ServerMetrics, StatsLine
from .responses import Responses
from .routes import pipeline_stats, router, write_trace
from .scores import Scores

log = logging.getLogger("agp.serve")

__all__ = ["ServeConfig", "create_app", "write_trace"]


async def stats_lines(app: FastAPI) -> None:
    """A stats log line every stats_interval_s while the server is busy."""
    state = app.state
    line = StatsLine()
    line(await pipeline_stats(state))             # the baseline: the first line counts from here
    while True:
        await asyncio.sleep(state.config.stats_interval_s)
        stats = await pipeline_stats(state)
        state.metrics.update_engine(stats)        # the hit-rate window fills even when nobody scrapes
        numbers = line(stats)
        if numbers is not None:
            log.info("stats: " + " ".join(f"{k}={v}" for k, v in numbers.items()), extra={"stats": numbers})


@asynccontextmanager
async def lifespan(app: FastAPI):
    state = app.state
    state.apipe.start()
    ticker = asyncio.ensure_future(stats_lines(app)) if state.config.stats_interval_s > 0 else None
    try:
        yield
    finally:
        if ticker is not None:
            ticker.cancel()
        # uvicorn has stopped accepting and waited for open responses; finish the rest
        state.drained = await asyncio.to_thread(state.apipe.stop, drain=True, timeout=state.config.drain_timeout_s)
        if state.config.trace_path:
            write_trace(state.apipe, state.config.trace_path)


# other servers' routes that agp serves otherwise: llama.cpp's llama-server and Ollama's (every
# /api/... path is Ollama's); a 404 there says where agp's equivalent is
_UNDER_V1 = "agp serves OpenAI's routes under /v1 (a client's base URL is http://HOST:PORT/v1): "
_OLLAMA = ("Ollama's API; agp serves OpenAI's, as Ollama does under /v1 too: give an OpenAI client the base URL "
           "http://HOST:PORT/v1 (docs/serve.md, \"Coming from llama.cpp or Ollama\")")
FOREIGN_ROUTES = {
    "/": "agp serves no web page, as llama.cpp's server does at /: GET /openapi.json lists its routes",
    "/completion": "llama.cpp's; agp's is POST /v1/completions (its n_predict is 'max_tokens' there)",
    "/completions": _UNDER_V1 + "POST /v1/completions",
    "/chat/completions": _UNDER_V1 + "POST /v1/chat/completions",
    "/embedding": "llama.cpp's; agp's is POST /v1/embeddings (its content is 'input' there)",
    "/embeddings": _UNDER_V1 + "POST /v1/embeddings",
    "/models": _UNDER_V1 + "GET /v1/models",
    "/v1/health": "agp's is GET /health",
    "/props": "llama.cpp's; agp's settings: GET /v1/models (each model's max_model_len), GET /stats (each "
              "engine's model, context_length, KV blocks, running and waiting sequences), GET /version",
    "/slots": "llama.cpp's; agp has no slots: GET /stats counts each engine's running and waiting sequences and "
              "KV blocks, GET /metrics too",
    "/infill": "llama.cpp's; agp has no fill-in-the-middle route (a /v1/completions prompt continues its text)",
    "/apply-template": "llama.cpp's; POST /tokenize with 'messages' renders the chat template (POST /detokenize "
                       "reads the ids back as text)",
    "/reranking": "llama.cpp's; agp's is POST /v1/rerank",
    "/lora-adapters": "llama.cpp's; agp's LoRA adapters are given at start (agp serve --lora-modules NAME=PATH) and "
                      "listed by GET /v1/models; a request names one as its model",
    "/v1/load_lora_adapter": "vLLM's; agp's LoRA adapters are given at start (agp serve --lora-modules NAME=PATH)",
    "/v1/unload_lora_adapter": "vLLM's; agp's LoRA adapters are given at start (agp serve --lora-modules NAME=PATH)",
    "/api/chat": _OLLAMA + "; Ollama's /api/chat is POST /v1/chat/completions",
    "/api/generate": _OLLAMA + "; Ollama's /api/generate is POST /v1/completions",
    "/api/tags": _OLLAMA + "; Ollama's /api/tags is GET /v1/models",
    "/api/embed": _OLLAMA + "; Ollama's /api/embed is POST /v1/embeddings",
    "/api/embeddings": _OLLAMA + "; Ollama's /api/embeddings is POST /v1/embeddings",
    "/api/version": _OLLAMA + "; Ollama's /api/version is GET /version",
}


# Azure OpenAI's routes beyond the three agp serves (serve/routes.py: AZURE): /openai/models,
# /openai/responses, a deployment's other APIs (audio, images)
_AZURE = ("Azure OpenAI's; agp serves Azure's POST /openai/deployments/{model}/chat/completions, /completions and "
          "/embeddings (openai.AzureOpenAI with azure_endpoint=http://HOST:PORT), and every other route under /v1 "
          "(an OpenAI client with base_url=http://HOST:PORT/v1; its key may go in an 'api-key' header too)")


def foreign_route(path: str) -> str | None:
    """Where agp serves what another server's route (llama.cpp's, Ollama's, Azure OpenAI's) does;
    None for others. `path`: below the root path (guard.route_path)."""
    path = path.rstrip("/") or path
    if path in FOREIGN_ROUTES:
        return FOREIGN_ROUTES[path]
    if path.startswith("/slots/"):
        return FOREIGN_ROUTES["/slots"]
    if path == "/openai" or path.startswith("/openai/"):
        return _AZURE
    return _OLLAMA if path == "/api" or path.startswith("/api/") else None


async def http_error(request: Request, exc: StarletteHTTPException):
    """Starlette's own errors (404 no such route, 405 wrong method) as OpenAI error objects; a 404 at
    another server's route (FOREIGN_ROUTES) says where agp serves its equivalent."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    hint = foreign_route(route_path(request.scope)) if exc.status_code == 404 else None
    if hint:
        message += f" ({hint})"
    return error_response(P.APIError(message, status=exc.status_code, type=kind, headers=dict(exc.headers or {})))


def _as_written(doc: dict, extra: dict) -> None:
    """Put `extra`'s values back into `doc` where FastAPI merged them (a dict key by key)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            _as_written(doc[key], value)
        else:
            doc[key] = value


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's OpenAPI document, each route's own description (serve/openapi.py) as written:
    FastAPI's model of a schema holds `minimum` and `maximum` as floats, which made the 64-bit
    bounds of `seed` and `priority` (2**63 - 1) 9.223372036854776e+18, that is 2**63, a value the
    server refuses."""
    if app.openapi_schema is None:
        doc = FastAPI.openapi(app)
        for route in router.routes:
            if isinstance(route, APIRoute) and route.openapi_extra:
                for method in route.methods:
                    _as_written(doc["paths"][route.path_format][method.lower()], route.openapi_extra)
    return app.openapi_schema


def create_app(apipe: AsyncPipeline, config: ServeConfig, metrics: ServerMetrics | None = None) -> FastAPI:
    metrics = metrics or apipe.metrics or ServerMetrics()
    apipe.metrics = metrics
    app = FastAPI(title="agp", lifespan=lifespan, docs_url=None, redoc_url=None)
    state = app.state
    state.apipe, state.config, state.metrics = apipe, config, metrics
    state.created = int(time.time())
    state.drained = None
    state.generations = Generations(apipe, config, metrics)
    state.responses = Responses(state.generations)
    state.embeddings = Embeddings(state.generations)
    state.scores = Scores(state.embeddings)
    app.include_router(router)
    app.openapi = lambda: openapi_document(app)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(Guard, config=config, metrics=metrics, apipe=apipe)
    if config.allowed_origins:                  # outside the guard: preflights need no API key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in config.allowed_origins,
                           # a browser shows a script only these of the answer's own headers
                           expose_headers=["X-Request-Id", "Retry-After", "Warning"])
    app.add_middleware(Access, root_path=config.root_path, quiet=config.quiet_paths,   # outermost: every answer
                       metrics=metrics, routes=router.routes)                             # is logged and counted
    return app
