"""The serving class of POST /v1/completions and /v1/chat/completions (vLLM's
OpenAIServingCompletion / OpenAIServingChat in one): parse the body, submit the request to the
pipeline (a completions batch as one request per prompt), wait for its first event, then answer
with JSON or stream chunks (serve/sse.py). A request refused before its first event is an HTTP
error, for streams too; a client that goes away aborts its request (its KV blocks are freed).
"""
from __future__ import annotations

import asyncio
import functools
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from . import protocol as P
from .access import client_of, request_info
from .answers import answer_body, check_reasoning
from .async_pipeline import AsyncPipeline, EntryRefused, StreamGroup, of_prompt
from .body import read_json
from .config import ServeConfig
from .errors import answer_failed, api_error, error_response
from .extras import parsed_off_loop
from .metrics import ServerMetrics
from .sse import ChunkWriter, EventStream


def json_answer(build, *args) -> tuple[JSONResponse, object]:
    """(`build(*args)`'s body as a JSON response, what else it gave), for a thread off the loop:
    an answer of 64 choices with 20 logprobs a token, or an echoed prompt's, is tens of thousands
    of objects to build and write (seconds on a busy host), and no other request's stream or
    answer waits for it."""
    body, other = build(*args)
    return JSONResponse(body), other


async def wait_or_disconnect(request: Request, work):
    """`await work`, unless the client disconnects first: then (False, None) and `work` cancelled.
    A cancelled future's outcome is taken when it ends (a cancelled `asyncio.gather` ends with
    a CancelledError that asyncio would otherwise log as never retrieved, one per disconnect)."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return True, task.result()
        return False, None
    finally:
        for t in (task, watch):
            if not t.done():
                t.add_done_callback(_outcome_taken)
                t.cancel()


def warned(response: Response, why: str | None) -> Response:
    """`response` with a Warning header (code 299, a persistent warning) saying `why`, where the
    request asked for something its answer does not do (GenerationRequest.format_set_aside)."""
    if why is not None:
        response.headers["Warning"] = f'299 agp "{why}"'
    return response


def _outcome_taken(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class Generations:
    """Completions and chat completions over one AsyncPipeline."""

    def __init__(self, apipe: AsyncPipeline, config: ServeConfig, metrics: ServerMetrics):
        self.apipe, self.config, self.metrics = apipe, config, metrics
        self.stage_names = tuple(name for name, _ in config.stages)

    def parse(self, body: dict, parse) -> P.GenerationRequest:
        c = self.config
        # agp serve MODEL: vLLM's completions default (16), which its request model sets as if sent (a
        # min_tokens above it is refused as when that max_tokens is sent, as vLLM does)
        default = {"default_max_tokens": c.completion_max_tokens} if parse is P.parse_completion else {}
        req = parse(body, max_model_len=c.max_model_len, served=c.model_names, stages=self.stage_names,
                    lenient=c.lenient, stage_n=c.max_stage_n, **default)
        P.check_queue_room(1 + len(req.more_prompts), self.apipe.runtime.max_queue, "prompt")
        check_reasoning(self.apipe.runtime, req)
        return self.token_names(req, body)

    def token_names(self, req: P.GenerationRequest, body: dict) -> P.GenerationRequest:
        """`req` with the server's --return-tokens-as-token-ids where its body does not say
        (chat, completions and responses alike)."""
        if self.config.return_tokens_as_token_ids and body.get("return_tokens_as_token_ids") is None:
            req = replace(req, fields={**req.fields, "return_tokens_as_token_ids": True})
        return req

    def refused(self, err: P.APIError) -> Response:
        """The error answer to a generation request, counted in agp_requests_total by its status."""
        self.metrics.requests.labels(str(err.status)).inc()
        return self.error(err)

    def error(self, err: P.APIError) -> Response:
        """The error answer, not counted (a route that generates nothing, as Responses'
        input_tokens). The one place that decides its Retry-After: the server's retry_after_s
        where the error says to come back (a full queue, a drain, a grammar check's turn), a
        Reject's own where it named one; api_error's and the parsers' are not final."""
        if "Retry-After" in err.headers and not err.rejected:     # a Reject's retry_after is its own
            err.headers["Retry-After"] = str(self.config.retry_after_s)
        return error_response(err)

    async def handle(self, request: Request, parse, body: dict | None = None) -> Response:
        """The answer to a completions or chat request (`body`: the request's, when already read)."""
        try:       # off the event loop: checking a large response_format schema takes seconds of CPU
            if body is None:
                body = await read_json(request, self.config)
            req = await parsed_off_loop(functools.partial(self.parse, body, parse))
        except P.APIError as err:
            return self.refused(err)
        rid = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{request_info(request.scope).adopt(req.request_id)}"
        started = await self.start(request, req, rid)
        if isinstance(started, Response):
            return started
        stream, first = started
        if req.stream:
            return warned(EventStream(ChunkWriter(self.apipe.runtime, stream, first, req, rid, self.ended,
                                                  self.config.system_fingerprint).events(), stream, self.gone),
                          req.format_set_aside)
        return warned(await self.collect(request, stream, first, req, lambda res: self.answer(res, req, rid)),
                      req.format_set_aside)

    async def start(self, request: Request, req: P.GenerationRequest, rid: str):
        """Submit the request and wait for its first event: (stream, first event), or the
        Response that ends it (refused, failed before its first event, client gone)."""
        parts = req.split()                   # a completions batch: one pipeline request per prompt
        params = {"n": req.fields.get("n"), "max_tokens": req.fields.get("max_tokens")}
        client, request_id = client_of(request.scope), request_info(request.scope).id    # the pause log's
        try:
            headers = P.request_headers(request.headers.raw, self.config.request_headers)
        except P.APIError as err:
            return self.refused(err)

        def item(k: int) -> dict:
            return parts[k].item(rid if k == 0 else f"{rid}-{k}",
                                 exclude_tools_when_none=self.config.exclude_tools_when_tool_choice_none,
                                 headers=headers)

        try:
            streams = await self.apipe.add_each([item(k) for k in range(len(parts))], pin=req.pin,
                                                stream=req.stream, params=params, client=client,
                                                request_id=request_id)
        except EntryRefused as r:
            e = of_prompt(r.error, r.index) if len(parts) > 1 else r.error   # which prompt of the batch
            return self.refused(api_error(e, req.kind, max_tokens_field=req.max_tokens_field,
                                          format_field=req.format_field))
        stream = streams[0] if len(streams) == 1 else StreamGroup(streams, req.choices_per_prompt)
        self.metrics.in_flight.inc()
        # held waiting until its answer's writer begins (sse.Relay): the tokens that come before
        # (the loop taking its turns to hand the first event over) are the server's lag, not unread
        stream.waiting = True
        here, first = await wait_or_disconnect(request, stream.__anext__())
        if not here:                          # the client went away while it waited
            stream.abort()
            self.gone()
            return Response(status_code=499)
        if first[0] == "done" and first[1].error is not None:
            stream.abort()                    # a batch's other prompts, when one of them was refused
            self.metrics.in_flight.dec()
            return self.refused(api_error(first[1].error, req.kind, max_tokens_field=req.max_tokens_field,
                                          format_field=req.format_field))
        return stream, first

    def gone(self) -> None:
        """A request whose client went away before its answer."""
        self.ended("499", None, {})

    def ended(self, status: str, result, reasons: dict) -> None:
        """A request that was in flight is over (status: its HTTP status, "499" when the client
        went away)."""
        self.metrics.requests.labels(status).inc()
        self.metrics.in_flight.dec()
        if result is not None:                # what each choice's answer said: tool_calls, not stop
            self.metrics.count_finished(reasons.values(), self.metrics.engine(result))

    async def collect(self, request: Request, stream, first, req: P.GenerationRequest, build) -> Response:
        """Non-streaming: wait for the result and answer `build(result) -> (body, {choice index:
        finish reason})`, or abort when the client disconnects. The body is built and written off
        the loop (json_answer)."""
        async def answer():
            event = first
            while event[0] != "done":
                event = await stream.__anext__()
            return event[1]

        status, result, reasons = "499", None, {}
        try:
            here, res = await wait_or_disconnect(request, answer())
            if not here:
                stream.abort()
                return Response(status_code=499)
            if res.error is not None:
                err = api_error(res.error, req.kind, max_tokens_field=req.max_tokens_field,
                                format_field=req.format_field)
                status = str(err.status)
                return self.error(err)
            try:
                response, reasons = await asyncio.to_thread(json_answer, build, res)
            except Exception as e:            # noqa: BLE001 - this request's 500; the others go on
                err = answer_failed(e)
                status = str(err.status)
                return self.error(err)
            status, result = "200", res
            return response
        finally:
            if not stream.finished:
                stream.abort()
            self.ended(status, result, reasons)

    def answer(self, res, req: P.GenerationRequest, rid: str) -> tuple[dict, dict]:
        """The JSON answer of a finished request, and its choices' finish reasons."""
        return answer_body(self.apipe.runtime, res, req, rid, fingerprint=self.config.system_fingerprint)
