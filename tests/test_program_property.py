"""Whatever `agp check` accepts runs: whole random programs (Hypothesis), not one template.

tests/test_flow_property.py varies one shape (source, a few stages, one or two engines, a join,
one tool loop) and the stage policies; tests/test_dsl_fuzz.py mutates example text. This file
builds programs from the language itself and goes where those do not: graphs grown at random
(chains, fan-outs, splits by nested `and`/`or`/`not` conditions on request and result fields,
python labels, several respond stages, one shared join, loops bounded by `max_turns` back to any
stage before them, engines shared by several paths, several generate stages on one engine or
another model), every stage kind with random parameters (sampling, stop strings, bad words,
a `json_schema` constraint, batcher policies, `on` placements), the pipeline settings (`mode`,
`dtype`, `kv_budget`, `threads`) and several files (`use`, included pipelines in a sub-folder,
pipelines spread over files, the default pipeline's choice).

For each program that `check` accepts: the default pipeline is the one docs/language.md says,
`agp fmt`'s text of it checks clean too, and it runs over a random few request lines of every
shape (chat, prompt and token ids; `n`, a pin to a generate stage, logprobs, echo, a
response_format, a forced tool call, stop strings and ids, a priority, truncation, a prompt too
long for `max_prompt_tokens`) as `agp run` runs them: no crash, no hang, one JSON record per
line, each an answer or a clean error of that request, and the per-stage counts add up. For
each program `check` refuses, every error names a file, a line and a column.

PROGRAM_EXAMPLES sets how many programs (default 15, about 15 s); a long run:

    PROGRAM_EXAMPLES=3000 OMP_NUM_THREADS=1 pytest -q -x tests/test_program_property.py
"""
from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import flowkit
import pipeline_dsl
from pipeline_dsl.commands.runner import RunRequest, run_pipeline
from pipeline_dsl.diagnostics import render_all
from pipeline_dsl.flow import PipelineRuntime, load_graph
from pipeline_dsl.fmt import format_text
from pipeline_dsl.requests_io import parse_line_object

EXAMPLES = int(os.environ.get("PROGRAM_EXAMPLES", "15"))
HANG_S = 90.0

HOOKS = '''
import asyncio
import json
import threading

import pipeline_dsl

_SEEN = set()
_LOCK = threading.Lock()


def _rid(item):
    return str((item.get("request") or item).get("id"))


def same(item):
    return item


async def asame(item):
    await asyncio.sleep(0)
    return item


def nothing(item):
    return None


def tag(item):
    return "even" if len(_rid(item)) % 2 == 0 else "odd"


def grade(item):
    if len(item.get("text") or json.dumps(item.get("messages") or item.get("prompt"))) > 12:
        return "long"
    return "short"


def tweak(item):
    if "request" in item:
        item["text"] = item["text"][::-1]
    else:
        item["max_tokens"] = 3
        item["temperature"] = 0.5
    return item


def fresh(item):
    if "request" in item:
        return {"text": "fresh " + str(len(item["text"]))}
    return dict(item)


def refuse_x(item):
    if _rid(item).endswith("x"):
        raise pipeline_dsl.Reject("ids ending in x are refused")
    return item


def boom(item):
    if _rid(item) == "dz":
        raise SystemExit(1)
    return item


def flaky(item):
    """Fails the first call with each content (a transient error): a retry succeeds."""
    key = json.dumps(item, sort_keys=True, default=str)
    with _LOCK:
        first = key not in _SEEN
        _SEEN.add(key)
    if first:
        raise ConnectionError("the first call with this content fails")
    return item


def _back(item):
    req = dict(item["request"])
    if req.get("prompt_token_ids"):
        req["prompt_token_ids"] = list(req["prompt_token_ids"]) + [5]
    elif req.get("messages"):
        req["messages"] = list(req["messages"]) + [{"role": "assistant", "content": item["text"] or "-"},
                                                   {"role": "user", "content": "more"}]
    else:
        req["prompt"] = (req.get("prompt") or "") + item["text"] + " more"
    return req


def again(item):
    if "request" not in item:
        return item
    return _back(item)


def again_some(item):
    if "request" not in item or len(item["text"]) % 2:
        return item
    return _back(item)


def merge_pick(items):
    return items[0]
''' + flowkit.STREAM_AND_JOIN_HOOKS

SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'

REQUEST_FNS = ["same", "asame", "nothing", "tweak", "fresh", "refuse_x", "boom", "flaky"]
LABELS = {"tag": ("even", "odd"), "grade": ("long", "short")}

NUMBERS = ["prompt_tokens", "max_tokens", "temperature", "top_p", "top_k", "n", "turn"]
STRINGS = ["model", "id", "metadata.tier", 'metadata["team id"]', 'headers["X-Tenant"]']
BOOLS = ["stream", "metadata.big"]
AFTER_NUMBERS = ["completion_tokens", "cached_tokens"]
AFTER_STRINGS = ["finish_reason", "text"]


@st.composite
def condition(draw, generated: bool, labels: tuple = (), depth: int = 0):
    """A random condition on an item's fields (those known after generate when `generated`),
    the labels of a python stage, `and`/`or`/`not` and parentheses."""
    shape = draw(st.sampled_from(["atom"] * 3 + (["not", "and", "or", "paren"] if depth < 2 else [])))
    if shape == "not":
        return "not " + draw(condition(generated, labels, depth + 1))
    if shape in ("and", "or"):
        return f"{draw(condition(generated, labels, depth + 1))} {shape} {draw(condition(generated, labels, depth + 1))}"
    if shape == "paren":
        return "(" + draw(condition(generated, labels, depth + 1)) + ")"
    if labels and draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(labels))
    numbers, strings = NUMBERS + (AFTER_NUMBERS if generated else []), STRINGS + (AFTER_STRINGS if generated else [])
    typ = draw(st.sampled_from(["number"] * 3 + ["string", "bool"]))
    if typ == "number":
        field, op = draw(st.sampled_from(numbers)), draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        lit = draw(st.sampled_from(["0", "1", "2", "3.5", "12", "-1"]))
    elif typ == "string":
        field, op = draw(st.sampled_from(strings)), draw(st.sampled_from(["==", "!="]))
        lit = draw(st.sampled_from(['"a"', '"length"', '"stop"', '"gold"', '"x"']))
    else:
        field, op, lit = draw(st.sampled_from(BOOLS)), draw(st.sampled_from(["==", "!="])), \
            draw(st.sampled_from(["true", "false"]))
    return f"{field} {op} {lit}"


