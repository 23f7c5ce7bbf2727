"""Constrained decoding (pipeline_dsl.engine.constrain): compile, masks, and generation.

Generation runs the real ModelRunner of the tiny random GGUF model through the Engine, each
constrained request's grammar in its SamplingParams (engine/processors.py masks its rows
before sampling and advances its matcher after); one slow test does the same with the
embedded SmolLM2."""

import json
import re
import threading
from dataclasses import replace

import pytest
import torch

pytest.importorskip("llguidance")

from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from pipeline_dsl import constraints  # noqa: E402
from pipeline_dsl.engine import constrain  # noqa: E402
from pipeline_dsl.engine.constrain import ConstraintCompiler, GrammarError, apply_masks  # noqa: E402
from tiny_model import BOUNDED_SCHEMA  # noqa: E402

try:
    import jsonschema
except ImportError:  # the light checks below still run
    jsonschema = None

BOUNDED = BOUNDED_SCHEMA
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}}},
]


def run(engine, requests):
    """requests: {id: (grammar or None, SamplingParams)} -> {id: RequestOutput (finished)}."""
    for rid, (grammar, params) in requests.items():
        engine.add_request(rid, messages=[{"role": "user", "content": "hello world"}],
                           params=replace(params, constraint=grammar))
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def check_bounded(v):
    if jsonschema is not None:
        jsonschema.validate(v, BOUNDED)
        return
    assert set(v) == set(BOUNDED["properties"])
    assert isinstance(v["name"], str) and len(v["name"]) <= 6
    assert isinstance(v["n"], int) and 0 <= v["n"] <= 999
    assert isinstance(v["ok"], bool) and v["color"] in ("red", "green")
    assert len(v["tags"]) <= 3 and all(t in ("a", "b") for t in v["tags"])


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    return Engine(EngineConfig(model=str(tiny_gguf), dtype="fp32"))


@pytest.fixture(scope="module")
def compiler(engine):
    return ConstraintCompiler(engine.tokenizer, engine.vocab_size)


def ids_of(engine, text):
    return engine.tokenizer.encode(text, add_special_tokens=False)


# ---- generation on the tiny model -------------------------------------------------------------
def test_schema_output_always_validates(engine, compiler):
    g = compiler.compile({"type": "json_schema", "schema": BOUNDED})
    reqs = {"greedy": (g, SamplingParams(max_tokens=300))}
    for seed in range(6):
        reqs[f"s{seed}"] = (g, SamplingParams(max_tokens=300, temperature=1.0, seed=seed))
    for rid, out in run(engine, reqs).items():
        assert out.finish_reason == "stop", (rid, out.text)
        check_bounded(json.loads(out.text))


def test_json_object_and_regex(engine, compiler):
    obj = ConstraintCompiler(engine.tokenizer, engine.vocab_size, whitespace="").compile(
        {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
            "type": "object", "properties": {"k": {"type": "string", "maxLength": 4}},
            "required": ["k"], "additionalProperties": False}}})
    rx = compiler.compile({"type": "regex", "pattern": r"(hello|world) [0-9]{2}"})
    reqs = {f"o{s}": (obj, SamplingParams(max_tokens=60, temperature=1.0, seed=s)) for s in range(3)}
    reqs.update({f"r{s}": (rx, SamplingParams(max_tokens=60, temperature=1.0, seed=s)) for s in range(3)})
    for rid, out in run(engine, reqs).items():
        assert out.finish_reason == "stop", (rid, out.text)
        if rid.startswith("o"):
            v = json.loads(out.text)
            assert list(v) == ["k"] and len(v["k"]) <= 4 and " " not in out.text.replace(v["k"], "")
        else:
            assert re.fullmatch(r"(hello|world) [0-9]{2}", out.text), out.text


def test_a_grammar_ends_its_answer_at_eos_even_with_ignore_eos(engine, compiler):
    """A complete grammar allows only EOS: that EOS ends the answer whatever ignore_eos says
    (ignoring it would leave the answer nothing it may go on with)."""
    rx = compiler.compile({"type": "regex", "pattern": r"(hello|world) [0-9]{2}"})
    reqs = {f"r{s}": (rx, SamplingParams(max_tokens=60, temperature=1.0, seed=s, ignore_eos=True)) for s in range(2)}
    for rid, out in run(engine, reqs).items():
        assert out.finish_reason == "stop", (rid, out.finish_reason, out.text)
        assert re.fullmatch(r"(hello|world) [0-9]{2}", out.text), out.text


def test_tool_calls(engine, compiler):
    required = compiler.compile({"type": "tool_call", "tools": TOOLS, "choice": "required"})
    named = compiler.compile({"type": "tool_call", "tools": TOOLS,
                              "choice": {"type": "function", "function": {"name": "add"}}})
    reqs = {f"req{s}": (required, SamplingParams(max_tokens=300, temperature=1.0, seed=s)) for s in range(3)}
    reqs.update({f"add{s}": (named, SamplingParams(max_tokens=300, temperature=1.0, seed=s)) for s in range(3)})
    for rid, out in run(engine, reqs).items():
        assert out.finish_reason == "stop", (rid, out.text)
        body = re.fullmatch(r"<tool_call>\n?(.*?)\n?</tool_call>", out.text, re.S)
        assert body, out.text
        calls = json.loads(body.group(1))
        assert calls and all(set(c) == {"name", "arguments"} for c in calls)
        for c in calls:
            assert c["name"] in ("get_weather", "add")
            if c["name"] == "add":
                assert set(c["arguments"]) == {"a", "b"} and 0 <= c["arguments"]["a"] <= 99
            else:
                assert c["arguments"]["unit"] in ("c", "f")
        if rid.startswith("add"):
            assert [c["name"] for c in calls] == ["add"]


def test_tool_call_in_another_format(engine, compiler):
    g = compiler.compile({"type": "tool_call", "tools": TOOLS, "choice": "add", "array": False,
                          "begin": "<call>", "end": "</call>"})
    m = g.matcher()
    text = '<call>{"name": "add", "arguments": {"a": 1, "b": 2}}</call>'
    assert all(m.accept(t) for t in ids_of(engine, text)) and m.is_finished()
    m = g.matcher()
    assert not all(m.accept(t) for t in ids_of(engine, '<call>[{"name": "add"'))


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
# parameters as pydantic writes a nested model (a local $ref into $defs), a recursive one ("#"),
# a resource with its own $id, whose refs resolve against it wherever it is put, and one $ref
# object in two places (parameters built in Python)
TRIP = {"type": "function", "function": {"name": "trip", "parameters": {
    "$defs": {"City": CITY}, "type": "object",
    "properties": {"stops": {"type": "array", "items": {"$ref": "#/$defs/City"}, "maxItems": 2}},
    "required": ["stops"]}}}
TREE = {"type": "function", "function": {"name": "tree", "parameters": {
    "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
    "required": ["n"]}}}
PLACE = {"type": "function", "function": {"name": "place", "parameters": {
    "$id": "https://example.com/place.json", "$defs": {"City": CITY}, "type": "object",
    "properties": {"at": {"$ref": "#/$defs/City"}}, "required": ["at"]}}}
TO_CITY = {"$ref": "#/$defs/City"}
HOP = {"type": "function", "function": {"name": "hop", "parameters": {
    "$defs": {"City": CITY}, "type": "object", "properties": {"a": TO_CITY, "b": TO_CITY}, "required": ["a", "b"]}}}


@pytest.mark.parametrize("choice", ["trip", "tree", "place", "hop", "required"])
@pytest.mark.parametrize("array", [True, False])
def test_a_forced_call_enforces_parameters_that_refer_within_themselves(engine, compiler, choice, array):
    """A tool's parameters are put inside the call's grammar; their local $refs still mean the
    subschemas they name in the parameters, so the call validates as the parameters say."""
    g = compiler.compile({"type": "tool_call", "tools": TOOLS + [TRIP, TREE, PLACE, HOP], "choice": choice,
                          "array": array, "parallel": False})

    def takes(call) -> bool:
        m = g.matcher()
        text = "<tool_call>" + json.dumps([call] if array else call) + "</tool_call>"
        return all(m.accept(t) for t in ids_of(engine, text)) and m.is_finished()

    good = {"trip": {"stops": [{"city": "Paris"}, {"city": "Rome"}]},
            "tree": {"n": 1, "kids": [{"n": 2, "kids": [{"n": 3}]}, {"n": 4}]},
            "place": {"at": {"city": "Oslo"}}, "hop": {"a": {"city": "Oslo"}, "b": {"city": "Rome"}}}
    bad = {"trip": {"stops": [{"town": "Paris"}]}, "tree": {"n": 1, "kids": [{"kids": []}]},
           "place": {"at": {"city": 5}}, "hop": {"a": {"city": "Oslo"}, "b": {}}}
    for name in (good if choice == "required" else [choice]):
        assert takes({"name": name, "arguments": good[name]}), name
        assert not takes({"name": name, "arguments": bad[name]}), name


