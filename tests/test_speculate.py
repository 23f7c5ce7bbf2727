"""Speculative decoding by n-gram prompt lookup (engine/speculate.py; generate's `speculate = ngram`,
agp serve's --speculative-config): drafts looked up in the sequence's own tokens, verified in one
forward. Greedy answers are token for token those without speculation, whatever the drafts; every
request feature holds (stops, max_tokens, logprobs, penalties, n, streaming); rejected drafts
leave nothing in the KV or prefix cache; and the sampled acceptance rule keeps the distribution."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch

import clikit
import flowkit
from flowkit import chain, write
from pipeline_dsl import cli
from pipeline_dsl.cliargs import speculative_config
from pipeline_dsl.serve.metrics import ServerMetrics
from pipeline_dsl.engine import Engine, EngineConfig, InputError, SamplingParams
from pipeline_dsl.engine.executor import run_requests
from pipeline_dsl.engine.sampler import Sampler, make_generator
from pipeline_dsl.engine.scheduler import TIMING_WINDOW
from pipeline_dsl.engine.speculate import ngram_draft

# prompts whose answers repeat what they read (drafts found and accepted), and ones that do not
REPEATING = ["the cat and the world " * 4, "hello world is the cat of the world " * 3, "a b c d e f g"]
FREE = ["world and cat is us", "is it"]


def engine(path, **cfg) -> Engine:
    cfg = {"model": str(path), "dtype": "fp32", "kv_budget_bytes": 1 << 20, "batch_timeout_s": 0.0,
           "block_size": 8, **cfg}
    return Engine(EngineConfig(**cfg))


def fake_timer(step_s: float = 1.0):
    """A step timer whose every forward looks `step_s` long (Engine's step_timer): the measured
    rules follow it, not the machine's load."""
    return functools.partial(next, itertools.count(0.0, step_s))


def spec_engine(path, plain_s: float = 100.0, **cfg) -> Engine:
    """An engine that drafts from a single token on; its forwards are timed by fake_timer (each one
    second long) and its first plain decode steps look `plain_s` long to the measured rule
    (test_drafting_pauses_...), so that here it never pauses drafting."""
    cfg = {"model": str(path), "dtype": "fp32", "kv_budget_bytes": 1 << 20, "batch_timeout_s": 0.0,
           "block_size": 8, "speculate": "ngram", "prompt_lookup_min": 1, **cfg}
    e = Engine(EngineConfig(**cfg), step_timer=fake_timer())
    for _ in range(TIMING_WINDOW):
        e.scheduler.observe(0, plain_s)
    return e


def run(e: Engine, prompts, params: SamplingParams, ids: bool = False):
    """Step until done: {id: (final output, every delta joined, every new token id, logprob entries)}."""
    for i, p in enumerate(prompts):
        if ids:
            e.add_request(str(i), prompt_token_ids=p, params=params)
        else:
            e.add_request(str(i), prompt=p, params=params)
    got: dict = {}
    for _ in range(10_000):
        if not e.has_unfinished():
            break
        for out in e.step():
            final, text, toks, lps = got.get(out.request_id, (None, "", [], []))
            got[out.request_id] = (out, text + out.delta_text, toks + list(out.new_token_ids),
                                   lps + list(out.logprobs or ()))
    else:
        raise AssertionError("the engine did not finish")
    e.blocks.check_invariants()
    return got


def spec_stats(e: Engine) -> dict:
    s = e.stats(latencies=False)
    return {k: s[k] for k in ("spec_drafts", "spec_draft_tokens", "spec_accepted_tokens")}


# ---- drafting ------------------------------------------------------------------------------

def test_ngram_draft_takes_the_longest_suffix_seen_before():
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7]
    assert ngram_draft(tokens, 1, 3, 2) == [2, 6]        # "6 7" at 1 and at 6: the latest
    assert ngram_draft(tokens + [8], 1, 4, 3) == [9, 1, 6]   # "6 7 8" seen once, at 1
    assert ngram_draft([1, 2, 3, 4], 1, 3, 4) == []      # no suffix occurred before
    assert ngram_draft(tokens, 3, 3, 2) == []            # "2 6 7": never before; shorter ones are below min
    assert ngram_draft([3, 3, 3, 3, 3], 1, 2, 2) == [3, 3]   # a short period: an occurrence with k after it


