"""vLLM's token-level request fields through `agp serve` (serve/token_fields.py), in vLLM's shapes,
on the tiny model with spread next-token distributions:

- `prompt_logprobs`: null, then per prompt token {"<id>": {"logprob", "rank", "decoded_token"}}
  (its own token and the k most likely): the own logprob is what `echo` + `logprobs` gives for the
  same prompt; on each completions choice, at the top of a chat answer; 0 streams on the first
  chunk, more is a 400 with "stream" (vLLM's rule), as is -1 (the whole vocabulary);
- `allowed_token_ids`: only those tokens are sampled, greedy or seeded, with logit_bias and a
  guided choice; a bad list is a 400 naming the field;
- `return_token_ids`: completions choices carry `prompt_token_ids` and `token_ids`, chat answers
  `prompt_token_ids` and their choices `token_ids`; the ids decode to the text, streamed or not.
"""
from __future__ import annotations

import json

import httpx
import pytest

from pipeline_dsl.serve.token_fields import prompt_logprobs_json
from test_serve import LiveServer

PROMPT = "the cat and the world is hello"
USER = [{"role": "user", "content": "the cat and the world"}]
EPS = 1e-5                 # float32 logprobs sent as JSON and read back


@pytest.fixture(scope="module")
def server(soft_gguf):
    s = LiveServer(soft_gguf)
    yield s
    s.close()


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=120)


