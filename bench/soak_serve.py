"""A long soak of a running `agp serve`: mixed clients for a while, the server process watched.

    agp serve examples/chat.agp --port 8000 &              # any pipeline; small answers keep it fast
    python bench/soak_serve.py --url http://127.0.0.1:8000 --pid $! --minutes 20 --clients 6

`--clients` loops each send one request after another, drawn at random (seeded by `--seed`):
streamed and whole chat and completions (n = 1..3, at most `--max-tokens` tokens; completions
with a batch of prompts too), clients that close mid-stream or before the first token, whole
answers, embeddings and responses streams given up early, 4xx requests (bad fields, invalid JSON,
an unknown model, a prompt over the context, a body over the limit), /tokenize, /detokenize,
/tokenizer_info, /v1/embeddings, /v1/responses (stored, then deleted or not), /metrics scrapes and
/health probes. Every `--every` seconds a line gives the server's RSS, open fds and threads (from
/proc/PID: run it on the server's machine), its KV blocks in use, running and waiting requests and
requests in flight (/metrics, /stats).

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
WORDS = "the cat sat on the mat and a dog ran in the park while it rained over a small town".split()


def proc_sample(pid: int) -> dict:
    status = open(f"/proc/{pid}/status").read()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return {"rss_mib": round(rss_kb / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


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

    async def stream(self, client, route, body, *, chunks_before_close=None):
        """A streamed request read to its end, or closed after that many data lines."""
        async with client.stream("POST", self.url + route, json=body, timeout=120) as r:
            if chunks_before_close is not None:
                self.record(route, "closed")       # counted 499 or 200 by the server: either
            else:
                self.record(route, r.status_code)
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    n += 1
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
             "responses", "metrics", "health", "cmpl_batch", "give_up_other"],
            weights=[8, 6, 6, 4, 6, 6, 3, 6, 2, 1, 4, 3, 3, 3, 3, 4, 3])[0]
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
            if r.status_code != 400:
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
        async with httpx.AsyncClient() as client:
            while time.monotonic() < self.stop_at:
                try:
                    await self.one(client, rng)
                except httpx.HTTPError as e:
                    self.errors.append(f"client {i}: {type(e).__name__}: {e}")

    async def sample(self, t0: float, label: str = "") -> dict:
        async with httpx.AsyncClient(timeout=60) as client:
            m = metric_values((await client.get(self.url + "/metrics")).text)
            st = (await client.get(self.url + "/stats")).json()
        s = {"t_min": round((time.monotonic() - t0) / 60, 2), **proc_sample(self.args.pid),
             "kv_used": metric_sum(m, "agp_kv_blocks_used"), "running": metric_sum(m, "agp_num_requests_running"),
             "waiting": metric_sum(m, "agp_num_requests_waiting"),
             "in_flight": st["requests"]["in_flight"], "label": label}
        self.samples.append(s)
        print(" ".join(f"{k}={v}" for k, v in s.items() if v != ""), flush=True)
        return s

    async def run(self) -> dict:
        a = self.args
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=60) as client:   # the counters before: checked as deltas
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
            if not (s["kv_used"] or s["running"] or s["waiting"] or s["in_flight"]):
                break
            await asyncio.sleep(1)
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
        if any(idle[k] for k in ("kv_used", "running", "waiting", "in_flight")):
            fails.append(f"not idle after the clients stopped: {idle}")
        print(f"sent {sum(self.kinds.values())} requests: {dict(self.kinds)}")
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
