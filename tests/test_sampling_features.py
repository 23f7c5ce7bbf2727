"""The OpenAI / vLLM sampling features (engine/processors.py): logit_bias, min_tokens, presence /
frequency / repetition penalties, min_p, logprobs and constrained decoding, through
Engine.step() and the executor (overlap on and off), on the tiny GGUF models and the exact
toy runner of test_engine."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline_dsl.engine import Engine, EngineConfig, InputError, SamplingParams
from pipeline_dsl.engine.executor import run_requests
from pipeline_dsl.engine.processors import Features
from pipeline_dsl.engine.sampler import Sampler
from pipeline_dsl.engine.scheduler import Sequence
from test_engine import PROMPTS, ToyRunner, ToyTokenizer, toy_engine
from test_sampler import LOGITS, PROBS, _chi_square_ok, _frequencies
from tiny_model import BOUNDED_SCHEMA, tiny_engine

HELLO = [{"role": "user", "content": "hello world"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


make = tiny_engine


def stepped(eng: Engine, reqs: dict) -> dict:
    """{id: params} (or {id: (params, add_request kwargs)}) through Engine.step():
    {id: [RequestOutput, ...]} in order."""
    for rid, r in reqs.items():
        params, kw = r if isinstance(r, tuple) else (r, dict(messages=HELLO))
        eng.add_request(rid, params=params, **kw)
    outs: dict = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def executed(eng: Engine, reqs: dict, overlap: bool) -> dict:
    """The same through the executor."""
    outs: dict = {}

    def on_output(batch):
        for o in batch:
            outs.setdefault(o.request_id, []).append(o)

    sub = []
    for rid, r in reqs.items():
        params, kw = r if isinstance(r, tuple) else (r, dict(messages=HELLO))
        sub.append((rid, dict(params=params, **kw)))
    run_requests(eng, sub, overlap=overlap, on_output=on_output)
    return outs


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def final(outs: list):
    assert outs[-1].finished and sum(o.finished for o in outs) == 1
    return outs[-1]


def summary(outs: dict) -> dict:
    """What must agree between Engine.step() and the executor: tokens, text, finish reason and the
    logprob entries (their values to 1e-4: batches of other sizes change the logits' last bits)."""
    def lps(o):
        return [(lp["token_id"], [t for t, _ in lp["top"]], lp["logprob"], [v for _, v in lp["top"]])
                for x in o for lp in (x.logprobs or [])]
    return {rid: (tokens(o), final(o).text, final(o).finish_reason, lps(o)) for rid, o in outs.items()}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for rid in want:
        (gt, gtext, gr, glp), (wt, wtext, wr, wlp) = got[rid], want[rid]
        assert (gt, gtext, gr) == (wt, wtext, wr), rid
        assert [e[:2] for e in glp] == [e[:2] for e in wlp], rid
        values = [[e[2], *e[3]] for e in glp], [[e[2], *e[3]] for e in wlp]
        for a, b in zip(*values):
            assert a == pytest.approx(b, abs=1e-4), rid


# ---- SamplingParams ---------------------------------------------------------------------------
def test_logit_bias_is_normalised_from_a_json_object_or_a_list():
    a = SamplingParams(logit_bias={"7": 5, 3: -1.5})
    b = SamplingParams(logit_bias=[[3, -1.5], [7, 5]])
    assert a.logit_bias == b.logit_bias == ((3, -1.5), (7, 5))
    assert a == b and hash(a) == hash(b)
    a.check()


@pytest.mark.parametrize("bad", [dict(logit_bias={1: 101}), dict(logit_bias={-1: 1}), dict(logit_bias={"x": 1}),
                                 dict(logit_bias={1: float("nan")}), dict(logit_bias=5), dict(logprobs=21),
                                 dict(logprobs=-1), dict(logprobs=True), dict(presence_penalty=2.5),
                                 dict(frequency_penalty=-3), dict(repetition_penalty=0), dict(min_p=1.5),
                                 dict(min_tokens=-1), dict(min_tokens=1.5), dict(constraint="json")])
def test_bad_feature_values_raise_input_error(bad):
    with pytest.raises(InputError):
        SamplingParams(**bad).check()


def test_plain_means_no_feature_and_min_p_is_plain():
    assert SamplingParams(min_p=0.2, temperature=1.0).plain
    for kw in (dict(presence_penalty=0.1), dict(frequency_penalty=-0.1), dict(repetition_penalty=1.1),
               dict(logit_bias={1: 1}), dict(min_tokens=1), dict(logprobs=0)):
        assert not SamplingParams(**kw).plain, kw


def test_a_bias_outside_the_vocabulary_is_refused(tiny_gguf):
    eng = make(tiny_gguf)
    with pytest.raises(InputError, match="outside the vocabulary"):
        eng.add_request("x", prompt="hi", params=SamplingParams(logit_bias={eng.vocab_size: 1}))


# ---- logit_bias ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [None, False, True])
def test_logit_bias_plus_100_forces_a_token_and_minus_100_bans_one(soft_gguf, overlap):
    plain = stepped(make(soft_gguf), {"g": SamplingParams(max_tokens=12)})
    liked = tokens(plain["g"])[0]
    reqs = {"force_g": SamplingParams(max_tokens=12, logit_bias={65: 100}),
            "force_s": SamplingParams(max_tokens=12, temperature=1.0, seed=1, logit_bias={65: 100}),
            "ban_g": SamplingParams(max_tokens=12, logit_bias={liked: -100}),
            "ban_s": SamplingParams(max_tokens=12, temperature=1.0, seed=2, logit_bias={liked: -100},
                                    ignore_eos=True),
            "plain": SamplingParams(max_tokens=12)}
    outs = stepped(make(soft_gguf), reqs) if overlap is None else executed(make(soft_gguf), reqs, overlap)
    assert tokens(outs["force_g"]) == [65] * 12 and tokens(outs["force_s"]) == [65] * 12
    assert liked not in tokens(outs["ban_g"]) and liked not in tokens(outs["ban_s"])
    assert len(tokens(outs["ban_s"])) == 12
    assert tokens(outs["plain"]) == tokens(plain["g"])           # its neighbours' biases do not leak


# ---- min_tokens ---------------------------------------------------------------------------------
def test_min_tokens_holds_eos_and_stop_token_ids_back(soft_gguf):
    eng = make(soft_gguf)
    eos = min(eng.eos_token_ids)
    likes_eos = {eos: 10.0}
    outs = stepped(eng, {
        "free": SamplingParams(max_tokens=20, logit_bias=likes_eos),
        "min5": SamplingParams(max_tokens=20, logit_bias=likes_eos, min_tokens=5),
        "min5_s": SamplingParams(max_tokens=20, temperature=1.0, seed=4, logit_bias=likes_eos, min_tokens=5),
        "stop_id": SamplingParams(max_tokens=20, logit_bias={70: 10.0}, stop_token_ids=[70], min_tokens=3)})
    assert tokens(outs["free"]) == [eos] and final(outs["free"]).finish_reason == "stop"
    for rid in ("min5", "min5_s"):
        toks = tokens(outs[rid])
        assert eos not in toks[:5] and toks[-1] == eos and len(toks) == 6, (rid, toks)
        assert final(outs[rid]).finish_reason == "stop"
    toks = tokens(outs["stop_id"])
    assert 70 not in toks[:3] and toks[3:] == [70] and final(outs["stop_id"]).finish_reason == "stop"


def test_stop_reason_is_the_listed_token_id_unless_the_eos_ended_the_answer(soft_gguf):
    # vLLM checks the EOS first: an EOS that ends the answer has stop_reason None even when
    # stop_token_ids lists it too; with ignore_eos it ends the answer as a listed stop token
    eng = make(soft_gguf)
    eos = min(eng.eos_token_ids)
    likes_eos = {eos: 10.0}
    outs = stepped(eng, {
        "eos": SamplingParams(max_tokens=5, logit_bias=likes_eos, stop_token_ids=[eos]),
        "listed": SamplingParams(max_tokens=5, logit_bias=likes_eos, stop_token_ids=[eos], ignore_eos=True),
        "other": SamplingParams(max_tokens=5, logit_bias={70: 10.0}, stop_token_ids=[70])})
    assert [(tokens(outs[r]), final(outs[r]).finish_reason, final(outs[r]).stop_reason) for r in outs] == [
        ([eos], "stop", None), ([eos], "stop", eos), ([70], "stop", 70)]


def test_stop_reason_is_the_stop_string_that_matched_not_the_text_after_it(tiny_gguf):
    """A stop string that ends inside a token of several characters: stop_reason is that string
    alone, even beside a longer stop string in the list."""
    eng = make(tiny_gguf)
    plain = SamplingParams(max_tokens=16, ignore_eos=True)
    prompt = dict(prompt="the cat and the hat")
    outs = stepped(eng, {"p": (plain, prompt)})
    pieces = [o.delta_text for o in outs["p"]]
    at = next(i for i, piece in enumerate(pieces) if len(piece) >= 2 and i > 0)
    stop = "".join(pieces[:at]) + pieces[at][0]             # ends at the first character of a longer piece
    longer = "a stop string longer than this answer " * 2
    outs = stepped(eng, {"s": (SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop, longer]), prompt)})
    out = final(outs["s"])
    assert (out.text, out.finish_reason, out.stop_reason) == ("", "stop", stop)


