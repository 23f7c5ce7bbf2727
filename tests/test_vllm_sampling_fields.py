"""vLLM's bad_words, return_tokens_as_token_ids and cache_salt through `agp serve` (the openai
client and raw HTTP) and `agp run` request lines, on the tiny model with spread distributions:

- `bad_words`: no token sequence vLLM makes of a word (with and without a leading space) is in
  the answer, chat or completions, streamed or whole; a word of no token is a 400 naming it;
- `return_tokens_as_token_ids`: the logprobs name each token "token_id:N" (N: the answer's own
  ids), the alternatives too, streamed and whole; text_offset and a chat entry's bytes stay
  what they are without it;
- `cache_salt`: the prefix cache serves a prompt's blocks only to a request of the same salt.
"""
from __future__ import annotations

import json

import httpx
import openai
import pytest

import clikit
import test_vllm_token_fields as token_fields
from test_bad_words import holds, vllm_sequences
from test_run import write_pipeline
from test_serve import LiveServer
from test_vllm_token_fields import server  # noqa: F401  (a fixture: the live server on the soft model)

USER = [{"role": "user", "content": "the cat and the world"}]
SEEDED = dict(max_tokens=30, temperature=1.0, seed=1)


def post(server, route: str, body: dict) -> httpx.Response:
    return token_fields.post(server, route, {"model": "tiny", **body})


def events(server, route: str, body: dict) -> list[dict]:
    r = post(server, route, {"stream": True, **body})
    assert r.status_code == 200, r.text
    lines = [x[len("data: "):] for x in r.text.splitlines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def words_of(server, ids: list[int]) -> list[str]:
    """Words the answer `ids` writes (single tokens that are letters or digits)."""
    tk = server.engine.tokenizer
    out = []
    for t in ids:
        w = tk.decode([t]).strip()
        if w.isalnum() and w not in out and len(tk.encode(w, add_special_tokens=False)) == 1:
            out.append(w)
    return out[:4]


def test_bad_words_never_appear_in_chat_or_completions_answers(server):
    c = server.client
    free = c.chat.completions.create(model="tiny", messages=USER, **SEEDED, extra_body={"return_token_ids": True,
                                                                                    "ignore_eos": True})
    ids = free.choices[0].token_ids
    words = words_of(server, ids)
    banned = vllm_sequences(server.engine.tokenizer, words)
    assert words and any(holds(ids, w) for w in banned)
    chat = c.chat.completions.create(model="tiny", messages=USER, **SEEDED,
                                     extra_body={"bad_words": words, "return_token_ids": True, "ignore_eos": True})
    got = chat.choices[0].token_ids
    assert len(got) == 30 and not any(holds(got, w) for w in banned) and got != ids
    done = c.completions.create(model="tiny", prompt="the cat", **SEEDED,
                                extra_body={"bad_words": words, "return_token_ids": True, "ignore_eos": True})
    assert not any(holds(done.choices[0].token_ids, w) for w in banned)
    streamed = [t for e in events(server, "/v1/chat/completions",
                                  {"messages": USER, **SEEDED, "bad_words": words, "return_token_ids": True,
                                   "ignore_eos": True})
                for ch in e["choices"] for t in ch.get("token_ids") or ()]
    assert streamed == got
    assert c.chat.completions.create(model="tiny", messages=USER, max_tokens=2,
                                     extra_body={"bad_words": []}).choices     # vLLM clients' default


@pytest.mark.parametrize("value, said", [(["ok", "  "], "'bad_words' holds \"  \", whitespace alone"),
                                         (["w"] * 129, "at most 128"),
                                         ([""], "'bad_words' must be a string or an array of strings"),
                                         (5, "'bad_words' must be a string or an array of strings")])
def test_a_bad_words_list_the_engine_cannot_ban_is_a_400_naming_it(server, value, said):
    for route, body in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "hi"})):
        r = post(server, route, {**body, "max_tokens": 2, "bad_words": value})
        assert r.status_code == 400 and said in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "bad_words"


