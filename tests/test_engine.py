"""Engine end to end: on a toy runner over a real paged pool (fast, exact), on the tiny
random GGUF model (the real ModelRunner), and once on the embedded model (slow)."""

import logging
import os
import random
import re

import pytest
import torch

from pipeline_dsl.engine import Engine, EngineConfig, InputError, QueueFullError, SamplingParams, native

VOCAB = 96  # toy tokens: id i <-> chr(32 + i); id 0 (" ") doubles as nothing special


class ToyTokenizer:
    eos_token_ids = frozenset({95})          # "\x7f"

    def encode(self, text, add_special_tokens=True):
        return [ord(ch) - 32 for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i) for i in ids if not (skip_special_tokens and i in self.eos_token_ids))

    def apply_chat_template(self, messages, add_generation_prompt=True):
        if messages[0]["role"] not in ("system", "user"):
            raise ValueError("conversation must start with system or user")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class ToyRunner:
    """A deterministic 'model' that reads its context back from a paged slot pool.

    Each token is written to the slot its block table names; the logits for the next
    token are a pseudo-random function of every (token, position) read back through the
    block table. Wrong block tables, shared blocks overwritten, or a prefix cache hit on
    the wrong blocks change the output, so exact agreement checks the whole bookkeeping.
    """

    vocab_size = VOCAB

    def __init__(self, num_blocks=64, block_size=4, max_model_len=256):
        self.num_blocks, self.block_size, self.max_model_len = num_blocks, block_size, max_model_len
        self.slots = [None] * (num_blocks * block_size)
        self.calls = []

    def _slot(self, table, p):
        return table[p // self.block_size] * self.block_size + p % self.block_size

    def execute(self, items):
        self.calls.append([(len(it.token_ids), it.start_pos) for it in items])
        rows = []
        for it in items:
            for j, tok in enumerate(it.token_ids):
                p = it.start_pos + j
                self.slots[self._slot(it.block_table, p)] = (tok, p)
            if it.sample:
                ctx = [self.slots[self._slot(it.block_table, p)]
                       for p in range(it.start_pos + len(it.token_ids))]
                assert all(c is not None and c[1] == p for p, c in enumerate(ctx)), "stale KV slot"
                seed = 0
                for tok, p in ctx:
                    seed = (seed * 1_000_003 + tok * 7 + p) % (2 ** 61 - 1)
                g = torch.Generator().manual_seed(seed)
                logits = torch.randn(VOCAB, generator=g) * 2  # [V]
                if seed % 11 == 0:
                    logits[95] += 20.0                        # eos now and then, not always
                rows.append(logits)
        return torch.stack(rows) if rows else torch.empty(0, VOCAB)  # [n_sample, V]


def toy_engine(num_blocks=64, block_size=4, clock=None, **cfg):
    cfg = {"batch_timeout_s": 0.0, **cfg}
    kw = {"clock": clock} if clock else {}
    return Engine(EngineConfig(**cfg), runner=ToyRunner(num_blocks, block_size),
                  tokenizer=ToyTokenizer(), **kw)


def run_all(engine):
    """Step until done; {id: final RequestOutput}, and every delta concatenated."""
    finals, deltas = {}, {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            deltas[out.request_id] = deltas.get(out.request_id, "") + out.delta_text
            if out.finished:
                finals[out.request_id] = out
    else:
        raise AssertionError("engine did not finish")
    return finals, deltas


PROMPTS = ["the cat sat", "hello world, hello", "a", "the cat sat on the mat and looked around",
           "0123456789" * 4, "the cat sat on", "x y z"]


def one_at_a_time(engine_factory, prompts, params):
    outs = {}
    for i, p in enumerate(prompts):
        e = engine_factory()
        e.add_request(str(i), prompt=p, params=params)
        outs.update(run_all(e)[0])
    return outs


# ---- the toy runner: exact checks of the scheduling machinery ------------------------------

@pytest.mark.parametrize("cfg", [dict(), dict(policy="static"), dict(prefill_chunk=3, max_tokens_per_step=8),
                                 dict(max_batch_size=2), dict(prefix_reuse=False)])
def test_batched_generation_equals_one_at_a_time(cfg):
    params = SamplingParams(max_tokens=12)
    alone = one_at_a_time(lambda: toy_engine(**cfg), PROMPTS, params)
    engine = toy_engine(**cfg)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), prompt=p, params=params)
    together, _ = run_all(engine)
    assert {k: v.new_token_ids for k, v in together.items()} != {}
    for k in alone:
        assert together[k].text == alone[k].text
        assert together[k].finish_reason == alone[k].finish_reason
    assert engine.stats()["mean_batch_size"] > 1


def test_preemption_under_a_small_pool_gives_the_same_answers():
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    prompts = PROMPTS[:4] * 2
    big = toy_engine(num_blocks=200)
    small = toy_engine(num_blocks=24)
    for e in (big, small):
        for i, p in enumerate(prompts):
            e.add_request(str(i), prompt=p, params=params)
    a, _ = run_all(big)
    b, _ = run_all(small)
    assert {k: v.text for k, v in a.items()} == {k: v.text for k, v in b.items()}
    assert small.stats()["preemptions"] > 0
    small.blocks.check_invariants()
    assert small.blocks.num_used == 0


