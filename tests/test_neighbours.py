"""An answer does not depend on its neighbours: a request with a seed (or greedy) gets the same
tokens, text, logprobs, finish_reason, stop_reason and usage alone as in a crowd.

A differential fuzz. Requests are drawn at random (a fixed seed) from the sampling features —
temperature with top-k, top-p and min-p, presence, frequency and repetition penalties,
logit_bias, min_tokens, stop strings (with or without their text), stop_token_ids, ignore_eos,
logprobs and prompt_logprobs, allowed_token_ids, bad_words, a JSON schema, mean pooling, prompts
alone (max_tokens 0), cache_salt, prompts that share a prefix and prompts that fill most of the
KV pool — and each is run alone, one after another on one engine, its prompt prefilled whole.
Then all of them run together on a fresh engine whose KV pool holds only a few (one request fills
the whole context as it goes: the others are preempted and recomputed), prefilled in pieces of at
most 7 tokens that the step's budget cuts further, arriving over time, some paused and resumed,
beside unseeded sampled requests and one that is aborted: through Engine.step(), and through the
executor overlapped (steps scheduled ahead, tokens in flight) and serial. In fp32 and in bf16
(whose logits often tie), in the batch-invariant mode (AGP_BATCH_INVARIANT=1, engine/invariant.py),
every field of every answer must be the same to the last bit; `cached_tokens` alone may differ (it says what the cache held, which is the
neighbours' doing). The same holds one level up: `agp run` answers each line of a file (chat and
completions, n > 1 with a seed, stop strings, logprobs, a response_format) as it answers that line
alone.

`make test` runs one draw of a few dozen requests (and ten lines); NEIGHBOUR_DRAWS=50 runs fifty
(seeds 0..49) for a long run by hand.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest

from pipeline_dsl.engine import SamplingParams
from pipeline_dsl.engine.constrain import ConstraintCompiler
from pipeline_dsl.engine.executor import Executor
from tiny_model import BOUNDED_SCHEMA, tiny_engine

DRAWS = int(os.environ.get("NEIGHBOUR_DRAWS", "1"))
REQUESTS = 20
# a pool of 32 blocks of 4 tokens in fp32, 64 in bf16 (the smallest budget): a few requests at a
# time; alone a prompt is prefilled whole, in the crowd in pieces of at most 7 tokens (and never cut by
# measured step times, itl_target_s: the same steps on any machine)
CONFIG = dict(kv_budget_bytes=64 << 10, block_size=4, max_batch_size=12, prefill_chunk=128, max_tokens_per_step=128,
              itl_target_s=0.0)
CROWD = dict(CONFIG, block_size=16, prefill_chunk=7, max_tokens_per_step=24)
WORDS = "the cat sat on a mat hello world and is of us it at".split()
SYSTEMS = ("You are a careful assistant who answers", "the world is a cat and the cat is the world")


@dataclass
class Req:
    rid: str
    prompt: str | list[int]       # a text, or token ids
    params: dict
    park: bool = False            # paused after its second output, then resumed
    at: int = 0                   # arrives at this step (Engine.step crowd)

    @property
    def source(self) -> dict:
        """The prompt as Engine.add_request takes it."""
        return {"prompt": self.prompt} if isinstance(self.prompt, str) else {"prompt_token_ids": self.prompt}


@pytest.fixture(scope="module")
def invariant():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AGP_BATCH_INVARIANT", "1")
        yield


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def dtype(request):
    """fp32, and bf16 whose logits often tie (topk's and sort's order among equals)."""
    return request.param


@pytest.fixture(scope="module")
def lone(soft_gguf, invariant, dtype):
    """The engine that answers each request alone, one after another."""
    return tiny_engine(soft_gguf, dtype=dtype, **CONFIG)


@pytest.fixture(scope="module")
def grammar(lone):
    compiler = ConstraintCompiler(lone.tokenizer, lone.vocab_size)
    return compiler.compile({"type": "json_schema", "schema": BOUNDED_SCHEMA})


def printable_tokens(eng) -> list[tuple[int, str]]:
    """(id, text) of the tokens whose text is printable ASCII: stop strings the model can write."""
    out = []
    for t in range(eng.vocab_size):
        text = eng.tokenizer.decode([t])
        if text.isascii() and text.isprintable() and text.strip():
            out.append((t, text))
    return out


def draw(rng: random.Random, eng, grammar, words: list[tuple[int, str]]) -> list[Req]:
    """REQUESTS requests, and one that fills the whole context (the KV pool) as it goes: the others
    beside it are preempted."""
    vocab, eos = eng.vocab_size, min(eng.eos_token_ids)
    reqs = []
    for i in range(REQUESTS):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        if rng.random() < 0.5:                       # a shared prefix: prefix-cache hits
            text = rng.choice(SYSTEMS) + " " + text
        if rng.random() < 0.1:                       # most of the pool: the others are preempted
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 30)))
        p: dict = dict(max_tokens=rng.randint(1, 24))
        if rng.random() < 0.7:
            p.update(temperature=rng.choice([0.5, 1.0, 1.5]), seed=rng.randrange(-(1 << 40), 1 << 40))
            if rng.random() < 0.3:
                p["top_k"] = rng.choice([1, 3, 20])
            if rng.random() < 0.3:
                p["top_p"] = rng.choice([0.3, 0.8])
            if rng.random() < 0.3:
                p["min_p"] = rng.choice([0.05, 0.2])
        if rng.random() < 0.3:
            p["presence_penalty"] = rng.choice([-1.0, 1.5])
        if rng.random() < 0.3:
            p["frequency_penalty"] = rng.choice([-0.5, 1.0])
        if rng.random() < 0.3:
            p["repetition_penalty"] = rng.choice([0.7, 1.3])
        bias = {rng.randrange(vocab): rng.choice([-100, -5, 5, 8]) for _ in range(rng.randint(1, 3))} \
            if rng.random() < 0.3 else {}
        if rng.random() < 0.3:
            p["stop_token_ids"] = [rng.randrange(3, vocab) for _ in range(2)]
        if rng.random() < 0.3:
            p["min_tokens"] = rng.randint(1, p["max_tokens"])
            if rng.random() < 0.6:              # an ending made likely: min_tokens alone holds it off
                end = rng.choice(p.get("stop_token_ids", [eos]))
                bias[end] = rng.choice([4, 6])
        if rng.random() < 0.2:
            p["ignore_eos"] = True
        if rng.random() < 0.4:
            p["logprobs"] = rng.randint(0, 3)
        if rng.random() < 0.15:
            p["prompt_logprobs"] = rng.randint(0, 2)
        if rng.random() < 0.15:
            p["allowed_token_ids"] = sorted(rng.sample(range(vocab), 40))
        if rng.random() < 0.2:
            p["bad_words"] = [rng.choice(["the", " cat", "he", "o"])]
        if rng.random() < 0.15 and "allowed_token_ids" not in p:
            p.update(constraint=grammar, max_tokens=60)
        if rng.random() < 0.4:
            # a stop string the answer is likely to hold: a token made likelier, its text, its last
            # character or its text twice (across two tokens)
            t, word = rng.choice(words)
            bias[t] = rng.choice([3, 5])
            p["stop"] = [rng.choice([word, word[-1], word + word])]
            p["include_stop_str_in_output"] = rng.random() < 0.5
        if bias:
            p["logit_bias"] = bias
        if rng.random() < 0.1:
            p["cache_salt"] = rng.choice(["a", "b"])
        if rng.random() < 0.15:
            p["pooling"] = "mean"
        if rng.random() < 0.1:                       # the prompt's outputs alone
            p = dict(max_tokens=0, prompt_logprobs=rng.randint(0, 2), pooling=rng.choice([None, "mean"]))
        if p.get("pooling") and len(text) < 40:      # longer than a piece in the crowd: summed in pieces
            text = SYSTEMS[0] + " " + text
        reqs.append(Req(f"q{i}", text, p, park=rng.random() < 0.2, at=rng.randint(0, 6)))
    n = eng.max_model_len * rng.randint(60, 75) // 100
    reqs.append(Req("whole", [rng.randrange(3, vocab) for _ in range(n)], dict(
        max_tokens=eng.max_model_len - n, ignore_eos=True, temperature=1.0, seed=rng.randrange(1 << 63), logprobs=1),
        at=rng.randint(0, 3)))
    return reqs


def answers(outputs: dict) -> dict:
    """Per request, every field of its answer as a user sees it (not cached_tokens)."""
    out = {}
    for rid, outs in outputs.items():
        last = outs[-1]
        out[rid] = dict(tokens=[t for o in outs for t in o.new_token_ids], deltas=[o.delta_text for o in outs],
                        text=last.text, finished=[o.finished for o in outs], finish_reason=last.finish_reason,
                        stop_reason=last.stop_reason, usage=(last.prompt_tokens, last.completion_tokens),
                        logprobs=[e for o in outs for e in o.logprobs or ()],
                        prompt_logprobs=[o.prompt_logprobs for o in outs if o.prompt_logprobs is not None],
                        pooled=[o.pooled for o in outs if o.pooled is not None], error=last.metrics.get("error"))
    return out


# neighbours whose own answers are not compared: unseeded sampled requests (the shared generator),
# one with a penalty (a slot of the penalty rows), the last aborted while it runs
NOISE = [(f"z{i}", dict(prompt="the cat " * (i + 1), params=SamplingParams(
    max_tokens=6 + i, temperature=1.0, ignore_eos=True, presence_penalty=0.5 * (i % 2)))) for i in range(4)]


def alone(eng, reqs: list[Req]) -> dict:
    outs: dict = {}
    for r in reqs:
        eng.add_request(r.rid, **r.source, params=SamplingParams(**r.params))
        while eng.has_unfinished():
            for o in eng.step():
                outs.setdefault(o.request_id, []).append(o)
    return answers(outs)


def crowd_stepped(eng, reqs: list[Req]) -> dict:
    """Engine.step(): arrivals over the first steps, pauses of three steps, an abort."""
    outs: dict = {}
    todo = sorted(reqs, key=lambda r: r.at)
    parked: dict[str, int] = {}
    wanted = {r.rid: r for r in reqs}
    for rid, kw in NOISE:
        eng.add_request(rid, **kw)
    step = 0
    while todo or parked or eng.has_unfinished():
        while todo and todo[0].at <= step:
            r = todo.pop(0)
            eng.add_request(r.rid, **r.source, params=SamplingParams(**r.params))
        if step == 4:
            eng.abort(NOISE[-1][0])
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
            r = wanted.get(o.request_id)
            if r is not None and r.park and not o.finished and len(outs[r.rid]) == 2:
                eng.park(r.rid)
                parked[r.rid] = step + 3
        for rid in [rid for rid, until in parked.items() if step >= until]:
            eng.park(rid, False)
            del parked[rid]
        step += 1
    assert eng.stats(latencies=False)["preemptions"] > 0
    return answers({rid: o for rid, o in outs.items() if rid in wanted})


def crowd_executed(eng, reqs: list[Req], overlap: bool) -> dict:
    """The executor: half the requests submitted while it runs, pauses, an abort."""
    outs: dict = {}
    ex = Executor(eng, overlap=overlap)
    wanted = {r.rid: r for r in reqs}
    later = [r for r in reqs if r.at > 3]
    paused = set()

    def on_output(batch):
        for o in batch:
            outs.setdefault(o.request_id, []).append(o)
            if o.request_id == NOISE[0][0] and len(outs[o.request_id]) == 2:
                ex.abort(NOISE[-1][0])
                for r in later:
                    ex.submit(r.rid, **r.source, params=SamplingParams(**r.params))
            r = wanted.get(o.request_id)
            if r is not None and r.park and not o.finished and len(outs[r.rid]) == 2 and r.rid not in paused:
                paused.add(r.rid)
                ex.park(r.rid)
                ex.park(r.rid, False)

    for rid, kw in NOISE:
        ex.submit(rid, **kw)
    for r in reqs:
        if r not in later:
            ex.submit(r.rid, **r.source, params=SamplingParams(**r.params))
    ex.run(on_output=on_output)
    return answers({rid: o for rid, o in outs.items() if rid in wanted})


def differences(reqs: list[Req], ref: dict, got: dict) -> list[str]:
    bad = []
    for r in reqs:
        a, b = ref[r.rid], got.get(r.rid)
        if b is None:
            bad.append(f"{r.rid}: no answer in the crowd")
            continue
        fields = [k for k in a if a[k] != b[k]]
        if fields:
            k = fields[0]
            bad.append(f"{r.rid} ({', '.join(fields)}): {k} alone {str(a[k])[:120]} / in the crowd "
                       f"{str(b[k])[:120]}; params {dict(r.params, constraint=bool(r.params.get('constraint')))}")
    return bad


@pytest.fixture(scope="module")
def draws(lone, grammar):
    """Per draw: its requests and their answers alone."""
    words = printable_tokens(lone)
    out = []
    for seed in range(DRAWS):
        reqs = draw(random.Random(seed), lone, grammar, words)
        out.append((reqs, alone(lone, reqs)))
    return out


@pytest.mark.parametrize("crowd", ["stepped", "overlapped", "serial"])
def test_every_answer_in_a_crowd_is_the_answer_alone(soft_gguf, invariant, dtype, draws, crowd):
    run = {"stepped": crowd_stepped, "overlapped": lambda e, r: crowd_executed(e, r, True),
           "serial": lambda e, r: crowd_executed(e, r, False)}[crowd]
    bad = []
    for reqs, ref in draws:
        bad += differences(reqs, ref, run(tiny_engine(soft_gguf, dtype=dtype, **CROWD), reqs))
    assert not bad, "\n".join(bad[:10])


def test_the_draw_reaches_every_feature(draws):
    """The fixed draw holds every feature and ends in every way (else the fuzz checks less than it says)."""
    reqs, ref = draws[0]
    used = set().union(*(r.params for r in reqs))
    assert used >= {"temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "logit_bias", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
                    "logprobs", "prompt_logprobs", "allowed_token_ids", "bad_words", "constraint", "pooling",
                    "cache_salt"}, used
    assert {a["finish_reason"] for a in ref.values()} >= {"stop", "length"}
    assert any(a["stop_reason"] for a in ref.values() if isinstance(a["stop_reason"], str))
    assert any(r.park for r in reqs) and any(r.params.get("max_tokens") == 0 for r in reqs)
    assert any(a["pooled"] for a in ref.values())


# ---- agp run: a file of request lines -----------------------------------------------------------
PIPELINE = """
    stage request : requests      {}
    stage batch   : dynamic_batch { max_batch_size = 8  timeout = 1ms  max_tokens_per_step = 32 }
    stage encode  : encode        {}
    stage kv      : kv_lookup     { reuse = prefix  block_size = 4  budget = 128KiB }
    stage gen     : generate      { max_new_tokens = 16  prefill_chunk = 8 }
    stage out     : respond       {}
    request -> batch
    batch -> encode  when full
    batch -> encode  when timeout
    encode -> kv -> gen -> out
