"""Constrained decoding: JSON mode, JSON Schema, regex and forced tool calls by token masks.

Every step, each constrained request's row of logits is masked so that only tokens that keep
the output inside its grammar can be sampled (no retries): the text always parses, and it
validates against the schema unless max_tokens cuts it short (finish_reason "length").
The grammar engine is llguidance (PyPI `llguidance`, Rust, no Python dependencies): about a
millisecond to compile a schema, tens of microseconds per mask on CPU, and it refuses JSON
Schema keywords it cannot enforce instead of silently ignoring them.

    compiler = ConstraintCompiler(tokenizer, vocab_size)      # once per model (~0.3 s)
    grammar = compiler.compile({"type": "json_schema", "schema": {...}})   # cached, thread-safe
    matcher = grammar.matcher()                               # one per request
    # each step, before sampling (rows without a matcher are not touched):
    apply_masks(logits, [matcher_or_None for each row])
    # after sampling:
    matcher.accept(token)                                     # False: token broke the grammar
    check_spec({"type": "json_schema", "schema": {...}})      # agp check: no tokenizer, no torch

Specs accepted by `compile` (GrammarError, a ValueError, for anything it cannot compile):

    {"type": "json_object"}                                   # any JSON object
    {"type": "json_schema", "schema": {...}}                  # or OpenAI's nesting:
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
                                                              # ("strict" is moot: always enforced)
    {"type": "regex", "pattern": "..."}
    {"type": "choice", "choices": ["yes", "no"]}              # exactly one of the strings
    {"type": "grammar", "grammar": "start: ..."}              # Lark, or GBNF ("root ::= ...")
    {"type": "tool_call", "tools": [OpenAI tools], "choice": "required" | "<function name>",
     "parallel": True}

A tool call is written in SmolLM2's format, `<tool_call>[{"name": ..., "arguments": {...}}]
</tool_call>` (its model card's function-calling prompt; the GGUF's own chat template ignores
`tools`); "begin", "end" and "array": False in the spec give other formats, e.g. Hermes/Qwen's
`<tool_call>{...}</tool_call>`. "choice": a name forces exactly one call of that function;
"required" forces one call (several when "parallel") of any listed function.

Two narrowings keep a small model's output short and on-topic; the text still validates
against the schema as given. Whitespace between JSON tokens is at most one space, so a model
cannot fill max_tokens with newlines (`whitespace=`: a regex such as PRETTY_WHITESPACE, ""
for none, None for JSON's unbounded whitespace). An object schema with "properties" but no
"additionalProperties" (nor patternProperties) gets "additionalProperties": false, as
OpenAI's strict mode requires and xgrammar does by default (`close_objects=False` keeps
JSON Schema's open objects).

EOS is allowed exactly when the grammar can end; once the grammar is complete only EOS is
(`is_finished()`). A matcher that went wrong (a token it refused) allows only EOS from then on.

What llguidance cannot enforce is refused when the spec is compiled (GrammarError: a 400 that
names the reason), not answered with an empty 200: a regular expression (a schema's `pattern`,
`patternProperties`, a regex spec) that expands to more than MAX_REGEX_SIZE characters
(`(a{1000}){1000}`: llguidance's lexer gives up on it mid-answer, and its first mask alone
costs seconds), a `$ref` that only refers to itself, and any grammar whose first step allows
no output (the compiled grammar is probed once). Errors are never verbose (no grammar dump).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where masks are made: agp check (check_spec) needs none
    import torch

try:
    import llguidance as _llg
except ImportError:  # without it the engine still runs; compile() raises GrammarError
    _llg = None

# between JSON tokens: at most one space (measured: SmolLM2 then finished 17 of 20 answers
# within 200 tokens, 15 when allowed to indent); PRETTY_WHITESPACE: one newline + an indent
JSON_WHITESPACE = r"[ ]?"
MAX_REGEX_SIZE = 20_000    # a regex's size with its counted repetitions unrolled (a{20000}: 60 ms masks)
PRETTY_WHITESPACE = r"(\r?\n)?[ \t]{0,20}"
MAX_ERROR_CHARS = 400


class GrammarError(ValueError):
    """A response_format / tool spec this engine cannot compile (an HTTP 400)."""


def available() -> bool:
    return _llg is not None


def _need_llguidance():
    if _llg is None:
        raise GrammarError("constrained decoding needs the llguidance package: pip install llguidance")


def _limits():
    """llguidance's default resource limits, with short error messages (no state or grammar dump)."""
    return _llg.LLParserLimits(verbose_errors=False)


