"""Tool calling: tools into the prompt, tool calls out of the answer (OpenAI's shapes).

A chat template that takes `tools` (it names the variable) gets them as they are, and the
conversation's tool history as OpenAI sends it (assistant `tool_calls`, `tool` messages
with `tool_call_id`), each earlier call's arguments string parsed into the object it holds, as
vLLM hands them to the template. A template that does not (SmolLM2's) gets the convention of the
model's card instead: a system message listing the tools in `<tools>…</tools>` and asking
for calls as `<tool_call>[{"name": …, "arguments": {…}}]</tool_call>`; earlier calls are
written back in that form, and tool results as `tool` messages.

The answer is parsed in the form its model's family writes calls in (vLLM's tool-call
parsers, by their names; `tool_parser_for` tells a model's family from its chat template and
vocabulary, agp serve --tool-call-parser names one):

- `hermes` (Qwen, Hermes, SmolLM2, and any model agp's own system prompt asks): each
  `<tool_call>…</tool_call>` (a JSON object or a list of them) is a call;
- `llama3_json` (Llama 3.1+): an answer that is calls alone, `{"name": …, "parameters": {…}}`
  objects separated by `;` (or a JSON list of them), at its start or after `<|python_tag|>`;
- `mistral`: after `[TOOL_CALLS]`, a JSON list of `{"name", "arguments"}` objects, or (newer
  tokenizers) `name[ARGS]{…}`, one per `[TOOL_CALLS]`; an answer starting with such a list
  counts too (the marker is a special token a detokenised answer may have lost).

Those two families' markers are special tokens of their models' vocabularies, which an answer's
text leaves out by default: a request with tools (tool_choice not none) under either family
decodes with special tokens kept (`keeps_markers`; as vLLM, unless the request sets
skip_special_tokens itself), and the markers' text never shows in content (`MARKERS`).

Each call becomes an OpenAI tool call, the rest stays the message's content; a call part that
is not JSON (or not a call) leaves the whole text content, finish_reason unchanged (as vLLM).
With `parallel_tool_calls: false` (`limit=1`) the calls after the first are dropped, as OpenAI
promises and vLLM does: under tool_choice "auto" nothing holds the model to one call.

    messages = prepare_messages(messages, tools, template_takes_tools=False)
    content, calls = parse_tool_calls(text)          # calls: [{"id", "type", "function": {...}}]
    content, calls = parse_tool_calls(text, parser="llama3_json")
    read = read_tool_calls(text, limit, parser, read)  # the same, or `read` where it read this
    stream = tool_stream(limit, parser)              # .feed(delta), .finish(): (content, calls)
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, NamedTuple

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# what json raises for text that is no JSON value: ValueError, or RecursionError for one nested deeper
# than Python's stack (a client's arguments string, a model's answer of a thousand `[`): not JSON either
NOT_JSON = (ValueError, RecursionError)

SYSTEM = ("You are a function calling AI model. You are provided with function signatures within "
          "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
          "Don't make assumptions about what values to plug into functions.\n<tools>{tools}</tools>\n"
          "For each function call return a json object with function name and arguments within "
          "<tool_call></tool_call> XML tags as follows:\n<tool_call>[{{\"name\": <function-name>, "
          "\"arguments\": <args-dict>}}]</tool_call>")


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` itself (it names the variable)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def functions(tools: list[dict]) -> list[dict]:
    return [t["function"] for t in tools if isinstance(t, dict) and t.get("type", "function") == "function"]


def prepare_messages(messages: list[dict], tools: list[dict] | None, *, template_takes_tools: bool,
                     choice: Any = "auto") -> list[dict]:
    """The conversation as the chat template should see it (see the module docstring)."""
    if template_takes_tools:
        # an earlier call's arguments as the object they hold, as vLLM hands them to the template
        # (its chat_utils' _postprocess_messages: transformers' tool-use templates write them with
        # `| tojson`, which would quote an arguments string a second time); none or "" as {}
        return [dict(m, tool_calls=[_call_of_template(c) for c in m["tool_calls"]])
                if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list) else dict(m)
                for m in messages]
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments") or None)}
                     for c in m["tool_calls"]]
            text = m.get("content") or ""
            m["content"] = (text + "\n" if text else "") + OPEN + json.dumps(calls, ensure_ascii=False) + CLOSE
            m.pop("tool_calls")
        elif m.get("role") == "tool":
            m["content"] = m.get("content") or ""
        if m.get("content") is None:
            m["content"] = ""
        out.append({"role": m["role"], "content": m["content"]})
    if tools:                # with tool_choice "none" too: the model knows them (vLLM, OpenAI)
        listing = json.dumps(functions(tools), ensure_ascii=False)
        system = SYSTEM.format(tools=listing)
        if isinstance(choice, dict):
            system += f"\nCall the function {choice['function']['name']}."
        elif choice == "required":
            system += "\nAnswer with at least one function call."
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": system + "\n\n" + out[0]["content"]}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _call_of_template(call):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return call
    return {**call, "function": {**function, "arguments": _arguments(function.get("arguments") or None)}}


def _arguments(value) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except NOT_JSON:
            return value
    return value if value is not None else {}


def parse_tool_calls(text: str, limit: int | None = None,
                     parser: str = "hermes") -> tuple[str | None, list[dict]]:
    """(the content outside the calls, or None when there is none; the tool calls found, the
    first `limit` of them), read in `parser`'s form (PARSERS). The content is the text a stream
    of the same answer sends (tool_stream). hermes: every character outside the blocks that held
    calls, as written; a block that held none stays in it."""
    if parser != "hermes":
        content, calls = FAMILIES[parser].parse(text)
        if not calls:
            return without_markers(text, parser), []
        return (content if content.strip() else None), calls[:limit]
    calls: list[dict] = []
    kept, at = [], 0
    while (start := text.find(OPEN, at)) >= 0:      # each block, to the first CLOSE after its OPEN
        end = text.find(CLOSE, start + len(OPEN))   # (none: no later block closes either; a regex
        if end < 0:                                 # tried each OPEN to the end, n² for n of them)
            break
        found = _calls_in(text[start + len(OPEN):end])
        calls.extend(found)
        kept.append(text[at:start] if found else text[at:end + len(CLOSE)])
        at = end + len(CLOSE)
    content = "".join(kept) + text[at:]
    cut = content.rfind(OPEN)
    if cut >= 0 and CLOSE not in content[cut:]:      # the answer ended inside a block (a length cut)
        found = _finished_calls(content[cut + len(OPEN):])
        if found:                                    # its finished calls count, the unfinished one goes
            calls.extend(found)
            content = content[:cut]
    if not calls:
        return text, []
    return (content if content.strip() else None), calls[:limit]


class ToolCallsRead(NamedTuple):
    """What parse_tool_calls read in `text` with `limit` and `parser`. An answer carries it from
    its generate stage, whose python stages read its calls, to its front end (agp serve, agp
    run), which reads the same text in the same form no second time (read_tool_calls): one
    parse an answer, and the answer's calls are the ones those stages saw, ids and all."""
    text: str
    limit: int | None
    parser: str
    content: str | None
    calls: list[dict]


