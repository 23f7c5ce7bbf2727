"""How long a one-process `agp serve` takes to stop at SIGTERM, past what it must wait for.

    python bench/serve_stop.py                       # the tiny test model, 3 runs of each case
    python bench/serve_stop.py --root /path/to/other/checkout --runs 5   # another checkout (A/B)

Each run starts `agp serve` (bench/serve_idle.py's server: tests/tiny_model.py's GGUF) and stops it:

  idle       SIGTERM with nothing in flight: the seconds to its "stopped" line and to its exit;
  stream     SIGTERM while one streamed completion is under way, which the drain lets finish:
             the seconds from the stream's [DONE] (as its client reads it) to "stopped" and to exit;
  cut        the same stream under --drain-timeout 1, which cuts it: the seconds from the signal
             to the client's error event, to "stopped" and to exit, less the 1 s drain timeout.

Printed: the median of the runs of each (and their range).
"""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_idle import Server  # noqa: E402

DRAIN_S = 1.0


def stopped_at(server: Server) -> float | None:
    time.sleep(0.2)                                    # the reader's last lines
    return next((t for t, line in server.lines if "agp.serve: stopped" in line), None)


def stream(server: Server, max_tokens: int, first: threading.Event, out: dict) -> None:
    """A streamed completion read to its end: when its [DONE] or its error event came."""
    body = {"model": server.model, "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            first.set()
            if '"error"' in line:
                out["error"] = time.monotonic()
            if line == "data: [DONE]":
                out["done"] = time.monotonic()
    first.set()


def run(root: Path, case: str) -> list[float]:
    flags = ("--drain-timeout", str(DRAIN_S)) if case == "cut" else ()
    server = Server(root, "tests-tiny", 1, flags)
    try:
        out: dict = {}
        if case != "idle":
            first = threading.Event()
            t = threading.Thread(target=stream, args=(server, 3000 if case == "cut" else 400, first, out))
            t.start()
            first.wait(60)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(120)
        exited = time.monotonic()
        stopped = stopped_at(server)
        if case != "idle":
            t.join(60)
        if stopped is None:
            raise SystemExit(f"{case}: no 'stopped' line; exit status {server.proc.returncode}")
        if case == "idle":
            return [stopped - signalled, exited - signalled]
        if case == "stream":
            return [stopped - out["done"], exited - out["done"]]
        return [out["error"] - signalled - DRAIN_S, stopped - signalled - DRAIN_S, exited - signalled - DRAIN_S]
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the checkout whose agp is measured (default: this one)")
    args = ap.parse_args()
    names = {"idle": ("signal->stopped", "signal->exit"), "stream": ("[DONE]->stopped", "[DONE]->exit"),
             "cut": ("signal->error event", "signal->stopped", "signal->exit")}
    for case, labels in names.items():
        runs = [run(args.root.resolve(), case) for _ in range(args.runs)]
        parts = []
        for k, label in enumerate(labels):
            xs = [r[k] for r in runs]
            parts.append(f"{label} {statistics.median(xs):.3f} s ({min(xs):.3f}-{max(xs):.3f})")
        print(f"{case:7s}" + ("(less the 1 s drain timeout) " if case == "cut" else "") + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
