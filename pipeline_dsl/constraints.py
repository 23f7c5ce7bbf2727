"""Constraint specs -> llguidance grammar text, checked: no tokenizer and no torch.

`agp check` compiles a stage's json_schema with `check_spec`, the server checks a request's
response_format and tools with it, and the engine's ConstraintCompiler (engine/constrain.py)
builds its grammars with `GrammarBuilder` before it masks tokens with them.

Specs accepted (by `check_spec` and ConstraintCompiler.compile) (GrammarError, a ValueError, for anything it cannot compile):

    {"type": "json_object"}                                   # any JSON object
    (either JSON spec may add "compact": true, no whitespace between tokens, and
     "close_objects": false, objects as open as JSON Schema leaves them: vLLM's
     disable_any_whitespace and disable_additional_properties; or "whitespace": a regex,
     the whitespace between JSON tokens: none or one match of it (vLLM's whitespace_pattern),
     which may match JSON's whitespace only: space, tab, newline, carriage return)
    {"type": "json_schema", "schema": {...}}                  # (true: any JSON value) or OpenAI's nesting:
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
                                                              # ("strict" is moot: always enforced)
    {"type": "regex", "pattern": "..."}
    {"type": "choice", "choices": ["yes", "no"]}              # exactly one of the strings
    {"type": "grammar", "grammar": "start: ..."}              # Lark, or GBNF ("root ::= ...")
    {"type": "tool_call", "tools": [OpenAI tools], "choice": "required" | "<function name>",
     "parallel": True}
    {"type": "structural_tag", "triggers": ["<function="],    # vLLM's structural tag: free text in
     "structures": [{"begin": "<function=f>", "schema": {...}, "end": "</function>"}]}
                                                              # which, once a trigger is written, the
                                                              # structure whose begin follows it runs:
                                                              # begin, JSON by its schema, end

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

Keywords that constrain nothing are dropped before llguidance sees them (it refuses the
keyword whatever its value): `uniqueItems: false`, `if` without `then` and `else`, ...; a
count written as a whole float (`"maxLength": 3.0`, an integer in JSON Schema) is given as 3.
Regular expressions (a schema's `pattern` and `patternProperties`, a regex spec) are read as
ECMA-262's, as JSON Schema says and vLLM's backends do: `\\d` and `\\w` are ASCII ([0-9],
[0-9A-Za-z_]), not llguidance's Unicode classes, which would allow "꯲" for a digit. A Lark
grammar's own regexes (`/.../`) are left as written: Lark's syntax (Python's regexes) and
llguidance's (the Rust regex crate's) both read `\\d` and `\\w` as Unicode, and vLLM hands a
grammar to llguidance unchanged (docs/openai.md, guided_grammar).

EOS is allowed exactly when the grammar can end; once the grammar is complete only EOS is
(`is_finished()`). A matcher that went wrong (a token it refused) allows only EOS from then on.

What llguidance cannot enforce is refused when the spec is compiled (GrammarError: a 400 that
names the reason), not answered with an empty 200: a regular expression (a schema's `pattern`,
`patternProperties`, a regex spec, a grammar's regex or terminal) that expands to more than MAX_REGEX_SIZE characters
(`(a{1000}){1000}`: llguidance's lexer gives up on it mid-answer, and its first mask alone
costs seconds) or that forces a run of more than MAX_LITERAL_LENGTH fixed characters (forced_run:
`^a{20000}$` costs each step's mask as a const's string of that length does), a `$ref` that only refers to itself, and any grammar whose first step allows
no output or that llguidance gives up on within its first few tokens (the compiled grammar is
walked PROBE_STEPS tokens: an object of 500 optional properties open to more fails after its "{").
Counted before llguidance sees a schema, each a 400 naming the keyword and where: an `enum` of more than
MAX_ENUM_VALUES values, a string in an `enum` or `const` value or a property's name (in `properties` or
`required`) longer than MAX_LITERAL_LENGTH (each step's mask costs more the longer it is; so too a choice's
string, a structure's begin and end, a forced tool's name and a grammar's string literal), `enum` and
`const` values of more than MAX_LITERAL_CHARS characters in all, more
than MAX_OPTIONAL_PROPERTIES optional properties in one object or MAX_PROPERTIES_IN_ALL in the schema,
and JSON nested more than MAX_JSON_DEPTH levels of arrays and objects anywhere in the schema (what the
grammar engine's JSON reader takes; a forced call's tools, where it may write several, 2 levels less).
Errors are never verbose (no grammar dump); one in a schema says where, as the JSON pointer of the
innermost subschema that fails by itself (`at #/properties/tags: Unimplemented keys: ["uniqueItems"]`;
a tool's: `tool 'f': at #/properties/x: ...`), and an overlapping `oneOf` (enforceable only as anyOf)
says so.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote, urldefrag, urljoin
try:
    import llguidance as llg
except ImportError:  # without it the engine still runs; compile() raises GrammarError
    llg = None

# between JSON tokens: at most one space (measured: SmolLM2 then finished 17 of 20 answers
# within 200 tokens, 15 when allowed to indent); PRETTY_WHITESPACE: one newline + an indent
JSON_WHITESPACE = r"[ ]?"
MAX_REGEX_SIZE = 20_000    # a regex's size with its counted repetitions unrolled (a{20000}: 60 ms masks)
PRETTY_WHITESPACE = r"(\r?\n)?[ \t]{0,20}"
MAX_ERROR_CHARS = 400
MAX_LOCATE_PROBES = 200    # subschemas compiled alone to say where a schema fails (~0.1 ms each)
# ... and their JSON text in all: a subschema costs up to ~7 us a character to compile (an object of
# a thousand optional properties, 27 KB: 0.19 s), so 200 of them could take 40 s; this is ~2 s at most
MAX_LOCATE_CHARS = 1 << 18
# structures, and triggers, of one structural tag: each structure is a branch of one grammar row,
# which llguidance caps at 2,000 items, and is checked and compiled on its own (1,024: ~1 s); each
# looks its trigger up among the triggers
MAX_STRUCTURES = 1024
# how deep a schema may nest, a $ref counting as the schema it refers to (schema_depth), and a grammar
# its rules: llguidance compiles them depth first in the native stack of the asking thread, which
# (8 MiB, Linux's default) overflowed, killing the process, at ~1,700 levels (a chain of objects
# each a $ref to the next) to ~2,500 (a chain of bare $refs, of Lark rules)
MAX_SCHEMA_DEPTH = 1000
# patternProperties of one object, and of a whole schema: llguidance sets each key's pattern against
# the others', work that grows faster than their square (one object of 128: ~0.3 s; 300: ~40 s)
MAX_PATTERN_PROPERTIES = 128
MAX_PATTERN_PROPERTIES_IN_ALL = 512
# a schema's literals and properties, counted before the grammar engine sees it (a cheap walk): past
# these it spends seconds on the schema, or gives up on it after them. Each enum: at most MAX_ENUM_VALUES
# values (a choice spec's bound); the text of every enum and const value in all, at most MAX_LITERAL_CHARS
# characters (262,144: ~0.15 s to check; a 2 MB enum of 2,000 strings: ~1.3 s to check, ~2 s to compile,
# ~6 s of the server's CPU before its first token; OpenAI allows 120,000 characters of names and values)
MAX_ENUM_VALUES = 10_000
# how deep a schema's JSON may nest, in arrays and objects (the schema itself the first level), wherever
# in it (a subschema, a const, an enum value, a default, a keyword agp does not know): llguidance reads
# a schema's JSON with serde_json, which stops at 128 levels, 3 of them its own around the schema, and
# refused anything deeper ("recursion limit exceeded at line 1 column N", naming no place: a chain of
# 62 nested objects' properties, of 124 arrays' items, a const 122 arrays deep). So the bound is what it
# takes, far below where Python's recursion (~1,000 frames) runs out (a value ~500 levels deep did)
MAX_JSON_DEPTH = 124
# levels a forced call's grammar adds around each tool's parameters where it may write several tools
# (its anyOf, and the branch in it), past those of one tool's: they nest at most MAX_JSON_DEPTH less these
CALL_CHOICE_LEVELS = 2
# one string of an enum or const value, or one property's name: the answer has to write it whole once it
# starts, and llguidance works out each step what is left of it, a mask's work growing with its length
# (measured with SmolLM2's vocabulary: 1,024 characters ~0.2 ms a mask, at most ~15 ms; 4,096 ~1-2 ms, at
# most ~0.2 s; 65,536 ~50 ms, at most ~0.5 s; a const of 250,000 ~260 ms a mask, at most 2 s, which every
# other answer in the batch waited for each step)
MAX_LITERAL_LENGTH = 1024
MAX_LITERAL_CHARS = 1 << 18
# ... and so for every other string the answer is forced to write whole once it starts: a choice, a
# structure's begin and end, a forced tool's name, a grammar's string literal (each 60,000 characters
# long: 15-28 ms a mask, at most ~0.1 s; 1,024: ~0.2 ms)
LITERAL_BOUND = f"at most {MAX_LITERAL_LENGTH:,} in one string (the answer writes it whole)"
# ... where an element of an array or a member of an object inside an enum or const value counts as this
# many characters: the grammar engine spends ~0.1-0.2 ms on each (a const object of 3,000 members: 0.7 s;
# 5,000 arrays of [[1, 2]]: 4 s), ~0.6 us on a string's character
LITERAL_ITEM_CHARS = 256
# properties that "required" leaves out, of one object: llguidance gives up on more than 500 after the
# object's "{" (a row of 4n - 1 items, at most 2,000), but only once it has compiled them (10,000: ~22 s)
MAX_OPTIONAL_PROPERTIES = 500
# properties of all the schema's objects: 10,000 required ones took ~4.4 s to check and compile
# (OpenAI's bound is 5,000)
MAX_PROPERTIES_IN_ALL = 5_000
# strings of one choice spec (guided_choice): one lexer rule of them all; 10,000 of 400 characters each
# (4 MB) check and compile in about 2 s
MAX_CHOICES = 10_000
# grammar work running at once in the process: a request's check (requests_io.spec_problem) and the
# engine's compile of a new spec (engine/constrain.py) each take one of these slots (a large schema
# takes seconds of CPU; on 2 cores, 2 leave the engine's step and agp serve's threads free)
MAX_GRAMMAR_WORK = 2
grammar_slots = threading.BoundedSemaphore(MAX_GRAMMAR_WORK)
# the native stack of the threads llguidance's compiles run on (on_grammar_stack): MAX_SCHEMA_DEPTH levels
# took up to ~6 MiB of it (a chain of $refs to objects nesting 5 to 60 levels each; a chain of bare
# $refs or of Lark rules ~4 MiB), which a thread of the default size does not have where `ulimit -s`
# is lower than 8 MiB, or unlimited (glibc then gives threads 2 MiB): the process was killed
GRAMMAR_STACK = 32 << 20


def on_grammar_stack(fn, *args):
    """fn(*args) on one of agp's grammar threads, whose native stack is GRAMMAR_STACK whatever
    `ulimit -s` says (the asking thread waits for it): where llguidance compiles a spec, depth first
    in the native stack of the thread it runs on. On such a thread already: fn(*args) there."""
    global _stack_pool
    if getattr(_on_stack, "here", False):
        return fn(*args)
    with _stack_lock:          # threading.stack_size is the process's: set while the pool may start a thread
        if _stack_pool is None:
            _stack_pool = ThreadPoolExecutor(2 * MAX_GRAMMAR_WORK, thread_name_prefix="agp-grammar-stack",
                                             initializer=_mark_on_stack)
        try:
            before = threading.stack_size(GRAMMAR_STACK)
        except (RuntimeError, ValueError):        # a platform that sets no thread's stack size: its default
            before = None
        try:
            work = _stack_pool.submit(fn, *args)
        finally:
            if before is not None:
                threading.stack_size(before)
    return work.result()


_stack_pool: ThreadPoolExecutor | None = None
_stack_lock = threading.Lock()
_on_stack = threading.local()


def _mark_on_stack() -> None:
    _on_stack.here = True


class OnceCache:
    """Values by key (a spec's digest), least recently used out past `max_entries` of them or
    `max_bytes` of their `size(value)` (a value larger than max_bytes is not kept); a value not
    kept is made by get()'s `make` once however many threads ask for it together: the others wait
    for its result (or, `wait` False, get `busy()` raised). An exception of the `shared` types that
    make() raises reaches those waiting too; any other leaves them to make it themselves. The
    requests' check cache (requests_io.spec_problem) and the engine's grammars
    (ConstraintCompiler) are two of these."""

    def __init__(self, max_entries: int, max_bytes: int, size, shared: tuple = ()):
        self.max_entries, self.max_bytes, self._size, self._shared = max_entries, max_bytes, size, shared
        self._values: OrderedDict = OrderedDict()
        self._bytes = 0
        self._making: dict = {}            # key -> _Flight, while its value is made
        self._lock = threading.Lock()

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._values

    def info(self) -> dict:
        """{"entries": values kept, "bytes": their sizes in all, "max_entries", "max_bytes"}."""
        with self._lock:
            return {"entries": len(self._values), "bytes": self._bytes, "max_entries": self.max_entries,
                    "max_bytes": self.max_bytes}

    def get(self, key, make, *, wait: bool = True, busy=None):
        while True:
            with self._lock:
                if key in self._values:
                    self._values.move_to_end(key)
                    return self._values[key]
                flight = self._making.get(key)
                if flight is None:
                    flight = self._making[key] = _Flight()
                    break
            if not wait:
                raise busy()
            flight.done.wait()
            if flight.error is not None:
                raise copy.copy(flight.error)           # its own copy: a traceback of its own
            if flight.made:
                return flight.value
        try:
            flight.value = make()
            flight.made = True
        except self._shared as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._making[key]
                if flight.made:
                    self._keep(key, flight.value)
            flight.done.set()
        return flight.value

    def _keep(self, key, value) -> None:
        size = self._size(value)
        if key in self._values or size > self.max_bytes:
            return
        self._values[key] = value
        self._bytes += size
        while len(self._values) > self.max_entries or self._bytes > self.max_bytes:
            self._bytes -= self._size(self._values.popitem(last=False)[1])


class _Flight:
    """One value while it is made: what the others that need it wait for."""

    __slots__ = ("done", "value", "made", "error")

    def __init__(self):
        self.done, self.value, self.made, self.error = threading.Event(), None, False, None


class GrammarError(ValueError):
    """A response_format / tool spec this engine cannot compile (an HTTP 400); `param`, where set,
    the request field at fault inside the spec (a forced call's `tools[i].function.parameters`)."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


def available() -> bool:
    return llg is not None


def need_llguidance():
    if llg is None:
        raise GrammarError("constrained decoding needs the llguidance package: pip install llguidance")


def parser_limits():
    """llguidance's default resource limits, with short error messages (no state or grammar dump)."""
    return llg.LLParserLimits(verbose_errors=False)


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
            atom()
            i = _escape_end(pattern, i)[0]
        elif c == "[":
            atom()
            i = _class_end(pattern, i)
        elif c == "(":
            m = _FLAGS.match(pattern, i)
            if m and m.group(2) == ")":                       # (?i): no group, no size
                i = m.end()
                continue
            stack.append([0, 0])
            i += 1
            if m:                                             # (?:  (?s:  (?-i:
                i = m.end()
            elif pattern.startswith("?", i):                  # (?=  (?!  (?<name>
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
_FLAGS = re.compile(r"\(\?([a-zA-Z-]*)([:)])")       # (?i)  (?s:  (?-i:  (?ims-x)


def _escape_end(pattern: str, i: int) -> tuple[int, str | None]:
    """(the index past the escape at pattern[i], a backslash; the hex code it spells, if any):
    \\p{L}, \\u{1F600} and \\x{41} end at their brace, \\x41, \\u0041 and \\U0001F600 after their digits,
    any other after its character (a backslash that ends the pattern: at the end)."""
    e, j = pattern[i + 1:i + 2], i + 2
    if e and e in "pPuxU" and j < len(pattern) and pattern[j] == "{":
        j = (pattern.find("}", j) + 1) or len(pattern)
        return j, pattern[i + 3:j - 1]
    if e and e in "xuU":
        j += {"x": 2, "u": 4, "U": 8}[e]
        return j, pattern[i + 2:j]
    return j, None


def _class_end(pattern: str, i: int) -> int:
    """The index just past the class `[...]` that starts at pattern[i]: a `^` and then a `]` right
    after a `[` are members; a class nested in it (`[[:digit:]]`, `[0-9&&[^5]]`) closes first."""
    n, depth, j = len(pattern), 0, i
    while j < n:
        c = pattern[j]
        if c == "[":
            depth += 1
            j += 1
            j += j < n and pattern[j] == "^"
            j += j < n and pattern[j] == "]"
        elif c == "]":
            depth -= 1
            j += 1
            if not depth:
                return j
        else:
            j += 2 if c == "\\" else 1
    return n


class _Run:
    """A regex part's forced text: `fixed` (it matches one string, of `length` characters), else the
    forced characters it must start with (`pre`) and end with (`suf`) and its longest forced run."""
    __slots__ = ("fixed", "length", "pre", "suf", "best")

    def __init__(self, fixed: bool, length: int = 0, pre: int = 0, suf: int = 0, best: int = 0):
        self.fixed, self.length = fixed, length
        self.pre, self.suf, self.best = (length, length, length) if fixed else (pre, suf, best)

    def then(self, nxt: "_Run") -> "_Run":
        if self.fixed and nxt.fixed:
            return _Run(True, self.length + nxt.length)
        return _Run(False, pre=self.length + nxt.pre if self.fixed else self.pre,
                    suf=self.suf + nxt.length if nxt.fixed else nxt.suf,
                    best=max(self.best, nxt.best, self.suf + nxt.pre))

    def repeated(self, lo: int, exact: bool) -> "_Run":
        if exact and self.fixed:
            return _Run(True, self.length * lo)
        if self.fixed:                 # its first `lo` copies are forced, what follows them is not
            return _Run(False, pre=self.length * lo, best=self.length * lo)
        # another copy may follow the last one (+, *, {n,m}): what ends a copy is forced only if exact
        return _Run(False, pre=self.pre if lo else 0, suf=self.suf if exact else 0,
                    best=max(self.best, self.suf + self.pre if lo >= 2 else 0))


_FREE = _Run(False)                    # a part that matches more than one string: nothing forced


def forced_run(pattern: str) -> int:
    """A lower bound on the longest run of characters `pattern` forces: text it must write whole
    once it begins, one character possible at each step (`^a{20000}$`: 20,000; a 20,000-character
    literal; `[a-z]{20000}`: 0). Each step's token mask works out what is left of such a run, as
    of an enum's or const's string (MAX_LITERAL_LENGTH). Counted as regex_size walks a pattern:
    literal characters and exact counts of them; a class, `.`, an alternation or an optional
    part forces nothing (so it never counts more than the pattern forces). Under the `i` flag, in
    its scope, a character with a case variant is free too."""
    # per open group: [branches done, the run before the last atom, the last atom, lookaround, `i` flag]
    groups = [[[], _Run(True), None, False, False]]
    best, i, n = 0, 0, len(pattern)

    def atom(run: _Run) -> None:
        g = groups[-1]
        if g[2] is not None:
            g[1] = g[1].then(g[2])
        g[2] = run

    def char(ch: str | None) -> _Run:
        """One character (None: one without a case variant): forced, unless `i` lets its case vary."""
        return _FREE if ch is not None and groups[-1][4] and ch.lower() != ch.upper() else _Run(True, 1)

    def flags(text: str, ci: bool) -> bool:
        on = True
        for f in text:
            on, ci = (False, ci) if f == "-" else (on, on if f == "i" else ci)
        return ci

    def closed(g) -> _Run:
        seq = g[1].then(g[2]) if g[2] is not None else g[1]
        if not g[0]:
            return seq
        return _Run(False, best=max([seq.best] + [b.best for b in g[0]]))

    while i < n:
        c = pattern[i]
        if c == "\\":
            e = pattern[i + 1:i + 2]
            j, code = _escape_end(pattern, i)
            ch = e if not e.isalnum() else None                                # \n, \t: no case variant
            if code is not None:
                try:
                    ch = chr(int(code, 16))
                except (TypeError, ValueError, OverflowError):
                    ch = None
            atom(_Run(True, 0) if e in "bBAzZG" else _FREE if e in "dDwWsSpPhHvVRNX" or e.isdigit()
                 else char(ch))
            i = j
        elif c == "[":
            j = _class_end(pattern, i)
            one = j == i + 3 and pattern[i + 1] not in "^\\[]"              # [a]: one character
            atom(char(pattern[i + 1]) if one else _FREE)
            i = j
        elif c == "(":
            m = _FLAGS.match(pattern, i)
            if m and m.group(2) == ")":                                       # (?i): to the group's end
                groups[-1][4] = flags(m.group(1), groups[-1][4])
                i = m.end()
                continue
            look = pattern.startswith(("(?=", "(?!", "(?<=", "(?<!"), i)
            groups.append([[], _Run(True), None, look, flags(m.group(1), groups[-1][4]) if m else groups[-1][4]])
            i += 1
            if m:
                i = m.end()
            elif pattern.startswith("?", i):
                i += 1
                if pattern.startswith("<", i) and not pattern.startswith(("<=", "<!"), i):
                    i = (pattern.find(">", i) + 1) or n
                elif pattern.startswith(("P<",), i):
                    i = (pattern.find(">", i) + 1) or n
                else:
                    i += 1
        elif c == ")":
            if len(groups) > 1:
                g = groups.pop()
                run = closed(g)
                best = max(best, run.best)
                atom(_Run(True, 0) if g[3] else run)
            i += 1
        elif c == "|":
            g = groups[-1]
            g[0].append(closed(g))
            g[1], g[2] = _Run(True), None
            i += 1
        elif c in "*+?" or (c == "{" and _COUNT.match(pattern, i)):
            g = groups[-1]
            if c == "{":
                m = _COUNT.match(pattern, i)
                lo = int(m.group(1) or 0)
                exact, i = m.group(2) is None, m.end()
            else:
                lo, exact, i = (1 if c == "+" else 0), False, i + 1
            if i < n and pattern[i] in "?+":                                  # lazy, possessive
                i += 1
            if g[2] is not None:
                best = max(best, g[2].best)
                g[2] = g[2].repeated(lo, exact)
        elif c in "^$":
            atom(_Run(True, 0))
            i += 1
        else:
            atom(_FREE if c == "." else char(c))
            i += 1
    while len(groups) > 1:
        g = groups.pop()
        run = closed(g)
        best = max(best, run.best)
        atom(run)
    return max(best, closed(groups[0]).best)


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
    run = forced_run(pattern)
    if run > MAX_LITERAL_LENGTH:
        shown = pattern if len(pattern) <= 60 else pattern[:60] + "…"
        raise GrammarError(f"{where} {shown!r} forces a run of {run:,} fixed characters: at most "
                           f"{MAX_LITERAL_LENGTH:,}, as in an enum or const string (each step's mask works out "
                           "what is left of it)")


JSON_SPACE = r"[ \t\n\r]*"       # JSON's whitespace (RFC 8259): what a "whitespace" pattern may match


def check_whitespace(pattern, where: str = "the whitespace pattern") -> None:
    """GrammarError unless `pattern` may be a JSON spec's "whitespace": a regular expression (read as
    llguidance reads it) of at most MAX_REGEX_SIZE characters unrolled that matches nothing but
    JSON's whitespace (space, tab, newline, carriage return): anything else between tokens would
    make the answer's JSON invalid (`\\s` matches form feeds and Unicode spaces too). A pattern that
    passed is remembered (WHITESPACE_KEPT of them): clients send the same one with every request,
    and the check (llguidance builds two matchers) runs again at the spec's check and compile."""
    need_llguidance()
    if not isinstance(pattern, str):
        raise GrammarError(f"{where} must be a regular expression (a string)")
    if pattern in _whitespace_passed:
        return
    _check_regex(pattern, where)
    shown = pattern if len(pattern) <= 60 else pattern[:60] + "…"
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(llg.LLMatcher.grammar_from_regex(pattern),
                                                                     limits=parser_limits())
    if is_error:
        why = [line[len("error: "):] for line in (messages[0] if messages else "").splitlines()
               if line.startswith("error: ")]
        raise GrammarError(short(f"{where} {shown!r} is not a regular expression" + (f": {why[0]}" if why else "")))
    # what it matches beyond JSON's whitespace, as a lexeme: none when no byte may start it
    beyond = llg.LLMatcher.grammar_from_lark(f"start: BEYOND\nBEYOND: /(?:{llg.regex_to_lark(pattern, '')})/ "
                                             f"& ~/{JSON_SPACE}/\n")
    if any(llg.LLMatcher(_byte_tokenizer(), beyond, log_level=0, limits=parser_limits()).compute_bitmask()[:32]):
        raise GrammarError(f"{where} {shown!r} matches more than JSON's whitespace: it may match only spaces, "
                           r"tabs, newlines and carriage returns (as [ \t\n\r]* does)")
    _whitespace_passed[pattern] = None
    while len(_whitespace_passed) > WHITESPACE_KEPT:
        try:
            _whitespace_passed.popitem(last=False)  # one call: safe beside another request thread's
        except KeyError:
            break


WHITESPACE_KEPT = 256
_whitespace_passed: OrderedDict[str, None] = OrderedDict()    # patterns check_whitespace passed, oldest first


_bytes_tokenizer = None


def _byte_tokenizer():
    """An llguidance tokenizer of one token a byte (and an end token): a matcher that needs no model's."""
    global _bytes_tokenizer
    if _bytes_tokenizer is None:
        class Bytes:
            eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
            tokens = [bytes([i]) for i in range(256)] + [b"</s>"]

            def __call__(self, text):
                return list(text.encode("utf-8") if isinstance(text, str) else text)
        _bytes_tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(Bytes()))
    return _bytes_tokenizer


def _check_pattern_properties(schema, prefix: str) -> None:
    """GrammarError for an object of more than MAX_PATTERN_PROPERTIES patternProperties (saying
    where), or a schema of more than MAX_PATTERN_PROPERTIES_IN_ALL: refused before llguidance
    spends minutes on them."""
    total, todo = 0, [("#", schema)]
    while todo:
        path, node = todo.pop()
        if not isinstance(node, dict):
            continue
        patterns = node.get("patternProperties")
        if isinstance(patterns, dict):
            if len(patterns) > MAX_PATTERN_PROPERTIES:
                where = f"at {path}: " if path != "#" else ""
                raise GrammarError(f"{prefix}{where}patternProperties has {len(patterns):,} patterns: at most "
                                   f"{MAX_PATTERN_PROPERTIES:,} in one object")
            total += len(patterns)
            if total > MAX_PATTERN_PROPERTIES_IN_ALL:
                raise GrammarError(f"{prefix}the schema has more than {MAX_PATTERN_PROPERTIES_IN_ALL:,} "
                                   "patternProperties patterns in all")
        todo += [(f"{path}/{step}", sub) for step, sub in _children(node)]


_BASE = "https://schema.invalid/root.json"     # the base URI of a schema without an $id


def schema_depth(schema) -> int:
    """An upper bound on how deep the grammar engine recurses to compile `schema`: subschemas
    nested in subschemas, a `$ref` continuing into the schema it refers to. llguidance compiles a
    schema a `$ref` refers to once, depth first, in the native stack of the thread that asks: a
    chain of 2,500 `$ref`s (90 KB of flat JSON) overflowed it and killed the process. Each
    schema a local `$ref` refers to ("#", "#/$defs/a", "#anchor", a subschema's "$id") is a unit
    of its own; the bound is the longest chain of units, where a unit reached again (recursion)
    counts every unit of its cycle once, each as deep as it nests."""
    if not isinstance(schema, dict):
        return 0
    # every subschema's base URI ($id, resolved against the one around it), the resources ($id) and
    # anchors by URI: a $ref is resolved against its base, as JSON Schema says and llguidance does
    try:
        root = urljoin(_BASE, schema["$id"]) if isinstance(schema.get("$id"), str) else _BASE
    except ValueError:
        root = _BASE
    base_of, resources, anchors = {}, {urldefrag(root)[0]: schema}, {}
    todo = [(schema, root)]
    while todo:
        node, base = todo.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$id"), str) and node is not schema:
                try:
                    base = urljoin(base, node["$id"])
                except ValueError:                  # no URI (an unclosed "[" of an IPv6 host)
                    pass
                resources.setdefault(urldefrag(base)[0], node)
            base_of[id(node)] = base
            if isinstance(node.get("$anchor"), str):
                anchors.setdefault((urldefrag(base)[0], node["$anchor"]), node)
            todo += [(v, base) for v in node.values() if isinstance(v, (dict, list))]
        elif isinstance(node, list):
            todo += [(v, base) for v in node if isinstance(v, (dict, list))]

    resource_of = {}                      # base URI -> the resource's URI (what "#..." refers within)

    def target(node: dict, ref: str):
        base = base_of.get(id(node), root)
        try:
            if ref.startswith("#"):
                if base not in resource_of:
                    resource_of[base] = urldefrag(base)[0]
                uri, fragment = resource_of[base], ref[1:]
            else:
                uri, fragment = urldefrag(urljoin(base, ref))
        except ValueError:
            return None
        at = resources.get(uri)
        if at is None or not fragment.startswith("/"):
            return at if at is None or not fragment else anchors.get((uri, unquote(fragment)))
        for part in fragment[1:].split("/"):
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(at, dict) and part in at:
                at = at[part]
            elif isinstance(at, list) and part.isdigit() and int(part) < len(at):
                at = at[int(part)]
            else:
                return None
        return at if isinstance(at, dict) else None

    units, order, edges, height = {id(schema): schema}, [id(schema)], {}, {}
    i = 0
    while i < len(order):                   # each unit: how deep it nests, and the units it refers to
        key = order[i]
        i += 1
        out, deepest, stack = [], 1, [(units[key], 1)]
        while stack:
            node, depth = stack.pop()
            deepest = max(deepest, depth)
            ref = node.get("$ref")
            to = target(node, ref) if isinstance(ref, str) else None
            if to is not None:
                out.append((depth, id(to)))
                if id(to) not in units:
                    units[id(to)] = to
                    order.append(id(to))
            stack += [(sub, depth + 1) for step, sub in _children(node)
                      if isinstance(sub, dict) and not step.startswith(("$defs/", "definitions/"))]
        edges[key], height[key] = out, deepest
    # strongly connected units (Tarjan's, without recursion), each found after those it refers to
    index, low, on, scc_of, sccs, path = {}, {}, set(), {}, [], []
    for start in order:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            key, j = work.pop()
            if j == 0:
                index[key] = low[key] = len(index)
                path.append(key)
                on.add(key)
            if j < len(edges[key]):
                work.append((key, j + 1))
                nxt = edges[key][j][1]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on:
                    low[key] = min(low[key], index[nxt])
                continue
            if low[key] == index[key]:
                members = []
                while True:
                    k = path.pop()
                    on.discard(k)
                    scc_of[k] = len(sccs)
                    members.append(k)
                    if k == key:
                        break
                sccs.append(members)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[key])
    bound = [0] * len(sccs)
    for n, members in enumerate(sccs):       # those it refers to come first
        cycle = len(members) > 1 or any(scc_of[t] == n for _, t in edges[members[0]])
        onward = [(d, bound[scc_of[t]]) for k in members for d, t in edges[k] if scc_of[t] != n]
        if cycle:                            # all of its units, one after another
            bound[n] = sum(height[k] for k in members) + max((b for _, b in onward), default=0)
        else:
            bound[n] = max([height[members[0]]] + [d + b for d, b in onward])
    return bound[scc_of[id(schema)]]


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
        self.close_objects, self.whitespace = close_objects, whitespace
        # whitespace between JSON tokens: a regex, "" for none (compact), None for JSON's any
        self.json_options = ({"whitespace_flexible": True} if whitespace is None else
                             {"whitespace_pattern": whitespace} if whitespace else {"whitespace_flexible": False})

    def _for(self, spec: dict) -> "GrammarBuilder":
        """The builder of a JSON spec's own options: "compact": true (no whitespace between
        tokens), "close_objects": false (JSON Schema's open objects), "whitespace": a regex
        (check_whitespace) of the whitespace between tokens."""
        compact, close = spec.get("compact", False), spec.get("close_objects", self.close_objects)
        pattern = spec.get("whitespace")
        if not isinstance(compact, bool) or not isinstance(close, bool):
            raise GrammarError("'compact' and 'close_objects' must be true or false")
        if pattern is not None:
            if compact:
                raise GrammarError("give 'compact' or 'whitespace', not both")
            check_whitespace(pattern)
        whitespace = "" if compact else self.whitespace if pattern is None else pattern
        if whitespace == self.whitespace and close == self.close_objects:
            return self
        return GrammarBuilder(close, whitespace)

    # ---- spec -> llguidance grammar text ---------------------------------------------------
    def _build(self, spec) -> str:
        if not isinstance(spec, dict):
            raise GrammarError("the constraint must be an object with a 'type'")
        kind = spec.get("type")
        try:
            if kind == "json_object":
                return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=self._for(spec).json_options)
            if kind == "json_schema":
                body = spec.get("json_schema", spec)
                schema = body.get("schema") if isinstance(body, dict) else None
                if not isinstance(schema, (dict, bool)):
                    raise GrammarError("json_schema needs a 'schema' object")
                if schema is False:
                    raise GrammarError("the schema is false, which no value matches")
                return self._for(spec)._json_grammar({} if schema is True else schema)
            if kind == "regex":
                pattern = spec.get("pattern")
                if not isinstance(pattern, str):
                    raise GrammarError("regex needs a 'pattern' string")
                _check_regex(pattern, "the regex")
                return llg.LLMatcher.grammar_from_regex(ascii_classes(pattern))
            if kind == "tool_call":
                return self._tool_grammar(spec)
            if kind == "structural_tag":
                return self._structural_tag_grammar(spec)
            if kind == "choice":
                return _choice_grammar(spec)
            if kind == "grammar":
                return _cfg_grammar(spec)
        except GrammarError:
            raise
        except (ValueError, TypeError) as e:
            raise GrammarError(short(f"cannot compile the {kind}: {e}")) from None
        raise GrammarError(f"unknown constraint type {kind!r} (json_object, json_schema, regex, choice, grammar, "
                           "tool_call, structural_tag)")

    def _json_grammar(self, schema: dict, prefix: str = "") -> str:
        """A JSON Schema's grammar text, checked: GrammarError naming the innermost part of the
        schema that fails by itself (`at #/properties/a: ...`), after `prefix` ("tool 'f': ")."""
        depth = _check_schema_limits(schema, prefix, f"{prefix}the pattern")
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"{prefix}the schema nests {depth:,} levels deep, each $ref counted as the schema it "
                               f"refers to: at most {MAX_SCHEMA_DEPTH:,}")
        if _ref_loop(schema):
            raise GrammarError(f"{prefix}its $ref refers only to itself, so no value can follow it")
        given, schema = schema, self._prepare(schema)
        text, problem = self._schema_grammar(schema)
        if problem is None:
            return text
        path = self._locate(schema, problem)
        raise GrammarError(short(f"{prefix}{f'at {path}: ' if path else ''}{_reworded(problem)}")
                           + (CLOSED if self._closing_fails(given) else ""))

    def _closing_fails(self, schema) -> bool:
        """Whether `schema` fails only because its objects were closed (a required key that its
        `properties` do not list): it compiles as JSON Schema leaves objects open."""
        if not self.close_objects:
            return False
        open_objects = GrammarBuilder(False, self.whitespace)
        return open_objects._schema_grammar(open_objects._prepare(schema))[1] is None

    def _schema_grammar(self, schema) -> tuple[str, str | None]:
        """(grammar text, llguidance's first error or None) of a prepared schema."""
        try:
            text = llg.LLMatcher.grammar_from_json_schema(schema, overrides=self.json_options)
        except (ValueError, TypeError) as e:
            return "", str(e)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, limits=parser_limits())
        return text, (messages[0] if messages else "invalid schema") if is_error else None

    def _locate(self, schema: dict, problem: str) -> str:
        """The JSON pointer ("#/properties/a/items") of the innermost subschema that fails with
        `problem` by itself, trying at most MAX_LOCATE_PROBES subschemas of MAX_LOCATE_CHARS
        characters of JSON in all (then the deepest found so far); "" for the root. The
        root's $defs are there as schemas that allow anything: a $ref still resolves, and the
        problem is found where it is written, not at every $ref that leads to it."""
        defs = {k: {name: {} for name in v} for k, v in schema.items()
                if k in ("$defs", "definitions") and isinstance(v, dict)}
        probes, chars = MAX_LOCATE_PROBES, MAX_LOCATE_CHARS

        def fails(sub) -> bool:
            nonlocal probes, chars
            probes -= 1
            if probes < 0 or chars < 0:
                return False
            probe = {**defs, **sub}
            chars -= len(json.dumps(probe, separators=(",", ":")))
            return chars >= 0 and self._schema_grammar(probe)[1] == problem

        path, node = "#", schema
        while hit := next(((step, sub) for step, sub in _children(node)
                           if isinstance(sub, dict) and sub and fails(sub)), None):
            path, node = f"{path}/{hit[0]}", hit[1]
        return "" if node is schema else path

    def _prepare(self, schema):
        if isinstance(schema, dict):
            schema = json_copy({k: v for k, v in schema.items() if k != "x-guidance"})  # options are ours
            _normalise(schema)
            if self.close_objects:
                schema = _close_objects(schema)
        return schema

    def _tool_grammar(self, spec) -> str:
        tools = spec.get("tools")
        if not isinstance(tools, list) or not tools:
            raise GrammarError("tool_call needs a non-empty 'tools' list")
        every = []                              # (i, name, parameters) of each tool
        for i, t in enumerate(tools):
            fn = t.get("function", t) if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise GrammarError("every tool needs a function with a 'name'")
            # no parameters (left out, null or {}): an empty parameter list, as OpenAI defines it;
            # the call's arguments are {} (vLLM's too)
            params = fn.get("parameters") or NO_PARAMETERS
            if not isinstance(params, dict):
                raise GrammarError(f"tool {fn['name']!r}: parameters must be a JSON Schema object", tool_param(i))
            every.append((i, fn["name"], params))
        choice = spec.get("choice", "required")
        if isinstance(choice, dict):            # OpenAI's {"type": "function", "function": {"name": ...}}
            choice = (choice.get("function") or {}).get("name")
        if choice != "required" and all(name != choice for _, name, _ in every):
            raise GrammarError(f"tool_choice names {choice!r}, which is not among the tools")
        written = [tool for tool in every if choice in ("required", tool[1])]
        # counted before any is compiled (a walk: milliseconds; four tools of 4,900 properties took
        # seconds to compile before their count refused them)
        check_tools_together(written)
        check_tool_names([name for _, name, _ in every], {name for _, name, _ in written}.__contains__)
        for i, name, params in every:
            try:
                self._json_grammar(params, f"tool {name!r}: ")
            except GrammarError as e:
                e.param = tool_param(i)
                raise
        fns = {name: params for _, name, params in written}
        # each tool's parameters sit inside the call's schema: a local $ref ("#/$defs/City", what
        # pydantic writes for a nested model; "#" for a recursive one) is rebased onto that place
        array = spec.get("array", True)
        where = ("#/items" if array else "#") + ("" if len(fns) == 1 else "/anyOf/{}") + "/properties/arguments"
        call = [{"type": "object", "properties": {"name": {"const": n},
                                                  "arguments": _rebase_refs(self._prepare(p), where.format(i))},
                 "required": ["name", "arguments"], "additionalProperties": False}
                for i, (n, p) in enumerate(fns.items())]
        one = call[0] if len(call) == 1 else {"anyOf": call}
        parallel = bool(spec.get("parallel", True)) and choice == "required"
        body = ({"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
                if array else dict(one))
        body["x-guidance"] = self.json_options
        begin, end = spec.get("begin", "<tool_call>"), spec.get("end", "</tool_call>")
        lark = f'start: {json.dumps(begin)} "\\n"? %json {json.dumps(body)} "\\n"? {json.dumps(end)}'
        return llg.LLMatcher.grammar_from_lark(lark)

    def _structural_tag_grammar(self, spec) -> str:
        """vLLM's structural tag (its response_format {"type": "structural_tag", "structures",
        "triggers"}): the answer is free text until it writes a trigger; from there the structure
        whose `begin` starts with that trigger runs to its `end`, its JSON between them valid by its
        `schema` (objects closed and whitespace bounded as any JSON spec's), then free text again.
        Each structure's trigger is the first of `triggers` its begin starts with (vLLM's rule); a
        trigger that is one special token of the tokenizer is that token (the model writes it
        whole), any other is text."""
        structures, triggers = spec.get("structures"), spec.get("triggers")
        if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
            raise GrammarError("structural_tag needs 'triggers', a non-empty list of non-empty strings")
        if not isinstance(structures, list) or not structures:
            raise GrammarError("structural_tag needs 'structures', a non-empty list of {\"begin\", \"schema\", "
                               "\"end\"}")
        for what, items in (("structures", structures), ("triggers", triggers)):
            if len(items) > MAX_STRUCTURES:
                raise GrammarError(f"structural_tag has {len(items):,} {what}: at most {MAX_STRUCTURES:,}")
        json_of = self._for(spec)                  # vLLM's disable_any_whitespace, disable_additional_properties
        lark = ["%llguidance {}", "start: (" + " | ".join(f"tag_{i}" for i in range(len(structures))) + ")* TEXT",
                r"TEXT: /(.|\n)*/"]
        for i, st in enumerate(structures):
            where = f"structures[{i}]"
            if not isinstance(st, dict) or not isinstance(st.get("begin"), str) or not isinstance(st.get("end"), str):
                raise GrammarError(f"{where} must be {{\"begin\": a string, \"schema\": a JSON Schema, "
                                   "\"end\": a string}")
            for part in ("begin", "end"):
                if len(st[part]) > MAX_LITERAL_LENGTH:
                    raise GrammarError(f"{where}.{part} has {len(st[part]):,} characters: {LITERAL_BOUND}")
            trigger = next((t for t in triggers if st["begin"].startswith(t)), None)
            if trigger is None:
                raise GrammarError(f"{where}.begin {st['begin']!r} starts with none of the triggers")
            schema = st.get("schema", True)
            if schema is False or not isinstance(schema, (dict, bool)):
                raise GrammarError(f"{where}.schema must be a JSON Schema object" + (", not false, which no value "
                                   "matches" if schema is False else ""))
            schema = {} if schema is True else schema
            json_of._json_grammar(schema, f"{where}: ")              # refused here, saying where
            body = json_of._prepare(schema)
            body["x-guidance"] = json_of.json_options
            rest = st["begin"][len(trigger):]
            tail = " ".join(filter(None, [json.dumps(rest) if rest else "", "%json " + json.dumps(body),
                                          json.dumps(st["end"]) if st["end"] else ""]))
            token = self._special_token(trigger)
            if token is not None:
                lark.append(f"tag_{i}: TEXT <[{token}]> {tail}")
            else:
                lark += [f"tag_{i}_trigger[lazy]: TEXT {json.dumps(trigger)}", f"tag_{i}: tag_{i}_trigger {tail}"]
        return llg.LLMatcher.grammar_from_lark("\n".join(lark) + "\n")

    def _special_token(self, text: str) -> int | None:
        """The id of the special token whose text is `text`, or None (here: no tokenizer, none is)."""
        return None

    def _json_parts(self, spec) -> list[tuple[str, str | None, str]]:
        """(where, its request field or None, grammar text) of each JSON a compiled tool_call or
        structural_tag spec holds, alone:
        each structure's, each tool's arguments. The engine walks each as a JSON spec's grammar is
        walked (engine/constrain.py), since a JSON the model reaches only after a trigger or a tool's
        name is out of reach of the walk of the whole grammar."""
        parts = {}
        if spec.get("type") == "structural_tag":
            json_of = self._for(spec)
            for i, st in enumerate(spec["structures"]):
                schema = st.get("schema", True)
                parts.setdefault(json.dumps(json_of._prepare({} if schema is True else schema), sort_keys=True),
                                 (f"structures[{i}]: ", None, json_of.json_options))
        elif spec.get("type") == "tool_call":
            choice = spec.get("choice", "required")
            choice = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else choice
            for i, t in enumerate(spec["tools"]):
                fn = t.get("function", t)
                if choice != "required" and fn["name"] != choice:
                    continue
                parts.setdefault(json.dumps(self._prepare(fn.get("parameters") or NO_PARAMETERS), sort_keys=True),
                                 (f"tool {fn['name']!r}: ", tool_param(i), self.json_options))
        return [(where, param, llg.LLMatcher.grammar_from_json_schema(json.loads(body), overrides=options))
                for body, (where, param, options) in parts.items()]


def check_tools_together(tools: list[tuple[int, str, dict]]) -> None:
    """GrammarError for the tools a call may write ((i, name, parameters) of each; a walk of each
    schema, compiling none): one whose parameters alone are past a size bound of _check_sizes, or
    nest deeper than the call's grammar takes them (MAX_JSON_DEPTH less CALL_CHOICE_LEVELS where it
    may write several), naming `tools[i].function.parameters`; then, naming `tools`, parameters of more than
    MAX_PROPERTIES_IN_ALL properties in all, or names and enum and const values of more than
    MAX_LITERAL_CHARS characters: the call's grammar holds them all in one schema, which these
    bound as they bound one. Run before any tool is compiled."""
    chars = properties = 0
    for i, name, params in tools:
        try:
            if len(tools) > 1 and isinstance(params, dict):
                _check_json_depth(params, f"tool {name!r}: ", MAX_JSON_DEPTH - CALL_CHOICE_LEVELS,
                                  f" where the call may write several tools: its grammar holds each "
                                  f"{CALL_CHOICE_LEVELS} levels deeper")
            sizes = _check_sizes(params, f"tool {name!r}: ") if isinstance(params, dict) else (0, 0)
        except GrammarError as e:
            e.param = tool_param(i)
            raise
        chars, properties = chars + len(name) + sizes[0], properties + sizes[1]
    if properties > MAX_PROPERTIES_IN_ALL:
        raise GrammarError(f"the tools' parameters have {properties:,} properties in all: at most "
                           f"{MAX_PROPERTIES_IN_ALL:,} in one call's tools, as in one schema", "tools")
    if chars > MAX_LITERAL_CHARS:
        raise GrammarError(f"the tools' names and their parameters' enum and const values come to {chars:,} "
                           f"characters in all: at most {MAX_LITERAL_CHARS:,} in one call's tools, as in one schema",
                           "tools")


def tool_param(i: int) -> str:
    """The request field of tool i's parameters (OpenAI's name for it in its errors)."""
    return f"tools[{i}].function.parameters"


def check_tool_names(names: list[str], written) -> None:
    """GrammarError naming `tools[i].function.name` for the first tool whose name the call may
    write (`written(name)`) that is longer than MAX_LITERAL_LENGTH: the answer writes it whole."""
    for i, name in enumerate(names):
        if written(name) and len(name) > MAX_LITERAL_LENGTH:
            raise GrammarError(f"the tool's name has {len(name):,} characters: {LITERAL_BOUND}", tool_name(i))


def tool_name(i: int) -> str:
    """The request field of tool i's name."""
    return f"tools[{i}].function.name"


NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}

