"""The example pipelines run end to end on the embedded model and do what they say."""
from __future__ import annotations

import collections
from pathlib import Path

import pytest

from pipeline_dsl.flow import PipelineRuntime, load_graph
from stages.impl import normalise_answer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _weights_loaded_once():
    """The module's runtimes take one loaded copy of each weights they name (the embedded model
    in auto, int8 and fp32), as one runtime's engines do (engine.models.LoadedModels): each
    example still builds its own engines, KV pools and stages, without reading and dequantising
    the file again (seconds a runtime)."""
    from pipeline_dsl.engine import models

    shared = models.LoadedModels()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "LoadedModels", lambda: shared)
        yield


def run(name: str, requests, **overrides):
    rt = PipelineRuntime(load_graph(EXAMPLES / name), overrides=overrides)     # torch's threads: one a worker
    results = rt.run_all(requests)
    stats = rt.stats()
    rt.shutdown()
    return results, stats


def user(rid: str, text: str, **kw) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": text}], **kw}


def test_guardrail_never_shows_the_model_an_email_address():
    with_mail = user("mail", "Please write to jane.doe@example.org about my order.", max_tokens=8)
    placeholder = user("placeholder", "Please write to [EMAIL] about my order.", max_tokens=8)
    (a, b), stats = run("guardrail.agp", [with_mail, placeholder])
    assert a.ok and b.ok
    # the model saw exactly the placeholder's tokens: the address never reached it
    assert a.usage["prompt_tokens"] == b.usage["prompt_tokens"]
    assert "jane.doe" not in a.choices[0].data["request"]["messages"][0]["content"]
    assert stats["stages"]["redact"]["items_in"] == 2 and stats["stages"]["guard"]["items_in"] == 2


def test_guardrail_refuses_an_answer_with_contact_details_and_only_that_one():
    import pipeline_dsl
    from pipeline_dsl.userfn import load_function

    guard_output = load_function("hooks:guard_output", str(EXAMPLES))
    with pytest.raises(pipeline_dsl.Reject, match="contact details"):
        guard_output({"text": "Call +1 555 123 4567", "request": {}})
    assert guard_output({"text": "fine", "request": {}})["text"] == "fine"
    with pytest.raises(pipeline_dsl.Reject, match="blocked topic"):    # a topic an .agp's args writes in capitals
        guard_output({"text": "my credit card number is", "request": {}}, blocked=["Credit Card"])


def test_router_sends_long_prompts_to_the_long_engine():
    long_text = "Summarise this: " + "the quick brown fox jumps over the lazy dog. " * 12
    reqs = [user("short", "Hi!", max_tokens=4), user("long", long_text, max_tokens=4)]
    (short, long_), stats = run("router.agp", reqs)
    assert short.choices[0].data["generated_by"] == "short_gen"
    assert long_.choices[0].data["generated_by"] == "long_gen"
    assert stats["stages"]["long_gen"]["items_in"] == 1 and stats["stages"]["short_gen"]["items_in"] == 1
    assert {e["weights"] for e in stats["engines"].values()} >= {"int8"}     # two engines, two precisions


def test_vote_returns_the_majority_answer_of_three_samples():
    (res,), stats = run("vote.agp", [user("q", "What is the capital of France? Answer in one word.")])
    branches = [b["text"] for b in res.choices[0].data["branches"]]
    assert len(branches) == 3 and stats["stages"]["gen"]["items_in"] == 3
    votes = collections.Counter(normalise_answer(t) for t in branches)
    top = max(votes.values())
    assert votes[normalise_answer(res.choices[0].text)] == top
    # ties go to the earliest branch
    assert res.choices[0].text == next(t for t in branches if votes[normalise_answer(t)] == top)