def test_ngram_draft_takes_the_latest_occurrence_whose_k_tokens_reach_the_end():
    #        0  1  2  3  4  5  6  7
    tokens = [1, 2, 3, 1, 2, 4, 1, 2]
    # "1 2" at 0 and at 3: the 3 tokens after the one at 3 are the last three of the sequence,
    # so it has k after it and, the latest such, is the one taken (not the one at 0: 3 1 2)
    assert ngram_draft(tokens, 1, 2, 3) == [4, 1, 2]
    assert ngram_draft(tokens, 1, 2, 4) == [3, 1, 2, 4]      # 4 after it only at 0


# ---- greedy: token for token the answers without speculation -------------------------------

@pytest.mark.parametrize("prompts", [REPEATING, FREE], ids=["repeating", "free"])
def test_greedy_answers_equal_those_without_speculation(soft_gguf, prompts):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = run(engine(soft_gguf), prompts, params)
    e = spec_engine(soft_gguf)
    spec = run(e, prompts, params)
    for k, (out, text, toks, _) in plain.items():
        assert spec[k][2] == toks and spec[k][0].text == out.text == text == spec[k][1], k
        assert spec[k][0].completion_tokens == 40
    if prompts is REPEATING:
        s = spec_stats(e)
        assert s["spec_accepted_tokens"] > 20 and s["spec_drafts"] < 3 * 40   # fewer steps than tokens


@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_through_the_executor_equals_without_speculation(soft_gguf, overlap):
    """The executor's path (agp run, agp serve), overlapped or not: the same tokens."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    got = {}
    for spec in ("off", "ngram"):
        e = engine(soft_gguf, speculate=spec, prompt_lookup_min=1)
        outs: dict = {}
        run_requests(e, [(str(i), dict(prompt=p, params=params)) for i, p in enumerate(REPEATING)],
                     overlap=overlap, on_output=lambda os: [outs.setdefault(o.request_id, []).append(o) for o in os])
        got[spec] = {k: ([t for o in v for t in o.new_token_ids], "".join(o.delta_text for o in v), v[-1].text)
                     for k, v in outs.items()}
        e.blocks.check_invariants()
        if spec == "ngram":
            assert spec_stats(e)["spec_accepted_tokens"] > 0
    assert got["ngram"] == got["off"]


# every weight path the engine runs a tiny model's steps on: its plain decode steps and its
# verifying steps (several rows: the eager layers, with agp's pieces) take different kernels
PATHS = {"fp32": ("soft", "fp32"), "bf16": ("soft", "bf16"), "int8": ("soft", "int8"),
         "int4": ("q4", "auto"), "eager": ("soft", "fp32")}
LINEARS = {"fp32": "dense float32 weights on agp's kernels in decode steps",
           "bf16": "dense bfloat16 weights on agp's kernels in decode steps",
           "int8": "int8 per-channel weights on agp's kernels in decode steps",
           "int4": "4-bit block weights on agp's int8 kernels",
           "eager": "dense float32 weights on torch's float32 GEMMs"}


@pytest.fixture(scope="module")
def soft_q4(tmp_path_factory):
    from tiny_model import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("q4") / "soft-q4_1.gguf", qtype="Q4_1", embed_scale=0.2)


@pytest.fixture
def weight_path(request, monkeypatch, soft_gguf, soft_q4):
    """(the model file, dtype) of a path; "eager": without agp's native library."""
    from pipeline_dsl.engine import native

    name = request.param
    if name == "eager":
        monkeypatch.setenv("AGP_NATIVE", "0")
    elif native.load() is None or (name == "int4" and not native.int8_dot_products()):
        pytest.skip("agp's native kernels do not run here")
    native.reset()
    file, dtype = PATHS[name]
    yield name, (soft_gguf if file == "soft" else soft_q4), dtype
    monkeypatch.delenv("AGP_NATIVE", raising=False)
    native.reset()


NEAR_TIE = 0.1    # nats between two tokens' logprobs: a few bf16 roundings of the logits (the tiny model's
                  # top tokens are ~2.5 nats down: its distributions are spread)


