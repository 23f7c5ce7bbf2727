"""The routes of `agp serve`, on one module-level router (vLLM's api_server.py shape): each
handler reads what it needs from `request.app.state` (the AsyncPipeline `apipe`, the
`config`, the `metrics` and the serving objects create_app puts there).

Routes: POST /v1/completions, /v1/chat/completions (serve/generation.py), /v1/responses (and GET,
DELETE /v1/responses/{id}, POST /v1/responses/input_tokens: serve/responses.py), /v1/embeddings (serve/embeddings.py),
/v1/score (and /score), /v1/rerank (and /rerank, /v2/rerank: serve/scores.py), GET /v1/models,
/v1/models/{id}, POST /tokenize, /detokenize, GET /tokenizer_info, /version, /health (and HEAD;
/ping, GET and POST, its vLLM name), POST /invocations (SageMaker's, as vLLM's: chat, completions,
embeddings, rerank or score by the body's shape),
/metrics (Prometheus), /stats (counters as JSON), POST /trace/flush; Azure OpenAI's
/openai/deployments/{deployment}/chat/completions, /completions and /embeddings (the deployment
is the model).
"""
from __future__ import annotations

import asyncio
import os
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pipeline_dsl.flow import PipelineError
from pipeline_dsl.requests_io import shown

from . import openapi as OA
from . import protocol as P
from .body import read_json
from .errors import api_error, error_response

router = APIRouter()


def _state(request: Request):
    return request.app.state


async def pipeline_stats(state) -> dict:
    """The runtime's counters; {} when the pipeline failed (it still answers)."""
    try:
        return await state.apipe.stats()
    except Exception:                       # noqa: BLE001 - a failed pipeline still answers
        return {}


def _stage_names(config) -> tuple[str, ...]:
    return tuple(name for name, _ in config.stages)


# ---------------------------------------------------------------- generation

@router.post("/v1/completions", openapi_extra=OA.generation(OA.COMPLETION_REQUEST, OA.COMPLETION_RESPONSE,
                                                            "OpenAI completions"))
async def completions(request: Request):
    return await _state(request).generations.handle(request, P.parse_completion)


@router.post("/v1/chat/completions", openapi_extra=OA.generation(OA.CHAT_REQUEST, OA.CHAT_RESPONSE,
                                                                 "OpenAI chat completions"))
async def chat_completions(request: Request):
    return await _state(request).generations.handle(request, P.parse_chat)


@router.post("/v1/responses", openapi_extra=OA.generation(OA.RESPONSES_REQUEST, OA.RESPONSES_RESPONSE,
                                                          "OpenAI Responses API (serve/responses.py)"))
async def responses(request: Request):
    return await _state(request).responses.create(request)


@router.post("/v1/responses/input_tokens", openapi_extra=OA.RESPONSE_INPUT_TOKENS)
async def count_input_tokens(request: Request):
    return await _state(request).responses.count(request, rendered)


def _no_response(response_id: str, request: Request) -> Response:
    return error_response(P.APIError(_state(request).responses.store.missing(response_id), status=404,
                                     type="not_found_error", param="response_id", code="response_not_found"))


@router.get("/v1/responses/{response_id}", openapi_extra=OA.RESPONSE_GET)
async def get_response(response_id: str, request: Request):
    stream = request.query_params.get("stream")
    if stream is not None and stream.lower() not in ("false", "0"):
        # OpenAI streams a background response again; agp's are answered in the foreground, and a
        # JSON answer to a client that asked for events reads as an empty stream
        return error_response(P.APIError(
            f"'stream' = {shown(stream)}: a stored response is not streamed again (agp answers in the foreground, "
            "'background' is false); GET it without 'stream'", param="stream", quoted=(shown(stream),)))
    found = _state(request).responses.store.get(response_id)
    return found[0] if found is not None else _no_response(response_id, request)