def test_include_stop_str_in_output_keeps_the_stop_string_and_holds_nothing_back(soft_gguf):
    eng = make(soft_gguf)
    c = eng.tokenizer.decode([70])                      # token 70 is one character
    outs = stepped(eng, {
        "shown": SamplingParams(max_tokens=5, logit_bias={70: 10.0}, stop=[c * 2], include_stop_str_in_output=True),
        "hidden": SamplingParams(max_tokens=5, logit_bias={70: 10.0}, stop=[c * 2])})
    assert [o.delta_text for o in outs["shown"]] == [c, c] and final(outs["shown"]).text == c * 2
    assert final(outs["shown"]).stop_reason == c * 2
    assert [o.delta_text for o in outs["hidden"]] == ["", ""] and final(outs["hidden"]).text == ""


def test_an_answer_cut_by_max_tokens_inside_a_character_leaves_its_bytes_out(soft_gguf):
    # the first byte of "€" (0xE2) alone, then max_tokens: no U+FFFD in the text
    from tiny_model import byte_alphabet

    eng = make(soft_gguf)
    lead = eng.tokenizer.token_to_id(byte_alphabet()[0xE2])
    outs = stepped(eng, {"cut": SamplingParams(max_tokens=1, logit_bias={lead: 100.0})})
    assert tokens(outs["cut"]) == [lead] and final(outs["cut"]).finish_reason == "length"
    assert final(outs["cut"]).text == ""