def rows_round_apart(e: Engine) -> bool:
    """Whether this engine's int8 or 4-bit layers compute in bf16 on kernels chosen by a step's rows:
    on a CPU with bf16 in hardware int8 weights compute in bf16, agp's int8 kernel in the decode
    step, torch's int8 kernel and bf16 GEMMs (the GEMM's bf16 output rounded again by the scale)
    in the eager steps that verify drafts or prefill beside decodes, and 4-bit blocks leave steps
    past 8 rows to oneDNN's bf16 GEMMs. There a row's logits move in their last bf16 bits with
    what shares its step, with or without speculation, and a near tie of two tokens may go
    either way (docs/architecture.md, "What speculation combines with"). Elsewhere (fp32
    compute; 4-bit blocks on agp's int8 kernels at every row count, as on AVX2) they do not."""
    from pipeline_dsl.engine.quant import NO_ROW_LIMIT, Int4Linear, Int8Linear

    m = e.runner.model
    return m.dtype == torch.bfloat16 and any(
        isinstance(lin, (Int8Linear, Int4Linear)) and getattr(lin, "x16_rows", 0) < NO_ROW_LIMIT
        for ly in m.layers for lin in (ly.qkv, ly.o, ly.gate_up, ly.down))


def spec_runs(path, dtype, prompts, params, overlap: bool) -> tuple[dict, dict, dict, Engine]:
    """The engines without and with speculation over `prompts` with a small KV pool (preemption),
    prefill chunks of 8 and prefix cache hits: per spec, {id: tokens}, {id: logprob entries} and
    (preemptions, cached tokens, accepted drafts); and the last engine."""
    got, lps, seen = {}, {}, {}
    for spec in ("off", "ngram"):
        e = spec_engine(path, dtype=dtype, kv_budget_bytes=1 << 16, max_batch_size=4, prefill_chunk=8,
                        speculate=spec)
        outs: dict = {}
        run_requests(e, [(str(i), dict(prompt=p, params=params)) for i, p in enumerate(prompts)],
                     overlap=overlap,
                     on_output=lambda os: [outs.setdefault(o.request_id, []).append(o) for o in os])
        e.blocks.check_invariants()
        got[spec] = {k: [t for o in v for t in o.new_token_ids] for k, v in outs.items()}
        lps[spec] = {k: [x for o in v for x in (o.logprobs or ())] for k, v in outs.items()}
        stats = e.stats(latencies=False)
        seen[spec] = (stats["preemptions"], sum(v[-1].cached_tokens for v in outs.values()),
                      stats["spec_accepted_tokens"])
    return got, lps, seen, e


@pytest.mark.parametrize("weight_path", list(PATHS), indirect=True)
def test_greedy_equals_without_speculation_on_every_weight_path_with_preemption_and_prefix_hits(weight_path,
                                                                                                monkeypatch):
    """Each weight path (fp32, bf16 and int8 weights with agp's native decode step, a 4-bit GGUF on
    agp's int8 kernels, no native library) decodes the same greedy tokens with speculation as
    without, overlapped or not, while a small KV pool preempts sequences, prompts are prefilled in
    chunks of 8 beside verifying steps, and repeated prompts read the prefix cache. Where int8 or
    4-bit layers compute in bf16 on kernels chosen by the step's rows (rows_round_apart: a CPU
    with bf16 in hardware) the answers part only at a near tie of two tokens, and with
    AGP_BATCH_INVARIANT=1 they are the same token for token there too."""
    name, path, dtype = weight_path
    prompts = REPEATING + FREE[:1] + REPEATING[:2]             # the last two: prefix cache hits
    params = SamplingParams(max_tokens=80, ignore_eos=True, logprobs=2)
    apart = False
    for overlap in (False, True):
        got, lps, seen, e = spec_runs(path, dtype, prompts, params, overlap)
        assert e.model_info["linears"].startswith(LINEARS[name]), e.model_info["linears"]
        preempted, cached, accepted = seen["ngram"]
        assert preempted > 0 and cached > 0 and accepted > 0, seen
        apart = rows_round_apart(e)
        if not apart:
            assert got["ngram"] == got["off"], (overlap, seen)
            continue
        for k, toks in got["off"].items():       # each request's first token that differs: a near tie
            assert len(got["ngram"][k]) == len(toks)
            i = next((i for i, (a, b) in enumerate(zip(toks, got["ngram"][k])) if a != b), None)
            if i is None:
                continue
            for mine, other in (("off", "ngram"), ("ngram", "off")):
                top = dict(lps[mine][k][i]["top"])          # this run's top two at that position
                assert got[other][k][i] in top, (overlap, k, i, lps[mine][k][i])
                assert top[got[mine][k][i]] - top[got[other][k][i]] < NEAR_TIE, (overlap, k, i, lps[mine][k][i])
    if apart:        # batch-invariant: a row's logits whatever shares its step, so the same tokens
        monkeypatch.setenv("AGP_BATCH_INVARIANT", "1")
        got, _, seen, _ = spec_runs(path, dtype, prompts, params, overlap=False)
        assert got["ngram"] == got["off"], seen
        assert seen["ngram"][2] > 0, seen


