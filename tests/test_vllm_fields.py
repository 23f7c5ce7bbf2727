"""vLLM's request fields, with their meaning, through the official `openai` client (and httpx
for raw bodies) against an `agp serve` app on the tiny random model: chat_template_kwargs
reach the template, skip_special_tokens / spaces_between_special_tokens shape the detokenised
text, include_stop_str_in_output keeps the stop string, request_id becomes the answer's id and
X-Request-Id, parallel_tool_calls may be null, and structured_outputs / guided_json /
guided_regex / guided_choice / guided_grammar constrain the answer.
"""
from __future__ import annotations

import json
import os
import re
import threading
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from pipeline_dsl.commands.runner import RunRequest, run_pipeline
from pipeline_dsl.flow import build_runtime
from pipeline_dsl import requests_io
from pipeline_dsl.requests_io import RequestError, parse_request
from flowkit import CASCADE
from test_serve import LiveServer
from tiny_model import write_tiny_gguf, write_tiny_hf_folder

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

# a chat template that reads a variable of its own, as Qwen3's reads enable_thinking
TEMPLATE = ("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
            "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}=>")
IM_START = 1                                # a special token of the tiny tokenizer (<|im_start|>)


@pytest.fixture(scope="module")
def server(tiny_gguf):
    s = LiveServer(tiny_gguf, overrides={"chat_template": TEMPLATE}, batch_timeout_s=0.001)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


USER = [{"role": "user", "content": "hey"}]


def test_an_empty_prompt_is_counted_by_tokenize_but_is_no_prompt_to_answer(server, client):
    def count(add_special_tokens):
        r = server.http.post(server.url + "/tokenize", json={"prompt": "", "add_special_tokens": add_special_tokens},
                       timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    bos = server.engine.tokenizer.bos_token_id if server.engine.tokenizer.add_bos else None
    assert count(True) == {"count": 0 if bos is None else 1, "max_model_len": server.engine.max_model_len,
                           "tokens": [] if bos is None else [bos], "token_strs": None}
    assert count(False)["tokens"] == []
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="tiny", prompt="", max_tokens=2)


def test_chat_template_kwargs_reach_the_template(server, client):
    def rendered(**extra):
        ids = server.http.post(server.url + "/tokenize", json={"messages": USER, **extra}, timeout=30).json()["tokens"]
        return server.http.post(server.url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]

    assert rendered() == "<<hey>>=>"
    assert rendered(chat_template_kwargs={"enable_thinking": False}) == "<<hey>>/no_think=>"
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
    off = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    no_think = len(server.http.post(server.url + "/tokenize", json={"prompt": "/no_think", "add_special_tokens": False},
                              timeout=30).json()["tokens"])
    assert off.usage.prompt_tokens == plain.usage.prompt_tokens + no_think
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs.messages"):
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"messages": []}})


def test_skip_special_tokens_false_keeps_their_text_streamed_and_not(client):
    forced = {"logit_bias": {str(IM_START): 100}, "max_tokens": 3}
    kept = client.completions.create(model="tiny", prompt="hi", extra_body={"ignore_eos": True,
                                                                           "skip_special_tokens": False}, **forced)
    assert kept.choices[0].text == "<|im_start|>" * 3
    assert client.completions.create(model="tiny", prompt="hi", extra_body={"ignore_eos": True},
                                     **forced).choices[0].text == ""          # skipped by default
    joined = client.completions.create(model="tiny", prompt="hi", **forced, extra_body={
        "ignore_eos": True, "skip_special_tokens": False, "spaces_between_special_tokens": False})
    assert joined.choices[0].text == "<|im_start|>" * 3     # a byte-level BPE puts nothing between them
    chunks = client.completions.create(model="tiny", prompt="hi", stream=True, **forced,
                                       extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert "".join(c.choices[0].text for c in chunks) == "<|im_start|>" * 3


def test_spaces_between_special_tokens_false_writes_each_with_nothing_beside_it(tmp_path, tiny_gguf):
    """A tokenizer whose decoder puts a space between tokens (WordPiece's, in a Hugging Face
    folder): by default the special tokens an answer keeps are written as that decoder writes
    them, spaced; spaces_between_special_tokens false writes each with nothing beside it, on
    completions and chat, whole and streamed."""
    from tokenizers import decoders

    s = LiveServer(write_tiny_hf_folder(tmp_path / "spaced", tiny_gguf, decoder=decoders.WordPiece()),
                   batch_timeout_s=0.001)
    try:
        def text(kind, stream, **extra):
            body = {"model": "tiny", "max_tokens": 3, "logit_bias": {str(IM_START): 100}, "stream": stream,
                    "extra_body": {"ignore_eos": True, "skip_special_tokens": False, **extra}}
            if kind == "chat":
                out = s.client.chat.completions.create(messages=USER, **body)
                return "".join(c.choices[0].delta.content or "" for c in out) if stream else \
                    out.choices[0].message.content
            out = s.client.completions.create(prompt="hi", **body)
            return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text

        for kind in ("completion", "chat"):
            for stream in (False, True):
                spaced = text(kind, stream)
                assert spaced == text(kind, stream, spaces_between_special_tokens=True)
                assert spaced.split() == ["<|im_start|>"] * 3 and "<|im_start|> <|im_start|>" in spaced, spaced
                assert text(kind, stream, spaces_between_special_tokens=False) == "<|im_start|>" * 3
        runtime = build_runtime(Path(s.dir) / "tiny.agp", overrides={"threads": 1})
        out: dict = {}
        try:                               # an `agp run` line the same
            lines = [{"prompt": "hi", "max_tokens": 3, "logit_bias": {str(IM_START): 100}, "ignore_eos": True,
                      "skip_special_tokens": False, "spaces_between_special_tokens": spaced}
                     for spaced in (True, False)]
            run_pipeline(runtime, [RunRequest(slot=i, line=i + 1, parsed=parse_request(line, default_id=i))
                                   for i, line in enumerate(lines)], on_done=out.__setitem__, progress=False)
        finally:
            runtime.shutdown()
        assert out[0]["text"] == text("completion", False) and out[1]["text"] == "<|im_start|>" * 3
    finally:
        s.close()


def test_include_stop_str_in_output_keeps_the_stop_string(client):
    whole = client.completions.create(model="tiny", prompt="hello world", max_tokens=16,
                                      extra_body={"ignore_eos": True}).choices[0].text
    stop = whole[4:6]
    assert len(stop) == 2 and stop.strip()
    cut = whole.index(stop)
    without = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, stop=[stop],
                                        extra_body={"ignore_eos": True}).choices[0]
    assert without.text == whole[:cut] and without.finish_reason == "stop"
    for stream in (False, True):
        out = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, stop=[stop],
                                        stream=stream, extra_body={"ignore_eos": True,
                                                                   "include_stop_str_in_output": True})
        text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        assert text == whole[:cut + len(stop)] and text.endswith(stop)