def test_min_tokens_holds_stop_strings_back_as_vllm_does(soft_gguf):
    # a stop string among the first min_tokens tokens ended the answer there (1 token, text ""):
    # vLLM matches stop strings only in the text of token min_tokens + 1 on, as agp holds EOS
    eng = make(soft_gguf)
    c = eng.tokenizer.decode([70])                      # token 70 is one character
    outs = stepped(eng, {
        "min3": SamplingParams(max_tokens=20, logit_bias={70: 10.0}, stop=[c], min_tokens=3),
        "free": SamplingParams(max_tokens=20, logit_bias={70: 10.0}, stop=[c])})
    assert tokens(outs["min3"]) == [70] * 4
    assert final(outs["min3"]).text == c * 3 and final(outs["min3"]).finish_reason == "stop"
    assert final(outs["min3"]).stop_reason == c
    assert tokens(outs["free"]) == [70] and final(outs["free"]).text == ""


# ---- penalties ------------------------------------------------------------------------------------
def fake_seq(rid, prompt, **kw) -> Sequence:
    return Sequence(rid, list(prompt), len(prompt), SamplingParams(**kw), 0.0)


def force(V, toks, big=1e4):
    """Logits [n, V] whose argmax (after any penalty) is toks[i] in row i."""
    out = torch.zeros(len(toks), V)
    out[torch.arange(len(toks)), torch.tensor(toks)] = big
    return out


