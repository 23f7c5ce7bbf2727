"""Sampler, Detokenizer and StopStrings at their edges (the survivors of `make mutate` on
pipeline_dsl/engine/sampler.py): exact cut-off boundaries, batches of rows that differ, the top
edge of the uniform draw, seeds, long incremental decodes with a SentencePiece-like decoder, and
stop strings against a naive search.

Every probability below that sits exactly on a boundary is a power of two, so softmax gives it
exactly in float32 (each test checks that before it relies on it)."""

import random

import pytest
import torch

from pipeline_dsl.engine import SamplingParams
from pipeline_dsl.engine.sampler import Detokenizer, Sampler, StopStrings, make_generator
from test_sampler import _chi_square_ok, _frequencies

# ---- helpers ----------------------------------------------------------------------------------


def _exact_logits(probs: list[float]) -> torch.Tensor:
    """[1, V] logits whose softmax is exactly `probs` (powers of two): checked, not assumed."""
    logits = torch.tensor([probs]).log()
    assert torch.softmax(logits, dim=-1)[0].tolist() == probs, "softmax is not exact here"
    return logits


def _batch_frequencies(rows: torch.Tensor, params: list[SamplingParams], draws=20000, seed=0):
    """[k, V] counts: the k rows (each with its own params) interleaved in one batch of ~1000
    rows per call, so every call samples rows with different distributions side by side."""
    k, vocab = rows.shape
    reps = 1000 // k
    batch = rows.repeat(reps, 1)                          # [k * reps, V]: row i is kind i % k
    gen, sampler = make_generator(seed), Sampler(seed=seed)
    counts = torch.zeros(k, vocab)
    for _ in range(draws // reps):
        toks = torch.tensor(sampler.sample(batch, params * reps, [gen] * (k * reps))).view(reps, k)
        for j in range(k):
            counts[j] += torch.bincount(toks[:, j], minlength=vocab).float()
    return counts


def _assert_follows(counts, expected):
    ok, stat = _chi_square_ok(counts, expected)
    assert ok, (counts / counts.sum(), expected, stat)


def _renorm(p, keep):
    p = torch.tensor(p) * torch.tensor(keep, dtype=torch.float32)
    return p / p.sum()


P5 = [0.5, 0.25, 0.125, 0.0625, 0.0625]
Q5 = [0.0625, 0.125, 0.0625, 0.25, 0.5]                   # another shape: the likeliest last


def _up(x: float) -> float:
    """The next float32 above x."""
    return float(torch.nextafter(torch.tensor(x), torch.tensor(2.0)))


# ---- min_p ------------------------------------------------------------------------------------


def test_min_p_per_row_in_a_batch_of_different_rows_and_the_exact_boundary_stays():
    # row A: min_p 0.25 of p_max 0.5 = 0.125: token 2 (exactly 0.125) stays, 3 and 4 go
    # row B: min_p 0.5 of p_max 0.5 = 0.25: token 3 (exactly 0.25) stays, 0..2 go
    rows = torch.cat([_exact_logits(P5), _exact_logits(Q5)])
    params = [SamplingParams(temperature=1.0, min_p=0.25), SamplingParams(temperature=1.0, min_p=0.5)]
    counts = _batch_frequencies(rows, params)
    _assert_follows(counts[0], _renorm(P5, [1, 1, 1, 0, 0]))
    _assert_follows(counts[1], _renorm(Q5, [0, 0, 0, 1, 1]))


def test_min_p_just_above_the_boundary_drops_the_token_on_it():
    # the next float32 above 0.25: the threshold is just above 0.125, token 2 is never drawn
    rows = torch.cat([_exact_logits(P5), _exact_logits(Q5)])
    params = [SamplingParams(temperature=1.0, min_p=_up(0.25)), SamplingParams(temperature=1.0, min_p=_up(0.5))]
    counts = _batch_frequencies(rows, params, draws=10000)
    _assert_follows(counts[0], _renorm(P5, [1, 1, 0, 0, 0]))
    _assert_follows(counts[1], _renorm(Q5, [0, 0, 0, 0, 1]))


def test_min_p_one_keeps_exactly_the_tied_likeliest_tokens():
    # two tokens tie for the top (equal logits: equal probabilities, whatever exp rounds to)
    logits = torch.tensor([[0.7, -1.0, 0.7, -3.0, 0.2]])
    counts = _frequencies(logits[0], SamplingParams(temperature=1.0, min_p=1.0), draws=10000)
    _assert_follows(counts, torch.tensor([0.5, 0, 0.5, 0, 0]))


def test_min_p_zero_in_a_batch_with_min_p_rows_changes_nothing():
    rows = torch.cat([_exact_logits(P5), _exact_logits(Q5)])
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, min_p=0.5)]
    counts = _batch_frequencies(rows, params)
    _assert_follows(counts[0], torch.tensor(P5))
    _assert_follows(counts[1], _renorm(Q5, [0, 0, 0, 1, 1]))