# keys whose value is a subschema, a list of them, or an object of them (JSON Schema 2020-12, draft 4's items list)
_ONE = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else", "contains",
        "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _children(node: dict):
    """(JSON pointer steps, subschema) of each schema directly inside `node`."""
    for k, v in node.items():
        if k in _ONE and isinstance(v, dict):
            yield _escape(k), v
        elif k in _LIST and isinstance(v, list):
            yield from ((f"{k}/{i}", x) for i, x in enumerate(v))
        elif k in _NAMED and isinstance(v, dict):
            yield from ((f"{k}/{_escape(name)}", x) for name, x in v.items())


def _rebase_refs(schema, base: str):
    """`schema` (a prepared copy, changed in place) with each local `$ref` ("#", "#/...") made
    relative to `base`, the JSON pointer of the place it is put at inside a larger schema. A
    subschema with its own "$id" is a resource of its own, whose local refs resolve against it:
    left as it is. A subschema met twice (one object in two places of a schema built in Python)
    is rebased once."""
    todo, seen = [schema], set()
    while todo:
        node = todo.pop()
        if not isinstance(node, dict) or "$id" in node or id(node) in seen:
            continue
        seen.add(id(node))
        ref = node.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            node["$ref"] = base + ref[1:]
        todo += [sub for _, sub in _children(node)]
    return schema


