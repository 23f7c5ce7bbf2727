"""A long soak of a running `agp serve`: mixed clients for a while, the server process watched.

    agp serve examples/chat.agp --port 8000 &              # any pipeline; small answers keep it fast
    python bench/soak_serve.py --url http://127.0.0.1:8000 --pid $! --minutes 20 --clients 6

`--clients` loops each send one request after another, drawn at random (seeded by `--seed`):
streamed and whole chat and completions (n = 1..3, at most `--max-tokens` tokens; completions
with a batch of prompts too), clients that close mid-stream or before the first token, whole
answers, embeddings and responses streams given up early, 4xx requests (bad fields, invalid JSON,
an unknown model, a prompt over the context, a body over the limit), /tokenize, /detokenize,
/tokenizer_info, /v1/embeddings, /v1/responses (stored, then deleted or not), /metrics scrapes and
/health probes; chat with tools (tool_choice auto or required) and with a json_schema
response_format, streamed or not; completions with echo and logprobs; chains of stored responses,
each turn naming the last by previous_response_id (then read back, deleted or left); clients that
read a stream slowly; bursts of `--burst` requests at once, past the queue's limit (429s: start
the server with a small --max-queue). Every `--every` seconds a line gives the server's RSS, open fds and threads (from
/proc/PID: run it on the server's machine), its KV blocks in use, running and waiting requests and
requests in flight (/metrics, /stats), and the seconds a fixed probe request (a greedy chat
answer of 8 tokens) took.

`python bench/soak_serve.py serve --census FILE -- ARGS` runs `agp serve ARGS` in this process
with a thread that appends to FILE, every `--every` seconds, the live Python objects by type (the
most numerous, and those grown most since the first count) and the response store's size (its
responses, bytes and output-item ids): the soak (`--census FILE`) shows them beside its samples.

After the clients stop: a wait for the server to go idle, then the checks, each a FAIL line (exit
status 1) when it does not hold: no 5xx and no broken stream; each generation request counted once
in /metrics' agp_http_requests_total (a request cancelled at once may never have reached it) and
agp_requests_total as many as those; the server idle (no
KV block used, nothing running, waiting or in flight); fds and threads back to their values after
warm-up (`--slack`). Counters are compared by how much they grew during the run, so the server may
have answered others before. The engine's requests done and aborted are printed beside the
sequences asked for. `--json FILE` writes the samples.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from collections import Counter

import httpx

GEN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
PROBE = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
WORDS = "the cat sat on the mat and a dog ran in the park while it rained over a small town".split()


def proc_sample(pid: int) -> dict:
    status = open(f"/proc/{pid}/status").read()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return {"rss_mib": round(rss_kb / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


STORES: list = []                                # the response stores of the server run by `serve`


def census(every: float, path: str) -> None:
    """Append to `path` every `every` seconds: the live objects by type (those the collector
    tracks outside the frozen heap), the threads by name and the response stores' sizes. Growth is
    counted from the first count after the pipeline froze its loaded heap."""
    import gc
    import threading

    first = None
    while True:
        time.sleep(every)
        gc.collect()                                 # live objects, not garbage awaiting a collection
        counts = Counter(type(o).__qualname__ for o in gc.get_objects())
        if first is None and gc.get_freeze_count():
            first = counts
        base = first or counts
        grown = sorted(counts, key=lambda k: counts[k] - base.get(k, 0), reverse=True)[:12]
        names = Counter(re.sub(r"[-_ ]?\d+", "", t.name) for t in threading.enumerate())
        line = {"t": time.time(), "objects": sum(counts.values()), "top": dict(counts.most_common(12)),
                "grown": {k: counts[k] - base.get(k, 0) for k in grown}, "threads": dict(names),
                "stored": sum(len(st.items) for st in STORES), "stored_bytes": sum(st.bytes for st in STORES),
                "stored_ids": sum(len(st.owner) + len(st.too_large) for st in STORES)}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def serve_with_census(argv: list[str]) -> int:
    """`serve --census FILE [--every S] -- AGP_SERVE_ARGS`: agp serve in this process, counted."""
    import threading
    from pipeline_dsl.cli import main as agp
    from pipeline_dsl.serve.responses import ResponseStore

    p = argparse.ArgumentParser(prog="soak_serve.py serve")
    p.add_argument("--census", required=True)
    p.add_argument("--every", type=float, default=30)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    init = ResponseStore.__init__

    def kept(self, *args, **kw):            # each store made, for the census to measure
        init(self, *args, **kw)
        STORES.append(self)

    ResponseStore.__init__ = kept
    threading.Thread(target=census, args=(a.every, a.census), daemon=True, name="census").start()
    return agp(["serve", *rest])


def last_census(path: str | None) -> dict:
    if not path or not os.path.exists(path):
        return {}
    lines = open(path).read().splitlines()
    return json.loads(lines[-1]) if lines else {}


def metric_values(text: str) -> dict:
    """{'name{labels}': value} of a Prometheus text answer."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric_sum(values: dict, name: str, **labels) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in values.items()
               if k.split("{")[0] == name and all(w in k for w in want))