def test_penalised_logits_match_a_reference_computed_by_hand():
    V = 12
    feats = Features(V, eos_token_ids=(0,))
    seqs = [fake_seq("rep", [1, 2, 3], repetition_penalty=1.5),
            fake_seq("freq", [4, 5], frequency_penalty=0.5, presence_penalty=0.7),
            fake_seq("all", [1, 6], repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=1.2,
                     logit_bias={2: 3.0, 9: -4.5}),
            fake_seq("plain", [1, 2])]
    for s in seqs:
        feats.start(s)
    outputs = [[7, 7, 8], [7, 3, 7], [9, 9, 2], [5, 5, 5]]              # repeated tokens
    for step in range(3):
        feats.sample(force(V, [o[step] for o in outputs]), seqs, Sampler(seed=0), lambda s: True)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3
    raw = logits.clone()
    feats.sample(logits, seqs, Sampler(seed=0), lambda s: True)           # processed in place
    for r, s in enumerate(seqs):
        p = s.params
        ref = raw[r].clone()
        for tok, b in p.logit_bias:
            ref[tok] += b
        for t in range(V):
            count = outputs[r].count(t)
            if t in s.token_ids[:s.num_prompt] or count:
                ref[t] = ref[t] / p.repetition_penalty if ref[t] > 0 else ref[t] * p.repetition_penalty
            ref[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        torch.testing.assert_close(logits[r], ref, rtol=0, atol=1e-5)
    assert torch.equal(logits[3], raw[3])                                # a plain row is not touched


def test_a_finished_sequence_in_a_step_already_scheduled_touches_no_state():
    """Optimistic scheduling: a sequence that finished (released by the host) may still have a row
    in a step scheduled before; that row is sampled plainly and its slot goes to the next one."""
    V = 8
    feats = Features(V)
    a, b = fake_seq("a", [1], frequency_penalty=1.0), fake_seq("b", [2], frequency_penalty=1.0)
    live = {a}
    for s in (a, b):
        feats.start(s)
    feats.sample(force(V, [5]), [a], Sampler(seed=0), live.__contains__)
    assert feats.capacity == 8 and not feats.all_free()
    live = {b}
    feats.release(a)                                            # a finished; b admitted
    logits = torch.zeros(2, V)
    feats.sample(logits, [a, b], Sampler(seed=0), live.__contains__)
    assert torch.equal(logits[0], torch.zeros(V))               # a's row: no penalty, no state
    logits = torch.zeros(1, V)
    feats.sample(logits, [b], Sampler(seed=0), live.__contains__)
    assert logits[0].tolist() == [-1.0] + [0.0] * (V - 1)       # b sampled token 0 once: only its own counts
    feats.release(b)
    assert feats.all_free() and feats.capacity == 8


def test_min_tokens_holds_back_eos_only_when_eos_would_end_the_answer():
    # vLLM: with ignore_eos the EOS is no stop token, so min_tokens leaves it alone; the request's
    # own stop_token_ids are still held back
    V = 6
    feats = Features(V, eos_token_ids=(0,))
    keeps = fake_seq("ignore", [1], min_tokens=3, ignore_eos=True, stop_token_ids=[4])
    holds = fake_seq("holds", [1], min_tokens=3)
    for s in (keeps, holds):
        feats.start(s)
    got = feats.sample(force(V, [0, 0]), [keeps, holds], Sampler(seed=0), lambda s: True).tolist()
    assert got[0] == 0 and got[1] != 0
    assert int(feats.sample(force(V, [4]), [keeps], Sampler(seed=0), lambda s: True)[0]) != 4


def test_a_reused_slot_starts_from_no_counts_no_penalty_and_no_bias():
    """A slot a finished sequence gave back holds nothing of it for the next: that one's
    frequency penalty counts its own output alone, and the old bias and prompt are gone."""
    V = 8
    feats = Features(V)
    old = fake_seq("old", [3], frequency_penalty=1.0, repetition_penalty=2.0, logit_bias={6: 5.0})
    feats.start(old)
    for _ in range(3):
        feats.sample(force(V, [5]), [old], Sampler(seed=0), lambda s: True)
    feats.release(old)
    new = fake_seq("new", [1], frequency_penalty=1.0)
    feats.start(new)
    feats.sample(force(V, [5]), [new], Sampler(seed=0), lambda s: True)    # takes old's slot
    logits = torch.ones(1, V)
    feats.sample(logits, [new], Sampler(seed=0), lambda s: True)
    assert logits[0].tolist() == [1.0] * 5 + [0.0] + [1.0] * 2               # token 5 once: 1 - 1


def test_an_aborted_request_gives_its_penalty_row_back():
    """Abort lets a request's row of the penalty and bias tensors go as finishing does: requests
    aborted one after another reuse the same rows, the tensors do not grow with them."""
    eng = toy_engine()
    for i in range(12):
        eng.add_request(str(i), prompt="abort me", params=SamplingParams(max_tokens=50, ignore_eos=True,
                                                                         frequency_penalty=0.5))
        eng.step()
        eng.step()                                  # it sampled: it holds a row
        eng.abort(str(i))
    assert not eng.has_unfinished()
    assert eng.features.all_free() and eng.features.capacity == 8


def test_a_greedy_request_with_a_penalty_gets_the_argmax_of_the_penalised_logits():
    V = 6
    feats = Features(V)
    s = fake_seq("g", [1], frequency_penalty=2.0)
    feats.start(s)
    step = torch.tensor([[0.0, 0.0, 0.0, 3.0, 2.5, 0.0]])
    got = [int(feats.sample(step.clone(), [s], Sampler(seed=0), lambda s: True)[0]) for _ in range(3)]
    assert got == [3, 4, 3]                     # 3 - 2 < 2.5, then 2.5 - 2 < 3 - 2 ... alternating


def test_sampling_follows_the_penalised_distribution():
    """Many sequences, each with token 0 once in its output and token 1 in its prompt: one draw
    each from LOGITS, by chi-square against softmax of the penalised logits."""
    n, V = 4000, 5
    kw = dict(temperature=1.0, frequency_penalty=0.4, presence_penalty=0.3, repetition_penalty=1.6)
    seqs = [fake_seq(str(i), [1], **kw) for i in range(n)]
    feats = Features(V)
    for s in seqs:
        feats.start(s)
    sampler = Sampler(seed=0)
    feats.sample(force(V, [0] * n, big=50.0), seqs, sampler, lambda s: True)
    toks = feats.sample(LOGITS.repeat(n, 1), seqs, sampler, lambda s: True)
    counts = torch.bincount(toks, minlength=V).float()
    pen = LOGITS.clone()
    pen[0] = pen[0] / 1.6 if pen[0] > 0 else pen[0] * 1.6
    pen[1] = pen[1] / 1.6 if pen[1] > 0 else pen[1] * 1.6
    pen[0] -= 0.4 + 0.3
    expected = torch.softmax(pen, 0)
    ok, stat = _chi_square_ok(counts, expected)
    assert ok, (counts / n, expected, stat)
    assert not _chi_square_ok(counts, PROBS)[0]                # and it is not the unpenalised one


def test_penalties_and_bias_through_the_engine_reduce_repeats(tiny_gguf):
    outs = stepped(make(tiny_gguf), {"plain": SamplingParams(max_tokens=24, ignore_eos=True),
                                     "freq": SamplingParams(max_tokens=24, ignore_eos=True,
                                                            frequency_penalty=2.0, presence_penalty=2.0)})
    plain, freq = tokens(outs["plain"]), tokens(outs["freq"])
    assert len(set(plain)) < len(set(freq))


# ---- min_p ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_p, kept", [(0.3, [2, 1, 0, 0, 0]), (0.2, [4, 2, 1, 0, 0]), (0.1, [8, 4, 2, 1, 1])])
def test_min_p_frequencies(min_p, kept):
    expected = torch.tensor(kept, dtype=torch.float) / sum(kept)
    counts = _frequencies(LOGITS, SamplingParams(temperature=1.0, min_p=min_p))
    ok, stat = _chi_square_ok(counts, expected)
    assert ok, (counts / counts.sum(), expected, stat)


def test_min_p_with_temperature_and_top_k():
    # temperature 0.5 squares the probabilities: 16:4:1:.25:.25; min_p 0.05 of 16 = 0.8 drops the last two
    counts = _frequencies(LOGITS, SamplingParams(temperature=0.5, min_p=0.05, top_k=4))
    ok, stat = _chi_square_ok(counts, torch.tensor([16, 4, 1, 0, 0.0]) / 21)
    assert ok, stat


# ---- logprobs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [None, False, True])
def test_logprobs_are_the_raw_log_softmax_of_the_model(soft_gguf, overlap):
    eng = make(soft_gguf)
    reqs = {"g": SamplingParams(max_tokens=6, logprobs=5, presence_penalty=1.0),
            "s": SamplingParams(max_tokens=6, temperature=1.2, seed=3, logprobs=3, logit_bias={40: 2.0}),
            "zero": SamplingParams(max_tokens=4, temperature=0.7, seed=1, logprobs=0),
            "none": SamplingParams(max_tokens=4)}
    outs = stepped(eng, reqs) if overlap is None else executed(eng, reqs, overlap)
    prompt = eng.prompt_ids(messages=HELLO)
    model = eng.runner.model
    assert all(o.logprobs is None for o in outs["none"])
    for rid in ("g", "s", "zero"):
        toks = tokens(outs[rid])
        k = reqs[rid].logprobs
        ref = torch.log_softmax(model.forward_full(prompt + toks[:-1]).float(), dim=-1)[len(prompt) - 1:]  # [T, V]
        for i, o in enumerate(outs[rid]):
            (lp,) = o.logprobs
            assert lp["token_id"] == toks[i]
            assert math.isclose(lp["logprob"], float(ref[i, toks[i]]), abs_tol=1e-4)
            assert len(lp["top"]) == k
            values = [v for _, v in lp["top"]]
            assert values == sorted(values, reverse=True)
            top = ref[i].topk(k) if k else None
            if k:
                assert [t for t, _ in lp["top"]] == top.indices.tolist()
                torch.testing.assert_close(torch.tensor(values), top.values, rtol=0, atol=1e-4)



class TiedRunner(ToyRunner):
    """The toy model with its logits rounded to whole numbers: most steps hold tokens tied at the
    same logprob, among the likeliest too (as a bf16 model's logits often are)."""

    def execute(self, items):
        return super().execute(items).round()


@pytest.mark.parametrize("overlap", [None, True])
def test_a_requests_top_logprobs_do_not_depend_on_how_many_its_neighbours_ask_for(overlap):
    # the step's alternatives came from one topk with the largest count any of its rows asked for:
    # among tokens tied at one logprob, topk(5) picks others than topk(1), so a request's top
    # alternatives changed with a neighbour's `logprobs`; ties are now listed by token id
    def answer(reqs):
        eng = Engine(EngineConfig(batch_timeout_s=0.0), runner=TiedRunner(64, 4), tokenizer=ToyTokenizer())
        got = stepped(eng, {rid: (p, dict(prompt="the cat sat")) for rid, p in reqs.items()}) if overlap is None \
            else executed(eng, {rid: (p, dict(prompt="the cat sat")) for rid, p in reqs.items()}, overlap)
        return [lp for o in got["a"] for lp in o.logprobs]

    one = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=1)
    alone = answer({"a": one})
    crowd = answer({"a": one, "b": SamplingParams(max_tokens=24, ignore_eos=True, logprobs=5)})
    assert crowd == alone
    for lp in alone:                     # most likely first, tied ones by token id
        assert lp["top"] == sorted(lp["top"], key=lambda e: (-e[1], e[0]))