STRUCTURAL_TAG = {"type": "structural_tag", "triggers": ["<f="],
                  "structures": [{"begin": "<f=weather>", "end": "</f>", "schema": {
                      "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]}


def test_a_structural_tag_leaves_text_free_and_holds_what_follows_its_trigger(engine, compiler):
    """vLLM's structural tag: free text (which may end anywhere) until a trigger is written; then
    the structure whose begin follows it, its JSON by the schema, its end; then free text again."""
    eos = min(engine.tokenizer.eos_token_ids)
    g = compiler.compile(STRUCTURAL_TAG)

    def takes(text):
        m = g.matcher()
        return all(m.accept(t) for t in ids_of(engine, text)), m

    ok, m = takes("no call here, ")
    assert ok and m.can_end() and eos in m.allowed()
    ok, m = takes('Let me look. <f=weather>{"city": "Paris"}</f> and again <f=weather>{"city": "Rome"}</f> done')
    assert ok and m.can_end()
    ok, m = takes('<f=weather>{"city": "Pa')
    assert ok and not m.can_end()                         # inside the structure: no end
    for broken in ('<f=time>{"city": "Paris"}</f>',        # a begin no structure has
                   '<f=weather>{"town": "Paris"}</f>',      # JSON the schema refuses (objects closed)
                   '<f=weather>{"city": "Paris"} and text'):  # no end
        assert not takes(broken)[0], broken


def test_a_structural_tag_trigger_that_is_a_special_token_is_that_token(engine, compiler):
    """A trigger the tokenizer has as one special token (Llama 3.1's <|python_tag|>) is matched as that
    token, as vLLM's backend reads it: the model writes it whole, then the structure follows."""
    start = engine.tokenizer.encode("<|im_start|>", add_special_tokens=False)
    assert len(start) == 1
    g = compiler.compile({**STRUCTURAL_TAG, "triggers": ["<|im_start|>"],
                          "structures": [{**STRUCTURAL_TAG["structures"][0], "begin": "<|im_start|>weather"}]})
    m = g.matcher()
    assert all(m.accept(t) for t in ids_of(engine, "hi ") + start + ids_of(engine, 'weather{"city": "Oslo"}</f>'))
    assert m.can_end()
    m = g.matcher()
    assert m.accept(start[0]) and not m.accept(ids_of(engine, "x")[0])


@pytest.mark.parametrize("spec, message", [
    ({**STRUCTURAL_TAG, "triggers": ["<g="]}, "structures[0].begin '<f=weather>' starts with none of the triggers"),
    ({**STRUCTURAL_TAG, "triggers": []}, "'triggers', a non-empty list"),
    ({**STRUCTURAL_TAG, "structures": [{"begin": "<f=x>", "end": "</f>", "schema": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}]},
     "structures[0]: at #/properties/xs: "),
    # bounded before any structure is compiled (each costs about a millisecond, and each looks
    # its trigger up among all the triggers)
    ({**STRUCTURAL_TAG, "structures": STRUCTURAL_TAG["structures"] * (constraints.MAX_STRUCTURES + 1)},
     f"structural_tag has {constraints.MAX_STRUCTURES + 1:,} structures: at most {constraints.MAX_STRUCTURES:,}"),
    ({**STRUCTURAL_TAG, "triggers": [f"<{i}" for i in range(constraints.MAX_STRUCTURES)] + ["<f="]},
     f"structural_tag has {constraints.MAX_STRUCTURES + 1:,} triggers: at most {constraints.MAX_STRUCTURES:,}"),
])
def test_a_structural_tag_that_cannot_be_enforced_says_where(compiler, spec, message):
    with pytest.raises(GrammarError) as e:
        compiler.compile(spec)
    assert message in str(e.value)
    with pytest.raises(GrammarError):
        constraints.check_spec(spec)                       # agp serve refuses it before the engine sees it


def test_saying_where_a_schema_fails_compiles_a_bounded_part_of_it(monkeypatch):
    """A schema that fails as a whole (here: a required key its closed object lacks) is located by
    compiling its subschemas alone; they are compiled up to MAX_LOCATE_CHARS of JSON in all, not
    each of them (a subschema can cost 0.2 s to compile: a 4 MB schema of such took 38 s to refuse)."""
    import llguidance
    from types import SimpleNamespace

    compiled = []

    class Counting:                       # llguidance's LLMatcher, counting the grammars it validates
        grammar_from_json_schema = staticmethod(llguidance.LLMatcher.grammar_from_json_schema)
        grammar_from_lark = staticmethod(llguidance.LLMatcher.grammar_from_lark)

        @staticmethod
        def validate_grammar_with_warnings(text, *args, **kwargs):
            compiled.append(text)
            return llguidance.LLMatcher.validate_grammar_with_warnings(text, *args, **kwargs)

    monkeypatch.setattr(constraints, "llg", SimpleNamespace(LLMatcher=Counting,
                                                            LLParserLimits=llguidance.LLParserLimits))
    monkeypatch.setattr(constraints, "MAX_LITERAL_CHARS", 1 << 24)    # its enums reach the grammar engine
    child = {"type": "object", "properties": {"v": {"enum": [f"value-{i:05d}" for i in range(600)]}}}
    size = len(json.dumps(child, separators=(",", ":")))
    n = 2 * constraints.MAX_LOCATE_CHARS // size                # twice what the bound lets through
    schema = {"type": "object", "properties": {f"p{i}": child for i in range(n)}, "required": ["missing"]}
    with pytest.raises(GrammarError, match="required property 'missing' is unsatisfiable"):
        constraints.check_spec({"type": "json_schema", "schema": schema})
    probes = [t for t in compiled if len(t) < size * 2]        # the subschemas (the rest: the whole schema)
    assert probes and len(probes) * size <= constraints.MAX_LOCATE_CHARS < n * size


def test_unconstrained_requests_are_unaffected(tiny_gguf, compiler):
    plain = {f"p{s}": (None, SamplingParams(max_tokens=20, temperature=0.9, seed=s)) for s in range(3)}
    plain["g"] = (None, SamplingParams(max_tokens=20))
    alone = run(Engine(EngineConfig(model=str(tiny_gguf), dtype="fp32")), dict(plain))
    g = compiler.compile({"type": "json_schema", "schema": BOUNDED})
    mixed = dict(plain)
    mixed.update({f"c{s}": (g, SamplingParams(max_tokens=300, temperature=1.0, seed=s)) for s in range(3)})
    together = run(Engine(EngineConfig(model=str(tiny_gguf), dtype="fp32")), mixed)
    for rid in plain:
        assert together[rid].text == alone[rid].text, rid


def test_max_tokens_cuts_an_unfinished_json(engine, compiler):
    g = compiler.compile({"type": "json_object"})
    out = run(engine, {"cut": (g, SamplingParams(max_tokens=5, temperature=1.0, seed=3))})["cut"]
    assert out.finish_reason == "length" and out.completion_tokens == 5
    assert out.text.startswith("{")          # a prefix of valid JSON, not a parseable document
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


# ---- masks --------------------------------------------------------------------------------------
def test_mask_follows_the_grammar_and_eos(engine, compiler):
    tok = engine.tokenizer
    eos = min(tok.eos_token_ids)
    m = compiler.compile({"type": "json_schema", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}).matcher()
    assert [tok.decode([t]) for t in m.allowed()] == ["{"]
    for t in ids_of(engine, '{"a":'):
        assert m.accept(t)
    allowed = m.allowed()
    texts = {tok.decode([t]) for t in allowed}
    assert eos not in allowed and "}" not in texts and "x" not in texts
    assert {"1", "-"} <= texts
    for t in ids_of(engine, "12"):
        assert m.accept(t)
    assert not m.can_end() and eos not in m.allowed()
    assert m.accept(ids_of(engine, "}")[0])
    assert m.is_finished() and m.can_end() and m.allowed() == [eos]
    assert m.accept(eos)
    # a refused token: False, and from then on only EOS
    m = compiler.compile({"type": "json_object"}).matcher()
    assert not m.accept(ids_of(engine, "x")[0])
    assert m.error and m.is_finished() and m.allowed() == [eos]


def test_eos_exactly_when_the_grammar_can_end(engine, compiler):
    eos = min(engine.tokenizer.eos_token_ids)
    m = compiler.compile({"type": "regex", "pattern": "(ab)+"}).matcher()
    for text, can_end in (("a", False), ("b", True), ("a", False), ("b", True)):
        assert m.accept(ids_of(engine, text)[0])
        assert m.can_end() is can_end and (eos in m.allowed()) is can_end
        assert not m.is_finished()          # another "ab" may follow


def test_rollback(engine, compiler):
    m = compiler.compile({"type": "json_object"}).matcher()
    for t in ids_of(engine, '{"k": '):
        m.accept(t)
    before = m.allowed()
    assert m.accept(ids_of(engine, "1")[0]) and m.allowed() != before
    assert m.rollback(1) and m.allowed() == before


def test_apply_masks_touches_only_constrained_rows(engine, compiler):
    V = engine.vocab_size
    g = compiler.compile({"type": "json_object"})
    logits = torch.randn(4, V)
    orig = logits.clone()
    ms = [None, g.matcher(), None, g.matcher()]
    apply_masks(logits, ms)
    assert torch.equal(logits[0], orig[0]) and torch.equal(logits[2], orig[2])
    for i in (1, 3):
        finite = torch.isfinite(logits[i]).nonzero().view(-1).tolist()
        assert finite == ms[i].allowed()
        assert torch.equal(logits[i, finite], orig[i, finite])


def test_apply_masks_no_work_without_matchers(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no mask should be computed")
    monkeypatch.setattr(constrain, "fill_masks", boom)
    logits = torch.randn(3, 50)
    orig = logits.clone()
    apply_masks(logits, [None, None, None])
    assert torch.equal(logits, orig)


def test_apply_masks_on_inference_logits(engine, compiler):
    with torch.inference_mode():
        logits = torch.randn(2, engine.vocab_size)
    apply_masks(logits, [compiler.compile({"type": "json_object"}).matcher(), None])
    assert torch.isfinite(logits[0]).sum() < engine.vocab_size and torch.isfinite(logits[1]).all()


def test_logits_wider_than_the_tokenizer(engine):
    V = engine.vocab_size + 13                      # a model whose lm_head is padded
    c = ConstraintCompiler(engine.tokenizer, V)
    m = c.compile({"type": "json_object"}).matcher()
    logits = torch.zeros(1, V)
    apply_masks(logits, [m])
    assert torch.isinf(logits[0, engine.vocab_size:]).all()
    assert torch.isfinite(logits[0]).sum() == len(m.allowed()) > 0


def test_an_end_token_listed_past_the_vocabulary_is_left_out_of_the_grammar_s_ends(engine):
    """A generation_config.json may list an eos_token_id the model's logits do not reach: it can
    never be written, so the grammar ends on the others, where llguidance refused every
    constrained request ("EOS token ID ... is out of range")."""
    eos = sorted(engine.tokenizer.eos_token_ids)
    c = ConstraintCompiler(engine.tokenizer, engine.vocab_size, eos_token_ids=[*eos, engine.vocab_size + 700])
    assert c.eos_token_ids == tuple(eos)
    m = c.compile({"type": "json_object"}).matcher()
    assert len(m.allowed()) > 0
    with pytest.raises(ValueError, match="end-of-sequence"):
        ConstraintCompiler(engine.tokenizer, engine.vocab_size, eos_token_ids=[engine.vocab_size])


# ---- compiling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, words", [
    ({"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}, "not"),
    ({"type": "json_schema", "schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}}, "nope"),
    ({"type": "json_schema", "schema": {"type": "objekt"}}, "objekt"),
    ({"type": "json_schema", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "nsatisfiable"),
    ({"type": "json_schema", "schema": {"type": "string", "pattern": "([a-z"}}, "regex"),
    ({"type": "json_schema"}, "schema"),
    ({"type": "regex", "pattern": "(unclosed"}, "unclosed group"),
    ({"type": "tool_call", "tools": TOOLS, "choice": "nope"}, "nope"),
    ({"type": "tool_call", "tools": []}, "tools"),
    ({"type": "xml"}, "xml"),
    ({"type": "json_object", "x": object()}, "JSON"),
    ("json", "object"),
])
def test_grammar_errors(compiler, spec, words):
    with pytest.raises(GrammarError, match=words):
        compiler.compile(spec)


@pytest.mark.parametrize("spec, message", [
    ({"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": 5}}}}}}, "at #/properties/a/properties/b: type must be a string or array of strings"),
    ({"type": "json_schema", "schema": {"type": "object", "properties": {"x/y": {"anyOf": [
        {"type": "integer"}, {"type": "string", "format": "nope"}]}}}},
     "at #/properties/x~1y/anyOf/1: Unknown format: nope"),
    ({"type": "json_schema", "schema": {"$defs": {"n": {"type": "object", "properties": {"k": {
        "type": "array", "items": {"$ref": "#/$defs/n"}, "uniqueItems": True}}}}, "$ref": "#/$defs/n"}},
     'at #/$defs/n/properties/k: Unimplemented keys: ["uniqueItems"]'),
    ({"type": "json_schema", "schema": {"type": "array", "uniqueItems": True}}, 'Unimplemented keys: ["uniqueItems"]'),
    ({"type": "json_schema", "schema": {"type": "object", "properties": {"v": {"oneOf": [
        {"type": "integer"}, {"type": "number"}]}}}},
     "at #/properties/v: oneOf whose branches can match the same value cannot be enforced (exactly one must "
     "match): use anyOf, or make the branches exclusive"),
    ({"type": "json_schema", "schema": False}, "the schema is false, which no value matches"),
    ({"type": "tool_call", "tools": TOOLS + [{"type": "function", "function": {"name": "sort", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}]},
     "tool 'sort': at #/properties/xs: Unimplemented keys: [\"uniqueItems\"]"),
])
def test_a_schema_error_says_where_in_the_schema(compiler, spec, message):
    with pytest.raises(GrammarError) as e:
        compiler.compile(spec)
    assert str(e.value) == message


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"a": {"type": "integer"}},
                                            "required": ["a", "id"]}}, "required": ["p"]},
])
def test_a_schema_that_fails_only_because_its_objects_are_closed_says_so(compiler, schema):
    """A required key its `properties` leave out is allowed by JSON Schema's open objects, but
    not once agp closes them: the error says that is why, and what to write (it said only
    "required property 'b' is unsatisfiable")."""
    with pytest.raises(GrammarError) as e:
        compiler.compile({"type": "json_schema", "schema": schema})
    assert str(e.value).endswith(constraints.CLOSED) and "unsatisfiable" in str(e.value)
    compiler.compile({"type": "json_schema", "schema": schema, "close_objects": False})
    for other in ({"type": "array", "uniqueItems": True}, {"type": "integer", "minimum": 5, "maximum": 1}):
        with pytest.raises(GrammarError) as e:      # not for a schema that fails open too
            compiler.compile({"type": "json_schema", "schema": other})
        assert constraints.CLOSED not in str(e.value)


