"""OpenAI batch-API files in `agp run`: input lines and output lines in the Batch API's shapes.

An input line `{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`
(`url` also /v1/completions and /v1/embeddings) is answered by one output line, in input order, as OpenAI's batch
output file and vLLM's `run_batch` write it:

    {"id": "batch_req_3", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "chatcmpl-3", "body": {chat.completion}}, "error": null}

A line that cannot run keeps its custom_id: `response` holds the HTTP status and error body agp
serve would have answered, and `error` holds `{"code", "message", "line"}`, so scripts that look at
either find it. The body goes through agp serve's own validation (serve/protocol.py), so a batch
line accepts exactly what POST to that url accepts; its `model` is echoed back, and pins a generate
stage where it names one. A completions `prompt` array is answered in one body as POST
/v1/completions answers it (one pipeline request per prompt, choice i of prompt k numbered
k * n + i, usage summed); `stream` is ignored, a batch answer being one body. `agp bench
--workload` takes the same files (`workload_request`), one prompt a line.
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

from pipeline_dsl.flow import failed_with
from pipeline_dsl.requests_io import SAMPLING_FIELDS, ParsedRequest, RequestError, whole_numbers
from pipeline_dsl.serve import protocol as P
from pipeline_dsl.serve.answers import answer_body
from pipeline_dsl.serve.api_error import APIError

ENDPOINTS = {"/v1/chat/completions": ("chat", P.parse_chat, "chatcmpl"),
             "/v1/completions": ("completion", P.parse_completion, "cmpl"),
             "/v1/embeddings": ("embeddings", None, "embd")}      # serve/embeddings.py reads its bodies


def is_batch_line(obj) -> bool:
    """A batch-API request line: an object with a custom_id (what no plain request line has)."""
    return isinstance(obj, dict) and "custom_id" in obj


@dataclass
class BatchLine:
    """One batch-API input line, its envelope checked; the body is checked once the model is
    loaded (its context bounds max_tokens)."""
    custom_id: str
    url: str
    body: dict
    line: int
    call: P.GenerationRequest | None = None      # the body, parsed as agp serve parses it
    embed: dict | None = None                    # an embeddings body instead, parsed as agp serve parses it
    parts: list | None = None                    # ... and its inputs' results, once in (result)
    built: dict | None = None                    # ... and the answer's body made of them (result)

    @property
    def id(self):
        return self.custom_id

    def parse(self, max_model_len: int, stages: tuple[str, ...], default_model: str, max_stage_n: int = 1) -> None:
        """Check the body as POST `url` would (APIError saying why not); `max_stage_n`: the largest
        `n` of the pipeline's generate stages, which answers a body that gives none."""
        _, parse, _ = ENDPOINTS[self.url]
        model = self.body.get("model")
        served = (model if isinstance(model, str) and model else default_model,)
        if parse is None:                        # embeddings: one pipeline request per input, taken as the queue has room
            from pipeline_dsl.serve.embeddings import parse_request

            self.embed = parse_request(self.body, max_model_len=max_model_len, served=served, stages=stages)
            return
        body = {k: v for k, v in self.body.items() if k not in ("stream", "stream_options")}
        self.call = parse(body, max_model_len=max_model_len, served=served, stages=stages, stage_n=max_stage_n)

    @property
    def rid(self) -> str:
        return f"{ENDPOINTS[self.url][2]}-{self.line}"

    def items(self) -> list[dict]:
        """The pipeline requests of the body: one, or one per prompt of a completions batch
        (`"prompt": ["a", "b"]`), answered together as POST /v1/completions answers them
        (choice i of prompt k numbered k * per + i, those past per after every prompt's)."""
        if self.embed is not None:
            from pipeline_dsl.serve.embeddings import input_items

            return input_items(self.embed, self.rid)
        return [part.item(self.rid if k == 0 else f"{self.rid}-{k}") for k, part in enumerate(self.call.split())]

    @property
    def pin(self) -> str | None:
        return self.embed["pin"] if self.embed is not None else self.call.pin

    def result(self, results: list):
        """One result of its items' results (several: a completions batch's prompts, an embeddings
        body's inputs), as agp serve answers them: choices renumbered, usage summed, the first error
        wins. An embeddings line keeps its inputs' own results too (`parts`), and its answer's body is
        made of them here (`built`): a body agp serve would refuse (a `dimensions` the model cannot
        give, an input the pipeline answered with words) fails the result here, with that 400, so the
        run's summary and --stats count the line as its output line shows it."""
        if self.embed is not None:
            return self._embedded(results)
        return _combined(results, self.call.choices_per_prompt)

    def _embedded(self, results: list):
        """The result of an embeddings line's inputs: the first failed input's own error (its
        output line names the input as agp serve does, `placed`, and nothing before it does), else
        their usage summed, with the answer's body made of them (`built`)."""
        self.parts = results
        failed = next((r for r in results if r.error is not None), None)
        if failed is not None:
            return failed_with(results[0], failed.error)
        result = _combined(results, 1)
        from pipeline_dsl.serve.embeddings import answer_body as embeddings_body
        from pipeline_dsl.serve.errors import as_pipeline_error

        try:
            self.built = embeddings_body(self.embed, results)
        except APIError as err:
            return failed_with(result, as_pipeline_error(err))
        return result

    def answer(self, result, runtime) -> dict:
        """The output line of a finished request: its answer, or the error it ended with."""
        if self.embed is not None:
            return self._embeddings(result)
        if result.error is not None:
            from pipeline_dsl.serve.errors import api_error

            return error_record(self.custom_id, self.line, api_error(
                result.error, self.call.kind, max_tokens_field=self.call.max_tokens_field,
                format_field=self.call.format_field), self.rid)
        body, _ = answer_body(runtime, result, self.call, self.rid, fingerprint=fingerprint(runtime))
        out = output_record(self.custom_id, self.line, 200, body, self.rid)
        why = self.call.format_set_aside      # the body's format, set aside by a forced tool call
        if why is not None:                   # what agp serve's Warning header says of this body's answer
            out["warning"] = why
        return out

    def _embeddings(self, result) -> dict:
        """The output line of an embeddings body: agp serve's answer (made in `result`), or the error
        it would have given."""
        from pipeline_dsl.serve.embeddings import placed
        from pipeline_dsl.serve.errors import api_error

        if result.error is not None:
            err = api_error(result.error, "embeddings")
            failed = next((i for i, r in enumerate(self.parts or ()) if r.error is not None), None)
            if failed is not None:             # the first input that failed: its field, as agp serve names it
                err = placed(self.embed, failed, err)
            return error_record(self.custom_id, self.line, err, self.rid)
        return output_record(self.custom_id, self.line, 200, self.built, self.rid)