@pytest.mark.parametrize("seed", range(24))
def test_random_settings_and_arrivals_never_change_greedy_output(seed):
    rng = random.Random(seed)
    cfg = dict(max_batch_size=rng.choice([1, 2, 3, 8]), prefill_chunk=rng.choice([1, 3, 16]),
               max_tokens_per_step=rng.choice([4, 9, 64]), policy=rng.choice(["continuous", "static"]),
               prefix_reuse=rng.random() < 0.7)
    blocks = rng.choice([20, 30, 200])
    reqs = [(str(i), rng.choice(PROMPTS) + rng.choice(["", "!", " more"]),
             SamplingParams(max_tokens=rng.randrange(1, 16), ignore_eos=rng.random() < 0.5)) for i in range(12)]
    expected = {}
    for rid, prompt, params in reqs:
        e = toy_engine(num_blocks=200)
        e.add_request(rid, prompt=prompt, params=params)
        expected.update(run_all(e)[0])
    e = toy_engine(num_blocks=blocks, **cfg)
    pending, finals = list(reqs), {}
    for _ in range(10_000):
        while pending and rng.random() < 0.3:       # requests arrive between steps
            rid, prompt, params = pending.pop(0)
            e.add_request(rid, prompt=prompt, params=params)
        finals.update({o.request_id: o for o in e.step() if o.finished})
        if not pending and not e.has_unfinished():
            break
    assert {k: (v.text, v.finish_reason) for k, v in finals.items()} == \
        {k: (v.text, v.finish_reason) for k, v in expected.items()}
    e.blocks.check_invariants()
    assert e.blocks.num_used == 0


def test_shared_prefix_is_served_from_cache_with_identical_output():
    e = toy_engine()
    prompt = "the same long system prompt, then a question"
    e.add_request("a", prompt=prompt, params=SamplingParams(max_tokens=5))
    first, _ = run_all(e)
    e.add_request("b", prompt=prompt, params=SamplingParams(max_tokens=5))
    second, _ = run_all(e)
    assert first["a"].cached_tokens == 0
    assert second["b"].cached_tokens == (len(prompt) - 1) // 4 * 4
    assert second["b"].text == first["a"].text
    s = e.stats()
    assert s["cached_tokens"] == second["b"].cached_tokens and 0 < s["hit_rate"] < 1


def test_the_engines_token_counters_count_a_cached_prompt_whole_as_usage_does():
    """stats()' prompt_tokens, like a request's usage, counts every prompt token of the finished
    requests, those the prefix cache served too; cached_tokens says how many of them it served."""
    e = toy_engine()
    prompt = "the same long system prompt, then a question"
    outs = {}
    for rid in ("a", "b"):
        e.add_request(rid, prompt=prompt, params=SamplingParams(max_tokens=5))
        outs.update(run_all(e)[0])
    assert outs["b"].cached_tokens > 0
    s = e.stats()
    assert s["prompt_tokens"] == outs["a"].prompt_tokens + outs["b"].prompt_tokens == 2 * len(prompt)
    assert s["cached_tokens"] == outs["b"].cached_tokens
    assert s["completion_tokens"] == outs["a"].completion_tokens + outs["b"].completion_tokens > 0


def test_requests_arriving_together_share_their_common_prefix():
    system = "you are a helpful assistant. "   # 29 tokens: 7 full blocks of 4
    prompts = [system + q for q in ("what is a cat?", "why is the sky blue?", "hello")]
    e = toy_engine()
    for i, p in enumerate(prompts):
        e.add_request(str(i), prompt=p, params=SamplingParams(max_tokens=6, ignore_eos=True))
    finals, _ = run_all(e)
    assert finals["0"].cached_tokens == 0
    assert finals["1"].cached_tokens == finals["2"].cached_tokens == 28
    alone = one_at_a_time(lambda: toy_engine(prefix_reuse=False), prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert {k: v.text for k, v in finals.items()} == {k: v.text for k, v in alone.items()}


def test_window_holds_a_lone_request_until_timeout():
    now = [10.0]
    e = toy_engine(clock=lambda: now[0], batch_timeout_s=0.005, max_batch_size=3)
    e.add_request("a", prompt="hi")
    assert e.step() == [] and e.runner.calls == []
    assert e.next_deadline() == pytest.approx(10.005)
    now[0] = 10.005
    assert [o.request_id for o in e.step()] == ["a"]


def test_full_batch_runs_without_waiting_for_the_window():
    now = [10.0]
    e = toy_engine(clock=lambda: now[0], batch_timeout_s=60.0, max_batch_size=3)
    for rid in "abc":
        e.add_request(rid, prompt="hi " + rid)
    assert e.next_deadline() is None
    assert sorted(o.request_id for o in e.step()) == ["a", "b", "c"]


def test_stop_string_truncates_and_is_never_streamed():
    base = toy_engine()
    base.add_request("a", prompt="the cat", params=SamplingParams(max_tokens=30, ignore_eos=True))
    full = run_all(base)[0]["a"].text
    stop = full[10:13]
    e = toy_engine()
    e.add_request("a", prompt="the cat", params=SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop]))
    finals, deltas = run_all(e)
    assert finals["a"].finish_reason == "stop"
    assert finals["a"].text == full[:full.index(stop)]
    assert deltas["a"] == finals["a"].text


