"""`agp serve` under a mixed load: every request answered or refused rightly, every count right.

    python bench/serve_mix.py tests-tiny                   # a tiny random GGUF written for the run
    python bench/serve_mix.py smollm2-135m-instruct --clients 64 --waves 2
    python bench/serve_mix.py MODEL -- --max-num-seqs 16   # after `--`: more `agp serve` flags
    python bench/serve_mix.py --url http://127.0.0.1:8000  # a running server (no RSS, no SIGTERM)

It starts `agp serve MODEL` (a .gguf, a Hugging Face folder, an embedded model's name, a .agp
file; `tests-tiny` writes tests/tiny_model.py's GGUF) on a free port and sends `--waves` waves of
`--clients` requests at once, drawn at random (`--seed`) from these kinds:

  chat_stream, chat_whole, comp_stream, comp_whole   n = 1..3, stop strings, logprobs and
                                                     top_logprobs, return_token_ids, include_usage
  short        max_tokens 1, streamed: its TTFT is the fairness probe (below)
  long         max_tokens `--long-tokens`, ignore_eos, streamed
  gone         a stream its client closes after a few chunks (status 200 or 499)
  gone_whole   a whole answer its client stops waiting for
  slow         a stream read with a pause between its chunks
  over_ctx     a prompt longer than the context: 400
  batch        completions of 2..3 prompts, streamed or not
  batch_over   a batch one of whose prompts is longer than the context, streamed or not: 400
  bad_json     a body that is no JSON: 400
  embed        /v1/embeddings of 1..3 inputs
  models       GET /v1/models
  scrape       GET /metrics while the wave runs

Checked after each wave, once the server is idle (each a FAIL line; the exit status is 1 if any):
every request got its status (2xx, or the 4xx its kind expects; never a 5xx, a broken stream or
no answer within `--timeout`); each whole answer's usage.completion_tokens equals the token ids it
delivered, every choice of it finished with stop or length, a stream ended with [DONE]; /metrics
grew by what the clients saw: agp_http_requests_total by route and status, agp_requests_total by
status, agp_requests_finished_total by reason (stop + length = the choices delivered whole, abort
= those cut), generation and prompt tokens at least the delivered ones; the gauges back to 0
(in flight, running, waiting, KV blocks used); the server's RSS after the last wave within
`--rss-slack` MiB of its value after the second; and no short request waited for its first token
longer than the slowest long request took to finish (a short request starved behind long ones).

Last, the SIGTERM drain: `--drain` long streams, SIGTERM once each has its first token, then new
requests: each stream in flight must end whole ([DONE], its usage right), each new request a 503
(or a refused connection once the server has exited), /health 503, and the exit status 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on the mat and hello world is of us at it in an old dog ran far".split()
STOPS = ["e", " the", "\n", "at", "o."]
KINDS = {  # kind: weight
    "chat_stream": 14, "chat_whole": 10, "comp_stream": 10, "comp_whole": 8, "short": 8, "long": 6,
    "gone": 6, "gone_whole": 4, "batch": 5, "batch_over": 3, "slow": 4, "over_ctx": 4, "bad_json": 4, "embed": 6,
    "models": 3, "scrape": 3,
}
ROUTE = {"chat_stream": "/v1/chat/completions", "chat_whole": "/v1/chat/completions",
         "comp_stream": "/v1/completions", "comp_whole": "/v1/completions", "short": "/v1/chat/completions",
         "long": "/v1/completions", "gone": "/v1/chat/completions", "gone_whole": "/v1/chat/completions",
         "batch": "/v1/completions", "batch_over": "/v1/completions", "slow": "/v1/completions",
         "over_ctx": "/v1/completions", "bad_json": "/v1/chat/completions", "embed": "/v1/embeddings",
         "models": "/v1/models", "scrape": "/metrics"}
EXPECT = {"over_ctx": 400, "bad_json": 400, "batch_over": 400}


def text(rng: random.Random, lo: int = 2, hi: int = 24) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make(rng: random.Random, kind: str, model: str, ctx: int, long_tokens: int) -> dict:
    """One request: {kind, method, path, body (dict or bytes), stream, cancel (chunks), pause (s)}."""
    req = {"kind": kind, "method": "POST", "path": ROUTE[kind], "stream": False, "cancel": None, "pause": 0.0}
    body: dict = {"model": model}
    chat = ROUTE[kind] == "/v1/chat/completions"
    if chat:
        body["messages"] = [{"role": "user", "content": text(rng)}]
    else:
        body["prompt"] = text(rng)
    if kind in ("chat_stream", "chat_whole", "comp_stream", "comp_whole", "slow", "gone", "gone_whole", "batch"):
        body["max_tokens"] = rng.choice([1, 2, 8, 16, 32, 64])
        body["temperature"] = rng.choice([0.0, 0.8])
        body["seed"] = rng.randint(0, 2 ** 20)
        if rng.random() < 0.4:
            body["n"] = rng.randint(2, 3)
        if rng.random() < 0.3:
            body["stop"] = rng.sample(STOPS, 2)
        if rng.random() < 0.4:
            if chat:
                body["logprobs"] = True
                body["top_logprobs"] = rng.randint(0, 3)
            else:
                body["logprobs"] = rng.randint(0, 3)
        body["return_token_ids"] = True
    if kind == "short":
        body.update(max_tokens=1, temperature=0, return_token_ids=True)
    if kind == "long":
        body.update(max_tokens=long_tokens, temperature=0.8, seed=rng.randint(0, 2 ** 20), ignore_eos=True,
                    return_token_ids=True)
    if kind in ("chat_stream", "comp_stream", "short", "long", "gone", "slow"):
        req["stream"] = body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if kind == "gone":
        req["cancel"] = rng.randint(1, 4)
    if kind == "gone_whole":
        req["cancel_s"] = rng.uniform(0.05, 1.0)
    if kind == "batch":
        body["prompt"] = [text(rng) for _ in range(rng.randint(2, 3))]
        if rng.random() < 0.5:
            req["stream"] = body["stream"] = True
            body["stream_options"] = {"include_usage": True}
    if kind == "slow":
        req["pause"] = 0.05
    if kind == "batch_over":                  # a batch one of whose prompts is over the context: refused whole
        body.update(prompt=[text(rng), [rng.randint(3, 250) for _ in range(ctx + 8)]], max_tokens=4)
        if rng.random() < 0.5:
            req["stream"] = body["stream"] = True
    if kind == "over_ctx":
        body.update(prompt=[rng.randint(3, 250) for _ in range(ctx + 8)], max_tokens=4)
    if kind == "bad_json":
        body = b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "hi"}'
    if kind == "embed":
        body = {"model": model, "input": [text(rng) for _ in range(rng.randint(1, 3))]}
    if kind in ("models", "scrape"):
        req["method"], body = "GET", None
    req["body"] = body
    return req


async def send(client: httpx.AsyncClient, url: str, req: dict, timeout: float) -> dict:
    """{status, ttft, e2e, json | chunks, gone (the client left), error (no answer / broken stream)}."""
    t0 = time.monotonic()
    res: dict = {"status": None, "ttft": None, "gone": False, "error": None}
    try:
        async with asyncio.timeout(timeout):
            if not req["stream"]:
                kw = {"content": req["body"]} if isinstance(req["body"], bytes) else \
                    {"json": req["body"]} if req["body"] is not None else {}
                if isinstance(req["body"], bytes):
                    kw["headers"] = {"content-type": "application/json"}
                if req.get("cancel_s"):       # the prompt's length first: what the server counts if it began
                    tok = await client.post(url + "/tokenize", json={"model": req["body"]["model"],
                                                                      "messages": req["body"]["messages"]})
                    res["prompt_tokens"] = tok.json()["count"]
                    t0 = time.monotonic()
                    try:
                        r = await asyncio.wait_for(client.request(req["method"], url + req["path"], **kw),
                                                   req["cancel_s"])
                    except TimeoutError:
                        res["gone"] = True
                        res["e2e"] = time.monotonic() - t0
                        return res
                else:
                    r = await client.request(req["method"], url + req["path"], **kw)
                res["status"] = r.status_code
                if req["kind"] != "scrape":
                    res["json"] = r.json()
            else:
                chunks: list = []
                async with client.stream("POST", url + req["path"], json=req["body"]) as r:
                    res["status"] = r.status_code
                    if r.status_code != 200:
                        await r.aread()
                        res["json"] = json.loads(r.text)
                    else:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            if line == "data: [DONE]":
                                chunks.append("DONE")
                                break
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                res["error"] = f"error event {chunk['error']}"
                            if res["ttft"] is None and chunk.get("choices"):
                                res["ttft"] = time.monotonic() - t0
                            chunks.append(chunk)
                            if req["cancel"] is not None and len(chunks) >= req["cancel"]:
                                res["gone"] = True
                                break
                            if req["pause"]:
                                await asyncio.sleep(req["pause"])
                        res["chunks"] = chunks
                        if not res["gone"] and chunks[-1:] != ["DONE"] and not res["error"]:
                            res["error"] = "the stream ended without [DONE]"
    except TimeoutError:
        res["error"] = f"no answer in {timeout:.0f} s"
    except httpx.HTTPError as e:
        res["error"] = f"{type(e).__name__}: {e}"
    res["end"] = time.monotonic()
    res["e2e"] = res["end"] - t0
    return res


def answer(req: dict, res: dict) -> tuple[dict, dict | None]:
    """({choice index: {tokens, reason}}, usage) of a whole generation answer, streamed or not."""
    choices: dict = defaultdict(lambda: {"tokens": 0, "reason": None, "logprobs": 0})

    def logprobs(lp) -> int:
        return 0 if not lp else len(lp["content"] or []) if "content" in lp else len(lp["tokens"])

    if "json" in res:
        for c in res["json"]["choices"]:
            choices[c["index"]].update(tokens=len(c.get("token_ids") or []), reason=c["finish_reason"],
                                       logprobs=logprobs(c.get("logprobs")))
        return dict(choices), res["json"].get("usage")
    usage = None
    for c in res["chunks"]:
        if c == "DONE":
            continue
        usage = c.get("usage") or usage
        for x in c.get("choices") or []:
            e = choices[x["index"]]
            e["tokens"] += len(x.get("token_ids") or [])
            e["logprobs"] += logprobs(x.get("logprobs"))
            if x.get("finish_reason"):
                if e["reason"] is not None:
                    raise ValueError(f"choice {x['index']} finished twice")
                e["reason"] = x["finish_reason"]
    return dict(choices), usage


def check_answer(req: dict, res: dict) -> tuple[list[str], int, int, int]:
    """(problems, choices delivered whole, completion tokens, prompt tokens) of a 200 generation answer."""
    try:
        choices, usage = answer(req, res)
    except ValueError as e:
        return [str(e)], 0, 0, 0
    n = req["body"].get("n", 1) * (len(req["body"]["prompt"]) if req["kind"] == "batch" else 1)
    out = []
    if sorted(choices) != list(range(n)):
        out.append(f"choices {sorted(choices)} for n = {n}")
    if usage is None:
        return out + ["no usage"], 0, 0, 0
    tokens = sum(c["tokens"] for c in choices.values())
    if tokens != usage["completion_tokens"]:
        out.append(f"usage.completion_tokens {usage['completion_tokens']} for {tokens} token ids delivered")
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        out.append(f"usage {usage}: total is not prompt + completion")
    for i, c in choices.items():
        if c["reason"] not in ("stop", "length"):
            out.append(f"choice {i}: finish_reason {c['reason']!r}")
        if req["body"].get("logprobs") not in (None, False) and c["logprobs"] != c["tokens"]:
            out.append(f"choice {i}: {c['logprobs']} logprobs for {c['tokens']} tokens")
        if c["tokens"] > req["body"]["max_tokens"]:
            out.append(f"choice {i}: {c['tokens']} tokens for max_tokens {req['body']['max_tokens']}")
        if req["kind"] == "long" and c["tokens"] != req["body"]["max_tokens"] and c["reason"] != "length":
            out.append(f"choice {i}: {c['tokens']} of {req['body']['max_tokens']} tokens with ignore_eos")
    return out, len(choices), usage["completion_tokens"], usage["prompt_tokens"]


# ---------------------------------------------------------------- /metrics

def scrape(http: httpx.Client, url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    page = http.get(url + "/metrics").text
    out: dict = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels` (agp's own series: no `engine`)."""
    return sum(v for (n, ls), v in m.items()
               if n == name and labels.items() <= dict(ls).items() and "engine" not in dict(ls))


