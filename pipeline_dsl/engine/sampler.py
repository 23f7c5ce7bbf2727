"""From logits to tokens, and from tokens to text.

`Sampler.sample_tensor` turns one step's logits `[n, vocab]` into token ids on their device
without a host sync: greedy rows by one vectorised argmax; sampled rows by temperature,
top-k, top-p and min-p over the whole sub-batch at once, then one uniform number per row
from that request's own `torch.Generator` (drawn on the host before the logits are known,
uploaded with the rows' parameters in one non-blocking copy), so a seeded request gives the
same tokens whatever else shares its batch. `Sampler.sample` is the same as a host list.

`Detokenizer` turns a request's growing id list into text incrementally (only the last
few tokens are decoded each step; an incomplete UTF-8 sequence waits for the next token),
and `StopStrings` finds stop strings and says how much trailing text to hold back
until it is clear that it does not start one.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .config import SamplingParams


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A per-request generator for a seeded request (None: use the shared one)."""
    if seed is None:
        return None
    if torch.device(device).type == "cpu":
        return seeded_cpu_generator(seed)
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)   # CUDA's Philox keeps all 64 bits
    return g


_MT_WORDS = 624        # mt19937's state: 624 32-bit words
_MT_AT = 24            # where torch's CPU generator state holds them (one uint64 each), after
                       # the initial seed (uint64), left and seeded (int32 each) and next (uint64)


