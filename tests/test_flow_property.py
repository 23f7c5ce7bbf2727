"""Whatever `agp check` accepts runs: random pipelines built from the stage kinds (Hypothesis)
run over a few requests on the tiny model; no crash, no hang, every request answered or
failed with a clear error of its own, and the per-stage counts add up along every edge.

The graphs include what `check` must reject: a python stage whose `otherwise` edge cannot
take the type its conditional edges leave over, a generator function without stream = true;
and the stage policies: workers, timeouts, retries of a flaky function, caches, `async def`,
stream stages after generate, joins by fn or with on_reject = drop, a stage raising SystemExit."""
from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import flowkit
import pipeline_dsl
from pipeline_dsl.flow import PipelineRuntime
from pipeline_dsl.graph import build_graph

HOOKS = '''
import asyncio
import pipeline_dsl

def same(item):
    return item

async def asame(item):
    await asyncio.sleep(0)
    return item

CALLS = {}

def flaky(item):
    key = item.get("id")
    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] == 1:
        raise ConnectionError("the first call of each id fails")
    return item

def boom(item):
    if item.get("id") == "dz" or item.get("request", {}).get("id") == "dz":
        raise SystemExit(1)
    return item

def judge(item):
    return "accept" if len(item.get("text", "")) % 2 == 0 else None

def yields(item):
    yield item

def tag(item):
    return "even" if len(item.get("id", "")) % 2 == 0 else "odd"

def shout(item):
    if "text" in item:
        item["text"] = item["text"].upper()
    return item

def refuse_x(item):
    if str(item.get("id", "")).endswith("x"):
        raise pipeline_dsl.Reject("ids ending in x are refused")
    return item

def again(item):
    if "request" not in item:         # a Request reached it (a random extra edge): pass it on
        return item
    req = dict(item["request"])
    req["messages"] = list(req["messages"]) + [{"role": "assistant", "content": item["text"]},
                                               {"role": "user", "content": "more"}]
    return req
''' + flowkit.STREAM_AND_JOIN_HOOKS

EXAMPLES = 100         # random pipelines a run (derandomized: the same ones every run); ~25 s


class Builder:
    def __init__(self, draw):
        self.draw = draw
        self.stages: list[str] = []
        self.edges: list[str] = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def stage(self, prefix: str, text: str) -> str:
        name = self.name(prefix)
        self.stages.append(f"stage {name} : {text}")
        return name

    def edge(self, a: str, b: str, cond: str = "") -> None:
        self.edges.append(f"{a} -> {b}{cond}")

    def python(self, prefix: str, fn: str, draw, extra: str = "") -> str:
        """A python stage with random policies (workers, timeout, cache)."""
        policy = [f"workers = {draw(st.sampled_from([1, 2, 16]))}"]
        if draw(st.booleans()):
            policy.append("timeout = 20s")
        if draw(st.integers(0, 3)) == 0 and fn not in ("flaky", "upper_stream", "astream"):
            policy.append("cache = 4")
        return self.stage(prefix, f'python {{ fn = "hooks:{fn}"  {"  ".join(policy)} {extra}}}')

    def pre(self, src: str, draw) -> str:
        """0-3 request-level stages after `src`; returns the last."""
        at = src
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["system", "same", "refuse", "tag", "route", "async", "flaky", "boom",
                                         "yields"]))
            if kind == "system":
                s = self.stage("sys", 'system_prompt { text = "Be brief." }')
            elif kind == "route":
                s = self.stage("rt", "route {}")
            elif kind == "flaky":
                s = self.python("py", "flaky", draw, "retries = 2  backoff = 1ms ")
            else:
                fn = {"same": "same", "refuse": "refuse_x", "tag": "tag", "async": "asame", "boom": "boom",
                      "yields": "yields"}[kind]
                s = self.python("py", fn, draw)
            self.edge(at, s)
            at = s
        return at

    def segment(self, draw, gens: int) -> tuple[str, list[str]]:
        b = self.stage("batch", f"dynamic_batch {{ max_batch_size = {draw(st.sampled_from([1, 4, 8]))}  "
                                f"timeout = {draw(st.sampled_from(['0', '1ms']))} "
                                f"policy = {draw(st.sampled_from(['continuous', 'static']))} }}")
        e = self.stage("enc", f"encode {{ chat_template = {draw(st.sampled_from(['true', 'false']))} }}")
        k = self.stage("kv", f"kv_lookup {{ block_size = 8  budget = 1MiB  "
                             f"reuse = {draw(st.sampled_from(['prefix', 'none']))} }}")
        self.edge(b, e, " when full")
        self.edge(b, e, " when timeout")
        self.edge(e, k)
        names = []
        for i in range(gens):
            temp = draw(st.sampled_from(["0", "0.8"]))
            n = draw(st.integers(1, 2))
            g = self.stage("gen", f"generate {{ max_new_tokens = {draw(st.integers(1, 5))}  temperature = {temp}  "
                                  f"seed = {i + 1}  n = {n} }}")
            if i == 0 or gens == 1:
                self.edge(k, g)
            else:
                self.edge(k, g, draw(st.sampled_from(["", " when prompt_tokens > 30"])))
            names.append(g)
        if any(" when " in e_ for e_ in self.edges if e_.startswith(f"{k} ->")):
            self.edge(k, names[0], " otherwise") if not any(
                e_ == f"{k} -> {names[0]}" for e_ in self.edges) else None
        return b, names

    def post(self, gen: str, out: str, draw) -> None:
        at = gen
        for _ in range(draw(st.integers(0, 2))):
            fn = draw(st.sampled_from(["same", "shout", "refuse_x", "asame", "boom", "stream", "astream"]))
            if fn in ("stream", "astream"):
                s = self.python("post", "upper_stream" if fn == "stream" else "astream", draw, "stream = true ")
            else:
                s = self.python("post", fn, draw)
            self.edge(at, s)
            at = s
        self.edge(at, out)

    def judged(self, gen: str, out: str, other_head: str, draw) -> None:
        """A python stage that may give either type, whose `otherwise` edge leads to another
        engine's batcher (check rejects it: unlabelled Generated results have nowhere to go) or to
        a route stage in front of that batcher and `out` (it runs)."""
        j = self.python("judge", "judge", draw, "returns = any ")
        self.edge(gen, j)
        self.edge(j, out, " when accept")
        if draw(st.booleans()):
            self.edge(j, other_head, " otherwise")
        else:
            r = self.stage("rt", "route {}")
            self.edge(j, r, " otherwise")
            self.edge(r, other_head)
            self.edge(r, out)

    def text(self) -> str:
        body = "\n    ".join(self.stages + self.edges)
        return f"pipeline p {{\n    model = \"{MODEL}\"\n    device = cpu\n    dtype = fp32\n    {body}\n}}\n"


