"""A seeded soak of `agp serve`: many concurrent requests that mix every sampling feature, then
the invariants that must hold after them.

The requests (one `random.Random(SEED)`): completions and chat, n = 1..3, logprobs and
top_logprobs, echo, stop strings, stop_token_ids, min_tokens, max_tokens from 1, penalties, greedy
and seeded sampling, structured output (json_schema), streamed and not, return_token_ids, prompts
sharing prefixes, prompts of token ids close to the context, and clients that go away mid-stream or
before a non-streamed answer. The KV pool holds one context (512 tokens in 64 blocks), so
sequences are preempted. The server runs with AGP_BATCH_INVARIANT=1: a greedy or seeded answer
must then be the one the same request gets alone (docs/openai.md, `seed`).

Checked after: every answer's choices, finish reasons, token counts, usage and logprobs agree
with one another and with the request; each deterministic answer equals the same request sent
alone; nothing is left running or holding KV blocks and the block manager's bookkeeping is
consistent; no thread is left per request; /metrics counts the requests, their statuses, finish
reasons and tokens as they were answered.
"""
from __future__ import annotations

import asyncio
import json
import random
import threading

import httpx
import pytest

from test_serve import TINY, LiveServer
from tiny_model import write_tiny_gguf

SEED = 3
REQUESTS = 60
CONCURRENCY = 16
CONTEXT = 512

# the live server's pipeline (test_serve.TINY) on a KV pool of 64 blocks (CONTEXT tokens): preemption
PIPELINE = TINY.replace("budget = 1MiB", "budget = 256KiB")