def regex_size(pattern: str) -> int:
    """The size of `pattern` with its counted repetitions unrolled: (a{1000}){1000} is 1,000,000,
    [a-z]{3,8} is 8, a*b+ is 2 (loops cost nothing). What llguidance's lexer builds grows with it."""
    stack = [[0, 0]]                      # per open group: [size so far, size of its last atom]
    i, n = 0, len(pattern)

    def atom(size: int = 1) -> None:
        stack[-1][0] += size
        stack[-1][1] = size

    while i < n:
        c = pattern[i]
        if c == "\\":
            j = i + 2
            if i + 1 < n and pattern[i + 1] in "pPu" and j < n and pattern[j] == "{":   # \p{L}, \u{1F600}
                j = (pattern.find("}", j) + 1) or n
            atom()
            i = j
        elif c == "[":
            j = i + 1
            j += j < n and pattern[j] == "^"
            j += j < n and pattern[j] == "]"
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            atom()
            i = j + 1
        elif c == "(":
            stack.append([0, 0])
            i += 1
            if pattern.startswith("?", i):                    # (?:  (?=  (?!  (?<name>
                i += 1
                if pattern.startswith("<", i) and not pattern.startswith(("<=", "<!"), i):
                    i = (pattern.find(">", i) + 1) or n
                else:
                    i += 1
        elif c == ")":
            if len(stack) > 1:
                size = stack.pop()[0]
                atom(size)
            i += 1
        elif c == "{" and (m := _COUNT.match(pattern, i)):
            lo = int(m.group(1) or 0)
            hi = int(m.group(3)) if m.group(3) else lo + (1 if m.group(2) else 0)
            k, last = max(lo, hi, 1), stack[-1][1]
            stack[-1][0] += last * (k - 1)
            stack[-1][1] = last * k
            i = m.end()
        elif c in "*+?|^$":
            i += 1                                             # loops and anchors add no size
        else:
            atom()
            i += 1
    while len(stack) > 1:
        size = stack.pop()[0]
        atom(size)
    return stack[0][0]


_COUNT = re.compile(r"\{(\d{0,9})(,(\d{0,9}))?\}")


def _regexes(schema):
    """Every regular expression a JSON Schema holds: `pattern` values, `patternProperties` keys."""
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, dict):
            for k, v in node.items():
                if k == "pattern" and isinstance(v, str):
                    yield v
                elif k == "patternProperties" and isinstance(v, dict):
                    yield from (key for key in v if isinstance(key, str))
                if isinstance(v, (dict, list)):
                    todo.append(v)


def _check_regex(pattern: str, where: str) -> None:
    size = regex_size(pattern)
    if size > MAX_REGEX_SIZE:
        shown = pattern if len(pattern) <= 60 else pattern[:60] + "…"
        raise GrammarError(f"{where} {shown!r} is too complex to enforce: it unrolls to about {size:,} "
                           f"characters (at most {MAX_REGEX_SIZE:,})")


def _ref_loop(schema) -> bool:
    """Whether the schema is nothing but a $ref chain that comes back to where it started (it then
    allows no value at all)."""
    if not isinstance(schema, dict):
        return False
    seen, node = set(), schema
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and \
            not set(node) - {"$ref", "$defs", "definitions", "$schema", "$id", "title", "description", "$comment"}:
        ref = node["$ref"]
        if ref in seen:
            return True
        seen.add(ref)
        if ref in ("#", "#/"):
            node = schema
            continue
        if not ref.startswith("#/"):
            return False
        node = schema
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
    return False