class Builder:
    """One pipeline, grown from its request source along the item types."""

    MAX_STAGES = 26

    def __init__(self, draw, name: str, other_model: str):
        self.draw, self.name, self.other_model = draw, name, other_model
        self.stages: list[str] = []
        self.edges: list[str] = []
        self.kinds: dict[str, str] = {}
        self.n = 0
        self.heads: list[str] = []           # batchers of the engines made so far
        self.gens: list[str] = []
        self.join: str | None = None
        self.out: str | None = None           # the shared respond stage, made when first used
        self.looped = False
        self.mode = draw(st.sampled_from([None, "efficient", "balanced", "performance"]))
        self.kv_budget = draw(st.sampled_from([None, None, "2MiB", "8MiB"]))

    # ---- text
    def stage(self, prefix: str, kind: str, params: list[str] = ()) -> str:
        self.n += 1
        name = f"{prefix}{self.n}"
        self.kinds[name] = kind
        on = ""
        if self.draw(st.integers(0, 14)) == 0:
            on = " on " + self.draw(st.sampled_from(["host", "copy", "compute"]))
        body = "" if not params and self.draw(st.booleans()) else " { " + "  ".join(params) + " }"
        self.stages.append(f"stage {name} : {kind}{on}{body}")
        return name

    def edge(self, a: str, b: str, cond: str = "") -> None:
        self.edges.append(f"{a} -> {b}{cond}")

    def full(self) -> bool:
        return len(self.stages) >= self.MAX_STAGES

    def pick(self, values):
        return self.draw(st.sampled_from(values))

    def maybe(self, params: list[str], text: str, chance: int = 2) -> None:
        if self.draw(st.integers(0, chance)) == 0:
            params.append(text)

    def python(self, fn: str, extra: list[str] = ()) -> str:
        params = [f'fn = "hooks:{fn}"', *extra]
        self.maybe(params, f"workers = {self.pick([1, 2, 16])}", 3)
        self.maybe(params, "timeout = 30s", 3)
        if fn == "flaky":
            params.append("retries = 2  backoff = 1ms")
        elif "stream = true" not in extra and fn not in ("again", "again_some"):
            self.maybe(params, f"cache = {self.pick([1, 8])}", 4)
        return self.stage("py", "python", params)

    def cond(self, stage: str, generated: bool) -> str:
        labels = LABELS.get(self.fn_of(stage), ()) if self.kinds[stage] == "python" else ()
        return " when " + self.draw(condition(generated, labels))

    def fn_of(self, stage: str) -> str:
        line = next(s for s in self.stages if s.startswith(f"stage {stage} "))
        return line.split('"hooks:')[1].split('"')[0] if '"hooks:' in line else ""

    def split_tail(self, at: str, grow, depth: int) -> None:
        """The fallback of a split: `otherwise`, an unconditional edge, or (now and then) none."""
        how = self.pick(["otherwise"] * 8 + ["plain", "none"])
        if how == "otherwise":
            grow(at, " otherwise", depth + 1)
        elif how == "plain":
            grow(at, "", depth + 1)

    # ---- before the engines: Requests
    def request_path(self, at: str, cond: str, depth: int, before: list[str]) -> None:
        shapes = ["engine"] * 3 + (["chain"] * 3 + ["fan", "split"] if depth < 4 and not self.full() else [])
        shape = self.pick(shapes)
        grow = lambda s, c, d: self.request_path(s, c, d, before + [s])   # noqa: E731
        if shape == "chain":
            what = self.pick(["system", "route", "python", "python"])
            if what == "system":
                params = [f'text = "{self.pick(["Be brief.", "You are terse."])}"']
                self.maybe(params, f"override = {self.pick(['true', 'false'])}", 1)
                s = self.stage("sys", "system_prompt", params)
            elif what == "route":
                s = self.stage("rt", "route")
            else:
                s = self.python(self.pick(REQUEST_FNS))
            self.edge(at, s, cond)
            grow(s, "", depth + 1)
        elif shape == "fan":
            self.request_path(at, cond, depth + 1, before)
            self.request_path(at, "", depth + 1, before)
        elif shape == "split":
            s = self.stage("rt", "route") if self.draw(st.booleans()) else self.python(self.pick(list(LABELS)))
            self.edge(at, s, cond)
            for _ in range(self.draw(st.integers(1, 2))):
                grow(s, self.cond(s, False), depth + 1)
            self.split_tail(s, grow, depth)
        else:
            if self.heads and self.draw(st.integers(0, 2)) == 0:
                self.edge(at, self.pick(self.heads), cond)        # an engine another path feeds too
            else:
                self.engine(at, cond, depth, before)

    def engine(self, at: str, cond: str, depth: int, before: list[str]) -> None:
        bp: list[str] = []
        self.maybe(bp, f"max_batch_size = {self.pick([1, 2, 4, 8])}", 1)
        self.maybe(bp, f"timeout = {self.pick(['0', '1ms', '5ms'])}", 1)
        self.maybe(bp, f"policy = {self.pick(['continuous', 'static'])}")
        self.maybe(bp, f"scheduling_policy = {self.pick(['fcfs', 'priority'])}")
        self.maybe(bp, f"max_tokens_per_step = {self.pick([8, 32, 512])}")
        self.maybe(bp, f"itl_target = {self.pick(['0', '50ms'])}")
        self.maybe(bp, f"padding = {self.pick(['true', 'false'])}")
        b = self.stage("batch", "dynamic_batch", bp)
        ep: list[str] = []
        self.maybe(ep, f"chat_template = {self.pick(['true', 'false'])}")
        self.maybe(ep, f"add_special_tokens = {self.pick(['true', 'false'])}")
        e = self.stage("enc", "encode", ep)
        kp = [f"block_size = {self.pick([4, 8, 16])}"]
        self.maybe(kp, f"reuse = {self.pick(['prefix', 'none'])}")
        if self.kv_budget is None and self.mode != "efficient" or self.kv_budget == "8MiB" and self.draw(st.booleans()):
            kp.append(f"budget = {self.pick(['1MiB', '2MiB'] if self.kv_budget is None else ['1MiB'])}")
        k = self.stage("kv", "kv_lookup", kp)
        self.heads.append(b)
        self.edge(at, b, cond)
        how = self.pick(["labels"] * 10 + ["plain"] * 10 + ["full"])
        if how == "labels":
            self.edge(b, e, " when full")
            self.edge(b, e, " when timeout")
        else:
            self.edge(b, e, " when full" if how == "full" else "")
        self.edge(e, k)
        model = self.other_model if self.draw(st.integers(0, 4)) == 0 else None    # one engine, one model
        shared = [f'model = "{model}"'] if model else []       # what generate stages of one engine share
        self.maybe(shared, f"prefill_chunk = {self.pick([4, 256])}", 3)
        gens = [self.generate(shared) for _ in range(self.draw(st.integers(1, 3)))]
        for i, g in enumerate(gens):
            if i == 0 or self.draw(st.booleans()):
                self.edge(k, g)
            else:
                self.edge(k, g, " when " + self.draw(condition(False)))
        if any(" when " in x for x in self.edges if x.startswith(f"{k} -> ")) and self.draw(st.integers(0, 3)):
            self.edge(k, gens[0], " otherwise")
        for g in gens:
            self.generated_path(g, "", depth + 1, before + [b])

    def generate(self, shared: list[str]) -> str:
        p = [f"max_new_tokens = {self.draw(st.integers(1, 6))}"]
        self.maybe(p, f"temperature = {self.pick(['0', '0.7', '1.5'])}", 1)
        self.maybe(p, f"seed = {self.draw(st.integers(-3, 3))}", 1)
        self.maybe(p, f"n = {self.draw(st.integers(1, 3))}", 1)
        self.maybe(p, f"top_p = {self.pick(['0.5', '1'])}", 3)
        self.maybe(p, f"top_k = {self.pick([-1, 0, 3])}", 3)
        self.maybe(p, f"min_p = {self.pick(['0', '0.2'])}", 4)
        self.maybe(p, f"presence_penalty = {self.pick(['-1', '0.5'])}", 4)
        self.maybe(p, f"frequency_penalty = {self.pick(['0', '1.5'])}", 4)
        self.maybe(p, f"repetition_penalty = {self.pick(['0.5', '1.3'])}", 4)
        self.maybe(p, f"min_tokens = {self.draw(st.integers(0, 3))}", 4)
        self.maybe(p, f"ignore_eos = {self.pick(['true', 'false'])}", 3)
        self.maybe(p, "stop = " + self.pick(['[]', '["e"]', '["a", "the"]']), 4)
        self.maybe(p, "bad_words = " + self.pick(['["the"]', '["a", "of"]']), 4)
        self.maybe(p, 'json_schema = "schema.json"', 5)
        p += shared
        if self.mode == "performance":
            p.append("compile = false")          # torch.compile on a CPU: minutes, not the point here
        g = self.stage("gen", "generate", p)
        self.gens.append(g)
        return g

    # ---- after the engines: Generated results
    def generated_path(self, at: str, cond: str, depth: int, before: list[str]) -> None:
        # one loop a pipeline: several, each back to a fan-out, multiply a request's branches per
        # turn of each (valid, and thousands of sequences for one request: too slow to run here)
        shapes = ["sink"] * 3 + (["chain"] * 2 + ["stream", "split", "fan"] + ([] if self.looped else ["loop"])
                                 if depth < 6 and not self.full() else [])
        shape = self.pick(shapes)
        grow = lambda s, c, d: self.generated_path(s, c, d, before)   # noqa: E731
        if shape == "chain":
            s = self.stage("rt", "route") if self.draw(st.integers(0, 4)) == 0 else \
                self.python(self.pick(REQUEST_FNS + list(LABELS)))
            self.edge(at, s, cond)
            grow(s, "", depth + 1)
        elif shape == "stream":
            s = self.python(self.pick(["upper_stream", "astream"]), ["stream = true"])
            self.edge(at, s, cond)
            grow(s, "", depth + 1)
        elif shape == "fan":
            grow(at, cond, depth + 1)
            grow(at, "", depth + 1)
        elif shape == "split":
            s = self.stage("rt", "route") if self.draw(st.booleans()) else self.python(self.pick(list(LABELS)))
            self.edge(at, s, cond)
            for _ in range(self.draw(st.integers(1, 2))):
                grow(s, self.cond(s, True), depth + 1)
            self.split_tail(s, grow, depth)
        elif shape == "loop":
            self.looped = True
            fn = self.pick(["again", "again_some"])
            returns = "request" if fn == "again" and self.draw(st.booleans()) else "any"
            t = self.python(fn, [f"max_turns = {self.draw(st.integers(1, 2))}", f"returns = {returns}"])
            self.edge(at, t, cond)
            self.edge(t, self.pick(before))
            self.edge(t, self.sink())          # Generated results leave the loop
        else:
            self.edge(at, self.sink(), cond)

    def sink(self) -> str:
        """Where a path of results ends: the shared respond, another respond, or the join."""
        where = self.pick(["out"] * 3 + ["respond", "join"])
        if where == "respond":
            return self.stage("out", "respond")
        if where == "join":
            if self.join is None:
                policy = self.pick(["policy = first", "policy = majority", "policy = longest",
                                    'policy = fn  fn = "hooks:merge_new"', 'fn = "hooks:merge_index"',
                                    'policy = fn  fn = "hooks:merge_pick"'])
                params = [policy]
                self.maybe(params, f"on_reject = {self.pick(['fail', 'drop'])}", 1)
                self.join = self.stage("join", "join", params)
                self.edge(self.join, self.shared_out())
            return self.join
        return self.shared_out()

    def shared_out(self) -> str:
        if self.out is None:
            self.out = self.stage("out", "respond")
        return self.out

    def text(self) -> str:
        settings = [f'model = "{MODELS[0]}"']
        if self.draw(st.integers(0, 3)):
            settings.append("device = " + self.pick(["cpu", "auto", '"cpu"']))
        if self.mode is not None:
            settings.append(f"mode = {self.mode}")
        dtype = self.pick(["fp32", "fp32", "bf16", None] if self.mode != "efficient" else [None, "fp32"])
        if dtype is not None:
            settings.append(f"dtype = {dtype}")
        if self.kv_budget is not None:
            settings.append(f"kv_budget = {self.kv_budget}")
        if self.draw(st.integers(0, 3)) == 0:
            settings.append("threads = 1")
        body = settings + self.stages + self.edges
        if self.draw(st.integers(0, 2)) == 0:
            body = self.draw(st.permutations(body))       # the order inside a pipeline is free
        return f"pipeline {self.name} {{\n    " + "\n    ".join(body) + "\n}\n"


