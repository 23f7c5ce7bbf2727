"""Prompt outputs in the engine (engine/prompt_outputs.py): a request that asks for its prompt's
logprobs (echo, scoring) or its mean hidden state is prefilled in chunks like any prompt,
interleaved with other requests' decodes, each chunk's rows returned and reduced on their own
(never [T, vocab] for the whole prompt), and one with max_tokens = 0 finishes right after its
prefill without sampling. Checked on the tiny model against a whole-prompt forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline_dsl.engine import Engine, EngineConfig, InputError, SamplingParams
from pipeline_dsl.engine.executor import run_requests

PROMPT = [(7 * i + 3) % 200 + 3 for i in range(70)]


def engine(path, **cfg):
    base = dict(model=str(path), dtype="fp32", kv_budget_bytes=1 << 20, block_size=8, prefill_chunk=16,
                max_tokens_per_step=32, max_batch_size=8, batch_timeout_s=0.0)
    return Engine(EngineConfig(**{**base, **cfg}))


def reference(model, ids):
    """A whole-prompt forward: log_softmax [T, V] and the final normed hidden states [T, H]."""
    c = model.config
    tokens = torch.tensor(ids)
    cos, sin = model.rope_tables(torch.arange(len(ids)))
    x = F.embedding(tokens, model.embed)
    with torch.inference_mode():
        for layer in model.layers:
            q, k, v = model.qkv(layer, x, cos, sin)
            q = q.transpose(0, 1)
            k = k.transpose(0, 1).repeat_interleave(c.group, dim=0)
            v = v.transpose(0, 1).repeat_interleave(c.group, dim=0)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + layer.o(a.transpose(0, 1).reshape(len(ids), -1))
            x = x + model.mlp(layer, x)
        return torch.log_softmax(model.logits(x), dim=-1), model.rms(x, model.norm).float()


def finish(eng, steps=10_000):
    outs = []
    for _ in range(steps):
        if not eng.has_unfinished():
            return outs
        outs.extend(eng.step())
    raise AssertionError("the engine did not finish")


def test_prompt_logprobs_in_chunks_equal_a_whole_prompt_forward(tiny_gguf):
    eng = engine(tiny_gguf)
    calls = []
    run = eng.runner.run

    def spy(step, *args, **kw):
        out = run(step, *args, **kw)
        calls.extend(t.shape[0] for got in (step.rows or {}).values() for t in got.values())
        return out

    eng.runner.run = spy
    eng.add_request("s", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=0, prompt_logprobs=3))
    (out,) = finish(eng)
    assert out.finished and out.finish_reason == "length" and out.new_token_ids == [] and out.completion_tokens == 0
    assert calls and max(calls) <= 16 and sum(calls) == len(PROMPT)     # every row once, a chunk at a time
    logp, _ = reference(eng.runner.model, PROMPT)
    lp = out.prompt_logprobs
    assert len(lp) == len(PROMPT) and lp[0] is None
    for p in range(1, len(PROMPT)):
        assert lp[p]["token_id"] == PROMPT[p]
        assert lp[p]["logprob"] == pytest.approx(logp[p - 1, PROMPT[p]].item(), abs=1e-4)
        best = logp[p - 1].topk(3)
        assert [t for t, _ in lp[p]["top"]] == best.indices.tolist()
        assert [v for _, v in lp[p]["top"]] == pytest.approx(best.values.tolist(), abs=1e-4)
        row, own = logp[p - 1], logp[p - 1, PROMPT[p]]      # its rank: 1 + the tokens likelier than it
        assert int((row > own + 1e-4).sum()) < lp[p]["rank"] <= int((row > own - 1e-4).sum()) + 1
    assert len({e["rank"] for e in lp[1:]}) > 10               # a rank of its own, not the top-k place
    assert eng.stats()["requests_done"] == 1 and eng.blocks.num_used == 0


def test_mean_pooling_is_the_mean_of_the_final_normed_hidden_states(tiny_gguf):
    eng = engine(tiny_gguf)
    eng.add_request("e", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=0, pooling="mean"))
    (out,) = finish(eng)
    _, hidden = reference(eng.runner.model, PROMPT)
    assert out.prompt_logprobs is None
    assert torch.allclose(torch.tensor(out.pooled), hidden.mean(0), atol=1e-4)


@pytest.mark.parametrize("n", [1, 17])
def test_a_one_token_chunk_still_returns_its_prompt_rows(tiny_gguf, n):
    """A prompt of one token, or one whose last chunk is one token (17 = 16 + 1), makes a step
    of one-row items that looks like a decode: its rows (logprobs, the pooled state) still come
    back, and equal a whole-prompt forward's."""
    eng = engine(tiny_gguf)
    ids = PROMPT[:n]
    eng.add_request("s", prompt_token_ids=ids, params=SamplingParams(max_tokens=0, prompt_logprobs=1, pooling="mean"))
    (out,) = finish(eng)
    logp, hidden = reference(eng.runner.model, ids)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == n
    assert [e["logprob"] for e in out.prompt_logprobs[1:]] == pytest.approx(
        [logp[p - 1, ids[p]].item() for p in range(1, n)], abs=1e-4)
    assert out.pooled is not None and torch.allclose(torch.tensor(out.pooled), hidden.mean(0), atol=1e-4)