class GrammarBuilder:
    """Spec -> llguidance grammar text: no tokenizer and no torch (`agp check` uses it)."""

    def __init__(self, close_objects: bool = True, whitespace: str | None = JSON_WHITESPACE):
        self.close_objects = close_objects
        # whitespace between JSON tokens: a regex, "" for none (compact), None for JSON's any
        self.json_options = ({"whitespace_flexible": True} if whitespace is None else
                             {"whitespace_pattern": whitespace} if whitespace else {"whitespace_flexible": False})

    # ---- spec -> llguidance grammar text ---------------------------------------------------
    def _build(self, spec) -> str:
        if not isinstance(spec, dict):
            raise GrammarError("the constraint must be an object with a 'type'")
        kind = spec.get("type")
        try:
            if kind == "json_object":
                return _llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=self.json_options)
            if kind == "json_schema":
                body = spec.get("json_schema", spec)
                schema = body.get("schema") if isinstance(body, dict) else None
                if not isinstance(schema, (dict, bool)):
                    raise GrammarError("json_schema needs a 'schema' object")
                for pattern in _regexes(schema):
                    _check_regex(pattern, "the pattern")
                if _ref_loop(schema):
                    raise GrammarError("its $ref refers only to itself, so no value can follow it")
                return _llg.LLMatcher.grammar_from_json_schema(self._prepare(schema), overrides=self.json_options)
            if kind == "regex":
                pattern = spec.get("pattern")
                if not isinstance(pattern, str):
                    raise GrammarError("regex needs a 'pattern' string")
                _check_regex(pattern, "the regex")
                return _llg.LLMatcher.grammar_from_regex(pattern)
            if kind == "tool_call":
                return self._tool_grammar(spec)
            if kind == "choice":
                return _choice_grammar(spec)
            if kind == "grammar":
                return _cfg_grammar(spec)
        except GrammarError:
            raise
        except (ValueError, TypeError) as e:
            raise GrammarError(_short(f"cannot compile the {kind}: {e}")) from None
        raise GrammarError(f"unknown constraint type {kind!r} (json_object, json_schema, regex, choice, grammar, "
                           "tool_call)")

    def _prepare(self, schema):
        if isinstance(schema, dict):
            schema = {k: v for k, v in schema.items() if k != "x-guidance"}  # options are ours
            if self.close_objects:
                schema = _close_objects(copy.deepcopy(schema))
        return schema

    def _tool_grammar(self, spec) -> str:
        tools = spec.get("tools")
        if not isinstance(tools, list) or not tools:
            raise GrammarError("tool_call needs a non-empty 'tools' list")
        fns = {}
        for t in tools:
            fn = t.get("function", t) if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise GrammarError("every tool needs a function with a 'name'")
            params = fn.get("parameters") or {"type": "object"}
            if not isinstance(params, dict):
                raise GrammarError(f"tool {fn['name']!r}: parameters must be a JSON Schema object")
            for pattern in _regexes(params):
                _check_regex(pattern, f"tool {fn['name']!r}: the pattern")
            fns[fn["name"]] = params
        choice = spec.get("choice", "required")
        if isinstance(choice, dict):            # OpenAI's {"type": "function", "function": {"name": ...}}
            choice = (choice.get("function") or {}).get("name")
        if choice != "required":
            if choice not in fns:
                raise GrammarError(f"tool_choice names {choice!r}, which is not among the tools")
            fns = {choice: fns[choice]}
        call = [{"type": "object", "properties": {"name": {"const": n}, "arguments": self._prepare(p)},
                 "required": ["name", "arguments"], "additionalProperties": False}
                for n, p in fns.items()]
        one = call[0] if len(call) == 1 else {"anyOf": call}
        parallel = bool(spec.get("parallel", True)) and choice == "required"
        body = ({"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
                if spec.get("array", True) else dict(one))
        body["x-guidance"] = self.json_options
        begin, end = spec.get("begin", "<tool_call>"), spec.get("end", "</tool_call>")
        lark = f'start: {json.dumps(begin)} "\\n"? %json {json.dumps(body)} "\\n"? {json.dumps(end)}'
        return _llg.LLMatcher.grammar_from_lark(lark)


def _choice_grammar(spec) -> str:
    """{"type": "choice", "choices": ["yes", "no"]}: the answer is exactly one of the strings."""
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choice needs a non-empty list of non-empty strings")
    return _llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def _cfg_grammar(spec) -> str:
    """{"type": "grammar", "grammar": "..."}: a context-free grammar in Lark syntax (llguidance's)
    or in llama.cpp's GBNF (`root ::= ...`, converted to Lark)."""
    from llguidance.gbnf_to_lark import any_to_lark

    text = spec.get("grammar")
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("grammar needs the grammar's text (Lark, or GBNF with a root rule)")
    try:
        lark = any_to_lark(text)
    except Exception as e:  # noqa: BLE001 - the converter raises bare errors for text it cannot read
        raise GrammarError(_short(f"the grammar does not parse as Lark or GBNF: {e}")) from None
    return _llg.LLMatcher.grammar_from_lark(lark)


def check_spec(spec, *, close_objects: bool = True, whitespace: str | None = JSON_WHITESPACE) -> list[str]:
    """Compile `spec` as ConstraintCompiler does, but without a tokenizer (agp check): its
    warnings, or GrammarError for a spec that cannot compile."""
    _need_llguidance()
    text = GrammarBuilder(close_objects, whitespace)._build(spec)
    is_error, messages = _llg.LLMatcher.validate_grammar_with_warnings(text, limits=_limits())
    if is_error:
        raise GrammarError(_short(messages[0] if messages else "invalid grammar"))
    return list(messages)


class ConstraintCompiler(GrammarBuilder):
    """Compiles specs into Grammars for one tokenizer; keeps the last `cache_size` (LRU)."""

    def __init__(self, tokenizer, vocab_size: int | None = None, *, eos_token_ids=None,
                 cache_size: int = 256, close_objects: bool = True,
                 whitespace: str | None = JSON_WHITESPACE):
        _need_llguidance()
        super().__init__(close_objects, whitespace)
        tk = getattr(tokenizer, "tk", tokenizer)          # ours wraps a tokenizers.Tokenizer
        eos = sorted(eos_token_ids if eos_token_ids is not None else getattr(tokenizer, "eos_token_ids", ()))
        if not eos:
            raise ValueError("constrained decoding needs the tokenizer's end-of-sequence token id(s)")
        n_tok = tk.get_vocab_size(with_added_tokens=True)
        self.vocab_size = int(vocab_size or n_tok)         # the model's logits width
        self.eos_token_ids = tuple(eos)
        # llguidance reads the tokenizer from its JSON; a vocab wider than the tokenizer's gets
        # empty tokens that are never allowed
        self.tokenizer = _llg.LLTokenizer(tk.to_str(), n_vocab=max(self.vocab_size, n_tok),
                                          eos_token=list(eos))
        self.words = (self.tokenizer.vocab_size + 31) // 32  # int32 words of one row's bitmask
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: dict) -> "Grammar":
        try:
            key = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise GrammarError(f"the constraint is not JSON: {e}") from None
        with self._lock:
            g = self._cache.get(key)
            if g is not None:
                self._cache.move_to_end(key)
                return g
        g = Grammar(self, self._build(spec))               # llguidance drops the GIL here
        with self._lock:
            self._cache[key] = g
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return g