def test_max_tokens_finishes_with_length():
    e = toy_engine()
    e.add_request("n", prompt="abc", params=SamplingParams(max_tokens=3, ignore_eos=True))
    steps = [o for _ in range(10) for o in e.step()]
    assert [o.finished for o in steps] == [False, False, True]
    assert steps[-1].finish_reason == "length" and steps[-1].completion_tokens == 3
    assert "".join(o.delta_text for o in steps) == steps[-1].text


def test_a_stop_string_completed_by_the_last_allowed_token_finishes_with_stop_not_length():
    base = toy_engine()
    base.add_request("a", prompt="the cat", params=SamplingParams(max_tokens=12, ignore_eos=True))
    full = run_all(base)[0]["a"].text
    # the shortest tail of the answer (two characters or more) found nowhere earlier in it: a stop
    # string that the 12th token, the last max_tokens allows, completes
    stop = next(full[-k:] for k in range(2, len(full)) if full.index(full[-k:]) == len(full) - k)
    e = toy_engine()
    e.add_request("a", prompt="the cat", params=SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop]))
    finals, deltas = run_all(e)
    out = finals["a"]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:-len(stop)] and deltas["a"] == out.text
    assert out.completion_tokens == 12


def test_stop_token_ids_end_the_request_without_their_text():
    probe = toy_engine()
    probe.add_request("p", prompt="abc", params=SamplingParams(max_tokens=6, ignore_eos=True))
    probe_out = [o for o in iter(lambda: probe.step() if probe.has_unfinished() else None, None)]
    ids = [o.new_token_ids[0] for step in probe_out for o in step]
    stop_id = ids[3]
    e = toy_engine()
    e.add_request("s", prompt="abc", params=SamplingParams(max_tokens=6, ignore_eos=True,
                                                           stop_token_ids=[stop_id]))
    out = run_all(e)[0]["s"]
    k = ids.index(stop_id)
    assert out.finish_reason == "stop" and out.completion_tokens == k + 1
    assert out.text == ToyTokenizer().decode(ids[:k])


def test_eos_stops_unless_ignored():
    e = toy_engine()
    for i in range(30):  # some of these hit eos (id 95) before 40 tokens
        e.add_request(f"r{i}", prompt=f"prompt {i}", params=SamplingParams(max_tokens=40))
    finals, _ = run_all(e)
    stopped = [o for o in finals.values() if o.finish_reason == "stop"]
    assert stopped and all(o.completion_tokens < 40 for o in stopped)
    e = toy_engine()
    for o in stopped:
        e.add_request(o.request_id, prompt=f"prompt {o.request_id[1:]}",
                      params=SamplingParams(max_tokens=40, ignore_eos=True))
    assert all(o.finish_reason == "length" and o.completion_tokens == 40 for o in run_all(e)[0].values())


def test_seeded_sampling_is_reproducible_in_any_batch():
    params = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=42)
    e1 = toy_engine()
    e1.add_request("x", prompt="seeded", params=params)
    alone = run_all(e1)[0]["x"].text
    e2 = toy_engine()
    for i in range(5):
        e2.add_request(f"o{i}", prompt=f"other {i}", params=SamplingParams(max_tokens=15, temperature=1.0))
    e2.add_request("x", prompt="seeded", params=params)
    assert run_all(e2)[0]["x"].text == alone
    e3 = toy_engine()
    e3.add_request("x", prompt="seeded", params=SamplingParams(max_tokens=15, temperature=1.0, seed=43))
    assert run_all(e3)[0]["x"].text != alone


def test_seeds_that_differ_only_above_bit_31_sample_different_text():
    """A 64-bit seed (as vLLM's clients send them) is a stream of its own: seeds equal in their
    low 32 bits do not give the same answer."""
    def text(seed):
        e = toy_engine()
        e.add_request("x", prompt="seeded", params=SamplingParams(max_tokens=15, temperature=1.0, seed=seed))
        return run_all(e)[0]["x"].text

    assert text(1) != text(1 + 2**32)
    assert text(2**40) != text(2**40 + 2**33)
    assert text(-1) != text(2**32 - 1)
    assert text(2**40) == text(2**40)