@router.delete("/v1/responses/{response_id}", openapi_extra=OA.RESPONSE_DELETE)
async def delete_response(response_id: str, request: Request):
    if not _state(request).responses.store.delete(response_id):
        return _no_response(response_id, request)
    return {"id": response_id, "object": "response", "deleted": True}


@router.post("/v1/embeddings", openapi_extra=OA.EMBEDDINGS)
async def embeddings(request: Request):
    return await _state(request).embeddings.create(request)


@router.post("/v1/score", openapi_extra=OA.SCORE)
@router.post("/score", openapi_extra=OA.SCORE, operation_id="score_unversioned")       # vLLM serves both
async def score(request: Request):
    return await _state(request).scores.score(request)


@router.post("/v1/rerank", openapi_extra=OA.RERANK)
@router.post("/rerank", openapi_extra=OA.RERANK, operation_id="rerank_unversioned")    # Jina's clients
@router.post("/v2/rerank", openapi_extra=OA.RERANK, operation_id="rerank_v2")          # Cohere's v2 SDK
async def rerank(request: Request):
    return await _state(request).scores.rerank(request)


# SageMaker's one inference route (vLLM serves it beside /ping): the fields an API's body needs pick
# the API, in vLLM's order (chat first: an embeddings body may hold 'messages' too; then completions,
# embeddings, rerank, score); null is left out. A body holding one of an API's two fields goes to it,
# whose own check names the other
INVOCATION_APIS = ((("messages",), "chat completions"), (("prompt",), "completions"), (("input",), "embeddings"),
                   (("query", "documents"), "rerank"), (("text_1", "text_2"), "score"))


@router.post("/invocations", openapi_extra=OA.INVOCATIONS)
async def invocations(request: Request):
    state = _state(request)
    try:
        body = await read_json(request, state.config)
    except P.APIError as err:
        return state.generations.refused(err)
    api = next((api for fields, api in INVOCATION_APIS if any(body.get(f) is not None for f in fields)), None)
    if api == "chat completions":
        return await state.generations.handle(request, P.parse_chat, body)
    if api == "completions":
        return await state.generations.handle(request, P.parse_completion, body)
    if api == "embeddings":
        return await state.embeddings.create(request, body)
    if api == "rerank":
        return await state.scores.rerank(request, body)
    if api == "score":
        return await state.scores.score(request, body)
    said = [f"{' and '.join(repr(f) for f in fields)} ({api})" for fields, api in INVOCATION_APIS]
    fields = f"{', '.join(said[:-1])} or {said[-1]}"
    return state.generations.refused(P.APIError(f"/invocations answers a body holding one of {fields}; this one "
                                                 "holds none of them", code="unknown_request_type"))


# Azure OpenAI's routes, as openai.AzureOpenAI calls them (its key in an `api-key` header, which the
# guard takes): POST /openai/deployments/{deployment}/chat/completions, /completions and /embeddings.
# The deployment in the path is the model that answers (a served name, a generate stage, a LoRA
# adapter), whatever the body's `model` says, as Azure takes it; the `api-version` query is Azure's
# version of its API, which these answer as /v1's do. Azure's other routes (/openai/models,
# /openai/responses) are 404s saying where agp serves them (app.FOREIGN_ROUTES)
AZURE = "/openai/deployments/{deployment}"


async def _deployed(request: Request, deployment: str, answer):
    """`answer(state, body)` of an Azure route's body, its `model` the deployment the path names."""
    state = _state(request)
    try:
        body = await read_json(request, state.config)
    except P.APIError as err:
        return state.generations.refused(err)
    return await answer(state, {**body, "model": deployment})


@router.post(AZURE + "/chat/completions", openapi_extra=OA.azure(OA.generation(
    OA.CHAT_REQUEST, OA.CHAT_RESPONSE, "Azure OpenAI's chat completions: POST /v1/chat/completions")))
async def azure_chat_completions(deployment: str, request: Request):
    return await _deployed(request, deployment,
                           lambda state, body: state.generations.handle(request, P.parse_chat, body))


