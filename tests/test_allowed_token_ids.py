"""vLLM's allowed_token_ids in the engine (engine/processors.py): only the listed tokens are
sampled — greedy or seeded, through Engine.step() and the executor — beside logit_bias,
penalties, min_tokens, stop tokens and a grammar; the logprobs stay the model's raw ones (the
mask comes after them, as in vLLM); bad lists are InputError naming the field."""
from __future__ import annotations

import pytest
import torch

from pipeline_dsl.engine import InputError, SamplingParams
from pipeline_dsl.engine.processors import Features
from pipeline_dsl.engine.sampler import Sampler
from test_sampling_features import executed, fake_seq, final, make, stepped, tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 40                                     # tokens of a long answer


def test_the_mask_is_minus_inf_outside_the_allowed_ids_and_the_bias_inside():
    V = 12
    feats = Features(V, eos_token_ids=(0,))
    seqs = [fake_seq("bias", [1, 2], allowed_token_ids=[3, 5, 7], logit_bias={5: 2.5, 9: 100}),
            fake_seq("rep", [3, 4], allowed_token_ids=[3, 4, 8], repetition_penalty=1.5),
            fake_seq("plain", [1, 2])]
    for s in seqs:
        feats.start(s)
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 3
    raw = logits.clone()
    got = feats.sample(logits, seqs, Sampler(seed=0), lambda s: True)
    inf = float("-inf")
    want0 = torch.full((V,), inf)
    want0[[3, 7]] = raw[0, [3, 7]]
    want0[5] = raw[0, 5] + 2.5                                          # a bias on a token not allowed stays -inf
    want1 = torch.full((V,), inf)
    for t in (3, 4):                                                    # in the prompt: penalised
        want1[t] = raw[1, t] / 1.5 if raw[1, t] > 0 else raw[1, t] * 1.5
    want1[8] = raw[1, 8]
    torch.testing.assert_close(logits[0], want0, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], want1, rtol=0, atol=1e-5)
    assert torch.equal(logits[2], raw[2])                               # a plain row is not touched
    assert got[0].item() == int(want0.argmax()) and got[1].item() == int(want1.argmax())


@pytest.mark.parametrize("overlap", [None, False, True])
def test_only_allowed_tokens_are_sampled_greedy_and_seeded(soft_gguf, overlap):
    free = tokens(stepped(make(soft_gguf), {"g": SamplingParams(max_tokens=N, ignore_eos=True)})["g"])
    allowed = [t for t in range(40, 240, 9) if t not in free][:6]      # none the free answer uses
    reqs = {"greedy": SamplingParams(max_tokens=N, ignore_eos=True, allowed_token_ids=allowed),
            "one": SamplingParams(max_tokens=N, ignore_eos=True, allowed_token_ids=[allowed[2]]),
            "seeded": SamplingParams(max_tokens=N, ignore_eos=True, temperature=1.0, seed=3,
                                     allowed_token_ids=allowed),
            "seeded_again": SamplingParams(max_tokens=N, ignore_eos=True, temperature=1.0, seed=3,
                                           allowed_token_ids=allowed),
            "top_k": SamplingParams(max_tokens=N, ignore_eos=True, temperature=1.5, top_k=3, top_p=0.9, seed=5,
                                    allowed_token_ids=allowed),
            "plain": SamplingParams(max_tokens=N, ignore_eos=True)}
    eng = make(soft_gguf)
    outs = stepped(eng, reqs) if overlap is None else executed(eng, reqs, overlap)
    for rid in ("greedy", "seeded", "top_k"):
        got = tokens(outs[rid])
        assert len(got) == N and set(got) <= set(allowed), (rid, got)
    assert tokens(outs["one"]) == [allowed[2]] * N
    assert tokens(outs["seeded"]) == tokens(outs["seeded_again"])
    assert len(set(tokens(outs["seeded"]))) > 1                        # it samples among them
    assert tokens(outs["plain"]) == free                               # its neighbours' masks do not leak
    assert eng.features.all_free()