def test_an_engine_sampling_leaves_torchs_global_generator_alone():
    """Building an engine and sampling seeded and unseeded requests draws nothing from (and
    reseeds nothing of) torch's global generator, which a user's stage may have seeded."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    e = toy_engine()
    e.add_request("a", prompt="unseeded", params=SamplingParams(max_tokens=8, temperature=1.0))
    e.add_request("b", prompt="seeded", params=SamplingParams(max_tokens=8, temperature=1.0, seed=3))
    run_all(e)
    assert torch.equal(torch.rand(4), expected)


def test_messages_use_the_chat_template():
    e = toy_engine()
    e.add_request("m", messages=[{"role": "user", "content": "hi"}], params=SamplingParams(max_tokens=2))
    e.add_request("p", prompt="<user>hi<assistant>", params=SamplingParams(max_tokens=2))
    finals, _ = run_all(e)
    assert finals["m"].text == finals["p"].text and finals["m"].prompt_tokens == 19


def test_messages_without_chat_template_are_plain_text():
    e = toy_engine()
    e.add_request("m", messages=[{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}],
                  chat_template=False, params=SamplingParams(max_tokens=2))
    e.add_request("p", prompt="be\nhi", params=SamplingParams(max_tokens=2))
    finals, _ = run_all(e)
    assert finals["m"].prompt_tokens == 5 and finals["m"].text == finals["p"].text


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=""), "empty"),
    (dict(prompt="x" * 300), "context"),
    (dict(prompt="abc", params=SamplingParams(max_tokens=254)), "context"),
    (dict(), "exactly one"),
    (dict(prompt="a", messages=[{"role": "user", "content": "a"}]), "exactly one"),
    (dict(messages=[]), "non-empty"),
    (dict(messages=[{"role": "user"}]), "messages\\[0\\]"),
    (dict(messages=[{"role": "assistant", "content": "x"}]), "chat template"),
    (dict(prompt_token_ids=[1, 2, 500]), "vocabulary"),
    (dict(prompt_token_ids=[]), "empty"),
    (dict(prompt=5), "string"),
    (dict(prompt="a", params=SamplingParams(top_p=2.0)), "top_p"),
])
def test_bad_input_raises_input_error(kwargs, match):
    e = toy_engine()
    with pytest.raises(InputError, match=match):
        e.add_request("bad", **kwargs)
    assert not e.has_unfinished()


def test_request_that_cannot_fit_the_pool_is_refused_not_hung():
    e = toy_engine(num_blocks=8, block_size=4)  # 32 token slots
    with pytest.raises(InputError, match="KV cache"):
        e.add_request("big", prompt="x" * 20, params=SamplingParams(max_tokens=20))
    e.add_request("ok", prompt="x" * 20, params=SamplingParams(max_tokens=12))
    assert run_all(e)[0]["ok"].completion_tokens <= 12


def test_prompt_token_ids_from_0_to_the_last_of_the_vocabulary_are_taken_and_the_next_is_refused():
    e = toy_engine()
    for bad in ([5, VOCAB], [-1, 5]):
        with pytest.raises(InputError, match=f"token id {bad[0] if bad[0] < 0 else VOCAB} is outside the vocabulary"):
            e.add_request("bad", prompt_token_ids=bad, params=SamplingParams(max_tokens=2))
    assert not e.has_unfinished()
    e.add_request("ok", prompt_token_ids=[0, 5, VOCAB - 1], params=SamplingParams(max_tokens=2, ignore_eos=True))
    assert run_all(e)[0]["ok"].completion_tokens == 2


def test_duplicate_id_and_full_queue_are_refused():
    e = toy_engine(max_queue=2, batch_timeout_s=10.0)
    e.add_request("a", prompt="x")
    with pytest.raises(InputError, match="already"):
        e.add_request("a", prompt="y")
    e.add_request("b", prompt="x")
    with pytest.raises(QueueFullError):
        e.add_request("c", prompt="x")


def test_abort_frees_blocks_and_stops_output():
    e = toy_engine()
    e.add_request("a", prompt="abort me please", params=SamplingParams(max_tokens=50, ignore_eos=True))
    e.add_request("b", prompt="keep me", params=SamplingParams(max_tokens=5, ignore_eos=True))
    e.step()
    e.step()
    assert e.blocks.num_used > 0
    e.abort("a")
    e.abort("unknown")  # ignored
    finals, _ = run_all(e)
    assert set(finals) == {"b"}
    assert e.blocks.num_used == 0 and e.stats()["requests_aborted"] == 1
    e.blocks.check_invariants()


def test_thousand_random_requests_with_aborts_leak_no_blocks():
    rng = random.Random(7)
    e = toy_engine(num_blocks=48, block_size=4, max_batch_size=8, prefill_chunk=8, max_tokens_per_step=24)
    prefixes = ["system: be brief. ", "system: be kind. ", ""]
    live, done = set(), 0
    for n in range(1000):
        prompt = rng.choice(prefixes) + "q" * rng.randrange(1, 12)
        e.add_request(str(n), prompt=prompt,
                      params=SamplingParams(max_tokens=rng.randrange(1, 8), ignore_eos=rng.random() < .5))
        live.add(str(n))
        if rng.random() < 0.1:
            victim = rng.choice(sorted(live))
            e.abort(victim)
            live.discard(victim)
        for out in e.step():
            if out.finished:
                live.discard(out.request_id)
                done += 1
    finals, _ = run_all(e)
    done += len(finals)
    e.blocks.check_invariants()
    assert sum(e.blocks.ref) == 0 and e.blocks.num_free == e.blocks.num_blocks
    s = e.stats()
    assert s["requests_done"] == done and s["requests_done"] + s["requests_aborted"] == 1000
    assert s["kv_blocks_used"] == 0 and s["hit_rate"] > 0


def test_stats_report_counters_and_latency_percentiles():
    now = [0.0]

    def clock():
        now[0] += 0.001
        return now[0]

    e = toy_engine(clock=clock)
    for i in range(4):
        e.add_request(str(i), prompt=str(i) + " stats", params=SamplingParams(max_tokens=6, ignore_eos=True))
    run_all(e)
    s = e.stats()
    assert s["requests_done"] == 4 and s["completion_tokens"] == 24
    assert s["prompt_tokens"] == 4 * 7 and s["steps"] >= 6
    assert len(s["ttft_s"]) == 4 and len(s["itl_s"]) == 20
    assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"] and s["itl_p50_s"] > 0
    assert s["kv_blocks_total"] == 64 and s["peak_memory_bytes"] > 0
    assert s["mean_batch_size"] == pytest.approx(4.0)


def test_a_finished_requests_times_add_up_queue_then_prefill_then_decode():
    now = [0.0]
    e = toy_engine(clock=lambda: now[0], batch_timeout_s=2.0)
    e.add_request("a", prompt="time me", params=SamplingParams(max_tokens=3, ignore_eos=True))
    now[0] = 5.0                                         # waits in the window until the step at 5
    finals = {}
    while e.has_unfinished():
        for out in e.step():
            finals[out.request_id] = out
        now[0] += 1.0
    m = finals["a"].metrics
    assert m["queue_s"] == 5.0 and m["prefill_s"] == 0.0 and m["ttft_s"] == 5.0
    assert m["decode_s"] == 2.0 and m["latency_s"] == m["queue_s"] + m["prefill_s"] + m["decode_s"]


# ---- the real ModelRunner on the tiny random GGUF model -----------------------------------

TINY_PROMPTS = ["hello world", "the cat and the hat", "is it", "hello hello hello world of the cat",
                "a b c d e f g", "the", "world and cat is us"]


def tiny_engine(path, **cfg):
    cfg = {"model": str(path), "dtype": "fp32", "kv_budget_bytes": 1 << 20, "batch_timeout_s": 0.0,
           "block_size": 8, **cfg}
    return Engine(EngineConfig(**cfg))


TINY_PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.mark.parametrize("fast, dtype, warned", [(False, "bf16", True), (True, "bf16", False), (False, "fp16", True),
                                                 (True, "fp16", False), (False, "fp32", False), (False, "auto", False)])
def test_half_weights_on_a_cpu_that_emulates_their_type_warn_once_at_engine_start(tiny_gguf, monkeypatch, caplog,
                                                                                fast, dtype, warned):
    """Past the native step's rows the linears are torch's GEMMs, which without the half type in
    hardware (bf16: AMX or AVX512-BF16; fp16: AMX-FP16 or AVX512-FP16) run bf16 and fp16 weights
    slower than fp32 ones: the engine says so once, at start, with what to write instead."""
    monkeypatch.setattr(native, "fast_bf16", lambda: fast)
    monkeypatch.setattr(native, "fast_fp16", lambda: fast)
    with caplog.at_level(logging.WARNING, logger="agp.engine"):
        engine = tiny_engine(tiny_gguf, dtype=dtype, max_batch_size=12)
        for i in range(12):                  # more decodes than the native step's rows: no warning a step
            engine.add_request(str(i), prompt=TINY_PROMPTS[i % len(TINY_PROMPTS)], params=TINY_PARAMS)
        run_all(engine)
    said = [r.getMessage() for r in caplog.records if "in hardware" in r.getMessage()]
    assert len(said) == (1 if warned else 0), said
    if warned:
        assert said[0].startswith(f"dtype {dtype} on a CPU without {dtype} in hardware")
        assert "more than 8 rows" in said[0]
        assert "dtype = auto" in said[0] and "fp32" in said[0]
        # fp16 has no native step: its steps of up to 8 rows are emulated too, and it says so
        assert ("every step runs slower" in said[0] and "not fp16" in said[0] and "oneDNN" not in said[0]) \
            == (dtype == "fp16"), said[0]


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    from tiny_model import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("q4") / "tiny-q4_1.gguf", qtype="Q4_1")


@pytest.mark.parametrize("cpu", ["int8 kernels, bf16 emulated", "bf16 in hardware", "no native library"])
def test_the_startup_words_for_a_4bit_gguf_say_what_runs_its_linears(tiny_q4, monkeypatch, cpu):
    """A Q4_1 file's linears are its 4-bit blocks on agp's int8 kernels where those run (AVX-512
    VNNI, AVX2), bf16 then only storage; with bf16 in hardware (AMX) steps past 8 rows go to a bf16
    copy's GEMMs; without the native library the blocks are dequantised to fp32 weights."""
    if cpu == "no native library":
        monkeypatch.setenv("AGP_NATIVE", "0")
    elif native.load() is None or not native.int8_dot_products():
        pytest.skip("agp's int8 kernels do not run here")
    native.reset()
    monkeypatch.setattr(native, "fast_bf16", lambda: cpu == "bf16 in hardware")
    try:
        engine = tiny_engine(tiny_q4, dtype="auto")
        words = engine.model_info["linears"]
    finally:
        monkeypatch.delenv("AGP_NATIVE", raising=False)
        native.reset()
    isa = r"\((AVX-512 VNNI|AVX-VNNI|AVX2)\)"
    if cpu == "int8 kernels, bf16 emulated":
        assert re.fullmatch(rf"4-bit block weights on agp's int8 kernels {isa}, bfloat16 storage", words), words
    elif cpu == "bf16 in hardware":
        assert re.match(rf"4-bit block weights on agp's int8 kernels {isa} up to 8 rows, ", words), words
        assert words.endswith(" bfloat16 GEMMs past, bfloat16 compute") and "emulated" not in words
    else:
        assert words == "dense float32 weights on torch's float32 GEMMs, float32 compute"


