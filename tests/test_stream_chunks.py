"""The bytes of a streamed answer's text chunks, and the Delta a listener hears, made cheaply per
token, are the ones the general path makes (no model: made-up engine outputs)."""
from __future__ import annotations

import asyncio
from dataclasses import fields, replace

import pytest

from pipeline_dsl.engine.config import RequestOutput
from pipeline_dsl.flow import Delta
from pipeline_dsl.flow.items import RequestState, heard
from pipeline_dsl.serve import protocol as P
from pipeline_dsl.serve.async_pipeline import LoopMail, RequestStream
from pipeline_dsl.serve.sse import ChunkWriter

TEXTS = ["", "plain", " \"quoted\" \\ back", "tab\tnew\nline\r", "".join(map(chr, range(32))) + "\x7f",
         "é 日本 😀 \u2028\u2029", "</script>", "{\"index\":1}"]


class _Runtime:
    def token_text(self, pin):
        return None

    def token_bytes(self, pin):
        return None

    def abort(self, key, why=None):
        pass


def _request(kind: str, **extra) -> P.GenerationRequest:
    body = {"model": "m", "stream": True, "max_tokens": 8, **extra}
    if kind == "chat":
        return P.parse_chat({**body, "messages": [{"role": "user", "content": "hi"}]}, max_model_len=4096,
                            served=("m",))
    return P.parse_completion({**body, "prompt": "hi"}, max_model_len=4096, served=("m",))


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("fingerprint", [None, "fp_\"x\""])
def test_a_text_chunk_has_the_bytes_of_the_general_chunk(kind, fingerprint):
    """Chunks that carry text alone are written from a template of the writer's own chunk: byte
    for byte what P.sse of the chunk body is, for any text (quotes, control characters,
    non-ASCII, line separators) and choice index."""
    req = _request(kind)
    writer = ChunkWriter(_Runtime(), None, None, req, "cmpl-\"id\"", lambda *a: None, fingerprint=fingerprint)
    assert writer.text_line is not None
    for index in (0, 3, 12):
        writer.content(index, "")                     # a chat choice opens with its role chunk
        for text in TEXTS:
            got = writer.content(index, text)
            if kind == "chat":
                body = P.chat_chunk(writer.rid, "m", writer.now, {"content": text}, None, index,
                                    fingerprint=fingerprint)
            else:
                body = P.completion_chunk(writer.rid, "m", writer.now, text, None, index, fingerprint=fingerprint)
            assert got == ([P.sse(body)] if text else [])


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_an_event_splits_into_its_lines_only_where_the_stream_breaks_them(kind):
    """A model's text with U+0085, U+2028 or U+2029 (which JSON may leave raw, and which
    str.splitlines — httpx's iter_lines, so the SDKs on it — takes for line breaks): each event is
    still one `data:` line and a blank one to such a reader, and its JSON reads back the text."""
    import json

    text = "a\x85b\u2028c\u2029d"
    writer = ChunkWriter(_Runtime(), None, None, _request(kind), "cmpl-1", lambda *a: None)
    writer.content(0, "")
    events = [*writer.content(0, text),                                   # the text-only template
              P.sse({"choices": [{"index": 0, "text": text, "logprobs": {"tokens": [text]}}]})]
    for event in events:
        lines = event.decode().splitlines()
        assert len(lines) == 2 and lines[0].startswith("data: ") and lines[1] == "", lines
        assert text in json.dumps(json.loads(lines[0][len("data: "):]), ensure_ascii=False)


def test_a_delta_is_the_engine_output_with_the_usage_so_far():
    """The Delta a listener hears has every field of the engine's RequestOutput, `usage` and the
    generate stage that wrote it (`generated_by`: its answer's tool calls are read in that stage's
    model's form); it is frozen, and its without_text() drops the whole text only."""
    out = RequestOutput("r1/1", [5, 6], "ab", "xxab", False, None, 3, 4, 1, logprobs=[{"token_id": 5}],
                        stop_reason=None)
    heard_deltas = []
    listener = type("L", (), {"on_delta": lambda self, key, index, d: heard_deltas.append((key, index, d))})()
    req = RequestState("r1", "x", listener, 0.0)
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "cached_tokens": 1}
    heard(req, 2, out, usage, "gen")
    (key, index, delta), = heard_deltas
    assert (key, index) == ("r1", 2) and isinstance(delta, Delta)
    assert delta == Delta(**{f.name: getattr(out, f.name) for f in fields(RequestOutput)}, usage=usage,
                          generated_by="gen")
    with pytest.raises(Exception):
        delta.text = "changed"
    assert delta.without_text() == replace(delta, text="") and delta.text == "xxab"


def test_a_queued_delta_keeps_every_field_but_the_whole_text():
    loop = asyncio.new_event_loop()
    try:
        stream = RequestStream(type("Owner", (), {"metrics": None})(), LoopMail(loop))
        out = RequestOutput("r1/1", [5], "ab", "xxab", True, "stop", 3, 4, 1, stop_reason="x")
        delta = Delta(**{f.name: getattr(out, f.name) for f in fields(RequestOutput)}, usage={"completion_tokens": 4})
        stream.on_delta("r1", 0, delta)
        loop.run_until_complete(asyncio.sleep(0))
        _, index, queued = stream.queue.get_nowait()
        assert index == 0 and queued == replace(delta, text="")
    finally:
        loop.close()


def test_calls_handed_to_the_loop_before_it_runs_wake_it_once_and_run_in_order():
    """Deltas of many streams in one engine step reach the event loop with one wake-up (one
    call_soon_threadsafe), run in the order handed, from any thread; a failing call is reported
    to the loop's exception handler and the others still run; after a drain the next call wakes
    the loop again."""
    import threading

    loop = asyncio.new_event_loop()
    wakeups, reported = [], []
    handed = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: (wakeups.append(a), handed(*a))
    loop.set_exception_handler(lambda _loop, context: reported.append(context["exception"]))
    try:
        mail, ran = LoopMail(loop), []

        def fail(_):
            raise ValueError("one listener's bug")

        def hand(k):
            for i in range(50):
                mail.post(ran.append, (k, i))
                if k == 0 and i == 10:
                    mail.post(fail, None)

        threads = [threading.Thread(target=hand, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wakeups) == 1                       # the loop has not run: one wake-up for all 201
        loop.run_until_complete(asyncio.sleep(0))
        assert len(ran) == 200 and [type(e) for e in reported] == [ValueError]
        for k in range(4):
            assert [i for kk, i in ran if kk == k] == list(range(50))      # each thread's order kept
        mail.post(ran.append, "later")
        loop.run_until_complete(asyncio.sleep(0))
        assert len(wakeups) == 2 and ran[-1] == "later"
    finally:
        loop.close()