def _escape(name: str) -> str:
    """A key as a JSON pointer step (RFC 6901)."""
    return name.replace("~", "~0").replace("/", "~1")


# JSON Schema's patterns are ECMA-262 regexes, whose \d and \w are ASCII (vLLM's backends read a
# guided_regex so too); llguidance's (Rust's) are Unicode: \d would allow "꯲" and \w "日"
_ASCII_CLASSES = {"d": "[0-9]", "D": "[^0-9]", "w": "[0-9A-Za-z_]", "W": "[^0-9A-Za-z_]"}


def ascii_classes(pattern: str) -> str:
    r"""`pattern` with \d, \D, \w, \W spelt as the ASCII classes they are in ECMA-262 (a nested
    class inside [...]: Rust's syntax takes `[a[0-9]]`)."""
    return re.sub(r"\\(.)", lambda m: _ASCII_CLASSES.get(m.group(1), m.group(0)), pattern, flags=re.S)


def _no_op(node: dict, key: str) -> bool:
    """Whether `key` of schema `node` constrains nothing (llguidance refuses these keywords
    whatever their value): uniqueItems false, an empty dependentRequired or dependentSchemas,
    propertyNames {} or true, not false, if without then and else, then or else without if."""
    v = node[key]
    return ((key == "uniqueItems" and v is False) or (key in ("dependentRequired", "dependentSchemas") and v == {})
            or (key == "propertyNames" and (v is True or v == {})) or (key == "not" and v is False)
            or (key == "if" and "then" not in node and "else" not in node)
            or (key in ("then", "else") and "if" not in node))


