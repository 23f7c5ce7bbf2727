"""Logprobs over the wire, read by the official `openai` client: completions `logprobs`
(0..20 alternatives) with and without `echo`, streaming and not, `max_tokens: 0` with echo
to score a prompt; chat `logprobs` + `top_logprobs`, streaming and not. The shapes are
OpenAI's: completions `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`,
chat `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.

The prompt's logprobs (echo) are compared with transformers' log_softmax of the same
weights: the tiny model here, the embedded SmolLM2 in fp32 in tests/test_model_parity.py.
Logprobs of generated tokens come from the engine's sampler (raw log_softmax of the logits).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import openai
import pytest
import torch

import flowkit
from flowkit import chain, write
from pipeline_dsl.commands.runner import RunRequest, run_pipeline
from pipeline_dsl.flow import build_runtime
from pipeline_dsl.requests_io import parse_request
from test_serve import LiveServer
from tiny_model import write_tiny_gguf

PROMPT = "the cat and the world is hello"
EPS = 1e-5                 # float32 logprobs sent as JSON and read back: the same number to this


@pytest.fixture(scope="module")
def server(soft_gguf):
    """The tiny model with spread next-token distributions: alternatives differ by little."""
    s = LiveServer(soft_gguf, batch_timeout_s=0.001)
    yield s
    s.close()


def tokenize(server, text: str) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"prompt": text}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def token_text(server, token_id: int) -> str:
    return server.engine.tokenizer.decode([token_id], skip_special_tokens=False)


def check_completion_logprobs(lp, n_tokens: int, k: int, first_is_prompt: bool) -> None:
    """OpenAI's completions logprobs: parallel lists, the first entry None when it is the prompt's
    first token, each top_logprobs dict the k most likely and the sampled token (up to k + 1
    entries; tokens whose text coincides share one key), most likely first, offsets counting
    the characters of the tokens before."""
    assert set(lp.model_dump()) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_tokens
    for i, (tok, value, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        if i == 0 and first_is_prompt:
            assert value is None and top is None
            continue
        assert isinstance(tok, str) and value <= 0 and math.isfinite(value)
        assert 1 <= len(top) <= k + 1
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        assert top[tok] >= value - EPS  # its own logprob, or a likelier token's of the same text
        if len(top) == k + 1:           # listed beside the k most likely: below each of them
            assert top[tok] <= values[-2] + EPS
    # a token that is part of a character reads U+FFFD and advances by the characters it completes
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens) if "\ufffd" not in t)


# ---------------------------------------------------------------- echo: the prompt's logprobs

def test_echo_with_max_tokens_0_scores_the_prompt(server):
    ids = tokenize(server, PROMPT)
    r = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)
    c = r.choices[0]
    assert c.text == PROMPT and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    check_completion_logprobs(c.logprobs, len(ids), 3, first_is_prompt=True)
    assert c.logprobs.tokens == [token_text(server, t) for t in ids]
    assert "".join(c.logprobs.tokens) == PROMPT and c.logprobs.text_offset[0] == 0
    top = c.logprobs.top_logprobs
    assert any(len(t) >= 3 for t in top[1:])                    # the spread model has distinct alternatives
    assert any(len(t) == 4 for t in top[1:])                    # a prompt token outside the top 3 is listed too


def test_echo_logprobs_equal_transformers_on_the_same_weights(server, soft_gguf):
    """The tiny model in fp32 both sides: agp's prompt logprobs (computed by the engine as it
    prefills the prompt) and transformers' log_softmax of the dequantised GGUF agree to 1e-4
    (measured 1.5e-6)."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(soft_gguf.parent), gguf_file=soft_gguf.name, dtype=torch.float32, local_files_only=True).eval()
    for text in (PROMPT, "hello world, the cat is in the world", "12 + 34 = 46\n\nand the end"):
        ids = tokenize(server, text)
        r = server.client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=5)
        lp = r.choices[0].logprobs
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), dim=-1)[:-1]
        want = logp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        got = torch.tensor(lp.token_logprobs[1:], dtype=torch.float64)
        assert (got - want).abs().max().item() < 1e-4, text
        best = logp.topk(5, dim=-1)
        for i, top in enumerate(lp.top_logprobs[1:]):
            first = next(iter(top.items()))
            assert first[0] == token_text(server, int(best.indices[i, 0])), (text, i)
            assert abs(first[1] - best.values[i, 0].item()) < 1e-4


