"""Outputs over every row of a prompt, computed chunk by chunk as the prompt is prefilled.

A request that asks for its prompt's logprobs (`SamplingParams.prompt_logprobs`: echo, lm-eval
scoring) or for the mean of its prompt's final hidden states (`SamplingParams.pooling = "mean"`:
embeddings) is prefilled like any other: in chunks of at most `prefill_chunk` tokens, scheduled
beside other requests' decodes within the step's token budget (vLLM's prompt_logprobs). Its batch
items carry `rows` (model.SeqBatchItem): the runner returns, for every row of such a chunk, the
logits [n, V] and/or the final normed hidden states [n, H]; `reduce_chunk` turns them into a few
numbers per row on the compute thread (log-softmax over at most `ROW_BLOCK` rows at a time, so
memory is bounded by the chunk, never [T, V] for the whole prompt), and `PromptOutputs.add`
accumulates them on the sequence on the host. A request with `max_tokens = 0` finishes right after
its prefill without sampling (the engine's `finish_prefilled`).

The mean hidden state is the sum of the rows in position order, one row after another (each
chunk's rows added to the running sum on the host), divided by their number: the same bits however
the prompt was cut into chunks, which the step's budget left by the requests beside it decides (a
sum per chunk, then over the chunks, rounded differently with every cut).

Such a request never reads the prefix cache (every row must be computed). A preempted one keeps
the rows it has: a chunk computed before the preemption (an executor that schedules ahead emits it
after) still counts, and outputs already complete are not recomputed; outputs still incomplete start
over when its recomputation's first chunk comes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .sampler import to_device

ROW_BLOCK = 64            # rows log-softmaxed at once: [64, V] float32 temporaries at most

LOGITS, HIDDEN = "logits", "hidden"


def rows_wanted(params) -> tuple[str, ...]:
    """What the runner must return for every prompt row of a request: () for most requests."""
    wanted = ()
    if getattr(params, "prompt_logprobs", None) is not None:
        wanted += (LOGITS,)
    if getattr(params, "pooling", None) is not None:
        wanted += (HIDDEN,)
    return wanted


@dataclass
class ChunkRows:
    """One chunk's rows, reduced (tensors on the compute device until `PromptOutputs.add`)."""
    start: int                               # position of the chunk's first row
    num_rows: int
    picked: torch.Tensor | None = None       # [m] logprob of the next prompt token, m <= num_rows
    ranks: torch.Tensor | None = None        # [m] its rank: 1 + the tokens more likely than it (vLLM's)
    top_ids: torch.Tensor | None = None      # [m, k]
    top_values: torch.Tensor | None = None   # [m, k]
    hidden: torch.Tensor | None = None       # [n, H] float32: the rows' normed hidden states


def reduce_chunk(start: int, rows: dict, targets: list[int], top: int | None) -> ChunkRows:
    """Reduce one chunk's rows (`rows`: {"logits": [n, V], "hidden": [n, H]} from the runner) with
    `targets` = the prompt tokens after each row (shorter than n for the prompt's last row); top:
    alternatives per logprob."""
    logits, hidden = rows.get(LOGITS), rows.get(HIDDEN)
    n = (logits if logits is not None else hidden).shape[0]
    out = ChunkRows(start, n)
    if logits is not None and top is not None and targets:
        m = len(targets)
        tgt = to_device(torch.tensor(targets, dtype=torch.long), logits.device)  # [m]: no wait for the forward
        picked, ranks, ids, values = [], [], [], []
        for a in range(0, m, ROW_BLOCK):
            b = min(a + ROW_BLOCK, m)
            lp = torch.log_softmax(logits[a:b].float(), dim=-1)                  # [b-a, V]
            got = lp.gather(1, tgt[a:b, None])                                   # [b-a, 1]
            picked.append(got.squeeze(1))                                        # [b-a]
            ranks.append((lp > got).sum(dim=-1) + 1)                             # [b-a]
            if top:
                best = lp.topk(top, dim=-1)                                      # [b-a, k]
                ids.append(best.indices)
                values.append(best.values)
        out.picked, out.ranks = torch.cat(picked), torch.cat(ranks)              # [m] each
        if top:
            out.top_ids, out.top_values = torch.cat(ids), torch.cat(values)      # [m, k]
    if hidden is not None:
        out.hidden = hidden.float()                                              # [n, H]
    return out


@dataclass
class PromptOutputs:
    """A sequence's prompt outputs so far (host side; owned by the engine's update)."""
    num_prompt: int
    top: int | None                          # prompt logprobs with this many alternatives; None: none
    pooling: str | None                      # "mean": mean of the final normed hidden states
    next: int = 0                            # prompt rows accumulated so far
    # None for the first token, then {"token_id", "logprob", "rank", "top"} per prompt token
    logprobs: list = field(default_factory=list)
    hidden_sum: np.ndarray | None = None     # [H] float32: the rows so far, added in position order
    delivered: bool = False                  # handed out with the sequence's first output

    @property
    def complete(self) -> bool:
        return self.next >= self.num_prompt

    def add(self, chunk: ChunkRows, prompt_ids: list[int]) -> None:
        """Accumulate a chunk (in order; a chunk that does not continue the last is ignored, but a
        first chunk: the prompt recomputed after a preemption starts incomplete outputs over)."""
        if self.complete:
            return
        if chunk.start == 0:
            self.next, self.logprobs, self.hidden_sum = 0, [], None
        elif chunk.start != self.next:
            return
        if self.top is not None:
            if chunk.start == 0:
                self.logprobs.append(None)                  # the first token has no context
            if chunk.picked is not None:
                values, ranks = chunk.picked.tolist(), chunk.ranks.tolist()
                ids = chunk.top_ids.tolist() if chunk.top_ids is not None else None
                tops = chunk.top_values.tolist() if chunk.top_values is not None else None
                for i, value in enumerate(values):
                    p = chunk.start + i + 1                 # the token this row predicts
                    alts = list(zip(ids[i], tops[i])) if ids is not None else []
                    self.logprobs.append({"token_id": prompt_ids[p], "logprob": float(value), "rank": int(ranks[i]),
                                          "top": alts})
        if chunk.hidden is not None:
            rows = chunk.hidden.cpu().numpy()                                    # [n, H]
            if self.hidden_sum is not None:
                rows = np.concatenate([self.hidden_sum[None], rows])
            # a running sum, row after row (ufunc.accumulate adds in order; a sum would pair rows up)
            self.hidden_sum = np.add.accumulate(rows, axis=0)[-1]
        self.next = chunk.start + chunk.num_rows

    def take(self) -> tuple[list | None, list | None]:
        """(prompt logprobs, pooled vector) once the prompt is complete, the first time asked."""
        if self.delivered or not self.complete:
            return None, None
        self.delivered = True
        pooled = None
        if self.pooling == "mean" and self.hidden_sum is not None:
            pooled = (self.hidden_sum / np.float32(self.num_prompt)).tolist()
        return (self.logprobs if self.top is not None else None), pooled