def test_a_grammar_the_engine_gives_up_on_after_its_first_token_is_refused_when_compiled(compiler):
    """An object of 500 optional properties, open to more, compiles, but after its "{"
    llguidance's parser gives up (a row of 2,007 items, at most 2,000): refused at once, not mid-answer."""
    many = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(500)},
            "additionalProperties": {"type": "integer"}}
    with pytest.raises(GrammarError, match=r"^the grammar engine gives up on it at output token 1 \(.*items"):
        compiler.compile({"type": "json_schema", "schema": many})
    many["required"] = list(many["properties"])            # all required: one order, a small row
    compiler.compile({"type": "json_schema", "schema": many})


def test_a_structure_or_tool_the_engine_gives_up_on_is_refused_when_compiled(engine, compiler):
    """The JSON of a structural tag's structure (reached after free text and a trigger) and of a
    forced tool call's arguments (after its name) lies past the walk of the whole grammar: each is
    walked alone, so an object of 500 optional properties open to more there is refused when compiled,
    naming the structure or tool, and not left to fail when the model writes the trigger."""
    many = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(500)},
            "additionalProperties": {"type": "integer"}}
    tag = {**STRUCTURAL_TAG, "structures": [*STRUCTURAL_TAG["structures"],
                                            {"begin": "<f=many>", "end": "</f>", "schema": many}]}
    with pytest.raises(GrammarError, match=r"^structures\[1\]: the grammar engine gives up on it at output token 1"):
        compiler.compile(tag)
    tools = [*TOOLS, {"type": "function", "function": {"name": "many", "parameters": many}}]
    for choice in ("required", "many"):
        with pytest.raises(GrammarError, match=r"^tool 'many': the grammar engine gives up on it at output token 1"):
            compiler.compile({"type": "tool_call", "tools": tools, "choice": choice})
    compiler.compile({"type": "tool_call", "tools": tools, "choice": "add"})    # a call of another tool: made
    endless = {"anyOf": [{"$ref": "#"}]}                    # recursion with no way out: no value at all
    with pytest.raises(GrammarError, match=r"^structures\[0\]: no output can follow it"):
        compiler.compile({**STRUCTURAL_TAG, "structures": [{**STRUCTURAL_TAG["structures"][0], "schema": endless}]})
    with pytest.raises(GrammarError, match=r"^tool 'f': no output can follow it"):
        compiler.compile({"type": "tool_call", "tools": [{"type": "function", "function": {
            "name": "f", "parameters": endless}}], "choice": "required"})
    many["required"] = list(many["properties"])            # all required: one order, a small row
    compiler.compile({**tag, "structures": [*tag["structures"][:1], {**tag["structures"][1], "schema": many}]})