@pytest.mark.parametrize("weight_path", ["fp32", "int4"], indirect=True)
def test_an_adapters_greedy_answers_with_speculation_equal_those_without(weight_path, tmp_path):
    """Requests of a LoRA adapter (and of the base model beside them) verify drafts with the
    adapter's deltas on every row: the same greedy tokens as without speculation, overlapped, on
    dense weights and on a 4-bit GGUF's blocks."""
    from pipeline_dsl.engine.lora import read_adapter
    from tiny_lora import write_tiny_lora

    name, path, dtype = weight_path
    folder = write_tiny_lora(tmp_path / "a", seed=1, strength=1.0)
    reqs = [(str(i), dict(prompt=p, params=SamplingParams(max_tokens=40, ignore_eos=True, lora=lora)))
            for i, (p, lora) in enumerate(zip(REPEATING + FREE[:1], ["a", "a", None, "a"]))]
    got, accepted = {}, {}
    for spec in ("off", "ngram"):
        e = spec_engine(path, dtype=dtype, speculate=spec)
        e.add_lora(read_adapter(folder, "a"))
        outs: dict = {}
        run_requests(e, reqs, overlap=True,
                     on_output=lambda os: [outs.setdefault(o.request_id, []).append(o) for o in os])
        e.blocks.check_invariants()
        got[spec] = {k: [t for o in v for t in o.new_token_ids] for k, v in outs.items()}
        accepted[spec] = spec_stats(e)["spec_accepted_tokens"]
    assert got["ngram"] == got["off"]
    assert accepted["ngram"] > 0


def test_penalties_and_logprobs_apply_per_position(soft_gguf):
    """A repetition penalty depends on the tokens accepted before each position, and logprobs are
    each accepted token's own row's: both as without speculation."""
    params = SamplingParams(max_tokens=30, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.2,
                            logprobs=2)
    plain = run(engine(soft_gguf), REPEATING, params)
    e = spec_engine(soft_gguf)
    spec = run(e, REPEATING, params)
    assert spec_stats(e)["spec_accepted_tokens"] > 0
    for k, (out, _, toks, lps) in plain.items():
        assert spec[k][2] == toks and spec[k][0].text == out.text
        got = spec[k][3]
        assert [x["token_id"] for x in got] == toks == [x["token_id"] for x in lps]
        for a, b in zip(lps, got):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
            assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]]


def test_max_tokens_min_tokens_and_stop_strings_hold(soft_gguf):
    full = run(engine(soft_gguf), REPEATING[:1], SamplingParams(max_tokens=40, ignore_eos=True))["0"][0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    for params in (SamplingParams(max_tokens=7, ignore_eos=True),
                   SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]),
                   SamplingParams(max_tokens=40, min_tokens=9, stop_token_ids=[full and 60]),
                   SamplingParams(max_tokens=13, ignore_eos=True, include_stop_str_in_output=True, stop=[stop])):
        plain = run(engine(soft_gguf), REPEATING[:1], params)["0"]
        e = spec_engine(soft_gguf)
        spec = run(e, REPEATING[:1], params)["0"]
        assert spec_stats(e)["spec_drafts"] > 0
        assert spec[2] == plain[2] and spec[0].text == plain[0].text == spec[1]
        assert (spec[0].finish_reason, spec[0].stop_reason, spec[0].completion_tokens) == \
            (plain[0].finish_reason, plain[0].stop_reason, plain[0].completion_tokens)
    assert "stop" == run(spec_engine(soft_gguf), REPEATING[:1],
                         SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]))["0"][0].finish_reason


