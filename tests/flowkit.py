"""Small helpers for the runtime's tests: write a pipeline and its hooks, check it, run it.

    path = write(tmp_path, model, BODY, hooks=HOOKS)      # p.agp and hooks.py side by side
    assert errors(path) == []
    results, rt = run(path, [chat("a", "hello")])

Hooks share state with the test through this module (`import flowkit` in hooks.py):
`flowkit.gate("slow")` is a threading.Event, `flowkit.bump("calls")` a counter that also
tracks how many calls of a name run at once (`flowkit.peak("calls")`).
"""
from __future__ import annotations

import asyncio
import collections
import textwrap
import threading

import pipeline_dsl
from pipeline_dsl.flow import PipelineRuntime, load_graph

SEGMENT = """
    stage {b} : dynamic_batch {{ max_batch_size = 8  timeout = 1ms }}
    stage {e} : encode {{}}
    stage {k} : kv_lookup {{ block_size = 8  budget = 2MiB }}
"""



# hook functions the generated-pipeline tests (test_flow_property, test_program_property) both
# write into their hooks.py: a stream stage's pass and its async twin, a join's two fn shapes
STREAM_AND_JOIN_HOOKS = '''
def upper_stream(item, chunks):
    for text in chunks:
        yield text.upper()


async def astream(item, chunks):
    async for text in chunks:
        yield text


def merge_new(items):
    return {"text": "+".join(i["text"] for i in items)}


def merge_index(items):
    return len(items) - 1
'''


def chain(gen="gen", b="batch", e="encode", k="kv") -> str:
    """An engine segment's stages and edges, ending at generate stage `gen`."""
    return (SEGMENT.format(b=b, e=e, k=k) +
            f"    {b} -> {e} when full\n    {b} -> {e} when timeout\n    {e} -> {k} -> {gen}\n")


def write(tmp_path, model, body: str, hooks: str | None = None):
    if hooks is not None:
        (tmp_path / "hooks.py").write_text(textwrap.dedent(hooks), encoding="utf-8")
    path = tmp_path / "p.agp"
    path.write_text(f"pipeline p {{\n    model = \"{model}\"\n    device = cpu\n    dtype = fp32\n"
                    + textwrap.dedent(body) + "\n}\n", encoding="utf-8")
    return path


def errors(path) -> list:
    _, diags = pipeline_dsl.load(str(path))
    return [d for d in diags if d.is_error]


def chat(rid, text, **kw) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": text}], "max_tokens": 4, "ignore_eos": True,
            **kw}


def runtime(path, **kw) -> PipelineRuntime:
    return PipelineRuntime(load_graph(path), overrides={"threads": 1}, **kw)


def on_a_thread(fn, hang_s: float) -> list:
    """fn() on a thread of its own: a hang fails the test instead of stalling the suite; returns
    what it raised ([] or [the exception]) for the caller to assert once it has tidied up."""
    failure: list = []

    def go():
        try:
            fn()
        except BaseException as e:              # noqa: BLE001 - the caller's assertion shows it
            failure.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(hang_s)
    assert not t.is_alive(), "the pipeline hung"
    return failure


def run(path, requests, on_result=None, hang_s: float = 120.0, open_when: tuple[str, str] | None = None):
    """run_all on a thread of its own (on_a_thread). open_when=(stage, gate): gate `gate` opens
    once `stage` has taken an item in (open_once_taken_in), for a hook that waits on it."""
    rt = runtime(path)
    if open_when is not None:
        open_once_taken_in(rt, *open_when)
    out: list = []
    failure = on_a_thread(lambda: out.extend(rt.run_all([dict(r) if isinstance(r, dict) else r for r in requests],
                                                        on_result=on_result)), hang_s)
    rt.shutdown()
    assert not failure, repr(failure[0])
    return out, rt


_LOCK = threading.Lock()
GATES: dict[str, threading.Event] = {}
COUNTS: collections.Counter = collections.Counter()
RUNNING: collections.Counter = collections.Counter()
PEAKS: collections.Counter = collections.Counter()


def reset() -> None:
    with _LOCK:
        GATES.clear()
        COUNTS.clear()
        RUNNING.clear()
        PEAKS.clear()


def open_gates() -> None:
    """Set every gate: nothing a test left blocked stays blocked after it."""
    with _LOCK:
        gates = list(GATES.values())
    for g in gates:
        g.set()


class Heard:
    """A runtime listener: the request's result, and an event set once it came."""

    def __init__(self):
        self.result, self.done = None, threading.Event()

    def on_delta(self, *args):
        pass

    def on_done(self, result):
        self.result = result
        self.done.set()


def gate(name: str) -> threading.Event:
    with _LOCK:
        return GATES.setdefault(name, threading.Event())


def open_once_taken_in(rt, stage: str, name: str) -> None:
    """Set gate `name` once stage `stage` of runtime `rt` has taken an item in (its own count,
    polled on a thread): a hook waiting on the gate goes on only after that, however busy the
    machine is. After a minute it is set anyway (the test's assertion then says what went wrong)."""
    def watch():
        for _ in range(6000):
            if rt.stats()["stages"][stage]["items_in"] >= 1:
                break
            threading.Event().wait(0.01)
        gate(name).set()

    threading.Thread(target=watch, daemon=True).start()


def bump(name: str) -> int:
    """Count a call of `name`; returns its number (1, 2, ...)."""
    with _LOCK:
        COUNTS[name] += 1
        return COUNTS[name]


