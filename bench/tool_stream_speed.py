"""What reading a long tool-calling answer costs agp serve's event loop: seconds to feed an answer
of N characters, a few characters a delta (a token's), through `pipeline_dsl.tools.tool_stream`
of each parser, and the finish ("stream"); and to parse the whole answer at once
(`parse_tool_calls`, "whole"). The stream holds a call back until it is whole, so each delta
must cost its own length: the times grow with N, not N squared (twice the answer, about twice
the time).

    python bench/tool_stream_speed.py                       # 100,000 and 400,000 characters
    python bench/tool_stream_speed.py --chars 50000 200000 --delta 3

Answers: a call whose arguments run long in each family's form (hermes `<tool_call>{...`,
llama3_json `{"name": ..., "parameters": {...`, mistral `[TOOL_CALLS][{...`), white space
alone (a model that writes spaces until max_tokens), and `<tool_call>` again and again (hermes,
never closed). Prints one line per answer and size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline_dsl.tools import parse_tool_calls, tool_stream  # noqa: E402


def answers(n: int) -> list[tuple[str, str]]:
    body = '"' + "x" * n + '"}}'
    return [("hermes", '<tool_call>{"name": "f", "arguments": {"a": ' + body + "</tool_call>"),
            ("llama3_json", '{"name": "f", "parameters": {"a": ' + body),
            ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": ' + body + "]"),
            ("hermes", " " * n), ("llama3_json", " " * n), ("mistral", " " * n),
            ("hermes", "<tool_call>" * (n // len("<tool_call>")))]


def whole(parser: str, text: str) -> float:
    t0 = time.perf_counter()
    parse_tool_calls(text, None, parser)
    return time.perf_counter() - t0


def cost(parser: str, text: str, delta: int) -> float:
    stream = tool_stream(None, parser)
    t0 = time.perf_counter()
    for i in range(0, len(text), delta):
        stream.feed(text[i:i + delta])
    stream.finish()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, nargs="+", default=[100_000, 400_000])
    ap.add_argument("--delta", type=int, default=4, help="characters a delta (default 4, about a token)")
    args = ap.parse_args()
    for n in args.chars:
        for parser, text in answers(n):
            kind = "white space" if not text.strip() else "opens" if text.endswith("<tool_call>") else "long call"
            print(f"{parser:12} {kind:12} {len(text):>9,} chars  stream {cost(parser, text, args.delta):7.3f} s  "
                  f"whole {whole(parser, text):7.3f} s")


if __name__ == "__main__":
    main()