def test_the_prefix_cache_holds_no_rejected_draft(soft_gguf):
    """Drafts rejected by one request left K/V in its blocks; a later request whose prompt is that
    request's prompt and answer reads those blocks from the prefix cache and answers as an engine
    that computed them itself."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    e = spec_engine(soft_gguf)
    tok = e.tokenizer
    prompt = tok.encode("the cat is the world of the cat and us", add_special_tokens=False)
    first = run(e, [prompt], params, ids=True)["0"]
    s = spec_stats(e)
    assert s["spec_draft_tokens"] > s["spec_accepted_tokens"] > 0      # some drafts were rejected
    again = prompt + first[2][:33]
    later = run(e, [again], SamplingParams(max_tokens=20, ignore_eos=True), ids=True)["0"]
    assert later[0].cached_tokens >= len(prompt)
    fresh = run(engine(soft_gguf, prefix_reuse=False), [again], SamplingParams(max_tokens=20, ignore_eos=True),
                ids=True)["0"]
    assert later[2] == fresh[2]


def test_a_large_batch_decodes_without_drafts(soft_gguf):
    """Beyond speculate.MAX_BATCH decoding sequences a step drafts nothing (and answers are the same)."""
    prompts = [p + str(i) for i in range(3) for p in REPEATING]          # 9 sequences at once
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    e = spec_engine(soft_gguf)
    spec = run(e, prompts, params)
    assert spec_stats(e)["spec_drafts"] == 0
    plain = run(engine(soft_gguf), prompts, params)
    assert {k: v[2] for k, v in spec.items()} == {k: v[2] for k, v in plain.items()}


# ---- sampled: each position drawn as without drafts, the acceptance rule keeps the distribution --

def frequencies(sampler, logits, params, seed: int, n: int) -> torch.Tensor:
    """The tokens of n plain draws (n rows of one request's generator, in one call) counted, / n."""
    rows = logits.expand(n, -1).clone()
    tokens = sampler.sample_tensor(rows, [params] * n, [make_generator(seed)] * n)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / n


def verifications(e: Engine, logits, params: SamplingParams, draft: tuple, n: int, twin: bool = False):
    """n verifications of `draft` against rows `logits` [1 + k, V] by one request of `params`: the
    tokens each gave; with `twin`, also what a request of the same params drew plainly, one
    sample() a row, over the rows each verification read."""
    for rid in ("v", "w") if twin else ("v",):
        e.add_request(rid, prompt_token_ids=[1, 2], params=params)
    got, plain = [], []
    for _ in range(n):
        got.append(e.verify(e.seqs["v"], logits.clone(), draft))
        if twin:
            plain.append([int(e.sample(logits[i:i + 1].clone(), [e.seqs["w"]])[0]) for i in range(len(got[-1]))])
    for rid in ("v", "w") if twin else ("v",):
        e.abort(rid)
    return got, plain


@pytest.mark.parametrize("extra", [dict(), dict(top_k=3), dict(top_p=0.8), dict(min_p=0.2)])
def test_a_verified_row_draws_as_the_plain_step_and_keeps_the_distribution(soft_gguf, extra):
    """Each row of a verification draws the token the plain step at its position would (the same
    request's next uniform number), and the draft is accepted when that token is the draft: the
    tokens are a plain decode's, distributed as p, the draft accepted with probability p(t) (fixed
    seeds: the bounds cannot flake)."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0], [0.3, -0.2, 1.1, 0.0, 0.5]])
    params = SamplingParams(temperature=0.7, seed=5, **extra)
    p = frequencies(Sampler(0), logits[:1], params, 11, 20_000)       # p: plain draws, the sampler's processing
    e = engine(soft_gguf)
    N = 500
    for draft in (0, 2, 4):
        got, plain = verifications(e, logits, params, (draft,), N, twin=True)
        assert got == plain, draft                                    # token for token the plain draws
        first = torch.bincount(torch.tensor([g[0] for g in got]), minlength=5).double() / N
        assert torch.allclose(first, p, atol=0.07), (draft, first, p)
        accepted = sum(len(g) == 2 for g in got) / N
        assert accepted == pytest.approx(float(p[draft]), abs=0.07)   # P(accept) = p(t)
        if p[draft] == 0:                            # cut by top-k/top-p/min-p: never accepted
            assert accepted == 0


def test_sampled_acceptance_rate_is_the_drafts_probability(soft_gguf):
    """With the draft's probability known (1/4: four equal logits), it is accepted that often, and a
    rejected row's token is one of the other three, equally likely (p without t, renormalised)."""
    got, _ = verifications(engine(soft_gguf), torch.zeros(2, 4), SamplingParams(temperature=1.0, seed=7), (1,), 4000)
    assert abs(sum(len(g) == 2 for g in got) / len(got) - 0.25) < 0.02
    rejected = [g[0] for g in got if len(g) == 1]
    assert 1 not in rejected
    share = torch.bincount(torch.tensor(rejected), minlength=4).double() / len(rejected)
    assert torch.allclose(share, torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3], dtype=share.dtype), atol=0.03)