MODELS = ["", ""]      # the two tiny models' paths, set by the fixture


@st.composite
def pipeline_text(draw, name: str) -> tuple[str, list[str]]:
    b = Builder(draw, name, MODELS[1])
    rp: list[str] = []
    b.maybe(rp, f"max_queue = {b.pick([2, 16])}")
    b.maybe(rp, f"max_prompt_tokens = {b.pick([0, 40])}")
    src = b.stage("request", "requests", rp)
    b.request_path(src, "", 0, [])
    if draw(st.integers(0, 59)) == 7:             # now and then an extra edge anywhere: check decides
        names = list(b.kinds)
        b.edge(b.pick(names), b.pick(names), b.pick(["", " otherwise"]))
    return b.text(), b.gens


INCLUDES = {"main.agp": ("sub/lib.agp", "sub/lib.agp"), "sub/lib.agp": ("sub/more.agp", "more.agp")}


@st.composite
def programs(draw):
    """{relative path: text} of the files, the main file's name, the pipeline a command runs
    without --pipeline, and the generate stages of each pipeline."""
    counts = {"main.agp": draw(st.integers(0, 2))}
    if draw(st.booleans()) or counts["main.agp"] == 0:
        counts["sub/lib.agp"] = draw(st.integers(0 if draw(st.booleans()) else 1, 2))
        if draw(st.integers(0, 2)) == 0 or counts["sub/lib.agp"] == 0:
            counts["sub/more.agp"] = draw(st.integers(1, 2))
    files, gens, order = {}, {}, {}
    k = 0
    for path, count in counts.items():
        pipelines = []
        for _ in range(count):
            name = f"p{k}"
            k += 1
            text, gens[name] = draw(pipeline_text(name))
            pipelines.append((name, text))
        if len(pipelines) > 1 and draw(st.booleans()):
            pipelines = draw(st.permutations(pipelines))
        order[path] = [name for name, _ in pipelines]
        included, written = INCLUDES.get(path, (None, None))
        parts = [f'use "{written}"\n'] if included in counts else []
        files[path] = "\n".join(parts + [text for _, text in pipelines])
    default = next((order[p][0] for p in ("main.agp", "sub/lib.agp", "sub/more.agp") if order.get(p)), None)
    return files, default, gens


