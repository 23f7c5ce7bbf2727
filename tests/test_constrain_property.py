"""Constrained decoding's promise as a property: every answer that finishes with "stop" is valid.

The tiny random model (soft_gguf: spread next-token distributions) finds any text as likely as
another, so the constraint does all the work. Schemas, regexes and grammars are drawn from a
seeded random generator over the JSON Schema features a client uses (nested objects, arrays
with minItems/maxItems, enums and const with unicode, anyOf, disjoint oneOf, recursive $ref,
patterns, string formats, bounded and multipleOf numbers, integer vs number, optional
properties, additionalProperties false, unicode keys); each is answered several times at
temperature 1 in one batch, beside an unconstrained greedy request whose tokens must be those
it gets alone. Answers cut by max_tokens ("length") make no claim and are only counted."""
from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import replace
from datetime import date, datetime

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
lark = pytest.importorskip("lark")

from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from pipeline_dsl.engine.constrain import ConstraintCompiler  # noqa: E402

SEEDS = range(3)          # answers per constraint
KEYS = ["a", "b", "név", "キー", "k_1", "ключ"]
WORDS = ["x", "yes", "no", "ünï", "日本", "🙂", "a b"]
FORMATS = {"date-time": lambda s: datetime.fromisoformat(s.upper().replace("Z", "+00:00").replace(":60", ":59")),
           "date": date.fromisoformat,
           "email": lambda s: re.fullmatch(r"[^@\s]+@[^@\s]+", s) or _fail(s),
           "uuid": uuid.UUID}


def _fail(value):
    raise ValueError(f"not valid: {value!r}")