@router.post(AZURE + "/completions", openapi_extra=OA.azure(OA.generation(
    OA.COMPLETION_REQUEST, OA.COMPLETION_RESPONSE, "Azure OpenAI's completions: POST /v1/completions")))
async def azure_completions(deployment: str, request: Request):
    return await _deployed(request, deployment,
                           lambda state, body: state.generations.handle(request, P.parse_completion, body))


@router.post(AZURE + "/embeddings", openapi_extra=OA.azure({**OA.EMBEDDINGS,
                                                          "summary": "Azure OpenAI's embeddings: POST /v1/embeddings"}))
async def azure_embeddings(deployment: str, request: Request):
    return await _deployed(request, deployment, lambda state, body: state.embeddings.create(request, body))


# ---------------------------------------------------------------- models, tokenizer

def model_entry(state, name: str) -> dict | None:
    """vLLM's model card: `root` the model that answers (its file's or folder's name; null for a
    served name that several models answer: each of its generate stages has an entry naming
    its own), `parent` the served name a generate stage's entry belongs to (null for a served
    name), and vLLM's one `permission` object. A LoRA adapter's (--lora-modules): `root` its folder's
    name, `parent` its base model (its base_model_name, else the first served name), as vLLM's; a
    generate stage's that answers with its own adapter (its `lora`) likewise: `root` the adapter's
    folder's name, `parent` the stage's model."""
    config = state.config

    def card(root: str | None, parent: str | None) -> dict:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "agp", "root": root,
                "parent": parent, "max_model_len": config.max_model_len,
                "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                                "created": state.created, "allow_create_engine": False, "allow_sampling": True,
                                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                "allow_fine_tuning": False, "organization": "*", "group": None,
                                "is_blocking": False}]}

    for lora in config.loras:               # vLLM's card of an adapter: root its folder, parent the base model
        if lora.name == name:
            return card(lora.root, lora.parent)
    if name in config.model_names:
        models = {model for _, model in config.stages}
        return card(models.pop() if len(models) == 1 else None, None)
    own = dict(config.stage_loras)
    for stage, model in config.stages:
        if stage == name:
            return card(own[stage], model) if stage in own else card(model, config.model_names[0])
    return None


def _listed(config) -> list[str]:
    """The names `/v1/models` lists, in its order."""
    adapters = [lora.name for lora in config.loras]     # listed last, as vLLM lists them (docs/serve.md)
    names = [n for n in config.model_names if n not in adapters]
    return names + [s for s in _stage_names(config) if s not in names] + [a for a in adapters if a not in names]


@router.get("/v1/models", openapi_extra=OA.MODELS)
async def models(request: Request):
    state = _state(request)
    return {"object": "list", "data": [model_entry(state, name) for name in _listed(state.config)]}


@router.get("/v1/models/{model_id:path}", openapi_extra=OA.MODEL)
async def model(model_id: str, request: Request):
    state = _state(request)
    entry = model_entry(state, model_id)
    if entry is None:        # the names it answers to, as a request's unknown `model` is told
        return error_response(P.unknown_model(model_id, tuple(_listed(state.config)), type="not_found_error"))
    return entry


async def rendered(runtime, tok: dict) -> list[int]:
    """/tokenize's ids, made on the runtime's render threads, where the pipeline renders its
    conversations: a chat template kept running (up to its 2 s) holds none of the threads that
    parse the other requests."""
    try:
        done = runtime.render_pool.submit(runtime.tokenise, tok, None)
    except RuntimeError:                       # the pool is shut down: the server is going down
        return await asyncio.to_thread(runtime.tokenise, tok, None)
    return await asyncio.wrap_future(done)