def test_a_seeded_sampled_answer_is_the_one_without_speculation_whatever_the_batch(soft_gguf):
    """A seeded sampled request answers token for token as without speculation, alone and beside
    other requests under a KV budget so small that sequences are preempted and drafts find no free
    blocks (whether a step drafts for it, and how much, does not change its text)."""
    mine = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8, seed=11)

    def answers(e: Engine, others: int) -> dict:
        e.add_request("a", prompt=REPEATING[0], params=mine)
        for i in range(others):
            e.add_request(f"o{i}", prompt=REPEATING[i % 3],
                          params=SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8, seed=i))
        got: dict = {}
        while e.has_unfinished():
            for out in e.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
        e.blocks.check_invariants()
        return got

    small = {"kv_budget_bytes": 1 << 16}
    plain = answers(engine(soft_gguf, **small), 0)
    for others in (0, 3):
        e = spec_engine(soft_gguf, **small)
        got = answers(e, others)
        assert spec_stats(e)["spec_drafts"] > 0
        assert got["a"] == plain["a"], others
        if others:
            assert e.scheduler.num_preemptions > 0
            want = answers(engine(soft_gguf, **small), others)
            assert got == want


def test_seeded_sampled_requests_are_reproducible_with_speculation(soft_gguf):
    params = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.8, seed=3)
    a = run(spec_engine(soft_gguf), REPEATING, params)
    e = spec_engine(soft_gguf)
    b = run(e, REPEATING, params)
    assert spec_stats(e)["spec_drafts"] > 0
    assert {k: v[2] for k, v in a.items()} == {k: v[2] for k, v in b.items()}
    assert all(v[0].completion_tokens == 30 for v in b.values())


# ---- the switch: pipeline parameters, n = 2, errors -----------------------------------------

def test_a_pipeline_with_speculate_ngram_answers_n_copies_as_without(tmp_path, soft_gguf):
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 24  n = 2  SPEC }\n"
            "stage out : respond {}\nrequest -> batch\n" + chain("gen") + "gen -> out\n")
    texts = {}
    for spec in ("", "speculate = ngram  speculative_tokens = 3  prompt_lookup_min = 1"):
        d = tmp_path / (spec[:9] or "off")
        d.mkdir()
        path = write(d, soft_gguf, body.replace("SPEC", spec))
        assert flowkit.errors(path) == []
        (res,), rt = flowkit.run(path, [flowkit.chat("a", REPEATING[0], max_tokens=None)])
        assert res.ok and len(res.choices) == 2
        texts[spec[:9]] = [c.text for c in res.choices]
    assert texts["speculate"] == texts[""]


