"""The OpenAI / vLLM sampling features, between the model's logits and the draw.

`Features.sample(logits, seqs, sampler, is_live)` is one step's sampling (Engine.sample;
the executor's compute thread). A step none of whose rows uses a feature goes straight
to `draw` — the all-greedy argmax without a host sync, else the Sampler — as it did
before the features existed. Otherwise, for the rows that use them, in this order, each
vectorised over those rows:

    raw logprobs  log_softmax (fp32) of the rows, before anything below changes them
    logit_bias    + the request's bias row                          [r, V] gather + add
    allowed ids   in the same row: -inf at every token outside allowed_token_ids (vLLM's mask),
                  so the restriction costs nothing per step beyond the bias add
    repetition    tokens of the prompt or the output: logit > 0: / r, else * r
    bad words     -inf at the last token of each bad word whose other tokens end the output
                  (vLLM's bad_words: a one-token word always, a longer one after its prefix)
    freq/presence + the request's penalty row: -(frequency * count + presence) at tokens
                  of the output, kept up to date as tokens are sampled (no pass over counts)
    min_tokens    EOS and stop_token_ids -> -inf until min_tokens were generated
    constraint    the grammar's allowed-token mask (constrain.apply_masks, one bitmask per row)
    draw          greedy argmax, or temperature / top-k / top-p / min_p (Sampler)

and after the draw: the penalised rows' counts, penalty and seen entries at their tokens
(index_put of r elements), each matcher advanced by its token, each bad-word tail by its
token, the logprob rows kept for the host.

State. Per sequence in `seq.state` (state.DecodeState) (set by `start` at add_request on the host): `plain`,
the number of tokens sampled so far, the grammar matcher, a FIFO of logprob entries. The
rows of the `[slots, V]` tensors (bias, additive penalty, output counts, seen = prompt or
output token) are taken and given back only on the sampling thread: a finished sequence is put
on `released` by the host and its slot reused from the next step on, so a step scheduled
before the sequence finished (optimistic scheduling) never writes into a slot another
sequence holds — rows of sequences no longer live are sampled plainly and discarded.

Every token sampled for a live sequence is accepted by the host in sampling order (an
executor discards only the tokens of finished or aborted sequences), so the counts, the
matcher and the logprob FIFO stay in step with the output, preemption (recompute) included:
a preempted sequence keeps its state and re-prefills, it does not sample again what it has.

What is not vectorised: a per-step Python loop over the rows that use a feature (their
slot, min_tokens progress, building index lists) and one `Matcher.accept` per constrained
row (llguidance is a CPU state machine: constrained rows cost one host sync on CUDA), and
the tails of rows with a bad word of several tokens (the same host sync: which word's prefix
ends the output is known on the host).
"""
from __future__ import annotations

from collections import deque

import torch

from . import constrain


def _to(values, dev, dtype=torch.long) -> torch.Tensor:
    """A small host list as a tensor on `dev`; to CUDA through pinned memory, without blocking on
    the work queued before it (a pageable copy would wait for the step's forward)."""
    t = torch.tensor(values, dtype=dtype)
    if dev.type == "cpu":
        return t
    return t.pin_memory().to(dev, non_blocking=True)


