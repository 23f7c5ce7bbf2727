"""Speculative decoding by n-gram prompt lookup: one request alone on the CPU, tokens/s off vs on.

The embedded model, greedy (so both runs give the same tokens: the difference is speed alone),
one request at a time, in one process: an engine without speculation and one with it on the same
loaded weights, taking turns (off, on, on, off, ...: the machine's speed drifts). For each prompt it
prints the decode's tokens/s (tokens after the first over the time after the first: the prefill is
the same either way), the ratio on / off, the steps that verified drafts and the acceptance rate
(accepted / drafted tokens), and whether the answers were the same.

    OMP_NUM_THREADS=2 .venv/bin/python bench/speculate.py
    OMP_NUM_THREADS=2 .venv/bin/python bench/speculate.py --rounds 3 --tokens 4 --max-tokens 192
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")     # before torch loads: a lone request on two cores

import argparse
import statistics
import time

TEXT = ("The lighthouse on Skerry Point was built in 1873 from granite quarried on the island itself. "
        "Its lamp burned paraffin until 1952, when the keepers installed an electric lantern and a "
        "diesel generator. The last keeper, Margaret Hale, left in 1987, after the light was automated; "
        "she had kept it for twenty-two years and logged every ship that passed in a ledger now held by "
        "the county museum.")
CODE = ('def total_price(items, tax_rate):\n    subtotal = 0\n    for item in items:\n'
        '        subtotal += item.price * item.quantity\n    tax = subtotal * tax_rate\n'
        '    return subtotal + tax\n')
PROMPTS = {
    # the answer repeats its prompt: drafts found and accepted
    "repeat": f"Here is a paragraph:\n\n{TEXT}\n\nCopy the paragraph above exactly, word for word.",
    "code edit": f"Rename the variable `subtotal` to `net` in this function and show the whole function:\n\n"
                 f"```python\n{CODE}```",
    # free text: few drafts
    "free": "Write a short story about a cat who learns to sail.",
}


def run_one(engine, rid: str, prompt: str, max_tokens: int, batch: int = 1):
    """`batch` copies of the request at once (each with a suffix of its own); the decode's tokens/s
    over them all (from the first step that gave every one its first token), the first copy's
    tokens and the speculation counters."""
    from pipeline_dsl.engine import SamplingParams

    for i in range(batch):
        engine.add_request(f"{rid}-{i}", messages=[{"role": "user", "content": prompt + " " * i}],
                           params=SamplingParams(max_tokens=max_tokens))
    before = engine.stats(latencies=False)
    first = last = None
    tokens: dict[str, list[int]] = {}
    counted = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.new_token_ids:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if first is not None:
                    counted += len(out.new_token_ids)
                last = now
        if first is None and len(tokens) == batch:
            first = now
    after = engine.stats(latencies=False)
    counts = {k: after[k] - before[k] for k in ("spec_drafts", "spec_draft_tokens", "spec_accepted_tokens")}
    rate = counted / (last - first) if first is not None and last > first else float("nan")
    return rate, tokens.get(f"{rid}-0", []), counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--tokens", type=int, default=4, help="speculative_tokens (vLLM's num_speculative_tokens)")
    ap.add_argument("--lookup-max", type=int, default=4)
    ap.add_argument("--lookup-min", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="copies of each request at once (default: one alone)")
    ap.add_argument("--spec-max-batch", type=int, default=None,
                    help="speculate while at most this many sequences decode (default: speculate.MAX_BATCH), "
                         "to measure the rule")
    args = ap.parse_args()

    import torch

    from pipeline_dsl.engine import Engine, EngineConfig
    from pipeline_dsl.engine.models import LoadedModels

    if args.spec_max_batch is not None:
        from pipeline_dsl.engine import scheduler

        scheduler.SPECULATE_MAX_BATCH = args.spec_max_batch
    threads = int(os.environ["OMP_NUM_THREADS"])
    models = LoadedModels()
    base = dict(model=args.model, threads=threads, batch_timeout_s=0.0, max_batch_size=args.batch)
    engines = {"off": Engine(EngineConfig(**base), models=models),
               "on": Engine(EngineConfig(**base, speculate="ngram", speculative_tokens=args.tokens,
                                         prompt_lookup_max=args.lookup_max, prompt_lookup_min=args.lookup_min),
                            models=models)}
    print(f"model {args.model}, {threads} threads (torch {torch.__version__}), speculative_tokens {args.tokens}, "
          f"prompt_lookup {args.lookup_min}..{args.lookup_max}, {args.rounds} rounds, max_tokens {args.max_tokens}, "
          f"{args.batch} request(s) at once")
    for e in engines.values():                    # warm-up: first steps pay for lazy set-up
        run_one(e, "warm", "Hi", 8)
    for name, prompt in PROMPTS.items():
        rates: dict[str, list[float]] = {"off": [], "on": []}
        answers, counts = {}, {}
        for r in range(args.rounds):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                rate, tokens, c = run_one(engines[mode], f"{name}-{mode}-{r}", prompt, args.max_tokens, args.batch)
                rates[mode].append(rate)
                answers.setdefault(mode, tokens)
                if mode == "on":
                    counts = {k: counts.get(k, 0) + v for k, v in c.items()}
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        drafted = counts["spec_draft_tokens"]
        accept = counts["spec_accepted_tokens"] / drafted if drafted else 0.0
        print(f"{name:10s} {len(answers['off']):4d} tokens  off {off:7.1f} tok/s  on {on:7.1f} tok/s  "
              f"x{on / off:5.2f}  drafts {counts['spec_drafts'] // (args.rounds * args.batch):4d}/request  "
              f"acceptance {accept:5.1%}  "
              f"same answer: {answers['on'] == answers['off']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
