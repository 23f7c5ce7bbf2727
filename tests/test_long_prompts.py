"""Long prompts as a user with long documents meets them: tokens at long positions equal
transformers' on the same weights whatever path computed their KV (chunked prefill, a prefix-cache
hit of a long shared prefix, preemption and recompute, a prompt at the context's end), the limits
(the context, the KV pool, `truncate_prompt_tokens`) refused or honoured with the numbers named,
and the KV blocks back to free after every request.

The tiny model with a 4096-token context stands in for the embedded one (a long context is cheap
there); tests/test_model_parity.py holds the embedded model to transformers."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from clikit import agp_in
from pipeline_dsl.engine import SamplingParams
from pipeline_dsl.engine.errors import ContextLengthError, InputError
from test_serve import LiveServer
from tiny_model import tiny_engine, tiny_vocab, write_tiny_gguf

CONTEXT = 4096
KV_TOKEN_BYTES = 2 * 2 * 16 * 2 * 4   # the tiny model: layers x kv heads x head size x (k, v) x fp32


@pytest.fixture(scope="module")
def spread_long(tmp_path_factory):
    """The tiny model, 4096 tokens of context, next-token distributions spread enough that a
    wrong key or position changes the greedy tokens."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "spread_long.gguf", context=CONTEXT,
                           embed_scale=0.3)


@pytest.fixture(scope="module")
def reference(spread_long):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(spread_long.parent), gguf_file=spread_long.name, dtype=torch.float32, local_files_only=True).eval()


def random_ids(n: int, seed: int) -> list[int]:
    vocab = len(tiny_vocab()[0])
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, n)]


def generate(engine, requests: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
    """Greedy tokens of every request (ids, max_tokens), all queued at once."""
    for rid, (ids, max_tokens) in requests.items():
        engine.add_request(rid, prompt_token_ids=ids, params=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    assert engine.blocks.num_used == 0                           # every block back once all finished
    return out


def transformers_agrees(reference, ids: list[int], got: list[int]) -> bool:
    """transformers' greedy choice at every step of `got`, in one forward over prompt + answer."""
    with torch.no_grad():
        logits = reference(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1]
    return logits.argmax(-1).tolist() == got


@pytest.mark.parametrize("length", [2000, 4000])
@pytest.mark.parametrize("chunk", [256, 48])
def test_greedy_tokens_at_long_positions_equal_transformers(spread_long, reference, one_torch_thread, length, chunk):
    ids = random_ids(length, seed=length)
    got = generate(tiny_engine(spread_long, kv_budget_bytes=64 << 20, prefill_chunk=chunk), {"a": (ids, 8)})["a"]
    assert len(got) == 8 and transformers_agrees(reference, ids, got)


def test_a_long_shared_prefix_hit_preemption_and_the_context_end_give_one_prefills_tokens(
        spread_long, reference, one_torch_thread):
    """The KV of a 3000-token prefix served from the cache, sequences preempted and recomputed in a
    small pool, and a prompt whose max_tokens fill the context to its last token: each answer is
    transformers' greedy answer, as one plain prefill gives it."""
    engine = tiny_engine(spread_long, kv_budget_bytes=64 << 20)
    prefix = random_ids(3000, seed=1)
    first, second = prefix + [5, 6, 7], prefix + [8, 9]
    a = generate(engine, {"a": (first, 8)})["a"]
    b = generate(engine, {"b": (second, 8)})["b"]
    assert engine.stats()["kv_hit_tokens"] == 2992                       # the prefix's full blocks
    assert transformers_agrees(reference, first, a) and transformers_agrees(reference, second, b)

    end = random_ids(CONTEXT - 24, seed=2)
    got = generate(engine, {"end": (end, 24)})["end"]
    assert len(got) == 24 and transformers_agrees(reference, end, got)   # positions up to 4095

    small = tiny_engine(spread_long, kv_budget_bytes=2600 * KV_TOKEN_BYTES)     # 3 x 1200 tokens do not fit
    prompts = {f"p{i}": (random_ids(1000, seed=10 + i), 200) for i in range(3)}
    got = generate(small, prompts)
    assert small.scheduler.num_preemptions >= 1
    assert all(transformers_agrees(reference, prompts[r][0], got[r]) for r in prompts)


def test_long_prompts_scored_in_a_small_pool_are_preempted_once_not_over_and_over(
        spread_long, reference, one_torch_thread):
    """Three 1000-token documents with prompt logprobs (every prompt row computed, nothing read
    from the cache) and 200 tokens each, in a pool of 2600 tokens: the one preempted comes back
    once all it holds fits again. Back on one chunk's room it was preempted 70 times, computing
    its document again each time."""
    engine = tiny_engine(spread_long, kv_budget_bytes=2600 * KV_TOKEN_BYTES)
    prompts = {f"p{i}": random_ids(1000, seed=20 + i) for i in range(3)}
    for rid, ids in prompts.items():
        engine.add_request(rid, prompt_token_ids=ids,
                           params=SamplingParams(max_tokens=200, ignore_eos=True, prompt_logprobs=0))
    rows = {}
    while engine.has_unfinished():
        for o in engine.step():
            rows[o.request_id] = o.prompt_logprobs or rows.get(o.request_id)
    stats = engine.stats()
    assert 1 <= stats["preemptions"] <= 2 and stats["prefill_tokens"] < 2 * 3000 + 400
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([prompts["p2"]])).logits[0].double(), -1)[:-1]
    want = logp.gather(1, torch.tensor(prompts["p2"][1:])[:, None]).squeeze(1)
    got = torch.tensor([r["logprob"] for r in rows["p2"][1:]], dtype=torch.float64)
    assert (got - want).abs().max().item() < 1e-4                  # the recomputed rows are the model's