# JSON Schema's counts: each a non-negative integer, which JSON Schema's data model says 2.0 is too
# (a number with no fractional part is an integer: Jackson's Double, Python's float write 2.0), as
# agp's own integer request fields take it; llguidance takes 2 alone ("Expected positive integer
# for 'maxLength', got 2.0", a 400 for a valid schema), so a whole float goes to it as that integer
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")


def _normalise(schema) -> None:
    """In place, on `schema` and its subschemas: keywords that constrain nothing dropped (_no_op),
    ascii_classes on every pattern and patternProperties key, a count written as a whole float
    (`"maxLength": 3.0`) made that integer."""
    todo = [schema]
    while todo:
        node = todo.pop()
        if not isinstance(node, dict):
            continue
        for key in _COUNTS:
            v = node.get(key)
            if isinstance(v, float) and v.is_integer() and 0 <= v <= 2 ** 53:   # exact as a float
                node[key] = int(v)
        for key in [k for k in ("uniqueItems", "dependentRequired", "dependentSchemas", "propertyNames", "not",
                                "if", "then", "else") if k in node and _no_op(node, k)]:
            del node[key]
        if isinstance(node.get("pattern"), str):
            node["pattern"] = ascii_classes(node["pattern"])
        if isinstance(node.get("patternProperties"), dict):
            node["patternProperties"] = {ascii_classes(k): v for k, v in node["patternProperties"].items()}
        todo += [sub for _, sub in _children(node)]