def test_return_tokens_as_token_ids_names_chat_logprobs_by_id(server):
    body = {"messages": USER, **SEEDED, "logprobs": True, "top_logprobs": 3, "return_token_ids": True}
    plain = post(server, "/v1/chat/completions", body).json()["choices"][0]
    named = post(server, "/v1/chat/completions", {**body, "return_tokens_as_token_ids": True}).json()["choices"][0]
    ids = named["token_ids"]
    assert ids == plain["token_ids"]
    content, before = named["logprobs"]["content"], plain["logprobs"]["content"]
    assert [e["token"] for e in content] == [f"token_id:{t}" for t in ids]
    # the second request reads the first one's prompt blocks from the prefix cache: its logits may
    # differ from a whole prefill's in their last bits
    for e, b in zip(content, before):
        assert e["logprob"] == pytest.approx(b["logprob"], abs=1e-5) and e["bytes"] == b["bytes"]   # its own bytes
        assert all(t["token"].startswith("token_id:") for t in e["top_logprobs"])
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx([t["logprob"] for t in b["top_logprobs"]],
                                                                           abs=1e-5)
    assert bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace").startswith(
        named["message"]["content"].rstrip("\ufffd"))
    streamed = [x for e in events(server, "/v1/chat/completions", {**body, "return_tokens_as_token_ids": True})
                for ch in e["choices"] for x in ((ch.get("logprobs") or {}).get("content") or ())]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    out = server.client.chat.completions.create(model="tiny", messages=USER, **SEEDED, logprobs=True,
                                                extra_body={"return_tokens_as_token_ids": True})
    assert [e.token for e in out.choices[0].logprobs.content] == [e["token"] for e in content]


def test_return_tokens_as_token_ids_names_completions_logprobs_by_id(server):
    body = {"prompt": "the cat", **SEEDED, "logprobs": 2, "echo": True, "return_token_ids": True}
    plain = post(server, "/v1/completions", body).json()["choices"][0]
    named = post(server, "/v1/completions", {**body, "return_tokens_as_token_ids": True}).json()["choices"][0]
    lp, was = named["logprobs"], plain["logprobs"]
    every = named["prompt_token_ids"] + named["token_ids"]                      # echo: the prompt's first
    assert lp["tokens"] == [f"token_id:{t}" for t in every]
    assert lp["token_logprobs"] == was["token_logprobs"] and lp["text_offset"] == was["text_offset"]
    assert named["text"] == plain["text"]
    for top, before, t in zip(lp["top_logprobs"][1:], was["top_logprobs"][1:], every[1:]):
        # by id, two tokens whose text is the same U+FFFD (bytes of a character) stay apart
        assert all(k.startswith("token_id:") for k in top) and f"token_id:{t}" in top
        assert set(before.values()) <= set(top.values()) and len(top) in (2, 3)
    chunks = events(server, "/v1/completions", {**body, "echo": False, "return_tokens_as_token_ids": True})
    streamed = [t for e in chunks for ch in e["choices"] for t in ((ch.get("logprobs") or {}).get("tokens") or ())]
    assert streamed == [f"token_id:{t}" for t in named["token_ids"]]
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "return_tokens_as_token_ids": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_tokens_as_token_ids"


def test_cache_salt_shares_prefix_blocks_only_within_one_salt(server):
    prompt = "a long shared system prompt that fills several blocks of the cache " * 3

    def cached(salt=None):
        extra = {"cache_salt": salt} if salt is not None else {}
        out = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=1, extra_body=extra)
        return out.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0 and cached() == 0
    assert cached("tenant-a") > 0 and cached("tenant-b") > 0 and cached() > 0
    out = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=1, extra_body={"cache_salt": "tenant-c"})
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    first = server.client.responses.create(model="tiny", input=prompt + "!", max_output_tokens=1,
                                           extra_body={"cache_salt": "tenant-d"})
    again = server.client.responses.create(model="tiny", input=prompt + "!", max_output_tokens=1,
                                           extra_body={"cache_salt": "tenant-d"})
    assert first.usage.input_tokens_details.cached_tokens == 0 < again.usage.input_tokens_details.cached_tokens
    for value in ("", 7):
        with pytest.raises(openai.BadRequestError, match="'cache_salt' must be a non-empty string") as e:
            server.client.completions.create(model="tiny", prompt="hi", max_tokens=1, extra_body={"cache_salt": value})
        assert e.value.body["param"] == "cache_salt"