def seeded_cpu_generator(seed: int) -> torch.Generator:
    """torch's CPU generator (mt19937) seeded so that every 64-bit seed is a stream of its own.

    torch's `manual_seed` keeps the seed's low 32 bits alone (mt19937's init_genrand takes one
    32-bit word), so 1 and 1 + 2**32, or -1 and 2**32 - 1, would draw the same numbers. A seed in
    [0, 2**32) is seeded as `manual_seed` seeds it, so its draws stay what they always were; any
    other (a negative seed as its 64-bit two's complement) fills the state by mt19937's
    init_by_array over the seed's two 32-bit halves, as Python's `random` seeds an int of more
    than 32 bits (and numpy's RandomState a longer key)."""
    u = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
    g = torch.Generator()
    g.manual_seed(u)
    if u < 1 << 32:
        return g
    words = random.Random(u).getstate()[1][:_MT_WORDS]   # init_by_array([low, high])
    state = g.get_state()                                # manual_seed's, with mt19937's words at _MT_AT
    raw = state.numpy()                                  # the same bytes
    head, mt = raw[8:16].view(np.int32), raw[_MT_AT:_MT_AT + 8 * _MT_WORDS].view(np.uint64)
    if head.tolist() != [1, 1] or int(mt[0]) != u & 0xFFFF_FFFF:   # left = 1, seeded; init_genrand's first word
        raise RuntimeError("torch's CPU generator state is not laid out as agp's seeding expects "
                           f"(torch {torch.__version__})")
    mt[:] = words                                        # left = 1, next = 0: a fresh twist first, as after manual_seed
    g.set_state(state)
    return g


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A small host tensor on `dev` without waiting for the work queued there: on CUDA through
    pinned memory, non-blocking (a pageable copy would wait for the step's forward)."""
    if dev.type == "cpu":
        return t
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


class Sampler:
    def __init__(self, seed: int | None = None):
        """`seed`: the stream of unseeded requests (None: a fresh one from the OS's entropy).
        Either way the generator is the sampler's own: torch's global generator (which a
        user's stage may have seeded for its own draws) is neither read nor reseeded."""
        if seed is None:
            self.shared = torch.Generator()
            self.shared.seed()            # this generator's own nondeterministic seed, not torch.seed()
        else:
            self.shared = seeded_cpu_generator(seed)

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> list[int]:
        """logits [n, V] float -> n token ids (one per row, rows in request order)."""
        return self.sample_tensor(logits, params, generators).tolist()

    def sample_tensor(self, logits: torch.Tensor, params: list[SamplingParams],
                      generators: list[torch.Generator | None]) -> torch.Tensor:
        """logits [n, V] -> [n] long token ids on the logits' device, without a host sync.

        What a row's draw needs from the host — its temperature, top-k, top-p, min-p and its
        uniform number — is known before the logits are: the uniforms come from each request's
        own CPU generator (or the shared one), drawn in row order, one call per generator, then
        everything goes up in one non-blocking copy and the draw runs on the device over all
        sampled rows at once. The tokens are those a per-row draw would give (same generator
        stream, same arithmetic): a seeded request gives the same tokens on any batch."""
        greedy = logits.argmax(dim=-1)  # [n]
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return greedy
        ps = [params[i] for i in rows]
        vocab = logits.shape[-1]
        host = torch.tensor([[float(i) for i in rows], [p.temperature for p in ps],
                             [p.top_k if 0 < p.top_k < vocab else vocab for p in ps],
                             [p.top_p for p in ps], [p.min_p for p in ps]], dtype=torch.float64)  # [5, m]
        host = torch.cat([host, self._uniforms([generators[i] for i in rows])[None]])            # [6, m]
        idx, temps, ks, top_p, min_p, u = to_device(host, logits.device)                          # [m] each
        idx = idx.long()
        sub = logits.index_select(0, idx).float()                                                # [m, V]
        need_sort = any(p.top_p < 1.0 or 0 < p.top_k < vocab for p in ps)
        need_min_p = any(p.min_p > 0.0 for p in ps)
        picked = self._sample_rows(sub, temps, ks.long(), top_p, min_p, u, need_sort, need_min_p)
        return greedy.index_copy(0, idx, picked)

    def _uniforms(self, generators: list[torch.Generator | None]) -> torch.Tensor:
        """[m] float64: each row's next number from its generator, rows of one generator in order."""
        at: dict[int, list[int]] = {}
        gens: dict[int, torch.Generator] = {}
        for j, g in enumerate(generators):
            g = g or self.shared
            at.setdefault(id(g), []).append(j)
            gens[id(g)] = g
        u = torch.empty(len(generators), dtype=torch.float64)
        for key, js in at.items():
            u[js] = torch.rand(len(js), generator=gens[key], dtype=torch.float64)   # = len(js) draws of 1
        return u

    def _sample_rows(self, logits, temps, ks, top_p, min_p, u, need_sort: bool, need_min_p: bool):
        """logits [m, V] float32 and the rows' parameters [m] (on its device) -> [m] token ids."""
        m, vocab = logits.shape
        dev = logits.device
        logits = logits / temps.to(logits.dtype)[:, None]  # [m, V]
        # every row's probabilities come from one softmax in vocabulary order: a softmax over
        # sorted logits sums them in another order, and its last-bit differences move the cdf's
        # boundaries, so a seeded row's token would change with whether a neighbour in its batch
        # asked for top-k or top-p
        probs = torch.softmax(logits, dim=-1)  # [m, V]
        if need_sort:
            # top-k and top-p decide which tokens stay, from the probabilities sorted; only rows
            # that ask for a cut are cut (the others keep every token, bit for bit)
            ranked, order = probs.sort(dim=-1, descending=True)  # [m, V] each
            ranks = torch.arange(vocab, device=dev)[None, :]  # [1, V]
            ranked = ranked.masked_fill(ranks >= ks[:, None], 0.0)  # top-k
            before = ranked.cumsum(dim=-1) - ranked  # [m, V] mass of the kept tokens ranked above
            mass = ranked.sum(dim=-1, keepdim=True)  # [m, 1] what top-k keeps: top-p is a share of it
            cut = (ranks >= ks[:, None]) | (before >= top_p.to(probs.dtype)[:, None] * mass)  # the first always stays
            cuts = (ks < vocab) | (top_p < 1.0)  # [m] rows that asked for a cut
            cut = cut & cuts[:, None]
            probs = probs.masked_fill(torch.zeros_like(cut).scatter_(1, order, cut), 0.0)  # back to vocabulary order
        if need_min_p:
            # min-p: below min_p * the likeliest token's probability (the ratio is the same before
            # and after the cuts above, which renormalise every kept token alike)
            top = probs.max(dim=-1, keepdim=True).values  # [m, 1]
            probs = probs.masked_fill(probs < min_p.to(probs.dtype)[:, None] * top, 0.0)  # the likeliest always stays
        cdf = probs.cumsum(dim=-1)  # [m, V]
        u = u.to(cdf.dtype) * cdf[:, -1]  # [m] scaled to each row's total mass
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

    def find(self, text: str, new_from: int, report: bool = True) -> int:
        """Consume text[new_from:]; the index in `text` where the first stop string to complete
        begins (the longest of those completing at the same character; its length: `matched`),
        or -1. `report=False` consumes the text and reports nothing that completes in it (a
        request's min_tokens not reached yet)."""
        if not self.stops:
            return -1
        goto, fail, match = self._goto, self._fail, self._match
        state = self._state
        for i in range(new_from, len(text)):
            ch = text[i]
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if match[state] and report:
                self._state = state
                self.matched = match[state]
                return i - match[state] + 1
        self._state = state
        return -1

    def hold_back(self, text: str | None = None) -> int:
        """Length of the text's tail that may still become a stop string (held back from output)."""
        return self._depth[self._state]