def read_tool_calls(text: str, limit: int | None = None, parser: str = "hermes",
                    read: ToolCallsRead | None = None) -> ToolCallsRead:
    """parse_tool_calls(text, limit, parser), with what it read; `read` itself where it read
    this text with this limit and parser (a stage that changed the text gets it read anew)."""
    if read is not None and (read.text, read.limit, read.parser) == (text, limit, parser):
        return read
    return ToolCallsRead(text, limit, parser, *parse_tool_calls(text, limit, parser))


def _finished_calls(body: str) -> list[dict]:
    """The calls written in full in a `<tool_call>` block the answer ended inside: the whole
    objects of a cut list (`[{…}, {…}, {"name": "f", "argu`), or one whole object. A model made
    to call (tool_choice "required") that writes calls until max_tokens keeps the finished ones,
    as a stream of the same answer sends them."""
    decoder, text = json.JSONDecoder(), body.lstrip()
    if text.startswith("{"):
        try:
            value, _ = decoder.raw_decode(text)
        except NOT_JSON:
            return []
        return _calls_of([value])
    if not text.startswith("["):
        return []
    values, at = [], 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        try:
            value, at = decoder.raw_decode(text, at)
        except NOT_JSON:
            return _calls_of(values)
        values.append(value)


def _calls_in(body: str) -> list[dict]:
    """The calls of one `<tool_call>` block (a JSON object or a list of them); none when it is
    not JSON."""
    try:
        value = json.loads(body.strip())
    except NOT_JSON:
        return []                           # not a call after all: it stays in the content
    return _calls_of(value if isinstance(value, list) else [value])