LINES = [      # request lines of every shape; each program runs a random few of them
    {"id": "a", "messages": [{"role": "user", "content": "hello there"}], "ignore_eos": True},
    {"id": "bx", "messages": [{"role": "system", "content": "Be kind."},
                              {"role": "user", "content": "the cat and the world is"}], "max_tokens": 3},
    {"id": "cc", "prompt": "of us", "metadata": {"big": True, "tier": "gold", "team id": "a"}, "n": 2,
     "max_tokens": 2, "headers": {"x-tenant": "gold"}},
    {"id": "dz", "messages": [{"role": "user", "content": "of us"}], "max_tokens": 2, "stop": ["e"]},
    {"id": 99, "prompt": "the world " * 12, "max_tokens": 2, "temperature": 0.5, "seed": 3},
    {"id": "ee", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2,
     "max_tokens": 2},
    {"messages": [{"role": "user", "content": "json please"}], "response_format": {"type": "json_object"},
     "max_tokens": 3},
    {"id": "pr", "prompt": "cat", "priority": 1, "max_tokens": 2},
    {"id": "echo0", "prompt": "score me", "echo": True, "max_tokens": 0, "logprobs": 1},
    {"id": "echo2", "prompt": "the cat", "echo": True, "max_tokens": 2, "prompt_logprobs": 1},
    {"id": "ids", "prompt_token_ids": [5, 6, 7], "max_tokens": 2, "return_token_ids": True},
    {"id": "tool", "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 6, "tool_choice": "required",
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
    {"id": "stops", "prompt": "a cat", "stop": ["a"], "stop_token_ids": [3], "include_stop_str_in_output": True,
     "max_tokens": 4},
    {"id": "cut", "prompt": "the world " * 30, "truncate_prompt_tokens": 8, "max_tokens": 2},
    {"id": "cont", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the"}],
     "continue_final_message": True, "add_generation_prompt": False, "max_tokens": 2},
    {"id": "few", "prompt": "x", "min_tokens": 2, "max_tokens": 2},
    {"id": "bias", "prompt": "x", "logit_bias": {"5": 100}, "allowed_token_ids": [5, 6, 7], "max_tokens": 2},
    {"id": "schema", "prompt": "x", "max_tokens": 4, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "properties": {
            "b": {"type": "boolean"}}, "required": ["b"]}}}},
    {"id": "many", "prompt": "x", "n": 3, "seed": 1, "temperature": 1.0, "logprobs": 1, "max_tokens": 2,
     "cache_salt": "s"},
]
KINDS = {"rejected", "invalid", "failed"}