CLOSED = ("; objects that list 'properties' are closed (additionalProperties: false, as OpenAI's strict mode "
          "closes them): list every required key in 'properties', or set 'additionalProperties' yourself")


def _reworded(problem: str) -> str:
    """llguidance's message, where it names its own options (which a request cannot set)."""
    if problem.startswith("oneOf constraints are not supported"):
        return ("oneOf whose branches can match the same value cannot be enforced (exactly one must match): "
                "use anyOf, or make the branches exclusive")
    return problem


def _choice_grammar(spec) -> str:
    """{"type": "choice", "choices": ["yes", "no"]}: the answer is exactly one of the strings, at
    most MAX_CHOICES of them, each of at most MAX_LITERAL_LENGTH characters. They are one lexer
    rule, which the lexer matches together (work
    linear in their text), not one grammar rule of a branch each: llguidance's parser takes no
    more than 2,000 branches in a row, and checking such a rule grows with the square of them."""
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choice needs a non-empty list of non-empty strings")
    if len(choices) > MAX_CHOICES:
        raise GrammarError(f"choice has {len(choices):,} strings: at most {MAX_CHOICES:,}")
    longest = max(map(len, choices))
    if longest > MAX_LITERAL_LENGTH:
        raise GrammarError(f"choice has a string of {longest:,} characters: {LITERAL_BOUND}")
    return llg.LLMatcher.grammar_from_lark("start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c) for c in choices))


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
        raise GrammarError(short(f"the grammar does not parse as Lark or GBNF: {e}")) from None
    rules, depth = _check_lark_regexes(lark), 0
    decoder, schemas = json.JSONDecoder(), []
    for m in re.finditer(r"%json\s*", lark):        # a %json schema nests inside the rule it is in
        try:
            schema, end = decoder.raw_decode(lark, m.end())
        except ValueError:
            continue                                  # not JSON: llguidance says so
        except RecursionError:                        # deeper than Python's parser goes: past the bound
            raise GrammarError(f"the %json schema nests more than {MAX_JSON_DEPTH} levels of arrays and objects "
                               f"(at most {MAX_JSON_DEPTH})") from None
        schemas.append((m.end(), end))
        # its patterns are bounded as a json_schema's are
        depth = max(depth, _check_schema_limits(schema, "the %json schema: ", "the %json schema's pattern"))
    _check_lark_strings(lark, schemas)
    if rules + depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the grammar has {rules:,} rule{'s' if rules != 1 else ''}" + (f" and a %json schema {depth:,} levels deep"
                           if depth else "") + f": at most {MAX_SCHEMA_DEPTH:,} in all")
    return llg.LLMatcher.grammar_from_lark(lark)