def test_a_grammar_that_may_end_before_the_engine_gives_up_is_still_refused_when_compiled(engine, compiler):
    """The compile-time walk takes the lowest allowed token other than the end: a grammar that may
    stop after "a" (the end-of-sequence token has the lowest id of all it allows there) but may
    also go on into an object llguidance gives up on is refused, not accepted because the walk
    ended early."""
    many = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(500)},
            "additionalProperties": {"type": "integer"}}
    lark = 'start: "a" | "a" obj\nobj: %json ' + json.dumps(many)
    assert min(compiler.eos_token_ids) < min(ids_of(engine, "a{"))
    with pytest.raises(GrammarError, match=r"^the grammar engine gives up on it at output token 2 \(.*items"):
        compiler.compile({"type": "grammar", "grammar": lark})


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": False}, [1, 1], ["a"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {}, "dependentSchemas": {},
      "propertyNames": True}, {"a": 1}, {"a": "x"}),
    ({"type": "integer", "if": {"minimum": 5}}, 3, "x"),
    ({"type": "integer", "then": {"minimum": 5}, "else": {"maximum": 0}}, 3, "x"),
    ({"type": "object", "properties": {"n": {"type": "integer", "not": False}}}, {"n": 2}, {"n": "2"}),
])
def test_keywords_that_constrain_nothing_are_taken(engine, compiler, schema, good, bad):
    """uniqueItems false, empty dependentRequired, if without then/else, ...: JSON Schema's
    no-ops (generators write them) are not refused as keywords the grammar engine lacks."""
    def accepts(value):
        m = compiler.compile({"type": "json_schema", "schema": schema}).matcher()
        return all(m.accept(t) for t in ids_of(engine, json.dumps(value))) and m.can_end()

    assert accepts(good) and not accepts(bad)


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "string", "minLength": 2.0, "maxLength": 3.0}, "abc", "abcd"),
    ({"type": "string", "minLength": 2.0, "maxLength": 3.0}, "ab", "a"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1.0, "maxItems": 2.0}, [1, 2], [1, 2, 3]),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1.0}, [1], []),
    ({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1.0, "maxProperties": 1.0},
     {"a": 1}, {"a": 1, "b": 2}),
    ({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 2.0},
                                                "maxItems": 1.0}}}, {"tags": ["ab"]}, {"tags": ["abc"]}),
])
def test_counts_written_as_whole_floats_are_those_integers(engine, compiler, schema, good, bad):
    """JSON Schema's counts are integers, and 2.0 is one in its data model (Jackson and Python
    floats write it so): the grammar engine refused them ("Expected positive integer for
    'maxLength', got 3.0", a 400 for a valid schema); they constrain as the integer does, nested
    too, and the request's schema is left as it was sent."""
    sent = json.loads(json.dumps(schema))

    def accepts(value):
        m = compiler.compile({"type": "json_schema", "schema": schema}).matcher()
        return all(m.accept(t) for t in ids_of(engine, json.dumps(value))) and m.can_end()

    assert accepts(good) and not accepts(bad)
    assert json.dumps(schema) == json.dumps(sent)


@pytest.mark.parametrize("count", [2.5, -1.0, 1e300])
def test_a_count_that_is_no_whole_number_of_the_range_is_still_refused(count):
    """Only a whole float is read as its integer: 2.5 and -1.0 stay the grammar engine's refusal,
    as does one too large to be an exact float."""
    with pytest.raises(GrammarError, match=r"maxLength"):
        constraints.check_spec({"type": "json_schema", "schema": {"type": "string", "maxLength": count}})


def ref_chain(n: int, nest: int = 0) -> dict:
    """n $defs, each (inside `nest` objects) a $ref to the next: flat JSON, however long."""
    def unit(i):
        s = {"$ref": f"#/$defs/d{i + 1}"}
        for _ in range(nest):
            s = {"type": "object", "properties": {"a": s}, "required": ["a"]}
        return s

    return {"$defs": {**{f"d{i}": unit(i) for i in range(n)}, f"d{n}": {"type": "integer"}}, "$ref": "#/$defs/d0"}


def _nested(depth: int, leaf, key=None):
    """`leaf` inside `depth` arrays (or objects of one member `key`)."""
    for _ in range(depth):
        leaf = [leaf] if key is None else {key: leaf}
    return leaf


@pytest.mark.parametrize("schema, where", [
    ({"const": _nested(100_000, 1)}, "#/const/0/0"),
    ({"type": "object", "properties": {"a": {"enum": [_nested(600, "x", "k")]}}}, "#/properties/a/enum/0/k/k"),
    ({"type": "string", "default": _nested(600, 1)}, "#/default/0/0"),
    ({"type": "string", "examples": [_nested(100_000, {}, "k")]}, "#/examples/0/k/k"),
    ({"type": "string", "x-mine": _nested(600, 1)}, "#/x-mine/0/0")])
def test_a_schema_whose_json_nests_past_the_bound_anywhere_is_refused_naming_where(schema, where):
    """A const, enum value, default or any keyword's value nested 600 to 100,000 levels deep ran
    out of Python's recursion in copying the schema (a RecursionError, a 500 from the server):
    past MAX_JSON_DEPTH levels of arrays and objects it is a GrammarError naming where."""
    most = constraints.MAX_JSON_DEPTH
    with pytest.raises(GrammarError, match=rf"^the schema nests more than {most} levels of arrays and objects "
                                           rf"\(at most {most}\), at {where}/"):
        constraints.check_spec({"type": "json_schema", "schema": schema})


def test_a_schema_whose_json_nests_exactly_the_bound_is_taken_and_one_more_is_not():
    """MAX_JSON_DEPTH levels of arrays and objects, the schema's own object the first, is within
    the bound and compiles; one more level is refused naming where."""
    most = constraints.MAX_JSON_DEPTH
    constraints.check_spec({"type": "json_schema", "schema": {"type": "string", "default": _nested(most - 1, 1)}})
    with pytest.raises(GrammarError, match=rf"^the schema nests more than {most} levels .*, at #/default/0/0/"):
        constraints.check_spec({"type": "json_schema", "schema": {"type": "string", "default": _nested(most, 1)}})


def _chain(depth: int, wrap) -> dict:
    """A schema of `depth` levels of JSON, each subschema `wrap(inner)` (its own levels) around the next."""
    schema, levels = {"type": "integer"}, 1
    while levels + 2 <= depth:
        schema, levels = wrap(schema), levels + 2
    return schema if levels == depth else {"type": "array", "items": schema}


@pytest.mark.parametrize("make, where", [
    (lambda d: {"type": "object", "properties": {"x": {"const": _nested(d - 3, 1)}}}, "#/properties/x/const/0/0/"),
    (lambda d: {"type": "object", "properties": {"x": {"enum": ["a", _nested(d - 4, 1)]}}}, "#/properties/x/enum/1/0/"),
    (lambda d: _chain(d, lambda s: {"type": "object", "properties": {"a": s}, "required": ["a"]}),
     "#/properties/a/properties/a/"),
    (lambda d: _nested(d - 1, {"type": "integer"}, "items") | {"type": "array"}, "#/items/items/"),
    (lambda d: _chain(d, lambda s: {"anyOf": [s]}), "#/anyOf/0/anyOf/0/"),
])
def test_json_the_grammar_engine_cannot_read_is_refused_by_agps_check_naming_where(make, where):
    """llguidance reads a schema's JSON with a parser that stops at 128 levels (3 its own): a const
    or enum value ~122 arrays deep, a chain of 62 objects' properties or of 124 arrays' items was
    its 'recursion limit exceeded at line 1 column N', naming no place. At MAX_JSON_DEPTH levels
    each compiles; one more is agp's GrammarError naming the bound and where (a JSON pointer), in a
    json_schema, a tool's parameters, a structure's schema and a grammar's %json alike."""
    most = constraints.MAX_JSON_DEPTH
    constraints.check_spec({"type": "json_schema", "schema": make(most)})
    deep = make(most + 1)
    refusal = rf"the schema nests more than {most} levels of arrays and objects \(at most {most}\), at {where}"
    with pytest.raises(GrammarError, match="^" + refusal):
        constraints.check_spec({"type": "json_schema", "schema": deep})
    with pytest.raises(GrammarError, match="^tool 'f': " + refusal) as e:
        constraints.check_spec({"type": "tool_call", "tools": [{"type": "function", "function": {
            "name": "f", "parameters": deep}}]})
    assert e.value.param == "tools[0].function.parameters"
    with pytest.raises(GrammarError, match=r"^structures\[0\]: " + refusal):
        constraints.check_spec({"type": "structural_tag", "triggers": ["<f>"],
                                "structures": [{"begin": "<f>", "schema": deep, "end": "</f>"}]})
    with pytest.raises(GrammarError, match="^the %json schema: " + refusal):
        constraints.check_spec({"type": "grammar", "grammar": "start: %json " + json.dumps(deep)})