def test_request_id_names_the_answer_and_its_header(client, server):
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=USER, max_tokens=2,
                                                          extra_body={"request_id": "batch-7.item-3"})
    assert raw.parse().id == "chatcmpl-batch-7.item-3" and raw.headers["x-request-id"] == "batch-7.item-3"
    comp = client.completions.with_raw_response.create(model="tiny", prompt="hi", max_tokens=2,
                                                      extra_body={"request_id": "c-1"})
    assert comp.parse().id == "cmpl-c-1" and comp.headers["x-request-id"] == "c-1"
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, stream=True,
                                                 extra_body={"request_id": "s-1"}))
    assert {c.id for c in chunks} == {"chatcmpl-s-1"}
    # the client's X-Request-Id header names the request when it sends one (as in vLLM)
    headed = client.with_options(default_headers={"X-Request-Id": "from-header"})
    raw = headed.chat.completions.with_raw_response.create(model="tiny", messages=USER, max_tokens=2,
                                                          extra_body={"request_id": "from-body"})
    assert raw.parse().id == "chatcmpl-from-header" and raw.headers["x-request-id"] == "from-header"
    anon = client.chat.completions.with_raw_response.create(model="tiny", messages=USER, max_tokens=2)
    assert anon.parse().id == "chatcmpl-" + anon.headers["x-request-id"]
    with pytest.raises(openai.BadRequestError, match="'request_id' must be"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"request_id": "a b"})


def test_parallel_tool_calls_null_is_accepted(server):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    r = server.http.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": USER, "max_tokens": 2, "tools": [tool], "parallel_tool_calls": None})
    assert r.status_code == 200, r.text
    bad = server.http.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": USER, "max_tokens": 2, "tools": [tool], "parallel_tool_calls": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "parallel_tool_calls"


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server, client):
    long = "the cat and the world " * 400                      # beyond the tiny model's context
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=long, max_tokens=2)
    cut = client.completions.create(model="tiny", prompt=long, max_tokens=2, extra_body={"truncate_prompt_tokens": 12})
    assert cut.usage.prompt_tokens == 12
    ids = server.http.post(server.url + "/tokenize", json={"prompt": "the cat and the world " * 10},   # the same tail
                     timeout=30).json()["tokens"]
    tail = client.completions.create(model="tiny", prompt=ids[-12:], max_tokens=2, temperature=0)
    again = client.completions.create(model="tiny", prompt=long, max_tokens=2, temperature=0,
                                      extra_body={"truncate_prompt_tokens": 12})
    assert again.choices[0].text == tail.choices[0].text            # the last 12 tokens, no others
    ids_cut = client.completions.create(model="tiny", prompt=ids[:40], max_tokens=1,
                                        extra_body={"truncate_prompt_tokens": 5})
    assert ids_cut.usage.prompt_tokens == 5
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}], max_tokens=2,
                                          extra_body={"truncate_prompt_tokens": 20})
    assert chat.usage.prompt_tokens == 20
    for bad in (0, -2, 10 ** 6, "5"):
        with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
            client.completions.create(model="tiny", prompt="hi", max_tokens=1, extra_body={"truncate_prompt_tokens": bad})


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client, kind):
    options = {"include_usage": True, "continuous_usage_stats": True}
    if kind == "chat":
        chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, n=2, stream=True,
                                                     stream_options=options, extra_body={"ignore_eos": True}))
    else:
        chunks = list(client.completions.create(model="tiny", prompt="hey", max_tokens=5, n=2, stream=True,
                                                stream_options=options, extra_body={"ignore_eos": True}))
    assert all(c.usage is not None for c in chunks)
    done = [c.usage.completion_tokens for c in chunks]
    assert done == sorted(done) and done[-1] == 10                  # two choices of 5, counted as they come
    assert len({c.usage.prompt_tokens for c in chunks if c.usage.completion_tokens}) == 1
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    plain = list(client.completions.create(model="tiny", prompt="hey", max_tokens=3, stream=True,
                                           stream_options={"include_usage": True}))
    assert [c.usage is not None for c in plain] == [False] * (len(plain) - 1) + [True]   # the last alone
    # alone it asks for the usage too, as vLLM's StreamOptions default include_usage to true; include_usage
    # false turns both off
    alone = {"stream": True, "stream_options": {"continuous_usage_stats": True}, "max_tokens": 3}
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, **alone) if kind == "chat"
                  else client.completions.create(model="tiny", prompt="hey", **alone))
    assert len(chunks) > 1 and all(c.usage is not None for c in chunks) and chunks[-1].usage.completion_tokens == 3
    off = {**alone, "stream_options": {"include_usage": False, "continuous_usage_stats": True}}
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, **off) if kind == "chat"
                  else client.completions.create(model="tiny", prompt="hey", **off))
    assert len(chunks) > 1 and all(c.usage is None for c in chunks)