MODEL = ""


@st.composite
def pipelines(draw):
    b = Builder(draw)
    src = b.stage("request", "requests { max_queue = 16 }")
    at = b.pre(src, draw)
    out = b.stage("out", "respond {}")
    nseg = draw(st.integers(1, 2))
    heads, gens = [], []
    for _ in range(nseg):
        head, gs = b.segment(draw, draw(st.integers(1, 3)))
        heads.append(head)
        gens += gs
    if nseg == 1:
        b.edge(at, heads[0])
    else:
        how = draw(st.sampled_from(["fan", "route", "label"]))
        if how == "fan":
            b.edge(at, heads[0])
            b.edge(at, heads[1])
        elif how == "route":
            b.edge(at, heads[0], draw(st.sampled_from([" when prompt_tokens > 20", " when metadata.big == true",
                                                       " when id != \"a\" and not n > 1"])))
            b.edge(at, heads[1], " otherwise")
        else:
            t = b.stage("py", 'python { fn = "hooks:tag" }')
            b.edge(at, t)
            b.edge(t, heads[0], " when even")
            b.edge(t, heads[1], " otherwise")
    joined = draw(st.booleans()) and (len(gens) > 1 or "n = 2" in " ".join(b.stages))
    target = out
    if joined:
        policy = draw(st.sampled_from(["policy = first", "policy = majority", "policy = longest",
                                       'fn = "hooks:merge_new"', 'fn = "hooks:merge_index"']))
        target = b.stage("join", f"join {{ {policy}  on_reject = {draw(st.sampled_from(['fail', 'drop']))} }}")
        b.edge(target, out)
    loop = draw(st.booleans())
    judge = nseg == 2 and not loop and draw(st.integers(0, 2)) == 0
    for i, g in enumerate(gens):
        if judge and i == 0:
            b.judged(g, target, heads[1], draw)
        elif loop and i == 0:
            tool = b.stage("tool", f'python {{ fn = "hooks:again"  returns = request  '
                                   f'max_turns = {draw(st.integers(1, 2))} }}')
            b.edge(g, tool)
            b.edge(tool, heads[0])
            b.post(tool, target, draw)
        else:
            b.post(g, target, draw)
    if draw(st.integers(0, 9)) == 0:           # now and then a random extra edge: check decides
        names = [s.split()[1] for s in b.stages]
        b.edge(draw(st.sampled_from(names)), draw(st.sampled_from(names)))
    return b.text()