def test_tool_loop_puts_the_calculators_result_in_the_answer():
    (res,), stats = run("tool_loop.agp", [user("mul", "What is 37 * 12?")], dtype="fp32")
    assert res.ok
    assert "444" in res.choices[0].text
    messages = res.choices[0].data["request"]["messages"]
    assert any(m["role"] == "tool" and m["content"] == "37 * 12 = 444" for m in messages)
    assert stats["stages"]["gen"]["items_in"] == 2 and stats["stages"]["tool"]["items_in"] == 2


def test_extract_answers_json_that_follows_the_schema():
    import json

    reqs = [user("alice", "Alice Smith is 34 and lives in Paris."), user("bob", "Bob Jones, 51, from Oslo.")]
    results, _ = run("extract.agp", reqs)
    for res in results:
        person = json.loads(res.choices[0].text)
        assert set(person) == {"name", "age", "city"}
        assert isinstance(person["name"], str) and isinstance(person["city"], str)
        assert isinstance(person["age"], int) and person["age"] >= 0


def test_tenants_refuses_a_tenant_over_its_rate_with_a_429_and_admits_pro_tenants_first():
    # a free tenant's burst is 2: of three requests at once exactly one is refused, with the
    # seconds until the next would pass; a pro tenant's three all run, at priority 0
    reqs = ([user(f"free{i}", "Hi!", max_tokens=2, metadata={"tenant": "t-free", "tier": "free"}) for i in range(3)]
            + [user(f"pro{i}", "Hi!", max_tokens=2, metadata={"tenant": "t-pro", "tier": "pro"}) for i in range(3)])
    results, stats = run("tenants.agp", reqs)
    by_id = {r.id: r for r in results}
    refused = [r for r in results if not r.ok]
    assert len(refused) == 1 and refused[0].id.startswith("free")
    err = refused[0].error
    assert (err.kind, err.stage, err.status) == ("rejected", "gate", 429) and 0 < err.retry_after <= 2
    assert "over its rate limit" in err.message
    assert all(by_id[f"pro{i}"].choices[0].data["request"]["priority"] == 0 for i in range(3))
    assert stats["stages"]["gate"]["rejected"] == 1 and stats["stages"]["gen"]["items_in"] == 5


def test_fallback_asks_the_second_engine_only_for_answers_the_first_could_not_finish():
    # the long request asks 8 tokens: the fast engine cuts it there (finish_reason length, as at
    # its stage's own max_new_tokens of 24, so it goes on to the strong engine), and the strong
    # engine's bf16 answer is 8 tokens instead of its stage's 128 (only which engine answered is
    # checked; the short answer ends by itself within the fast stage's 24)
    reqs = [user("short", "What is 2+3? Answer with a number."),
            user("long", "Write a long story about a dragon who learns to bake bread.", max_tokens=8)]
    (short, long_), stats = run("fallback.agp", reqs)
    assert short.choices[0].data["generated_by"] == "fast"
    assert long_.choices[0].data["generated_by"] == "strong"
    assert stats["stages"]["strong"]["items_in"] == 1 and stats["stages"]["fast"]["items_in"] == 2


def test_map_reduce_summarises_each_paragraph_and_joins_them_in_order():
    text = ("The cat sat on the mat all day.\n\nThe dog barked at the mailman.\n\n"
            "Birds sang in the tall oak tree.")
    (res, empty), stats = run("map_reduce.agp", [user("doc", text, max_tokens=6), user("blank", " \n\n ")])
    assert res.ok and len(res.choices) == 1
    branches = res.choices[0].data["branches"]
    assert len(branches) == 3                             # one branch a paragraph
    assert res.choices[0].text == "\n".join(b["text"].strip() for b in branches)
    # the merged result answers the request the split stage got (the client's), not a paragraph's
    assert res.choices[0].data["request"]["messages"] == [{"role": "user", "content": text}]
    assert 3 <= res.usage["completion_tokens"] <= 3 * 6   # every branch's tokens; each at most the request's 6
    assert empty.ok and empty.choices[0].text == "(nothing to summarise)"
    assert stats["stages"]["split"]["items_out"] == 3 and stats["stages"]["gen"]["items_in"] == 3
