"""Requests sent on a pooled connection idle for about 5 s: how many fail because the server
closes the idle connection as the request goes out (docs/serve.md, "Limits").

httpx (the transport of the openai client) keeps an idle connection 5 s (`keepalive_expiry`),
uvicorn's default keep-alive timeout is 5 s too: a request sent on a connection idle for just
under 5 s can meet the server's FIN in flight and fail with RemoteProtocolError ("Server
disconnected without sending a response") or a ReadError. httpx does not retry it; the openai
client retries it after its backoff (with max_retries=0 it is the caller's error).

Each trial is a fresh httpx.Client with its defaults: one request, an idle pause drawn from
--idle (seconds), then a second request on the pooled connection. `--clients` trials run at
once. Against `agp serve PIPELINE --keep-alive-timeout 5` (uvicorn's old default) and the
default (75 s):

    agp serve tiny.agp --port 8000 --keep-alive-timeout 5 &
    python bench/keep_alive_race.py --url http://127.0.0.1:8000 --trials 240 --load 8

(on 2 shared cores, the tiny test model: 8 of 240 failed with --keep-alive-timeout 5, 2
RemoteProtocolError and 6 ReadError, 0 with the default; without --load, 1 of 240 and 0.)
"""
from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import Counter

import httpx


def trial(url: str, path: str, idle: float) -> str:
    """'ok', or the name of the error of the request after the idle pause ('first:...' when the
    first request failed)."""
    with httpx.Client(base_url=url, timeout=30) as client:      # httpx's defaults: keepalive_expiry 5 s
        try:
            client.get(path).raise_for_status()
        except httpx.HTTPError as e:
            return f"first:{type(e).__name__}"
        time.sleep(idle)
        try:
            client.get(path).raise_for_status()
        except httpx.HTTPError as e:
            return type(e).__name__
    return "ok"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--path", default="/v1/models", help="the request sent (GET); any answers as well")
    p.add_argument("--trials", type=int, default=240)
    p.add_argument("--clients", type=int, default=24, help="trials at once")
    p.add_argument("--idle", default="4.9:5.0", help="LOW:HIGH seconds of the idle pause, drawn uniformly "
                                                      "(httpx reuses a connection idle under 5 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load", type=int, default=0,
                   help="threads that keep the server busy meanwhile, each streaming completions of "
                        "--load-tokens tokens one after another (a busy event loop widens the race)")
    p.add_argument("--load-tokens", type=int, default=64)
    args = p.parse_args()
    low, high = (float(x) for x in args.idle.split(":"))
    rng = random.Random(args.seed)
    idles = [rng.uniform(low, high) for _ in range(args.trials)]
    results: Counter = Counter()
    lock = threading.Lock()
    todo = iter(idles)

    def worker():
        while True:
            with lock:
                idle = next(todo, None)
            if idle is None:
                return
            outcome = trial(args.url, args.path, idle)
            with lock:
                results[outcome] += 1

    done = threading.Event()
    load_requests = Counter()

    def busy():
        body = {"prompt": "hello", "max_tokens": args.load_tokens, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=args.url, timeout=60) as client:
            while not done.is_set():
                try:
                    with client.stream("POST", "/v1/completions", json=body) as r:
                        for _ in r.iter_bytes():
                            pass
                    outcome = r.status_code
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                with lock:
                    load_requests[outcome] += 1

    loaders = [threading.Thread(target=busy, daemon=True) for _ in range(args.load)]
    for t in loaders:
        t.start()
    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in loaders:
        t.join()
    failed = sum(n for outcome, n in results.items() if outcome != "ok")
    print(json.dumps({"url": args.url, "trials": args.trials, "idle_s": [low, high], "failed": failed,
                      "outcomes": dict(results),
                      "load": {"threads": args.load, "requests": {str(k): n for k, n in load_requests.items()}},
                      "seconds": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