def _calls_of(values: list) -> list[dict]:
    """OpenAI tool calls of the `{"name", "arguments"}` objects among `values`."""
    calls = []
    for call in values:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        args = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": args if isinstance(args, str)
                                   else json.dumps(args, ensure_ascii=False)}})
    return calls


class ToolStream:
    """Streams an answer's content while holding back anything that may be a tool call: text
    from a `<tool_call>` (or a prefix of it) onwards waits until the call is complete, then
    leaves as tool-call deltas. `feed(delta) -> (content, calls)`; `finish() -> (content, calls)`.
    At most `limit` calls leave (parallel_tool_calls false: 1); later ones are dropped."""

    def __init__(self, limit: int | None = None) -> None:
        self.pending = ""
        self.held: list[str] | None = None      # a block not closed yet: its pieces as they came
        self.tail = ""                          # its last characters, where its end may have begun
        self.index = 0
        self.limit = limit

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        if self.held is not None:               # inside a block: only what came is looked at (a long
            self.held.append(delta)             # call costs its length once, not once per delta)
            look = self.tail + delta
            if CLOSE not in look:
                self.tail = look[-(len(CLOSE) - 1):]
                return "", []
            self.pending, self.held = "".join(self.held), None
        else:
            self.pending += delta
        content, calls = "", []
        while True:
            start = self.pending.find(OPEN)
            if start < 0:
                keep = partial_suffix(self.pending, OPEN)
                content += self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                return content, calls
            content += self.pending[:start]
            end = self.pending.find(CLOSE, start)
            if end < 0:
                self.held, self.pending = [self.pending[start:]], ""
                self.tail = self.held[0][-(len(CLOSE) - 1):]
                return content, calls
            block = self.pending[start:end + len(CLOSE)]
            self.pending = self.pending[end + len(CLOSE):]
            text, found = parse_tool_calls(block)
            if found:
                calls += self._numbered(found)
            else:
                content += block

    def finish(self) -> tuple[str, list[dict]]:
        """What was held back when the answer ended: a block the answer ended inside gives its
        finished calls (parse_tool_calls's rule), else its text is content after all."""
        rest = self.pending if self.held is None else "".join(self.held)
        self.pending, self.held = "", None
        if rest.startswith(OPEN):
            found = _finished_calls(rest[len(OPEN):])
            if found:
                return "", self._numbered(found)
        return rest, []

    def _numbered(self, found: list[dict]) -> list[dict]:
        calls = []
        for c in found:
            if self.limit is not None and self.index >= self.limit:
                break
            calls.append({"index": self.index, **c})
            self.index += 1
        return calls


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# ---- the other families: an answer whose calls run to its end ----------------------------------
class _Family:
    """A form of calls that runs from where it starts (`start`) to the end of the answer."""

    def start(self, text: str, since: int = 0, lead: int | None = None) -> int:
        """Where the calls may begin in `text` (as it is, or as more of the answer comes);
        len(text) when they cannot begin anywhere in it; 0 for white space alone. `since` > 0:
        not before it (a stream has sent the text before it as content). `lead`: the length of
        the white space `text` begins with, where a stream knows it."""
        raise NotImplementedError

    def calls(self, part: str) -> list[dict]:
        """The calls `part` (the text from where they begin) holds in full, or none when any of
        it is not a call."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[dict]]:
        at = self.start(text)
        if at >= len(text):
            return text, []
        found = self.calls(text[at:])
        return (text[:at], found) if found else (text, [])


_SPACE = re.compile(r"\s*")          # white space, as str.isspace and str.lstrip take it


def _marker_start(text: str, marker: str, since: int = 0) -> int:
    """Where `marker` (or, at the end, a beginning of it) is in text, from `since` on."""
    at = text.find(marker, since)
    return at if at >= 0 else len(text) - partial_suffix(text, marker)


def _json_values(text: str, separators: str) -> list | None:
    """The JSON values `text` is, one after another with `separators` (and white space) between
    them; None where anything else is there."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in separators):
            at += 1
        if at == len(text):
            return values or None
        try:
            value, at = decoder.raw_decode(text, at)
        except NOT_JSON:
            return None
        values.append(value)