class running:
    """`with flowkit.running("f"):` around a call: PEAKS["f"] is the most at once."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        with _LOCK:
            RUNNING[self.name] += 1
            PEAKS[self.name] = max(PEAKS[self.name], RUNNING[self.name])

    def __exit__(self, *exc):
        with _LOCK:
            RUNNING[self.name] -= 1


def hold(item: dict) -> dict:
    """A python stage's fn (`fn = "flowkit:hold"`): counts the call under "hold", then waits
    for gate "hold", which the test opens (5 minutes at most), so the request is surely in
    flight while the test probes the server."""
    bump("hold")
    gate("hold").wait(300)
    return item


def ask_again(item: dict) -> dict:
    """A python stage's fn (`fn = "flowkit:ask_again"  returns = request`) between two generate
    stages, a cascade: the first one's answer (a draft) is dropped, its request asked again of
    the second."""
    return item["request"]


def refuse_blocked(item: dict):
    """A guard's fn (`fn = "flowkit:refuse_blocked"`, with `returns = any` before the model) before
    or after the model: an item whose request's prompt mentions "blocked" is answered with the
    guard's own words (a new result in place of the model's); any other goes on as it is."""
    request = item.get("request", item)
    if "blocked" in str(request.get("prompt") or request.get("messages")):
        return {"text": "I can't help with that.", "finish_reason": "content_filter"}
    return item


def fail_after_first_chunk(item: dict, chunks):
    """A stream stage's fn (`fn = "flowkit:fail_after_first_chunk"  stream = true`): it lets the
    answer's first chunk through, then fails the request."""
    for i, text in enumerate(chunks):
        if i == 1:
            raise RuntimeError("failed by the test")
        yield text


async def ahang(item: dict) -> dict:
    """An `async def` python stage's fn that never returns (60 s): counts the call under "ahung",
    and under "cancelled" when its timeout cancels it."""
    bump("ahung")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        bump("cancelled")
        raise
    return item


def edges_add_up(stats: dict) -> None:
    """Every stage's in and out (of a runtime's stats()) are the sums of its edges, a requests
    stage's in also what it admitted; nothing is left queued."""
    stages, edges = stats["stages"], stats["edges"]
    for name, row in stages.items():
        into = sum(e["items"] for e in edges if e["to"] == name)
        out = sum(e["items"] for e in edges if e["from"] == name)
        admitted = stats["requests"]["requests"] if row["kind"] == "requests" else 0
        assert row["items_in"] == into + admitted, (name, row, edges)
        assert row["items_out"] == out, (name, row, edges)
        assert row["queued"] == 0, (name, row)


def check_counts(rt, choices: int) -> None:
    """A run's per-stage counts add up: edges_add_up; a stage that sends each item along one edge
    sends on what it neither refused, failed nor dropped; the respond stages together took in
    exactly the `choices` answered (and what was dropped there)."""
    stats = rt.stats()
    edges_add_up(stats)
    stages = stats["stages"]
    responded = 0
    for name, row in stages.items():
        ended = row["rejected"] + row["failed"] + row["dropped"]
        routes = rt.router.routes[name]
        plain = [v for v, c in routes if c is None]
        single = len(plain) <= 1 and not (plain and len(routes) > 1)
        if row["kind"] == "respond":
            responded += row["items_in"] - ended
        elif row["kind"] not in ("join", "kv_lookup") and single and name not in rt.loops.bounds:
            assert row["items_in"] == row["items_out"] + ended, (name, row)
    assert responded == choices, (responded, choices, stages)


def run_lines(path, bodies, overrides: dict | None = None) -> list[dict]:
    """Request lines (dicts) through `agp run`'s driver on the pipeline at `path`, a runtime of its
    own (a run ends its runtime): the output records in line order."""
    from pipeline_dsl.commands.runner import RunRequest, run_pipeline
    from pipeline_dsl.flow import build_runtime
    from pipeline_dsl.requests_io import parse_request

    rt = build_runtime(path, overrides={"threads": 1, **(overrides or {})})
    reqs = [RunRequest(slot=i, line=i + 1, parsed=parse_request(dict(b), default_id=i)) for i, b in enumerate(bodies)]
    out: dict[int, dict] = {}
    try:
        run_pipeline(rt, reqs, on_done=out.__setitem__, progress=False)
    finally:
        rt.shutdown()
    return [out[i] for i in range(len(bodies))]


# a cascade: the first generate stage's draft is dropped (ask_again) and the request asked again of a
# second engine, whose KV budget is {budget2} (64KiB: a context of 128 tokens)
CASCADE = """pipeline tiny {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests {{}}
    stage batch   : dynamic_batch {{ max_batch_size = 8  timeout = 1ms }}
    stage encode  : encode {{}}
    stage kv      : kv_lookup {{ block_size = 8  budget = 1MiB }}
    stage draft   : generate {{ max_new_tokens = 6 }}
    stage again   : python {{ fn = "flowkit:ask_again"  returns = request }}
    stage batch2  : dynamic_batch {{ max_batch_size = 8  timeout = 1ms }}
    stage encode2 : encode {{}}
    stage kv2     : kv_lookup {{ block_size = 8  budget = {budget2} }}
    stage gen     : generate {{ max_new_tokens = 16 }}
    stage out     : respond {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> draft -> again -> batch2
    batch2 -> encode2 when full
    batch2 -> encode2 when timeout
    encode2 -> kv2 -> gen -> out
}}
"""
