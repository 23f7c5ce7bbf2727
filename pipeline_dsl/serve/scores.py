"""POST /v1/score (and /score) and /v1/rerank (and /rerank, /v2/rerank): vLLM's scoring routes,
the ones RAG rerankers call (Jina- and Cohere-compatible clients).

agp's models have no classifier head (a cross-encoder's), so a pair is scored as vLLM scores it
with an embedding model: the cosine similarity of the two texts' embeddings, each embedded exactly
as /v1/embeddings embeds an input (serve/embeddings.py: the mean of the final normed hidden
states). Each distinct text is a request of the pipeline, on the embeddings path (a text given twice
is embedded once): the same limits (at most 2048 texts a request and no more distinct ones than the
queue holds, each within the context and --max-input-tokens), `priority`, `user` and the copied
headers, auth and metrics. `usage` counts every text given, a repeated one each time, as vLLM does.

    /v1/score   {"model", "text_1": str | [str], "text_2": str | [str]}
                -> {"id", "object": "list", "created", "model", "data": [{"index", "object": "score", "score"}],
                    "usage": {"prompt_tokens", "total_tokens", "completion_tokens": 0}}
    /v1/rerank  {"model", "query": str, "documents": [str | {"text": str}], "top_n", "return_documents"}
                -> {"id", "model", "usage": {"prompt_tokens", "total_tokens"},
                    "results": [{"index", "relevance_score", "document": {"text"}}]}   best first

Pairs of /v1/score, as vLLM makes them: one text_1 against each text_2 (1 to N), or text_1[i]
against text_2[i] (N to N); lists of other lengths are a 400.
"""
from __future__ import annotations

import time

import numpy as np

from fastapi import Request
from fastapi.responses import Response

from . import protocol as P
from .embeddings import MAX_INPUTS, Embeddings, pooled_vectors
from .extras import bad

COMMON = {"model", "user", "priority", "request_id"}
SCORE_FIELDS = COMMON | {"text_1", "text_2"}
# max_tokens_per_doc: Cohere's v2 (a document cut to its first so many tokens); null only, as
# langchain-cohere's CohereRerank sends it: agp never cuts a document
RERANK_FIELDS = COMMON | {"query", "documents", "top_n", "return_documents", "max_tokens_per_doc"}


def cosines(vectors: list[list[float]], pairs: list[tuple[int, int]]) -> list[float]:
    """The cosine similarity of each pair (a, b) of `vectors`' indexes (0 where either is all
    zeros): each vector's norm taken once (a rerank's query is in every pair)."""
    m = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(m, axis=1)
    a, b = np.array([p[0] for p in pairs], dtype=np.intp), np.array([p[1] for p in pairs], dtype=np.intp)
    dots, den = np.einsum("ij,ij->i", m[a], m[b]), norms[a] * norms[b]
    return [float(d / n) if n > 0 else 0.0 for d, n in zip(dots.tolist(), den.tolist())]


def _texts(value, field: str) -> list[str]:
    """A string, or a non-empty array of strings, each non-empty."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        texts = list(value)
    else:
        raise bad(field, "a string or a non-empty array of strings", value)
    for i, t in enumerate(texts):
        if not t:
            raise P.APIError(f"'{field}{'' if isinstance(value, str) else f'[{i}]'}' is empty", param=field)
    return texts


def _documents(value) -> list[str]:
    """Rerank's `documents`: a non-empty array of strings or {"text": string} objects."""
    if not isinstance(value, list) or not value:
        raise bad("documents", "a non-empty array of strings or {\"text\": string} objects", value)
    docs = []
    for i, d in enumerate(value):
        text = d.get("text") if isinstance(d, dict) and set(d) == {"text"} else d
        if not isinstance(text, str):
            err = bad(f"documents[{i}]", "a string or a {\"text\": string} object", d)
            err.param = "documents"              # the field; the message names the place
            raise err
        if not text:
            raise P.APIError(f"'documents[{i}]' is empty", param="documents")
        docs.append(text)
    return docs


