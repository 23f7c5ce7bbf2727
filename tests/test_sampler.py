"""Sampler, incremental detokenisation and stop strings."""

import pytest
import torch

from pipeline_dsl.engine import InputError, SamplingParams
from pipeline_dsl.engine.sampler import Detokenizer, Sampler, StopStrings, make_generator


def _logits(n=4, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 3  # [n, V]


def test_greedy_is_argmax_of_every_row():
    logits = _logits()
    out = Sampler().sample(logits, [SamplingParams()] * 4, [None] * 4)
    assert out == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    logits = _logits(n=6)
    p = SamplingParams(temperature=4.0, top_p=0.95, top_k=20, seed=7)

    def draws(rows, others):
        gen = make_generator(7)
        out = []
        for _ in range(5):  # five steps of one request, batched with different neighbours
            batch = torch.cat([logits[rows], logits[others]])
            params = [p] + [SamplingParams(temperature=0.8, seed=None)] * len(others)
            out.append(Sampler().sample(batch, params, [gen] + [None] * len(others))[0])
        return out

    alone = draws([0], [])
    crowded = draws([0], [1, 2, 3, 4])
    assert alone == crowded
    assert len(set(alone)) > 1  # it does sample, not argmax


def test_different_seeds_differ():
    logits = _logits(n=1, vocab=1000) * 0  # uniform
    a = [Sampler().sample(logits, [SamplingParams(temperature=1, seed=1)], [make_generator(1)])[0]]
    b = [Sampler().sample(logits, [SamplingParams(temperature=1, seed=2)], [make_generator(2)])[0]]
    assert a != b


@pytest.mark.parametrize("bit", [8, 16, 24, 31])
def test_seeds_that_differ_in_a_high_bit_differ(bit):
    """Two seeds that differ only in a high bit of the 32 that torch's CPU generator is seeded
    with are two streams, not the same draws (a seed cut to fewer bits would make them collide)."""
    logits = _logits(n=1, vocab=1000) * 0  # uniform

    def draws(seed):
        gen = make_generator(seed)
        return [Sampler().sample(logits, [SamplingParams(temperature=1, seed=seed)], [gen])[0] for _ in range(4)]

    for low in (1, -5):
        assert draws(low) != draws(low + (1 << bit))


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = _logits(n=3)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=3),
              SamplingParams(temperature=1.5, top_p=1e-6, seed=3),
              SamplingParams(temperature=1.5, top_k=1, top_p=0.5)]
    gens = [make_generator(3), make_generator(3), None]
    assert Sampler().sample(logits, params, gens) == logits.argmax(-1).tolist()


def test_top_k_restricts_to_k_best_tokens():
    logits = _logits(n=1, vocab=100)
    best3 = set(logits[0].topk(3).indices.tolist())
    gen = make_generator(0)
    seen = {Sampler().sample(logits, [SamplingParams(temperature=5.0, top_k=3)], [gen])[0]
            for _ in range(200)}
    assert seen <= best3 and len(seen) == 3


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))  # [1, 4]
    gen = make_generator(0)
    seen = {Sampler().sample(logits, [SamplingParams(temperature=1.0, top_p=0.7)], [gen])[0]
            for _ in range(300)}
    assert seen == {0, 1}


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0),
                                 dict(top_p=1.5), dict(top_k=-2), dict(seed="x"), dict(stop=[""]),
                                 dict(stop=5), dict(stop_token_ids=[-1]), dict(max_tokens=2.5)])
def test_bad_sampling_values_raise_input_error(bad):
    with pytest.raises(InputError):
        SamplingParams(**bad).check()


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="END").stop == ("END",)


def test_detokenizer_waits_for_complete_utf8():
    # a toy byte tokenizer: id = byte value
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    d = Detokenizer(decode, list(b"hi "))
    pieces = [d.add(b) for b in "é😀 ok".encode()]
    assert "".join(pieces) == "é😀 ok"
    assert "\ufffd" not in "".join(pieces)
    assert pieces[0] == ""  # the first byte of "é" alone is not a character


def test_detokenizer_window_stays_short_over_long_output():
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return "".join(chr(97 + i % 26) for i in ids)

    d = Detokenizer(decode, [1, 2, 3])
    text = "".join(d.add(i) for i in range(500))
    assert text == "".join(chr(97 + i % 26) for i in range(500))
    assert max(calls) <= 4 * Detokenizer.CONTEXT + 1


def test_stop_strings_find_earliest_and_hold_back_prefixes():
    assert StopStrings(("</s>", "STOP")).find("abc </s> STOP", 0) == 4
    s = StopStrings(("</s>", "STOP"))
    assert s.find("abcST", 0) == -1 and s.hold_back() == 2          # "ST" may become STOP: held
    assert s.find("abcSTOP", 5) == 3                                # a stop that straddles old and new text
    s = StopStrings(("</s>", "STOP"))
    assert s.find("hello </", 0) == -1 and s.hold_back() == 2
    assert s.find("hello </x", 8) == -1 and s.hold_back() == 0
    assert StopStrings(()).find("anything", 0) == -1