# a rule's (or terminal's) definition in Lark: `name:`, `?name:`, `name[lazy]:`, `NAME.2:` at a
# line's start (its name the group), or a %directive
_DEFINED = re.compile(r"^[ \t]*(?:[?!]?([A-Za-z_][A-Za-z0-9_]*)(?:\[[^\]\n]*\])?(?:\.-?\d+)?[ \t]*:(?!:)|%)", re.M)
# what a Lark grammar's text is made of, as far as the size of its terminals goes (Lark's own
# lexemes: a regex has no unescaped "/", a comment runs to the line's end)
_LARK_TOKEN = re.compile(r"""(?P<comment>//[^\n]*)
    | (?P<string>"(?:\\.|[^"\\\n])*")i?
    | (?P<regex>/(?!/)(?:\\.|[^/\\\n])*/)[imslux]*
    | (?P<range>\.\.\s*"(?:\\.|[^"\\\n])*")
    | ~\s*(?P<times>\d+(?:\s*\.\.\s*\d+)?)
    | (?P<count>\{\s*\d*\s*(?:,\s*\d*\s*)?\})
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<open>\[) | (?P<close>\]) | (?P<keep>[()|*+?])
    | \s+ | .""", re.X | re.S)


def _check_lark_strings(lark: str, schemas: list[tuple[int, int]]) -> None:
    """GrammarError for a string literal ("...") of a Lark grammar's rules and terminals longer than
    MAX_LITERAL_LENGTH characters, as an enum's string is refused: the answer writes it whole once
    it starts. `schemas`: the (start, end) of each %json schema's text, whose JSON strings are not
    the grammar's (its literals are bounded as a json_schema's are)."""
    defs = list(_DEFINED.finditer(lark))
    for k, m in enumerate(defs):
        if not m.group(1):                      # a %directive
            continue
        end = defs[k + 1].start() if k + 1 < len(defs) else len(lark)
        for t in _LARK_TOKEN.finditer(lark, m.end(), end):
            if t.lastgroup != "string" or any(a <= t.start() < b for a, b in schemas):
                continue
            text = t.group("string")
            try:
                n = len(json.loads(text))
            except ValueError:
                n = len(text) - 2
            if n > MAX_LITERAL_LENGTH:
                raise GrammarError(f"the string {text[:30]}…\" of {'terminal' if _terminal(m.group(1)) else 'rule'} "
                                   f"{m.group(1)} has {n:,} characters: {LITERAL_BOUND}")