def test_top_logprobs_off_the_cpu_read_nothing_back_from_the_device():
    """Looking for a tie among a row's largest read a value back from the device: every step with a
    logprobs row waited for the GPU. Off the CPU the ranking stays on the device (a meta tensor has
    no values to read back), and gives what the CPU's does, tied values ordered by token id."""
    from pipeline_dsl.engine.processors import top_logprobs

    values, ids = top_logprobs(torch.zeros(2, 50, device="meta"), 3)
    assert values.shape == ids.shape == (2, 3) and values.dtype == torch.float32 and ids.dtype == torch.long
    lp = torch.tensor([[-1.0, -0.5, -0.5, -2.0, -0.5], [-3.0, -1.0, -2.0, -0.25, -4.0]])
    values, ids = top_logprobs(lp, 3)
    assert ids.tolist() == [[1, 2, 4], [3, 1, 2]] and values.tolist() == [[-0.5] * 3, [-0.25, -1.0, -2.0]]


# ---- constrained decoding -------------------------------------------------------------------------
BOUNDED = BOUNDED_SCHEMA


@pytest.fixture(scope="module")
def grammar(soft_gguf):
    pytest.importorskip("llguidance")
    from pipeline_dsl.engine.constrain import ConstraintCompiler

    eng = make(soft_gguf)
    return ConstraintCompiler(eng.tokenizer, eng.vocab_size).compile({"type": "json_schema", "schema": BOUNDED})