@pytest.mark.parametrize("setting, at, message", [
    ("speculate = eagle", "eagle", "speculate"),
    ("speculate = ngram  speculative_tokens = 0", "0 }", "speculative_tokens"),
    ("speculate = ngram  prompt_lookup_min = 5  prompt_lookup_max = 3", "5  prompt_lookup_max",
     "prompt_lookup_min (5) must be at most prompt_lookup_max (3): no suffix could be looked up"),
])
def test_agp_check_refuses_bad_speculation_settings_at_their_place(tmp_path, soft_gguf, capsys, setting, at, message):
    """The error names the value where the file writes it (file:line:col)."""
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 4  " + setting + " }\n"
            "stage out : respond {}\nrequest -> batch\n" + chain("gen") + "gen -> out\n")
    path = write(tmp_path, soft_gguf, body)
    assert cli.main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    line = next(i + 1 for i, text in enumerate(path.read_text().splitlines()) if "stage gen" in text)
    col = path.read_text().splitlines()[line - 1].index(at) + 1
    assert f"p.agp:{line}:{col}:" in err and message in err, err


def test_agp_check_warns_that_a_stage_under_a_json_schema_speculates_only_for_free_requests(tmp_path, soft_gguf):
    """speculate = ngram beside json_schema: the stage's answers follow a grammar, under which no
    request drafts, so check says so at its `speculate` value (a warning: a request with its own free
    response_format still drafts)."""
    import shutil

    import pipeline_dsl

    shutil.copy("examples/person.schema.json", tmp_path / "person.schema.json")
    stage = 'stage gen : generate { max_new_tokens = 4  speculate = ngram  json_schema = "person.schema.json" }\n'
    path = write(tmp_path, soft_gguf, "stage request : requests {}\n" + stage +
                 "stage out : respond {}\nrequest -> batch\n" + chain("gen") + "gen -> out\n")
    _, diags = pipeline_dsl.load(str(path))
    said = [d for d in diags if "speculat" in d.message]
    assert len(said) == 1 and not said[0].is_error, diags
    line = path.read_text().splitlines().index(next(t for t in path.read_text().splitlines() if "stage gen" in t))
    assert (said[0].pos.line, said[0].pos.col) == (line + 1, path.read_text().splitlines()[line].index("ngram") + 1)
    assert "json_schema" in said[0].message and "response_format" in said[0].message
    free = path.read_text().replace('  json_schema = "person.schema.json"', "")
    path.write_text(free)
    assert not [d for d in pipeline_dsl.load(str(path))[1] if "speculat" in d.message]


def test_engine_config_refuses_bad_speculation_settings():
    with pytest.raises(InputError, match="speculate"):
        EngineConfig(speculate="eagle")
    said = r"prompt_lookup_min \(4\) must be at most prompt_lookup_max \(2\): no suffix could be looked up"
    with pytest.raises(InputError, match=said):
        EngineConfig(speculate="ngram", prompt_lookup_min=4, prompt_lookup_max=2)