def test_continuous_usage_carries_the_cached_prompt_tokens_on_every_chunk(client):
    """A prompt the prefix cache holds: each chunk's usage so far says how many of its prompt
    tokens the cache served, as the last chunk's usage does."""
    prompt = "the cat and the world and the sky " * 12
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=1)      # fills the cache
    chunks = list(client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    final = chunks[-1].usage
    assert final.prompt_tokens == first.usage.prompt_tokens and final.prompt_tokens_details.cached_tokens > 0
    assert all(c.usage.prompt_tokens_details.cached_tokens == final.prompt_tokens_details.cached_tokens
               for c in chunks if c.usage.completion_tokens)


@pytest.mark.parametrize("kind", ["chat", "echo"])
def test_continuous_usage_counts_only_the_tokens_already_sent(client, kind):
    """A choice's opening chunk (chat's role, an echoed prompt) comes before its tokens: its usage
    counts none of them (vLLM's role chunk: completion_tokens 0); each later chunk counts the token
    ids sent so far."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    extra = {"ignore_eos": True, "return_token_ids": True}
    if kind == "chat":
        chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, n=2, stream=True,
                                                     stream_options=options, extra_body=extra))
    else:
        chunks = list(client.completions.create(model="tiny", prompt="hey", max_tokens=4, n=2, stream=True, echo=True,
                                                stream_options=options, extra_body=extra))
    sent = 0
    for c in chunks:
        for choice in c.choices:
            sent += len(getattr(choice, "token_ids", None) or ())
        assert c.usage.completion_tokens == sent, (c, sent)
    assert sent == 8




@pytest.fixture(scope="module")
def cascade(tiny_gguf):
    s = LiveServer(tiny_gguf, text=CASCADE.format(model=tiny_gguf, budget2="1MiB"))
    yield s
    s.close()


@pytest.mark.parametrize("n", [1, 2])
def test_continuous_usage_of_a_stream_from_a_second_stage_counts_the_draft_too(cascade, n):
    """A cascade streams the second generate stage's answer while the request's usage also counts
    the first's draft: each chunk carries the request's usage so far, draft included, so the
    counts never go down and the last chunk's are the final usage chunk's (they counted the
    second stage's sequence alone, far below the totals)."""
    chunks = list(cascade.client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=5, n=n, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    *streamed, final = chunks
    assert not final.choices and final.usage.completion_tokens == 2 * 5 * n    # the drafts and the answers
    usages = [(c.usage.prompt_tokens, c.usage.completion_tokens,
               c.usage.prompt_tokens_details.cached_tokens if c.usage.prompt_tokens_details else 0) for c in streamed]
    for key in range(3):
        seen = [u[key] for u in usages]
        assert seen == sorted(seen), (key, usages)
    last = streamed[-1].usage
    assert (last.prompt_tokens, last.completion_tokens, last.total_tokens) == \
        (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens)
    assert streamed[0].usage.completion_tokens >= 5                            # a draft, before any answer token


def test_detokenize_names_tokens_for_an_id_outside_the_vocabulary(server):
    r = server.http.post(server.url + "/detokenize", json={"tokens": [5, 10 ** 6]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert "outside the vocabulary" in r.json()["error"]["message"]


def test_stop_reason_names_the_stop_string_or_token_that_ended_the_answer(server, client):
    """vLLM's stop_reason: the stop string or the stop_token_ids id that ended a choice, null when
    it ran to its length; on every choice, and on the finishing chunk of a stream."""
    base = {"model": "tiny", "prompt": "the world is", "max_tokens": 10, "temperature": 0}
    plain = client.completions.create(**base, extra_body={"return_token_ids": True, "ignore_eos": True})
    text, ids = plain.choices[0].text, plain.choices[0].token_ids
    assert plain.choices[0].finish_reason == "length" and plain.choices[0].stop_reason is None
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3
    by_string = client.completions.create(**base, stop=["never there", stop], extra_body={"ignore_eos": True})
    assert by_string.choices[0].finish_reason == "stop" and by_string.choices[0].stop_reason == stop
    by_token = client.completions.create(**base, extra_body={"stop_token_ids": [ids[3]], "ignore_eos": True})
    assert by_token.choices[0].finish_reason == "stop" and by_token.choices[0].stop_reason == ids[3]
    chat = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    said = chat.choices[0].message.content
    assert chat.choices[0].stop_reason is None
    cut = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0,
                                         stop=[said[2:4]], extra_body={"ignore_eos": True})
    assert cut.choices[0].stop_reason == said[2:4]
    chunks = list(client.completions.create(**base, stop=[stop], stream=True, extra_body={"ignore_eos": True}))
    last = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    r = server.http.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 10,
                                                              "temperature": 0, "stop": [said[2:4]], "stream": True,
                                                              "ignore_eos": True}, timeout=60)
    ends = [json.loads(x[6:])["choices"][0] for x in r.text.splitlines()
            if x.startswith("data: {") and json.loads(x[6:])["choices"][0]["finish_reason"]]
    assert ends == [{**ends[0], "finish_reason": "stop", "stop_reason": said[2:4]}]

def test_what_vllm_clients_send_by_default_is_taken_and_anything_else_named(client):
    defaults = {"use_beam_search": False, "length_penalty": 1.0, "priority": 0, "return_tokens_as_token_ids": False,
                "bad_words": [], "allowed_token_ids": None, "prompt_logprobs": None, "vllm_xargs": None,
                "guided_decoding_backend": "xgrammar", "echo": False, "add_special_tokens": False,
                "documents": None, "functions": None, "function_call": None}
    out = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body=defaults)
    assert out.usage.completion_tokens <= 2
    plain = {k: v for k, v in defaults.items() if k not in ("echo", "add_special_tokens", "documents", "functions",
                                                            "function_call")}
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=1, extra_body=plain).usage
    for field, value, words in [("use_beam_search", True, "(leave it out or use false)"),
                                ("priority", 3, "fcfs (set dynamic_batch's scheduling_policy = priority"),
                                ("functions", [{"name": "f"}], "(leave it out or use 'tools')")]:
        with pytest.raises(openai.BadRequestError, match=re.escape(f"'{field}' = ")) as e:
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=1, extra_body={field: value})
        assert words in e.value.message and e.value.body["param"] == field
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument"):    # chat only
        client.completions.create(model="tiny", prompt="hi", max_tokens=1, extra_body={"documents": None})