@pytest.mark.parametrize("overlap", [None, True])
def test_constrained_answers_validate_and_their_neighbours_are_unaffected(soft_gguf, grammar, overlap):
    jsonschema = pytest.importorskip("jsonschema")
    plain = {f"p{i}": (SamplingParams(max_tokens=16), dict(prompt=p)) for i, p in enumerate(PROMPTS[:4])}
    plain["ps"] = (SamplingParams(max_tokens=16, temperature=0.9, seed=5), dict(prompt="the cat"))
    mixed = dict(plain)
    for s in range(4):
        mixed[f"c{s}"] = SamplingParams(max_tokens=300, temperature=1.0, seed=s, constraint=grammar)
    mixed["cg"] = SamplingParams(max_tokens=300, constraint=grammar, ignore_eos=True)
    run = stepped if overlap is None else (lambda e, r: executed(e, r, overlap))
    alone = run(make(soft_gguf), plain)
    eng = make(soft_gguf)
    together = run(eng, mixed)
    for rid in plain:
        assert tokens(together[rid]) == tokens(alone[rid]), rid
    for rid in [r for r in mixed if r.startswith("c")]:
        out = final(together[rid])
        assert out.finish_reason == "stop", (rid, out.text)
        jsonschema.validate(json.loads(out.text), BOUNDED)
    assert eng.features.steps > 0 and eng.blocks.num_used == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_grammar_complete_before_min_tokens_ends_with_its_eos(soft_gguf, temperature):
    """min_tokens holds EOS back only while the grammar allows more: once the grammar is complete
    EOS is all it allows, and the answer ends there ("stop") rather than on a refused token."""
    pytest.importorskip("llguidance")
    from pipeline_dsl.engine.constrain import ConstraintCompiler

    eng = make(soft_gguf)
    choice = ConstraintCompiler(eng.tokenizer, eng.vocab_size).compile({"type": "choice", "choices": ["ab"]})
    outs = stepped(eng, {"c": SamplingParams(max_tokens=20, min_tokens=10, temperature=temperature, seed=1,
                                             constraint=choice)})
    out = final(outs["c"])
    assert (out.text, out.finish_reason) == ("ab", "stop"), out.metrics
    assert tokens(outs["c"])[-1] in eng.eos_token_ids