# ---- top_p / top_k ----------------------------------------------------------------------------


def test_top_p_a_token_whose_preceding_mass_equals_top_p_is_cut():
    # sorted mass before each token: 0, 0.5, 0.75, 0.875, 0.9375; top_p 0.75 keeps {0, 1} only,
    # the next float32 above 0.75 keeps token 2 as well; B: the same cut on a reversed row
    rows = torch.cat([_exact_logits(P5), _exact_logits(Q5)])
    params = [SamplingParams(temperature=1.0, top_p=0.75), SamplingParams(temperature=1.0, top_p=_up(0.75))]
    counts = _batch_frequencies(rows, params)
    _assert_follows(counts[0], _renorm(P5, [1, 1, 0, 0, 0]))
    _assert_follows(counts[1], _renorm(Q5, [0, 1, 0, 1, 1]))


def test_top_p_half_of_four_equal_tokens_is_exactly_two_of_them():
    logits = torch.zeros(1, 4)                    # 0.25 each, exactly
    gen, sampler = make_generator(5), Sampler(seed=5)
    p = SamplingParams(temperature=1.0, top_p=0.5)
    seen = set(sampler.sample(logits.repeat(2000, 1), [p] * 2000, [gen] * 2000))
    assert len(seen) == 2, seen


def test_top_k_zero_is_off_and_top_k_vocab_cuts_nothing_in_a_batch_that_sorts():
    probs = [0.4, 0.3, 0.2, 0.1]
    row = torch.tensor([probs]).log()
    other = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    rows = torch.cat([row, row, other])
    params = [SamplingParams(temperature=1.0, top_k=0), SamplingParams(temperature=1.0, top_k=4),
              SamplingParams(temperature=1.0, top_k=2)]           # the last one makes the batch sort
    counts = _batch_frequencies(rows, params)
    _assert_follows(counts[0], torch.softmax(row[0], -1))
    _assert_follows(counts[1], torch.softmax(row[0], -1))
    _assert_follows(counts[2], _renorm([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]))


def test_top_p_is_a_share_of_the_mass_top_k_keeps_not_of_the_whole_vocabulary():
    # top_k 2 keeps 0.5 + 0.25 = 0.75, renormalised [2/3, 1/3]; top_p 0.6 of that (0.45) is
    # reached by the first token alone (the second's preceding mass 0.5 >= 0.45): only token 0.
    # Taken over top_k + 1 tokens (0.875 -> 0.525 > 0.5) the second token would stay.
    logits = _exact_logits(P5)
    gen, sampler = make_generator(11), Sampler(seed=11)
    p = SamplingParams(temperature=1.0, top_k=2, top_p=0.6)
    assert set(sampler.sample(logits.repeat(2000, 1), [p] * 2000, [gen] * 2000)) == {0}


def test_top_k_one_is_the_argmax_of_every_row_even_among_sampled_rows():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 30, generator=g)
    params = [SamplingParams(temperature=2.0, top_k=1 if i % 2 else 5) for i in range(8)]
    sampler = Sampler(seed=1)
    for _ in range(20):
        out = sampler.sample(logits, params, [None] * 8)
        assert [out[i] for i in range(1, 8, 2)] == logits[1::2].argmax(-1).tolist()


@pytest.mark.parametrize("vocab_first", [True, False], ids=["masked-first", "masked-last"])
def test_tokens_cut_by_top_k_are_never_drawn_wherever_they_sit_in_the_vocabulary(vocab_first):
    logits = torch.arange(6, dtype=torch.float32)[None, :] * 0.3      # ascending: best tokens last
    if not vocab_first:
        logits = logits.flip(-1)
    counts = _frequencies(logits[0], SamplingParams(temperature=1.0, top_k=3), draws=10000)
    keep = [0, 0, 0, 1, 1, 1] if vocab_first else [1, 1, 1, 0, 0, 0]
    _assert_follows(counts, _renorm(torch.softmax(logits[0], -1).tolist(), keep))