def run_heard(engine) -> dict:
    """Step until done; {id: [(token id, logprob)]} of every request (its params: logprobs=0)."""
    got: dict = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            got.setdefault(out.request_id, []).extend((e["token_id"], e["logprob"]) for e in out.logprobs or ())
    else:
        raise AssertionError("the engine did not finish")
    return got


def assert_same_answers(got: list, want: list, what, tol: float = 1e-4) -> None:
    """The same token ids, each logprob within tol: another batch's float order moves a logprob by
    ~1e-6, a token read from the wrong place (or a wrong context) far more on soft_gguf, whose
    distributions are spread (the tiny model's argmax is one token with logprob 0.0 whatever it reads)."""
    assert [t for t, _ in got] == [t for t, _ in want], what
    assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=tol), what


SOFT_PARAMS = SamplingParams(max_tokens=16, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def soft_alone(soft_gguf):
    """Greedy tokens and logprobs of TINY_PROMPTS on soft_gguf run one at a time (one engine,
    one request in flight)."""
    single = tiny_engine(soft_gguf)
    alone = {}
    for i, p in enumerate(TINY_PROMPTS):
        single.add_request(str(i), prompt=p, params=SOFT_PARAMS)
        alone.update(run_heard(single))
    assert len({tuple(t for t, _ in a) for a in alone.values()}) == len(TINY_PROMPTS)  # the model is not degenerate
    return alone


@pytest.mark.parametrize("cfg", [dict(), dict(prefill_chunk=4, max_tokens_per_step=12), dict(policy="static"),
                                 dict(padding=False), dict(prefix_reuse=False, max_batch_size=3)])
def test_tiny_model_continuous_batching_equals_one_at_a_time(soft_gguf, soft_alone, cfg):
    """Batched, chunked, padded or not: each request reads its own tokens and context, so its
    tokens and logprobs are those it gets alone."""
    batched = tiny_engine(soft_gguf, **cfg)
    for i, p in enumerate(TINY_PROMPTS):
        batched.add_request(str(i), prompt=p, params=SOFT_PARAMS)
    together = run_heard(batched)
    assert together.keys() == soft_alone.keys()
    for k, want in soft_alone.items():
        assert_same_answers(together[k], want, k)
        assert len(together[k]) == 16
    assert batched.stats()["mean_batch_size"] > 2


def test_tiny_model_prefix_cache_hit_keeps_greedy_output(soft_gguf):
    """A prompt whose prefix the cache serves reads the cached blocks in their order: the tokens
    and logprobs of its first, uncached run."""
    e = tiny_engine(soft_gguf)
    msgs = [{"role": "user", "content": "hello world and the cat"}]
    e.add_request("a", messages=msgs, params=SamplingParams(max_tokens=10, ignore_eos=True, logprobs=0))
    a = run_heard(e)["a"]
    e.add_request("b", messages=msgs, params=SamplingParams(max_tokens=10, ignore_eos=True, logprobs=0))
    b = run_heard(e)["b"]
    assert e.stats()["cached_tokens"] > 16
    assert_same_answers(b, a, "b")


def test_tiny_model_seeded_sampling_reproducible(tiny_gguf):
    p = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=5, ignore_eos=True)
    e = tiny_engine(tiny_gguf)
    e.add_request("a", prompt="the cat", params=p)
    a = run_all(e)[0]["a"].text
    e.add_request("b", prompt="hello", params=SamplingParams(max_tokens=12, temperature=1.0))
    e.add_request("c", prompt="the cat", params=p)
    assert run_all(e)[0]["c"].text == a