def test_a_grammar_that_refuses_a_token_ends_the_request_with_an_error(soft_gguf, grammar):
    from pipeline_dsl.engine.constrain import Matcher

    class Refusing(Matcher):
        __slots__ = ("n",)

        def accept(self, token_id):
            self.n = getattr(self, "n", 0) + 1
            return super().accept(token_id) and self.n < 3

    class Grammar:
        def matcher(self):
            m = grammar.matcher()
            return Refusing(m.m, grammar.compiler)

    outs = stepped(make(soft_gguf), {"bad": SamplingParams(max_tokens=50, constraint=Grammar()),
                                     "ok": SamplingParams(max_tokens=5)})
    bad = final(outs["bad"])
    assert bad.finish_reason == "error" and bad.completion_tokens == 3 and bad.metrics["error"]
    assert final(outs["ok"]).finish_reason == "length"


# ---- the executor, optimistic tokens, preemption -----------------------------------------------
def feature_mix(grammar=None) -> dict:
    reqs = {}
    for i in range(14):
        p = PROMPTS[i % len(PROMPTS)]
        kw = dict(max_tokens=6 + i % 9, temperature=(0.0, 0.8, 1.3)[i % 3], seed=i,
                  stop=(("th",), (), ("a",))[i % 3])
        kw.update([dict(presence_penalty=1.0), dict(frequency_penalty=0.8, logprobs=2),
                   dict(repetition_penalty=1.3, min_tokens=3), dict(logit_bias={40: 3.0, 41: -50}),
                   dict(), dict(logprobs=0, min_p=0.1)][i % 6])
        if grammar is not None and i % 5 == 4:
            kw.update(constraint=grammar, max_tokens=200, stop=())
        reqs[f"m{i}"] = (SamplingParams(**kw), dict(prompt=p))
    return reqs


def test_features_through_the_executor_match_engine_step(soft_gguf, grammar):
    reqs = feature_mix(grammar)
    reference = summary(stepped(make(soft_gguf, max_batch_size=4), reqs))    # slots are reused
    for overlap in (False, True):
        eng = make(soft_gguf, max_batch_size=4)
        assert_same(summary(executed(eng, reqs, overlap)), reference)
        assert eng.blocks.num_used == 0
        assert eng.features.capacity == 8 and eng.features.all_free()   # slots reused, none leaked
    assert {r for _, _, r, _ in reference.values()} >= {"stop", "length"}