def test_prompt_rows_interleave_with_other_requests_decodes(tiny_gguf):
    """The scorer's 70-token prompt takes 5 chunks of 16; the running stream gets a token in
    every one of those steps instead of waiting for the whole prompt."""
    eng = engine(tiny_gguf)
    eng.add_request("victim", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(3):
        eng.step()
    eng.add_request("s", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=0, prompt_logprobs=0))
    victim_tokens = 0
    while True:
        outs = eng.step()
        victim_tokens += sum(len(o.new_token_ids) for o in outs if o.request_id == "victim")
        if any(o.request_id == "s" and o.finished for o in outs):
            break
    assert victim_tokens >= 5


def test_prompt_logprobs_then_generation_and_through_the_executor(soft_gguf):
    """With max_tokens > 0 the prompt logprobs come with the first token; the executor (which
    schedules ahead) gives the same numbers and the same tokens as the plain step loop; the
    prefix cache is not read for a scoring request, so a cached prompt is still scored whole.
    On soft_gguf (spread distributions): the tiny model repeats its input token whatever it
    reads, so its tokens could not show a token in flight fed from the wrong place."""
    params = SamplingParams(max_tokens=4, prompt_logprobs=2, ignore_eos=True)
    a = engine(soft_gguf)
    a.add_request("warm", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=1))
    finish(a)
    a.add_request("s", prompt_token_ids=PROMPT, params=params)
    outs = finish(a)
    assert outs[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in outs[1:])
    assert outs[0].cached_tokens == 0

    b = engine(soft_gguf)
    got = []
    run_requests(b, [("s", dict(prompt_token_ids=PROMPT, params=params)),
                     ("z", dict(prompt_token_ids=PROMPT[:20], params=SamplingParams(max_tokens=0, prompt_logprobs=1)))],
                 on_output=got.extend)
    first = next(o for o in got if o.request_id == "s")
    assert [e and e["logprob"] for e in first.prompt_logprobs] == pytest.approx(
        [e and e["logprob"] for e in outs[0].prompt_logprobs], abs=1e-5)
    assert [t for o in got if o.request_id == "s" for t in o.new_token_ids] == \
        [t for o in outs for t in o.new_token_ids]
    (z,) = [o for o in got if o.request_id == "z"]
    assert z.finished and z.new_token_ids == [] and len(z.prompt_logprobs) == 20


def test_max_tokens_0_needs_prompt_outputs(tiny_gguf):
    eng = engine(tiny_gguf)
    with pytest.raises(InputError, match="max_tokens"):
        eng.add_request("x", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=0))
    with pytest.raises(InputError, match="prompt_logprobs"):
        eng.add_request("x", prompt_token_ids=PROMPT, params=SamplingParams(prompt_logprobs=21))


def test_a_preempted_scoring_request_starts_its_outputs_over(tiny_gguf):
    """16 blocks of 8 tokens: the stream holds 8, the scorer needs 9, so it is preempted
    mid-prompt and recomputed later; its logprobs are still each prompt token's, once."""
    eng = engine(tiny_gguf, kv_budget_bytes=16 * 4096)
    assert eng.blocks.num_blocks == 16
    eng.add_request("victim", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(60):
        eng.step()
    eng.add_request("s", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=0, prompt_logprobs=1))
    outs = finish(eng)
    (s,) = [o for o in outs if o.request_id == "s"]
    assert s.metrics["preemptions"] >= 1
    logp, _ = reference(eng.runner.model, PROMPT)
    assert [e["logprob"] for e in s.prompt_logprobs[1:]] == pytest.approx(
        [logp[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))], abs=1e-4)