def test_text_offsets_stay_in_the_text_when_tokens_split_characters(server):
    """The tiny model's byte-level BPE cuts every non-ASCII character over tokens that read U+FFFD
    alone: each token's text_offset is where its text begins in the echoed text (the character
    it begins inside, for a piece of one), never past the end, streamed or not."""
    prompt = "héllo 日本 the cat 🎉 ok"
    kw = dict(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    lp = server.client.completions.create(**kw).choices[0].logprobs
    assert any("\ufffd" in t for t in lp.tokens)                 # characters are split here
    assert all(prompt[o:o + len(t)] == t for o, t in zip(lp.text_offset, lp.tokens) if "\ufffd" not in t)
    assert lp.text_offset[-1] == len(prompt) - len(lp.tokens[-1]) and max(lp.text_offset) < len(prompt)
    chunks = list(server.client.completions.create(**kw, stream=True))
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == lp.text_offset

    # generated pieces of characters (the regex leaves only them): offsets follow the answer's
    # text, chunk after chunk
    gen = dict(model="tiny", prompt="the cat", max_tokens=8, logprobs=0, extra_body={"guided_regex": "日本 ok"})
    whole = server.client.completions.create(**gen).choices[0]
    assert whole.text == "日本 ok" and whole.logprobs.tokens.count("\ufffd") >= 4
    assert all(whole.text[o:o + len(t)] == t for o, t in zip(whole.logprobs.text_offset, whole.logprobs.tokens)
               if "\ufffd" not in t)
    assert whole.logprobs.text_offset[-1] < len(whole.text)
    streamed = list(server.client.completions.create(**gen, stream=True))
    offsets = [o for c in streamed if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset


def offsets_fit(text: str, lp) -> bool:
    """Every whole token's text is in `text` at its offset, or (a special token the text leaves
    out) adds nothing there; no offset passes the text's end."""
    at = lp.text_offset
    return all(o <= len(text) for o in at) and all(
        text[o:o + len(t)] == t or (b == o and t.startswith("<|"))
        for o, b, t in zip(at, [*at[1:], len(text)], lp.tokens) if "\ufffd" not in t)


@pytest.fixture(scope="module")
def bos_server(tmp_path_factory):
    """A server of a model whose tokenizer puts a start token before each prompt."""
    s = LiveServer(write_tiny_gguf(tmp_path_factory.mktemp("bos") / "bos.gguf", add_bos=True), batch_timeout_s=0.001)
    yield s
    s.close()


@pytest.mark.parametrize("skip", [True, False])
def test_text_offsets_count_no_text_for_tokens_the_text_leaves_out(bos_server, skip):
    """A start token the tokenizer put before the prompt is not in the echoed prompt, and special
    tokens an answer generates are left out of its text with skip_special_tokens: they take no
    characters there, so the offsets after them still point into the text, whole and streamed."""
    s = bos_server
    start = s.engine.tokenizer.bos_token_id
    kw = dict(model="tiny", prompt="the cat", max_tokens=4, echo=True, logprobs=0, temperature=0,
              extra_body={"skip_special_tokens": skip, "logit_bias": {str(start): 100}, "ignore_eos": True})
    whole = s.client.completions.create(**kw).choices[0]
    assert whole.logprobs.tokens[0] == whole.logprobs.tokens[-1] == "<|im_start|>"   # added, then generated
    assert whole.text == "the cat" + ("" if skip else "<|im_start|>" * 4)
    assert whole.logprobs.text_offset[:2] == [0, 0] and offsets_fit(whole.text, whole.logprobs)
    chunks = list(s.client.completions.create(**kw, stream=True))
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == \
        whole.logprobs.text_offset
    runtime = build_runtime(Path(s.dir) / "tiny.agp", overrides={"threads": 1})   # agp run's lines
    line = {k: v for k, v in kw.items() if k not in ("model", "extra_body")} | kw["extra_body"]
    out: dict = {}
    try:
        run_pipeline(runtime, [RunRequest(slot=0, line=1, parsed=parse_request(line, default_id=0))],
                     on_done=out.__setitem__, progress=False)
    finally:
        runtime.shutdown()
    assert out[0]["text"] == whole.text and out[0]["logprobs"]["text_offset"] == whole.logprobs.text_offset


def test_text_offsets_of_an_echoed_sentencepiece_prompt_start_at_its_first_word(tmp_path):
    """A SentencePiece prompt's first word reads " the" as a token but "the" at the start of the
    echoed prompt: it begins at 0 and takes three characters, so every later offset (the
    answer's too) points at its token's text, whole and streamed."""
    s = LiveServer(write_tiny_gguf(tmp_path / "spm.gguf", tokenizer="spm"), batch_timeout_s=0.001)
    try:
        kw = dict(model="tiny", prompt="the cat and the world", max_tokens=3, echo=True, logprobs=0,
                  temperature=0, extra_body={"ignore_eos": True})
        whole = s.client.completions.create(**kw).choices[0]
        lp = whole.logprobs
        assert lp.tokens[:3] == ["<s>", " the", " cat"] and lp.text_offset[:3] == [0, 0, 3]
        assert whole.text.startswith("the cat and the world")
        assert all(whole.text[o:o + len(t)] == t for o, t in zip(lp.text_offset[2:], lp.tokens[2:]))
        chunks = list(s.client.completions.create(**kw, stream=True))
        assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == \
            lp.text_offset
    finally:
        s.close()


def test_batched_prompts_are_scored_each_as_alone(server):
    prompts = [PROMPT, "hello world", tokenize(server, "the world and the cat")]
    alone = [server.client.completions.create(model="tiny", prompt=p, max_tokens=0, echo=True, logprobs=2)
             .choices[0] for p in prompts]
    r = server.client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, a in zip(r.choices, alone):
        assert c.text == a.text and c.logprobs.tokens == a.logprobs.tokens
        assert c.logprobs.token_logprobs == pytest.approx(a.logprobs.token_logprobs, abs=EPS)
    assert r.choices[2].text == "the world and the cat"           # token ids echo as their text


def test_echo_streams_the_prompt_first_with_its_logprobs(server):
    whole = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    chunks = list(server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True,
                                                   logprobs=2, stream=True))
    assert chunks[0].choices[0].text == PROMPT
    assert chunks[0].choices[0].logprobs.model_dump() == whole.choices[0].logprobs.model_dump()
    assert "".join(c.choices[0].text for c in chunks) == PROMPT
    assert chunks[-1].choices[0].finish_reason == "length"

    # echo with generation: the prompt, then the new text, as the answer that does not stream
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=6, echo=True, temperature=0, extra_body={"ignore_eos": True})
    whole = server.client.completions.create(**kw)
    chunks = list(server.client.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].text == PROMPT and chunks[0].choices[0].logprobs is None
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.choices[0].text.startswith(PROMPT) and len(whole.choices[0].text) > len(PROMPT)

    # echo, logprobs and generation: the first chunk is the prompt with its scores, before any token
    scored = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    chunks = list(server.client.completions.create(**kw, logprobs=2, stream=True))
    assert chunks[0].choices[0].text == PROMPT
    assert chunks[0].choices[0].logprobs.model_dump() == scored.choices[0].logprobs.model_dump()
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_batched_echo_streams_each_prompt_on_its_own_choices(server):
    prompts = ["hello world", "the cat"]
    chunks = list(server.client.completions.create(model="tiny", prompt=prompts, max_tokens=3, echo=True, n=2,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True}))
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert sorted(texts) == [0, 1, 2, 3]
    for index, text in texts.items():
        assert text.startswith(prompts[index // 2]) and len(text) > len(prompts[index // 2])


def test_echo_without_logprobs_and_the_limits_of_max_tokens_0(server):
    r = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True)
    assert r.choices[0].text == PROMPT and r.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="'max_tokens' = 0 generates nothing, so it is taken only with"):
        server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)      # 0 only with echo
    r = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    lp = r.choices[0].logprobs                                  # logprobs 0: the token itself alone
    assert lp.top_logprobs[1:] == [{t: v} for t, v in zip(lp.tokens[1:], lp.token_logprobs[1:])]
    r = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=20)
    assert max(len(t) for t in r.choices[0].logprobs.top_logprobs[1:]) > 5     # more than OpenAI's 5


