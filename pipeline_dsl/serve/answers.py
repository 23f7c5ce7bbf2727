"""The JSON body of a finished completions or chat completions request, from its result.

One builder for every place that answers a whole request at once: agp serve's non-streaming
answers (serve/generation.py) and the OpenAI batch-API lines of `agp run` (commands/batch_api.py),
so a batch output line's `response.body` is what POST /v1/chat/completions would have answered.
No HTTP here: the runtime only lends the tokens' text (logprobs) and detokenises echoed prompts.
"""
from __future__ import annotations

from . import protocol as P
from .token_fields import answer_fields, logprob_names


def call_parser(runtime, req, gen: str | None = None) -> str:
    """The form the tool calls of `req`'s answer by generate stage `gen` (its choice's
    `generated_by`, as `agp run` reads it) are read in: that stage's model's (runtime.tool_parser;
    the pinned stage's, or the pipeline's, where no stage is known), or hermes, unused, when it
    gave no tools. The pin alone would read an unpinned answer of a pipeline whose generate
    stages' models write calls differently in the wrong one's form."""
    return runtime.tool_parser(gen or req.pin, req.tool_choice) if req.tools_active else "hermes"


def prompt_text(runtime, data: dict, req: P.GenerationRequest) -> str:
    """The prompt of an answer, for echo: as sent, or decoded from the ids it was sent as."""
    request = data.get("request") or {}
    if isinstance(request.get("prompt"), str):
        return request["prompt"]
    ids = request.get("prompt_token_ids") or data.get("prompt_token_ids") or []
    return runtime.detokenise(list(ids), req.pin) if ids else ""


def offsets(runtime, pin: str | None, fields: dict, bytes_of, start: int = 0) -> P.TextOffsets:
    """The text_offset counter of one choice of a request (its text from `start`) answered by
    generate stage `pin` with these per-request `fields` (its skip_special_tokens): agp serve's
    and `agp run` lines' alike."""
    return P.TextOffsets(bytes_of, start, runtime.special_token_ids(pin),
                         fields.get("skip_special_tokens", True) is not False, runtime.bytes_decoder(pin)())


def answer_body(runtime, res, req: P.GenerationRequest, rid: str,
                fingerprint: str | None = None) -> tuple[dict, dict]:
    """(the JSON answer of a finished request, {choice index: finish reason}). `fingerprint`:
    OpenAI's system_fingerprint of the configuration that answered (serve/build.py)."""
    use = P.usage(res.usage["prompt_tokens"], res.usage["completion_tokens"], res.usage["cached_tokens"])
    want = req.fields.get("logprobs") is not None
    text_of = runtime.token_text(req.pin) if want or req.prompt_logprobs is not None else None
    want_ids = bool(req.fields.get("return_token_ids"))
    bytes_of = runtime.token_bytes(req.pin) if want else None
    name_of = logprob_names(text_of, req.fields)
    if req.kind == "chat":
        choices = [(c.index, c.text, c.finish_reason,
                    P.chat_logprobs(c.data.get("logprobs") or [], name_of, bytes_of) if want else None,
                    {"stop_reason": c.data.get("stop_reason"), **answer_fields(c.data, None, want_ids, text_of)[1]})
                   for c in res.choices]
        top = answer_fields(res.choices[0].data, req.prompt_logprobs, want_ids, text_of)[0]
        body = P.chat_response(rid, req.model, choices, use, tools_active=req.tools_active, top=top,
                               call_limit=req.call_limit, fingerprint=fingerprint,
                               parsers=[call_parser(runtime, req, c.data.get("generated_by")) for c in res.choices],
                               reads=[c.tool_read for c in res.choices])
        return body, {c["index"]: c["finish_reason"] for c in body["choices"]}
    echo = bool(req.fields.get("echo"))
    choices = []
    for c in res.choices:
        prompt = prompt_text(runtime, c.data, req) if echo else ""
        of_prompt, of_answer = answer_fields(c.data, req.prompt_logprobs, want_ids, text_of)
        lp = (P.completion_logprobs(c.data, name_of, prompt if echo else None,
                                    offsets(runtime, req.pin, req.fields, bytes_of), k=req.fields.get("logprobs"))
              if want else None)
        choices.append((c.index, prompt + c.text, c.finish_reason, lp,
                        {"stop_reason": c.data.get("stop_reason"), **of_prompt, **of_answer}))
    return (P.completion_response(rid, req.model, choices, use, fingerprint=fingerprint),
            {c[0]: c[2] for c in choices})