def test_a_forced_call_of_several_tools_bounds_their_depth_by_what_its_grammar_adds():
    """A call that may write one of several tools holds each tool's parameters in an anyOf, 2
    levels deeper than one tool's: the grammar engine refused parameters of MAX_JSON_DEPTH - 1 levels
    there ('failed to parse "%json": recursion limit exceeded', naming no tool). MAX_JSON_DEPTH - 2
    compile; one more is a GrammarError naming the tool's parameters and where; a single tool (or
    the one a named choice writes) keeps MAX_JSON_DEPTH."""
    most = constraints.MAX_JSON_DEPTH - constraints.CALL_CHOICE_LEVELS

    def tools(depth):
        return [{"type": "function", "function": {"name": "g"}},
                {"type": "function", "function": {"name": "f", "parameters": {
                    "type": "object", "properties": {"x": {"const": _nested(depth - 3, 1)}}}}}]

    constraints.check_spec({"type": "tool_call", "tools": tools(most)})
    with pytest.raises(GrammarError, match=rf"^tool 'f': the schema nests more than {most} levels of arrays and "
                                           rf"objects \(at most {most} where the call may write several tools: its "
                                           rf"grammar holds each 2 levels deeper\), at #/properties/x/const/0/") as e:
        constraints.check_spec({"type": "tool_call", "tools": tools(most + 1)})
    assert e.value.param == "tools[1].function.parameters"
    constraints.check_spec({"type": "tool_call", "tools": tools(constraints.MAX_JSON_DEPTH), "choice": "f"})


def test_a_spec_nested_past_what_json_writes_is_refused_by_the_compiler_naming_where(compiler):
    """A python stage's spec (Python objects) nested 100,000 levels: the compiler's cache key (its
    JSON text) cannot be written, and its schema's depth walk names where, as for 600 levels."""
    most = constraints.MAX_JSON_DEPTH
    with pytest.raises(GrammarError, match=rf"^the schema nests more than {most} levels of arrays and objects "
                                           rf"\(at most {most}\), at #/default/0/0/"):
        compiler.compile({"type": "json_schema", "schema": {"type": "string", "default": _nested(100_000, 1)}})
    with pytest.raises(GrammarError, match="^the constraint is not JSON: it nests deeper than JSON text"):
        compiler.compile({"type": "choice", "choices": ["a"], "x": _nested(100_000, 1)})


def test_a_schema_or_grammar_deeper_than_the_grammar_engine_recurses_is_refused(engine, compiler):
    """llguidance compiles the schema a $ref refers to, and a grammar's rules, depth first in the
    native stack of the thread that asks: a chain of 2,500 $refs (90 KB of flat JSON, a guided_json
    agp serve took) overflowed it and killed the server. Past MAX_SCHEMA_DEPTH levels, each $ref
    counted as the schema it refers to and a cycle's schemas each once, it is a GrammarError
    saying how deep, before llguidance sees it; recursive schemas within it are compiled."""
    most = constraints.MAX_SCHEMA_DEPTH
    deep = most + 10
    for schema in (ref_chain(deep), ref_chain(deep // 3, nest=2)):
        with pytest.raises(GrammarError, match=r"^the schema nests [\d,]+ levels deep, each \$ref counted as the schema "
                                               f"it refers to: at most {most:,}"):
            constraints.check_spec({"type": "json_schema", "schema": schema})
    # a cycle of units, each referring to the next two: a walk may pass through all of them
    n = most // 2 + 10
    cycle = {"$defs": {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{(i + 1) % n}"},
                                                                    "y": {"$ref": f"#/$defs/d{(i + 2) % n}"}}}
                       for i in range(n)}, "$ref": "#/$defs/d0"}
    with pytest.raises(GrammarError, match="^the schema nests"):
        constraints.check_spec({"type": "json_schema", "schema": cycle})
    # $refs by a subschema's $id (relative to the one around it), and by a URI with a pointer
    by_id = {"$id": "https://example.com/s/root", "$ref": "d0", "$defs": {
        **{f"d{i}": {"$id": f"d{i}", "$ref": f"https://example.com/s/d{i + 1}"} for i in range(deep)},
        f"d{deep}": {"$id": f"d{deep}", "type": "integer"}}}
    by_uri = {"$id": "https://example.com/s/root", "$ref": "#/$defs/d0", "$defs": {
        **{f"d{i}": {"$ref": f"https://example.com/s/root#/$defs/d{i + 1}"} for i in range(deep)},
        f"d{deep}": {"type": "integer"}}}
    for schema in (by_id, by_uri):
        with pytest.raises(GrammarError, match=f"^the schema nests {deep + 2:,} levels deep"):
            constraints.check_spec({"type": "json_schema", "schema": schema})
    tool = {"type": "tool_call", "tools": [{"type": "function", "function": {"name": "f", "parameters": ref_chain(deep)}}]}
    with pytest.raises(GrammarError, match="^tool 'f': the schema nests"):
        constraints.check_spec(tool)
    tag = {**STRUCTURAL_TAG, "structures": [{**STRUCTURAL_TAG["structures"][0], "schema": ref_chain(deep)}]}
    with pytest.raises(GrammarError, match=r"^structures\[0\]: the schema nests"):
        constraints.check_spec(tag)
    rules = "start: r0\n" + "\n".join(f'r{i}: "x" r{i + 1} | "y"' for i in range(deep)) + f'\nr{deep}: "z"'
    gbnf = "root ::= r0\n" + "\n".join(f'r{i} ::= "x" r{i + 1} | "y"' for i in range(deep)) + f'\nr{deep} ::= "z"'
    for grammar in (rules, gbnf):
        with pytest.raises(GrammarError, match=f"^the grammar has {deep + 2:,} rules: at most {most:,} in all"):
            constraints.check_spec({"type": "grammar", "grammar": grammar})
    with pytest.raises(GrammarError, match=f"^the grammar has 1 rule and a %json schema {deep + 2:,} levels deep"):
        constraints.check_spec({"type": "grammar", "grammar": "start: %json " + json.dumps(ref_chain(deep))})
    # within the bound: compiled, and enforced
    small = {"$defs": {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{(i + 1) % 50}"},
                                                                    "y": {"$ref": f"#/$defs/d{(i + 2) % 50}"}}}
                       for i in range(50)}, "$ref": "#/$defs/d0"}
    for schema, good, bad in ((ref_chain(most - 10), 7, "7"), (small, {"x": {"y": {}}}, {"x": {"z": 1}})):
        m = compiler.compile({"type": "json_schema", "schema": schema}).matcher()
        assert all(m.accept(t) for t in ids_of(engine, json.dumps(good))) and m.can_end()
        m = compiler.compile({"type": "json_schema", "schema": schema}).matcher()
        assert not (all(m.accept(t) for t in ids_of(engine, json.dumps(bad))) and m.can_end())


STACK_PROBE = """
import json, sys, threading
from pipeline_dsl import constraints
from pipeline_dsl.engine import Engine, EngineConfig
from pipeline_dsl.engine.constrain import ConstraintCompiler

specs = [{"type": "json_schema", "schema": schema} for schema in json.loads(sys.argv[2])]
engine = Engine(EngineConfig(model=sys.argv[1], dtype="fp32"))
compiler = ConstraintCompiler(engine.tokenizer, engine.vocab_size)
done = []

def work():
    for spec in specs:
        constraints.check_spec(spec)
        compiler.compile(spec)
        done.append(1)

work()                                            # on the main thread: the stack `ulimit -s` gives
t = threading.Thread(target=work)                 # a thread of the default size: 2 MiB here
t.start()
t.join()
print(len(done))
"""