class Soak:
    def __init__(self, args):
        self.args = args
        self.url = args.url.rstrip("/")
        self.statuses: Counter = Counter()        # (route, status) sent by this driver
        self.kinds: Counter = Counter()
        self.sequences = 0                         # engine sequences asked for (prompts x n, embeddings)
        self.errors: list[str] = []
        self.samples: list[dict] = []
        self.stop_at = 0.0
        self.before: dict = {}                     # /metrics at the start
        self.rejected = 0                          # 429s of the bursts

    def prompt(self, rng) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))

    def record(self, route: str, status) -> None:
        self.statuses[(route, status)] += 1
        if isinstance(status, int) and status >= 500:
            self.errors.append(f"{route} -> {status}")

    async def post(self, client, route, body, *, raw=None, headers=None):
        r = await client.post(self.url + route, json=body if raw is None else None, content=raw,
                              headers=headers, timeout=120)
        self.record(route, r.status_code)
        return r

    async def stream(self, client, route, body, *, chunks_before_close=None, pause_s=0.0):
        """A streamed request read to its end (`pause_s` seconds between its lines: a slow reader),
        or closed after that many data lines."""
        async with client.stream("POST", self.url + route, json=body, timeout=120) as r:
            if chunks_before_close is not None:
                self.record(route, "closed")       # counted 499 or 200 by the server: either
            else:
                self.record(route, r.status_code)
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    n += 1
                    if pause_s:
                        await asyncio.sleep(pause_s)
                    if chunks_before_close is not None and n >= chunks_before_close:
                        return                      # leaves the block: the connection is closed
            if chunks_before_close is None and r.status_code == 200 and not self.ended_with_done(line):
                self.errors.append(f"{route} stream did not end with [DONE]: {line!r}")

    async def give_up(self, client, route, body, after_s: float) -> None:
        """A request whose client leaves after `after_s` seconds unless answered by then."""
        task = asyncio.ensure_future(client.post(self.url + route, json=body, timeout=120))
        await asyncio.sleep(after_s)
        if task.done():
            self.record(route, task.result().status_code)
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        self.record(route, "cancelled")

    @staticmethod
    def ended_with_done(last_line) -> bool:
        return last_line in ("", "data: [DONE]") or "response.completed" in last_line

    async def one(self, client, rng) -> None:
        a = self.args
        kind = rng.choices(
            ["chat_stream", "chat_whole", "cmpl_stream", "cmpl_whole", "disconnect", "cancel_early",
             "give_up_whole", "bad", "oversized", "too_big_body", "tokenizer", "embeddings",
             "responses", "metrics", "health", "cmpl_batch", "give_up_other", "tools", "json_schema",
             "echo_logprobs", "chain", "slow_reader", "burst"],
            weights=[8, 6, 6, 4, 6, 6, 3, 6, 2, 1, 4, 3, 3, 3, 3, 4, 3, 4, 4, 4, 3, 2, 1])[0]
        self.kinds[kind] += 1
        n = rng.randint(1, 3)
        chat = {"messages": [{"role": "user", "content": self.prompt(rng)}], "max_tokens": a.max_tokens}
        cmpl = {"prompt": self.prompt(rng), "max_tokens": a.max_tokens}
        if kind == "chat_stream":
            self.sequences += n
            await self.stream(client, "/v1/chat/completions", {**chat, "n": n, "stream": True})
        elif kind == "chat_whole":
            self.sequences += n
            r = await self.post(client, "/v1/chat/completions", {**chat, "n": n})
            if r.status_code == 200 and len(r.json()["choices"]) != n:
                self.errors.append(f"chat: {len(r.json()['choices'])} choices for n={n}")
        elif kind == "cmpl_stream":
            self.sequences += n
            await self.stream(client, "/v1/completions", {**cmpl, "n": n, "stream": True,
                                                           "temperature": 0.8, "logprobs": 2})
        elif kind == "cmpl_whole":
            self.sequences += n
            await self.post(client, "/v1/completions", {**cmpl, "n": n, "echo": rng.random() < 0.3})
        elif kind == "disconnect":
            self.sequences += n
            route, body = rng.choice([("/v1/chat/completions", chat), ("/v1/completions", cmpl)])
            await self.stream(client, route, {**body, "n": n, "stream": True},
                              chunks_before_close=rng.randint(1, 4))
        elif kind in ("cancel_early", "give_up_whole"):
            self.sequences += n
            route, body = rng.choice([("/v1/chat/completions", chat), ("/v1/completions", cmpl)])
            await self.give_up(client, route, {**body, "n": n, "stream": kind == "cancel_early"},
                               rng.uniform(0.0, 0.3 if kind == "cancel_early" else 1.5))
        elif kind == "bad":
            route, body, raw = rng.choice([
                ("/v1/chat/completions", {**chat, "max_tokens": -1}, None),
                ("/v1/completions", {**cmpl, "temperature": "hot"}, None),
                ("/v1/chat/completions", {**chat, "frobnicate": 1}, None),
                ("/v1/completions", {**cmpl, "model": "no-such-model"}, None),
                ("/v1/chat/completions", None, b'{"messages": [}'),
                ("/v1/completions", {"max_tokens": 3}, None),
                ("/v1/embeddings", {"input": []}, None),
                ("/detokenize", {"tokens": [-5]}, None),
            ])
            r = await self.post(client, route, body, raw=raw,
                                headers={"content-type": "application/json"} if raw else None)
            if not 400 <= r.status_code < 500:
                self.errors.append(f"bad request to {route} answered {r.status_code}")
        elif kind == "oversized":
            route = rng.choice(["/v1/completions", "/v1/chat/completions"])
            text = "hello " * 9000
            body = {"prompt": text} if route == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
            r = await self.post(client, route, {**body, "max_tokens": a.max_tokens,
                                                "stream": rng.random() < 0.5})
            # its length is known once the pipeline has tokenised it: at a full queue it is refused first
            if r.status_code not in (400, 429):
                self.errors.append(f"oversized prompt to {route} answered {r.status_code}")
        elif kind == "too_big_body":
            r = await self.post(client, "/v1/completions", None, raw=b'{"prompt": "' + b"a" * (5 << 20) + b'"}',
                                headers={"content-type": "application/json"})
            if r.status_code != 413:
                self.errors.append(f"5 MiB body answered {r.status_code}")
        elif kind == "tokenizer":
            r = await self.post(client, "/tokenize", {"prompt": self.prompt(rng)})
            if r.status_code == 200:
                await self.post(client, "/detokenize", {"tokens": r.json()["tokens"]})
            r = await client.get(self.url + "/tokenizer_info")
            self.record("/tokenizer_info", r.status_code)
        elif kind == "embeddings":
            inputs = [self.prompt(rng) for _ in range(rng.randint(1, 3))]
            self.sequences += len(inputs)
            await self.post(client, "/v1/embeddings", {"input": inputs})
        elif kind == "responses":
            self.sequences += 1
            body = {"input": self.prompt(rng), "max_output_tokens": a.max_tokens}
            if rng.random() < 0.5:
                await self.stream(client, "/v1/responses", {**body, "stream": True})
            else:
                r = await self.post(client, "/v1/responses", body)
                if r.status_code == 200 and rng.random() < 0.5:
                    d = await client.delete(f"{self.url}/v1/responses/{r.json()['id']}")
                    self.record("/v1/responses/{response_id}", d.status_code)
        elif kind == "cmpl_batch":               # a batch of prompts: one pipeline request each
            prompts = [self.prompt(rng) for _ in range(rng.randint(2, 3))]
            self.sequences += n * len(prompts)
            body = {**cmpl, "prompt": prompts, "n": n, "stream": rng.random() < 0.7}
            if body["stream"]:
                await self.stream(client, "/v1/completions", body,
                                  chunks_before_close=rng.choice([None, 1, 3]))
            else:
                await self.post(client, "/v1/completions", body)
        elif kind == "give_up_other":            # a responses stream or embeddings left early
            if rng.random() < 0.5:
                self.sequences += 1
                await self.stream(client, "/v1/responses", {"input": self.prompt(rng), "stream": True,
                                                            "max_output_tokens": a.max_tokens},
                                  chunks_before_close=rng.randint(1, 4))
            else:
                inputs = [self.prompt(rng) for _ in range(rng.randint(1, 4))]
                self.sequences += len(inputs)
                await self.give_up(client, "/v1/embeddings", {"input": inputs}, rng.uniform(0, 0.5))
        elif kind == "tools":
            self.sequences += 1
            body = {**chat, "tools": TOOLS, "tool_choice": rng.choice(["auto", "required"]),
                    "messages": [{"role": "user", "content": f"What is the weather in {rng.choice(WORDS)}?"}]}
            if rng.random() < 0.5:
                await self.stream(client, "/v1/chat/completions", {**body, "stream": True},
                                  chunks_before_close=rng.choice([None, None, 2]))
            else:
                await self.post(client, "/v1/chat/completions", body)
        elif kind == "json_schema":
            self.sequences += n
            body = {**chat, "n": n, "max_tokens": 2 * a.max_tokens,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}}
            if rng.random() < 0.5:
                await self.stream(client, "/v1/chat/completions", {**body, "stream": True},
                                  chunks_before_close=rng.choice([None, None, 3]))
            else:
                await self.post(client, "/v1/chat/completions", body)
        elif kind == "echo_logprobs":
            self.sequences += n
            body = {**cmpl, "n": n, "echo": True, "logprobs": rng.randint(0, 5)}
            if rng.random() < 0.5:
                await self.stream(client, "/v1/completions", {**body, "stream": True})
            else:
                await self.post(client, "/v1/completions", body)
        elif kind == "chain":                    # stored responses, each turn naming the last
            prev = None
            for _ in range(rng.randint(2, 4)):
                self.sequences += 1
                body = {"input": self.prompt(rng), "max_output_tokens": a.max_tokens, "store": True,
                        **({"previous_response_id": prev} if prev else {})}
                r = await self.post(client, "/v1/responses", body)
                if r.status_code != 200:
                    if r.status_code != 429:
                        self.errors.append(f"chain turn answered {r.status_code}: {r.text[:200]}")
                    break
                prev = r.json()["id"]
            if prev and rng.random() < 0.5:
                g = await client.get(f"{self.url}/v1/responses/{prev}")
                self.record("/v1/responses/{response_id}", g.status_code)
            if prev and rng.random() < 0.3:
                d = await client.delete(f"{self.url}/v1/responses/{prev}")
                self.record("/v1/responses/{response_id}", d.status_code)
        elif kind == "slow_reader":
            self.sequences += n
            await self.stream(client, "/v1/chat/completions", {**chat, "n": n, "stream": True},
                              pause_s=rng.uniform(0.05, 0.4))
        elif kind == "burst":                    # more at once than the queue takes: 429s
            self.sequences += a.burst
            bodies = [{**cmpl, "prompt": self.prompt(rng), "max_tokens": 4} for _ in range(a.burst)]
            rs = await asyncio.gather(*(client.post(self.url + "/v1/completions", json=b, timeout=120)
                                        for b in bodies), return_exceptions=True)
            for r in rs:
                if isinstance(r, BaseException):
                    self.errors.append(f"burst: {type(r).__name__}: {r}")
                else:
                    self.record("/v1/completions", r.status_code)
                    self.rejected += r.status_code == 429
        elif kind == "metrics":
            r = await client.get(self.url + "/metrics")
            self.record("/metrics", r.status_code)
        elif kind == "health":
            r = await client.get(self.url + "/health", timeout=5)
            self.record("/health", r.status_code)
            if r.status_code != 200:
                self.errors.append(f"/health answered {r.status_code} under load")

    async def client_loop(self, i: int) -> None:
        rng = random.Random(self.args.seed * 1000 + i)
        # idle connections given up well before the server's keep-alive timeout (5 s): a request sent
        # on one the server is closing at that moment reads a reset (the race of any HTTP client)
        async with httpx.AsyncClient(limits=httpx.Limits(keepalive_expiry=2)) as client:
            while time.monotonic() < self.stop_at:
                try:
                    await self.one(client, rng)
                except httpx.HTTPError as e:
                    self.errors.append(f"client {i}: {type(e).__name__}: {e}")

    async def sample(self, t0: float, label: str = "") -> dict:
        async with httpx.AsyncClient(timeout=60) as client:
            m = metric_values((await client.get(self.url + "/metrics")).text)
            st = (await client.get(self.url + "/stats")).json()
            start = time.monotonic()
            r = await client.post(self.url + "/v1/chat/completions", json=PROBE, timeout=120)
            self.record("/v1/chat/completions", r.status_code)
            probe_s = round(time.monotonic() - start, 3) if r.status_code == 200 else f"status {r.status_code}"
        eng = next(iter(st["engines"].values()))
        c = last_census(self.args.census)
        s = {"t_min": round((time.monotonic() - t0) / 60, 2), **proc_sample(self.args.pid),
             "kv_used": metric_sum(m, "agp_kv_blocks_used"), "kv_free": eng.get("kv_blocks_free"),
             "running": metric_sum(m, "agp_num_requests_running"),
             "waiting": metric_sum(m, "agp_num_requests_waiting"), "queue": metric_sum(m, "agp_queue_length"),
             "in_flight": st["requests"]["in_flight"], "http_in_flight": metric_sum(m, "agp_requests_in_flight"),
             "lent": sum(v.get("lent", 0) for v in st["stages"].values()),
             "queued": sum(v.get("queued", 0) for v in st["stages"].values()),
             "probe_s": probe_s, "objects": c.get("objects", ""), "stored": c.get("stored", ""),
             "stored_kib": round(c["stored_bytes"] / 1024, 1) if c else "", "label": label}
        self.samples.append(s)
        print(" ".join(f"{k}={v}" for k, v in s.items() if v != ""), flush=True)
        return s

    async def run(self) -> dict:
        a = self.args
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=60) as client:   # the counters before: checked as deltas
            while True:                                        # still starting or loading
                try:
                    if (await client.get(self.url + "/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(1)
            self.before = metric_values((await client.get(self.url + "/metrics")).text)
        await self.sample(t0, "start")
        self.stop_at = t0 + a.minutes * 60
        clients = [asyncio.ensure_future(self.client_loop(i)) for i in range(a.clients)]
        while time.monotonic() < self.stop_at:
            await asyncio.sleep(min(a.every, max(0.0, self.stop_at - time.monotonic())))
            await self.sample(t0)
        await asyncio.gather(*clients)
        for _ in range(60):                         # what was cut may take a step or two to leave
            s = await self.sample(t0, "after")
            if not any(s[k] for k in ("kv_used", "running", "waiting", "in_flight", "http_in_flight", "lent", "queued")):
                break
            await asyncio.sleep(1)
        if self.args.census:                        # the next census counts the idle server
            await asyncio.sleep(self.args.every + 1)
            s = await self.sample(t0, "idle")
            print("census grown since its first count:", json.dumps(last_census(self.args.census).get("grown")))
        return s

    def report(self, m: dict, st: dict, idle: dict) -> int:
        fails = list(self.errors)
        def grew(name, **labels):
            return metric_sum(m, name, **labels) - metric_sum(self.before, name, **labels)

        for route in GEN_ROUTES:     # a request cancelled at once may never have reached the server
            sent = sum(v for (r, _), v in self.statuses.items() if r == route)
            cancelled = self.statuses[(route, "cancelled")]
            counted = grew("agp_http_requests_total", handler=route)
            if not sent - cancelled <= counted <= sent:
                fails.append(f"{route}: {sent} sent ({cancelled} cancelled), {counted:.0f} in agp_http_requests_total")
        http = sum(grew("agp_http_requests_total", handler=route) for route in GEN_ROUTES)
        if grew("agp_requests_total") != http:
            fails.append(f"agp_requests_total grew by {grew('agp_requests_total'):.0f}, the generation routes' "
                         f"agp_http_requests_total by {http:.0f}")
        eng = next(iter(st["engines"].values()))
        if any(idle[k] for k in ("kv_used", "running", "waiting", "in_flight", "http_in_flight", "lent", "queued")):
            fails.append(f"not idle after the clients stopped: {idle}")
        print(f"sent {sum(self.kinds.values())} requests: {dict(self.kinds)}")
        print(f"bursts: {self.rejected} answered 429")
        print(f"statuses: {dict(sorted(self.statuses.items(), key=str))}")
        print(f"engine: requests_done={eng['requests_done']} requests_aborted={eng['requests_aborted']} "
              f"(sequences asked for, refused ones too: {self.sequences}); requests {st['requests']}")
        if st["requests"]["requests"] != st["requests"]["answered"] + st["requests"]["failed"]:
            fails.append(f"/stats requests do not add up: {st['requests']}")
        warm = self.samples[min(len(self.samples) - 1, 2)]
        for k in ("fds", "threads"):
            if idle[k] > warm[k] + self.args.slack:
                fails.append(f"{k}: {warm[k]} after warm-up, {idle[k]} when idle at the end")
        for f in fails[:50]:
            print("FAIL", f)
        if len(fails) > 50:
            print(f"FAIL ... and {len(fails) - 50} more")
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump({"samples": self.samples, "statuses": {f"{r} {s}": v for (r, s), v in self.statuses.items()},
                           "fails": fails}, f, indent=1)
        return 1 if fails else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--pid", type=int, required=True, help="the server's process id (for /proc)")
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--every", type=float, default=30, help="seconds between samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slack", type=int, default=4, help="fds/threads above warm-up still taken as level")
    p.add_argument("--json", help="write the samples and checks to this file")
    p.add_argument("--burst", type=int, default=24, help="requests sent at once by a burst (over the queue: 429s)")
    p.add_argument("--census", help="the census file of `soak_serve.py serve --census` (objects, stored responses)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve_with_census(argv[1:])
    args = p.parse_args(argv)
    soak = Soak(args)

    async def go():
        idle = await soak.run()
        async with httpx.AsyncClient(timeout=60) as client:
            m = metric_values((await client.get(soak.url + "/metrics")).text)
            st = (await client.get(soak.url + "/stats")).json()
        return m, st, idle

    m, st, idle = asyncio.run(go())
    return soak.report(m, st, idle)


if __name__ == "__main__":
    sys.exit(main())
