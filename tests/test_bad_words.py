"""vLLM's bad_words in the engine (engine/processors.py, Engine.bad_words_ids): each word's
token sequences, without and with a leading space (the latter only when it is as long as the
former and starts with another token, vLLM's rule), never appear in the output: a word's last
token is -inf whenever its other tokens end the output so far (the output alone, not the
prompt). Bad lists are InputError / ParamError naming the field."""
from __future__ import annotations

import pytest
import torch

from pipeline_dsl.engine import InputError, SamplingParams
from pipeline_dsl.engine.processors import Features
from pipeline_dsl.engine.sampler import Sampler
from stages.fields import ParamError, check_field
from test_sampling_features import executed, fake_seq, final, make, stepped, tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 40


def vllm_sequences(tokenizer, words) -> list[tuple[int, ...]]:
    """The sequences vLLM's SamplingParams.update_from_tokenizer bans, written out from its code."""
    out: list[list[int]] = []
    for word in words:
        for space in (False, True):
            ids = tokenizer.encode((" " if space else "") + word.lstrip(), add_special_tokens=False)
            if not space or (ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(ids)
    return [tuple(w) for w in out]


def holds(output: list[int], word: tuple[int, ...]) -> bool:
    return any(tuple(output[j:j + len(word)]) == word for j in range(len(output) - len(word) + 1))


def test_the_sequences_are_vllms_with_and_without_a_leading_space(tiny_gguf):
    eng = make(tiny_gguf)
    tk = eng.tokenizer
    words = ["the", "world", "hello", "  ab", "cat"]
    got = eng.bad_words_ids(words)
    assert list(got) == vllm_sequences(tk, words)
    # " ab" is as long as "ab" and starts with another token: banned too; " the" is one token where
    # "the" is two: not (vLLM's rule)
    assert tuple(tk.encode(" ab", add_special_tokens=False)) in got
    assert tuple(tk.encode("ab", add_special_tokens=False)) in got        # leading spaces stripped first
    assert tuple(tk.encode(" the", add_special_tokens=False)) not in got


def test_the_last_token_is_banned_only_after_the_words_other_tokens():
    V = 12
    feats = Features(V)
    seq = fake_seq("a", [1, 2], bad_words=["x"])           # the words' ids are set below, as the engine does
    seq.state.bad_words = ((4,), (3, 5), (6, 7, 8))
    feats.start(seq)
    sampler, inf = Sampler(seed=0), float("-inf")

    def step(favourite):
        logits = torch.zeros(1, V)
        logits[0, favourite] = 10.0
        tok = feats.sample(logits, [seq], sampler, lambda s: True)
        return logits[0], int(tok[0])

    row, tok = step(4)                                      # a one-token word: always banned
    assert row[4] == inf and row[5] != inf and row[8] != inf and tok != 4
    row, tok = step(3)                                      # 3 is no word alone: sampled
    assert tok == 3 and row[3] != inf
    row, tok = step(5)                                      # after 3, 5 would end (3, 5)
    assert row[5] == inf and tok != 5
    row, tok = step(6)
    row, tok = step(7)
    assert tok == 7
    row, _ = step(8)                                        # 6, 7 end the output: 8 is banned
    assert row[8] == inf and row[5] != inf


def test_the_prompt_does_not_start_a_bad_word():
    V = 12
    feats = Features(V)
    seq = fake_seq("a", [1, 3], bad_words=["x"])            # the prompt ends with 3
    seq.state.bad_words = ((3, 5),)
    feats.start(seq)
    logits = torch.zeros(1, V)
    logits[0, 5] = 10.0
    assert int(feats.sample(logits, [seq], Sampler(seed=0), lambda s: True)[0]) == 5


@pytest.mark.parametrize("overlap", [None, True])
def test_no_bad_word_is_in_a_sampled_answer(soft_gguf, overlap):
    seeded = dict(max_tokens=N, ignore_eos=True, temperature=1.0, seed=1)
    free = tokens(stepped(make(soft_gguf), {"f": SamplingParams(**seeded)})["f"])
    eng = make(soft_gguf)
    text_of = eng.tokenizer.decode
    # words the free answer writes: single tokens, and a word of two tokens
    words = [w for w in (text_of([free[i]]).strip() for i in range(len(free)))
             if w.isalnum() and len(eng.bad_words_ids([w])[0]) == 1][:3]
    assert words
    pair = next(i for i in range(len(free) - 1) if text_of(free[i:i + 2]).isprintable()
                and not text_of(free[i:i + 2])[:1].isspace()
                and eng.bad_words_ids([text_of(free[i:i + 2])])[0] == tuple(free[i:i + 2]))
    words.append(text_of(free[pair:pair + 2]))
    banned = vllm_sequences(eng.tokenizer, words)
    assert any(holds(free, w) for w in banned)              # the free answer writes them
    reqs = {"bad": SamplingParams(**seeded, bad_words=words),
            "greedy": SamplingParams(max_tokens=N, ignore_eos=True, bad_words=words)}
    outs = stepped(eng, reqs) if overlap is None else executed(eng, reqs, overlap)
    for rid in reqs:
        got = tokens(outs[rid])
        assert len(got) == N and final(outs[rid]).finish_reason == "length"
        assert not any(holds(got, w) for w in banned), (rid, got, banned)
    assert tokens(outs["bad"]) != free


def test_bad_words_that_are_no_tokens_are_an_input_error(tiny_gguf):
    eng = make(tiny_gguf)
    with pytest.raises(InputError, match="whitespace alone") as e:          # the schema's, as agp check's
        eng.add_request("r", prompt="hi", params=SamplingParams(max_tokens=2, bad_words=["ok", " \t "]))
    assert e.value.param == "bad_words"
    with pytest.raises(InputError, match="tokenises to no token") as e:     # the engine's, whatever the schema
        eng.bad_words_ids(["ok", "  "])
    assert e.value.param == "bad_words"
    with pytest.raises(ParamError, match="at most 128"):
        check_field("bad_words", ["w"] * 129)
    with pytest.raises(ParamError, match="'bad_words' must be a string or an array of strings"):
        check_field("bad_words", ["", "x"])
    assert check_field("bad_words", []) == [] and SamplingParams(bad_words=[]).plain


def test_bad_words_that_leave_no_allowed_token_end_the_answer_with_an_error(tiny_gguf):
    """As a grammar that allows none of allowed_token_ids: finish "error" saying why, never a token
    outside the allowed ones passed off as an answer."""
    eng = make(tiny_gguf)
    word = eng.bad_words_ids(["ab"])[0]                     # two tokens: the second is banned after the first
    free = {"greedy": SamplingParams(max_tokens=5, allowed_token_ids=[word[0]], bad_words=["ab"]),
            "seeded": SamplingParams(max_tokens=5, allowed_token_ids=[word[0]], bad_words=["ab"], temperature=1.0,
                                     seed=1)}
    outs = stepped(eng, free)
    for rid in free:                                        # word[0] alone is never banned: it is sampled
        assert tokens(outs[rid]) == [word[0]] * 5 and final(outs[rid]).finish_reason == "length"
    alone = eng.tokenizer.decode([word[1]])                 # the second token as a word of its own
    for extra in ({}, {"temperature": 1.0, "seed": 2}):
        params = SamplingParams(max_tokens=5, allowed_token_ids=[word[1]], bad_words=[alone], **extra)
        out = final(stepped(make(tiny_gguf), {"x": params})["x"])
        assert out.finish_reason == "error" and "'bad_words' bans every token" in out.metrics["error"]
        assert out.text == ""


STAGE_PIPELINE = """pipeline p {{
    model = "{model}"
    device = cpu
    stage request : requests      {{}}
    stage batch   : dynamic_batch {{ max_batch_size = 2 }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage gen     : generate      {{ max_new_tokens = 4  {gen} }}
    stage out     : respond       {{}}
    request -> batch -> encode -> kv -> gen -> out
}}
"""


def test_a_requests_bad_words_add_to_its_stages_which_an_empty_list_keeps(tmp_path, tiny_gguf):
    """The stage's bad_words stay banned whatever a request sends: its `[]` (vLLM clients' default)
    and null add none, its own words are banned beside them, and the two together stay within the
    parameter's 128 words (an InputError naming bad_words beyond)."""
    from pipeline_dsl.flow import build_runtime

    path = tmp_path / "p.agp"
    path.write_text(STAGE_PIPELINE.format(model=tiny_gguf, gen='bad_words = ["cat", "dog"]'))
    rt = build_runtime(str(path), overrides={"threads": 1})
    try:
        seg = rt.segments[0]

        def words(data):
            return seg.sampling("gen", {"prompt": "hi", **data}, 3).bad_words

        assert words({}) == words({"bad_words": []}) == words({"bad_words": None}) == ("cat", "dog")
        assert words({"bad_words": ["fish", "cat"]}) == ("cat", "dog", "fish")
        assert words({"bad_words": "fish"}) == ("cat", "dog", "fish")
        with pytest.raises(InputError, match="'bad_words' adds 127 words to the 2 generate stage 'gen' bans: "
                                             "at most 128 in all") as e:
            words({"bad_words": [f"w{i}" for i in range(127)]})
        assert e.value.param == "bad_words"
    finally:
        rt.close()
