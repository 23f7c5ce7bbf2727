"""The streamed Responses API (`"stream": true` on /v1/responses): server-sent events, each
`event: <type>` and a JSON `data` with its `type` and a rising `sequence_number`.

    response.created, response.in_progress                      the response object, in progress
    response.output_item.added, response.content_part.added     a reasoning item opens (agp serve
    response.reasoning_text.delta ... response.reasoning_text.done  --reasoning-parser), its thinking,
    response.content_part.done, response.output_item.done       before the answer's message
    response.output_item.added, response.content_part.added     a message item opens
    response.output_text.delta ... response.output_text.done    its text as tokens come
    response.content_part.done, response.output_item.done
    response.output_item.added (function_call), response.function_call_arguments.delta / .done,
    response.output_item.done                                   each tool call, once whole
    response.completed | response.incomplete | response.failed  the final response object

Text that may be the start of a tool call is held back until it is one (pipeline_dsl.tools
ToolStream), as on the chat stream. There is no `[DONE]`: the final event ends the stream.
"""
from __future__ import annotations

import time

from . import protocol as P
from .answers import answer_thinks, call_parser, reasoning_tokens
from .sse import Relay
from .responses_output import call_item, ending, message_item, new_id, reasoning_item, response_object, usage


class ResponseEvents(Relay):
    def __init__(self, owner, call, stream, first, rid: str, on_end):
        self.owner, self.call, self.stream, self.first, self.rid = owner, call, stream, first, rid
        self.on_end, self.kind = on_end, "responses"
        self.max_tokens_field, self.format_field = call.req.max_tokens_field, call.req.format_field
        self.created = int(time.time())
        self.seq = 0
        self.output: list[dict] = []            # the items done so far
        self.msg: dict | None = None            # the open message item
        self.pieces: list[str] = []             # the open message's text, a delta a piece (joined at its end)
        self.vocabs = owner.vocabs(call)           # what the logprobs call each token, by the model that wrote it
        self.lps: list | None = [] if self.vocabs.want_lp else None
        self.tools = None                        # the answer's tool stream, from its first text (content)
        self.called = False
        self.seen = False                        # a delta of choice 0 came (else its text comes whole)
        # agp serve --reasoning-parser: the answer's thinking goes to a reasoning item before its message
        # (the Splitter its text goes through, from its first text; False: none splits it)
        self.splitter = None
        self.rs: dict | None = None              # the open reasoning item
        self.thought: list[str] = []             # its text, a delta a piece
        self.held_lps: list = []                 # the logprobs of thinking's tokens, for the message's part

    def event(self, kind: str, **body) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **body}
        self.seq += 1
        return f"event: {kind}\ndata: {P.sse_json(data)}\n\n".encode()

    def snapshot(self, status: str, use=None, error=None, incomplete=None) -> dict:
        return response_object(self.rid, self.call, self.created, status, list(self.output), use, error,
                               incomplete)

    # ---- items -------------------------------------------------------------------------
    def _open(self) -> list[bytes]:
        self.msg = {"id": new_id("msg"), "index": len(self.output)}
        self.pieces, lps = [], self.lps
        self.lps = [] if lps is not None else None
        item = {"type": "message", "id": self.msg["id"], "status": "in_progress", "role": "assistant", "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        return [self.event("response.output_item.added", output_index=self.msg["index"], item=item),
                self.event("response.content_part.added", item_id=self.msg["id"], output_index=self.msg["index"],
                           content_index=0, part=part)]

    def _reason(self, text: str) -> list[bytes]:
        """A piece of the answer's thinking: its reasoning item opened first."""
        out = []
        if self.rs is None:
            self.rs, self.thought = {"id": new_id("rs"), "index": len(self.output)}, []
            item = {**reasoning_item("", self.rs["id"]), "content": [], "status": "in_progress"}
            out += [self.event("response.output_item.added", output_index=self.rs["index"], item=item),
                    self.event("response.content_part.added", item_id=self.rs["id"], output_index=self.rs["index"],
                               content_index=0, part={"type": "reasoning_text", "text": ""})]
        self.thought.append(text)
        out.append(self.event("response.reasoning_text.delta", item_id=self.rs["id"], output_index=self.rs["index"],
                              content_index=0, delta=text))
        return out

    def _close_reasoning(self) -> list[bytes]:
        if self.rs is None:
            return []
        r, self.rs = self.rs, None
        item = reasoning_item("".join(self.thought), r["id"])
        self.output.append(item)
        where = {"item_id": r["id"], "output_index": r["index"], "content_index": 0}
        return [self.event("response.reasoning_text.done", **where, text=item["content"][0]["text"]),
                self.event("response.content_part.done", **where, part=item["content"][0]),
                self.event("response.output_item.done", output_index=r["index"], item=item)]

    def _text(self, text: str, lps: list | None) -> list[bytes]:
        out = [] if self.msg is not None else self._close_reasoning() + self._open()
        if self.held_lps:                        # the thinking's tokens' logprobs, as the whole answer's part
            lps, self.held_lps = self.held_lps + (lps or []), []
        self.pieces.append(text)                 # not text += text: that copies the whole text each delta
        if self.lps is not None and lps:
            self.lps += lps
        out.append(self.event("response.output_text.delta", item_id=self.msg["id"], output_index=self.msg["index"],
                              content_index=0, delta=text, logprobs=lps or []))
        return out

    def _close(self, status: str) -> list[bytes]:
        if self.msg is None:
            return []
        m, self.msg = self.msg, None
        text = "".join(self.pieces)
        item = message_item(text, status, self.lps, m["id"])
        self.output.append(item)
        where = {"item_id": m["id"], "output_index": m["index"], "content_index": 0}
        return [self.event("response.output_text.done", **where, text=text, logprobs=self.lps or []),
                self.event("response.content_part.done", **where, part=item["content"][0]),
                self.event("response.output_item.done", output_index=m["index"], item=item)]

    def _call(self, call: dict) -> list[bytes]:
        out = self._close_reasoning() + self._close("completed")
        self.called = True
        item = call_item(call)
        index = len(self.output)
        self.output.append(item)
        where = {"item_id": item["id"], "output_index": index}
        return out + [self.event("response.output_item.added", output_index=index,
                                 item={**item, "arguments": "", "status": "in_progress"}),
                      self.event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
                      self.event("response.function_call_arguments.done", **where, arguments=item["arguments"]),
                      self.event("response.output_item.done", output_index=index, item=item)]

    def content(self, text: str, step_lp: list | None, gen: str | None, request: dict | None = None,
                constrained: bool | None = None) -> list[bytes]:
        """The events of `text` (its tokens' `step_lp`), written by generate stage `gen`: its
        tokens are read with that stage's model's tokenizer, its tool calls in its form (call_parser).
        `constrained` (a delta's, or the `constrained` of an answer that came whole), else `request`
        (the dict the stage got): whether the stage held it to a format, so it holds no thinking
        (answer_thinks)."""
        lps = None
        if self.vocabs.want_lp and step_lp:
            vocab = self.vocabs.of(gen)
            lps = P.chat_logprobs(step_lp, vocab.name_of, vocab.bytes_of)["content"]
        out, calls = [], []
        if self.splitter is None:
            thinking = answer_thinks(self.owner.g.apipe.runtime, self.call.req, gen, request, constrained)
            if thinking is None:
                self.splitter = False
            else:
                from pipeline_dsl.reasoning import Splitter

                self.splitter = Splitter(thinking)
        if self.splitter:
            thought, text = self.splitter.feed(text)
            if thought:
                out += self._reason(thought)
            if not text and lps:                # no content yet (thinking, or a tag's start held back): the
                self.held_lps += lps            # logprobs wait for the message, which is not opened for them
                lps = None
        if self.tools is None and self.call.req.tools_active:
            from pipeline_dsl.tools import tool_stream

            self.tools = tool_stream(self.call.req.call_limit, call_parser(self.owner.g.apipe.runtime, self.call.req,
                                                                           gen))
        if self.tools is not None:
            text, calls = self.tools.feed(text)
        if text or lps:
            out += self._text(text, lps)
        for c in calls:
            out += self._call(c)
        return out

    def finish(self, result) -> list[bytes]:
        choice = result.choices[0] if result.choices else None
        out = []
        if choice is not None and not self.seen:        # it came whole (through later stages)
            out += self.content(choice.text, choice.data.get("logprobs"), choice.data.get("generated_by"),
                                choice.data.get("request"), choice.data.get("constrained"))
        if self.splitter:
            rest = self.splitter.finish()              # a tag's start held back that never came whole
            if rest:
                out += self._reason(rest)
        if self.tools is not None:
            rest, calls = self.tools.finish()
            if rest:
                out += self._text(rest, None)
            for c in calls:
                out += self._call(c)
        status, incomplete = ending(choice.finish_reason if choice is not None else None)
        if self.msg is None and not any(item["type"] != "reasoning" for item in self.output):
            out += self._close_reasoning() + self._open()    # an empty answer is still a message
        if self.held_lps and self.lps is not None:
            self.lps += self.held_lps
        out += self._close_reasoning() + self._close(status)
        use = usage(result.usage, reasoning_tokens(self.owner.g.apipe.runtime, self.call.req, result.choices))
        final = self.snapshot(status, use, incomplete=incomplete)
        self.owner.keep(self.call, final)
        self.reason = "tool_calls" if self.called else (choice.finish_reason if choice is not None else None)
        return out + [self.event(f"response.{status}", response=final)]

    # ---- the stream (sse.Relay's loop) -----------------------------------------------------
    def on_delta(self, index: int, out) -> list[bytes]:
        if index != 0:                           # the Responses API has one answer: choice 0
            return []
        self.seen = True
        return self.content(out.delta_text, getattr(out, "logprobs", None), getattr(out, "generated_by", None),
                            constrained=getattr(out, "constrained", False))

    def on_error(self, err: P.APIError) -> list[bytes]:
        failed = self.snapshot("failed", error={"code": err.code or err.type, "message": err.message})
        return [self.event("response.failed", response=failed)]

    def on_done(self, result) -> list[bytes]:
        return self.finish(result)

    def reasons_sent(self, status: str) -> dict:
        return {0: self.reason} if status == "200" else {}

    async def events(self):
        self.reason = None
        self.stream.started = True
        opening = [self.event("response.created", response=self.snapshot("in_progress")),
                   self.event("response.in_progress", response=self.snapshot("in_progress"))]
        async for chunk in self.relay(opening):
            yield chunk
