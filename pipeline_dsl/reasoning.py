"""A reasoning model's thinking, split from its answer: the text before `</think>` is its
reasoning, the text after it the answer's content (vLLM's `--reasoning-parser`, by its names).

    qwen3        Qwen3: `<think>` ... `</think>` then the answer; a request whose chat_template_kwargs
                 set `enable_thinking: false` has no thinking (its whole text is content)
    deepseek_r1  DeepSeek R1 (and QwQ): the same tags, whatever the request says

An answer is in its thinking from its first token: a template may have opened `<think>` in the
prompt already (Qwen3-Thinking, DeepSeek R1), so that only `</think>` appears. A `<think>` the
model writes before `</think>` is left out of the reasoning; an answer that ends before any
`</think>` (max_tokens, a stop string) is reasoning alone, its content null, as vLLM answers.

`Splitter` reads an answer a piece at a time (a stream's deltas): a tag split across two pieces
is held back until it is whole or is not a tag, so the pieces it gives, joined, are what
`split` gives for the whole text.
"""
from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate

from pipeline_dsl.tools import partial_suffix

PARSERS = ("qwen3", "deepseek_r1")            # vLLM's --reasoning-parser names agp reads
START, END = "<think>", "</think>"
START_BYTES, END_BYTES = START.encode(), END.encode()


def check_parser(name: str) -> str:
    """`name` if agp reads reasoning in that form; ValueError naming the forms otherwise."""
    if name not in PARSERS:
        raise ValueError(f"agp has no reasoning parser '{name}'; it reads {', '.join(PARSERS)}")
    return name


def thinks(parser: str | None, template_kwargs: dict | None) -> bool:
    """Whether an answer read by `parser` (None: none) starts in its thinking: not without a
    parser, and not for qwen3 where the request set `enable_thinking: false` (Qwen3's template then
    writes the empty <think></think> block in the prompt)."""
    if parser is None:
        return False
    return not (parser == "qwen3" and (template_kwargs or {}).get("enable_thinking") is False)


def stage_answer_thinks(runtime, gen, request, constrained: bool | None = None,
                        thinking: bool | None = None) -> bool:
    """Whether generate stage `gen`'s answer to `request` (the dict the stage got) starts in its
    thinking under the runtime's --reasoning-parser: the one rule both the Generated result (its
    `tool_calls`, its usage's reasoning_tokens) and the client's answer (serve/answers.py's
    answer_thinks, agp serve's; commands/runner.py, agp run's) split an answer by, so a stage runs no call the client
    is not told of. `thinking`: whether the request's chat answers start in their thinking, where
    the caller knows it from the client's request; else told from `request`: a chat request (a
    completions one is never split) whose chat_template_kwargs leave thinking on (thinks). An
    answer no model wrote (`gen` names none of the pipeline's generate stages: a python stage's own),
    or one its stage held to a format or a forced tool call from its first token (`constrained`,
    told from `request` where not given), has none: it is all content."""
    parser = getattr(runtime, "reasoning_parser", None)
    if thinking is None:
        thinking = (parser is not None and isinstance(request, dict) and request.get("messages") is not None
                    and thinks(parser, request.get("chat_template_kwargs")))
    if not thinking or not (isinstance(gen, str) and gen in (getattr(runtime, "seg_of_gen", None) or {})):
        return False                                   # text no model wrote: no thinking
    if not isinstance(constrained, bool):          # not known: told from the request the stage got
        constrained = bool(getattr(runtime, "constrained", None)) and runtime.constrained(gen, request)
    return not constrained


class Splitter:
    """One answer's reasoning and content, a piece at a time. `thinking`: the answer starts in
    its thinking (thinks); else every piece is content."""

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self.started = False                # a <think> was dropped (or cannot come any more)
        self.rest = ""                      # text held back: maybe the start of a tag

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of the next piece of the answer; text that may begin a tag is
        held back until the next piece (or finish) tells."""
        if not self.thinking:
            return "", text
        text, self.rest = self.rest + text, ""
        reasoning = []
        if not self.started:
            at = text.find(START)
            end = text.find(END)
            if at >= 0 and (end < 0 or at < end):
                reasoning.append(text[:at])
                text = text[at + len(START):]
                self.started = True
        end = text.find(END)
        if end >= 0:
            self.thinking, self.started = False, True
            return "".join(reasoning) + text[:end], text[end + len(END):]
        keep = max(partial_suffix(text, END), 0 if self.started else partial_suffix(text, START))
        if keep:
            text, self.rest = text[:-keep], text[-keep:]
        return "".join(reasoning) + text, ""

    def finish(self) -> str:
        """What was held back when the answer ended: reasoning (its tag never came)."""
        rest, self.rest = self.rest, ""
        return rest


def split(text: str, thinking: bool) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole answer, as vLLM's parsers give them: reasoning None where the
    answer has no thinking part, content None where nothing follows `</think>`."""
    if not thinking:
        return None, text
    s = Splitter(True)
    reasoning, content = s.feed(text)
    return reasoning + s.finish(), content or None


def count_tokens(pieces: list[bytes]) -> int:
    """How many of an answer's tokens (each token's bytes, in order) are its thinking, as vLLM's
    parsers count reasoning_tokens for an answer that starts in it: the tokens before its first
    `</think>`, less a `<think>` tag before that (all of them where no `</think>` came). A token
    that holds the start of `</think>` with text of the thinking before it counts."""
    text = b"".join(pieces)
    end = text.find(END_BYTES)
    stop = end if end >= 0 else len(text)
    start = text.find(START_BYTES, 0, stop)
    begins = list(accumulate(map(len, pieces), initial=0))     # where each token's bytes begin (and the end)
    begins.pop()
    count = bisect_left(begins, end) if end >= 0 else len(pieces)     # the tokens that begin before `</think>`
    if start >= 0:            # less those that begin inside the `<think>` tag (which ends before `</think>`)
        count -= bisect_left(begins, start + len(START_BYTES)) - bisect_left(begins, start)
    return count


def count_token_ids(ids, bytes_of, end_id: int | None = None, chunk: int = 512) -> int:
    """count_tokens of an answer's token `ids`, read only as far as its first `</think>`: each
    token's bytes are `bytes_of(id)` (a cached lookup), and the tokens after the tag are not looked
    at (most of a long answer, whose count is taken under the runtime's lock). `end_id`: the id of
    `</think>` where it is one token of the vocabulary (Qwen3's, R1's): the answer is read up to
    its first such id; else a chunk of tokens at a time until the tag has come. A `</think>` the
    model spelt in several tokens before the end id is found in the bytes read, so the count is
    count_tokens' of every token's bytes."""
    if end_id is not None:
        try:
            n = ids.index(end_id) + 1
        except ValueError:
            n = len(ids)
        return count_tokens(list(map(bytes_of, ids[:n])))
    pieces: list[bytes] = []
    tail = b""                                 # the bytes read last that may begin the tag
    for at in range(0, len(ids), chunk):
        read = list(map(bytes_of, ids[at:at + chunk]))
        pieces.extend(read)
        window = tail + b"".join(read)
        if END_BYTES in window:
            break
        tail = window[-(len(END_BYTES) - 1):]
    return count_tokens(pieces)