# runtime -> its system_fingerprint, computed once; weak, so a finished run's runtime (its model
# and KV pool) is not kept alive by the cache
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _combined(results: list, choices_per_prompt: int):
    """The one result of a line's items' results (its prompts or inputs), as agp serve combines
    them; a single one as it is."""
    if len(results) == 1:
        return results[0]
    from pipeline_dsl.serve.async_pipeline import combine

    return combine(results, choices_per_prompt)


def fingerprint(runtime) -> str:
    """The run's system_fingerprint, as agp serve gives it for the same pipeline and model."""
    from pipeline_dsl.serve.build import system_fingerprint

    got = _FINGERPRINTS.get(runtime)
    if got is None:
        got = _FINGERPRINTS[runtime] = system_fingerprint(runtime)
    return got


def read_line(obj: dict, line: int) -> BatchLine:
    """The envelope of a batch line checked: custom_id a string, method POST, a url agp answers,
    body an object (RequestError saying which and why)."""
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise RequestError(f"'custom_id' must be a non-empty string, got {json.dumps(cid)[:60]}", param="custom_id")
    extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if extra:
        raise RequestError(f"a batch request line has custom_id, method, url and body; {extra[0]!r} belongs "
                           "inside 'body'", param=extra[0])
    if obj.get("method", "POST") != "POST":
        raise RequestError(f"'method' must be \"POST\", got {json.dumps(obj.get('method'))[:40]}", param="method")
    url = obj.get("url")
    if url not in ENDPOINTS:
        urls = list(ENDPOINTS)
        raise RequestError(f"'url' must be {', '.join(urls[:-1])} or {urls[-1]}, got {json.dumps(url)[:60]}",
                           param="url")
    if not isinstance(obj.get("body"), dict):
        raise RequestError("'body' must be the request object, as POSTed to the url", param="body")
    return BatchLine(cid, url, whole_numbers(obj["body"]), line)   # read as agp serve reads a body


def output_record(custom_id, line: int, status: int, body: dict, rid: str | None = None,
                  error: dict | None = None) -> dict:
    """The output line of input line `line`, in the Batch API's shape: the HTTP answer agp serve
    gives its body (`status`, `body`; `rid` its request id) and the error, where it is one."""
    return {"id": f"batch_req_{line}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": rid, "body": body}, "error": error}


def error_record(custom_id, line: int, err: APIError, rid: str | None = None) -> dict:
    """The output line of a batch line that could not run: the HTTP answer agp serve would have
    given (status and error body), and the error itself with the input line it came from."""
    return output_record(custom_id, line, err.status, err.body(), rid,
                         {"code": err.code or err.type, "message": err.message, "line": line})


def workload_request(obj: dict, line: int) -> ParsedRequest:
    """A batch line as a request of `agp bench`'s workload: its body checked as agp serve checks
    it (RequestError saying why not), its custom_id the id. The body's `model` names the batch
    file's model, not a target: each target answers with its own."""
    batch = read_line(obj, line)
    if batch.url == "/v1/embeddings":
        raise RequestError("an /v1/embeddings line generates nothing: agp bench measures generation (chat and "
                           "completions lines)", param="url")
    try:
        batch.parse(1 << 30, (), "workload")        # the context is each target's to bound
    except APIError as e:
        raise RequestError(e.message, param=e.param) from None
    call = batch.call
    if call.more_prompts:                           # a workload line is one measured request
        raise RequestError(f"'prompt' holds {1 + len(call.more_prompts)} prompts; a workload line is one "
                           "request (write one line per prompt)", param="prompt")
    sampling = {k: v for k, v in call.fields.items() if k in SAMPLING_FIELDS}
    extras = {k: v for k, v in call.fields.items() if k not in sampling and k != "n"}
    return ParsedRequest(id=batch.custom_id, prompt=call.prompt,
                         messages=[dict(m) for m in call.messages] if call.messages else None,
                         prompt_token_ids=list(call.prompt_token_ids) if call.prompt_token_ids else None,
                         sampling=sampling, n=call.fields.get("n"), metadata=call.metadata,
                         tools=list(call.tools) if call.tools else None, tool_choice=call.tool_choice,
                         parallel_tool_calls=call.parallel_tool_calls, response_format=call.response_format,
                         format_field=call.format_field, extras=extras)
