"""A request's answer does not depend on what the prefix cache holds or on its batch neighbours.

In the batch-invariant mode (AGP_BATCH_INVARIANT=1, engine/invariant.py) the same request
(greedy, and sampled with temperature 1 and a seed) is sent cold, then again with its prompt's
blocks cached, then among other requests, and prefilled whole or in chunks: the tokens and
their logprobs (the model's raw distribution, to the last bit) must be the same every time. The guarantee and its
limits are in docs/engine.md ("Reproducibility").
"""

import pytest

from pipeline_dsl.engine import SamplingParams
from tiny_model import tiny_engine

SYSTEM = "You are a careful assistant. Answer in one short sentence, and never use the letter q."
OTHERS = ["Hello there, what is up?", "the cat and the world", "Tell me about the sea and the sky today.",
          "is it? is it? is it?", "a b c d e f g h i j k l m n o p"]


def answer(engine, rid, prompt, params, neighbours=()):
    for i, text in enumerate(neighbours):
        engine.add_request(f"{rid}-n{i}", prompt=text, params=SamplingParams(max_tokens=12 + i, temperature=0.7,
                                                                            ignore_eos=True))
    engine.add_request(rid, prompt=prompt, params=params)
    toks, lps, cached = [], [], None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                toks += o.new_token_ids
                lps += [e["logprob"] for e in o.logprobs]
                cached = o.cached_tokens
    return toks, lps, cached


@pytest.fixture
def invariant(monkeypatch):
    monkeypatch.setenv("AGP_BATCH_INVARIANT", "1")


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=5)],
                         ids=["greedy", "seeded"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_answers_are_identical_cold_warm_and_among_other_requests(soft_gguf, invariant, sampling, dtype):
    eng = tiny_engine(soft_gguf, dtype=dtype, block_size=16, max_batch_size=8, prefill_chunk=64,
                      max_tokens_per_step=256)
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=0, **sampling)
    prompt = SYSTEM + " What is the capital of France?"
    cold = answer(eng, "cold", prompt, params)
    warm = answer(eng, "warm", prompt, params)
    crowd = answer(eng, "crowd", prompt, params, OTHERS)
    assert cold[2] == 0 and warm[2] > 0                  # the second one really hit the cache
    assert warm[:2] == cold[:2]
    assert crowd[:2] == cold[:2]


def test_a_prompt_prefilled_in_chunks_answers_as_in_one_piece(soft_gguf, invariant):
    params = SamplingParams(max_tokens=16, ignore_eos=True, logprobs=0, temperature=1.0, seed=11)
    prompt = SYSTEM + " " + SYSTEM + " Why?"
    whole = answer(tiny_engine(soft_gguf, prefill_chunk=512, max_tokens_per_step=512), "a", prompt, params)
    chunked = answer(tiny_engine(soft_gguf, prefill_chunk=16, max_tokens_per_step=512), "a", prompt, params)
    assert chunked[:2] == whole[:2]


@pytest.mark.parametrize("word, on", [("1", True), ("yes", True), ("TRUE", True), ("0", False), ("false", False),
                                      ("off", False), ("", False)])
def test_the_switch_reads_false_as_off_like_every_agp_switch(tiny_gguf, monkeypatch, word, on):
    # AGP_BATCH_INVARIANT=false turned the mode on (anything but "" and "0" did): several times
    # slower, silently; the words are those of the serve flags' variables (docs/serve.md)
    monkeypatch.setenv("AGP_BATCH_INVARIANT", word)
    assert tiny_engine(tiny_gguf).runner.batch_invariant is on


def test_a_switch_variable_that_is_no_switch_stops_the_load_naming_it(tiny_gguf, monkeypatch):
    from pipeline_dsl.engine import InputError

    for name in ("AGP_BATCH_INVARIANT", "AGP_NATIVE", "AGP_CUDA_GRAPHS"):
        with monkeypatch.context() as m:
            m.setenv(name, "maybe")
            with pytest.raises(InputError, match=f"{name}='maybe': expected true or false"):
                tiny_engine(tiny_gguf)


def test_an_activation_variable_of_another_word_stops_the_load_naming_it(tiny_gguf, monkeypatch):
    # AGP_NATIVE_ACT=int4 (or a typo) was taken for int8x2 without a word
    from pipeline_dsl.engine import InputError

    monkeypatch.setenv("AGP_NATIVE_ACT", "int4")
    with pytest.raises(InputError, match="AGP_NATIVE_ACT='int4': expected one of int8x2, int8, f32"):
        tiny_engine(tiny_gguf)
    monkeypatch.setenv("AGP_NATIVE_ACT", "f32")
    tiny_engine(tiny_gguf)


def test_a_prompts_pooled_mean_is_the_same_prefilled_whole_or_in_chunks(soft_gguf, invariant):
    # the mean hidden state was summed per chunk and then over chunks: the chunks (the step's
    # budget left by the requests beside it) changed its last bits, where its rows were the same
    params = SamplingParams(max_tokens=0, pooling="mean", prompt_logprobs=1)
    prompt = SYSTEM + " " + SYSTEM + " Why?"
    got = []
    for chunk in (512, 16, 7):
        eng = tiny_engine(soft_gguf, prefill_chunk=chunk, max_tokens_per_step=512)
        eng.add_request("a", prompt=prompt, params=params)
        (out,) = [o for _ in range(1000) if eng.has_unfinished() for o in eng.step()]
        got.append((out.pooled, out.prompt_logprobs))
    assert got[0][0] is not None and len(got[0][1]) > 100
    assert got[1] == got[0] and got[2] == got[0]
