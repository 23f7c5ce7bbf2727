"""The cost of counting a finished chat answer's thinking tokens under --reasoning-parser
(usage's reasoning_tokens), which the runtime worked out under its lock, so every other request
waited for it.

Before: every token of the answer decoded with the tokenizer's token_bytes (no cache), then
reasoning.count_tokens. Now: reasoning.count_token_ids reads the tokens up to the first
`</think>` only, each token's bytes from the segment's cache (EngineSegment.thinking_reader), by
the tag's id where it is one token (Qwen3's and R1's added token), else a chunk of bytes at a
time; and the runtime takes the count before its lock.

    python bench/reasoning_count.py                     # the embedded model's tokenizer, </think> added
    python bench/reasoning_count.py --tokens 32768 --thinking 2000 --repeat 5

It prints, per answer shape, the milliseconds of each way (best of --repeat), and checks that
they count alike.
"""
from __future__ import annotations

import argparse
import functools
import random
import time


def best(fn, repeat: int) -> tuple[float, int]:
    times, got = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        got = fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768, help="the answer's tokens")
    ap.add_argument("--thinking", type=int, default=2000, help="tokens before </think> (the ended shape)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from tokenizers import AddedToken

    from pipeline_dsl.engine.models import load_weights, resolve_model
    from pipeline_dsl.reasoning import END, count_token_ids, count_tokens

    _, _, tok = load_weights(resolve_model(None))
    tok.tk.add_tokens([AddedToken("<think>", special=False, normalized=False),
                       AddedToken("</think>", special=False, normalized=False)])
    end_id = tok.token_to_id(END)
    rng = random.Random(0)
    words = tok.encode(" ".join(rng.choice(["the", "sum", "of", "two", "and", "so", "4", "wait,", "check"])
                                for _ in range(args.tokens)), add_special_tokens=False)[:args.tokens]
    ended = words[:args.thinking] + [end_id] + words[args.thinking:args.tokens - 1]
    shapes = {"ended": ended, "all thinking": words}
    print(f"{args.tokens} tokens an answer; </think> is id {end_id}; best of {args.repeat} (ms)")
    print(f"{'answer':<14} {'before':>9} {'by id':>9} {'by bytes':>9} {'by id, cold':>12}")
    for name, ids in shapes.items():
        before, want = best(lambda: count_tokens([tok.token_bytes(t) for t in ids]), args.repeat)
        cached = functools.lru_cache(maxsize=1 << 16)(tok.token_bytes)
        cold, got_cold = best(lambda: count_token_ids(ids, functools.lru_cache(maxsize=1 << 16)(tok.token_bytes),
                                                      end_id), 1)
        by_id, got_id = best(lambda: count_token_ids(ids, cached, end_id), args.repeat)
        by_bytes, got_bytes = best(lambda: count_token_ids(ids, cached, None), args.repeat)
        assert want == got_id == got_bytes == got_cold, (name, want, got_id, got_bytes, got_cold)
        print(f"{name:<14} {before:9.1f} {by_id:9.2f} {by_bytes:9.2f} {cold:12.2f}   ({want} thinking tokens)")


if __name__ == "__main__":
    main()