def test_allowed_token_ids_compose_with_logit_bias_stop_tokens_and_min_tokens(soft_gguf):
    eng = make(soft_gguf)
    eos = min(eng.eos_token_ids)
    allowed = [60, 61, 62, 63]
    outs = stepped(eng, {
        "bias_in": SamplingParams(max_tokens=12, ignore_eos=True, allowed_token_ids=allowed, logit_bias={62: 100}),
        "bias_out": SamplingParams(max_tokens=12, ignore_eos=True, allowed_token_ids=allowed, logit_bias={90: 100}),
        "stop": SamplingParams(max_tokens=12, allowed_token_ids=allowed, stop_token_ids=[63], logit_bias={63: 100}),
        "held": SamplingParams(max_tokens=12, allowed_token_ids=allowed, stop_token_ids=[63], logit_bias={63: 100},
                               min_tokens=3),
        "only_eos": SamplingParams(max_tokens=12, allowed_token_ids=[eos], min_tokens=5),
        "penalised": SamplingParams(max_tokens=12, ignore_eos=True, allowed_token_ids=allowed,
                                    presence_penalty=2.0, frequency_penalty=2.0)})
    assert tokens(outs["bias_in"]) == [62] * 12
    got = tokens(outs["bias_out"])
    assert len(got) == 12 and set(got) <= set(allowed)
    assert tokens(outs["stop"]) == [63] and final(outs["stop"]).finish_reason == "stop"
    held = tokens(outs["held"])
    assert len(held) == 4 and set(held[:3]) <= {60, 61, 62} and held[3] == 63
    assert tokens(outs["only_eos"]) == [eos] and final(outs["only_eos"]).finish_reason == "stop"   # the mask wins
    assert set(tokens(outs["penalised"])) == set(allowed)              # penalties spread it over all four


def test_allowed_token_ids_with_a_grammar(soft_gguf):
    pytest.importorskip("llguidance")
    from pipeline_dsl.engine.constrain import ConstraintCompiler

    eng = make(soft_gguf)
    grammar = ConstraintCompiler(eng.tokenizer, eng.vocab_size).compile({"type": "choice", "choices": ["ab", "cd"]})
    enc = eng.tokenizer.encode
    cd = sorted({*enc("c", add_special_tokens=False), *enc("d", add_special_tokens=False), *eng.eos_token_ids})
    reqs = {f"s{seed}": SamplingParams(max_tokens=8, temperature=1.0, seed=seed, constraint=grammar,
                                       allowed_token_ids=cd) for seed in range(4)}
    reqs["none"] = SamplingParams(max_tokens=8, constraint=grammar, allowed_token_ids=enc("x", add_special_tokens=False))
    outs = stepped(eng, reqs)
    for seed in range(4):
        out = final(outs[f"s{seed}"])
        assert (out.text, out.finish_reason) == ("cd", "stop")
    out = final(outs["none"])                                          # no token both allow: an error, no garbage
    assert out.finish_reason == "error" and "allowed_token_ids" in out.metrics["error"]


def test_logprobs_stay_the_models_raw_ones_under_the_mask(soft_gguf):
    free = stepped(make(soft_gguf), {"f": SamplingParams(max_tokens=1, logprobs=3)})["f"][0].logprobs[0]
    masked = stepped(make(soft_gguf), {"m": SamplingParams(max_tokens=1, logprobs=3, allowed_token_ids=[77])})["m"]
    lp = masked[0].logprobs[0]
    assert lp["token_id"] == 77 and [t for t, _ in lp["top"]] == [t for t, _ in free["top"]]
    assert [v for _, v in lp["top"]] == pytest.approx([v for _, v in free["top"]], abs=1e-5)
    assert lp["logprob"] < free["top"][0][1]


@pytest.mark.parametrize("bad, words", [([], "is empty"), ([-1], "'allowed_token_ids[0]'"),
                                        ([3, True], "'allowed_token_ids[1]'"), ("5", "an array of token ids"),
                                        ([1] * ((1 << 18) + 1), "at most 262144")])
def test_a_bad_allowed_token_ids_is_an_input_error_naming_it(bad, words):
    with pytest.raises(InputError, match="allowed_token_ids") as e:
        SamplingParams(allowed_token_ids=bad).check()
    assert words in str(e.value) and e.value.param == "allowed_token_ids"


def test_an_allowed_id_outside_the_vocabulary_is_refused(tiny_gguf):
    eng = make(tiny_gguf)
    with pytest.raises(InputError, match="outside the vocabulary") as e:
        eng.add_request("x", prompt="hi", params=SamplingParams(allowed_token_ids=[5, eng.vocab_size]))
    assert e.value.param == "allowed_token_ids"
    assert not SamplingParams(allowed_token_ids=[5]).plain and SamplingParams().allowed_token_ids is None