def test_preemption_keeps_the_penalty_and_min_tokens_state():
    reqs = {str(i): SamplingParams(max_tokens=20, ignore_eos=i % 2 == 0, repetition_penalty=1.4,
                                   frequency_penalty=0.5, min_tokens=8, logprobs=1,
                                   logit_bias={65: 1.5}, temperature=0.9 * (i % 3 == 0), seed=i)
            for i in range(8)}
    kw = {rid: (p, dict(prompt=PROMPTS[int(rid) % 4])) for rid, p in reqs.items()}
    big = summary(stepped(toy_engine(num_blocks=200), kw))
    small_engine = toy_engine(num_blocks=24)
    small = summary(stepped(small_engine, kw))
    assert small_engine.stats()["preemptions"] > 0
    assert_same(small, big)
    executor_engine = toy_engine(num_blocks=24)
    assert_same(summary(executed(executor_engine, kw, overlap=True)), big)
    assert executor_engine.stats()["preemptions"] > 0


def test_plain_requests_never_take_the_feature_path(tiny_gguf):
    eng = make(tiny_gguf)
    outs = stepped(eng, {f"r{i}": SamplingParams(max_tokens=5, temperature=0.7 * (i % 2), seed=i, min_p=0.05)
                         for i in range(6)})
    assert len(outs) == 6 and eng.features.steps == 0 and eng.features.capacity == 0


# ---- generate's json_schema in agp check ---------------------------------------------------------
CHECKED = """
pipeline p {{
    model = "{model}"
    stage request : requests      {{}}
    stage batch   : dynamic_batch {{}}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{}}
    stage gen     : generate      {{ json_schema = "{schema}"  presence_penalty = 0.5  min_tokens = 2 }}
    stage out     : respond       {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


@pytest.mark.parametrize("content, words", [
    (None, "not found"), ("{not json", "not JSON"), ("[1, 2]", "not a schema"),
    ('{"type": "array", "uniqueItems": true}', "cannot be enforced")])
def test_check_reports_a_json_schema_it_cannot_use(tmp_path, tiny_gguf, content, words):
    pytest.importorskip("llguidance")
    import pipeline_dsl

    if content is not None:
        (tmp_path / "s.json").write_text(content)
    f = tmp_path / "p.agp"
    f.write_text(CHECKED.format(model=tiny_gguf, schema="s.json"))
    _, diags = pipeline_dsl.load(str(f))
    errors = [d for d in diags if d.is_error]
    assert len(errors) == 1 and words in errors[0].message and "json_schema" in errors[0].message
    assert errors[0].pos.line == 8


def test_check_accepts_a_json_schema_and_makes_its_path_absolute_without_torch(tmp_path, tiny_gguf):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("llguidance")
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "s.json").write_text(json.dumps(BOUNDED))
    f = tmp_path / "p.agp"
    f.write_text(CHECKED.format(model=tiny_gguf, schema="schemas/s.json"))
    code = ("import sys, pipeline_dsl; g = pipeline_dsl.load_pipeline_graph(sys.argv[1]);"
            "print(g.nodes['gen']['params']['json_schema']); print('torch' in sys.modules)")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code, str(f)], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    path, torch_loaded = r.stdout.split()
    assert path == str(tmp_path / "schemas" / "s.json") and torch_loaded == "False"


def test_top_logprobs_tied_at_one_logprob_come_in_token_id_order():
    """Alternatives tied at one logprob are listed lowest token id first (vLLM's order on a bf16
    model, whose logits tie often), the likeliest first otherwise; the model here ties most steps."""
    eng = Engine(EngineConfig(batch_timeout_s=0.0), runner=TiedRunner(64, 4), tokenizer=ToyTokenizer())
    got = stepped(eng, {"a": (SamplingParams(max_tokens=24, ignore_eos=True, logprobs=8), dict(prompt="the cat sat"))})
    tops = [lp["top"] for o in got["a"] for lp in o.logprobs]
    assert len(tops) == 24 and all(len(top) == 8 for top in tops)
    for top in tops:
        assert top == sorted(top, key=lambda e: (-e[1], e[0])), top
    assert any(a[1] == b[1] for top in tops for a, b in zip(top, top[1:]))     # ties were there to order
