"""Constrained decoding: JSON mode, JSON Schema, regex and forced tool calls by token masks.

Every step, each constrained request's row of logits is masked so that only tokens that keep
the output inside its grammar can be sampled (no retries): the text always parses, and it
validates against the schema unless max_tokens cuts it short (finish_reason "length").
The grammar engine is llguidance (PyPI `llguidance`, Rust, no Python dependencies): about a
millisecond to compile a schema, tens of microseconds per mask on CPU, and it refuses JSON
Schema keywords it cannot enforce instead of silently ignoring them.

    compiler = ConstraintCompiler(tokenizer, vocab_size)      # once per model (~0.3 s)
    grammar = compiler.compile({"type": "json_schema", "schema": {...}})   # cached, thread-safe; at most
                                                              # MAX_GRAMMAR_WORK at once (equal specs: one)
    compiler.cache_info()      # {"entries", "bytes", ...}: at most cache_size grammars, cache_bytes of them
    matcher = grammar.matcher()                               # one per request
    # each step, before sampling (rows without a matcher are not touched):
    apply_masks(logits, [matcher_or_None for each row])
    # after sampling:
    matcher.accept(token)                                     # False: token broke the grammar
    check_spec({"type": "json_schema", "schema": {...}})      # agp check: no tokenizer, no torch

The specs, what they mean and what is refused: pipeline_dsl/constraints.py (torch-free, so
that `agp check` can compile a schema).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

# the torch-free half (specs -> grammar text); the names users of this module read are kept here
from pipeline_dsl.constraints import (JSON_WHITESPACE, PRETTY_WHITESPACE, GrammarBuilder, GrammarError,  # noqa: F401
                                      OnceCache, check_spec, first_line, grammar_slots, llg, need_llguidance,
                                      on_grammar_stack, parser_limits, regex_size, short, spec_digest)

if TYPE_CHECKING:  # torch is imported where masks are made
    import torch


# what a compiled grammar holds, estimated from its grammar text: llguidance's matcher of a schema of
# required string properties measured 77-86 bytes of memory a character of grammar text (100 to 2,000
# properties; a schema's long "description", kept in the text, costs nearly nothing: an overcount)
BYTES_PER_GRAMMAR_CHAR = 100
CACHE_BYTES = 512 << 20    # the grammars a compiler keeps, by Grammar.size (~5 MB of grammar text)


class ConstraintCompiler(GrammarBuilder):
    """Compiles specs into Grammars for one tokenizer; keeps the most recently used (LRU), at most
    `cache_size` of them and `cache_bytes` of their sizes (Grammar.size), keyed by the digest of
    the spec's canonical JSON: what the cache holds is bounded whatever specs clients send (4 MB
    schemas too), and a spec sent again is compiled once. A grammar larger than `cache_bytes`
    alone is not kept."""

    def __init__(self, tokenizer, vocab_size: int | None = None, *, eos_token_ids=None,
                 cache_size: int = 256, cache_bytes: int = CACHE_BYTES, close_objects: bool = True,
                 whitespace: str | None = JSON_WHITESPACE):
        need_llguidance()
        super().__init__(close_objects, whitespace)
        tk = getattr(tokenizer, "tk", tokenizer)          # ours wraps a tokenizers.Tokenizer
        n_tok = tk.get_vocab_size(with_added_tokens=True)
        self.vocab_size = int(vocab_size or n_tok)         # the model's logits width
        # an end token listed past the vocabulary (a generation_config.json's eos_token_id) is one the
        # model never writes: left out, as the sampler's min_tokens leaves it, not a refusal of
        # every constrained request by llguidance
        eos = sorted(i for i in (eos_token_ids if eos_token_ids is not None
                                 else getattr(tokenizer, "eos_token_ids", ())) if i < max(self.vocab_size, n_tok))
        if not eos:
            raise ValueError("constrained decoding needs the tokenizer's end-of-sequence token id(s)")
        self.eos_token_ids = tuple(eos)
        # llguidance reads the tokenizer from its JSON; a vocab wider than the tokenizer's gets
        # empty tokens that are never allowed
        self.tokenizer = llg.LLTokenizer(tk.to_str(), n_vocab=max(self.vocab_size, n_tok),
                                          eos_token=list(eos))
        self._tk = tk
        self.words = (self.tokenizer.vocab_size + 31) // 32  # int32 words of one row's bitmask
        self.cache_size, self.cache_bytes = cache_size, cache_bytes
        self._grammars = OnceCache(cache_size, cache_bytes, size=lambda g: g.size, shared=(GrammarError,))

    def cache_info(self) -> dict:
        """{"entries": grammars kept, "bytes": their sizes in all, "max_entries", "max_bytes"}."""
        return self._grammars.info()

    def _special_token(self, text: str) -> int | None:
        """A structural tag's trigger that is one special token of this tokenizer: its id."""
        i = self._tk.token_to_id(text)
        return i if i is not None and i < self.tokenizer.vocab_size and self.tokenizer.is_special_token(i) else None

    def _key(self, spec) -> bytes:
        try:
            return spec_digest(spec)
        except TypeError as e:
            raise GrammarError(f"the constraint is not JSON: {e}") from None
        except ValueError as e:                 # nested past what JSON writes: its schemas' depth walk names where
            try:
                self._built(spec)
            except RecursionError:
                pass
            raise GrammarError(f"the constraint is not JSON: {e}") from None

    def cached(self, spec) -> bool:
        """Whether compile(spec) would find it compiled (no grammar work); False for a spec that is not JSON."""
        try:
            return self._key(spec) in self._grammars
        except GrammarError:
            return False

    def compile(self, spec: dict) -> "Grammar":
        """The spec's Grammar: from the cache, or compiled (GrammarError when it cannot be). A compile
        takes one of the process's grammar slots (constraints.grammar_slots, which the requests'
        checks share), so at most MAX_GRAMMAR_WORK grammars are built at once whatever specs arrive;
        equal specs arriving together are compiled once, the others waiting for its result."""
        return self._grammars.get(self._key(spec), lambda: self._built(spec))

    def _built(self, spec: dict) -> "Grammar":
        with grammar_slots:       # on a thread of a native stack deep enough for MAX_SCHEMA_DEPTH
            return on_grammar_stack(self._grammar, spec)

    def _grammar(self, spec: dict) -> "Grammar":
        g = Grammar(self, self._build(spec))               # llguidance drops the GIL here
        for where, param, text in self._json_parts(spec):  # each structure's, each tool's JSON, walked alone
            try:
                Grammar(self, text)
            except GrammarError as e:
                raise GrammarError(short(f"{where}{e}"), param) from None
        return g