def idle(http: httpx.Client, url: str, wait: float) -> tuple[dict, list[str]]:
    """The metrics once nothing is in flight, running, waiting or holding a KV block (or after `wait` s)."""
    gauges = ("agp_requests_in_flight", "agp_num_requests_running", "agp_num_requests_waiting", "agp_kv_blocks_used")
    deadline = time.monotonic() + wait
    while True:
        m = scrape(http, url)
        left = {g: value(m, g) for g in gauges if value(m, g)}
        if not left:
            return m, []
        if time.monotonic() > deadline:
            return m, [f"not idle {wait:.0f} s after the wave: {left}"]
        time.sleep(0.2)


# ---------------------------------------------------------------- a wave

def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def wave(url: str, reqs: list[dict], timeout: float) -> list[dict]:
    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one(i, req):
            await asyncio.sleep(0.002 * i)       # all within a moment, not one burst of SYNs
            return await send(client, url, req, timeout)
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))


def judge(reqs: list[dict], results: list[dict], before: dict, after: dict) -> tuple[list[str], dict]:
    problems: list[str] = []
    rows: dict = defaultdict(lambda: Counter())
    http_seen: Counter = Counter()                 # (route, status) the clients saw
    gen_status: Counter = Counter()
    whole_choices = cut_choices = gone = completion = prompt = gone_prompt = embed_prompt = gone_unknown = 0
    gone_unsure = cut_unsure = 0
    gen_routes = {"/v1/chat/completions", "/v1/completions"}
    for k, (req, res) in enumerate(zip(reqs, results)):
        kind, st = req["kind"], res["status"]
        row = rows[kind]
        row["sent"] += 1
        if res["error"]:
            problems.append(f"request {k} ({kind}): {res['error']}")
            row["errors"] += 1
            continue
        if res["gone"] and st is None:                # left before the answer's headers
            gone += 1
            cut_choices += req["body"].get("n", 1)
            row["gone"] += 1
            gone_unknown += res.get("prompt_tokens", 0)
            gone_unsure += 1
            cut_unsure += req["body"].get("n", 1)
            continue
        if st >= 500 or st != EXPECT.get(kind, 200):
            problems.append(f"request {k} ({kind}): HTTP {st} {str(res.get('json'))[:200]}")
            row["errors"] += 1
            continue
        row[f"http {st}"] += 1
        if res["gone"]:
            gone += 1
            cut_choices += req["body"].get("n", 1)
            row["gone"] += 1
            ids = [c.get("prompt_token_ids") or next((x.get("prompt_token_ids") for x in c.get("choices") or []
                                                       if x.get("prompt_token_ids")), None)
                   for c in res.get("chunks") or [] if c != "DONE"]
            gone_prompt += len(next((i for i in ids if i), []))
            continue
        http_seen[(req["path"], st)] += 1
        if req["path"] in gen_routes | {"/v1/embeddings"}:
            gen_status[st] += 1
        if st == 200 and req["path"] in gen_routes:
            bad, nc, ct, pt = check_answer(req, res)
            problems += [f"request {k} ({kind}): {p}" for p in bad]
            whole_choices += nc
            completion += ct
            prompt += pt
            row["tokens"] += ct
        if st == 200 and req["path"] == "/v1/embeddings":
            embed_prompt += res["json"]["usage"]["prompt_tokens"]
    grew = {}
    for route in sorted({r["path"] for r in reqs if r["path"] != "/metrics"}):
        for st in (200, 400, 499, 500, 503):
            d = value(after, "agp_http_requests_total", handler=route, status=str(st)) - \
                value(before, "agp_http_requests_total", handler=route, status=str(st))
            want = http_seen[(route, st)]
            gone_here = sum(1 for q, r in zip(reqs, results) if r["gone"] and q["path"] == route)
            if st in (200, 499) and gone_here:
                ok = want <= d <= want + gone_here       # a client may leave after the last byte
            else:
                ok = d == want
            if not ok:
                problems.append(f"agp_http_requests_total{{handler={route},status={st}}} grew {d:g}, "
                                f"the clients saw {want}" + (f" (+ up to {gone_here} gone)" if gone_here else ""))
    for st in (200, 400, 499):
        d = value(after, "agp_requests_total", status=str(st)) - value(before, "agp_requests_total", status=str(st))
        grew[f"requests {st}"] = d
    gen_200 = grew["requests 200"]
    if not gen_status[200] <= gen_200 <= gen_status[200] + gone:
        problems.append(f"agp_requests_total{{status=200}} grew {gen_200:g}, {gen_status[200]} whole answers "
                        f"(+ up to {gone} gone)")
    fin = {r: value(after, "agp_requests_finished_total", finished_reason=r) -
           value(before, "agp_requests_finished_total", finished_reason=r) for r in ("stop", "length", "abort")}
    done = fin["stop"] + fin["length"]
    left_after_end = gen_200 - gen_status[200]     # clients gone whose answer had ended
    # a client that gave up on a whole answer may have left before the server read its request
    if not (whole_choices + cut_choices - cut_unsure <= done + fin["abort"] <= whole_choices + cut_choices
            and done >= whole_choices):
        problems.append(f"finished stop + length grew {done:g}, abort {fin['abort']:g}: {whole_choices} choices "
                        f"delivered whole, {cut_choices} of clients gone ({cut_unsure} of them maybe before "
                        f"the server read the request)")
    if not gone - gone_unsure <= grew["requests 499"] + left_after_end <= gone:
        problems.append(f"agp_requests_total{{status=499}} grew {grew['requests 499']:g} (+ {left_after_end:g} "
                        f"gone after their answer's end): {gone} clients gone, {gone_unsure} of them maybe before "
                        f"the server read the request")
    if grew["requests 400"] != gen_status[400]:
        problems.append(f"agp_requests_total{{status=400}} grew {grew['requests 400']:g}, the clients saw "
                        f"{gen_status[400]}")
    gen_tokens = value(after, "agp_generation_tokens_total") - value(before, "agp_generation_tokens_total")
    prompt_tokens = value(after, "agp_prompt_tokens_total") - value(before, "agp_prompt_tokens_total")
    if gen_tokens < completion:
        problems.append(f"agp_generation_tokens_total grew {gen_tokens:g}, {completion} tokens delivered")
    prompt += embed_prompt                       # an embedding's input is a prompt the engine took
    if not prompt + gone_prompt <= prompt_tokens <= prompt + gone_prompt + gone_unknown:
        problems.append(f"agp_prompt_tokens_total grew {prompt_tokens:g}, {prompt} prompt tokens answered whole "
                        f"+ {gone_prompt} of streams their clients left (+ up to {gone_unknown} of answers "
                        f"their clients did not wait for)")
    grew.update(generation_tokens=gen_tokens, delivered_tokens=completion, prompt_tokens=prompt_tokens,
                prompt_answered=prompt, prompt_gone=gone_prompt, prompt_embedded=embed_prompt,
                **{f"finished {r}": v for r, v in fin.items()})
    # fairness: no short request waited for its first token longer than the slowest long one took
    short = [r["ttft"] for q, r in zip(reqs, results) if q["kind"] == "short" and r["ttft"] is not None]
    long_ = [r["e2e"] for q, r in zip(reqs, results) if q["kind"] == "long" and not r["error"]]
    if short and long_ and max(short) > max(long_):
        problems.append(f"a short request's TTFT {max(short):.2f} s is longer than every long request "
                        f"({max(long_):.2f} s at most): starved behind them")
    for kind in rows:
        ttfts = [r["ttft"] for q, r in zip(reqs, results) if q["kind"] == kind and r["ttft"] is not None]
        e2es = [r["e2e"] for q, r in zip(reqs, results) if q["kind"] == kind and not r["error"]]
        rows[kind]["ttft p50"] = pct(ttfts, 0.5)
        rows[kind]["ttft max"] = max(ttfts) if ttfts else float("nan")
        rows[kind]["e2e p50"] = pct(e2es, 0.5)
        rows[kind]["e2e max"] = max(e2es) if e2es else float("nan")
    return problems, {"rows": rows, "grew": grew}