# ---- the top edge of the uniform draw -----------------------------------------------------------


def _generator_at_the_top_edge(seed=1920, within=1 << 15) -> torch.Generator:
    """A generator whose next uniform draw (float64) rounds to 1.0 in float32: the top edge of
    [0, 1), where the draw lands on the cdf's last value. Found by scanning the seed's stream."""
    u = torch.rand(within, dtype=torch.float64, generator=make_generator(seed))
    hits = (u.float() == 1.0).nonzero()
    assert len(hits), "no draw at the top edge in this stream: pick another seed"
    g = make_generator(seed)
    torch.rand(int(hits[0]), dtype=torch.float64, generator=g)      # step to it
    return g


@pytest.mark.parametrize("logits, params, allowed", [
    # nothing cut: any token may come, but it must be a token
    ([[0.1, 0.5, 0.2, 0.3]], SamplingParams(temperature=1.0), {0, 1, 2, 3}),
    # top-k: the sorted tail is cut; the least likely tokens sit last in vocabulary order too
    ([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]], SamplingParams(temperature=1.0, top_k=2), {0, 1}),
    # top-p on the same row
    ([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]], SamplingParams(temperature=1.0, top_p=0.5), {0}),
    # min-p cuts the last tokens of the vocabulary without sorting
    ([[2.0, 2.5, 0.0, -4.0, -5.0]], SamplingParams(temperature=1.0, min_p=0.1), {0, 1}),
    # probabilities that underflow to exactly zero at the end of the vocabulary, nothing cut
    ([[1.0, 0.0, -200.0, -300.0]], SamplingParams(temperature=1.0), {0, 1}),
], ids=["plain", "top_k", "top_p", "min_p", "underflow"])
def test_a_draw_at_the_top_edge_still_gives_a_kept_token(logits, params, allowed):
    logits = torch.tensor(logits)
    token = Sampler(seed=0).sample(logits, [params], [_generator_at_the_top_edge()])[0]
    assert token in allowed


def test_a_draw_at_the_top_edge_in_the_second_row_of_a_batch_gives_that_rows_token():
    # the fallback for a draw on a zero-probability tail picks the row's own likeliest token,
    # not an index over the whole batch (row 1's likeliest is the batch's likeliest overall)
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [9.0, 8.0, 1.0, 0.0, -1.0, -2.0]])
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=2)]
    tokens = Sampler(seed=0).sample(logits, params, [make_generator(3), _generator_at_the_top_edge()])
    assert 0 <= tokens[0] < 6 and tokens[1] in {0, 1}


def test_underflowed_tokens_first_in_the_vocabulary_are_never_drawn():
    logits = torch.tensor([-300.0, -200.0, 0.0, 1.0, 0.5])
    counts = _frequencies(logits, SamplingParams(temperature=1.0), draws=10000)
    _assert_follows(counts, torch.softmax(logits, -1))


# ---- seeds -----------------------------------------------------------------------------------


def _shared_draws(seed, n=32):
    """n tokens from the Sampler's shared generator (requests without a seed of their own)."""
    logits = torch.zeros(n, 1000)                          # uniform over 1000 tokens
    return Sampler(seed=seed).sample(logits, [SamplingParams(temperature=1.0)] * n, [None] * n)


def _request_draws(seed, n=32):
    logits = torch.zeros(n, 1000)
    g = make_generator(seed)
    return Sampler(seed=0).sample(logits, [SamplingParams(temperature=1.0, seed=seed)] * n, [g] * n)


@pytest.mark.parametrize("draws", [_shared_draws, _request_draws], ids=["Sampler", "make_generator"])
def test_seeds_same_gives_same_different_gives_different_and_any_int_is_taken_mod_2_64(draws):
    assert draws(5) == draws(5)
    assert draws(5) != draws(6)
    assert draws(0) != draws(1) != draws(2)
    assert draws(-1) == draws(2**64 - 1)                  # negative: its two's complement
    assert draws(2**64 + 5) == draws(5)                   # beyond 64 bits: the low 64
    assert draws(2**70 + 2**63) == draws(2**63)