"""


def draw_lines(rng: random.Random, count: int, words: list[tuple[int, str]]) -> list[dict]:
    """`agp run` request lines: chat and completions, n > 1 with a seed, stop strings, logprobs,
    a response_format, penalties."""
    lines = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        line: dict = {"id": f"l{i}", "max_tokens": rng.randint(1, 12)}
        chat = rng.random() < 0.5
        line.update({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})
        if rng.random() < 0.6:
            line.update(temperature=rng.choice([0.5, 1.0, 1.5]), seed=rng.randrange(-(1 << 62), 1 << 62))
            if rng.random() < 0.4:
                line["n"] = rng.randint(2, 3)
            if rng.random() < 0.3:
                line["top_p"] = rng.choice([0.3, 0.8])
        for name, values in (("presence_penalty", [-1.0, 1.5]), ("frequency_penalty", [-0.5, 1.0]),
                             ("repetition_penalty", [0.7, 1.3]), ("min_tokens", [1, 3])):
            if rng.random() < 0.25:
                line[name] = rng.choice(values)
        if rng.random() < 0.5:
            t, word = rng.choice(words)
            line["logit_bias"] = {str(t): rng.choice([3, 5])}
            line["stop"] = [rng.choice([word, word[-1], word + word])]
        if rng.random() < 0.4:
            k = rng.randint(0, 3)
            line.update({"logprobs": True, "top_logprobs": k} if chat else {"logprobs": k})
        if rng.random() < 0.15:
            line["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": BOUNDED_SCHEMA}}
            line["max_tokens"] = 60
        lines.append(line)
    return lines


def record(out: dict) -> dict:
    """An output line as a user reads it, but what the prefix cache held."""
    out = {**out, "usage": {k: v for k, v in out.get("usage", {}).items() if k != "cached_tokens"}}
    return out


def test_agp_run_answers_each_line_of_a_file_as_it_answers_it_alone(tmp_path, soft_gguf, invariant):
    import flowkit

    path = flowkit.write(tmp_path, soft_gguf, PIPELINE)
    words = printable_tokens(tiny_engine(soft_gguf))
    bad = []
    for seed in range(DRAWS):
        lines = draw_lines(random.Random(seed), 10, words)
        if seed == 0:                    # the fixed draw holds each kind of line
            kinds = [("seed" not in x, x.get("n", 1) > 1, "stop" in x, "logprobs" in x, "messages" in x,
                      "prompt" in x, "response_format" in x) for x in lines]
            assert all(map(any, zip(*kinds))), kinds
        together = flowkit.run_lines(path, lines)
        for line, got in zip(lines, together):
            (ref,) = flowkit.run_lines(path, [line])
            if record(got) != record(ref):
                bad.append(f"{line}\n  alone    {record(ref)}\n  together {record(got)}")
    assert not bad, "\n".join(bad[:5])