def test_stop_strings_agree_with_a_brute_force_search_fed_in_random_pieces():
    import random

    def first_stop(stops, text):            # the first stop to complete; the longest of those
        for i in range(len(text)):
            ends = [s for s in stops if text[:i + 1].endswith(s)]
            if ends:
                return i - max(map(len, ends)) + 1
        return -1

    def held(stops, text):                  # longest tail that is a proper prefix of a stop
        return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)

    rng = random.Random(7)
    for _ in range(2000):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4)))
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 16)))
        s, pos, cut = StopStrings(stops), 0, -1
        while pos < len(text) and cut < 0:
            nxt = min(len(text), pos + rng.randint(1, 3))
            cut = s.find(text[:nxt], pos)
            if cut < 0:
                assert s.hold_back() == held(stops, text[:nxt]), (stops, text[:nxt])
            pos = nxt
        assert cut == first_stop(stops, text), (stops, text)


def _frequencies(logits_row, params, draws=20000, seed=0):
    """How often each token is drawn, over many draws of one row (one request's generator)."""
    gen = make_generator(seed)
    sampler = Sampler(seed=seed)
    rows = logits_row.repeat(1000, 1)                    # [1000, V]: 1000 draws a call
    counts = torch.zeros(logits_row.shape[-1])
    for _ in range(draws // 1000):
        toks = sampler.sample(rows, [params] * 1000, [gen] * 1000)
        counts += torch.bincount(torch.tensor(toks), minlength=logits_row.shape[-1]).float()
    return counts


def _chi_square_ok(counts, expected_p, significance_q=25.0):
    """Pearson's chi-square against the expected distribution; the bound is far above the 99.99 %
    quantile for these few degrees of freedom, and far below what a wrong distribution gives."""
    n = counts.sum()
    mask = expected_p > 0
    assert counts[~mask].sum() == 0, "a token outside the kept set was drawn"
    exp = expected_p[mask] * n
    stat = float(((counts[mask] - exp) ** 2 / exp).sum())
    return stat < significance_q, stat


PROBS = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
LOGITS = PROBS.log()


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(temperature=1.0), PROBS),
    # top-p 0.8 keeps the smallest set whose mass reaches 0.8: {0.5, 0.25, 0.125}, renormalised
    (SamplingParams(temperature=1.0, top_p=0.8), torch.tensor([4, 2, 1, 0, 0]) / 7),
    (SamplingParams(temperature=1.0, top_k=2), torch.tensor([2, 1, 0, 0, 0]) / 3),
    # temperature 2 flattens: p ** (1/2), renormalised
    (SamplingParams(temperature=2.0), PROBS.sqrt() / PROBS.sqrt().sum()),
    (SamplingParams(temperature=0.5, top_p=0.9, top_k=4), None),
], ids=["plain", "top_p", "top_k", "temperature", "all"])
def test_sampled_token_frequencies_follow_the_intended_distribution(params, expected):
    if expected is None:                                 # temperature 0.5: p ** 2, then top-k 4, then top-p 0.9
        p = PROBS ** 2 / (PROBS ** 2).sum()
        p[4:] = 0
        p = p / p.sum()
        keep = (torch.cumsum(p, 0) - p) < 0.9
        expected = torch.where(keep, p, torch.zeros_like(p))
        expected = expected / expected.sum()
    counts = _frequencies(LOGITS, params)
    ok, stat = _chi_square_ok(counts, expected)
    assert ok, (counts / counts.sum(), expected, stat)
    # and the test can tell: the un-renormalised top-p draw (P(top) = 0.5 / 0.875 + leftover) fails it
    if params.top_p < 1:
        wrong = expected.clone()
        wrong[0] += 0.07
        wrong = wrong / wrong.sum()
        assert not _chi_square_ok(counts, wrong)[0]


def test_an_unseeded_sampler_leaves_torchs_global_generator_alone():
    """A stage that seeded torch for its own draws keeps its stream when agp builds a sampler
    and samples unseeded rows: the sampler's stream is its own generator's."""
    logits = _logits(n=2, vocab=1000) * 0  # uniform
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    sampler = Sampler()
    sampler.sample(logits, [SamplingParams(temperature=1.0)] * 2, [None, None])
    assert torch.equal(torch.rand(4), expected)


def test_unseeded_samplers_draw_streams_of_their_own():
    logits = _logits(n=1, vocab=1 << 16) * 0  # uniform over 65536 tokens
    params = [SamplingParams(temperature=1.0)]

    def draws(sampler):
        return [sampler.sample(logits, params, [None])[0] for _ in range(4)]

    torch.manual_seed(0)
    a = draws(Sampler())
    torch.manual_seed(0)
    assert draws(Sampler()) != a      # not a stream fixed by the global seed
    assert draws(Sampler(seed=5)) == draws(Sampler(seed=5))