class Scores:
    """The serving object of /v1/score and /v1/rerank, on the embeddings path (`embeddings`)."""

    def __init__(self, embeddings: Embeddings):
        self.e = embeddings

    def _common(self, body: dict, texts: list[str], places: list[tuple[str, str]],
                param: str, what: str) -> dict:
        """The request's model, identity and pipeline fields, as an embeddings request's; `what`
        names the fields whose texts are embedded, `param` the one a count beyond the limits blames.
        Each distinct text is embedded once (`inputs`, its `places` those of its first mention):
        `slots[i]` is the input `texts[i]` is."""
        g = self.e.g
        base = self.e.request_base(body)
        first: dict[str, int] = {}                 # each distinct text: the index of its first mention
        for i, t in enumerate(texts):
            first.setdefault(t, i)
        inputs, slot_of = list(first), {t: n for n, t in enumerate(first)}
        slots = [slot_of[t] for t in texts]
        queue = g.apipe.runtime.max_queue
        if len(texts) > MAX_INPUTS:
            raise P.APIError(f"{what} make {len(texts)} texts to embed; at most {MAX_INPUTS} a request; send at most "
                             f"{MAX_INPUTS}", param=param)
        if len(inputs) > queue:
            raise P.APIError(f"{what} make {len(inputs)} {'distinct ' if len(inputs) < len(texts) else ''}texts to "
                             f"embed; each is a request of its own in the pipeline's queue, which holds at most "
                             f"{queue} (requests.max_queue, or --max-queue): this request could never be admitted; "
                             f"send at most {queue}", param=param)
        extras = P.parse_extras({"request_id": body.get("request_id")}, chat=False)
        return {**base, "inputs": inputs, "slots": slots, "places": [places[i] for i in first.values()],
                "chat_template_kwargs": None, "request_id": extras.request_id,
                "fields": {"max_tokens": 0, "pooling": "mean", **P.priority_field(body)}}

    # ------------------------------------------------------------ /v1/score

    def parse_score(self, body: dict) -> dict:
        body = P.check_unknown(body, SCORE_FIELDS, self.e.g.config.lenient)
        for field in ("text_1", "text_2"):
            if body.get(field) is None:
                raise P.APIError(f"'{field}' is required", param=field)
        one, two = _texts(body["text_1"], "text_1"), _texts(body["text_2"], "text_2")
        if len(one) != 1 and len(one) != len(two):
            raise P.APIError(f"'text_1' holds {len(one)} texts and 'text_2' {len(two)}: give one text_1 to score "
                             "against each text_2, or as many of each (scored pairwise)", param="text_2")

        def place(field, i):
            return field, field if isinstance(body[field], str) else f"{field}[{i}]"

        places = [place("text_1", i) for i in range(len(one))] + [place("text_2", i) for i in range(len(two))]
        req = self._common(body, one + two, places, "text_2", "'text_1' and 'text_2'")
        slot = req["slots"]
        req["pairs"] = [(slot[0 if len(one) == 1 else i], slot[len(one) + i]) for i in range(len(two))]
        return req

    def answer_score(self, req: dict, results) -> dict:
        vectors, tokens = pooled_vectors(req, results), _tokens(req, results)
        return {"id": req["id"], "object": "list", "created": int(time.time()), "model": req["model"],
                "data": [{"index": i, "object": "score", "score": score}
                         for i, score in enumerate(cosines(vectors, req["pairs"]))],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

    async def score(self, request: Request, body: dict | None = None) -> Response:
        """The answer to a score request (`body`: the request's, when already read)."""
        return await self.e.run(request, body, self.parse_score, self.answer_score, "score")

    # ------------------------------------------------------------ /v1/rerank

    def parse_rerank(self, body: dict) -> dict:
        body = P.check_unknown(body, RERANK_FIELDS, self.e.g.config.lenient)
        query = body.get("query")
        if not isinstance(query, str) or not query:
            raise (P.APIError("'query' is empty", param="query") if query == "" else
                   P.APIError("'query' is required", param="query") if query is None else
                   bad("query", "a string", query))
        if body.get("documents") is None:
            raise P.APIError("'documents' is required", param="documents")
        docs = _documents(body["documents"])
        top_n = body.get("top_n")
        if top_n is not None and not (isinstance(top_n, int) and not isinstance(top_n, bool) and top_n >= 0):
            raise bad("top_n", "a positive integer, or 0 or null for every document", top_n)
        if body.get("max_tokens_per_doc") is not None:
            raise P.APIError("'max_tokens_per_doc' is not supported: a document is never cut (each is embedded whole, "
                             "within the context; a longer one is a 400 naming it); leave it out or null",
                             param="max_tokens_per_doc")
        keep = True if body.get("return_documents") is None else body["return_documents"]
        if not isinstance(keep, bool):
            raise bad("return_documents", "true or false", keep)
        req = self._common(body, [query] + docs,
                           [("query", "query")] + [("documents", f"documents[{i}]") for i in range(len(docs))],
                           "documents", "'query' and 'documents'")
        req.update(documents=docs, top_n=top_n or len(docs), return_documents=keep)
        return req

    def answer_rerank(self, req: dict, results) -> dict:
        vectors, tokens, slot = pooled_vectors(req, results), _tokens(req, results), req["slots"]
        scored = [(score, i) for i, score in enumerate(cosines(vectors, [(slot[0], d) for d in slot[1:]]))]
        scored.sort(key=lambda s: (-s[0], s[1]))          # best first; a tie keeps the documents' order
        return {"id": req["id"], "model": req["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "results": [{"index": i, "relevance_score": score,
                             **({"document": {"text": req["documents"][i]}} if req["return_documents"] else {})}
                            for score, i in scored[:req["top_n"]]]}

    async def rerank(self, request: Request, body: dict | None = None) -> Response:
        """The answer to a rerank request (`body`: the request's, when already read)."""
        return await self.e.run(request, body, self.parse_rerank, self.answer_rerank,
                                "rerank")


def _tokens(req: dict, results) -> int:
    """The prompt tokens of every text of the request, a text given twice counted twice (as vLLM,
    which embeds each one), though it was embedded once."""
    return sum(results[s].usage.get("prompt_tokens", 0) for s in req["slots"])
