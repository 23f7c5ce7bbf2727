"""The JSON body of a finished completions or chat completions request, from its result.

One builder for every place that answers a whole request at once: agp serve's non-streaming
answers (serve/generation.py) and the OpenAI batch-API lines of `agp run` (commands/batch_api.py),
so a batch output line's `response.body` is what POST /v1/chat/completions would have answered.
No HTTP here: the runtime only lends the tokens' text (logprobs) and detokenises echoed prompts.

Each answer is read with the tokenizer of the generate stage that wrote it (its choice's
`generated_by`, a stream delta's too): a pipeline's generate stages may run models of other
vocabularies, and an unpinned request is answered by whichever stage its route chose.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline_dsl.reasoning import stage_answer_thinks

from . import protocol as P
from .token_fields import answer_fields, logprob_names


def answered_by(runtime, pin: str | None, gen) -> str | None:
    """The generate stage whose model's tokenizer and tool-call form an answer is read with: `gen`,
    the stage that wrote it (its choice's `generated_by`, a delta's), where that names one of the
    pipeline's generate stages; else the request's pinned stage `pin` (None: the pipeline's model).
    A stage's hook may write any JSON value as `generated_by`: one that names no generate stage
    tells nothing of the vocabulary."""
    return gen if isinstance(gen, str) and gen in runtime.seg_of_gen else pin


def call_parser(runtime, req, gen: str | None = None) -> str:
    """The form the tool calls of `req`'s answer by generate stage `gen` (its choice's
    `generated_by`, as `agp run` reads it) are read in: that stage's model's (runtime.tool_parser;
    the pinned stage's, or the pipeline's, where no stage is known), or hermes, unused, when it
    gave no tools. The pin alone would read an unpinned answer of a pipeline whose generate
    stages' models write calls differently in the wrong one's form."""
    return tool_form(runtime, req.pin, req.tool_choice, req.tools_active, gen)


def tool_form(runtime, pin: str | None, tool_choice, active: bool, gen=None) -> str:
    """call_parser's answer from the request's parts (agp run's lines have no GenerationRequest)."""
    return runtime.tool_parser(answered_by(runtime, pin, gen), tool_choice) if active else "hermes"


def thinking_of(runtime, req) -> bool | None:
    """Whether the chat answers of `req` (a GenerationRequest: chat's, or the Responses API's)
    start in their thinking, as agp serve --reasoning-parser reads them (pipeline_dsl.reasoning's
    thinks); None where no reasoning parser reads them (no flag, or /v1/completions, which vLLM
    leaves alone too)."""
    from pipeline_dsl.reasoning import thinks

    parser = getattr(runtime, "reasoning_parser", None)
    if parser is None or req.kind == "completion":
        return None
    return thinks(parser, req.chat_template_kwargs)


def answer_thinks(runtime, req, gen=None, request=None, constrained: bool | None = None) -> bool | None:
    """thinking_of for one answer, by generate stage `gen` to `request` (the dict the stage got):
    an answer no model wrote (`gen` names none of the pipeline's generate stages: a python stage's
    own answer, `returns = any`) has no thinking, and neither has one its stage held to a format
    or a forced tool call from its first token (the stage's json_schema, a python stage's
    response_format; `constrained` where the caller knows it: a stream's delta's, or a result's
    `constrained`, which its generate stage set, as after a join `request` is no longer the one
    the stage got): each is all content, as with thinking off. The request's own format is refused while thinking
    (check_reasoning); one the pipeline sets is its choice."""
    thinking = thinking_of(runtime, req)
    if not thinking:
        return thinking
    return stage_answer_thinks(runtime, gen, request, constrained, thinking)   # the stages' tool calls' rule too


def reasoning_tokens(runtime, req, choices) -> int | None:
    """The tokens of the thinking of a request's answers (its Result's `choices`), as vLLM counts
    usage's reasoning_tokens: each choice's own (its generate stage counted them, `usage`'s
    `reasoning_tokens`) where answer_thinks says it thinks; None where no reasoning parser reads
    them (thinking_of), so the usage says nothing of reasoning."""
    if thinking_of(runtime, req) is None:
        return None
    return thinking_tokens(choices, [answer_thinks(runtime, req, c.data.get("generated_by"), c.data.get("request"),
                                                   c.data.get("constrained")) for c in choices])


def thinking_tokens(choices, thinks) -> int:
    """The reasoning_tokens of `choices` (a Result's), each choice's own (its generate stage counted
    them, `usage`'s `reasoning_tokens`) summed over those whose `thinks` (answer_thinks's, one per
    choice) is true: agp serve's usage (reasoning_tokens) and `agp run`'s lines count them so."""
    return sum((c.data.get("usage") or {}).get("reasoning_tokens") or 0 for c, t in zip(choices, thinks) if t)


def check_reasoning(runtime, req) -> None:
    """A request whose answer starts in its thinking (thinking_of) may not ask for structured output
    or force a tool call: a 400 saying so. A format of {"type": "text"} (many Responses clients send
    `text.format` so by default) is free text, no structured output, and is taken. The constrained decoder would hold the answer to its
    format from its first token, so the model could not think (vLLM applies the format after
    `</think>`, which agp does not)."""
    if not thinking_of(runtime, req):
        return
    forced = req.tools_active and req.tool_choice != "auto"
    refuse_while_thinking(runtime, req.response_format, req.format_field, forced)


def refuse_while_thinking(runtime, fmt, format_field: str, forced: bool) -> None:
    """check_reasoning's 400 for a request whose answer starts in its thinking, from its format (as
    the client wrote it in `format_field`) and whether it forces a tool call (`agp run`'s lines
    give them as their own fields)."""
    constrained = fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text")
    if not constrained and not forced:                 # {"type": "text"}: free text, no format to hold
        return
    field = format_field if constrained else "tool_choice"
    raise P.APIError(f"'{field}' cannot be enforced while the model thinks: --reasoning-parser "
                     f"{runtime.reasoning_parser} splits a thinking answer, and agp applies a format or a forced "
                     "tool call from an answer's first token, not after '</think>' as vLLM does (turn thinking off "
                     "with chat_template_kwargs {\"enable_thinking\": false} under qwen3, or leave the field out)",
                     param=field)


@dataclass(frozen=True)
class Vocabulary:
    """What the logprobs of an answer by generate stage `stage` need of its model's tokenizer:
    token id -> its text (`text_of`), its bytes (`bytes_of`), the name the logprobs give it
    (`name_of`: its text, or "token_id:N"); None where the request asked for none of them."""
    stage: str | None
    text_of: Callable[[int], str] | None
    bytes_of: Callable[[int], bytes] | None
    name_of: Callable[[int], str] | None


class Vocabularies:
    """The tokenizers one request's answers are read with: the model's of the generate stage that
    wrote each choice (answered_by: its `generated_by`, else the request's pin), each stage's made
    once, as first asked for. `fields`: the request's (its `logprobs`, return_tokens_as_token_ids,
    skip_special_tokens); `want_text`: the tokens' text is needed without `logprobs` (vLLM's
    prompt_logprobs). An unpinned request of a pipeline whose generate stages' models have other
    vocabularies, read with the pin's (the pipeline's model's), would name its tokens by another
    vocabulary's ids."""

    def __init__(self, runtime, pin: str | None, fields: dict, want_text: bool = False):
        self.runtime, self.pin, self.fields = runtime, pin, fields
        self.want_lp = fields.get("logprobs") is not None
        self.want_text = want_text or self.want_lp
        self.made: dict[str | None, Vocabulary] = {}

    def of(self, gen=None) -> Vocabulary:
        """The vocabulary of an answer written by generate stage `gen` (None: not known)."""
        stage = answered_by(self.runtime, self.pin, gen)
        vocab = self.made.get(stage)
        if vocab is None:
            text_of = self.runtime.token_text(stage) if self.want_text else None
            bytes_of = self.runtime.token_bytes(stage) if self.want_lp else None
            vocab = self.made[stage] = Vocabulary(stage, text_of, bytes_of, logprob_names(text_of, self.fields))
        return vocab

    def offsets(self, gen=None, start: int = 0) -> P.TextOffsets:
        """A new text_offset counter of one choice written by `gen` (its text from `start`)."""
        vocab = self.of(gen)
        return offsets(self.runtime, vocab.stage, self.fields, vocab.bytes_of, start)

    def detokenise(self, ids: list[int], gen=None) -> str:
        """Token ids as the text of `gen`'s model (an echoed prompt sent as ids)."""
        return self.runtime.detokenise(list(ids), answered_by(self.runtime, self.pin, gen)) if ids else ""


def prompt_text(vocabs: Vocabularies, data: dict) -> str:
    """The prompt of an answer, for echo: as sent, or decoded from the ids it was sent as (by the
    model of the generate stage that answered, which read them)."""
    request = data.get("request") or {}
    if isinstance(request.get("prompt"), str):
        return request["prompt"]
    ids = request.get("prompt_token_ids") or data.get("prompt_token_ids") or []
    return vocabs.detokenise(ids, data.get("generated_by"))


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
    use = P.usage(res.usage["prompt_tokens"], res.usage["completion_tokens"], res.usage["cached_tokens"],
                  reasoning_tokens(runtime, req, res.choices))
    want = req.fields.get("logprobs") is not None
    vocabs = Vocabularies(runtime, req.pin, req.fields, req.prompt_logprobs is not None)
    want_ids = bool(req.fields.get("return_token_ids"))
    if req.kind == "chat":
        choices = []
        for c in res.choices:
            vocab = vocabs.of(c.data.get("generated_by"))
            choices.append((c.index, c.text, c.finish_reason,
                            P.chat_logprobs(c.data.get("logprobs") or [], vocab.name_of, vocab.bytes_of) if want
                            else None,
                            {"stop_reason": c.data.get("stop_reason"),
                             **answer_fields(c.data, None, want_ids, vocab.text_of)[1]}))
        first = res.choices[0].data
        top = answer_fields(first, req.prompt_logprobs, want_ids, vocabs.of(first.get("generated_by")).text_of)[0]
        body = P.chat_response(rid, req.model, choices, use, tools_active=req.tools_active, top=top,
                               call_limit=req.call_limit, fingerprint=fingerprint,
                               parsers=[call_parser(runtime, req, c.data.get("generated_by")) for c in res.choices],
                               reads=[c.tool_read for c in res.choices],
                               thinking=[answer_thinks(runtime, req, c.data.get("generated_by"), c.data.get("request"),
                                                       c.data.get("constrained"))
                                         for c in res.choices],
                               include_reasoning=req.include_reasoning, named=isinstance(req.tool_choice, dict))
        return body, {c["index"]: c["finish_reason"] for c in body["choices"]}
    echo = bool(req.fields.get("echo"))
    choices = []
    for c in res.choices:
        gen = c.data.get("generated_by")
        prompt = prompt_text(vocabs, c.data) if echo else ""
        of_prompt, of_answer = answer_fields(c.data, req.prompt_logprobs, want_ids, vocabs.of(gen).text_of)
        lp = (P.completion_logprobs(c.data, vocabs.of(gen).name_of, prompt if echo else None, vocabs.offsets(gen),
                                    k=req.fields.get("logprobs"))
              if want else None)
        choices.append((c.index, prompt + c.text, c.finish_reason, lp,
                        {"stop_reason": c.data.get("stop_reason"), **of_prompt, **of_answer}))
    return (P.completion_response(rid, req.model, choices, use, fingerprint=fingerprint),
            {c[0]: c[2] for c in choices})
