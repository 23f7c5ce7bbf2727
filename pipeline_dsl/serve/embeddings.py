"""POST /v1/embeddings: an embedding of each input, from the served model itself.

What an embedding is here: the mean, over the input's tokens, of the model's final hidden states
(after its last RMSNorm), L2-normalised to length 1 (`"normalize": false` keeps the raw mean),
(vLLM's MEAN pooler; OpenAI's and vLLM's embeddings are normalised too).
Each input is a request of the pipeline with `max_tokens: 0` and `pooling: "mean"`: the engine
prefills it in chunks beside other requests' decodes and finishes it after its prompt, nothing
sampled, no prefix-cache read (engine/prompt_outputs.py); it carries the HTTP headers agp serve
copies (--request-headers, and those the pipeline's conditions compare) as a chat request does.
It is not a model trained for retrieval: similar texts land near each other only as far as the
language model's states say.

    {"model": "chat", "input": "text" | ["a", "b"] | [1, 2, 3] | [[1, 2], [3]],
     "encoding_format": "float" | "base64", "dimensions": H, "priority": 0, "add_special_tokens": true,
     "embed_dtype": "float32", "endianness": "native"}

vLLM's chat form embeds one conversation instead of `input`: `{"messages": [...],
"add_generation_prompt": false, "continue_final_message": false, "chat_template_kwargs": {...}}`,
rendered by the chat template as a chat request's messages are, but without the assistant's turn
opened after them unless `add_generation_prompt` is true (vLLM's default for embeddings).

`embed_dtype` and `endianness` (vLLM's) say how a base64 embedding's numbers are written: float32
(OpenAI's), float16, bfloat16 or fp8 (e4m3, e5m2), in the server's own byte order ("native", vLLM's
default) or in the one named; a float embedding is a list of numbers whatever they say.

`add_special_tokens` (vLLM's) is a completions request's: false embeds a text input without the
start token its tokenizer would put first. `priority` (vLLM's) is a generation request's: lower
is admitted first where the engine schedules by priority, and a non-zero value is a 400 where it
schedules fcfs.
"""
from __future__ import annotations

import asyncio
import base64
import math
import struct
import sys

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pipeline_dsl.requests_io import IGNORED, check_fields, request_item

from . import protocol as P
from .access import request_info
from .async_pipeline import EntryRefused
from .body import read_json
from .errors import api_error
from .extras import bad, request_errors
from .generation import wait_or_disconnect

FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "normalize", "request_id", "priority",
          "add_special_tokens", "embed_dtype", "endianness", "truncate_prompt_tokens",
          "messages", "add_generation_prompt", "continue_final_message", "chat_template_kwargs"}   # the chat form
# vLLM's embed_dtype of a base64 embedding: its torch dtype, and the integer dtype of the same width
# whose bytes are written (bfloat16 and fp8 are their bit patterns)
EMBED_DTYPES = {"float32": ("float32", "int32"), "float16": ("float16", "int16"), "bfloat16": ("bfloat16", "int16"),
                "fp8_e4m3": ("float8_e4m3fn", "uint8"), "fp8_e5m2": ("float8_e5m2", "uint8")}
ENDIANNESS = ("native", "big", "little")
MAX_INPUTS = 2048          # inputs one request may embed: OpenAI's limit (clients batch up to it: LangChain
                           # 1000, the Vercel AI SDK 2048); each is a request in the queue, so --max-queue bounds it too


def _inputs(value, max_model_len: int, keep: int | None = None) -> list:
    """`input`: a string, an array of token ids, or an array of either (each a string or ids; its
    last `keep` ids when truncated: vLLM's truncate_prompt_tokens)."""
    def ids_ok(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                       for t in v)

    if isinstance(value, str) or ids_ok(value):
        batch = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) or ids_ok(v) for v in value):
        batch = list(value)
    else:
        raise bad("input", "a string, an array of token ids, or a non-empty array of those", value)
    return P.bounded_batch(batch, "input", "inputs", MAX_INPUTS, max_model_len, keep)


def encode(vector: list[float], fmt: str, dtype: str = "float32", endianness: str = "native"):
    """The embedding as a list of floats, or base64 of its numbers as `dtype` in the byte order
    `endianness` (float32 little-endian: OpenAI's)."""
    if fmt == "base64":
        return base64.b64encode(binary(vector, dtype, endianness)).decode("ascii")
    return vector