@pytest.mark.parametrize("draws", [_shared_draws, _request_draws], ids=["Sampler", "make_generator"])
@pytest.mark.parametrize("a, b", [(1, 1 + 2**32), (2**40, 2**40 + 2**33), (-1, 2**32 - 1), (-2**63, 0),
                                  (2**63 - 1, 2**32 - 1), (-5, -5 - 2**40), (0, 2**32)])
def test_seeds_that_differ_only_above_bit_31_are_streams_of_their_own(draws, a, b):
    """torch's CPU generator keeps 32 bits of what manual_seed gets: the whole signed 64-bit range
    a request's seed may take must still give every seed its own draws, each time the same."""
    assert draws(a) != draws(b)
    assert draws(a) == draws(a) and draws(b) == draws(b)


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**31, 2**32 - 1])
def test_a_seed_of_32_bits_draws_what_torchs_manual_seed_draws(seed):
    """Seeds below 2**32 keep the draws they always had: answers pinned to a seed stay the same."""
    theirs = torch.rand(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.equal(torch.rand(64, generator=make_generator(seed), dtype=torch.float64), theirs)
    assert torch.equal(torch.rand(64, generator=Sampler(seed=seed).shared, dtype=torch.float64), theirs)


def test_a_sampler_without_a_seed_differs_from_run_to_run():
    assert _shared_draws(None) != _shared_draws(None)


# ---- a seeded request is independent of its batch ---------------------------------------------


def test_a_seeded_request_without_cuts_draws_the_same_tokens_whatever_its_neighbours():
    g = torch.Generator().manual_seed(0)
    row, other = torch.randn(1, 50, generator=g), torch.randn(1, 50, generator=g)
    p = SamplingParams(temperature=1.0, seed=7)
    alone_gen, crowded_gen = make_generator(7), make_generator(7)
    sampler = Sampler(seed=0)
    alone = [sampler.sample(row, [p], [alone_gen])[0] for _ in range(10)]
    crowded = [sampler.sample(torch.cat([row, other]), [p, SamplingParams(temperature=1.0, top_k=5)],
                              [crowded_gen, None])[0] for _ in range(10)]
    assert alone == crowded


def test_a_seeded_row_draws_the_same_token_whether_or_not_a_neighbour_asks_for_top_p_or_top_k():
    """A row that cuts nothing (temperature 1, no top-k, no top-p) among 512 seeds, over a
    vocabulary of SmolLM2's size: alone, and beside a row that asks for top-p and one that asks
    for top-k (either makes the batch sort). Its probabilities must be the same bits both ways: a
    softmax computed over sorted logits sums in another order, and its last-bit differences moved
    a cdf boundary past the draw for seeds 20, 266, 425 and 457 here (the token changed with the
    neighbour). Both neighbours share one batch: the sort of 49152 columns a row is the test's
    cost, and the plain rows take the same path beside either (one sort of the whole batch)."""
    vocab, n = 49152, 256
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 3      # [V]
    plain = SamplingParams(temperature=1.0)
    neighbours = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0, top_k=40)]
    for start in (0, n):
        seeds = range(start, start + n)
        alone = Sampler().sample_tensor(row.expand(n, vocab).clone(), [plain] * n,
                                        [make_generator(s) for s in seeds])                       # [n]
        beside = Sampler().sample_tensor(torch.cat([row.expand(n, vocab), row[None], row[None]]),
                                         [plain] * n + neighbours,
                                         [make_generator(s) for s in seeds] + [None, None])[:n]  # [n]
        assert torch.equal(alone, beside), [s for s, a, b in zip(seeds, alone, beside) if a != b]


# ---- Detokenizer -------------------------------------------------------------------------------

# A SentencePiece-like vocabulary: specials that decode to nothing, "▁" pieces (a space), byte
# fallback tokens; decode strips one leading space of its text, as Llama's tokenizer does. So the
# first word of a window loses its space unless the window holds some text before it.
SPECIALS = {0, 1, 2}
PIECES = {3: "▁the", 4: "▁cat", 5: "s", 6: "▁sat", 7: "▁on", 8: "▁a", 9: "▁mat", 10: ".",
          11: "▁", 12: "\n", 13: "▁café", 14: "hello", 15: "▁€"}
BYTE0 = 100                                               # ids 100..355: the bytes 0..255
CHARS = "aé€😀中ß"
PIECES_IDS = sorted(PIECES)


