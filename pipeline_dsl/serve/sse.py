"""Server-sent events of a completions or chat request (`"stream": true`).

`ChunkWriter(...).events()` yields the chunks as tokens come, per choice index: chat opens each
choice with the assistant role, completions with `echo` first send the prompt; then content
(and tool-call deltas when the request gave tools), a finishing chunk per choice, the usage
chunk if asked, and `data: [DONE]`. Choices whose results went through later stages arrive
whole. With vLLM's `return_token_ids` every chunk of a choice carries its tokens' ids (the chat
role chunk none) and the choice's first chunk the prompt's ids (chat: at the chunk's top), as
`prompt_logprobs` (0 on a stream) does. `EventStream` is the response that carries them.
"""
from __future__ import annotations

import time
from json.encoder import encode_basestring

import anyio
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from . import protocol as P
from .access import request_info
from .answers import (Vocabularies, Vocabulary, answer_thinks, call_parser, prompt_text, reasoning_tokens,
                      thinking_of)
from .async_pipeline import RequestStream
from .errors import answer_failed, api_error, log_error
from .server import SEND_WATCH
from .token_fields import answer_fields


class EventStream(StreamingResponse):
    """Server-sent events. The client's going is watched for while the answer streams, not only
    noticed at the next write: a stream with nothing to send for a while (tokens with no text, a
    tool call held until it parses) still stops at once, its request aborted (the events'
    generator is closed). A client gone before the first byte still ends the request (on_gone)."""

    def __init__(self, content, stream: RequestStream, on_gone, headers: dict | None = None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._stream, self._on_gone = stream, on_gone

    async def __call__(self, scope, receive, send):
        info = request_info(scope)
        ended = False
        watch = scope.get("extensions", {}).get(SEND_WATCH)    # agp's server: its client stalls (serve/server.py)
        if watch is not None:
            watch.listener = self._stream.client_stalled
            if watch.stalled:
                self._stream.client_stalled(True)

        async def sending(message):
            nonlocal ended
            # set before the write: the server answers receive() with http.disconnect as soon as
            # the last body is handed over, which is the answer's end, not its client going
            ended = ended or (message["type"] == "http.response.body" and not message.get("more_body", False))
            await send(message)

        try:
            async with anyio.create_task_group() as group:
                async def watch_disconnect():
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not ended:
                        info.cut = True
                    group.cancel_scope.cancel()          # the client went: stop streaming

                group.start_soon(watch_disconnect)
                try:
                    await self.stream_response(sending)
                except OSError:
                    info.cut = True
                    raise ClientDisconnect() from None
                finally:
                    group.cancel_scope.cancel()
        finally:
            if watch is not None:
                watch.listener = None
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:                 # its finally aborts the request, if it started
                await close()
            if not self._stream.started:      # the generator never ran
                self._stream.abort()
                self._on_gone()


class Relay:
    """The loop of every streamed answer: the pipeline's events (a choice's delta, then the
    request's result) become the chunks a subclass writes; a failed request ends with the
    subclass's error chunks; `on_end(status, result, reasons)` runs once, whatever ends the
    stream (answered, failed, or the client gone: status "499", result None), and a stream
    left unfinished is aborted."""
    stream: RequestStream
    first: tuple
    max_tokens_field: str = "max_tokens"         # what the client called it (max_completion_tokens, ...)
    format_field: str = "response_format"        # ... and the field its constraint came in (guided_json, ...)
    kind: str                                    # the API, for the error's shape

    def on_delta(self, index: int, out) -> list[bytes]:
        raise NotImplementedError

    def on_error(self, err: P.APIError) -> list[bytes]:
        raise NotImplementedError

    def on_done(self, result) -> list[bytes]:
        raise NotImplementedError

    def reasons_sent(self, status: str) -> dict:
        """index -> the finish reason sent, for on_end."""
        raise NotImplementedError

    async def relay(self, opening=()):
        """The stream's chunks: `opening` first, then the events'."""
        status, result = "499", None
        # its writer begins: the tokens that come from now on while it writes count as unread
        # (RequestStream.waiting; the app held it waiting since its first event)
        self.stream.waiting = False
        try:
            for chunk in opening:
                yield chunk
            event = self.first
            while True:
                chunks, result, err = (), None, None
                try:
                    if event[0] == "delta":
                        chunks = self.on_delta(event[1], event[2])
                    else:
                        result = event[1]
                        if result.error is None:
                            chunks = self.on_done(result)
                except Exception as e:           # noqa: BLE001 - a chunk that cannot be built: this
                    err, result = answer_failed(e), None   # stream's error, as a failed result's; the others go on
                if result is not None and result.error is not None:
                    err = api_error(result.error, self.kind, max_tokens_field=self.max_tokens_field,
                                    format_field=self.format_field)   # an event: its headers are long sent
                if err is not None:
                    status = str(err.status)
                    log_error(err)
                    for chunk in self.on_error(err):
                        yield chunk
                    return
                for chunk in chunks:
                    yield chunk
                if result is not None:
                    status = "200"
                    return
                event = await self.stream.__anext__()
        finally:                                 # also on disconnect (cancel / aclose)
            if not self.stream.finished:
                self.stream.abort()
            self.on_end(status, result if status == "200" else None, self.reasons_sent(status))


class ChunkWriter(Relay):
    """The chunks of one streamed completions / chat answer; `on_end(status, result, reasons)`
    once, when the stream ends (Relay)."""

    def __init__(self, runtime, stream, first, req: P.GenerationRequest, rid: str, on_end,
                 fingerprint: str | None = None):
        self.runtime, self.stream, self.first, self.req, self.rid = runtime, stream, first, req, rid
        self.on_end, self.kind = on_end, req.kind
        self.max_tokens_field = req.max_tokens_field   # named in an error as the client named it
        self.format_field = req.format_field
        self.now = int(time.time())
        self.fingerprint = fingerprint                 # OpenAI's system_fingerprint, on every chunk
        self.chat = req.kind == "chat"
        self.opened: set[int] = set()
        self.closed: set[int] = set()
        self.tool_streams: dict[int, object] = {}      # index -> ToolStream, when the request gave tools
        # agp serve --reasoning-parser: whether a chat answer starts in its thinking (None: not split),
        # and per choice the Splitter its text goes through before its tool calls are read
        self.thinking = thinking_of(runtime, req) if self.chat else None
        self.splitters: dict[int, object] = {}
        self.called: set[int] = set()
        self.reasons: dict[int, str | None] = {}       # index -> the finish reason sent
        self.want_lp = req.fields.get("logprobs") is not None
        self.want_ids = bool(req.fields.get("return_token_ids"))
        # each choice's tokens are read with the tokenizer of the generate stage that wrote it
        self.vocabs = Vocabularies(runtime, req.pin, req.fields, req.prompt_logprobs is not None)
        self.vocab: dict[int, Vocabulary] = {}         # index -> its writer's, from the choice's first chunk
        self.opening: dict[int, dict] = {}             # per choice: what its first chunk carries of the prompt
        self.echo = not self.chat and bool(req.fields.get("echo"))
        self.parts = req.split() if self.echo else []
        self.offsets: dict[int, P.TextOffsets] = {}   # per choice: the text_offset of its tokens
        # continuous usage: per prompt (a request of the pipeline), its usage so far as its last
        # delta said (flow's Delta.usage); per streamed choice, its own tokens so far
        self.usage_so_far: dict[int, dict] = {}
        self.own_tokens: dict[int, int] = {}
        self.text_line = self._text_template()

    def _text_template(self) -> tuple[str, str, str] | None:
        """The `data:` line of a chunk that carries text alone (most of a stream's chunks), cut
        where its choice index and its JSON string go: the same bytes as P.sse of the chunk's
        body, without building and encoding the body anew per token. None where the chunk
        carries more (continuous usage, token ids)."""
        if self.req.continuous_usage or self.want_ids:
            return None
        index, text = 7_340_032_118, "\ue000agp-text\ue001"
        if self.chat:
            body = P.chat_chunk(self.rid, self.req.model, self.now, {"content": text}, None, index,
                                fingerprint=self.fingerprint)
        else:
            body = P.completion_chunk(self.rid, self.req.model, self.now, text, None, index,
                                      fingerprint=self.fingerprint)
        line = P.sse(body).decode()
        at_index, at_text = str(index), encode_basestring(text)
        if line.count(at_index) != 1 or line.count(at_text) != 1 or line.index(at_index) > line.index(at_text):
            return None
        head, rest = line.split(at_index)
        middle, tail = rest.split(at_text)
        return head, middle, tail

    # ---- chunk bodies ------------------------------------------------------------------
    def _chunk(self, index: int, text: str | None = None, *, delta: dict | None = None,
               reason: str | None = None, logprobs: dict | None = None, ids: list | None = None,
               opening: bool = False, stop_reason: int | str | None = None) -> bytes:
        if (self.text_line is not None and delta is None and reason is None and logprobs is None
                and not self.opening and type(text) is str):
            head, middle, tail = self.text_line
            return f"{head}{index}{middle}{P.one_line(encode_basestring(text))}{tail}".encode()
        prompt_part = self.opening.pop(index, None) or {}
        role = delta is not None and "role" in delta
        extra = {"token_ids": list(ids or ())} if self.want_ids and not role else {}
        if reason is not None:                         # the finishing chunk says what stopped it (vLLM's)
            extra["stop_reason"] = stop_reason
        if self.chat:
            body = P.chat_chunk(self.rid, self.req.model, self.now, delta if delta is not None else
                                {"content": text}, reason, index, logprobs, extra=extra, top=prompt_part,
                                fingerprint=self.fingerprint)
        else:
            body = P.completion_chunk(self.rid, self.req.model, self.now, text or "", reason, index, logprobs,
                                      extra={**prompt_part, **extra}, fingerprint=self.fingerprint)
        if self.req.continuous_usage:                  # the usage so far on every chunk (vLLM's)
            so_far = {k: sum(u[k] for u in self.usage_so_far.values())
                      for k in ("prompt_tokens", "completion_tokens", "cached_tokens")}
            # a choice's opening chunks (chat's role, an echoed prompt) come before any of its tokens:
            # they count none of them, as vLLM's role chunk says completion_tokens 0
            done = so_far["completion_tokens"] - (self.own_tokens.get(index, 0) if opening else 0)
            body["usage"] = P.usage(so_far["prompt_tokens"], done, so_far["cached_tokens"])
        return P.sse(body)

    def _offsets(self, index: int) -> P.TextOffsets:
        """Choice `index`'s text_offset, carried from chunk to chunk (after its echoed prompt)."""
        tracker = self.offsets.get(index)       # made once a choice: setdefault would make one each chunk
        if tracker is None:
            tracker = self.offsets[index] = self.vocabs.offsets(self.vocab[index].stage)
        return tracker

    def _prompt_of(self, index: int, data: dict | None) -> tuple[list | None, list | None]:
        """The prompt ids of choice `index` and their logprobs (None where not asked): from its
        answer when that came whole, else as the pipeline told its stream before any token."""
        if data is not None:
            return data.get("prompt_token_ids"), data.get("prompt_logprobs")
        return self.stream.stream_of(index).prompt or (None, None)

    def _echoed(self, index: int, data: dict | None) -> tuple[str, dict | None]:
        """The prompt of choice `index` and its logprobs: from its answer when that came whole,
        else from its request (vLLM streams the echo first), read by the model that answered it."""
        req, gen = self.req, self.vocab[index].stage
        if data is not None:
            text = prompt_text(self.vocabs, data)
        else:
            part = self.parts[self.stream.request_of(index)]
            text = part.prompt if part.prompt is not None else self.vocabs.detokenise(part.prompt_token_ids, gen)
        ids, lps = self._prompt_of(index, data)
        lp = (P.completion_logprobs({"prompt_logprobs": lps, "prompt_token_ids": ids}, self.vocabs.of(gen).name_of,
                                    text, self.vocabs.offsets(gen), k=req.fields.get("logprobs"))
              if self.want_lp and lps else None)
        return text, lp

    def content(self, index: int, text: str, step_lp: list | None = None, data: dict | None = None,
                ids: list | None = None, gen: str | None = None, constrained: bool | None = None) -> list[bytes]:
        """Choice `index`'s chunks for `text` (its tokens' `step_lp`, `ids`), written by generate
        stage `gen`, whose model's form its tool calls are read in; `data`: its answer, when it
        came whole."""
        out = []
        vocab = self.vocab.get(index)
        if vocab is None:                              # its first chunk: the stage that wrote it is known
            vocab = self.vocab[index] = self.vocabs.of(gen)
        if index not in self.opened and (self.want_ids or self.req.prompt_logprobs is not None):
            prompt_ids, lps = self._prompt_of(index, data)
            self.opening[index] = answer_fields({"prompt_token_ids": prompt_ids, "prompt_logprobs": lps},
                                              self.req.prompt_logprobs, self.want_ids, vocab.text_of)[0]
        if self.chat and index not in self.opened:
            out.append(self._chunk(index, delta={"role": "assistant", "content": ""}, opening=True))
        if self.echo and index not in self.opened:
            prompt, lp = self._echoed(index, data)
            self.offsets[index] = self.vocabs.offsets(vocab.stage, len(prompt))
            out.append(self._chunk(index, prompt, logprobs=lp, opening=True))
        self.opened.add(index)
        calls, thought = [], ""
        if self.thinking is not None:                  # its thinking first: the rest is content
            from pipeline_dsl.reasoning import Splitter

            splitter = self.splitters.get(index)
            if splitter is None:                       # an answer its stage held to a format: no thinking
                thinks = answer_thinks(self.runtime, self.req, gen, (data or {}).get("request"), constrained)
                splitter = self.splitters[index] = Splitter(bool(thinks))
            thought, text = splitter.feed(text)
            if not self.req.include_reasoning:         # vLLM's include_reasoning: false, the thinking left out
                thought = ""
        if self.chat and self.req.tools_active:
            from pipeline_dsl.tools import tool_stream

            if index not in self.tool_streams:
                self.tool_streams[index] = tool_stream(self.req.call_limit, call_parser(self.runtime, self.req, gen))
            text, calls = self.tool_streams[index].feed(text)
        lp = None
        if self.want_lp and step_lp:                   # these tokens' logprobs, with their text
            lp = (P.chat_logprobs(step_lp, vocab.name_of, vocab.bytes_of) if self.chat
                  else P.completion_logprobs({"logprobs": step_lp}, vocab.name_of, None, self._offsets(index)))
        if thought:                                    # vLLM's delta: reasoning (and content where it began)
            delta = {"reasoning": thought, "reasoning_content": thought, **({"content": text} if text else {})}
            out.append(self._chunk(index, delta=delta, logprobs=lp, ids=ids))
        elif text or lp is not None or (self.want_ids and ids):
            out.append(self._chunk(index, text, logprobs=lp, ids=ids))
        return out + self._calls(index, calls)

    def _calls(self, index: int, calls: list) -> list[bytes]:
        """Choice `index`'s tool calls as a delta (its finish reason becomes tool_calls)."""
        if not calls:
            return []
        self.called.add(index)
        return [self._chunk(index, delta={"tool_calls": calls})]

    def finish(self, index: int, reason: str | None, stop_reason: int | str | None = None) -> list[bytes]:
        self.closed.add(index)
        out = []
        if index in self.splitters:                    # a tag's start held back that never came whole
            rest = self.splitters[index].finish()
            if rest and self.req.include_reasoning:
                out.append(self._chunk(index, delta={"reasoning": rest, "reasoning_content": rest}))
        if index in self.tool_streams:
            rest, calls = self.tool_streams[index].finish()
            if rest:
                out.append(self._chunk(index, rest))
            out += self._calls(index, calls)
        if index in self.called and not isinstance(self.req.tool_choice, dict):
            reason = "tool_calls"          # a named tool_choice's call keeps the answer's own (stop), as OpenAI's
        self.reasons[index] = reason
        out.append(self._chunk(index, "", delta={}, reason=reason, stop_reason=stop_reason))
        return out

    def done(self, result) -> list[bytes]:
        """The request's result: whole choices, the finishing chunks left, usage, [DONE]."""
        out = []
        total = result.usage                                              # the totals, for the last chunks
        self.usage_so_far, self.own_tokens = {0: total}, {}
        for c in result.choices:
            if c.index not in self.closed:
                whole = c.index not in self.opened           # it came whole (no deltas)
                out += self.content(c.index, c.text if whole else "", c.data.get("logprobs") if whole else None,
                                    c.data, c.data.get("token_ids") if whole else None, c.data.get("generated_by"),
                                    c.data.get("constrained"))
                out += self.finish(c.index, c.finish_reason, c.data.get("stop_reason"))
        if self.req.include_usage:
            use = P.usage(total["prompt_tokens"], total["completion_tokens"], total["cached_tokens"],
                          reasoning_tokens(self.runtime, self.req, result.choices))
            out.append(P.sse(P.usage_chunk(self.rid, self.req.model, self.now, self.req.kind, use, self.fingerprint)))
        out.append(P.sse("[DONE]"))
        return out

    # ---- the stream ----------------------------------------------------------------------
    def on_delta(self, index: int, out) -> list[bytes]:
        prompt = self.stream.request_of(index)          # n choices share a prompt
        self.usage_so_far[prompt] = out.usage          # the request's: an earlier stage's draft counted too
        self.own_tokens[index] = out.completion_tokens
        chunks = self.content(index, out.delta_text, getattr(out, "logprobs", None), ids=out.new_token_ids,
                              gen=getattr(out, "generated_by", None), constrained=getattr(out, "constrained", False))
        if out.finished and index not in self.closed:
            return [*chunks, *self.finish(index, out.finish_reason, getattr(out, "stop_reason", None))]
        return chunks

    def on_error(self, err: P.APIError) -> list[bytes]:
        return [P.sse(err.body()), P.sse("[DONE]")]

    def on_done(self, result) -> list[bytes]:
        return self.done(result)

    def reasons_sent(self, status: str) -> dict:
        return self.reasons

    async def events(self):
        self.stream.started = True
        async for chunk in self.relay():
            yield chunk
