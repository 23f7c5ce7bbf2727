"""Sampling on the device: temperature / top-k / top-p / min-p rows are drawn over the whole
batch on the logits' device with no host sync (each row's uniform number comes from its own
generator on the host, before the logits exist), and a seeded request's tokens stay what a
per-row draw from its own generator gives: the same seed, the same tokens, whatever shares
its batch."""

import random

import torch

from pipeline_dsl.engine import SamplingParams
from pipeline_dsl.engine.processors import draw
from pipeline_dsl.engine.sampler import Sampler, make_generator
from pipeline_dsl.engine.state import DecodeState
from tiny_model import tiny_engine


def per_row(logits, params, gens, shared):
    """The reference: one row at a time, one torch.rand(1) from the row's generator."""
    out = []
    for row, p, g in zip(logits, params, gens):
        if p.greedy:
            out.append(int(row.argmax()))
            continue
        x = row.float() / p.temperature
        V = x.shape[0]
        probs = torch.softmax(x, -1)
        if p.top_p < 1.0 or 0 < p.top_k < V:
            xs, order = x.sort(descending=True)
            k = p.top_k if 0 < p.top_k < V else V
            xs = xs.masked_fill(torch.arange(V) >= k, float("-inf"))
            ps = torch.softmax(xs, -1)
            ps = ps.masked_fill(ps.cumsum(-1) - ps >= p.top_p, 0.0)
            probs = torch.zeros_like(ps).scatter_(0, order, ps)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        cdf = probs.cumsum(-1)
        u = torch.rand(1, generator=g or shared, dtype=torch.float64).float() * cdf[-1]
        t = min(int(torch.searchsorted(cdf, u, right=True)), V - 1)
        out.append(t if probs[t] > 0 else int(probs.argmax()))
    return out


def random_params(rng):
    kind = rng.choice(["greedy", "temp", "top_k", "top_p", "min_p", "all"])
    t = rng.choice([0.5, 1.0, 1.7])
    return {"greedy": SamplingParams(),
            "temp": SamplingParams(temperature=t),
            "top_k": SamplingParams(temperature=t, top_k=rng.randint(1, 9)),
            "top_p": SamplingParams(temperature=t, top_p=rng.choice([0.3, 0.8, 0.95])),
            "min_p": SamplingParams(temperature=t, min_p=0.05),
            "all": SamplingParams(temperature=t, top_k=7, top_p=0.9, min_p=0.02)}[kind]


def test_vectorised_draw_equals_a_per_row_draw_from_each_generator():
    rng = random.Random(0)
    for trial in range(25):
        n, V = rng.randint(1, 12), rng.choice([5, 50, 300])
        logits = torch.randn(n, V, generator=torch.Generator().manual_seed(trial)) * 3
        params = [random_params(rng) for _ in range(n)]
        seeds = [rng.choice([None, 1, 2, 3]) for _ in range(n)]          # some rows share a stream
        a = {s: make_generator(s) for s in set(seeds) if s is not None}
        b = {s: make_generator(s) for s in set(seeds) if s is not None}
        got = Sampler(seed=9).sample_tensor(logits, params, [a.get(s) for s in seeds])
        want = per_row(logits, params, [b.get(s) for s in seeds], Sampler(seed=9).shared)
        assert got.tolist() == want and got.dtype == torch.long


def test_sampled_rows_are_drawn_without_reading_values_back_to_the_host():
    """On the meta device no value can come back to the host (no .item, .tolist, .cpu): the
    draw of a batch of sampled rows, and the engine's plain draw, complete there."""
    logits = torch.empty(6, 40, device="meta")
    params = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9),
              SamplingParams(temperature=1.2, min_p=0.1), SamplingParams(temperature=0.7, seed=3), SamplingParams()]
    gens = [None, None, None, None, make_generator(3), None]
    out = Sampler(seed=1).sample_tensor(logits, params, gens)
    assert out.device.type == "meta" and out.shape == (6,) and out.dtype == torch.long

    class Seq:
        def __init__(self, p, g):
            self.params, self.state = p, DecodeState(generator=g)

    out = draw(Sampler(seed=1), logits, [Seq(p, g) for p, g in zip(params, gens)])
    assert out.device.type == "meta" and out.shape == (6,)


def test_a_seeded_request_gets_the_same_tokens_alone_and_among_other_sampled_requests(soft_gguf):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=20, top_p=0.9, seed=42, ignore_eos=True)

    def tokens(neighbours):
        eng = tiny_engine(soft_gguf, max_batch_size=8, batch_timeout_s=0.0)
        for i in range(neighbours):
            eng.add_request(f"n{i}", prompt=f"other {i} " * (i + 1), params=SamplingParams(
                max_tokens=10 + i, temperature=0.9, top_p=0.8, seed=None if i % 2 else i, ignore_eos=True))
        eng.add_request("me", prompt="Tell me about the sea.", params=params)
        out = []
        while eng.has_unfinished():
            out += [t for o in eng.step() if o.request_id == "me" for t in o.new_token_ids]
        return out

    alone = tokens(0)
    assert len(alone) == 16 and tokens(0) == alone and tokens(5) == alone and tokens(3) == alone