def test_a_scorer_preempted_while_its_last_chunk_runs_keeps_its_prompt_logprobs(tiny_gguf):
    """The executor schedules step k+1 before step k's tokens come back: a scorer whose last prompt
    chunk runs in step k can be preempted in k+1. Its token of step k still counts, and so do the
    rows of that chunk: the prompt logprobs came with no output at all (lost when max_tokens ended
    the answer before a recomputation finished) and the answer had none."""
    eng = engine(tiny_gguf, kv_budget_bytes=16 * 4096)
    ids = [(7 * i + 3) % 200 + 3 for i in range(50)]
    reqs = [(f"g{i}", dict(prompt_token_ids=ids[i:i + n], params=SamplingParams(max_tokens=m, ignore_eos=True)))
            for i, (n, m) in enumerate([(13, 54), (16, 14), (23, 23), (25, 7)])]
    reqs += [(f"s{i}", dict(prompt_token_ids=ids[:n], params=SamplingParams(max_tokens=m, prompt_logprobs=0,
                                                                           ignore_eos=True)))
             for i, (n, m) in enumerate([(28, 2), (44, 2), (45, 1)])]
    got = []
    run_requests(eng, reqs, on_output=got.extend, overlap=True)
    logp, _ = reference(eng.runner.model, ids)
    for rid, kw in reqs[4:]:
        n = len(kw["prompt_token_ids"])
        (lps,) = [o.prompt_logprobs for o in got if o.request_id == rid and o.prompt_logprobs is not None]
        assert [e["logprob"] for e in lps[1:]] == pytest.approx([logp[p - 1, ids[p]].item() for p in range(1, n)],
                                                                abs=1e-4)
    assert eng.stats()["preemptions"] >= 1
    assert eng.stats()["kv_blocks_used"] == 0


def test_a_scorer_aborted_and_replaced_while_its_prompt_computes_is_not_finished_by_that_step(tiny_gguf):
    """An executor that runs the phases itself learns of a step's results after an abort may
    have come, and a new request may have taken the id: finish_prefilled of the old sequence is
    None and leaves the new one (and the counters) alone."""
    eng = engine(tiny_gguf)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    eng.add_request("s", prompt_token_ids=PROMPT[:10], params=params)
    plan = eng.schedule()
    (old,) = [it.seq for it in plan.items]
    tokens = eng.execute(plan)
    eng.abort("s")
    eng.add_request("s", prompt_token_ids=PROMPT[:10], params=params)
    assert eng.update(plan, tokens) == []
    assert eng.finish_prefilled(old, old.num_prompt, eng.clock()) is None
    assert eng.stats(latencies=False)["requests_done"] == 0 and old.finish_reason == "abort"
    (out,) = finish(eng)
    assert out.request_id == "s" and out.finished and len(out.prompt_logprobs) == 10
    assert eng.stats(latencies=False)["requests_done"] == 1 and eng.blocks.num_used == 0


def test_a_prompt_tokens_rank_counts_only_the_tokens_strictly_more_likely():
    # vLLM's rank: 1 + the tokens whose logprob is greater; a token tied with the likeliest is 1
    from pipeline_dsl.engine.prompt_outputs import reduce_chunk

    logits = torch.tensor([[2.0, 1.0, 0.0, 1.0], [1.0, 3.0, 3.0, 0.0]])       # [2 rows, V]
    for targets, ranks in (([0, 1], [1, 1]), ([2, 2], [4, 1]), ([3, 3], [2, 4]), ([1, 0], [2, 3])):
        out = reduce_chunk(0, {"logits": logits}, targets, 0)
        assert out.ranks.tolist() == ranks, targets


def test_a_chunk_that_does_not_continue_the_rows_so_far_is_ignored():
    # a chunk computed before a preemption may come after the recomputation's own chunks: only the
    # chunk that starts where the rows so far end is added (and a first chunk starts them over)
    from pipeline_dsl.engine.prompt_outputs import ChunkRows, PromptOutputs

    out = PromptOutputs(8, None, "mean")
    out.add(ChunkRows(0, 4, hidden=torch.full((4, 2), 1.0)), list(range(8)))
    out.add(ChunkRows(2, 4, hidden=torch.full((4, 2), 25.0)), list(range(8)))      # not at row 4
    assert out.next == 4 and not out.complete
    out.add(ChunkRows(4, 4, hidden=torch.full((4, 2), 3.0)), list(range(8)))
    assert out.complete and out.take() == (None, [2.0, 2.0])
    assert out.take() == (None, None)                                            # handed out once


def test_a_first_chunk_again_starts_incomplete_outputs_over_and_leaves_complete_ones_alone():
    # a preempted request's prompt is recomputed from row 0: what it had of an incomplete prompt
    # is dropped (the hidden states' sum too); a prompt already complete keeps its outputs
    from pipeline_dsl.engine.prompt_outputs import ChunkRows, PromptOutputs

    ids = list(range(8))
    out = PromptOutputs(8, None, "mean")
    out.add(ChunkRows(0, 4, hidden=torch.full((4, 2), 1.0)), ids)
    out.add(ChunkRows(0, 4, hidden=torch.full((4, 2), 1.0)), ids)                # recomputed
    out.add(ChunkRows(4, 4, hidden=torch.full((4, 2), 3.0)), ids)
    assert out.complete
    out.add(ChunkRows(0, 4, hidden=torch.full((4, 2), 25.0)), ids)               # complete: kept
    assert out.complete and out.take() == (None, [2.0, 2.0])