def _raw(ids) -> str:
    buf = bytearray()
    for i in ids:
        if i >= BYTE0:
            buf.append(i - BYTE0)
        elif i not in SPECIALS:
            buf += PIECES[i].replace("▁", " ").encode()
    return buf.decode("utf-8", errors="replace")


def sp_decode(ids) -> str:
    text = _raw(ids)
    return text[1:] if text.startswith(" ") else text


def _bytes_of(ch: str) -> list[int]:
    return [BYTE0 + b for b in ch.encode()]


def _expected(prompt, gen) -> str:
    """What the generated ids add to the prompt's text, decoded in one go."""
    before, after = sp_decode(prompt), sp_decode(prompt + gen)
    assert after.startswith(before)
    return after[len(before):]


def _random_gen(rng, n) -> list[int]:
    out = []
    while len(out) < n:
        r = rng.random()
        if r < 0.5:
            out.append(rng.choice(list(PIECES)))
        elif r < 0.6:
            out.append(rng.choice(sorted(SPECIALS)))
        else:                                             # a character as byte tokens (1 to 4)
            out += _bytes_of(rng.choice(CHARS))
    return out


def _random_prompt(rng) -> list[int]:
    while True:
        prompt = _random_gen(rng, rng.randint(0, 14))
        # keep prompts whose last CONTEXT tokens hold some text (or that hold none at all):
        # the spacing of the first word is only ever taken from those tokens
        if _raw(prompt[-Detokenizer.CONTEXT:]) or not _raw(prompt):
            return prompt


def _run(prompt, gen, final_flag: bool):
    """Feed gen one id at a time; end by add(last, final=True) or by add(last) + flush()."""
    d = Detokenizer(sp_decode, prompt)
    pieces = [d.add(t) for t in gen[:-1]]
    pieces += [d.add(gen[-1], final=True)] if final_flag else [d.add(gen[-1]), d.flush()]
    return pieces


@pytest.mark.parametrize("final_flag", [False, True], ids=["flush", "add-final"])
def test_incremental_text_equals_decoding_everything_for_long_random_generations(final_flag):
    rng = random.Random(11 + final_flag)
    for _ in range(150):
        prompt = _random_prompt(rng)
        gen = _random_gen(rng, rng.randint(4 * Detokenizer.CONTEXT + 1, 80))
        if rng.random() < 0.3:                            # end inside a multi-byte character
            gen += _bytes_of(rng.choice("é€😀中"))[:-1]
        pieces = _run(prompt, gen, final_flag)
        assert "".join(pieces) == _expected(prompt, gen), (prompt, gen, pieces)
        # and step by step: all complete text so far, an incomplete character held back
        d, so_far = Detokenizer(sp_decode, prompt), ""
        for i, t in enumerate(gen):
            so_far += d.add(t)
            full = _expected(prompt, gen[:i + 1])
            assert so_far == (full[:-1] if full.endswith("\ufffd") else full), (prompt, gen[:i + 1])


@pytest.mark.parametrize("prompt", [
    [], [14], [3, 4],
    [14, 14, 14, 14, 14],
    [14, 3, 4, 6, 7, 0, 0],                 # longer than CONTEXT; its head has text, its last 2 ids none
    [0, 0, 14, 0, 0, 2, 2],                 # the only text sits exactly CONTEXT ids from the end
], ids=["empty", "one", "two", "context", "special-tail", "text-at-the-edge"])
def test_the_first_word_keeps_the_space_its_left_context_gives_it(prompt):
    gen = [3, 4, 0, 6, 11, 5, 2, 2, 9] + _bytes_of("😀") + [13, 10]
    expected = _expected(prompt, gen)
    if _raw(prompt):
        assert expected.startswith(" the cat sat")
    assert "".join(_run(prompt, gen, False)) == expected
    assert "".join(_run(prompt, gen, True)) == expected


def test_flush_and_a_final_add_return_an_incomplete_character():
    d = Detokenizer(sp_decode, [14])
    assert d.add(3) == " the"
    assert d.add(_bytes_of("€")[0]) == ""                 # 1 of 3 bytes: held
    assert d.add(_bytes_of("€")[1]) == ""
    assert d.flush() == "\ufffd"                          # the end of the request: as it is
    assert d.flush() == ""

    d = Detokenizer(sp_decode, [14])
    assert d.add(_bytes_of("😀")[0]) == ""
    assert d.add(_bytes_of("😀")[1], final=True) == "\ufffd"

    d = Detokenizer(sp_decode, [14])
    assert d.add(4, final=True) == " cat"
    assert d.flush() == ""


