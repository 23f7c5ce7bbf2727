"""A request's decode state: what the engine keeps per sequence between steps, typed.

`Sequence.state` holds one `DecodeState` (nano-vllm's `Sequence` and vLLM v1's
`RequestState` keep the same things as attributes). Who writes what:

- the engine at add_request: the detokenizer, stop strings, the seeded generator;
  accept_token: the text, what was emitted, the first/last token times;
- the sampling features (processors.py) at add_request (`Features.start`) and on the
  sampling thread: the slot of the penalty rows, tokens sampled, the grammar matcher,
  the logprob FIFO, a refused token;
- an executor that schedules ahead: `pending`, the placeholders of tokens still in flight.

The scheduler's own per-sequence caches (the prompt's block keys) live on the scheduler.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class DecodeState:
    # text (the host, accept_token)
    detok: Any = None                     # Detokenizer-like: add(token, final) / flush()
    stops: Any = None                     # sampler.StopStrings
    text: str = ""                        # all text so far (stop strings cut)
    emitted: int = 0                      # characters of `text` already reported
    first: float | None = None            # clock time of the first token (TTFT)
    last: float | None = None             # ... of the latest token (inter-token latency)
    generator: Any = None                 # torch.Generator of a seeded request; None: the shared one
    # sampling features (processors.Features)
    plain: bool = True                    # uses none of them: the fast path
    sampled: int = 0                      # tokens sampled so far (min_tokens progress)
    matcher: Any = None                   # the grammar's matcher, or None
    slotted: bool = False                 # has a row of the penalty / bias tensors
    slot: int | None = None               # ... that row, once taken (the sampling thread)
    banned: tuple[int, ...] = ()          # EOS and stop ids masked until min_tokens
    bad_words: tuple = ()                 # bad_words' token sequences (the engine, at add_request)
    tail: deque | None = None             # the last tokens sampled, as long as the longest bad word less one
    lp: deque | None = None               # FIFO of (StepLogprobs, row, k) per sampled token
    error_at: int | None = None           # output index of a token the grammar refused
    error: str | None = None              # ... and why
    error_param: str | None = None        # ... and the request field at fault, when not the grammar (bad_words)
    # executor: output position -> (micro-batch, sample index) of a token still in flight
    pending: dict[int, tuple[int, int]] = field(default_factory=dict)
    # executor: a step verifying this sequence's drafts is in flight (speculate.py): it is scheduled
    # again once that step's tokens are known
    verifying: bool = False