def test_echo_scoring_is_prefilled_in_chunks_beside_other_streams(soft_gguf):
    """A long prompt scored with echo runs through the engine's scheduler like any prefill:
    16-token chunks (the server's prefill_chunk), each step beside the running stream's decode,
    instead of one forward of the whole prompt that holds every stream up."""
    s = LiveServer(soft_gguf, overrides={"prefill_chunk": 16, "max_tokens_per_step": 32})
    try:
        ids = [(7 * i + 3) % 200 + 3 for i in range(400)]
        before = s.stats()
        stream = s.client.completions.create(model="tiny", prompt="the cat", max_tokens=300, stream=True,
                                             extra_body={"ignore_eos": True})
        next(iter(stream))                                        # the victim is decoding
        r = s.client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
        after = s.stats()
        stream.close()
        assert len(r.choices[0].logprobs.token_logprobs) == 400 and r.choices[0].finish_reason == "length"
        assert after["prefill_tokens"] - before["prefill_tokens"] >= 400    # scored by the engine's steps
        mixed = sum(n for size, n in after["batch_size_hist"].items() if int(size) >= 2) - \
            sum(n for size, n in before["batch_size_hist"].items() if int(size) >= 2)
        assert mixed >= 400 // 16 - 1                             # nearly every chunk beside the stream
    finally:
        s.close()


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_out_of_range_logprobs_are_400_naming_the_field(server, route, body, param):
    r = httpx.post(server.url + route, json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---------------------------------------------------------------- generated tokens' logprobs

def check_greedy(values: list[float], tops: list[list[float]]) -> None:
    """Greedy decoding samples the most likely token: its logprob is the top one."""
    for value, top in zip(values, tops):
        assert value <= 0 and abs(value - top[0]) <= EPS
        assert top == sorted(top, reverse=True)


def test_completion_logprobs_of_generated_tokens(server):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, logprobs=3, temperature=0, extra_body={"ignore_eos": True})
    r = server.client.completions.create(**kw)
    c = r.choices[0]
    check_completion_logprobs(c.logprobs, r.usage.completion_tokens, 3, first_is_prompt=False)
    assert c.logprobs.text_offset[0] == 0
    check_greedy(c.logprobs.token_logprobs, [list(t.values()) for t in c.logprobs.top_logprobs])

    # streamed: the same tokens, each chunk's logprobs with its own text, offsets into the whole text
    chunks = list(server.client.completions.create(**kw, stream=True))
    lps = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert [t for lp in lps for t in lp.tokens] == c.logprobs.tokens
    assert [v for lp in lps for v in lp.token_logprobs] == pytest.approx(c.logprobs.token_logprobs, abs=EPS)
    assert [o for lp in lps for o in lp.text_offset] == c.logprobs.text_offset
    assert all(lp.tokens for lp in lps)


