"""Speculative decoding by n-gram prompt lookup (vLLM's `method = ngram`).

Draft: a decoding sequence's last `prompt_lookup_min..prompt_lookup_max` tokens (its prompt and
output so far), the longest such suffix that occurred earlier in them, at its latest earlier
occurrence that `speculative_tokens` tokens follow (else its earliest); the draft is the (at most
`speculative_tokens`) tokens that followed it there. No
earlier occurrence: no draft, and the sequence decodes one token as without speculation.

Verify: the step feeds the sequence's last token and its drafts as one short chunk and keeps the
logits of every row (the runner's `rows`, as prompt logprobs take them); row i is the model's
distribution for the token after draft i - 1. Each row is processed and drawn in turn exactly as
the plain decode step at its position would draw it (processors.Features: penalties, bias,
min_tokens, bad words and logprobs see the tokens accepted before it; a sampled row takes its
request's next uniform number), and the draft is accepted when the token drawn is the draft: a
greedy row's argmax, a sampled row's draw x from p, accepted with probability p(t), a rejected
row's x distributed as p without t, renormalised (the exact rule for a point-mass proposal).
Each token is the one decoding without drafts would give at its position, so a seeded request's
text is the same whether, and however much, it drafted (batch, step budget, free KV blocks,
measured times). The first token that is not its row's draft ends the step: it is the
model's own, and the drafts after it are dropped with their K/V (the sequence's length rolls
back, blocks emptied by it are freed, and the prefix cache only ever publishes blocks of
accepted tokens). A step whose every draft is accepted adds the last row's token too.

When speculation pays. Verifying k drafts costs a forward over k + 1 rows; for one sequence on
a CPU the step is bound by reading the weights, so that costs little more than one row and any
accepted draft is a token for free. In a large decode batch the step is bound by arithmetic, the
extra rows cost what they compute, and the sequences' own tokens already share the weights'
reading: speculation runs only while at most `MAX_BATCH` sequences decode, and a step of more
decodes them all plainly. Where a GEMM of a few rows costs several times one row's (a CPU's fp32
GEMM against its GEMV, or the native one-row decode kernel), drafts that are seldom accepted lose:
on CPU the scheduler measures each verifying step against plain decode steps and pauses drafting
while it loses, trying again after a pause that doubles (Scheduler.verified).
docs/engine_benchmarks.md, "Speculative decoding", has the measurements.
"""
from __future__ import annotations

import numpy as np

MAX_BATCH = 4            # speculate only while at most this many sequences decode in the step


def ngram_draft(tokens, min_n: int, max_n: int, k: int) -> list[int]:
    """The draft for a sequence whose tokens so far are `tokens`: the `k` tokens (at most, at least
    one) that followed an earlier occurrence of its longest suffix of `min_n..max_n` tokens that
    occurred earlier (the latest that k tokens follow, else the earliest); [] when no suffix of at
    least `min_n` tokens did."""
    n_all = len(tokens)
    if k <= 0 or n_all < min_n + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, n_all - 1), min_n - 1, -1):
        suffix = arr[n_all - n:]
        # windows starting at 0..n_all - n - 1: each ends before the suffix's own last token
        windows = np.lib.stride_tricks.sliding_window_view(arr[:n_all - 1], n)        # [n_all - n, n]
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            # the latest occurrence that k tokens follow, else the earliest (the most follow it): in
            # text that repeats with a short period the latest is right before the suffix
            full = hits[hits + n + k <= n_all]
            start = int(full[-1] if full.size else hits[0]) + n
            return arr[start:start + k].tolist()
    return []