def table(rows: dict) -> str:
    cols = ["sent", "http 200", "http 400", "gone", "errors", "tokens", "ttft p50", "ttft max", "e2e p50", "e2e max"]
    out = [f"{'kind':<12}" + "".join(f"{c:>10}" for c in cols)]
    for kind in sorted(rows):
        r = rows[kind]
        out.append(f"{kind:<12}" + "".join(f"{r[c]:>10.2f}" if isinstance(r[c], float) else f"{r[c]:>10}"
                                            for c in cols))
    return "\n".join(out)


# ---------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(model: str, extra: list[str], log) -> tuple[subprocess.Popen, str]:
    if model == "tests-tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_model import write_tiny_gguf
        model = str(write_tiny_gguf(Path(tempfile.mkdtemp()) / "tiny.gguf"))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline_dsl.cli", "serve", model,
                             "--port", str(port), "--max-queue", "4096", "--drain-timeout", "600", *extra],
                            stdout=log, stderr=log, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"agp serve exited with {proc.returncode} before it answered (log: {log.name})")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("agp serve did not become healthy in 600 s")


async def drain(url: str, proc: subprocess.Popen, model: str, count: int, long_tokens: int,
                timeout: float) -> tuple[list[str], dict]:
    """SIGTERM while `count` long streams run; what a user expects: they end whole, new requests 503."""
    rng = random.Random(7)
    reqs = [make(rng, "long", model, 0, long_tokens) for _ in range(count)]
    problems: list[str] = []
    limits = httpx.Limits(max_connections=count + 16)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks = [asyncio.create_task(send(client, url, r, timeout)) for r in reqs]
        # SIGTERM once every stream has its first token (the engine running them all)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = httpx.get(url + "/metrics", timeout=10).text
            m = re.search(r"^agp_requests_in_flight(?:\{[^}]*\})? (\S+)", st, re.M)
            r = re.search(r"^agp_num_requests_running(?:\{[^}]*\})? (\S+)", st, re.M)
            if m and float(m.group(1)) >= count and r and float(r.group(1)) > 0:
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()
        await asyncio.sleep(0.3)
        late = [make(rng, k, model, 0, long_tokens) for k in ("chat_whole", "comp_stream", "embed", "models")]
        late_res = await asyncio.gather(*(send(client, url, q, timeout) for q in late))
        print(f"late requests answered {[round(r['end'] - t_signal, 2) for r in late_res]} s after SIGTERM, "
              f"{[r['status'] or r['error'] for r in late_res]}")
        try:
            health = (await client.get(url + "/health")).status_code
        except httpx.HTTPError:
            health = None
        results = await asyncio.gather(*tasks)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "did not exit"
    ended = 0
    for k, (req, res) in enumerate(zip(reqs, results)):
        if res["error"] or res["status"] != 200:
            problems.append(f"drain: stream {k} in flight at SIGTERM: {res['error'] or res['status']}")
            continue
        bad, *_ = check_answer(req, res)
        problems += [f"drain: stream {k}: {p}" for p in bad]
        ended += not bad
    # a connection closed unanswered is the server's stop, not the drain's: once its streams ended
    stopped_at = min((r["end"] for r in results), default=0.0)
    for q, res in zip(late, late_res):
        refused = res["status"] == 503 or (res["error"] is not None and res["end"] >= stopped_at)
        if not refused:
            problems.append(f"drain: a {q['kind']} request after SIGTERM: {res['status']} {res['error'] or ''} "
                            f"(answered {res['end'] - t_signal:.2f} s after the signal)")
    if health not in (503, None):
        problems.append(f"drain: /health answered {health} while draining")
    if code != 0:
        problems.append(f"drain: exit status {code}, 0 expected (every request answered)")
    return problems, {"streams": count, "ended whole": ended, "new refused": sum(r["status"] == 503 for r in late_res),
                      "health": health, "exit": code}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="tests-tiny")
    ap.add_argument("--url", help="a running server instead (no RSS, no SIGTERM)")
    ap.add_argument("--clients", type=int, default=128, help="requests at once in a wave")
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long-tokens", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=300, help="seconds a request may take")
    ap.add_argument("--rss-slack", type=float, default=64, help="MiB the RSS may grow after the second wave")
    ap.add_argument("--drain", type=int, default=16, help="streams in flight at SIGTERM (0: no drain check)")
    ap.add_argument("--log", default=None, help="the server's log file (default: a temporary file)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []     # after --: more `agp serve` flags
    args = ap.parse_args(argv[:len(argv) - len(extra) - ("--" in argv)])
    proc = None
    log = open(args.log or tempfile.mktemp(suffix=".log", prefix="serve_mix."), "w")
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url = start(args.model, extra, log)
    problems: list[str] = []
    http = httpx.Client(timeout=30)
    try:
        card = http.get(url + "/v1/models").json()["data"][0]
        model, ctx = card["id"], card["max_model_len"]
        print(f"serving {model} (context {ctx}) at {url}; server log {log.name}")
        rng = random.Random(args.seed)
        kinds, weights = zip(*KINDS.items())
        rss, fds = [], []
        for w in range(args.waves):
            reqs = [make(rng, kind, model, ctx, min(args.long_tokens, ctx // 2))
                    for kind in rng.choices(kinds, weights, k=args.clients)]
            before = scrape(http, url)
            t0 = time.monotonic()
            results = asyncio.run(wave(url, reqs, args.timeout))
            took = time.monotonic() - t0
            after, not_idle = idle(http, url, 60)
            bad, report = judge(reqs, results, before, after)
            bad = not_idle + bad
            fds.append(value(after, "process_open_fds"))
            if proc is not None:
                rss.append(rss_mib(proc.pid))
            print(f"\nwave {w + 1}: {len(reqs)} requests at once, {took:.1f} s, server fds {fds[-1]:g}"
                  + (f", RSS {rss[-1]:.0f} MiB" if rss else ""))
            print(table(report["rows"]))
            print("  metrics grew: " + ", ".join(f"{k} {v:g}" for k, v in report["grew"].items()))
            for p in bad:
                print(f"  FAIL wave {w + 1}: {p}")
            problems += bad
        if len(rss) >= 3 and rss[-1] - rss[1] > args.rss_slack:
            p = f"server RSS grew {rss[-1] - rss[1]:.0f} MiB from wave 2 to wave {len(rss)} ({rss})"
            print(f"  FAIL {p}")
            problems.append(p)
        if len(fds) >= 2 and fds[-1] > fds[0] + 16:
            p = f"the server's open fds grew from {fds[0]:g} to {fds[-1]:g} over the waves ({fds})"
            print(f"  FAIL {p}")
            problems.append(p)
        if proc is not None and args.drain:
            bad, report = asyncio.run(drain(url, proc, model, args.drain, min(args.long_tokens, ctx // 2),
                                            args.timeout))
            print("\nSIGTERM while busy: " + ", ".join(f"{k} {v}" for k, v in report.items()))
            for p in bad:
                print(f"  FAIL {p}")
            problems += bad
    finally:
        http.close()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    print(f"\n{'FAIL' if problems else 'OK'}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
