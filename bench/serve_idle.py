"""What an `agp serve` costs doing nothing, and how long it takes to stop.

    python bench/serve_idle.py                         # the tiny test model, 4 paused streams, 20 s each
    python bench/serve_idle.py smollm2-135m-instruct --streams 8 --seconds 30
    python bench/serve_idle.py --root /path/to/other/checkout   # the same on another checkout (A/B)

It starts `agp serve` (a .gguf, a Hugging Face folder, an embedded model's name; `tests-tiny`, the
default, writes tests/tiny_model.py's GGUF with a 4096-token context behind a batch of 4) with
`--pause-unread-tokens 32 --send-timeout 600` on a free port and measures, from /proc/PID/stat
(user + system time of every thread of the server):

  idle     the server's CPU over `--seconds` with nothing in flight;
  paused   its CPU over `--seconds` while `--streams` streamed completions (3,000 tokens each)
           are paused for their clients, which read nothing (each counted in
           agp_streams_paused_total, none running): the engine has requests, none it may
           schedule. Printed with its ratio to idle.

Then the clients close their connections, and once nothing is in flight the server gets SIGTERM:
printed are the seconds from the signal to its "stopped" log line, and from that line to the
process's exit (the interpreter's teardown and the system's).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

PIPELINE = """pipeline tiny {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests      {{ max_queue = 64 }}
    stage batch   : dynamic_batch {{ max_batch_size = 4  timeout = 1ms }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 8MiB }}
    stage gen     : generate      {{ max_new_tokens = 16 }}
    stage out     : respond       {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, root: Path, model: str, threads: int, flags: tuple[str, ...] = ()):
        folder = Path(tempfile.mkdtemp())
        if model == "tests-tiny":
            sys.path.insert(0, str(root / "tests"))
            from tiny_model import write_tiny_gguf
            gguf = write_tiny_gguf(folder / "tiny.gguf", context=4096)
            (folder / "tiny.agp").write_text(PIPELINE.format(model=gguf))
            model = str(folder / "tiny.agp")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline_dsl.cli", "serve", model, "--port", str(self.port),
             "--threads", str(threads), "--no-access-log", "--send-timeout", "600",
             "--pause-unread-tokens", "32", "--max-unread-tokens", "256", "--drain-timeout", "600", *flags],
            stderr=subprocess.PIPE, text=True, env=env, cwd=root)
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"agp serve exited with {self.proc.returncode}:\n"
                                 + "".join(line for _, line in self.lines[-20:]))
            try:
                if self.http.get(self.url + "/health").status_code == 200:
                    self.model = self.http.get(self.url + "/v1/models").json()["data"][0]["id"]
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("agp serve did not answer in 600 s")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line))

    def metric(self, name: str) -> float:
        text = self.http.get(self.url + "/metrics").text
        m = re.search(r"^" + name + r"(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def cpu_over(self, seconds: float) -> float:
        """The server's CPU (cores) over `seconds`, nothing asked of it meanwhile."""
        c0, t0 = cpu_seconds(self.proc.pid), time.monotonic()
        time.sleep(seconds)
        return (cpu_seconds(self.proc.pid) - c0) / (time.monotonic() - t0)

    def stalled_stream(self, i: int) -> socket.socket:
        """A streamed completion whose client then reads nothing (a small receive buffer)."""
        body = json.dumps({"model": self.model, "prompt": f"hello {i}", "max_tokens": 3000,
                           "ignore_eos": True, "stream": True, "logprobs": 5}).encode()
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(("127.0.0.1", self.port))
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return c

    def wait_for(self, ok, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise SystemExit(f"not {what} in {timeout:g} s")
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="tests-tiny")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the checkout whose agp is measured (default: this one)")
    args = ap.parse_args()
    server = Server(args.root.resolve(), args.model, args.threads)
    try:
        time.sleep(2)                                  # past the start's own work
        idle = server.cpu_over(args.seconds)
        clients = [server.stalled_stream(i) for i in range(args.streams)]
        server.wait_for(lambda: server.metric("agp_streams_paused_total") >= args.streams
                        and server.metric("agp_num_requests_running") == 0, "every stream paused")
        time.sleep(2)
        paused = server.cpu_over(args.seconds)
        print(f"idle:   {100 * idle:5.1f}% of a core over {args.seconds:g} s")
        print(f"paused: {100 * paused:5.1f}% of a core over {args.seconds:g} s with {args.streams} streams paused "
              f"for their clients ({paused / idle if idle else float('inf'):.1f}x idle)")
        for c in clients:
            c.close()
        server.wait_for(lambda: server.metric("agp_requests_in_flight") == 0, "idle again")
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(120)
        exited = time.monotonic()
        time.sleep(0.2)                                # the reader's last lines
        stopped = next((t for t, line in server.lines if "agp.serve: stopped" in line), None)
        if stopped is None:
            print(f"SIGTERM to exit: {exited - signalled:.3f} s (no 'stopped' line; exit status "
                  f"{server.proc.returncode})")
        else:
            print(f"SIGTERM to 'stopped': {stopped - signalled:.3f} s; 'stopped' to exit: {exited - stopped:.3f} s; "
                  f"exit status {server.proc.returncode}")
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


if __name__ == "__main__":
    main()