def test_echo_with_generation_lists_prompt_then_new_tokens(server):
    """lm-eval's loglikelihood request: echo, max_tokens 1, logprobs 1: the prompt's entries, then
    the generated token's (which it drops as the last)."""
    ids = tokenize(server, PROMPT)
    r = server.client.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                         temperature=0, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 == r.usage.prompt_tokens + r.usage.completion_tokens
    check_completion_logprobs(lp, len(ids) + 1, 1, first_is_prompt=True)
    scored = server.client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert lp.token_logprobs[:-1] == scored.choices[0].logprobs.token_logprobs
    assert "".join(lp.tokens) == r.choices[0].text


def test_chat_logprobs_with_top_logprobs(server):
    msgs = [{"role": "user", "content": "the cat and the world"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=8, logprobs=True, top_logprobs=4, temperature=0,
              extra_body={"ignore_eos": True})
    r = server.client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for e in content:
        assert set(e.model_dump()) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e.bytes == list(e.token.encode()) or "\ufffd" in e.token
        assert len(e.top_logprobs) == 4
        for t in e.top_logprobs:
            assert set(t.model_dump()) == {"token", "logprob", "bytes"} and t.logprob <= 0
    check_greedy([e.logprob for e in content], [[t.logprob for t in e.top_logprobs] for e in content])
    assert [e.token for e in content] == [e.top_logprobs[0].token for e in content]

    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=EPS)
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [[t.token for t in e.top_logprobs]
                                                                      for e in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_chat_logprobs_without_top_logprobs_list_no_alternatives(server):
    r = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, logprobs=True, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(e.top_logprobs == [] and e.logprob <= 0 for e in content)


def test_no_logprobs_unless_asked(server):
    r = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3)
    assert r.choices[0].logprobs is None
    r = server.client.completions.create(model="tiny", prompt="hi", max_tokens=3, echo=True)
    assert r.choices[0].logprobs is None