def top_logprobs(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of `lp` [r, V], most likely first, tokens tied at one value by
    token id: ([r, k] float32 values, [r, k] ids). torch.topk breaks ties as its k leads it
    (topk(5)[:1] is not always topk(1)), so a row's alternatives would change with the count its
    step's other rows ask for; here a row's first k are the same whatever k is. Without a tie
    among a row's k + 1 largest, topk's answer is the only one; with one (a bf16 model's logits
    often tie), one topk over int64 keys: the value's bits as an order-preserving integer above,
    the id reversed below. Off the CPU always the keys (no host sync to look for a tie: a step
    with a logprobs row would wait for the device); on the CPU, where looking costs nothing, the
    plain topk when no tie (the keys' passes over [r, V] cost several times its time)."""
    lp = lp.float()
    V = lp.shape[-1]
    if lp.device.type == "cpu":
        values, ids = lp.topk(min(k + 1, V), dim=-1)                         # [r, k + 1]
        if not bool((values[:, 1:] == values[:, :-1]).any()):
            return values[:, :k], ids[:, :k]
    bits = (lp + 0.0).view(torch.int32)                                      # [r, V]; -0.0 as 0.0
    order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()            # ordered as the floats
    below = V - 1 - torch.arange(V, device=lp.device)                        # [V] lower id, larger key
    ids = ((order << 32) | below).topk(k, dim=-1).indices                    # [r, k]
    return lp.gather(1, ids), ids


def draw(sampler, logits: torch.Tensor, seqs) -> torch.Tensor:
    """The plain draw: [n, V] -> [n] token ids (long, on the logits' device, no host sync)."""
    if all(s.params.greedy for s in seqs):
        return logits.argmax(dim=-1)                                   # [n]
    return sampler.sample_tensor(logits, [s.params for s in seqs], [s.state.generator for s in seqs])


class StepLogprobs:
    """The logprob rows of one step (device tensors), turned into lists once, by the host."""

    __slots__ = ("token_lp", "top_lp", "top_ids", "_host")

    def __init__(self, token_lp, top_lp, top_ids):
        self.token_lp, self.top_lp, self.top_ids = token_lp, top_lp, top_ids   # [r], [r, K], [r, K]
        self._host = None

    def entry(self, row: int, k: int, token: int) -> dict:
        if self._host is None:
            self._host = (self.token_lp.tolist(), self.top_lp.tolist(), self.top_ids.tolist())
        lp, top_lp, top_ids = self._host
        return {"token_id": int(token), "logprob": lp[row],
                "top": list(zip(top_ids[row][:k], top_lp[row][:k]))}


class Features:
    """The features' state of one engine's sequences and the step that applies them."""

    def __init__(self, vocab_size: int, eos_token_ids=()):
        self.vocab = int(vocab_size)
        self.eos = tuple(sorted(eos_token_ids))
        self.capacity = 0
        # [capacity, V]: logit_bias (f32), -(frequency * count + presence) (f32), output counts
        # (int32), seen = in the prompt or the output (bool)
        self.bias = self.pen = self.counts = self.seen = None
        self.free: list[int] = []
        self.released: deque = deque()   # finished sequences (host), their slots freed by the sampler
        self.steps = 0                    # steps that took the feature path (for tests and stats)
        self._bufs: dict[str, torch.Tensor] = {}   # scratch [rows, V] tensors, reused every step

    # ---- host: a sequence in and out ------------------------------------------------------
    def start(self, seq) -> None:
        p, st = seq.params, seq.state
        st.plain = p.plain
        if p.plain:
            return
        st.sampled = 0                    # tokens sampled so far (this step's min_tokens progress)
        st.matcher = p.constraint.matcher() if p.constraint is not None else None
        st.slotted = bool(p.logit_bias or p.allowed_token_ids is not None or p.presence_penalty
                          or p.frequency_penalty or p.repetition_penalty != 1.0)
        if p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos))
            if p.allowed_token_ids is not None and banned.issuperset(p.allowed_token_ids):
                banned = set()            # only ending tokens are allowed: allowed_token_ids wins
            st.banned = tuple(sorted(t for t in banned if t < self.vocab or not self.vocab))
        if p.logprobs is not None:
            st.lp = deque()
        longest = max((len(w) for w in st.bad_words), default=0)
        if longest > 1:                   # the output's last tokens, as many as a word's prefix
            st.tail = deque(maxlen=longest - 1)

    def release(self, seq) -> None:
        if not seq.state.plain:
            self.released.append(seq)

    @staticmethod
    def logprobs_of(seq, token: int) -> list | None:
        """The next logprob entry of `seq` (host, in acceptance order), as RequestOutput.logprobs."""
        q = seq.state.lp
        if not q:
            return None
        step, row, k = q.popleft()
        return [step.entry(row, k, token)]

    # ---- the sampling thread --------------------------------------------------------------
    def sample(self, logits: torch.Tensor, seqs, sampler, is_live) -> torch.Tensor:
        """One step's tokens: [n, V] logits (changed in place) -> [n] long on their device."""
        if self.released:                 # before the liveness checks: a slot is freed only once
            self._drain()                 # its sequence can no longer be seen live
        rows = [i for i, s in enumerate(seqs) if not s.state.plain and is_live(s)]
        if not rows:
            return draw(sampler, logits, seqs)
        self.steps += 1
        dev = logits.device
        lp_rows = [i for i in rows if seqs[i].params.logprobs is not None]
        if lp_rows:
            lp_idx = _to(lp_rows, dev)
            lsm = torch.index_select(logits, 0, lp_idx, out=self._buf("raw", len(lp_rows), logits)
                                     ).log_softmax(dim=-1)                      # [r, V]
        slotted = [i for i in rows if seqs[i].state.slotted]
        if slotted:
            pen = self._penalise(logits, [seqs[i] for i in slotted], slotted)
        self._min_tokens(logits, seqs, rows)
        self._bad_words(logits, seqs, rows)
        matchers = [None] * len(seqs)
        for i in rows:
            matchers[i] = seqs[i].state.matcher
        constrained = [i for i in rows if matchers[i] is not None]
        if constrained:
            constrain.apply_masks(logits, matchers)
        tokens = draw(sampler, logits, seqs)                                    # [n]
        if slotted:
            self._count(tokens, *pen)
        tailed = any(seqs[i].state.tail is not None for i in rows)
        host = tokens.tolist() if constrained or tailed else None               # llguidance is on the CPU
        for i in rows:
            st = seqs[i].state
            if st.tail is not None:
                st.tail.append(host[i])
            n = st.sampled
            st.sampled = n + 1
            m = st.matcher
            if m is not None and not m.accept(host[i]) and st.error_at is None:
                st.error_at = n           # output index of the refused token (accept_token ends it)
                st.error = m.error or f"the grammar refused token {host[i]}"
                if seqs[i].params.allowed_token_ids is not None:
                    st.error += " (no token of 'allowed_token_ids' may come next in the grammar)"
                elif st.bad_words and logits[i, host[i]].item() == float("-inf"):
                    # nothing was left to draw (the draw keeps a finite logit where one is left):
                    # the words banned each token the grammar allows here (`false` forced after
                    # its "f", "a" banned), which llguidance named only as its refusal of token 0
                    st.error = "'bad_words' bans every token the grammar allows at this point of the answer"
                    st.error_param = "bad_words"
        if lp_rows:
            chosen = tokens.index_select(0, lp_idx)                             # [r]
            token_lp = lsm.gather(1, chosen[:, None]).squeeze(1)                # [r]
            k = max(seqs[i].params.logprobs for i in lp_rows)
            if k:
                top_lp, top_ids = top_logprobs(lsm, k)                          # [r, k], most likely first
            else:
                top_lp, top_ids = lsm[:, :0], chosen[:, None][:, :0]            # [r, 0]
            step = StepLogprobs(token_lp, top_lp, top_ids)
            for j, i in enumerate(lp_rows):
                seqs[i].state.lp.append((step, j, seqs[i].params.logprobs))
        return tokens

    def _penalise(self, logits, seqs, rows):
        """logit_bias with the allowed_token_ids mask, repetition, then frequency and presence
        penalties on `rows`, in place; what _count needs after the draw."""
        dev = logits.device
        slots = [self._slot(s, dev, logits.shape[1]) for s in seqs]
        sl = _to(slots, dev)                                                    # [r]
        ps = [s.params for s in seqs]
        whole = len(rows) == logits.shape[0]          # every row: work on the logits themselves
        idx = None if whole else _to(rows, dev)                                 # [r]
        n = len(rows)
        sub = logits if whole else torch.index_select(logits, 0, idx, out=self._buf("sub", n, logits))  # [r, V]
        if any(p.logit_bias or p.allowed_token_ids is not None for p in ps):
            sub.add_(torch.index_select(self.bias, 0, sl, out=self._buf("a", n, self.bias)))
        if any(p.repetition_penalty != 1.0 for p in ps):
            r = _to([p.repetition_penalty for p in ps], dev, sub.dtype)[:, None]          # [r, 1]
            # max(l, 0) / r + min(l, 0) * r where seen: plain arithmetic into kept buffers
            # (torch.where with broadcast scalars, and fresh [r, V] temporaries, cost several
            # times more on CPU)
            pos = torch.clamp(sub, min=0, out=self._buf("a", n, sub)).div_(r)            # [r, V]
            scaled = torch.clamp(sub, max=0, out=self._buf("b", n, sub)).mul_(r).add_(pos)
            seen = torch.index_select(self.seen, 0, sl, out=self._buf("seen", n, self.seen))
            torch.where(seen, scaled, sub, out=sub)
        freq = _to([p.frequency_penalty for p in ps], dev, torch.float32)                 # [r]
        pres = _to([p.presence_penalty for p in ps], dev, torch.float32)                  # [r]
        if any(p.presence_penalty or p.frequency_penalty for p in ps):
            sub.add_(torch.index_select(self.pen, 0, sl, out=self._buf("a", n, self.pen)))
        if not whole:
            logits.index_copy_(0, idx, sub)
        return idx, sl, freq, pres

    def _count(self, tokens, idx, sl, freq, pres) -> None:
        """The sampled tokens into the penalised rows' state: count, penalty, seen."""
        tok = tokens if idx is None else tokens.index_select(0, idx)            # [r]
        self.counts.index_put_((sl, tok), torch.ones_like(tok, dtype=self.counts.dtype), accumulate=True)
        count = self.counts[sl, tok].float()                                    # [r], >= 1
        self.pen[sl, tok] = -(freq * count + pres)
        self.seen[sl, tok] = True

    def _min_tokens(self, logits, seqs, rows) -> None:
        """EOS and stop_token_ids -> -inf in rows that have not reached min_tokens. A grammar
        that is complete allows only EOS: then EOS stays allowed (the grammar wins)."""
        r_idx, t_idx = [], []
        for i in rows:
            st = seqs[i].state
            banned = st.banned
            if not banned or st.sampled >= seqs[i].params.min_tokens:
                continue
            m = st.matcher
            if m is not None and m.is_finished():
                continue
            r_idx += [i] * len(banned)
            t_idx += banned
        if r_idx:
            logits[_to(r_idx, logits.device), _to(t_idx, logits.device)] = float("-inf")

    def _bad_words(self, logits, seqs, rows) -> None:
        """-inf at the last token of each bad word whose other tokens are the output's last ones
        (vLLM's: the output alone, never the prompt, and a word longer than the output so far and
        one token is not looked at)."""
        r_idx, t_idx = [], []
        for i in rows:
            st = seqs[i].state
            if not st.bad_words:
                continue
            tail = list(st.tail) if st.tail is not None else []      # [-(longest - 1):] of the output
            banned = {word[-1] for word in st.bad_words
                      if len(word) - 1 <= st.sampled and tail[len(tail) - len(word) + 1:] == list(word[:-1])}
            r_idx += [i] * len(banned)
            t_idx += banned
            allowed = seqs[i].params.allowed_token_ids
            if allowed is not None and banned.issuperset(allowed) and st.error_at is None:
                st.error_at = st.sampled      # nothing is left to sample: accept_token ends it with "error"
                st.error = "'bad_words' bans every token 'allowed_token_ids' leaves at this point of the answer"
                st.error_param = "bad_words"
        if r_idx:
            logits[_to(r_idx, logits.device), _to(t_idx, logits.device)] = float("-inf")

    def _buf(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A kept [rows, V] scratch tensor of `like`'s dtype and device (valid until the next use
        of `name`): no allocation, no page faults, in the steady state."""
        t = self._bufs.get(name)
        if t is None or t.shape[0] < rows or t.shape[1] != like.shape[1] or t.dtype != like.dtype \
                or t.device != like.device:
            t = self._bufs[name] = torch.empty(max(rows, 8), like.shape[1], dtype=like.dtype, device=like.device)
        return t[:rows]

    def _slot(self, seq, dev, width: int) -> int:
        """The sequence's row of the penalty/bias tensors, filled on first use."""
        st = seq.state
        s = st.slot
        if s is not None:
            return s
        if not self.free:
            self._grow(dev, width)
        s = st.slot = self.free.pop()
        for t in (self.bias, self.pen, self.counts, self.seen):
            t[s].zero_()
        self.seen[s].index_fill_(0, _to(seq.token_ids[:seq.num_prompt], dev), True)
        allowed = seq.params.allowed_token_ids
        if allowed is not None:           # -inf outside the allowed ids: the bias add masks them
            self.bias[s].fill_(float("-inf")).index_fill_(0, _to(allowed, dev), 0.0)
        if seq.params.logit_bias:         # accumulated: a bias on a token not allowed stays -inf
            ids, vals = zip(*seq.params.logit_bias)
            self.bias[s].index_put_((_to(ids, dev),), _to(vals, dev, self.bias.dtype), accumulate=True)
        return s

    def _grow(self, dev, width: int) -> None:
        old, cap = self.capacity, max(8, 2 * self.capacity)
        V = self.counts.shape[1] if self.counts is not None else width       # the logits' width

        def grown(t, dtype):
            new = torch.zeros(cap, V, dtype=dtype, device=dev)                  # [cap, V]
            if t is not None:
                new[:old].copy_(t)
            return new

        self.bias = grown(self.bias, torch.float32)
        self.pen = grown(self.pen, torch.float32)
        self.counts = grown(self.counts, torch.int32)
        self.seen = grown(self.seen, torch.bool)
        self.free.extend(range(cap - 1, old - 1, -1))
        self.capacity = cap

    def all_free(self) -> bool:
        """Whether no sequence holds a slot once the finished ones are let go (the sampling
        thread, or an idle engine: tests)."""
        self._drain()
        return len(self.free) == self.capacity

    def _drain(self) -> None:
        while self.released:
            st = self.released.popleft().state
            s, st.slot = st.slot, None
            if s is not None:
                self.free.append(s)