def _all_calls(values: list | None, *keys: str) -> list[dict]:
    """The calls of `values` (objects, or lists of them), none unless every one is a call: an
    object with a string "name" and one of `keys` holding its arguments."""
    objects = [o for v in values or [] for o in (v if isinstance(v, list) else [v])]
    if not objects or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                              and any(k in o for k in keys) for o in objects):
        return []
    return _calls_of(objects)


class _Llama3Json(_Family):
    TAG = "<|python_tag|>"

    def start(self, text: str, since: int = 0, lead: int | None = None) -> int:
        if not since:
            at = _SPACE.match(text).end() if lead is None else lead
            if at == len(text):
                return 0                    # only white space yet: the calls may begin after it
            if text[at] in "{[" or self.TAG.startswith(text[at:at + len(self.TAG)]):
                return 0
        return _marker_start(text, self.TAG, since)

    def calls(self, part: str) -> list[dict]:
        part = part.lstrip()
        if part.startswith(self.TAG):
            part = part[len(self.TAG):]
        return _all_calls(_json_values(part, ";"), "parameters", "arguments")


class _Mistral(_Family):
    MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def start(self, text: str, since: int = 0, lead: int | None = None) -> int:
        if not since:
            at = _SPACE.match(text).end() if lead is None else lead
            after = _SPACE.match(text, at + 1).end() if at < len(text) else at
            if at == len(text) or (text[at] == "[" and text[after:after + 1] in ("", "{")):
                return 0                    # a bare list of calls (the marker detokenised away)
        return _marker_start(text, self.MARK, since)

    def calls(self, part: str) -> list[dict]:
        """The calls, each id nine letters and digits: Mistral's chat templates refuse any other
        id in the conversation that sends the calls' results back (as vLLM's mistral parser)."""
        return [{**c, "id": uuid.uuid4().hex[:9]} for c in self._calls(part.lstrip())]

    def _calls(self, part: str) -> list[dict]:
        if not part.startswith(self.MARK):
            return _all_calls(_json_values(part, ""), "arguments")
        found = []
        for piece in part.split(self.MARK)[1:]:
            if self.ARGS in piece:                                   # name[ARGS]{...}
                name, _, args = piece.partition(self.ARGS)
                value = _json_values(args, "")
                if not name.strip() or not value or len(value) != 1 or not isinstance(value[0], dict):
                    return []
                found += _calls_of([{"name": name.strip(), "arguments": value[0]}])
            else:
                calls = _all_calls(_json_values(piece, ""), "arguments")
                if not calls:
                    return []
                found += calls
        return found


FAMILIES: dict[str, _Family] = {"llama3_json": _Llama3Json(), "mistral": _Mistral()}
# the markers each family's calls are written with: special tokens of its models' vocabularies
MARKERS: dict[str, tuple[str, ...]] = {"llama3_json": (_Llama3Json.TAG,), "mistral": (_Mistral.MARK, _Mistral.ARGS)}


def without_markers(text: str, parser: str) -> str:
    """`text` with `parser`'s markers taken out: the content of an answer that holds no call
    (a marker kept in the decoded text for the parser's sake is no part of what the model said)."""
    for marker in MARKERS.get(parser, ()):
        text = text.replace(marker, "")
    return text