@pytest.fixture(scope="module")
def folder(tiny_gguf, soft_gguf, tmp_path_factory):
    """One folder for every program: hooks.py beside main.agp and in sub/, written once (each
    program's files overwrite the last's)."""
    MODELS[:] = [str(soft_gguf), str(tiny_gguf)]
    root = tmp_path_factory.mktemp("programs")
    (root / "sub").mkdir()
    for d in (root, root / "sub"):
        (d / "hooks.py").write_text(HOOKS, encoding="utf-8")
        (d / "schema.json").write_text(SCHEMA, encoding="utf-8")
    return root


def _write(root, files: dict) -> None:
    for p in ("main.agp", "sub/lib.agp", "sub/more.agp"):
        if (root / p).exists():
            (root / p).unlink()
    for p, text in files.items():
        (root / p).write_text(text, encoding="utf-8")


POSITIONED = re.compile(r"^/[^:]+\.agp:\d+:\d+: (error|warning): ")


def _positions(program, diags) -> list:
    """Every diagnostic names a file, a line and a column; the printed ones say file:line:col."""
    for d in diags:
        assert d.pos is not None and d.pos.file, d.message
        assert d.pos.line >= 1 and d.pos.col >= 1, (d.message, d.pos)
    printed = render_all(diags, program.sources)
    assert "internal error" not in printed
    heads = [ln for ln in printed.splitlines() if ln.startswith("/") and (" error: " in ln or " warning: " in ln)]
    assert len(heads) == len(diags) and all(POSITIONED.match(ln) for ln in heads), printed
    return [d for d in diags if d.is_error]