def test_guided_fields_and_structured_outputs_constrain_the_answer(client):
    def chat(**extra):
        out = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, temperature=1.0, seed=3,
                                             extra_body=extra)
        return out.choices[0].message.content, out.choices[0].finish_reason

    for extra in ({"guided_choice": ["yes", "no"]}, {"structured_outputs": {"choice": ["yes", "no"]}}):
        text, reason = chat(**extra)
        assert text in ("yes", "no") and reason == "stop"
    for extra in ({"guided_regex": "[0-9]{3}"}, {"structured_outputs": {"regex": "[0-9]{3}"}}):
        text, _ = chat(**extra)
        assert re.fullmatch("[0-9]{3}", text), text
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"]}
    for extra in ({"guided_json": schema}, {"guided_json": json.dumps(schema)}, {"structured_outputs": {"json": schema}}):
        text, reason = chat(**extra)
        assert reason == "stop"
        jsonschema.validate(json.loads(text), schema)
    for grammar in ('root ::= "ab" | "cd" "!"', 'start: "ab" | "cd" "!"'):       # GBNF and Lark
        for extra in ({"guided_grammar": grammar}, {"structured_outputs": {"grammar": grammar}}):
            assert chat(**extra)[0] in ("ab", "cd!")
    streamed = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, stream=True,
                                              extra_body={"guided_choice": ["yes", "no"]})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) in ("yes", "no")
    comp = client.completions.create(model="tiny", prompt="x", max_tokens=24, extra_body={"guided_regex": "a{1,3}b"})
    assert re.fullmatch("a{1,3}b", comp.choices[0].text)


# guidance 0.3's vLLM model (guidance.models.experimental.VLLMModel) sends each grammar twice, as
# vLLM >= 0.11 reads it and as older vLLM did, beside its backend's name: recorded from `select`
GUIDANCE_GRAMMAR = '%llguidance {}\n\nstart: "Answer: " s\ns[capture]: S\n\nS: "yes"\n     | "no"\n\n'
GUIDANCE_BODY = {"logprobs": True, "stream": True, "stream_options": {"include_usage": True}, "tools": None,
                 "top_logprobs": 5, "top_p": None, "guided_decoding_backend": "guidance",
                 "guided_grammar": GUIDANCE_GRAMMAR, "structured_outputs": {"grammar": GUIDANCE_GRAMMAR}}


def test_a_format_given_alike_in_structured_outputs_and_a_guided_field_is_the_answers(server):
    """A client written for vLLM old and new gives the same format in `structured_outputs` and in the
    `guided_*` field beside it: the two ask for one format, and the answer is in it (it was a 400,
    "give at most one"); JSON Schema text in one and the object in the other are the same schema.
    Fields that ask for different formats stay a 400 naming the second."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "yes or no?"}]}],
            "temperature": 1.0, "seed": 4, **GUIDANCE_BODY}
    with server.http.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) in (
        "Answer: yes", "Answer: no")
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"]}
    r = server.http.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": USER, "max_tokens": 24, "temperature": 1.0, "seed": 3,
        "guided_json": json.dumps(schema), "structured_outputs": {"json": schema}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)
    for other in ({"guided_grammar": 'start: "ab"'}, {"guided_regex": "ab"}):
        r = server.http.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": USER, "max_tokens": 4, "structured_outputs": {"grammar": 'start: "cd"'},
            **other})
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(other)), r.text
        assert "give at most one of 'structured_outputs'" in r.json()["error"]["message"]


# one structure after each "@": f( then {"n": a digit} then )
AT_TAG = {"type": "structural_tag", "triggers": ["@"], "structures": [{"begin": "@f(", "end": ")", "schema": {
    "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}}]}


@pytest.mark.parametrize("extra", [{"response_format": AT_TAG},
                                   {"structured_outputs": {"structural_tag": json.dumps(AT_TAG)}},
                                   {"structural_tag": json.dumps(AT_TAG)}])      # vLLM < 0.11's top-level field
def test_a_structural_tag_holds_what_follows_each_trigger(server, client, extra):
    """vLLM's structural tag, as its clients send it (response_format, or structured_outputs'
    structural_tag as JSON text): free text, and after each trigger the whole structure. A bias
    on the trigger's token makes the random model write it wherever the text is free."""
    [at] = server.http.post(server.url + "/tokenize", json={"prompt": "@", "add_special_tokens": False},
                      timeout=30).json()["tokens"]
    out = client.chat.completions.create(model="tiny", messages=USER, max_tokens=40, temperature=1.0, seed=5,
                                         logit_bias={str(at): 100}, extra_body=extra)
    text, reason = out.choices[0].message.content, out.choices[0].finish_reason
    free, *tags = text.split("@")
    whole = tags if reason == "stop" else tags[:-1]          # max_tokens may cut the last one
    assert len(whole) >= 2, text
    for tag in whole:
        m = re.fullmatch(r"f\((\{[^)]*\})\)(.*)", tag, flags=re.S)
        assert m, text
        jsonschema.validate(json.loads(m.group(1)), AT_TAG["structures"][0]["schema"])