def keeps_markers(parser: str, choice: Any, special: Any) -> bool:
    """Whether an answer read in `parser`'s form, its request's tool_choice `choice`, decodes with
    special tokens kept: the family's markers are among the tokenizer's `special` tokens (a
    container of their texts) and it may write calls of its own (tool_choice not none; a forced
    call is written in agp's own form, answer_parser)."""
    return choice != "none" and any(m in special for m in MARKERS.get(parser, ()))
PARSERS = ("hermes", "llama3_json", "mistral")      # vLLM's --tool-call-parser names agp reads


def check_parser(name: str) -> str:
    """`name` when agp reads calls in that form, else a ValueError naming those it reads."""
    if name not in PARSERS:
        raise ValueError(f"agp has no tool-call parser {name!r}; it reads {', '.join(PARSERS)} "
                         "(or auto: the model's own, from its chat template and vocabulary)")
    return name


def tool_parser_for(template: str | None, vocabulary: Any = ()) -> str:
    """The form a model writes its calls in (PARSERS), from its chat template text and its
    vocabulary (a container of token strings: `"[TOOL_CALLS]" in vocabulary`). A template that
    does not render tools gets agp's own system prompt, which asks for `<tool_call>`: hermes."""
    template = template or ""
    if "<tool_call>" in template:
        return "hermes"
    if _Mistral.MARK in template or _Mistral.MARK in vocabulary:
        return "mistral"
    if not template_takes_tools(template):
        return "hermes"
    if _Llama3Json.TAG in template or ("ipython" in template and '"parameters"' in template):
        return "llama3_json"
    return "hermes"


class _HeldStream:
    """tool_stream of a family whose calls run to the answer's end: the text before where calls
    may begin streams as content; from there on it waits for the end, then leaves as calls, or as
    content when it held none (the same split parse_tool_calls makes of the whole answer)."""

    def __init__(self, family: str, limit: int | None) -> None:
        self.family, self.family_name, self.limit = FAMILIES[family], family, limit
        self.text, self.sent = "", 0
        self.lead: int | None = None        # the white space the answer begins with, once more came

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        text, self.text = self.text, ""     # held by a local alone, CPython grows it in place
        text += delta                       # (`self.text += delta` copies the whole answer)
        self.text = text
        if self.lead is None:               # each delta costs its own length, not the answer's
            if not delta.strip():
                return "", []               # white space alone: the calls may begin after it
            self.lead = _SPACE.match(self.text).end()
        at = self.family.start(self.text, self.sent, self.lead)
        out, self.sent = self.text[self.sent:max(at, self.sent)], max(at, self.sent)
        return out, []

    def finish(self) -> tuple[str, list[dict]]:
        content, calls = self.family.parse(self.text)
        if calls and len(content) >= self.sent:
            calls = [{"index": i, **c} for i, c in enumerate(calls[:self.limit])]
            return content[self.sent:], calls
        return without_markers(self.text[self.sent:], self.family_name), []


def answer_parser(family: str, choice: Any) -> str:
    """The form an answer's calls are read in: its model's `family`, but hermes where tool_choice
    forced a call ("required" or a named function), which the constrained decoder writes in that
    form (tool_call_spec) whatever the model."""
    return "hermes" if forces_call(choice) else family


def forces_call(choice: Any) -> bool:
    """Whether tool_choice forces a call: "required", or a named function."""
    return choice == "required" or isinstance(choice, dict)


def tool_stream(limit: int | None = None, parser: str = "hermes"):
    """A stream of one answer's content and calls in `parser`'s form (ToolStream's interface)."""
    return ToolStream(limit) if parser == "hermes" else _HeldStream(parser, limit)


def tool_call_spec(tools: list[dict], choice: Any) -> dict | None:
    """The constrain.py spec that forces a call (tool_choice "required" or a named function)."""
    if forces_call(choice):
        return {"type": "tool_call", "tools": tools, "choice": choice, "begin": OPEN, "end": CLOSE, "array": True}
    return None