def test_a_schema_within_the_depth_bound_compiles_whatever_stack_ulimit_gives(tiny_gguf):
    """A schema MAX_SCHEMA_DEPTH levels deep takes llguidance up to ~6 MiB of native stack (a chain
    of $refs to nested objects) wherever it is checked or compiled: on agp's grammar threads, whose
    stack is GRAMMAR_STACK whatever `ulimit -s` says. With a 2 MiB stack limit (threads get what
    `ulimit -s unlimited` gives them too), checking and compiling it from the main thread and from
    a thread of the default size killed the process."""
    import resource
    import subprocess
    import sys

    from pathlib import Path

    most = constraints.MAX_SCHEMA_DEPTH
    schemas = [ref_chain(most // 6 - 2, nest=5), ref_chain(most - 10)]
    assert all(constraints.schema_depth(s) <= most for s in schemas)
    limit = 2 << 20
    root = Path(__file__).resolve().parents[1]

    def small_stack():
        resource.setrlimit(resource.RLIMIT_STACK, (limit, resource.getrlimit(resource.RLIMIT_STACK)[1]))

    proc = subprocess.run([sys.executable, "-c", STACK_PROBE, str(tiny_gguf), json.dumps(schemas)], cwd=root,
                          capture_output=True, text=True, preexec_fn=small_stack, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split()[-1] == str(2 * len(schemas))


def test_pattern_properties_are_bounded_in_one_object_and_in_all():
    """llguidance's work on an object's patternProperties grows faster than the square of their
    number (300: tens of seconds, 500: minutes, holding a grammar slot): past
    MAX_PATTERN_PROPERTIES in one object, or MAX_PATTERN_PROPERTIES_IN_ALL in the schema, it is a
    GrammarError saying where, before llguidance sees the schema."""
    def obj(n, tag=""):
        return {"type": "object", "patternProperties": {f"^{tag}k{i}_[a-z]*$": {"type": "integer"} for i in range(n)},
                "additionalProperties": False}

    most, in_all = constraints.MAX_PATTERN_PROPERTIES, constraints.MAX_PATTERN_PROPERTIES_IN_ALL
    constraints.check_spec({"type": "json_schema", "schema": obj(most)})
    with pytest.raises(GrammarError, match=f"^at #/properties/m: patternProperties has {most + 1} patterns: at most "):
        constraints.check_spec({"type": "json_schema", "schema": {"type": "object", "properties": {"m": obj(most + 1)}}})
    parts = in_all // most + 1                   # each object within its bound, all of them past theirs
    spread = {"type": "object", "properties": {f"o{j}": obj(most, f"o{j}") for j in range(parts)}}
    with pytest.raises(GrammarError, match=f"^the schema has more than {in_all:,} patternProperties patterns in all"):
        constraints.check_spec({"type": "json_schema", "schema": spread})
    tool = {"type": "tool_call", "tools": [{"type": "function", "function": {"name": "f", "parameters": obj(most + 1)}}]}
    with pytest.raises(GrammarError, match="^tool 'f': patternProperties has"):
        constraints.check_spec(tool)


class _NoGrammarEngine:
    """Stands in for llguidance where a spec must be refused before the grammar engine sees it."""

    def __getattr__(self, name):
        raise AssertionError(f"the grammar engine was asked for {name}")


@pytest.mark.parametrize("schema, refusal", [
    ({"type": "object", "properties": {"a": {"enum": [f"v{i}" for i in range(constraints.MAX_ENUM_VALUES + 1)]}}},
     f"^at #/properties/a: 'enum' has {constraints.MAX_ENUM_VALUES + 1:,} values: at most "
     f"{constraints.MAX_ENUM_VALUES:,}$"),
    ({"type": "object", "properties": {"a": {"enum": ["x" * 1000 + str(i) for i in range(2000)]}}},   # 2 MB
     "^at #/properties/a: 'enum': the schema's enum and const values come to more than 262,144 characters in all"),
    ({"type": "array", "items": {"enum": ["x" * 1000 + str(i) for i in range(200)]},
      "$defs": {"b": {"const": ["y" * 1000] * 70}}},
     r"^at #/(items|\$defs/b): '(const|enum)': the schema's enum and const values come to more than"),
    ({"const": "x" * 250_000},                                               # ~0.26 s of each step's mask
     f"^'const' has a string of 250,000 characters: at most "
     f"{constraints.MAX_LITERAL_LENGTH:,} in one value$"),
    ({"const": {"k" * 2000: 1}},                                           # a member's name is written whole too
     f"^'const' has a string of 2,000 characters: at most {constraints.MAX_LITERAL_LENGTH:,} in one value$"),
    ({"anyOf": [{"type": "integer"}, {"enum": ["a", {"k": ["b", "y" * 5000]}]}]},
     "^at #/anyOf/1: 'enum' has a string of 5,000 characters: at most "),
    ({"type": "object", "properties": {"a" * 2000: {"type": "integer"}}, "required": ["a" * 2000]},
     f"^'properties' has a name of 2,000 characters: at most {constraints.MAX_LITERAL_LENGTH:,}$"),
    # a name only `required` lists is written whole too (the object is open to it)
    ({"type": "object", "required": ["r" * 2000]},
     f"^'required' has a name of 2,000 characters: at most {constraints.MAX_LITERAL_LENGTH:,}$"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": True,
      "$defs": {"d": {"type": "object", "required": ["b", "r" * 2000]}}},
     f"^at #/\\$defs/d: 'required' has a name of 2,000 characters: at most {constraints.MAX_LITERAL_LENGTH:,}$"),
    ({"type": "object", "properties": {"a": {"const": [[[1, 2]]] * 5000}}},     # 4 s of the grammar engine's CPU
     "^at #/properties/a: 'const': the schema's enum and const values .* counts as 256"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(10_000)}},
     "^'properties': the schema's objects have more than 5,000 properties in all"),
    ({"type": "object", "properties": {f"o{j}": {"type": "object", "properties": {
        f"p{i}": {"type": "string"} for i in range(400)}, "required": [f"p{i}" for i in range(400)]} for j in range(13)}},
     "^at #/properties/o[0-9]+: 'properties': the schema's objects have more than 5,000 properties in all"),
    ({"type": "object", "properties": {"m": {"type": "object", "properties": {
        f"p{i}": {"type": "string"} for i in range(constraints.MAX_OPTIONAL_PROPERTIES + 2)}, "required": ["p0"]}}},
     f"^at #/properties/m: 'properties' has {constraints.MAX_OPTIONAL_PROPERTIES + 1} optional properties "
     f"\\(not in 'required'\\): at most {constraints.MAX_OPTIONAL_PROPERTIES} in one object$"),
])
def test_enums_consts_and_properties_past_their_bounds_are_refused_before_the_grammar_engine_sees_them(
        monkeypatch, schema, refusal):
    """A schema's literals and properties are counted in a walk of it: an enum of more than
    MAX_ENUM_VALUES values, a string in an enum or const value or a property's name longer than
    MAX_LITERAL_LENGTH (the answer must write it whole, and each step's mask works out what is left of
    it: a const of 250,000 characters cost ~0.26 s a step, which the batch's other answers waited
    for), enum and const values of more than MAX_LITERAL_CHARS characters in all,
    more than MAX_OPTIONAL_PROPERTIES optional properties in one object or MAX_PROPERTIES_IN_ALL in
    the schema are a GrammarError naming the keyword and where, raised before llguidance is asked
    anything (it spent seconds on each of these: 22 s on 10,000 optional properties before giving up
    on them), in a json_schema, a tool's parameters and a grammar's %json alike."""
    monkeypatch.setattr(constraints, "llg", _NoGrammarEngine())
    with pytest.raises(GrammarError, match=refusal):
        constraints.check_spec({"type": "json_schema", "schema": schema})
    tool = {"type": "tool_call", "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
    with pytest.raises(GrammarError, match="^tool 'f': " + refusal[1:]) as e:
        constraints.check_spec(tool)
    assert e.value.param == "tools[0].function.parameters"
    with pytest.raises(GrammarError, match="^the %json schema: " + refusal[1:]):
        constraints.check_spec({"type": "grammar", "grammar": "start: %json " + json.dumps(schema)})


def test_enums_consts_and_properties_within_their_bounds_compile(engine, compiler):
    """At the bounds: an enum of MAX_ENUM_VALUES values, one of them MAX_LITERAL_LENGTH characters long,
    MAX_OPTIONAL_PROPERTIES optional properties in one object, and any number more that are required
    (up to MAX_PROPERTIES_IN_ALL), compile and enforce what they say."""
    most = constraints.MAX_ENUM_VALUES
    long = "y" * constraints.MAX_LITERAL_LENGTH
    g = compiler.compile({"type": "json_schema", "schema": {"enum": [f"v{i}" for i in range(most - 1)] + [long]}})
    for text, ok in (('"v0"', True), (f'"v{most - 2}"', True), (f'"{long}"', True), (f'"{long}y"', False),
                     (f'"v{most - 1}"', False)):
        m = g.matcher()
        assert (all(m.accept(t) for t in ids_of(engine, text)) and m.can_end()) is ok, text
    n = constraints.MAX_OPTIONAL_PROPERTIES
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n + 100)},
            "required": [f"p{i}" for i in range(100)]}
    g = compiler.compile({"type": "json_schema", "schema": wide})
    m = g.matcher()
    assert not all(m.accept(t) for t in ids_of(engine, '{"p1": 1'))        # p0 comes first: it is required


LONG = "x" * (constraints.MAX_LITERAL_LENGTH + 1)
BOUND = f"{constraints.MAX_LITERAL_LENGTH + 1:,} characters: at most {constraints.MAX_LITERAL_LENGTH:,} in one string"