def draw_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random JSON Schema that constrained decoding can enforce."""
    kinds = ["integer", "number", "string", "enum", "const", "boolean", "format", "pattern"]
    if depth < 2:
        kinds += ["object", "object", "array", "anyOf", "oneOf", "nullable"]
    kind = rng.choice(kinds)
    if kind == "integer":
        lo = rng.randint(-50, 50)
        s = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
        if rng.random() < 0.4:
            s["multipleOf"] = rng.choice([2, 3, 5])
            s["maximum"] += 10
        return s
    if kind == "number":
        lo = rng.choice([-1.5, 0, 0.25, 3])
        return {"type": "number", "minimum": lo, "maximum": lo + rng.choice([0.5, 2, 100]),
                **({"multipleOf": rng.choice([0.25, 0.5])} if rng.random() < 0.3 else {})}
    if kind == "string":
        lo = rng.randint(0, 3)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 6)}
    if kind == "enum":
        return {"enum": rng.sample(WORDS + [1, 2.5, None, True], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(WORDS + [7, {"k": [1, "ü"]}])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "format":
        return {"type": "string", "format": rng.choice(sorted(FORMATS))}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice([r"^[A-Z]{2}-[0-9]{1,3}$", r"^(ab|cd)+$", r"^\d{4}$",
                                                          r"^\w{1,3}@[a-z]+\.(com|org)$", r"^[\d_]{2}$"])}
    if kind == "object":
        keys = rng.sample(KEYS, rng.randint(1, 3))
        s = {"type": "object", "properties": {k: draw_schema(rng, depth + 1) for k in keys},
             "required": [k for k in keys if rng.random() < 0.7]}
        if rng.random() < 0.5:
            s["additionalProperties"] = False
        return s
    if kind == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": draw_schema(rng, depth + 1),
                "minItems": lo, "maxItems": lo + rng.randint(0, 3)}
    if kind == "anyOf":
        return {"anyOf": [draw_schema(rng, depth + 1) for _ in range(rng.randint(2, 3))]}
    if kind == "oneOf":                # disjoint branches: an enforceable oneOf
        return {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                          {"type": "string", "maxLength": 3}, {"type": "array", "maxItems": 1,
                                                               "items": draw_schema(rng, depth + 1)}]}
    return {"type": ["string", "null"], "maxLength": 4}


RECURSIVE = {"$defs": {"node": {"type": "object", "properties": {
    "v": {"type": "integer", "minimum": 0, "maximum": 9},
    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v"]}},
    "$ref": "#/$defs/node"}
LARGE = {"type": "object", "properties": {f"k{i}": {"enum": [i, f"v{i}"]} for i in range(120)},
         "required": [f"k{i}" for i in range(0, 120, 3)]}


def schemas() -> list[dict]:
    rng = random.Random(1234)
    return [draw_schema(rng) for _ in range(14)] + [RECURSIVE, LARGE]


def check_value(value, schema) -> None:
    jsonschema.validate(value, schema)
    todo = [(value, schema)]                   # formats: jsonschema checks them only with extras installed
    while todo:
        v, s = todo.pop()
        if isinstance(s, dict) and s.get("format") in FORMATS and isinstance(v, str):
            FORMATS[s["format"]](v)
        if isinstance(s, dict) and "pattern" in s and isinstance(v, str):    # ECMA-262: \d, \w are ASCII
            assert re.search(s["pattern"], v, re.ASCII), (s["pattern"], v)
        if isinstance(v, dict) and isinstance(s, dict):
            todo += [(v[k], sub) for k, sub in s.get("properties", {}).items() if k in v]
        if isinstance(v, list) and isinstance(s, dict) and isinstance(s.get("items"), dict):
            todo += [(x, s["items"]) for x in v]
        if isinstance(s, dict):
            for branch in s.get("anyOf", []) + s.get("oneOf", []):
                try:
                    jsonschema.validate(v, branch)
                    todo.append((v, branch))
                except jsonschema.ValidationError:
                    pass


@pytest.fixture(scope="module")
def engine(soft_gguf):
    return Engine(EngineConfig(model=str(soft_gguf), dtype="fp32"))


@pytest.fixture(scope="module")
def compiler(engine):
    return ConstraintCompiler(engine.tokenizer, engine.vocab_size)


def run(engine, requests: dict) -> tuple[dict, dict]:
    """{id: (grammar or None, SamplingParams)}, all in one batch -> ({id: finished RequestOutput},
    {id: its tokens})."""
    for rid, (grammar, params) in requests.items():
        engine.add_request(rid, messages=[{"role": "user", "content": "hi"}],
                           params=replace(params, constraint=grammar))
    done, tokens = {}, {rid: [] for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                done[out.request_id] = out
    return done, tokens


def answer_all(engine, grammars: list, max_tokens: int) -> list[list]:
    """Each grammar's answers (seeded, temperature 1); the greedy free request in their batch
    gets the tokens it gets alone."""
    free = SamplingParams(max_tokens=24)
    reqs = {"free": (None, free)}
    reqs.update({f"{i}:{seed}": (g, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed))
                 for i, g in enumerate(grammars) for seed in SEEDS})
    done, tokens = run(engine, reqs)
    assert tokens["free"] == run(engine, {"alone": (None, free)})[1]["alone"]
    return [[done[f"{i}:{seed}"] for seed in SEEDS] for i in range(len(grammars))]


def test_every_finished_answer_validates_against_its_schema(engine, compiler):
    drawn = schemas()
    answers = answer_all(engine, [compiler.compile({"type": "json_schema", "schema": s}) for s in drawn], 400)
    finished = 0
    for schema, outs in zip(drawn, answers):
        for out in outs:
            assert out.finish_reason in ("stop", "length"), out.finish_reason
            if out.finish_reason == "stop":
                check_value(json.loads(out.text), schema)
                finished += 1
    assert finished >= len(drawn) * len(SEEDS) * 2 // 3      # the bounded schemas finish


def test_an_answer_cut_by_max_tokens_claims_nothing(engine, compiler):
    g = compiler.compile({"type": "json_schema", "schema": LARGE})
    (outs,) = answer_all(engine, [g], 6)
    for out in outs:
        assert out.finish_reason == "length" and out.completion_tokens == 6
        with pytest.raises(json.JSONDecodeError):
            json.loads(out.text)


REGEXES = [r"(hello|world) [0-9]{2}", r"[A-Z][a-z]{0,4}(-[0-9]+)?", r"(ab|ü|日本)+!", r"0x[0-9a-f]{2,6}",
           r"\d{3}-\d{4}", r"(yes|no|maybe)", r"\w+(\.[a-z]+){1,2}", r"[^\W_]{2}\D"]
LARK = {  # grammar -> the same language for the lark package (which parses the answers)
    'start: expr\nexpr: NUM | "(" expr "+" expr ")"\nNUM: /[0-9]{1,2}/':
        'start: expr\nexpr: NUM | "(" expr "+" expr ")"\nNUM: /[0-9]{1,2}/',
    'start: "[" (item ("," item)*)? "]"\nitem: "a" | "bb" | "ü"':
        'start: "[" (item ("," item)*)? "]"\nitem: "a" | "bb" | "ü"',
    'root ::= "ja" | "nein" | word\nword ::= [a-c]+':                   # GBNF
        'start: "ja" | "nein" | WORD\nWORD: /[a-c]+/',
}


def test_every_finished_answer_is_in_its_regex_or_grammar_language(engine, compiler):
    grammars = [compiler.compile({"type": "regex", "pattern": r}) for r in REGEXES]
    grammars += [compiler.compile({"type": "grammar", "grammar": g}) for g in LARK]
    answers = answer_all(engine, grammars, 60)
    for pattern, outs in zip(REGEXES, answers):
        for out in outs:
            if out.finish_reason == "stop":
                assert re.fullmatch(pattern, out.text, re.ASCII), (pattern, out.text)
    for (grammar, same), outs in zip(LARK.items(), answers[len(REGEXES):]):
        parser = lark.Lark(same, parser="earley")
        for out in outs:
            if out.finish_reason == "stop":
                parser.parse(out.text)                     # raises when the text is not in the language
    assert sum(o.finish_reason == "stop" for outs in answers for o in outs) >= len(answers) * len(SEEDS) // 2