DEEP = "[" * 5000 + "]" * 5000               # JSON text nested past the request's own limit (and Python's)


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"json": {"type": "nope"}}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"guided_jsn": {}}, "guided_jsn"),                         # still unknown: a 400 naming it
    ({"response_format": {**AT_TAG, "triggers": ["#"]}}, "response_format"),      # a begin without its trigger
    ({"structured_outputs": {"structural_tag": "{"}}, "structured_outputs.structural_tag"),
    ({"structural_tag": "{"}, "structural_tag"),
    ({"structural_tag": json.dumps(AT_TAG), "guided_regex": "a"}, "structural_tag"),     # one format a request
    ({"response_format": {"type": "structural_tag", "format": {"type": "triggered_tags"}}}, "response_format.format"),
    # JSON text is read as a body is: too deep is a 400 naming the field, not a RecursionError's 500
    ({"structured_outputs": {"structural_tag": DEEP}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json": DEEP}}, "structured_outputs.json"),
    ({"guided_json": DEEP}, "guided_json"),
    # each structure looks its trigger up among the triggers: their number is bounded
    ({"response_format": {**AT_TAG, "triggers": [f"#{i}" for i in range(1024)] + ["@"]}}, "response_format"),
    # so is a choice's, whose check grew with the square of them (100,000: minutes)
    ({"guided_choice": [f"c{i}" for i in range(10_001)]}, "guided_choice"),
    # a $ref chain past what the grammar engine's native stack takes (2,500 of them killed the server)
    ({"guided_json": {"$defs": {**{f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(1100)},
                                "d1100": {"type": "integer"}}, "$ref": "#/$defs/d0"}}, "guided_json"),
    ({"guided_grammar": "start: r0\n" + "\n".join(f'r{i}: "x" r{i + 1}' for i in range(1100)) + '\nr1100: "z"'},
     "guided_grammar"),
])
def test_a_guided_field_that_cannot_be_enforced_is_a_400_naming_it(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, extra_body=extra)
    assert e.value.body["param"] == param and e.value.body["message"]


# ---------------------------------------------------------------- through a python stage

def passthrough(item: dict) -> dict:
    """A python stage that hands the request on as it came (as a redaction stage does)."""
    return item