class Grammar:
    """A compiled constraint; `matcher()` starts one request's state (cheap: a copy)."""

    def __init__(self, compiler: ConstraintCompiler, text: str):
        self.compiler = compiler
        # what the compiler's cache counts it as: the memory it is estimated to hold
        self.size = len(text) * BYTES_PER_GRAMMAR_CHAR
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, compiler.tokenizer,
                                                                           limits=parser_limits())
        if is_error:
            raise GrammarError(short(messages[0] if messages else "invalid grammar"))
        self.warnings = list(messages)
        self._template = llg.LLMatcher(compiler.tokenizer, text, log_level=0, limits=parser_limits())
        if self._template.is_error():
            raise GrammarError(short(self._template.get_error()))
        self._probe(compiler)

    def _probe(self, compiler: ConstraintCompiler) -> None:
        """The first PROBE_STEPS steps of a fresh matcher, each taking the lowest allowed token: a
        grammar that fails there (llguidance gives up on a row of too many items, as after the
        "{" of an object of 500 optional properties open to more), or that allows nothing but the
        end before it can end, can produce no answer (GrammarError), and is refused when it is
        compiled rather than in the middle of an answer."""
        import torch

        m = self._template.deep_copy()
        row = torch.zeros(compiler.words, dtype=torch.int32)
        taken = 0
        while True:
            m.unsafe_compute_mask_ptr(row.data_ptr(), compiler.words * 4)
            if m.is_error():
                break
            allowed = _unpack(row.view(1, -1), compiler.vocab_size)[0]       # [V] bool
            allowed[list(compiler.eos_token_ids)] = False
            ids = allowed.nonzero().view(-1)
            if not len(ids):
                if m.is_accepting():
                    break
                raise GrammarError("no output can follow it")
            if taken == PROBE_STEPS:
                break
            m.consume_token(int(ids[0]))
            taken += 1
            if m.is_error():
                break
        if m.is_error():
            why = first_line(m.get_error())
            raise GrammarError(short(f"the grammar engine gives up on it at output token {taken} ({why})"
                                     if taken else f"no output can follow it ({why})"))
        self._lock = threading.Lock()

    def matcher(self) -> "Matcher":
        with self._lock:
            return Matcher(self._template.deep_copy(), self.compiler)


