"""From logits to tokens, and from tokens to text.

`Sampler.sample` turns one step's logits `[n, vocab]` into token ids: greedy rows by one
vectorised argmax; sampled rows by temperature, top-k, top-p and min-p over the whole
sub-batch at once, then one uniform draw per row from that request's own
`torch.Generator`, so a seeded request gives the same tokens whatever else shares its batch.

`Detokenizer` turns a request's growing id list into text incrementally (only the last
few tokens are decoded each step; an incomplete UTF-8 sequence waits for the next token),
and `StopStrings` finds stop strings and says how much trailing text to hold back
until it is clear that it does not start one.
"""

from __future__ import annotations

import torch

from .config import SamplingParams


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A per-request generator for a seeded request (None: use the shared one)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


class Sampler:
    def __init__(self, seed: int | None = None):
        self.shared = torch.Generator()
        self.shared.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF if seed is not None else torch.seed())

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> list[int]:
        """logits [n, V] float -> n token ids (one per row, rows in request order)."""
        greedy = logits.argmax(dim=-1)  # [n]
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return greedy.tolist()
        out = greedy.clone()
        out[rows] = self._sample_rows(logits[rows].float(), [params[i] for i in rows],
                                      [generators[i] for i in rows])
        return out.tolist()

    def _sample_rows(self, logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
        m, vocab = logits.shape
        dev = logits.device
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)  # [m]
        logits = logits / temps[:, None]  # [m, V]
        need_sort = any(p.top_p < 1.0 or 0 < p.top_k < vocab for p in params)
        if need_sort:
            logits, order = logits.sort(dim=-1, descending=True)  # [m, V] each
            ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)  # [m]
            ranks = torch.arange(vocab, device=dev)[None, :]  # [1, V]
            logits = logits.masked_fill(ranks >= ks[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [m, V]
        if need_sort:
            top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=dev)  # [m]
            before = probs.cumsum(dim=-1) - probs  # [m, V] mass of the tokens ranked above
            probs = probs.masked_fill(before >= top_p[:, None], 0.0)  # the first always stays
            # back to vocabulary order: every row draws in the same order whether or not its batch
            # needed sorting, so a seeded request's tokens do not depend on what shares its batch
            probs = torch.zeros_like(probs).scatter_(1, order, probs)
        if any(p.min_p > 0.0 for p in params):
            # min-p: below min_p * the likeliest token's probability (the ratio is the same before
            # and after the cuts above, which renormalise every kept token alike)
            min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=dev)  # [m]
            top = probs.max(dim=-1, keepdim=True).values  # [m, 1]
            probs = probs.masked_fill(probs < min_p[:, None] * top, 0.0)  # the likeliest always stays
        cdf = probs.cumsum(dim=-1)  # [m, V]
        # one draw per row from the request's own CPU generator: the same stream on any device
        u = torch.cat([torch.rand(1, generator=g or self.shared, dtype=torch.float64) for g in generators])  # [m]
        u = u.to(device=dev, dtype=cdf.dtype) * cdf[:, -1]  # [m] scaled to each row's total mass
        picked = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)  # [m]
        picked = picked.clamp_(max=vocab - 1)
        # a zero-probability token can never be picked: step back past any flat cdf tail
        picked = torch.where(probs.gather(1, picked[:, None]).squeeze(1) > 0, picked,
                             probs.argmax(dim=-1))
        return picked


class Detokenizer:
    """Incremental text of one request's generated ids.

    `decode(ids) -> str` is the tokenizer's decode without special tokens. Each step
    decodes a short window (`prefix..read` = already emitted context, `read..` = new),
    so the cost does not grow with the length of the answer.
    """

    CONTEXT = 5  # prompt tokens decoded as left context (spacing of the first word)

    def __init__(self, decode, prompt_ids: list[int]):
        self._decode = decode
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int, final: bool = False) -> str:
        """Append one id; return the text it completes (empty while UTF-8 is partial)."""
        self.ids.append(token_id)
        return self.flush() if final else self._step(final=False)

    def flush(self) -> str:
        """Everything not yet returned, even an incomplete character (end of the request)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            if len(self.ids) > 4 * self.CONTEXT:  # keep the window short
                drop = self.prefix
                self.ids = self.ids[drop:]
                self.prefix, self.read = 0, self.read - drop
            return delta
        return ""


class StopStrings:
    """Finds stop strings in a request's growing text, in time linear in the new text.

    An Aho–Corasick automaton over the stop strings is fed each piece of new text once
    (`find(text, new_from)` consumes `text[new_from:]`); its state is the longest suffix of
    the text so far that begins some stop string, which is exactly the tail to hold back
    (`hold_back()`): the cost per token does not grow with the stop strings' or the text's
    length, however long they are."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self._goto: list[dict[str, int]] = [{}]
        self._fail = [0]
        self._depth = [0]
        self._match = [0]                   # the longest stop string ending at this state (0: none)
        for stop in self.stops:
            node = 0
            for ch in stop:
                nxt = self._goto[node].get(ch)
                if nxt is None:
                    nxt = len(self._goto)
                    self._goto[node][ch] = nxt
                    self._goto.append({})
                    self._fail.append(0)
                    self._depth.append(self._depth[node] + 1)
                    self._match.append(0)
                node = nxt
            self._match[node] = max(self._match[node], len(stop))
        queue = list(self._goto[0].values())
        while queue:                        # breadth first: fail links point to shallower states
            node = queue.pop(0)
            for ch, nxt in self._goto[node].items():
                f = self._fail[node]
                while f and ch not in self._goto[f]:
                    f = self._fail[f]
                self._fail[nxt] = self._goto[f].get(ch, 0) if self._goto[f].get(ch, 0) != nxt else 0
                self._match[nxt] = max(self._match[nxt], self._match[self._fail[nxt]])
                queue.append(nxt)
        self._state = 0
        self.matched = 0                    # the length of the stop string find() found

    def find(self, text: str, new_from: int) -> int:
        """Consume text[new_from:]; the index in `text` where the first stop string to complete
        begins (the longest of those completing at the same character; its length: `matched`),
        or -1."""
        if not self.stops:
            return -1
        goto, fail, match = self._goto, self._fail, self._match
        state = self._state
        for i in range(new_from, len(text)):
            ch = text[i]
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if match[state]:
                self._state = state
                self.matched = match[state]
                return i - match[state] + 1
        self._state = state
        return -1

    def hold_back(self, text: str | None = None) -> int:
        """Length of the text's tail that may still become a stop string (held back from output)."""
        return self._depth[self._state]