@pytest.mark.parametrize("value, said", [
    ('{"method": "eagle", "num_speculative_tokens": 3}', 'method "eagle" is not one agp has: it speculates by '
                                                        'method "ngram" (prompt lookup) only'),
    ('{"model": "org/draft-model", "num_speculative_tokens": 3}', "agp does not read 'model': it takes method, "
                                                                  "num_speculative_tokens, prompt_lookup_max"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
    ('{"method": "ngram", "prompt_lookup_min": 6, "prompt_lookup_max": 3}',
     "prompt_lookup_min (6) must be at most prompt_lookup_max (3): no suffix could be looked up for a draft"),
    ('{"method": "ngram"', "not a JSON object"),
])
def test_a_speculative_config_agp_cannot_follow_exits_2_naming_what_it_reads(value, said):
    proc = clikit.agp_in("serve", "examples/chat.agp", "--speculative-config", value)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"agp serve: error: argument --speculative-config: {said}" in proc.stderr, proc.stderr


def test_speculative_config_takes_vllms_keys_and_lookup_defaults():
    assert speculative_config('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}') == \
        {"speculate": "ngram", "speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 4}
    assert speculative_config('{"method": "[ngram]"}') == \
        {"speculate": "ngram", "prompt_lookup_max": 5, "prompt_lookup_min": 5}


def test_the_engines_counters_are_vllms_spec_decode_metrics(soft_gguf):
    e = spec_engine(soft_gguf)
    run(e, REPEATING[:1], SamplingParams(max_tokens=20, ignore_eos=True))
    s = spec_stats(e)
    assert s["spec_drafts"] > 0
    text = ServerMetrics("m", process=False).render({"engines": {"gen": e.stats(latencies=False)}})[0].decode()
    for name, key in (("num_drafts", "spec_drafts"), ("num_draft_tokens", "spec_draft_tokens"),
                      ("num_accepted_tokens", "spec_accepted_tokens")):
        for series in (f"vllm:spec_decode_{name}_total{{", f"agp_spec_decode_{name}_total{{"):
            line = next(x for x in text.splitlines() if x.startswith(series))
            assert float(line.split()[-1]) == s[key], line


def test_accepted_tokens_count_the_drafts_taken_not_the_verifying_steps_own_token(soft_gguf):
    """vllm:spec_decode_num_accepted_tokens counts the drafts verifying steps accepted: a lone
    request's answer is one token of its own per step that gave it any (its prefill's, then each
    decode step's, verifying or not) plus those drafts, however many of them were accepted."""
    e = spec_engine(soft_gguf)
    out = run(e, REPEATING[:1], SamplingParams(max_tokens=40, ignore_eos=True))["0"][0]
    s = e.stats(latencies=False)
    assert s["spec_accepted_tokens"] > 0 and s["steps"] == 1 + s["decode_steps"]   # one prefill step
    assert out.completion_tokens == 40 == s["steps"] + s["spec_accepted_tokens"]


@pytest.mark.parametrize("how", ["step", "executor", "overlapped"])
def test_iteration_tokens_count_every_token_a_verifying_step_gave(soft_gguf, how):
    """vllm:iteration_tokens_total: a step's tokens are those it generated, a verifying sequence's
    accepted drafts among them: over a request they add up to its prompt and its answer, as
    without speculation (the engine's step() and the executor's path, overlapped or not)."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    e = spec_engine(soft_gguf)
    if how == "step":
        out = run(e, REPEATING[:1], params)["0"][0]
    else:
        outs: list = []
        run_requests(e, [("0", dict(prompt=REPEATING[0], params=params))], overlap=how == "overlapped",
                     on_output=outs.extend)
        out = outs[-1]
    assert spec_stats(e)["spec_accepted_tokens"] > 0 and out.completion_tokens == 40
    hist = e.stats(latencies=False)["iteration_tokens_hist"]
    assert sum(k * v for k, v in hist.items()) == out.prompt_tokens + 40
    text = ServerMetrics("m", process=False).render({"engines": {"gen": e.stats(latencies=False)}})[0].decode()
    line = next(x for x in text.splitlines() if x.startswith("vllm:iteration_tokens_total_sum{"))
    assert float(line.split()[-1]) == out.prompt_tokens + 40, line


def test_drafting_pauses_where_verifying_steps_pay_less_than_plain_ones(soft_gguf):
    """Measured on CPU: verifying steps that give fewer tokens a second than plain decode steps
    (here plain steps are made to look a microsecond long before every step, every forward a
    second long by the fake step timer) pause drafting, longer each time a trial loses; the
    answer is the same. Where plain steps take as long as verifying ones, drafting goes on."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want = run(engine(soft_gguf), REPEATING[:1], params)["0"][2]
    e = spec_engine(soft_gguf, plain_s=1e-6)
    e.add_request("0", prompt=REPEATING[0], params=params)
    got = []
    while e.has_unfinished():
        for _ in range(TIMING_WINDOW):               # the recent plain steps, all of them
            e.scheduler.observe(0, 1e-6)
        got += [t for out in e.step() for t in out.new_token_ids]
    assert got == want
    assert spec_stats(e)["spec_drafts"] == 1             # it lost by far: the pause outlasts the answer
    again = spec_engine(soft_gguf)                       # plain steps slow: every verifying step pays
    assert run(again, REPEATING[:1], params)["0"][2] == want and spec_stats(again)["spec_drafts"] > 5