def test_chat_logprob_bytes_are_each_tokens_own_and_join_into_the_text(server):
    """A character cut over several tokens: each token's text alone is U+FFFD, its `bytes` are its
    own (OpenAI's field, there for this), so the bytes of the answer's tokens join into its text."""
    pytest.importorskip("llguidance")
    kw = dict(model="tiny", messages=[{"role": "user", "content": "price"}], max_tokens=8, logprobs=True,
              top_logprobs=2, extra_body={"guided_choice": ["€5"]})     # € is E2 82 AC: three byte tokens
    r = server.client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == "€5"
    assert [e.bytes for e in content[:3]] == [[0xE2], [0x82], [0xAC]]
    assert b"".join(bytes(e.bytes) for e in content[:4]).decode() == "€5"     # then the end-of-turn token
    assert all(t.bytes == list(t.token.encode()) or "\ufffd" in t.token for e in content for t in e.top_logprobs)
    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.bytes for e in streamed] == [e.bytes for e in content]
    resp = server.client.responses.create(model="tiny", input="price", max_output_tokens=8, top_logprobs=1,
                                          include=["message.output_text.logprobs"],
                                          extra_body={"guided_choice": ["€5"]})
    part = resp.output[0].content[0]
    assert b"".join(bytes(e.bytes) for e in part.logprobs[:4]).decode() == part.text == "€5"


# ------------------------------------------- a pipeline whose generate stages' vocabularies differ

TWO_VOCABS = """
stage request : requests {}
stage route : route {}
stage bpe_gen : generate {}
stage spm_gen : generate { model = "%s" }
stage out : respond {}
request -> route
route -> batch_s otherwise
route -> batch_b when max_tokens > 100000
%s%sspm_gen -> out
bpe_gen -> out
"""
WORDS = "( the| cat| and| world| is| hello)+"     # an answer of PROMPT's words


@pytest.fixture(scope="module")
def two_vocabs(tmp_path_factory):
    """A pipeline of two generate stages whose models' vocabularies differ: bpe_gen's (the
    pipeline's model: byte-level BPE) and spm_gen's (SentencePiece). A request that names neither
    goes to spm_gen."""
    where = tmp_path_factory.mktemp("two_vocabs")
    bpe = write_tiny_gguf(where / "bpe.gguf", embed_scale=0.3)
    spm = write_tiny_gguf(where / "spm.gguf", tokenizer="spm", embed_scale=0.3)
    body = TWO_VOCABS % (spm, chain("spm_gen", "batch_s", "enc_s", "kv_s"),
                         chain("bpe_gen", "batch_b", "enc_b", "kv_b"))
    s = LiveServer(bpe, text=write(where, bpe, body).read_text(), stages=("bpe_gen", "spm_gen"),
                   overrides={"kv_budget_bytes": 8 << 20})
    yield s
    s.close()


def _spm(server):
    """spm_gen's own token text and bytes (the runtime's, asked for that stage by name), and the
    ids of its vocabulary's tokens of PROMPT (the only ones its answers here may sample: words)."""
    rt = server.runtime
    words = [t for t in rt.tokenise({"prompt": PROMPT}, pin="spm_gen") if t > 2]
    return rt.token_text("spm_gen"), rt.token_bytes("spm_gen"), words


def _named(entries) -> list:
    """Chat logprobs entries (objects or dicts) as what names their tokens: each token, its bytes
    and its alternatives' (their values aside: two runs' sums may differ in the last bits)."""
    def plain(e):
        return e if isinstance(e, dict) else e.model_dump()
    return [(e["token"], e["bytes"], [(t["token"], t["bytes"]) for t in e["top_logprobs"]])
            for e in map(plain, entries)]


