"""Host cost of one streamed token on agp serve's path, in instructions (callgrind) or calls (cProfile).

A streamed token goes: the engine's RequestOutput -> the runtime's usage so far and the Delta its
listener hears (flow) -> the request's RequestStream (metrics, the hop to the event loop, its
queue: serve) -> ChunkWriter, the SSE `data:` line a client reads (serve/sse.py). With 512 streams
an engine step pays this 512 times on the host, against a GPU step of 1-2 ms.

This runs those pieces as agp serve wires them, on made-up engine outputs (no model): `tokens`
outputs are always built, and the first `through` of them go down the path as far as `part`
(flow, queue, chunk: each includes the ones before). The cost per token of a part is the
difference of two runs that differ only in `through` (N tokens minus 0 tokens), so the start-up,
the imports and the building of the outputs cancel out:

    python bench/stream_token_cost.py                 # callgrind where valgrind is installed, else cProfile
    python bench/stream_token_cost.py --calls         # Python calls per token (cProfile), anywhere
    python bench/stream_token_cost.py --kind completion --continuous-usage --tokens 2000

It prints, per part, instructions (or calls) per token, and the chunk's bytes once, to check by
eye that they are what a client reads.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

PARTS = ("flow", "queue", "chunk")


def path(tokens: int, through: int, part: str, kind: str, continuous: bool, n: int) -> bytes:
    """Build `tokens` engine outputs for `n` streamed choices; send the first `through` (per
    choice) down the path up to `part`. Returns the last SSE chunk made (b"" if none)."""
    from pipeline_dsl.engine.config import RequestOutput
    from pipeline_dsl.flow.items import GENERATED, Item, heard
    from pipeline_dsl.flow.ledger import RequestLedger
    from pipeline_dsl.serve import protocol as P
    from pipeline_dsl.serve.async_pipeline import RequestStream
    from pipeline_dsl.serve.metrics import ServerMetrics
    from pipeline_dsl.serve.sse import ChunkWriter

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    metrics = ServerMetrics(process=False)

    class Runtime:                                  # what ChunkWriter and RequestStream ask of it
        def abort(self, key, why=None):
            pass

        def token_text(self, pin):
            return None

        def token_bytes(self, pin):
            return None

    owner = type("Owner", (), {"metrics": metrics, "runtime": Runtime()})()
    stream = RequestStream(owner, loop)
    ledger = RequestLedger(lambda: 0.0)
    lock = threading.RLock()                        # the runtime's, taken for the usage so far (flow/engines.py)
    body = {"model": "m", "stream": True, "max_tokens": tokens + 1, "n": n}
    if continuous:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    if kind == "chat":
        req = P.parse_chat({**body, "messages": [{"role": "user", "content": "hi"}]}, max_model_len=1 << 20,
                           served=("m",))
    else:
        req = P.parse_completion({**body, "prompt": "hi"}, max_model_len=1 << 20, served=("m",))
    sink = type("Sink", (), {"on_delta": lambda self, key, index, delta: None})()
    listener = sink if part == "flow" else stream       # flow alone: a listener that keeps nothing
    state = ledger.admit({"id": "x"}, listener, None, True)
    stream.key = state.key
    items = []
    for index in range(n):
        item = Item(GENERATED, {}, state, index=index, entry={"cached_tokens": None})
        state.streaming[index] = (0, item.entry, 0)
        items.append(item)
    writer = ChunkWriter(Runtime(), stream, ("delta", 0, None), req, "chatcmpl-x", 1, lambda *a: None)
    words = ["Hello", ",", " wor", "ld", " \"q\"", " é", "\n", " 日本"]
    outs = []
    for index in range(n):
        text = ""
        for i in range(tokens):
            piece = words[i % len(words)]
            text += piece
            outs.append((items[index], RequestOutput(f"{state.key}/{index}", [1000 + i], piece, text, False, None,
                                                     7, i + 1, 0)))
    part_index = PARTS.index(part)

    async def drive() -> bytes:                      # the engine's thread and the client's task, in turn
        sent = b""
        for step in range(through):
            for index in range(n):
                item, out = outs[index * tokens + step]
                with lock:
                    usage = ledger.usage_so_far(item, out)
                heard(state, index, out, usage)       # -> the listener's on_delta
            if part_index >= 1:
                for _ in range(n):
                    event = await stream.__anext__()  # the hop to the loop, the queue
                    if part_index >= 2:
                        for line in writer.on_delta(event[1], event[2]):
                            sent = line
        return sent

    gc.collect()
    gc.freeze()                                      # as agp serve does: the loaded heap is not walked again
    sent = loop.run_until_complete(drive())
    loop.close()
    return sent


def child(args) -> None:
    sent = path(args.tokens, args.through, args.part, args.kind, args.continuous_usage, args.n)
    if args.show:
        sys.stdout.write(sent.decode())


def callgrind(args, through: int, part: str) -> int:
    out = tempfile.mktemp(prefix="agp-callgrind-")
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__, "--child",
           "--tokens", str(args.tokens), "--through", str(through), "--part", part, "--kind", args.kind,
           "-n", str(args.n)] + (["--continuous-usage"] if args.continuous_usage else [])
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    m = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or m is None:
        raise SystemExit(f"callgrind failed: {done.stderr[-2000:]}")
    os.unlink(out)
    return int(m.group(1))


def calls(args, through: int, part: str) -> int:
    import cProfile
    import pstats

    path(4, 4, "chunk", args.kind, args.continuous_usage, args.n)      # warm: imports, first-call caches
    prof = cProfile.Profile()
    prof.enable()
    path(args.tokens, through, part, args.kind, args.continuous_usage, args.n)
    prof.disable()
    return sum(s[1] for s in pstats.Stats(prof).stats.values())        # primitive + recursive calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1000, help="tokens per choice (default 1000)")
    ap.add_argument("--kind", choices=("chat", "completion"), default="chat")
    ap.add_argument("--continuous-usage", action="store_true", help="stream_options.continuous_usage_stats")
    ap.add_argument("-n", type=int, default=1, help="choices streamed side by side (default 1)")
    ap.add_argument("--calls", action="store_true", help="count Python calls (cProfile), not instructions")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--through", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=PARTS, default="chunk", help=argparse.SUPPRESS)
    ap.add_argument("--show", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    use_valgrind = not args.calls and shutil.which("valgrind") is not None
    measure, unit = (callgrind, "instructions") if use_valgrind else (calls, "calls")
    tokens = args.tokens * args.n
    base = measure(args, 0, "chunk")
    before, rows = 0.0, []
    for part in PARTS:
        total = (measure(args, args.tokens, part) - base) / tokens
        rows.append((part, total - before, total))
        before = total
    print(f"{args.kind}, n={args.n}, {args.tokens} tokens per choice"
          f"{', continuous usage' if args.continuous_usage else ''}: {unit} per token")
    for part, own, total in rows:
        print(f"  {part:6s} {own:10.0f}   (to here {total:.0f})")
    sample = subprocess.run([sys.executable, __file__, "--child", "--tokens", "3", "--through", "3", "--part",
                             "chunk", "--kind", args.kind, "-n", str(args.n), "--show"]
                            + (["--continuous-usage"] if args.continuous_usage else []),
                            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    print("last chunk:", json.dumps(sample.stdout))


if __name__ == "__main__":
    main()
