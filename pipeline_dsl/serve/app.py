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
from .guard import Guard
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


async def http_error(request: Request, exc: StarletteHTTPException):
    """Starlette's own errors (404 no such route, 405 wrong method) as OpenAI error objects."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
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
                           expose_headers=["X-Request-Id", "Retry-After"])
    app.add_middleware(Access, root_path=config.root_path, quiet=config.quiet_paths,   # outermost: every answer
                       metrics=metrics, routes=router.routes)                             # is logged and counted
    return app