def test_a_kv_pool_smaller_than_the_context_is_the_context(spread_long):
    """A pool of 512 tokens under a 4096-token model: the engine's context is 512 (a sequence
    cannot hold more), refused in those numbers; a max_model_len beyond the pool is refused at
    load, as vLLM refuses it."""
    engine = tiny_engine(spread_long, kv_budget_bytes=512 * KV_TOKEN_BYTES)
    assert engine.max_model_len == 512 and engine.pool_bound
    with pytest.raises(ContextLengthError, match=r"prompt of 500 tokens \+ max_tokens 13 = 513 exceeds the context "
                                                 r"of 512 tokens, all the KV cache holds \(.* the model's 4096\)"):
        engine.add_request("a", prompt_token_ids=[5] * 500, params=SamplingParams(max_tokens=13))
    engine.add_request("b", prompt_token_ids=[5] * 500, params=SamplingParams(max_tokens=12, ignore_eos=True))
    with pytest.raises(InputError, match=r"^max_model_len = 1024 does not fit the KV cache \(512 tokens\)"):
        tiny_engine(spread_long, kv_budget_bytes=512 * KV_TOKEN_BYTES, max_model_len=1024)
    assert tiny_engine(spread_long, kv_budget_bytes=512 * KV_TOKEN_BYTES, max_model_len=300).max_model_len == 300