def _close_objects(s, in_all_of: bool = False):
    """additionalProperties: false on object schemas with properties that leave it open."""
    if isinstance(s, list):
        return [_close_objects(x) for x in s]
    if not isinstance(s, dict):
        return s
    if ("properties" in s and not in_all_of and "additionalProperties" not in s
            and "patternProperties" not in s and "unevaluatedProperties" not in s):
        s["additionalProperties"] = False
    for k, v in s.items():
        if k in ("properties", "$defs", "definitions", "patternProperties") and isinstance(v, dict):
            s[k] = {name: _close_objects(sub) for name, sub in v.items()}
        elif k == "allOf":      # branches are merged: closing each would forbid the others' keys
            s[k] = [_close_objects(x, in_all_of=True) for x in v] if isinstance(v, list) else v
        elif k in ("items", "anyOf", "oneOf", "prefixItems", "additionalProperties", "contains"):
            s[k] = _close_objects(v)
    return s


def _first_line(msg: str) -> str:
    return (msg.strip().splitlines() or [""])[0]


def _short(msg: str) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= MAX_ERROR_CHARS else msg[:MAX_ERROR_CHARS] + "…"


class Grammar:
    """A compiled constraint; `matcher()` starts one request's state (cheap: a copy)."""

    def __init__(self, compiler: ConstraintCompiler, text: str):
        self.compiler = compiler
        is_error, messages = _llg.LLMatcher.validate_grammar_with_warnings(text, compiler.tokenizer,
                                                                           limits=_limits())
        if is_error:
            raise GrammarError(_short(messages[0] if messages else "invalid grammar"))
        self.warnings = list(messages)
        self._template = _llg.LLMatcher(compiler.tokenizer, text, log_level=0, limits=_limits())
        if self._template.is_error():
            raise GrammarError(_short(self._template.get_error()))
        self._probe(compiler)

    def _probe(self, compiler: ConstraintCompiler) -> None:
        """The first step of a fresh matcher: a grammar that fails there, or that allows nothing
        but the end before it can end, can produce no answer (GrammarError)."""
        import torch

        m = self._template.deep_copy()
        row = torch.zeros(compiler.words, dtype=torch.int32)
        m.unsafe_compute_mask_ptr(row.data_ptr(), compiler.words * 4)
        if m.is_error():
            raise GrammarError(_short(f"no output can follow it ({_first_line(m.get_error())})"))
        allowed = _unpack(row.view(1, -1), compiler.vocab_size)[0]
        allowed[list(compiler.eos_token_ids)] = False
        if not bool(allowed.any()) and not m.is_accepting():
            raise GrammarError("no output can follow it")
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
        return _short(_first_line(self.m.get_error())) if self.m.is_error() else ""


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
        _EXECUTOR = _llg.LLExecutor()
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
            idx = torch.tensor(rows, device=dev)
            sub = logits.index_select(0, idx).masked_fill_(~allowed, float("-inf"))
            logits.index_copy_(0, idx, sub)