def _check_lark_regexes(lark: str) -> int:
    """GrammarError for a Lark grammar's regex (`/(a{1000}){1000}/`, in any rule) or terminal (an
    uppercase rule: one regex of the lexer, of its strings, regexes and the terminals it names,
    `("a"{1000}){1000}` too) that unrolls to more than MAX_REGEX_SIZE characters, as a
    json_schema's pattern is refused: llguidance's lexer builds them as it goes (a million
    characters: hundreds of MB and seconds at the answer's first mask, then it gives up). Returns
    how many rules and terminals it defines."""
    bodies: dict[str, list] = {}               # terminal -> its tokens
    defs = list(_DEFINED.finditer(lark))
    for k, m in enumerate(defs):                # each definition's tokens, up to the next one or a %directive
        end = defs[k + 1].start() if k + 1 < len(defs) else len(lark)
        name, tokens = m.group(1), []
        terminal = _terminal(name)
        for t in _LARK_TOKEN.finditer(lark, m.end(), end):
            if t.lastgroup == "regex":
                _check_regex(t.group("regex")[1:-1], f"the regex of {'terminal' if terminal else 'rule'} {name}"
                             if name else "the regex")
            if terminal and t.lastgroup not in (None, "comment"):
                tokens.append(t)
        if terminal:
            bodies[name] = tokens
    sizes: dict[str, int] = {}

    def atom(n: int) -> str:
        return f"(?:x{{{min(n, 10 ** 9 - 1)}}})" if n != 1 else "x"

    def size_of(name: str) -> int:
        parts = []                              # the terminal as a regex of placeholder atoms: regex_size's
        for t in bodies[name]:
            kind = t.lastgroup
            if kind == "string":
                parts.append(atom(len(t.group("string")) - 2))
            elif kind == "regex":
                parts.append(f"(?:{t.group('regex')[1:-1]})")
            elif kind == "name":                # a terminal it names (one of its own cycle: llguidance refuses it)
                parts.append(atom(sizes.get(t.group("name"), 1)))
            elif kind == "times":
                parts.append("{" + re.sub(r"\s*\.\.\s*", ",", t.group("times")) + "}")
            elif kind == "count":
                parts.append(re.sub(r"\s+", "", t.group("count")))
            elif kind in ("open", "close", "keep"):
                parts.append({"open": "(?:", "close": ")?"}.get(kind, t.group(0)))
        return regex_size("".join(parts))

    on_path: set[str] = set()
    for first in bodies:                        # each terminal after those it names (no recursion: a chain
        todo = [(first, False)]                 # of a thousand terminals is a grammar agp takes)
        while todo:
            name, named_done = todo.pop()
            if name in sizes or (not named_done and name in on_path):
                continue
            if named_done:
                on_path.discard(name)
                sizes[name] = size_of(name)
                if sizes[name] > MAX_REGEX_SIZE:
                    raise GrammarError(f"terminal {name} is too complex to enforce: it unrolls to about "
                                       f"{sizes[name]:,} characters (at most {MAX_REGEX_SIZE:,})")
                continue
            on_path.add(name)
            todo.append((name, True))
            todo += [(t.group("name"), False) for t in bodies[name] if t.lastgroup == "name"
                     and t.group("name") in bodies and t.group("name") not in sizes]
    return sum(1 for m in defs if m.group(1))