def test_each_step_decodes_a_short_window_whatever_the_prompt_and_answer_length():
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return sp_decode(ids)

    prompt = [14] * 300 + [3]
    d = Detokenizer(decode, prompt)
    gen = [PIECES_IDS[i % len(PIECES_IDS)] for i in range(200)]
    text = "".join(d.add(t) for t in gen) + d.flush()
    assert text == _expected(prompt, gen)
    assert max(calls) <= 4 * Detokenizer.CONTEXT + 1



# ---- StopStrings -------------------------------------------------------------------------------


def _first_stop(stops, text):
    """(start, end) of the first stop string to complete in text (the longest of those that
    complete at the same character), or None."""
    for end in range(len(text)):
        ends = [s for s in stops if text[:end + 1].endswith(s)]
        if ends:
            return end + 1 - max(map(len, ends)), end
    return None


def _tail(stops, text):
    """The longest suffix of text that begins some stop string (a whole one included)."""
    return max([k for s in stops for k in range(1, len(s) + 1) if text.endswith(s[:k])], default=0)


OVERLAPPING = ["aab", "abab", "bab", "aa", "ab", "ba", "abc", "cab", "bcb", "abcab", "aaaa", "b"]


@pytest.mark.parametrize("alphabet", ["ab", "abc"])
def test_stop_strings_agree_with_a_naive_search_fed_in_random_chunks(alphabet):
    rng = random.Random(alphabet)
    for _ in range(1500):
        stops = tuple(rng.choice(OVERLAPPING) if rng.random() < 0.4 else
                      "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
                      for _ in range(rng.randint(1, 5)))
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        s, pos, cut = StopStrings(stops), 0, -1
        while pos < len(text):
            nxt = min(len(text), pos + rng.randint(0, 4))   # 0: a step that added no text
            cut = s.find(text[:nxt], pos)
            if cut >= 0:
                break
            assert s.hold_back() == _tail(stops, text[:nxt]), (stops, text[:nxt])
            pos = nxt
        first = _first_stop(stops, text)
        if first is None:
            assert cut == -1, (stops, text)
            assert s.hold_back() == _tail(stops, text)
        else:
            start, end = first
            assert cut == start, (stops, text)
            # the state is still the text's tail through the stop's end that begins a stop
            assert s.hold_back() == _tail(stops, text[:end + 1]), (stops, text)


@pytest.mark.parametrize("stops, text, cut", [
    (("abc", "bd"), "abd", 1),               # leave a dead end through its fail link
    (("abcd", "bce"), "abce", 1),
    (("ababc", "bac"), "ababac", 3),
    (("aab",), "aaab", 1),
    (("ab", "xyzab"), "xyzab", 0),           # the longest of those completing together
    (("xabc", "ab"), "xabc", 1),             # "ab" completes first
])
def test_stop_strings_known_cases(stops, text, cut):
    assert StopStrings(stops).find(text, 0) == cut
    s = StopStrings(stops)                   # one character at a time gives the same
    got = -1
    for i in range(len(text)):
        got = s.find(text[:i + 1], i)
        if got >= 0:
            break
    assert got == cut


def test_no_stop_strings_hold_back_nothing():
    for stops in [(), ("",), ("", "")]:
        s = StopStrings(stops)
        assert s.longest == 0
        assert s.find("anything at all", 0) == -1
        assert s.hold_back() == 0
        assert s.find("anything at all, more", 15) == -1 and s.hold_back() == 0


def test_longest_is_the_longest_stop_string():
    assert StopStrings(("ab", "abcd", "x")).longest == 4
    assert StopStrings(("", "z")).longest == 1


def test_a_stop_string_completed_while_not_reporting_is_consumed_not_reported():
    """find(report=False) (min_tokens not reached yet) reads the text and reports nothing that
    completes in it, nor later; a stop string completing after it is reported where it begins."""
    s = StopStrings(("ab", "b!"))
    assert s.find("xab", 0, report=False) == -1
    assert s.find("xabc", 3) == -1                         # "ab" completed earlier: not now either
    assert s.find("xabcab", 4) == 4 and s.matched == 2
    s = StopStrings(("ab",))
    assert s.find("a", 0, report=False) == -1 and s.hold_back() == 1   # a prefix still held back
    assert s.find("ab", 1) == 0                            # completing once reporting: found