@router.post("/tokenize", openapi_extra=OA.TOKENIZE)
async def tokenize(request: Request):
    state = _state(request)
    body: dict = {}
    try:
        body = await read_json(request, state.config)
        tok = P.parse_tokenize(body, served=state.config.model_names, stages=_stage_names(state.config))
        ids = await rendered(state.apipe.runtime, tok)
        strs = (await asyncio.to_thread(state.apipe.runtime.token_strings, ids, tok["pin"])
                if tok["return_token_strs"] else None)
    except P.APIError as err:
        return error_response(err)
    except PipelineError as e:
        return error_response(api_error(e, "chat" if "messages" in body else "completion"))
    return {"count": len(ids), "max_model_len": state.config.max_model_len, "tokens": ids, "token_strs": strs}


@router.get("/tokenizer_info", openapi_extra=OA.TOKENIZER_INFO)
async def tokenizer_info(request: Request):
    """The tokenizer's special tokens and chat template (lm-eval's remote tokenizer reads them)."""
    try:
        return await asyncio.to_thread(_state(request).apipe.runtime.tokenizer_info, None)
    except PipelineError as e:
        return error_response(api_error(e, "completion"))


@router.post("/detokenize", openapi_extra=OA.DETOKENIZE)
async def detokenize(request: Request):
    state = _state(request)
    try:
        body = await read_json(request, state.config)
        ids, model_name = P.parse_detokenize(body, served=state.config.model_names,
                                             stages=_stage_names(state.config),
                                             max_model_len=state.config.max_model_len)
        text = await asyncio.to_thread(state.apipe.runtime.detokenise, ids, model_name)
    except P.APIError as err:
        return error_response(err)
    except PipelineError as e:
        return error_response(api_error(e, "detokenize"))
    return {"prompt": text}


# ---------------------------------------------------------------- operations

@router.get("/health", openapi_extra=OA.HEALTH)
@router.head("/health", openapi_extra=OA.HEALTH)                          # load balancers' probes
@router.get("/ping", openapi_extra=OA.HEALTH, operation_id="ping_get")      # vLLM's (SageMaker's) name
@router.post("/ping", openapi_extra=OA.HEALTH, operation_id="ping_post")
async def health(request: Request):
    apipe = _state(request).apipe
    if apipe.error is not None:
        return JSONResponse({"status": "failed", "error": str(apipe.error)}, 503)
    if not apipe.accepting:            # with the Retry-After of every other route's 503 (and of loading's)
        wait = str(_state(request).config.retry_after_s)
        return JSONResponse({"status": "draining"}, 503, headers={"Retry-After": wait})
    return {"status": "ok"}


@router.get("/version", openapi_extra=OA.VERSION)
async def version():
    from pipeline_dsl import __version__

    return {"version": __version__}


@router.get("/metrics", openapi_extra=OA.METRICS)
async def prometheus(request: Request):
    state = _state(request)
    body, content_type, headers = state.metrics.scrape(await pipeline_stats(state), request.headers.get("accept", ""),
                                                       request.headers.get("accept-encoding", ""))
    return Response(body, media_type=content_type, headers=headers)


@router.get("/stats", openapi_extra=OA.STATS)
async def stats(request: Request):
    """Counters of the pipeline: per stage, per engine, requests."""
    return await pipeline_stats(_state(request))


@router.post("/trace/flush", openapi_extra=OA.TRACE_FLUSH)
async def trace_flush(request: Request):
    state = _state(request)
    path = state.config.trace_path
    if not path:
        return error_response(P.APIError("tracing is off: start the server with --trace FILE", status=404,
                                         type="not_found_error", code="tracing_off"))
    spans = await asyncio.to_thread(write_trace, state.apipe, path)
    return {"trace": os.path.basename(path), "spans": spans}


def write_trace(apipe, path: str) -> int:
    """The runtime's trace so far as a Chrome trace file (written whole, then renamed into place);
    returns the number of spans."""
    trace = apipe.runtime.trace
    tmp = f"{path}.tmp{os.getpid()}"
    trace.write(tmp)
    os.replace(tmp, path)
    return len(trace.spans)