def _check_schema_limits(schema, prefix: str, pattern_where: str) -> int:
    """GrammarError for a schema's enums, consts, properties, pattern or patternProperties past
    their bounds (each found by a walk of the schema, before the grammar engine sees it); else how
    deep it nests (schema_depth), for the caller to bound."""
    _check_json_depth(schema, prefix)
    _check_sizes(schema, prefix)
    for pattern in _regexes(schema):
        _check_regex(pattern, pattern_where)
    _check_pattern_properties(schema, prefix)
    return schema_depth(schema)


def json_copy(value):
    """A copy of a JSON value, its arrays and objects copied (copy.deepcopy, without recursion)."""
    def fresh(v):
        return dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v

    top = fresh(value)
    todo = [top]
    while todo:
        node = todo.pop()
        for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(v, (dict, list)):
                node[k] = fresh(v)
                todo.append(node[k])
    return top


def _check_json_depth(schema, prefix: str, most: int = MAX_JSON_DEPTH, why: str = "") -> None:
    """GrammarError, naming where (its JSON pointer), for a schema whose JSON nests more than
    `most` levels of arrays and objects anywhere (`why`: what sets a bound below MAX_JSON_DEPTH):
    found without recursion, before anything that recurses (a copy, the JSON text) sees it."""
    todo = [(schema, 1, None, "")]
    while todo:
        entry = todo.pop()
        node, depth = entry[0], entry[1]
        if depth > most:
            steps = []
            while entry[2] is not None:
                steps.append(entry[3])
                entry = entry[2]
            raise GrammarError(short(f"{prefix}the schema nests more than {most} levels of arrays and "
                                     f"objects (at most {most}{why}), at #/{'/'.join(reversed(steps))}"))
        pairs = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        todo += [(v, depth + 1, entry, _escape(str(k))) for k, v in pairs if isinstance(v, (dict, list))]


def _check_sizes(schema, prefix: str) -> tuple[int, int]:
    """GrammarError, naming the keyword and where (its JSON pointer), for an enum of more than
    MAX_ENUM_VALUES values, a string of an enum or const value or a property's name (in `properties`
    or `required`) longer than MAX_LITERAL_LENGTH, enum and const values of more than MAX_LITERAL_CHARS
    characters in all
    (a string's characters; another value's as _literal_size counts them), an object of more than MAX_OPTIONAL_PROPERTIES
    properties that "required" leaves out, or more than MAX_PROPERTIES_IN_ALL properties in all:
    refused in a walk of the schema (milliseconds) before the grammar engine spends seconds on it.
    Each subschema is counted once where it is written (a $ref to it adds nothing). Else (its enum
    and const characters, its properties), which a schema compiled with others adds to theirs."""
    literal_chars = properties = 0
    todo = [("#", schema)]
    while todo:
        path, node = todo.pop()
        if not isinstance(node, dict):
            continue
        at = f"at {path}: " if path != "#" else ""
        values = node.get("enum")
        if isinstance(values, list):
            if len(values) > MAX_ENUM_VALUES:
                raise GrammarError(f"{prefix}{at}'enum' has {len(values):,} values: at most {MAX_ENUM_VALUES:,}")
        else:
            values = []
        for key, literals in (("enum", values), ("const", [node["const"]] if "const" in node else [])):
            for v in literals:
                chars, longest = (len(v), len(v)) if isinstance(v, str) else \
                    _literal_size(v, MAX_LITERAL_CHARS - literal_chars)
                if longest > MAX_LITERAL_LENGTH:
                    raise GrammarError(f"{prefix}{at}'{key}' has a string of {longest:,} characters: at most "
                                       f"{MAX_LITERAL_LENGTH:,} in one value")
                literal_chars += chars
                if literal_chars > MAX_LITERAL_CHARS:
                    raise GrammarError(f"{prefix}{at}'{key}': the schema's enum and const values come to more "
                                       f"than {MAX_LITERAL_CHARS:,} characters in all (an element of an array or a "
                                       f"member of an object in them counts as {LITERAL_ITEM_CHARS})")
        required = node.get("required")
        named = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
        props = node.get("properties")
        if isinstance(props, dict):
            longest = max((len(name) for name in props if isinstance(name, str)), default=0)
            if longest > MAX_LITERAL_LENGTH:
                raise GrammarError(f"{prefix}{at}'properties' has a name of {longest:,} characters: at most "
                                   f"{MAX_LITERAL_LENGTH:,}")
            properties += len(props)
            if properties > MAX_PROPERTIES_IN_ALL:
                raise GrammarError(f"{prefix}{at}'properties': the schema's objects have more than "
                                   f"{MAX_PROPERTIES_IN_ALL:,} properties in all (at most {MAX_PROPERTIES_IN_ALL:,})")
            optional = sum(1 for name in props if name not in named)
            if optional > MAX_OPTIONAL_PROPERTIES:
                raise GrammarError(f"{prefix}{at}'properties' has {optional:,} optional properties (not in "
                                   f"'required'): at most {MAX_OPTIONAL_PROPERTIES:,} in one object")
        longest = max(map(len, named), default=0)   # a required name is written whole, in properties or not
        if longest > MAX_LITERAL_LENGTH:
            raise GrammarError(f"{prefix}{at}'required' has a name of {longest:,} characters: at most "
                               f"{MAX_LITERAL_LENGTH:,}")
        todo += [(f"{path}/{step}", sub) for step, sub in _children(node)]
    return literal_chars, properties


def _literal_size(value, most: int) -> tuple[int, int]:
    """(what a non-string enum or const value counts toward MAX_LITERAL_CHARS, its longest string or
    key): its strings' and numbers' characters, and LITERAL_ITEM_CHARS for each element of an array and
    member of an object in it; counted without recursion (a value may nest deeper than Python
    recurses) and only until past `most`."""
    n, longest, todo = 0, 0, [value]
    while todo and n <= most:
        v = todo.pop()
        if isinstance(v, dict):
            n += len(v) * LITERAL_ITEM_CHARS + sum(len(k) for k in v)
            longest = max(longest, max(map(len, v), default=0))
            todo += v.values()
        elif isinstance(v, list):
            n += len(v) * LITERAL_ITEM_CHARS
            todo += v
        elif isinstance(v, str):
            n += len(v)
            longest = max(longest, len(v))
        else:
            n += len(str(v))
    return n, longest


def _terminal(name: str | None) -> bool:
    """Whether a Lark definition's name is a terminal's (upper case), not a rule's."""
    return bool(name) and name.lstrip("_").isupper()


def spec_digest(spec) -> bytes:
    """The SHA-256 of a spec's canonical JSON text (keys sorted): equal specs, equal digests; what
    the caches of checked and compiled specs are keyed by (TypeError/ValueError: not JSON)."""
    try:
        text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    except RecursionError:
        raise ValueError("it nests deeper than JSON text can be written here") from None
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def check_spec(spec, *, close_objects: bool = True, whitespace: str | None = JSON_WHITESPACE) -> list[str]:
    """Compile `spec` as ConstraintCompiler does, but without a tokenizer (agp check): its
    warnings, or GrammarError for a spec that cannot compile."""
    need_llguidance()
    return on_grammar_stack(_checked, spec, close_objects, whitespace)


def _checked(spec, close_objects: bool, whitespace: str | None) -> list[str]:
    text = GrammarBuilder(close_objects, whitespace)._build(spec)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, limits=parser_limits())
    if is_error:
        raise GrammarError(short(messages[0] if messages else "invalid grammar"))
    return list(messages)


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


def first_line(msg: str) -> str:
    return (msg.strip().splitlines() or [""])[0]


_LISTING = re.compile(r"\n\s*\d+ \| ")      # llguidance's listing of the grammar's lines under its error


def short(msg: str) -> str:
    """An error's text for the client: the grammar listing llguidance writes under it left off (a
    tool_call's or structural_tag's grammar is ours, and can be megabytes), on one line, at most
    MAX_ERROR_CHARS characters."""
    msg = " ".join(_LISTING.split(msg, 1)[0].split())
    return msg if len(msg) <= MAX_ERROR_CHARS else msg[:MAX_ERROR_CHARS] + "…"