def _tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize("spec, refusal, param", [
    ({"type": "choice", "choices": ["yes", LONG]}, f"^choice has a string of {BOUND}", None),
    ({"type": "structural_tag", "triggers": ["<f"], "structures": [
        {"begin": "<f>", "schema": {}, "end": "</f>"}, {"begin": "<f" + LONG[2:], "schema": {}, "end": "</f>"}]},
     f"^structures\\[1\\].begin has {BOUND}", None),
    ({"type": "structural_tag", "triggers": ["<f"], "structures": [{"begin": "<f>", "schema": {}, "end": LONG}]},
     f"^structures\\[0\\].end has {BOUND}", None),
    ({"type": "tool_call", "tools": [_tool("f"), _tool(LONG)]}, f"^the tool's name has {BOUND}",
     "tools[1].function.name"),
    ({"type": "tool_call", "tools": [_tool("f"), _tool(LONG)], "choice": LONG}, f"^the tool's name has {BOUND}",
     "tools[1].function.name"),
    ({"type": "grammar", "grammar": f'start: "a" mid\nmid: "{LONG}"'}, f'^the string "x+…" of rule mid has {BOUND}',
     None),
    ({"type": "grammar", "grammar": f'start: A\nA: "b" | "{LONG}"i'}, f'^the string "x+…" of terminal A has {BOUND}',
     None),
    ({"type": "grammar", "grammar": f'root ::= "a" | "{LONG}"'}, f'^the string "x+…" of rule .* has {BOUND}', None),
])
def test_a_string_the_answer_must_write_whole_is_bounded_wherever_it_is_given(spec, refusal, param):
    """A choice's string, a structure's begin or end, the name of a tool a forced call may write, a
    grammar's string literal (Lark or GBNF): the answer writes each whole once it starts, and each
    step's mask works out what is left of it (60,000 characters: 15-28 ms a mask with SmolLM2's
    vocabulary, which the batch's other answers wait for), so past MAX_LITERAL_LENGTH it is a
    GrammarError naming it, as an enum's string is."""
    with pytest.raises(GrammarError, match=refusal) as e:
        constraints.check_spec(spec)
    assert e.value.param == param


def test_strings_within_the_bound_or_never_forced_compile(engine, compiler):
    """At MAX_LITERAL_LENGTH characters each of those strings compiles; a tool the forced call cannot
    name, and a %json schema's own strings (a description: not written), are not bounded so."""
    most = "y" * constraints.MAX_LITERAL_LENGTH
    g = compiler.compile({"type": "choice", "choices": ["no", most]})
    m = g.matcher()
    assert all(m.accept(t) for t in ids_of(engine, most)) and m.can_end()
    for spec in ({"type": "structural_tag", "triggers": ["<f"], "structures": [
                    {"begin": "<f" + most[2:], "schema": {}, "end": most}]},
                 {"type": "tool_call", "tools": [_tool("f"), _tool(most)]},
                 {"type": "tool_call", "tools": [_tool("f"), _tool(LONG)], "choice": "f"},
                 {"type": "grammar", "grammar": f'start: "{most}" | %json {json.dumps({"description": LONG})}'},
                 {"type": "json_schema", "schema": {"type": "object", "required": [most]}}):
        constraints.check_spec(spec)
        compiler.compile(spec)


def test_a_choice_of_thousands_of_strings_allows_exactly_one_of_them(engine, compiler):
    """guided_choice's strings are one lexer rule: 2,500 of them (more branches than llguidance's
    parser takes in one grammar rule, which refused them at the answer's first token) compile and
    allow exactly one string; more than MAX_CHOICES are refused, saying how many."""
    choices = [f"option {i}" for i in range(2500)] + ["🙂 ünï", "a\"b"]
    g = compiler.compile({"type": "choice", "choices": choices})

    def accepts(text):
        m = g.matcher()
        return all(m.accept(t) for t in ids_of(engine, text)) and m.can_end()

    for text in ("option 0", "option 7", "option 2499", "🙂 ünï", 'a"b'):
        assert accepts(text), text
    for text in ("option", "option 2500", "option 7 ", "🙂", "a"):
        assert not accepts(text), text
    too_many = {"type": "choice", "choices": [f"c{i}" for i in range(constraints.MAX_CHOICES + 1)]}
    with pytest.raises(GrammarError, match=f"^choice has {constraints.MAX_CHOICES + 1:,} strings: at most "):
        constraints.check_spec(too_many)


def test_schema_true_allows_any_value(engine, compiler):
    m = compiler.compile({"type": "json_schema", "schema": True}).matcher()
    assert all(m.accept(t) for t in ids_of(engine, '[1, "a"]')) and m.can_end()


def test_digit_and_word_classes_are_ascii_as_in_json_schema(engine, compiler):
    """ECMA-262's \\d and \\w (JSON Schema's patterns; vLLM's guided_regex) are ASCII: no "꯲" (a
    Meetei Mayek digit) for \\d, no "日" for \\w, inside a class or out."""
    def accepts(spec, text):
        m = compiler.compile(spec).matcher()
        return all(m.accept(t) for t in ids_of(engine, text)) and m.can_end()

    pattern = {"type": "json_schema", "schema": {"type": "string", "pattern": r"^\d+[\w-]$"}}
    keys = {"type": "json_schema", "schema": {"type": "object", "patternProperties": {r"^\w$": {"type": "integer"}},
                                              "additionalProperties": False}}
    for spec, good, bad in [({"type": "regex", "pattern": r"\d{2}"}, "12", "1꯲"),
                            ({"type": "regex", "pattern": r"\w+\W"}, "a_1!", "日!"),
                            ({"type": "regex", "pattern": r"[^\D]\S"}, "1x", "꯲x"),
                            (pattern, '"12a"', '"1꯲a"'), (pattern, '"1-"', '"1日"'),
                            (keys, '{"k": 1}', '{"日": 1}')]:
        assert accepts(spec, good), (spec, good)
        assert not accepts(spec, bad), (spec, bad)


def test_a_grammars_own_regexes_read_digit_and_word_classes_as_unicode(engine, compiler):
    """A Lark grammar's regexes (`/.../`, in a rule or a terminal) are the grammar engine's, the
    Rust regex crate's syntax, as Lark's Python regexes are Unicode too: `\\d` allows "٣" (an
    Arabic-Indic digit) and `\\w` "日", as documented; `[0-9]` and `(?-u:\\d)` are ASCII, and a
    `%json` schema's `pattern` inside the grammar is JSON Schema's (ECMA-262's ASCII `\\d`)."""
    def accepts(grammar, text):
        m = compiler.compile({"type": "grammar", "grammar": grammar}).matcher()
        return all(m.accept(t) for t in ids_of(engine, text)) and m.can_end()

    for grammar in (r"start: /\d+/", "start: NUM\nNUM: /\\d+/", r"start: /[^\D]+/"):
        assert accepts(grammar, "12") and accepts(grammar, "1٣"), grammar
    assert accepts(r"start: /\w+/", "a日") and not accepts(r"start: /\w+/", "a!")
    for grammar in (r"start: /[0-9]+/", r"start: /(?-u:\d)+/", "root ::= [0-9]+"):
        assert accepts(grammar, "12") and not accepts(grammar, "1٣"), grammar
    schema = 'start: %json {"type": "string", "pattern": "^\\\\d+$"}'
    assert accepts(schema, '"12"') and not accepts(schema, '"1٣"')


def test_supported_schema_features(engine, compiler):
    def accepts(spec, value):
        m = compiler.compile(spec).matcher()
        return all(m.accept(t) for t in ids_of(engine, json.dumps(value))) and m.can_end()

    ref = {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
           "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}, "required": ["a"]}
    cases = [
        (ref, {"a": {"x": 1}}, {"a": {"y": 1}}),
        ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, "ab", "abc"),
        ({"type": "string", "pattern": "^[A-Z]{2}-[0-9]$"}, "AB-1", "ab-1"),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, [1, 2], [1]),
        ({"type": "object", "properties": {"a": {"type": "integer"}}}, {"a": 1}, {"a": 1, "b": 2}),
        ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                    {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
         {"a": 1, "b": "x"}, {"a": 1}),
    ]
    for schema, good, bad in cases:
        spec = {"type": "json_schema", "schema": schema}
        assert accepts(spec, good), schema
        assert not accepts(spec, bad), schema
    # open objects on request
    open_c = ConstraintCompiler(engine.tokenizer, engine.vocab_size, close_objects=False)
    m = open_c.compile({"type": "json_schema", "schema": cases[4][0]}).matcher()
    assert all(m.accept(t) for t in ids_of(engine, '{"a": 1, "b": 2}'))


def test_whitespace_is_bounded(engine, compiler):
    def accepts(c, text):
        m = c.compile({"type": "json_object"}).matcher()
        return all(m.accept(t) for t in ids_of(engine, text)) and m.can_end()

    pretty = ConstraintCompiler(engine.tokenizer, engine.vocab_size, whitespace=constrain.PRETTY_WHITESPACE)
    anyws = ConstraintCompiler(engine.tokenizer, engine.vocab_size, whitespace=None)
    compact = ConstraintCompiler(engine.tokenizer, engine.vocab_size, whitespace="")
    indented, runaway = '{\n  "a": 1,\n  "b": [\n    2\n  ]\n}', '{\n\n\n"a": 1}'
    assert accepts(compiler, '{"a": 1, "b": [2]}') and accepts(compiler, '{ "a":1 }')
    assert not accepts(compiler, indented) and not accepts(compiler, '{"a":  1}')
    assert accepts(pretty, indented) and not accepts(pretty, runaway)
    assert accepts(anyws, runaway)
    assert accepts(compact, '{"a":1}') and not accepts(compact, '{"a": 1}')