def binary(vector: list[float], dtype: str, endianness: str) -> bytes:
    """The numbers of `vector` as `dtype` (EMBED_DTYPES), in the byte order `endianness` (ENDIANNESS)."""
    order = sys.byteorder if endianness == "native" else endianness
    if dtype == "float32":
        return struct.pack(f"{'<' if order == 'little' else '>'}{len(vector)}f", *vector)
    import torch

    real, bits = (getattr(torch, name) for name in EMBED_DTYPES[dtype])
    out = torch.tensor(vector, dtype=torch.float32).to(real).view(bits).numpy()
    return (out if order == sys.byteorder else out.byteswap()).tobytes()


def normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else list(vector)


def _field(req: dict, i: int) -> str:
    """How an error names input i of a parsed request: a scoring request's own field, `messages`,
    `input`, or `input[i]` of a list."""
    if "places" in req:
        return req["places"][i][1]
    if isinstance(req["inputs"][i], tuple):
        return "messages"
    return "input" if len(req["inputs"]) == 1 else f"input[{i}]"


def answered_in_words(req: dict, i: int, res) -> P.APIError:
    """The 400 of an input the pipeline answered with words instead of its embedding: a python
    stage (a guard) answered the request itself, or put a result of its own in the place of the
    generate stage's. The pipeline's word on the request, as a `Reject` is: the client gets it (and
    the stage's text), and the server did nothing wrong."""
    field = _field(req, i)
    if "places" in req:                      # a scoring request's: each text's own field (serve/scores.py)
        param = req["places"][i][0]
    else:
        param = "messages" if isinstance(req["inputs"][i], tuple) else "input"
    text = res.choices[0].text if res.choices else ""
    said = f"{text[:200]!r}" if text else ""
    data = res.choices[0].data if res.choices else None
    who = ("a join's fn merged its branches into an answer of its own: for an input with a `pooling` field "
           "it returns the branch's index, 0, and a returns = many stage returns [item]"
           if isinstance(data, dict) and "branches" in data else
           "a python stage answered it in the generate stage's place")
    return P.APIError(f"the pipeline answered '{field}' with text of its own, not an embedding ({who})"
                      f"{': ' + said if said else ''}", param=param, code="rejected", quoted=(said,))


def placed(req: dict, i: int, err: P.APIError) -> P.APIError:
    """`err`, about input i of the parsed request `req`, naming a scoring request's field and which
    text it is, `messages` where the input is vLLM's chat form, or which of a list's inputs it is
    (`'input[1]': prompt of 2088 tokens exceeds ...`: a client of a batch is told which to fix);
    agp serve and agp run alike."""
    if "places" in req and err.param == "input":
        err.param, place = req["places"][i]
        err.message = f"'{place}': {err.message}"
    elif err.param == "input" and isinstance(req["inputs"][i], tuple):
        err.param = "messages"
    elif err.param == "input" and len(req["inputs"]) > 1:
        err.message = f"'input[{i}]': {err.message}"
    return err


def pooled_vectors(req: dict, results) -> list[list[float]]:
    """Each input's pooled vector (the raw mean), in order; an input the pipeline answered with
    words instead is a 400 (answered_in_words), and so are inputs its routes sent to models of
    different widths (one answer's vectors are compared with each other: a pipeline that routes
    by length, say, embeds each input with the model of its branch)."""
    vectors = []
    for i, res in enumerate(results):
        pooled = res.choices[0].data.get("pooled") if res.choices else None
        if pooled is None:
            raise answered_in_words(req, i, res)
        vectors.append(pooled)
    other = next((i for i, v in enumerate(vectors) if len(v) != len(vectors[0])), None)
    if other is not None:
        def by(i):
            stage = results[i].choices[0].data.get("generated_by")
            return f"{f'generate stage {stage!r}, ' if stage else ''}{len(vectors[i])} dimensions"
        raise P.APIError(f"'{_field(req, 0)}' and '{_field(req, other)}' were embedded by different models "
                         f"({by(0)}; {by(other)}): the vectors of two models cannot be compared; name one "
                         "generate stage in 'model' to embed every input with its model", param="model",
                         code="mixed_models")
    return vectors