def completions(server, **body) -> dict:
    r = post(server, "/v1/completions", {"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat(server, **body) -> dict:
    r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": USER, **body})
    assert r.status_code == 200, r.text
    return r.json()


def events(server, route: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed answer (without [DONE])."""
    r = post(server, route, {"model": "tiny", "stream": True, **body})
    assert r.status_code == 200, r.text
    lines = [x[len("data: "):] for x in r.text.splitlines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def tokenize(server, text: str) -> list[int]:
    return post(server, "/tokenize", {"prompt": text}).json()["tokens"]


def text_of(server, token_id: int) -> str:
    return server.engine.tokenizer.decode([token_id], skip_special_tokens=False)


def decoded(server, ids: list[int]) -> str:
    """The answer's text from its ids (a character cut by max_tokens is not shown in the text)."""
    return server.engine.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def check_prompt_logprobs(server, plp: list, ids: list[int], k: int) -> list[dict]:
    """vLLM's shape: null first, then the prompt token's own entry and the k most likely, ranked;
    returns the own entries."""
    assert len(plp) == len(ids) and plp[0] is None
    own = []
    for i, entry in enumerate(plp[1:], 1):
        listed = list(entry.items())
        assert listed[0][0] == str(ids[i])                         # its own token first
        assert all(set(e) == {"logprob", "rank", "decoded_token"} for _, e in listed)
        assert all(e["decoded_token"] == text_of(server, int(t)) for t, e in listed)
        assert len(listed) in (k, k + 1)
        top = sorted((e for _, e in (listed if len(listed) == k else listed[1:])), key=lambda e: e["rank"])
        assert [e["rank"] for e in top] == list(range(1, k + 1))  # the own token among them keeps its place
        assert [e["logprob"] for e in top] == sorted((e["logprob"] for e in top), reverse=True)
        mine = entry[str(ids[i])]
        if len(listed) == k + 1:                                   # not among the k: ranked below them
            assert mine["rank"] > k and (not k or mine["logprob"] <= top[-1]["logprob"] + EPS)
        own.append(mine)
    return own


# ---------------------------------------------------------------- prompt_logprobs

def test_prompt_logprobs_are_what_echo_with_logprobs_gives(server):
    ids = tokenize(server, PROMPT)
    echo = completions(server, prompt=PROMPT, max_tokens=0, echo=True, logprobs=5)["choices"][0]["logprobs"]
    for k in (5, 0, 20):
        c = completions(server, prompt=PROMPT, max_tokens=2, prompt_logprobs=k)["choices"][0]
        assert c["logprobs"] is None and len(c["text"]) > 0
        own = check_prompt_logprobs(server, c["prompt_logprobs"], ids, k)
        assert [e["logprob"] for e in own] == pytest.approx(echo["token_logprobs"][1:], abs=EPS)
        if k:                                                      # the most likely: echo's first alternative
            firsts = [next(iter(e.values())) for e in echo["top_logprobs"][1:]]
            assert [max(e["logprob"] for e in entry.values()) for entry in c["prompt_logprobs"][1:]] == \
                pytest.approx(firsts, abs=EPS)
    assert {e["rank"] for e in own} != {1} and max(e["rank"] for e in own) > 20     # ranks of their own


def test_prompt_logprobs_beside_echo_and_logprobs_keep_each_their_number(server):
    ids = tokenize(server, PROMPT)
    c = completions(server, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, prompt_logprobs=4)["choices"][0]
    assert c["text"] == PROMPT and c["finish_reason"] == "length"
    assert all(len(t) <= 2 for t in c["logprobs"]["top_logprobs"][1:])      # logprobs = 1: one alternative + own
    own = check_prompt_logprobs(server, c["prompt_logprobs"], ids, 4)
    assert [e["logprob"] for e in own] == pytest.approx(c["logprobs"]["token_logprobs"][1:], abs=EPS)
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "prompt_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"   # 0 only with echo, as in vLLM


def test_a_prompt_logprob_of_minus_infinity_is_sent_as_vllms_floor():
    """JSON has no infinity: a prompt token the model rules out (logprob -inf), as an alternative
    or as the prompt's own token, is listed with vLLM's -9999.0, the answer stays valid JSON."""
    inf = float("-inf")
    entries = [None, {"token_id": 7, "logprob": inf, "rank": 50, "top": [(3, -0.1), (4, inf)]}]
    got = prompt_logprobs_json(entries, 2, str)
    assert got == [None, {"7": {"logprob": -9999.0, "rank": 50, "decoded_token": "7"},
                          "3": {"logprob": -0.1, "rank": 1, "decoded_token": "3"},
                          "4": {"logprob": -9999.0, "rank": 2, "decoded_token": "4"}}]
    json.dumps(got, allow_nan=False)


def test_prompt_logprobs_without_echo_stay_out_of_the_answers_logprobs(server):
    """Without echo a choice's `logprobs` lists its generated tokens alone, from text offset 0:
    the prompt's logprobs asked for by prompt_logprobs go to their own field only."""
    ids = tokenize(server, PROMPT)
    c = completions(server, prompt=PROMPT, max_tokens=3, logprobs=1, prompt_logprobs=2, ignore_eos=True,
                    return_token_ids=True)["choices"][0]
    check_prompt_logprobs(server, c["prompt_logprobs"], ids, 2)
    lp = c["logprobs"]
    assert len(c["token_ids"]) == 3
    assert [len(lp[k]) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")] == [3] * 4
    assert lp["tokens"] == [text_of(server, t) for t in c["token_ids"]]
    assert None not in lp["token_logprobs"] and lp["text_offset"][0] == 0


def test_prompt_logprobs_of_a_batch_are_each_prompts_own(server):
    prompts = [PROMPT, tokenize(server, "hello world, the cat")]
    alone = [completions(server, prompt=p, max_tokens=1, prompt_logprobs=2)["choices"][0]["prompt_logprobs"]
             for p in prompts]
    body = completions(server, prompt=prompts, max_tokens=1, prompt_logprobs=2, n=2, temperature=1.0, seed=1)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for c in body["choices"]:
        want = alone[c["index"] // 2]
        assert [list(e) if e else e for e in c["prompt_logprobs"]] == [list(e) if e else e for e in want]
        assert [[v["logprob"] for v in e.values()] for e in c["prompt_logprobs"][1:]] == \
            [pytest.approx([v["logprob"] for v in e.values()], abs=EPS) for e in want[1:]]


def test_chat_prompt_logprobs_sit_at_the_top_of_the_answer(server):
    body = chat(server, max_tokens=2, prompt_logprobs=3, return_token_ids=True)
    ids = body["prompt_token_ids"]
    assert len(ids) == body["usage"]["prompt_tokens"] and "prompt_logprobs" not in body["choices"][0]
    own = check_prompt_logprobs(server, body["prompt_logprobs"], ids, 3)
    same = completions(server, prompt=ids, max_tokens=1, prompt_logprobs=3)["choices"][0]["prompt_logprobs"]
    assert [e["logprob"] for e in own] == pytest.approx([e[str(t)]["logprob"] for e, t in zip(same[1:], ids[1:])],
                                                        abs=EPS)


def test_prompt_logprobs_0_streams_on_the_first_chunk_and_more_is_a_400(server):
    ids = tokenize(server, PROMPT)
    whole = completions(server, prompt=PROMPT, max_tokens=4, prompt_logprobs=0)["choices"][0]["prompt_logprobs"]
    chunks = events(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "prompt_logprobs": 0})
    assert [("prompt_logprobs" in c["choices"][0]) for c in chunks] == [True] + [False] * (len(chunks) - 1)
    got = chunks[0]["choices"][0]["prompt_logprobs"]
    check_prompt_logprobs(server, got, ids, 0)
    assert [list(e.values())[0]["logprob"] for e in got[1:]] == \
        pytest.approx([list(e.values())[0]["logprob"] for e in whole[1:]], abs=EPS)

    answer = chat(server, max_tokens=3, prompt_logprobs=0)
    chunks = events(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 3, "prompt_logprobs": 0})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"        # the chunk that opens the choice
    assert [("prompt_logprobs" in c) for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert [list(e) if e else e for e in chunks[0]["prompt_logprobs"]] == \
        [list(e) if e else e for e in answer["prompt_logprobs"]]
    for route, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": USER})):
        r = post(server, route, {**body, "prompt_logprobs": 1, "stream": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
        assert "stream" in r.json()["error"]["message"]


@pytest.mark.parametrize("value, words", [(21, "from 0 to 20"), (-1, "every token of the vocabulary"),
                                          (-2, "from 0 to 20"), ("2", "from 0 to 20"), (True, "from 0 to 20"),
                                          (2.5, "from 0 to 20")])
@pytest.mark.parametrize("route, body", [("/v1/completions", {"prompt": "hi"}),
                                         ("/v1/chat/completions", {"messages": USER})])
def test_prompt_logprobs_out_of_range_is_a_400_naming_it(server, route, body, value, words):
    r = post(server, route, {**body, "prompt_logprobs": value})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt_logprobs" and words in err["message"], r.text


# ---------------------------------------------------------------- allowed_token_ids

def test_allowed_token_ids_restrict_a_long_greedy_answer(server):
    n = 48
    free = completions(server, prompt=PROMPT, max_tokens=n, temperature=0, ignore_eos=True,
                       return_token_ids=True)["choices"][0]["token_ids"]
    allowed = [t for t in range(40, 240, 7) if t not in free][:8]
    c = completions(server, prompt=PROMPT, max_tokens=n, temperature=0, ignore_eos=True, allowed_token_ids=allowed,
                    return_token_ids=True)["choices"][0]
    assert len(c["token_ids"]) == n and set(c["token_ids"]) <= set(allowed)
    assert c["text"] == decoded(server, c["token_ids"])
    one = completions(server, prompt=PROMPT, max_tokens=n, temperature=0, ignore_eos=True,
                      allowed_token_ids=[allowed[3]], return_token_ids=True)["choices"][0]
    assert one["token_ids"] == [allowed[3]] * n and one["text"] == decoded(server, [allowed[3]] * n)
    answer = chat(server, max_tokens=n, temperature=0, ignore_eos=True, allowed_token_ids=[allowed[3]])
    assert answer["choices"][0]["message"]["content"] == one["text"]
    streamed = events(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": n, "temperature": 0,
                                                  "ignore_eos": True, "allowed_token_ids": allowed})
    assert "".join(ch["choices"][0]["text"] for ch in streamed if ch["choices"]) == c["text"]


def test_allowed_token_ids_with_seeded_sampling_logit_bias_and_a_guided_choice(server):
    allowed = [100, 101, 102, 103, 104]                             # the bytes a .. e
    kw = dict(prompt=PROMPT, max_tokens=24, temperature=1.0, seed=7, ignore_eos=True, allowed_token_ids=allowed,
              return_token_ids=True)
    a, b = (completions(server, **kw)["choices"][0]["token_ids"] for _ in range(2))
    assert a == b and set(a) <= set(allowed) and len(set(a)) > 1
    forced = completions(server, **kw, logit_bias={"102": 100})["choices"][0]
    assert forced["text"] == "c" * 24
    ignored = completions(server, **kw, logit_bias={"150": 100})["choices"][0]     # not allowed: no effect
    assert set(ignored["token_ids"]) <= set(allowed)
    eos = server.engine.eos_token_ids
    for seed in range(3):
        text = chat(server, max_tokens=8, temperature=1.0, seed=seed, guided_choice=["ab", "cd"],
                    allowed_token_ids=[102, 103, *eos])["choices"][0]["message"]["content"]
        assert text == "cd"


@pytest.mark.parametrize("value, words", [([], "is empty"), ([-1], "'allowed_token_ids[0]'"),
                                          (["7"], "'allowed_token_ids[0]'"), (5, "an array of token ids"),
                                          ([3, 99999], "outside the vocabulary")])
@pytest.mark.parametrize("route, body", [("/v1/completions", {"prompt": "hi"}),
                                         ("/v1/chat/completions", {"messages": USER})])
def test_a_bad_allowed_token_ids_is_a_400_naming_it(server, route, body, value, words):
    r = post(server, route, {**body, "allowed_token_ids": value})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "allowed_token_ids" and words in err["message"], r.text


# ---------------------------------------------------------------- return_token_ids

def test_return_token_ids_on_completions_decode_to_the_text(server):
    body = completions(server, prompt=PROMPT, max_tokens=12, ignore_eos=True, return_token_ids=True)
    c = body["choices"][0]
    assert c["prompt_token_ids"] == tokenize(server, PROMPT)
    assert len(c["token_ids"]) == body["usage"]["completion_tokens"] == 12
    assert c["text"] == decoded(server, c["token_ids"])
    plain = completions(server, prompt=PROMPT, max_tokens=2)["choices"][0]
    assert not {"token_ids", "prompt_token_ids", "prompt_logprobs"} & set(plain)
    many = completions(server, prompt=[PROMPT, "hello world"], max_tokens=8, n=2, temperature=1.0, seed=3,
                       ignore_eos=True, return_token_ids=True)
    for c in many["choices"]:
        assert c["prompt_token_ids"] == tokenize(server, [PROMPT, "hello world"][c["index"] // 2])
        assert c["text"] == decoded(server, c["token_ids"]) and len(c["token_ids"]) == 8
    echoed = completions(server, prompt=PROMPT, max_tokens=6, echo=True, ignore_eos=True,
                         return_token_ids=True)["choices"][0]
    assert echoed["text"] == PROMPT + decoded(server, echoed["token_ids"]) and len(echoed["token_ids"]) == 6


def test_return_token_ids_streamed_completions(server):
    kw = {"prompt": PROMPT, "max_tokens": 16, "ignore_eos": True, "temperature": 0, "return_token_ids": True}
    whole = completions(server, **kw)["choices"][0]
    chunks = [c for c in events(server, "/v1/completions", kw) if c["choices"]]
    assert [("prompt_token_ids" in c["choices"][0]) for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert chunks[0]["choices"][0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all(isinstance(c["choices"][0]["token_ids"], list) for c in chunks)
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["token_ids"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


def test_return_token_ids_on_chat_streamed_and_not(server):
    body = chat(server, max_tokens=10, ignore_eos=True, temperature=0, return_token_ids=True)
    ids = post(server, "/tokenize", {"messages": USER}).json()["tokens"]
    assert body["prompt_token_ids"] == ids and "prompt_token_ids" not in body["choices"][0]
    c = body["choices"][0]
    assert len(c["token_ids"]) == 10 and c["message"]["content"] == decoded(server, c["token_ids"])
    chunks = [x for x in events(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 10,
                                                                  "ignore_eos": True, "temperature": 0,
                                                                  "return_token_ids": True}) if x["choices"]]
    assert chunks[0]["prompt_token_ids"] == ids and "token_ids" not in chunks[0]["choices"][0]   # the role chunk
    assert not any("prompt_token_ids" in x for x in chunks[1:])
    assert [t for x in chunks[1:] for t in x["choices"][0]["token_ids"]] == c["token_ids"]
    assert "".join(x["choices"][0]["delta"].get("content") or "" for x in chunks) == c["message"]["content"]