WORDS = "the cat sat on the mat and hello world is of us at it in an".split()
PREFIXES = ("You are a careful assistant. Answer briefly. ", "the cat and the world and the sea " * 3, "")
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 5}},
          "required": ["a", "b"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_tiny_gguf(tmp_path_factory.mktemp("models") / "soft.gguf", embed_scale=0.2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AGP_BATCH_INVARIANT", "1")
        s = LiveServer(model, text=PIPELINE.format(model=model, max_queue=1024, max_batch_size=8, timeout=5))
    yield s
    s.close()


# ---------------------------------------------------------------- the requests

def make_request(rng: random.Random) -> dict:
    """One request: its route, body and how its client behaves (`cancel`: give up after that many
    stream chunks, or after that many seconds for a non-streamed answer)."""
    chat = rng.random() < 0.5
    body = {"model": "tiny", "max_tokens": rng.choice([1, 2, 5, 9, 16, 24])}
    text = rng.choice(PREFIXES) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
    body["temperature"] = 0.0 if rng.random() < 0.5 else rng.choice([0.7, 1.0, 1.3])
    if body["temperature"] and rng.random() < 0.8:
        body["seed"] = rng.randint(0, 2 ** 31)
    if rng.random() < 0.3:
        body["n"] = rng.randint(2, 3)
    if rng.random() < 0.3:
        body["stop"] = rng.sample(["e", " the", "\n", "at", "o"], rng.randint(1, 2))
    if rng.random() < 0.2:
        body["stop_token_ids"] = rng.sample(range(3, 259), 3)
    if rng.random() < 0.4:
        body["min_tokens"] = rng.randint(0, body["max_tokens"])
    if rng.random() < 0.3:
        body["presence_penalty"] = rng.choice([-1.0, 0.5, 1.5])
        body["frequency_penalty"] = rng.choice([0.0, 0.8])
    if rng.random() < 0.15:
        body["repetition_penalty"] = 1.3
    if rng.random() < 0.2:
        body["ignore_eos"] = True
    if rng.random() < 0.7:
        body["return_token_ids"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.4:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 3)
        if rng.random() < 0.15:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
            body["max_tokens"] = 40
            body.pop("min_tokens", None)
    else:
        if rng.random() < 0.1:                     # close to the context: token ids
            size = rng.randint(470, 500)
            body["prompt"] = [rng.randint(3, 250) for _ in range(size)]
            body["max_tokens"] = rng.randint(1, CONTEXT - size)
            body.pop("min_tokens", None)
        else:
            body["prompt"] = text
        if rng.random() < 0.4:
            body["logprobs"] = rng.randint(0, 3)
        if rng.random() < 0.3:
            body["echo"] = True
    stream = rng.random() < 0.5
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    cancel = None
    if rng.random() < 0.2:                         # a client that goes away: of one answer (counted below)
        body.pop("n", None)
        cancel = rng.randint(1, 4) if stream else rng.uniform(0.005, 0.05)
    return {"path": "/v1/chat/completions" if chat else "/v1/completions", "body": body, "cancel": cancel}


async def send(client: httpx.AsyncClient, url: str, req: dict) -> dict:
    """{"status", and "json" or "chunks" (stream events, "DONE" last), "cancelled" if the client left}."""
    body, cancel = req["body"], req["cancel"]
    if not body.get("stream"):
        post = client.post(url + req["path"], json=body)
        if cancel is None:
            r = await post
            return {"status": r.status_code, "json": r.json()}
        try:
            r = await asyncio.wait_for(post, cancel)
        except asyncio.TimeoutError:
            return {"cancelled": True}
        return {"status": r.status_code, "json": r.json(), "cancelled": True}
    chunks = []
    async with client.stream("POST", url + req["path"], json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "json": json.loads(r.text)}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                chunks.append("DONE")
                break
            chunks.append(json.loads(line[6:]))
            if cancel is not None and len(chunks) >= cancel:
                return {"status": 200, "chunks": chunks, "cancelled": True}
    return {"status": 200, "chunks": chunks}


def answer_of(path: str, res: dict) -> tuple[dict, dict | None, list | None]:
    """({choice index: {text, finish_reason, logprobs (the tokens' logprobs), token_ids}}, usage,
    the prompt's token ids), the same whether it was streamed or not."""
    chat = "chat" in path
    choices: dict = {}

    def token_logprobs(lp):
        return [t["logprob"] for t in lp["content"]] if chat else lp["token_logprobs"]

    if "json" in res:
        j = res["json"]
        for c in j["choices"]:
            choices[c["index"]] = {"text": c["message"]["content"] if chat else c["text"],
                                   "finish_reason": c["finish_reason"],
                                   "logprobs": token_logprobs(c["logprobs"]) if c.get("logprobs") else None,
                                   "token_ids": c.get("token_ids")}
        prompt_ids = j.get("prompt_token_ids") if chat else (j["choices"][0].get("prompt_token_ids")
                                                              if j["choices"] else None)
        return choices, j.get("usage"), prompt_ids
    usage = prompt_ids = None
    finals = 0
    for c in res["chunks"]:
        if c == "DONE":
            continue
        usage = c.get("usage") or usage
        prompt_ids = c.get("prompt_token_ids") or prompt_ids
        for x in c.get("choices") or []:
            e = choices.setdefault(x["index"], {"text": "", "finish_reason": None, "logprobs": None,
                                                "token_ids": None})
            e["text"] += (x["delta"].get("content") or "") if chat else x["text"]
            prompt_ids = x.get("prompt_token_ids") or prompt_ids
            if x.get("finish_reason"):
                assert e["finish_reason"] is None, f"choice {x['index']} finished twice"
                e["finish_reason"] = x["finish_reason"]
                finals += 1
            if x.get("logprobs"):
                e["logprobs"] = (e["logprobs"] or []) + token_logprobs(x["logprobs"])
            if x.get("token_ids") is not None:
                e["token_ids"] = (e["token_ids"] or []) + x["token_ids"]
    assert res["chunks"][-1] == "DONE", "the stream did not end with [DONE]"
    return choices, usage, prompt_ids


def answer_problems(req: dict, choices: dict, usage: dict, prompt_ids, eos: frozenset) -> list[str]:
    """What in one finished answer disagrees with itself or with its request."""
    body, out = req["body"], []
    n, max_tokens, min_tokens = body.get("n", 1), body["max_tokens"], body.get("min_tokens", 0)
    stops, stop_ids = body.get("stop") or [], set(body.get("stop_token_ids") or [])
    if sorted(choices) != list(range(n)):
        out.append(f"choices {sorted(choices)} for n = {n}")
    if usage is None:
        return out + ["no usage"]
    if prompt_ids is not None and usage["prompt_tokens"] != len(prompt_ids):
        out.append(f"usage.prompt_tokens {usage['prompt_tokens']} for a prompt of {len(prompt_ids)} tokens")
    counts = []
    for i, c in choices.items():
        reason, ids, lps = c["finish_reason"], c["token_ids"], c["logprobs"]
        if reason not in ("stop", "length"):
            out.append(f"choice {i}: finish_reason {reason!r}")
        if ids is not None:
            counts.append(len(ids))
            room = CONTEXT - len(prompt_ids) if prompt_ids is not None else max_tokens
            if not min(min_tokens, room) <= len(ids) <= max_tokens:
                out.append(f"choice {i}: {len(ids)} tokens for min_tokens {min_tokens}, max_tokens {max_tokens}")
            if reason == "length" and len(ids) not in (max_tokens, room):
                out.append(f"choice {i}: 'length' after {len(ids)} of max_tokens {max_tokens}")
            if reason == "stop" and not stops and not ("response_format" in body) and ids and \
                    ids[-1] not in stop_ids | (set() if body.get("ignore_eos") else eos):
                out.append(f"choice {i}: 'stop' on token {ids[-1]}, no stop token")
            if reason == "stop" and ids and ids[-1] in stop_ids and len(ids) <= min_tokens:
                out.append(f"choice {i}: stop token {ids[-1]} within min_tokens {min_tokens}")
            if lps is not None and not body.get("echo") and len(lps) != len(ids):
                out.append(f"choice {i}: {len(lps)} logprobs for {len(ids)} tokens")
        answer_text = c["text"]
        if body.get("echo") and isinstance(body.get("prompt"), str):
            if not answer_text.startswith(body["prompt"]):
                out.append(f"choice {i}: the echo does not begin with the prompt")
            answer_text = answer_text[len(body["prompt"]):]
        echoed_ids = body.get("echo") and not isinstance(body.get("prompt"), str)     # the prompt's text unknown
        if not min_tokens and not echoed_ids and any(s in answer_text for s in stops):
            out.append(f"choice {i}: a stop string left in {answer_text!r}")
        if "response_format" in body and reason == "stop" and not stops and not stop_ids:
            try:
                got = json.loads(answer_text)
                assert set(got) == {"a", "b"} and isinstance(got["a"], int) and len(got["b"]) <= 5
            except (ValueError, AssertionError, TypeError):
                out.append(f"choice {i}: {answer_text!r} does not follow the schema")
    if len(counts) == len(choices) and sum(counts) != usage["completion_tokens"]:
        out.append(f"usage.completion_tokens {usage['completion_tokens']} for {sum(counts)} tokens returned")
    return out


def deterministic(body: dict) -> bool:
    return body["temperature"] == 0 or "seed" in body


def test_a_seeded_soak_keeps_every_invariant(server):
    rng = random.Random(SEED)
    reqs = [make_request(rng) for _ in range(REQUESTS)]

    async def soak():
        limit = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(req):
                async with limit:
                    return await send(client, server.url, req)
            return await asyncio.gather(*(one(r) for r in reqs))

    results = asyncio.run(soak())
    st = server.stats_when(lambda s: s["in_flight"] == 0 and s["running"] == 0 and s["waiting"] == 0, 30)
    threads_after_soak = threading.active_count()
    eng = server.engine
    eos = frozenset(eng.eos_token_ids)

    problems = []
    answered = []                    # (request, choices, usage) of every answer that came whole
    for k, (req, res) in enumerate(zip(reqs, results)):
        if res.get("cancelled"):
            continue
        if res["status"] != 200:
            problems.append(f"request {k}: HTTP {res['status']} {res.get('json')}")
            continue
        choices, usage, prompt_ids = answer_of(req["path"], res)
        problems += [f"request {k}: {p}" for p in answer_problems(req, choices, usage, prompt_ids, eos)]
        answered.append((k, req, choices, usage))

    # nothing left behind
    assert eng.seqs == {} and not eng.has_unfinished()
    assert st["kv_blocks_used"] == 0 and st["kv_blocks_used"] + st["kv_blocks_cached"] + st["kv_blocks_free"] == \
        st["kv_blocks_total"]
    eng.blocks.check_invariants()
    assert st["preemptions"] > 0                     # the small pool did preempt

    # a greedy or seeded answer is the one the request gets alone
    alone = 0
    for k, req, choices, usage in answered:
        if not deterministic(req["body"]):
            continue
        body = {f: v for f, v in req["body"].items() if f not in ("stream", "stream_options")}
        r = httpx.post(server.url + req["path"], json=body, timeout=60)
        alone += 1
        got, got_usage, _ = answer_of(req["path"], {"status": r.status_code, "json": r.json()})
        if got != choices or got_usage["completion_tokens"] != usage["completion_tokens"]:
            problems.append(f"request {k}: answered {choices} among others, {got} alone ({req['body']})")
    assert threading.active_count() <= threads_after_soak      # no thread kept per request
    assert not problems, "\n".join(problems)
    assert alone > REQUESTS // 3

    # /metrics counts what was answered
    cancelled = [r for r in results if r.get("cancelled")]
    ok, gone = server.metric("agp_requests_total", '{status="200"}'), server.metric("agp_requests_total",
                                                                                    '{status="499"}')
    whole = len(answered) + alone                     # answers read to their end
    assert whole <= ok and ok + gone <= whole + len(cancelled)   # a client may leave after the last byte
    # a client gone before its body had all come is a 499 no engine saw (nothing to abort): as vLLM's
    # finished_reason counts, only a request the engine took can end in "abort"
    assert server.metric("agp_requests_finished_total", '{finished_reason="abort"}') <= gone
    finished = sum(server.metric("agp_requests_finished_total", f'{{finished_reason="{why}"}}')
                   for why in ("stop", "length"))
    n_whole = sum(len(c) for _, _, c, _ in answered) + sum(len(c) for _, r, c, _ in answered
                                                           if deterministic(r["body"]))
    assert finished == n_whole + (ok - whole)          # those that left after their end had n = 1
    completion = sum(u["completion_tokens"] for _, _, _, u in answered)
    assert server.metric("agp_generation_tokens_total") >= completion
    assert server.metric("agp_prompt_tokens_total") >= sum(u["prompt_tokens"] for _, _, _, u in answered)
    assert server.metric("agp_requests_in_flight") == 0