def request_base(body: dict, served: tuple[str, ...], stages: tuple[str, ...]) -> dict:
    """{"model", "pin", "identity"} of a request on the embeddings path (embeddings, score,
    rerank): the model it names and its end user, as chat's `user` (a string), who reaches the
    pipeline as on chat (a per-user gate or route sees who embeds)."""
    model, pin = P.model_of(body, served, stages)
    with request_errors:
        check_fields(body, {"user": IGNORED["user"]})
    return {"model": model, "pin": pin, "identity": {"user": body["user"]} if body.get("user") is not None else None}


def parse_request(body: dict, *, max_model_len: int, served: tuple[str, ...], stages: tuple[str, ...] = (),
                  lenient: bool = False, max_queue: int | None = None) -> dict:
    """An embeddings body checked (APIError naming the field at fault): the request to run, its
    inputs and how its answer is written. agp serve's /v1/embeddings and agp run's batch-API lines
    read it alike; `max_queue`: what the pipeline's queue holds (agp serve admits a request's inputs
    together), None where they are taken as the queue has room (agp run)."""
    body = P.check_unknown(body, FIELDS, lenient)
    base = request_base(body, served, stages)
    chat = body.get("messages") is not None
    if chat and body.get("input") is not None:
        raise P.APIError("give 'input' or 'messages', not both", param="messages")
    if not chat and body.get("input") is None:
        raise P.APIError("'input' is required (or 'messages', vLLM's chat form)", param="input")
    rendering = [k for k in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs")
                 if body.get(k) is not None]
    if rendering and not chat:
        raise P.APIError(f"'{rendering[0]}' renders 'messages', and this request embeds an 'input'",
                         param=rendering[0])
    if chat and body.get("add_special_tokens"):
        raise P.APIError("'add_special_tokens' = true is not supported with 'messages': the chat template writes "
                         "the special tokens (leave it out or use false)", param="add_special_tokens")
    messages, render, template_kwargs = P.conversation(body) if chat else (None, {}, None)

    def given(name: str, default: str):           # null is left out; 0, false or "" is a value to refuse
        return default if body.get(name) is None else body[name]

    fmt = given("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad("encoding_format", "float or base64", fmt)
    dims = body.get("dimensions")
    if dims is not None and not (isinstance(dims, int) and not isinstance(dims, bool) and dims > 0):
        raise bad("dimensions", "a positive integer", dims)
    normalize = True if body.get("normalize") is None else body["normalize"]     # null: left out
    if not isinstance(normalize, bool):
        raise bad("normalize", "true or false", normalize)
    dtype, endianness = given("embed_dtype", "float32"), given("endianness", "native")
    if not isinstance(dtype, str) or dtype not in EMBED_DTYPES:      # a list or an object is no key
        raise bad("embed_dtype", "one of " + ", ".join(EMBED_DTYPES), dtype)
    if endianness not in ENDIANNESS:
        raise bad("endianness", "one of " + ", ".join(ENDIANNESS), endianness)
    extras = P.parse_extras({"request_id": body.get("request_id")}, chat=False)
    truncated = P.truncation(body, max_model_len)      # vLLM's: each input's last k tokens
    keep = truncated.get("truncate_prompt_tokens")
    inputs = [messages] if chat else _inputs(body["input"], max_model_len, keep)
    if max_queue is not None:
        P.check_queue_room(len(inputs), max_queue, "input")
    return {**base, "format": fmt,
            "inputs": inputs,
            "chat_template_kwargs": template_kwargs,
            "dimensions": dims, "normalize": normalize, "request_id": extras.request_id,
            "dtype": dtype, "endianness": endianness,
            "fields": {"max_tokens": 0, "pooling": "mean", **P.priority_field(body), **truncated,
                       **({"add_generation_prompt": False, **render} if chat else P.add_special_tokens(body))}}


def input_items(req: dict, rid: str, headers: dict | None = None) -> list[dict]:
    """The pipeline requests of a parsed embeddings request (parse_request), one per input,
    `{rid}-{i}` each."""
    return [request_item(f"{rid}-{i}", messages=v if isinstance(v, tuple) else None,
                         prompt=v if isinstance(v, str) else None,
                         prompt_token_ids=v if isinstance(v, list) else None,
                         fields=req["fields"], model=req["model"], chat_template_kwargs=req["chat_template_kwargs"],
                         identity=req["identity"], headers=headers)
            for i, v in enumerate(req["inputs"])]


def answer_body(req: dict, results) -> dict:
    """The embeddings answer of a parsed request's results (one per input, in order); an input the
    pipeline answered with words is a 400 (answered_in_words), a `dimensions` other than the
    model's too."""
    data, tokens = [], 0
    for i, (res, pooled) in enumerate(zip(results, pooled_vectors(req, results))):
        if req["dimensions"] is not None and req["dimensions"] != len(pooled):
            raise P.APIError(f"'dimensions' = {req['dimensions']}: this model's embeddings have {len(pooled)}",
                             param="dimensions")
        vector = normalised(pooled) if req["normalize"] else pooled
        data.append({"object": "embedding", "index": i, "embedding": encode(vector, req["format"], req["dtype"],
                                                                          req["endianness"])})
        tokens += res.usage.get("prompt_tokens", 0)
    return {"object": "list", "data": data, "model": req["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class Embeddings:
    """The serving object of /v1/embeddings, on the app's AsyncPipeline."""

    def __init__(self, generations):
        self.g = generations

    def request_base(self, body: dict) -> dict:
        """{"model", "pin", "identity"} of a request on the embeddings path (embeddings, score,
        rerank): request_base with this server's names."""
        return request_base(body, self.g.config.model_names, self.g.stage_names)

    def parse(self, body: dict) -> dict:
        c = self.g.config
        return parse_request(body, max_model_len=c.max_model_len, served=c.model_names, stages=self.g.stage_names,
                             lenient=c.lenient, max_queue=self.g.apipe.runtime.max_queue)

    async def create(self, request: Request, body: dict | None = None) -> Response:
        """The answer to an embeddings request (`body`: the request's, when already read)."""
        return await self.run(request, body, self.parse, self.answer, "embd")

    async def run(self, request: Request, body: dict | None, parse, answer, prefix: str) -> Response:
        """Embed the inputs `parse(body)` lists and answer `answer(req, results)`: the path of
        /v1/embeddings, and of /v1/score and /v1/rerank (serve/scores.py), which embed their texts
        the same way, within the same limits, counted in the same metrics. `req["places"]` (a
        scoring request's) names each input's field in the errors: (param, place)."""
        g = self.g
        try:       # off the event loop, as chat's: 2048 inputs of ids in a 4 MiB body take ~0.2 s to check
            req = await asyncio.to_thread(parse, body if body is not None else await read_json(request, g.config))
            headers = P.request_headers(request.headers.raw, g.config.request_headers)
        except P.APIError as err:
            return g.refused(err)
        rid = f"{prefix}-{request_info(request.scope).adopt(req['request_id'])}"
        req["id"] = rid                          # the answer's id (a scoring answer carries one)
        try:
            streams = await g.apipe.add_each(input_items(req, rid, headers), pin=req["pin"])
        except EntryRefused as r:            # refused as it came (a full queue, a text too long for any engine)
            return g.refused(placed(req, r.index, api_error(r.error, "embeddings")))
        g.metrics.in_flight.inc()
        status = "499"
        try:
            here, results = await wait_or_disconnect(request, asyncio.gather(*(self._result(st) for st in streams)))
            if not here:
                return Response(status_code=499)
            failed = next((i for i, r in enumerate(results) if r.error is not None), None)
            if failed is not None:
                err = placed(req, failed, api_error(results[failed].error, "embeddings"))
                status = str(err.status)
                return g.error(err)
            try:
                # built and written off the loop, as a generation's answer (generation.json_answer)
                response = await asyncio.to_thread(lambda: JSONResponse(answer(req, results)))
            except P.APIError as err:
                status = str(err.status)
                return g.error(err)
            status = "200"
            return response
        finally:
            for st in streams:
                if not st.finished:
                    st.abort()
            g.metrics.requests.labels(status).inc()
            g.metrics.in_flight.dec()

    @staticmethod
    async def _result(stream):
        async for event in stream:
            if event[0] == "done":
                return event[1]

    def answer(self, req: dict, results) -> dict:
        return answer_body(req, results)