class Matcher:
    """One request's position in its grammar."""

    __slots__ = ("m", "words", "vocab_size", "eos")

    def __init__(self, m, compiler: ConstraintCompiler):
        self.m, self.words, self.vocab_size = m, compiler.words, compiler.vocab_size
        self.eos = compiler.eos_token_ids[0]

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed-token bitmask into `row`: a contiguous CPU int32 tensor of
        ceil(vocab_size / 32) words, bit t % 32 of word t // 32 set = token t allowed."""
        import torch

        assert row.dtype == torch.int32 and row.is_contiguous() and row.device.type == "cpu"
        self.m.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)

    def allowed(self) -> list[int]:
        """Allowed token ids now (for tests and debugging; slower than fill_mask)."""
        import torch

        row = torch.zeros(self.words, dtype=torch.int32)
        self.fill_mask(row)
        return _unpack(row.view(1, -1), self.vocab_size)[0].nonzero().view(-1).tolist()

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar refuses it (then only EOS)."""
        return bool(self.m.consume_token(int(token_id)))

    def is_finished(self) -> bool:
        """Only EOS can follow (the grammar is complete, EOS was accepted, or it failed)."""
        return self.m.is_stopped() or self.m.is_error()

    def can_end(self) -> bool:
        """EOS is allowed now (it may also continue)."""
        return self.m.is_accepting()

    def rollback(self, n: int) -> bool:
        """Undo the last n accepted tokens (a discarded optimistic token)."""
        return bool(self.m.rollback(int(n)))

    @property
    def error(self) -> str:
        return short(first_line(self.m.get_error())) if self.m.is_error() else ""


PROBE_STEPS = 8          # steps a new grammar is walked when compiled (a mask each: tens of µs)
_SHIFTS: dict = {}
_EXECUTOR = None


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[r, W] int32 -> [r, vocab] bool (True = allowed)."""
    import torch

    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1                       # [r, W, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()


def fill_masks(matchers: list[Matcher]) -> torch.Tensor:
    """[len(matchers), W] int32 bitmasks, computed by llguidance's thread pool off the GIL."""
    global _EXECUTOR
    import torch

    words = matchers[0].words
    bitmask = torch.empty((len(matchers), words), dtype=torch.int32)
    if len(matchers) == 1:
        matchers[0].fill_mask(bitmask[0])
        return bitmask
    if _EXECUTOR is None:
        _EXECUTOR = llg.LLExecutor()
    _EXECUTOR.unsafe_compute_mask_ptr([(m.m, i) for i, m in enumerate(matchers)],
                                      bitmask.data_ptr(), words * 4, len(matchers))
    return bitmask


def apply_masks(logits: torch.Tensor, matchers: list) -> None:
    """Mask `logits` [n, V] in place: row i keeps only matchers[i]'s allowed tokens (-inf
    elsewhere, also past the grammar's vocabulary); rows whose matcher is None are untouched,
    and nothing at all is done when every entry is None."""
    import torch

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask = fill_masks([matchers[i] for i in rows])
    dev = logits.device
    if dev.type != "cpu":
        bitmask = bitmask.pin_memory().to(dev, non_blocking=True)
    V = logits.shape[1]
    allowed = _unpack(bitmask, min(V, bitmask.shape[1] * 32))          # [r, <=V]
    if allowed.shape[1] < V:                                           # logits wider than the mask
        allowed = torch.nn.functional.pad(allowed, (0, V - allowed.shape[1]), value=False)
    with torch.inference_mode(logits.is_inference()):   # the runner's logits are inference tensors
        if len(rows) == logits.shape[0]:
            logits.masked_fill_(~allowed, float("-inf"))
        else:
            idx = torch.tensor(rows)                                  # [r]; to CUDA as the mask goes:
            idx = idx if dev.type == "cpu" else idx.pin_memory().to(dev, non_blocking=True)  # no wait
            sub = logits.index_select(0, idx).masked_fill_(~allowed, float("-inf"))
            logits.index_copy_(0, idx, sub)