_SEG = """    stage batch{a} : dynamic_batch {{ max_batch_size = 4  timeout = 0 policy = continuous }}
    stage enc{a} : encode {{ chat_template = true }}
    stage kv{a} : kv_lookup {{ block_size = 8  budget = 1MiB  reuse = prefix }}
    stage gen{a} : generate {{ max_new_tokens = 3  temperature = 0  seed = 1  n = {n} }}
    batch{a} -> enc{a} when full
    batch{a} -> enc{a} when timeout
    enc{a} -> kv{a}
    kv{a} -> gen{a}
"""
_HEAD = 'pipeline p {\n    model = "@MODEL@"\n    device = cpu\n    dtype = fp32\n    stage request0 : requests { max_queue = 16 }\n    stage out0 : respond {}\n'
# Forms the random draws reach rarely or never at EXAMPLES draws, run every time (@example):
# the judged form through a route stage, into a join by index, behind a route on id
JUDGED_BY_ROUTE = _HEAD + _SEG.format(a=1, n=2) + _SEG.format(a=2, n=1) + """    stage judge1 : python { fn = "hooks:judge"  workers = 2  returns = any }
    stage rt1 : route {}
    stage join1 : join { fn = "hooks:merge_index"  on_reject = fail }
    request0 -> batch1 when id != "a" and not n > 1
    request0 -> batch2 otherwise
    gen1 -> judge1
    judge1 -> join1 when accept
    judge1 -> rt1 otherwise
    rt1 -> batch2
    rt1 -> join1
    gen2 -> join1
    join1 -> out0
}
"""
# the judged form whose otherwise edge goes straight to another batcher: check rejects it
JUDGED_TO_BATCHER = _HEAD + _SEG.format(a=1, n=1) + _SEG.format(a=2, n=1) + """    stage judge1 : python { fn = "hooks:judge"  returns = any }
    request0 -> batch1 when prompt_tokens > 20
    request0 -> batch2 otherwise
    gen1 -> judge1
    judge1 -> out0 when accept
    judge1 -> batch2 otherwise
    gen2 -> out0
}
"""
# a fan-out into two engines joined by index, with drop
FAN_JOINED_BY_INDEX = _HEAD + _SEG.format(a=1, n=2) + _SEG.format(a=2, n=1) + """    stage join1 : join { fn = "hooks:merge_index"  on_reject = drop }
    request0 -> batch1
    request0 -> batch2
    gen1 -> join1
    gen2 -> join1
    join1 -> out0
}
"""


REQUESTS = [
    {"id": "a", "messages": [{"role": "user", "content": "hello there"}], "ignore_eos": True},
    {"id": "bx", "messages": [{"role": "user", "content": "the cat and the world is " * 4}], "max_tokens": 3},
    {"id": "cc", "messages": [{"role": "user", "content": "of us"}], "metadata": {"big": True}, "n": 1},
    {"id": "dz", "messages": [{"role": "user", "content": "of us"}], "max_tokens": 2},
]
KINDS = {"rejected", "invalid", "failed"}


@pytest.fixture(autouse=True)
def _env(soft_gguf, tmp_path_factory):
    global MODEL
    MODEL = str(soft_gguf)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(text=pipelines())
@example(text=JUDGED_BY_ROUTE)
@example(text=JUDGED_TO_BATCHER)
@example(text=FAN_JOINED_BY_INDEX)
def test_every_pipeline_check_accepts_runs(text, tmp_path_factory):
    text = text.replace("@MODEL@", MODEL)
    folder = tmp_path_factory.mktemp("p")
    (folder / "hooks.py").write_text(HOOKS, encoding="utf-8")
    path = folder / "p.agp"
    path.write_text(text, encoding="utf-8")
    program, diags = pipeline_dsl.load(str(path))
    errors = [d for d in diags if d.is_error]
    for d in diags:                             # every diagnostic points somewhere
        assert d.pos is not None, d.message
    event("ran" if not errors else "rejected: " + errors[0].message.split("'")[0].split(":")[0][:40])
    if errors:
        return
    # the graph of the program check accepted, built as load_graph builds it (without loading
    # and checking the file a second time)
    rt = PipelineRuntime(build_graph(program.pipeline(None), allowed=program.allowed or None), overrides={"threads": 1})
    out: list = []
    failure: list = []

    def go():
        try:
            out.extend(rt.run_all([dict(r) for r in REQUESTS]))
        except BaseException as e:              # noqa: BLE001
            failure.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"the pipeline hung:\n{text}"
    rt.shutdown()
    assert not failure, f"{failure[0]!r}\n{text}"
    assert len(out) == len(REQUESTS) and all(r is not None for r in out), text
    for r, req in zip(out, REQUESTS):
        if r.ok:
            assert r.choices and all(isinstance(c.text, str) for c in r.choices)
        else:
            assert r.error.kind in KINDS and r.error.message, f"{r.error.kind}: {r.error.message}\n{text}"
            if r.error.kind == "rejected":
                assert req["id"].endswith("x")
            if r.error.kind == "failed":          # only the SystemExit of boom, for request dz
                assert req["id"] == "dz" and "failed: SystemExit" in r.error.message, \
                    f"{r.error.message}\n{text}"
    flowkit.check_counts(rt, sum(len(r.choices) for r in out if r.ok))
