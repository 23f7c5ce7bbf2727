"""How much one hostile request, connection or file stalls everybody else: a victim stream's
largest inter-token gap while each probe runs against `agp serve`.

    python bench/victim_gap.py                              # the embedded model, examples/chat.agp
    python bench/victim_gap.py --threads 2 --json gaps.json
    taskset -c 0,1 python bench/victim_gap.py               # as on a 2-core machine

The server runs as a child process; a victim streams a long completion while each probe runs:
a 4,000-token prompt without echo (the share any long prompt takes: its prefill, chunk by chunk),
the same prompt scored with echo (logprobs 20, then 0), 300 connections answered 413 whose
clients keep sending, 64 KB headers, unenforceable response_formats, 1M ids to /detokenize,
256 prompts x n = 64, `agp check` of a 1 MiB file of nested brackets, bodies of 3.8 MB
(under the 3.85 MiB chat.agp's model takes, below --max-body-bytes' 4 MiB: 9,500 messages,
470,000 token ids, one string, 200,000 metadata keys; each parsed whole before its answer), and json_schemas built to
cost: a const of 250,000 characters, a 2 MB enum (2,000 strings of 1,000 characters), 100,000
short strings, 10,000 optional properties (each past a bound: refused), and costly masks within
the bounds: a string pattern of 400 to 19,000 letters (its repetition unrolled to the bound on a
regex's size) answered for 100 tokens by one request and by 16 at once, beside one and 16 plain
requests of 100 tokens (their share): the victim shares its steps with rows whose masks are
computed each step. Each line: the probe, what
it got, how long it took, the CPU seconds the server spent meanwhile (its own and the victim's
share), and the victim's median and largest gap while it ran (and its median gap alone). The bar:
every gap under 1 s on an idle 2-core machine, no probe stalling the victim more than a plain
prompt of its size does, and a refused schema costing little CPU before its 400.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import Server  # noqa: E402


class Victim:
    """A streaming completion; the time of every content chunk."""

    def __init__(self, url: str, tokens: int):
        self.url, self.tokens, self.stamps = url, tokens, []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"prompt": "Tell me a long story about a cat.", "max_tokens": self.tokens, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.stamps.append(time.perf_counter())

    def start(self, first: int = 5) -> "Victim":
        self.thread.start()
        while len(self.stamps) < first and self.thread.is_alive():
            time.sleep(0.01)
        return self

    def max_gap(self, t0: float, t1: float) -> float:
        """The largest gap between chunks that overlaps [t0, t1]."""
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:]) if b >= t0 and a <= t1]
        return max(gaps, default=float("nan"))

    def median_gap(self, t0: float, t1: float) -> float:
        """The median gap between chunks that overlap [t0, t1]."""
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:]) if b >= t0 and a <= t1]
        return statistics.median(gaps) if gaps else float("nan")


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) process `pid` has used, all its threads (Linux's /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw(port: int, data: bytes, extra: bytes = b"", wait: float = 5.0) -> tuple[bytes, bool]:
    """Send `data`, read the status line, send `extra`; (status line, closed by the server within wait)."""
    c = socket.create_connection(("127.0.0.1", port))
    try:
        c.sendall(data)
        c.settimeout(30)
        head = c.recv(4096).split(b"\r\n", 1)[0]
        if extra:
            try:
                c.sendall(extra)
            except OSError:
                return head, True
        c.settimeout(wait)
        try:
            while c.recv(65536):
                pass
            return head, True
        except (socket.timeout, TimeoutError):
            return head, False
        except OSError:
            return head, True
    finally:
        c.close()


def probes(url: str, port: int, tmp: Path) -> dict:
    post = lambda route, body: httpx.post(url + route, json=body, timeout=600).status_code  # noqa: E731
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 400        # about 4,000 tokens
    huge = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10737418240\r\n\r\n{")
    nested = tmp / "nested.agp"
    head = "pipeline p {\n  stage s : generate { stop = "
    nested.write_text(head + "[" * ((1 << 20) - 100 - len(head)) + "\n")

    def flood() -> str:
        results = [None] * 300

        def one(i):
            results[i] = raw(port, huge, b"x")
        threads = [threading.Thread(target=one, args=(i,)) for i in range(300)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return f"{sum(r[0].split(b' ')[1:2] == [b'413'] for r in results)} x 413, " \
               f"{sum(r[1] for r in results)} closed"

    def check() -> str:
        r = subprocess.run([sys.executable, "-m", "pipeline_dsl.cli", "check", str(nested)], capture_output=True,
                           text=True, cwd=ROOT)
        return f"exit {r.returncode}: {r.stderr.splitlines()[0][-60:]}"

    pattern = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a{1000}){1000}$"}}}
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word(i: int, n: int) -> str:            # n letters, distinct for each i
        return "".join(letters[(i * 7 + k * (i % 5 + 1)) % 26] for k in range(n - 6)) + f"{i:06d}"

    def schema_of(schema: dict, tokens: int = 8):
        return lambda: post("/v1/completions", {"prompt": "hi", "max_tokens": tokens, "ignore_eos": True,
                                                "response_format": {"type": "json_schema", "json_schema": {
                                                    "name": "x", "schema": schema}}})
    long_enum = {"type": "object", "properties": {"a": {"enum": [word(i, 1000) for i in range(2000)]}},
                 "required": ["a"]}
    many_enum = {"type": "object", "properties": {"a": {"enum": [word(i, 20) for i in range(100_000)]}},
                 "required": ["a"]}
    optional = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(10_000)}}
    long_const = {"const": word(0, 250_000)}
    # a mask of 0.3-0.8 ms a row at most steps on a 2-core EPYC (MAX_REGEX_SIZE bounds the unrolled pattern)
    costly = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z ]{400,19000}$"}},
              "required": ["a"]}

    def together(probe, n: int = 16):
        def run() -> str:
            results = [None] * n

            def one(i):
                results[i] = probe()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return " ".join(f"{n_}x {code}" for code, n_ in sorted(
                {c: results.count(c) for c in results}.items()))
        return run
    plain100 = lambda: post("/v1/completions", {"prompt": "hi", "max_tokens": 100, "ignore_eos": True})  # noqa: E731
    # bodies of 3.8 MB (about the most a body may have), encoded here beforehand (this process times the victim):
    # the server parses each whole before it can refuse it
    big = {"3.8 MB body: 9,500 messages": ("/v1/chat/completions", {"messages": [
               {"role": "user", "content": "x" * 380} for _ in range(9_500)], "max_tokens": 1}),
           "3.8 MB body: 470,000 token ids": ("/v1/completions", {"prompt": list(range(1000, 471_000)),
                                                                 "max_tokens": 1}),
           "3.8 MB body: one string": ("/v1/completions", {"prompt": "hello world " * 315_000, "max_tokens": 1}),
           "3.8 MB body: 200,000 metadata keys": ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "metadata": {
               f"k{i}": i for i in range(200_000)}})}
    encoded = {name: (route, json.dumps(body).encode()) for name, (route, body) in big.items()}

    def send_big(name: str):
        route, data = encoded[name]
        return lambda: httpx.post(url + route, content=data, headers={"content-type": "application/json"},
                                  timeout=600).status_code
    return {
        "4000 tokens, no echo (its share)": lambda: post("/v1/completions", {"prompt": long_prompt, "max_tokens": 1}),
        "echo 4000 tokens, logprobs 20": lambda: post("/v1/completions", {"prompt": long_prompt, "max_tokens": 0,
                                                                         "echo": True, "logprobs": 20}),
        "echo 4000 tokens, logprobs 0": lambda: post("/v1/completions", {"prompt": long_prompt, "max_tokens": 0,
                                                                        "echo": True, "logprobs": 0}),
        "300 x 413 + one more byte": flood,
        "64 KB headers": lambda: raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (64 << 10)
                                     + b"\r\n\r\n")[0].decode(),
        "pattern (a{1000}){1000}": lambda: post("/v1/completions", {"prompt": "hi", "max_tokens": 8, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": pattern}}}),
        "$ref to itself": lambda: post("/v1/completions", {"prompt": "hi", "max_tokens": 8, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}}),
        "100 tokens, plain (its share)": plain100,
        "pattern of 19,000, 100 tokens": schema_of(costly, 100),
        "16 x 100 tokens, plain (their share)": together(plain100),
        "16 x pattern of 19,000, 100 tokens": together(schema_of(costly, 100)),
        "const of 250,000 chars, 100 tokens": schema_of(long_const, 100),
        "2 MB enum, 2,000 x 1,000 chars": schema_of(long_enum, 300),
        "2 MB enum, 100,000 x 20 chars": schema_of(many_enum),
        "10,000 optional properties": schema_of(optional),
        "/detokenize 1M ids": lambda: post("/detokenize", {"tokens": [42] * 1_000_000}),
        "256 prompts x n = 64": lambda: post("/v1/completions", {"prompt": ["hi"] * 256, "n": 64, "max_tokens": 1}),
        "agp check, 1 MiB of [": check,
        **{name: send_big(name) for name in big},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default=str(ROOT / "examples" / "chat.agp"))
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    ap.add_argument("--tokens", type=int, default=400, help="the victim's answer length per probe")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--only", action="append", default=None,
                    help="run only the probes whose name holds this text (repeat it for several)")
    args = ap.parse_args()
    try:
        server = Server(args.pipeline, "--no-access-log", "--log-level", "warning",
                        *(["--threads", str(args.threads)] if args.threads else []))
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    url, port = server.url, server.port
    rows = []
    try:
        alone = Victim(url, 120).start()
        alone.thread.join()
        gaps = [b - a for a, b in zip(alone.stamps, alone.stamps[1:])]
        print(f"victim alone: median gap {statistics.median(gaps) * 1e3:.0f} ms, largest {max(gaps) * 1e3:.0f} ms")
        with tempfile.TemporaryDirectory() as tmp:
            for name, probe in probes(url, port, Path(tmp)).items():
                if args.only and not any(text in name for text in args.only):
                    continue
                victim = Victim(url, args.tokens).start()
                c0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
                got = probe()
                t1, c1 = time.perf_counter(), cpu_seconds(server.proc.pid)
                gap, median = victim.max_gap(t0, t1), victim.median_gap(t0, t1)
                victim.thread.join()
                rows.append({"probe": name, "result": str(got), "probe_s": round(t1 - t0, 3),
                             "server_cpu_s": round(c1 - c0, 3), "victim_median_gap_s": round(median, 4),
                             "victim_max_gap_s": round(gap, 3)})
                print(f"{name:<32} {str(got):<28} {t1 - t0:7.2f} s  {c1 - c0:6.2f} s CPU   victim's gaps: median "
                      f"{median * 1e3:5.0f} ms, largest {gap * 1e3:6.0f} ms", flush=True)
    finally:
        server.terminate(60)
    if args.json:
        Path(args.json).write_text(json.dumps({"alone_median_gap_s": statistics.median(gaps), "probes": rows},
                                              indent=2))
    worst = max((r["victim_max_gap_s"] for r in rows), default=0)
    print(f"worst gap while a probe ran: {worst * 1e3:.0f} ms ({'under' if worst < 1 else 'OVER'} 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