SMALL_POOL = """pipeline tiny {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests      {{}}
    stage batch   : dynamic_batch {{ max_batch_size = 4  timeout = 5ms }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 16  budget = 256KiB }}
    stage gen     : generate      {{ max_new_tokens = 64 }}
    stage out     : respond       {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


def test_the_server_serves_the_pools_context_and_cuts_a_left_out_max_tokens_to_it(spread_long):
    """256 KiB of KV holds 512 tokens: /v1/models says 512, a 500-token prompt without max_tokens
    gets the 12 tokens left (as the context's room cuts it), one with max_tokens 13 is a 400
    naming the numbers, and a request beside them is answered."""
    server = LiveServer(spread_long, text=SMALL_POOL.format(model=spread_long))
    try:
        models = server.http.get(server.url + "/v1/models", timeout=30).json()
        assert models["data"][0]["max_model_len"] == 512
        url = server.url + "/v1/completions"
        r = httpx.post(url, json={"model": "tiny", "prompt": [5] * 500, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 12 and r.json()["choices"][0]["finish_reason"] == "length"
        r = httpx.post(url, json={"model": "tiny", "prompt": [5] * 500, "max_tokens": 13}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "500 tokens + max_tokens 13 = 513" in r.json()["error"]["message"]
        r = httpx.post(url, json={"model": "tiny", "prompt": "the cat", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert server.stats()["kv_blocks_used"] == 0
    finally:
        server.close()


def test_the_servers_refusals_name_the_pools_context_not_as_the_models(spread_long):
    """256 KiB of KV holds 512 tokens of a 4096-token model: a request beyond 512 tokens is a 400
    that names the context of 512, never "the model's context of 512" (the model's is 4096)."""
    server = LiveServer(spread_long, text=SMALL_POOL.format(model=spread_long))
    try:
        said = []
        for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 600}),
                           ("/v1/completions", {"prompt": [5] * 600, "max_tokens": 1}),
                           ("/v1/completions", {"prompt": "hi", "truncate_prompt_tokens": 600}),
                           ("/v1/embeddings", {"input": [[5] * 600]}),
                           ("/detokenize", {"tokens": [5] * 600})):
            r = server.http.post(server.url + path, json={"model": "tiny", **body}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            said.append(r.json()["error"]["message"])
        assert all("512" in m and "model's" not in m for m in said), said
        assert "beyond the context of 512 tokens" in said[0]
    finally:
        server.close()


RUN = SMALL_POOL.replace("256KiB", "4MiB").replace("max_new_tokens = 64", "max_new_tokens = 4")


def test_truncate_prompt_tokens_takes_minus_one_in_run_lines_as_serve_does(tmp_path, spread_long):
    """-1 keeps the context's worth of the prompt's last tokens (vLLM's), in a request line as in
    a request to `agp serve`; k beyond the context is refused naming it, as serve refuses it."""
    pipeline = tmp_path / "p.agp"
    pipeline.write_text(RUN.format(model=spread_long))
    lines = [{"id": "minus", "prompt_token_ids": random_ids(3000, seed=3), "max_tokens": 2,
              "truncate_prompt_tokens": -1},
             {"id": "full", "prompt_token_ids": random_ids(5000, seed=3), "max_tokens": 2,
              "truncate_prompt_tokens": -1},
             {"id": "some", "prompt_token_ids": list(range(3, 200)) * 30, "max_tokens": 2,
              "truncate_prompt_tokens": 1000},
             {"id": "beyond", "prompt": "the cat", "max_tokens": 2, "truncate_prompt_tokens": CONTEXT + 1}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = agp_in("run", pipeline, "--no-progress", "--threads", "1", "-i", tmp_path / "in.jsonl")
    got = {x["id"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert got["minus"].get("usage", {}).get("prompt_tokens") == 3000, got["minus"]       # all of it
    assert f"prompt of {CONTEXT} tokens fills the model's context" in got["full"]["error"]["message"]  # its last 4096
    assert got["some"]["usage"]["prompt_tokens"] == 1000, got["some"]
    assert f"'truncate_prompt_tokens' = {CONTEXT + 1} is beyond the model's context of {CONTEXT}" \
        in got["beyond"]["error"]["message"]


def test_a_growing_chat_reads_each_earlier_turn_from_the_cache(spread_long):
    """A chat over a pasted ~1,200-token document: every turn's prompt is the last turn's plus its
    answer and a question, so all the last turn's full prompt blocks come from the cache
    (usage.prompt_tokens_details.cached_tokens, and the engine computed only the rest), and no
    KV block stays held between turns."""
    server = LiveServer(spread_long, text=RUN.format(model=spread_long).replace("4MiB", "8MiB"))
    try:
        doc = " ".join(f"Paragraph {i}: the cat and the world is hello." for i in range(45))
        messages = [{"role": "system", "content": "Answer from this document.\n" + doc}]
        last = 0
        for question in ("What is paragraph 3 about?", "And paragraph 7?", "Summarise it."):
            messages.append({"role": "user", "content": question})
            before = server.stats()["prefill_tokens"]
            r = server.http.post(server.url + "/v1/chat/completions", timeout=60,
                           json={"model": "tiny", "messages": messages, "max_tokens": 4})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["prompt_tokens"] > 1100
            assert usage["prompt_tokens_details"]["cached_tokens"] >= (last - 1) // 16 * 16
            st = server.stats()
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            assert st["prefill_tokens"] - before == usage["prompt_tokens"] - cached     # the rest alone computed
            assert st["kv_blocks_used"] == 0
            messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
            last = usage["prompt_tokens"]
    finally:
        server.close()