def test_an_unpinned_chat_answer_names_its_tokens_in_the_vocabulary_of_the_model_that_wrote_it(two_vocabs):
    """An unpinned chat answer that spm_gen wrote names each of its tokens (top_logprobs too) and
    their bytes in spm_gen's vocabulary, not the pipeline's model's (another token has its id
    there): whole and streamed, as when the request names spm_gen; its tokens join into its text.
    So does the Responses API's answer (include message.output_text.logprobs)."""
    pytest.importorskip("llguidance")
    text_of, bytes_of, _ = _spm(two_vocabs)
    client = two_vocabs.client
    kw = dict(messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=0, logprobs=True,
              top_logprobs=2, extra_body={"ignore_eos": True, "return_token_ids": True, "guided_regex": WORDS})
    pinned = client.chat.completions.create(model="spm_gen", **kw).choices[0]
    assert any(text_of(t) != two_vocabs.runtime.token_text("bpe_gen")(t) for t in pinned.token_ids)
    for model in ("tiny", "spm_gen"):
        whole = client.chat.completions.create(model=model, **kw).choices[0]
        content = whole.logprobs.content
        assert [e.token for e in content] == [text_of(t) for t in whole.token_ids], model
        assert [bytes(e.bytes) for e in content] == [bytes_of(t) for t in whole.token_ids], model
        assert "".join(e.token for e in content) == whole.message.content, model
        assert _named(content) == _named(pinned.logprobs.content), model
        chunks = list(client.chat.completions.create(model=model, stream=True, **kw))
        streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert _named(streamed) == _named(content), model

        body = {"model": model, "input": PROMPT, "max_output_tokens": 6, "temperature": 0, "top_logprobs": 2,
                "include": ["message.output_text.logprobs"], "ignore_eos": True, "guided_regex": WORDS}
        r = httpx.post(two_vocabs.url + "/v1/responses", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()["output"]
        assert len(out) == 1 and len(out[0]["content"]) == 1, out
        part = out[0]["content"][0]
        assert _named(part["logprobs"]) == _named(content), model
        assert "".join(e["token"] for e in part["logprobs"]) == part["text"], model
        with httpx.stream("POST", two_vocabs.url + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert _named([e for ev in events if ev["type"] == "response.output_text.delta" for e in ev["logprobs"]]) \
            == _named(part["logprobs"]), model
        [done] = [ev for ev in events if ev["type"] == "response.incomplete"]     # its max_output_tokens
        assert _named(done["response"]["output"][0]["content"][0]["logprobs"]) == _named(part["logprobs"]), model


def test_an_unpinned_completion_reads_its_tokens_and_echoed_prompt_with_the_model_that_wrote_it(two_vocabs):
    """An unpinned completion that spm_gen wrote, echoed with logprobs: its prompt sent as token
    ids echoes as spm_gen's text of them, and every token of prompt and answer (prompt_logprobs'
    too) is named in spm_gen's vocabulary, at offsets in that text, whole and streamed, as when
    the request names spm_gen; `agp run`'s lines name them so as well."""
    text_of, _, words = _spm(two_vocabs)
    client = two_vocabs.client
    prompt_ids = words                                  # PROMPT's tokens (no start token: it is not echoed)
    extra = {"ignore_eos": True, "return_token_ids": True, "allowed_token_ids": words}
    for prompt in (PROMPT, prompt_ids):
        kw = dict(prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=2)
        pinned = client.completions.create(model="spm_gen", **kw, extra_body=extra).choices[0]
        for model in ("tiny", "spm_gen"):
            whole = client.completions.create(model=model, **kw, extra_body={**extra, "prompt_logprobs": 1}).choices[0]
            ids = whole.prompt_token_ids + whole.token_ids
            assert whole.text.startswith(PROMPT) and whole.text == pinned.text, (model, prompt)
            assert whole.logprobs.tokens == [text_of(t) for t in ids], (model, prompt)
            assert (whole.logprobs.tokens, whole.logprobs.text_offset) == \
                (pinned.logprobs.tokens, pinned.logprobs.text_offset), (model, prompt)
            assert [sorted(top or {}) for top in whole.logprobs.top_logprobs] == \
                [sorted(top or {}) for top in pinned.logprobs.top_logprobs], (model, prompt)
            answer = whole.logprobs.tokens[len(whole.prompt_token_ids):]
            assert "".join(answer) == whole.text[len(PROMPT):], (model, prompt)
            assert [e[str(t)]["decoded_token"] for e, t in zip(whole.prompt_logprobs[1:], whole.prompt_token_ids[1:])] \
                == [text_of(t) for t in whole.prompt_token_ids[1:]], (model, prompt)
            chunks = list(client.completions.create(model=model, stream=True, **kw, extra_body=extra))
            assert "".join(c.choices[0].text for c in chunks) == whole.text, (model, prompt)
            lps = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
            assert [t for lp in lps for t in lp.tokens] == whole.logprobs.tokens, (model, prompt)
            assert [o for lp in lps for o in lp.text_offset] == whole.logprobs.text_offset, (model, prompt)

    line = {"prompt_token_ids": prompt_ids, "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 2,
            "prompt_logprobs": 1, **extra}
    unpinned, named = flowkit.run_lines(Path(two_vocabs.dir) / "tiny.agp", [line, {**line, "model": "spm_gen"}],
                                        {"kv_budget_bytes": 8 << 20})
    assert unpinned["text"].startswith(PROMPT) and unpinned["generated_by"] == "spm_gen"
    ids = unpinned["prompt_token_ids"] + unpinned["token_ids"]
    assert unpinned["logprobs"]["tokens"] == [text_of(t) for t in ids]
    prompt = unpinned["prompt_token_ids"][1:]
    assert [e[str(t)]["decoded_token"] for e, t in zip(unpinned["prompt_logprobs"][1:], prompt)] == \
        [text_of(t) for t in prompt]
    assert unpinned["text"] == named["text"]
    assert [unpinned["logprobs"][k] for k in ("tokens", "text_offset")] == \
        [named["logprobs"][k] for k in ("tokens", "text_offset")]


RELABEL = '''
def relabel(item):
    by = item["request"].get("metadata", {}).get("by")
    item["generated_by"] = {"list": ["gen"], "number": 7, "object": {"stage": "gen"}}.get(by, by)
    return item
'''


def test_a_generated_by_that_names_no_generate_stage_reads_the_answer_with_the_pipeline_s_model(tmp_path, soft_gguf,
                                                                                                 monkeypatch):
    """A stage after generate may rewrite the answer's `generated_by` to any JSON value: one that
    names no generate stage tells nothing of the vocabulary, and the answer's tokens are read with
    the pipeline's model's (as an unpinned request's were), by agp serve and `agp run` alike; the
    request is answered, not failed."""
    (tmp_path / "relabel_hooks.py").write_text(RELABEL)
    monkeypatch.syspath_prepend(str(tmp_path))           # the server's pipeline file is in a folder of its own
    body = ("stage request : requests {}\nstage gen : generate {}\n"
            "stage relabel : python { fn = \"relabel_hooks:relabel\" }\nstage out : respond {}\n"
            "request -> batch\ngen -> relabel -> out\n" + chain())
    path = write(tmp_path, soft_gguf, body)
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    s = LiveServer(soft_gguf, text=path.read_text())
    try:
        text_of = s.runtime.token_text()
        for by in ("elsewhere", "list", "number", "object"):
            kw = dict(model="tiny", prompt=PROMPT, max_tokens=3, echo=True, logprobs=1,
                      extra_body={"metadata": {"by": by}, "return_token_ids": True})
            whole = s.client.completions.create(**kw).choices[0]
            assert whole.logprobs.tokens == [text_of(t) for t in whole.prompt_token_ids + whole.token_ids], by
            chunks = list(s.client.completions.create(**kw, stream=True))
            assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == \
                whole.logprobs.tokens, by
            kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True,
                      tools=[tool], extra_body={"metadata": {"by": by}, "return_token_ids": True})
            whole = s.client.chat.completions.create(**kw).choices[0]
            assert [e.token for e in whole.logprobs.content] == [text_of(t) for t in whole.token_ids], by
            chunks = list(s.client.chat.completions.create(**kw, stream=True))
            streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
            assert [e.token for e in streamed] == [e.token for e in whole.logprobs.content], by
    finally:
        s.close()
    bys = ("elsewhere", "list", "number", "object")
    lines = [{"prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 1, "return_token_ids": True,
              "metadata": {"by": by}} for by in bys]
    lines += [{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": 1,
               "return_token_ids": True, "tools": [tool], "metadata": {"by": by}} for by in bys]
    outs = flowkit.run_lines(path, lines, {"kv_budget_bytes": 8 << 20})
    for out in outs[:4]:
        assert out["logprobs"]["tokens"] == [text_of(t) for t in out["prompt_token_ids"] + out["token_ids"]], out
    for out in outs[4:]:
        assert out["logprobs"]["tokens"] == [text_of(t) for t in out["token_ids"]], out