def test_tiny_model_stop_string_across_tokens(tiny_gguf):
    e = tiny_engine(tiny_gguf)
    e.add_request("a", prompt="the cat", params=SamplingParams(max_tokens=24, ignore_eos=True))
    full = run_all(e)[0]["a"].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    e.add_request("b", prompt="the cat", params=SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]))
    finals, deltas = run_all(e)
    assert finals["b"].finish_reason == "stop"
    assert finals["b"].text == full[:full.index(stop)] == deltas["b"]


def test_tiny_model_too_long_prompt_is_input_error(tiny_gguf):
    e = tiny_engine(tiny_gguf)
    with pytest.raises(InputError, match="context"):
        e.add_request("x", prompt="hello " * 600)


@pytest.mark.parametrize("cfg, match", [(dict(kv_budget_bytes=64), "'kv_budget_bytes' must be a number of bytes from 65536"),
                                        (dict(max_model_len=10_000), "max_model_len"),
                                        (dict(model="no-such-model"), "unknown model"),
                                        (dict(policy="eager"), "policy")])
def test_bad_engine_settings_raise_input_error(tiny_gguf, cfg, match):
    with pytest.raises(InputError, match=match):
        tiny_engine(tiny_gguf, **cfg)


def test_tiny_model_kv_pool_is_sized_from_the_budget(tiny_gguf):
    e = tiny_engine(tiny_gguf, kv_budget_bytes=1 << 20)
    per_block = e.model_info["kv_bytes_per_block"]
    assert per_block == 2 * 2 * 8 * 2 * 16 * 4      # K+V, 2 layers, 8 tokens, 2 KV heads, hd 16, fp32
    assert e.blocks.num_blocks == (1 << 20) // per_block
    assert e.stats()["kv_blocks_total"] == e.blocks.num_blocks


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_a_cpu_kv_pool_is_resident_only_as_its_blocks_are_used(tiny_gguf):
    """The pool is zero from the start, but a load neither writes nor holds its whole budget: a
    256 MiB pool costs the load little resident memory (and no time spent writing zeros), and
    answers as a small pool does."""
    small = tiny_engine(tiny_gguf)
    before = resident_bytes()
    big = tiny_engine(tiny_gguf, kv_budget_bytes=256 << 20)
    assert resident_bytes() - before < 64 << 20
    assert big.blocks.num_blocks * big.model_info["kv_bytes_per_block"] == 256 << 20
    for e in (small, big):
        for i, p in enumerate(TINY_PROMPTS):
            e.add_request(str(i), prompt=p, params=TINY_PARAMS)
    assert run_all(big)[1] == run_all(small)[1]            # every request's text