def _run(rt, lines) -> list[dict]:
    """The lines through `rt` as `agp run` runs them; one record per line, in slot order."""
    requests = [RunRequest(i, i + 1, parse_line_object(dict(obj), i + 1)) for i, obj in enumerate(lines)]
    records: dict[int, dict] = {}
    failure = flowkit.on_a_thread(lambda: run_pipeline(rt, requests, on_done=lambda slot, rec: records.__setitem__(slot, rec),
                                                       progress=False), HANG_S)
    assert not failure, repr(failure[0])
    assert sorted(records) == list(range(len(lines))), f"records for {sorted(records)} of {len(lines)} lines"
    return [records[i] for i in range(len(lines))]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(program=programs(), picks=st.lists(st.integers(0, len(LINES) - 1), min_size=3, max_size=10, unique=True),
       pin=st.integers(0, 9))
def test_every_program_check_accepts_runs(program, picks, pin, folder):
    check_program(program, picks, pin, folder)


def check_program(program, picks: list[int], pin: int, folder) -> None:
    """The property, for one program of `programs()` written into `folder`, run over the lines
    `picks` of LINES, line `pin` pinned to one of its generate stages."""
    files, default, gens = program
    _write(folder, files)
    main = str(folder / "main.agp")
    loaded, diags = pipeline_dsl.load(main)
    errors = _positions(loaded, diags)
    shown = "\n".join(f"--- {p}\n{t}" for p, t in files.items())
    note(shown)
    event("accepted" if not errors else "refused: " + errors[0].message.split("'")[0].split(":")[0][:40])
    if errors:
        return
    once, _ = format_text(files["main.agp"], main)      # fmt's text of an accepted file is accepted
    (folder / "main.agp").write_text(once, encoding="utf-8")
    assert not [d for d in pipeline_dsl.load(main)[1] if d.is_error], f"fmt broke it\n{shown}"
    graph = load_graph(main)
    assert graph.graph["name"] == default, shown
    lines = [dict(LINES[i]) for i in picks]
    names = gens[default]
    if names:
        lines[pin % len(lines)]["model"] = names[pin % len(names)]   # a line pinned to a generate stage
    rt = PipelineRuntime(graph, overrides={"threads": 1})
    try:
        records = _run(rt, lines)
    finally:
        rt.shutdown()
    choices = 0
    for rec, line in zip(records, lines):
        json.dumps(rec)                                  # a record is a JSON line
        assert rec["id"] == line.get("id", lines.index(line) + 1), (rec, shown)
        if "error" in rec:
            err = rec["error"]
            assert err["type"] in KINDS and err["message"], (rec, shown)
            if err["type"] == "rejected":
                assert str(rec["id"]).endswith("x"), (rec, shown)
            if err["type"] == "failed":
                assert rec["id"] == "dz" and "SystemExit" in err["message"], (rec, shown)
            continue
        assert isinstance(rec["text"], str), (rec, shown)
        many = rec.get("choices")
        if many is not None:
            assert len(many) > 1 and [c["index"] for c in many] == list(range(len(many))), (rec, shown)
        choices += len(many) if many else 1
    flowkit.check_counts(rt, choices)