HOOKED = """pipeline hooked {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests      {{}}
    stage hook    : python        {{ fn = "test_vllm_fields:passthrough" }}
    stage batch   : dynamic_batch {{ max_batch_size = 8  timeout = 5ms }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage gen     : generate      {{ max_new_tokens = 16 }}
    stage out     : respond       {{}}
    request -> hook -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


def test_the_fields_keep_their_meaning_through_a_python_stage(tiny_gguf):
    s = LiveServer(tiny_gguf, text=HOOKED.format(model=tiny_gguf), overrides={"chat_template": TEMPLATE})
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        kept = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, logprobs=True, extra_body={
            "ignore_eos": True, "skip_special_tokens": False, "logit_bias": {str(IM_START): 100},
            "stop_token_ids": [7], "chat_template_kwargs": {"enable_thinking": False},
            "allowed_token_ids": [IM_START, 7], "return_token_ids": True, "prompt_logprobs": 1})
        assert kept.choices[0].message.content == "<|im_start|>" * 2 and len(kept.choices[0].logprobs.content) == 2
        assert kept.choices[0].token_ids == [IM_START] * 2                          # vLLM's fields, kept too
        assert len(kept.prompt_token_ids) == len(kept.prompt_logprobs) == kept.usage.prompt_tokens
        plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        assert kept.usage.prompt_tokens > plain.usage.prompt_tokens                  # "/no_think" was rendered
        text = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8,
                                              extra_body={"guided_choice": ["yes", "no"]}).choices[0].message.content
        assert text in ("yes", "no")
        # vLLM's disable_any_whitespace is kept on the way through the stage: JSON without a space
        schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}, "b": {"enum": [3, 4]}}, "required": ["a", "b"]}
        text = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, temperature=1.0, seed=1,
                                              extra_body={"structured_outputs": {"json": schema,
                                                                                 "disable_any_whitespace": True}}
                                              ).choices[0].message.content
        assert " " not in text and json.loads(text)["a"] in (1, 2), text
        # and so is its whitespace_pattern: a newline the answer is pushed to write wherever it may
        [newline] = s.http.post(s.url + "/tokenize", json={"prompt": "\n", "add_special_tokens": False},
                                timeout=30).json()["tokens"]
        text = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, temperature=1.0, seed=1,
                                              logit_bias={str(newline): 100},
                                              extra_body={"structured_outputs": {"json": schema,
                                                                                 "whitespace_pattern": "\n"}}
                                              ).choices[0].message.content
        assert "\n" in text and " " not in text and json.loads(text)["a"] in (1, 2), text
        # a structural tag with vLLM's disable_any_whitespace: each "@" followed by f({"n":D}), no space
        [at] = s.http.post(s.url + "/tokenize", json={"prompt": "@", "add_special_tokens": False},
                          timeout=30).json()["tokens"]
        out = client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=16, temperature=1.0, seed=5, logit_bias={str(at): 100},
            extra_body={"structured_outputs": {"structural_tag": AT_TAG, "disable_any_whitespace": True}})
        text, *_ = out.choices[0].message.content.rpartition("@")          # the last tag may be cut
        assert re.fullmatch(r'(@f\(\{"n":[0-9]\}\))+', text), out.choices[0].message.content
    finally:
        s.close()


def test_completions_add_special_tokens_false_leaves_the_start_token_off(tmp_path):
    """vLLM's completions field (default true): false tokenises a text prompt as it is, with no
    start token before it (a prompt rendered by the client, its start token written), as
    /tokenize counts it; token-id prompts are taken as they are either way. `agp run` lines the same."""
    s = LiveServer(write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True), batch_timeout_s=0.001)
    try:
        def ids(prompt="the cat", **extra):
            out = s.client.completions.create(model="tiny", prompt=prompt, max_tokens=1,
                                              extra_body={"return_token_ids": True, **extra})
            assert out.usage.prompt_tokens == len(out.choices[0].model_extra["prompt_token_ids"])
            return out.choices[0].model_extra["prompt_token_ids"]

        def tokenize(**extra):
            return s.http.post(s.url + "/tokenize", json={"prompt": "the cat", **extra}, timeout=30).json()["tokens"]

        start = s.engine.tokenizer.bos_token_id
        assert ids() == ids(add_special_tokens=True) == tokenize() and ids()[0] == start
        assert ids(add_special_tokens=False) == tokenize(add_special_tokens=False) == ids()[1:]
        assert ids(prompt=[5, 6], add_special_tokens=True) == ids(prompt=[5, 6], add_special_tokens=False) == [5, 6]
        with pytest.raises(openai.BadRequestError) as e:
            ids(add_special_tokens="no")
        assert e.value.param == "add_special_tokens"
        runtime = build_runtime(Path(s.dir) / "tiny.agp", overrides={"threads": 1})
        out: dict = {}
        try:
            line = {"prompt": "the cat", "max_tokens": 1, "return_token_ids": True, "add_special_tokens": False}
            run_pipeline(runtime, [RunRequest(slot=0, line=1, parsed=parse_request(line, default_id=0))],
                         on_done=out.__setitem__, progress=False)
        finally:
            runtime.shutdown()
        assert out[0]["prompt_token_ids"] == ids()[1:]
        with pytest.raises(RequestError) as e:           # the chat template writes a conversation's own
            parse_request({"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": True}, default_id=0)
        assert e.value.param == "add_special_tokens"
    finally:
        s.close()


# ---------------------------------------------------------------- one request's spec does not hurt others

def _unique_schema(tag: str) -> dict:
    """A schema no other test checks (the check cache is the process's)."""
    return {"type": "object", "properties": {f"{tag}_{uuid.uuid4().hex}": {"type": "string"}}}


def test_the_check_cache_holds_a_digest_a_spec_whatever_its_size_and_a_repeated_spec_is_checked_once(monkeypatch):
    checked = []
    real = requests_io.check_spec
    monkeypatch.setattr(requests_io, "check_spec", lambda spec, **kw: (checked.append(1), real(spec, **kw))[1])
    before = requests_io.check_cache_info()
    specs = [{**_unique_schema("big"), "description": "x" * (1 << 20)} for _ in range(4)]   # 1 MiB each
    for schema in specs:
        assert requests_io.read_constraint({"guided_json": schema})[0]["schema"] is schema
    info = requests_io.check_cache_info()
    assert len(checked) == 4
    assert info["bytes"] - before["bytes"] <= 4 * requests_io.ENTRY_BYTES      # not the 4 MiB of text
    assert info["bytes"] <= info["max_bytes"] and info["entries"] <= info["max_entries"]
    requests_io.read_constraint({"guided_json": json.loads(json.dumps(specs[0]))})    # an equal spec: a hit
    assert len(checked) == 4


def _held_checks(monkeypatch) -> tuple[threading.Semaphore, threading.Event]:
    """Each grammar check (requests_io.check_spec) says it began (`entered`) and waits for `gate`."""
    entered, gate = threading.Semaphore(0), threading.Event()
    real = requests_io.check_spec

    def held(spec, **kw):
        entered.release()
        gate.wait()
        return real(spec, **kw)

    monkeypatch.setattr(requests_io, "check_spec", held)
    return entered, gate


def test_a_plain_request_is_answered_while_grammar_checks_hold_their_threads(server, monkeypatch):
    """More requests needing a grammar check than the server has request threads arrive, and each
    check is held (a gate in check_spec): MAX_GRAMMAR_CHECKS of them run, GRAMMAR_WAITING wait for
    their turn without holding a request thread, the rest are a 503 with Retry-After at once; a
    request without structured output is answered meanwhile, and those that waited are answered
    once the checks go on."""
    from pipeline_dsl.serve import extras

    entered, gate = _held_checks(monkeypatch)
    monkeypatch.setattr(extras, "GRAMMAR_WAITING", 3)
    running, waiting = requests_io.MAX_GRAMMAR_CHECKS, extras.GRAMMAR_WAITING
    heavy = min(32, (os.cpu_count() or 1) + 4) + 2       # more than asyncio's default executor has threads
    answers: list = [None] * heavy

    def ask(i):
        answers[i] = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": USER, "max_tokens": 2, "guided_json": _unique_schema("held")})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(heavy)]
    try:
        for t in threads:
            t.start()
        for _ in range(running):
            entered.acquire()
        while sum(a is not None for a in answers) < heavy - running - waiting:
            threads[[a is None for a in answers].index(True)].join(0.05)
        plain = server.http.post(server.url + "/v1/chat/completions", timeout=120,
                           json={"model": "tiny", "messages": USER, "max_tokens": 2})
        assert plain.status_code == 200, plain.text
        busy = [a for a in answers if a is not None]
        assert all(a.status_code == 503 and a.headers["Retry-After"] == "1" for a in busy)
        assert {a.json()["error"]["code"] for a in busy} == {"grammar_checks_busy"}
        assert busy[0].json()["error"]["param"] == "guided_json"
    finally:
        gate.set()
        for t in threads:
            t.join()
    assert sorted(a.status_code for a in answers) == [200] * (running + waiting) + [503] * (
        heavy - running - waiting)


def test_agp_run_lines_wait_for_their_turn_at_the_grammar_checks(monkeypatch):
    """A line's check is bounded by the same MAX_GRAMMAR_CHECKS, but waits for its turn."""
    entered, gate = _held_checks(monkeypatch)
    n = requests_io.MAX_GRAMMAR_CHECKS + 1
    parsed: list = [None] * n

    def line(i):
        parsed[i] = parse_request({"prompt": "hi", "guided_json": _unique_schema("line")}, default_id=i)

    threads = [threading.Thread(target=line, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for _ in range(requests_io.MAX_GRAMMAR_CHECKS):
        entered.acquire()
    assert not entered.acquire(blocking=False)            # the last one waits, not refused
    gate.set()
    for t in threads:
        t.join()
    assert all(p.response_format["type"] == "json_schema" for p in parsed)


def test_equal_specs_arriving_together_are_checked_once(monkeypatch):
    """While one spec's check runs (held at a gate), an equal spec is not checked again: on a
    request thread (wait False) it is a ChecksBusy, to wait on the grammar threads; there (wait
    True) it waits for the running check's result. N equal specs: one check, one answer."""
    calls, entered, gate = [], threading.Semaphore(0), threading.Event()
    real = requests_io.check_spec

    def counted(spec, **kw):
        calls.append(1)
        if len(calls) == 1:                    # the first check is held until the gate opens
            entered.release()
            gate.wait()
        return real(spec, **kw)

    monkeypatch.setattr(requests_io, "check_spec", counted)
    spec = {"type": "json_schema", "schema": {**_unique_schema("same"), "uniqueItems": True, "type": "array"}}
    answers: list = []
    first = threading.Thread(target=lambda: answers.append(requests_io.spec_problem(spec)))
    first.start()
    entered.acquire()
    for _ in range(3):                         # a slot is free, but the equal spec's check runs
        with pytest.raises(requests_io.ChecksBusy):
            requests_io.spec_problem(json.loads(json.dumps(spec)), wait=False)
    waiting = [threading.Thread(target=lambda: answers.append(requests_io.spec_problem(json.loads(json.dumps(spec)))))
               for _ in range(4)]
    for t in waiting:
        t.start()
    gate.set()
    for t in [first, *waiting]:
        t.join()
    assert len(calls) == 1
    assert len(answers) == 5 and len(set(answers)) == 1 and "uniqueItems" in answers[0]


def _tools(k: int) -> list:
    return [{"type": "function", "function": {"name": f"f{i}"}} for i in range(k)]


def test_a_request_carries_at_most_128_tools_on_chat_responses_and_run_lines(server, client):
    most = requests_io.MAX_TOOLS
    assert most == 128                                    # OpenAI's limit
    assert len(parse_request({"messages": USER, "tools": _tools(most)}).tools) == most
    with pytest.raises(RequestError) as e:
        parse_request({"messages": USER, "tools": _tools(most + 1)})
    assert e.value.param == "tools" and "at most 128" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, tools=_tools(most + 1))
    assert e.value.body["param"] == "tools" and "129 tools" in e.value.body["message"]
    r = server.http.post(server.url + "/v1/responses", timeout=120, json={
        "model": "tiny", "input": "hey", "max_output_tokens": 2,
        "tools": [{"type": "function", "name": f"f{i}"} for i in range(most + 1)]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    spec = server.http.get(server.url + "/openapi.json", timeout=30).json()
    found = []
    todo = [spec]
    while todo:                                           # every request schema's "tools" says so
        node = todo.pop()
        if isinstance(node, dict):
            if isinstance(node.get("properties"), dict) and isinstance(node["properties"].get("tools"), dict):
                found.append(node["properties"]["tools"].get("maxItems"))
            todo += list(node.values())
        elif isinstance(node, list):
            todo += node
    assert found and set(found) == {most}


# vLLM's ChatCompletionRequest written out whole (model_dump), as a client built on vLLM's own request
# model sends it: every field at its default
VLLM_DEFAULTS = {
    "frequency_penalty": 0.0, "logit_bias": None, "logprobs": False, "top_logprobs": 0, "max_completion_tokens": None,
    "n": 1, "presence_penalty": 0.0, "response_format": None, "seed": None, "stop": [], "stream": False,
    "stream_options": None, "temperature": None, "top_p": None, "tools": None, "tool_choice": "none",
    "reasoning_effort": None, "include_reasoning": True, "parallel_tool_calls": True, "user": None,
    "use_beam_search": False, "top_k": None, "min_p": None, "repetition_penalty": None, "length_penalty": 1.0,
    "stop_token_ids": [], "include_stop_str_in_output": False, "ignore_eos": False, "min_tokens": 0,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "truncate_prompt_tokens": None,
    "prompt_logprobs": None, "allowed_token_ids": None, "bad_words": [], "echo": False, "add_generation_prompt": True,
    "continue_final_message": False, "add_special_tokens": False, "documents": None, "chat_template": None,
    "chat_template_kwargs": None, "mm_processor_kwargs": None, "structured_outputs": None, "priority": 0,
    "request_id": "vllm-defaults", "logits_processors": None, "return_tokens_as_token_ids": None,
    "return_token_ids": None, "cache_salt": None, "kv_transfer_params": None, "vllm_xargs": None,
    "max_repetition_pattern_size": 0, "min_repetition_pattern_size": 0, "repetition_min_count": 0,
    "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None, "structural_tag": None,
    "guided_decoding_backend": None, "guided_whitespace_pattern": None}
CHAT_ONLY = {"max_completion_tokens", "top_logprobs", "tools", "tool_choice", "reasoning_effort", "include_reasoning",
             "parallel_tool_calls", "echo", "add_generation_prompt", "continue_final_message", "add_special_tokens",
             "documents", "chat_template", "chat_template_kwargs", "mm_processor_kwargs"}


def test_vllms_request_model_written_out_whole_is_served(server):
    """Its fields of features agp lacks (chat_template, logits_processors, kv_transfer_params, ...) and
    top_logprobs 0 without logprobs were 400s (\"unrecognized request argument\", \"'top_logprobs' needs
    logprobs\"), though they ask for nothing at their defaults."""
    chat = server.http.post(server.url + "/v1/chat/completions", timeout=60, json={
        **VLLM_DEFAULTS, "model": "tiny", "messages": USER, "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["logprobs"] is None
    comp = server.http.post(server.url + "/v1/completions", timeout=60, json={
        **{k: v for k, v in VLLM_DEFAULTS.items() if k not in CHAT_ONLY}, "model": "tiny", "prompt": "hi",
        "max_tokens": 2, "logprobs": None, "echo": False, "add_special_tokens": True, "prompt_embeds": None})
    assert comp.status_code == 200, comp.text


# the fields newer vLLMs added to both request models, at their defaults (chat's own: NEWER_CHAT_ONLY)
VLLM_NEWER_DEFAULTS = {
    "thinking_token_budget": None, "truncation_side": None, "logprob_token_ids": None, "watermarking": None,
    "session_id": None, "routed_experts_prompt_start": 0, "return_token_offsets": False, "return_mm_kwargs": True,
    "ec_transfer_params": None, "repetition_detection": None, "stream_interval": None,
    "media_io_kwargs": None, "return_prompt_text": None}
NEWER_CHAT_ONLY = {"media_io_kwargs", "return_prompt_text"}


def test_a_newer_vllms_request_model_written_out_whole_is_served(server):
    """thinking_token_budget, session_id, truncation_side, repetition_detection, ... were 400s
    ("unrecognized request argument"), though at their defaults they ask for nothing; -1, vLLM's
    unlimited thinking budget, and left truncation (agp's) ask for nothing too."""
    newer = {**VLLM_DEFAULTS, **VLLM_NEWER_DEFAULTS, "thinking_token_budget": -1, "truncation_side": "left"}
    chat = server.http.post(server.url + "/v1/chat/completions", timeout=60, json={
        **newer, "model": "tiny", "messages": USER, "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    comp = server.http.post(server.url + "/v1/completions", timeout=60, json={
        **{k: v for k, v in newer.items() if k not in CHAT_ONLY | NEWER_CHAT_ONLY}, "model": "tiny", "prompt": "hi",
        "max_tokens": 2, "logprobs": None, "echo": False, "add_special_tokens": True, "prompt_embeds": None})
    assert comp.status_code == 200, comp.text


def test_vllms_tokenize_request_model_written_out_whole_is_served(server):
    """vLLM's TokenizeChatRequest at its defaults sends chat_template, mm_processor_kwargs and
    media_io_kwargs as null: they were 400s ("unrecognized request argument"); the ids are those
    of the conversation without them. A value that asks for something is a 400 saying why, as on chat."""
    plain = server.http.post(server.url + "/tokenize", json={"messages": USER}, timeout=30)
    whole = server.http.post(server.url + "/tokenize", timeout=30, json={
        "model": "tiny", "messages": USER, "add_generation_prompt": True, "return_token_strs": False,
        "continue_final_message": False, "add_special_tokens": False, "chat_template": None,
        "chat_template_kwargs": None, "media_io_kwargs": None, "mm_processor_kwargs": None, "tools": None})
    assert whole.status_code == 200, whole.text
    assert whole.json()["tokens"] == plain.json()["tokens"]
    r = server.http.post(server.url + "/tokenize", json={"messages": USER, "chat_template": "{{ messages }}"},
                         timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    assert "a request brings no chat template of its own" in r.json()["error"]["message"]


def test_content_parts_vllm_reads_as_text_are_text_here_too(server):
    """A bare string in a content array and the Responses API's input_text and output_text parts
    (a conversation carried over from the Responses API) are text parts in vLLM's chat: they were
    400s ("must be a text part"). The conversation renders as the one written with text parts, on
    chat and /tokenize alike."""
    def conversation(user, assistant):
        return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant},
                {"role": "user", "content": "and?"}]

    plain = conversation([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                         [{"type": "text", "text": "c"}])
    carried = conversation(["a", {"type": "input_text", "text": "b"}], [{"type": "output_text", "text": "c"}])
    tokens = [server.http.post(server.url + "/tokenize", json={"messages": m}, timeout=30) for m in (plain, carried)]
    assert tokens[1].status_code == 200, tokens[1].text
    assert tokens[0].json()["tokens"] == tokens[1].json()["tokens"]
    answers = [server.client.chat.completions.create(model="tiny", messages=m, max_tokens=4, temperature=0)
               for m in (plain, carried)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage.prompt_tokens == answers[1].usage.prompt_tokens
    r = server.http.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "input_image"}]}]})
    assert r.status_code == 400 and "agp serves text only" in r.json()["error"]["message"]


def test_vllms_session_id_and_stream_interval_are_taken_and_change_nothing(server):
    """A session's id (a router's hint) and how many tokens a streamed chunk groups are taken and
    checked; the answer is the one sent without them, streamed or not."""
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 6, "temperature": 0}
    plain = server.client.completions.create(**body).choices[0].text
    extra = {"session_id": "agent-7", "stream_interval": 4, "return_token_offsets": True, "return_mm_kwargs": False}
    assert server.client.completions.create(**body, extra_body=extra).choices[0].text == plain
    streamed = server.client.completions.create(**body, stream=True, extra_body=extra)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain
    for field, value in (("session_id", 7), ("stream_interval", 0), ("return_token_offsets", "yes"),
                         ("truncation_side", "right")):       # agp keeps a truncated prompt's last tokens
        r = server.http.post(server.url + "/v1/chat/completions", timeout=60,
                             json={"model": "tiny", "messages": USER, "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("route, field, value, why", [
    ("chat", "thinking_token_budget", 64, "it bounds no model's thinking apart from its answer"),
    ("completions", "repetition_detection", {"max_pattern_size": 8}, "it stops no answer on repeated token patterns"),
    ("completions", "logprob_token_ids", [5, 6], "not of tokens chosen by id"),
    ("chat", "watermarking", True, "it watermarks no answer"),
    ("chat", "media_io_kwargs", {"video": {"num_frames": 8}}, "it serves text only"),
    ("chat", "return_prompt_text", True, "it does not send the rendered prompt back"),
    ("chat", "chat_template", "{{ messages }}", "a request brings no chat template of its own (start the server "
                                                "with --chat-template FILE)"),
    ("chat", "mm_processor_kwargs", {"fps": 1}, "it serves text only"),
    ("chat", "logits_processors", ["my.Processor"], "it runs no custom logits processors (use 'logit_bias'"),
    ("completions", "kv_transfer_params", {"do_remote_decode": True}, "it has no disaggregated prefill"),
    ("chat", "repetition_min_count", 3, "it stops no answer on repeated token patterns"),
])
def test_a_vllm_field_of_a_feature_agp_lacks_is_a_400_saying_why(server, route, field, value, why):
    body = {"messages": USER} if route == "chat" else {"prompt": "hi"}
    r = server.http.post(f"{server.url}/v1/{'chat/' if route == 'chat' else ''}completions", timeout=60,
                         json={"model": "tiny", "max_tokens": 2, **body, field: value})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field and err["code"] == "unsupported_parameter"
    assert err["message"].startswith(f"'{field}' = ") and why in err["message"], err["message"]
    assert "unrecognized" not in err["message"]