def test_agp_run_lines_take_the_same_fields(tmp_path, soft_gguf):
    agp = write_pipeline(tmp_path, soft_gguf)
    lines = [{"id": "free", "prompt": "the cat", **SEEDED, "ignore_eos": True, "return_token_ids": True},
             {"id": "named", "prompt": "the cat", **SEEDED, "logprobs": 1, "return_tokens_as_token_ids": True,
              "return_token_ids": True, "cache_salt": "s"},
             {"id": "blank", "prompt": "x", "bad_words": ["  "]},
             {"id": "salt", "prompt": "x", "cache_salt": ""}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"

    def run():
        inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        proc = clikit.agp_in("run", agp, "-i", inp, "-o", out, "--overwrite", "--threads", "1", "--no-progress")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}

    rows = run()
    from pipeline_dsl.engine.models import load_model

    _, tok = load_model(str(soft_gguf), dtype="fp32")
    words = [w for w in dict.fromkeys(tok.decode([t]).strip() for t in rows["free"]["token_ids"])
             if w.isalnum() and len(tok.encode(w, add_special_tokens=False)) == 1][:4]
    assert words
    assert rows["named"]["logprobs"]["tokens"] == [f"token_id:{t}" for t in rows["named"]["token_ids"]]
    assert "'bad_words' holds \"  \", whitespace alone" in rows["blank"]["error"]["message"]
    assert "'cache_salt' must be a non-empty string" in rows["salt"]["error"]["message"]
    lines.append({"id": "bad", "prompt": "the cat", **SEEDED, "ignore_eos": True, "return_token_ids": True,
                  "bad_words": words})
    rows = run()
    banned = vllm_sequences(tok, words)
    assert any(holds(rows["free"]["token_ids"], w) for w in banned)
    assert not any(holds(rows["bad"]["token_ids"], w) for w in banned)


def test_bad_words_that_leave_no_allowed_token_are_a_400_naming_bad_words(server):
    word = server.engine.tokenizer.decode([100])                    # token 100 is the byte "a"
    body = {"messages": USER, "max_tokens": 4, "allowed_token_ids": [100], "bad_words": [word]}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words", r.text
    assert r.json()["error"]["message"].startswith("'bad_words' bans every token 'allowed_token_ids' leaves")
    assert post(server, "/v1/chat/completions", {**body, "bad_words": ["b"]}).json()["choices"][0]["message"][
        "content"] == "a" * 4


def test_bad_words_that_ban_every_token_the_grammar_allows_are_a_400_naming_bad_words(server):
    """A grammar that forces a token bad_words bans (guided_choice ["a"], or json_object's `false`
    after its "f"): nothing is left to draw, and the answer failed with llguidance's refusal of
    token 0 ("the answer's constraint cannot be enforced: Parser Error: token ... doesn't satisfy
    the grammar", no param); it names bad_words, as the same conflict with allowed_token_ids does,
    whole and streamed."""
    word = server.engine.tokenizer.decode([100])                    # token 100 is the byte "a"
    body = {"messages": USER, "max_tokens": 4, "guided_choice": [word], "bad_words": [word]}
    for stream in (False, True):
        r = post(server, "/v1/chat/completions", {**body, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words", r.text
        assert r.json()["error"]["message"].startswith("'bad_words' bans every token the grammar allows"), r.text
    assert post(server, "/v1/chat/completions", {**body, "bad_words": ["b"]}).json()["choices"][0]["message"][
        "content"] == word


def test_the_servers_return_tokens_as_token_ids_flag_is_the_default_a_request_may_turn_off(soft_gguf):
    s = LiveServer(soft_gguf, return_tokens_as_token_ids=True)      # agp serve --return-tokens-as-token-ids
    try:
        body = {"messages": USER, **SEEDED, "logprobs": True, "return_token_ids": True}
        named = post(s, "/v1/chat/completions", body).json()["choices"][0]
        assert [e["token"] for e in named["logprobs"]["content"]] == [f"token_id:{t}" for t in named["token_ids"]]
        plain = post(s, "/v1/chat/completions", {**body, "return_tokens_as_token_ids": False}).json()["choices"][0]
        assert not any(e["token"].startswith("token_id:") for e in plain["logprobs"]["content"])
        done = s.client.completions.create(model="tiny", prompt="the cat", max_tokens=3, logprobs=0)
        assert all(t.startswith("token_id:") for t in done.choices[0].logprobs.tokens)
        # the Responses API has no field for it: the flag names its logprobs, whole and streamed
        asked = {"input": "the cat", "max_output_tokens": 3, "include": ["message.output_text.logprobs"],
                 "top_logprobs": 2}
        whole = post(s, "/v1/responses", asked).json()["output"][0]["content"][0]["logprobs"]
        r = post(s, "/v1/responses", {**asked, "stream": True})
        streamed = [e for x in r.text.splitlines() if x.startswith("data: ")
                    for d in [json.loads(x[len("data: "):])] if d["type"] == "response.output_text.delta"
                    for e in d["logprobs"]]
        for entries in (whole, streamed):
            assert len(entries) == 3
            assert all(e["token"].startswith("token_id:") for e in entries)
            assert all(t["token"].startswith("token_id:") for e in entries for t in e["top_logprobs"])
    finally:
        s.close()