# ---- the embedded model ---------------------------------------------------------------------

@pytest.mark.slow
def test_embedded_model_answers_a_chat_message():
    # fp32: in bf16 the first token's top two logits tie on some CPUs ("The" 25.325 vs "L" 25.243
    # in fp32, both 25.375 in bf16) and greedy then answers in French
    e = Engine(EngineConfig(kv_budget_bytes=16 << 20, dtype="fp32"))
    e.add_request("q", messages=[{"role": "user", "content": "What is the capital of France?"}],
                  params=SamplingParams(max_tokens=24))
    out = run_all(e)[0]["q"]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length") and out.completion_tokens <= 24


@pytest.mark.slow
def test_each_load_of_the_embedded_model_has_weights_of_its_own():
    # the suite reads the embedded file once per process (tests/conftest.py): a model changed
    # in place (an fp32 model holds the very tensors it was given) leaves the next load as it was
    from pipeline_dsl.engine.models import load_model

    first, _ = load_model(None, dtype="fp32")
    embed, o = first.embed.clone(), first.layers[0].o.weight.clone()
    first.embed.zero_()
    first.layers[0].o.weight.zero_()
    second, _ = load_model(None, dtype="fp32")
    assert torch.equal(second.embed, embed) and torch.equal(second.layers[0].o.weight, o)
    assert embed.abs().sum() > 0 and o.abs().sum() > 0


def test_an_answer_cut_by_max_tokens_inside_a_character_ends_before_it(tiny_gguf):
    """max_tokens that cuts a UTF-8 character between its bytes: the text ends before the
    character, never with U+FFFD for the bytes of it that came."""
    engine = tiny_engine(tiny_gguf)
    lead = engine.tokenizer.token_to_id("Ã")        # byte C3, the first of "é" in gpt2's alphabet
    engine.add_request("0", prompt="the cat", params=SamplingParams(
        max_tokens=1, ignore_eos=True, logit_bias={lead: 100.0}, temperature=0.0))
    finals, deltas = run_all(engine)
    assert finals["0"].new_token_ids == [lead] and finals["0"].finish_reason == "length"
    assert (finals["0"].text, deltas["0"]) == ("", "")


@pytest.mark.parametrize("how, text", [
    ("eos", ""),                        # 0xE2, then the model's EOS
    ("stop_token", ""),                 # 0xE2, then a stop_token_ids token
    ("stop_token_shown", "\ufffdb"),    # ... whose text the answer keeps: the byte is in its middle
    ("length", ""),                     # 0xE2 0xE2, cut by max_tokens
])
def test_stray_bytes_at_an_answers_end_are_left_out_and_in_its_middle_are_u_fffd(tiny_gguf, how, text):
    """A byte-level BPE answer whose bytes are not UTF-8 (a lead byte 0xE2 that no continuation
    byte follows) reads as vLLM's detokeniser reads it: a stray byte in the middle of the text is
    U+FFFD (as decoding the ids gives), and those at its end, which no later token makes text
    of, are left out however the answer ended (an EOS or a stop token wrote them as U+FFFD, a
    max_tokens cut left them out). The streamed deltas spell the whole text."""
    engine = tiny_engine(tiny_gguf)
    e2, b = engine.tokenizer.token_to_id("â"), engine.tokenizer.token_to_id("b")    # gpt2's 0xE2, "b"
    eos = min(engine.eos_token_ids)
    # min_tokens keeps the first token from being the one the bias favours: 0xE2 comes first
    params = {"eos": dict(min_tokens=1, allowed_token_ids=[e2, eos], logit_bias={eos: 100.0}),
              "stop_token": dict(min_tokens=1, allowed_token_ids=[e2, b], logit_bias={b: 100.0}, stop_token_ids=[b]),
              "stop_token_shown": dict(min_tokens=1, allowed_token_ids=[e2, b], logit_bias={b: 100.0},
                                       stop_token_ids=[b], include_stop_str_in_output=True),
              "length": dict(max_tokens=2, ignore_eos=True, logit_bias={e2: 100.0})}[how]
    engine.add_request("0", prompt="the cat", params=SamplingParams(temperature=0.0, **params))
    finals, deltas = run_all(engine)
    out = finals["0"]
    assert out.completion_tokens == 2 and out.finish_reason == ("length" if how == "length" else "stop")
    assert (out.text, deltas["0"]) == (text, text)


