"""lm-eval-harness's `local-completions` model against `agp serve`, offline: a small
multiple-choice task (tests/data/lm_eval: a task YAML and eight JSONL items) scored by
loglikelihood, as a user switching from vLLM runs it.

lm-eval runs in a subprocess (tests/data/lm_eval/run_lm_eval.py) that refuses every
connection and name lookup beyond the loopback: the dataset is read from the JSONL, the
tokenizer is the server's (`tokenizer_backend=remote`: /tokenizer_info, /tokenize,
/detokenize), the prompts go as token ids, four to a request (`batch_size=4`), two
requests at a time.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from test_serve import LiveServer

pytest.importorskip("lm_eval")

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "data" / "lm_eval" / "run_lm_eval.py"
ITEMS = [json.loads(line) for line in (HERE / "data" / "lm_eval" / "items.jsonl").read_text().splitlines()]
PAIRS = sum(len(item["choices"]) for item in ITEMS)          # loglikelihood requests lm-eval makes
BATCH = 4


@pytest.fixture(scope="module")
def run(tiny_gguf, tmp_path_factory):
    """lm-eval once on the task: (its output, the server, the completions requests it answered)."""
    s = LiveServer(tiny_gguf, max_batch_size=16)
    tmp = tmp_path_factory.mktemp("lm_eval")
    env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_DATASETS_CACHE": str(tmp / "datasets"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        out = tmp / "out.json"
        proc = subprocess.run([sys.executable, str(RUNNER), s.url, str(out), str(BATCH), "2"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        yield json.loads(out.read_text()), s, s.metric("agp_requests_total", '{status="200"}')
    finally:
        s.close()


def test_lm_eval_scores_the_task_offline(run):
    result, _, answered = run
    assert result["refused"] == []                             # it never tried the network
    acc = result["metrics"]["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert result["metrics"]["sample_len"] == len(ITEMS) == len(result["items"])
    for item in result["items"]:
        doc = ITEMS[item["doc_id"]]
        assert [pair[1] for pair in item["pairs"]] == [" " + c for c in doc["choices"]]
        lls = item["loglikelihoods"]
        assert len(lls) == len(doc["choices"]) and all(math.isfinite(x) and x < 0 for x in lls)
        assert item["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"])
    assert acc == pytest.approx(sum(item["acc"] for item in result["items"]) / len(ITEMS))
    # BATCH prompts to a request (an array of token-id prompts): one answer per batch
    assert answered == math.ceil(PAIRS / BATCH)


def test_lm_eval_loglikelihoods_are_the_servers_scores(run):
    """Each (context, continuation) lm-eval scored equals the sum of the continuation tokens'
    logprobs the server answers to `echo` + `max_tokens: 0` (lm-eval asks for one token more and
    drops the last logprob as the generated token's: without the engine's logprob of that
    token, it would drop the continuation's last one instead)."""
    result, s, _ = run
    pairs, contexts = [], {}                 # (context, continuation, lm-eval's ll and is_greedy, ids)
    for item in result["items"]:
        for (context, continuation), ll, greedy in zip(item["pairs"], item["loglikelihoods"], item["is_greedy"]):
            if context not in contexts:      # an item's choices share its context: tokenized once
                contexts[context] = _tokens(s, context)
            whole = _tokens(s, context + continuation)
            assert whole[:len(contexts[context])] == contexts[context]
            pairs.append((context, continuation, ll, greedy, whole))
    # every pair's tokens scored in one request (an array of token-id prompts, as lm-eval sends
    # them): each choice's logprobs are its own prompt's
    r = httpx.post(s.url + "/v1/completions", json={"prompt": [whole for *_, whole in pairs], "max_tokens": 0,
                                                    "echo": True, "logprobs": 1}, timeout=60).json()
    choices = sorted(r["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == list(range(len(pairs))) == list(range(PAIRS))
    for (context, continuation, ll, greedy, whole), choice in zip(pairs, choices):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(whole), (context, continuation)
        n = len(contexts[context])
        scored = lp["token_logprobs"][n:]
        assert ll == pytest.approx(sum(scored), abs=1e-4), (context, continuation)
        tops = lp["top_logprobs"][n:]
        assert greedy == all(v == max(top.values()) for v, top in zip(scored, tops))


def _tokens(s, text: str) -> list[int]:
    r = httpx.post(s.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30)
    return r.json()["tokens"]


def test_tokenizer_info_is_what_lm_eval_reads(run):
    _, s, _ = run
    info = httpx.get(s.url + "/tokenizer_info", timeout=30).json()
    tok = s.engine.tokenizer
    assert info["eos_token"] == tok.eos_token == "<|im_end|>" and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == s.engine.max_model_len
    assert _tokens(s, info["eos_token"]) == [tok.eos_token_id]       # lm-eval's eos id: its text's one token