def test_cache_and_threads(engine):
    c = ConstraintCompiler(engine.tokenizer, engine.vocab_size, cache_size=2)
    a = c.compile({"type": "json_object"})
    assert c.compile({"type": "json_object"}) is a
    specs = [{"type": "json_schema", "schema": {"type": "object", "properties": {f"k{i}": {"type": "integer"}}}}
             for i in range(8)]
    results, errors = [None] * 32, []

    def work(i):
        try:
            g = c.compile(specs[i % 8])
            m = g.matcher()
            assert all(m.accept(t) for t in ids_of(engine, json.dumps({f"k{i % 8}": i})))
            results[i] = g
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results)
    assert c.cache_info()["entries"] == 2            # LRU bound
    assert c.compile({"type": "json_object"}) is not a   # evicted, compiled again


# ---- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_schema_and_tool_call():
    eng = Engine(EngineConfig(dtype="fp32"))
    c = ConstraintCompiler(eng.tokenizer, eng.vocab_size)
    person = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]}}, "required": ["name", "age", "color"]}
    g = c.compile({"type": "json_schema", "schema": person})
    tool = c.compile({"type": "tool_call", "tools": TOOLS, "choice": "required"})
    msgs = [{"role": "user", "content": "Describe a person as JSON with name, age and favourite color."}]
    tool_msgs = [{"role": "system", "content": "You can call tools: <tools>" + json.dumps(TOOLS) + "</tools>"},
                 {"role": "user", "content": "What is the weather in Paris?"}]
    reqs = {"greedy": (g, SamplingParams(max_tokens=80), msgs),
            "s1": (g, SamplingParams(max_tokens=80, temperature=0.8, seed=1), msgs),
            "tool": (tool, SamplingParams(max_tokens=80), tool_msgs)}
    for rid, (gr, p, m) in reqs.items():
        eng.add_request(rid, messages=m, params=replace(p, constraint=gr))
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    for rid in ("greedy", "s1"):
        assert done[rid].finish_reason == "stop", done[rid].text
        v = json.loads(done[rid].text)
        assert set(v) == {"name", "age", "color"} and v["color"] in ("red", "green", "blue")
    text = done["tool"].text
    assert done["tool"].finish_reason == "stop", text
    calls = json.loads(re.fullmatch(r"<tool_call>\n?(.*?)\n?</tool_call>", text, re.S).group(1))
    assert calls[0]["name"] in ("get_weather", "add")


def test_logits_wider_than_the_grammars_mask_are_minus_inf_past_it(engine):
    # a compiler made for the tokenizer alone: its mask's words end before the logits do
    c = ConstraintCompiler(engine.tokenizer)
    V = c.words * 32 + 40
    m = c.compile({"type": "json_object"}).matcher()
    logits = torch.zeros(2, V)
    apply_masks(logits, [m, None])
    assert torch.isinf(logits[0, c.vocab_size:]).all() and torch.isfinite(logits[1]).all()
    assert torch.isfinite(logits[0]).nonzero().view(-1).tolist() == m.allowed()


def test_the_grammar_cache_evicts_the_least_recently_used_not_the_first_compiled(engine):
    c = ConstraintCompiler(engine.tokenizer, engine.vocab_size, cache_size=2)
    spec = {n: {"type": "regex", "pattern": n} for n in ("a+", "b+", "c+")}
    a, b = c.compile(spec["a+"]), c.compile(spec["b+"])
    assert c.compile(spec["a+"]) is a                         # used again: now the most recent
    c.compile(spec["c+"])                                       # evicts b, the least recently used
    assert c.compile(spec["a+"]) is a and c.compile(spec["b+"]) is not b


def _wide_schema(i: int, props: int) -> dict:
    """A schema of `props` optional string properties; `i` makes each one different."""
    return {"type": "object", "properties": {f"p{i}_{k}": {"type": "string"} for k in range(props)}}


def test_the_compile_cache_keeps_grammars_within_its_bytes_and_a_repeated_spec_hits(engine):
    c = ConstraintCompiler(engine.tokenizer, engine.vocab_size, cache_bytes=500_000)
    small = {"type": "json_schema", "schema": BOUNDED_SCHEMA}
    first = c.compile(small)
    assert c.compile(json.loads(json.dumps(small))) is first          # the same spec: compiled once
    assert c.cache_info()["entries"] == 1
    for i in range(12):                                               # grammars of ~1.4 KB of text each
        c.compile({"type": "json_schema", "schema": _wide_schema(i, 40)})
        info = c.cache_info()
        assert 0 < info["bytes"] <= 500_000
    assert info["entries"] < 12                                       # the oldest went out
    assert c.compile(small) is not first                              # ... the first one too
    big = {"type": "json_schema", "schema": _wide_schema(99, 400)}   # larger than the cache alone
    g = c.compile(big)
    assert g.size > 500_000 and c.compile(big) is not g                # compiled, never kept
    assert c.cache_info()["bytes"] <= 500_000



@pytest.mark.parametrize("parameters", ["left out", None, {}])
def test_a_forced_call_to_a_tool_without_parameters_has_empty_arguments(engine, compiler, parameters):
    """A tool whose parameters are left out, null or {} takes no arguments (OpenAI's empty parameter
    list): a forced call to it writes "arguments": {} and nothing inside the braces."""
    fn = {"name": "now"} if parameters == "left out" else {"name": "now", "parameters": parameters}
    m = compiler.compile({"type": "tool_call", "tools": [{"type": "function", "function": fn}]}).matcher()
    for t in ids_of(engine, '<tool_call>[{"name": "now", "arguments": {'):
        assert m.accept(t)
    texts = {engine.tokenizer.decode([t]) for t in m.allowed()}
    assert "}" in texts and not any('"' in t for t in texts), texts


@pytest.mark.parametrize("array", [True, False])
def test_a_call_forced_by_name_can_name_that_tool_alone(engine, compiler, array):
    """tool_choice naming a function: the call's name is that function's, never another tool's."""
    spec = {"type": "tool_call", "tools": TOOLS, "choice": {"type": "function", "function": {"name": "add"}},
            "array": array}
    m = compiler.compile(spec).matcher()
    for t in ids_of(engine, '<tool_call>' + ("[" if array else "") + '{"name": "'):
        assert m.accept(t)
    texts = {engine.tokenizer.decode([t]) for t in m.allowed()}
    assert texts and all("add".startswith(t) for t in texts), texts


OBJECT_A = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("schema, more_keys", [
    (OBJECT_A, False),                                                   # closed, as OpenAI's strict mode
    ({**OBJECT_A, "additionalProperties": True}, True),                  # the schema's own choice is kept
    ({"anyOf": [OBJECT_A, {"type": "integer"}]}, False),                 # closed inside anyOf too
    ({"type": "array", "items": OBJECT_A}, False),
], ids=["top", "additional-true", "any-of", "items"])
def test_objects_with_properties_are_closed_unless_the_schema_leaves_them_open(engine, compiler, schema, more_keys):
    m = compiler.compile({"type": "json_schema", "schema": schema}).matcher()
    text = '[{"a": 1' if schema.get("type") == "array" else '{"a": 1'
    for t in ids_of(engine, text):
        assert m.accept(t)
    texts = {engine.tokenizer.decode([t]) for t in m.allowed()}
    assert "}" in texts and (any("," in t for t in texts)) is more_keys, texts


@pytest.mark.parametrize("schema", [
    {"type": "integer", "if": {"minimum": 5}, "else": {"maximum": 2}},
    {"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 9}},
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
], ids=["if-else", "if-then", "unique-items"])
def test_keywords_that_do_constrain_are_refused_never_dropped(compiler, schema):
    """The same keywords where they constrain the value (if with then or else, uniqueItems true):
    refused as the grammar engine cannot enforce them, never left out of the grammar."""
    with pytest.raises(GrammarError, match="Unimplemented keys"):
        compiler.compile({"type": "json_schema", "schema": schema})


def test_a_choice_of_max_choices_strings_is_taken_and_one_more_refused():
    choices = [f"c{i}" for i in range(constraints.MAX_CHOICES + 1)]
    assert constraints.check_spec({"type": "choice", "choices": choices[:-1]}) == []
    with pytest.raises(GrammarError, match=f"at most {constraints.MAX_CHOICES:,}"):
        constraints.check_spec({"type": "choice", "choices": choices})


@pytest.mark.parametrize("options, spaced, open_objects", [
    ({}, True, False), ({"compact": True}, False, False), ({"close_objects": False}, True, True),
])
def test_a_structural_tag_s_json_follows_the_spec_s_own_options(engine, compiler, options, spaced, open_objects):
    """compact and close_objects (vLLM's disable_any_whitespace, disable_additional_properties) hold
    inside a structural tag's structures as in any JSON spec."""
    spec = {"type": "structural_tag", "triggers": ["<f>"], **options,
            "structures": [{"begin": "<f>", "schema": OBJECT_A, "end": "</f>"}]}

    def takes(text):
        m = compiler.compile(spec).matcher()
        return all(m.accept(t) for t in ids_of(engine, text))

    assert takes('<f>{"a":1}</f>')
    assert takes('<f>{"a": 1}</f>') is spaced
    assert takes('<f>{"a":1,"b":2}</f>') is open_objects