def test_a_stop_token_writes_its_text_only_where_include_stop_str_in_output_asks(tiny_gguf):
    """A stop_token_ids token ends the answer; its own text is in the answer only with
    include_stop_str_in_output (vLLM's), as a stop string's is."""
    engine = tiny_engine(tiny_gguf)
    the = engine.tokenizer.token_to_id("Ġthe")
    for keep in (False, True):
        engine.add_request(str(keep), prompt="hello", params=SamplingParams(
            max_tokens=5, logit_bias={the: 100.0}, stop_token_ids=[the], include_stop_str_in_output=keep))
    finals, deltas = run_all(engine)
    for keep, text in ((False, ""), (True, " the")):
        out = finals[str(keep)]
        assert (out.finish_reason, out.stop_reason, out.completion_tokens) == ("stop", the, 1)
        assert (out.text, deltas[str(keep)]) == (text, text)


def test_a_parked_request_gives_its_slot_and_blocks_away_and_goes_on_where_it_was():
    """park: a running request leaves the batch (its KV blocks freed, not a preemption for want
    of blocks), another takes its one slot and finishes; the engine is idle with it parked;
    unparked, it recomputes and ends with the answer it would have had, its metrics counting the
    pause as a pause, not as a preemption (before: "preemptions" 1)."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = toy_engine(max_batch_size=1)
    ref.add_request("a", prompt="abort me please", params=params)
    want = run_all(ref)[1]["a"]

    e = toy_engine(max_batch_size=1)
    e.add_request("a", prompt="abort me please", params=params)
    e.add_request("b", prompt="keep me", params=SamplingParams(max_tokens=5, ignore_eos=True))
    text = ""
    for _ in range(3):
        text += "".join(o.delta_text for o in e.step() if o.request_id == "a")
    assert e.num_running == 1 and e.num_waiting == 1
    e.park("a")
    e.park("unknown")                          # ignored
    assert e.num_running == 0 and e.num_waiting == 1
    finals, _ = run_all(e)                     # b alone: the engine is done with a parked
    assert set(finals) == {"b"} and e.blocks.num_used == 0 and not e.has_unfinished()
    e.park("a", False)
    finals, deltas = run_all(e)
    assert set(finals) == {"a"} and text + deltas["a"] == want
    assert (finals["a"].metrics["preemptions"], finals["a"].metrics["pauses"]) == (0, 1)
    assert e.blocks.num_used == 0 and e.stats()["preemptions"] == 0
    e.blocks.check_invariants()


def test_an_unparked_request_goes_back_at_the_head_of_the_queue_before_later_ones():
    """fcfs: unparked, a request waits at the head of the queue as a preempted one does, so the
    next free slot is its own, not that of a request that arrived after it."""
    e = toy_engine(max_batch_size=1)
    e.add_request("a", prompt="first in", params=SamplingParams(max_tokens=6, ignore_eos=True))
    e.step()
    e.step()
    e.add_request("b", prompt="came later", params=SamplingParams(max_tokens=6, ignore_eos=True))
    e.park("a")
    e.park("a", False)
    assert e.num_running == 0 and e.num_waiting == 2
    order = []
    while e.has_unfinished():
        order += [o.request_id for o in e.step() if o.finished]
    assert order == ["a", "b"]


def test_stray_bytes_before_a_refused_token_are_left_out(tiny_gguf):
    """An answer ended with finish "error" (allowed_token_ids leaves the grammar nothing it takes
    after 0xE2, the first byte of "€") leaves out the byte no later token made a character of, as
    a stop or a length cut does: never U+FFFD."""
    pytest.importorskip("llguidance")
    from pipeline_dsl.engine.constrain import ConstraintCompiler
    engine = tiny_engine(tiny_gguf)
    e2 = engine.tokenizer.token_to_id("â")                                         # gpt2's 0xE2
    grammar = ConstraintCompiler(engine.tokenizer, engine.vocab_size).compile({"type": "regex", "pattern": "€+"})
    engine.add_request("0", prompt="the cat", params=SamplingParams(
        temperature=0.0, max_tokens=4, allowed_token_ids=[e2], constraint=grammar))
    finals, deltas = run_all(engine)
    out = finals["0"]
    assert out.finish_reason == "error"
    assert (out.text, deltas["0"]) == ("", "")
